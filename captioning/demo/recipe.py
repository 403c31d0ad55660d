"""The demo's recipe: a small timm convnet trained end to end with a 3-layer decoder (GPT-2 by default; LLaMA,
Qwen2 or GPT-NeoX of about the same size with --decoder_type) and a transformer mapper, sized
to learn colour, shape and position within minutes on 2 CPU cores (how it was chosen: docs/experiments.md); its
knobs, the step budgets and learning rates, are DemoConfig's (captioning/configs.py). The dataset, the decoder
built for it, and the TrainConfigs of both stages.
"""
import json
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoConfig, AutoModelForCausalLM, GPT2TokenizerFast

from captioning.configs import DemoConfig
from captioning.data import shapes
from captioning.data.annotations import AnnotationError, read_annotations
from captioning.training.config import TrainConfig

ENCODER = "test_resnet"
ENCODER_KWARGS = {"output_stride": 16}  # a 3x3 grid of tokens at 48x48
# The decoders of --decoder_type: 3 layers 128 wide, 64 positions, no dropout (they under-fit; dropout only slows
# them), each in its architecture's own layout at about the GPT-2's 0.65M parameters: the LLaMA and Qwen2 with
# grouped-query attention (2 key/value heads for 4) and a gated MLP of 384, the GPT-NeoX (Pythia) with rotary
# positions on a quarter of each head and untied output embeddings.
DECODER_SIZES = {
    "gpt2": dict(n_layer=3, n_embd=128, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                 activation_function="gelu_pytorch_tanh"),  # GPT-2's own GELU in one kernel: a step 1.12x faster
    "llama": dict(num_hidden_layers=3, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=384, max_position_embeddings=64, tie_word_embeddings=True),
    "qwen2": dict(num_hidden_layers=3, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=384, max_position_embeddings=64, tie_word_embeddings=True),
    "gpt_neox": dict(num_hidden_layers=3, hidden_size=128, num_attention_heads=4, intermediate_size=512,
                     max_position_embeddings=64, rotary_pct=0.25, tie_word_embeddings=False),
}
TOKENIZER_VOCAB = 400
# Token embeddings start at this standard deviation instead of the architectures' 0.02. Words that share every
# context (the shape names) otherwise collapse onto one vector within the first steps, and the gradient that would
# tell them apart, which flows through their difference, vanishes with it: the shapes waited on a loss plateau for
# 600 to over 1,400 steps depending on the seed. 0.05-0.1 ends it within about 600; 0.15 and more slow the whole
# start down (docs/experiments.md).
EMBEDDING_STD = 0.07
# CIDEr optimisation (demo.py --scst) starts from the whole cross-entropy recipe: after only 1,000 steps, shapes
# were unlearned on some datasets, and on others the stage reversed relations; the greedy baseline did best on the
# either-order dataset (docs/experiments.md).
SCST_BASELINE = "greedy"
ANNOTATION_FILES = ("captions_train.json", "captions_val.json", "captions_test.json")


