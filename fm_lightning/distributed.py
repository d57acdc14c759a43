"""Distributed semantics: global batch arithmetic and per-rank randomness."""

from __future__ import annotations

import ctypes
import os
import random
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.environments import LightningEnvironment

__all__ = ["per_device_batch_size", "seed_rank", "check_devices", "check_num_nodes", "skip_nvml_check_without_nvml"]


def per_device_batch_size(global_batch_size: int, world_size: int = 1, accumulate_grad_batches: int = 1) -> int:
    """The per-device batch that makes ``global_batch_size`` per optimizer step.

    ``global = per_device * world_size * accumulate_grad_batches``; raises ``ValueError`` if
    that does not divide exactly.
    """
    if global_batch_size < 1 or world_size < 1 or accumulate_grad_batches < 1:
        raise ValueError(
            f"batch size, world size and gradient accumulation must be >= 1, got "
            f"{global_batch_size}, {world_size}, {accumulate_grad_batches}"
        )
    shards = world_size * accumulate_grad_batches
    if global_batch_size % shards:
        lower = global_batch_size - global_batch_size % shards
        raise ValueError(
            f"the global batch size {global_batch_size} does not divide across {world_size} device(s) x "
            f"{accumulate_grad_batches} accumulation step(s) = {shards}; set data.batch_size to a multiple "
            f"of {shards} (e.g. {lower or shards})"
        )
    return global_batch_size // shards


def seed_rank(rank: int) -> int:
    """Reseed torch, numpy and python RNGs with ``base_seed + rank`` and return that seed.

    The base seed is the one given to ``seed_everything`` (``PL_GLOBAL_SEED``), so every rank
    draws different noise, times and couplings, reproducibly for a given seed.
    """
    base = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed() % 2**31))
    seed = base + 1_000_003 * rank
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    return seed


def check_devices(accelerator: str | None, devices: int | str | list | None, precision: str | int | None) -> None:
    """Refuse device settings this machine cannot honour, with one message that says what to use.

    * a GPU preset (``accelerator`` gpu/cuda) without visible CUDA GPUs, or asking for more GPUs
      than are visible;
    * ``16-mixed`` / ``16-true`` precision on the CPU (Lightning would silently switch to bf16);
    * ``*-true`` precisions other than 32 (the sampler integrates in fp32 with the net's weights).
    """
    accelerator = str(accelerator or "auto").lower()
    wants_gpu = accelerator in ("gpu", "cuda")
    uses_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if wants_gpu:
        available = torch.cuda.device_count()
        if available == 0:
            raise ValueError(
                "this trainer preset needs CUDA GPUs but none is visible; use trainer=cpu, or trainer=ddp_cpu "
                "for two processes on the CPU"
            )
        wanted = len(devices) if isinstance(devices, (list, tuple)) else devices
        if isinstance(wanted, int) and wanted > available:
            raise ValueError(f"trainer.devices={wanted} but only {available} GPU(s) are visible; lower trainer.devices")
    if uses_cpu and str(precision) in ("16-mixed", "16", "16-true"):
        raise ValueError(
            f"precision={precision} (fp16) is not supported on the CPU; use trainer.precision=bf16-mixed or 32"
        )
    if str(precision) in ("bf16-true", "16-true", "64-true", "64"):
        raise ValueError(
            f"precision={precision} stores the weights in that type, but sampling and its metrics run in fp32; "
            "use trainer.precision=bf16-mixed (or 16-mixed on GPUs) for reduced-precision training"
        )


def check_num_nodes(num_nodes: int, cluster_environment: Any) -> None:
    """Refuse ``num_nodes > 1`` when Lightning found no cluster environment (SLURM, torchrun, ...)
    and no ``NODE_RANK`` was set by hand: the process would wait forever for the other nodes."""
    if num_nodes > 1 and isinstance(cluster_environment, LightningEnvironment) and "NODE_RANK" not in os.environ:
        raise ValueError(
            f"trainer.num_nodes={num_nodes} needs the processes on every node started by a cluster launcher, but none "
            f"was found (training would wait forever for the other nodes); launch fm-train with srun (SLURM) or "
            f"torchrun --nnodes={num_nodes} (or by hand with MASTER_ADDR, MASTER_PORT and NODE_RANK set on each node), "
            "or set trainer.num_nodes=1"
        )


def skip_nvml_check_without_nvml() -> None:
    """Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` so that CUDA availability checks go
    through NVML and do not initialise CUDA before a fork. Where the NVML library is missing (no
    NVIDIA driver), torch falls back to the CUDA runtime check anyway, but only after a failed
    ``dlopen`` that it repeats at every Adam/AdamW step (0.03-0.1 ms; a few percent of a small
    net's step). There the variable is set to ``0``: the same answers, without the ``dlopen``."""
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1":
        return
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
