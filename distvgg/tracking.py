"""Where a run's numbers go: metrics.jsonl (always) and Accelerate's trackers (W&B, TensorBoard); docs/tracking.md.
Only the main process writes; metrics.jsonl holds every value a tracker gets, at its step. W&B is imported when used."""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distvgg import files, machine

METRICS_FILE = "metrics.jsonl"
ABANDONED_FILE = "metrics.abandoned.jsonl"  # rows a resumed run cut from metrics.jsonl: logged after its checkpoint
# The W&B run id of OUTPUT_DIR's run: a requeued job continues that W&B run even before its first checkpoint exists.
WANDB_RUN_ID_FILE = "wandb_run_id"
TENSORBOARD_DIR = "tensorboard"
GRID_IMAGES = 32
GREEN, RED = (0, 160, 0), (210, 0, 0)  # the frames of right and wrong predictions


class TrackingError(RuntimeError):
    """A tracker cannot be used as configured (e.g. W&B credentials in an invalid format)."""


def trackers_for(report_to: str) -> list[str]:
    """Accelerate ``log_with`` names for ``--report-to``. W&B last: Accelerate starts them in order, so only W&B is
    retried when it fails to start online."""
    return {"wandb": ["wandb"], "tensorboard": ["tensorboard"], "all": ["tensorboard", "wandb"], "none": []}[report_to]


def choose_wandb_mode() -> str:
    """``WANDB_MODE`` when set, else online when ``wandb.init`` finds credentials without prompting (an API key, an
    identity token file, a netrc entry for the W&B host) and offline without: a batch job never waits at a login."""
    if mode := os.environ.get("WANDB_MODE"):
        return mode
    import netrc
    from urllib.parse import urlsplit

    import wandb

    settings = wandb.setup().settings  # the settings wandb.init uses: environment, settings files, WANDB_BASE_URL
    if settings.api_key or settings.identity_token_file:
        return "online"
    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(urlsplit(settings.base_url).hostname or "")
    except (OSError, netrc.NetrcParseError):  # no netrc file, or one that is not valid netrc
        return "offline"
    return "offline" if entry is None else "online"


def read_run_id(output_dir: str | os.PathLike) -> str | None:
    try:
        return (Path(output_dir) / WANDB_RUN_ID_FILE).read_text().strip() or None
    except OSError:
        return None


