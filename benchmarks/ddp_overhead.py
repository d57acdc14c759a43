"""ddp_overhead: steps/s of the default toy task under `trainer=ddp_cpu` (2 gloo processes)
against one process, at the same global batch. A sanity figure only: on a 2-core machine the
two ranks share the cores that one process would use.

    python benchmarks/ddp_overhead.py [--steps 600]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TIMER = '''
import json, os, time
import lightning as L

class StepTimer(L.Callback):
    """Writes steps/s from the start of step `start` to the end of the last training step (rank
    zero), leaving out the end-of-fit validation, sampling and checkpoint."""

    def __init__(self, start: int, out: str) -> None:
        self.start, self.out, self.t0, self.t1 = start, out, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.start:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.t1 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero and self.t0 is not None:
            rate = (trainer.global_step - self.start) / (self.t1 - self.t0)
            json.dump({"steps_per_s": rate, "world_size": trainer.world_size,
                       "global_batch": trainer.datamodule.batch_size}, open(self.out, "w"))
'''


def measure(trainer: str, steps: int, work: Path) -> dict:
    out = work / f"{trainer}.json"
    cmd = ["fm-train", f"trainer={trainer}", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
           f"data.steps_per_epoch={steps}", "logger=none", "callbacks.samples.num_samples=256",
           "+callbacks.timer._target_=step_timer.StepTimer", f"+callbacks.timer.start={steps // 5}",
           f"+callbacks.timer.out={out}", f"hydra.run.dir={work / trainer}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "step_timer.py").write_text(TIMER)
        single, ddp = measure("cpu", args.steps, work), measure("ddp_cpu", args.steps, work)
    print("| run | world size | global batch | steps/s |\n|---|---|---|---|")
    for name, result in (("single process", single), ("ddp_cpu (gloo)", ddp)):
        print(f"| {name} | {result['world_size']} | {result['global_batch']} | {result['steps_per_s']:.1f} |")
    print(f"ratio ddp_cpu / single = {ddp['steps_per_s'] / single['steps_per_s']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
