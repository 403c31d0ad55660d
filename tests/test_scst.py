"""CIDEr optimisation (train.py --scst): the self-critical loss, its sampling, and the stage as train.py runs it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from builders import ROOT, log_records, make_images, make_pickle, tiny_captioner, tiny_gpt2, train_args, weights
from captioning.training import scst
from captioning.training.scst import ScstLoss, ScstOptions, baselines
from captioning.training.state import load_state
from models.checkpoint_io import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return make_pickle(tmp_path_factory.mktemp("scst") / "train.pkl", n_images=8, per_image=3)


@pytest.fixture(scope="module")
def xe_export(tmp_path_factory, features, gpt2_dir):
    """A cross-entropy export to start CIDEr optimisation from (full decoder, 2 epochs)."""
    out = tmp_path_factory.mktemp("xe")
    train.main(train_args(features, out, gpt2_dir, "--epochs", 2))
    return out / "coco_prefix_latest"


def scst_args(features, out_dir, gpt2_dir, export, *extra):
    return train_args(features, out_dir, gpt2_dir, "--scst", "--init_from", export, "--lr", "1e-3",
                      "--scst_max_length", 8, *extra)


class ConstantReward:
    def __call__(self, row, captions):
        return np.full(len(captions), 0.7)


class RankReward:
    def __call__(self, row, captions):
        return np.arange(len(captions), dtype=float)


def test_baseline_is_the_mean_of_the_other_samples():
    rewards = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    np.testing.assert_allclose(baselines(rewards), [[2.5, 2.0, 1.5], [3.0, 3.0, 0.0]])


def test_the_gradient_is_zero_when_every_sample_scores_the_same(tokenizer):
    model = tiny_captioner(tokenizer).train()
    loss_module = ScstLoss(model, tokenizer, ConstantReward(), ScstOptions(samples=4, max_length=6), images=False)
    loss, stats = loss_module(torch.randn(3, 96), torch.tensor([0, 1, 2]), step=0)
    loss.backward()
    assert loss.item() == 0.0 and stats["reward"] == pytest.approx(0.7) and stats["baseline"] == pytest.approx(0.7)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    # and with rewards that differ, it is not
    model.zero_grad()
    loss_module.rewards = RankReward()
    loss, stats = loss_module(torch.randn(3, 96), torch.tensor([0, 1, 2]), step=0)
    loss.backward()
    assert stats["reward"] == stats["baseline"] == pytest.approx(1.5)
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.parameters())


def test_an_images_samples_do_not_depend_on_its_batch(tokenizer):
    model = tiny_captioner(tokenizer).eval()
    loss_module = ScstLoss(model, tokenizer, ConstantReward(), ScstOptions(samples=3, max_length=6, seed=4),
                           images=False)
    features = torch.randn(3, 96)
    with torch.no_grad():
        prefix = model.prefix_embeddings(features)
    together, _ = loss_module.draw(prefix, [10, 11, 12], step=5)
    alone, _ = loss_module.draw(prefix[2:], [12], step=5)
    assert together.sequences()[2] == alone.sequences()[0]
    later, _ = loss_module.draw(prefix[2:], [12], step=6)
    assert later.sequences()[0] != alone.sequences()[0]  # each step draws anew


def test_a_short_run_trains_only_the_trainable_parts_and_logs_rewards(tmp_path, features, gpt2_dir, xe_export):
    summary = train.main(scst_args(features, tmp_path, gpt2_dir, xe_export, "--only_prefix", "--max_steps", 2))
    assert summary["step"] == 2
    before, after = weights(xe_export), weights(tmp_path / "coco_prefix_latest")
    decoder = [k for k in before if k.startswith("gpt.")]
    mapper = [k for k in before if k.startswith("clip_project.")]
    assert decoder and all(torch.equal(before[k], after[k]) for k in decoder)
    assert mapper and any(not torch.equal(before[k], after[k]) for k in mapper)
    records = [r for r in log_records(tmp_path) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert 0.0 <= r["ended"] <= 1.0 and r["reward"] >= 0.0 and np.isfinite(r["loss"])
        assert r["baseline"] == pytest.approx(r["reward"])  # the mean baseline averages to the mean reward
    assert load_state(tmp_path / "coco_prefix_resume.pt")["stage"] == "scst"


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, features, gpt2_dir, xe_export, monkeypatch):
    common = ["--epochs", 2, "--bs", 2, "--save_every_steps", 3]  # 4 steps per epoch
    train.main(scst_args(features, tmp_path / "whole", gpt2_dir, xe_export, *common))
    real_step = scst.ScstStepper.__call__
    calls = []

    def crashing(self, micro, step=0):
        calls.append(1)
        if len(calls) == 5:  # after the checkpoint of step 4 (the end of epoch 0)
            raise KeyboardInterrupt()
        return real_step(self, micro, step)

    monkeypatch.setattr(scst.ScstStepper, "__call__", crashing)
    with pytest.raises(KeyboardInterrupt):
        train.main(scst_args(features, tmp_path / "crashed", gpt2_dir, xe_export, *common))
    monkeypatch.setattr(scst.ScstStepper, "__call__", real_step)
    train.main(scst_args(features, tmp_path / "crashed", gpt2_dir, xe_export, *common, "--resume", "latest"))
    a, b = weights(tmp_path / "whole" / "coco_prefix_latest"), weights(tmp_path / "crashed" / "coco_prefix_latest")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    whole, resumed = log_records(tmp_path / "whole"), log_records(tmp_path / "crashed")
    assert [r["reward"] for r in whole if "reward" in r] == [r["reward"] for r in resumed if "reward" in r]


def test_the_stage_is_refused_where_it_cannot_work(tmp_path, features, gpt2_dir, xe_export):
    with pytest.raises(ValueError, match="--scst is a second stage: give the cross-entropy export"):
        train.main(train_args(features, tmp_path / "a", gpt2_dir, "--scst"))
    with pytest.raises(ValueError, match="--scst_baseline mean compares each sample"):
        train.main(scst_args(features, tmp_path / "b", gpt2_dir, xe_export, "--scst_samples", 1))
    with pytest.raises(ValueError, match=r"8 training samples \(captions; images under --scst\) make no full global "
                                         r"batch of 16"):  # --bs counts images: 8 of them, 24 captions
        train.main(scst_args(features, tmp_path / "c", gpt2_dir, xe_export, "--bs", 16))
    # a cross-entropy run's checkpoint is not continued as CIDEr optimisation
    train.main(train_args(features, tmp_path / "xe", gpt2_dir, "--max_steps", 1))
    with pytest.raises(CheckpointError, match="is a cross-entropy checkpoint and this is a scst run"):
        train.main(scst_args(features, tmp_path / "xe", gpt2_dir, xe_export, "--resume", "latest"))


def test_end_to_end_from_an_export_holding_its_encoder(tmp_path, gpt2_dir):
    annotations = make_images(tmp_path, n=6)
    images = ["--train_encoder", "--annotations", annotations, "--images_root", tmp_path]
    train.main(train_args(None, tmp_path / "xe", gpt2_dir, *images, "--encoder", "test_resnet",
                          "--encoder_weights", "random", "--image_size", 32, "--epochs", 1))
    export = tmp_path / "xe" / "coco_prefix_latest"
    with pytest.raises(ValueError, match="--image_size 48: with --init_from and --train_encoder the export's encoder"):
        train.main(train_args(None, tmp_path / "x", gpt2_dir, *images, "--scst", "--init_from", export,
                              "--image_size", 48))
    train.main(train_args(None, tmp_path / "scst", gpt2_dir, *images, "--scst", "--init_from", export,
                          "--max_steps", 1, "--scst_max_length", 6))
    before, after = weights(export), weights(tmp_path / "scst" / "coco_prefix_latest")
    encoder = [k for k in before if k.startswith("encoder.") and "bn" not in k and "num_batches" not in k]
    assert encoder and any(not torch.equal(before[k], after[k]) for k in encoder)


def test_two_processes_match_one_and_evaluation_keeps_the_best(tmp_path, features, tokenizer):
    """Each process samples and scores its own images, from the same per-image noise: two processes of 2 images
    make the step one process of 4 makes. --eval_every keeps best/ as in cross-entropy."""
    gpt2 = tmp_path / "gpt2"
    tiny_gpt2(tokenizer, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).save_pretrained(gpt2)  # no dropout
    tokenizer.save_pretrained(gpt2)
    train.main(train_args(features, tmp_path / "xe", gpt2, "--epochs", 1))
    export = tmp_path / "xe" / "coco_prefix_latest"
    common = ["--max_steps", 2, "--save_every_steps", 0, "--val_fraction", 0.25]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    two = scst_args(features, tmp_path / "two", gpt2, export, *common, "--bs", 2)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "train.py"), *two], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    train.main(scst_args(features, tmp_path / "one", gpt2, export, *common, "--bs", 4, "--eval_every", 1))
    a, b = weights(tmp_path / "one" / "coco_prefix_latest"), weights(tmp_path / "two" / "coco_prefix_latest")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    logs = {d: [r for r in log_records(tmp_path / d) if "reward" in r] for d in ("one", "two")}
    for key in ("loss", "reward", "baseline", "ended"):
        assert [r[key] for r in logs["one"]] == pytest.approx([r[key] for r in logs["two"]], rel=1e-5, abs=1e-7)
    evaluated = [r for r in log_records(tmp_path / "one") if "eval_cider" in r]
    assert evaluated and (tmp_path / "one" / "best" / "eval.json").is_file()
    best = json.loads((tmp_path / "one" / "best" / "eval.json").read_text())
    card = (tmp_path / "one" / "best" / "README.md").read_text()  # the best export's card shows its scores
    assert f"| CIDEr | {best['cider']:.2f} |" in card and "- stage: scst" in card