def new_run_id() -> str:
    """A new id in W&B's format, 8 characters of [a-z0-9] (wandb 0.31 no longer exports ``generate_id``)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def resolve_run_id(output_dir: str | os.PathLike, restored: str | None = None, fresh: bool = False) -> str:
    """The W&B run id of this training run, written to ``OUTPUT_DIR/wandb_run_id``: the one restored from a
    checkpoint, ``WANDB_RUN_ID``, the one in OUTPUT_DIR (unless ``fresh``: ``--resume none``), else a new one."""
    run_id = restored or os.environ.get("WANDB_RUN_ID") or (None if fresh else read_run_id(output_dir)) or new_run_id()
    path = Path(output_dir) / WANDB_RUN_ID_FILE
    if read_run_id(output_dir) != run_id:
        files.write_text_atomic(path, run_id + "\n")  # a crash leaves the old id or the new one, never half a line
    return run_id


def wandb_init_kwargs(cfg: Any, run_id: str, mode: str | None) -> dict[str, Any]:
    """``wandb.init`` arguments (Accelerate passes the project); ``resume="allow"`` continues or creates the run."""
    kwargs: dict[str, Any] = {"dir": os.environ.get("WANDB_DIR", cfg.output_dir), "id": run_id, "resume": "allow"}
    if mode and not os.environ.get("WANDB_MODE"):
        kwargs["mode"] = mode
    fields = {"entity": cfg.wandb_entity, "name": cfg.wandb_name, "tags": cfg.wandb_tags}
    return {**kwargs, **{k: v for k, v in fields.items() if v}}


def git_commit(path: str | os.PathLike) -> str | None:
    """The commit of the checkout the code runs from, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_facts(accelerator: Any) -> dict[str, Any]:
    """Facts about where the run ran, recorded with its config (no environment values: they may hold secrets)."""
    device, n = accelerator.device, accelerator.num_processes
    per_machine = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", n)))
    return {
        "num_processes": n,
        "num_machines": max(1, n // per_machine),
        "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": str(accelerator.mixed_precision),
        "device": str(device),
        "device_name": machine.device_name(device),
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        **machine.package_versions(("torch", "torchvision", "accelerate", "datasets", "wandb", "safetensors")),
        "git_commit": git_commit(Path(__file__).resolve().parent),
    }


@dataclass
class Tracking:
    """What the trackers of this run are, for logging and for the closing message."""

    accelerator: Any
    names: list[str]
    wandb_mode: str | None = None  # None: no W&B run on this process
    wandb_run_id: str | None = None
    wandb_root: Path | None = None  # the folder holding wandb/<run dirs>
    messages: list[str] = field(default_factory=list)

    def wandb_run(self) -> Any | None:
        """The live ``wandb.Run`` on the main process, else None."""
        if self.wandb_mode in (None, "disabled"):
            return None
        return self.accelerator.get_tracker("wandb", unwrap=True)

    def offline_dirs(self) -> list[str]:
        """Every offline run folder of this run id: one per attempt, which ``wandb sync`` uploads in order into one."""
        if self.wandb_root is None or self.wandb_run_id is None:
            return []
        return sorted(str(p) for p in self.wandb_root.glob(f"offline-run-*-{self.wandb_run_id}"))

    def report(self) -> None:
        """After the trackers closed: the W&B notes, where the offline run is and the command that uploads it."""
        for message in self.messages:
            print(message, flush=True)
        if self.wandb_mode == "offline" and (dirs := " ".join(self.offline_dirs())):
            print(f"W&B run {self.wandb_run_id} is saved offline in {dirs}\nupload it with:  wandb sync {dirs}")


def start_trackers(
    accelerator: Any,
    cfg: Any,
    config: dict[str, Any],
    restored_run_id: str | None = None,
    fresh: bool = False,
    rewind: Rewind | None = None,
) -> Tracking:
    """``accelerator.init_trackers`` with the W&B mode and run id chosen here, the config in each tracker's form, and
    an offline fallback when W&B cannot start online: tracking problems never cost a training run. ``rewind``: each
    tracker's record continues from the checkpoint's step (``rewind_trackers``)."""
    names = trackers_for(cfg.report_to)
    tracking = Tracking(accelerator, names)
    if not names or not accelerator.is_main_process:  # Accelerate starts trackers on the main process only
        return tracking
    # TensorBoard writes to logging_dir/<project>: keep its files in one folder of OUTPUT_DIR.
    accelerator.project_configuration.logging_dir = str(Path(cfg.output_dir) / TENSORBOARD_DIR)
    init_kwargs: dict[str, Any] = {}
    if "wandb" in names:
        tracking.wandb_mode = choose_wandb_mode()
        tracking.wandb_run_id = resolve_run_id(cfg.output_dir, restored_run_id, fresh)
        init_kwargs["wandb"] = wandb_init_kwargs(cfg, tracking.wandb_run_id, tracking.wandb_mode)
        if tracking.wandb_mode == "offline" and not os.environ.get("WANDB_MODE"):
            tracking.messages.append("W&B: no credentials found (WANDB_API_KEY, `wandb login`): logged offline")
    replay = rewind_trackers(tracking, cfg, rewind, init_kwargs, config)
    wandb_dir = init_kwargs.get("wandb", {}).get("dir", cfg.output_dir)
    # W&B starts on a full disk, logs its own errors and fails at the first image.
    files.ensure_room(wandb_dir, "the W&B run folder and TensorBoard's events")
    with files.writing(wandb_dir, what="the W&B run folder and TensorBoard's events"):
        try:
            accelerator.init_trackers(cfg.wandb_project, config=None, init_kwargs=init_kwargs)
        except Exception as e:  # only W&B errors are handled; anything else is re-raised
            _restart_wandb_offline(accelerator, tracking, e)
    # TensorBoard's ``add_hparams`` takes only int, float, str and bool: lists and None become text.
    hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
    for tracker in accelerator.trackers:
        tracker.store_init_configuration(hparams if tracker.name == "tensorboard" else config)
    run = tracking.wandb_run()
    if run is not None:
        tracking.wandb_root = Path(run.settings.sync_dir).parent
        tracking.wandb_mode = "offline" if run.offline else "online"
    for tracker, step, values in replay:  # what the rewound trackers dropped, or a new W&B run never had
        if tracker in names:
            accelerator.get_tracker(tracker).log(values, step=step)
    return tracking


def rewind_trackers(
    tracking: Tracking, cfg: Any, rewind: Rewind | None, init_kwargs: dict[str, Any], config: dict[str, Any]
) -> list[tuple[str, int, dict[str, Any]]]:
    """Each tracker's record continues from the checkpoint's step, as metrics.jsonl does (docs/tracking.md); returns
    the (tracker, step, values) to log again once started. TensorBoard: ``purge_step``, and that step's kept rows again.
    W&B, when rows were cut: online with ``--wandb-rewind``, ``resume_from``; else (W&B keeps a step's first values) a
    new W&B run, linked to the old one in its config, gets the kept rows: its history is the final model's run."""
    if rewind is None:
        return []
    init_kwargs["tensorboard"] = {"purge_step": rewind.step}
    replay = [("tensorboard", r["step"], scalars(r)) for r in rewind.kept if r.get("step") == rewind.step]
    wandb_kwargs = init_kwargs.get("wandb")
    if wandb_kwargs is None or not rewind.abandoned or tracking.wandb_mode == "disabled":
        return replay
    old = tracking.wandb_run_id
    if tracking.wandb_mode == "online" and cfg.wandb_rewind:
        wandb_kwargs.pop("resume")
        wandb_kwargs["resume_from"] = f"{wandb_kwargs.pop('id')}?_step={rewind.step}"
        return replay
    tracking.wandb_run_id = wandb_kwargs["id"] = resolve_run_id(cfg.output_dir, new_run_id())
    config.update(resumed_from_wandb_run=old, resumed_from_step=rewind.step)
    tracking.messages.append(
        f"W&B: steps after {rewind.step} were run again, so this run continues in a new W&B run, "
        f"{tracking.wandb_run_id} (its config names the earlier one, {old})"
    )
    return replay + [("wandb", r["step"], scalars(r)) for r in rewind.kept if "step" in r]


def _restart_wandb_offline(accelerator: Any, tracking: Tracking, error: Exception) -> None:
    """W&B failed to start online: the same run id offline, to sync later; refused credentials stop the run."""
    import wandb

    if isinstance(error, wandb.errors.AuthenticationError):
        raise TrackingError(
            f"W&B refused the credentials: {str(error).rstrip('.')}. Fix WANDB_API_KEY (or run `wandb login`), "
            f"or set WANDB_MODE=offline to track locally."
        ) from None
    if not isinstance(error, wandb.errors.Error) or tracking.wandb_mode == "offline":
        raise error
    tracker = accelerator.get_tracker("wandb")
    wandb.teardown()  # the failed attempt keeps the run id "in use" inside W&B's service until it stops
    tracker.init_kwargs["mode"] = "offline"
    if "resume_from" in tracker.init_kwargs:  # --wandb-rewind: an offline run cannot be rewound, so it continues
        del tracker.init_kwargs["resume_from"]
        tracker.init_kwargs.update(id=tracking.wandb_run_id, resume="allow")
        tracking.messages.append(
            "W&B: offline, the run could not be rewound: the steps run again keep their first values"
        )
    tracker.start()
    tracking.wandb_mode = "offline"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    tracking.messages.append(f"W&B could not start online ({first_line}); the run was logged offline instead")
    print(f"distvgg.train: warning: W&B could not start online ({first_line}); logging offline", file=sys.stderr)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def scalars(values: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a record but its step: what the trackers chart (lists stay in metrics.jsonl)."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


class RunLogger:
    """Every log event to metrics.jsonl and the trackers, from the main process. ``rows``: the records metrics.jsonl
    holds, saved with each checkpoint so that a resumed run can cut the later ones."""

    def __init__(self, accelerator: Any, output_dir: str | os.PathLike) -> None:
        self.accelerator = accelerator
        self.path = Path(output_dir) / METRICS_FILE
        self.rows = 0

    def log(self, values: dict[str, Any], step: int, epoch: float | int | None = None) -> None:
        """Numbers go everywhere; lists (confusion counts) only to metrics.jsonl (``log_eval_media`` charts them)."""
        if not self.accelerator.is_main_process:
            return
        values = {**({} if epoch is None else {"epoch": epoch}), **{k: _jsonable(v) for k, v in values.items()}}
        line = json.dumps({"step": step, **values}) + "\n"
        with files.writing(self.path.parent, len(line), self.path.name), self.path.open("a") as f:
            f.write(line)
        self.rows += 1
        self.accelerator.log(scalars(values), step=step)


def confusion_chart(confusion: Sequence[Sequence[int]], class_names: Sequence[str]) -> Any:
    """W&B's confusion-matrix chart (a table plus a Vega spec, which works offline) from the counts."""
    import wandb

    counts = torch.as_tensor(confusion, dtype=torch.long)
    k = counts.shape[0]
    pairs = torch.arange(k * k).repeat_interleave(counts.flatten())  # one (true, predicted) pair per image
    true, pred, names = (pairs // k).tolist(), (pairs % k).tolist(), list(class_names)
    return wandb.plot.confusion_matrix(y_true=true, preds=pred, class_names=names, title="Test confusion matrix")


@torch.no_grad()
def sample_predictions(
    model: torch.nn.Module, dataset: Any, prepare_batch: Callable, device: torch.device, n: int = GRID_IMAGES
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same ``n`` test images every time, their labels and predictions; ``model`` unwrapped (DDP would wait)."""
    idx = torch.linspace(0, len(dataset) - 1, min(n, len(dataset))).long().tolist()
    images, labels, indices = dataset.__getitems__(idx)
    data, _ = prepare_batch((images.to(device), labels.to(device), indices.to(device)), 0, False)
    was_training = model.training
    model.eval()
    pred = model(data).argmax(1)
    model.train(was_training)
    return images.cpu(), labels.cpu(), pred.cpu()


def prediction_grid(
    images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor, class_names: Sequence[str], nrow: int = 8
) -> torch.Tensor:
    """A uint8 (3, H, W) grid of the images, 3x enlarged, each under its true and predicted class, framed green when
    right and red when wrong."""
    import torch.nn.functional as F
    from torchvision.utils import draw_bounding_boxes, make_grid

    big = F.interpolate(images.float(), scale_factor=3, mode="nearest").to(torch.uint8)
    big = F.pad(big, (0, 0, 26, 0))  # room above each image for two lines of text
    box = torch.tensor([[0, 0, big.shape[-1] - 1, big.shape[-2] - 1]])
    style = {"width": 2, "label_colors": ["white"], "fill_labels": True}
    tiles = [
        draw_bounding_boxes(img, box, [f"{class_names[t]}\n> {class_names[p]}"], [GREEN if t == p else RED], **style)
        for img, t, p in zip(big, labels.tolist(), preds.tolist())
    ]
    return make_grid(torch.stack(tiles), nrow=nrow, padding=2)


def media_due(every: int | None, epoch: int, total_epochs: int) -> bool:
    """``--log-media-every N``: after every N-th epoch, and always after the last one."""
    return epoch + 1 >= total_epochs or bool(every and (epoch + 1) % every == 0)


def log_eval_media(logger: RunLogger, result: dict, class_names: Sequence[str], samples: Callable, step: int) -> None:
    """The confusion matrix and the ``samples()`` grid to W&B, and the grid to TensorBoard, where they run (on the
    main process: the only one with trackers)."""
    trackers = {tracker.name for tracker in logger.accelerator.trackers}
    if not trackers:
        return
    images, labels, preds = samples()
    grid = prediction_grid(images, labels, preds, class_names)
    pairs = ", ".join(f"{class_names[t]} > {class_names[p]}" for t, p in zip(labels.tolist(), preds.tolist()))
    if "wandb" in trackers:
        import wandb

        media = logger.accelerator.get_tracker("wandb", unwrap=True).dir  # wandb.Image copies its file there
        with files.writing(media, what="W&B's media (the prediction grid, the confusion chart)"):
            image = wandb.Image(grid.permute(1, 2, 0).numpy(), caption=f"true > predicted: {pairs}")
            chart = confusion_chart(result["confusion"], class_names)
            logged = {"eval/confusion_matrix": chart, "eval/predictions": image}
            logger.accelerator.get_tracker("wandb").log(logged, step=step)
    if "tensorboard" in trackers:
        logger.accelerator.get_tracker("tensorboard", unwrap=True).add_image("eval/predictions", grid, step)


def log_model_artifact(tracking: Tracking, final_dir: str | os.PathLike, metadata: dict[str, Any]) -> None:
    """``final/`` as a W&B model artifact of this run (uploaded now online, by ``wandb sync`` offline)."""
    run = tracking.wandb_run()
    if run is None:
        return
    import wandb

    artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=metadata)
    artifact.add_dir(str(final_dir))
    run.log_artifact(artifact, aliases=["latest", "final"])


@dataclass
class Rewind:
    """A resumed run's record: metrics.jsonl cut back to what was logged before the checkpoint of ``step``."""

    step: int
    kept: list[dict[str, Any]]  # the rows metrics.jsonl keeps
    abandoned: int  # rows moved to metrics.abandoned.jsonl: logged after the checkpoint, by an attempt that died


def rewind_metrics(output_dir: str | os.PathLike, step: int, rows: int | None) -> Rewind:
    """Cut metrics.jsonl back to its first ``rows`` records (None: those up to ``step``). The cut lines go to
    metrics.abandoned.jsonl first, then metrics.jsonl is replaced atomically: a crash never loses a line."""
    path, aside = Path(output_dir) / METRICS_FILE, Path(output_dir) / ABANDONED_FILE
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
    parsed = [parse_record(line) for line in lines]
    if rows is None:
        rows = next((i for i, r in enumerate(parsed) if r is None or r.get("step", 0) > step), len(lines))
    keep, cut = lines[:rows], lines[rows:]
    if cut:
        with files.writing(path.parent, sum(map(len, lines)), f"{path.name} and {aside.name}"):
            with aside.open("a") as f:
                f.writelines(line if line.endswith("\n") else line + "\n" for line in cut)
            files.fsync_file(aside)
            files.write_text_atomic(path, "".join(keep))
    return Rewind(step, [r for r in parsed[:rows] if r is not None], len(cut))


def parse_record(line: str) -> dict[str, Any] | None:
    """One metrics.jsonl record, or None for a line that is not one."""
    try:
        record = json.loads(line)
    except ValueError:  # a killed run's torn last line
        return None
    return record if isinstance(record, dict) else None


def read_metrics(output_dir: str | os.PathLike, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl; a line that is not one (a killed run's torn last line) is skipped, and
    named to ``warn``."""
    path = Path(output_dir) / METRICS_FILE
    lines = path.read_text().splitlines()
    records = [parse_record(line) for line in lines]
    bad = [str(n) for n, (line, r) in enumerate(zip(lines, records), 1) if r is None and line.strip()]
    if bad and warn is not None:
        warn(f"skipped unreadable line(s) {', '.join(bad)} of {path}")
    return [r for r in records if r is not None]
