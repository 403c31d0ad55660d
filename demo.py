"""The whole pipeline on a fresh machine, without pretrained weights or COCO: `make demo`.

Generates the synthetic shapes dataset (captioning/data/shapes.py), trains a byte-level BPE tokenizer on its
captions, builds a small GPT-2, trains a small timm encoder end to end with the mapper and the decoder (train.py
--train_encoder), captions the test split (the Captioner), scores it (evaluate.py) and checks each caption's colours,
shapes and positions against the scene. Any folder holding `images/`, `captions_train.json` and `captions_test.json` in
official COCO format (`captions_val.json` optional) runs through the same recipe with `--data DIR`.

    python demo.py                          # generate ./data/shapes, train, caption, evaluate
    python demo.py --data path/to/dataset   # the same recipe on another dataset in COCO format
"""
import argparse
import collections
import json
import shutil
import sys
import time
from pathlib import Path

from captioning.cli import (COUNT, POSITIVE, SEED, add_precision_argument, add_thread_arguments, device_name,
                            integer, number)

# The recipe: a small timm convnet trained end to end with a 3-layer GPT-2 and a transformer mapper, sized to learn
# colour, shape and position within minutes on 2 CPU cores (how it was chosen: the README's demo section).
ENCODER = "test_resnet"
ENCODER_KWARGS = {"output_stride": 16}  # a 3x3 grid of tokens at 48x48
IMAGE_SIZE = 48
GPT2_SIZES = dict(n_layer=3, n_embd=128, n_head=4, n_positions=64,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # it under-fits; dropout only slows it
TOKENIZER_VOCAB = 400
ANNOTATION_FILES = ("captions_train.json", "captions_val.json", "captions_test.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None,
                   help="dataset folder (images/, captions_train.json, captions_test.json, captions_val.json "
                        "optional); default: generate the shapes dataset into <out_dir>/shapes")
    p.add_argument("--out_dir", default="./runs/demo", help="dataset, decoder, checkpoints, predictions, metrics")
    p.add_argument("--num_train", type=POSITIVE, default=2000)
    p.add_argument("--num_val", type=COUNT, default=100)
    p.add_argument("--num_test", type=POSITIVE, default=300)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--image_size", type=integer(16), default=IMAGE_SIZE,
                   help="pixels per side of the generated images and of the encoder's input")
    p.add_argument("--steps", type=POSITIVE, default=1500,
                   help="optimizer steps to train for, rounded to whole epochs (2.5-5 minutes on 2 CPU cores in fp32)")
    p.add_argument("--epochs", type=POSITIVE, default=None,
                   help="passes over the training captions (overrides --steps)")
    p.add_argument("--bs", type=POSITIVE, default=64)
    p.add_argument("--lr", type=number(0, low_open=True), default=2e-3)
    p.add_argument("--encoder_lr", type=number(0, low_open=True), default=1e-2, help="the encoder's learning rate")
    add_precision_argument(p, aliases=["--amp"], what="precision of training and captioning")
    add_thread_arguments(p, workers=False)
    p.add_argument("--beam_size", type=POSITIVE, default=3)
    p.add_argument("--device", type=device_name, default="cpu")
    return p.parse_args(argv)


if __name__ == "__main__":  # --help and flag errors answer before the heavy imports below (seconds)
    parse_args()

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

import evaluate
from captioning.data import shapes
import train
from captioning.data.annotations import read_annotations
from captioning import runtime
from captioning.outputs import OutputError, check_output_dir
from captioning.metrics import score_captions
from models.decoding import DecodingOptions
from captioning.inference import Captioner
from predict import write_json
from captioning.data.shapes import parse_caption, same_scene_facts, scene_from_dict


