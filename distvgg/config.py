"""Every knob of a training run: one dataclass, one validation, one command line.

Each field's docstring is its ``--help`` text. Options come from defaults, then an
optional YAML file (``--config FILE``), then the command line, each overriding the last.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import os
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from distvgg.models import MODEL_NAMES

REPORT_TO = ("wandb", "tensorboard", "all", "none")
MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "none")
COMM_HOOKS = ("none", "fp16", "bf16")
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "loop")


class ConfigError(ValueError):
    """One or more invalid options; the message lists every problem."""


@dataclass
class TrainConfig:
    # --- data
    dataset: str = "uoft-cs/cifar10"
    """Hub dataset name, or a local directory: Hub-layout parquet files, a save_to_disk folder, an image folder
    (train/<class>/*.png) or torchvision's cifar-10-batches-py."""
    image_column: Optional[str] = None
    """Column holding the images (default: the first Image feature)."""
    label_column: Optional[str] = None
    """Column holding the labels (default: the first ClassLabel feature)."""
    cache_dir: Optional[str] = None
    """Where decoded uint8 tensors are cached (default: $DISTVGG_CACHE or ~/.cache/distvgg)."""
    train_limit: Optional[int] = None
    """Train on a seeded, class-balanced subset of this many images (smoke runs)."""
    eval_limit: Optional[int] = None
    """Evaluate on a seeded, class-balanced subset of this many test images."""
    skip_bad_images: bool = False
    """Drop images that fail to decode (counted and reported) instead of stopping with an error."""
    image_size: Optional[list[int]] = None
    """Resize every image to N x N (one number) or H x W (two) when it is decoded; needed for a dataset of mixed
    sizes. Unset: the dataset's own size."""
    augment: bool = True
    """Random crop (pad 4) and horizontal flip, done on the training device."""
    cutout: int = 0
    """Cutout: zero a square of this many pixels at a random place of each training image (0: off)."""
    mixup: float = 0.0
    """Mixup: mix each batch with itself reversed, by a Beta(ALPHA, ALPHA) weight, targets too (0: off)."""
    cutmix: float = 0.0
    """CutMix: paste a box of the reversed batch into each batch, its area drawn from Beta(ALPHA, ALPHA), targets
    mixed by area (0: off). With --mixup too, each step uses one of the two, at random."""
    mean: float = 0.5
    """Normalisation mean, for every channel (the guide's 0.5)."""
    std: float = 0.5
    """Normalisation standard deviation, for every channel (the guide's 0.5)."""
    num_workers: int = 0
    """DataLoader worker processes (batches are sliced from an in-memory tensor, so 0 is usually fastest)."""
    cpu_threads: Optional[int] = None
    """Threads per process when training on the CPU (default: physical cores / processes on this machine)."""
    data_on_device: str = "auto"
    """Keep the whole uint8 dataset on the training device: auto (on CUDA), yes or no."""
    # --- model
    model: str = "vgg3layer"
    """Network: vgg3layer (the guide's), vgg11, vgg13, vgg16 or vgg19 (all with BatchNorm), or resnet18
    (torchvision's, with a small-image stem for images up to 64 pixels)."""
    width: float = 1.0
    """Multiplier on every layer's width of the VGG networks; small values train tiny networks fast (tests)."""
    dropout: float = 0.5
    """Dropout probability in the classifier (the guide's nn.Dropout() default)."""
    channels_last: bool = True
    """Run convolutions in channels_last memory format (measured faster on the CPU; the usual choice on GPUs)."""
    sync_bn: bool = False
    """Convert BatchNorm to SyncBatchNorm for multi-GPU runs (CUDA only)."""
    compile: bool = False
    """torch.compile the model (compile time is reported apart)."""
    tf32: bool = True
    """Allow TF32 matmuls and convolutions on CUDA GPUs that have them (no effect on the CPU)."""
    deterministic: bool = False
    """Deterministic kernels (torch.use_deterministic_algorithms, no cuDNN autotuning, a fixed cuBLAS workspace),
    so that a resumed GPU run repeats bitwise; slower on GPUs."""
    # --- optimisation
    epochs: int = 10
    """Passes over the training set."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (overrides epochs when reached first)."""
    batch_size: int = 64
    """Images per process per micro-batch (the guide's 64)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; global batch = batch_size x processes x this."""
    eval_batch_size: int = 500
    """Images per process per evaluation batch."""
    optimizer: str = "sgd"
    """sgd (with momentum, as in the guide) or adamw."""
    lr: float = 0.01
    """Peak learning rate (the guide's 0.01), for a global batch of --lr-reference-batch when that is set."""
    lr_reference_batch: Optional[int] = None
    """Scale the learning rate with the global batch: lr x global batch / this (the linear scaling rule); unset,
    --lr is used as it is for any number of processes."""
    momentum: float = 0.9
    """SGD momentum (the guide's 0.9)."""
    nesterov: bool = False
    """Nesterov momentum for SGD."""
    optimizer_impl: str = "auto"
    """Optimizer kernels: fused (one kernel for all parameters), foreach, loop (one parameter at a time) or
    auto (fused: measured fastest on CPU and CUDA)."""
    weight_decay: float = 0.0
    """Weight decay."""
    schedule: str = "cosine"
    """Learning-rate schedule over the run's optimizer steps: cosine, onecycle or none."""
    warmup_steps: int = 0
    """Linear warm-up steps before the cosine decay."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy loss (also of mixup's and cutmix's mixed targets)."""
    ema_decay: Optional[float] = None
    """Keep an exponential moving average of the weights, with this decay per optimizer step (e.g. 0.999); it is
    what is evaluated and saved in best/ and final/ (checkpoints keep both)."""
    tta: bool = False
    """Flip test-time augmentation: evaluate on the mean logits of each test image and its mirror image."""
    max_grad_norm: Optional[float] = None
    """Clip the gradient norm to this value."""
    # --- run
    recipe: Optional[str] = None
    """A named recipe shipped with distvgg (fast: the GPU time-to-accuracy recipe) or a YAML file; its options
    apply first, then --config, then the command line."""
    seed: int = 0
    """Seed for weights, data order, augmentation and dropout."""
    output_dir: str = "runs/distvgg"
    """Where metrics.jsonl, config.yaml, checkpoints and final/ go."""
    mixed_precision: Optional[str] = None
    """no, fp16 or bf16 (default: the accelerate config's)."""
    log_every: int = 100
    """Print and log the training loss every this many optimizer steps (the guide's 100)."""
    report_to: str = "wandb"
    """Trackers: wandb, tensorboard, all or none (metrics.jsonl is always written)."""
    wandb_project: str = "distvgg"
    """W&B project."""
    wandb_entity: Optional[str] = None
    """W&B entity (team or user)."""
    wandb_name: Optional[str] = None
    """W&B run name."""
    wandb_tags: list[str] = field(default_factory=list)
    """W&B tags."""
    wandb_log_model: bool = False
    """Upload final/ (weights and model.json) as a W&B model artifact of the run."""
    wandb_rewind: bool = False
    """When a resumed run runs steps again that W&B already has, rewind the W&B run to the checkpoint's step
    (W&B's resume_from; the server must offer run rewind). Without it, or offline, a new W&B run continues."""
    ddp_timeout: int = 1800
    """Seconds a collective may wait before the job fails (a dead process ends the job, not hangs it)."""
    ddp_comm_hook: str = "none"
    """DDP gradient compression: none, fp16 or bf16."""
    # --- checkpoints (see distvgg/checkpoint.py and the README's "Checkpoints and resume")
    checkpoint_every: str = "epoch"
    """Write a checkpoint to OUTPUT_DIR/checkpoints every N optimizer steps, after every epoch (epoch), or
    never (none; a stop signal still writes one)."""
    keep_last: int = 3
    """Keep this many of the newest checkpoints; older ones are deleted once a newer one is complete."""
    allow_batch_change: bool = False
    """Continue a checkpoint with another global batch (batch size x processes x accumulation steps): from the
    same place in the data, with the learning-rate rule applied to the new batch. Not the same run any more."""
    resume: str = "auto"
    """auto: continue from the latest good checkpoint in --output-dir, or start fresh when there is none; PATH:
    continue from that checkpoint folder; none: start over (the earlier run's outputs are moved aside, not
    deleted)."""

    def problems(self) -> list[str]:
        """Every invalid option, one message each."""
        choices = {
            "model": MODEL_NAMES,
            "optimizer": OPTIMIZERS,
            "schedule": SCHEDULES,
            "report_to": REPORT_TO,
            "ddp_comm_hook": COMM_HOOKS,
            "data_on_device": ("auto", "yes", "no"),
            "optimizer_impl": OPTIMIZER_IMPLS,
            "mixed_precision": MIXED_PRECISION,
        }
        out = [
            f"--{_flag(k)} must be one of {', '.join(v)}, got {getattr(self, k)!r}"
            for k, v in choices.items()
            if getattr(self, k) not in (*v, None)
        ]
        positive_ints = (
            "epochs batch_size eval_batch_size gradient_accumulation_steps log_every ddp_timeout keep_last "
            "max_steps train_limit eval_limit lr_reference_batch cpu_threads"
        )
        out += [
            f"--{_flag(k)} must be at least 1, got {v}"
            for k in positive_ints.split()
            if (v := getattr(self, k)) is not None and v < 1
        ]
        ranges = {  # option: (valid, what a valid value is)
            "lr": (math.isfinite(self.lr) and self.lr > 0, "a positive number"),
            "width": (self.width > 0, "positive"),
            "std": (self.std > 0, "positive"),
            "max_grad_norm": (self.max_grad_norm is None or self.max_grad_norm > 0, "positive"),
            "dropout": (0 <= self.dropout < 1, "in [0, 1)"),
            "momentum": (0 <= self.momentum < 1, "in [0, 1)"),
            "label_smoothing": (0 <= self.label_smoothing < 1, "in [0, 1)"),
            "ema_decay": (self.ema_decay is None or 0 < self.ema_decay < 1, "in (0, 1)"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "warmup_steps": (self.warmup_steps >= 0, ">= 0"),
            "num_workers": (self.num_workers >= 0, ">= 0"),
            "cutout": (self.cutout >= 0, ">= 0"),
            "mixup": (self.mixup >= 0, ">= 0"),
            "cutmix": (self.cutmix >= 0, ">= 0"),
            "image_size": (
                self.image_size is None or (len(self.image_size) in (1, 2) and min(self.image_size) >= 1),
                "one or two positive numbers (N, or H W)",
            ),
        }
        out += [f"--{_flag(k)} must be {what}, got {getattr(self, k)}" for k, (ok, what) in ranges.items() if not ok]
        every = str(self.checkpoint_every).strip().lower()
        if not (every in ("epoch", "none") or (every.isdigit() and int(every) > 0)):
            out.append(f"--checkpoint-every must be epoch, none or a positive number of steps, got {every!r}")
        if not self.output_dir:
            out.append("--output-dir must not be empty")
        if not self.resume:
            out.append("--resume must be auto, none or a checkpoint folder")
        return out

    def validate(self) -> None:
        """Raise ConfigError listing every invalid option at once."""
        _raise_if(self.problems())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _flag(name: str) -> str:
    return name.replace("_", "-")


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """Each field's attribute docstring (the string literal right after it), for --help."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[union-attr]
    return docs


def _base_type(f: dataclasses.Field) -> str:
    """'int', 'float', 'str', 'bool', 'list' (of str) or 'ints' (list of int) from the (string) annotation."""
    t = str(f.type).replace("Optional[", "").rstrip("]")
    return ("ints" if "int" in t else "list") if t.startswith("list") else t


def _parse_value(kind: str, text: str) -> Any:
    if text.lower() in ("none", "null") and kind != "str":
        return None
    return {"int": int, "float": float}.get(kind, str)(text)


def build_parser(cls: type = TrainConfig, prog: str = "distvgg.train") -> argparse.ArgumentParser:
    """One option per field; defaults are suppressed so that only what the user typed overrides the YAML."""
    # argparse, not tyro or jsonargparse: ~40 lines here against a dependency outside the project's set
    parser = argparse.ArgumentParser(prog=prog, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE", help="YAML file of options; the command line overrides it")
    docs = field_docs(cls)
    defaults = cls()
    for f in fields(cls):
        kind, default = _base_type(f), getattr(defaults, f.name)
        help_text = f"{docs.get(f.name, '')} (default: {default!r})"
        if kind == "bool":
            parser.add_argument(f"--{_flag(f.name)}", action=argparse.BooleanOptionalAction, help=help_text)
        elif kind in ("list", "ints"):
            kw = {"nargs": "*", "metavar": "TAG"} if kind == "list" else {"nargs": "+", "metavar": "N", "type": int}
            parser.add_argument(f"--{_flag(f.name)}", help=help_text, **kw)
        else:
            parser.add_argument(
                f"--{_flag(f.name)}", type=lambda s, k=kind: _parse_value(k, s), metavar=f.name.upper(), help=help_text
            )
    return parser


def load_yaml(path: str | os.PathLike, cls: type = TrainConfig, flag: str = "--config") -> dict[str, Any]:
    """Options from a YAML mapping; keys may use - or _. Unknown keys are an error."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{flag}: no such file {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{flag} {p}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{flag} {p}: expected a mapping of option: value, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{flag} {p}: unknown option(s) {', '.join(unknown)}; "
            f"see `python -m distvgg.train --help` for the valid names"
        )
    return data


def recipe_names() -> list[str]:
    """The recipes shipped in distvgg/recipes/ (``--recipe NAME``)."""
    from importlib import resources

    folder = resources.files("distvgg") / "recipes"
    return sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".yaml")) if folder.is_dir() else []


def load_recipe(name: str, cls: type = TrainConfig) -> dict[str, Any]:
    """The options of a shipped recipe (by name) or of a YAML file (by path)."""
    from importlib import resources

    shipped = resources.files("distvgg") / "recipes" / f"{name}.yaml"
    if shipped.is_file():
        with resources.as_file(shipped) as path:
            data = load_yaml(path, cls, flag=f"--recipe {name}")
    elif Path(name).is_file():
        data = load_yaml(name, cls, flag="--recipe")
    else:
        raise ConfigError(
            f"--recipe: no recipe named {name!r} and no such file; "
            f"shipped recipes: {', '.join(recipe_names()) or 'none'}"
        )
    data.pop("recipe", None)  # a recipe names itself at most; it does not chain to another
    return data


def _int(v: Any) -> int:
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise TypeError
    return int(v)


def _coerce(cls: type, values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Type-check YAML values against the fields; collect problems rather than stop at the first."""
    kinds = {f.name: _base_type(f) for f in fields(cls)}
    out, problems = {}, []
    for name, v in values.items():
        kind = kinds[name]
        try:
            if v is None or kind == "str":
                out[name] = v if v is None else str(v)
            elif kind == "bool":
                if not isinstance(v, bool):
                    raise TypeError
                out[name] = v
            elif kind in ("list", "ints"):
                out[name] = [(str if kind == "list" else _int)(x) for x in (v if isinstance(v, list) else [v])]
            elif kind == "int":
                out[name] = _int(v)
            else:
                out[name] = float(v)
        except (TypeError, ValueError):
            problems.append(f"{name}: expected {kind}, got {v!r}")
    return out, problems


def parse_config(
    argv: Sequence[str] | None = None, cls: type = TrainConfig, prog: str = "distvgg.train"
) -> TrainConfig:
    """Defaults < recipe < YAML file < command line, then validate. A W&B sweep trial (WANDB_SWEEP_ID set by
    ``wandb agent``) writes into OUTPUT_DIR/<its run id>, so that trials never share a folder."""
    args = vars(build_parser(cls, prog).parse_args(_boolean_flags(cls, sys.argv[1:] if argv is None else argv)))
    values: dict[str, Any] = {}
    config_file = args.pop("config", None)
    file_values = load_yaml(config_file, cls) if config_file else {}
    recipe = args.get("recipe", file_values.get("recipe"))
    if recipe:
        values.update(load_recipe(str(recipe), cls))
        values["recipe"] = str(recipe)
    values.update(file_values)
    values.update(args)
    values, problems = _coerce(cls, values)
    cfg = cls(**values)
    _raise_if(problems + cfg.problems())
    if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID") and cfg.output_dir:
        cfg.output_dir = str(Path(cfg.output_dir) / os.environ["WANDB_RUN_ID"])
    return cfg


def _boolean_flags(cls: type, argv: Sequence[str]) -> list[str]:
    """``--name=true`` / ``--name=false`` (how ``wandb agent`` passes booleans) as ``--name`` / ``--no-name``."""
    bools = {_flag(f.name) for f in fields(cls) if _base_type(f) == "bool"}
    out = []
    for arg in argv:
        name, _, value = arg[2:].partition("=")
        if arg.startswith("--") and name in bools and value.lower() in ("true", "false"):
            arg = f"--{name}" if value.lower() == "true" else f"--no-{name}"
        out.append(arg)
    return out


def save_config(cfg: TrainConfig, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """The resolved config as YAML (loadable again with --config once ``extra`` is dropped)."""
    import yaml

    data = cfg.to_dict()
    text = yaml.safe_dump(data, sort_keys=False)
    if extra:
        text += "# run facts (not options):\n" + textwrap.indent(yaml.safe_dump(extra, sort_keys=False), "# ")
    Path(path).write_text(text)
