"""Faults around a render: two renders of one folder (the lock), a killed driver's leftovers
(pool workers, temporary files). No test here depends on timing: a run is observed at a known
point (a file that exists, a process that exists) and deadlines are only a broken run's bound."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import lock as lockmod
from pipeline import format as pipeline_format
from pipeline import shards
from pipeline.config import config_hash
from pipeline.format import is_temporary
from pipeline.inspect import verify
from pipeline.lock import LOCK_FILE, LockHeld, RenderLock
from pipeline.run import RenderError, code_version, plan_jobs, prepare_dir, render_dataset
from pipeline.sources import list_source
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent
SMALL = ("splits.train.samples=6", "splits.train.samples_per_shard=2", "splits.val.samples=2",
         "splits.val.samples_per_shard=2", "splits.test.samples=3", "splits.test.samples_per_shard=2")
# a CLI render of 100 train shards: still running long after its first worker starts, on any machine
LONG = ["render", "--config", "configs/shards/default.toml", "--engine", "local", "--workers", "2",
        "--quiet", "--set", "dataset.size=48", "--set", "dataset.kernel_size=15",
        "--set", "kernels.scale_max=2.5", "--set", "splits.train.samples=400",
        "--set", "splits.train.samples_per_shard=4", "--set", "splits.val.samples=2",
        "--set", "splits.test.samples=2"]
NO_SUCH_PID = 2**22 + 1  # above Linux's largest pid_max (PID_MAX_LIMIT): never a live process
DEADLINE_S = 120  # only a broken run gets near this


def temporary_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if is_temporary(p.name))


def write_lock(folder: Path, **holder) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    path.write_text(json.dumps({"since": "2026-12-01T22:50:01Z", "token": "someone-else", **holder}))
    return path


def wait_for(cond, what: str):
    deadline = time.time() + DEADLINE_S
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def held_env(marker: Path, shard: str = "train-000001.tar") -> dict:
    """The environment of a render whose worker holds at ``shard`` (creating ``marker``) until it
    is signalled: the test interrupts it at a known point, never racing its end."""
    return dict(os.environ, PIPELINE_HOLD=f"{shard}:{marker}")


def children(pid: int) -> dict[int, str]:
    """Live (not zombie) child processes of ``pid``: {pid: start time}, from /proc."""
    return {p: start for p, (ppid, _, start) in proc_table().items() if ppid == pid}


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int, start: str) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and fields[19] == start  # the same process, not a reused pid


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of a render started with start_new_session (if a test failed)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=DEADLINE_S)


# ----------------------------------------------------------------------------- the lock


def test_second_render_into_a_held_folder_fails_at_once_with_one_line(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    with RenderLock(out):  # held by this (live) test process
        r = subprocess.run([sys.executable, "-m", "pipeline", *LONG, "--overwrite", "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=DEADLINE_S)
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert lines[0].startswith(f"error: {out} is being rendered by pid {os.getpid()} "
                                   f"on host {socket.gethostname()} since 20")
        assert f"(lock {out / LOCK_FILE})" in lines[0] and "remove the lock if that run is dead" in lines[0]
        assert os.listdir(out) == [LOCK_FILE]  # no work done, not even a plan; the lock is still ours
        with pytest.raises(RenderError, match="is being rendered by"):  # in process too, --overwrite or not
            render_dataset(tiny_config(*SMALL), out, overwrite=True, progress=False)
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert os.listdir(out) == []  # released


def test_lock_is_held_during_a_render_and_gone_after(tmp_path, monkeypatch):
    seen = []
    real = prepare_dir

    def spy(cfg, out_dir, *a):
        seen.append(json.loads((out_dir / LOCK_FILE).read_text()))
        return real(cfg, out_dir, *a)

    monkeypatch.setattr("pipeline.run.prepare_dir", spy)
    render_dataset(tiny_config(*SMALL), tmp_path / "d", progress=False)
    assert seen[0]["pid"] == os.getpid() and seen[0]["host"] == socket.gethostname()
    assert not (tmp_path / "d" / LOCK_FILE).exists() and verify(tmp_path / "d") is None


def test_lock_is_released_when_the_render_fails(tmp_path):
    cfg = tiny_config(*SMALL, f"splits.train.source='dir:{tmp_path / 'none'}'")
    with pytest.raises(RenderError, match="split 'train'"):
        render_dataset(cfg, tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()  # refused before any work: no folder, no lock


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    d = tmp_path / "d"
    write_lock(d, pid=NO_SUCH_PID, host=socket.gethostname(), pid_ns=lockmod._pid_ns())
    with caplog.at_level("WARNING", logger="pipeline"):
        render_dataset(tiny_config(*SMALL), d, progress=False)
    takeover = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
    assert len(takeover) == 1 and f"pid {NO_SUCH_PID} is not running" in takeover[0]
    assert not (d / LOCK_FILE).exists() and verify(d) is None and not temporary_files(d)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_same_host_lock_whose_pid_is_now_another_process_is_stale(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:  # a live process of ours, alive until its stdin closes
        here = dict(pid=other.pid, host=socket.gethostname(), pid_ns=lockmod._pid_ns())
        write_lock(tmp_path, **here, proc_start=lockmod._proc_start(other.pid))
        with pytest.raises(LockHeld, match=f"pid {other.pid} on host"):
            RenderLock(tmp_path).acquire()
        # the same pid with another start time: the pid was reused, the lock's run is gone
        write_lock(tmp_path, **here, proc_start=lockmod._proc_start(other.pid) + 1)
        with RenderLock(tmp_path) as lock:
            assert json.loads(lock.path.read_text())["token"] == lock.token
    finally:
        other.communicate(b"")


def test_lock_from_another_host_blocks_while_its_heartbeat_is_fresh(tmp_path):
    d = tmp_path / "d"
    path = write_lock(d, pid=4242, host="node-elsewhere", pid_ns="pid:[1]")
    with pytest.raises(RenderError) as e:
        render_dataset(tiny_config(*SMALL), d, overwrite=True, progress=False)
    msg = str(e.value)
    assert msg.startswith(f"{d} is being rendered by pid 4242 on host node-elsewhere since 2026-12-01T22:50:01Z")
    assert "\n" not in msg and os.listdir(d) == [LOCK_FILE]
    # an hour without a heartbeat (> STALE_AFTER_S): the next run takes it over
    old = time.time() - lockmod.STALE_AFTER_S - 3600
    os.utime(path, (old, old))
    with RenderLock(d) as lock:
        held = json.loads(path.read_text())
        assert held["token"] == lock.token and held["host"] == socket.gethostname()
    assert not path.exists()


def test_unreadable_lock_is_judged_by_its_heartbeat(tmp_path):
    path = tmp_path / LOCK_FILE
    path.write_text("")  # e.g. a run killed between creating the lock and writing it
    with pytest.raises(LockHeld, match="unreadable lock"):
        RenderLock(tmp_path).acquire()
    os.utime(path, (0, 0))
    with RenderLock(tmp_path):
        pass
    assert not path.exists()


def test_a_lock_held_by_another_thread_of_this_process_is_live(tmp_path):
    with RenderLock(tmp_path):
        with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
            RenderLock(tmp_path).acquire()


def test_heartbeat_refreshes_the_lock_mtime(tmp_path):
    with RenderLock(tmp_path, heartbeat=0.05) as lock:
        os.utime(lock.path, (1000, 1000))
        wait_for(lambda: lock.path.stat().st_mtime > 1000, "a heartbeat")


def test_takeover_does_not_remove_a_lock_that_changed_hands(tmp_path):
    # A judged the old lock stale, but B replaced it before A's rename: A must put B's back
    path = write_lock(tmp_path, pid=NO_SUCH_PID, host=socket.gethostname(), pid_ns=lockmod._pid_ns())
    seen = lockmod._read(path)
    path.unlink()
    write_lock(tmp_path, pid=os.getppid(), host=socket.gethostname(), token="fresh")
    assert not RenderLock(tmp_path)._remove_stale(*seen)
    assert json.loads(path.read_text())["token"] == "fresh" and os.listdir(tmp_path) == [LOCK_FILE]


# ----------------------------------------------------------------------------- leftovers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_pool_workers_die_when_the_driver_is_killed(tmp_path):
    out, held = tmp_path / "d", tmp_path / "held"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *LONG, "--out", str(out)], cwd=ROOT, env=held_env(held),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # a worker holds at train-000001.tar: the pool is up and the render cannot finish first
        wait_for(lambda: held.exists() or proc.poll() is not None, "the held shard")
        assert proc.poll() is None, "the render ended early"
        left = children(proc.pid)  # the pool's workers and multiprocessing's resource tracker
        assert any(b"spawn_main" in cmdline(pid) for pid in left)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=DEADLINE_S)
        # each of them held our stdout/stderr; without PR_SET_PDEATHSIG they wait for work for ever
        wait_for(lambda: not any(alive(pid, start) for pid, start in left.items()), "the workers to die")
    finally:
        kill_session(proc)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_stops_the_render_releases_the_lock_and_its_workers(tmp_path):
    out, held = tmp_path / "d", tmp_path / "held"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *LONG, "--out", str(out)], cwd=ROOT, env=held_env(held),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: held.exists() or proc.poll() is not None, "the held shard")
        assert proc.poll() is None, "the render ended early"
        workers = children(proc.pid)
        assert any(b"spawn_main" in cmdline(pid) for pid in workers)
        os.kill(proc.pid, signal.SIGTERM)  # the driver only, as a scheduler's stop would
        _, err = proc.communicate(timeout=DEADLINE_S)
        assert proc.returncode == 143, err
        assert err.strip().splitlines()[-1].startswith("interrupted: finished shards are kept")
        assert not (out / LOCK_FILE).exists() and not (out / "manifest.json").exists()
        wait_for(lambda: not any(alive(pid, start) for pid, start in workers.items()), "the workers to die")
    finally:
        kill_session(proc)


def test_finished_dataset_holds_no_temporary_files(tiny_shards, tmp_path, monkeypatch):
    d = tmp_path / "d"
    shutil.copytree(tiny_shards, d)
    # strays as killed workers and full disks leave them, in every folder of the dataset
    planted = [d / ".train-000000.tar.tmp-99999", d / "stats" / ".train-000001.json.tmp-4242",
               d / ".manifest.json.tmp-17", d / "kernels.zarr" / "train" / ("c." + "0" * 32 + ".partial")]
    for p in planted:
        p.write_bytes(b"partial")
    render_dataset(tiny_config(), d, progress=False)  # a resume with nothing to do still sweeps
    assert not temporary_files(d) and verify(d) is None
    # a worker killed mid-shard (its tmp tar stays behind) in a run that then finishes
    monkeypatch.setenv("PIPELINE_FAULT", f"train-000001.tar:{tmp_path / 'killed'}")
    render_dataset(tiny_config(*SMALL), tmp_path / "e", progress=False)
    assert (tmp_path / "killed").exists()
    assert not temporary_files(tmp_path / "e") and verify(tmp_path / "e") is None


def first_job(folder: Path) -> shards.ShardJob:
    """The first shard's job of the SMALL tiny config, its folder prepared as the driver does."""
    cfg = tiny_config(*SMALL)
    chash, version = config_hash(cfg), code_version()
    prepare_dir(cfg, folder, chash, version, False)
    srcs = {s: list_source(sc.source, cfg.canvas) for s, sc in cfg.splits.items()}
    return plan_jobs(cfg, folder, chash, version, srcs)[0]


