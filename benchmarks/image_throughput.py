"""Training throughput (images/s) of the ``unet_cifar10`` preset: Lightning Trainer vs a bare loop.

Both paths train the *same objects* built from the real configs (``experiment=cifar10_otcfm``:
35.7M-parameter UNet, OT-CFM, Adam 2e-4 with warmup, grad-norm clip 1.0, EMA 0.9999) on the same
in-memory CIFAR-shaped batches (random pixels: the point is speed, and CIFAR-10 cannot be
downloaded here). Rounds alternate Trainer / bare loop so that load from other processes hits
both alike; each round times ``--steps`` optimizer steps after ``--warmup`` steps, and the
median round is reported. Goal: Trainer / bare >= 0.95.

With ``--torchcfm`` (and torchcfm installed) the same round also times TorchCFM's
``train_cifar10.py`` step (its UNet, exact-OT flow matcher, fp32) as a reference.

    python benchmarks/image_throughput.py --batch-size 8 --steps 5 --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn
from torch.utils.data import DataLoader

from fm_lightning.callbacks import EMA
from fm_lightning.train import CONFIG_DIR


def build(device: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        # the schedule keeps the recipe's length (its 5000-step warmup), not the timed run's
        overrides = ["experiment=cifar10_otcfm", "paths.output_dir=/tmp/bench", "model.lr_scheduler.total_steps=100000"]
        cfg = compose(config_name="train", overrides=overrides)
    model = hydra.utils.instantiate(cfg.model).to(device)
    return cfg, model


def batches(n: int, batch_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"x1": torch.rand(batch_size, 3, 32, 32, generator=gen) * 2 - 1} for _ in range(n)]


class _StepTimer(L.Callback):
    """Wall time from the start of batch ``warmup`` to the start of batch ``warmup + steps``."""

    def __init__(self, warmup: int, steps: int, device: str) -> None:
        self.warmup, self.steps, self.device, self.t0, self.elapsed = warmup, steps, device, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in (self.warmup, self.warmup + self.steps):
            if self.device == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            if trainer.global_step == self.warmup:
                self.t0 = now
            else:
                self.elapsed = now - self.t0
                trainer.should_stop = True


def run_trainer(model, data, precision: str, warmup: int, steps: int, device: str) -> float:
    timer = _StepTimer(warmup, steps, device)
    trainer = L.Trainer(
        accelerator=device, devices=1, precision=precision, max_steps=warmup + steps + 1, gradient_clip_val=1.0,
        callbacks=[EMA(decay=0.9999), timer], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(model, DataLoader(data, batch_size=None))
    return steps * data[0]["x1"].shape[0] / timer.elapsed


def run_bare(model, data, precision: str, warmup: int, steps: int, device: str) -> float:
    """The same module, objective, optimizer/schedule factories, clipping and EMA, by hand."""
    optimizer = model.optimizer_factory(model.parameters())
    scheduler = model.lr_scheduler_factory(optimizer)
    ema = AveragedModel(model, avg_fn=get_ema_avg_fn(0.9999), use_buffers=True)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    model.train()
    t0 = None
    for i, batch in enumerate(data[: warmup + steps]):
        if i == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        x1 = batch["x1"].to(device, non_blocking=True)
        with autocast:
            loss = model.flow(model, model._source_like(x1), x1).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        ema.update_parameters(model)
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * data[0]["x1"].shape[0] / (time.perf_counter() - t0)


def run_torchcfm(data, warmup: int, steps: int, device: str) -> float:
    """TorchCFM's train_cifar10.py step: its UNet, exact-OT CFM, Adam, clip 1.0, hand-written EMA."""
    from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher
    from torchcfm.models.unet.unet import UNetModelWrapper

    net = UNetModelWrapper(dim=(3, 32, 32), num_res_blocks=2, num_channels=128, channel_mult=[1, 2, 2, 2], num_heads=4,
                           num_head_channels=64, attention_resolutions="16", dropout=0.1).to(device)
    ema_net = copy.deepcopy(net)
    fm = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(step, 5000) / 5000)
    t0 = None
    for i, batch in enumerate(data[: warmup + steps]):
        if i == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        optimizer.zero_grad()
        x1 = batch["x1"].to(device)
        x0 = torch.randn_like(x1)
        t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
        loss = torch.mean((net(t, xt) - ut) ** 2)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            for p_ema, p in zip(ema_net.parameters(), net.parameters()):
                p_ema.mul_(0.9999).add_(p, alpha=1 - 0.9999)
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * data[0]["x1"].shape[0] / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", nargs="+", default=None, help="default: 32-true and bf16-mixed where supported")
    p.add_argument("--torchcfm", action="store_true", help="also time TorchCFM's step (fp32)")
    p.add_argument("--out", default="benchmarks/results/image_throughput.json")
    args = p.parse_args()

    if args.precision is None:
        bf16 = torch.cuda.is_bf16_supported() if args.device == "cuda" else torch.ops.mkldnn._is_mkldnn_bf16_supported()
        args.precision = ["32-true"] + (["bf16-mixed"] if bf16 else [])
    cfg, model = build(args.device)
    n_params = sum(p.numel() for p in model.net.parameters())
    print(f"unet_cifar10: {n_params:,} parameters; device {args.device}, torch threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}, {args.steps} timed steps x {args.rounds} rounds")
    data = batches(args.warmup + args.steps + 1, args.batch_size)
    initial = copy.deepcopy(model.state_dict())
    results = {"params": n_params, "batch_size": args.batch_size, "device": args.device, "rows": {}}
    for precision in args.precision:
        trainer_ips, bare_ips, ref_ips = [], [], []
        for _ in range(args.rounds):
            model.load_state_dict(initial)
            trainer_ips.append(run_trainer(model, data, precision, args.warmup, args.steps, args.device))
            model.load_state_dict(initial)
            bare_ips.append(run_bare(model, data, precision, args.warmup, args.steps, args.device))
            if args.torchcfm and precision == "32-true":
                ref_ips.append(run_torchcfm(data, args.warmup, args.steps, args.device))
        row = {"trainer": statistics.median(trainer_ips), "bare": statistics.median(bare_ips),
               "trainer_rounds": trainer_ips, "bare_rounds": bare_ips}
        row["ratio"] = row["trainer"] / row["bare"]
        line = (f"{precision:>10}: Trainer {row['trainer']:.2f} img/s, bare loop {row['bare']:.2f} img/s, "
                f"ratio {row['ratio']:.3f}")
        if ref_ips:
            row["torchcfm"] = statistics.median(ref_ips)
            line += f"; TorchCFM step {row['torchcfm']:.2f} img/s"
        print(line, flush=True)
        results["rows"][precision] = row
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
