"""Train the captioner: a features pickle (or, with --train_encoder, images and captions) -> export directories.

    python train.py --data ./data/coco/oscar_split_tinyvit_train.pkl --out_dir ./coco_train_transformer_4/ \\
        --mapping_type transformer --num_layers 8 --prefix_length 40 --prefix_length_clip 40
    torchrun --nproc_per_node=2 train.py ...    # DistributedDataParallel: nccl on GPUs, gloo on CPUs

--out_dir receives `<prefix>-<epoch>/` every --save_every epochs and `<prefix>_latest/` (export directories that
predict.py loads), `<prefix>_resume.pt` (for --resume), `train_log.jsonl`, `loss_curve.png` and `train_args.json`; with
--eval_every also `best/`, the export with the best validation CIDEr so far (its scores in best/eval.json).
"""
import argparse
import sys

from captioning.choices import ANNOTATION_FORMATS
from captioning.cli import (COUNT, POSITIVE, SEED, add_precision_argument, add_thread_arguments, device_name, number,
                            pretrained_source, run_command)
from captioning.training.config import ARCHITECTURE_FLAGS, DEFAULT_DATA, ENCODER_FLAGS, TrainConfig
from models.choices import LICENSES, MAPPING_TYPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_original_flags(p.add_argument_group("the original flags, same names and meanings").add_argument)
    group = p.add_argument_group("optimisation, data, devices and checkpoints")
    add_training_flags(group.add_argument)
    add_runtime_flags(group)
    add_encoder_flags(p.add_argument_group("end-to-end training from images (--train_encoder)").add_argument)
    add_scst_flags(p.add_argument_group("CIDEr optimisation: self-critical sequence training after cross-entropy "
                                        "(--scst)").add_argument)
    add_lora_flags(p.add_argument_group("LoRA: low-rank adapters on the decoder (peft), which stays frozen")
                   .add_argument)
    add_card_flags(p.add_argument_group("the exports' model cards").add_argument)
    p.set_defaults(**TrainConfig.defaults())  # the one place the defaults are written
    return p


def add_original_flags(a) -> None:
    a("--data",
      help=f"features pickle, or store (--out_format mmap), from parse_coco.py (default: {DEFAULT_DATA})")
    a("--out_dir", help="where exports, the resume checkpoint and logs go")
    a("--prefix", help="name prefix of the saved exports and checkpoint")
    a("--epochs", type=POSITIVE, help="passes over the training captions")
    a("--save_every", type=POSITIVE, help="write the export <prefix>-<epoch> every N epochs (and the last)")
    a("--prefix_length", type=POSITIVE, help="prefix embeddings (decoder positions) the mapping network produces")
    a("--prefix_length_clip", type=POSITIVE,
      help="transformer mapper: tokens projected from a pooled image feature")
    a("--bs", type=POSITIVE, help="batch size per process")
    a("--only_prefix", dest="only_prefix", action="store_true",
      help="train only the mapping network (and encoder); the decoder stays frozen")
    a("--mapping_type", choices=MAPPING_TYPES, help="mapping network type (default %(default)s)")
    a("--num_layers", type=POSITIVE, help="transformer mapper depth")
    a("--is_rn", dest="is_rn", action="store_true",
      help="ignored: the feature size and type now come from the features pickle (kept for old commands)")
    a("--normalize_prefix", dest="normalize_prefix", action="store_true",
      help="L2-normalise image features before the mapper; saved in the config, so inference does the same")


def add_runtime_flags(p) -> None:
    add_precision_argument(p, aliases=["--amp"],
                           what="autocast mixed precision of training (fp16: CUDA only, with loss scaling)")
    add_thread_arguments(p, workers_help=(
        "DataLoader workers per process (default: none for features, which sit in memory, or cached images; "
        "for images on a CPU none below 8 usable cores, since the model needs them; on a GPU every core but "
        "one, at most 8)"))


