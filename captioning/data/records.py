"""What every annotation reader gives: an image with its captions (`ImageRecord`), the error for a bad entry, and
the one rule by which image ids are matched (`image_id_key`). Annotation files (captioning/data/annotations.py) and
webdataset shards (captioning/data/shards.py) build on it."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union


class AnnotationError(ValueError):
    """An annotation file that is missing, malformed, or holds an entry that cannot be used."""


@dataclass
class ImageRecord:
    image_id: Union[int, str]  # the source's id when it has one, else the file name
    path: Path  # the image file (or a ShardMember: an image inside a webdataset shard)
    captions: List[str]
    file_name: str  # relative to the images root, as in the annotation (or as found by COCO naming)
    caption_ids: List[Optional[int]] = field(default_factory=list)  # per caption: the source's id, if any


def image_id_key(value) -> Optional[Union[int, str]]:
    """An image_id as every reader keys it (annotations and predictions alike): an int, a digit string as that int
    (so '391895' and 391895 are one image), another non-empty string as it is; None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip():
        return int(value) if value.strip().isdigit() else value
    return None
