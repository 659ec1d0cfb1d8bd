import torch
from torchvision import transforms

from distvgg.batches import EpochSampler, IndexedImages, augment, eval_loader, normalize, train_loader


def make_images(n=20, h=8, w=8):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g), torch.arange(n) % 4


def test_getitems_returns_a_batch_with_indices():
    images, labels = make_images()
    imgs, labs, idx = IndexedImages(images, labels).__getitems__([3, 1, 7])
    assert imgs.dtype == torch.uint8 and imgs.shape == (3, 3, 8, 8)
    assert torch.equal(imgs, images[[3, 1, 7]]) and torch.equal(labs, labels[[3, 1, 7]])
    assert idx.tolist() == [3, 1, 7]


def test_sampler_epochs_positions_and_global_batch():
    s = EpochSampler(23, seed=1, global_batch=4)
    e0 = list(s)
    assert len(e0) == 20 == len(s) and len(set(e0)) == 20  # cut to whole global batches, no repeats
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0 and sorted(e1) != e1
    s.set_position(1, 8)
    assert list(s) == e1[8:] and len(s) == 12
    s.set_epoch(1)  # same epoch again (Accelerate calls this): the position is kept
    assert list(s) == e1[8:]
    assert list(EpochSampler(23, seed=1, global_batch=4)) == e0  # seeded
    assert list(EpochSampler(23, seed=2, global_batch=4)) != e0


def test_loaders_follow_the_sampler_and_evaluation_covers_every_image_once():
    images, labels = make_images()
    dl, sampler = train_loader(images, labels, batch_size=3, global_batch=6, seed=0)
    seen = torch.cat([idx for _, _, idx in dl]).tolist()
    assert seen == list(sampler)
    first = next(iter(dl))
    assert torch.equal(first[0], images[first[2]])
    seen = torch.cat([idx for _, _, idx in eval_loader(images[:7], labels[:7], batch_size=3)]).tolist()
    assert seen == list(range(7))


def test_augment_shapes_dtype_and_determinism():
    images, _ = make_images(n=16, h=32, w=32)
    idx = torch.arange(16)
    a = augment(images, idx, seed=0, epoch=0)
    assert a.shape == images.shape and a.dtype == torch.uint8
    assert torch.equal(a, augment(images, idx, seed=0, epoch=0))
    assert not torch.equal(a, augment(images, idx, seed=0, epoch=1))
    assert not torch.equal(a, augment(images, idx, seed=1, epoch=0))
    # Keyed by sample, not by batch position: a sample's crop does not depend on its batch.
    perm = torch.randperm(16)
    assert torch.equal(augment(images[perm], idx[perm], seed=0, epoch=0), a[perm])


def test_augment_is_a_crop_of_the_padded_image_or_its_mirror():
    images, _ = make_images(n=64, h=32, w=32)
    out = augment(images, torch.arange(64), seed=3, epoch=0)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    flips = 0
    for i in range(64):
        crops = [padded[i, :, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
        plain, flipped = (any(torch.equal(out[i], c.flip(-1) if f else c) for c in crops) for f in (False, True))
        assert plain or flipped, f"sample {i} is not a crop of its padded image"
        flips += not plain
    assert 10 < flips < 54  # about half are flipped
    unchanged = augment(images, torch.arange(64), seed=3, epoch=0, pad=0, flip=False)  # no crop, no flip
    assert torch.equal(unchanged, images)


def test_normalize_matches_the_guides_transforms():
    images, _ = make_images(n=4)
    ours = normalize(images, 0.5, 0.5)
    guide = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    expected = torch.stack([guide(img.permute(1, 2, 0).numpy()) for img in images])
    torch.testing.assert_close(ours, expected)
    assert normalize(images, 0.5, 0.5, channels_last=True).is_contiguous(memory_format=torch.channels_last)
