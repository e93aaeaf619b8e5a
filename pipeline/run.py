"""Plan the shards of a dataset, map ``write_shard`` over Ray or a process pool, write the manifest.

    plan (driver) -> ShardJob per shard -> engine.map(write_shard) -> stats/*.json -> manifest.json

The driver scans the sources once (so every worker sees the same file list), creates the zarr
arrays, skips shards whose stats say they are done with this config, and retries failed shards.
Resuming into the same folder is the same command; a folder rendered with another config or other
pipeline code is an error unless ``overwrite``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator

import zarr
from tqdm import tqdm

import pipeline
from common.errors import UserError
from pipeline import sources
from pipeline.config import DEFAULT_MAX_WORKER_GB, ShardConfig, check_worker_memory, config_hash, to_dict
from pipeline.lock import LockHeld, RenderLock
from pipeline.format import (FORMAT, KERNELS, MANIFEST, MEMBER_TYPES, PLAN, STATS_DIR, WIDS_SUFFIX,
                             atomic_write_bytes, is_temporary, tree_checksums, validate_manifest, wids_file,
                             wids_index)
from pipeline.shards import ShardJob, stats_path, write_shard

log = logging.getLogger("pipeline")


class RenderError(UserError):
    """A run that cannot start or cannot finish; the message is one line."""


def code_version() -> str:
    """Package version + hash of the pipeline's source: the bytes depend on both."""
    h = hashlib.sha256()
    loader = Path(pipeline.__file__).parent.parent / "common" / "config.py"  # resolves every config value
    h.update(b"common/config.py" + loader.read_bytes())
    for path in sorted(Path(pipeline.__file__).parent.glob("*.py")):
        if path.name not in ("__main__.py", "inspect.py", "lock.py"):  # they never touch a sample's bytes
            h.update(path.name.encode() + path.read_bytes())
    return f"{pipeline.__version__}+{h.hexdigest()[:12]}"


def plan_jobs(cfg: ShardConfig, out_dir: Path, chash: str, version: str,
              split_sources: dict[str, sources.SourceList]) -> list[ShardJob]:
    jobs = []
    for split, sc in cfg.splits.items():
        for shard, start in enumerate(range(0, sc.samples, sc.samples_per_shard)):
            stop = min(start + sc.samples_per_shard, sc.samples)
            jobs.append(ShardJob(cfg, chash, version, str(out_dir), split, shard, start, stop,
                                 split_sources[split]))
    return jobs


def is_done(job: ShardJob) -> bool:
    """A shard is done when its stats file matches this config and code and its tar has the size."""
    path = stats_path(job.out_dir, job.split, job.shard)
    try:
        stats = json.loads(path.read_text())
        tar = Path(job.out_dir) / job.file
        return (stats["config_hash"] == job.config_hash and stats["code_version"] == job.code_version
                and stats["samples"] == job.stop - job.start and tar.stat().st_size == stats["bytes"])
    except (OSError, ValueError, KeyError):
        return False


def _remove_outputs(out_dir: Path) -> None:
    """Delete what a previous render wrote (and only that)."""
    for pattern in ("*.tar", ".*.tmp-*", f"*{WIDS_SUFFIX}", MANIFEST, PLAN):
        for p in out_dir.glob(pattern):
            p.unlink()
    for name in (STATS_DIR, KERNELS):
        if (out_dir / name).exists():
            shutil.rmtree(out_dir / name)


def remove_temporary_files(out_dir: Path) -> int:
    """Delete every temporary file (format.is_temporary) under a dataset folder: ``.<name>.tmp-<pid>``
    of shards, stats and the manifest, zarr's ``<chunk>.<uuid>.partial``, as killed or failed
    workers (or a full disk) leave them. Returns how many. Safe only while holding the folder's
    lock: a live run's temporary files are in use."""
    stray = [Path(folder) / name for folder, _, files in os.walk(out_dir) for name in files
             if is_temporary(name)]
    for path in stray:
        path.unlink(missing_ok=True)
    return len(stray)


