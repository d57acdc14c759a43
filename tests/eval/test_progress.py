"""Progress bars of the long evaluation loops: the shared helper, and the loops of fm-eval, reflow
and fm-sample that use it. Bars are drawn on a terminal console that writes into a StringIO."""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pytest
import rich
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from rich.console import Console
from rich.progress import Progress
from torch.utils.data import DataLoader, IterableDataset, Subset, TensorDataset

from eval_helpers import AffineGaussian, TinyExtractor, affine_model
from fm_lightning import evaluate, sample
from fm_lightning.progress import num_examples, track
from fm_lightning.reflow import generate_pairs


def _terminal(buf: io.StringIO) -> Console:
    return Console(file=buf, force_terminal=True, width=200, color_system=None)


@pytest.fixture
def terminal(monkeypatch):
    """rich's global console (the helper's default, as Lightning's) as a terminal writing into a StringIO."""
    buf = io.StringIO()
    monkeypatch.setattr(rich, "_console", _terminal(buf))
    return buf


def _slow(items):
    for item in items:
        time.sleep(0.01)  # so that the rate is measured
        yield item


def test_track_yields_every_item_once_and_shows_count_rate_and_total():
    buf = io.StringIO()
    batches = [torch.zeros(n) for n in (4, 4, 2)]
    seen = list(track(_slow(batches), "FID samples", 10, advance=len, unit="img", console=_terminal(buf)))
    assert [id(b) for b in seen] == [id(b) for b in batches]
    out = buf.getvalue()
    assert "FID samples" in out and "10/10" in out and re.search(r"\d img/s", out)
    assert "11/10" not in out and "4/10" in out and "8/10" in out

    buf = io.StringIO()
    assert list(track(range(7), "sized", console=_terminal(buf))) == list(range(7))  # total = len(range(7))
    assert "7/7" in buf.getvalue()


def test_track_prints_nothing_when_disabled_off_rank_zero_or_off_a_terminal(monkeypatch):
    def run(enabled=True, **console_kwargs):
        buf = io.StringIO()
        console = Console(file=buf, width=200, **{"force_terminal": True, **console_kwargs})
        assert list(track(iter(range(5)), "work", 5, enabled=enabled, console=console)) == list(range(5))
        return buf.getvalue()

    assert "work" in run()
    assert run(enabled=False) == ""
    assert run(force_terminal=False) == ""  # pipes, log files, pytest: not even rich's final frame
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert run() == ""


def test_track_nests_under_an_active_live_display():
    buf = io.StringIO()
    console = _terminal(buf)
    with Progress(console=console) as outer:
        outer.add_task("training", total=3)
        assert list(track(range(4), "nested", console=console)) == list(range(4))
        assert len(console._live_stack) == 1  # the nested bar is gone, the outer one still live
    assert "nested" in buf.getvalue() and "4/4" in buf.getvalue()


def test_track_shows_no_bar_where_rich_cannot_nest_live_displays():
    """rich < 14.1 holds one Live per console (``_live``) and raises LiveError on a second one."""
    buf = io.StringIO()
    console = _terminal(buf)
    del console._live_stack
    console._live = object()
    assert list(track(range(3), "work", console=console)) == [0, 1, 2]
    assert buf.getvalue() == ""


def test_num_examples_is_the_dataset_length_when_there_is_one():
    class Stream(IterableDataset):
        def __iter__(self):
            yield from range(3)

    assert num_examples(DataLoader(TensorDataset(torch.zeros(10, 2)), batch_size=4)) == 10
    assert num_examples(DataLoader(Stream(), batch_size=2)) is None and num_examples([1, 2]) is None


