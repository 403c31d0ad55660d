"""train.py end to end through `main([...])`, on generated pickles and images with a tiny GPT-2."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import train
from builders import ROOT, log_records, make_images, make_pickle, tiny_gpt2, train_args, weights
from captioning import runtime
from captioning.data.features import read_features, write_features
from captioning.data.store import write_store
from captioning.data.images import load_image
from captioning.runtime import Precision
from captioning.training import datasets, loop
from captioning.training.runner import build_optimizer
from captioning.training.state import TrainingError, load_state
from models.captioner import ClipCaptionModel
from models.checkpoint_io import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return make_pickle(tmp_path_factory.mktemp("data") / "train.pkl")


@pytest.fixture(scope="module")
def gpt2_nodrop_dir(tmp_path_factory, tokenizer):
    """The tiny GPT-2 without dropout, for runs that must agree across process counts."""
    path = tmp_path_factory.mktemp("gpt2_nodrop")
    model = tiny_gpt2(tokenizer, seed=1, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def test_two_step_run_writes_exports_logs_and_checkpoint(tmp_path, features, gpt2_dir, tokenizer):
    out = tmp_path / "run"
    summary = train.main(train_args(features, out, gpt2_dir, "--max_steps", 2, "--normalize_prefix", "--is_rn"))
    assert summary["step"] == 2
    model = ClipCaptionModel.from_pretrained(out / "coco_prefix_latest")
    c = model.config
    assert (c.normalize_prefix, c.prefix_length, c.prefix_length_clip, c.mapping_type) == (True, 4, 4, "transformer")
    assert (c.prefix_size, c.feature_type, c.eos_token_ids) == (16, "pooled", [tokenizer.eos_token_id])
    assert c.encoder["name"] == "tiny_vit_21m_224" and not c.encoder_in_checkpoint
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(str(out / "coco_prefix_latest")).eos_token_id == tokenizer.eos_token_id
    records = log_records(out)
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in records)
    assert [r["lr"] for r in records] == [5e-4, 0.0]  # linear decay over the 2 steps, no warmup
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = load_state(out / "coco_prefix_resume.pt")
    assert (state["step"], state["epoch"], state["epoch_samples"]) == (2, 0, 8)
    recorded = json.loads((out / "train_args.json").read_text())
    assert recorded["normalize_prefix"] is True and recorded["precision"] == "auto"
    assert recorded["runtime"] == {"precision": "fp32", "precision_requested": "auto", "torch_threads": 1,
                                   "num_workers": 0, "precision_reason": runtime.resolve_precision(
                                       "auto", "cpu", training=True).reason}
    with pytest.raises(CheckpointError, match="--resume latest"):  # never overwrites a run by accident
        train.main(train_args(features, out, gpt2_dir, "--max_steps", 2))


def test_epochs_write_numbered_exports_and_validation_loss(tmp_path, features, gpt2_dir):
    out = tmp_path / "run"
    train.main(train_args(features, out, gpt2_dir, "--epochs", 2, "--bs", 8, "--val_fraction", 0.25))
    assert (out / "coco_prefix-000").is_dir() and (out / "coco_prefix-001").is_dir()
    assert weights(out / "coco_prefix-001").keys() == weights(out / "coco_prefix_latest").keys()
    val = [r for r in log_records(out) if "val_loss" in r]
    assert [(r["epoch"], r["step"]) for r in val] == [(0, 2), (1, 4)]  # 18 training captions, batch 8
    assert val[1]["val_loss"] < val[0]["val_loss"]


def test_loss_decreases_on_a_memorisation_set(tmp_path, gpt2_nodrop_dir):
    data = make_pickle(tmp_path / "small.pkl", n_images=4, per_image=1)
    out = tmp_path / "run"
    train.main(train_args(data, out, gpt2_nodrop_dir, "--max_steps", 60, "--epochs", 100, "--bs", 1, "--lr", 1e-2))
    losses = [r["loss"] for r in log_records(out) if "loss" in r]
    assert len(losses) == 60 and np.mean(losses[-4:]) < 0.25 * np.mean(losses[:4])  # last epoch vs first


def test_only_prefix_changes_only_the_mapper(tmp_path, features, gpt2_dir):
    before = tmp_path / "before"
    after = tmp_path / "after"
    train.main(train_args(features, before, gpt2_dir, "--max_steps", 1, "--lr", 0, "--only_prefix"))
    train.main(train_args(features, after, gpt2_dir, "--max_steps", 2, "--lr", 1e-2, "--only_prefix"))
    w0, w1 = weights(before / "coco_prefix_latest"), weights(after / "coco_prefix_latest")
    from transformers import GPT2LMHeadModel
    gpt = GPT2LMHeadModel.from_pretrained(str(gpt2_dir)).state_dict()
    decoder = [k for k in w1 if k.startswith("gpt.")]
    assert decoder and all(torch.equal(w1[k], gpt[k[len("gpt."):]]) for k in decoder)
    mapper = [k for k in w1 if k.startswith("clip_project.")]
    assert mapper and all(not torch.equal(w0[k], w1[k]) for k in mapper)
    assert ClipCaptionModel.from_pretrained(after / "coco_prefix_latest").config.only_prefix


class Crash(Exception):
    """Raised inside a training step to stand for a process killed mid-run."""


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, features, gpt2_dir, monkeypatch):
    # full fine-tuning with dropout on: the RNG states must come back too
    common = ["--epochs", 3, "--bs", 2, "--grad_accum", 2, "--save_every_steps", 2]  # 6 steps per epoch
    train.main(train_args(features, tmp_path / "whole", gpt2_dir, *common))

    real_step = loop.Stepper.__call__
    calls = []

    def crashing(self, micro, step=0):
        calls.append(1)
        if len(calls) == 9:  # step 9, after the checkpoint of step 8 (epoch 1, 2 steps in)
            raise Crash()
        return real_step(self, micro, step)

    monkeypatch.setattr(loop.Stepper, "__call__", crashing)
    with pytest.raises(Crash):
        train.main(train_args(features, tmp_path / "crashed", gpt2_dir, *common))
    monkeypatch.setattr(loop.Stepper, "__call__", real_step)
    assert load_state(tmp_path / "crashed" / "coco_prefix_resume.pt")["step"] == 8
    summary = train.main(train_args(features, tmp_path / "crashed", gpt2_dir, *common, "--resume", "latest"))
    assert summary["step"] == 18
    for name in ("coco_prefix_latest", "coco_prefix-001", "coco_prefix-002"):
        a, b = weights(tmp_path / "whole" / name), weights(tmp_path / "crashed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    whole, resumed = log_records(tmp_path / "whole"), log_records(tmp_path / "crashed")
    assert [r["loss"] for r in whole if "loss" in r] == [r["loss"] for r in resumed if "loss" in r]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, features, gpt2_dir, monkeypatch):
    real_forward = loop.CaptionLoss.forward
    calls = []

    def poisoned(self, *args):
        calls.append(1)
        loss = real_forward(self, *args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(loop.CaptionLoss, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"became nan at step 3 \(epoch 0\).*coco_prefix_resume.pt"):
        train.main(train_args(features, out, gpt2_dir, "--max_steps", 5, "--save_every_steps", 2))
    state = load_state(out / "coco_prefix_resume.pt")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(torch.isfinite(v).all() for v in weights(out / "coco_prefix_latest").values())


def test_grid_features_and_a_separate_validation_pickle(tmp_path, gpt2_dir):
    data = make_pickle(tmp_path / "grid.pkl", grid_tokens=5)
    val = make_pickle(tmp_path / "grid_val.pkl", n_images=3, grid_tokens=5, seed=1)
    out = tmp_path / "run"
    train.main(train_args(data, out, gpt2_dir, "--max_steps", 2, "--val_data", val))
    model = ClipCaptionModel.from_pretrained(out / "coco_prefix_latest").eval()
    config = model.config
    assert (config.feature_type, config.num_grid_tokens, config.encoder["feature_type"]) == ("grid", 5, "grid")
    [record] = [r for r in log_records(out) if "val_loss" in r]
    # The logged loss is the export's mean cross-entropy over every validation caption token, end token included.
    tokenizer, raw, total, count = AutoTokenizer.from_pretrained(gpt2_dir), read_features(val), 0.0, 0
    with torch.no_grad():
        for entry in raw["captions"]:
            ids = torch.tensor([tokenizer(entry["caption"], add_special_tokens=False)["input_ids"] +
                                [tokenizer.eos_token_id]])
            features = raw["clip_embedding"][entry["clip_embedding"]][None].float()
            total += model.loss(ids, features, torch.ones_like(ids)).item() * ids.shape[1]
            count += ids.shape[1]
    assert record["val_loss"] == pytest.approx(total / count, rel=1e-4)
    with pytest.raises(ValueError, match="need --mapping_type transformer"):
        train.main(train_args(data, tmp_path / "mlp", gpt2_dir, "--mapping_type", "mlp"))


def test_a_changed_pickle_is_retokenized(tmp_path, gpt2_dir, tokenizer):
    data = make_pickle(tmp_path / "data" / "train.pkl")
    cache = ["--cache_dir", tmp_path / "cache"]
    train.main(train_args(data, tmp_path / "a", gpt2_dir, "--max_steps", 1, *cache))
    entries = [{"image_id": 0, "caption": "A woman at the beach.", "clip_embedding": 0}] * 4
    write_features(data, torch.randn(1, 16), entries, {})
    train.main(train_args(data, tmp_path / "b", gpt2_dir, "--max_steps", 1, *cache))
    caches = sorted((tmp_path / "cache").glob("train.pkl.tokens-*.npz"), key=os.path.getmtime)
    assert len(caches) == 2 and sorted(p.name for p in (tmp_path / "data").iterdir()) == ["train.pkl"]
    with np.load(caches[-1]) as z:
        assert tokenizer.decode(z["flat"][: z["offsets"][1]]) == "A woman at the beach.<|endoftext|>"


def test_an_unwritable_cache_dir_falls_back_to_the_run_directory(tmp_path, gpt2_dir, monkeypatch):
    data = make_pickle(tmp_path / "data" / "train.pkl")
    cache = tmp_path / "cache"
    real = datasets.atomic_write

    def refuse_the_cache(path):  # tests run as root, where permissions do not stop writes
        if Path(path).parent == cache:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)
    monkeypatch.setattr(datasets, "atomic_write", refuse_the_cache)
    train.main(train_args(data, tmp_path / "run", gpt2_dir, "--max_steps", 1, "--cache_dir", cache))
    assert len(list((tmp_path / "run").glob("train.pkl.tokens-*.npz"))) == 1
    assert not cache.exists() or not list(cache.iterdir())
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["train.pkl"]


@pytest.mark.parametrize("content, message", [
    ({"clip_embedding": torch.zeros(2, 4)}, r"missing key\(s\) \['captions'\]"),
    ({"clip_embedding": torch.zeros(2, 4), "captions": [{"image_id": 1, "caption": "A cat.", "clip_embedding": 2}]},
     r"captions\[0\]: 'clip_embedding' is 2; expected a row index in \[0, 2\)"),
    ({"clip_embedding": torch.zeros(2, 4), "captions": []}, "'captions' is empty"),
    ({"clip_embedding": torch.zeros(1, 4), "captions": [{"image_id": 1, "caption": "  ", "clip_embedding": 0}]},
     r"captions\[0\]\['caption'\] is empty"),
])
def test_bad_pickles_give_clear_errors(tmp_path, gpt2_dir, content, message):
    path = tmp_path / "bad.pkl"
    with open(path, "wb") as f:
        pickle.dump(content, f)
    with pytest.raises(ValueError, match=message) as error:
        train.main(train_args(path, tmp_path / "out", gpt2_dir))
    assert str(path) in str(error.value)


def test_resume_refuses_another_model(tmp_path, features, gpt2_dir):
    out = tmp_path / "run"
    train.main(train_args(features, out, gpt2_dir, "--max_steps", 1))
    with pytest.raises(CheckpointError, match=r"another model: num_layers: 1 in the checkpoint, 2 now"):
        train.main(train_args(features, out, gpt2_dir, "--num_layers", 2, "--resume", "latest"))


def test_end_to_end_training_exports_the_encoder(tmp_path, gpt2_dir):
    annotations = make_images(tmp_path)
    extra = ["--train_encoder", "--annotations", annotations, "--images_root", tmp_path, "--encoder", "test_resnet",
             "--encoder_weights", "random",
             "--image_size", 32, "--feature_type", "grid", "--encoder_lr", 1e-2, "--num_workers", 0]
    runs = {}
    for name, flags in (("untrained", ["--lr", 0, "--encoder_lr", 0]), ("plain", []), ("cached", ["--cache_images"]),
                        ("channels_last", ["--channels_last"])):
        train.main(train_args(None, tmp_path / name, gpt2_dir, "--max_steps", 2, *extra, *flags))
        runs[name] = weights(tmp_path / name / "coco_prefix_latest")
    model = ClipCaptionModel.from_pretrained(tmp_path / "plain" / "coco_prefix_latest")
    assert model.config.encoder_in_checkpoint and model.config.encoder["name"] == "test_resnet"
    assert model.config.encoder["resolved_name"] == "test_resnet.r160_in1k"
    assert model.config.feature_type == "grid" and model.config.num_grid_tokens == model.encoder.num_tokens
    assert model.encoder.preprocess(load_image(tmp_path / "img0.png")).shape == (3, 32, 32)
    params = [n for n, _ in model.named_parameters() if n.startswith("encoder.")]
    assert params and all(not torch.equal(runs["plain"][n], runs["untrained"][n]) for n in params)
    assert all(torch.equal(runs["plain"][k], runs["cached"][k]) for k in runs["plain"])  # same pixels either way
    # the memory format changes the convolution kernels, not the loss (Adam's first steps amplify rounding
    # differences in near-zero gradients, so weights are not compared); the export is contiguous again
    losses = {name: [r["loss"] for r in log_records(tmp_path / name) if "loss" in r] for name in runs}
    assert losses["channels_last"] == pytest.approx(losses["plain"], rel=1e-4) and len(losses["plain"]) == 2
    assert all(t.is_contiguous() for t in runs["channels_last"].values())
    flags = ["--augment", "--num_workers", 1, "--val_fraction", 0.34]
    train.main(train_args(None, tmp_path / "augmented", gpt2_dir, "--max_steps", 1, *extra, *flags))
    assert [r for r in log_records(tmp_path / "augmented") if "val_loss" in r]


def test_the_earlier_amp_flag_and_an_explicit_bf16_warning(tmp_path, features, gpt2_dir, capsys):
    train.main(train_args(features, tmp_path / "a", gpt2_dir, "--max_steps", 1, "--amp", "none"))
    assert json.loads((tmp_path / "a" / "train_args.json").read_text())["runtime"]["precision"] == "fp32"
    cores = runtime.usable_cores()
    assert capsys.readouterr().err.splitlines()[:2] == [
        "precision fp32 (as asked)",
        f"threads: 1 torch + 0 loader worker(s) on {cores} core(s) ({cores} usable core(s), threads from "
        f"OMP_NUM_THREADS)"]
    train.main(train_args(features, tmp_path / "b", gpt2_dir, "--max_steps", 1, "--precision", "bf16"))
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "precision bf16 (as asked)" and err[1].startswith("warning: bf16 on this CPU runs in software")
    assert json.loads((tmp_path / "b" / "train_args.json").read_text())["runtime"]["precision"] == "bf16"


def test_bf16_on_the_cpu_uses_the_math_attention_kernel():
    dist = type("Dist", (), {"device": torch.device("cpu")})()
    model = torch.nn.Linear(2, 2)
    for name, math_only in (("bf16", True), ("fp32", False)):
        precision = Precision(name, name, "as asked")
        stepper = loop.Stepper(model, torch.optim.SGD(model.parameters(), 0.1), None, dist, precision=precision)
        with stepper.autocast():
            assert torch.is_autocast_enabled("cpu") == (name == "bf16")
            assert torch.backends.cuda.flash_sdp_enabled() != math_only
    assert torch.backends.cuda.flash_sdp_enabled()


@pytest.mark.parametrize("kind", ["pickle", "store"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, features, gpt2_nodrop_dir, kind):
    if kind == "store":  # the two processes map one store's files
        data = read_features(features)
        features = tmp_path / "train.store"
        write_store(features, data["clip_embedding"], data["captions"], data["metadata"])
    common = ["--max_steps", 3, "--save_every_steps", 0, "--val_fraction", 0.25]
    one = train_args(features, tmp_path / "one", gpt2_nodrop_dir, *common, "--bs", 4)
    two = train_args(features, tmp_path / "two", gpt2_nodrop_dir, *common, "--bs", 2)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "train.py"), *two], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("parameters on 2 x cpu") == 1  # only rank 0 prints
    train.main(one)
    a, b = weights(tmp_path / "one" / "coco_prefix_latest"), weights(tmp_path / "two" / "coco_prefix_latest")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    val = [[r["val_loss"] for r in log_records(tmp_path / d) if "val_loss" in r] for d in ("one", "two")]
    assert val[0] == pytest.approx(val[1], rel=1e-5)
    losses = [[r["loss"] for r in log_records(tmp_path / d) if "loss" in r] for d in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_the_original_readme_command_runs(tmp_path, gpt2_dir):
    data = make_pickle(tmp_path / "data" / "coco" / "oscar_split_tinyvit_train.pkl", n_images=16)
    out = tmp_path / "coco_train_transformer_4"
    (out / ".coco_prefix_latest.x1.tmp").mkdir(parents=True)  # left by a write that a kill interrupted
    (out / ".coco_prefix_resume.pt.x2.tmp").write_bytes(b"partial")
    train.main(["--data", str(data), "--out_dir", f"{out}/", "--mapping_type", "transformer", "--num_layers", "8",
                "--prefix_length", "40", "--prefix_length_clip", "40", "--gpt2", str(gpt2_dir), "--max_steps", "1"])
    assert ClipCaptionModel.from_pretrained(out / "coco_prefix_latest").config.prefix_length == 40
    assert not list(out.glob(".*"))


def test_bad_arguments_and_missing_images_give_clear_errors(tmp_path, features, gpt2_dir):
    with pytest.raises(ValueError, match="with --train_encoder the data are images: give --annotations"):
        train.main(train_args(features, tmp_path / "a", gpt2_dir, "--train_encoder"))
    with pytest.raises(ValueError, match=r"fp16 training needs a CUDA GPU \(loss scaling\); on a CPU use "
                                         r"--precision auto, fp32 or bf16"):
        train.main(train_args(features, tmp_path / "b", gpt2_dir, "--amp", "fp16"))
    annotations = make_images(tmp_path)
    (tmp_path / "img3.png").unlink()
    with pytest.raises(ValueError, match=r"1 of 6 images are missing under --images_root .*img3.png"):
        train.main(train_args(None, tmp_path / "d", gpt2_dir, "--train_encoder", "--annotations", annotations,
                              "--images_root", tmp_path, "--encoder", "test_resnet", "--encoder_weights", "random"))


def test_optimizer_uses_the_original_adam_epsilon():
    model = torch.nn.Linear(2, 2)
    for flags, eps in (([], 1e-6), (["--adam_eps", "1e-8"], 1e-8)):
        optimizer = build_optimizer(model, train.parse_config(flags), torch.device("cpu"))
        assert [group["eps"] for group in optimizer.param_groups] == [eps]


def test_a_corrupt_resume_checkpoint_is_refused_and_the_run_continues_from_the_previous_one(
        tmp_path, features, gpt2_dir, monkeypatch, capsys):
    common = ["--epochs", 3, "--bs", 4, "--save_every_steps", 0]  # 6 steps per epoch, a checkpoint after each
    train.main(train_args(features, tmp_path / "whole", gpt2_dir, *common))
    out = tmp_path / "run"
    real_step = loop.Stepper.__call__
    calls = []

    def crashing(self, micro, step=0):
        calls.append(1)
        if len(calls) == 13:  # after the checkpoints of steps 6 and 12
            raise Crash()
        return real_step(self, micro, step)

    monkeypatch.setattr(loop.Stepper, "__call__", crashing)
    with pytest.raises(Crash):
        train.main(train_args(features, out, gpt2_dir, *common))
    monkeypatch.setattr(loop.Stepper, "__call__", real_step)
    resume = out / "coco_prefix_resume.pt"
    assert load_state(out / "coco_prefix_resume.prev.pt")["step"] == 6 and load_state(resume)["step"] == 12
    data = bytearray(resume.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 200] = bytes(b ^ 0xFF for b in data[middle:middle + 200])  # 200 flipped bytes
    resume.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="coco_prefix_resume.pt"):
        load_state(resume)
    capsys.readouterr()
    summary = train.main(train_args(features, out, gpt2_dir, *common, "--resume", "latest"))
    printed = capsys.readouterr().out
    assert "coco_prefix_resume.pt" in printed and "refused, kept as" in printed
    assert f"continuing from the previous checkpoint {out / 'coco_prefix_resume.prev.pt'} (step 6)" in printed
    assert "changed arguments" not in printed  # --resume latest itself is no change
    assert (out / "coco_prefix_resume.pt.corrupt").read_bytes() == bytes(data)
    assert summary["step"] == 18 and load_state(resume)["step"] == 18
    a, b = weights(tmp_path / "whole" / "coco_prefix_latest"), weights(out / "coco_prefix_latest")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_checkpoints_without_a_checksum_still_load(tmp_path, features, gpt2_dir, capsys):
    train.main(train_args(features, tmp_path, gpt2_dir, "--max_steps", 2))
    path = tmp_path / "coco_prefix_resume.pt"
    old = torch.load(path, weights_only=True)
    del old["sha256"]  # as written before checksums
    torch.save(old, path)
    capsys.readouterr()
    assert load_state(path)["step"] == 2
    assert "was written before resume checkpoints carried a checksum; it is loaded unverified" in \
        capsys.readouterr().out
    (tmp_path / "a_directory").mkdir()
    with pytest.raises(CheckpointError, match=r"--resume .*a_directory: is a directory; give the resume checkpoint"):
        train.main(train_args(features, tmp_path, gpt2_dir, "--resume", tmp_path / "a_directory"))


def test_a_missing_features_file_is_reported_before_the_decoder_is_fetched(tmp_path):
    with pytest.raises(ValueError, match=r"--data .*missing.pkl: no such features file"):
        train.main(["--data", str(tmp_path / "missing.pkl"), "--out_dir", str(tmp_path / "run"), "--gpt2",
                    "distilgpt2", "--device", "cpu"])
    with pytest.raises(ValueError, match=r"--data .*: is a directory; expected a features pickle"):
        train.main(["--data", str(tmp_path), "--out_dir", str(tmp_path / "run"), "--device", "cpu"])
    assert not (tmp_path / "run").exists()
