"""Features pickles with one row per caption, as the original parse_coco.py writes them: an image is its image_id,
in the training split, the training-time evaluation's references and the predictions."""
import json
import pickle

import numpy as np
import pytest
import torch

import evaluate
import predict
import train
from builders import tiny_captioner, train_args
from captioning.data.features import FeaturesError, read_features
from captioning.training import evaluation
from captioning.training.datasets import FeatureCaptionDataset, caption_table_from_features, split_by_image

pytestmark = pytest.mark.usefixtures("one_thread")

N_IMAGES, PER_IMAGE, DIM = 20, 5, 96


def original_pickle(path, n_images=N_IMAGES, per_image=PER_IMAGE, dim=DIM, seed=0):
    """As the original script builds it: each caption encodes its image again and gets its own row."""
    torch.manual_seed(seed)
    image_features = torch.randn(n_images, dim)
    embeddings, captions = [], []
    for i in range(n_images):
        for k in range(per_image):
            captions.append({"image_id": 1000 + i, "id": len(captions), "caption": f"image {i} caption {k}",
                             "clip_embedding": len(embeddings)})
            embeddings.append(image_features[i:i + 1].clone())
    with open(path, "wb") as f:
        pickle.dump({"clip_embedding": torch.cat(embeddings), "captions": captions}, f)
    return path, image_features


def test_rows_of_one_image_are_read_as_one_row(tmp_path, capsys):
    path, image_features = original_pickle(tmp_path / "orig.pkl")
    data = read_features(path)
    assert torch.equal(data["clip_embedding"], image_features)
    assert [c["clip_embedding"] for c in data["captions"]] == [i for i in range(N_IMAGES) for _ in range(PER_IMAGE)]
    assert [c["caption"] for c in data["captions"]] == [f"image {i} caption {k}" for i in range(N_IMAGES)
                                                        for k in range(PER_IMAGE)]
    err = capsys.readouterr().err
    assert err.count("repeats images: 100 feature rows for 20 images") == 1
    assert "parse_coco.py stores each image once" in err


def test_a_file_with_one_row_per_image_is_returned_as_it_is(tmp_path, capsys):
    features = torch.randn(3, 4)
    captions = [{"image_id": i // 2, "caption": "x", "clip_embedding": i // 2} for i in range(6)]
    with open(tmp_path / "f.pkl", "wb") as f:
        pickle.dump({"clip_embedding": features, "captions": captions}, f)
    data = read_features(tmp_path / "f.pkl")  # row 2 holds no caption's image: kept, as before
    assert torch.equal(data["clip_embedding"], features)
    assert data["captions"] == captions and capsys.readouterr().err == ""


def test_one_row_shared_by_two_image_ids_gives_each_its_own_row(tmp_path):
    features = torch.randn(2, 4)
    captions = [{"image_id": 7, "caption": "a", "clip_embedding": 1}, {"image_id": 8, "caption": "b",
                                                                         "clip_embedding": 1}]
    with open(tmp_path / "f.pkl", "wb") as f:
        pickle.dump({"clip_embedding": features, "captions": captions}, f)
    data = read_features(tmp_path / "f.pkl")
    assert torch.equal(data["clip_embedding"], features[[1, 1]])
    assert [c["clip_embedding"] for c in data["captions"]] == [0, 1]


def test_different_features_under_one_image_id_are_an_error(tmp_path):
    path, _ = original_pickle(tmp_path / "orig.pkl", n_images=3)
    with open(path, "rb") as f:
        data = pickle.load(f)
    data["clip_embedding"][7] += 1.0  # caption 7 (image 1001) now holds another image's features
    with open(path, "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(FeaturesError, match=r"orig.pkl: captions\[5\] and captions\[7\] have the same image_id "
                                            r"1001 but their 'clip_embedding' rows \(5 and 7\) hold different"):
        read_features(path)


def test_val_fraction_holds_out_images_and_evaluation_has_every_reference(tmp_path):
    path, _ = original_pickle(tmp_path / "orig.pkl")
    data = read_features(path)
    table = caption_table_from_features(data, path)
    train_ids, val_ids = split_by_image(table, 0.2, seed=0)
    image_of = [c["image_id"] for c in data["captions"]]
    train_images, val_images = {image_of[i] for i in train_ids}, {image_of[i] for i in val_ids}
    assert len(val_images) == 4 and len(train_images) == 16 and not train_images & val_images
    assert len(train_ids) == 80 and len(val_ids) == 20

    val = FeatureCaptionDataset(data["clip_embedding"], table, None, val_ids)
    images = evaluation.select_eval_images(val, 10)
    assert len(images.ids) == 4
    assert all(len(refs) == PER_IMAGE for refs in images.references.values())
    for row, refs in images.references.items():
        assert refs == [f"image {row} caption {k}" for k in range(PER_IMAGE)]


def test_predict_features_writes_one_caption_per_image_that_evaluate_scores(tmp_path, tokenizer):
    path, _ = original_pickle(tmp_path / "orig.pkl")
    tiny_captioner(tokenizer).save_pretrained(tmp_path / "export", tokenizer)
    out = tmp_path / "predictions.json"
    assert predict.main(["--checkpoint", str(tmp_path / "export"), "--features", str(path), "--out", str(out),
                         "--beam_size", "2", "--max_length", "6"]) == 0
    predictions = json.loads(out.read_text())
    assert [p["image_id"] for p in predictions] == [1000 + i for i in range(N_IMAGES)]

    annotations = {"images": [{"id": 1000 + i, "file_name": f"{i}.jpg"} for i in range(N_IMAGES)],
                   "annotations": [{"id": i * PER_IMAGE + k, "image_id": 1000 + i,
                                    "caption": f"image {i} caption {k}"}
                                   for i in range(N_IMAGES) for k in range(PER_IMAGE)]}
    (tmp_path / "captions.json").write_text(json.dumps(annotations))
    report = evaluate.main(["--predictions", str(out), "--annotations", str(tmp_path / "captions.json"),
                            "--metrics", "BLEU", "--allow_empty", "--out_dir", str(tmp_path / "eval")])
    assert report["num_images"] == N_IMAGES and np.isfinite(report["metrics"]["Bleu_4"])


def test_features_with_nan_or_inf_name_their_rows(tmp_path):
    features = torch.randn(6, 4)
    features[2, 1], features[4, 0] = float("nan"), float("inf")
    captions = [{"image_id": i, "caption": "x", "clip_embedding": i} for i in range(6)]
    with open(tmp_path / "f.pkl", "wb") as f:
        pickle.dump({"clip_embedding": features, "captions": captions}, f)
    with pytest.raises(FeaturesError, match=r"f.pkl: 'clip_embedding' row\(s\) \[2, 4\] \(2 in all\) hold nan or inf "
                                            r"values; extract those images again"):
        read_features(tmp_path / "f.pkl")


def test_train_val_fraction_and_its_evaluation_see_images(tmp_path, gpt2_dir):
    """Through train.py's flags: --val_fraction 0.2 of 20 images holds out 4 images (all their 20 captions), and
    the training-time evaluation captions those 4 images, each against its 5 references."""
    path, _ = original_pickle(tmp_path / "orig.pkl")
    train.main(train_args(path, tmp_path / "run", gpt2_dir, "--epochs", 1, "--val_fraction", 0.2, "--eval_every", 1,
                          "--eval_images", 10, "--bs", 8))
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "eval_cider" in r]
    assert [r["eval_images"] for r in evaluations] == [4]