def prepare_dir(cfg: ShardConfig, out_dir: Path, chash: str, version: str, overwrite: bool) -> None:
    """Check an existing folder (resume or refuse), then write the plan and the zarr arrays."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RenderError(f"output path exists and is not a folder: {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = None
    for name in (PLAN, MANIFEST):
        if (out_dir / name).exists():
            try:
                previous = json.loads((out_dir / name).read_text())
            except ValueError:
                previous = {"config_hash": "unreadable", "code_version": "?"}
            break
    if previous is None and any(out_dir.glob("*.tar")):
        previous = {"config_hash": "unknown (no plan file)", "code_version": "?"}
    if previous is not None and not overwrite:
        if previous.get("config_hash") != chash:
            raise RenderError(f"{out_dir} holds a dataset rendered with another config "
                              f"(hash {previous.get('config_hash')} vs {chash}); "
                              "use --overwrite to replace it or choose another --out")
        if previous.get("code_version") != version:
            raise RenderError(f"{out_dir} was rendered by other pipeline code "
                              f"({previous.get('code_version')} vs {version}); its bytes would differ: "
                              "use --overwrite to re-render it")
    if overwrite and previous is not None:
        _remove_outputs(out_dir)
    remove_temporary_files(out_dir)  # a killed run's partial files (no other run is live: we hold the lock)
    (out_dir / STATS_DIR).mkdir(exist_ok=True)
    plan = {"config": to_dict(cfg), "config_hash": chash, "code_version": version}
    atomic_write_bytes(out_dir / PLAN, json.dumps(plan, indent=1, sort_keys=True).encode())
    create_kernel_arrays(cfg, out_dir / KERNELS, chash)


def create_kernel_arrays(cfg: ShardConfig, path: Path, chash: str) -> None:
    """One float32 array per split, (samples, frames, K, K), one chunk per shard; trajectories
    (samples, frames, steps, 2) alongside. Created once by the driver; workers write whole chunks."""
    root = zarr.open_group(str(path), mode="a")
    K, F, T = cfg.dataset.kernel_size, cfg.dataset.frames, cfg.kernels.steps
    root.attrs.update({"config_hash": chash, "seed": cfg.dataset.seed, "kernel_size": K,
                       "kernels": to_dict(cfg.kernels), "layout": "kernels[split][index, frame, y, x]"})
    for split, sc in cfg.splits.items():
        for name, shape in ((split, (sc.samples, F, K, K)), (f"{split}_trajectories", (sc.samples, F, T, 2))):
            chunks = (sc.samples_per_shard,) + shape[1:]
            if name in root and root[name].shape == shape and root[name].chunks == chunks:
                continue
            root.create_array(name, shape=shape, chunks=chunks, dtype="float32",
                              compressors=zarr.codecs.ZstdCodec(level=3), fill_value=0.0, overwrite=True)


# ----------------------------------------------------------------------------- engines


def _local_map(jobs: list[ShardJob], workers: int, retries: int) -> Iterable[tuple[ShardJob, dict]]:
    """Process pool; a failed shard is retried, a dead worker's pool is rebuilt. Workers die with
    the driver (_die_with_parent); Ctrl-C or SIGTERM stops them at once, an error only once their
    shards are done (those are kept)."""
    pending = {job: 0 for job in jobs}  # job -> failures so far
    ctx = mp.get_context("spawn")
    while pending:
        others = set(mp.active_children())
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_die_with_parent,
                                    initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(write_shard, job): job for job in pending}
            own = set(mp.active_children()) - others  # spawned by submit (spawn context)
            try:
                for fut in cf.as_completed(futures):
                    job = futures[fut]
                    try:
                        stats = fut.result()
                    except cf.process.BrokenProcessPool:
                        _count_failure(pending, job, "worker process died", retries)
                        break  # rebuild the pool, resubmit what is left
                    except Exception as e:  # noqa: BLE001 - retried, then reported
                        _count_failure(pending, job, f"{type(e).__name__}: {e}", retries)
                        continue
                    del pending[job]
                    yield job, stats
            except BaseException as e:
                for f in futures:
                    f.cancel()
                if isinstance(e, KeyboardInterrupt):  # don't wait for running shards: they are lost anyway
                    for proc in own:
                        proc.terminate()
                raise


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    """Pool initializer: the worker dies with the driver, even one killed by SIGKILL. Otherwise it
    would wait on the task queue for ever (it holds the queue's write end too), keeping the
    caller's stdout/stderr pipes open. Linux: the kernel sends SIGKILL when the parent dies
    (prctl PR_SET_PDEATHSIG); elsewhere a thread polls the parent pid once a second."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the driver died before prctl took effect
        os._exit(1)
    if not armed:
        threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _count_failure(pending: dict, job: ShardJob, why: str, retries: int) -> None:
    pending[job] += 1
    log.warning("shard %s failed (try %d of %d): %s", job.file, pending[job], retries + 1, why)
    if pending[job] > retries:
        raise RenderError(f"shard {job.file} failed {pending[job]} times: {why}")


RAY_PORT = 6379  # the port of `ray start --head` when it is given none


def code_runtime_env() -> dict:
    """The Ray runtime environment of a render on a cluster: this driver's ``pipeline`` and
    ``common`` packages (whether a checkout or installed), shipped to every worker by Ray. The
    workers then run the very code whose ``code_version`` the shards record, and a node needs only
    the same Python packages (requirements.txt), not a copy of this project."""
    root = Path(pipeline.__file__).resolve().parent.parent
    return {"py_modules": [str(root / "pipeline"), str(root / "common")],
            "excludes": ["__pycache__", "*.pyc"]}


def _connection_advice(address: str) -> str:
    return (f"check that the cluster runs (`ray status` on its head node), the address (host:port of the "
            f"head node, port {RAY_PORT} unless `ray start --head --port` set another; 'auto' only on a "
            "node of the cluster) and, if the cluster uses token authentication, that this machine has "
            "its token (RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail at once, with one line, when nothing listens at ``host[:port]``: ray.init would retry
    such an address for ever. 'auto' and ray:// (Ray Client) addresses are left to Ray."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":") if ":" in address else (address, "", str(RAY_PORT))
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise RenderError(f"cannot reach the Ray cluster at {address} ({type(e).__name__}: {e}); "
                          + _connection_advice(address)) from None


# what Ray's C++ core prints on stderr for each retry while it joins a cluster: "[date time W pid
# tid] gcs_client.cc:210: Failed to get cluster ID from GCS server: Unauthenticated: ..." (a
# rejected token: one line a second for 20 s before ray.init gives up)
_RAY_RETRY = re.compile(r"^\[[^\]]* W \d+ \d+\] \S+\.cc:\d+: (?P<what>.*)$")


@contextlib.contextmanager
def stderr_lines(lines: list[str]):
    """Collect what this process (Python and C++ alike) writes to file descriptor 2 inside the
    block into ``lines``, instead of the terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode("utf-8", "replace").splitlines(keepends=True))


def ray_core_cause(lines: list[str]) -> str:
    """The last retry warning of Ray's C++ core in ``lines``, shortened, or ""."""
    for line in reversed(lines):
        m = _RAY_RETRY.search(line.rstrip("\n"))
        if m:
            return m.group("what").rsplit(": RPC error: ", 1)[-1][:200]
    return ""


def start_ray(workers: int | None, address: str | None = None):
    """Start a local Ray with ``workers`` CPUs (None: every CPU), or join the cluster at
    ``address`` (host:port or 'auto'; the cluster's own CPUs, and the code shipped through
    ``code_runtime_env``), quietly: no dashboard, no usage stats, no worker logs forwarded to this
    terminal. Says what it does first (it takes seconds). Returns the ray module. A cluster that
    cannot be reached is a RenderError saying what to check."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    warnings.filterwarnings("ignore", module="ray")
    import ray  # imported here: the local engine and the tests of it need no Ray

    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                  configure_logging=True)
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        log.info("connecting to the Ray cluster at %s ...", address)
        _check_reachable(address)
        said: list[str] = []
        try:  # never num_cpus: a cluster has its own (Ray refuses it when joining)
            with stderr_lines(said):
                ray.init(address=address, runtime_env=code_runtime_env(), **kwargs)
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as e:
            text = str(e).strip().splitlines()
            cause = ray_core_cause(said)
            raise RenderError(f"cannot connect to the Ray cluster at {address} "
                              f"({text[0] if text else type(e).__name__}{f'; Ray: {cause}' if cause else ''}); "
                              f"{_connection_advice(address)}") from None
        sys.stderr.write("".join(line for line in said if not _RAY_RETRY.search(line)))
    else:
        log.info("starting Ray (local, %d CPUs) ...", workers or os.cpu_count() or 1)
        # address="local": a new instance of our own, even where RAY_ADDRESS is set or `ray start`
        # runs a cluster on this machine (plain ray.init() would join it, and refuse num_cpus)
        ray.init(address="local", num_cpus=workers, **kwargs)
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)  # ray.init sets its own (sys.exit); keep the caller's
    return ray


def stop_ray(ray) -> None:
    """``ray.shutdown()``, less the second it spends on the autoscaler's monitor.

    Ray stops its processes one after another, the raylet and the GCS first, each with SIGTERM
    and up to a second's wait. The monitor (the autoscaler of this one-node instance, idle here)
    answers SIGTERM by reporting its death to the GCS, which is gone by then, so it is always the
    one that takes the whole second and is SIGKILLed. Killed first, it costs nothing: measured
    1.1 s -> 0.1-0.4 s per shutdown (docs/benchmarks.md). Only for a Ray that this process started
    (``start_ray`` without an address): a cluster's processes are not ours. Reaching the monitor
    uses Ray's private node object; where that is missing the plain shutdown runs."""
    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "_global_node", None)
    monitors = getattr(node, "all_processes", {}).get("monitor", []) if node is not None else []
    for info in monitors:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired, AttributeError):
            info.process.kill()
            info.process.wait(timeout=5)
    ray.shutdown()


