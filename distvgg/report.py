"""A run's report, offline: OUT.png (loss, learning rate and test accuracy from OUTPUT_DIR/metrics.jsonl, the model's
confusion matrix, test images with true and predicted labels) and OUT.html (the PNG and the final numbers)."""

from __future__ import annotations

import argparse
import html
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distvgg import files
from distvgg.evaluate import add_test_options, evaluate_model, plot_confusion, result_tables
from distvgg.files import BEST_DIR, FINAL_DIR, step_folders
from distvgg.models import MODEL_PATH_HELP, LoadedModel, ModelLoadError, load_model
from distvgg.tracking import METRICS_FILE, read_metrics

PROG = "distvgg.report"


def warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def load_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """OUTPUT_DIR/metrics.jsonl's records, with a warning naming any line that does not parse."""
    if not (output_dir / METRICS_FILE).is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {output_dir}: pass the --output-dir of a distvgg.train run")
    return read_metrics(output_dir, warn)


def series(records: list[dict[str, Any]], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(xs, ys) of ``key``, sorted by ``x``; a resumed run may log a step twice: the last value wins."""
    points: dict[float, float] = {}
    for r in records:
        try:
            points[float(r[x])] = float(r[key])  # non-finite values are stored as "nan"/"inf" strings
        except (KeyError, TypeError, ValueError):
            continue
    xs = sorted(points)
    return xs, [points[v] for v in xs]


def test_results(loaded: LoadedModel, dataset: str | None = None, **options: Any) -> dict:
    """``evaluate.evaluate_model``'s result (``options`` as there), with the dataset, the model's label and a grid
    of predictions."""
    from distvgg import batches
    from distvgg.build import make_accelerator
    from distvgg.tracking import prediction_grid, sample_predictions

    accelerator = make_accelerator()
    result, test, dataset = evaluate_model(loaded, accelerator, dataset, warn=warn, **options)
    split = batches.IndexedImages(test.images, test.labels)
    images, labels, preds = sample_predictions(
        loaded.model, split, lambda b, *_: (batches.normalize(b[0], loaded.mean, loaded.std), b[1]), accelerator.device
    )
    grid, folder = prediction_grid(images, labels, preds, loaded.class_names), loaded.weights.parent
    label = f"{folder.name} model" if folder.name in (FINAL_DIR, BEST_DIR) else f"checkpoint {folder.name}"
    return {**result, "dataset": dataset, "label": label, "grid": grid, "names": loaded.class_names}


def _curves(ax: Any, title: str, lines: list[tuple], xlabel: str, ylabel: str) -> None:
    """Line plots of (xs, ys, label, style), or a note when nothing was logged yet."""
    if not any(xs for xs, *_ in lines):
        ax.text(0.5, 0.5, "nothing logged yet", ha="center", va="center", transform=ax.transAxes)
    for xs, ys, label, style in lines:
        ax.plot(xs, ys, style, label=label, lw=1.2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize=8)


def render(path: Path, records: list[dict[str, Any]], results: dict | None, title: str) -> None:
    from matplotlib.figure import Figure  # a Figure without pyplot renders with Agg: no display, no global state

    fig = Figure(figsize=(18, 11), layout="constrained")
    gs = fig.add_gridspec(2, 3, height_ratios=[1, 1.6])
    losses = [(*series(records, "train/loss"), "training loss", "-"), (*series(records, "eval/loss"), "test", "o-")]
    _curves(fig.add_subplot(gs[0, 0]), "loss", losses, "optimizer step", "cross-entropy")
    lr = [(*series(records, "train/lr"), "learning rate", "-")]
    _curves(fig.add_subplot(gs[0, 1]), "learning rate", lr, "optimizer step", "learning rate")
    xs, ys = series(records, "eval/accuracy", "epoch")
    best = f" (best {100 * max(ys):.2f}%, last {100 * ys[-1]:.2f}%)" if ys else ""
    accuracy = [(xs, [100 * y for y in ys], "test accuracy", "o-")]
    _curves(fig.add_subplot(gs[0, 2]), "test accuracy per epoch" + best, accuracy, "epoch", "accuracy (%)")
    conf_ax, grid_ax = fig.add_subplot(gs[1, 0]), fig.add_subplot(gs[1, 1:])
    grid_ax.set_axis_off()
    if results is None:
        conf_ax.set_axis_off()
        conf_ax.set_title("no model yet")
    else:
        accuracy_text = f"{100 * results['accuracy']:.2f}% on {results['count']} test images"
        plot_confusion(conf_ax, results["confusion"], results["names"], f"{results['label']}: {accuracy_text}")
        grid_ax.imshow(results["grid"].permute(1, 2, 0).numpy(), interpolation="nearest")
        grid_ax.set_title("test images: true class, then > predicted (red: wrong)")
    fig.suptitle(title, fontsize=14)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def final_numbers(records: list[dict[str, Any]], results: dict | None) -> list[tuple[str, str]]:
    rows = []
    xs, ys = series(records, "train/loss")
    if ys:
        rows.append(("last training loss", f"{ys[-1]:.4f} (step {int(xs[-1])})"))
    xs, ys = series(records, "eval/accuracy", "epoch")
    if ys:
        best = ys.index(max(ys))
        rows.append(("last test accuracy (logged)", f"{100 * ys[-1]:.2f}% (epoch {xs[-1]:g})"))
        rows.append(("best test accuracy (logged)", f"{100 * ys[best]:.2f}% (epoch {xs[best]:g})"))
    summary = {"train_seconds": ("training time (s)", "{:.1f}"), "images_per_second": ("training images/s", "{:,.0f}")}
    for key, (label, fmt) in summary.items():
        ys = series(records, "summary/" + key)[1]
        if ys and math.isfinite(ys[-1]):
            rows.append((label, fmt.format(ys[-1])))
    if results is not None:
        rows.append((f"{results['label']}: test loss", f"{results['loss']:.4f}"))
        accuracy = f"{100 * results['accuracy']:.2f}% of {results['count']} images of {results['dataset']}"
        rows.append((f"{results['label']}: test accuracy", accuracy))
    return rows


def write_html(path: Path, png: Path, title: str, rows: list, results: dict | None) -> None:
    """The page: the PNG, the final numbers, and the model's per-class accuracy and confusion tables."""
    e = html.escape
    cells = "\n".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
    tables = ""
    if results is not None:
        text = e(result_tables(results["names"], results))
        tables = f"<h2>Per-class accuracy and confusion matrix ({e(results['label'])})</h2>\n<pre>{text}\n</pre>\n"
    style = "body{font-family:sans-serif;margin:2em} th,td{border:1px solid #ccc;padding:4px 10px;text-align:left}"
    src = e(Path(os.path.relpath(png, path.parent)).as_posix())
    path.write_text(
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{e(title)}</title>\n'
        f"<style>{style} table{{border-collapse:collapse}} img{{max-width:100%}}</style>\n</head>\n<body>\n"
        f'<h1>{e(title)}</h1>\n<img src="{src}" alt="training curves, confusion matrix and test predictions">\n'
        f"<h2>Final numbers</h2>\n<table>\n{cells}\n</table>\n{tables}</body>\n</html>\n"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="the --output-dir of a distvgg.train run")
    p.add_argument("--out", help="the PNG to write (default OUTPUT_DIR/report.png); the .html goes beside it")
    p.add_argument("--checkpoint", help=f"the model (default: OUTPUT_DIR): {MODEL_PATH_HELP}")
    add_test_options(p, "dataset for the confusion matrix and the images (default: the model's)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Write the PNG and HTML; returns the process exit code."""
    from distvgg.data import DataError

    parser = build_parser()
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    out = Path(args.out) if args.out else output_dir / "report.png"
    if out.suffix.lower() != ".png":
        parser.error(f"--out must name a .png file, got {out}")
    results, title = None, f"distvgg run {output_dir}"
    try:
        if not output_dir.is_dir():
            raise NotADirectoryError(f"{output_dir} is not a folder: pass the --output-dir of a distvgg.train run")
        records = load_metrics(output_dir)
        if args.checkpoint or any((output_dir / d).is_dir() for d in (FINAL_DIR, BEST_DIR)) or step_folders(output_dir):
            loaded = load_model(args.checkpoint or output_dir, warn=warn)
            options = {k: getattr(args, k) for k in ("eval_limit", "cache_dir", "image_size")}
            results = test_results(loaded, args.dataset, **options)
            tc = loaded.train_config
            title += f": {tc.get('model', '')} width {tc.get('width', '')} on {results['dataset']}"
        else:
            warn(f"no model in {output_dir} yet (no final/, best/ or checkpoint); the report shows the curves only")
        with files.writing(out.parent, what=f"{out.name} and {out.with_suffix('.html').name}"):
            render(out, records, results, title)
            write_html(out.with_suffix(".html"), out, title, final_numbers(records, results), results)
    except (OSError, ModelLoadError, DataError) as e:  # OSError: no run folder or metrics, unreadable files, full disk
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} and {out.with_suffix('.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
