"""Evaluate a saved model on a test split: loss, accuracy, per-class accuracy and confusion matrix. The numbers are
the training loop's own (evaluation.evaluate, with gather_for_metrics), so under `accelerate launch` with any number of
processes every test image counts once."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distvgg.config import positive_int
from distvgg.evaluation import TTA_MODES, evaluate
from distvgg.models import MODEL_PATH_HELP, LoadedModel, ModelLoadError, load_model

PROG = "distvgg.evaluate"


class _OneOrTwo(argparse.Action):
    """``nargs="+"`` held to one or two values: argparse has no range of counts."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        if len(values) > 2:
            parser.error(f"{option_string} takes one or two numbers (N, or H W), got {len(values)}")
        setattr(namespace, self.dest, values)


def add_test_options(p: argparse.ArgumentParser, dataset_help: str) -> None:
    """The options of evaluate and report that choose the test images and how they are read (by default as the
    run read them: the model was built for its image size)."""
    p.add_argument("--dataset", help=dataset_help)
    p.add_argument("--eval-limit", type=positive_int, help="a seeded, class-balanced subset of this many test images")
    p.add_argument("--cache-dir", help="decoded-dataset cache (default: the run's, else $DISTVGG_CACHE)")
    size_help = "resize the test images to N x N or H x W as they are decoded (default: as the run did, --image-size)"
    p.add_argument("--image-size", action=_OneOrTwo, nargs="+", type=positive_int, metavar="N", help=size_help)


def load_test_split(
    dataset: str, loaded: LoadedModel, eval_limit: int | None = None, warn: Callable | None = None, **load_args: Any
) -> Any:
    """The test split of ``dataset``, checked against the model (other class names: a warning), cut for ``eval_limit``
    as training cut it; ``load_args`` go to ``data.load_image_data``."""
    from distvgg.data import DataError, limited, load_image_data

    data = load_image_data(dataset, **load_args)
    size = tuple(data.test.images.shape[-2:])
    if size != loaded.image_size:
        raise DataError(
            f"the test images of {dataset} are {size[0]}x{size[1]} but the model {loaded.weights} was built for "
            f"{loaded.image_size[0]}x{loaded.image_size[1]}: evaluate it on the dataset it was trained on, or resize "
            f"the images with --image-size {loaded.image_size[0]} {loaded.image_size[1]}"
        )
    if data.num_classes != loaded.num_classes:
        raise DataError(f"{dataset} has {data.num_classes} classes but the model predicts {loaded.num_classes}")
    if list(data.class_names) != loaded.class_names and warn is not None:
        warn(f"the class names of {dataset} differ from the model's ({', '.join(loaded.class_names)}), which are used")
    return limited(data.train, data.test, None, eval_limit, int(loaded.train_config.get("seed", 0)))[1]


def evaluate_model(
    loaded: LoadedModel, accelerator: Any, dataset: str | None = None, *, batch_size: int | None = None, **options: Any
) -> tuple[dict[str, Any], Any, str]:
    """``evaluation.evaluate``'s result on the test split of ``dataset`` (default: the run's), the split and the
    dataset. The images are read as training read them (cache, image size, bad images; its own dataset's columns)
    unless ``options`` say otherwise: eval_limit, tta, warn, cache_dir, image_size, image_column, label_column."""
    from distvgg import batches

    tc, tta = loaded.train_config, options.pop("tta", "none")
    defaults = ("cache_dir", "image_size", "skip_bad_images") + (() if dataset else ("image_column", "label_column"))
    options = {**{k: tc.get(k) for k in defaults}, **{k: v for k, v in options.items() if v is not None}}
    if not (dataset := dataset or tc.get("dataset")):
        raise ModelLoadError(f"{loaded.weights} does not record the dataset it was trained on: pass --dataset")
    with accelerator.local_main_process_first():
        log = accelerator.print if accelerator.is_main_process else lambda *_: None
        test = load_test_split(dataset, loaded, log=log, **options)
    loader = batches.eval_loader(test.images, test.labels, batch_size or int(tc.get("eval_batch_size", 500)))
    model, loader = loaded.model.to(accelerator.device), accelerator.prepare(loader)
    result = evaluate(model, loader, accelerator, loaded.num_classes, mean=loaded.mean, std=loaded.std, tta=tta)
    return result, test, dataset


