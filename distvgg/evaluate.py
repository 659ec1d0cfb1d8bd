"""Evaluate a saved model on a dataset's test split: loss, accuracy, per-class accuracy, confusion matrix.

    python -m distvgg.evaluate --checkpoint runs/distvgg --json eval.json --confusion-png confusion.png
    accelerate launch --config_file accelerate_configs/cpu_ddp2.yaml -m distvgg.evaluate --checkpoint runs/distvgg

The numbers are those of the training loop's own evaluation, ``distvgg.train.evaluate``
(``gather_for_metrics``), so every test image counts exactly once for any number of processes.
This module also renders its result (text tables, the confusion-matrix plot) for ``report``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distvgg.models import MODEL_PATH_HELP, LoadedModel, ModelLoadError, load_model

PROG = "distvgg.evaluate"


def load_test_split(
    dataset: str, loaded: LoadedModel, eval_limit: int | None = None, warn: Callable | None = None, **load_args: Any
) -> Any:
    """The test split of ``dataset``, checked against the model; with ``eval_limit``, the seeded class-balanced
    subset training evaluated for the same limit and seed (``data.limited``). Other class names are a warning.
    ``load_args`` go to ``data.load_image_data`` (cache_dir, image_column, label_column, log)."""
    from distvgg.data import DataError, limited, load_image_data

    data = load_image_data(dataset, **load_args)
    test = data.test
    size = tuple(test.images.shape[-2:])
    if size != loaded.image_size:
        raise DataError(
            f"the test images of {dataset} are {size[0]}x{size[1]} but the model {loaded.weights} was built for "
            f"{loaded.image_size[0]}x{loaded.image_size[1]}: evaluate it on the dataset it was trained on"
        )
    if data.num_classes != loaded.num_classes:
        raise DataError(
            f"{dataset} has {data.num_classes} classes but the model predicts {loaded.num_classes}: "
            f"evaluate it on a dataset with the same classes"
        )
    if list(data.class_names) != loaded.class_names and warn is not None:
        warn(
            f"the class names of {dataset} ({', '.join(data.class_names)}) differ from the model's "
            f"({', '.join(loaded.class_names)}); the model's names are used"
        )
    return limited(data.train, test, None, eval_limit, int(loaded.train_config.get("seed", 0)))[1]


def evaluate_model(
    loaded: LoadedModel, accelerator: Any, dataset: str | None = None, *, batch_size: int | None = None, **options: Any
) -> tuple[dict[str, Any], Any, str]:
    """``train.evaluate``'s result (loss, accuracy, count, per_class_accuracy, confusion) for the model on the test
    split of ``dataset`` (default: the one it trained on, read as training read it), the split and the dataset.
    ``options``: eval_limit, tta, warn, cache_dir, image_column, label_column (None: the run's)."""
    from distvgg import batches, train

    tc, tta = loaded.train_config, options.pop("tta", False)
    defaults = {"cache_dir": tc.get("cache_dir")}
    if dataset is None:
        dataset = tc.get("dataset")
        defaults.update(image_column=tc.get("image_column"), label_column=tc.get("label_column"))
    if not dataset:
        raise ModelLoadError(f"{loaded.weights} does not record the dataset it was trained on: pass --dataset")
    options = {**defaults, **{k: v for k, v in options.items() if v is not None}}
    main_process = accelerator.is_main_process
    with accelerator.local_main_process_first():
        test = load_test_split(dataset, loaded, log=accelerator.print if main_process else lambda *_: None, **options)
    loader = batches.eval_loader(test.images, test.labels, batch_size or int(tc.get("eval_batch_size", 500)))
    model, loader = loaded.model.to(accelerator.device), accelerator.prepare(loader)
    result = train.evaluate(model, loader, accelerator, loaded.num_classes, mean=loaded.mean, std=loaded.std, tta=tta)
    return result, test, dataset


def per_class_table(names: Sequence[str], result: dict[str, Any]) -> str:
    width = max(8, *(len(n) for n in names))
    lines = [f"  {'class':<{width}}  {'images':>7}  {'correct':>7}  {'accuracy':>8}"]
    for i, name in enumerate(names):
        row = result["confusion"][i]
        acc = f"{100 * result['per_class_accuracy'][i]:7.2f}%" if sum(row) else "       -"
        lines.append(f"  {name:<{width}}  {sum(row):>7}  {row[i]:>7}  {acc:>8}")
    return "\n".join(lines)


def confusion_table(names: Sequence[str], confusion: Sequence[Sequence[int]]) -> str:
    """Rows: true class (index and name); columns: predicted class index."""
    digits = len(str(len(names) - 1))
    cell = max(3, digits, *(len(str(v)) for row in confusion for v in row)) + 1
    header = "true \\ predicted"
    label = max(len(header), digits + 1 + max(len(n) for n in names))
    lines = [f"  {header:<{label}}" + "".join(f"{j:>{cell}}" for j in range(len(names)))]
    for i, name in enumerate(names):
        lines.append(f"  {f'{i:>{digits}} {name}':<{label}}" + "".join(f"{v:>{cell}}" for v in confusion[i]))
    return "\n".join(lines)


def plot_confusion(ax: Any, confusion: Sequence[Sequence[int]], names: Sequence[str], title: str) -> None:
    """The confusion matrix as a heat map on a matplotlib Axes (colour: fraction of the true class), with counts."""
    import numpy as np

    m = np.asarray(confusion)
    frac = m / np.maximum(m.sum(1, keepdims=True), 1)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), labels=names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), labels=names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if len(names) <= 20:
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if frac[i, j] > 0.5 else "black")


