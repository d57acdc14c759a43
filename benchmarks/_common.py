"""Shared helpers of the toy benchmarks: config composition, the TorchCFM tutorial recipe, clocks.

Run the scripts from the repository root (``python benchmarks/toy_throughput.py``); this file
is imported as a sibling module of the script, so no path manipulation is needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

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


@dataclass
class Clock:
    """Wall-clock and process-CPU seconds since construction (CPU time is robust to other
    processes on a shared machine as long as torch runs one thread)."""

    wall0: float = 0.0
    cpu0: float = 0.0

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    @property
    def wall(self) -> float:
        return time.perf_counter() - self.wall0

    @property
    def cpu(self) -> float:
        return time.process_time() - self.cpu0


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
