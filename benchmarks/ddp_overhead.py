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
    """Writes steps/s between step `start` and the end of training (rank zero)."""

    def __init__(self, start: int, out: str) -> None:
        self.start, self.out, self.t0 = start, out, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.start:
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero and self.t0 is not None:
            rate = (trainer.global_step - self.start) / (time.perf_counter() - self.t0)
            json.dump({"steps_per_s": rate, "world_size": trainer.world_size}, open(self.out, "w"))
'''


def measure(trainer: str, steps: int, work: Path) -> dict:
    out = work / f"{trainer}.json"
    cmd = ["fm-train", f"trainer={trainer}", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
           f"data.steps_per_epoch={steps}", "logger=none", "callbacks.samples.num_samples=256",
           "+callbacks.timer._target_=step_timer.StepTimer", f"+callbacks.timer.start={steps // 5}",
           f"+callbacks.timer.out={out}", f"hydra.run.dir={work / trainer}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, env=env, check=True, capture_output=True)
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
    print(f"| single process | 1 | 256 | {single['steps_per_s']:.1f} |")
    print(f"| ddp_cpu (gloo) | {ddp['world_size']} | 256 | {ddp['steps_per_s']:.1f} |")
    print(f"ratio ddp_cpu / single = {ddp['steps_per_s'] / single['steps_per_s']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
