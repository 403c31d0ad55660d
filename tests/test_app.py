"""The web page in a real browser: app.py's page served on a loopback port, driven by headless Chromium
(Debian's package, through Playwright; nothing is downloaded). Without Chromium the tests are skipped with how to
install it, except under CI=true, where they fail."""
import os
import shutil
import socket
from pathlib import Path

import pytest

from captioning.data import shapes
from captioning.data.images import load_image
from captioning.inference import Captioner, DecodingOptions
from captioning.web import (ACCEPTED, PageConfig, build_page, decoding_options, describe, describe_decoder,
                            server_upload_limit)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium as root on a machine without network: no sandbox, no background connections
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def require_chromium():
    if not Path(CHROMIUM).is_file():
        message = "Chromium is not installed: apt-get install chromium (Debian's package) to run the browser tests"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(exports, tmp_path_factory):
    require_chromium()
    captioner = Captioner.from_pretrained(exports["inside"])
    page = PageConfig(max_file_mb=1)
    blocks = build_page(captioner, str(exports["inside"]), page)
    port = free_port()
    blocks.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                          max_file_size=server_upload_limit(page))
    yield captioner, f"http://127.0.0.1:{port}/"
    blocks.close()


@pytest.fixture
def page(served):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(served[1])
        yield page
        browser.close()


def caption_in_page(page, path) -> str:
    page.set_input_files("#upload input[type=file]", str(path))
    page.wait_for_function("name => document.querySelector('#upload').innerText.includes(name)", arg=Path(path).stem)
    page.click("#caption")
    page.wait_for_function("name => document.querySelector('#captions').innerText.includes(name)",
                           arg=Path(path).stem, timeout=60000)
    return page.locator("#captions").inner_text()


def test_the_page_gives_the_captioners_caption(served, page, tmp_path):
    captioner, _ = served
    data = shapes.generate(tmp_path, num_train=0, num_val=0, num_test=2, seed=4, size=48)
    image = data / "images" / "test_000001.png"
    options = decoding_options("beam", 5, 0.8, 1.0, 1, 0, max_length=captioner.fit_max_length(None)[0])
    expected = captioner.predict([load_image(image)], options, progress=False)[0].caption
    assert expected and isinstance(options, DecodingOptions)
    text = caption_in_page(page, image)
    assert expected in text
    header = page.locator("body").inner_text()
    assert "test_resnet" in header and "precision fp32" in header
    assert f"decoder {describe_decoder(captioner.model.gpt)}" in header and "Checkpoint inside" in header
    assert describe_decoder(captioner.model.gpt).startswith("gpt2, 2 layers, ")
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    import numpy as np
    from PIL import Image
    shot = np.asarray(Image.open(tmp_path / "page.png").convert("RGB"))
    assert shot.shape[1] == 1280 and shot.shape[0] >= 1400  # the whole page at the viewport's width
    assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 100  # a rendered page, not a blank one


