"""The web page of app.py: caption images in a browser with the Captioner API (Gradio).

One model, loaded once, serves every request; captions come only from `Captioner.predict` (no decoding here).
Requests that wait together are decoded together (Gradio's batched events), one Captioner call per decoding
setting. A file that cannot be used (not an image, unreadable, too large) gets a message in the page, not a
traceback, and the server goes on.
"""
import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import gradio as gr
import numpy as np
from PIL import Image

from captioning.configs import AppConfig
from captioning.data.annotations import image_id_from_name
from captioning.data.images import ImageError, load_image, to_rgb
from captioning.inference import Captioner, DecodingOptions
from captioning.prediction import write_csv, write_json
from models.choices import DECODINGS, DEFAULT_BEAM_SIZE, DEFAULT_MAX_LENGTH, DEFAULT_TOP_P, MIN_TEMPERATURE
from models.quantize import weight_count

MB = 1024 * 1024
MAX_BATCH = 8  # requests decoded together
# The server itself accepts uploads up to this many times the page's limit, so that a file over the limit reaches
# the page's own check, whose message stays (a refusal by the server is only a notice that fades).
SERVER_LIMIT_FACTOR = 4
COLUMNS = ["file", "rank", "caption", "score"]


@dataclass
class PageConfig:
    title: str = "Tini-Tiny Image Captioner"
    max_file_mb: float = AppConfig.max_file_mb  # files above this are refused with a message that stays
    max_image_pixels: int = 40_000_000  # decoded images above this are refused (decompression bombs)
    examples: Sequence[str] = ()  # image files offered as examples
    sketch: bool = False  # offer a sketch pad (models trained on the shapes dataset)


# What the page says it takes: Pillow reads these raster formats (and a few rarer ones), never vector drawings.
ACCEPTED = "JPEG, PNG, WebP, GIF, BMP or TIFF images (not SVG or PDF)"


def describe(captioner: Captioner, checkpoint: str) -> str:
    """The header: the checkpoint's name and its parts, each from the export's own config, so an export moved
    elsewhere shows the same page."""
    c = captioner.model.config
    encoder = (c.encoder or {}).get("name", "none (features only)")
    name = Path(checkpoint).resolve().name if Path(checkpoint).is_dir() else checkpoint  # a folder, or a Hub id
    return (f"**Checkpoint** `{name}` · **encoder** {encoder} · **mapper** "
            f"{c.mapping_type} ({c.prefix_length} prefix tokens) · **decoder** {describe_decoder(captioner.model.gpt)}"
            f" · **device** {captioner.device} · **precision** {captioner.precision.name}"
            + (f" · **weights** {captioner.quantize}" if captioner.quantize != "none" else ""))


def describe_decoder(decoder) -> str:
    """`gpt2, 6 layers, 81.9M parameters`: the decoder's model type and size, from the weights the export holds."""
    config = decoder.config
    layers = getattr(config, "num_hidden_layers", None)
    count = weight_count(decoder)
    return f"{config.model_type}, {layers} layers, {count / 1e6:.1f}M parameters"


def upload_message(name: str, error: ImageError) -> str:
    """Why an uploaded file cannot be captioned, naming the file the user gave: never a server path or an
    exception class."""
    if error.kind == "unreadable":
        return f"{name}: not an image this page can read; it takes {ACCEPTED}"
    if error.kind == "truncated":
        return f"{name}: the image file is cut short (an interrupted download or copy?); upload the whole file"
    return f"{name}: {error.reason.replace(str(error.path), name)}"


def decoding_options(decoding: str, beam_size, top_p, temperature, num_captions, seed,
                     max_length: int = DEFAULT_MAX_LENGTH) -> DecodingOptions:
    """The page's controls as DecodingOptions (checked there); a setting that cannot work is an error message."""
    num_captions = int(num_captions)
    if decoding == "greedy":
        num_captions = 1
    elif decoding == "beam":
        num_captions = min(num_captions, int(beam_size))
    return DecodingOptions(decoding=decoding, beam_size=int(beam_size), top_p=float(top_p),
                           temperature=float(temperature), num_captions=num_captions, max_length=max_length,
                           seed=None if seed in (None, "") else int(seed))


