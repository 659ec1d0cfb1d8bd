"""Classify image files with a saved model: the top-k classes and their probabilities per image.

    python -m distvgg.predict --checkpoint runs/distvgg/final cat.jpg dog.png

Each file (PNG, JPEG or anything else PIL reads, of any size) is converted to RGB and resized to
exactly the model's input size (H, W) with ``torchvision.transforms.functional.resize``, bilinear
with antialiasing. This is a stretch, not a crop: the aspect ratio is not kept, so the whole image
is seen. It is then normalised with the model's mean and std, as in training.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from distvgg.evaluate import CHECKPOINT_HELP, CheckpointError, LoadedModel, load_checkpoint

PROG = "distvgg.predict"
RESIZE_HELP = (
    "Each image is converted to RGB and resized to exactly the model's input size (e.g. 32x32) with "
    "torchvision's resize (bilinear, antialiased): a stretch, not a crop, so the aspect ratio is not kept."
)


class ImageFileError(ValueError):
    """An image file that does not exist or cannot be decoded."""


def read_image(path: str | Path, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """(uint8 (3, H, W) tensor at the model's ``size``, the file's original (width, height))."""
    import torchvision.transforms.functional as TF
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise ImageFileError(f"{p}: {'is a directory' if p.is_dir() else 'no such file'}")
    try:
        with Image.open(p) as im:
            original = im.size
            rgb = im.convert("RGB")  # decodes the whole file: truncated data fails here
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageFileError(f"{p}: not a readable image ({type(e).__name__}: {e})") from e
    x = TF.pil_to_tensor(rgb)
    if tuple(x.shape[-2:]) != tuple(size):
        x = TF.resize(x, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return x, original


@torch.no_grad()
def predict_probabilities(loaded: LoadedModel, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Softmax probabilities (N, K) for uint8 images (N, 3, H, W) at the model's input size."""
    from distvgg.batches import normalize

    out = [
        torch.softmax(loaded.model(normalize(images[i : i + batch_size], loaded.mean, loaded.std)).float(), dim=1)
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0, loaded.num_classes)


def top_k(probs: torch.Tensor, names: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [
        [{"class": names[i], "index": int(i), "probability": float(v)} for v, i in zip(vs.tolist(), ix.tolist())]
        for vs, ix in zip(values, indices)
    ]


def format_table(results: list[dict[str, Any]], size: tuple[int, int]) -> str:
    lines = []
    width = max((len(p["class"]) for r in results for p in r["predictions"]), default=5)
    for r in results:
        w, h = r["original_size"]
        lines.append(f"{r['file']} ({w}x{h} -> {size[1]}x{size[0]})")
        for rank, p in enumerate(r["predictions"], 1):
            lines.append(f"  {rank}. {p['class']:<{width}}  {100 * p['probability']:6.2f}%")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Top-k classes with probabilities for each image file. "
        + RESIZE_HELP
        + " Images that are missing or cannot be read are all listed and "
        "nothing is predicted (exit code 1).",
    )
    p.add_argument("--checkpoint", required=True, help=f"the model: {CHECKPOINT_HELP}")
    p.add_argument(
        "--top-k", type=int, default=5, help="classes shown per image (default 5; at most the number of classes)"
    )
    p.add_argument("--json", action="store_true", help="print JSON (a list, one object per image) instead of a table")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ... of any size)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Predict and print; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k must be at least 1, got {args.top_k}")
    try:
        loaded = load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    images, sizes, errors = [], [], []
    for path in args.images:
        try:
            x, original = read_image(path, loaded.image_size)
        except ImageFileError as e:
            errors.append(str(e))
            continue
        images.append(x)
        sizes.append(original)
    if errors:
        for e in errors:
            print(f"{PROG}: error: {e}", file=sys.stderr)
        print(
            f"{PROG}: {len(errors)} of {len(args.images)} image(s) could not be read; nothing was predicted",
            file=sys.stderr,
        )
        return 1
    probs = predict_probabilities(loaded, torch.stack(images))
    results = [
        {"file": path, "original_size": list(size), "predictions": preds}
        for path, size, preds in zip(args.images, sizes, top_k(probs, loaded.class_names, args.top_k))
    ]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_table(results, loaded.image_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
