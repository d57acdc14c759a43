"""Every ``fm-train`` command in the README composes against the real configs, and on 2-D data
builds its datamodule and model (so a wrong key or an impossible combination is caught here)."""

from __future__ import annotations

import re
import shlex

import numpy as np
import pytest
from hydra.utils import instantiate

from conftest import REPO, compose_config


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = " \n".join(blocks).replace("\\\n", " ").splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.strip().startswith("fm-train")]


def _overrides(command: str) -> list[str]:
    """The command's config overrides: no ``-m``, no ``hydra.`` keys, the first value of each sweep,
    ``<run>`` placeholders filled in."""
    args = [a for a in shlex.split(command.replace("<run>", "RUN"))[1:] if a != "-m" and not a.startswith("hydra.")]
    return [re.sub(r"=([^\[\],]+),.*$", r"=\1", a) for a in args]


COMMANDS = _readme_commands()


def test_the_readme_has_fm_train_commands():
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_composes_and_builds_on_toy_data(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "my_points.npy", np.random.default_rng(0).normal(size=(100, 5)).astype(np.float32))
    cfg = compose_config(_overrides(command), tmp_path / "run")
    if cfg.data._target_.endswith("ToyDataModule"):
        instantiate(cfg.data)
        instantiate(cfg.model)
