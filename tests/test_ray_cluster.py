"""The pipeline on a real Ray cluster: two nodes on localhost (`ray start --head` and `ray start
--address`, one CPU each), a render through `--address` from a folder outside the repository,
byte for byte the render of `--engine local`. The cluster's processes get no PYTHONPATH: the
workers can only import the pipeline because the driver ships it (pipeline.run.code_runtime_env).
The test stops only the processes of the cluster it started (found by a marker in their
environment); `ray stop` would stop every Ray on the machine."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.run import RenderError, render_dataset
from tests.conftest import tiny_config
from tests.test_pipeline import digest

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
MARK = "BURST_DEBLUR_TEST_CLUSTER"
RENDER = ["render", "--config", str(REPO / "configs/shards/default.toml"), "--quiet",
          "--set", "dataset.size=48", "--set", "dataset.kernel_size=15", "--set", "dataset.frames=4",
          "--set", "kernels.scale_max=2.5", "--set", "splits.train.samples=6",
          "--set", "splits.train.samples_per_shard=2", "--set", "splits.val.samples=2",
          "--set", "splits.val.samples_per_shard=2", "--set", "splits.test.samples=2",
          "--set", "splits.test.samples_per_shard=2"]


def marked_processes(value: str) -> list[int]:
    """Pids of the live processes whose environment holds MARK=value (every process of the test
    cluster: `ray start` passes its environment to the daemons, the raylets to their workers)."""
    needle = f"{MARK}={value}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:  # gone, or not ours
                pass
    return pids


def stop_cluster(value: str) -> None:
    """SIGTERM every process of the test cluster, SIGKILL what is left after a generous wait."""
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        pids = marked_processes(value)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait  # against hangs only: usually gone in a second
        while pids and time.time() < deadline:
            time.sleep(0.2)
            pids = marked_processes(value)
        if not pids:
            return


def ray_start(args: list[str], env: dict, cwd: Path) -> None:
    proc = subprocess.run([str(RAY), "start", *args, "--num-cpus", "1", "--object-store-memory", "100000000",
                           "--disable-usage-stats"], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]


@pytest.mark.skipif(not RAY.exists() or not sys.platform.startswith("linux"),
                    reason="needs the ray command next to this Python, and /proc to stop the cluster")
def test_render_on_a_two_node_cluster_from_outside_the_repo_gives_the_local_bytes(tmp_path):
    token = tmp_path / "auth_token"  # token authentication, as a cluster should run; its own token
    token.write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
    mark = secrets.token_hex(8)
    node_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    node_env.update(auth, **{MARK: mark})
    # each node's own session folder, short: Ray's socket paths must fit in 107 bytes
    short = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    head_tmp, node_tmp = short / "head", short / "node"
    head_tmp.mkdir()
    node_tmp.mkdir()
    # the driver finds the code as an installed package would be found; the cluster does not
    driver_env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **auth)
    driver_env.pop("RAY_ADDRESS", None)
    try:
        ray_start(["--head", "--port", "0", "--include-dashboard=false", "--temp-dir", str(head_tmp)],
                  node_env, tmp_path)
        address = (head_tmp / "ray_current_cluster").read_text().strip()
        ray_start(["--address", address, "--temp-dir", str(node_tmp)], node_env, tmp_path)

        # another machine's token: refused, one line that says why (Ray's core retries for ~20 s
        # with a warning a second on stderr; none of them reaches the terminal)
        wrong = tmp_path / "wrong_token"
        wrong.write_text(secrets.token_hex(32))
        refused = subprocess.run([sys.executable, "-m", "pipeline", *RENDER, "--address", address,
                                  "--out", "refused"], cwd=tmp_path, env=dict(driver_env, RAY_AUTH_TOKEN_PATH=str(wrong)),
                                 capture_output=True, text=True, timeout=300)

        cluster = subprocess.run([sys.executable, "-m", "pipeline", *RENDER, "--address", address,
                                  "--out", "shared/tiny"], cwd=tmp_path, env=driver_env,
                                 capture_output=True, text=True, timeout=300)
    finally:
        stop_cluster(mark)
        shipped = [p.relative_to(short) for p in short.glob("*/session_*/runtime_resources/py_modules_files/"
                                                            "*/pipeline/render.py")]
        shutil.rmtree(short, ignore_errors=True)
    assert not marked_processes(mark)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.splitlines() == [f"connecting to the Ray cluster at {address} ...",
                                           refused.stderr.splitlines()[-1]], refused.stderr[-3000:]
    assert refused.stderr.splitlines()[-1].startswith("error: cannot connect to the Ray cluster")
    assert "InvalidAuthToken" in refused.stderr and "RAY_AUTH_TOKEN" in refused.stderr
    assert cluster.returncode == 0, cluster.stderr[-3000:]
    assert f"connecting to the Ray cluster at {address} ..." in cluster.stderr
    assert "Ray, 2 nodes, 2 CPUs" in cluster.stderr
    # the workers imported the pipeline that the driver shipped (py_modules), not a copy of their own
    assert shipped, "no py_modules package was unpacked on the cluster"

    local = subprocess.run([sys.executable, "-m", "pipeline", *RENDER, "--engine", "local", "--workers", "1",
                            "--out", "local"], cwd=tmp_path, env=driver_env, capture_output=True, text=True,
                           timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    ref = digest(tmp_path / "local")
    assert len(ref) > 5 and digest(tmp_path / "shared" / "tiny") == ref


def test_unreachable_cluster_is_one_line_before_any_work(tmp_path):
    with socket.socket() as s:  # bound, never listening: a connection is refused, on any machine
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(RenderError, match="cannot reach the Ray cluster at .*check that the cluster runs") as e:
            render_dataset(tiny_config(), tmp_path / "out", engine="ray", address=address, progress=False)
    assert "\n" not in str(e.value) and "RAY_AUTH_TOKEN" in str(e.value)
    assert not (tmp_path / "out").exists()