def test_a_failed_shard_leaves_no_temporary_file(tmp_path, monkeypatch):
    job = first_job(tmp_path)
    calls = []
    real = shards.render.render_sample

    def full_disk(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **kw)

    monkeypatch.setattr(shards.render, "render_sample", full_disk)
    with pytest.raises(OSError, match="No space"):
        shards.write_shard(job)
    assert not temporary_files(tmp_path) and not (tmp_path / job.file).exists()

    def no_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline_format.os, "fsync", no_fsync)
    with pytest.raises(OSError, match="No space"):
        pipeline_format.atomic_write_bytes(tmp_path / "x.json", b"{}")
    assert not temporary_files(tmp_path) and not (tmp_path / "x.json").exists()


def test_a_write_error_on_the_tar_thread_fails_the_shard_and_frees_its_space(tmp_path, monkeypatch):
    """The tar is written by its own thread (shards.TarThread): an error there (a full disk in
    write(), or in the fsync that ends the tar) is raised by write_shard, and nothing is left."""
    job = first_job(tmp_path)
    writes = []
    real_write = shards.HashingWriter.write

    def full_disk(self, data):
        writes.append(len(data))
        if len(writes) == 4:  # the second member of the first sample
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(shards.HashingWriter, "write", full_disk)
    with pytest.raises(OSError, match="No space"):
        shards.write_shard(job)
    assert writes and not temporary_files(tmp_path) and not (tmp_path / job.file).exists()
    monkeypatch.undo()

    def no_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards.os, "fsync", no_fsync)
    with pytest.raises(OSError, match="No space"):
        shards.write_shard(job)
    assert not temporary_files(tmp_path) and not (tmp_path / job.file).exists()

