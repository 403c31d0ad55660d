"""The synthetic shapes dataset: one or two coloured shapes on varied backgrounds, captioned by a small grammar, and
the parser that reads such captions back.

Generated deterministically from a seed and written in the official COCO caption format (`images[]` with
`file_name`, `annotations[]`), so parse_coco.py, train.py, predict.py and evaluate.py run on it exactly as on COCO.
Each `images[]` entry also carries its `scene` (the ground truth), which `parse_caption` checks captions against.
The command is shapes_data.py.
"""
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from captioning.configs import ShapesConfig
from captioning.data.annotations import AnnotationError, read_utf8
from models.checkpoint_io import atomic_write

NAME = "shapes"  # the dataset's name in an export's training record (train.py --dataset)
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 210, 20)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")  # where a lone shape sits
RELATIONS = ("to the left of", "above")  # of a scene: the first shape (left or top) relative to the second
INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
           "below": "above"}
SYNONYMS = {"to the left of": "left of", "above": "on top of", "to the right of": "right of", "below": "under"}
POSITION_PHRASES = {"left": ["on the left", "in the left part of the image"],
                    "right": ["on the right", "in the right part of the image"],
                    "top": ["at the top", "in the upper part of the image"],
                    "bottom": ["at the bottom", "in the lower part of the image"]}


@dataclass
class Thing:
    colour: str
    shape: str


@dataclass
class Scene:
    things: List[Thing]
    position: Optional[str] = None  # one shape: where it is
    relation: Optional[str] = None  # two shapes: things[0] RELATION things[1]


def random_scene(rng: random.Random) -> Scene:
    first = Thing(rng.choice(list(COLOURS)), rng.choice(SHAPES))
    if rng.random() < 0.5:
        return Scene([first], position=rng.choice(POSITIONS))
    while True:
        second = Thing(rng.choice(list(COLOURS)), rng.choice(SHAPES))
        if second != first:  # two identical shapes would make the relation ambiguous
            return Scene([first, second], relation=rng.choice(RELATIONS))


def captions_for(scene: Scene, rng: random.Random, count: int = 5, either_order: bool = False,
                 reverse_fraction: float = 0.0) -> List[str]:
    """Paraphrases of the scene from the grammar, distinct where the grammar allows.

    Two shapes are named in reading order, the left (or top) one first, as people describe a scene; the
    paraphrases vary the wording and state the relation both ways ("A above B", "A with B below it").
    `either_order`: a caption may name either shape first ("B below A" as well as "A above B"), as datasets
    made elsewhere do; the decoder must then find where the shape it named first sits. `reverse_fraction`: each
    caption of two shapes names them in reverse order with this probability (`either_order` is about one half)."""
    a = scene.things[0]
    if scene.position:
        templates = [f"a {a.colour} {a.shape} {p}" for p in POSITION_PHRASES[scene.position]]
        templates += [f"there is a {a.colour} {a.shape} {p}" for p in POSITION_PHRASES[scene.position]]
        templates += [f"a {a.shape} in {a.colour} {POSITION_PHRASES[scene.position][0]}"]
    else:
        b, rel = scene.things[1], scene.relation
        templates = relation_templates(a, rel, b)
        if reverse_fraction:
            reverse = relation_templates(b, INVERSE[rel], a)
            rng.shuffle(templates)
            rng.shuffle(reverse)
            reversed_count = sum(rng.random() < reverse_fraction for _ in range(count))
            captions = reverse[:reversed_count] + templates[:count - reversed_count]
            rng.shuffle(captions)
            return captions
        if either_order:
            templates += relation_templates(b, INVERSE[rel], a)
    rng.shuffle(templates)
    return templates[:count]


def relation_templates(a: Thing, rel: str, b: Thing) -> List[str]:
    """Captions saying `a` is `rel` `b`, naming `a` first."""
    return [f"a {a.colour} {a.shape} {rel} a {b.colour} {b.shape}",
            f"a {a.colour} {a.shape} {SYNONYMS.get(rel, rel)} a {b.colour} {b.shape}",
            f"there is a {a.colour} {a.shape} {rel} a {b.colour} {b.shape}",
            f"a {a.shape} in {a.colour} {rel} a {b.shape} in {b.colour}",
            f"a {a.colour} {a.shape} with a {b.colour} {b.shape} {INVERSE[rel]} it"]


