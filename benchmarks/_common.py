"""Shared helpers of the toy benchmarks: config composition, the TorchCFM tutorial recipe, clocks.

Run the scripts from the repository root (``python benchmarks/toy_throughput.py``); this file
is imported as a sibling module of the script, so no path manipulation is needed.
"""

from __future__ import annotations

import contextlib
import functools
import resource
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from fm_lightning.flow.paths import PathSample
from fm_lightning.schedules import fit_to_max_steps
from fm_lightning.train import CONFIG_DIR

__all__ = ["compose_train", "Clock", "TorchCFMRecipe", "TASKS", "FLOWS"]

#: experiment config name -> (source, target), as in configs/experiment/.
TASKS = {
    "n_to_8gaussians": ("gaussian", "8gaussians"),
    "moons_to_8gaussians": ("moons", "8gaussians"),
    "n_to_moons": ("gaussian", "moons"),
    "n_to_scurve": ("gaussian", "scurve"),
}
#: flow config name -> TorchCFM class name.
FLOWS = {"icfm": "ConditionalFlowMatcher", "otcfm": "ExactOptimalTransportConditionalFlowMatcher"}


def compose_train(overrides: list[str], output_dir: str) -> DictConfig:
    """Compose ``configs/train.yaml`` with ``overrides`` and a fixed ``paths.output_dir``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[*overrides, f"paths.output_dir={output_dir}"])


def _cpu_seconds() -> float:
    """CPU seconds of this process plus its finished children (data loader workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


@dataclass
class Clock:
    """Wall-clock and CPU seconds since construction. CPU time counts this process and its
    children once they have ended (loader workers end with each fit); it is robust to other
    processes on a shared machine as long as torch runs one thread."""

    wall0: float = 0.0
    cpu0: float = 0.0

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), _cpu_seconds()

    @property
    def wall(self) -> float:
        return time.perf_counter() - self.wall0

    @property
    def cpu(self) -> float:
        return _cpu_seconds() - self.cpu0


