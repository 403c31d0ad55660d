"""Plain helpers the tests share: generated data (pickles, images, annotation files, a COCO-style tree), argument
lists for the scripts, tiny GPT-2s and captioners over the test tokenizer, and readers of a run's outputs.
The fixtures built from them are in conftest.py; tests import these with `from builders import ...`."""
import io
import json
import multiprocessing
import os
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from captioning.data.features import write_features
from captioning.training.datasets import CaptionCollator
from models import CaptionerConfig, ClipCaptionModel, EncoderConfig, ImageEncoder

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"

COLOURS = ["red", "green", "blue", "yellow", "black", "white"]
THINGS = ["dog", "cat", "man", "woman", "bus", "pizza", "horse", "table"]
PLACES = ["on a street", "in a field", "next to a tree", "on a table", "in the kitchen", "at the beach"]


def caption_corpus():
    """A few hundred COCO-like captions for training the test tokenizer."""
    out = []
    for colour in COLOURS:
        for thing in THINGS:
            for place in PLACES:
                article = "An" if colour[0] in "aeiou" else "A"
                out.append(f"{article} {colour} {thing} {place}.")
                out.append(f"There is a {thing} {place} , and it is {colour}!")
    return out


# ---- tiny models -----------------------------------------------------------------------------------------------

def tiny_gpt2(tokenizer, seed=0, **config) -> GPT2LMHeadModel:
    """A 2-layer, 32-wide GPT-2 over the test tokenizer; `config` overrides GPT2Config fields."""
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    return GPT2LMHeadModel(GPT2Config(**{**dict(n_layer=2, n_embd=32, n_head=4, n_positions=128,
                                                vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos),
                                         **config}))


# Tiny random decoders of each architecture the captioner supports: 2 layers, 32 wide, 128 positions.
DECODER_SIZES = {
    "gpt2": dict(n_layer=2, n_embd=32, n_head=4, n_positions=128),
    "llama": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=True),
    "qwen2": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=True),
    "gpt_neox": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=128, rotary_pct=0.5, tie_word_embeddings=False),
    "opt": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                max_position_embeddings=128),
}


def tiny_decoder(model_type: str, tokenizer, seed=0, **config):
    """A random causal LM of `model_type` (DECODER_SIZES) over `tokenizer`, stopping at its end token; a wide
    initialisation gives peaked distributions (no near-ties that float rounding could flip)."""
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    decoder_config = AutoConfig.for_model(model_type, **{
        **DECODER_SIZES[model_type], "vocab_size": len(tokenizer), "bos_token_id": bos, "eos_token_id": eos,
        "pad_token_id": eos, "initializer_range": 0.2, **config})
    return AutoModelForCausalLM.from_config(decoder_config).eval()


