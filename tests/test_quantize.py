"""--quantize int8 (models/quantize.py): int8 weights reproduce fp32's captions on a model with wide margins, for
GPT-2 and LLaMA decoders; every supported architecture quantizes; int8 is made at load and never saved; a GPU or a
bad value is a clear error, raised before anything asks CUDA."""
import csv
import hashlib

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import evaluate
import predict
from builders import caption_corpus, llama_style_tokenizer, memorized_captioner, tiny_decoder, tiny_gpt2
from captioning import runtime
from captioning.data.features import write_features
from captioning.inference import Captioner
from models.decoding import beam_search, prefill
from models.quantize import conv1d_to_linear, is_quantized, quantize_int8, weight_count

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = [caption_corpus()[i] for i in (0, 17, 90, 203)]
SUPPORTED = ("gpt2", "llama", "qwen2", "gpt_neox")  # captioning/demo/recipe.py DECODER_SIZES


def float_linears(module: nn.Module):
    return [name for name, m in module.named_modules() if type(m) in (nn.Linear, Conv1D)]


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def memorized(request, tmp_path_factory, tokenizer):
    """(export, features, captions, a features pickle of them): a captioner that learned one caption per feature
    vector, an MLP mapper on a GPT-2 or a transformer mapper on a LLaMA (tied embeddings, its own tokenizer)."""
    own = tokenizer if request.param == "gpt2" else llama_style_tokenizer()
    torch.manual_seed(1)
    features = torch.randn(len(CAPTIONS), 16)
    mapping = "mlp" if request.param == "gpt2" else "transformer"
    model = memorized_captioner(tiny_decoder(request.param, own, initializer_range=0.02), own, features, CAPTIONS,
                                mapping_type=mapping)
    root = tmp_path_factory.mktemp(f"memorized_{request.param}")
    model.save_pretrained(root / "export", own)
    pickle = root / "features.pkl"
    write_features(pickle, features, [{"image_id": i, "caption": c, "clip_embedding": i}
                                      for i, c in enumerate(CAPTIONS)])
    return root / "export", features, CAPTIONS, pickle


def test_int8_gives_the_fp32_captions_on_wide_margins(memorized):
    export, features, captions, _ = memorized
    before = digest(export / "model.safetensors")
    fp32 = Captioner.from_pretrained(export)
    int8 = Captioner.from_pretrained(export, quantize="int8")
    assert (fp32.quantize, int8.quantize) == ("none", "int8")
    assert float_linears(int8.model.gpt) == [] and float_linears(int8.model.clip_project) == []
    assert is_quantized(int8.model.gpt.get_output_embeddings())
    # Tied output embeddings are quantized apart: the input lookup keeps the fp32 table.
    assert torch.equal(int8.model.gpt.get_input_embeddings().weight, fp32.model.gpt.get_input_embeddings().weight)
    for options in (dict(beam_size=3), dict(decoding="greedy")):
        assert fp32.caption(features, **options) == captions  # what it learned: the margins are wide
        assert int8.caption(features, **options) == captions
    fp32_scores = [r.scores[0] for r in fp32.predict(features, beam_size=3)]
    int8_scores = [r.scores[0] for r in int8.predict(features, beam_size=3)]
    assert int8_scores == pytest.approx(fp32_scores, abs=0.05)
    assert digest(export / "model.safetensors") == before  # made at load, the export untouched


def test_int8_is_made_at_load_and_never_saved(memorized, tmp_path):
    export, features, captions, _ = memorized
    int8 = Captioner.from_pretrained(export, quantize="int8")
    with pytest.raises(ValueError, match=r"exports do not store: int8 weights are made at load"):
        int8.model.save_pretrained(tmp_path / "int8", int8.tokenizer)
    assert not (tmp_path / "int8").exists()
    again = Captioner.from_pretrained(export, quantize="int8")  # quantizing at load again gives the same model
    assert again.caption(features, beam_size=3) == int8.caption(features, beam_size=3) == captions


