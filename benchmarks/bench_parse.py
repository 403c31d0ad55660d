"""Feature extraction speed: parse_coco.py against the original algorithm and against the encoder alone.

Generates `--images` 640x480 JPEGs with exactly `--captions_per_image` captions each (a train_caption.json in
COCO naming), then times, with the same randomly initialised encoder:
- original: the original script's whole run: encoder building, then one image per caption, batch 1, no workers,
  skimage decoding in the loop, pickle at the end;
- ours: the whole run of `captioning.featurize.extract_features`, the call parse_coco.py makes (annotation
  reading, encoder building, workers, the final pickle); `ratio` compares these two whole runs;
- encoder alone: the encoder on preloaded, preprocessed tensors at our batch size. `encoder_fraction` compares
  it with our extraction phase (reading, decoding, encoding and storing every image, without the one-time
  encoder building), which is where decoding has to hide behind the model.

    python benchmarks/bench_parse.py                       # 64 images, tiny_vit_21m_224, fp32 on CPU
    python benchmarks/bench_parse.py --precision auto      # what parse_coco.py picks: bf16 on a native-bf16 CPU
    python benchmarks/bench_parse.py --device cuda --images 1024

Both sides and the encoder alone run with parse_coco.py's thread budget and channels-last default, so that the
ratios compare algorithms, not settings.

Last line: `RESULT ratio=<ours/original> encoder_fraction=<ours/encoder alone>` (images per second).
"""
import argparse
import json
import os
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from captioning import runtime
from captioning.configs import extraction_batch_size
from captioning.featurize import ExtractionConfig, extract_features
from models.encoder import EncoderConfig, ImageEncoder


def make_dataset(root: Path, num_images: int, captions_per_image: int) -> Path:
    """Photo-like JPEGs (smooth colour fields plus grain, ~100 KB at quality 90) and their captions."""
    rng = np.random.default_rng(0)
    (root / "train2014").mkdir(parents=True)
    entries = []
    for image_id in range(1, num_images + 1):
        coarse = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((640, 480), Image.BICUBIC), dtype=np.int16)
        grain = rng.integers(-12, 13, smooth.shape, dtype=np.int16)
        pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"train2014/COCO_train2014_{image_id:012d}.jpg", quality=90)
        entries += [{"image_id": image_id, "id": image_id * 10 + k, "caption": f"a picture number {image_id}, {k}"}
                    for k in range(captions_per_image)]
    (root / "train_caption.json").write_text(json.dumps(entries))
    return root / "train_caption.json"


def original(config: EncoderConfig, root: Path, annotations: Path, out: Path, device: torch.device) -> float:
    """The original parse_coco.py, with our encoder in place of clip.load; returns seconds."""
    from skimage import io
    start = time.perf_counter()
    encoder = ImageEncoder(config).eval().to(device)
    with open(annotations) as f:
        data = json.load(f)
    all_embeddings, all_captions = [], []
    for i, d in enumerate(data):
        filename = root / f"train2014/COCO_train2014_{int(d['image_id']):012d}.jpg"
        if not os.path.isfile(filename):
            filename = root / f"val2014/COCO_val2014_{int(d['image_id']):012d}.jpg"
        image = io.imread(filename)
        image = encoder.preprocess(Image.fromarray(image)).unsqueeze(0).to(device)
        with torch.no_grad():
            prefix = encoder(image).cpu()
        d["clip_embedding"] = i
        all_embeddings.append(prefix)
        all_captions.append(d)
    with open(out, "wb") as f:
        pickle.dump({"clip_embedding": torch.cat(all_embeddings, dim=0), "captions": all_captions}, f)
    return time.perf_counter() - start


def preload(encoder: ImageEncoder, root: Path, num_images: int) -> torch.Tensor:
    from captioning.data.images import load_image
    return torch.stack([encoder.preprocess(load_image(root / f"train2014/COCO_train2014_{i:012d}.jpg"))
                        for i in range(1, num_images + 1)])


