"""Every knob of a training run: one dataclass, one validation, one command line. Each field's docstring is its
``--help`` text, its annotation its type. Defaults < ``--recipe`` < ``--config FILE`` < the command line, all through
one argparse parser."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple, Optional, get_args, get_origin, get_type_hints

from distvgg.models import MODEL_NAMES

# Options that count something: whole numbers of at least 1 (``positive_int``), or unset where the field may be.
COUNTS = (
    "epochs batch_size eval_batch_size gradient_accumulation_steps log_every ddp_timeout keep_last max_steps "
    "train_limit eval_limit lr_reference_batch cpu_threads log_media_every profile_steps decode_workers"
).split()


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
    decode_workers: Optional[int] = None
    """Processes that decode the images the first time (later runs read the cache); default: one per core, at most
    one per 4,096 images."""
    image_size: Optional[list[int]] = None
    """Resize every image to N x N (one number) or H x W (two) when it is decoded, as a dataset of mixed sizes needs
    (default: the dataset's own size)."""
    augment: bool = True
    """Random crop (pad 4) and horizontal flip, done on the training device."""
    cutout: int = 0
    """Cutout: zero a square of this many pixels at a random place of each training image (0: off)."""
    mixup: float = 0.0
    """Mixup: mix each batch with itself reversed, by a Beta(ALPHA, ALPHA) weight, targets too (0: off)."""
    cutmix: float = 0.0
    """CutMix: paste a box of the reversed batch into each batch, its area drawn from Beta(ALPHA, ALPHA), targets
    mixed by area (0: off). With --mixup too, each micro-batch uses one of the two, at random."""
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
    tta_translate: bool = False
    """Flip test-time augmentation (as --tta) plus the image and its mirror shifted by one pixel up-left and
    down-right, half weighted (airbench's translate TTA: 6 forward passes per test image instead of 2)."""
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
    """Print and log the training loss every this many optimizer steps, counted across epochs, and at the last step
    (the guide's 100); each value is the mean since the later of the previous log point and the epoch's start."""
    report_to: str = "wandb"
    """Trackers: wandb, tensorboard, all or none (metrics.jsonl is always written)."""
    log_media_every: Optional[int] = None
    """Draw the prediction grid and the confusion chart (W&B, TensorBoard) every this many epochs (default: after
    the last epoch only; drawing takes the main process most of a second)."""
    profile_steps: Optional[int] = None
    """Trace this many training steps with the torch profiler (through Accelerate), after a few warm-up steps, into
    OUTPUT_DIR/profile; TensorBoard and Perfetto open the trace."""
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
    """auto: continue from the latest good checkpoint in --output-dir, or start fresh when there is none; PATH: continue
    from that checkpoint folder; none: start over (checkpoints/, best/, final/, metrics.jsonl and config.yaml are moved
    into previous-<time>/, not deleted; wandb/ and tensorboard/ stay, and wandb_run_id gets the new run's id)."""

    def problems(self) -> list[str]:
        """Every invalid option, one message each."""
        choices = {"model": MODEL_NAMES, "optimizer": ("sgd", "adamw"), "schedule": ("cosine", "onecycle", "none")}
        choices |= {"report_to": ("wandb", "tensorboard", "all", "none"), "ddp_comm_hook": ("none", "fp16", "bf16")}
        choices |= {"data_on_device": ("auto", "yes", "no"), "optimizer_impl": ("auto", "fused", "foreach", "loop")}
        choices["mixed_precision"] = ("no", "fp16", "bf16")
        out = [
            f"--{_flag(k)} must be one of {', '.join(v)}, got {getattr(self, k)!r}"
            for k, v in choices.items()
            if getattr(self, k) not in (*v, None)
        ]
        out += [f"--{_flag(k)} {p}" for k in COUNTS if (p := count_problem(getattr(self, k)))]
        if not (math.isfinite(self.lr) and self.lr > 0):
            out.append(f"--lr must be a positive number, got {self.lr}")
        rules = {  # what a valid value is: the options it applies to (unset is valid), and its test
            "positive": ("width std max_grad_norm", lambda v: v > 0),
            "in [0, 1)": ("dropout momentum label_smoothing", lambda v: 0 <= v < 1),
            "in (0, 1)": ("ema_decay", lambda v: 0 < v < 1),
            ">= 0": ("weight_decay warmup_steps num_workers cutout mixup cutmix", lambda v: v >= 0),
            "one or two positive numbers (N, or H W)": ("image_size", lambda v: len(v) in (1, 2) and min(v) >= 1),
        }
        out += [
            f"--{_flag(k)} must be {what}, got {v}"
            for what, (names, ok) in rules.items()
            for k in names.split()
            if (v := getattr(self, k)) is not None and not ok(v)
        ]
        every = str(self.checkpoint_every).strip().lower()
        if not (every in ("epoch", "none") or (every.isdigit() and int(every) > 0)):
            out.append(f"--checkpoint-every must be epoch, none or a positive number of steps, got {every!r}")
        if not self.output_dir:
            out.append("--output-dir must not be empty")
        if not self.resume:
            out.append("--resume must be auto, none or a checkpoint folder")
        return out

    def validate(self, problems: Sequence[str] = ()) -> None:
        """Raise ConfigError listing every invalid option at once (after ``problems`` found while parsing)."""
        if problems := [*problems, *self.problems()]:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def positive_int(value: str | int) -> int:
    """The one check of every count option (of training, evaluate, predict, report, bench and scaling): a whole
    number of at least 1. Raises argparse.ArgumentTypeError, so that it serves as an argparse ``type``."""
    try:
        number = int(str(value).strip())  # through str: a float such as 1.5 is refused, not truncated
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value!r}")
    return number


