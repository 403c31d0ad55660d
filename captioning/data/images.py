"""Image files -> 8-bit RGB PIL images, with the reason when a file cannot be used."""
import errno
import io
import os
import stat
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps


class ImageError(Exception):
    """An image file that cannot be used; `kind` is one of missing, not_regular (a directory, FIFO, socket,
    device or symlink loop), unreadable, truncated, too_large, empty."""

    def __init__(self, path, kind: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.kind, self.reason = path if hasattr(path, "read") else Path(path), kind, reason

    def __reduce__(self):  # DataLoader workers send exceptions across processes
        return ImageError, (self.path, self.kind, self.reason)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16-bit and float images are rescaled, transparency is put on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        image = Image.fromarray(a.round().astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def check_regular_file(path: Path) -> None:
    """Raise `ImageError` unless `path` is a regular file (after symlinks): "missing" when nothing is there,
    "not_regular" for an entry that exists but holds no file to read, saying what it is."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageError(path, "missing", "file not found" + (" (a symlink to nothing)" if os.path.islink(path)
                                                             else "")) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError(path, "not_regular", "not a regular file: a symlink loop") from None
        raise ImageError(path, "unreadable", f"unreadable: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise ImageError(path, "not_regular", "is a directory, not an image file")
    if not stat.S_ISREG(mode):
        what = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "an unknown kind of entry")
        raise ImageError(path, "not_regular", f"not a regular file: {what}")


def load_image(path, max_pixels: Optional[int] = None) -> Image.Image:
    """An image file as 8-bit RGB, EXIF orientation applied; raises `ImageError` naming the file and reason.

    Grayscale, CMYK, RGBA, palette and 16-bit images are converted. Images larger than `max_pixels`
    (default: PIL's `Image.MAX_IMAGE_PIXELS`) are refused before decoding, as are truncated files. `path` may
    also be an image inside a webdataset shard (captioning.data.shards.ShardMember), read by its offset.
    """
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    if hasattr(path, "read"):  # a shard member: its bytes, without extracting the tar
        try:
            source = io.BytesIO(path.read())
        except (OSError, EOFError) as e:
            raise ImageError(path, "truncated" if isinstance(e, EOFError) else "unreadable",
                             f"{e.__class__.__name__}: {e}") from e
    else:
        path = source = Path(path)
        check_regular_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own check below refuses
            with Image.open(source) as image:
                width, height = image.size
                if limit and width * height > limit:
                    raise ImageError(path, "too_large", f"decompression bomb: {width}x{height} = "
                                     f"{width * height:,} pixels exceeds the limit of {limit:,}")
                image.load()
                if image.getexif().get(0x0112, 1) != 1:  # EXIF orientation, as phone photos carry it
                    image = ImageOps.exif_transpose(image)
                return to_rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(path, "too_large", f"decompression bomb: {e}") from e
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, zlib.error, ... for broken files
        kind = "truncated" if "truncated" in str(e).lower() else "unreadable"
        raise ImageError(path, kind, f"{kind}: {e.__class__.__name__}: {e}") from e
