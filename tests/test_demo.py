import json

import pytest
import torch

import demo
from captioning import demo as demo_pipeline
from captioning.data import shapes
from captioning.data.annotations import read_annotations
from captioning.data.results import read_results
from captioning.metrics import score_captions
from captioning.data.shapes import same_scene_facts, scene_from_dict
from captioning.configs import DEMO_DECODER_TYPES
from captioning.demo import recipe
from models.decoders import load_decoder


def test_demo_runs_the_whole_pipeline_and_learns(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the figures below were measured so; tiny models gain nothing more
    out = tmp_path / "demo"
    result = demo.main(["--out_dir", str(out), "--num_train", "200", "--num_val", "4", "--num_test", "40",
                        "--steps", "200", "--bs", "32", "--beam_size", "1"])
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1].startswith("RESULT colour_acc=")
    predictions = json.loads((out / "test_predictions.json").read_text())
    assert len(predictions) == 40 and all(isinstance(p["caption"], str) for p in predictions)
    # 200 steps learn colour (chance 25%) and most positions; shapes take longer (97.5, 82.5 and 25 when measured)
    assert result["accuracy"]["colour"] >= 75 and result["accuracy"]["position"] >= 45
    assert result["cider"] > 2 * result["baseline_cider"] > 0
    assert (out / "test_captions.png").stat().st_size > 0
    assert (out / "eval" / "metrics.json").exists() and (out / "run" / "demo_latest" / "config.json").exists()


def scored(predictions_file, data):
    """(accuracy per fact, CIDEr) of a predictions file the demo wrote, measured here from the file and the
    dataset's scenes and references."""
    predictions = {p.image_id: p.caption for p in read_results(predictions_file)}
    references = {r.image_id: r.captions for r in read_annotations(data / "captions_test.json", images_root=data)}
    cider = score_captions(predictions, references, metrics=("CIDEr",))["metrics"]["CIDEr"]
    return demo_pipeline.accuracy(predictions, shapes.read_scenes(data / "captions_test.json")), cider


def files_in(folder):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.parametrize("convention", ["relative to images/, as COCO", "relative to the dataset folder"])
def test_a_dataset_brought_by_a_user_is_read_and_left_untouched(tmp_path, convention):
    data = shapes.generate(tmp_path / "theirs", num_train=20, num_val=2, num_test=4, seed=5)
    if convention.startswith("relative to images/"):
        for name in demo_pipeline.ANNOTATION_FILES:
            raw = json.loads((data / name).read_text())
            for image in raw["images"]:
                image["file_name"] = image["file_name"].removeprefix("images/")
            (data / name).write_text(json.dumps(raw))
    expected = data / "images" if convention.startswith("relative to images/") else data
    assert demo_pipeline.images_root(data) == expected
    before = files_in(data)
    result = demo.main(["--data", str(data), "--out_dir", str(tmp_path / "out"), "--epochs", "1", "--bs", "16",
                        "--beam_size", "1"])
    assert files_in(data) == before  # no cache or output in the dataset
    accuracy, cider = scored(tmp_path / "out" / "test_predictions.json", data)
    assert result["accuracy"] == accuracy and result["cider"] == pytest.approx(cider)


def test_images_found_under_neither_root_are_a_clear_error(tmp_path):
    data = shapes.generate(tmp_path / "theirs", num_train=3, num_val=0, num_test=2, seed=5)
    next((data / "images").iterdir()).unlink()
    with pytest.raises(FileNotFoundError, match=r"the annotations' images are neither under .*images \(5 of 5 "
                                                r"missing, e.g. 'images/.*'\) nor under .* \(1 missing\)"):
        demo_pipeline.images_root(data)


def strip_scenes(data, unreadable_image=None):
    """The test split as another shapes dataset would write it: no `scene`, optionally one image whose
    captions follow no grammar the parser knows."""
    path = data / "captions_test.json"
    raw = json.loads(path.read_text())
    scenes = {im["id"]: scene_from_dict(im.pop("scene")) for im in raw["images"]}
    for ann in raw["annotations"]:
        if ann["image_id"] == unreadable_image:
            ann["caption"] = "some shapes somewhere"
    path.write_text(json.dumps(raw))
    return scenes