def ray_cluster_size(ray) -> tuple[int, int]:
    """(alive nodes, CPUs) of the Ray this driver is connected to."""
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    return nodes, int(ray.cluster_resources().get("CPU", 0))


@contextlib.contextmanager
def ray_session(workers: int | None, address: str | None) -> Iterator[str]:
    """Ray for one render: started (or joined) here and shut down on every way out (the end, an
    error, Ctrl-C or SIGTERM: both unwind through the finally). An already initialized Ray (e.g.
    started by the caller) is used as it is and left running. Yields what the log calls it:
    "Ray, N node(s), C CPUs"."""
    import ray

    started = not ray.is_initialized()
    try:
        if started:
            start_ray(workers, address)
        nodes, cpus = ray_cluster_size(ray)
        if cpus < 1:
            raise RenderError("the Ray cluster has no CPUs: every shard needs one (`ray status` lists them)")
        where = f"Ray, {nodes} node{'s' if nodes != 1 else ''}, {cpus} CPUs"
        cap = f"; at most {workers} shards at a time (--workers)" if workers and workers < cpus else ""
        log.info("%s%s", where, cap)
        yield where
    finally:
        if started and address is None:
            stop_ray(ray)  # our own instance
        elif started:
            ray.shutdown()  # disconnect from the cluster


