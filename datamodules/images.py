"""``ImageDataModule``: image datasets for flow matching, pixels scaled to [-1, 1].

Datasets (``dataset=``):

- ``mnist``, ``fashion_mnist``, ``cifar10``: torchvision's classes, read from ``root`` in their
  usual layout (``root/MNIST/raw``, ``root/FashionMNIST/raw``, ``root/cifar-10-batches-py``);
  ``download=true`` fetches them once (rank zero, in ``prepare_data``).
- ``imagefolder``: any tree ``root/<class>/<image>`` (torchvision ``ImageFolder``); the class
  folders, sorted, give the labels.
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images), no download.

Batches are dicts ``{"x1": (B, C, H, W) in [-1, 1], "cond": (B,) int64 labels}``; ``cond`` is
present only when ``num_classes > 0`` (class-conditional training). The module draws ``x0``
from its own source.

Training order and flips are a pure function of ``(seed, epoch)``: each epoch is a permutation
drawn from its own generator (and so is each image's flip, with ``hflip``), so nothing in the
data pipeline touches the global RNG or depends on worker processes. Together with the
checkpointed RNG states (``fm_lightning.reliability.RNGStateCallback``) this makes resume
exact: the train loader implements Lightning's stateful-dataloader protocol (``state_dict`` /
``load_state_dict``, saved in the checkpoint's loop state), so a run resumed from a checkpoint
written mid-epoch continues at the exact batch, and one written at an epoch boundary starts the
next epoch, with the same images in the same order as the uninterrupted run. Exactness assumes
the same devices, global batch size and ``limit_train_batches`` on resume.

Unreadable image files (``imagefolder``) stop the run with the file's name: ``setup`` checks
every file once (``verify_images``) and lists all bad ones in one error, and a file that still
fails to decode later raises an error that names it. Skipping files silently would change the
dataset (and any FID reference statistics computed from it) without anyone noticing.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from fm_lightning.distributed import per_device_batch_size

__all__ = ["ImageDataModule", "DATASETS", "DigitsDataset", "EpochSampler", "ResumableDataLoader"]

log = logging.getLogger(__name__)

DatasetName = Literal["mnist", "fashion_mnist", "cifar10", "imagefolder", "digits"]
DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist", "cifar10", "imagefolder", "digits")
#: (channels, side length, classes) of the fixed-format datasets.
_NATIVE = {"mnist": (1, 28, 10), "fashion_mnist": (1, 28, 10), "cifar10": (3, 32, 10), "digits": (1, 8, 10)}
_TV_CLASS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}
_TV_FILES = {
    "mnist": "MNIST/raw/train-images-idx3-ubyte (and the other three IDX files)",
    "fashion_mnist": "FashionMNIST/raw/train-images-idx3-ubyte (and the other three IDX files)",
    "cifar10": "cifar-10-batches-py/data_batch_1..5, test_batch and batches.meta",
}


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits as ``(PIL image "L", label)``; grey levels 0..16 map to 0..255."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.data = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
        self.targets = digits.target.astype(np.int64)
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        return Image.fromarray(self.data[index], mode="L"), int(self.targets[index])


def _load_image(path: str) -> Any:
    """Open an image file fully, or raise an error that names it."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
            return img
    except (OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"cannot read image file {path!r} ({err}); remove or replace it") from err


def _check_images(paths: list[str]) -> None:
    """Open every file and verify its structure; one error listing every unreadable file."""
    from PIL import Image

    bad = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.verify()
        except (OSError, ValueError, SyntaxError) as err:
            bad.append(f"{path} ({type(err).__name__}: {err})")
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise ValueError(f"{len(bad)} unreadable image file(s); remove or replace them:\n  {shown}")


class _Labelled(Dataset):
    """``{"x1": transform(image)[, "cond": label]}`` items from a ``(image, label)`` dataset."""

    def __init__(self, base: Dataset, transform: Any, with_labels: bool) -> None:
        self.base, self.transform, self.with_labels = base, transform, with_labels

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        img, label = self.base[index]
        item = {"x1": self.transform(img)}
        if self.with_labels:
            item["cond"] = torch.tensor(label, dtype=torch.long)
        return item


