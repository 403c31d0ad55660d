"""The whole pipeline on a shapes dataset (demo.py, `make demo`): data, decoder, training, captions, scores.

Generates the synthetic shapes dataset (captioning/data/shapes.py) unless given one, trains a byte-level BPE
tokenizer on its captions, builds a small GPT-2, trains a small timm encoder end to end with the mapper and the
decoder (captioning.training), captions the test split (the Captioner), scores it (captioning.evaluation) and
checks each caption's colours, shapes and positions against the scene.
"""
import collections
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from captioning import runtime
from captioning.data import shapes
from captioning.data.annotations import AnnotationError, read_annotations
from captioning.data.results import read_results
from captioning.data.shapes import parse_caption, same_scene_facts
from captioning.evaluation import EvaluateConfig, evaluate
from captioning.inference import Captioner
from captioning.metrics import score_captions
from captioning.outputs import check_output_dir
from captioning.prediction import write_json
from captioning.training.config import TrainConfig
from captioning.training.runner import train
from models.decoding import DecodingOptions

# The recipe: a small timm convnet trained end to end with a 3-layer GPT-2 and a transformer mapper, sized to learn
# colour, shape and position within minutes on 2 CPU cores (how it was chosen: the README's demo section).
ENCODER = "test_resnet"
ENCODER_KWARGS = {"output_stride": 16}  # a 3x3 grid of tokens at 48x48
IMAGE_SIZE = 48
GPT2_SIZES = dict(n_layer=3, n_embd=128, n_head=4, n_positions=64,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # it under-fits; dropout only slows it
TOKENIZER_VOCAB = 400
XE_STEPS = 1500
# CIDEr optimisation (demo.py --scst) starts from the whole cross-entropy recipe: after only 1,000 steps, shapes
# were unlearned on some datasets, and on others the stage reversed relations. The greedy baseline and this
# learning rate did best on the either-order dataset (both in the README's CIDEr optimisation section).
SCST_STEPS = 90
SCST_LR = 1e-3
SCST_BASELINE = "greedy"
ANNOTATION_FILES = ("captions_train.json", "captions_val.json", "captions_test.json")


@dataclass
class DemoConfig:
    """demo.py's flags."""
    data: Optional[str] = None  # a dataset folder; None: generate the shapes dataset into <out_dir>/shapes
    out_dir: str = "./runs/demo"
    num_train: int = 2000
    num_val: int = 100
    num_test: int = 300
    seed: int = 0
    image_size: int = IMAGE_SIZE  # of the generated images and of the encoder's input
    steps: int = XE_STEPS  # cross-entropy steps, rounded to whole epochs
    epochs: Optional[int] = None  # overrides steps
    bs: int = 64
    lr: float = 2e-3
    encoder_lr: float = 1e-2
    precision: str = "auto"
    threads: Optional[int] = None
    beam_size: int = 3
    device: str = "cpu"
    scst: bool = False  # CIDEr optimisation after cross-entropy
    scst_steps: int = SCST_STEPS
    scst_lr: float = SCST_LR
    scst_samples: int = 5


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
        device=config.device, threads=config.threads, dataset=shapes.NAME if is_shapes_dataset(data) else None)


def is_shapes_dataset(data: Path) -> bool:
    """Whether the dataset is the shapes generator's: its annotation files carry each image's scene."""
    try:
        return bool(shapes.read_scenes(data / "captions_train.json"))
    except AnnotationError:  # a CSV, a JSON list, Karpathy's file: not the generator's
        return False


def ground_truth(data: Path, records) -> Dict:
    """The scene of each test image: the generator's `scene` when the annotation file has it, else the scene its
    reference captions describe (datasets made elsewhere; the first reference that parses). Images whose scene
    is unknown are left out of the accuracy, and the caller says how many."""
    scenes = shapes.read_scenes(data / "captions_test.json")
    for record in records:
        if record.image_id not in scenes:
            parsed = next((s for s in map(parse_caption, record.captions) if s is not None), None)
            if parsed is not None:
                scenes[record.image_id] = parsed
    return scenes


