"""Non-finite guard, safe and verified loading, and a last.ckpt that holds the final step."""

from __future__ import annotations

import functools
import os
import pickle
import re
import struct
import zipfile

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_config, run_cli
from fm_lightning.module import load_checkpoint
from fm_lightning.reliability import ModelCheckpoint, read_checkpoint

HELPERS = os.path.join(os.path.dirname(__file__), "helpers")
POISON = ["debug=fast", "callbacks.model_checkpoint.every_n_train_steps=10", "+callbacks.poison._target_=poison.NaNBatchAtStep",
          "+callbacks.poison.step=25"]


def test_injected_nan_stops_the_run_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([HELPERS, os.environ.get("PYTHONPATH", "")]))
    run_dir = tmp_path / "run"
    proc = run_cli("fm-train", *POISON, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "non-finite loss or gradient at step 25" in proc.stderr and "learning rate" in proc.stderr
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 20
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_a_bounded_number_of_bad_steps_can_be_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([HELPERS, os.environ.get("PYTHONPATH", "")]))
    run_dir = tmp_path / "run"
    proc = run_cli("fm-train", *POISON, "callbacks.non_finite_guard.max_skipped_steps=1", f"hydra.run.dir={run_dir}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipping it (1 of 1 allowed)" in proc.stderr + proc.stdout
    model = load_checkpoint(run_dir / "checkpoints/last.ckpt")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_malicious_checkpoint_is_refused_and_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"net": Evil()}}, evil)
    proc = run_cli("fm-sample", str(evil), "--out", str(tmp_path / "s.npz"), cwd=tmp_path)
    assert proc.returncode == 2 and "refusing to load" in proc.stderr
    assert not marker.exists()
    with open(tmp_path / "legacy.ckpt", "wb") as f:
        pickle.dump(Evil(), f)
    proc = run_cli("fm-train", "debug=fast", f"ckpt_path={tmp_path / 'legacy.ckpt'}", f"hydra.run.dir={tmp_path / 'r'}",
                   cwd=tmp_path)
    assert proc.returncode != 0 and "refusing to load" in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize(("payload", "named"), [(functools.partial(torch.optim.Adam, lr=1.0), "functools.partial"),
                                                (os.getcwd, f"{os.getcwd.__module__}.getcwd")])
def test_an_unsafe_checkpoint_is_refused_in_one_clean_line_naming_the_class(tmp_path, payload, named):
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"optimizer": payload}}, path)
    with pytest.raises(ValueError) as refused:
        read_checkpoint(path)
    message = str(refused.value)
    assert f"it holds {named}, which weights_only loading does not allow" in message
    assert message.endswith("which hold only weights and plain values") and message.isprintable()


def _untrained_checkpoint(path) -> dict:
    """Write an fm-lightning checkpoint of an untrained model to ``path``; returns its contents."""
    model = instantiate(compose_config(["debug=fast"]).model)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return torch.load(path, weights_only=True)


def test_a_checkpoint_damaged_anywhere_is_refused_as_corrupt(tmp_path):
    good = tmp_path / "good.ckpt"
    _untrained_checkpoint(good)
    load_checkpoint(good)
    data = good.read_bytes()
    records = zipfile.ZipFile(good).infolist()
    assert sum("/data/" in r.filename for r in records) > 5
    for record in records:  # the pickle and every tensor: a flipped byte loads silently without the checksums
        name_len, extra_len = struct.unpack("<HH", data[record.header_offset + 26:record.header_offset + 30])
        at = record.header_offset + 30 + name_len + extra_len + record.file_size // 2
        (tmp_path / "bad.ckpt").write_bytes(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:])
        named = re.escape(repr(record.filename))
        with pytest.raises(ValueError, match=f"corrupt checkpoint .*{named} fails its checksum"):
            load_checkpoint(tmp_path / "bad.ckpt")
    for size in (0, 3, 5000, len(data) - 30):
        (tmp_path / "cut.ckpt").write_bytes(data[:size])
        with pytest.raises(ValueError, match="corrupt checkpoint .*truncated"):
            load_checkpoint(tmp_path / "cut.ckpt")



def test_a_checkpoint_saved_without_checksums_loads(tmp_path):
    path = tmp_path / "nocrc.ckpt"
    ckpt = _untrained_checkpoint(path)
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(ckpt, path)
    finally:
        torch.serialization.set_crc32_options(True)
    assert {r.CRC for r in zipfile.ZipFile(path).infolist()} == {0}
    assert load_checkpoint(path).state_dict().keys() == ckpt["state_dict"].keys()


@pytest.mark.parametrize("part", ["state_dict", "current_model_state"])
def test_non_finite_weights_are_refused_but_huge_finite_ones_load(tmp_path, part):
    path = tmp_path / "w.ckpt"
    ckpt = _untrained_checkpoint(path)
    name = next(iter(ckpt["state_dict"]))
    huge = {k: v.clone() for k, v in ckpt["state_dict"].items()}
    huge[name].fill_(3e38)  # finite, though their float32 sum overflows
    torch.save({**ckpt, part: huge}, path)
    assert load_checkpoint(path, ema=part == "state_dict").state_dict()[name].eq(3e38).all()
    huge[name].view(-1)[-1] = float("inf")
    torch.save({**ckpt, part: huge}, path)
    with pytest.raises(ValueError, match=f"corrupt checkpoint .*{name!r} holds NaN or inf values; use an earlier"):
        load_checkpoint(path)


class _RaiseAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("injected")


@pytest.mark.parametrize("save_last", [True, "link"])
def test_last_checkpoint_holds_the_final_step_but_is_not_written_on_an_exception(tmp_path, save_last):
    """5 steps, a checkpoint every 2: last.ckpt holds step 5 (Lightning's own callback leaves it
    at step 4); as a file, not a link to step 4's (whose file keeps step 4). A run that raises at
    step 3 keeps last.ckpt at step 2."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    def fit(dirpath, callbacks=()):
        ckpt = ModelCheckpoint(dirpath=dirpath, every_n_train_steps=2, save_top_k=-1, save_last=save_last)
        trainer = L.Trainer(max_steps=5, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, default_root_dir=tmp_path, callbacks=[ckpt, *callbacks])
        trainer.fit(BoringModel())

    fit(tmp_path / "done")
    last = tmp_path / "done/last.ckpt"
    assert not last.is_symlink() and torch.load(last, weights_only=True)["global_step"] == 5
    assert torch.load(tmp_path / "done/epoch=0-step=4.ckpt", weights_only=True)["global_step"] == 4
    with pytest.raises(RuntimeError, match="injected"):
        fit(tmp_path / "failed", [_RaiseAtStep(3)])
    assert torch.load(tmp_path / "failed/last.ckpt", weights_only=True)["global_step"] == 2
