"""COCO caption metrics, computed as the COCO caption toolkit (pycocoevalcap) computes them.

`score_captions` is the one entry point: captions and references are lower-cased and tokenised with the
toolkit's Stanford PTB tokenizer (punctuation removed), then scored with BLEU-1..4, METEOR, ROUGE-L,
CIDEr (the toolkit's CIDEr is CIDEr-D) and, when its models are installed, SPICE. Every score is returned
in the units papers print (x100). `original_bleu` reproduces the original notebook's number, which is not
comparable with published results.
"""
import math
import os
import shutil
import subprocess
import warnings
from typing import Dict, Hashable, List, Mapping, Optional, Sequence

from tqdm import tqdm

from captioning.choices import ALL_METRICS

SCORE_KEYS = {"BLEU": ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"], "METEOR": ["METEOR"], "ROUGE_L": ["ROUGE_L"],
              "CIDEr": ["CIDEr"], "SPICE": ["SPICE"]}
PER_IMAGE_KEYS = ("Bleu_4", "CIDEr")  # the per-image scores kept in results
JAVA_METRICS = ("METEOR", "SPICE")
SPICE_CORENLP = "stanford-corenlp-3.6.0"  # SPICE 1.0 needs this CoreNLP release (jar + models jar) in spice/lib


class MetricsError(RuntimeError):
    """A metric that could not be computed: Java missing, a scorer that failed, inputs that do not match."""


class JavaNotFoundError(MetricsError):
    """No `java` on the PATH: BLEU, METEOR, ROUGE-L and CIDEr need its PTB tokenizer."""


def require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(
            "Java was not found on PATH. The COCO caption toolkit (pycocoevalcap) runs its PTB tokenizer and "
            "METEOR (and SPICE) on Java: install a Java runtime (Debian/Ubuntu: `sudo apt install "
            "default-jre-headless`; conda: `conda install -c conda-forge openjdk`), then check `java -version`.")
    return java


def require_toolkit(nltk: bool = False) -> None:
    """Fail early (before any captioning) when the metrics cannot run: Java, pycocoevalcap, and NLTK if asked."""
    packages = ["pycocoevalcap"] + (["nltk"] if nltk else [])
    for package in packages:
        try:
            __import__(package)
        except ImportError as e:
            raise MetricsError(f"{package} is not installed: `pip install {package}` "
                               f"(requirements.txt lists it)") from e
    require_java()