def test_ground_truth_comes_from_the_references_without_a_scene(tmp_path):
    data = shapes.generate(tmp_path, num_train=0, num_val=0, num_test=30, seed=3)
    first = json.loads((data / "captions_test.json").read_text())["images"][0]["id"]
    truth = strip_scenes(data, unreadable_image=first)
    records = read_annotations(data / "captions_test.json", images_root=data)
    assert records[0].image_id == first
    scenes = demo_pipeline.ground_truth(data, records)
    assert set(scenes) == {r.image_id for r in records[1:]}
    assert all(all(same_scene_facts(scenes[i], truth[i]).values()) for i in scenes)
    predictions = {r.image_id: r.captions[0] for r in records}
    predictions[records[1].image_id] = "a plaid blob"
    assert demo_pipeline.accuracy(predictions, scenes) == {k: pytest.approx(100 * 28 / 29) for k in
                                                           ("colour", "shape", "position")}
    assert demo_pipeline.accuracy(predictions, {}) == {"colour": None, "shape": None, "position": None}


def test_the_recipe_is_a_step_budget():
    config = demo_pipeline.DemoConfig(bs=64)
    assert demo_pipeline.epochs_for(10000, config, 3000) == 19  # 156 steps an epoch
    assert demo_pipeline.epochs_for(20000, config, 3000) == 10 and demo_pipeline.epochs_for(100, config, 3000) == 3000
    assert demo_pipeline.epochs_for(10000, demo_pipeline.DemoConfig(bs=64, epochs=2), 3000) == 2


def test_the_demo_decoders_are_their_architectures_at_about_the_same_size(tmp_path):
    captions = [f"a {colour} circle on the left" for colour in ("red", "blue", "green")] * 5
    assert set(recipe.DECODER_SIZES) == set(DEMO_DECODER_TYPES)
    decoders = {t: load_decoder(str(recipe.build_decoder(captions, tmp_path / t, 0, t))) for t in DEMO_DECODER_TYPES}
    counts = {t: sum(p.numel() for p in d.parameters()) for t, d in decoders.items()}
    assert {t: d.config.model_type for t, d in decoders.items()} == {t: t for t in DEMO_DECODER_TYPES}
    assert all(0.9 < counts[t] / counts["gpt2"] < 1.1 for t in counts), counts
    # the end token's embedding is drawn like the others (a zeroed padding row would pin its logit at 0)
    end = [d.generation_config.eos_token_id for d in decoders.values()]
    assert all(d.get_input_embeddings().weight[e].abs().sum() > 0 for d, e in zip(decoders.values(), end))
    # the token embeddings, and GPT-NeoX's untied output embeddings, start at the recipe's width, as saved
    for t, d in decoders.items():
        for weight in (d.get_input_embeddings().weight, d.get_output_embeddings().weight):
            assert weight.std().item() == pytest.approx(recipe.EMBEDDING_STD, rel=0.05), t
    # the same seed draws the same decoder, untied output embeddings included
    again = load_decoder(str(recipe.build_decoder(captions, tmp_path / "again", 0, "gpt_neox")))
    assert all(torch.equal(a, b) for a, b in zip(decoders["gpt_neox"].state_dict().values(),
                                                 again.state_dict().values()))
    # under LoRA the embeddings never learn: the architecture's own initialisation is kept
    frozen = load_decoder(str(recipe.build_decoder(captions, tmp_path / "frozen", 0, "gpt2", frozen_embeddings=True)))
    assert frozen.get_input_embeddings().weight.std().item() == pytest.approx(frozen.config.initializer_range,
                                                                             rel=0.05)


def test_the_demo_trains_and_captions_with_a_llama(tmp_path):
    data = shapes.generate(tmp_path / "data", num_train=20, num_val=2, num_test=4, seed=5)
    result = demo.main(["--data", str(data), "--out_dir", str(tmp_path / "out"), "--epochs", "1", "--bs", "16",
                        "--beam_size", "1", "--decoder_type", "llama"])
    config = json.loads((tmp_path / "out" / "run" / "demo_latest" / "config.json").read_text())
    assert config["decoder"]["model_type"] == "llama" and config["decoder"]["num_key_value_heads"] == 2
    accuracy, cider = scored(tmp_path / "out" / "test_predictions.json", data)
    assert result["accuracy"] == accuracy and result["cider"] == pytest.approx(cider)


def test_the_configs_defaults_are_the_flags():
    assert demo_pipeline.DemoConfig(**vars(demo.build_parser().parse_args([]))) == demo_pipeline.DemoConfig()