class TorchCFMRecipe:
    """TorchCFM's 2-D tutorial: ``MLP(dim, w=64, time_varying=True)`` (3x64 SELU), Adam(lr=1e-3),
    batch 256, sigma 0.1, with ``ConditionalFlowMatcher`` (I-CFM) or
    ``ExactOptimalTransportConditionalFlowMatcher`` (OT-CFM), fed by our samplers.

    Args:
        flow: ``icfm`` or ``otcfm``.
        source, target: our distributions (``sample(n, generator) -> (n, d)``).
        batch_size, sigma, lr, width: the tutorial's values by default.
    """

    def __init__(self, flow: str, source, target, batch_size: int = 256, sigma: float = 0.1, lr: float = 1e-3,
                 width: int = 64) -> None:
        import torchcfm.conditional_flow_matching as cfm
        from torchcfm.models.models import MLP

        self.source, self.target, self.batch_size = source, target, batch_size
        self.model = MLP(dim=source.dim, w=width, time_varying=True)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.fm = getattr(cfm, FLOWS[flow])(sigma=sigma)
        self.steps = 0

    def step(self) -> torch.Tensor:
        self.optimizer.zero_grad()
        x0, x1 = self.source.sample(self.batch_size), self.target.sample(self.batch_size)
        t, xt, ut = self.fm.sample_location_and_conditional_flow(x0, x1)
        vt = self.model(torch.cat([xt, t[:, None]], dim=-1))
        loss = torch.mean((vt - ut) ** 2)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        return loss.detach()

    def velocity(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The learned field in the project's ``v(x, t)`` contract (t of shape (B,))."""
        model = self.model.eval()
        return lambda x, t: model(torch.cat([x, t.reshape(-1, 1).to(x.dtype)], dim=-1))


def make_points_file(path: str, n: int = 20_000, seed: int = 0) -> str:
    """Write a user-style ``.npy`` points file: three anisotropic Gaussians and a spiral arm."""
    import numpy as np

    rng = np.random.default_rng(seed)
    k = n // 4
    parts = []
    for center, cov in [((-2.5, 2.0), [[1.0, 0.8], [0.8, 0.8]]),
                        ((2.5, 2.5), [[0.3, -0.25], [-0.25, 0.3]]),
                        ((0.0, -3.0), [[2.0, 0.0], [0.0, 0.05]])]:
        parts.append(rng.multivariate_normal(center, cov, size=k))
    s = np.sqrt(rng.uniform(0, 1, n - 3 * k)) * 3 * np.pi
    spiral = np.stack([s * np.cos(s), s * np.sin(s)], 1) / 3 + 0.1 * rng.standard_normal((n - 3 * k, 2))
    parts.append(spiral)
    pts = np.concatenate(parts).astype(np.float32)
    np.save(path, rng.permutation(pts))
    return path


@contextlib.contextmanager
def record_adaptive_steps() -> Iterator[list[tuple[float, float, float]]]:
    """Diagnostics: while active, torchdyn's adaptive solvers append ``(dt, error_ratio,
    worst_share)`` of every attempted step to the yielded list (``error_ratio <= 1``: accepted;
    ``worst_share``: the fraction of the step's squared scaled error that comes from its worst 1%
    of samples, so ~0.01 when the error is spread evenly)."""
    import torchdyn.numerics.odeint  # noqa: F401 (the package re-exports a function of that name)

    module = sys.modules["torchdyn.numerics.odeint"]
    adapt_step, hairer_norm, steps, shares = module.adapt_step, module.hairer_norm, [], []

    def recording_norm(error_scaled):
        per_sample = error_scaled.pow(2).flatten(1).sum(1)
        worst = per_sample.topk(max(1, per_sample.numel() // 100)).values.sum()
        shares.append(float(worst / per_sample.sum().clamp_min(1e-30)))
        return hairer_norm(error_scaled)

    def recording(dt, error_ratio, *args):
        steps.append((round(float(dt), 4), round(float(error_ratio), 3), round(shares[-1], 2)))
        return adapt_step(dt, error_ratio, *args)

    module.adapt_step, module.hairer_norm = recording, recording_norm
    try:
        yield steps
    finally:
        module.adapt_step, module.hairer_norm = adapt_step, hairer_norm


@torch.no_grad()
def evaluate(velocity, source, target, n: int = 2000, repeats: int = 3, seed: int = 0, atol: float = 1e-4,
             rtol: float = 1e-4) -> dict:
    """Sample quality from fixed seeds (common to every model), averaged over ``repeats`` draws:
    ``w2``: W2 of ``n`` generated vs ``n`` fresh target samples; ``floor``: W2 between two fresh
    target sets of ``n`` (the finite-sample floor); ``nfe``: dopri5 function evaluations
    (``dopri5_steps``: its attempted ``(dt, error_ratio, worst_share)`` per draw).
    (One 2000-vs-2000 W2 on 8gaussians moves by +-0.1 with the mode counts of the draw; the
    mean of three draws is steadier.) W2 is in the target's units: a points file's own
    (:meth:`~datamodules.toy.Points.to_data`), whatever the run's frame."""
    from datamodules.toy import in_data_units
    from fm_lightning.flow.solve import odeint
    from fm_lightning.metrics import wasserstein2

    to_data = functools.partial(in_data_units, target)
    w2, floor, nfe, steps = [], [], [], []
    for r in range(repeats):
        g = torch.Generator().manual_seed(10_000 + 100 * seed + r)
        x0 = source.sample(n, g)
        ref, ref2 = to_data(target.sample(n, g)), to_data(target.sample(n, g))
        with record_adaptive_steps() as attempted:
            sol = odeint(velocity, x0, "dopri5", atol=atol, rtol=rtol)
        w2.append(wasserstein2(to_data(sol.x), ref))
        floor.append(wasserstein2(ref2, ref))
        nfe.append(sol.nfe)
        steps.append(attempted)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"w2": mean(w2), "floor": mean(floor), "nfe": round(mean(nfe)), "w2_draws": w2, "nfe_draws": nfe,
            "dopri5_steps": steps}


def bare_train(cfg: DictConfig, seed_everything: bool = True, warmup: int = 0):
    """Train the composed net/objective/optimizer/schedule on the composed data stream for
    ``cfg.trainer.max_steps`` steps with a plain loop (what ``Trainer.fit`` does, minus
    Lightning). Returns ``(net, datamodule, wall_s, cpu_s)``, the :class:`Clock` from step
    ``warmup`` to the end, read while the loader's workers are alive (their CPU not counted)."""
    import hydra
    import lightning as L

    from fm_lightning.distributed import skip_nvml_check_without_nvml

    skip_nvml_check_without_nvml()  # as the Trainer's process does (fm_lightning.module)
    if seed_everything:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.data)
    net = hydra.utils.instantiate(cfg.model.net)
    flow = hydra.utils.instantiate(cfg.model.flow)
    optimizer = hydra.utils.instantiate(cfg.model.optimizer)(net.parameters())
    scheduler = hydra.utils.instantiate(cfg.model.lr_scheduler)(optimizer) if cfg.model.get("lr_scheduler") else None
    fit_to_max_steps(scheduler, cfg.trainer.max_steps)  # as the module does
    datamodule.objective = flow  # drawn in the loader's workers, as under the Trainer
    loader = datamodule.train_dataloader()
    total, done, clock = int(cfg.trainer.max_steps), 0, None
    while done < total:
        for batch in loader:
            if done == warmup:
                clock = Clock()
            loss = flow.regress(net, PathSample.from_dict(batch)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            done += 1
            if done == total:
                break
    return net.eval(), datamodule, clock.wall, clock.cpu
