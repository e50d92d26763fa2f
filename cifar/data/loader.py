"""Device-resident batches and batch-level augmentation (tensor ops, no per-image PIL work).

The whole split is moved to the training device once as uint8; each batch is gathered,
scaled to [0, 1] and augmented there. No DataLoader workers, no host->device copy per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from cifar.config import AugmentConfig


@dataclass(frozen=True)
class Augmentation:
    flip: bool = True
    translate: int = 2  # pixels of random shift (reflect-padded crop)
    cutout: int = 0  # side of a square erased at a random place; 0 = off
    # Derandomized flip (Jordan, 2024): an image is mirrored in every other epoch, from a random
    # start, so consecutive epochs always show both views instead of repeating one by chance.
    alternate_flip: bool = False

    @classmethod
    def from_config(cls, cfg: AugmentConfig) -> Augmentation:
        return cls(cfg.flip, cfg.translate, cfg.cutout, cfg.alternate_flip)


def alternating_flips(n: int, epoch: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """Which of ``n`` images epoch ``epoch`` (1-based) mirrors: a fixed random half, then the rest."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 100_003 + 7)
    first = torch.rand(n, device=device, generator=generator) < 0.5
    return first if epoch % 2 == 1 else ~first


def images_to_tensor(images: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """N x 32 x 32 x 3 uint8 (NumPy) -> N x 3 x 32 x 32 uint8 tensor on ``device``."""
    return (
        torch.from_numpy(np.array(images, dtype=np.uint8)).to(device).permute(0, 3, 1, 2)
    )  # copy: cache is read-only mmap


def augment_batch(
    x: torch.Tensor, aug: Augmentation, generator: torch.Generator, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Randomly flip, translate and cut out a float batch (B x C x H x W); pure given ``generator``.

    ``flip`` (B booleans) says which images to mirror instead of drawing it (alternating flip).
    """
    b, _, h, w = x.shape
    device = x.device
    if aug.flip:
        if flip is None:
            flip = torch.rand(b, device=device, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if aug.translate:
        p = aug.translate
        padded = F.pad(x, (p, p, p, p), mode="reflect")
        dy = torch.randint(0, 2 * p + 1, (b,), device=device, generator=generator)
        dx = torch.randint(0, 2 * p + 1, (b,), device=device, generator=generator)
        rows = (dy[:, None] + torch.arange(h, device=device))[:, :, None]  # B,H,1
        cols = (dx[:, None] + torch.arange(w, device=device))[:, None, :]  # B,1,W
        batch = torch.arange(b, device=device)[:, None, None]
        x = padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # advanced indexing puts C last
    if aug.cutout:
        s = aug.cutout
        cy = torch.randint(0, h, (b, 1, 1), device=device, generator=generator)
        cx = torch.randint(0, w, (b, 1, 1), device=device, generator=generator)
        ys = torch.arange(h, device=device)[None, :, None]
        xs = torch.arange(w, device=device)[None, None, :]
        hole = ((ys - cy).abs() <= s // 2) & ((xs - cx).abs() <= s // 2)
        x = x.masked_fill(hole[:, None], 0.5)
    return x


def downscale_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of a B x C x H x W batch to ``size`` x ``size`` (progressive resizing)."""
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class DeviceLoader:
    """Yields (images, labels) batches from tensors already on the device.

    Epoch ``e`` draws its order and augmentation from ``seed + e``, so an epoch can be
    replayed exactly (a resumed run sees the same batches). ``image_size`` (set per epoch by the
    engine) downscales the augmented batches; None keeps them at the stored size.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        device: torch.device | str,
        *,
        augmentation: Augmentation | None = None,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        channels_last: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.images = images_to_tensor(images, self.device)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device)
        self.batch_size = batch_size
        self.augmentation = augmentation
        self.shuffle = shuffle
        self.drop_last = drop_last and len(labels) > batch_size
        self.seed = seed
        self.channels_last = channels_last
        self.epoch = 0
        self.image_size: int | None = None

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.labels)
        order = torch.randperm(n, device=self.device, generator=generator) if self.shuffle else None
        aug = self.augmentation
        flips = alternating_flips(n, self.epoch, self.seed, self.device) if aug and aug.alternate_flip else None
        for i in range(len(self)):
            index = slice(i * self.batch_size, min(n, (i + 1) * self.batch_size))
            if order is not None:
                index = order[index]
            x = self.images[index].float().div_(255)
            if aug is not None:
                x = augment_batch(x, aug, generator, None if flips is None else flips[index])
            if self.image_size and self.image_size != x.shape[-1]:
                x = downscale_batch(x, self.image_size)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[index]
