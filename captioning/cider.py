"""CIDEr-D and BLEU-4 rewards in-process, for CIDEr optimisation (train.py --scst): no Java per step.

`CiderD` is the COCO caption toolkit's CIDEr (pycocoevalcap's `Cider`, which is CIDEr-D: n-grams 1-4, tf-idf
vectors, counts clipped to the reference's, a Gaussian length penalty with sigma 6, x10), with the document
frequencies computed once from the training references, as self-critical training does, instead of from each
batch. `tokenize` stands in for the toolkit's Stanford PTB tokenizer (a Java process per call): NLTK's Treebank
tokenizer, which follows the same conventions, adjusted where the Stanford one differs (brackets become
-lrb- and the like, a word's final period is split off); tests compare the two on captions and on punctuation.
"""
import math
from collections import Counter
from typing import Dict, Hashable, List, Mapping, Sequence, Tuple

import numpy as np
from nltk.tokenize import TreebankWordTokenizer

# pycocoevalcap's PTBTokenizer removes these tokens (its -lowerCase run keeps the bracket escapes, lower-cased)
PUNCTUATION = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}
BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "inc", "ltd", "co", "no", "mt"}
_TREEBANK = TreebankWordTokenizer()


def _split_period(token: str) -> List[str]:
    """Stanford's tokenizer ends a word's final period as its own token, except in abbreviations (u.s., e.g.)."""
    stem = token[:-1]
    if len(token) > 1 and token.endswith(".") and "." not in stem and stem not in ABBREVIATIONS:
        return [stem, "."]
    return [token]


def tokenize(caption: str) -> str:
    """A caption as the evaluation sees it: lower-cased, PTB-tokenised, punctuation removed, space-joined."""
    tokens = []
    for token in _TREEBANK.tokenize(caption.lower()):
        tokens.extend(_split_period(BRACKETS.get(token, token)))
    return " ".join(t for t in tokens if t not in PUNCTUATION)


def ngram_counts(words: Sequence[str], n: int = 4) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """CIDEr-D of candidate captions against the references of one image, with fixed document frequencies.

    `references` maps every image (key) to its reference captions; they give the document frequencies (an
    n-gram's document count is the number of images whose references contain it) and the log of the number of
    images, exactly as pycocoevalcap derives both from the corpus it is given. `tokenized=True` takes captions
    already tokenised (space-separated), as pycocoevalcap's `Cider.compute_score` does.
    """

    def __init__(self, references: Mapping[Hashable, Sequence[str]], n: int = 4, sigma: float = 6.0,
                 tokenized: bool = False):
        if not references:
            raise ValueError("CIDEr-D needs reference captions to compute document frequencies")
        self.n, self.sigma, self.tokenized = n, sigma, tokenized
        counts = {key: [ngram_counts(self._words(r), n) for r in refs] for key, refs in references.items()}
        self.document_frequency = Counter(g for refs in counts.values() for g in {g for c in refs for g in c})
        self.ref_len = math.log(float(len(counts)))
        self.reference_vectors = {key: [self._vector(c) for c in refs] for key, refs in counts.items()}

    def _words(self, caption: str) -> List[str]:
        return (caption if self.tokenized else tokenize(caption)).split()

    def _vector(self, counts: Counter) -> Tuple[List[Dict], np.ndarray, int]:
        """tf-idf weights per n-gram order, their norms, and the toolkit's length: its count of bigrams."""
        vec = [dict() for _ in range(self.n)]
        norm = np.zeros(self.n)
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = weight = tf * (self.ref_len - math.log(max(1.0, self.document_frequency[gram])))
            norm[k] += weight * weight
        return vec, np.sqrt(norm), sum(tf for gram, tf in counts.items() if len(gram) == 2)

    def _similarity(self, hyp, ref) -> np.ndarray:
        (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
        val = np.zeros(self.n)
        for k in range(self.n):
            for gram, w in vec_h[k].items():
                r = vec_r[k].get(gram, 0.0)
                val[k] += min(w, r) * r
            if norm_h[k] != 0 and norm_r[k] != 0:
                val[k] /= norm_h[k] * norm_r[k]
        return val * math.exp(-((len_h - len_r) ** 2) / (2 * self.sigma ** 2))

    def score(self, key: Hashable, candidates: Sequence[str]) -> np.ndarray:
        """CIDEr-D of each candidate against the references of image `key` (the toolkit's per-image score)."""
        refs = self.reference_vectors[key]
        out = np.empty(len(candidates))
        for i, candidate in enumerate(candidates):
            hyp = self._vector(ngram_counts(self._words(candidate), self.n))
            out[i] = 10.0 * sum(self._similarity(hyp, ref) for ref in refs).mean() / len(refs)
        return out


def bleu4(references: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
    """Sentence BLEU-4 of each candidate against the references (tokenised here), as pycocoevalcap's BleuScorer
    gives it per image (closest reference length, its tiny smoothing)."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    refs = [tokenize(r) for r in references]
    scorer = BleuScorer(n=4)
    for candidate in candidates:
        scorer += (tokenize(candidate), refs)
    _, per_sentence = scorer.compute_score(option="closest", verbose=0)
    return np.asarray(per_sentence[3], dtype=np.float64)

