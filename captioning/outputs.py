"""Output locations: checked before the work that fills them, and results kept when the final write still fails.

Captioning, scoring or encoding a dataset can take hours, so a path that cannot be written (an existing directory
where a file goes, a file where a directory goes, a read-only place) is refused before the work starts. A write
that fails anyway at the end (a full disk, a place that became read-only) saves the results elsewhere, beside the
path or in the temporary directory, and the error says where.
"""
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


class OutputError(Exception):
    """An output location that cannot be written; the message names the flag and, after work, where the
    results went instead (`rescued`, None when nowhere)."""

    def __init__(self, message: str, rescued: Optional[Path] = None):
        super().__init__(message)
        self.rescued = rescued


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable_parent(directory: Path, flag: str, target: Path) -> None:
    existing = _nearest_existing(directory)
    if not existing.is_dir():
        raise OutputError(f"{flag} {target}: {existing} is a file, so nothing can be written under it")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass  # creating the file is the check; it is deleted on closing
    except OSError as e:
        raise OutputError(f"{flag} {target}: cannot write in {existing} ({e.strerror or e})") from e


def check_output_file(path, flag: str) -> Path:
    """`path` can be created or replaced as a file: it is not a directory and its folder (or the nearest one
    that exists, from which the rest are created) accepts new files."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path}: is a directory; give a file name")
    _check_writable_parent(path.parent, flag, path)
    return path


def check_output_dir(path, flag: str) -> Path:
    """`path` is or can become a directory that accepts new files."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path}: exists and is not a directory")
    _check_writable_parent(path, flag, path)
    return path


def write_or_rescue(path, write: Callable[[Path], T], flag: str) -> T:
    """`write(path)`, returning what it returns; when that raises OSError, `write` to a rescue file beside `path`,
    else in the temporary directory, and raise OutputError saying where the results are. `write` must write
    atomically (a temporary file, then a rename), so a failed attempt leaves nothing behind."""
    path = Path(path)
    try:
        return write(path)
    except OSError as error:
        failure = error
    stem = f"{path.stem}.rescued-{os.getpid()}{path.suffix}"
    for place in (path.with_name(stem), Path(tempfile.gettempdir()) / stem):
        try:
            write(place)
        except OSError:
            continue
        raise OutputError(f"{flag} {path} could not be written ({failure.strerror or failure}); the results were "
                          f"saved to {place} instead", rescued=place)
    raise OutputError(f"{flag} {path} could not be written ({failure.strerror or failure}), nor beside it, nor in "
                      f"{tempfile.gettempdir()}")


def write_dir_or_rescue(path, write: Callable[[Path], T], flag: str) -> T:
    """`write(directory)` into `path` (created if needed), returning what it returns; when that raises OSError,
    into a new temporary directory, and raise OutputError saying where the results are."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        return write(path)
    except OSError as error:
        failure = error
    rescue = Path(tempfile.mkdtemp(prefix=f"{path.name}.rescued-"))
    try:
        write(rescue)
    except OSError as e:
        shutil.rmtree(rescue, ignore_errors=True)
        raise OutputError(f"{flag} {path} could not be written ({failure.strerror or failure}), nor {rescue} "
                          f"({e.strerror or e})") from e
    raise OutputError(f"{flag} {path} could not be written ({failure.strerror or failure}); the results were "
                      f"saved to {rescue} instead", rescued=rescue)