def llama_style_tokenizer():
    """A LLaMA-family tokenizer as they come: sentencepiece-style BPE with byte fallback (any character encodes),
    a BOS token it adds by default and no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    bpe.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Metaspace(replacement="\u2581", prepend_scheme="first")])
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe.train_from_iterator(caption_corpus(), trainers.BpeTrainer(vocab_size=700, special_tokens=special,
                                                                  min_frequency=1, show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    return LlamaTokenizer(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                          add_bos_token=True, add_eos_token=False)


def tiny_captioner(tokenizer, encoder=None, *, encoder_config=None, n_layer=2, n_positions=128,
                   **config) -> ClipCaptionModel:
    """A captioner to caption with: a transformer mapper (prefix 4) over normalised 96-dimensional features (or
    `encoder`'s) on a tiny GPT-2 with a wide initialisation (peaked distributions, no near-ties), stopping at the
    end of text or a full stop. `encoder`: an ImageEncoder held inside; `encoder_config`: an encoder recorded in
    the config only; `config` overrides CaptionerConfig fields (the grid feature type, say)."""
    gpt = tiny_gpt2(tokenizer, n_layer=n_layer, n_positions=n_positions, initializer_range=0.2)
    eos = tokenizer.eos_token_id
    config = CaptionerConfig(**{**dict(mapping_type="transformer", prefix_length=4, prefix_length_clip=4,
                                       num_layers=1, prefix_size=encoder.feature_dim if encoder else 96,
                                       normalize_prefix=True, encoder=encoder_config,
                                       eos_token_ids=[eos, tokenizer.convert_tokens_to_ids(".")]), **config})
    return ClipCaptionModel(config, gpt=gpt, encoder=encoder)


def memorized_captioner(decoder, tokenizer, features: torch.Tensor, captions: List[str], mapping_type="mlp",
                        steps=150) -> ClipCaptionModel:
    """A captioner on `decoder` trained until it gives caption i for features i: its next-token logits have wide
    margins (the learned token far above the others), so rounding the weights (int8) must not change a caption."""
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = CaptionerConfig(mapping_type=mapping_type, prefix_length=4, prefix_length_clip=4, num_layers=1,
                             prefix_size=features.shape[1], eos_token_ids=[eos])
    model = ClipCaptionModel(config, gpt=decoder).train()
    batch = CaptionCollator(eos)([(torch.tensor(tokenizer.encode(c, add_special_tokens=False) + [eos]), f)
                                  for c, f in zip(captions, features, strict=True)])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        model.loss(batch["tokens"], batch["inputs"], batch["mask"]).backward()
        optimizer.step()
    return model.eval()


def tiny_captioner_on(gpt2_dir, tokenizer, encoder=None, **config) -> ClipCaptionModel:
    """A captioner to train, built as train.py builds one: a transformer mapper (prefix 4, from 3 tokens: unlike
    the prefix length, so that a mix-up of the two shows) over 16-dimensional features (or `encoder`'s) on the
    GPT-2 saved in `gpt2_dir`; `config` overrides CaptionerConfig fields."""
    torch.manual_seed(0)
    config = CaptionerConfig(**{**dict(mapping_type="transformer", prefix_length=4, prefix_length_clip=3,
                                       num_layers=1, prefix_size=encoder.feature_dim if encoder else 16,
                                       gpt2=str(gpt2_dir), eos_token_ids=[tokenizer.eos_token_id]), **config})
    return ClipCaptionModel.create(config, encoder=encoder)


# ---- predict.py ------------------------------------------------------------------------------------------------

SHORT = dict(max_length=10)  # tiny random models rarely stop early; short captions keep the tests fast


def write_predict_images(folder: Path) -> Path:
    """RGB JPEG and grayscale PNG with COCO-like numbers, an RGBA PNG without a number, a broken JPEG and a text
    file."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / "COCO_val2014_000000000042.jpg")
    Image.fromarray(rng.integers(0, 255, (36, 36), dtype=np.uint8)).save(folder / "000000000007.png")
    Image.fromarray(rng.integers(0, 255, (30, 44, 4), dtype=np.uint8)).save(folder / "cat.png")
    (folder / "broken.jpg").write_bytes(b"this is not a picture")
    (folder / "notes.txt").write_text("not an image")
    return folder


def good_images(images):
    """The readable images of `write_predict_images`."""
    return [images / "COCO_val2014_000000000042.jpg", images / "000000000007.png", images / "cat.png"]


# ---- evaluate.py -----------------------------------------------------------------------------------------------

FAST_METRICS = ["--metrics", "BLEU", "CIDEr"]  # METEOR and SPICE start a JVM for seconds
REFERENCES = {
    1: ["A man riding a brown horse on a beach.", "A person rides a horse along the shore.",
        "Man on horseback at the beach", "A rider and his horse near the ocean.", "A horse carrying a man by the sea."],
    2: ["Two dogs playing with a frisbee in the grass.", "Dogs chase a frisbee on a lawn.",
        "Two puppies play in a green field.", "A pair of dogs running on grass.", "Two dogs fight over a toy."],
    3: ["A pizza with cheese and tomatoes on a table.", "A large pizza sitting on a wooden table.",
        "A cheese pizza is on the table.", "Pizza on a plate on a dining table.", "A freshly baked pizza."],
    4: ["A red bus driving down a city street.", "A double decker bus on the road.",
        "A red bus in traffic.", "A city bus stopped at a light.", "The bus is driving through town."],
    5: ["A cat sleeping on a laptop keyboard.", "A cat lying on a computer.", "A kitten naps on a laptop.",
        "A cat curled up on the keyboard.", "A grey cat resting on a notebook computer."],
    6: ["A woman holding an umbrella in the rain.", "A lady walks with an umbrella.",
        "A person with a black umbrella on a wet street.", "Woman under an umbrella.", "A woman in the rain."],
}
PREDICTIONS = {1: "A man riding a horse on the beach.", 2: "Two dogs playing with a frisbee.",
               3: "A pizza sitting on top of a table.", 4: "A red bus driving down the street.",
               5: "A cat laying on a laptop computer.", 6: "A woman walking with an umbrella."}
# Karpathy-style ids: 6 test images (ids 1-6 with the references above), 2 val, 2 train, 1 restval.
SPLITS = {**{i: "test" for i in range(1, 7)}, 7: "val", 8: "val", 9: "train", 10: "train", 11: "restval"}


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def refs_of(image_id):
    return REFERENCES.get(image_id, [f"A photo number {image_id}.", "Some picture."])


def write_karpathy_file(path: Path) -> Path:
    """A dataset_coco.json of the SPLITS images with their references."""
    images = [{"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": i, "split": split,
               "sentences": [{"raw": c, "sentid": 10 * i + j} for j, c in enumerate(refs_of(i))]}
              for i, split in SPLITS.items()]
    return write_json(path, {"images": images, "dataset": "coco"})


def write_coco_images(root: Path) -> Path:
    """root/val2014 with an image for each of the SPLITS ids; its width is the id + 10."""
    (root / "val2014").mkdir(parents=True)
    for image_id in SPLITS:
        Image.new("RGB", (10 + image_id, 12), (image_id * 20, 0, 0)).save(
            root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
    return root


# ---- parse_coco.py ---------------------------------------------------------------------------------------------

GOOD = 12  # readable images 1..12, in several modes and folders
BAD = {13: "missing", 14: "truncated", 15: "unreadable", 16: "too_large"}


def coco_name(image_id: int) -> str:
    if image_id % 3 == 0:
        return f"val2014/COCO_val2014_{image_id:012d}.jpg"
    if image_id % 5 == 0:
        return f"train2017/{image_id:012d}.jpg"
    return f"train2014/COCO_train2014_{image_id:012d}.jpg"


def make_image(image_id: int, rng) -> Image.Image:
    pixels = rng.integers(0, 255, (40 + image_id, 56, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    mode = {2: "L", 4: "CMYK", 7: "RGBA", 8: "P", 11: "I;16"}.get(image_id)
    if mode == "I;16":
        return Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    return image.convert(mode) if mode else image


def bomb_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def make_coco_tree(root: Path) -> Path:
    """COCO-style images under root/ (GOOD readable ones, then the BAD ones), a train_caption.json with 3-5
    captions per image and two bad entries, the same without them as clean.json, and an encoder file."""
    rng = np.random.default_rng(0)
    for image_id in range(1, GOOD + 1):
        path = root / coco_name(image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        image = make_image(image_id, rng)
        # Formats by content, not extension, as in real data sets: PIL reads a PNG named .jpg.
        image.save(path, format="JPEG" if image.mode in ("RGB", "L", "CMYK") else "PNG")
    good_jpeg = (root / coco_name(1)).read_bytes()
    (root / coco_name(14)).write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (root / coco_name(15)).write_bytes(b"this is not an image")
    (root / coco_name(16)).write_bytes(bomb_bytes())
    entries = [{"image_id": image_id, "id": 100 * image_id + k, "caption": f"image {image_id} caption {k}"}
               for k in range(5) for image_id in range(1, GOOD + len(BAD) + 1) if k < 3 + image_id % 3]
    (root / "clean.json").write_text(json.dumps(entries))
    bad_entries = [{"id": 999, "caption": "an entry without image_id"}, {"image_id": 1, "id": 998, "caption": " "}]
    (root / "train_caption.json").write_text(json.dumps(entries[:10] + bad_entries + entries[10:]))
    torch.manual_seed(0)
    encoder = ImageEncoder(EncoderConfig(name="test_resnet", weights="random", image_size=48))
    torch.save(encoder.model.state_dict(), root / "encoder.pth")
    return root


KILL_SCRIPT = """
import os, signal
import parse_coco
from captioning import extraction
original, calls = extraction.LogWriter.append, []
def append(self, indices, features):
    calls.append(indices)
    if len(calls) == {batches} + 1:
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, indices, features)
extraction.LogWriter.append = append
parse_coco.main({argv!r})
"""


def kill_after_batches(argv, batches: int, log: Path) -> None:
    """parse_coco.py `argv` in a subprocess killed with SIGKILL as it finishes batch `batches` + 1 (so `batches`
    are saved); its output goes to `log` (a file, not a pipe: an orphaned loader worker would hold a pipe)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT.format(argv=list(map(str, argv)), batches=batches)],
                              env=env, stdout=f, stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode == -signal.SIGKILL, log.read_text()


def _rank(rank, argv, port, messages):
    """One torchrun-like process of parse_coco.py: the environment torchrun sets, then main; reports the batches
    it encoded."""
    import parse_coco
    from captioning import featurize

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    extract = featurize.extract

    def reporting_extract(records, encoder, directory, batches, **kwargs):
        messages.put((rank, batches))
        return extract(records, encoder, directory, batches, **kwargs)
    featurize.extract = reporting_extract
    try:
        parse_coco.main(argv)
    except BaseException as e:  # reported to the parent, which fails the test
        messages.put((rank, repr(e)))
        raise


def run_two_ranks(argv) -> dict:
    """parse_coco.py `argv` in two gloo processes (forked: no second import of torch); {rank: its batches}."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("fork")
    messages = context.Queue()
    procs = [context.Process(target=_rank, args=(rank, list(map(str, argv)), port, messages)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    reports = dict(messages.get(timeout=1) for _ in range(2))
    assert [p.exitcode for p in procs] == [0, 0], reports
    return reports


def parse_coco_args(tree, out, *extra, annotations="train_caption.json"):
    return ["--encoder", "test_resnet", "--encoder_weights", str(tree / "encoder.pth"), "--image_size", "48",
            "--annotations", str(tree / annotations), "--images_root", str(tree), "--out_path", str(out),
            "--device", "cpu", "--num_workers", "0", *extra]


# ---- webdataset shards ---------------------------------------------------------------------------------------

def image_bytes(image_id: int, rng) -> bytes:
    """A JPEG (even ids) or PNG (odd ids) of a size that varies with the id."""
    pixels = rng.integers(0, 255, (30 + image_id % 7, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG" if image_id % 2 == 0 else "PNG")
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root: Path, n_images=10, per_shard=4, seed=0) -> List[Path]:
    """img2dataset-style shards root/0000N.tar (KEY.jpg|png, KEY.txt, KEY.json with caption, key, url, status;
    keys 00000IIII) and the same images as files under root/folder with a COCO captions file (image ids = the
    keys' integers): two views of one dataset."""
    rng = np.random.default_rng(seed)
    folder = root / "folder"
    folder.mkdir(parents=True)
    images, annotations, shards = [], [], []
    for start in range(0, n_images, per_shard):
        shards.append(root / f"{start // per_shard:05d}.tar")
        with tarfile.open(shards[-1], "w") as tar:
            for i in range(start, min(start + per_shard, n_images)):
                key, ext = f"{start // per_shard:05d}{i:04d}", "jpg" if i % 2 == 0 else "png"
                data, caption = image_bytes(i, rng), f"A {COLOURS[i % len(COLOURS)]} {THINGS[i % len(THINGS)]}."
                add_member(tar, f"{key}.{ext}", data)
                add_member(tar, f"{key}.txt", caption.encode())
                add_member(tar, f"{key}.json", json.dumps({"caption": caption, "key": key, "status": "success",
                                                           "url": f"https://example.com/{key}.{ext}"}).encode())
                (folder / f"{key}.{ext}").write_bytes(data)
                images.append({"id": int(key), "file_name": f"{key}.{ext}"})
                annotations.append({"id": i, "image_id": int(key), "caption": caption})
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return shards


# ---- train.py --------------------------------------------------------------------------------------------------

ENCODER_META = EncoderConfig(name="tiny_vit_21m_224", weights="pretrained",
                             data_config={"input_size": [3, 224, 224]}).to_dict()


def captions_for(n_images, per_image=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_images):
        colour, thing = COLOURS[i % len(COLOURS)], THINGS[(i * 5) % len(THINGS)]
        for _ in range(per_image):
            out.append((i, f"A {colour} {thing} {PLACES[rng.integers(len(PLACES))]}."))
    return out


def make_pickle(path, n_images=8, per_image=3, dim=16, grid_tokens=None, seed=0, metadata=True):
    """A features pickle of random features and generated captions, recording a TinyViT encoder unless
    `metadata` is False."""
    torch.manual_seed(seed)
    shape = (n_images, grid_tokens, dim) if grid_tokens else (n_images, dim)
    entries = [{"image_id": i, "caption": c, "clip_embedding": i} for i, c in captions_for(n_images, per_image, seed)]
    meta = {"encoder": dict(ENCODER_META, feature_type="grid" if grid_tokens else "pooled")} if metadata else {}
    write_features(path, torch.randn(*shape), entries, meta)
    return path


def make_images(root, n=6, size=40):
    """`n` PNG images under root/ with 2 captions each in root/captions.json (COCO format); returns its path."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(n):
        pixels = np.full((size, size, 3), 255 * np.eye(3)[i % 3], dtype=np.uint8)
        pixels[rng.integers(0, size // 2):, : size // 2] = 0
        Image.fromarray(pixels).save(root / f"img{i}.png")
        images.append({"id": i, "file_name": f"img{i}.png"})
        annotations += [{"id": 10 * i + k, "image_id": i, "caption": c} for k, (_, c) in
                        enumerate(captions_for(1, 2, seed=i))]
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root / "captions.json"


def train_args(data, out_dir, gpt2, *extra):
    """train.py's flags for a small, quick CPU run; `extra` flags come last and win."""
    return (["--data", str(data)] if data else []) + ["--out_dir", str(out_dir), "--gpt2", str(gpt2), "--bs", "4",
            "--mapping_type", "transformer", "--num_layers", "1", "--prefix_length", "4", "--prefix_length_clip",
            "4", "--warmup_steps", "0", "--lr", "1e-3", "--log_every", "1", "--device", "cpu", *map(str, extra)]


def weights(export_dir):
    return load_file(str(Path(export_dir) / "model.safetensors"))


def log_records(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "train_log.jsonl").read_text().splitlines()]


def interrupted_and_resumed(tmp_path, monkeypatch, args, stop_at: int = 3):
    """Train `args(out_dir)` whole into tmp_path/whole, then into tmp_path/stopped, stopped by a KeyboardInterrupt at
    optimizer step `stop_at` and resumed with --resume latest; returns both runs' latest export weights."""
    import train
    from captioning.training import loop

    train.main(args(tmp_path / "whole"))
    real_step, calls = loop.Stepper.__call__, []

    def interrupted(self, micro, step=0):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return real_step(self, micro, step)

    monkeypatch.setattr(loop.Stepper, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(tmp_path / "stopped"))
    monkeypatch.setattr(loop.Stepper, "__call__", real_step)
    train.main(args(tmp_path / "stopped") + ["--resume", "latest"])
    return weights(tmp_path / "whole" / "coco_prefix_latest"), weights(tmp_path / "stopped" / "coco_prefix_latest")


def resume_equals_uninterrupted(tmp_path, monkeypatch, args) -> None:
    """`interrupted_and_resumed`: the two latest exports must be equal, bit for bit."""
    a, b = interrupted_and_resumed(tmp_path, monkeypatch, args)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
