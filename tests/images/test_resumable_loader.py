"""The image training loader: an order and flips fixed by (seed, epoch), disjoint shards per
rank, no global RNG, and a position Lightning saves and restores (exact mid-epoch resume).
The end-to-end kill-and-resume runs are in tests/test_resume.py."""

from __future__ import annotations

import pytest
import torch

from datamodules.images import EpochSampler, ImageDataModule, ResumableDataLoader


def _digits(**kwargs) -> ImageDataModule:
    return ImageDataModule("digits", num_classes=10, val_fraction=0.9, batch_size=32, **kwargs)  # 180 train images


def _epoch(loader, epoch: int) -> list[dict[str, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)  # as Lightning does at every epoch start
    return list(loader)


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["x1"], y["x1"]) and torch.equal(x["cond"], y["cond"]) for x, y in zip(a, b)
    )


def test_order_depends_only_on_seed_and_epoch_and_leaves_the_global_rng_alone():
    loader = _digits().train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and isinstance(loader.sampler, EpochSampler)
    state = torch.get_rng_state()
    first = _epoch(loader, 0)
    list(_digits().val_dataloader())
    assert torch.equal(state, torch.get_rng_state())  # neither loader draws from the global RNG
    torch.manual_seed(123)
    assert _same(first, _epoch(_digits().train_dataloader(), 0))
    assert len(first) == 5 and all(len(b["x1"]) == 32 for b in first)  # drop_last
    assert not _same(first, _epoch(loader, 1)) and not _same(first, _epoch(_digits(seed=1).train_dataloader(), 0))
    assert sorted(EpochSampler(range(180), seed=0)) == list(range(180))


@pytest.mark.parametrize("n", [180, 181])
def test_ranks_take_disjoint_shards_of_one_permutation(n):
    shards = [list(EpochSampler(range(n), num_replicas=2, rank=r, seed=4)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == (n + 1) // 2
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    assert len(set(shards[0]) & set(shards[1])) == n % 2  # padding repeats the permutation's first index


def test_flips_are_drawn_by_the_sampler_and_repeat():
    dm = _digits(hflip=True)
    sampler = dm.train_dataloader().sampler
    keys = list(sampler)
    assert keys == list(sampler) and all(isinstance(k, tuple) for k in keys)
    assert 50 < sum(flip for _, flip in keys) < 130
    index, _ = keys[0]
    loader = dm.train_dataloader()
    plain = dm.data_train[index]["x1"]
    assert torch.equal(loader.dataset[(index, True)]["x1"], plain.flip(-1))
    assert torch.equal(loader.dataset[(index, False)]["x1"], plain) and torch.equal(loader.dataset[index]["x1"], plain)
    assert _same(_epoch(loader, 3), _epoch(_digits(hflip=True).train_dataloader(), 3))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_restored_position_resumes_at_the_exact_batch(num_workers):
    loader = _digits(num_workers=num_workers).train_dataloader()
    full = _epoch(loader, 2)
    loader.sampler.set_epoch(2)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches": 2}

    resumed = _digits(num_workers=num_workers).train_dataloader()
    resumed.load_state_dict(state)
    rest = _epoch(resumed, 2)
    assert _same(rest, full[2:])
    assert resumed.state_dict() == {"epoch": 2, "batches": 5}
    assert _same(_epoch(resumed, 3), _epoch(loader, 3))  # the skip applies once

    # Saved at an epoch's last batch: the resumed run starts the next epoch from its start.
    at_end = _digits().train_dataloader()
    at_end.load_state_dict({"epoch": 2, "batches": 5})
    assert _same(_epoch(at_end, 3), _epoch(loader, 3))
