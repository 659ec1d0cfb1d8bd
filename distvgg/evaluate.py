"""Evaluate a saved model on a dataset's test split: loss, accuracy, per-class accuracy, confusion matrix.

    python -m distvgg.evaluate --checkpoint runs/distvgg/final --dataset ../shared/data/cifar10-jpeg
    accelerate launch --config_file accelerate_configs/cpu_ddp2.yaml -m distvgg.evaluate --checkpoint ...

The counting is ``distvgg.train.evaluate`` (``gather_for_metrics``), the same code that evaluates
during training, so every test image counts exactly once for any number of processes. This module
also holds what ``predict`` and ``report`` share: finding and loading a checkpoint
(``load_checkpoint``), the confusion-matrix plot and the text tables.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from distvgg.models import CFGS, MODEL_CONFIG_FILE, MODEL_FILE, VGG, build_model, load_pretrained

PROG = "distvgg.evaluate"
CHECKPOINT_HELP = (
    "a training run's OUTPUT_DIR (its final/, else best/, else its newest good checkpoint), "
    "OUTPUT_DIR/final, OUTPUT_DIR/best, a checkpoint folder OUTPUT_DIR/checkpoints/step-N, "
    "or a model.safetensors file"
)
# Prefixes Accelerate's save_state leaves on parameter names: it saves the prepared model without
# unwrapping it, so DDP adds "module." and torch.compile "_orig_mod.".
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_TORCH_WEIGHTS = "pytorch_model.bin"  # what save_state writes with safe_serialization=False


class CheckpointError(ValueError):
    """No usable model at the given path; the message says what was expected."""


@dataclass
class LoadedModel:
    """A network in eval mode and what is needed to feed it and name its outputs."""

    model: VGG
    weights: Path  # the weights file that was loaded
    spec_source: Path  # where the network's description came from (model.json or config.yaml)
    class_names: list[str]
    names_known: bool  # False when the checkpoint carries no class names (placeholders "0", "1", ...)
    image_size: tuple[int, int]  # (H, W) the network was built for
    mean: float
    std: float
    train_config: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ---------------------------------------------------------------------------------------------------
# Finding and loading a checkpoint
# ---------------------------------------------------------------------------------------------------


def _weights_in(folder: Path) -> Path | None:
    for name in (MODEL_FILE, _TORCH_WEIGHTS):
        if (folder / name).is_file():
            return folder / name
    return None


def _note(message: str) -> None:
    """A warning on stderr, from the first process only (used before any Accelerator exists)."""
    import os

    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr)


def _is_training_checkpoint(folder: Path) -> bool:
    """An Accelerate save_state folder written by training (final/ and best/ hold a model.json instead)."""
    from distvgg.checkpoint import CHECKPOINTS_DIR, MARKER_FILE

    if (folder / MODEL_CONFIG_FILE).is_file():
        return False
    return folder.parent.name == CHECKPOINTS_DIR or (folder / MARKER_FILE).exists()


def _check_complete(folder: Path) -> None:
    """A training checkpoint is used only when its COMPLETE marker verifies (as when resuming)."""
    from distvgg.checkpoint import verify

    problem = verify(folder)
    if problem is not None:
        raise CheckpointError(
            f"{folder} is not a usable checkpoint: {problem}. Pass an earlier checkpoint, "
            f"or the run's final/ or best/ folder"
        )


def _newest_good_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoints/step-N of ``run_dir`` that verifies (None when there are none at all)."""
    from distvgg.checkpoint import step_folders, verify

    problems = []
    for _, folder in reversed(step_folders(run_dir)):
        problem = verify(folder)
        if problem is None and _weights_in(folder) is not None:
            return folder
        problems.append(f"{folder.name}: {problem or 'no ' + MODEL_FILE}")
    if problems:
        raise CheckpointError(
            f"no final/ or best/ model in {run_dir}, and no usable checkpoint: " + "; ".join(problems)
        )
    return None


