"""The Captioner API: images (paths, PIL images, numpy arrays, image tensors) or precomputed features -> captions,
with the encoder, preprocessing, prefix normalisation and stop tokens an export records. predict.py, evaluate.py,
the training-time evaluation, the demo and the notebook caption through it.

    from captioning.inference import Captioner      # also `from predict import Captioner`
    captioner = Captioner.from_pretrained("checkpoints/coco_prefix_latest", device="cuda")
    captioner.caption(["a.jpg", "b.jpg"])        # ['A man riding a wave on a surfboard.', ...]
    Captioner.from_pretrained("checkpoints/coco_prefix_latest", quantize="int8")   # int8 weights, on a CPU
"""
import dataclasses
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from transformers import AutoTokenizer

from captioning import runtime
from captioning.data.images import ImageError, load_image, to_rgb
from models import decoding
from models.captioner import CaptionerConfig, ClipCaptionModel
from models.checkpoint_io import CheckpointError
from models.decoders import position_limit
from models.decoding import DEFAULT_MAX_LENGTH, DecodingOptions
from models.encoder import EncoderConfig, ImageEncoder
from models.hub import resolve_export
from models.quantize import is_quantized, quantize_int8

__all__ = ["Captioner", "CaptionResult", "DecodingOptions", "load_recorded_encoder"]

PRECISION_OF_DTYPE = {dtype: name for name, dtype in runtime.TORCH_DTYPES.items()}


@dataclass
class CaptionResult:
    source: str  # the file path, or "<image 3>" / "<array 3>" / "<features 3>" for in-memory inputs
    captions: List[str]  # best first for beam search (every beam); in drawing order for sampling
    scores: List[float]  # mean log-probability per token under the model, stop token included
    error: Optional[str] = None  # why the image could not be captioned (captions are then empty)

    @property
    def caption(self) -> Optional[str]:
        return self.captions[0] if self.captions else None


def load_recorded_encoder(config: CaptionerConfig, directory, weights=None) -> Optional[ImageEncoder]:
    """The image encoder that made the features this model was trained on, as `config.encoder` records it
    (timm name, preprocessing, weights source); `weights` (file or encoder export directory) overrides the
    recorded source. None when the checkpoint records no encoder: the model then takes features only."""
    if config.encoder is None:
        if weights is not None:
            raise CheckpointError(f"{directory}: config.json records no image encoder (encoder is null), so "
                                  f"encoder weights cannot be used with it: caption precomputed features")
        return None
    try:
        encoder_config = EncoderConfig.from_dict(config.encoder)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory}/config.json: invalid encoder config: {e}") from e
    if weights is not None:
        weights = Path(weights)
        encoder_config.weights = str(weights / "model.safetensors" if weights.is_dir() else weights)
    if encoder_config.weights == "random":
        raise CheckpointError(
            f"{directory}: the model was trained on features of a randomly initialised {encoder_config.name} "
            f"whose weights were not saved; pass its weights (--encoder_weights) or precomputed features")
    try:
        encoder = ImageEncoder(encoder_config)
    except CheckpointError as e:  # weights that do not fit, or pretrained ones that cannot be fetched
        hint = "" if "--encoder_weights" in str(e) else "; pass its weights with --encoder_weights"
        raise CheckpointError(f"{directory}: cannot load the image encoder the checkpoint records: {e}{hint}") from e
    check_encoder(config, encoder, directory)
    return encoder


# A fast tokenizer's one file, a slow GPT-2 tokenizer's two, or a sentencepiece model (LLaMA, T5 families).
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))


def check_tokenizer_files(directory: Path) -> None:
    """An export holds its tokenizer: without one, transformers builds an empty tokenizer that decodes every
    caption to an empty string."""
    if not any(all((directory / name).is_file() for name in names) for names in TOKENIZER_FILES):
        raise CheckpointError(f"{directory}: the tokenizer files are missing (tokenizer.json, or vocab.json and "
                              f"merges.txt); an export holds its tokenizer: save it with "
                              f"model.save_pretrained(dir, tokenizer) or copy the files of the decoder it was "
                              f"trained from")


