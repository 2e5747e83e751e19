"""One writer per run directory: a lock file created with O_CREAT|O_EXCL, naming its holder, kept alive by a heartbeat.

Why a lock file and not fcntl/flock: an exclusive create is atomic on local disks and on NFS (v3 and later), which is
where a Ray run's directory lives, and the file can say who holds it, so a refused run names the holder. fcntl locks
on NFS depend on the lock daemon (NLM) being set up on every client and cannot tell a second run who holds them.

    RUN_DIR/run.lock   {"host", "boot_id", "pid", "pid_start", "started", "token"}; its mtime is the heartbeat

A lock is stale, and is broken safely, when its holder is known to be gone: on the same host (same hostname and boot
id) when its pid is not alive or belongs to a newer process; on another host when its heartbeat (refreshed every
HEARTBEAT_SECONDS) is older than STALE_SECONDS, measured against the lock's own file system clock (a probe file's
mtime), so clock skew between hosts does not matter. Breaking is itself serialised by a second exclusive file
(run.lock.break), so two runs that find the same stale lock cannot both take it.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradcam_engine.engine.errors import RunError

LOCK = "run.lock"
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 120.0  # another host's lock whose heartbeat is older than this is stale
BREAK_STALE_SECONDS = 30.0  # a run.lock.break left by a run that died while breaking a lock


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> int | None:
    """The process' start time in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its file says."""

    host: str
    pid: int
    started: str
    token: str
    boot_id: str = ""
    pid_start: int | None = None

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}"

    @staticmethod
    def parse(text: str) -> "Holder | None":
        try:
            data = json.loads(text)
            return Holder(str(data["host"]), int(data["pid"]), str(data["started"]), str(data["token"]),
                          str(data.get("boot_id", "")), data.get("pid_start"))
        except (ValueError, KeyError, TypeError):
            return None


def this_holder() -> Holder:
    pid = os.getpid()
    return Holder(socket.gethostname(), pid, time.strftime("%Y-%m-%dT%H:%M:%S%z"), uuid.uuid4().hex, _boot_id(),
                  _process_start(pid))


class RunLock:
    """The lock of one run directory; `acquire` fails at once with a RunError that names the holder."""

    def __init__(self, run_dir: Path, heartbeat_seconds: float = HEARTBEAT_SECONDS,
                 stale_seconds: float = STALE_SECONDS):
        self.path = run_dir / LOCK
        self.heartbeat_seconds = heartbeat_seconds
        self.stale_seconds = stale_seconds
        self.holder: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    @property
    def held(self) -> bool:
        return self.holder is not None

    def acquire(self) -> None:
        """Take the lock, breaking a stale one; RunError naming the holder when a live run has it."""
        me = this_holder()
        for attempt in range(50):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._break_if_stale(last_try=attempt >= 20)
                continue
            except OSError as e:
                raise RunError(f"{self.path.parent}: cannot create the run lock ({e.strerror})") from None
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(me.__dict__) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                self.path.unlink(missing_ok=True)
                raise RunError(f"{self.path.parent}: cannot write the run lock ({e.strerror})") from None
            self.holder = me
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise RunError(f"{self.path}: could not take the run lock (it keeps changing hands); try again")

    def _break_if_stale(self, last_try: bool) -> None:
        holder, age = self._read()
        if age is None:  # released meanwhile: try to create it again
            return
        if holder is None:
            if age < self.stale_seconds:  # being written by a run starting right now
                if last_try:
                    raise RunError(f"{self.path.parent}: in use by another run that is starting ({self.path}); "
                                   "wait for it to end")
                time.sleep(0.1)
                return
        elif not self._is_stale(holder, age):
            raise RunError(f"{self.path.parent}: in use by another run ({holder.describe()}); wait for it to end "
                           f"or stop it (a lock left by a dead run is taken over automatically)")
        breaker = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if self._now() - breaker.stat().st_mtime > BREAK_STALE_SECONDS:
                    breaker.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return
        except OSError as e:
            raise RunError(f"{self.path.parent}: cannot take over a stale run lock ({e.strerror})") from None
        os.close(fd)
        try:
            again, _ = self._read()
            if again == holder:  # still the lock judged stale, not a new one taken meanwhile
                self.path.unlink(missing_ok=True)
        finally:
            breaker.unlink(missing_ok=True)

    def _read(self) -> tuple[Holder | None, float | None]:
        """The holder and the heartbeat's age in seconds (None when the lock vanished)."""
        try:
            text = self.path.read_text()
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return None, None
        except OSError as e:
            raise RunError(f"{self.path}: cannot read the run lock ({e.strerror})") from None
        return Holder.parse(text), self._now() - mtime

    def _now(self) -> float:
        """The lock's file system clock: a probe file's mtime, so another host's clock skew does not count."""
        probe = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.probe")
        try:
            probe.touch()
            now = probe.stat().st_mtime
            probe.unlink()
            return now
        except OSError:
            probe.unlink(missing_ok=True)
            return time.time()

    def _is_stale(self, holder: Holder, age: float) -> bool:
        if holder.host == socket.gethostname() and holder.boot_id == _boot_id():
            if not _pid_alive(holder.pid):
                return True
            start = _process_start(holder.pid)
            return holder.pid_start is not None and start is not None and start != holder.pid_start
        return age > self.stale_seconds

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                if not self.still_held():
                    return
                os.utime(self.path)
            except OSError:
                continue  # a missed heartbeat is harmless; the next one retries

    def still_held(self) -> bool:
        """Whether the lock file is still this process' (a run judged dead may have been taken over)."""
        if self.holder is None:
            return False
        try:
            holder = Holder.parse(self.path.read_text())
        except FileNotFoundError:
            holder = None
        if holder is None or holder.token != self.holder.token:
            self.lost = True
            return False
        return True

    def check(self) -> None:
        """RunError if another run has taken the lock over; called before every commit."""
        if not self.still_held():
            raise RunError(f"{self.path.parent}: the run lock was taken over by another run; this run stops "
                           "without committing more")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.holder is not None:
            try:
                if self.still_held():
                    self.path.unlink(missing_ok=True)
            except OSError:
                pass
            self.holder = None

    def token(self) -> str:
        assert self.holder is not None
        return self.holder.token

    def info(self) -> dict[str, Any]:
        """The holder, as run.json records it."""
        return {} if self.holder is None else {"host": self.holder.host, "pid": self.holder.pid}


def lock_token_matches(run_dir: Path, token: str) -> bool:
    """Whether the run lock of run_dir is still `token`'s; Ray writer tasks ask this before committing a shard."""
    try:
        holder = Holder.parse((run_dir / LOCK).read_text())
    except OSError:
        return False
    return holder is not None and holder.token == token
