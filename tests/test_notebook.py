"""notebooks/transformer_inference.ipynb runs top to bottom against a tiny export, in a kernel started from this
interpreter (no Jupyter setup needed beyond the installed requirements), and shows what the Captioner gives."""
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
import skimage.data
import torch
from nbclient import NotebookClient

from builders import tiny_captioner
from models import EncoderConfig, ImageEncoder
from predict import Captioner

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "transformer_inference.ipynb"
KERNEL = "tinytiny-test-python"


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    encoder = ImageEncoder(EncoderConfig(name="test_resnet", weights="random", image_size=32))
    path = tmp_path_factory.mktemp("notebook") / "export"
    tiny_captioner(tokenizer, encoder).save_pretrained(path, tokenizer)
    return path


@pytest.fixture
def kernel_env(tmp_path, monkeypatch, tiny_export):
    """A kernelspec for this interpreter in a temporary Jupyter path, and the notebook's inputs as variables."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python (tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "matplotlib"))
    monkeypatch.setenv("CAPTIONER_CHECKPOINT", str(tiny_export))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny model: threads only add synchronisation
    monkeypatch.delenv("CAPTIONER_IMAGES", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_notebook_runs_and_shows_the_captioner_captions(kernel_env, tiny_export):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name=KERNEL, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
                   ).execute()  # raises CellExecutionError naming the cell if any cell fails

    def text_of(fragment):
        cell = next(c for c in nb.cells if c.cell_type == "code" and fragment in c.source)
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "camera"]
    expected = Captioner.from_pretrained(tiny_export).caption([getattr(skimage.data, n)() for n in names])
    assert text_of("beam_captions = ").splitlines() == [f"{n}: {c}" for n, c in zip(names, expected)]
    figure = next(c for c in nb.cells if c.cell_type == "code" and "plt.subplots" in c.source)
    assert any("image/png" in o.get("data", {}) for o in figure.outputs)
    assert len(text_of("captioner.predict([images[0]])").splitlines()) == 5  # every beam with its score
    assert os.environ["CAPTIONER_CHECKPOINT"] in text_of("Captioner.from_pretrained(CHECKPOINT")
