"""Reading and writing weight files safely.

Writes are atomic (temp file + rename), so a crash never leaves a half-written file in place. Reads never
execute pickled code (`weights_only=True`) and turn every failure into a `CheckpointError` naming the file.
"""
import contextlib
import glob
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, of the wrong kind or of mismatched sizes."""


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path):
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    On any exception the temporary file is removed and `path` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files 0600; outputs follow the umask, as open() would
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path):
    """Yield a temporary directory beside `path`; on success it replaces `path` as a whole.

    A directory cannot be renamed over a non-empty one, so the old directory is first moved aside and
    deleted only once the new one is in place: at every instant a complete export exists under `path`
    or beside it (as `.<name>.old`).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():  # never replace a file with a directory
        raise NotADirectoryError(20, f"{path} exists and is not a directory; nothing was written", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes folders 0700
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.parent / f".{path.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def save_safetensors(tensors: Dict[str, torch.Tensor], path, metadata: Optional[Dict[str, str]] = None) -> None:
    """safetensors' `save_file`, with a failed write raised as the OSError it is (a full disk is ENOSPC naming
    `path`), not as a SafetensorError whose message holds the error number."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        number = int(code[1])
        raise OSError(number, os.strerror(number), str(path)) from e


def remove_stale_temporaries(directory: Path, names: List[str]) -> List[Path]:
    """Remove the temporary files and directories that `atomic_write` and `atomic_directory` left in `directory`
    when a run was killed (SIGKILL, or SIGTERM with no handler) while writing one of `names`; returns them."""
    stale = [p for name in names for p in Path(directory).glob(f".{glob.escape(name)}*")
             if p.name.endswith((".tmp", ".old"))]
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return stale


def hash_tensor(digest, tensor: torch.Tensor) -> None:
    """Add a tensor's dtype, shape and bytes to a hashlib digest, from its buffer without a copy (any dtype: bf16
    has no numpy type, so the bytes are viewed as uint8; 0-dim tensors are flattened first)."""
    t = tensor.detach().cpu().contiguous()
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy())


def load_state_dict_file(path) -> Dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file or a torch checkpoint, on the CPU, without running pickled code.

    Torch checkpoints wrapping their weights as `{'model': ...}` (official TinyViT) or `{'state_dict': ...}`
    are unwrapped. A file that pickles a whole model object is refused with the way to convert it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (corrupt or truncated?): {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # not a forbidden class: the bytes themselves are garbage
            raise CheckpointError(f"{path}: not a readable torch checkpoint (corrupt or truncated?)") from e
        raise CheckpointError(
            f"{path} pickles Python objects other than tensors (for example a whole model saved with "
            f"torch.save(model, ...)), which would run arbitrary code when loaded. Where you trust the file, "
            f"turn it into a state dict once: torch.save(torch.load('{path}', weights_only=False).state_dict(), "
            f"'state_dict.pth'), then pass state_dict.pth."
        ) from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint (corrupt or truncated?): {e}") from e
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected a state dict (a dict of tensors), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: expected a state dict of tensors, but key {bad[0]!r} holds "
                              f"{type(obj[bad[0]]).__name__}")
    return obj


def load_state_dict_strict(module: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source,
                           optional_missing=()) -> None:
    """`module.load_state_dict(strict=True)` with errors that name the file, the key and both shapes.

    `optional_missing` lists keys that may be absent from the file (weights tied to another tensor).
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict and k not in optional_missing]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        raise CheckpointError(f"{source}: weights do not match the model: " + "; ".join(parts))
    for k, v in state_dict.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"{source}: key {k!r} has shape {tuple(v.shape)} but the model expects {tuple(expected[k].shape)} "
                f"(the checkpoint was made for other sizes)")
    module.load_state_dict(state_dict, strict=False)
