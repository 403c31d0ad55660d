"""Any causal LM as the decoder: tiny random GPT-2, LLaMA (grouped-query attention; a tokenizer with byte
fallback that adds BOS and has no pad token), Qwen2, GPT-NeoX and OPT decoders, saved with their tokenizers and
loaded back through the paths users take (`train.py --gpt2 DIR`, exports, the Captioner)."""
import json
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, GenerationConfig

import predict
import train
from builders import DECODER_SIZES, make_pickle, resume_equals_uninterrupted, train_args, weights
from captioning.inference import Captioner
from captioning.original_decoding import original_beam_search
from captioning.training.datasets import tokenize_captions
from models import kv_cache
from models.captioner import CaptionerConfig, ClipCaptionModel
from models.checkpoint_io import CheckpointError
from models.decoders import load_decoder, output_embeddings_key
from models.decoding import beam_search, greedy, prefill

pytestmark = pytest.mark.usefixtures("one_thread")
ARCHITECTURES = list(DECODER_SIZES)


@pytest.fixture(scope="module")
def decoders(decoder_dirs):
    return {model_type: load_decoder(str(path)) for model_type, path in decoder_dirs.items()}


@pytest.fixture(scope="module")
def prefix():
    torch.manual_seed(1)
    return torch.randn(3, 4, 32)  # (B, P, C)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return make_pickle(tmp_path_factory.mktemp("data") / "train.pkl", n_images=6, per_image=2, metadata=False)