def _ray_map(jobs: list[ShardJob], workers: int | None, retries: int) -> Iterable[tuple[ShardJob, dict]]:
    """One Ray task per shard on the Ray this driver is connected to (ray_session), at most
    ``workers`` in flight (None: as many as the cluster takes); Ray retries failed tasks and
    tasks of dead workers. Tasks still running when this generator stops (an error, Ctrl-C, the
    caller closing it) are cancelled."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=retries, retry_exceptions=True)(write_shard)
    queue, refs = list(jobs), {}
    limit = workers or len(jobs)
    try:
        while queue or refs:
            while queue and len(refs) < limit:
                job = queue.pop(0)
                refs[task.remote(job)] = job
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                job = refs.pop(ref)
                try:
                    stats = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - after Ray's own retries
                    cause = getattr(e, "cause", None) or e
                    raise RenderError(f"shard {job.file} failed after {retries + 1} tries: "
                                      f"{type(cause).__name__}: {str(cause).splitlines()[0]}") from None
                yield job, stats
    finally:
        for ref in refs:
            ray.cancel(ref, force=True)


# ----------------------------------------------------------------------------- the run


def render_dataset(cfg: ShardConfig, out_dir: str | Path, workers: int | None = 1, engine: str = "local",
                   address: str | None = None, overwrite: bool = False, retries: int = 2,
                   progress: bool = True, max_worker_gb: float | None = DEFAULT_MAX_WORKER_GB) -> dict:
    """Render (or resume) the dataset of ``cfg`` into ``out_dir``; return the manifest.

    ``workers``: shards rendered at once (None: one per CPU of this machine, or of the Ray
    cluster at ``address``). With ``address`` (engine "ray") the render joins that cluster and
    ``workers`` only caps the shards in flight; ``out_dir`` must then be a path every node sees.
    Refuses (ConfigError) before any work a config whose estimated memory per worker is over
    ``max_worker_gb`` GiB (None: no limit); see pipeline.config.worker_memory.
    Holds ``out_dir/.render.lock`` while it runs (pipeline.lock): a render of a folder that a live
    render holds is refused before any work (RenderError naming the holder), even with ``overwrite``."""
    if engine not in ("ray", "local"):
        raise RenderError(f"unknown engine '{engine}' (use 'ray' or 'local')")
    if workers is not None and workers < 1:
        raise RenderError(f"--workers must be >= 1, got {workers}")
    check_worker_memory(cfg, max_worker_gb)
    if engine == "ray" and address:
        _check_reachable(address)  # before any work: a typo in the address writes nothing
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RenderError(f"output path exists and is not a folder: {out_dir}")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)  # the lock lives inside it
    lock = RenderLock(out_dir)
    try:
        lock.acquire()  # before any work: a live render of this folder stops this one here
    except LockHeld as e:
        raise RenderError(str(e)) from None
    try:
        return _render(cfg, out_dir, workers, engine, address, overwrite, retries, progress)
    finally:
        lock.release()  # after the pool or Ray has stopped: no worker of this run writes any more
        if created:
            with contextlib.suppress(OSError):  # only if empty: a run refused before any work
                out_dir.rmdir()


def _render(cfg: ShardConfig, out_dir: Path, workers: int | None, engine: str, address: str | None,
            overwrite: bool, retries: int, progress: bool) -> dict:
    """The render proper, run while holding the folder's lock."""
    chash, version = config_hash(cfg), code_version()
    split_sources = {}
    for split, sc in cfg.splits.items():
        try:
            split_sources[split] = sources.list_source(sc.source, cfg.canvas)
        except sources.SourceError as e:
            raise RenderError(f"split '{split}': {e}") from None
        for reason, paths in split_sources[split].skipped.items():
            log.warning("split '%s': skipped %d input(s), %s: %s%s", split, len(paths), reason,
                        ", ".join(paths[:3]), " ..." if len(paths) > 3 else "")
    prepare_dir(cfg, out_dir, chash, version, overwrite)
    jobs = plan_jobs(cfg, out_dir, chash, version, split_sources)
    todo = [job for job in jobs if not is_done(job)]
    total = sum(job.stop - job.start for job in todo)
    if len(todo) < len(jobs):
        log.info("resuming: %d of %d shards already done", len(jobs) - len(todo), len(jobs))
    t0 = time.perf_counter()
    mapper: Callable = _ray_map if engine == "ray" else _local_map
    # Ray starts (seconds, and says so) before the bar; it stops after the mapper has stopped
    session = (ray_session(workers, address) if engine == "ray" and todo
               else contextlib.nullcontext(f"{workers or os.cpu_count()} workers"))
    with session as where:
        bar = tqdm(total=total, unit="burst", disable=not progress, dynamic_ncols=True,
                   desc=f"render {cfg.dataset.name}", file=sys.stderr)
        # closing: on an error or Ctrl-C in this loop the pool or Ray stops now, not when collected
        with bar, contextlib.closing(mapper(todo, workers, retries)) as results:
            for done_shards, (job, stats) in enumerate(results, start=1):
                bar.update(stats["samples"])
                bar.set_postfix(shards=f"{done_shards}/{len(todo)}")
    seconds = time.perf_counter() - t0
    # a finished dataset holds no temporary files; swept before the manifest lists kernels.zarr's
    stray = remove_temporary_files(out_dir)
    if stray:
        log.info("removed %d temporary file(s) left by failed or killed workers", stray)
    manifest = build_manifest(cfg, out_dir, chash, version, jobs, split_sources)
    for split in manifest["splits"]:  # for webdataset's wids; before the manifest, which is written last
        atomic_write_bytes(out_dir / wids_file(split), wids_index(manifest, split))
    manifest_text = json.dumps(manifest, indent=1, sort_keys=True).encode()
    atomic_write_bytes(out_dir / MANIFEST, manifest_text)
    (out_dir / PLAN).unlink(missing_ok=True)
    if total:
        log.info("rendered %d bursts in %.1f s (%.1f bursts/s with %s)", total, seconds, total / seconds, where)
    return manifest


