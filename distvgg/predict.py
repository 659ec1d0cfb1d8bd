"""The top-k classes of image files, with probabilities, from a saved model. Each file (anything PIL reads, of any
size) is converted to RGB, resized to exactly the model's input size with torchvision's resize (bilinear, antialiased:
a stretch, not a crop) and normalised with the model's mean and std."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from distvgg.config import positive_int
from distvgg.models import MODEL_PATH_HELP, ModelLoadError, load_model

PROG = "distvgg.predict"


class ImageFileError(ValueError):
    """An image file that does not exist or cannot be decoded."""


def read_image(path: str, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """(uint8 (3, H, W) tensor at the model's ``size``, the file's original (width, height))."""
    import torchvision.transforms.functional as TF
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise ImageFileError(f"{p}: {'is a directory' if p.is_dir() else 'no such file'}")
    try:
        with Image.open(p) as im:
            original, rgb = im.size, im.convert("RGB")  # convert decodes the whole file: truncated data fails here
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageFileError(f"{p}: not a readable image ({type(e).__name__}: {e})") from e
    # An image of that size already is returned as it is.
    x = TF.resize(TF.pil_to_tensor(rgb), list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return x, original


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--checkpoint", required=True, help=f"the model: {MODEL_PATH_HELP}")
    p.add_argument("--top-k", type=positive_int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON (a list, one object per image) instead of a table")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ... of any size)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Predict and print; returns the exit code (1 for a bad checkpoint or image: all are listed, none predicted)."""
    from distvgg.batches import normalize

    args = build_parser().parse_args(argv)
    try:
        loaded = load_model(args.checkpoint)
    except ModelLoadError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    images, errors = [], []
    for path in args.images:
        try:
            images.append(read_image(path, loaded.image_size))
        except ImageFileError as e:
            errors.append(f"{PROG}: error: {e}")
    if errors:
        errors.append(f"{PROG}: {len(errors)} of {len(args.images)} image(s) could not be read; nothing was predicted")
        print(*errors, sep="\n", file=sys.stderr)
        return 1
    with torch.no_grad():
        logits = loaded.model(normalize(torch.stack([x for x, _ in images]), loaded.mean, loaded.std))
    values, indices = torch.softmax(logits.float(), 1).topk(min(args.top_k, loaded.num_classes), dim=1)
    results, names = [], loaded.class_names
    for path, (_, size), vs, ix in zip(args.images, images, values.tolist(), indices.tolist()):
        preds = [{"class": names[i], "index": i, "probability": v} for v, i in zip(vs, ix)]
        results.append({"file": path, "original_size": list(size), "predictions": preds})
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    width, (h, w) = max(len(n) for n in names), loaded.image_size
    for r in results:
        print(f"{r['file']} ({r['original_size'][0]}x{r['original_size'][1]} -> {w}x{h})")
        for rank, p in enumerate(r["predictions"], 1):
            print(f"  {rank}. {p['class']:<{width}}  {100 * p['probability']:6.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
