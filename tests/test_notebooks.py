"""The notebooks execute at small size, and their check cells pass; notebook 03 measures the
checkpoint it is given against that checkpoint's own target."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import torch
from hydra.utils import instantiate
from nbclient import NotebookClient

from conftest import REPO, compose_config
from datamodules.toy import make_distribution
from fm_lightning.flow.objective import CFMObjective
from fm_lightning.flow.paths import ICFMPath
from fm_lightning.module import FlowMatchingModule
from fm_lightning.nets import MLP
from fm_lightning.spec import to_spec

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_at_tiny_size(path: Path, tmp_path, monkeypatch):
    monkeypatch.setenv("FM_NOTEBOOK_SIZE", "tiny")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "OK" in printed  # the final check cell ran its assertions


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebooks_stay_light(path: Path):
    assert path.stat().st_size < 200_000, f"{path.name} carries large outputs; clear them before committing"


def _run_03_on(ckpt: Path, monkeypatch) -> dict:
    """Notebook 03's code up to its check cell, run in this process on ``ckpt``; returns its variables."""
    monkeypatch.setenv("FM_CKPT", str(ckpt))
    monkeypatch.setenv("FM_NOTEBOOK_SIZE", "tiny")
    cells = nbformat.read(REPO / "notebooks/03_from_checkpoint.ipynb", as_version=4).cells
    namespace: dict = {}
    for cell in cells[:next(i for i, c in enumerate(cells) if c.source.startswith("## Check"))]:
        if cell.cell_type == "code":
            exec(cell.source, namespace)  # noqa: S102 - the repository's own notebook
    namespace["plt"].close("all")
    return namespace


def test_notebook_03_measures_w2_to_the_target_the_checkpoint_records(tmp_path, monkeypatch):
    """A zero velocity field leaves its S-curve source in place, so W2 to the recorded S-curve
    target is the finite-sample floor (~0.4 at 500 points); to the moons it would be ~2."""
    model = FlowMatchingModule(MLP(2, 8, 1), CFMObjective(ICFMPath(0.0)), make_distribution("scurve"))
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "datamodule_hyper_parameters": {"target": to_spec(make_distribution("scurve"))}},
               tmp_path / "scurve.ckpt")
    rows = _run_03_on(tmp_path / "scurve.ckpt", monkeypatch)["rows"]
    assert max(w2 for *_, w2 in rows) < 1.0


def test_notebook_03_refuses_an_image_checkpoint(tmp_path, monkeypatch):
    model = instantiate(compose_config(["experiment=digits", "model.net.model_channels=16"]).model)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, tmp_path / "digits.ckpt")
    with pytest.raises(ValueError, match="holds an image model; this notebook needs a 2-D one"):
        _run_03_on(tmp_path / "digits.ckpt", monkeypatch)
