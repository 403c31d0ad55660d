"""What the demo shows: the grid of test images with their captions, the summary, both stages side by side, and
the RESULT line a script reads."""
from pathlib import Path
from typing import Dict

def write_grid(path: Path, records, predictions, count: int = 12) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    shown = records[:count]
    cols = 4
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, record in zip(axes.flat, shown):
        ax.imshow(Image.open(record.path).convert("RGB"))
        ax.set_title(f"model: {predictions[record.image_id]}\nreference: {record.captions[0]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def print_stages_side_by_side(xe: Dict, scst: Dict) -> None:
    def figure(v):
        return "n/a" if v is None else f"{v:.1f}"
    print(f"\n{'':22}{'cross-entropy':>15}{'+ CIDEr optimisation':>22}")
    print(f"{'CIDEr':22}{xe['cider']:>15.1f}{scst['cider']:>22.1f}")
    for fact in ("colour", "shape", "position"):
        print(f"{fact + ' accuracy (%)':22}{figure(xe['accuracy'][fact]):>15}{figure(scst['accuracy'][fact]):>22}")


def print_summary(result: Dict, most_frequent: str, predictions: Dict, scenes: Dict, records) -> None:
    print(f"\nCIDEr {result['cider']:.1f}, against {result['baseline_cider']:.1f} for always answering the most "
          f"frequent training caption ({most_frequent!r})")
    unknown = sum(1 for i in predictions if i not in scenes)
    if unknown:
        print(f"note: {unknown} of {len(predictions)} test images have no 'scene' and no reference caption in the "
              f"shapes grammar; they are left out of the caption accuracy")
    acc = result["accuracy"]
    if unknown < len(predictions):
        print(f"caption accuracy on {len(predictions) - unknown} test images: colour {acc['colour']:.1f}%, "
              f"shape {acc['shape']:.1f}%, position/relation {acc['position']:.1f}%")
    for record in records[:5]:
        print(f"  {record.file_name}: {predictions[record.image_id]!r} (reference: {record.captions[0]!r})")


def result_line(result: Dict, extra: str = "") -> str:
    """The figures as one line a script can read; an accuracy that could not be measured is `nan`. With
    --scst, the cross-entropy stage's figures follow as xe_*."""
    def figures(accuracy, prefix=""):
        return " ".join(f"{prefix}{k}_acc={'nan' if v is None else f'{v:.1f}'}" for k, v in accuracy.items())
    xe = result.get("cross_entropy")
    before = f" {figures(xe['accuracy'], 'xe_')} xe_cider={xe['cider']:.1f}" if xe else ""
    return (f"RESULT {figures(result['accuracy'])} cider={result['cider']:.1f} "
            f"baseline_cider={result['baseline_cider']:.1f}{before} seconds={result['seconds']}{extra}")
