"""ImageDataModule on the real torchvision loaders (tiny files in the real formats), image
folders, scikit-learn digits, and its bad input."""

from __future__ import annotations

import os

import hydra
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_config
from datamodules.images import ImageDataModule
from image_helpers import trust_cifar10_files, write_cifar10, write_mnist


def _all(loader) -> dict[str, torch.Tensor]:
    batches = list(loader)
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


@pytest.mark.parametrize("dataset, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_idx_files_through_torchvision(tmp_path, dataset, folder):
    arrays = write_mnist(str(tmp_path), folder, n_train=40, n_test=12)
    dm = ImageDataModule(dataset, root=str(tmp_path), num_classes=10, val_split="test", batch_size=16)
    dm.setup("fit")
    train = _all(dm.train_dataloader())
    assert train["x1"].shape == (32, 1, 28, 28) and train["cond"].dtype == torch.long  # drop_last: 2 full batches
    val = _all(dm.val_dataloader())
    images, labels = arrays["t10k"]
    # Pixels map 0..255 -> [-1, 1] exactly; the test split keeps its order and labels.
    torch.testing.assert_close(val["x1"][:, 0], torch.as_tensor(images).float() / 127.5 - 1, atol=1e-6, rtol=0)
    assert torch.equal(val["cond"], torch.as_tensor(labels, dtype=torch.long))
    assert dm.shape == (1, 28, 28)


def test_mnist_holdout_split_resize_and_no_labels(tmp_path):
    write_mnist(str(tmp_path), n_train=40)
    dm = ImageDataModule("mnist", root=str(tmp_path), image_size=16, channels=3, val_fraction=0.25, batch_size=5)
    dm.setup("fit")
    assert len(dm.data_train) == 30 and len(dm.data_val) == 10
    assert not set(dm.data_train.indices) & set(dm.data_val.indices)
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"x1"} and batch["x1"].shape == (5, 3, 16, 16)
    assert batch["x1"].min() >= -1 and batch["x1"].max() <= 1


def test_cifar10_pickled_batches_through_torchvision(tmp_path, monkeypatch):
    written = write_cifar10(str(tmp_path), n_per_batch=8)
    trust_cifar10_files(monkeypatch, written["md5"])
    dm = ImageDataModule("cifar10", root=str(tmp_path), num_classes=10, val_split="test", batch_size=8, hflip=False)
    dm.setup("fit")
    train = _all(dm.train_dataloader())
    assert train["x1"].shape == (40, 3, 32, 32) and train["cond"].shape == (40,)
    val = _all(dm.val_dataloader())
    data, labels = written["arrays"]["test_batch"]
    expected = torch.as_tensor(data).reshape(-1, 3, 32, 32).float() / 127.5 - 1  # R, G, B planes
    torch.testing.assert_close(val["x1"], expected, atol=1e-6, rtol=0)
    assert val["cond"].tolist() == labels


def test_cifar10_flips_apply_to_training_only(tmp_path, monkeypatch):
    trust_cifar10_files(monkeypatch, write_cifar10(str(tmp_path), n_per_batch=8)["md5"])
    dm = ImageDataModule("cifar10", root=str(tmp_path), hflip=True, val_fraction=0.0, batch_size=40)
    torch.manual_seed(0)
    train = _all(dm.train_dataloader())["x1"]
    ref = _all(dm.reference_dataloader(batch_size=40))["x1"]
    assert dm.val_dataloader() == []  # val_fraction=0: no validation set
    # The shuffled training images are the reference images, some of them mirrored.
    flipped = 0
    for img in train:
        same = (ref - img).flatten(1).abs().amax(1) < 1e-6
        mirrored = (ref - img.flip(-1)).flatten(1).abs().amax(1) < 1e-6
        assert same.any() or mirrored.any()
        flipped += int(mirrored.any() and not same.any())
    assert 5 < flipped < 35


def test_cifar10_integrity_check_and_missing_data_say_how_to_fix(tmp_path):
    write_cifar10(str(tmp_path))  # md5s do not match the real archive's
    dm = ImageDataModule("cifar10", root=str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError, match=r"not found \(or is corrupted\).*data.download=true"):
        dm.setup("fit")
    empty = ImageDataModule("mnist", root=str(tmp_path / "nothing"), download=False)
    with pytest.raises(FileNotFoundError, match=r"MNIST/raw/train-images-idx3-ubyte.*data.download=true"):
        empty.setup("fit")