def add_training_flags(a) -> None:
    a("--gpt2", "--decoder", dest="gpt2", metavar="DECODER", type=pretrained_source,
      help="the decoder and its tokenizer: any causal language model (GPT-2, LLaMA/SmolLM2, Qwen2/2.5/3, "
           "GPT-NeoX/Pythia, OPT, ...) as a hub name or local directory")
    a("--lr", type=number(0), help="peak learning rate (AdamW), after linear warmup, then linear decay")
    a("--warmup_steps", type=COUNT, help="optimizer steps of linear learning-rate warmup")
    a("--weight_decay", type=number(0), help="AdamW weight decay on weight matrices (not biases, norms)")
    a("--adam_eps", type=number(0, low_open=True),
      help="AdamW epsilon (default %(default)s: the default of the transformers.AdamW the original trained with; "
           "torch's is 1e-8)")
    a("--grad_clip", type=number(0), help="clip the gradient norm to this value (0: off)")
    a("--grad_accum", type=POSITIVE, help="micro-batches accumulated per optimizer step")
    a("--seed", type=SEED, help="seed of initialisation, data order, dropout and augmentation")
    a("--device", type=device_name,
      help="cpu, cuda or mps (default: cuda when available); torchrun picks the GPU")
    a("--val_data", help="validation features pickle or store; validation loss reported per epoch")
    a("--val_fraction", type=number(0, 1, low_open=True, high_open=True),
      help="hold out this fraction of the training images (all their captions) for validation instead")
    a("--init_from",
      help="fine-tune this export (train.py's or convert_checkpoint.py's): its architecture, decoder, tokenizer "
           "and feature normalisation are kept (with --train_encoder also its encoder); the start of --scst")
    a("--resume",
      help="a resume checkpoint (<prefix>_resume.pt) or 'latest' (the one in --out_dir; a fresh start if none)")
    a("--max_steps", type=POSITIVE, help="stop after this many optimizer steps (quick runs)")
    a("--cache_dir",
      help="where caption tokens are cached (default: $TINYTINY_CACHE, else ~/.cache/tinytiny-captioner; the "
           "run's --out_dir when that cannot be written); never the dataset's folder")
    a("--log_every", type=POSITIVE, help="optimizer steps between train_log.jsonl records")
    a("--save_every_steps", type=COUNT,
      help="also checkpoint (resume file + <prefix>_latest export) every N steps within an epoch (0: off)")
    a("--eval_every", type=COUNT,
      help="every N epochs (and the last), caption --eval_images validation images with the new export, log "
           "CIDEr and BLEU-4 to train_log.jsonl and keep the best export by CIDEr as <out_dir>/best/ (0: off)")
    a("--eval_images", type=POSITIVE,
      help="with --eval_every: the first N distinct validation images, scored against all their captions")


def add_encoder_flags(e) -> None:
    e("--train_encoder", action="store_true",
      help="train the image encoder too, on the images of --annotations; the export holds the encoder")
    e("--annotations",
      help="annotation file, as parse_coco.py reads it: a caption list JSON (train_caption.json), a "
           "COCO captions_*.json, Karpathy's dataset_coco.json, a CSV of file names and captions, or webdataset "
           "shards (a .tar, a brace pattern, a directory of .tar files or a list of them)")
    e("--annotation_format", choices=ANNOTATION_FORMATS)
    e("--split", help="Karpathy split(s) of --annotations, e.g. train+restval")
    e("--images_root", help="image paths in the annotations are relative to it")
    e("--val_annotations", help="validation annotation file (same images root)")
    e("--val_split", help="Karpathy split(s) of --val_annotations, e.g. val")
    e("--encoder",
      help="timm model as NAME (timm's default tag: tiny_vit_21m_224 is tiny_vit_21m_224.dist_in22k) or NAME.TAG")
    e("--encoder_weights", help="pretrained, random, or a weights file")
    e("--encoder_kwargs", help="JSON dict of extra timm.create_model arguments")
    e("--image_size", type=POSITIVE, help="input resolution (default: the model's)")
    e("--feature_type", choices=["pooled", "grid"],
      help="pooled vector per image, or the last feature map as tokens (transformer mapper)")
    e("--freeze_stages", type=COUNT,
      help="freeze the stem and first N stages (default: 1 with pretrained or file weights, as the "
           "original; 0 with random weights)")
    e("--encoder_lr", type=number(0), help="learning rate of the encoder (default: --lr)")
    e("--augment", action="store_true",
      help="light augmentation: a random resized crop (no flips: captions say left and right)")
    e("--channels_last", action=argparse.BooleanOptionalAction,
      help="run the encoder in channels-last memory format (default: on CUDA); faster for convolutions "
           "(docs/benchmarks.md)")
    e("--cache_images", action="store_true",
      help="preprocess every image once and keep it in memory (small datasets)")