# ----------------------------------------------------------------------------- the Ray engine

# a CLI render on a local Ray instance of one worker, held at its first shard (PIPELINE_HOLD) until
# the test signals it: 4 shards, so the run cannot finish first however fast the machine
RAY = ["render", "--config", "configs/shards/default.toml", "--engine", "ray", "--workers", "1",
       "--quiet", "--set", "dataset.size=48", "--set", "dataset.kernel_size=15",
       "--set", "kernels.scale_max=2.5", "--set", "splits.train.samples=8",
       "--set", "splits.train.samples_per_shard=4", "--set", "splits.val.samples=2",
       "--set", "splits.test.samples=2"]
RAY_CORE = (b"gcs_server", b"raylet", b"ray::write_shard")  # besides its Python helpers
RAY_AGENTS = (b"ray::DashboardAgent", b"ray::RuntimeEnvAgent")  # raylet's children


def proc_table() -> dict[int, tuple[int, int, str]]:
    """Live (not zombie) processes: {pid: (ppid, session id, start time)}, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                table[int(entry.name)] = (int(fields[1]), int(fields[3]), fields[19])
    return table


def descendants(pid: int) -> dict[int, str]:
    """Live descendants of ``pid`` (children, theirs, ...): {pid: start time}, by ppid chains."""
    table, found, parents = proc_table(), {}, [pid]
    while parents:
        parent = parents.pop()
        for child, (ppid, _, start) in table.items():
            if ppid == parent and child not in found:
                found[child] = start
                parents.append(child)
    return found


def in_session(sid: int) -> dict[int, str]:
    """Live processes of session ``sid`` ({pid: start time}): those that Ray started after the
    test looked, or that were orphaned (reparented) since, are still in the driver's session."""
    return {pid: start for pid, (_, s, start) in proc_table().items() if s == sid and pid != sid}