def result_tables(names: Sequence[str], result: dict[str, Any]) -> str:
    """The per-class accuracy table, then the confusion matrix (rows: true class; columns: predicted class index)."""
    width, confusion = max(8, *(len(n) for n in names)), result["confusion"]
    lines = ["per-class accuracy:", f"  {'class':<{width}}  {'images':>7}  {'correct':>7}  {'accuracy':>8}"]
    for i, name in enumerate(names):
        row = confusion[i]
        acc = f"{100 * result['per_class_accuracy'][i]:7.2f}%" if sum(row) else "       -"
        lines.append(f"  {name:<{width}}  {sum(row):>7}  {row[i]:>7}  {acc:>8}")
    digits, header = len(str(len(names) - 1)), "true \\ predicted"
    cell = max(3, digits, *(len(str(v)) for row in confusion for v in row)) + 1
    label = max(len(header), digits + 1 + max(len(n) for n in names))
    lines += ["", "confusion matrix (rows: true class, columns: predicted class index):"]
    lines.append(f"  {header:<{label}}" + "".join(f"{j:>{cell}}" for j in range(len(names))))
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--checkpoint", required=True, help=f"the model: {MODEL_PATH_HELP}")
    add_test_options(p, "dataset whose test split is evaluated (default: the one the model trained on)")
    p.add_argument("--batch-size", type=positive_int, help="images per process per batch (default: the run's)")
    tta_help = "flip: average with the mirror's logits; translate: with those of 1-pixel shifts too (6 passes)"
    p.add_argument("--tta", choices=TTA_MODES, default="none", help=tta_help)
    p.add_argument("--json", metavar="OUT.json", help="write all results (per-class, confusion matrix) as JSON")
    p.add_argument("--confusion-png", metavar="OUT.png", help="save the confusion matrix as a PNG")
    for column in ("image", "label"):
        p.add_argument(f"--{column}-column", help=f"{column} column (default: the run's when --dataset is not given)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate and print; returns the exit code: 1 for a bad model or dataset, 2 for a bad launch (as training)."""
    from distvgg.build import LaunchError, make_accelerator
    from distvgg.data import DataError

    args = build_parser().parse_args(argv)
    first = os.environ.get("RANK", "0") == "0"  # the main process: one message per launch
    warn = (lambda m: print(f"{PROG}: warning: {m}", file=sys.stderr)) if first else None
    accelerator = None
    try:
        loaded = load_model(args.checkpoint, warn=warn)
        accelerator = make_accelerator()
        return _evaluate(args, loaded, accelerator, warn)
    except (ModelLoadError, DataError, LaunchError) as e:
        if first:
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, LaunchError) else 1
    finally:
        if accelerator is not None:
            accelerator.free_memory()  # the prepared objects go before the process group (see train.main)
            accelerator.end_training()


def _evaluate(args: argparse.Namespace, loaded: LoadedModel, accelerator: Any, warn: Any) -> int:
    option_names = ("batch_size", "eval_limit", "cache_dir", "image_size", "image_column", "label_column")
    options = {k: getattr(args, k) for k in option_names}
    result, _, dataset = evaluate_model(loaded, accelerator, args.dataset, tta=args.tta, warn=warn, **options)
    if not accelerator.is_main_process:
        return 0
    names, n, say = loaded.class_names, accelerator.num_processes, accelerator.print
    say(f"model: {loaded.weights} ({loaded.image_size[0]}x{loaded.image_size[1]}, {loaded.num_classes} classes)")
    say(
        f"test loss: {result['loss']:.4f}  accuracy: {100 * result['accuracy']:.2f}%  ({result['count']} images of "
        f"{dataset}, {n} process(es){f', TTA {args.tta}' if args.tta != 'none' else ''})"
    )
    say("\n" + result_tables(names, result))
    if args.json:
        facts = {"checkpoint": str(loaded.weights), "dataset": dataset, "tta": args.tta, "eval_limit": args.eval_limit}
        summary = {**facts, "num_processes": n, **result, "class_names": names}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        say(f"\nwrote {args.json}")
    if args.confusion_png:
        from matplotlib.figure import Figure  # a Figure without pyplot renders with Agg: no display, no global state

        title = f"{Path(dataset).name or dataset}: accuracy {100 * result['accuracy']:.2f}% ({result['count']} images)"
        side = min(max(5.0, 0.6 * len(names) + 2.5), 30.0)
        fig = Figure(figsize=(side, side), layout="constrained")
        plot_confusion(fig.add_subplot(), result["confusion"], names, title)
        Path(args.confusion_png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.confusion_png, dpi=100)
        say(f"wrote {args.confusion_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
