"""evaluate.py --checkpoint with the real Captioner on a tiny export (random weights: the captions are
nonsense, but they must be exactly what the Captioner gives for the same images)."""
import json

import pytest
import torch

import evaluate
from builders import FAST_METRICS, tiny_captioner
from captioning.data.annotations import read_annotations
from captioning.data.images import load_image
from captioning.inference import Captioner, DecodingOptions
from captioning.metrics import score_captions
from models import EncoderConfig, ImageEncoder


def test_checkpoint_mode_matches_the_captioner(tmp_path, export, karpathy_file, coco_images):
    report = evaluate.main(["--checkpoint", str(export), "--images_root", str(coco_images), "--annotations",
                            str(karpathy_file), "--split", "test", "--beam_size", "3", "--max_length", "8",
                            "--batch_size", "4", "--device", "cpu", *FAST_METRICS])
    saved = json.loads((tmp_path / "export_eval_test" / "predictions.json").read_text())
    records = read_annotations(karpathy_file, split="test", images_root=coco_images)
    direct = Captioner.from_pretrained(export).predict(
        [load_image(r.path) for r in records], DecodingOptions(beam_size=3, num_captions=3, max_length=8))
    assert [e["image_id"] for e in saved] == [r.image_id for r in records]
    assert [e["beams"] for e in saved] == [d.captions for d in direct]
    assert all(len(e["beams"]) == 3 and e["caption"] == e["beams"][0] for e in saved)
    expected = score_captions({r.image_id: d.captions[0] for r, d in zip(records, direct)},
                              {r.image_id: r.captions for r in records}, metrics=("BLEU", "CIDEr"))
    assert report["metrics"] == pytest.approx(expected["metrics"])


def test_checkpoint_without_an_image_encoder_is_a_clear_error(tmp_path, tokenizer, karpathy_file,
                                                              coco_images, capsys):
    path = tmp_path / "features_only"
    tiny_captioner(tokenizer).save_pretrained(path, tokenizer)
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(path), "--images_root", str(coco_images), "--annotations",
                       str(karpathy_file), "--split", "test", *FAST_METRICS])
    err = capsys.readouterr().err
    assert "records no image encoder, so it captions precomputed features only" in err and "Traceback" not in err


def test_max_length_follows_the_checkpoint(tmp_path, tokenizer, karpathy_file, coco_images, capsys):
    torch.manual_seed(0)
    encoder = ImageEncoder(EncoderConfig(name="test_resnet", weights="random", image_size=32)).eval()
    path = tmp_path / "short"
    tiny_captioner(tokenizer, encoder, n_positions=20).save_pretrained(path, tokenizer)  # prefix 4: 16 tokens at most
    common = ["--checkpoint", str(path), "--images_root", str(coco_images), "--annotations", str(karpathy_file),
              "--split", "test", "--beam_size", "2", "--device", "cpu", *FAST_METRICS]
    evaluate.main(common)
    assert ("note: captions of at most 16 tokens instead of 67: the decoder has 20 positions, 4 of them for the "
            "prefix") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(common + ["--max_length", "17", "--out_dir", str(tmp_path / "refused")])
    assert ("evaluate.py: error: --max_length 17 does not fit this checkpoint: the decoder has 20 positions, 4 of "
            "them for the prefix, so a caption holds 1 to 16 tokens") in capsys.readouterr().err
