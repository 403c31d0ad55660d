"""captioning.metrics against direct pycocoevalcap and NLTK calls. The Java scorers cost seconds per call, so
each is run once per module through fixtures."""
import math

import pytest

from builders import PREDICTIONS, REFERENCES
from captioning import metrics
from captioning.metrics import JavaNotFoundError, MetricsError, original_bleu, ptb_tokenize, score_captions


@pytest.fixture(scope="module")
def ours():
    return score_captions(PREDICTIONS, REFERENCES, metrics=("BLEU", "METEOR", "ROUGE_L", "CIDEr"))


@pytest.fixture(scope="module")
def direct():
    """The COCO caption toolkit's own pipeline (as in pycocoevalcap.eval.COCOEvalCap.evaluate)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in REFERENCES.items()})
    res = tokenizer.tokenize({k: [{"caption": v}] for k, v in PREDICTIONS.items()})
    out = {}
    for scorer, names in ((Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Meteor(), ["METEOR"]),
                          (Rouge(), ["ROUGE_L"]), (Cider(), ["CIDEr"])):
        score, per_image = scorer.compute_score(gts, res) if names[0] != "Bleu_1" else \
            scorer.compute_score(gts, res, verbose=0)
        if len(names) == 1:
            score, per_image = [score], [per_image]
        for name, s, p in zip(names, score, per_image):
            out[name] = (s, dict(zip(gts, p)))
    return out


def test_scores_equal_direct_pycocoevalcap(ours, direct):
    assert set(ours["metrics"]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    for name, (score, _) in direct.items():
        assert ours["metrics"][name] == pytest.approx(100 * score, rel=1e-12, abs=1e-12), name
    for image_id in PREDICTIONS:
        for name in ("Bleu_4", "CIDEr"):
            assert ours["per_image"][image_id][name] == pytest.approx(100 * direct[name][1][image_id], abs=1e-9)
    assert ours["num_images"] == 6 and ours["notes"] == []
    assert 20 < ours["metrics"]["CIDEr"] and 10 < ours["metrics"]["Bleu_4"] < 100


def test_perfect_predictions_score_bleu4_100():
    perfect = {k: refs[2] for k, refs in REFERENCES.items()}
    result = score_captions(perfect, REFERENCES, metrics=("BLEU", "CIDEr"))
    for n in (1, 2, 3, 4):
        assert result["metrics"][f"Bleu_{n}"] == pytest.approx(100.0, abs=1e-4)
    assert all(s["Bleu_4"] == pytest.approx(100.0, abs=1e-4) for s in result["per_image"].values())


def test_shuffled_captions_score_far_lower(ours):
    ids = list(PREDICTIONS)
    shuffled = {k: PREDICTIONS[ids[(i + 1) % len(ids)]] for i, k in enumerate(ids)}
    result = score_captions(shuffled, REFERENCES, metrics=("BLEU", "CIDEr"))
    assert result["metrics"]["CIDEr"] < 0.1 * ours["metrics"]["CIDEr"]
    assert result["metrics"]["Bleu_4"] < 0.1 * ours["metrics"]["Bleu_4"]


def test_empty_caption_scores_zero_and_subset_is_scored():
    result = score_captions({1: "", 2: PREDICTIONS[2], 3: PREDICTIONS[3]}, REFERENCES, metrics=("BLEU", "CIDEr"))
    assert result["num_images"] == 3
    assert result["per_image"][1] == {"Bleu_4": 0.0, "CIDEr": 0.0}
    assert result["per_image"][2]["CIDEr"] > 0


def test_ptb_tokenize_equals_pycocoevalcap_and_keeps_lines_aligned():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = {"a": ["A man, riding a horse.", "He said \"hi\" -- twice!", "Café (in) Paris..."],
                7: ["It's a dog's toy; really?", "  spaced   out  "]}
    expected = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    assert ptb_tokenize(captions) == expected
    assert expected[7][0] == "it 's a dog 's toy really"
    # pycocoevalcap's own wrapper shifts captions to other images on '\r' and U+2028; ours keeps them in place.
    tricky = ptb_tokenize({1: ["a cat\ron a mat"], 2: ["two\u2028dogs"], 3: ["a bus"]})
    assert tricky == {1: ["a cat on a mat"], 2: ["two dogs"], 3: ["a bus"]}


def test_java_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(JavaNotFoundError, match="Java was not found on PATH.*PTB tokenizer and METEOR"):
        score_captions(PREDICTIONS, REFERENCES, metrics=("BLEU",))


def test_spice_skipped_with_a_note_when_corenlp_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics, "_pycocoevalcap_dir", lambda: str(tmp_path))
    assert "SPICE skipped: it needs Stanford CoreNLP 3.6.0" in metrics.spice_status()
    monkeypatch.setattr(metrics, "spice_status", lambda: "SPICE skipped: reason")
    monkeypatch.setattr(metrics, "ptb_tokenize", lambda caps: {k: [c.lower() for c in v]
                                                                        for k, v in caps.items()})
    result = score_captions(PREDICTIONS, REFERENCES, metrics=("CIDEr", "SPICE"))
    assert result["notes"] == ["SPICE skipped: reason"] and set(result["metrics"]) == {"CIDEr"}


def test_spice_failure_becomes_a_note(monkeypatch):
    import subprocess

    import pycocoevalcap.spice.spice as spice

    class FailingSpice:
        def compute_score(self, gts, res):
            raise subprocess.CalledProcessError(1, ["java", "-jar", "spice-1.0.jar"])

    monkeypatch.setattr(metrics, "spice_status", lambda: None)
    monkeypatch.setattr(spice, "Spice", FailingSpice)
    monkeypatch.setattr(metrics, "ptb_tokenize", lambda caps: {k: [c.lower() for c in v]
                                                                        for k, v in caps.items()})
    result = score_captions(PREDICTIONS, REFERENCES, metrics=("BLEU", "SPICE"))
    assert "Bleu_4" in result["metrics"] and "SPICE" not in result["metrics"]
    assert len(result["notes"]) == 1 and result["notes"][0].startswith("SPICE failed (Command")


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown metric"):
        score_captions(PREDICTIONS, REFERENCES, metrics=("BLEU", "WER"))
    with pytest.raises(MetricsError, match=r"have no references, e.g. image ids \[99\]"):
        score_captions({99: "a cat"}, REFERENCES)
    with pytest.raises(MetricsError, match="image 1: references must be a non-empty list"):
        score_captions({1: "a cat"}, {1: []})
    with pytest.raises(MetricsError, match="no predictions"):
        score_captions({}, REFERENCES)


def test_original_bleu_reproduces_nltk():
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    refs = {1: REFERENCES[1] + ["A man riding a horse on the beach."], 2: REFERENCES[2]}
    beams = {1: ["A man riding a horse on the beach.", "A man on a horse."],
             2: ["Two dogs playing with a frisbee.", "Two dogs playing with a frisbee in the grass."]}
    result = original_bleu(beams, refs)
    smooth = SmoothingFunction().method4
    expected = {k: max(sentence_bleu([r.split() for r in refs[k][:5]], b.split(), smoothing_function=smooth)
                       for b in beams[k]) for k in beams}
    assert result["per_image"] == pytest.approx({k: 100 * v for k, v in expected.items()})
    assert result["Bleu_4"] == pytest.approx(50 * (expected[1] + expected[2]))
    # Fixed values: the 6th reference (an exact match) is ignored, and image 2's best is its second beam.
    assert result["per_image"][1] == pytest.approx(46.7138, abs=1e-3)
    assert result["per_image"][2] == pytest.approx(100.0)
    assert math.isnan(original_bleu({}, refs)["Bleu_4"])