def test_predict_quantize_int8_writes_the_fp32_captions(memorized, tmp_path, capsys):
    export, _, captions, pickle = memorized
    out = tmp_path / "captions.csv"
    assert predict.main(["--checkpoint", str(export), "--features", str(pickle), "--quantize", "int8",
                         "--beam_size", "3", "--out", str(out)]) == 0
    assert "int8 weights for the decoder and the mapper, fp32 around them" in capsys.readouterr().err
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [row["caption"] for row in rows] == captions


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_every_supported_decoder_quantizes(model_type, tokenizer):
    decoder = tiny_decoder(model_type, tokenizer)
    int8 = quantize_int8(tiny_decoder(model_type, tokenizer))
    assert float_linears(int8) == [] and is_quantized(int8.get_output_embeddings())
    assert weight_count(int8) == weight_count(decoder) == sum(p.numel() for p in decoder.parameters())
    prefix = torch.randn(2, 4, decoder.get_input_embeddings().embedding_dim)
    with torch.no_grad():
        expected, got = prefill(decoder, prefix)[1], prefill(int8, prefix)[1]
    assert torch.nn.functional.cosine_similarity(expected, got).min() > 0.99
    assert beam_search(int8, prefix, [tokenizer.eos_token_id], 3, 5).tokens.shape == (2, 3, 5)


def test_gpt2_conv1d_becomes_the_same_linear_product(tokenizer):
    gpt = tiny_gpt2(tokenizer).eval()
    tokens = torch.tensor([[5, 17, 33, 2]])
    with torch.no_grad():
        expected = gpt(tokens).logits
        assert conv1d_to_linear(gpt) == 2 * 4  # per layer: c_attn, attention c_proj, c_fc, MLP c_proj
        torch.testing.assert_close(gpt(tokens).logits, expected, atol=1e-5, rtol=0)
    assert float_linears(gpt) and not any(isinstance(m, Conv1D) for m in gpt.modules())


def test_int8_on_cuda_is_an_error_before_any_cuda_call(memorized, monkeypatch, capsys, karpathy_file, coco_images):
    export, _, _, pickle = memorized

    def cuda_call(*args, **kwargs):
        raise AssertionError("CUDA was asked")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name in ("is_bf16_supported", "set_device", "current_device", "get_device_properties", "_lazy_init"):
        monkeypatch.setattr(torch.cuda, name, cuda_call)
    message = "--quantize int8 runs on a CPU only"
    with pytest.raises(ValueError, match=message):
        Captioner.from_pretrained(export, device="cuda", quantize="int8")
    assert predict.main(["--checkpoint", str(export), "--features", str(pickle), "--device", "cuda",
                         "--quantize", "int8"]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--checkpoint", str(export), "--annotations", str(karpathy_file), "--split", "test",
                       "--images_root", str(coco_images), "--device", "cuda", "--quantize", "int8",
                       "--out_dir", str(coco_images / "eval")])
    assert exit_info.value.code == 1 and message in capsys.readouterr().err
    assert runtime.default_device("int8") == "cpu" and runtime.default_device() == "cuda"  # without --device: cpu


@pytest.mark.parametrize("script", [predict, evaluate])
def test_a_bad_quantize_value_names_the_flag_and_the_choices(script, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--checkpoint", str(tmp_path), "--image" if script is predict else "--annotations", "x",
                     "--quantize", "int4"])
    assert exit_info.value.code == 2
    assert "argument --quantize: invalid choice: 'int4' (choose from 'none', 'int8')" in capsys.readouterr().err


def test_the_api_refuses_a_bad_value_and_a_precision_int8_cannot_take(memorized):
    export = memorized[0]
    with pytest.raises(ValueError, match=r"--quantize 'int4': expected one of none, int8"):
        Captioner.from_pretrained(export, quantize="int4")
    with pytest.raises(ValueError, match=r"computes in fp32 around its int8 weights, so --precision bf16 does not "
                                         r"apply; give --precision auto or fp32"):
        Captioner.from_pretrained(export, quantize="int8", precision="bf16")