def background(rng: random.Random, size: int) -> np.ndarray:
    """Varied backgrounds: a gradient between two muted tints (grey level 80-190, tint within +-30) with pixel
    noise; never as saturated as a shape colour. No distracting shapes: the captions name only the shapes."""
    ends = []
    for _ in range(2):
        grey = rng.randint(80, 190)
        ends.append(np.array([grey + rng.randint(-30, 30) for _ in range(3)], dtype=np.float32))
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    ramp = ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None]
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 5.0, (size, size, 3))
    pixels = ends[0] + (ends[1] - ends[0]) * ramp + noise
    return np.clip(pixels, 0, 255).astype(np.uint8)


def draw_scene(scene: Scene, rng: random.Random, size: int = 64) -> Image.Image:
    img = Image.fromarray(background(rng, size))
    draw = ImageDraw.Draw(img)
    s = size // 4 + rng.randint(-2, 3)  # shape extent
    lo, mid, hi = s // 2 + 2, size // 2, size - s // 2 - 2
    if scene.position:
        jitter = lambda: rng.randint(-size // 10, size // 10)  # noqa: E731
        centres = [{"left": (lo, mid + jitter()), "right": (hi, mid + jitter()),
                    "top": (mid + jitter(), lo), "bottom": (mid + jitter(), hi)}[scene.position]]
    else:
        offset = lambda: rng.randint(-size // 8, size // 8)  # noqa: E731
        first, second = {"to the left of": ((lo, mid), (hi, mid)), "to the right of": ((hi, mid), (lo, mid)),
                         "above": ((mid, lo), (mid, hi)), "below": ((mid, hi), (mid, lo))}[scene.relation]
        centres = [(first[0] + (offset() if first[0] == mid else 0), first[1] + (offset() if first[1] == mid else 0)),
                   (second[0] + (offset() if second[0] == mid else 0),
                    second[1] + (offset() if second[1] == mid else 0))]
    for thing, (cx, cy) in zip(scene.things, centres):
        box = (cx - s // 2, cy - s // 2, cx + s // 2, cy + s // 2)
        colour = COLOURS[thing.colour]
        if thing.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif thing.shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=colour)
    return img


# The parser reads the generator's grammar and the usual variations of other shape datasets: any article,
# one adjective before the colour ("a small red circle"), more colour and shape names, "is", and synonyms of
# the positions and relations. Ground truth parsed from such a dataset's references is read the same way.
COLOUR_WORDS = (*COLOURS, "orange", "purple", "pink", "brown", "black", "white", "grey", "gray", "cyan", "magenta")
SHAPE_WORDS = (*SHAPES, "rectangle", "star", "ellipse", "oval", "diamond", "hexagon", "pentagon", "cross", "heart")
_COLOUR, _SHAPE = "|".join(COLOUR_WORDS), "|".join(SHAPE_WORDS)
THING_RE = re.compile(rf"\b(?:a|an|the|one) (?:\w+ )?(?:(?P<c1>{_COLOUR}) (?P<s1>{_SHAPE})"
                      rf"|(?P<s2>{_SHAPE}) (?:in|of colou?r) (?P<c2>{_COLOUR}))\b")
RELATION_WORDS = {"to the left of": "to the left of", "on the left of": "to the left of", "left of": "to the left of",
                  "to the right of": "to the right of", "on the right of": "to the right of",
                  "right of": "to the right of", "on top of": "above", "above": "above", "over": "above",
                  "below": "below", "underneath": "below", "beneath": "below", "under": "below"}
POSITION_WORDS = {"left": "left", "right": "right", "top": "top", "upper": "top", "bottom": "bottom",
                  "lower": "bottom", "centre": "centre", "center": "centre", "middle": "centre"}


# Longest phrase first, so that "underneath" is not read as "under".
RELATION_RE = re.compile(rf"\b(?:{'|'.join(sorted(RELATION_WORDS, key=len, reverse=True))})\b")


def find_relation(text: str) -> Optional[str]:
    """The relation the first relation phrase in a piece of caption states, or None."""
    match = RELATION_RE.search(text)
    return RELATION_WORDS[match.group()] if match else None


def parse_caption(caption: str) -> Optional[Scene]:
    """The scene a caption describes, or None when it names no shape, more than two, or no position/relation.

    One shape: its position from the words around it ("top left" for both). Two shapes: the relation between
    their mentions ("A is above B"), or after the second ("B with A above it": A above B).
    """
    text = " ".join(re.sub(r"[^a-z ]", " ", caption.lower()).split())
    matches = list(THING_RE.finditer(text))
    things = [Thing(m["c1"] or m["c2"], m["s1"] or m["s2"]) for m in matches]
    if len(things) == 1:
        rest = text[:matches[0].start()] + " " + text[matches[0].end():]
        if re.search(r"\b(it|its)\b", rest):
            return None
        positions = sorted({POSITION_WORDS[w] for w in rest.split() if w in POSITION_WORDS})
        return Scene(things, position=" ".join(positions)) if positions else None
    if len(things) != 2:
        return None
    relation = find_relation(text[matches[0].end():matches[1].start()])
    if relation is not None:
        return Scene(things, relation=relation)
    after = text[matches[1].end():]
    relation = find_relation(after)
    if relation is not None and re.search(r"\b(it|them)$", after):
        return Scene(things[::-1], relation=relation)
    return None


def same_scene_facts(predicted: Optional[Scene], truth: Scene) -> Dict[str, bool]:
    """Colour, shape and position/relation correctness of a caption's scene; a relation stated in the inverse
    direction with the shapes swapped ("B below A" for "A above B") is correct. A relation counts as right when
    it holds between objects that each match their counterpart in colour or in shape, so a wrong shape name is
    scored as a shape error, not also as a position error."""
    if predicted is None or len(predicted.things) != len(truth.things):
        return {"colour": False, "shape": False, "position": False}
    candidates = [predicted]
    if predicted.relation:
        candidates.append(Scene(predicted.things[::-1], relation=INVERSE[predicted.relation]))
    best = {"colour": False, "shape": False, "position": False}
    for cand in candidates:
        facts = {"colour": [t.colour for t in cand.things] == [t.colour for t in truth.things],
                 "shape": [t.shape for t in cand.things] == [t.shape for t in truth.things],
                 "position": (cand.position, cand.relation) == (truth.position, truth.relation)
                 and all(p.colour == t.colour or p.shape == t.shape for p, t in zip(cand.things, truth.things))}
        if sum(facts.values()) > sum(best.values()):
            best = facts
    return best


def write_split(out_dir: Path, split: str, count: int, rng: random.Random, start_id: int, size: int,
                either_order: bool = False, reverse_fraction: float = 0.0) -> int:
    images, annotations = [], []
    for i in tqdm(range(count), desc=f"shapes {split}", unit="img", leave=False):
        image_id = start_id + i
        scene = random_scene(rng)
        file_name = f"images/{split}_{image_id:06d}.png"
        draw_scene(scene, rng, size).save(out_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size,
                       "scene": asdict(scene)})
        for caption in captions_for(scene, rng, either_order=either_order, reverse_fraction=reverse_fraction):
            annotations.append({"id": len(annotations) + start_id * 10, "image_id": image_id, "caption": caption})
    with atomic_write(out_dir / f"captions_{split}.json") as tmp:
        tmp.write_text(json.dumps({"info": {"description": f"synthetic shapes, {split} split"},
                                   "images": images, "annotations": annotations}))
    return start_id + count


def generate(out_dir, num_train=ShapesConfig.num_train, num_val=ShapesConfig.num_val,
             num_test=ShapesConfig.num_test, seed=ShapesConfig.seed, size=ShapesConfig.image_size,
             either_order=ShapesConfig.either_order, reverse_fraction=ShapesConfig.reverse_fraction) -> Path:
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    next_id = 1
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        next_id = write_split(out_dir, split, count, rng, next_id, size, either_order, reverse_fraction)
    return out_dir


def scene_from_dict(d: Dict) -> Scene:
    return Scene([Thing(**t) for t in d["things"]], position=d.get("position"), relation=d.get("relation"))


def read_scenes(path) -> Dict[int, Scene]:
    """{image_id: scene} of the `images[]` entries of a COCO-format annotation file that carry a `scene`, as
    write_split writes them (files made elsewhere may have none: {})."""
    try:
        raw = json.loads(read_utf8(Path(path)))
    except ValueError as e:
        raise AnnotationError(f"{path}: not JSON ({e})") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("images", []), list):
        raise AnnotationError(f"{path}: not a COCO-format annotation file (a JSON object with an images[] list)")
    try:
        return {im["id"]: scene_from_dict(im["scene"]) for im in raw.get("images", [])
                if isinstance(im, dict) and "scene" in im}
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise AnnotationError(f"{path}: an images[] entry's 'scene' is not a shapes scene ({e})") from e