def save_confusion_png(path: str, confusion: Sequence[Sequence[int]], names: Sequence[str], title: str) -> None:
    from matplotlib.figure import Figure  # a Figure without pyplot renders with Agg: no display, no global state

    side = min(max(5.0, 0.6 * len(names) + 2.5), 30.0)
    fig = Figure(figsize=(side, side), layout="constrained")
    plot_confusion(fig.add_subplot(), confusion, names, title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate a saved distvgg model on a dataset's test split: loss, accuracy, per-class accuracy "
        "and confusion matrix. Runs under `accelerate launch` with any number of processes; every image counts once.",
    )
    p.add_argument("--checkpoint", required=True, help=f"the model: {MODEL_PATH_HELP}")
    p.add_argument("--dataset", help="dataset whose test split is evaluated (default: the one the model trained on)")
    p.add_argument("--eval-limit", type=positive, help="a seeded, class-balanced subset of this many test images")
    p.add_argument("--batch-size", type=positive, help="images per process per batch (default: the run's)")
    p.add_argument("--tta", choices=("none", "flip"), default="none", help="flip: average with the mirror's logits")
    p.add_argument("--json", metavar="OUT.json", help="write all results (per-class, confusion matrix) as JSON")
    p.add_argument("--confusion-png", metavar="OUT.png", help="save the confusion matrix as a PNG")
    p.add_argument("--cache-dir", help="decoded-dataset cache (default: the run's, else $DISTVGG_CACHE)")
    p.add_argument("--image-column", help="image column (default: the run's when --dataset is not given)")
    p.add_argument("--label-column", help="label column (default: the run's when --dataset is not given)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate and print; returns the process exit code (1 for any error)."""
    from distvgg.build import LaunchError, make_accelerator
    from distvgg.data import DataError

    args = build_parser().parse_args(argv)
    first = os.environ.get("RANK", "0") == "0"  # one message per launch, not per process
    warn = (lambda m: print(f"{PROG}: warning: {m}", file=sys.stderr)) if first else None
    try:
        loaded = load_model(args.checkpoint, warn=warn)
        accelerator = make_accelerator()
    except (ModelLoadError, LaunchError) as e:
        if first:
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    try:
        return _evaluate(args, loaded, accelerator, warn if accelerator.is_main_process else None)
    except (DataError, ModelLoadError) as e:
        if first:
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    finally:
        accelerator.free_memory()  # the prepared objects go before the process group (see train.main)
        accelerator.end_training()


def _evaluate(args: argparse.Namespace, loaded: LoadedModel, accelerator: Any, warn: Any) -> int:
    columns = {"cache_dir": args.cache_dir, "image_column": args.image_column, "label_column": args.label_column}
    result, _, dataset = evaluate_model(
        loaded,
        accelerator,
        args.dataset,
        batch_size=args.batch_size,
        eval_limit=args.eval_limit,
        tta=args.tta == "flip",
        warn=warn,
        **columns,
    )
    if not accelerator.is_main_process:
        return 0
    names, n, say = loaded.class_names, accelerator.num_processes, accelerator.print
    say(f"model: {loaded.weights} ({loaded.image_size[0]}x{loaded.image_size[1]}, {loaded.num_classes} classes)")
    say(
        f"test loss: {result['loss']:.4f}  accuracy: {100 * result['accuracy']:.2f}%  ({result['count']} images of "
        f"{dataset}, {n} process(es){', TTA flip' if args.tta == 'flip' else ''})"
    )
    say("\nper-class accuracy:\n" + per_class_table(names, result))
    say("\nconfusion matrix (rows: true class, columns: predicted class index):")
    say(confusion_table(names, result["confusion"]))
    if args.json:
        facts = {"checkpoint": str(loaded.weights), "dataset": dataset, "tta": args.tta, "eval_limit": args.eval_limit}
        summary = {**facts, "num_processes": n, **result, "class_names": names}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        say(f"\nwrote {args.json}")
    if args.confusion_png:
        title = f"{Path(dataset).name or dataset}: accuracy {100 * result['accuracy']:.2f}% ({result['count']} images)"
        save_confusion_png(args.confusion_png, result["confusion"], names, title)
        say(f"wrote {args.confusion_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
