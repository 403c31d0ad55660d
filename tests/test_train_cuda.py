"""train.py on a GPU: mixed precision, resume, end-to-end with workers, torchrun with NCCL. Skipped without CUDA."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from builders import ROOT, interrupted_and_resumed, log_records, make_images, make_pickle, train_args, weights
from captioning.data.images import load_image
from captioning.inference import Captioner
from models.captioner import ClipCaptionModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_pickle(tmp_path_factory.mktemp("data") / "train.pkl", n_images=16, per_image=4)


def cuda_args(data, out, gpt2, *extra):
    return train_args(data, out, gpt2, "--device", "cuda", "--bs", 8, "--num_layers", 2, *extra)


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_mixed_precision_trains_and_exports_fp32_weights(tmp_path, data, gpt2_dir, amp):
    train.main(cuda_args(data, tmp_path, gpt2_dir, "--epochs", 4, "--amp", amp, "--val_fraction", 0.25))
    losses = [r["loss"] for r in log_records(tmp_path) if "loss" in r]
    val = [r["val_loss"] for r in log_records(tmp_path) if "val_loss" in r]
    assert losses[-1] < losses[0] and val[-1] < val[0]
    model = ClipCaptionModel.from_pretrained(tmp_path / "coco_prefix_latest")
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_resume_on_the_gpu_continues_the_run(tmp_path, data, gpt2_dir, monkeypatch):
    common = ["--epochs", 3, "--save_every_steps", 3]  # 6 steps per epoch
    a, b = interrupted_and_resumed(tmp_path, monkeypatch, lambda out: cuda_args(data, out, gpt2_dir, *common),
                                   stop_at=8)
    # GPU kernels need not be bitwise reproducible (atomics in some backward passes): close, not equal
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_end_to_end_with_workers_and_augmentation(tmp_path, gpt2_dir):
    annotations = make_images(tmp_path, n=12)  # 24 captions: 6 steps of 4 per epoch
    extra = ["--train_encoder", "--annotations", annotations, "--images_root", tmp_path, "--encoder", "test_resnet",
             "--encoder_weights", "random", "--image_size", 64, "--feature_type", "grid", "--amp", "bf16",
             "--num_workers", 2, "--augment", "--epochs", 2, "--bs", 4]
    train.main(cuda_args(None, tmp_path / "untrained", gpt2_dir, *extra, "--max_steps", 1, "--lr", 0,
                         "--encoder_lr", 0))
    out = tmp_path / "run"
    train.main(cuda_args(None, out, gpt2_dir, *extra))
    records = [r for r in log_records(out) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 13)) and all(np.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    recorded = json.loads((out / "train_args.json").read_text())
    assert (recorded["device"], recorded["augment"], recorded["train_encoder"]) == ("cuda", True, True)
    assert (recorded["runtime"]["precision"], recorded["runtime"]["num_workers"]) == ("bf16", 2)
    export = out / "coco_prefix_latest"
    model = ClipCaptionModel.from_pretrained(export)
    assert model.config.encoder_in_checkpoint and model.config.encoder["name"] == "test_resnet"
    assert model.config.feature_type == "grid" and model.config.num_grid_tokens == model.encoder.num_tokens
    assert all(p.dtype == torch.float32 for p in model.parameters())  # bf16 autocast, fp32 weights
    trained, untrained = weights(export), weights(tmp_path / "untrained" / "coco_prefix_latest")
    params = [n for n, _ in model.named_parameters() if n.startswith("encoder.")]
    assert params and all(not torch.equal(trained[n], untrained[n]) for n in params)  # the encoder was trained
    assert all(t.is_contiguous() for t in trained.values())  # channels_last (the CUDA default) is not exported
    captioner = Captioner.from_pretrained(export, device="cuda")
    assert captioner.encoder.preprocess(load_image(tmp_path / "img0.png")).shape == (3, 64, 64)
    result = captioner.predict([tmp_path / "img0.png"], max_length=8)[0]
    assert result.error is None and isinstance(result.caption, str) and len(result.captions) == 5


def test_torchrun_with_nccl(tmp_path, data, gpt2_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(torch.cuda.device_count()), str(ROOT / "train.py"),
                             *map(str, cuda_args(data, tmp_path, gpt2_dir, "--max_steps", 4))],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "train_args.json").read_text())["device"] == "cuda"
    assert [r["step"] for r in log_records(tmp_path) if "loss" in r] == [1, 2, 3, 4]