def generate_greedy(decoder, prefix, stops, max_length):
    config = GenerationConfig(max_new_tokens=max_length, do_sample=False, eos_token_id=stops or None,
                              pad_token_id=stops[0] if stops else 0)
    own, decoder.generation_config = decoder.generation_config, GenerationConfig()  # no stop id of its own
    try:
        out = decoder.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                               generation_config=config)
    finally:
        decoder.generation_config = own
    rows = out.tolist()
    if not stops:
        return rows
    return [row[:next((i + 1 for i, t in enumerate(row) if t in stops), len(row))] for row in rows]


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_greedy_equals_generate_and_beam_search_equals_the_uncached_original(decoders, prefix, model_type):
    decoder = decoders[model_type]
    free = [rows[0] for rows in greedy(decoder, prefix, [], 12).sequences()]
    assert free == generate_greedy(decoder, prefix, [], 12)
    stops = [free[0][4], free[1][2]]  # tokens these captions meet: some end early, some run to max_length
    stopped = [rows[0] for rows in greedy(decoder, prefix, stops, 12).sequences()]
    assert stopped == generate_greedy(decoder, prefix, stops, 12) and stopped != free
    beams = beam_search(decoder, prefix, stops, 3, 10)
    for i, p in enumerate(prefix):
        sequences, scores = original_beam_search(decoder, p[None], stops, 3, 10)
        assert beams.sequences()[i] == sequences
        assert beams.scores[i].tolist() == pytest.approx(scores, abs=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox"])
def test_the_cache_adapter_and_the_public_cache_api_give_the_same_beams(decoders, prefix, model_type, monkeypatch):
    decoder = decoders[model_type]
    cache, _ = prefill(decoder, prefix)
    assert kv_cache.append_in_place(cache)  # this transformers' DynamicLayer is the layout the adapter patches
    patched = beam_search(decoder, prefix, [], 3, 30)  # 30 steps outgrow the first buffer
    monkeypatch.setattr(kv_cache, "patchable_layers", lambda cache: None)
    public = beam_search(decoder, prefix, [], 3, 30)
    assert patched.sequences() == public.sequences()
    assert torch.allclose(patched.scores, public.scores, atol=1e-6)


def test_a_caption_follows_the_prefix_without_bos_in_training_and_decoding(decoder_dirs):
    """The LLaMA tokenizer adds BOS by default; captions are tokenized without it and end with its end token,
    and a captioner trained on them writes them back exactly, starting right after the prefix."""
    tokenizer = AutoTokenizer.from_pretrained(str(decoder_dirs["llama"]))
    assert tokenizer.pad_token is None and tokenizer("a dog")["input_ids"][0] == tokenizer.bos_token_id
    captions = ["A red dog on a street.", "A blue cat in a field."]
    tokens = tokenize_captions(captions, tokenizer, progress=False)
    for i, caption in enumerate(captions):
        ids = tokens.get(i).tolist()
        assert ids == tokenizer(caption, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    torch.manual_seed(0)
    model = ClipCaptionModel.create(CaptionerConfig(mapping_type="mlp", prefix_length=2, prefix_size=8,
                                                    gpt2=str(decoder_dirs["llama"]),
                                                    eos_token_ids=[tokenizer.eos_token_id]))
    features = torch.eye(2, 8)
    batch = torch.nn.utils.rnn.pad_sequence([tokens.get(i) for i in range(2)], batch_first=True)
    mask = (torch.arange(batch.shape[1]) < torch.tensor([len(tokens.get(i)) for i in range(2)])[:, None]).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        model.loss(batch, features, mask).backward()
        optimizer.step()
    assert Captioner(model, tokenizer).caption(list(features), decoding="greedy", max_length=20) == captions


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_train_py_trains_exports_and_captions_with_each_architecture(tmp_path, decoder_dirs, features, model_type):
    source = shutil.copytree(decoder_dirs[model_type], tmp_path / "decoder")
    loaded = load_decoder(str(source))
    before = loaded.state_dict()  # names as this transformers has them (GPT-NeoX's head)
    tied = output_embeddings_key(loaded)  # not written twice
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    train.main(train_args(features, tmp_path / "full", source, "--max_steps", 2))
    train.main(train_args(features, tmp_path / "frozen", source, "--max_steps", 2, "--only_prefix"))
    shutil.rmtree(source)  # an export loads without the directory it was trained from
    for mode in ("full", "frozen"):
        export = tmp_path / mode / "coco_prefix_latest"
        config = json.loads((export / "config.json").read_text())
        assert config["decoder"]["model_type"] == model_type and config["format_version"] == 3
        decoder = weights(export)
        changed = [k for k, v in before.items() if f"gpt.{k}" in decoder and not torch.equal(decoder[f"gpt.{k}"], v)]
        assert (changed == []) == (mode == "frozen"), changed
        assert [k for k in before if f"gpt.{k}" not in decoder] == ([tied] if tied else [])
        model = ClipCaptionModel.from_pretrained(export)
        assert model.gpt.config.model_type == model_type
        assert model_type in ModelCard.load(export / "README.md").data.tags
    assert config["eos_token_ids"][0] == tokenizer.eos_token_id
    out = tmp_path / "captions.json"
    assert predict.main(["--checkpoint", str(tmp_path / "full" / "coco_prefix_latest"), "--features",
                         str(features), "--out", str(out), "--beam_size", "2", "--max_length", "6"]) == 0
    captions = json.loads(out.read_text())
    assert [c["image_id"] for c in captions] == list(range(6)) and all(isinstance(c["caption"], str) for c in captions)


def test_stop_ids_come_from_the_tokenizer_and_the_generation_config(tmp_path, decoder_dirs, features):
    source = tmp_path / "llama3_style"
    shutil.copytree(decoder_dirs["llama"], source)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    period = tokenizer.convert_tokens_to_ids(".")
    (source / "generation_config.json").write_text(json.dumps({"eos_token_id": [period, tokenizer.eos_token_id]}))
    train.main(train_args(features, tmp_path / "run", source, "--max_steps", 1, "--only_prefix"))
    config = json.loads((tmp_path / "run" / "coco_prefix_latest" / "config.json").read_text())
    assert config["eos_token_ids"] == [tokenizer.eos_token_id, period]  # the learned one first


def test_resume_with_a_llama_equals_an_uninterrupted_run(tmp_path, decoder_dirs, features, monkeypatch):
    resume_equals_uninterrupted(tmp_path, monkeypatch, lambda out: train_args(
        features, out, decoder_dirs["llama"], "--max_steps", 4, "--bs", 2, "--save_every_steps", 2))


def test_cider_optimisation_on_a_qwen2(tmp_path, decoder_dirs, features):
    train.main(train_args(features, tmp_path / "xe", decoder_dirs["qwen2"], "--max_steps", 2))
    summary = train.main(train_args(features, tmp_path / "scst", decoder_dirs["qwen2"], "--scst", "--init_from",
                                    tmp_path / "xe" / "coco_prefix_latest", "--scst_max_length", 6, "--max_steps", 1))
    assert summary["step"] == 1
    model = ClipCaptionModel.from_pretrained(tmp_path / "scst" / "coco_prefix_latest")
    assert model.gpt.config.model_type == "qwen2" and model.config.training["stage"] == "scst"


def test_a_non_causal_model_or_a_missing_weight_is_refused(tmp_path, decoder_dirs, features, tokenizer):
    """transformers only warns when a weight is missing (drawn at random) and builds a BERT as a causal LM with
    bidirectional attention; neither may train."""
    from transformers import BertConfig, BertModel
    bert = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                         vocab_size=len(tokenizer))).save_pretrained(bert)
    tokenizer.save_pretrained(bert)
    with pytest.raises(CheckpointError, match=rf"decoder {bert}: not a causal language model: its first positions "
                                              r"change with a later one"):
        train.main(train_args(features, tmp_path / "a", bert, "--max_steps", 1))
    broken = tmp_path / "broken"
    shutil.copytree(decoder_dirs["llama"], broken)
    state = load_file(broken / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"its weights do not all load \(missing keys: "
                                              r"\['model.layers.1.self_attn.k_proj.weight'\]\)"):
        train.main(train_args(features, tmp_path / "b", broken, "--max_steps", 1))
    assert not (tmp_path / "a" / "coco_prefix_latest").exists() and not (tmp_path / "b" / "coco_prefix_latest").exists()
