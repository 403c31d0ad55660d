"""Webdataset shards as img2dataset writes them -> `ImageRecord`s whose images stay inside the tars.

A shard is a tar whose members are grouped by key: `KEY.jpg|jpeg|png|webp` the image, `KEY.txt` the caption,
`KEY.json` with `caption`, `key`, `url`, `status` (a `.parquet` of the shard's table may sit beside each tar).
Shards are named by a `.tar` file, a brace pattern (`'cc3m/{00000..00331}.tar'`), a directory of `.tar` files, or a
text file listing them one per line (relative to the list's folder).

Each shard is indexed once, reading its member headers and its small text members (not the images), so that
every image is read later by offset, in any order, by any process: the records then go through the same
extraction, training and evaluation paths as images in folders. The index comes from the standard library's
tarfile: webdataset's streaming iterators read every image to group the members, and wids' indexed reader
(MMIndexedTar) neither checks header checksums nor notices a truncated tar. Brace patterns are expanded with
`braceexpand`, as webdataset expands them. The image id is the sample's key, matched as every
reader matches ids (`image_id_key`): a key of digits, as img2dataset writes them (`000010123`), is that integer.
"""
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from braceexpand import braceexpand

from captioning.data.records import AnnotationError, ImageRecord, image_id_key

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSIONS = ("txt", "json")
KNOWN_EXTENSIONS = IMAGE_EXTENSIONS + TEXT_EXTENSIONS + ("parquet", "cls", "npy")


@dataclass(frozen=True)
class ShardMember:
    """An image inside a shard: where its bytes are. Printed as `shard.tar:KEY.jpg` in messages."""
    shard: Path
    name: str
    offset: int
    size: int

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise EOFError(f"{self}: the shard ends {self.size - len(data)} bytes into this member")
        return data


def image_exists(path) -> bool:
    """Whether an image file, or the shard holding an image, is there."""
    return path.shard.is_file() if isinstance(path, ShardMember) else Path(path).is_file()


def looks_like_shards(spec: str) -> bool:
    """Whether an --annotations value names shards (the `auto` format): a `.tar`, a brace pattern of them, a
    directory holding `.tar` files, or a text file whose first line names a `.tar`."""
    if spec.endswith(".tar") or ("{" in spec and ".tar" in spec):
        return True
    path = Path(spec)
    if path.is_dir():
        return any(path.glob("*.tar"))
    if path.suffix.lower() in (".txt", ".list", ".shards") and path.is_file():
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().strip().endswith(".tar")
    return False


def shard_paths(spec: str) -> List[Path]:
    """The shards `spec` names, in order; each must exist."""
    path = Path(spec)
    if path.is_dir():
        paths = sorted(path.glob("*.tar"))
        if not paths:
            raise AnnotationError(f"{spec}: a directory without .tar shards")
    elif "{" in spec:
        paths = [Path(p) for p in braceexpand(spec)]
    elif path.suffix == ".tar":
        paths = [path]
    elif path.is_file():
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        paths = [p if p.is_absolute() else path.parent / p for p in map(Path, filter(None, lines))]
        if not paths:
            raise AnnotationError(f"{spec}: a shard list without shards")
    else:
        raise AnnotationError(f"{spec}: no such shard, shard pattern, directory or shard list")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise AnnotationError(f"{spec}: {len(missing)} of {len(paths)} shard(s) are missing, e.g. {missing[0]}")
    return paths


def split_member(name: str):
    """(key, extension) of a member as webdataset groups them: the key runs to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot or not stem:
        return None, None
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


class _Sample:
    def __init__(self, key: str):
        self.key, self.image, self.caption, self.problem = key, None, None, None


def _caption(sample: _Sample, extension: str, data: bytes, where: str) -> None:
    text = data.decode("utf-8", errors="replace")
    if extension == "json":
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as e:
            sample.problem = f"{where}: {sample.key}.json is not valid JSON ({e})"
            return
        text = meta.get("caption") if isinstance(meta, dict) else None
        if sample.caption is not None or text is None:
            return  # KEY.txt wins; a json without a caption leaves it to the txt
    sample.caption = text


def index_shard(shard: Path, errors: Optional[list]) -> List[ImageRecord]:
    """One record per complete sample of `shard`, in member order. A sample without an image or caption, a
    stray member and a truncated tar are errors naming the shard and key: raised, or appended to `errors` with
    the sample skipped (a truncated tar keeps the samples before the cut)."""
    records, samples, order = [], {}, []

    def problem(message: str) -> None:
        if errors is None:
            raise AnnotationError(message)
        errors.append(AnnotationError(message))

    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, extension = split_member(member.name)
                if key is None or extension not in KNOWN_EXTENSIONS:
                    problem(f"{shard}: stray member {member.name!r} (expected KEY.jpg|jpeg|png|webp, KEY.txt, "
                            f"KEY.json)")
                    continue
                sample = samples.get(key)
                if sample is None:
                    sample = samples[key] = _Sample(key)
                    order.append(key)
                if extension in IMAGE_EXTENSIONS:
                    sample.image = ShardMember(shard, member.name, member.offset_data, member.size)
                elif extension in TEXT_EXTENSIONS:
                    _caption(sample, extension, tar.extractfile(member).read(), str(shard))
    except (tarfile.TarError, EOFError, OSError) as e:
        problem(f"{shard}: truncated or corrupt tar after {len(order)} sample(s) ({e}); the samples before the "
                f"cut are kept")
        if order:
            samples.pop(order.pop())  # the sample being read at the cut may lack members
    for key in order:
        sample = samples[key]
        where = f"{shard}: sample {key!r}"
        if sample.problem:
            problem(sample.problem)
        elif sample.image is None:
            problem(f"{where}: no image member (KEY.jpg|jpeg|png|webp)")
        elif not (sample.caption or "").strip():
            problem(f"{where}: no caption (KEY.txt, or 'caption' in KEY.json)")
        else:
            records.append(ImageRecord(image_id_key(key.rpartition("/")[2]), sample.image, [sample.caption.strip()],
                                       f"{shard.name}/{sample.image.name}", [None]))
    return records


def read_shards(spec: str, errors: Optional[list] = None) -> List[ImageRecord]:
    """Records of every shard `spec` names, shard by shard; a key found in two shards is an error."""
    records, seen = [], {}
    for shard in shard_paths(spec):
        for record in index_shard(shard, errors):
            if record.image_id in seen:
                message = (f"{shard}: sample {record.image_id!r} is also in {seen[record.image_id]}; expected "
                           f"one sample per key")
                if errors is None:
                    raise AnnotationError(message)
                errors.append(AnnotationError(message))
                continue
            seen[record.image_id] = shard
            records.append(record)
    return records
