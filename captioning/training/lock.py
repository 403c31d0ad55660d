"""One training run at a time in an --out_dir: an advisory lock file, `<out_dir>/.train.lock`, held for the run's life.

The lock is the operating system's (`flock` on POSIX, a byte-range lock on Windows), which is released when its
process ends, however it ends, so a lock never outlives its run. The file names the holder (host, process id,
start time) for the error a second run gets; a file left by a run that died is taken over with a note, and a run
that ends removes it. Only rank 0 of a torchrun job takes the lock; the other ranks wait for its answer.
The `filelock` package is not used: it truncates the lock file at every attempt, erasing the holder it names.
"""
import contextlib
import datetime
import json
import os
import socket
from pathlib import Path
from typing import Optional

from captioning.outputs import OutputError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

LOCK_NAME = ".train.lock"
_WINDOWS_LOCK_OFFSET = 1 << 20  # Windows locks a byte range; one past the holder's text, which stays readable


class RunDirectoryBusy(OutputError):
    """Another run holds the --out_dir."""


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:  # BlockingIOError on POSIX, PermissionError on Windows
        return False
    return True


def _read_holder(fd: int) -> Optional[dict]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", errors="replace").strip()
    if not text:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {"text": text}
    return holder if isinstance(holder, dict) else {"text": text}


def describe_holder(holder: Optional[dict]) -> str:
    if not holder:
        return "a process that is still starting"
    if "pid" not in holder:
        return repr(holder.get("text"))
    return f"process {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}"


class RunLock:
    """The lock of one run directory; `acquire` raises `RunDirectoryBusy` while another run holds it."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a note when it takes over the file of a run that died, else None."""
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                holder = _read_holder(fd)
                os.close(fd)
                raise RunDirectoryBusy(f"--out_dir {self.directory} is in use by another train.py run "
                                       f"({describe_holder(holder)}); wait for it to end, or choose another "
                                       f"--out_dir (nothing was written)")
            try:  # the holder may have ended and removed the file between our open and our lock: lock anew
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)
        previous = _read_holder(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(me) + "\n").encode())
        self.fd = fd
        if previous is None:
            return None
        return (f"note: took over {self.path}, left by a run that ended without releasing it "
                f"({describe_holder(previous)})")

    def release(self) -> None:
        """Remove the file, then unlock: a run waiting on the removed file sees it is gone and locks anew.
        (Windows removes no open file: there the lock goes first.)"""
        if self.fd is None:
            return
        if fcntl is None:
            os.close(self.fd)
        with contextlib.suppress(OSError):
            os.remove(self.path)
        if fcntl is not None:
            os.close(self.fd)  # closing releases the lock
        self.fd = None


@contextlib.contextmanager
def hold_run_directory(directory, dist):
    """Rank 0 holds `directory`'s lock for the block; every rank raises `RunDirectoryBusy` when it cannot."""
    lock = RunLock(directory)
    problem = None
    if dist.is_main:
        try:
            note = lock.acquire()
            if note:
                print(note, flush=True)
        except RunDirectoryBusy as e:
            problem = str(e)
    problem = dist.all_gather_object(problem)[0]  # the other ranks wait for rank 0's answer
    if problem is not None:
        raise RunDirectoryBusy(problem)
    try:
        yield lock
    finally:
        lock.release()