def accuracy(predictions, scenes) -> Dict[str, Optional[float]]:
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


class Stages:
    """Seconds spent in each stage of the run, in order."""

    def __init__(self):
        self.start, self.seconds = time.time(), {}

    def done(self, name: str) -> None:
        self.seconds[name] = round(time.time() - self.start - sum(self.seconds.values()), 1)


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


def caption_test_split(export: Path, records, config: DemoConfig) -> List:
    captioner = Captioner.from_pretrained(export, device=config.device, precision=config.precision)
    with runtime.thread_budget(runtime.plan_threads(config.device, loads_images=False, threads=config.threads)):
        results = captioner.predict([r.path for r in records], DecodingOptions(beam_size=config.beam_size,
                                                                               max_length=40),
                                    batch_size=64, progress=True)
    failed = [r for r in results if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} test images could not be captioned, e.g. {failed[0].error}")
    return results


class Run:
    """What every stage of one demo run shares: the dataset, its records, the decoder and the output folder."""

    def __init__(self, config: DemoConfig, out: Path, data: Path):
        self.config, self.out, self.data = config, out, data
        self.root = images_root(data)
        self.train_records = read_annotations(data / "captions_train.json", images_root=self.root)
        self.test_records = read_annotations(data / "captions_test.json", images_root=self.root)
        self.train_captions = [c for r in self.train_records for c in r.captions]
        self.scenes = ground_truth(data, self.test_records)

    def fresh(self, name: str) -> Path:
        run_dir = self.out / name
        if run_dir.exists():  # the demo's own output: each run trains afresh instead of refusing to overwrite it
            print(f"note: replacing the previous demo run in {run_dir}")
            shutil.rmtree(run_dir)
        return run_dir

    def caption(self, export: Path, name: str = "") -> Path:
        """Caption the test split with `export` into test_predictions[_name].json."""
        results = caption_test_split(export, self.test_records, self.config)
        path = self.out / f"test_predictions{'_' + name if name else ''}.json"
        write_json(path, results, [r.image_id for r in self.test_records], 1)
        return path

    def score(self, predictions_file: Path, name: str = "") -> Dict:
        """The accuracy per fact and CIDEr of a predictions file (its report in eval[_name]/); `predictions`
        holds the captions."""
        report = evaluate(EvaluateConfig(annotations=str(self.data / "captions_test.json"),
                                         predictions=str(predictions_file), images_root=str(self.root),
                                         out_dir=str(self.out / f"eval{'_' + name if name else ''}")))
        predictions = {p.image_id: p.caption for p in read_results(predictions_file)}
        return {"accuracy": accuracy(predictions, self.scenes), "cider": report["metrics"]["CIDEr"],
                "predictions": predictions}


def run_demo(config: DemoConfig) -> Dict:
    """Run the pipeline; returns the accuracy per fact, CIDEr, the baseline's CIDEr and the seconds per stage
    (with --scst, the figures after CIDEr optimisation, and those of cross-entropy alone under "cross_entropy")."""
    out = check_output_dir(config.out_dir, "--out_dir")
    stages = Stages()
    run = Run(config, out, dataset(config, out))
    stages.done("data")
    gpt2_dir = build_decoder(run.train_captions, out / "decoder", config.seed)
    stages.done("tokenizer")

    run_dir = run.fresh("run")
    train(train_config(run.data, run.root, gpt2_dir, run_dir,
                       epochs_for(len(run.train_captions), config, config.steps), config))
    stages.done("train")
    if config.scst:
        scst_dir = run.fresh("run_scst")
        train(scst_config(run, run_dir / "demo_latest", scst_dir))
        stages.done("scst")

    xe_name = "cross_entropy" if config.scst else ""
    files = {xe_name: run.caption(run_dir / "demo_latest", xe_name)}
    if config.scst:
        files[""] = run.caption(scst_dir / "demo_latest")
    stages.done("caption")
    xe = run.score(files[xe_name], xe_name)
    result = run.score(files[""]) if config.scst else xe
    most_frequent = collections.Counter(run.train_captions).most_common(1)[0][0]
    references = {r.image_id: r.captions for r in run.test_records}
    baseline = score_captions({i: most_frequent for i in references}, references, metrics=("CIDEr",))
    result["baseline_cider"] = baseline["metrics"]["CIDEr"]
    predictions = result.pop("predictions")
    xe.pop("predictions", None)
    write_grid(out / "test_captions.png", run.test_records, predictions)
    stages.done("evaluate")

    print_summary(result, most_frequent, predictions, run.scenes, run.test_records)
    if config.scst:
        print_stages_side_by_side(xe, result)
        result["cross_entropy"] = xe
    print(f"stages (s): {stages.seconds}; grid of test images with captions: {out / 'test_captions.png'}")
    result.update(seconds=round(time.time() - stages.start, 1), stages=stages.seconds)
    print(result_line(result))
    return result