class Service:
    """Captions for the page: files in, (gallery, table, messages) out."""

    def __init__(self, captioner: Captioner, page: PageConfig):
        self.captioner, self.page = captioner, page
        self.max_length = captioner.fit_max_length(None)[0]  # the original's 67, or what the decoder holds

    def options(self, *controls) -> DecodingOptions:
        return decoding_options(*controls, max_length=self.max_length)

    def too_large(self, path: str) -> Optional[str]:
        """The message for a file over the page's size limit, else None."""
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        if size <= self.page.max_file_mb * MB:
            return None
        return (f"{Path(path).name}: {size / MB:.1f} MB, over this page's limit of {self.page.max_file_mb:g} MB; "
                f"it is not captioned")

    def uploaded(self, files) -> str:
        """When the selection changes: which files will not be captioned, at once; the message stays while they
        are selected."""
        messages = [m for m in (self.too_large(str(p)) for p in files or []) if m]
        return "\n".join(f"- {m}" for m in messages)

    def load(self, path: str):
        """The image of an uploaded file, or the message saying why it cannot be captioned."""
        refused = self.too_large(path)
        if refused:
            return None, refused
        try:
            return load_image(path, max_pixels=self.page.max_image_pixels), None
        except ImageError as e:
            return None, upload_message(Path(path).name, e)

    def batch(self, files_per_request, *controls_per_request):
        """Gradio's batched event: lists with one entry per waiting request; one Captioner call per setting."""
        outputs = [None] * len(files_per_request)
        groups: Dict[Tuple, List[int]] = {}
        for i, controls in enumerate(zip(*controls_per_request)):
            groups.setdefault(tuple(controls), []).append(i)
        for controls, requests in groups.items():
            try:
                options = self.options(*controls)
            except ValueError as e:
                for i in requests:
                    outputs[i] = ([], [], f"Cannot caption: {e}")
                continue
            loaded, messages = [], {i: [] for i in requests}  # loaded: (request, file name, image)
            for i in requests:
                for path in files_per_request[i] or []:
                    image, message = self.load(str(path))
                    if message:
                        messages[i].append(message)
                    else:
                        loaded.append((i, Path(path).name, image))
            try:
                results = self.captioner.predict([image for _, _, image in loaded], options, progress=False) \
                    if loaded else []
            except (ValueError, RuntimeError) as e:  # the model cannot decode these settings: say so, go on
                for i in requests:
                    outputs[i] = ([], [], f"Cannot caption: {e}")
                continue
            for i in requests:
                mine = [(name, image, r) for (j, name, image), r in zip(loaded, results) if j == i]
                outputs[i] = self.render(mine, messages[i], not files_per_request[i], options.num_captions)
        return [list(x) for x in zip(*outputs)]

    def nothing_to_caption(self) -> str:
        """The message of a request without files."""
        return (f"Nothing to caption: upload one or more {ACCEPTED}, of at most {self.page.max_file_mb:g} MB "
                f"each.")

    def render(self, captioned, messages: List[str], empty: bool, num_captions: int):
        """(gallery, table rows, message) of one request: each image with its best caption; its `num_captions`
        best captions with their scores (mean log-probability per token)."""
        gallery = [(np.asarray(image), result.caption or result.error or "") for _, image, result in captioned]
        rows = [[name, rank, caption, round(score, 4)] for name, _, result in captioned
                for rank, (caption, score) in enumerate(zip(result.captions[:num_captions],
                                                            result.scores[:num_captions]), 1)]
        text = "\n".join(f"- {m}" for m in messages) or (self.nothing_to_caption() if empty else "")
        return gallery, rows, text

    def sketch(self, drawing, *controls):
        composite = drawing.get("composite") if isinstance(drawing, dict) else drawing
        if composite is None:
            return "Draw something first."
        image = load_sketch(composite)
        result = self.captioner.predict([image], self.options(*controls), progress=False)[0]
        return result.caption or result.error

    def results_files(self, files, progress=gr.Progress()):  # noqa: B008 (how Gradio injects its progress bar)
        """Tab 2: the COCO results JSON and the CSV predict.py writes, for many files."""
        paths = [str(p) for p in files or []]
        if not paths:
            return None, self.nothing_to_caption()
        images, ids, names, messages = [], [], [], []
        for path in progress.tqdm(paths, desc="reading"):
            image, message = self.load(path)
            if message:
                messages.append(message)
            else:
                images.append(image)
                ids.append(image_id_from_name(path))
                names.append(Path(path).name)
        if not images:
            return None, "None of the files could be captioned:" + "".join(f"\n- {m}" for m in messages)
        results = self.captioner.predict(images, DecodingOptions(beam_size=DEFAULT_BEAM_SIZE,
                                                                 max_length=self.max_length), progress=False)
        results = [dataclasses.replace(r, source=name) for r, name in zip(results, names)]
        out = Path(tempfile.mkdtemp(prefix="captions-"))
        write_json(out / "captions.json", results, ids, 1)  # predict.py's writers, so the files are its files
        write_csv(out / "captions.csv", results, ids, 1)
        note = f"{len(results)} of {len(paths)} images captioned." + "".join(f"\n- {m}" for m in messages)
        return [str(out / "captions.json"), str(out / "captions.csv")], note


