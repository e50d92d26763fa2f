"""Batch augmentation: shapes, determinism, and what each transform does to real images."""

from __future__ import annotations

import numpy as np
import torch

from cifar.data import load_cache
from cifar.data.loader import Augmentation, DeviceLoader, augment_batch, downscale_batch, images_to_tensor


def real_batch(prepared_dir, n=64):
    images = np.asarray(load_cache(prepared_dir).images["train"][:n])
    return images_to_tensor(images, "cpu").float() / 255


def gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_shapes_and_range(prepared_dir):
    x = real_batch(prepared_dir)
    out = augment_batch(x, Augmentation(flip=True, translate=4, cutout=8), gen(0))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1


def test_same_seed_same_batch_other_seed_differs(prepared_dir):
    x = real_batch(prepared_dir)
    aug = Augmentation(flip=True, translate=2, cutout=6)
    assert torch.equal(augment_batch(x, aug, gen(1)), augment_batch(x, aug, gen(1)))
    assert not torch.equal(augment_batch(x, aug, gen(1)), augment_batch(x, aug, gen(2)))


def test_flip_only_mirrors_about_half(prepared_dir):
    x = real_batch(prepared_dir, 256)
    out = augment_batch(x, Augmentation(flip=True, translate=0), gen(0))
    flipped = torch.tensor([torch.equal(o, i.flip(2)) for o, i in zip(out, x)])
    same = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert bool((flipped | same).all())
    assert 0.35 < flipped.float().mean() < 0.65


def test_translate_shifts_content(prepared_dir):
    x = real_batch(prepared_dir, 128)
    out = augment_batch(x, Augmentation(flip=False, translate=2), gen(0))
    found_shift = 0
    for o, i in zip(out, x):
        # The centre 28x28 of the output must equal a shifted window of the input.
        matches = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.equal(o[:, 2:30, 2:30], i[:, 2 + dy : 30 + dy, 2 + dx : 30 + dx])
        ]
        assert matches, "output is not a translated input"
        found_shift += matches[0] != (0, 0)
    assert found_shift > 64  # most images moved


def test_cutout_erases_a_square(prepared_dir):
    x = real_batch(prepared_dir, 32)
    out = augment_batch(x, Augmentation(flip=False, translate=0, cutout=8), gen(0))
    changed = (out != x).any(1)  # B,H,W
    assert bool((changed.sum((1, 2)) <= 81).all())  # at most a 9x9 square (clipped at edges)
    assert bool((out[changed.unsqueeze(1).expand_as(out)] == 0.5).all())


def test_loader_visits_every_image_once_per_epoch(prepared_dir):
    data = load_cache(prepared_dir)
    labels = np.arange(len(data.labels["train"]))  # use indices as labels to track images
    loader = DeviceLoader(np.asarray(data.images["train"]), labels, 64, "cpu", shuffle=True, seed=0)
    seen = torch.cat([y for _, y in loader])
    assert sorted(seen.tolist()) == labels.tolist()
    loader.set_epoch(1)
    first = torch.cat([y for _, y in loader])
    loader.set_epoch(2)
    assert not torch.equal(first, torch.cat([y for _, y in loader]))
    loader.set_epoch(1)
    assert torch.equal(first, torch.cat([y for _, y in loader]))  # an epoch replays exactly


def test_loader_drop_last_and_channels_last(prepared_dir):
    data = load_cache(prepared_dir)
    loader = DeviceLoader(
        np.asarray(data.images["train"]),
        data.labels["train"],
        128,
        "cpu",
        augmentation=Augmentation(),
        shuffle=True,
        drop_last=True,
        channels_last=True,
    )
    batches = list(loader)
    assert len(batches) == len(loader) == 400 // 128
    x, y = batches[0]
    assert x.shape == (128, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)


def test_alternating_flip_mirrors_each_image_in_every_other_epoch(prepared_dir):
    images = np.asarray(load_cache(prepared_dir).images["train"][:96])
    ids = np.arange(len(images))  # labels carry the image index, so each output can be traced back
    loader = DeviceLoader(
        images, ids, 32, "cpu", augmentation=Augmentation(translate=0, alternate_flip=True), shuffle=True, seed=3
    )
    originals = images_to_tensor(images, "cpu").float() / 255

    def mirrored_in(epoch):
        loader.set_epoch(epoch)
        flipped = {}
        for x, y in loader:
            for out, i in zip(x, y.tolist()):
                assert torch.equal(out, originals[i]) or torch.equal(out, originals[i].flip(2))
                flipped[i] = torch.equal(out, originals[i].flip(2)) and not torch.equal(out, originals[i])
        assert sorted(flipped) == list(range(len(images)))
        return torch.tensor([flipped[i] for i in range(len(images))])

    first, second, third = mirrored_in(1), mirrored_in(2), mirrored_in(3)
    assert 0.3 < first.float().mean() < 0.7, "the starting half is random"
    assert torch.equal(second, ~first), "the next epoch shows every image the other way round"
    assert torch.equal(third, first)


def test_downscaled_epochs_are_the_full_size_batches_resized(prepared_dir):
    data = load_cache(prepared_dir)
    aug = Augmentation(flip=True, translate=2)

    def first_batch(image_size):
        loader = DeviceLoader(data.images["train"], data.labels["train"], 32, "cpu", augmentation=aug, shuffle=True)
        loader.set_epoch(3)
        loader.image_size = image_size
        return next(iter(loader))

    (full, labels), (small, same_labels) = first_batch(None), first_batch(24)
    assert full.shape[-2:] == (32, 32) and small.shape[-2:] == (24, 24)
    assert torch.equal(labels, same_labels), "same order and augmentation, only smaller"
    assert torch.allclose(small, downscale_batch(full, 24))
    # Antialiased resampling keeps the batch's mean brightness.
    assert abs(small.mean().item() - full.mean().item()) < 2e-3