def _write_folder(root, sizes=((10, 12), (9, 9)), per_class=3):
    for label, cls in enumerate(["cat", "dog"]):
        os.makedirs(root / cls, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng(10 * label + i)
            w, h = sizes[i % len(sizes)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")


def test_imagefolder_tree(tmp_path):
    _write_folder(tmp_path)
    dm = ImageDataModule("imagefolder", root=str(tmp_path), image_size=8, channels=1, num_classes=2, val_fraction=0.0,
                         batch_size=3)
    ref = _all(dm.reference_dataloader())
    assert ref["x1"].shape == (6, 1, 8, 8) and ref["cond"].tolist() == [0, 0, 0, 1, 1, 1]
    assert dm.shape == (1, 8, 8) and "imagefolder" in dm.reference_name
    rgb = ImageDataModule("imagefolder", root=str(tmp_path), image_size=8, val_fraction=0.0, batch_size=3)
    assert next(iter(rgb.train_dataloader()))["x1"].shape == (3, 3, 8, 8)


def test_imagefolder_corrupt_file_stops_with_its_name(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    dm = ImageDataModule("imagefolder", root=str(tmp_path), image_size=8, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"(?s)1 unreadable image file.*broken\.png"):
        dm.setup("fit")
    # Without the up-front check the file still fails by name when it is read.
    lazy = ImageDataModule("imagefolder", root=str(tmp_path), image_size=8, val_fraction=0.0, verify_images=False)
    lazy.setup("fit")
    with pytest.raises(ValueError, match=r"cannot read image file .*broken\.png"):
        _all(lazy.reference_dataloader())


def test_imagefolder_missing_or_flat_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageDataModule("imagefolder", root=str(tmp_path / "nope"), image_size=8).setup()
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    with pytest.raises(FileNotFoundError, match="root/<class>/<image files>"):
        ImageDataModule("imagefolder", root=str(tmp_path), image_size=8).setup()
    _write_folder(tmp_path / "tree")
    with pytest.raises(ValueError, match="num_classes=2"):
        ImageDataModule("imagefolder", root=str(tmp_path / "tree"), image_size=8, num_classes=5).setup()


def test_digits_are_bundled_and_split():
    dm = ImageDataModule("digits", num_classes=10, val_fraction=0.2, batch_size=64, seed=3)
    dm.setup()
    assert len(dm.data_train) + len(dm.data_val) == 1797 and len(dm.data_val) == 359
    batch = next(iter(dm.train_dataloader()))
    assert batch["x1"].shape == (64, 1, 8, 8) and batch["cond"].max() <= 9
    assert batch["x1"].min() == -1 and batch["x1"].max() <= 1
    big = ImageDataModule("digits", image_size=16, batch_size=4)
    assert next(iter(big.train_dataloader()))["x1"].shape == (4, 1, 16, 16)


def test_workers_and_pinned_memory():
    dm = ImageDataModule("digits", num_classes=10, batch_size=32, num_workers=1, pin_memory=True)
    loader = dm.train_dataloader()
    assert loader.num_workers == 1 and loader.pin_memory and loader.persistent_workers
    assert next(iter(loader))["x1"].shape == (32, 1, 8, 8)


def test_reference_loader_shards_the_whole_train_split():
    dm = ImageDataModule("digits", val_fraction=0.5, batch_size=500)
    whole = _all(dm.reference_dataloader())["x1"]
    assert len(whole) == 1797  # the holdout does not shrink the reference set
    shards = [_all(dm.reference_dataloader(rank=r, world_size=3))["x1"] for r in range(3)]
    assert sum(len(s) for s in shards) == 1797 and torch.equal(shards[1][0], whole[1])
    assert len(_all(dm.reference_dataloader(limit=100, rank=1, world_size=2))["x1"]) == 50


@pytest.mark.parametrize(
    "kwargs, match",
    [({"dataset": "svhn"}, "unknown image dataset"), ({"channels": 2}, "channels"),
     ({"val_fraction": 1.0}, "val_fraction"), ({"val_split": "test"}, "test split"),
     ({"val_split": "other"}, "val_split"), ({"dataset": "imagefolder"}, "needs image_size"),
     ({"num_classes": 7}, "10 classes"), ({"image_size": 0}, "image_size"), ({"batch_size": 0}, "batch_size")],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageDataModule(**{"dataset": "digits", **kwargs})


@pytest.mark.parametrize("dataset", ["digits", "mnist", "fashion_mnist", "cifar10", "imagefolder"])
def test_data_config_instantiates_for_every_dataset(tmp_path, dataset):
    cfg = compose_config(["data=images", f"data.dataset={dataset}", f"data.root={tmp_path}"], tmp_path / "run")
    dm = hydra.utils.instantiate(cfg.data)
    assert isinstance(dm, ImageDataModule) and dm.dataset == dataset and dm.batch_size == 128