def program(pid: int) -> bytes:
    """A process's name as ``ps`` shows it: the base name of argv[0] (Ray's processes set theirs)."""
    return os.path.basename(cmdline(pid).split(b"\0")[0])


def pipe_holders(*streams) -> set[int]:
    """Processes other than this one with an fd open on the pipes of ``streams`` (either end)."""
    pipes = {f"pipe:[{os.fstat(s.fileno()).st_ino}]" for s in streams}
    holders = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if any(os.readlink(fd) in pipes for fd in (entry / "fd").iterdir()):
                    holders.add(int(entry.name))
            except OSError:  # gone, or not ours to read (then it cannot hold our pipes)
                continue
    return holders


def start_held_ray_render(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    out, held = tmp_path / "d", tmp_path / "held"
    env = held_env(held, "train-000000.tar")
    env.pop("RAY_ADDRESS", None)  # a local instance, ours
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *RAY, "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: held.exists() or proc.poll() is not None, "the held shard")
    assert proc.poll() is None, f"the render ended early: {proc.communicate()}"
    return proc, out


def ray_processes(proc: subprocess.Popen) -> dict[int, str]:
    """What the driver started (a worker is rendering, so Ray is up): {pid: start time}."""
    found = descendants(proc.pid)
    names = {program(pid) for pid in found}
    assert set(RAY_CORE) <= names, f"not a local Ray instance of the driver's: {sorted(names)}"
    return found


def kill_leftovers(proc: subprocess.Popen, recorded: dict[int, str]) -> None:
    """SIGKILL what is left of a Ray render: the recorded processes (even reparented ones), the session."""
    for pid, start in {**recorded, **in_session(proc.pid)}.items():
        if alive(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    kill_session(proc)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_stops_a_ray_render_releases_the_lock_and_every_ray_process(tmp_path):
    proc, out = start_held_ray_render(tmp_path)
    started = {}
    try:
        started = ray_processes(proc)
        os.kill(proc.pid, signal.SIGTERM)  # the driver only, as a scheduler's stop would
        _, err = proc.communicate(timeout=DEADLINE_S)
        assert not (out / LOCK_FILE).exists() and not (out / "manifest.json").exists(), err
        # ray.shutdown() in _ray_map's finally: gcs_server, raylet, the workers and the agents
        wait_for(lambda: not any(alive(pid, start) for pid, start in started.items())
                 and not in_session(proc.pid), "the Ray processes to stop")
        assert proc.returncode == 143, err
        assert err.strip().splitlines()[-1].startswith("interrupted: finished shards are kept")
    finally:
        kill_leftovers(proc, started)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ray_processes_die_with_a_sigkilled_driver_and_none_holds_its_pipes(tmp_path):
    proc, out = start_held_ray_render(tmp_path)
    started = {}
    try:
        started = ray_processes(proc)
        agents = {pid for pid in started if program(pid) in RAY_AGENTS}
        os.kill(proc.pid, signal.SIGKILL)  # no code of ours runs: only Ray's own fate-sharing
        proc.wait(timeout=DEADLINE_S)
        # gcs_server, raylet, the Python helpers (PR_SET_PDEATHSIG) and the workers (their raylet
        # is gone) die; only raylet's two agents may be left, for up to a minute or two
        wait_for(lambda: set(in_session(proc.pid)) <= agents
                 and not any(alive(pid, start) for pid, start in started.items() if pid not in agents),
                 "the Ray processes to die")
        # whatever lingers does not hold the caller's pipes: reading them ends now, not with the agents
        assert not pipe_holders(proc.stdout, proc.stderr)
        proc.communicate(timeout=DEADLINE_S)
        assert (out / LOCK_FILE).exists()  # stale now; the next run takes it over
    finally:
        kill_leftovers(proc, started)  # the agents too: the suite leaves no process behind