def build_decoder(captions, directory: Path, seed: int) -> Path:
    """A byte-level BPE tokenizer trained on the captions and a small randomly initialised GPT-2, saved where
    `--gpt2` can load them like `distilgpt2`."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(captions, vocab_size=TOKENIZER_VOCAB, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, **GPT2_SIZES)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def epochs_for(num_captions: int, args) -> int:
    """--epochs, or as many passes as --steps optimizer steps take: the recipe is a step budget, so a larger
    dataset takes about as long as the default one and a smaller one is not under-trained."""
    if args.epochs is not None:
        return args.epochs
    return max(1, round(args.steps / max(1, num_captions // args.bs)))


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


def train_args(data: Path, root: Path, gpt2_dir: Path, run_dir: Path, epochs: int, args) -> list:
    val = data / "captions_val.json"
    return ["--train_encoder", "--annotations", str(data / "captions_train.json"), "--images_root", str(root),
            *(["--val_annotations", str(val)] if val.exists() else []),
            "--encoder", ENCODER, "--encoder_weights", "random", "--encoder_kwargs", json.dumps(ENCODER_KWARGS),
            "--image_size", str(args.image_size), "--feature_type", "grid", "--cache_images", "--channels_last",
            "--mapping_type", "transformer", "--num_layers", "2", "--prefix_length", "8",
            "--prefix_length_clip", "4", "--gpt2", str(gpt2_dir), "--out_dir", str(run_dir), "--prefix", "demo",
            "--epochs", str(epochs), "--bs", str(args.bs), "--lr", str(args.lr),
            "--encoder_lr", str(args.encoder_lr),
            "--warmup_steps", "100", "--precision", args.precision, "--seed", str(args.seed), "--device", args.device,
            *(["--threads", str(args.threads)] if args.threads else [])]


def ground_truth(data: Path, records):
    """The scene of each test image: the generator's `scene` when the annotation file has it, else the scene its
    reference captions describe (datasets made elsewhere; the first reference that parses). Images whose scene
    is unknown are left out of the accuracy, and the caller says how many."""
    raw = json.loads((data / "captions_test.json").read_text())
    scenes = {im["id"]: scene_from_dict(im["scene"]) for im in raw["images"] if "scene" in im}
    for record in records:
        if record.image_id not in scenes:
            parsed = next((s for s in map(parse_caption, record.captions) if s is not None), None)
            if parsed is not None:
                scenes[record.image_id] = parsed
    return scenes


def accuracy(predictions, scenes):
    """Percent of captions right on each fact, over the images with a known scene (None when there are none)."""
    totals, known = collections.Counter(), [i for i in predictions if i in scenes]
    for image_id in known:
        facts = same_scene_facts(parse_caption(predictions[image_id]), scenes[image_id])
        totals.update({k: int(v) for k, v in facts.items()})
    return {k: 100.0 * totals[k] / len(known) if known else None for k in ("colour", "shape", "position")}


def write_grid(path: Path, records, predictions, count: int = 12) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    shown = records[:count]
    cols = 4
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, record in zip(axes.flat, shown):
        ax.imshow(Image.open(record.path).convert("RGB"))
        ax.set_title(f"model: {predictions[record.image_id]}\nreference: {record.captions[0]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = check_output_dir(args.out_dir, "--out_dir")
    stage_seconds, start = {}, time.time()

    def stage(name):
        stage_seconds[name] = round(time.time() - start - sum(stage_seconds.values()), 1)

    if args.data:
        data = Path(args.data)
        for needed in ("images", "captions_train.json", "captions_test.json"):
            if not (data / needed).exists():
                raise FileNotFoundError(f"{data}: {needed} is missing (expected images/, captions_train.json, "
                                        f"captions_test.json in official COCO format)")
        out.mkdir(parents=True, exist_ok=True)
    else:
        data = shapes.generate(out / "shapes", num_train=args.num_train, num_val=args.num_val,
                                    num_test=args.num_test, seed=args.seed, size=args.image_size)
    stage("data")
    root = images_root(data)
    train_records = read_annotations(data / "captions_train.json", images_root=root)
    test_records = read_annotations(data / "captions_test.json", images_root=root)
    train_captions = [c for r in train_records for c in r.captions]
    gpt2_dir = build_decoder(train_captions, out / "decoder", args.seed)
    stage("tokenizer")

    run_dir = out / "run"
    if run_dir.exists():  # the demo's own output: each run trains afresh instead of refusing to overwrite it
        print(f"note: replacing the previous demo run in {run_dir}")
        shutil.rmtree(run_dir)
    train.main(train_args(data, root, gpt2_dir, run_dir, epochs_for(len(train_captions), args), args))
    stage("train")

    captioner = Captioner.from_pretrained(run_dir / "demo_latest", device=args.device, precision=args.precision)
    with runtime.thread_budget(runtime.plan_threads(args.device, loads_images=False, threads=args.threads)):
        results = captioner.predict([r.path for r in test_records],
                                    DecodingOptions(beam_size=args.beam_size, max_length=40), batch_size=64,
                                    progress=True)
    failed = [r for r in results if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} test images could not be captioned, e.g. {failed[0].error}")
    predictions = {rec.image_id: res.caption for rec, res in zip(test_records, results)}
    write_json(out / "test_predictions.json", results, [r.image_id for r in test_records], 1)
    stage("caption")

    report = evaluate.main(["--predictions", str(out / "test_predictions.json"), "--annotations",
                            str(data / "captions_test.json"), "--images_root", str(root),
                            "--out_dir", str(out / "eval")])
    cider = report["metrics"]["CIDEr"]
    most_frequent = collections.Counter(train_captions).most_common(1)[0][0]
    references = {r.image_id: r.captions for r in test_records}
    baseline = score_captions({i: most_frequent for i in references}, references, metrics=("CIDEr",))
    baseline_cider = baseline["metrics"]["CIDEr"]
    scenes = ground_truth(data, test_records)
    acc = accuracy(predictions, scenes)
    write_grid(out / "test_captions.png", test_records, predictions)
    stage("evaluate")

    print(f"\nCIDEr {cider:.1f}, against {baseline_cider:.1f} for always answering the most frequent training "
          f"caption ({most_frequent!r})")
    unknown = sum(1 for i in predictions if i not in scenes)
    if unknown:
        print(f"note: {unknown} of {len(predictions)} test images have no 'scene' and no reference caption in the "
              f"shapes grammar; they are left out of the caption accuracy")
    if unknown < len(predictions):
        print(f"caption accuracy on {len(predictions) - unknown} test images: colour {acc['colour']:.1f}%, "
              f"shape {acc['shape']:.1f}%, position/relation {acc['position']:.1f}%")
    for record in test_records[:5]:
        print(f"  {record.file_name}: {predictions[record.image_id]!r} (reference: {record.captions[0]!r})")
    print(f"stages (s): {stage_seconds}; grid of test images with captions: {out / 'test_captions.png'}")
    seconds = round(time.time() - start, 1)
    result = {"accuracy": acc, "cider": cider, "baseline_cider": baseline_cider, "seconds": seconds,
              "stages": stage_seconds}
    print(result_line(result))
    return result


def result_line(result: dict, extra: str = "") -> str:
    """The figures as one line a script can read; an accuracy that could not be measured is `nan`."""
    figures = " ".join(f"{k}_acc={'nan' if v is None else f'{v:.1f}'}" for k, v in result["accuracy"].items())
    return (f"RESULT {figures} cider={result['cider']:.1f} baseline_cider={result['baseline_cider']:.1f} "
            f"seconds={result['seconds']}{extra}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, RuntimeError, OutputError) as error:
        sys.exit(f"error: {error}")
