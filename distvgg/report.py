"""One picture of a finished run, offline: curves from metrics.jsonl, the final model on the test split.

    python -m distvgg.report runs/distvgg

writes ``runs/distvgg/report.png`` (training and test loss, learning rate, test accuracy per epoch,
the final model's confusion matrix and a grid of test images with true and predicted labels) and
``runs/distvgg/report.html``, which shows that PNG above a table of the final numbers. Everything
comes from the run's folder and the dataset: no W&B account or network is needed.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from distvgg.evaluate import (
    CheckpointError,
    LoadedModel,
    confusion_matrix,
    load_checkpoint,
    plot_confusion,
    require_matplotlib,
)

PROG = "distvgg.report"


class ReportError(ValueError):
    """The run folder lacks what the report needs; the message says what."""


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------


def load_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """The records of OUTPUT_DIR/metrics.jsonl (``tracking.read_metrics``).

    A run killed while writing leaves a truncated last line; rather than refusing to report on it,
    the lines that do not parse are skipped here (with a warning), which read_metrics does not do.
    """
    from distvgg.tracking import METRICS_FILE, read_metrics

    path = output_dir / METRICS_FILE
    if not path.is_file():
        raise ReportError(
            f"no {METRICS_FILE} in {output_dir}: pass the --output-dir of a distvgg.train run "
            f"(it writes {METRICS_FILE} as it trains)"
        )
    try:
        return read_metrics(output_dir)
    except json.JSONDecodeError:
        records, bad = [], []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            try:
                if line.strip():
                    records.append(json.loads(line))
            except json.JSONDecodeError:
                bad.append(n)
        print(f"{PROG}: warning: skipped unreadable line(s) {', '.join(map(str, bad))} of {path}", file=sys.stderr)
        return records


def series(records: list[dict[str, Any]], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(xs, ys) of ``key``, sorted by ``x``; a resumed run may log a step twice: the last value wins."""
    points: dict[float, float] = {}
    for r in records:
        if key in r and x in r:
            try:
                points[float(r[x])] = float(r[key])  # non-finite values are stored as "nan"/"inf" strings
            except (TypeError, ValueError):
                continue
    xs = sorted(points)
    return xs, [points[v] for v in xs]


def recorded_dataset(output_dir: Path, loaded: LoadedModel | None) -> str | None:
    """The dataset the run trained on: config.yaml's, else the model's train_config."""
    import yaml

    config = output_dir / "config.yaml"
    if config.is_file():
        try:
            value = (yaml.safe_load(config.read_text()) or {}).get("dataset")
            if value:
                return str(value)
        except yaml.YAMLError:
            pass
    return loaded.train_config.get("dataset") if loaded is not None else None


@dataclass
class TestResults:
    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor
    pred: torch.Tensor
    loss: float
    accuracy: float
    confusion: torch.Tensor
    dataset: str
    model_label: str  # "final model", "best model" or "checkpoint step-N"


def evaluate_model(loaded: LoadedModel, dataset: str, eval_limit: int | None, cache_dir: str | None) -> TestResults:
    """The model's predictions on every test image, in one process.

    Not ``train.evaluate``: the grid needs each image's prediction, which that returns only as counts.
    """
    from distvgg.evaluate import load_test_split
    from distvgg.predict import predict_probabilities

    warn = lambda m: print(f"{PROG}: {m}", file=sys.stderr)  # noqa: E731
    test, _ = load_test_split(
        dataset,
        loaded,
        eval_limit=eval_limit,
        log=print,
        warn=warn,
        cache_dir=cache_dir or loaded.train_config.get("cache_dir"),
    )
    probs = predict_probabilities(loaded, test.images)
    pred = probs.argmax(1)
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), test.labels).item() if len(test) else float("nan")
    folder = loaded.weights.parent.name
    label = f"{folder} model" if folder in ("final", "best") else f"checkpoint {folder}"
    return TestResults(
        test.images,
        test.labels,
        pred,
        loss,
        (pred == test.labels).float().mean().item(),
        confusion_matrix(pred, test.labels, loaded.num_classes),
        dataset,
        label,
    )


# ---------------------------------------------------------------------------------------------------
# The figure
# ---------------------------------------------------------------------------------------------------


