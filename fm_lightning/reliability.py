"""Reliability: atomic checkpoints, a last.ckpt that always holds the final step, full RNG state
(per rank under DDP) for exact resume, a non-finite guard, and safe checkpoint reading."""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from .distributed import seed_rank

__all__ = ["AtomicCheckpointIO", "ModelCheckpoint", "RNGStateCallback", "NonFiniteGuard", "NonFiniteError",
           "read_checkpoint", "refused_global", "check_weights_fit", "find_last_checkpoint"]

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same directory, fsyncs it, then
    renames it over the target: a kill at any moment leaves either the old or the new file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, plus: ``last.ckpt`` always holds the final step.

    Lightning writes ``last.ckpt`` only next to an interval save (``every_n_train_steps``,
    ``every_n_epochs``...) and, at fit end, only if nothing was ever saved. So a run whose
    ``max_steps`` is not a multiple of ``every_n_train_steps`` (1500 steps, a checkpoint every
    1000) left ``last.ckpt`` at step 1000, and sampling, evaluation and resume used stale weights.
    Here ``on_train_end`` also saves ``last.ckpt`` when the final global step was not saved yet.

    - It is still a ``ModelCheckpoint``, so Lightning runs it after every other callback's
      ``on_train_end`` (the EMA callback's swap at fit end: the file keeps the EMA weights in
      ``state_dict`` and the raw ones in ``current_model_state``).
    - Nothing is written on an exception path: Lightning calls ``on_train_end`` only when the
      fit loop ends normally (max_steps/max_epochs reached, or ``trainer.should_stop``), never
      after an exception (a :class:`NonFiniteError`, a crash, Ctrl-C), so ``last.ckpt`` then
      keeps the last good checkpoint.
    - Under DDP every rank takes the same decision (the global step is the same everywhere), so
      every rank joins the save, as Lightning's collective ``trainer.save_checkpoint`` needs.
    - With ``save_last="link"`` the final ``last.ckpt`` is a file, not a link to an older
      top-k checkpoint.
    - A resume from a finished run's ``last.ckpt`` trains nothing and writes nothing (Lightning
      skips the fit loop, ``on_train_end`` included).
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)  # saves last.ckpt if nothing was ever saved
        if not self.save_last or self._should_skip_saving_checkpoint(trainer):
            return  # off, nothing new since the last save (or not fitting, fast_dev_run, ...)
        monitor_candidates = self._monitor_candidates(trainer)
        if self.save_last == "link":  # a link would point at an older step: write a file instead
            self._last_checkpoint_saved = ""
            filepath = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
            if trainer.is_global_zero and os.path.islink(filepath):
                os.remove(filepath)  # never write through the link into the top-k file it names
            trainer.strategy.barrier()
        self._save_last_checkpoint(trainer, monitor_candidates)


