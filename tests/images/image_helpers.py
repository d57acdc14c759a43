"""Helpers for the image tests: tiny datasets in the real on-disk formats, tiny models."""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import struct

import numpy as np
import torch
from torch import nn

from datamodules.toy import Gaussian
from fm_lightning.flow.couplings import ExactOTCoupling
from fm_lightning.flow.objective import CFMObjective
from fm_lightning.flow.paths import ICFMPath
from fm_lightning.module import FlowMatchingModule
from fm_lightning.nets import UNet


def write_idx(path: str, array: np.ndarray) -> None:
    """Write an IDX file (MNIST's format): magic 0x0000 08 <ndim>, big-endian int32 dims, uint8 data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}i", *array.shape))
        f.write(array.tobytes())


def write_mnist(root: str, folder: str = "MNIST", n_train: int = 40, n_test: int = 12, seed: int = 0) -> dict:
    """Tiny MNIST-format files under ``root/<folder>/raw``; returns the arrays written."""
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(os.path.join(raw, f"{split}-images-idx3-ubyte"), images)
        write_idx(os.path.join(raw, f"{split}-labels-idx1-ubyte"), labels)
        out[split] = (images, labels)
    return out


def _md5(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def write_cifar10(root: str, n_per_batch: int = 8, seed: int = 0) -> dict:
    """Tiny CIFAR-10 python-format batches under ``root/cifar-10-batches-py``.

    Each batch is a pickled dict ``{"data": uint8 (N, 3072) (R, G, B planes of 32x32),
    "labels": [int]}`` and ``batches.meta`` holds ``label_names``, as in the real archive.
    Returns the arrays and the md5 of every file (torchvision checks them).
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    arrays, md5 = {}, {}
    for k, name in enumerate(names):
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in (np.arange(n_per_batch) + k) % 10]
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels, "filenames": []}, f)
        arrays[name] = (data, labels)
        md5[name] = _md5(os.path.join(folder, name))
    meta = os.path.join(folder, "batches.meta")
    with open(meta, "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"], "num_vis": 3072, "num_cases_per_batch": n_per_batch}, f)
    md5["batches.meta"] = _md5(meta)
    return {"arrays": arrays, "md5": md5}


def trust_cifar10_files(monkeypatch, md5: dict) -> None:
    """Point torchvision's CIFAR10 integrity table (class attributes) at the md5 of our files.

    torchvision checks every batch against the md5 of the real archive, which tiny test files
    cannot match; everything else (the check itself, unpickling, reshaping) runs as shipped.
    """
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})


class TinyExtractor(nn.Module):
    """A fixed random feature map for FID tests: ``tanh(W * mean-pooled 8x8 pixels)``."""

    def __init__(self, num_features: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.num_features = num_features
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(num_features, 64, generator=gen) / 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.mean(1, keepdim=True), 8).flatten(1)
        return torch.tanh(pooled @ self.weight.T)


def tiny_unet(num_classes: int = 0, in_channels: int = 1, image_size: int = 8, **kwargs) -> UNet:
    args = dict(model_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[4],
                num_heads=2, num_head_channels=-1, dropout=0.0, num_groups=4)
    args.update(kwargs)
    return UNet(in_channels=in_channels, image_size=image_size, num_classes=num_classes, **args)


def tiny_module(num_classes: int = 0, cond_drop_prob: float = 0.0, shape=(1, 8, 8), **kwargs) -> FlowMatchingModule:
    torch.manual_seed(0)
    return FlowMatchingModule(
        tiny_unet(num_classes, in_channels=shape[0], image_size=shape[1]),
        CFMObjective(ICFMPath(0.0), ExactOTCoupling()),
        Gaussian(list(shape)),
        optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
        solver="euler",
        steps=4,
        cond_drop_prob=cond_drop_prob,
        **kwargs,
    )