def _pycocoevalcap_dir() -> str:
    import pycocoevalcap

    return list(pycocoevalcap.__path__)[0]


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> Dict[Hashable, List[str]]:
    """{key: [caption, ...]} -> {key: [tokenised caption, ...]}, exactly as pycocoevalcap's PTBTokenizer.

    The same jar, flags and punctuation list, but run in one Java process over stdin: pycocoevalcap's own
    wrapper writes its temporary file into the package directory (which fails on read-only installs) and
    pairs output lines with captions without checking their number, so a caption holding a line separator
    other than '\\n' (such as '\\r' or U+2028) would shift every later caption onto the wrong image.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer

    keys = [k for k, caps in captions.items() for _ in caps]
    # str.split() splits on every Unicode line break as well, so each caption stays on one line.
    lines = [" ".join(c.split()) for caps in captions.values() for c in caps]
    if not lines:
        return {k: [] for k in captions}
    jar = os.path.join(_pycocoevalcap_dir(), "tokenizer", ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    cmd = [require_java(), "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
    proc = subprocess.run(cmd, input="\n".join(lines).encode("utf-8"), capture_output=True)
    if proc.returncode != 0:
        raise MetricsError(f"the PTB tokenizer (Java) failed with exit code {proc.returncode}: "
                           f"{proc.stderr.decode('utf-8', 'replace').strip()[-2000:]}")
    out = proc.stdout.decode("utf-8").split("\n")
    if len(out) > len(lines) and not any(out[len(lines):]):
        out = out[:len(lines)]
    if len(out) != len(lines):
        raise MetricsError(f"the PTB tokenizer returned {len(out)} lines for {len(lines)} captions")
    punctuation = set(ptbtokenizer.PUNCTUATIONS)
    result: Dict[Hashable, List[str]] = {k: [] for k in captions}
    for key, line in zip(keys, out):
        result[key].append(" ".join(w for w in line.rstrip().split(" ") if w not in punctuation))
    return result


def spice_status() -> Optional[str]:
    """None when SPICE can run; otherwise why it cannot, in one line."""
    lib = os.path.join(_pycocoevalcap_dir(), "spice", "lib")
    missing = [f"{SPICE_CORENLP}{suffix}.jar" for suffix in ("", "-models")
               if not os.path.isfile(os.path.join(lib, f"{SPICE_CORENLP}{suffix}.jar"))]
    if missing:
        return (f"SPICE skipped: it needs Stanford CoreNLP 3.6.0 ({', '.join(missing)} not in {lib}); "
                f"download it once with `python -m pycocoevalcap.spice.get_stanford_models`")
    if shutil.which("java") is None:
        return "SPICE skipped: Java was not found on PATH"
    return None


def _check_inputs(predictions: Mapping, references: Mapping) -> None:
    if not predictions:
        raise MetricsError("no predictions to score")
    missing = [k for k in predictions if k not in references]
    if missing:
        raise MetricsError(f"{len(missing)} prediction(s) have no references, e.g. image ids {missing[:5]}")
    for key, caption in predictions.items():
        if not isinstance(caption, str):
            raise MetricsError(f"image {key!r}: the prediction must be a string, got {type(caption).__name__}")
        refs = references[key]
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
            raise MetricsError(f"image {key!r}: references must be a non-empty list of non-empty strings")


def _run_scorer(name: str, gts: Dict, res: Dict):
    if name == "BLEU":
        from pycocoevalcap.bleu.bleu import Bleu

        return Bleu(4).compute_score(gts, res, verbose=0)
    if name == "ROUGE_L":
        from pycocoevalcap.rouge.rouge import Rouge

        return Rouge().compute_score(gts, res)
    if name == "CIDEr":
        from pycocoevalcap.cider.cider import Cider

        return Cider().compute_score(gts, res)
    if name == "METEOR":
        return _meteor(gts, res)
    return _spice(gts, res)


def _meteor(gts: Dict, res: Dict):
    from pycocoevalcap.meteor.meteor import Meteor

    require_java()
    meteor = Meteor()
    try:
        return meteor.compute_score(gts, res)
    except (ValueError, BrokenPipeError) as e:  # the Java process died: its answers are missing
        meteor.meteor_p.kill()
        stderr = meteor.meteor_p.stderr.read().decode("utf-8", "replace").strip()[-2000:]
        raise MetricsError(f"METEOR (Java) failed: {stderr or e}") from e
    finally:
        del meteor


def _spice(gts: Dict, res: Dict):
    from pycocoevalcap.spice.spice import Spice

    try:
        score, per_image = Spice().compute_score(gts, res)
    except (subprocess.CalledProcessError, OSError) as e:
        raise MetricsError(f"SPICE failed ({e}); SPICE 1.0 is known to need Java 8") from e
    return score, [s["All"]["f"] for s in per_image]


def score_captions(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                   metrics: Sequence[str] = ALL_METRICS, progress: bool = False) -> Dict:
    """Score one caption per image against that image's references, as the COCO caption toolkit does.

    predictions: {image_id: caption}; references: {image_id: [reference, ...]} holding every predicted id
    (only the predicted images are scored; CIDEr's document frequencies come from their references, so
    CIDEr on a few hundred images is a rough guide, not a test-set number). An empty caption scores 0.
    metrics: any of ALL_METRICS; SPICE is skipped with a note when its models are not installed, or
    when it fails.

    Returns {"metrics": {"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE": float},
    "per_image": {image_id: {"Bleu_4": float, "CIDEr": float}}, "notes": [str], "num_images": int},
    every score x100 (the units of papers: CIDEr 112.3, not 1.123).
    """
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(ALL_METRICS)}")
    _check_inputs(predictions, references)
    require_toolkit()
    ids = list(predictions)
    notes: List[str] = []
    todo = [m for m in ALL_METRICS if m in metrics]
    if "SPICE" in todo and (reason := spice_status()) is not None:
        todo.remove("SPICE")
        notes.append(reason)
    captions = {("ref", k): list(references[k]) for k in ids}
    captions.update({("pred", k): [predictions[k]] for k in ids})
    tokens = ptb_tokenize(captions)
    gts = {k: tokens[("ref", k)] for k in ids}
    res = {k: tokens[("pred", k)] for k in ids}
    scores: Dict[str, float] = {}
    per_image: Dict[Hashable, Dict[str, float]] = {k: {} for k in ids}
    bar = tqdm(todo, desc="metrics", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        try:
            score, image_scores = _run_scorer(name, gts, res)
        except MetricsError as e:
            if name != "SPICE":
                raise
            notes.append(str(e))
            continue
        if name != "BLEU":  # BLEU alone returns lists, one entry per n-gram order
            score, image_scores = [score], [image_scores]
        for key, value, values in zip(SCORE_KEYS[name], score, image_scores):
            scores[key] = 100.0 * float(value)
            if key in PER_IMAGE_KEYS:
                for image_id, v in zip(ids, values):
                    per_image[image_id][key] = 100.0 * float(v)
    return {"metrics": scores, "per_image": per_image, "notes": notes, "num_images": len(ids)}


def original_bleu(beams: Mapping[Hashable, Sequence[str]], references: Mapping[Hashable, Sequence[str]],
                  num_references: int = 5, progress: bool = False) -> Dict:
    """The original Tini-Tiny notebook's number: NLTK sentence BLEU-4 (smoothing method 4) of each beam
    against the image's first `num_references` references, the best beam per image, averaged over images.
    Captions are split on whitespace, with no lower-casing and no punctuation removal.

    It picks the best of several beams with the references in hand and skips the PTB tokenisation, so it is
    higher than, and not comparable with, the BLEU-4 papers report. Returns {"Bleu_4": mean x100,
    "per_image": {image_id: x100}}.
    """
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smoothing = SmoothingFunction().method4
    per_image = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns on every caption shorter than 4 words
        for image_id, candidates in tqdm(beams.items(), desc="original BLEU-4", disable=not progress):
            refs = [r.split() for r in list(references[image_id])[:num_references]]
            best = max((sentence_bleu(refs, c.split(), smoothing_function=smoothing) if c.split() else 0.0)
                       for c in candidates)
            per_image[image_id] = 100.0 * best
    mean = math.fsum(per_image.values()) / len(per_image) if per_image else float("nan")
    return {"Bleu_4": mean, "per_image": per_image}
