"""A local web page that captions images with an export (Gradio): `make app` after `make demo`.

    python app.py                                         # the export make demo wrote, on http://127.0.0.1:7860
    python app.py --checkpoint checkpoints/coco_prefix_latest --port 8080
    python app.py --checkpoint user/name                  # a Hugging Face Hub repository
    python app.py --quantize int8                         # int8 weights, on a CPU

Upload or drop images (or pick an example), choose the decoding, and read each image's captions and scores; a
second tab captions many files into the COCO results JSON and the CSV that predict.py writes. A model trained on
the shapes dataset also gets a sketch pad. The page names the checkpoint, its parts, and the device and precision.
The page is captioning/web.py's; this script loads the export and serves it.
"""
import argparse
import sys
import tempfile
from pathlib import Path

from captioning.cli import POSITIVE, add_precision_argument, add_quantize_argument, device_name, integer, number
from captioning.configs import DEMO_EXPORT, AppConfig, defaults

EXAMPLES_SEED = 7  # the shapes examples a page offers: the same scenes on every start


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="export directory or Hub repository id (default: the one make demo wrote, "
                                        "%(default)s)")
    p.add_argument("--host", help="address to serve on (default %(default)s: this machine only)")
    p.add_argument("--port", type=integer(1, 65535), help="(default %(default)s)")
    p.add_argument("--share", action="store_true", help="also serve through a public Gradio link (off by default)")
    p.add_argument("--device", type=device_name, help="default: cuda when available")
    add_precision_argument(p, what="precision of the model while captioning")
    add_quantize_argument(p, what="weights of the model while captioning")
    p.add_argument("--max_file_mb", type=number(0, low_open=True), help="largest upload accepted (default %(default)s)")
    p.add_argument("--examples", type=POSITIVE, help="example images offered (default %(default)s)")
    p.set_defaults(**defaults(AppConfig))
    return p


def example_images(captioner, count: int):
    """Test scenes drawn by the shapes generator for a model trained on the shapes dataset (its export records the
    dataset's name, and nothing outside the export is read), else scikit-image's sample photos."""
    from PIL import Image

    from captioning.data import shapes
    folder = Path(tempfile.mkdtemp(prefix="captioner-examples-"))
    if (captioner.model.config.training or {}).get("dataset") == shapes.NAME:
        data = shapes.generate(folder, num_train=0, num_val=0, num_test=count, seed=EXAMPLES_SEED)
        return [str(p) for p in sorted((data / "images").glob("test_*"))]
    from skimage import data
    names = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")[:count]
    for name in names:
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.png")
    return [str(folder / f"{name}.png") for name in names]


def main(argv=None) -> int:
    """Serve the page until interrupted; returns the exit status (2 when the export cannot be loaded)."""
    config = AppConfig(**vars(build_parser().parse_args(argv)))
    from captioning import runtime  # torch, transformers and gradio: after the flags
    from captioning.data import shapes
    from captioning.inference import Captioner
    from captioning.web import PageConfig, build_page, server_upload_limit
    from models.checkpoint_io import CheckpointError
    try:
        captioner = Captioner.from_pretrained(config.checkpoint, precision=config.precision, quantize=config.quantize,
                                              device=config.device or runtime.default_device(config.quantize))
    except (CheckpointError, ValueError) as e:
        hint = " (run make demo first)" if isinstance(e, CheckpointError) and config.checkpoint == DEMO_EXPORT else ""
        print(f"app.py: error: {e}{hint}", file=sys.stderr)
        return 2
    training = captioner.model.config.training or {}
    page = PageConfig(max_file_mb=config.max_file_mb, examples=example_images(captioner, config.examples),
                      sketch=training.get("dataset") == shapes.NAME)
    build_page(captioner, config.checkpoint, page).queue().launch(
        server_name=config.host, server_port=config.port, share=config.share, max_file_size=server_upload_limit(page))
    return 0


if __name__ == "__main__":
    sys.exit(main())