def find_weights(path: str | Path) -> Path:
    """The weights file that ``path`` designates (see ``CHECKPOINT_HELP``)."""
    p = Path(path)
    if p.is_file():
        if p.suffix not in (".safetensors", ".bin"):
            raise CheckpointError(f"{p} is not a model file: expected {CHECKPOINT_HELP}")
        if _is_training_checkpoint(p.parent):
            _check_complete(p.parent)
        return p
    if not p.is_dir():
        raise CheckpointError(f"{p} does not exist: expected {CHECKPOINT_HELP}")
    for folder in (p, p / "final", p / "best"):
        weights = _weights_in(folder)
        if weights is not None:
            if folder == p and _is_training_checkpoint(p):
                _check_complete(p)
            return weights
    newest = _newest_good_checkpoint(p)
    if newest is not None:
        _note(f"no final/ or best/ model in {p} yet: using its newest checkpoint, {newest}")
        return _weights_in(newest)  # type: ignore[return-value]
    raise CheckpointError(
        f"no model in {p}: looked for {MODEL_FILE} in it, in its final/ and best/ folders and in "
        f"checkpoints/step-N (expected {CHECKPOINT_HELP})"
    )


def _read_state(weights: Path) -> dict[str, torch.Tensor]:
    try:
        if weights.suffix == ".bin":
            state = torch.load(weights, map_location="cpu", weights_only=True)
        else:
            from safetensors.torch import load_file

            state = load_file(str(weights), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors and torch.load raise many types for a damaged file
        raise CheckpointError(
            f"{weights} cannot be read ({type(e).__name__}: {e}); it may be truncated or "
            f"corrupt: use another checkpoint (e.g. OUTPUT_DIR/best or an earlier step)"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{weights} does not hold a state dict")
    return {_strip_wrappers(k): v for k, v in state.items()}


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _run_dir_of(folder: Path) -> Path:
    """OUTPUT_DIR of a checkpoint folder OUTPUT_DIR/checkpoints/step-N (else the folder's parent)."""
    return folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent


def _spec_from_config(config_file: Path, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Rebuild a model.json-like spec from the run's config.yaml and the weights' shapes.

    config.yaml has the network's name, width and dropout but not the number of classes or the
    image size: the classes are the last Linear layer's rows, and the (square) image size follows
    from the first Linear layer's inputs and the number of 2x2 pools.
    """
    import yaml

    try:
        cfg = yaml.safe_load(config_file.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"cannot read {config_file}: {e}") from e
    name = cfg.get("model", "vgg3layer")
    if name not in CFGS:
        raise CheckpointError(f"{config_file} names an unknown model {name!r}")
    linear = sorted(
        (k for k, v in state.items() if k.startswith("classifier.") and k.endswith(".weight") and v.ndim == 2),
        key=lambda k: int(k.split(".")[1]),
    )
    convs = sorted(
        (k for k, v in state.items() if k.startswith("features.") and k.endswith(".weight") and v.ndim == 4),
        key=lambda k: int(k.split(".")[1]),
    )
    if not linear or not convs:
        raise CheckpointError(f"the weights do not look like a distvgg {name} network (no classifier/features layers)")
    channels = state[convs[-1]].shape[0]
    cells = state[linear[0]].shape[1] // channels
    side = math.isqrt(cells)
    if side * side != cells:
        raise CheckpointError(
            f"cannot infer the image size from the weights (non-square feature map); "
            f"write the run's final/{MODEL_CONFIG_FILE} or pass a final/ or best/ folder"
        )
    size = side * 2 ** CFGS[name].count("M")
    return {
        "model": name,
        "num_classes": int(state[linear[-1]].shape[0]),
        "width": float(cfg.get("width", 1.0)),
        "dropout": float(cfg.get("dropout", 0.5)),
        "image_size": [size, size],
        "mean": cfg.get("mean", 0.5),
        "std": cfg.get("std", 0.5),
        "train_config": cfg,
    }


def _find_spec(folder: Path, state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], Path]:
    """The description of a network saved without one beside it (an Accelerate save_state folder)."""
    run_dir = _run_dir_of(folder)
    for candidate in (run_dir / "final" / MODEL_CONFIG_FILE, run_dir / "best" / MODEL_CONFIG_FILE):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text()), candidate
            except (OSError, json.JSONDecodeError) as e:
                raise CheckpointError(f"cannot read the model description {candidate}: {e}") from e
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        return _spec_from_config(config_file, state), config_file
    raise CheckpointError(
        f"{folder} has weights but nothing describes the network: looked for {MODEL_CONFIG_FILE} "
        f"beside them, in {run_dir / 'final'} and {run_dir / 'best'}, and for {config_file}"
    )


def _build(spec: dict[str, Any], state: dict[str, torch.Tensor], where: Path) -> VGG:
    try:
        model = build_model(
            spec["model"],
            int(spec["num_classes"]),
            width=float(spec.get("width", 1.0)),
            dropout=float(spec.get("dropout", 0.5)),
            image_size=tuple(spec.get("image_size", (32, 32))),
        )
        model.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"the weights do not fit the network described by {where}: {e}") from e
    return model.eval()


def load_checkpoint(path: str | Path) -> LoadedModel:
    """Load the model at ``path`` (see ``CHECKPOINT_HELP``) on the CPU, in eval mode."""
    weights = find_weights(path)
    folder = weights.parent
    if (folder / MODEL_CONFIG_FILE).is_file() and weights.suffix == ".safetensors":
        try:  # the package's own format (final/, best/): models.load_pretrained
            model, spec = load_pretrained(weights)
        except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"cannot load the model in {folder}: {e}") from e
        spec_source = folder / MODEL_CONFIG_FILE
    else:
        state = _read_state(weights)
        spec, spec_source = _find_spec(folder, state)
        model = _build(spec, state, spec_source)
    train_config = spec.get("train_config") or {}
    names = spec.get("class_names")
    known = bool(names) and len(names) == int(spec["num_classes"])
    if not known:
        names = [str(i) for i in range(int(spec["num_classes"]))]
    size = tuple(int(x) for x in spec.get("image_size", (32, 32)))
    return LoadedModel(
        model=model,
        weights=weights,
        spec_source=spec_source,
        class_names=list(names),
        names_known=known,
        image_size=(size[0], size[-1]),
        mean=float(spec.get("mean", train_config.get("mean", 0.5))),
        std=float(spec.get("std", train_config.get("std", 0.5))),
        train_config=dict(train_config),
    )


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


def make_prepare(mean: float, std: float):
    """The ``prepare_batch`` of ``train.evaluate`` for evaluation: normalise, no augmentation."""
    from distvgg import batches

    def prepare(batch: Any, epoch: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, _ = batch
        return batches.normalize(images, mean, std), labels

    return prepare


def load_test_split(
    dataset: str,
    loaded: LoadedModel,
    *,
    eval_limit: int | None = None,
    cache_dir: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    log=print,
    warn=None,
):
    """The test split of ``dataset`` (a seeded class-balanced subset with ``eval_limit``, the one training
    evaluated for the same limit and seed), checked against the model. Returns (split, dataset's class names).
    A model saved without class names takes the dataset's."""
    from distvgg.data import DataError, balanced_subset, load_image_data

    data = load_image_data(dataset, image_column=image_column, label_column=label_column, cache_dir=cache_dir, log=log)
    test = data.test
    size = (int(test.images.shape[-2]), int(test.images.shape[-1]))
    if size != loaded.image_size:
        raise DataError(
            f"the test images of {dataset} are {size[0]}x{size[1]} but the model in "
            f"{loaded.weights.parent} was built for {loaded.image_size[0]}x{loaded.image_size[1]}: "
            f"evaluate it on the dataset it was trained on, or on images of that size"
        )
    if data.num_classes != loaded.num_classes:
        raise DataError(
            f"{dataset} has {data.num_classes} classes but the model predicts {loaded.num_classes}: "
            f"evaluate it on a dataset with the same classes"
        )
    if loaded.names_known and list(data.class_names) != loaded.class_names and warn is not None:
        warn(
            f"warning: the class names of {dataset} ({', '.join(data.class_names)}) differ from the model's "
            f"({', '.join(loaded.class_names)}); the model's names are used"
        )
    if not loaded.names_known:  # a checkpoint without class names: name the outputs after the dataset's classes
        loaded.class_names, loaded.names_known = list(data.class_names), True
    if eval_limit:
        idx = balanced_subset(test.labels, eval_limit, int(loaded.train_config.get("seed", 0)) + 1)
        test = type(test)(test.images[idx], test.labels[idx])
    return test, list(data.class_names)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts, rows the true class, columns the predicted one (as ``train.evaluate``)."""
    return torch.bincount(target * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)


# ---------------------------------------------------------------------------------------------------
# Output: tables, JSON, plot
# ---------------------------------------------------------------------------------------------------


def per_class_table(names: Sequence[str], confusion: Sequence[Sequence[int]]) -> str:
    width = max(8, *(len(n) for n in names))
    lines = [f"  {'class':<{width}}  {'images':>7}  {'correct':>7}  {'accuracy':>8}"]
    for i, name in enumerate(names):
        total, right = sum(confusion[i]), confusion[i][i]
        acc = f"{100 * right / total:7.2f}%" if total else "       -"
        lines.append(f"  {name:<{width}}  {total:>7}  {right:>7}  {acc:>8}")
    return "\n".join(lines)


def confusion_table(names: Sequence[str], confusion: Sequence[Sequence[int]]) -> str:
    """Rows: true class (index and name); columns: predicted class index."""
    k = len(names)
    cell = max(3, len(str(max((max(r) for r in confusion), default=0))), len(str(k - 1))) + 1
    digits = len(str(k - 1))
    header = "true \\ predicted"
    label = max(len(header), max(len(n) for n in names) + digits + 1)
    lines = [f"  {header:<{label}}" + "".join(f"{j:>{cell}}" for j in range(k))]
    for i, name in enumerate(names):
        row = f"{i:>{digits}} {name}"
        lines.append(f"  {row:<{label}}" + "".join(f"{v:>{cell}}" for v in confusion[i]))
    return "\n".join(lines)


def plot_confusion(ax: Any, confusion: Sequence[Sequence[int]], names: Sequence[str], title: str = "") -> None:
    """The confusion matrix as a heat map on a matplotlib Axes, counts written in the cells."""
    import numpy as np

    m = np.asarray(confusion)
    k = len(names)
    rows = m.sum(1, keepdims=True)
    ax.imshow(m / np.maximum(rows, 1), cmap="Blues", vmin=0, vmax=1)  # colour: fraction of the true class
    ax.set_xticks(range(k), labels=names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels=names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                frac = m[i, j] / max(rows[i, 0], 1)
                ax.text(
                    j, i, str(m[i, j]), ha="center", va="center", fontsize=7, color="white" if frac > 0.5 else "black"
                )


def save_confusion_png(path: str | Path, confusion: Sequence[Sequence[int]], names: Sequence[str], title: str) -> None:
    from matplotlib.figure import Figure  # a Figure without pyplot renders with Agg: no display, no global state

    k = len(names)
    side = min(max(5.0, 0.6 * k + 2.5), 30.0)
    fig = Figure(figsize=(side, side), layout="constrained")
    plot_confusion(fig.add_subplot(), confusion, names, title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def _write_json(path: str, result: dict[str, Any]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def summarize(result: dict[str, Any], names: Sequence[str], extra: dict[str, Any]) -> dict[str, Any]:
    """``train.evaluate``'s result with class names attached, as written to --json."""
    confusion = result["confusion"]
    return {
        **extra,
        "count": result["count"],
        "loss": result["loss"],
        "accuracy": result["accuracy"],
        "class_names": list(names),
        "per_class": {
            n: {"images": sum(confusion[i]), "correct": confusion[i][i], "accuracy": result["per_class_accuracy"][i]}
            for i, n in enumerate(names)
        },
        "confusion": confusion,
    }


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate a saved distvgg model on a dataset's test split: "
        "loss, accuracy, per-class accuracy and confusion matrix. Runs under "
        "`accelerate launch` with any number of processes; every image counts once.",
    )
    p.add_argument("--checkpoint", required=True, help=f"the model: {CHECKPOINT_HELP}")
    p.add_argument(
        "--dataset",
        help="dataset whose test split is evaluated, as for distvgg.train "
        "(default: the dataset the model was trained on)",
    )
    p.add_argument(
        "--eval-limit",
        type=int,
        help="evaluate a seeded, class-balanced subset of this many test images "
        "(the same subset training evaluated with the same --eval-limit)",
    )
    p.add_argument("--batch-size", type=int, help="images per process per batch (default: the run's --eval-batch-size)")
    p.add_argument(
        "--tta",
        choices=("none", "flip"),
        default="none",
        help="test-time augmentation: flip averages the logits of each image and its mirror",
    )
    p.add_argument("--json", metavar="OUT.json", help="write all results (per-class, confusion matrix) as JSON")
    p.add_argument("--confusion-png", metavar="OUT.png", help="save the confusion matrix as a PNG")
    p.add_argument(
        "--cache-dir", help="decoded-dataset cache (default: the run's, else $DISTVGG_CACHE or ~/.cache/distvgg)"
    )
    for kind in ("image", "label"):
        p.add_argument(
            f"--{kind}-column", help=f"{kind} column (default: the run's when --dataset is not given, else detected)"
        )
    return p


def require_matplotlib(what: str) -> str | None:
    """A problem message when matplotlib (a dependency, but one a trimmed install may lack) is missing."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return f"{what} needs matplotlib: pip install matplotlib"
    return None


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    problems = [
        f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}"
        for name in ("eval_limit", "batch_size")
        if getattr(args, name) is not None and getattr(args, name) < 1
    ]
    if args.confusion_png and (missing := require_matplotlib("--confusion-png")):
        problems.append(missing)
    if problems:
        p.error("; ".join(problems))


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate and print; returns the process exit code (1 for a bad checkpoint or dataset)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        loaded = load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        import os

        if os.environ.get("RANK", "0") == "0":  # before the Accelerator exists: one message per launch, not per process
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    from distvgg.config import TrainConfig
    from distvgg.data import DataError
    from distvgg.train import LaunchError, make_accelerator

    tc = loaded.train_config
    try:  # the training script's Accelerator: the same launch check, gloo for multi-process CPU runs
        accelerator = make_accelerator(TrainConfig(report_to="none", output_dir=str(loaded.weights.parent)))
    except LaunchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        return _evaluate(args, loaded, accelerator, tc)
    except (DataError, CheckpointError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    finally:
        accelerator.end_training()


def _evaluate(args: argparse.Namespace, loaded: LoadedModel, accelerator: Any, tc: dict[str, Any]) -> int:
    from distvgg import batches, train

    main_process = accelerator.is_main_process
    say = accelerator.print
    dataset = args.dataset or tc.get("dataset")
    if not dataset:
        raise CheckpointError(f"{loaded.spec_source} does not record the training dataset: pass --dataset")
    same = args.dataset is None
    with accelerator.local_main_process_first():
        test, _ = load_test_split(
            dataset,
            loaded,
            eval_limit=args.eval_limit,
            cache_dir=args.cache_dir or tc.get("cache_dir"),
            image_column=args.image_column or (tc.get("image_column") if same else None),
            label_column=args.label_column or (tc.get("label_column") if same else None),
            log=say if main_process else (lambda *_: None),
            warn=(lambda m: print(m, file=sys.stderr)) if main_process else None,
        )
    batch_size = args.batch_size or int(tc.get("eval_batch_size", 500))
    loader = accelerator.prepare(batches.eval_loader(test.images, test.labels, batch_size))
    model: nn.Module = loaded.model.to(accelerator.device)
    result = train.evaluate(
        model, loader, accelerator, make_prepare(loaded.mean, loaded.std), loaded.num_classes, tta=args.tta == "flip"
    )
    if not main_process:
        return 0
    names = loaded.class_names
    tta = f", TTA {args.tta}" if args.tta != "none" else ""
    say(f"model: {loaded.weights} ({loaded.image_size[0]}x{loaded.image_size[1]}, {loaded.num_classes} classes)")
    say(
        f"test loss: {result['loss']:.4f}  accuracy: {100 * result['accuracy']:.2f}%  "
        f"({result['count']} images of {dataset}, {accelerator.num_processes} process(es){tta})"
    )
    say("\nper-class accuracy:\n" + per_class_table(names, result["confusion"]))
    say(
        "\nconfusion matrix (rows: true class, columns: predicted class index):\n"
        + confusion_table(names, result["confusion"])
    )
    summary = summarize(
        result,
        names,
        {
            "checkpoint": str(loaded.weights),
            "dataset": dataset,
            "tta": args.tta,
            "eval_limit": args.eval_limit,
            "num_processes": accelerator.num_processes,
        },
    )
    if args.json:
        _write_json(args.json, summary)
        say(f"\nwrote {args.json}")
    if args.confusion_png:
        title = f"{Path(dataset).name or dataset}: accuracy {100 * result['accuracy']:.2f}% ({result['count']} images)"
        save_confusion_png(args.confusion_png, result["confusion"], names, title)
        say(f"wrote {args.confusion_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