def scst_config(run: Run, export: Path, out_dir: Path) -> TrainConfig:
    """CIDEr optimisation of the cross-entropy export, end to end (encoder included), on the same images."""
    c = run.config
    val = run.data / "captions_val.json"
    images_per_epoch = max(1, len(run.train_records) // c.bs)
    return TrainConfig(
        train_encoder=True, annotations=str(run.data / "captions_train.json"), images_root=str(run.root),
        val_annotations=str(val) if val.exists() else None, cache_images=True, channels_last=True,
        init_from=str(export), scst=True, scst_samples=c.scst_samples, scst_baseline=SCST_BASELINE,
        out_dir=str(out_dir), prefix="demo",
        epochs=max(1, round(c.scst_steps / images_per_epoch)), bs=c.bs, lr=c.scst_lr, encoder_lr=c.scst_lr,
        warmup_steps=0, precision=c.precision, seed=c.seed, device=c.device, threads=c.threads,
        dataset=shapes.NAME if is_shapes_dataset(run.data) else None)


def print_stages_side_by_side(xe: Dict, scst: Dict) -> None:
    def figure(v):
        return "n/a" if v is None else f"{v:.1f}"
    print(f"\n{'':22}{'cross-entropy':>15}{'+ CIDEr optimisation':>22}")
    print(f"{'CIDEr':22}{xe['cider']:>15.1f}{scst['cider']:>22.1f}")
    for fact in ("colour", "shape", "position"):
        print(f"{fact + ' accuracy (%)':22}{figure(xe['accuracy'][fact]):>15}{figure(scst['accuracy'][fact]):>22}")


def print_summary(result: Dict, most_frequent: str, predictions: Dict, scenes: Dict, records) -> None:
    print(f"\nCIDEr {result['cider']:.1f}, against {result['baseline_cider']:.1f} for always answering the most "
          f"frequent training caption ({most_frequent!r})")
    unknown = sum(1 for i in predictions if i not in scenes)
    if unknown:
        print(f"note: {unknown} of {len(predictions)} test images have no 'scene' and no reference caption in the "
              f"shapes grammar; they are left out of the caption accuracy")
    acc = result["accuracy"]
    if unknown < len(predictions):
        print(f"caption accuracy on {len(predictions) - unknown} test images: colour {acc['colour']:.1f}%, "
              f"shape {acc['shape']:.1f}%, position/relation {acc['position']:.1f}%")
    for record in records[:5]:
        print(f"  {record.file_name}: {predictions[record.image_id]!r} (reference: {record.captions[0]!r})")


def result_line(result: Dict, extra: str = "") -> str:
    """The figures as one line a script can read; an accuracy that could not be measured is `nan`. With
    --scst, the cross-entropy stage's figures follow as xe_*."""
    def figures(accuracy, prefix=""):
        return " ".join(f"{prefix}{k}_acc={'nan' if v is None else f'{v:.1f}'}" for k, v in accuracy.items())
    xe = result.get("cross_entropy")
    before = f" {figures(xe['accuracy'], 'xe_')} xe_cider={xe['cider']:.1f}" if xe else ""
    return (f"RESULT {figures(result['accuracy'])} cider={result['cider']:.1f} "
            f"baseline_cider={result['baseline_cider']:.1f}{before} seconds={result['seconds']}{extra}")
