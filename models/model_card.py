"""The model card of an export directory (its README.md): the Hub's metadata header (huggingface_hub's
ModelCardData) and what a reader of the model page needs: the parts, how to load it, what it was trained on and
with which command, and its scores when they were measured. Rendered from the export's config alone, so
`hf upload user/name DIR` gives a complete page and a scorer can rewrite it with its figures."""
import json
from pathlib import Path
from typing import Dict, Optional

from huggingface_hub import ModelCardData

from models.checkpoint_io import atomic_write

CARD_FILE = "README.md"
LIBRARY_NAME = "tini-tiny-captioner"
SCORE_LABELS = {"Bleu_1": "BLEU-1", "Bleu_4": "BLEU-4", "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr",
                "SPICE": "SPICE", "eval_cider": "CIDEr", "eval_bleu4": "BLEU-4"}


# How a model card names the decoder's architecture (its model_type otherwise).
DECODER_NAMES = {"gpt2": "GPT-2", "llama": "LLaMA", "qwen2": "Qwen2", "qwen3": "Qwen3", "gpt_neox": "GPT-NeoX",
                 "opt": "OPT"}


def render_model_card(config: Dict, scores: Optional[Dict[str, float]] = None, scored_on: str = "") -> str:
    """README.md text for an export whose config.json holds `config` (CaptionerConfig.to_dict()); `scores` (COCO
    metric names) and `scored_on` (what was captioned) add the evaluation section."""
    training = config.get("training") or {}
    encoder = config.get("encoder") or {}
    decoder_type = (config.get("decoder") or {}).get("model_type", "gpt2")
    data = ModelCardData(library_name=LIBRARY_NAME, pipeline_tag="image-to-text", license=training.get("license"),
                         tags=["image-captioning", "clipcap", decoder_type])
    parts = (f"a {encoder.get('name', 'timm')} image encoder ({encoder.get('feature_type', 'pooled')} features"
             f"{', trained with the model and held in this export' if config.get('encoder_in_checkpoint') else ''}"
             f"), a {config['mapping_type']} mapping network to {config['prefix_length']} prefix embeddings and a "
             f"{DECODER_NAMES.get(decoder_type, decoder_type)} decoder from {config.get('gpt2')}")
    lines = ["---", data.to_yaml(), "---", "", "# Image captioner (ClipCap-style)", "",
             f"An image captioner in the manner of ClipCap (arXiv 2111.09734): {parts}. It writes captions with beam "
             f"search, greedy decoding or nucleus sampling.", "", "## Use", "", "```python",
             "from captioning.inference import Captioner", "",
             'captioner = Captioner.from_pretrained("user/name")  # this repository, or its local directory',
             'print(captioner.caption("photo.jpg"))', "```", "",
             "or `python predict.py --checkpoint user/name --image photo.jpg` (tini-tiny-captioner).", "",
             "## Training", ""]
    if training:
        lines += [f"- data: {training.get('data')} ({training.get('kind', 'features')}"
                  + (f", {training['num_captions']:,} captions" if training.get("num_captions") else "") + ")",
                  f"- stage: {training.get('stage', 'cross-entropy')}", "", "```bash", training.get("command", ""),
                  "```"]
    elif config.get("source") == "original":
        lines += ["Converted from a checkpoint of the original ClipCap / Tini-Tiny code (convert_checkpoint.py)."]
    else:
        lines += ["Not recorded."]
    if scores:
        lines += ["", "## Evaluation", "", f"Scored on {scored_on or 'held-out images'} with the COCO caption "
                  f"metrics (pycocoevalcap):", "", "| metric | score |", "| --- | --- |"]
        lines += [f"| {SCORE_LABELS.get(k, k)} | {v:.2f} |" for k, v in scores.items() if isinstance(v, (int, float))]
    lines += ["", "## License", "", f"{training.get('license') or 'not given'}", ""]
    return "\n".join(lines)


def write_scores(directory, scores: Dict[str, float], scored_on: str) -> Path:
    """Rewrite a local export's model card with its scores (evaluate.py --checkpoint, train.py's best/)."""
    path = Path(directory) / CARD_FILE
    config = json.loads((Path(directory) / "config.json").read_text())
    with atomic_write(path) as tmp:
        tmp.write_text(render_model_card(config, scores, scored_on), encoding="utf-8")
    return path