def count_problem(value: int | None) -> str | None:
    """What ``positive_int`` finds wrong with a count already parsed (None: nothing; an unset count is fine)."""
    try:
        positive_int(1 if value is None else value)
    except argparse.ArgumentTypeError as e:
        return str(e)
    return None


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """Each field's attribute docstring (the string literal right after it), for --help."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    return {
        node.target.id: " ".join(str(nxt.value.value).split())  # type: ignore[union-attr]
        for node, nxt in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
    }


class _Invalid(NamedTuple):
    """A value that did not convert: returned, not raised, as argparse stops at its first error, and every bad option is
    to be reported at once."""

    text: str
    expected: str


def _converter(kind: type, optional: bool) -> Callable[[str], Any]:
    """Text to ``kind`` (int, float, str or bool); ``none``/``null`` to None where the field may be unset."""
    expected = {int: "a whole number", float: "a number", bool: "true or false"}.get(kind, "text")

    def convert(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        if kind is bool:  # --name=True / --name=false: how wandb agent and YAML files give booleans
            return {"true": True, "false": False}.get(text.lower(), _Invalid(text, expected))
        try:
            return kind(text)
        except ValueError:
            return _Invalid(text, expected)

    return convert


def _kind(hint: Any) -> tuple[type, bool, bool]:
    """(element type, may be None, is a list) of a field's type hint."""
    optional = type(None) in get_args(hint)
    base = next(a for a in get_args(hint) if a is not type(None)) if optional else hint
    return (get_args(base)[0], optional, True) if get_origin(base) is list else (base, optional, False)


def build_parser() -> argparse.ArgumentParser:
    """One option per field, typed from its annotation; defaults are suppressed, so that a parse returns only what
    was given. The command line, YAML files and recipes all go through it (``parse_config``)."""
    parser = argparse.ArgumentParser(prog="distvgg.train", argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE", help="YAML file of options; the command line overrides it")
    docs, hints, defaults = field_docs(), get_type_hints(TrainConfig), TrainConfig()
    for f in fields(TrainConfig):
        kind, optional, many = _kind(hints[f.name])
        flag, help_text = _flag(f.name), f"{docs.get(f.name, '')} (default: {getattr(defaults, f.name)!r})"
        shape = {"metavar": f.name.upper()}
        if many:  # image_size (numbers, at least one) and wandb_tags (any number of words)
            shape = {"nargs": "+", "metavar": "N"} if kind is int else {"nargs": "*", "metavar": "TAG"}
        if kind is bool:  # --name, --name=true|false, --no-name
            shape = {"nargs": "?", "const": "true", "metavar": "true|false"}
        parser.add_argument(f"--{flag}", type=_converter(kind, optional and not many), help=help_text, **shape)
        if kind is bool:
            parser.add_argument(f"--no-{flag}", dest=f.name, action="store_false", help=f"the same as --{flag}=false")
    return parser


def _parse(parser: argparse.ArgumentParser, args: Sequence[str], source: str, problems: list[str]) -> dict[str, Any]:
    """The options of ``args``; a problem (named with its ``source``) for each that did not convert."""
    values = vars(parser.parse_args(args))
    for name, value in list(values.items()):
        if bad := [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, _Invalid)]:
            problems.append(f"{source}--{_flag(name)} must be {bad[0].expected}, got {bad[0].text!r}")
            del values[name]  # the default stands in, so that the other options can still be checked
    return values