class _Flips(Dataset):
    """Items of ``data``, keyed by an index or by ``(index, flip)``; ``flip`` mirrors ``x1`` (W axis).

    The flip decisions come from :class:`EpochSampler`, not from a random transform, so they do
    not depend on the global RNG or on worker processes. Flipping the final tensor equals
    flipping the image after resize and crop (normalisation is per pixel)."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: int | tuple[int, bool]) -> dict[str, Tensor]:
        index, flip = key if isinstance(key, tuple) else (key, False)
        item = self.data[index]
        return {**item, "x1": item["x1"].flip(-1)} if flip else item


class EpochSampler(DistributedSampler):
    """Training indices: a permutation of the dataset that depends only on ``(seed, epoch)``,
    sharded ``rank::num_replicas``; with ``hflip`` each index comes as ``(index, flip)`` with
    flips (p = 1/2) from the same generator.

    Lightning calls :meth:`set_epoch` at every epoch start. Because it is a
    ``DistributedSampler``, Lightning keeps it under DDP instead of injecting its own; ranks
    share the permutation and take disjoint shards (padded by repeating its start, as
    ``DistributedSampler`` does). :attr:`skip` drops that many of this rank's samples from the
    next iteration only (resuming mid-epoch; see :class:`ResumableDataLoader`).
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, hflip: bool = False
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.hflip = hflip
        self.skip = 0

    def __iter__(self) -> Iterator[int | tuple[int, bool]]:
        n = len(self.dataset)
        gen = torch.Generator().manual_seed(hash((self.seed, self.epoch)) % 2**63)
        order = torch.randperm(n, generator=gen).tolist()
        keys: list[Any] = order
        if self.hflip:
            flips = (torch.rand(n, generator=gen) < 0.5).tolist()
            keys = [(i, flips[i]) for i in order]
        if len(keys) < self.total_size:
            keys = (keys * math.ceil(self.total_size / len(keys)))[: self.total_size]
        skip, self.skip = self.skip, 0
        return iter(keys[self.rank : self.total_size : self.num_replicas][skip:])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochSampler` that Lightning can resume mid-epoch.

    It follows Lightning's stateful-dataloader protocol: Lightning stores :meth:`state_dict`
    (the epoch and how many batches of it were yielded) in the checkpoint and, on resume,
    calls :meth:`load_state_dict` before iterating. If the resumed epoch is the saved one,
    the sampler skips the batches already trained on; a checkpoint written at an epoch's last
    batch resumes at the start of the next epoch. Counting happens where batches leave the
    loader, so it is exact with worker processes and their prefetching.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch, self._position = 0, 0
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        epoch = getattr(sampler, "epoch", 0)
        start = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        self._resume = None
        if isinstance(sampler, EpochSampler):
            sampler.skip = start * (self.batch_size or 1)
        else:
            start = 0  # Lightning swapped the sampler (overfit_batches): nothing to skip
        self._epoch, self._position = epoch, start
        for batch in super().__iter__():
            self._position += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))


class ImageDataModule(L.LightningDataModule):
    """Image batches ``{"x1": (B, C, H, W) in [-1, 1], "cond": (B,)}`` for flow matching.

    Args:
        dataset: ``mnist``, ``fashion_mnist``, ``cifar10``, ``imagefolder`` or ``digits``.
        root: folder holding (or receiving) the dataset; for ``imagefolder`` the class tree.
        download: fetch torchvision datasets into ``root`` if missing (ignored otherwise).
        image_size: side length after resizing (images are resized, then centre-cropped to a
            square); ``None`` keeps the native size (required for ``imagefolder``).
        channels: 1 (greyscale) or 3 (RGB); images are converted. ``None`` keeps the native
            channels (RGB for ``imagefolder``).
        num_classes: 0 for unconditional batches (no labels); otherwise the dataset's class
            count, and batches carry ``cond`` labels.
        hflip: random horizontal flips of training images.
        val_split: ``holdout`` takes ``val_fraction`` of the training split (fixed by ``seed``)
            for validation; ``test`` validates on the official test split (torchvision sets).
        val_fraction: share of the training split held out when ``val_split=holdout``; 0 for
            no validation set.
        batch_size: GLOBAL batch size per optimizer step; each device loads
            ``batch_size / (world_size * accumulate_grad_batches)`` (see ``setup``).
        num_workers: DataLoader worker processes.
        pin_memory: pin host memory (for GPU training).
        seed: seed of the holdout split, the training order and the flips (see the module doc).
        verify_images: check every ``imagefolder`` file in ``setup`` (see the module doc).

    Resume is exact at any batch, mid-epoch included: the train loader is a
    :class:`ResumableDataLoader` over an :class:`EpochSampler`, whose position Lightning keeps in
    the checkpoint (its stateful-dataloader support; torchdata is not needed).
    """

    def __init__(
        self,
        dataset: DatasetName = "digits",
        root: str = "data",
        download: bool = False,
        image_size: int | None = None,
        channels: int | None = None,
        num_classes: int = 0,
        hflip: bool = False,
        val_split: Literal["holdout", "test"] = "holdout",
        val_fraction: float = 0.05,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        verify_images: bool = True,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown image dataset {dataset!r}; choose one of {list(DATASETS)}")
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1, 3 or null (native), got {channels}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be >= 1 or null (native size), got {image_size}")
        if dataset == "imagefolder" and image_size is None:
            raise ValueError("imagefolder needs image_size (its images may differ in size); set data.image_size")
        if val_split not in ("holdout", "test"):
            raise ValueError(f"val_split must be 'holdout' or 'test', got {val_split!r}")
        if val_split == "test" and dataset not in _TV_CLASS:
            raise ValueError(f"val_split='test' needs a dataset with a test split ({sorted(_TV_CLASS)}); use holdout")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if batch_size < 1 or num_workers < 0 or num_classes < 0:
            raise ValueError("batch_size must be >= 1, num_workers >= 0 and num_classes >= 0")
        if dataset in _NATIVE and num_classes not in (0, _NATIVE[dataset][2]):
            raise ValueError(f"{dataset} has {_NATIVE[dataset][2]} classes; set num_classes to that (or 0), got {num_classes}")
        self.dataset, self.root, self.download = dataset, os.fspath(root), download
        self.image_size, self.channels, self.num_classes, self.hflip = image_size, channels, num_classes, hflip
        self.val_split, self.val_fraction, self.batch_size = val_split, val_fraction, batch_size
        self.num_workers, self.pin_memory, self.seed, self.verify_images = num_workers, pin_memory, seed, verify_images
        self.device_batch_size = batch_size
        # What the data is, recorded in checkpoints so that a resume on other images is refused
        # (a torchvision dataset may move to another root; an image folder is its root).
        self.save_hyperparameters({"dataset": dataset, "image_size": image_size, "channels": channels,
                                   "num_classes": num_classes, "val_split": val_split, "val_fraction": val_fraction,
                                   **({"root": os.path.abspath(self.root)} if dataset == "imagefolder" else {})},
                                  logger=False)
        self._rank, self._world_size = 0, 1
        self.data_train: Dataset | None = None
        self.data_val: Dataset | None = None
        self._train_base: Dataset | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the batches."""
        native = _NATIVE.get(self.dataset, (3, None, None))
        size = self.image_size or native[1]
        return (self.channels or native[0], size, size)

    # -- loading -----------------------------------------------------------------------------
    def _torchvision(self, train: bool, download: bool = False) -> Dataset:
        import torchvision.datasets as tvd

        cls = getattr(tvd, _TV_CLASS[self.dataset])
        try:
            return cls(self.root, train=train, download=download)
        except (RuntimeError, AssertionError, ValueError, OSError) as err:  # missing, or corrupt files
            root, expected = os.path.abspath(self.root), os.path.join(self.root, _TV_FILES[self.dataset])
            if download:  # torchvision's error spans lines: one line here
                raise FileNotFoundError(
                    f"downloading {self.dataset} into root={root!r} failed ({' '.join(str(err).split())}); without "
                    f"network access, place the files there yourself ({expected}) and set download=false (fm-train: "
                    "data.download=false)"
                ) from err
            raise FileNotFoundError(
                f"{self.dataset} was not found (or is corrupted) under root={root!r}: expected "
                f"{expected}. Fetch it with download=true (fm-train: "
                f"data.download=true), or point root (fm-train: data.root) at the folder that holds it ({err})"
            ) from err

    def _base(self, train: bool) -> Dataset:
        if self.dataset in _TV_CLASS:
            return self._torchvision(train)
        if self.dataset == "digits":
            return DigitsDataset()
        import torchvision.datasets as tvd

        if not os.path.isdir(self.root):
            raise FileNotFoundError(
                f"imagefolder root {self.root!r} does not exist; point data.root at a folder laid out as "
                "root/<class>/<image files>"
            )
        try:
            folder = tvd.ImageFolder(self.root, loader=_load_image)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}; imagefolder expects root/<class>/<image files>") from err
        if self.num_classes and len(folder.classes) != self.num_classes:
            raise ValueError(
                f"{self.root!r} has {len(folder.classes)} class folders {folder.classes[:10]} but num_classes="
                f"{self.num_classes}; set data.num_classes={len(folder.classes)} (or 0 for unconditional)"
            )
        if self.verify_images:
            _check_images([path for path, _ in folder.samples])
        return folder

    def transform(self, train: bool) -> Any:
        """PIL image -> (C, H, W) float tensor in [-1, 1]: convert, resize, crop, scale; the same
        for ``train`` or not. Training flips (``hflip``) are not here: :class:`EpochSampler`
        decides them and the train loader applies them to the tensors (module doc)."""
        from torchvision import transforms as T

        steps: list[Any] = []
        if self.channels is not None or self.dataset == "imagefolder":
            steps.append(T.Lambda(_to_rgb if (self.channels or 3) == 3 else _to_grey))
        if self.image_size is not None:
            steps += [T.Resize(self.image_size, antialias=True), T.CenterCrop(self.image_size)]
        steps += [T.ToTensor(), T.Normalize(0.5, 0.5)]
        return T.Compose(steps)

    def prepare_data(self) -> None:
        if self.download and self.dataset in _TV_CLASS:
            self._torchvision(train=True, download=True)
            self._torchvision(train=False, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.device_batch_size = per_device_batch_size(
                self.batch_size, self.trainer.world_size, self.trainer.accumulate_grad_batches
            )
            self._rank, self._world_size = self.trainer.global_rank, self.trainer.world_size
        if self.data_train is not None:
            return
        labels = self.num_classes > 0
        base = self._train_base = self._base(train=True)
        if self.val_split == "test":
            train_idx, val = np.arange(len(base)), _Labelled(self._base(train=False), self.transform(False), labels)
        else:
            perm = np.random.default_rng(self.seed).permutation(len(base))
            n_val = int(round(self.val_fraction * len(base)))
            if self.val_fraction > 0 and (n_val < 1 or n_val >= len(base)):
                raise ValueError(f"val_fraction={self.val_fraction} leaves no train or no val images of {len(base)}")
            train_idx, val_idx = np.sort(perm[n_val:]), np.sort(perm[:n_val])
            val = Subset(_Labelled(base, self.transform(False), labels), val_idx.tolist()) if n_val else None
        self.data_train = Subset(_Labelled(base, self.transform(True), labels), train_idx.tolist())
        self.data_val = val

    # -- loaders -----------------------------------------------------------------------------
    def _loader(self, data: Dataset, loader: type[DataLoader] = DataLoader, **kwargs: Any) -> DataLoader:
        """A loader with the module's batch size and workers; worker seeds come from its own
        generator, not the global RNG."""
        return loader(
            data,
            batch_size=self.device_batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, flipped (``hflip``) batches in an order fixed by ``(seed, epoch)``, sharded
        over ranks; resumable mid-epoch (see :class:`ResumableDataLoader`)."""
        self.setup()
        sampler = EpochSampler(self.data_train, self._world_size, self._rank, self.seed, self.hflip)
        return self._loader(_Flips(self.data_train), ResumableDataLoader, sampler=sampler,
                            drop_last=len(sampler) >= self.device_batch_size)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        return self._loader(self.data_val) if self.data_val is not None else []

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    def reference_dataloader(
        self, batch_size: int | None = None, rank: int = 0, world_size: int = 1, limit: int | None = None
    ) -> DataLoader:
        """The whole training split (no flips, no holdout; its first ``limit`` images if given),
        sharded ``rank::world_size``, for reference statistics such as FID's. Batches are dicts
        like training batches."""
        self.setup()
        data = _Labelled(self._train_base, self.transform(False), self.num_classes > 0)
        n = len(data) if limit is None else min(limit, len(data))
        shard = Subset(data, list(range(rank, n, world_size)))
        return DataLoader(shard, batch_size=batch_size or self.device_batch_size, shuffle=False, num_workers=self.num_workers)

    @property
    def reference_name(self) -> str:
        """Identifies the reference images: dataset, split and pixel shape."""
        c, h, w = self.shape
        where = f":{os.path.abspath(self.root)}" if self.dataset == "imagefolder" else ""
        return f"{self.dataset}{where}-train-{c}x{h}x{w}"


def _to_rgb(img: Any) -> Any:
    return img.convert("RGB")


def _to_grey(img: Any) -> Any:
    return img.convert("L")