def check_encoder(config: CaptionerConfig, encoder: ImageEncoder, source) -> None:
    if encoder.config.feature_type != config.feature_type or encoder.feature_dim != config.prefix_size:
        raise CheckpointError(
            f"{source}: the image encoder gives {encoder.config.feature_type} features of dimension "
            f"{encoder.feature_dim}, but the mapping network expects {config.feature_type} features of "
            f"dimension {config.prefix_size}")
    if config.feature_type == "grid" and encoder.num_tokens != config.num_grid_tokens:
        raise CheckpointError(f"{source}: the image encoder gives {encoder.num_tokens} grid tokens, but the "
                              f"mapping network expects {config.num_grid_tokens}")


def _load_pil(item, source: str):
    """An RGB PIL image, or the `ImageError` saying why there is none."""
    try:
        image = _to_pil(item, source)
    except ImageError as e:
        return e
    if 0 in image.size:  # preprocessing would divide by it
        return ImageError(source, "empty", f"an image of {image.size[0]}x{image.size[1]} pixels; nothing to caption")
    return image


def _to_pil(item, source: str) -> Image.Image:
    if isinstance(item, (str, os.PathLike)) or hasattr(item, "read"):  # a file, or an image inside a shard
        return load_image(item)
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if not isinstance(item, np.ndarray):
        raise ImageError(source, "unreadable", f"expected an image path, a PIL image, a numpy array, an image "
                                               f"tensor or a features tensor, got {type(item).__name__}")
    array = item
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ImageError(source, "unreadable", f"an image array must be (H, W), (H, W, 3) or (H, W, 4), got "
                                               f"{array.shape}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if array.size and (not np.isfinite(array).all() or array.min() < 0 or array.max() > 1):
            raise ImageError(source, "unreadable", "a float image array must hold finite values in [0, 1] "
                                                   "(as scikit-image's); convert it to uint8")
        array = np.round(array * 255).astype(np.uint8)
    elif array.dtype != np.uint8 and not (array.ndim == 2 and array.dtype == np.uint16):
        raise ImageError(source, "unreadable", f"unsupported image array dtype {array.dtype}; expected uint8, "
                                               f"uint16 (grayscale), bool or float in [0, 1]")
    return to_rgb(Image.fromarray(array))


def is_image_tensor(tensor: torch.Tensor) -> bool:
    """An image laid out as (H, W), (H, W, C) or torchvision's (C, H, W), C in 1, 3, 4, or a batch of them."""
    if tensor.ndim == 2:
        return not tensor.is_floating_point()
    return tensor.ndim in (3, 4) and (tensor.shape[-1] in (1, 3, 4) or tensor.shape[-3] in (1, 3, 4))


def tensor_to_array(tensor: torch.Tensor) -> np.ndarray:
    """An image tensor as the numpy array (H, W[, C]) the array path reads: (C, H, W) is moved to channels last
    unless its last dimension already is the channels (C in 1, 3, 4)."""
    tensor = tensor.detach().cpu()
    if tensor.ndim == 3 and tensor.shape[-1] not in (1, 3, 4) and tensor.shape[0] in (1, 3, 4):
        tensor = tensor.permute(1, 2, 0)
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()  # numpy has no bfloat16
    return tensor.numpy()


class Captioner:
    """Images (paths, PIL images, numpy arrays, image tensors) or precomputed features -> captions, in batches.

    A torch tensor is features when it is floating point and its shape is the model's feature shape, (D,) or
    (T, D) for grid features, or a batch of it; otherwise it is an image: uint8 (or bool) of any layout below,
    or floating point in [0, 1] laid out as (H, W, C) or torchvision's (C, H, W) with C in 1, 3, 4; a 4-D
    tensor is a batch of images. Numpy arrays are always images.

    Images go through the encoder and preprocessing recorded in the checkpoint; prefixes are normalised
    exactly when training normalised them; captions end at the checkpoint's `eos_token_ids`.
    """

    def __init__(self, model: ClipCaptionModel, tokenizer, encoder: Optional[ImageEncoder] = None,
                 eos_token_ids: Optional[Sequence[int]] = None, precision: Optional[runtime.Precision] = None):
        self.model = model.eval()
        self.quantize = "int8" if is_quantized(model) else "none"
        dtype = next(model.parameters()).dtype
        self.precision = precision or runtime.Precision(PRECISION_OF_DTYPE.get(dtype, "fp32"), "as loaded",
                                                        "the model's dtype")
        # Where the model leaves cores free (a GPU), the next batch's images decode in threads while this batch is
        # captioned; on a CPU, whose cores the model needs, they decode between model calls, on every core.
        budget = runtime.plan_threads(self.device, loads_images=True)
        self.prefetch_images = budget.workers > 0
        self.loader_threads = min(runtime.MAX_WORKERS, budget.workers if self.prefetch_images else budget.cores)
        self.tokenizer = tokenizer
        self.encoder = (encoder if encoder is not None else model.encoder)
        if self.encoder is not None:
            self.encoder.eval()
        if eos_token_ids is None:
            eos_token_ids = model.config.eos_token_ids
            if not eos_token_ids and tokenizer.eos_token_id is not None:
                warnings.warn(f"the checkpoint records no eos_token_ids; captions end at the tokenizer's "
                              f"{tokenizer.eos_token!r}", stacklevel=2)
                eos_token_ids = [tokenizer.eos_token_id]
        self.eos_token_ids = [int(i) for i in eos_token_ids]

    @classmethod
    def from_pretrained(cls, directory, device=None, precision: Union[str, torch.dtype] = "auto",
                        encoder_weights=None, dtype: Union[str, torch.dtype, None] = None,
                        quantize: str = "none") -> "Captioner":
        """Load an export directory written by train.py or convert_checkpoint.py (strictly: a missing, foreign
        or mismatched checkpoint raises `CheckpointError`, never falls back to random weights).

        `precision`: auto (the rule of captioning/runtime.py for `device`), fp32, bf16, fp16 or a torch dtype;
        `dtype` is its earlier name. The choice and its reason are in `captioner.precision`. `directory` may
        also be a Hugging Face Hub repository id, `user/name[@revision]`, downloaded and cached by huggingface_hub
        (with HF_HUB_OFFLINE=1 only a cached one loads).

        `quantize`: "none", or "int8" for int8 weights in the decoder's and the mapper's linear layers, made at
        load (models/quantize.py), on a CPU only: any other device is a ValueError, raised before CUDA is asked
        anything; the precision is then fp32 around them (auto or fp32)."""
        device = torch.device(device) if device is not None else torch.device("cpu")  # None: where weights load
        choice = dtype if dtype is not None else precision
        choice = PRECISION_OF_DTYPE[choice] if isinstance(choice, torch.dtype) else choice
        resolved = runtime.resolve_precision(choice, device, training=False, quantize=quantize)
        directory = resolve_export(directory)
        model = ClipCaptionModel.from_pretrained(directory)
        check_tokenizer_files(directory)
        try:
            # The decoder's config names the tokenizer type; config.json describes the whole captioner.
            tokenizer = AutoTokenizer.from_pretrained(str(directory), config=model.gpt.config)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{directory}: cannot load the tokenizer ({e}); an export holds its tokenizer "
                                  f"files (save_pretrained(dir, tokenizer))") from e
        if len(tokenizer) > model.gpt.config.vocab_size:
            raise CheckpointError(f"{directory}: the tokenizer has {len(tokenizer)} tokens but the decoder's "
                                  f"vocabulary has {model.gpt.config.vocab_size}")
        encoder = model.encoder
        if encoder is None:
            encoder = load_recorded_encoder(model.config, directory, encoder_weights)
        elif encoder_weights is not None:
            raise CheckpointError(f"{directory}: the checkpoint holds its own image encoder weights; "
                                  f"--encoder_weights does not apply")
        model.to(device=device, dtype=resolved.dtype)
        if quantize == "int8":
            if model.adapted:
                raise CheckpointError(f"{directory}: an adapters-only export (LoRA adapters apart from the decoder's "
                                      f"weights); int8 weights need the adapters merged, as train.py exports them "
                                      f"by default")
            quantize_int8(model.gpt)
            quantize_int8(model.clip_project)
        if encoder is not None:
            encoder.eval().fold_batch_norms()  # inference only: this captioner never trains or saves it
            encoder.to(device=device, dtype=resolved.dtype)
        return cls(model, tokenizer, encoder, precision=resolved)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def longest_caption(self) -> int:
        """The most tokens a caption can have: the decoder's positions left after the prefix."""
        return position_limit(self.model.gpt.config) - self.model.config.prefix_length

    def fit_max_length(self, requested: Optional[int], flag: str = "--max_length") -> Tuple[int, Optional[str]]:
        """`requested`, or the default (the original's 67) clipped to what the decoder holds, with a note saying
        so; a requested length that does not fit is an error naming `flag`."""
        longest = self.longest_caption
        holds = (f"the decoder has {position_limit(self.model.gpt.config)} positions, "
                 f"{self.model.config.prefix_length} of them for the prefix")
        if requested is None:
            if DEFAULT_MAX_LENGTH <= longest:
                return DEFAULT_MAX_LENGTH, None
            return longest, f"captions of at most {longest} tokens instead of {DEFAULT_MAX_LENGTH}: {holds}"
        if not 1 <= requested <= longest:
            raise ValueError(f"{flag} {requested} does not fit this checkpoint: {holds}, so a caption holds 1 to "
                             f"{longest} tokens")
        return requested, None

    def caption(self, images, options: Optional[DecodingOptions] = None, batch_size: int = 32,
                progress: bool = False, **kwargs):
        """Captions in input order: one string per image, or a list of `num_captions` strings per image when
        more than one is asked for. A single input (not a list) gives a single result. Keyword arguments
        are `DecodingOptions` fields: `caption(images, decoding="nucleus", num_captions=3, seed=0)`.
        An unreadable image raises `ImageError`."""
        options = self._options(options, kwargs)
        items, single = self._as_list(images)
        results = self.predict(items, options, batch_size, progress, on_error="raise")
        out = [r.captions[0] if options.num_captions == 1 else r.captions[:options.num_captions]
               for r in results]
        return out[0] if single else out

    def predict(self, images, options: Optional[DecodingOptions] = None, batch_size: int = 32,
                progress: bool = False, on_error: str = "keep", **kwargs) -> List[CaptionResult]:
        """One `CaptionResult` per input, with every beam (or sample) and its score. With `on_error="keep"`
        an unreadable image gets a result with its `error` and the others are captioned as usual; with
        "raise" it raises `ImageError`. Keyword arguments are `DecodingOptions` fields, as for `caption`."""
        options = self._options(options, kwargs)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if on_error not in ("keep", "raise"):
            raise ValueError(f"on_error must be 'keep' or 'raise', got {on_error!r}")
        items, _ = self._as_list(images)
        if self.encoder is None and not all(torch.is_tensor(x) for x in items):
            shape = self._feature_shape()
            raise ValueError(f"this checkpoint records no image encoder (config.json: encoder is null), so it "
                             f"captions precomputed features only: pass torch tensors of shape {shape} (one "
                             f"image) or (N, {', '.join(map(str, shape))})")
        results = []
        starts = range(0, len(items), batch_size)
        with ThreadPoolExecutor(self.loader_threads) as pool, \
                tqdm(total=len(items), desc="captioning", unit="image", disable=not progress) as bar:
            loads = self._submit_loads(pool, items[:batch_size], 0)
            for start in starts:
                loaded = [future.result() for future in loads]  # images (or their ImageError) of this batch
                following = start + batch_size
                if self.prefetch_images:
                    loads = self._submit_loads(pool, items[following:following + batch_size], following)
                results += self._predict_batch(items[start:start + batch_size], start, options, on_error, loaded)
                if not self.prefetch_images:
                    loads = self._submit_loads(pool, items[following:following + batch_size], following)
                bar.update(min(batch_size, len(items) - start))
        return results

    def _submit_loads(self, pool: ThreadPoolExecutor, items, start: int) -> list:
        """Futures of the batch's images (PIL, or the ImageError saying why there is none), decoded in threads:
        PIL releases the GIL. Tensor work stays in the caller's thread, as torch ops from several threads would
        each start their own OpenMP team and oversubscribe the cores."""
        return [pool.submit(_load_pil, item, self._source(item, start + j)) for j, item in enumerate(items)
                if not torch.is_tensor(item)]

    def _options(self, options: Optional[DecodingOptions], kwargs) -> DecodingOptions:
        """`options` with `kwargs` applied; without either naming a max_length, the default fits the checkpoint
        (the original's 67, or what its decoder holds after the prefix)."""
        if options is None and "max_length" not in kwargs:
            kwargs = dict(kwargs, max_length=self.fit_max_length(None)[0])
        return dataclasses.replace(options or DecodingOptions(), **kwargs)

    # ---- one batch -----------------------------------------------------------------------------------------

    def _feature_shape(self):
        config = self.model.config
        return (config.prefix_size,) if config.feature_type == "pooled" else (config.num_grid_tokens,
                                                                              config.prefix_size)

    def _is_features(self, tensor: torch.Tensor) -> bool:
        """Whether a tensor holds features rather than an image: floating point, and not image-shaped unless
        its shape is the model's feature shape (one input, or a batch of them)."""
        if not tensor.is_floating_point():
            return False
        shape = self._feature_shape()
        if tuple(tensor.shape[-len(shape):]) == shape and tensor.ndim in (len(shape), len(shape) + 1):
            return True
        return not is_image_tensor(tensor)

    def _as_list(self, images):
        """(list of single inputs, whether one input was given); image tensors become arrays (H, W, C)."""
        if isinstance(images, (str, os.PathLike, Image.Image)):
            return [images], True
        if isinstance(images, np.ndarray):
            return (list(images), False) if images.ndim == 4 else ([images], True)
        if torch.is_tensor(images) and not self._is_features(images):
            arrays = [tensor_to_array(t) for t in (images if images.ndim == 4 else [images])]
            return arrays, images.ndim != 4
        if torch.is_tensor(images):
            single = len(self._feature_shape())
            if images.ndim not in (single, single + 1):
                raise ValueError(f"features must have shape {self._feature_shape()} or (N, ...) of it, got "
                                 f"{tuple(images.shape)}")
            return ([images], True) if images.ndim == single else (list(images), False)
        if isinstance(images, (list, tuple)):
            return [tensor_to_array(x) if torch.is_tensor(x) and not self._is_features(x) else x for x in images], \
                False
        raise TypeError(f"expected image paths, PIL images, numpy arrays, image tensors or feature tensors (or a "
                        f"list of them), got {type(images).__name__}")

    def _source(self, item, index: int) -> str:
        if isinstance(item, (str, os.PathLike)):
            return str(item)
        kind = "features" if torch.is_tensor(item) else "image" if isinstance(item, Image.Image) else "array"
        return f"<{kind} {index}>"

    def _features(self, items, start: int, on_error: str, loaded: list):
        """Features (n, ...) of the inputs that could be read, their positions, and errors by position; `loaded`
        holds the images of the inputs that are not tensors, in order."""
        param = next(self.model.parameters())
        features, positions, errors, jobs = [], [], {}, []
        for j, item in enumerate(items):
            source = self._source(item, start + j)
            if not torch.is_tensor(item):
                jobs.append((j, item, source))
            elif tuple(item.shape) != self._feature_shape():
                raise ValueError(f"{source}: features of shape {tuple(item.shape)}, the model expects "
                                 f"{self._feature_shape()}")
            elif not torch.isfinite(item).all():
                raise ValueError(f"{source}: the features hold nan or inf values")
            else:
                features.append(item.to(param.device, torch.float32))
                positions.append(j)
        pixels = []
        for (j, _, _), image in zip(jobs, loaded):
            if isinstance(image, ImageError):
                if on_error == "raise":
                    raise image
                errors[j] = str(image)
            else:
                pixels.append(self.encoder.preprocess(image))  # (3, H, W)
                positions.append(j)
        if pixels:
            with torch.inference_mode():
                features += list(self.encoder(torch.stack(pixels).to(param.device, param.dtype)).float())
        return features, positions, errors

    def _predict_batch(self, items, start: int, options: DecodingOptions, on_error: str,
                       loaded: list) -> List[CaptionResult]:
        features, positions, errors = self._features(items, start, on_error, loaded)
        results = [CaptionResult(self._source(x, start + j), [], [], errors.get(j)) for j, x in enumerate(items)]
        if not features:
            return results
        with torch.inference_mode():
            prefix = self.model.prefix_embeddings(torch.stack(features))  # (n, P, C)
            decoded = decoding.decode(self.model.gpt, prefix, self.eos_token_ids, options,
                                       [start + j for j in positions])
        for j, sequences, scores in zip(positions, decoded.sequences(), decoded.scores.tolist()):
            texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
            results[j].captions = [" ".join(text.split()) for text in texts]  # one line, single spaces
            results[j].scores = scores
        return results