def _parse_yaml(parser: argparse.ArgumentParser, data: dict[str, Any], source: str, problems: list[str]) -> dict:
    """A YAML mapping spelled as a command line (``--name=value``, a list as ``--name A B``) and parsed as one."""
    lists = {name for name, hint in get_type_hints(TrainConfig).items() if _kind(hint)[2]}
    args: list[str] = []
    unset = {}  # list options left unset
    for name, value in data.items():
        if name in lists and value is None:
            unset[name] = None
        elif name in lists and isinstance(value, list):
            args += [f"--{_flag(name)}", *map(str, value)]
        else:
            args.append(f"--{_flag(name)}={'null' if value is None else value}")
    return {**_parse(parser, args, source, problems), **unset}


def load_yaml(path: str | os.PathLike, flag: str = "--config") -> dict[str, Any]:
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
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    if unknown := sorted(set(data) - {f.name for f in fields(TrainConfig)}):
        raise ConfigError(
            f"{flag} {p}: unknown option(s) {', '.join(unknown)}; "
            f"see `python -m distvgg.train --help` for the valid names"
        )
    return data


def load_recipe(name: str) -> dict[str, Any]:
    """The options of a recipe shipped in distvgg/recipes/ (by name) or of a YAML file (by path)."""
    from importlib import resources

    folder = resources.files("distvgg") / "recipes"
    if (shipped := folder / f"{name}.yaml").is_file():
        with resources.as_file(shipped) as path:
            data = load_yaml(path, flag=f"--recipe {name}")
    elif Path(name).is_file():
        data = load_yaml(name, flag="--recipe")
    else:
        names = sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".yaml")) if folder.is_dir() else []
        raise ConfigError(
            f"--recipe: no recipe named {name!r} and no such file; shipped recipes: {', '.join(names) or 'none'}"
        )
    data.pop("recipe", None)  # a recipe names itself at most; it does not chain to another
    return data


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Defaults < recipe < YAML file < command line, each parsed by the same parser, then validated; every problem
    is reported at once. A W&B sweep trial (WANDB_SWEEP_ID set by ``wandb agent``) writes into
    OUTPUT_DIR/<its run id>, so that trials never share a folder."""
    parser, problems = build_parser(), []
    layers = [_parse(parser, sys.argv[1:] if argv is None else argv, "", problems)]  # the command line
    if config_file := layers[0].pop("config", None):
        layers.insert(0, _parse_yaml(parser, load_yaml(config_file), f"--config {config_file}: ", problems))
    if recipe := layers[-1].get("recipe", layers[0].get("recipe")):
        layers.insert(0, _parse_yaml(parser, load_recipe(recipe), f"--recipe {recipe}: ", problems))
    cfg = TrainConfig(**{name: value for layer in layers for name, value in layer.items()})  # later layers override
    cfg.validate(problems)
    if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID") and cfg.output_dir:
        cfg.output_dir = str(Path(cfg.output_dir) / os.environ["WANDB_RUN_ID"])
    return cfg


def save_config(cfg: TrainConfig, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """The resolved config as YAML (loadable again with --config once ``extra`` is dropped)."""
    import yaml

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if extra:
        text += "# run facts (not options):\n" + textwrap.indent(yaml.safe_dump(extra, sort_keys=False), "# ")
    Path(path).write_text(text)