def build_decoder(captions, directory: Path, seed: int, decoder_type: str = "gpt2",
                  frozen_embeddings: bool = False) -> Path:
    """A byte-level BPE tokenizer trained on the captions (the same for every decoder type) and a small randomly
    initialised decoder of `decoder_type`, saved where `--gpt2` can load them like `distilgpt2`. Its token
    embeddings are drawn at EMBEDDING_STD, unless `frozen_embeddings` (LoRA adapters train instead): embeddings
    that never learn cannot collapse, and the wider draw measured worse there (docs/demo.md)."""
    if decoder_type not in DECODER_SIZES:
        raise ValueError(f"decoder_type must be one of {sorted(DECODER_SIZES)}, got {decoder_type!r}")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(captions, vocab_size=TOKENIZER_VOCAB, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    torch.manual_seed(seed)
    end = tokenizer.eos_token_id
    # No pad token: LLaMA-family embeddings zero their padding row, which would tie the end token's logit to 0
    # (and, with the decoder frozen under --lora_r, keep it there); captions are padded and masked anyway.
    config = AutoConfig.for_model(decoder_type, vocab_size=len(tokenizer), bos_token_id=end, eos_token_id=end,
                                  **DECODER_SIZES[decoder_type])
    decoder = AutoModelForCausalLM.from_config(config)
    if not frozen_embeddings:
        tables = [decoder.get_input_embeddings().weight, decoder.get_output_embeddings().weight]
        with torch.no_grad():  # in this order, so that the same seed draws the same decoder; once where tied
            for weight in tables[:1] if tables[1] is tables[0] else tables:
                weight.normal_(0.0, EMBEDDING_STD)
    decoder.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def epochs_for(num_captions: int, config: DemoConfig, steps: int) -> int:
    """--epochs, or as many passes as `steps` optimizer steps take: the recipe is a step budget, so a larger
    dataset takes about as long as the default one and a smaller one is not under-trained."""
    if config.epochs is not None:
        return config.epochs
    return max(1, round(steps / max(1, num_captions // config.bs)))


def images_root(data: Path) -> Path:
    """The folder the annotations' file names are relative to: `data/images/`, as official COCO writes them
    (`"file_name": "000001.png"`), or `data/` (`"images/000001.png"`, as shapes_data.py writes them): the one
    holding every image. Neither is an error that says how many images each leaves missing."""
    names = [r.file_name for name in ANNOTATION_FILES if (data / name).exists()
             for r in read_annotations(data / name, images_root=data)]
    missing = {}
    for root in (data / "images", data):
        missing[root] = [n for n in names if not (root / n).is_file()]
        if not missing[root]:
            return root
    raise FileNotFoundError(f"{data}: the annotations' images are neither under {data / 'images'} ("
                            f"{len(missing[data / 'images'])} of {len(names)} missing, e.g. "
                            f"{missing[data / 'images'][0]!r}) nor under {data} ({len(missing[data])} missing)")


def train_config(data: Path, root: Path, gpt2_dir: Path, run_dir: Path, epochs: int, config: DemoConfig) -> TrainConfig:
    val = data / "captions_val.json"
    return TrainConfig(
        train_encoder=True, annotations=str(data / "captions_train.json"), images_root=str(root),
        val_annotations=str(val) if val.exists() else None, encoder=ENCODER, encoder_weights="random",
        encoder_kwargs=json.dumps(ENCODER_KWARGS), image_size=config.image_size, feature_type="grid",
        cache_images=True, channels_last=True, mapping_type="transformer", num_layers=2, prefix_length=8,
        prefix_length_clip=4, gpt2=str(gpt2_dir), out_dir=str(run_dir), prefix="demo", epochs=epochs, bs=config.bs,
        lr=config.lr, encoder_lr=config.encoder_lr, warmup_steps=100, precision=config.precision, seed=config.seed,
        device=config.device, threads=config.threads, dataset=shapes.NAME if is_shapes_dataset(data) else None,
        lora_r=config.lora_r)


def is_shapes_dataset(data: Path) -> bool:
    """Whether the dataset is the shapes generator's: its annotation files carry each image's scene."""
    try:
        return bool(shapes.read_scenes(data / "captions_train.json"))
    except AnnotationError:  # a CSV, a JSON list, Karpathy's file: not the generator's
        return False


def dataset(config: DemoConfig, out: Path) -> Path:
    """The dataset folder: --data, checked, or the shapes dataset generated into <out_dir>/shapes."""
    if config.data is None:
        return shapes.generate(out / "shapes", num_train=config.num_train, num_val=config.num_val,
                               num_test=config.num_test, seed=config.seed, size=config.image_size)
    data = Path(config.data)
    for needed in ("images", "captions_train.json", "captions_test.json"):
        if not (data / needed).exists():
            raise FileNotFoundError(f"{data}: {needed} is missing (expected images/, captions_train.json, "
                                    f"captions_test.json in official COCO format)")
    out.mkdir(parents=True, exist_ok=True)
    return data


def scst_config(data: Path, root: Path, num_images: int, export: Path, out_dir: Path,
                config: DemoConfig) -> TrainConfig:
    """CIDEr optimisation of the cross-entropy export, end to end (encoder included), on the same images."""
    val = data / "captions_val.json"
    images_per_epoch = max(1, num_images // config.bs)
    return TrainConfig(
        train_encoder=True, annotations=str(data / "captions_train.json"), images_root=str(root),
        val_annotations=str(val) if val.exists() else None, cache_images=True, channels_last=True,
        init_from=str(export), scst=True, scst_samples=config.scst_samples, scst_baseline=SCST_BASELINE,
        out_dir=str(out_dir), prefix="demo",
        epochs=max(1, round(config.scst_steps / images_per_epoch)), bs=config.bs, lr=config.scst_lr,
        encoder_lr=config.scst_lr, warmup_steps=0, precision=config.precision, seed=config.seed,
        device=config.device, threads=config.threads, dataset=shapes.NAME if is_shapes_dataset(data) else None,
        lora_r=config.lora_r)  # new adapters on the merged cross-entropy export
