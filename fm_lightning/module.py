"""``FlowMatchingModule``: a velocity network trained with a CFM objective."""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import lightning as L
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from .distributed import seed_rank, skip_nvml_check_without_nvml
from .reliability import check_weights_fit, read_checkpoint
from .schedules import fit_to_max_steps
from .flow.objective import CFMLoss, CFMObjective
from .flow.paths import PathSample
from .flow.solve import ODESolution, Solver, check_solver, odeint
from .spec import from_spec, to_spec

__all__ = ["FlowMatchingModule", "load_checkpoint"]

skip_nvml_check_without_nvml()  # after `import lightning`, which sets the variable

_PLAIN_TYPES = (str, type(None), bool, int, float)


class FlowMatchingModule(L.LightningModule):
    """Trains ``net`` to regress the conditional velocity ``u_t`` of ``flow``'s path.

    Batches are dicts with ``x1`` (B, *shape), and optionally ``x0`` (B, *shape) (else drawn
    from ``source``) and ``cond`` (B,) labels.

    Class-conditional nets (``net.num_classes > 0``) reserve label ``num_classes`` as the null
    class. During training, ``cond_drop_prob`` of the labels are replaced by it, before the
    coupling (so OT couplings pair the dropped samples among themselves, and every other sample
    within its class). That trains the unconditional field used by classifier-free guidance.

    Args:
        net: velocity network, ``net(x, t, cond=None) -> v``.
        flow: the CFM objective (path, coupling, time sampler).
        source: distribution of ``x0`` with ``sample(n, generator) -> (n, *shape)``; recorded in
            the checkpoint so sampling needs nothing else.
        optimizer: factory ``optimizer(params) -> Optimizer``; default Adam(lr=1e-3).
        lr_scheduler: optional factory ``lr_scheduler(optimizer) -> LRScheduler``, stepped
            every optimizer step.
        val_seed: seed of the fixed validation noise and times.
        solver: default ODE solver for :meth:`sample`.
        steps: default number of steps for fixed-step solvers.
        atol: default absolute tolerance for adaptive solvers.
        rtol: default relative tolerance for adaptive solvers.
        cond_drop_prob: probability that a training label is replaced by the null class.
        compile: train through ``torch.compile(net)`` (sampling and checkpoints use the plain net).
        channels_last: keep image nets and their inputs in channels-last memory format.
        num_time_bins: validation also logs the mean loss in this many equal bins of ``t``
            (``val_loss_by_t/...``), where flow matching models differ most.
    """

    def __init__(
        self,
        net: nn.Module,
        flow: CFMObjective,
        source: Any,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        val_seed: int = 0,
        solver: Solver = "dopri5",
        steps: int = 100,
        atol: float = 1e-4,
        rtol: float = 1e-4,
        cond_drop_prob: float = 0.0,
        compile: bool = False,
        channels_last: bool = False,
        num_time_bins: int = 10,
    ) -> None:
        super().__init__()
        self.net = net
        self.flow = flow
        self.source = source
        self.optimizer_factory = optimizer or functools.partial(torch.optim.Adam, lr=1e-3)
        self.lr_scheduler_factory = lr_scheduler
        parts = {"net": net, "flow": flow, "source": source, "optimizer": optimizer, "lr_scheduler": lr_scheduler}
        for name, part in parts.items():
            if isinstance(part, dict) and "class_path" in part:
                raise ValueError(f"{name} is a class_path/init_args spec; the constructor takes the object itself "
                                 "(build it with fm_lightning.spec.from_spec, or load a checkpoint with load_checkpoint)")
        for name, kind in (("net", nn.Module), ("flow", CFMObjective)):
            if not isinstance(parts[name], kind):
                raise ValueError(f"{name} must be a {kind.__name__}, got {parts[name]!r}")
        self.num_classes = int(getattr(self.net, "num_classes", 0) or 0)
        if not 0 <= cond_drop_prob < 1:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        if cond_drop_prob > 0 and self.num_classes == 0:
            raise ValueError(
                "cond_drop_prob > 0 needs a class-conditional net (net.num_classes > 0); set "
                "model.net.num_classes or model.cond_drop_prob=0"
            )
        check_solver(solver, steps, atol, rtol)
        if self.flow.path.requires_gaussian_source and not getattr(self.source, "is_standard_gaussian", False):
            raise ValueError(
                f"{type(self.flow.path).__name__} assumes a standard Gaussian source, but the source is "
                f"{self.source}; use source 'gaussian' (std 1) or another path such as flow=icfm"
            )
        self.save_hyperparameters(
            {
                "net": to_spec(self.net),
                "flow": to_spec(self.flow),
                "source": to_spec(self.source),
                "optimizer": to_spec(self.optimizer_factory),
                "lr_scheduler": to_spec(self.lr_scheduler_factory),
                "val_seed": val_seed,
                "solver": solver,
                "steps": steps,
                "atol": atol,
                "rtol": rtol,
                "cond_drop_prob": cond_drop_prob,
                "compile": compile,
                "channels_last": channels_last,
                "num_time_bins": num_time_bins,
            },
            logger=False,  # in the checkpoint only: fm-train and fm-cli hand the loggers the whole config
        )
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        object.__setattr__(self, "_train_net", None)  # the compiled net; not a registered submodule
        self._time_bins = torch.zeros(2, max(num_time_bins, 1))

    def setup(self, stage: str) -> None:
        if self.hparams.compile and stage == "fit" and self._train_net is None:
            object.__setattr__(self, "_train_net", torch.compile(self.net))

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning reassigns plain attributes (the running hook's name) around each of the ~15
        # hook calls of a training step; nn.Module.__setattr__ spends ~2 us on each looking for
        # parameters, buffers and submodules of that name, which an attribute already in
        # __dict__ cannot be. This saves ~5% of a small net's step.
        if type(value) in _PLAIN_TYPES and name in self.__dict__:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """Velocity ``v`` (B, *shape) at ``x`` (B, *shape), ``t`` (B,)."""
        if self.hparams.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        net = self._train_net if self.training and self._train_net is not None else self.net
        return net(x, t, cond) if cond is not None else net(x, t)

    def _source_like(self, x1: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.source.sample(x1.shape[0], generator).to(device=x1.device, dtype=x1.dtype)

    def _check_labels(self, cond: Tensor | None) -> None:
        if self.num_classes and cond is None:
            raise ValueError(
                f"the net is class-conditional (num_classes={self.num_classes}) but the batches carry no 'cond' "
                "labels; set data.num_classes (or model.net.num_classes=0 for an unconditional model)"
            )

    def drop_labels(self, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Replace each label (B,) by the null class ``num_classes`` with probability ``cond_drop_prob``."""
        p = self.hparams.cond_drop_prob
        if p == 0:
            return cond
        u = torch.rand(cond.shape, generator=generator, device=generator.device if generator else cond.device)
        return torch.where(u.to(cond.device) < p, torch.full_like(cond, self.num_classes), cond)

    def on_fit_start(self) -> None:
        """Under several processes, reseed each rank so noise, times and couplings differ per rank."""
        if self.trainer.world_size > 1:
            seed_rank(self.trainer.global_rank)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x1 = batch["x1"]
        if "xt" in batch:  # the loader drew the path sample with this objective (ToyDataModule)
            out = self.flow.regress(self, PathSample.from_dict(batch))
        else:
            x0 = batch["x0"] if "x0" in batch else self._source_like(x1)
            cond = batch.get("cond")
            self._check_labels(cond)
            out = self.flow(self, x0, x1, None if cond is None else self.drop_labels(cond))
        # Lightning writes step metrics every `log_every_n_steps`; logging only on those steps
        # gives the same curves and saves ~0.5 ms of bookkeeping per step, a third of a small
        # net's step.
        trainer = self._trainer
        if trainer is None or (trainer.log_every_n_steps and (trainer.global_step + 1) % trainer.log_every_n_steps == 0):
            self.log("train/loss", out.loss, prog_bar=True, batch_size=x1.shape[0])
        return out.loss

    def _fixed_loss(self, batch: dict[str, Tensor], batch_idx: int) -> CFMLoss:
        """The CFM loss on ``batch`` with noise and times fixed by ``val_seed`` and ``batch_idx``."""
        x1 = batch["x1"]
        gen = torch.Generator().manual_seed(self.hparams.val_seed + batch_idx)
        x0 = batch["x0"] if "x0" in batch else self._source_like(x1, gen)
        self._check_labels(batch.get("cond"))
        return self.flow(self, x0, x1, batch.get("cond"), generator=gen)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self._fixed_loss(batch, batch_idx)
        self.log("val/loss", out.loss, prog_bar=True, batch_size=batch["x1"].shape[0], sync_dist=True)
        bins = self._time_bins.shape[1]
        idx = (out.sample.t.detach().float().cpu() * bins).long().clamp(0, bins - 1)
        self._time_bins[0].index_add_(0, idx, out.per_sample.detach().float().cpu())
        self._time_bins[1].index_add_(0, idx, torch.ones_like(idx, dtype=torch.float))
        return out.loss

    def on_validation_epoch_start(self) -> None:
        self._time_bins.zero_()

    def on_validation_epoch_end(self) -> None:
        """Log the mean validation loss per bin of ``t`` (summed over ranks)."""
        if not self.hparams.num_time_bins:
            return
        sums, counts = self.trainer.strategy.reduce(self._time_bins.to(self.device), reduce_op="sum").cpu()
        bins = sums.shape[0]
        for i in range(bins):
            if counts[i] > 0:
                self.log(f"val_loss_by_t/t{i / bins:.2f}-{(i + 1) / bins:.2f}", sums[i] / counts[i])

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """The validation loss (same fixed noise and times) on the test data, logged as ``test/loss`` only."""
        loss = self._fixed_loss(batch, batch_idx).loss
        self.log("test/loss", loss, batch_size=batch["x1"].shape[0], sync_dist=True)
        return loss

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Samples (B, *shape) from the batch's ``x0`` (else the source), with its labels if any."""
        x0 = batch["x0"] if "x0" in batch else self._source_like(batch["x1"])
        return self.sample(x0=x0, cond=batch.get("cond")).x

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        fit_to_max_steps(scheduler, self.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | os.PathLike, map_location: Any = "cpu",
                             **kwargs: Any) -> FlowMatchingModule:
        """Lightning's loader, done by :func:`load_checkpoint` (safe; rebuilds the parts from
        their specs). Other Lightning arguments (``strict``, ``hparams_file``, overrides) are
        refused: rebuild by hand from ``load_checkpoint(path).hparams`` instead."""
        if kwargs:
            raise TypeError(f"FlowMatchingModule.load_from_checkpoint takes checkpoint_path and map_location only, "
                            f"not {sorted(kwargs)}; use fm_lightning.module.load_checkpoint(path, map_location, ema, "
                            "source)")
        return load_checkpoint(checkpoint_path, map_location)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int | None = None,
        x0: Tensor | None = None,
        cond: Tensor | int | str | None = None,
        solver: Solver | None = None,
        steps: int | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        num_saves: int = 0,
        generator: torch.Generator | None = None,
        guidance: float | None = None,
    ) -> ODESolution:
        """Integrate the learned ODE from ``x0`` (drawn from the source if not given), in fp32.

        Args:
            num_samples: how many samples to draw when ``x0`` is not given.
            x0: initial points (B, *shape).
            cond: for class-conditional nets (required there): labels (B,), one label (int) for
                every sample, or ``"null"`` for explicitly unconditional samples.
            solver, steps, atol, rtol: override the module's sampling defaults.
            num_saves: if > 1, also return the trajectory at this many times.
            generator: RNG for drawing ``x0``.
            guidance: classifier-free guidance scale ``s`` (conditional nets only):
                ``v = v_uncond + s*(v_cond - v_uncond)``; ``None`` or 1 is plain conditional.

        Returns:
            :class:`ODESolution` with ``x`` (B, *shape) fp32 and the NFE.
        """
        if x0 is None:
            if num_samples is None:
                raise ValueError("sample() needs num_samples or x0")
            x0 = self.source.sample(num_samples, generator)
        x0 = x0.to(self.device).float()
        hp = self.hparams
        cond, guidance = self._sampling_labels(cond, x0.shape[0], guidance)
        null = None if cond is None else torch.full_like(cond, self.num_classes)

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            if cond is None:
                return self.net(x, t)
            if guidance == 1:
                return self.net(x, t, cond)
            if guidance == 0:
                return self.net(x, t, null)
            v_cond, v_uncond = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null])).chunk(2)
            return v_uncond + guidance * (v_cond - v_uncond)

        was_training = self.net.training
        self.net.eval()
        try:
            return odeint(
                velocity, x0, hp.solver if solver is None else solver, hp.steps if steps is None else steps,
                hp.atol if atol is None else atol, hp.rtol if rtol is None else rtol, num_saves,
            )
        finally:
            self.net.train(was_training)

    def _sampling_labels(self, cond: Any, n: int, guidance: float | None) -> tuple[Tensor | None, float]:
        """Validate ``cond``/``guidance`` for :meth:`sample`; labels as a (n,) long tensor."""
        if not self.num_classes:
            if guidance is not None:
                raise ValueError(
                    f"guidance={guidance} needs a class-conditional model, but this one is unconditional "
                    "(net.num_classes=0); drop the guidance scale"
                )
            if cond is not None:
                raise ValueError("this model is unconditional (net.num_classes=0); sample it without cond labels")
            return None, 1.0
        if cond is None:
            raise ValueError(
                f"this model is class-conditional ({self.num_classes} classes): pass cond labels (n,) or one "
                f"label 0..{self.num_classes - 1}, or cond='null' for unconditional samples"
            )
        if isinstance(cond, str):
            if cond != "null":
                raise ValueError(f"cond must be labels, an int or 'null', got {cond!r}")
            cond = self.num_classes
        cond = torch.as_tensor(cond, dtype=torch.long, device=self.device)
        cond = cond.expand(n).clone() if cond.dim() == 0 else cond
        if cond.shape != (n,):
            raise ValueError(f"cond must have shape ({n},) to match the samples, got {tuple(cond.shape)}")
        if cond.min() < 0 or cond.max() > self.num_classes:
            raise ValueError(
                f"labels must be in 0..{self.num_classes - 1} (or {self.num_classes}, the null class), got "
                f"{cond.min().item()}..{cond.max().item()}"
            )
        guidance = 1.0 if guidance is None else float(guidance)
        if not math.isfinite(guidance):
            raise ValueError(f"guidance={guidance} is not a finite number; give a finite guidance scale (1: none)")
        if guidance != 1 and bool((cond == self.num_classes).all()):
            raise ValueError(
                f"guidance={guidance:g} needs class labels, but all labels are the null class (unconditional "
                "samples), on which guidance has no effect; give class labels (fm-sample: --class K or all), or "
                "drop the guidance scale"
            )
        if guidance != 1 and self.hparams.cond_drop_prob == 0:
            rank_zero_warn(
                f"guidance={guidance} mixes in the null-class velocity, but this model was trained with "
                "cond_drop_prob=0, so the null class never saw training"
            )
        return cond, guidance


