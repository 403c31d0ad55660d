"""Exports named by a Hugging Face Hub repository id load through huggingface_hub's own cache; offline, a cached
one loads and an uncached one is a clear error. The cache is built here as huggingface_hub lays it out."""
import json
import shutil

import pytest
from huggingface_hub import constants

import predict
from builders import SHORT, good_images
from captioning.inference import Captioner
from models import ClipCaptionModel
from models.checkpoint_io import CheckpointError
from models.hub import is_hub_id, resolve_export

MAIN, OLD = "a" * 40, "b" * 40


@pytest.fixture
def hub_cache(tmp_path, exports, monkeypatch):
    """someone/tiny-captioner in a private cache: main is the export with its encoder inside, revision v1 the
    features-only export."""
    assert constants.HF_HUB_OFFLINE  # tests never reach the network
    repo = tmp_path / "hub" / "models--someone--tiny-captioner"
    for commit, export in ((MAIN, exports["inside"]), (OLD, exports["features_only"])):
        shutil.copytree(export, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(OLD)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return repo


def test_hub_ids_and_paths_are_told_apart(tmp_path):
    assert is_hub_id("someone/tiny-captioner") and is_hub_id("someone/tiny-captioner@v1")
    assert not is_hub_id("/abs/path") and not is_hub_id("a/b/c") and not is_hub_id("plain")
    (tmp_path / "someone" / "local").mkdir(parents=True)
    assert resolve_export(tmp_path / "someone" / "local") == tmp_path / "someone" / "local"


def test_a_cached_hub_model_loads_offline_as_its_directory_does(hub_cache, exports, images):
    paths = [str(p) for p in good_images(images)][:2]
    local = Captioner.from_pretrained(exports["inside"]).predict(paths, **SHORT)
    hub = Captioner.from_pretrained("someone/tiny-captioner").predict(paths, **SHORT)
    assert [r.captions for r in hub] == [r.captions for r in local] and all(r.captions for r in hub)
    assert ClipCaptionModel.from_pretrained("someone/tiny-captioner@v1").encoder is None  # the other revision
    assert resolve_export("someone/tiny-captioner@v1") == hub_cache / "snapshots" / OLD


def test_predict_takes_a_hub_id_and_an_uncached_one_is_a_clear_error(hub_cache, images, tmp_path, capsys):
    out = tmp_path / "captions.json"
    assert predict.main(["--checkpoint", "someone/tiny-captioner", "--image", *map(str, good_images(images)[:1]),
                         "--out", str(out), "--max_length", "10"]) == 0
    assert len(json.loads(out.read_text())) == 1
    with pytest.raises(CheckpointError, match=r"someone/missing: no such directory, and the Hub repository "
                                              r"someone/missing is not in the Hugging Face cache .* while "
                                              r"HF_HUB_OFFLINE=1 forbids downloading it"):
        Captioner.from_pretrained("someone/missing")
    assert predict.main(["--checkpoint", "someone/missing", "--image", *map(str, good_images(images)[:1])]) == 2
    assert "HF_HUB_OFFLINE=1" in capsys.readouterr().err