def test_fm_eval_image_bars_count_reference_images_samples_and_bits_per_dim(terminal):
    from datamodules.images import ImageDataModule

    dm = ImageDataModule("digits", batch_size=16, val_fraction=0.1)
    model = affine_model([0.2], [0.5], shape=[1, 8, 8], solver="euler", steps=2)
    kw = dict(num_samples=40, num_likelihood=20, batch_size=16, fid_feature=TinyExtractor(), num_reference=64)
    shown = evaluate.evaluate_images(model, dm, **kw)["metrics"]
    out = terminal.getvalue()
    for text in ("FID reference statistics", "64/64", "FID samples", "40/40", "bits/dim", "20/20"):
        assert text in out, text
    terminal.seek(0), terminal.truncate()
    hidden = evaluate.evaluate_images(model, dm, progress=False, **kw)["metrics"]
    assert terminal.getvalue() == "" and hidden == shown


def test_bits_per_dim_averages_exactly_num_likelihood_images():
    """20 held-out (validation) images in batches of 16: the second batch holds 4."""
    from datamodules.images import ImageDataModule
    from fm_lightning.flow.likelihood import dequantize

    dm = ImageDataModule("digits", batch_size=16, val_fraction=0.1)
    model = affine_model([0.2], [0.5], shape=[1, 8, 8])
    m = evaluate.evaluate_images(model, dm, metrics=["bpd"], num_likelihood=20, batch_size=16, progress=False)["metrics"]
    gen = torch.Generator().manual_seed(1)
    ys = [dequantize(b["x1"], gen) for b in DataLoader(Subset(dm.data_val, range(20)), batch_size=16)]
    assert [len(y) for y in ys] == [16, 4]
    logp = AffineGaussian([0.2] * 64, [0.5] * 64).log_prob(torch.cat(ys).flatten(1))
    expected = float(((-logp / 64 + np.log(128)) / np.log(2)).mean())
    assert abs(m["eval/bpd"] - expected) < 1e-3, (m["eval/bpd"], expected)


def test_nfe_sweep_bar_counts_the_settings(terminal):
    model = affine_model()
    out = evaluate.evaluate_points(model, AffineGaussian([1.5, -2.0], [0.5, 2.0]), metrics=["w2"], num_samples=64,
                                   sweep=True)
    assert len(out["sweep"]) == 24 and "NFE sweep" in terminal.getvalue() and "24/24" in terminal.getvalue()


def test_fm_eval_no_progress_flag_reaches_the_evaluation(monkeypatch):
    got = []

    def fake(*args, **kwargs):
        got.append(kwargs["progress"])
        raise ValueError("stop here")

    monkeypatch.setattr(evaluate, "evaluate_checkpoint", fake)
    assert evaluate.main(["run.ckpt"]) == 2 and evaluate.main(["run.ckpt", "--no-progress"]) == 2
    assert got == [True, False]


def test_reflow_pairs_bar_counts_pairs(terminal):
    x0, x1, _ = generate_pairs(affine_model(), 10, batch_size=4, solver="euler", steps=2)
    assert len(x0) == len(x1) == 10
    assert "reflow pairs" in terminal.getvalue() and "10/10" in terminal.getvalue()
    terminal.seek(0), terminal.truncate()
    generate_pairs(affine_model(), 10, batch_size=4, solver="euler", steps=2, progress=False)
    assert terminal.getvalue() == ""


def test_fm_sample_bar_counts_samples_and_no_progress_hides_it(terminal, monkeypatch, tmp_path):
    import fm_lightning.module

    monkeypatch.setattr(fm_lightning.module, "load_checkpoint", lambda *a, **k: affine_model(solver="euler", steps=2))
    monkeypatch.setattr(sample, "in_target_units", lambda ckpt, x: x)  # no checkpoint file to read the target from
    args = ["x.ckpt", "--num-samples", "10", "--batch-size", "4", "--out", str(tmp_path / "s.npz")]
    assert sample.main(args) == 0
    assert np.load(tmp_path / "s.npz")["samples"].shape == (10, 2)
    assert "samples" in terminal.getvalue() and "10/10" in terminal.getvalue()
    terminal.seek(0), terminal.truncate()
    assert sample.main([*args, "--no-progress", "--overwrite"]) == 0 and "10/10" not in terminal.getvalue()
