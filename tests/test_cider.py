"""The in-process CIDEr-D and BLEU-4 rewards of CIDEr optimisation against the COCO caption toolkit's."""
import random

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from captioning.cider import CiderD, bleu4, tokenize
from captioning.data.shapes import captions_for, random_scene
from captioning.metrics import ptb_tokenize

TRICKY = ["A man's dog, running (fast) on the \"beach\".", "Two dogs don't play...", "a red-ish cat; e.g. big!",
          "A man.  A dog", "A [big] {cat} ok", "It's 5:30 pm & 3/4 done -- yes", "a cat?", "dogs' toys",
          "I can't, I won't, gonna", "A 5.5 inch U.S. flag", "a b-c - d", "the end .", "Mr. Smith's cat sits.",
          "\"Quoted\" words here", "a dog ; a cat : ok", "A red circle to the left of a blue square."]


def corpus(images=25, seed=0):
    """Shapes scenes with up to five paraphrases each (references) and one more as the candidate."""
    rng = random.Random(seed)
    refs, cands = {}, {}
    for i in range(images):
        captions = captions_for(random_scene(rng), rng, count=6, either_order=True)
        refs[i], cands[i] = captions[:-1], captions[-1]
    return refs, cands


def test_tokenize_is_the_toolkits_ptb_tokenizer():
    refs, _ = corpus(10)
    cases = TRICKY + [c for captions in refs.values() for c in captions]
    java = ptb_tokenize({i: [c] for i, c in enumerate(cases)})
    assert [tokenize(c) for c in cases] == [java[i][0] for i in range(len(cases))]


def test_cider_d_equals_pycocoevalcap_with_the_corpus_frequencies():
    refs, cands = corpus()
    cands[3] = "a purple thing"  # shares almost nothing
    cands[4] = refs[4][0]  # equal to a reference
    gts = {i: [tokenize(r) for r in rs] for i, rs in refs.items()}
    res = {i: [tokenize(c)] for i, c in cands.items()}
    mean, per_image = Cider().compute_score(gts, res)
    ours = CiderD(gts, tokenized=True)
    scores = np.array([ours.score(i, res[i])[0] for i in sorted(refs)])
    np.testing.assert_allclose(scores, per_image, rtol=1e-12, atol=1e-12)
    assert scores.mean() == pytest.approx(mean, rel=1e-12)
    # raw captions are tokenised the same way
    np.testing.assert_allclose(CiderD(refs).score(4, [cands[4], cands[3]]), [per_image[4], per_image[3]],
                               rtol=1e-12)


def test_a_reference_beats_its_shuffled_words_and_bleu_matches_the_toolkit():
    refs, cands = corpus()
    scorer = CiderD(refs)
    words = refs[0][1].split()
    shuffled = " ".join(random.Random(1).sample(words, len(words)))
    exact, mixed, empty = scorer.score(0, [refs[0][1], shuffled, ""])
    assert exact > mixed > empty == 0.0
    gts = {i: [tokenize(r) for r in rs] for i, rs in refs.items()}
    _, per_order = Bleu(4).compute_score(gts, {i: [tokenize(c)] for i, c in cands.items()}, verbose=0)
    ours = [bleu4(refs[i], [cands[i]])[0] for i in sorted(refs)]
    np.testing.assert_allclose(ours, per_order[3], rtol=1e-12)


def test_cider_d_needs_references():
    with pytest.raises(ValueError, match="needs reference captions"):
        CiderD({})