def encoder_alone(encoder: ImageEncoder, images: torch.Tensor, batch_size: int, device: torch.device,
                  precision: runtime.Precision, channels_last: bool) -> float:
    """Seconds for the encoder on preloaded tensors, batched and placed as parse_coco.py does."""
    num_images = len(images)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = encoder.to(memory_format=memory_format) if channels_last else encoder
    with torch.inference_mode(), precision.autocast(device):
        model(images[:batch_size].to(device, memory_format=memory_format))  # warm-up (kernels, allocator)
        synchronize(device)
        start = time.perf_counter()
        for k in range(0, num_images, batch_size):
            model(images[k:k + batch_size].to(device, memory_format=memory_format)).float().cpu()
        synchronize(device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="parse_coco.py speed against the original algorithm")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--captions_per_image", type=int, default=5)
    p.add_argument("--encoder", default="tiny_vit_21m_224")
    p.add_argument("--batch_size", type=int, default=None, help="ours; default parse_coco's (CPU 4, CUDA 128)")
    p.add_argument("--num_workers", type=int, default=None, help="ours; default parse_coco's")
    p.add_argument("--precision", default=None,
                   help="ours and the encoder alone; default fp32 on CPU (the original's), auto on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch threads; default parse_coco's budget")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    batch_size = extraction_batch_size(args.batch_size, device.type)
    precision = runtime.resolve_precision(args.precision or ("fp32" if device.type == "cpu" else "auto"), device,
                                          training=False)
    budget = runtime.plan_threads(device, loads_images=True, workers=args.num_workers, threads=args.threads)
    print(runtime.describe_cpu())
    print(budget.describe())
    with runtime.thread_budget(budget):
        measure(args, device, batch_size, precision, budget)


def measure(args, device: torch.device, batch_size: int, precision: runtime.Precision,
            budget: runtime.ThreadBudget) -> None:
    channels_last = True  # parse_coco.py's default
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        annotations = make_dataset(root, args.images, args.captions_per_image)
        encoder = ImageEncoder(EncoderConfig(name=args.encoder, weights="random")).eval().to(device)
        torch.save(encoder.model.state_dict(), root / "encoder.pth")
        # Measured before and after the other runs, the faster counting: on a shared machine the speed drifts,
        # and the faster measurement is the stricter baseline for encoder_fraction.
        images = preload(encoder, root, args.images)
        config = EncoderConfig(name=args.encoder, weights=str(root / "encoder.pth"))
        fast_encoder = ImageEncoder(config).eval()
        fast_encoder.fold_batch_norms()  # as parse_coco.py builds it; the original keeps `encoder` as it is
        fast_encoder.to(device)
        encoder_s = [encoder_alone(fast_encoder, images, batch_size, device, precision, channels_last)]
        original_s = original(config, root, annotations, root / "original.pkl", device)
        ours = ExtractionConfig(encoder=args.encoder, encoder_weights=str(root / "encoder.pth"),
                                annotations=str(annotations), images_root=str(root), out_path=root / "ours.pkl",
                                device=str(device), batch_size=batch_size, precision=precision.name,
                                num_workers=budget.workers, threads=budget.torch_threads)
        synchronize(device)
        start = time.perf_counter()
        summary = extract_features(ours)
        synchronize(device)
        ours_s = time.perf_counter() - start
        encoder_s.append(encoder_alone(fast_encoder, images, batch_size, device, precision, channels_last))
    rates = {name: args.images / s for name, s in
             [("original", original_s), ("ours", ours_s), ("ours_extraction", summary["extraction_seconds"]),
              ("encoder_alone", min(encoder_s))]}
    print(f"encoder alone, before and after: {args.images / encoder_s[0]:.2f} and {args.images / encoder_s[1]:.2f} "
          f"images/s")
    print(f"device={device} encoder={args.encoder} images={args.images} "
          f"captions={args.images * args.captions_per_image} batch_size={batch_size} precision={precision.name} "
          f"threads={torch.get_num_threads()} workers={budget.workers}")
    for name, rate in rates.items():
        print(f"{name:>16}: {rate:8.2f} images/s")
    print(f"RESULT ratio={rates['ours'] / rates['original']:.2f} "
          f"encoder_fraction={rates['ours_extraction'] / rates['encoder_alone']:.3f} "
          f"whole_run_fraction={rates['ours'] / rates['encoder_alone']:.3f} "
          f"original_ips={rates['original']:.2f} ours_ips={rates['ours']:.2f} encoder_ips={rates['encoder_alone']:.2f}")


if __name__ == "__main__":
    main()