def load_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", ema: bool = True, source: Any = None
) -> FlowMatchingModule:
    """Rebuild a :class:`FlowMatchingModule` from a checkpoint alone, safely.

    The file is read with ``torch.load(..., weights_only=True)``: a checkpoint that would need
    arbitrary objects unpickled is refused, and classes are rebuilt only from trusted packages.

    Checkpoints written with an EMA callback (Lightning's weight averaging) hold the EMA weights
    in ``state_dict`` and the raw weights in ``current_model_state``. ``ema=True`` loads the EMA
    weights when there are any (else the only weights there are); ``ema=False`` the raw ones.
    The module's ``loaded_weights`` says which were loaded: ``"ema"`` or ``"raw"``.
    ``source`` replaces the recorded source distribution (whose points file may be gone); a
    points source is drawn in the standard frame the recorded one was. The module's
    ``data_hparams`` holds the datamodule's recorded hyperparameters (its ``target``).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is not a readable fm-lightning checkpoint, or is unsafe.
    """
    ckpt = read_checkpoint(path, map_location)
    hparams = dict(ckpt["hyper_parameters"])
    if source is not None:
        from datamodules.toy import frame_of

        loc, scale = frame_of(hparams.get("source"))
        if loc is not None and hasattr(source, "in_frame") and source.dim == len(loc):  # (another dim: refused later)
            source = source.in_frame(loc, scale)
        hparams["source"] = source
    try:  # the constructor takes objects; the checkpoint holds their specs
        for name in ("net", "flow", "source", "optimizer", "lr_scheduler"):
            hparams[name] = from_spec(hparams.get(name), partial=name in ("optimizer", "lr_scheduler"))
        model = FlowMatchingModule(**hparams)
    except TypeError as err:
        raise ValueError(f"{os.fspath(path)!r} is not a checkpoint this fm-lightning can rebuild ({err})") from err
    raw = ckpt.get("current_model_state")
    weights = ckpt["state_dict"] if ema or raw is None else raw
    check_weights_fit(model, weights, path)
    model.load_state_dict(weights)
    model.loaded_weights = "ema" if ema and raw is not None else "raw"
    model.data_hparams = dict(ckpt.get("datamodule_hyper_parameters") or {})
    return model.eval()