def add_scst_flags(a) -> None:
    a("--scst", action="store_true",
      help="optimise CIDEr-D directly, starting from the cross-entropy export --init_from, in a new --out_dir: "
           "each step samples captions per image, scores them against the image's training references and "
           "reinforces those above the baseline (--bs counts images; --resume latest continues an interrupted "
           "CIDEr optimisation only)")
    a("--scst_samples", type=POSITIVE, help="captions sampled per image and step (default %(default)s)")
    a("--scst_top_p", type=number(0, 1, low_open=True),
      help="sample from this probability mass (default %(default)s: the model's whole distribution, at temperature "
           "1)")
    a("--scst_max_length", type=POSITIVE,
      help="most tokens per sampled caption, end token included (default: the longest training caption's)")
    a("--scst_baseline", choices=["mean", "greedy"],
      help="what a sample's reward is compared with: the mean reward of the image's other samples (default; "
           "Luo 2020) or the reward of its greedy caption (Rennie et al. 2017)")
    a("--scst_bleu_weight", type=number(0), help="reward = CIDEr-D + this x BLEU-4 (default %(default)s)")


def add_lora_flags(a) -> None:
    a("--lora_r", type=POSITIVE,
      help="train low-rank adapters of this rank on the decoder's attention and MLP projections, with the mapper "
           "(and the encoder under --train_encoder), instead of every decoder weight; exports merge them into the "
           "decoder (default: no adapters)")
    a("--lora_alpha", type=number(0, low_open=True), help="adapter scale numerator: updates are scaled by "
                                                          "alpha / r (default %(default)s)")
    a("--lora_dropout", type=number(0), help="dropout on the adapters' input (default %(default)s)")
    a("--lora_targets", nargs="+", metavar="MODULE",
      help="names of the decoder's linear layers to adapt (default: the architecture's attention and MLP "
           "projections, e.g. GPT-2's c_attn c_proj c_fc, LLaMA's q_proj ... down_proj)")
    a("--export_adapters", action="store_true",
      help="also write <export>/adapters: the mapper and the adapters without the base decoder, which loads "
           "from --gpt2 (small enough to share)")


def add_card_flags(a) -> None:
    a("--license", choices=LICENSES, help="license the exports' model cards (README.md) name (default %(default)s)")
    a("--dataset", help="name of the training data (coco, shapes, ...), recorded in the exports' config and model "
                        "card; app.py offers shapes examples and a sketch pad to a 'shapes' model")


def flags_given(parser: argparse.ArgumentParser, argv, names) -> set:
    """Which of `names` the command line gives, even where it repeats a default: argparse leaves attributes the
    namespace already holds alone unless their flag is given."""
    unset = object()
    namespace = parser.parse_args(argv, argparse.Namespace(**{name: unset for name in names}))
    return {name for name in names if getattr(namespace, name) is not unset}


def parse_config(argv=None) -> TrainConfig:
    return TrainConfig(**vars(build_parser().parse_args(argv)))


def main(argv=None) -> dict:
    """Train; returns the run's summary (step, latest export, ...)."""
    parser = build_parser()
    config = TrainConfig(**vars(parser.parse_args(argv)))
    # With --init_from the export decides the architecture: a flag given with another value is an error.
    given = flags_given(parser, argv, ARCHITECTURE_FLAGS + ENCODER_FLAGS)
    from captioning.training.runner import train  # torch, timm and transformers: after the flags
    return train(config, given=given)


def user_errors() -> tuple:
    from captioning.data.images import ImageError
    from captioning.outputs import OutputError
    from captioning.training.state import TrainingError
    from models.checkpoint_io import CheckpointError
    return ValueError, CheckpointError, TrainingError, ImageError, OSError, OutputError


if __name__ == "__main__":
    sys.exit(run_command(main, user_errors, interrupted="the last checkpoint is intact; continue with the same "
                                                        "command and --resume latest"))