def server_upload_limit(page: PageConfig) -> int:
    """Bytes the server accepts in one upload (Gradio's max_file_size): SERVER_LIMIT_FACTOR x the page's limit."""
    return int(page.max_file_mb * MB * SERVER_LIMIT_FACTOR)


def load_sketch(array) -> Image.Image:
    return to_rgb(Image.fromarray(np.asarray(array)))


def decoding_controls():
    with gr.Row():
        decoding = gr.Radio(list(DECODINGS), value="beam", label="decoding")
        beam = gr.Slider(1, 10, value=DEFAULT_BEAM_SIZE, step=1, label="beam size")
        top_p = gr.Slider(0.05, 1.0, value=DEFAULT_TOP_P, step=0.05, label="top-p (nucleus)")
    with gr.Row():
        # up to 2: the model's MAX_TEMPERATURE (100) is allowed, but above 2 captions are noise
        temperature = gr.Slider(MIN_TEMPERATURE, 2.0, value=1.0, step=0.05, label="temperature")
        num = gr.Slider(1, 10, value=1, step=1, label="captions per image")
        seed = gr.Number(value=0, precision=0, label="seed (nucleus)")
    return [decoding, beam, top_p, temperature, num, seed]


def build_page(captioner: Captioner, checkpoint: str, page: Optional[PageConfig] = None) -> gr.Blocks:
    page = page or PageConfig()
    service = Service(captioner, page)
    with gr.Blocks(title=page.title) as blocks:
        gr.Markdown(f"# {page.title}\n{describe(captioner, checkpoint)}")
        with gr.Tab("Caption"):
            files = gr.File(file_count="multiple", label=f"images: {ACCEPTED}, at most {page.max_file_mb:g} MB each",
                            elem_id="upload")
            controls = decoding_controls()
            button = gr.Button("Caption", variant="primary", elem_id="caption")
            message = gr.Markdown(elem_id="message")
            gallery = gr.Gallery(label="captioned", columns=4, height=320, elem_id="gallery")
            table = gr.Dataframe(headers=COLUMNS, label="captions and scores", elem_id="captions")
            files.change(service.uploaded, [files], [message])  # uploads add to the selection; × removes
            button.click(service.batch, [files, *controls], [gallery, table, message], batch=True,
                         max_batch_size=MAX_BATCH)
            if page.examples:
                gr.Examples([[[p]] for p in page.examples], inputs=[files], label="examples")
        with gr.Tab("Many files"):
            many = gr.File(file_count="multiple", label=f"images, at most {page.max_file_mb:g} MB each")
            go = gr.Button("Caption all")
            downloads, note = gr.File(label="COCO results JSON and CSV"), gr.Markdown()
            go.click(service.results_files, [many], [downloads, note])
        if page.sketch:
            with gr.Tab("Sketch"):
                pad = gr.Sketchpad(label="draw shapes in colour", canvas_size=(256, 256))
                sketch_controls = decoding_controls()
                sketch_button = gr.Button("Caption the sketch")
                sketch_caption = gr.Textbox(label="caption")
                sketch_button.click(service.sketch, [pad, *sketch_controls], [sketch_caption])
    return blocks
