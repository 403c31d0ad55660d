"""evaluate.py --checkpoint with the real Captioner on a tiny export (random weights: the captions are
nonsense, but they must be exactly what the Captioner gives for the same images)."""
import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import evaluate
from captioning.data.annotations import read_annotations
from captioning.data.images import load_image
from captioning.inference import Captioner, DecodingOptions
from captioning.metrics import score_captions
from models import CaptionerConfig, ClipCaptionModel, EncoderConfig, ImageEncoder
from tests import test_evaluate
from tests.test_evaluate import FAST

# Fixtures of test_evaluate, found by pytest under these names (bound, not imported, so that pyflakes reads the
# test arguments of the same names as uses of them).
coco_images, karpathy_file = test_evaluate.coco_images, test_evaluate.karpathy_file


def tiny_model(tokenizer, encoder=None, prefix_size=16, n_positions=128) -> ClipCaptionModel:
    eos = tokenizer.eos_token_id
    gpt = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=n_positions, vocab_size=len(tokenizer),
                                     initializer_range=0.2, bos_token_id=eos, eos_token_id=eos))
    config = CaptionerConfig(mapping_type="transformer", prefix_length=4, prefix_length_clip=4, num_layers=1,
                             prefix_size=encoder.feature_dim if encoder else prefix_size,
                             eos_token_ids=[eos, tokenizer.convert_tokens_to_ids(".")])
    return ClipCaptionModel(config, gpt=gpt, encoder=encoder)


@pytest.fixture
def export(tmp_path, tokenizer):
    torch.manual_seed(0)
    encoder = ImageEncoder(EncoderConfig(name="test_resnet", weights="random", image_size=32)).eval()
    path = tmp_path / "export"
    tiny_model(tokenizer, encoder).save_pretrained(path, tokenizer)
    return path


def test_checkpoint_mode_matches_the_captioner(tmp_path, export, karpathy_file, coco_images):
    report = evaluate.main(["--checkpoint", str(export), "--images_root", str(coco_images), "--annotations",
                            str(karpathy_file), "--split", "test", "--beam_size", "3", "--max_length", "8",
                            "--batch_size", "4", "--device", "cpu", *FAST])
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
    tiny_model(tokenizer).save_pretrained(path, tokenizer)
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(path), "--images_root", str(coco_images), "--annotations",
                       str(karpathy_file), "--split", "test", *FAST])
    err = capsys.readouterr().err
    assert "records no image encoder, so it captions precomputed features only" in err and "Traceback" not in err


def test_max_length_follows_the_checkpoint(tmp_path, tokenizer, karpathy_file, coco_images, capsys):
    torch.manual_seed(0)
    encoder = ImageEncoder(EncoderConfig(name="test_resnet", weights="random", image_size=32)).eval()
    path = tmp_path / "short"
    tiny_model(tokenizer, encoder, n_positions=20).save_pretrained(path, tokenizer)  # prefix 4: 16 tokens at most
    common = ["--checkpoint", str(path), "--images_root", str(coco_images), "--annotations", str(karpathy_file),
              "--split", "test", "--beam_size", "2", "--device", "cpu", *FAST]
    evaluate.main(common)
    assert ("note: captions of at most 16 tokens instead of 67: the decoder has 20 positions, 4 of them for the "
            "prefix") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(common + ["--max_length", "17", "--out_dir", str(tmp_path / "refused")])
    assert ("evaluate.py: error: --max_length 17 does not fit this checkpoint: the decoder has 20 positions, 4 of "
            "them for the prefix, so a caption holds 1 to 16 tokens") in capsys.readouterr().err
