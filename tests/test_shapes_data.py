import json
import random

import numpy as np
import pytest
from PIL import Image

import shapes_data
from captioning.data import shapes
from captioning.data.shapes import COLOURS, Scene, Thing, captions_for, parse_caption, same_scene_facts, scene_from_dict


def test_generation_is_deterministic(tmp_path):
    a = shapes.generate(tmp_path / "a", num_train=12, num_val=3, num_test=4, seed=7)
    b = shapes.generate(tmp_path / "b", num_train=12, num_val=3, num_test=4, seed=7)
    c = shapes.generate(tmp_path / "c", num_train=12, num_val=3, num_test=4, seed=8)
    for split in ("train", "val", "test"):
        assert (a / f"captions_{split}.json").read_text() == (b / f"captions_{split}.json").read_text()
    files = sorted(p.name for p in (a / "images").iterdir())
    assert len(files) == 19
    assert all((a / "images" / f).read_bytes() == (b / "images" / f).read_bytes() for f in files)
    assert (a / "captions_train.json").read_text() != (c / "captions_train.json").read_text()


def test_coco_format_and_captions_parse_back_to_the_scene(tmp_path):
    out = shapes.generate(tmp_path, num_train=40, num_val=0, num_test=0, seed=0)
    data = json.loads((out / "captions_train.json").read_text())
    assert {"images", "annotations"} <= set(data)
    by_id = {im["id"]: im for im in data["images"]}
    per_image = {}
    for ann in data["annotations"]:
        scene = scene_from_dict(by_id[ann["image_id"]]["scene"])
        assert same_scene_facts(parse_caption(ann["caption"]), scene) == {"colour": True, "shape": True,
                                                                          "position": True}, ann["caption"]
        per_image.setdefault(ann["image_id"], set()).add(ann["caption"])
    assert all(len(c) == 5 for c in per_image.values())  # five distinct paraphrases per image
    assert {len(scene_from_dict(im["scene"]).things) for im in data["images"]} == {1, 2}


def test_images_show_the_scene_with_the_first_shape_left_or_on_top(tmp_path):
    rng = random.Random(0)
    checked = 0
    while checked < 20:
        scene = shapes.random_scene(rng)
        pixels = np.asarray(shapes.draw_scene(scene, rng, 64)).astype(int)
        if scene.position or scene.things[0].colour == scene.things[1].colour:
            continue

        def centre_of(colour, pixels=pixels):
            ys, xs = np.nonzero((np.abs(pixels - np.array(COLOURS[colour])).sum(-1)) < 10)
            return xs.mean(), ys.mean()
        (x0, y0), (x1, y1) = centre_of(scene.things[0].colour), centre_of(scene.things[1].colour)
        assert scene.relation in ("to the left of", "above")
        assert (x0 + 20 < x1) if scene.relation == "to the left of" else (y0 + 20 < y1), scene
        checked += 1


def test_parse_caption_scores_wrong_captions():
    truth = Scene([Thing("red", "square"), Thing("blue", "circle")], relation="above")
    assert same_scene_facts(parse_caption("a blue circle below a red square"), truth) == {
        "colour": True, "shape": True, "position": True}
    assert same_scene_facts(parse_caption("a red square below a blue circle"), truth) == {
        "colour": True, "shape": True, "position": False}
    # a wrong shape name is a shape error; the relation between the red and the blue object is still right
    assert same_scene_facts(parse_caption("a red triangle above a blue circle"), truth) == {
        "colour": True, "shape": False, "position": True}
    assert same_scene_facts(parse_caption("a green triangle above a yellow circle"), truth)["position"] is False
    assert same_scene_facts(parse_caption("a green square above a blue circle"), truth)["colour"] is False
    assert same_scene_facts(parse_caption("a red square"), truth) == {"colour": False, "shape": False,
                                                                      "position": False}
    assert same_scene_facts(parse_caption("a purple square on the left"), Scene([Thing("red", "square")], "left")
                            ) == {"colour": False, "shape": True, "position": True}
    assert parse_caption("a plaid square on the left") is None  # not a colour
    assert parse_caption("a red square") is None  # no position
    assert parse_caption("a red square above a blue circle and a green triangle") is None  # three shapes


def test_parse_caption_reads_variations_of_other_shape_datasets():
    red_above_blue = Scene([Thing("red", "square"), Thing("blue", "circle")], relation="above")
    for caption in ("The red square is above the blue circle.", "a small red square on top of a large blue circle",
                    "A blue circle is underneath a red square", "one square of colour red over an circle in blue",
                    "a blue circle with a red square above it"):
        assert same_scene_facts(parse_caption(caption), red_above_blue) == {
            "colour": True, "shape": True, "position": True}, caption
    assert parse_caption("An orange star left of a pink hexagon") == Scene(
        [Thing("orange", "star"), Thing("pink", "hexagon")], relation="to the left of")
    assert parse_caption("The purple diamond is in the upper left corner.") == Scene(
        [Thing("purple", "diamond")], position="left top")
    assert parse_caption("A grey oval in the middle") == Scene([Thing("grey", "oval")], position="centre")
    assert parse_caption("a red circle next to it") is None  # a single shape said relative to nothing
    assert parse_caption("a red circle and a blue square") is None  # no relation


