"""One render at a time per dataset folder: a lock file that also works on a shared filesystem.

``<folder>/.render.lock`` is created with O_CREAT|O_EXCL (atomic on local filesystems and NFSv3+,
where fcntl/flock locks are unreliable) and holds JSON::

    {"pid": 1234, "host": "node7", "pid_ns": "pid:[4026531836]", "proc_start": 88121,
     "since": "2026-12-01T22:50:01Z", "token": "<random hex>"}

While the render runs, a daemon thread of the driver touches the file (its mtime is the heartbeat)
every HEARTBEAT_S seconds. Another render of the same folder then stops before any work with one
line naming the holder, unless the lock is stale:

- written on this machine (same host name and pid namespace): stale when its pid is not running,
  or now belongs to another process (a different start time in /proc);
- written elsewhere (another host, or another container's pid namespace), or unreadable: stale
  when its heartbeat is older than STALE_AFTER_S (clocks of the hosts may differ by less).

A stale lock is taken over with a one-line warning. The take-over renames the lock away and checks
that what it moved is the lock it judged stale (token and inode), so two runs that find the same
stale lock cannot both end up holding it. The lock is removed on release (normal end, exception,
Ctrl-C); a run killed with SIGKILL leaves it, and the next run judges it by the rules above.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from common.errors import UserError
from pipeline.format import LOCK as LOCK_FILE  # ".render.lock": the name is the format's, never data

HEARTBEAT_S = 30.0  # how often the holder touches the lock
STALE_AFTER_S = 600.0  # a lock from elsewhere whose heartbeat is older than this is stale
log = logging.getLogger("pipeline")
_HELD: set[str] = set()  # tokens of the locks this process holds now


class LockHeld(UserError):
    """The folder is being rendered by a live run; the message is one line."""


def _proc_start(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (Linux /proc), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after "pid (comm)"
    except (OSError, ValueError, IndexError):
        return None


def _pid_ns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _read(path: Path) -> tuple[dict, os.stat_result]:
    """The holder's JSON ({} when empty or unreadable) and the lock's stat. FileNotFoundError when
    there is no lock."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        raw = f.read(4096)
    try:
        info = json.loads(raw)
    except ValueError:
        info = {}
    return (info if isinstance(info, dict) else {}), st


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class RenderLock:
    """``with RenderLock(folder):`` holds ``folder/.render.lock`` (see the module docstring).
    Raises LockHeld on entry when a live run holds it."""

    def __init__(self, folder: str | Path, stale_after: float | None = None, heartbeat: float | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.stale_after = STALE_AFTER_S if stale_after is None else stale_after
        self.heartbeat = HEARTBEAT_S if heartbeat is None else heartbeat
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RenderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        for _ in range(10):  # each turn creates the lock, fails on a live holder or removes a stale one
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    info, st = _read(self.path)
                except FileNotFoundError:
                    continue  # released meanwhile
                why = self._stale(info, st)
                if why is None:
                    raise LockHeld(self._held_message(info, st)) from None
                if self._remove_stale(info, st):
                    log.warning("taking over the stale lock %s of pid %s on host %s (since %s): %s",
                                self.path, info.get("pid", "?"), info.get("host", "?"),
                                info.get("since", "?"), why)
                continue
            me = {"pid": os.getpid(), "host": socket.gethostname(), "pid_ns": _pid_ns(),
                  "proc_start": _proc_start(os.getpid()), "since": _utc(time.time()), "token": self.token}
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(me, sort_keys=True) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:  # e.g. a full disk: an empty lock would block others for STALE_AFTER_S
                self.path.unlink(missing_ok=True)
                raise
            _HELD.add(self.token)
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="render-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise LockHeld(f"could not take the lock {self.path}: other runs keep taking and dropping it")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.token not in _HELD:
            return
        _HELD.discard(self.token)
        try:
            info, _ = _read(self.path)
            if info.get("token") == self.token:
                self.path.unlink()
        except FileNotFoundError:
            pass

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                info, _ = _read(self.path)
                if info.get("token") != self.token:
                    log.error("lost the lock %s: another run judged it stale and took it over", self.path)
                    return
                os.utime(self.path)
            except OSError as e:  # a shared filesystem's hiccup: try again at the next beat
                log.warning("could not refresh the lock %s: %s", self.path, e)

    def _stale(self, info: dict, st: os.stat_result) -> str | None:
        """Why the lock described by ``info`` and ``st`` is stale, or None when its holder may live."""
        pid = info.get("pid")
        if (isinstance(pid, int) and info.get("host") == socket.gethostname()
                and info.get("pid_ns") == _pid_ns()):
            if pid == os.getpid():  # this process: live if it holds it now (another thread's render)
                held = info.get("token") in _HELD
                return None if held else f"pid {pid} is this process, which does not hold it"
            if not _pid_alive(pid):
                return f"pid {pid} is not running"
            start = _proc_start(pid)
            if info.get("proc_start") is not None and start is not None and start != info["proc_start"]:
                return f"pid {pid} is now another process"
            return None
        age = time.time() - st.st_mtime
        if age > self.stale_after:
            return f"no heartbeat for {age / 60:.0f} min (more than {self.stale_after / 60:g} min)"
        return None

    def _remove_stale(self, info: dict, st: os.stat_result) -> bool:
        """Remove the stale lock seen as (info, st); False when it changed hands meanwhile."""
        grave = self.path.with_name(f"{LOCK_FILE}.tmp-{int(self.token, 16)}")  # temporary: swept if left
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return False
        try:
            moved, mst = _read(grave)
        except FileNotFoundError:
            return False
        if moved.get("token") != info.get("token") or mst.st_ino != st.st_ino:
            try:  # a fresh lock replaced the stale one between our look and the rename: put it back
                os.link(grave, self.path)
            except OSError:
                pass
            grave.unlink(missing_ok=True)
            return False
        grave.unlink(missing_ok=True)
        return True

    def _held_message(self, info: dict, st: os.stat_result) -> str:
        beat = f"last heartbeat {max(0.0, time.time() - st.st_mtime):.0f} s ago"
        if "pid" not in info:
            return (f"{self.folder} is locked by another render (unreadable lock {self.path}, {beat}); "
                    "wait for it or remove the lock if that run is dead")
        return (f"{self.folder} is being rendered by pid {info['pid']} on host {info.get('host', '?')} "
                f"since {info.get('since', '?')}, {beat} (lock {self.path}); "
                "wait for it or remove the lock if that run is dead")