def refused_global(err: pickle.UnpicklingError) -> str | None:
    """The class or function that ``torch.load(weights_only=True)`` refused to unpickle, as its
    error names it (``None`` if the file is no pickle at all)."""
    named = re.search(r"GLOBAL (\S+)", str(err))
    return named[1] if named else None


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``; one clear error for a missing,
    unreadable, truncated, corrupt (a zip checksum that fails, NaN/inf weights), unsafe or
    foreign file. Never unpickles arbitrary objects."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory; pass a .ckpt file in it, such as <run>/checkpoints/last.ckpt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; pass the path of a .ckpt file")
    if not os.path.isfile(path):
        raise ValueError(f"{path!r} is not a regular file, so not a checkpoint; pass the path of a .ckpt file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80":  # a pickle: torch's legacy format, without checksums
        damage = None
    elif head == b"PK\x03\x04":  # torch's zip format
        damage = _zip_damage(path)
    elif b"PK\x03\x04".startswith(head):
        damage = "it is empty or truncated"
    else:
        raise ValueError(f"{path!r} is not a readable checkpoint (not a file written by torch.save)")
    if damage:
        raise ValueError(f"corrupt checkpoint {path!r}: {damage}; use an intact copy or an earlier checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        named = refused_global(err)
        raise ValueError(
            f"refusing to load {path!r}: it holds {named or 'Python objects'}, which weights_only "
            "loading does not allow (unpickling could run code); pass a checkpoint written by fm-train or fm-cli, "
            "which hold only weights and plain values"
        ) from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise ValueError(f"{path!r} is not a readable checkpoint ({type(err).__name__}: {err})") from err
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or "state_dict" not in ckpt or not {"net", "flow", "source"} <= hparams.keys():
        raise ValueError(
            f"{path!r} is not an fm-lightning checkpoint (it lacks the state_dict, or the recorded net, flow and "
            "source); pass a .ckpt file written by fm-train"
        )
    for part in ("state_dict", "current_model_state"):
        for key, value in (ckpt.get(part) or {}).items():
            # A finite sum proves every entry finite; only a sum that overflowed needs the full check.
            if (isinstance(value, torch.Tensor) and value.is_floating_point() and not value.sum().isfinite()
                    and not value.isfinite().all()):
                raise ValueError(
                    f"corrupt checkpoint {path!r}: its weight {key!r} holds NaN or inf values; use an earlier "
                    "checkpoint of the run"
                )
    return ckpt


def _zip_damage(path: str) -> str | None:
    """What is wrong with the zip file ``path``; ``None`` if it is whole and every record matches
    its CRC-32 (records saved without one, ``torch.serialization.set_crc32_options(False)``,
    store 0 and are not checked)."""
    try:
        if not zipfile.is_zipfile(path):
            return "it is truncated (or its zip index is damaged)"
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.CRC:
                    try:
                        with z.open(info) as record:
                            while record.read(1 << 24):  # zipfile checks the CRC at the end
                                pass
                    except zipfile.BadZipFile:
                        return (f"its record {info.filename!r} fails its checksum (the file changed after it was "
                                "written)")
    except Exception as err:  # zipfile raises many kinds of error on a damaged index
        return f"its zip index is damaged ({type(err).__name__}: {err})"
    return None


def check_weights_fit(model: torch.nn.Module, state_dict: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise ``ValueError`` unless ``state_dict`` (read from ``path``) has exactly ``model``'s entries and shapes."""
    own, theirs = model.state_dict(), state_dict
    differ = sorted((own.keys() ^ theirs.keys()) | {
        k for k in own.keys() & theirs.keys() if tuple(own[k].shape) != tuple(getattr(theirs[k], "shape", ()))})
    if differ:
        raise ValueError(
            f"{os.fspath(path)!r} holds a different model than this config ({len(differ)} weights are missing, extra "
            f"or of another shape, e.g. {differ[0]!r}); resume with the config it was trained with (its run's "
            ".hydra/config.yaml, or config.yaml for fm-cli)"
        )


def find_last_checkpoint(runs_dir: str | os.PathLike) -> Path:
    """The ``checkpoints/last.ckpt`` of the newest run under ``runs_dir``."""
    candidates = sorted(Path(runs_dir).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"ckpt_path=last: no run under {runs_dir} has checkpoints/last.ckpt to resume")
    return candidates[-1]


class RNGStateCallback(L.Callback):
    """Saves and restores every global RNG (torch CPU and CUDA, numpy, python) with the
    checkpoint, so a resumed run draws the same noise, times, couplings and label drops as an
    uninterrupted one. Stored as tensors and tuples of ints, so the checkpoint stays
    ``weights_only``-safe.

    Two rules make the restored state the one the uninterrupted run continued from:

    - Validation during ``fit`` does not move the training streams: the states that training
      left are put back when a validation run ends. Otherwise a checkpoint written at a
      step followed by validation (an epoch end, say) would hold the states *before*
      validation's draws (the val DataLoader's iterator seed, anything a callback draws), while
      the uninterrupted run went on *after* them. A side effect: ``val_check_interval`` does not
      change the training noise.
    - On resume the states are restored at the first training batch (``on_train_batch_start``),
      after everything Lightning does first: sanity checks, and the fast-forward past a
      validation that was due at the saved step, which creates (and draws the seed of) the val
      loader's iterator.

    Under DDP each rank has its own streams (``FlowMatchingModule`` reseeds rank r from
    (seed, r) at fit start), and Lightning writes callback state from rank zero only. So when a
    checkpoint is dumped (on every rank: ``trainer.save_checkpoint`` is collective), the states
    of all ranks are gathered (``all_gather_object``) and stored under ``"ranks"``, a list
    indexed by global rank; the top-level entries stay rank zero's (what older versions read).
    On resume each rank takes its own. If the saved world size differs from the current one (or
    a checkpoint without per-rank states is resumed under several processes), a warning is
    given once and each rank is reseeded from (seed, rank) with
    :func:`~fm_lightning.distributed.seed_rank` instead: different streams per rank, but not
    those of an uninterrupted run. A single-process checkpoint holds exactly the one set of
    states, as before. A checkpoint dumped on an exception path (``save_on_exception``,
    ``OnExceptionCheckpoint``) may be dumped by the failing rank alone; it gathers nothing (no
    collective the other ranks would never join) and a resume from it reseeds.

    Not covered: global-RNG draws made while the first resumed batch is *fetched* (random
    augmentations in a ``num_workers=0`` loader) happen before the restore. Data pipelines
    should draw from their own generators seeded from (seed, epoch, position), as
    ``ToyDataModule`` and ``ImageDataModule`` do.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._torch_state: torch.Tensor | None = None  # at the last training batch's end
        self._training_states: dict[str, Any] | None = None  # to put back when validation ends
        self._world_size = 1  # the trainer's, known from setup
        self._interrupted = False  # an exception is being handled: no collectives

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        self._world_size, self._interrupted = trainer.world_size, False

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        # Called on the rank(s) that raised, before the checkpoint callbacks' on_exception (which
        # may dump a checkpoint on this rank alone).
        self._interrupted = True

    def state_dict(self) -> dict[str, Any]:
        state = self._collect()
        if self._world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return state
        ranks: list[dict[str, Any] | None] = [None] * dist.get_world_size()
        if self._interrupted:
            ranks[dist.get_rank()] = state
        else:
            dist.all_gather_object(ranks, state)
        return {**(ranks[0] or state), "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Applied at the first training batch, so nothing that runs between restoring and
        # training (dataloader set-up, sanity checks, skipping a due validation) shifts the streams.
        self._pending = state

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        ranks, world = state.get("ranks"), trainer.world_size
        if ranks is None and world == 1:
            self._restore(state)  # a single-process checkpoint, resumed in a single process
            return
        if ranks is not None and len(ranks) == world and all(r is not None for r in ranks):
            self._restore(ranks[trainer.global_rank])  # each rank continues its own streams
            return
        if ranks is None:
            saved = "the RNG states of one process"
        elif any(r is None for r in ranks):
            saved = "the RNG states of only some ranks (it was written on an exception)"
        else:
            saved = f"the RNG states of {len(ranks)} processes"
        rank_zero_warn(
            f"the checkpoint holds {saved} but this run has {world}; each rank is reseeded from (seed, rank) "
            "instead, so the resumed run draws different noise than an uninterrupted one would"
        )
        seed_rank(trainer.global_rank)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Only the torch CPU state (a 5 KB copy, ~2 us): creating the val loader's iterator draws
        # its seed from it *before* any validation hook runs. The other generators are still
        # untouched at on_validation_start and are kept there.
        self._torch_state = torch.get_rng_state()

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self._torch_state is not None:
            self._training_states = {**self._collect(), "torch": self._torch_state}

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        # Runs before ModelCheckpoint's own on_validation_end (Lightning calls checkpoint
        # callbacks last), so a checkpoint written there holds the training states too.
        if self._training_states is not None:
            self._restore(self._training_states)
            self._training_states = None

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._torch_state = self._training_states = None

    @staticmethod
    def _collect() -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @staticmethod
    def _restore(state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class NonFiniteError(FloatingPointError):
    """A NaN or inf loss or gradient stopped training."""


class NonFiniteGuard(L.Callback):
    """Stops training at the first NaN/inf loss or gradient, before the optimizer applies it,
    so the weights (and every checkpoint written afterwards) stay finite.

    Args:
        max_skipped_steps: instead of stopping, skip up to this many bad steps in total (their
            gradients are dropped); the run stops at the next one.
    """

    def __init__(self, max_skipped_steps: int = 0) -> None:
        if max_skipped_steps < 0:
            raise ValueError(f"max_skipped_steps must be >= 0, got {max_skipped_steps}")
        self.max_skipped_steps = max_skipped_steps
        self.skipped = 0

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state["skipped"])

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not grads or torch.stack([g.detach().float().abs().amax() for g in grads]).isfinite().all():
            return
        if str(trainer.precision).startswith("16"):
            return  # fp16 gradient scaling skips overflowing steps itself
        what = "loss or gradient"
        if self.skipped < self.max_skipped_steps:
            self.skipped += 1
            log.warning("non-finite %s at step %d: skipping it (%d of %d allowed)", what, trainer.global_step,
                        self.skipped, self.max_skipped_steps)
            for p in pl_module.parameters():
                p.grad = None
            return
        raise NonFiniteError(
            f"non-finite {what} at step {trainer.global_step}; training stopped before the bad update, and the "
            "last checkpoint is intact. Likely causes: a learning rate that is too high (lower "
            "model.optimizer.lr or add warmup), reduced precision (try trainer.precision=32), or a path whose "
            "target blows up near t=1 (e.g. a tiny sigma_min); resume from the last checkpoint once fixed, or "
            "allow a few bad steps with callbacks.non_finite_guard.max_skipped_steps=N"
        )