def _empty(ax: Any, title: str, message: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_axis_off()


def plot_losses(ax: Any, records: list[dict[str, Any]]) -> None:
    xs, ys = series(records, "train/loss")
    ex, ey = series(records, "eval/loss")
    if not xs and not ex:
        return _empty(ax, "loss", "no loss logged yet")
    ax.plot(xs, ys, label="training loss", lw=1.2)
    if ex:
        ax.plot(ex, ey, "o-", label="test loss (end of epoch)", lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_lr(ax: Any, records: list[dict[str, Any]]) -> None:
    xs, ys = series(records, "train/lr")
    if not xs:
        return _empty(ax, "learning rate", "no learning rate logged yet")
    ax.plot(xs, ys, color="tab:purple", lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)


def plot_accuracy(ax: Any, records: list[dict[str, Any]]) -> None:
    xs, ys = series(records, "eval/accuracy", x="epoch")
    if not xs:
        return _empty(ax, "test accuracy", "no evaluation logged yet")
    ax.plot(xs, [100 * y for y in ys], "o-", color="tab:green", lw=1.5)
    best = max(range(len(ys)), key=ys.__getitem__)
    ax.annotate(
        f"best {100 * ys[best]:.2f}% (epoch {xs[best]:g})",
        (xs[best], 100 * ys[best]),
        textcoords="offset points",
        xytext=(0, -14),
        ha="center",
        fontsize=8,
    )
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"test accuracy per epoch (last {100 * ys[-1]:.2f}%)")
    ax.grid(alpha=0.3)


def plot_examples(ax: Any, results: TestResults, names: Sequence[str], count: int = 32, per_row: int = 8) -> None:
    """A make_grid of test images (class-balanced pick), each labelled true (T) and predicted (P):
    green when right, red when wrong. Tiles are enlarged (nearest) so the labels fit."""
    from torchvision.utils import make_grid

    from distvgg.data import balanced_subset

    idx = balanced_subset(results.labels, count, seed=0)
    if len(idx) == 0:
        return _empty(ax, "test images", "the test split is empty")
    images = results.images[idx]
    h, w = images.shape[-2:]
    scale = max(1, 96 // max(h, w))
    tiles = images.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    pad = 4
    grid = make_grid(tiles, nrow=per_row, padding=pad, pad_value=255)
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    th, tw = h * scale, w * scale
    for n, i in enumerate(idx.tolist()):
        r, c = divmod(n, per_row)
        true, pred = int(results.labels[i]), int(results.pred[i])
        ax.text(
            c * (tw + pad) + pad + 2,
            r * (th + pad) + pad + 2,
            f"T: {names[true]}\nP: {names[pred]}",
            va="top",
            ha="left",
            fontsize=7,
            color="darkgreen" if true == pred else "red",
            bbox={"facecolor": "white", "alpha": 0.75, "pad": 1, "edgecolor": "none"},
        )
    ax.set_axis_off()
    ax.set_title(f"test images: T = true class, P = predicted (red: wrong) - {len(idx)} of {len(results.labels)}")


def render(
    path: Path, records: list[dict[str, Any]], loaded: LoadedModel | None, results: TestResults | None, title: str
) -> None:
    from matplotlib.figure import Figure  # a Figure without pyplot renders with Agg: no display, no global state

    fig = Figure(figsize=(18, 11), layout="constrained")
    gs = fig.add_gridspec(2, 3, height_ratios=[1, 1.6])
    plot_losses(fig.add_subplot(gs[0, 0]), records)
    plot_lr(fig.add_subplot(gs[0, 1]), records)
    plot_accuracy(fig.add_subplot(gs[0, 2]), records)
    conf_ax, grid_ax = fig.add_subplot(gs[1, 0]), fig.add_subplot(gs[1, 1:])
    if loaded is not None and results is not None:
        plot_confusion(
            conf_ax,
            results.confusion.tolist(),
            loaded.class_names,
            f"{results.model_label}: {100 * results.accuracy:.2f}% on {len(results.labels)} test images",
        )
        plot_examples(grid_ax, results, loaded.class_names)
    else:
        _empty(conf_ax, "confusion matrix", "no model yet")
        _empty(grid_ax, "test images", "no model yet")
    fig.suptitle(title, fontsize=14)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------


def _last(records: list[dict[str, Any]], key: str, x: str = "step") -> tuple[float, float] | None:
    xs, ys = series(records, key, x)
    return (xs[-1], ys[-1]) if xs else None


def final_numbers(records: list[dict[str, Any]], results: TestResults | None) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    step = max((int(r["step"]) for r in records if isinstance(r.get("step"), (int, float))), default=None)
    epoch = max((float(r["epoch"]) for r in records if isinstance(r.get("epoch"), (int, float))), default=None)
    if step is not None:
        rows.append(("optimizer steps", f"{step}"))
    if epoch is not None:
        rows.append(("epochs", f"{epoch:g}"))
    if v := _last(records, "train/loss"):
        rows.append(("last training loss", f"{v[1]:.4f} (step {v[0]:g})"))
    if v := _last(records, "eval/accuracy", "epoch"):
        rows.append(("last test accuracy (logged)", f"{100 * v[1]:.2f}% (epoch {v[0]:g})"))
    xs, ys = series(records, "eval/accuracy", "epoch")
    if ys:
        best = max(range(len(ys)), key=ys.__getitem__)
        rows.append(("best test accuracy (logged)", f"{100 * ys[best]:.2f}% (epoch {xs[best]:g})"))
    for key, label, fmt in (
        ("summary/train_seconds", "training time (s)", "{:.1f}"),
        ("summary/images_per_second", "training images/s", "{:,.0f}"),
    ):
        if (v := _last(records, key)) and math.isfinite(v[1]):
            rows.append((label, fmt.format(v[1])))
    if results is not None:
        rows.append((f"{results.model_label}: test loss", f"{results.loss:.4f}"))
        rows.append(
            (
                f"{results.model_label}: test accuracy",
                f"{100 * results.accuracy:.2f}% of {len(results.labels)} images of {results.dataset}",
            )
        )
    return rows


def write_html(
    path: Path,
    png: Path,
    title: str,
    rows: list[tuple[str, str]],
    loaded: LoadedModel | None,
    results: TestResults | None,
) -> None:
    import os

    e = html.escape
    src = Path(os.path.relpath(png, path.parent)).as_posix()
    table = "\n".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
    per_class = ""
    if loaded is not None and results is not None:
        conf = results.confusion
        body = "\n".join(
            f"<tr><td>{e(n)}</td><td>{int(conf[i].sum())}</td><td>"
            f"{100 * int(conf[i, i]) / max(int(conf[i].sum()), 1):.2f}%</td></tr>"
            for i, n in enumerate(loaded.class_names)
        )
        per_class = (
            f"<h2>Per-class accuracy ({e(results.model_label)})</h2>\n<table>\n"
            f"<tr><th>class</th><th>images</th><th>accuracy</th></tr>\n{body}\n</table>"
        )
    path.write_text(f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{e(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; }}
img {{ max-width: 100%; }}
</style>
</head>
<body>
<h1>{e(title)}</h1>
<img src="{e(src)}" alt="training curves, confusion matrix and test predictions">
<h2>Final numbers</h2>
<table>
{table}
</table>
{per_class}
</body>
</html>
""")


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Render a run's report: OUT.png (loss and learning-rate "
        "curves, test accuracy per epoch, the final model's confusion matrix, test images "
        "with true and predicted labels) and OUT.html showing it with a table of the final "
        "numbers. Offline: reads OUTPUT_DIR/metrics.jsonl, the final model and the dataset.",
    )
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="the --output-dir of a distvgg.train run")
    p.add_argument(
        "--out",
        help="the PNG to write (default OUTPUT_DIR/report.png); the HTML page goes beside it "
        "with the same name and .html",
    )
    p.add_argument(
        "--checkpoint",
        help="the model to evaluate (default: OUTPUT_DIR/final, else OUTPUT_DIR/best, else the newest good checkpoint)",
    )
    p.add_argument(
        "--dataset",
        help="dataset for the confusion matrix and the images (default: the one recorded "
        "in OUTPUT_DIR/config.yaml or the model's training config)",
    )
    p.add_argument("--eval-limit", type=int, help="use a seeded, class-balanced subset of this many test images")
    p.add_argument("--cache-dir", help="decoded-dataset cache (default: the run's, else $DISTVGG_CACHE)")
    return p


def _load_model(args: argparse.Namespace, output_dir: Path) -> LoadedModel | None:
    if args.checkpoint:
        return load_checkpoint(args.checkpoint)  # asked for explicitly: a problem is an error
    from distvgg.checkpoint import step_folders

    if (output_dir / "final").is_dir() or (output_dir / "best").is_dir() or step_folders(output_dir):
        return load_checkpoint(output_dir)  # final/, else best/, else the newest good checkpoint
    print(
        f"{PROG}: warning: no model in {output_dir} yet (no final/, best/ or checkpoint); the report shows the "
        f"curves only",
        file=sys.stderr,
    )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Write the PNG and HTML; returns the process exit code."""
    from distvgg.data import DataError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.eval_limit is not None and args.eval_limit < 1:
        parser.error(f"--eval-limit must be a positive integer, got {args.eval_limit}")
    output_dir = Path(args.output_dir)
    out = Path(args.out) if args.out else output_dir / "report.png"
    if out.suffix.lower() != ".png":
        parser.error(f"--out must name a .png file, got {out}")
    if missing := require_matplotlib(PROG):
        parser.error(missing)
    try:
        if not output_dir.is_dir():
            raise ReportError(f"{output_dir} is not a folder: pass the --output-dir of a distvgg.train run")
        records = load_metrics(output_dir)
        loaded = _load_model(args, output_dir)
        results = None
        if loaded is not None:
            dataset = args.dataset or recorded_dataset(output_dir, loaded)
            if not dataset:
                raise ReportError(
                    f"neither {output_dir / 'config.yaml'} nor the model records the dataset: pass --dataset"
                )
            results = evaluate_model(loaded, dataset, args.eval_limit, args.cache_dir)
    except (ReportError, CheckpointError, DataError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    title = f"distvgg run {output_dir}"
    if loaded is not None:
        tc = loaded.train_config
        title += f": {tc.get('model', '')} width {tc.get('width', '')} on {results.dataset if results else ''}"
    render(out, records, loaded, results, title)
    page = out.with_suffix(".html")
    write_html(page, out, title, final_numbers(records, results), loaded, results)
    print(f"wrote {out} and {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
