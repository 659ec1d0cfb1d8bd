"""The training hot path: uint8 batches by index, augmentation and normalisation on the device; apart from ``data.py``
(which decodes and caches) because everything here runs every step: no PIL, no per-sample Python. Batches are
``(images_uint8, labels, indices)``: augmentation derives from the sample indices; tests read the samples a run saw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
PrepareBatch = Callable[[Batch, int, bool], tuple[torch.Tensor, torch.Tensor]]


class IndexedImages(Dataset):
    """A uint8 image tensor served a batch at a time: the DataLoader hands ``__getitems__`` a batch's indices, so a
    batch costs one tensor gather, not ``batch_size`` Python calls and a collate. On the host the tensor may be a
    view of the cache file's mapping, of which a gather reads only the batch's rows."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images of shape (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Batch:
        return self.__getitems__([i])

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self.images.is_cuda:  # a copy from pageable memory would block the host: pin it first
            idx = idx.pin_memory()
        dev = idx.to(self.images.device, non_blocking=True)
        return self.images[dev], self.labels[dev], dev


def keep_batch(batch: Batch) -> Batch:
    """collate_fn: ``__getitems__`` already returns a collated batch (module level so workers can pickle it)."""
    return batch


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch that can start part-way through. The order of epoch ``e`` depends only on
    ``(seed, e)``, never on the number of processes, and is cut to a whole number of global batches, so that
    Accelerate's batch sharding hands every process a full batch and the global step ``s`` always covers samples
    ``[s * global_batch, (s + 1) * global_batch)`` of the permutation. Resuming at step ``s`` is then
    ``set_position(epoch, s * global_batch)``: the same samples, none skipped or repeated (Accelerate's
    ``skip_first_batches`` over a RandomSampler would replay a different order)."""

    def __init__(self, num_samples: int, seed: int, global_batch: int = 1) -> None:
        if num_samples < global_batch:
            raise ValueError(
                f"the training set has {num_samples} images, fewer than one global batch of "
                f"{global_batch}: lower --batch-size or --gradient-accumulation-steps, or use more data"
            )
        self.num_samples, self.seed, self.global_batch = num_samples, seed, global_batch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Accelerate's DataLoader wrapper too; starting a new epoch starts at its beginning."""
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def __len__(self) -> int:
        return self.steps_per_epoch * self.global_batch - self.start

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g)[self.start : self.steps_per_epoch * self.global_batch]
        for part in order.split(65_536):  # no list of a million Python ints
            yield from part.tolist()


def train_loader(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    global_batch: int,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> tuple[DataLoader, EpochSampler]:
    """A DataLoader of per-process uint8 batches and its sampler (to set the epoch and position)."""
    sampler = EpochSampler(len(images), seed, global_batch)
    workers = dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0)
    dataset = IndexedImages(images, labels)
    return DataLoader(dataset, batch_size, sampler=sampler, drop_last=True, collate_fn=keep_batch, **workers), sampler


def eval_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int, pin_memory: bool = False) -> DataLoader:
    """Every test image once, in order; ``gather_for_metrics`` drops the padding of the last batch."""
    dataset = IndexedImages(images, labels)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=keep_batch, pin_memory=pin_memory)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors, on any device: torch has no counter-based RNG keyed by sample."""
    x = (x ^ (x >> 31)) * 0x7FB5D329728EA185
    x = (x ^ (x >> 27)) * -0x7E25210B43D22E0B  # 0x81DADEF4BC2DD44D as a signed int64
    return x ^ (x >> 33)


def augment(
    images: torch.Tensor, indices: torch.Tensor, seed: int, epoch: int, pad: int = 4, flip: bool = True
) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and horizontal flip, for a whole uint8 batch at once. The draws are a
    hash of (seed, epoch, sample index), not of a generator's state, so a sample gets the same crop in a run of 1
    process or 8, and a resumed run replays it exactly."""
    n, c, h, w = images.shape
    # The (seed, epoch) part is hashed on the host: a tensor made on the GPU every step would be a blocking copy.
    key = _mix(indices.long() + int(_mix(torch.tensor(seed * 65_537 + epoch))))
    span, dev = 2 * pad + 1, images.device
    dy, dx = key.remainder(span), (key >> 16).remainder(span)
    flipped = ((key >> 32) & 1).bool() if flip else torch.zeros_like(key, dtype=torch.bool)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
    rows = dy[:, None] + ar_h  # (N, H)
    cols = dx[:, None] + torch.where(flipped[:, None], w - 1 - ar_w, ar_w)  # (N, W)
    b, ch = torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None]
    return padded[b, ch, rows[:, None, :, None], cols[:, None, None, :]]


def normalize(images: torch.Tensor, mean: float, std: float, channels_last: bool = False) -> torch.Tensor:
    """uint8 -> float in ((x / 255) - mean) / std, the guide's ToTensor + Normalize in one op."""
    x = images.float().mul_(1.0 / (255.0 * std)).sub_(mean / std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def cutout(images: torch.Tensor, indices: torch.Tensor, seed: int, epoch: int, size: int) -> torch.Tensor:
    """Zero a ``size`` square (clipped at the borders) of each image, placed by a hash of (seed, epoch, sample)."""
    n, _, h, w = images.shape
    key = _mix(indices.long() + int(_mix(torch.tensor(seed * 65_537 + epoch + 7_919))))  # not the crop's draws
    top, left = key.remainder(h) - size // 2, (key >> 20).remainder(w) - size // 2
    rows = torch.arange(h, device=images.device) - top[:, None]  # (N, H)
    cols = torch.arange(w, device=images.device) - left[:, None]  # (N, W)
    inside = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
    # A copy in the input's memory format (masked_fill's output would lose channels_last), then zeroed in place.
    return images.clone(memory_format=torch.preserve_format).masked_fill_(inside[:, None], 0)


def mix(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup: float, cutmix: float, key: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix of a batch with itself reversed; returns the images and soft targets. The weight, the box and
    the choice between the two come from a generator keyed by ``key`` (seed, step, micro-batch of the global batch),
    on the host: the same for any number of processes, and no host sync."""
    import numpy as np

    rng = np.random.default_rng(list(key))
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    other = images.flip(0)
    if use_cutmix:  # a box of area (1 - lam), clipped at the borders; lam becomes the area actually kept
        h, w = images.shape[-2:]
        bh, bw = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - bh // 2, 0), min(cy + bh - bh // 2, h)
        x0, x1 = max(cx - bw // 2, 0), min(cx + bw - bw // 2, w)
        images = images.clone()
        images[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        images = images.lerp(other, 1 - lam)
    onehot = torch.nn.functional.one_hot(labels, num_classes).float()
    return images, onehot.lerp(onehot.flip(0), 1 - lam)


def make_prepare(
    augmented: bool, seed: int, mean: float, std: float, channels_last: bool, cutout_size: int = 0
) -> PrepareBatch:
    """``prepare(batch, epoch, train)``: uint8 batch on the device -> (augmented, normalised images, labels)."""

    def prepare(batch: Batch, epoch: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, indices = batch
        if train and augmented:
            images = augment(images, indices, seed, epoch)
        images = normalize(images, mean, std, channels_last)
        if train and cutout_size:  # zero after normalising: the cut square holds the mean
            images = cutout(images, indices, seed, epoch, cutout_size)
        return images, labels

    return prepare
