"""W&B: offline runs write their files under the run directory; no global state leaks."""

from __future__ import annotations

import os
import struct
import time

import pytest

from fm_lightning.loggers import WandbLogger
from fm_lightning.reliability import NonFiniteError
from fm_lightning.train import run


def _wandb_run_dir(output_dir):
    runs = list((output_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def _records(path):
    """The protobuf records of a W&B ``.wandb`` file: a 7-byte file header, then the LevelDB
    log format (32 KiB blocks of chunks, each with a 7-byte header: crc, length, kind)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, chunks = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left for a chunk header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def _run_and_exit(run_dir):
    """``(run id, exit code)`` of the finished offline W&B run in ``run_dir`` (the file is
    written by W&B's service process; wait until its exit record is there)."""
    for _ in range(60):
        records = list(_records(next(run_dir.glob("run-*.wandb"))))
        kinds = {r.WhichOneof("record_type"): r for r in records}
        if "exit" in kinds:
            return kinds["run"].run.run_id, kinds["exit"].exit.exit_code
        time.sleep(0.5)
    raise AssertionError(f"no exit record in {run_dir}")


def test_a_resumed_run_continues_its_wandb_run_and_a_failed_one_is_marked_failed(tiny_cfg, tmp_path):
    """Resumed in its own directory, or from its checkpoint into a new one, a run keeps its W&B id."""
    wandb = ["logger=wandb", "logger.wandb.offline=true", "model.lr_scheduler.warmup_steps=1"]
    last = tmp_path / "run/checkpoints/last.ckpt"
    run(tiny_cfg(*wandb, "trainer.max_steps=20"))
    run(tiny_cfg(*wandb, "trainer.max_steps=30", f"ckpt_path={last}"))
    run(tiny_cfg(*wandb, "trainer.max_steps=40", f"ckpt_path={last}", output_dir=tmp_path / "new"))
    sessions = sorted((tmp_path / "run/wandb").glob("offline-run-*"))
    assert len(sessions) == 2
    (first_id, first_exit), resumed = [_run_and_exit(d) for d in sessions]
    assert first_exit == 0 and resumed == (first_id, 0)
    assert _run_and_exit(_wandb_run_dir(tmp_path / "new")) == (first_id, 0)
    assert (tmp_path / "run/wandb-run-id.txt").read_text() == (tmp_path / "new/wandb-run-id.txt").read_text() == first_id
    with pytest.raises(NonFiniteError):
        run(tiny_cfg(*wandb, "model.optimizer.lr=1e30", output_dir=tmp_path / "bad"))
    assert _run_and_exit(_wandb_run_dir(tmp_path / "bad"))[1] == 1


def test_offline_run_writes_config_metrics_and_images_and_leaks_nothing(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run(tiny_cfg("logger=wandb", "logger.wandb.offline=true", "logger.wandb.tags=unit"))  # one tag, as a word
    assert "WANDB_MODE" not in os.environ
    wb = _wandb_run_dir(tmp_path / "run")
    record_file = next(wb.glob("run-*.wandb"))
    for _ in range(60):  # W&B's service process writes the record asynchronously; give it time
        record = record_file.read_bytes()
        if b"val/w2" in record:
            break
        time.sleep(0.5)
    assert b"ExactOTCoupling" in record and b"8gaussians" in record  # the resolved config
    config_keys = {item.key for r in _records(record_file) if r.WhichOneof("record_type") == "config"
                   for item in r.config.update}
    assert {"data", "model", "trainer", "seed"} <= config_keys  # the Hydra config, once: no copy of
    assert not config_keys & {"net", "flow", "solver"}  # the module's hyperparameters beside it
    assert b"val/w2" in record and b"train/loss" in record  # slash-grouped scalar metrics
    assert [list(r.run.tags) for r in _records(record_file) if r.WhichOneof("record_type") == "run"][0] == ["unit"]
    images = list((wb / "files/media/images").rglob("*.png"))
    assert any("samples" in p.name for p in images) and any("trajectories" in p.name for p in images)


def test_online_without_credentials_falls_back_to_offline_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    logger = WandbLogger(project="p", save_dir=str(tmp_path))
    assert logger.offline_mode and "no credentials" in caplog.text
    assert "WANDB_MODE" not in os.environ


def test_log_model_offline_is_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="log_model needs an online"):
        WandbLogger(project="p", save_dir=str(tmp_path), offline=True, log_model=True)
    monkeypatch.setenv("WANDB_MODE", "offline")  # the same answer for W&B's own switch
    with pytest.raises(ValueError, match="log_model needs an online"):
        WandbLogger(project="p", save_dir=str(tmp_path), log_model=True)


@pytest.mark.parametrize("env", [{"WANDB_MODE": "disabled"}, {"WANDB_MODE": "Disabled"}, {"WANDB_DISABLED": "true"}])
def test_wandb_disabled_wins_over_offline_and_log_model(tiny_cfg, tmp_path, monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))  # where artifacts would be staged
    run(tiny_cfg("logger=wandb", "logger.wandb.offline=true", "logger.wandb.log_model=true"))
    assert not list((tmp_path / "run").rglob("*wandb*")) and not list(tmp_path.glob("wandb_data/**/*.ckpt"))


def test_log_model_without_credentials_says_that_credentials_are_missing(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="W&B has no credentials; run `wandb login` .* or set log_model=false"):
        WandbLogger(project="p", save_dir=str(tmp_path), log_model=True)


def test_a_resume_continues_only_the_wandb_run_its_run_directory_recorded(tmp_path):
    """``<run>/checkpoints/x.ckpt`` continues the W&B id in ``<run>/wandb-run-id.txt``; without one,
    a resume never adopts whatever W&B run sits next to the checkpoint or in a shared save_dir
    (the newest there was another run's)."""
    from omegaconf import OmegaConf

    from fm_lightning.train import WANDB_ID_FILE, _continue_wandb

    shared = tmp_path / "shared"
    for other in ("aaa111", "bbb222"):  # two runs' W&B files in a shared save_dir
        session = shared / f"wandb/offline-run-20260101_000000-{other}"
        session.mkdir(parents=True)
        (session / f"run-{other}.wandb").touch()

    def resumed_id(folder, recorded=None):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "m.ckpt").touch()
        if recorded:
            (tmp_path / folder / ".." / WANDB_ID_FILE).write_text(recorded)
        cfg = OmegaConf.create({"task_name": "t", "logger": {"wandb": {"id": None, "save_dir": str(shared)}}})
        _continue_wandb(cfg, str(tmp_path / folder / "m.ckpt"))
        return cfg.logger.wandb.id

    assert resumed_id("a/checkpoints") is None
    assert resumed_id("b/checkpoints", recorded="abc123") == "abc123"
    assert resumed_id("project/weights", recorded="xyz") is None  # not a run directory's checkpoint


def test_a_project_name_wandb_refuses_is_one_value_error(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = WandbLogger(project="a/b:c", save_dir=str(tmp_path), offline=True)
    with pytest.raises(ValueError, match=r"^logger.wandb: Invalid project name 'a/b:c'.*; fix the logger.wandb settings$"):
        logger.experiment