def build_manifest(cfg: ShardConfig, out_dir: Path, chash: str, version: str, jobs: list[ShardJob],
                   split_sources: dict[str, sources.SourceList]) -> dict:
    """Collect every shard's stats (all must be done) into the manifest, checked as every reader
    checks it (``pipeline.format.validate_manifest``) before anything is written."""
    splits = {}
    for split, sc in cfg.splits.items():
        shards, failures = [], {}
        for job in (j for j in jobs if j.split == split):
            if not is_done(job):
                raise RenderError(f"shard {job.file} is not complete; run the same command again to resume")
            stats = json.loads(stats_path(out_dir, split, job.shard).read_text())
            shards.append({k: stats[k] for k in ("file", "samples", "bytes", "sha256")})
            for path, reason in stats["decode_failures"]:
                failures.setdefault(reason, set()).add(path)
        src = split_sources[split]
        skipped = {reason: sorted(paths) for reason, paths in src.skipped.items()}
        for reason, paths in failures.items():
            skipped[reason] = sorted(set(skipped.get(reason, [])) | paths)
        splits[split] = {
            "samples": sc.samples,
            "source": sc.source,
            "source_files": len(src.paths),
            "skipped": {reason: {"count": len(p), "inputs": p} for reason, p in sorted(skipped.items())},
            "shards": shards,
        }
    manifest = {
        "format": FORMAT,
        "name": cfg.dataset.name,
        "config": to_dict(cfg),
        "config_hash": chash,
        "seed": cfg.dataset.seed,
        "code_version": version,
        "frames": cfg.dataset.frames,
        "size": cfg.dataset.size,
        "kernel_size": cfg.dataset.kernel_size,
        "kernels": KERNELS,
        "members": dict(MEMBER_TYPES),
        "splits": splits,
        # every file of kernels.zarr (chunks and metadata), for verify: a lost chunk reads back as zeros
        "kernel_files": tree_checksums(out_dir / KERNELS),
    }
    return validate_manifest(manifest, out_dir / MANIFEST)


def shard_paths(manifest: dict, split: str) -> list[str]:
    return [s["file"] for s in manifest["splits"][split]["shards"]]