def test_captions_for_covers_all_grammar_forms():
    rng = random.Random(3)
    scene = Scene([Thing("yellow", "triangle")], position="top")
    caps = captions_for(scene, rng)
    assert len(set(caps)) == 5 and all(parse_caption(c) == scene for c in caps)


def test_main_writes_the_splits(tmp_path, capsys):
    assert shapes_data.main(["--out_dir", str(tmp_path), "--num_train", "3", "--num_val", "1", "--num_test", "2",
                             "--image_size", "48"]) == 0
    data = json.loads((tmp_path / "captions_test.json").read_text())
    assert len(data["images"]) == 2 and Image.open(tmp_path / data["images"][0]["file_name"]).size == (48, 48)


def test_either_order_captions_name_either_shape_first_and_parse_back(tmp_path):
    out = shapes.generate(tmp_path, num_train=60, num_val=0, num_test=0, seed=3, either_order=True)
    data = json.loads((out / "captions_train.json").read_text())
    scenes = {im["id"]: scene_from_dict(im["scene"]) for im in data["images"]}
    second_first = 0
    for ann in data["annotations"]:
        scene, parsed = scenes[ann["image_id"]], parse_caption(ann["caption"])
        assert all(same_scene_facts(parsed, scene).values()), ann["caption"]
        if scene.relation and parsed.things[0] == scene.things[1] and not ann["caption"].endswith(" it"):
            second_first += 1  # "B below A": the right/lower shape named first
    assert second_first > 20
    plain = json.loads((shapes.generate(tmp_path / "plain", num_train=60, num_val=0, num_test=0,
                                              seed=3) / "captions_train.json").read_text())
    scenes = {im["id"]: scene_from_dict(im["scene"]) for im in plain["images"]}
    for ann in plain["annotations"]:  # reading order only
        scene, parsed = scenes[ann["image_id"]], parse_caption(ann["caption"])
        assert not (scene.relation and parsed.things[0] == scene.things[1] and not ann["caption"].endswith(" it"))


def test_read_scenes_reads_back_what_the_generator_wrote_and_names_a_bad_entry(tmp_path):
    data = shapes.generate(tmp_path, num_train=0, num_val=0, num_test=5, seed=2)
    raw = json.loads((data / "captions_test.json").read_text())
    scenes = shapes.read_scenes(data / "captions_test.json")
    assert scenes == {im["id"]: scene_from_dict(im["scene"]) for im in raw["images"]} and len(scenes) == 5
    raw["images"][2]["scene"] = {"colour": "red"}  # no things
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(shapes.AnnotationError, match=r"bad.json: an images\[\] entry's 'scene' is not a shapes scene"):
        shapes.read_scenes(tmp_path / "bad.json")
    del raw["images"][2]["scene"]
    (tmp_path / "some.json").write_text(json.dumps(raw))
    assert sorted(shapes.read_scenes(tmp_path / "some.json")) == sorted(set(scenes) - {raw["images"][2]["id"]})


@pytest.mark.parametrize("fraction", [0.0, 1 / 3, 1.0])
def test_reverse_fraction_is_the_share_of_captions_naming_the_shapes_in_reverse(fraction):
    rng = random.Random(0)
    scenes = [s for s in (shapes.random_scene(rng) for _ in range(800)) if s.relation][:400]
    reverse = total = 0
    for scene in scenes:
        captions = captions_for(scene, rng, reverse_fraction=fraction)
        assert len(captions) == 5
        for caption in captions:
            parsed = parse_caption(caption)
            assert all(same_scene_facts(parsed, scene).values()), caption
            if not caption.endswith(" it"):  # "A with B below it" parses in relation order, not naming order
                reverse += parsed.things[0] == scene.things[1]  # "B below A": the right/lower shape named first
                total += 1
    # each side's grammar has one "... it" form of five: about 1,600 captions counted, 3 sd of their share is 0.035
    assert reverse / total == pytest.approx(fraction, abs=0.035)


def test_reverse_fraction_and_either_order_together_are_refused(tmp_path, capsys):
    assert shapes_data.main(["--out_dir", str(tmp_path), "--either_order", "--reverse_fraction", "0.3"]) == 2
    assert "give --either_order or --reverse_fraction, not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        shapes_data.main(["--out_dir", str(tmp_path), "--reverse_fraction", "1.5"])
    assert "argument --reverse_fraction" in capsys.readouterr().err