def test_an_unreadable_upload_is_a_message_and_the_next_one_works(served, page, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    page.set_input_files("#upload input[type=file]", str(broken))
    page.wait_for_function("document.querySelector('#upload').innerText.includes('broken')")
    page.click("#caption")
    page.wait_for_function("document.querySelector('#message').innerText.includes('broken.png:')", timeout=60000)
    message = page.locator("#message").inner_text()
    assert f"broken.png: not an image this page can read; it takes {ACCEPTED}" in message
    assert "Traceback" not in page.locator("body").inner_text()
    assert "Error" not in message and str(tmp_path) not in message and "/gradio/" not in message
    data = shapes.generate(tmp_path / "s", num_train=0, num_val=0, num_test=1, seed=5, size=48)
    image = data / "images" / "test_000001.png"
    captioner = served[0]
    options = decoding_options("beam", 5, 0.8, 1.0, 1, 0, max_length=captioner.fit_max_length(None)[0])
    expected = captioner.predict([load_image(image)], options, progress=False)[0].caption
    assert expected in caption_in_page(page, image)


def test_the_sketch_pad_captions_what_was_drawn(exports):
    """The sketch pad's drawing (Gradio's ImageEditor value) is captioned as the same picture would be."""
    import numpy as np

    from captioning.web import Service
    captioner = Captioner.from_pretrained(exports["inside"])
    service = Service(captioner, PageConfig(sketch=True))
    drawing = np.full((64, 64, 4), 255, dtype=np.uint8)
    drawing[10:30, 10:30] = (255, 0, 0, 255)  # a red square
    controls = ("greedy", 1, 0.8, 1.0, 1, 0)
    expected = captioner.predict([drawing[..., :3]], service.options(*controls), progress=False)[0].caption
    assert service.sketch({"background": None, "layers": [], "composite": drawing}, *controls) == expected
    assert service.sketch({"composite": None}, *controls) == "Draw something first."


class NoProgress:
    def tqdm(self, iterable, desc=None):
        return iterable


def test_many_files_give_predict_pys_json_and_csv(exports, tmp_path):
    """The second tab writes the files predict.py writes (its writers), and lists what it could not read."""
    import csv
    import json

    from captioning.web import Service
    data = shapes.generate(tmp_path, num_train=0, num_val=0, num_test=2, seed=6, size=48)
    (tmp_path / "notes.txt").write_text("not an image")
    paths = sorted(str(p) for p in (data / "images").glob("test_*")) + [str(tmp_path / "notes.txt")]
    captioner = Captioner.from_pretrained(exports["inside"])
    service = Service(captioner, PageConfig())
    (json_file, csv_file), note = service.results_files(paths, progress=NoProgress())
    expected = captioner.predict([load_image(p) for p in paths[:2]],
                                 DecodingOptions(beam_size=5, max_length=service.max_length), progress=False)
    entries = json.loads(Path(json_file).read_text())
    assert [e["caption"] for e in entries] == [r.caption for r in expected]
    assert [e["file_name"] for e in entries] == [Path(p).name for p in paths[:2]]
    rows = list(csv.DictReader(open(csv_file, encoding="utf-8")))
    assert [r["caption"] for r in rows] == [r.caption for r in expected] and {r["rank"] for r in rows} == {"1"}
    assert note.startswith("2 of 3 images captioned.") and "notes.txt:" in note
    assert service.results_files([str(tmp_path / "notes.txt")], progress=NoProgress())[0] is None


def test_a_file_refused_for_its_size_leaves_a_message_that_stays(served, page, tmp_path):
    import numpy as np
    from PIL import Image
    big = tmp_path / "big.png"  # over the page's 1 MB
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 1024 * 1024
    expected = f"big.png: {big.stat().st_size / 2**20:.1f} MB, over this page's limit of 1 MB; it is not captioned"
    page.set_input_files("#upload input[type=file]", str(big))
    page.wait_for_function("text => document.querySelector('#message').innerText.includes(text)", arg=expected,
                           timeout=60000)  # at once, on the upload
    page.wait_for_timeout(6000)  # longer than a notice stays
    assert page.locator("#message").inner_text().strip() == expected
    page.click("#caption")
    page.wait_for_timeout(2000)
    assert page.locator("#message").inner_text().strip() == expected
    assert "at most 1 MB each" in page.locator("#upload").inner_text()
    data = shapes.generate(tmp_path / "s", num_train=0, num_val=0, num_test=1, seed=5, size=48)
    # An upload adds to the selection: the good image is captioned, the message stays while big.png is selected.
    assert "test_000001" in caption_in_page(page, data / "images" / "test_000001.png")
    assert "big" in page.locator("#upload").inner_text()
    assert page.locator("#message").inner_text().strip() == expected


def test_an_export_moved_elsewhere_shows_the_same_page(exports, tmp_path):
    """The header and the examples come from the export alone: a copy elsewhere, whose training data is gone,
    shows the same; a shapes model offers shapes scenes it draws itself."""
    import app
    from models.captioner import ClipCaptionModel
    model = ClipCaptionModel.from_pretrained(exports["inside"])
    model.config.training = {"data": str(tmp_path / "gone" / "captions_train.json"), "dataset": "shapes"}
    tokenizer_source = Captioner.from_pretrained(exports["inside"]).tokenizer
    model.save_pretrained(tmp_path / "here" / "shapes_latest", tokenizer_source)
    shutil.copytree(tmp_path / "here", tmp_path / "moved")
    pages = []
    for where in ("here", "moved"):
        captioner = Captioner.from_pretrained(tmp_path / where / "shapes_latest")
        examples = app.example_images(captioner, 3)
        pages.append((describe(captioner, str(tmp_path / where / "shapes_latest")),
                      [Path(p).read_bytes() for p in examples]))
        assert len(examples) == 3 and all(load_image(p).size == (64, 64) for p in examples)
        assert captioner.caption(examples[0], max_length=5)  # a picture the model can caption
    assert pages[0] == pages[1] and str(tmp_path) not in pages[0][0]
    plain = Captioner.from_pretrained(exports["inside"])
    assert [Path(p).name for p in app.example_images(plain, 2)] == ["astronaut.png", "coffee.png"]


def test_the_size_check_names_each_file_over_the_limit(exports, tmp_path):
    from captioning.web import Service
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    small.write_bytes(b"x" * 1000)
    large.write_bytes(b"x" * (3 * 2**20))
    service = Service(Captioner.from_pretrained(exports["inside"]), PageConfig(max_file_mb=2))
    assert service.uploaded([str(small), str(large)]) == \
        "- large.png: 3.0 MB, over this page's limit of 2 MB; it is not captioned"
    assert service.uploaded([str(small)]) == "" and service.uploaded(None) == ""
    assert service.load(str(large)) == (None, "large.png: 3.0 MB, over this page's limit of 2 MB; it is not captioned")
    assert server_upload_limit(PageConfig(max_file_mb=2)) > 2 * 2**20  # the server lets it reach the page's check


def test_int8_weights_are_named_in_the_header_and_a_gpu_is_refused_before_serving(exports, monkeypatch, capsys):
    import app
    import torch
    fp32 = Captioner.from_pretrained(exports["inside"])
    int8 = Captioner.from_pretrained(exports["inside"], quantize="int8")
    assert "**weights** int8" in describe(int8, "inside") and "**weights**" not in describe(fp32, "inside")
    assert describe_decoder(int8.model.gpt) == describe_decoder(fp32.model.gpt)  # int8 weights are counted too
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert app.main(["--checkpoint", str(exports["inside"]), "--device", "cuda", "--quantize", "int8"]) == 2
    assert "--quantize int8 runs on a CPU only" in capsys.readouterr().err