def test_demo_on_another_dataset_without_scenes(tmp_path, capsys):
    data = shapes.generate(tmp_path / "other", num_train=20, num_val=2, num_test=4, seed=5)
    strip_scenes(data)
    result = demo.main(["--data", str(data), "--out_dir", str(tmp_path / "out"), "--epochs", "1", "--bs", "16",
                        "--beam_size", "1"])
    assert all(0.0 <= v <= 100.0 for v in result["accuracy"].values())
    (data / "captions_test.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "images/test_000023.png"}],
        "annotations": [{"id": 1, "image_id": 1, "caption": "some shapes somewhere"}]}))
    result = demo.main(["--data", str(data), "--out_dir", str(tmp_path / "out"), "--epochs", "1", "--bs", "16",
                        "--beam_size", "1"])  # the same --out_dir again: the demo's previous run is replaced
    printed = capsys.readouterr().out
    assert f"note: replacing the previous demo run in {tmp_path / 'out' / 'run'}" in printed
    assert "note: 1 of 1 test images have no 'scene'" in printed
    assert printed.strip().splitlines()[-1].startswith("RESULT colour_acc=nan shape_acc=nan position_acc=nan cider=")
    assert result["accuracy"] == {"colour": None, "shape": None, "position": None}


def test_demo_rejects_a_folder_without_the_coco_files(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="captions_train.json is missing"):
        demo.main(["--data", str(tmp_path), "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # a run that cannot start leaves nothing behind


def test_cider_optimisation_follows_the_whole_cross_entropy_recipe(tmp_path, capsys):
    data = shapes.generate(tmp_path / "shapes", num_train=20, num_val=2, num_test=4, seed=5)  # 100 captions
    out = tmp_path / "out"
    result = demo.main(["--data", str(data), "--out_dir", str(out), "--steps", "12", "--bs", "16", "--beam_size", "1",
                        "--scst", "--scst_steps", "1", "--scst_samples", "2"])
    xe_args = json.loads((out / "run" / "train_args.json").read_text())
    scst_args = json.loads((out / "run_scst" / "train_args.json").read_text())
    # --scst leaves the cross-entropy stage as it is without it: 12 steps of 6 an epoch
    assert xe_args["epochs"] == demo_pipeline.epochs_for(100, demo_pipeline.DemoConfig(bs=16), 12) == 2
    assert not xe_args["scst"] and scst_args["scst"] and scst_args["epochs"] == 1
    assert xe_args["dataset"] == scst_args["dataset"] == "shapes"  # a record the web page reads, not a path
    assert scst_args["init_from"] == str(out / "run" / "demo_latest")
    assert (scst_args["scst_baseline"], scst_args["lr"], scst_args["scst_samples"]) == ("greedy", 1e-3, 2)
    xe_weights = (out / "run" / "demo_latest" / "model.safetensors").read_bytes()
    assert (out / "run_scst" / "demo_latest" / "model.safetensors").read_bytes() != xe_weights
    for name in ("test_predictions.json", "test_predictions_cross_entropy.json"):
        assert len(json.loads((out / name).read_text())) == 4
    for stage, name in ((result["cross_entropy"], "test_predictions_cross_entropy.json"),
                        (result, "test_predictions.json")):
        accuracy, cider = scored(out / name, data)
        assert stage["accuracy"] == accuracy and stage["cider"] == pytest.approx(cider)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT colour_acc=") and f"xe_cider={result['cross_entropy']['cider']:.1f}" in last


def test_the_cross_entropy_budget_is_the_same_with_cider_optimisation(tmp_path, monkeypatch):
    class Stop(Exception):
        """Raised in place of the first training stage; its argument is the TrainConfig the demo built."""

    def first_stage(config):
        raise Stop(config)

    monkeypatch.setattr(demo_pipeline, "train", first_stage)
    epochs = {}
    for scst in (False, True):
        config = demo_pipeline.DemoConfig(out_dir=str(tmp_path / str(scst)), num_train=40, num_val=2, num_test=4,
                                          scst=scst)
        with pytest.raises(Stop) as stopped:
            demo_pipeline.run_demo(config)
        epochs[scst] = stopped.value.args[0].epochs
    # 200 captions, 3 steps an epoch: the whole cross-entropy budget either way
    steps = demo_pipeline.DemoConfig().steps
    assert epochs[False] == epochs[True] == round(steps / 3)
    # with LoRA adapters the budget is --lora_steps
    config = demo_pipeline.DemoConfig(out_dir=str(tmp_path / "lora"), num_train=40, num_val=2, num_test=4, lora_r=4,
                                      lora_steps=30)
    with pytest.raises(Stop) as stopped:
        demo_pipeline.run_demo(config)
    assert stopped.value.args[0].epochs == 10 and stopped.value.args[0].lora_r == 4
