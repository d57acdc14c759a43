"""Toy distributions: shapes, reproducibility, analytic geometry; points files; ToyDataModule."""

import inspect
import math
import re

import numpy as np
import pytest
import torch

from datamodules.toy import (
    DISTRIBUTIONS,
    Checkerboard,
    Circles,
    EightGaussians,
    Gaussian,
    Moons,
    Points,
    Rings,
    SCurve,
    SwissRoll,
    ToyDataModule,
    TwoSpirals,
    make_distribution,
)

NAMES = sorted(n for n in DISTRIBUTIONS if n != "points")
N = 4000


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", NAMES)
def test_samples_shape_dtype_and_reproducible(name):
    dist = make_distribution(name)
    x = dist.sample(N, _gen(1))
    assert x.shape == (N, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert dist.dim == 2
    assert torch.equal(x, dist.sample(N, _gen(1)))
    assert not torch.equal(x, dist.sample(N, _gen(2)))
    assert x.std(0).min() > 0.1  # not collapsed


def test_gaussian_dim_and_log_prob():
    dist = make_distribution("gaussian", dim=5)
    x = dist.sample(N, _gen())
    assert x.shape == (N, 5) and dist.is_standard_gaussian
    torch.testing.assert_close(x.mean(0), torch.zeros(5), rtol=0, atol=0.06)
    torch.testing.assert_close(x.std(0), torch.ones(5), rtol=0, atol=0.05)
    for std in (1.0, 2.5):
        g = Gaussian(dim=5, std=std)
        y = g.sample(16, _gen(3))
        ref = torch.distributions.Normal(0.0, std).log_prob(y).sum(1)
        torch.testing.assert_close(g.log_prob(y), ref, rtol=1e-5, atol=1e-5)
    assert not Gaussian(dim=2, std=2.0).is_standard_gaussian


def test_gaussian_image_shape():
    x = Gaussian(dim=[1, 3, 3]).sample(7, _gen())
    assert x.shape == (7, 1, 3, 3)


def test_eight_gaussians_geometry():
    radius = 5.0
    x = EightGaussians(radius=radius, std=0.0).sample(N, _gen()).double()
    norms = x.norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, radius), rtol=0, atol=1e-5)
    assert norms.mean().item() == pytest.approx(radius, abs=1e-5)
    # Centres at angles k * pi/4; all eight are used about equally.
    k = torch.atan2(x[:, 1], x[:, 0]) / (math.pi / 4)
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-5)
    counts = torch.bincount(k.round().long() % 8, minlength=8)
    assert counts.min() > N / 8 * 0.8
    # With std > 0: each point lies within a few std of its nearest centre; spread per axis = std.
    y = EightGaussians(radius=radius, std=0.5).sample(N, _gen()).double()
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    centres = radius * torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    resid = y - centres[torch.cdist(y, centres).argmin(1)]
    torch.testing.assert_close(resid.std(0), torch.full((2,), 0.5, dtype=torch.float64), rtol=0.05, atol=0)


def test_moons_geometry():
    """Noise-free moons: unit half circles centred at (0, 0) (upper) and (1, 0.5) (lower)."""
    scale, shift = 3.0, -1.0
    x = Moons(noise=0.0, scale=scale, shift=shift).sample(N, _gen()).double()
    p = (x - shift) / scale
    d_upper = (p - torch.tensor([0.0, 0.0], dtype=torch.float64)).norm(dim=1)
    d_lower = (p - torch.tensor([1.0, 0.5], dtype=torch.float64)).norm(dim=1)
    upper = (d_upper - 1).abs() < 1e-5
    lower = (d_lower - 1).abs() < 1e-5
    assert (upper | lower).all()
    assert (p[upper, 1] >= -1e-6).all() and (p[lower, 1] <= 0.5 + 1e-6).all()
    assert 0.45 < upper.double().mean().item() < 0.55
    # Agrees with scikit-learn's make_moons curves.
    from sklearn.datasets import make_moons

    ref, _ = make_moons(200, noise=0.0)
    ref = torch.as_tensor(ref)
    assert torch.cdist(ref, p).min(1).values.max() < 0.05


def test_circles_and_rings_radii():
    x = Circles(noise=0.0, factor=0.5, scale=3.0).sample(N, _gen()).double().norm(dim=1)
    assert torch.minimum((x - 3.0).abs(), (x - 1.5).abs()).max() < 1e-5
    r = Rings(noise=0.0, scale=4.0).sample(N, _gen()).double().norm(dim=1)
    assert (r - r.round()).abs().max() < 1e-5
    assert set(r.round().long().tolist()) == {1, 2, 3, 4}


def test_checkerboard_dark_squares():
    scale = 2.0
    x = Checkerboard(scale=scale).sample(N, _gen()) / scale
    assert (x >= -2).all() and (x < 2).all()
    cells = torch.floor(x).long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    assert len({tuple(c) for c in cells.tolist()}) == 8  # all eight dark squares used


def test_swissroll_and_scurve_and_spirals_geometry():
    scale = 4.0
    x = SwissRoll(noise=0.0, scale=scale).sample(N, _gen()).double()
    t = x.norm(dim=1) * (4.5 * math.pi / scale)  # |t (cos t, sin t)| = t before normalising
    assert (t > 1.5 * math.pi - 1e-4).all() and (t < 4.5 * math.pi + 1e-4).all()
    resid = torch.atan2(x[:, 1], x[:, 0]) - t
    wrapped = torch.remainder(resid + math.pi, 2 * math.pi) - math.pi
    assert wrapped.abs().max() < 1e-4
    s = 2.0
    y = SCurve(noise=0.0, scale=s).sample(N, _gen()).double() / s
    d = torch.minimum(
        (y - torch.tensor([0.0, -1.0], dtype=torch.float64)).norm(dim=1),
        (y - torch.tensor([0.0, 1.0], dtype=torch.float64)).norm(dim=1),
    )
    assert (d - 1).abs().max() < 1e-5
    z = TwoSpirals(noise=0.0, scale=1.0).sample(N, _gen()).double()
    r = 3 * z.norm(dim=1)  # |(-cos r, sin r) r| = r, in [0, 3 pi]
    assert r.max() <= 3 * math.pi + 1e-4
    # Each point is on one of the two arms: angle of (-x, y)*sign equals r (mod 2 pi).
    ang = torch.atan2(z[:, 1], -z[:, 0])
    on_arm = torch.minimum(
        (torch.remainder(ang - r + math.pi, 2 * math.pi) - math.pi).abs(),
        (torch.remainder(ang + math.pi - r + math.pi, 2 * math.pi) - math.pi).abs(),
    )
    assert on_arm[r > 0.1].max() < 1e-3


# ---- points files -------------------------------------------------------------------------

PTS = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.5], [-1.0, 0.25]])


def _check_points(dist):
    assert isinstance(dist, Points) and dist.dim == 2
    torch.testing.assert_close(dist.data, torch.as_tensor(PTS, dtype=torch.float32))
    x = dist.sample(200, _gen())
    assert x.shape == (200, 2) and x.dtype == torch.float32
    rows = {tuple(r) for r in PTS.astype(np.float32).tolist()}
    assert {tuple(r) for r in x.tolist()} == rows  # draws only given rows, all of them at n=200
    assert torch.equal(x, dist.sample(200, _gen()))


def test_points_npy(tmp_path):
    f = tmp_path / "pts.npy"
    np.save(f, PTS)
    _check_points(make_distribution(str(f)))
    _check_points(make_distribution("points", file=str(f)))


@pytest.mark.parametrize("key", ["points", "samples", "whatever"])
def test_points_npz(tmp_path, key):
    f = tmp_path / "pts.npz"
    np.savez(f, **{key: PTS})
    _check_points(make_distribution(str(f)))


def test_points_npz_prefers_points_key_and_rejects_ambiguous(tmp_path):
    f = tmp_path / "two.npz"
    np.savez(f, points=PTS, other=np.zeros((3, 2)))
    _check_points(Points(str(f)))
    g = tmp_path / "ambiguous.npz"
    np.savez(g, a=PTS, b=PTS)
    with pytest.raises(ValueError, match="name the points array 'points'"):
        Points(str(g))


@pytest.mark.parametrize("header", [False, True])
def test_points_csv(tmp_path, header):
    f = tmp_path / "pts.csv"
    body = "\n".join(",".join(str(v) for v in row) for row in PTS)
    f.write_text(("x,y\n" if header else "") + body + "\n")
    _check_points(make_distribution(str(f)))


@pytest.mark.parametrize("preamble", ["\ufeff", "\ufeffx,y\n", "# exported 2026-11-30\n\nx,y  # metres\n"],
                         ids=["bom", "bom-header", "comments-then-header"])
def test_points_csv_preamble_keeps_every_row(tmp_path, preamble):
    """A byte-order mark or comment lines before the header must not cost a data row."""
    f = tmp_path / "pts.csv"
    body = "\n".join(",".join(str(v) for v in row) for row in PTS)
    f.write_text(preamble + body + "\n", encoding="utf-8")
    np.testing.assert_array_equal(Points(str(f)).data.numpy(), PTS.astype(np.float32))


@pytest.mark.parametrize("text, match", [("x,y\n", r"shape \(N, d\)"), ("", r"shape \(N, d\)"),
                                         ("1;2\n3;4\n", "separated by commas")], ids=["header-only", "empty", "semicolons"])
def test_points_csv_without_points(tmp_path, text, match):
    f = tmp_path / "pts.csv"
    f.write_text(text)
    with pytest.raises(ValueError, match=match):
        Points(str(f))


def test_points_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Points(str(tmp_path / "nope.npy"))


@pytest.mark.parametrize("arr", [np.arange(5.0), np.zeros((4, 2, 3)), np.zeros((1, 2))], ids=["1d", "3d", "one-row"])
def test_points_wrong_shape(tmp_path, arr):
    f = tmp_path / "bad.npy"
    np.save(f, arr)
    with pytest.raises(ValueError, match=r"shape \(N, d\)"):
        Points(str(f))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_points_non_finite(tmp_path, bad):
    arr = PTS.copy()
    arr[2, 1] = bad
    f = tmp_path / "bad.npy"
    np.save(f, arr)
    with pytest.raises(ValueError, match="non-finite"):
        Points(str(f))
    g = tmp_path / "bad.csv"
    g.write_text("1,2\n3,nan\n")
    with pytest.raises(ValueError, match="non-finite"):
        Points(str(g))


def test_points_beyond_float32_or_complex_are_refused(tmp_path):
    big = tmp_path / "big.npy"
    np.save(big, np.array([[1.0, 2.0], [1e39, 0.0]]))  # finite in float64, inf in float32
    with pytest.raises(ValueError, match="non-finite values .*beyond float32 range"):
        Points(str(big))
    cplx = tmp_path / "cplx.npy"
    np.save(cplx, PTS + 1j)
    with pytest.raises(ValueError, match="complex128 values; points must be real numbers"):
        Points(str(cplx))


def test_points_csv_first_row_with_a_typo_is_data_not_a_header(tmp_path):
    f = tmp_path / "pts.csv"
    f.write_text("1.0,2.0x\n3,4\n5,6\n")
    with pytest.raises(ValueError, match="2.0x"):
        Points(str(f))


def test_points_unknown_extension_and_garbage(tmp_path):
    f = tmp_path / "pts.txt"
    f.write_text("1,2\n3,4\n")
    with pytest.raises(ValueError, match=r"must end in \.npy, \.npz or \.csv"):
        Points(str(f))
    g = tmp_path / "garbage.npy"
    g.write_bytes(b"\0\1 not an npy file")
    with pytest.raises(ValueError, match="not a valid .npy file: it holds binary data that is not numpy's"):
        Points(str(g))


def _lines(rows, sep=","):
    return "\n".join(sep.join(map(str, row)) for row in rows) + "\n"


# pandas' DataFrame(PTS, columns=["x", "y"]).to_csv(f) writes its row index as a first column (index=True);
# read back and written again it is "Unnamed: 0"; after reset_index() it is "index".
@pytest.mark.parametrize("header, sep", [(",x,y", ","), (",0,1", ","), ("Unnamed: 0,x,y", ","), ("index,x,y", ","),
                                         ("x\ty", "\t")], ids=["named", "unnamed", "reread", "reset_index", "tabs"])
def test_points_csv_with_pandas_row_index_is_refused_in_one_line(tmp_path, header, sep):
    f = tmp_path / "pts.csv"
    for index in (range(4), [7, 2, 5, 0]):  # as written, or after shuffling or filtering the frame
        f.write_text(header + "\n" + _lines([[i, *row] for i, row in zip(index, PTS)], sep))
        with pytest.raises(ValueError, match=r"its first column is pandas' row index, not a coordinate \(header on "
                                             r"line 1: .*\); write the file with DataFrame.to_csv\(\.\.\., "
                                             r"index=False\), or drop that column") as err:
            Points(str(f))
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("first", [",1.5,2", "index,1.5,2"])
def test_points_csv_first_row_with_an_empty_or_named_first_field_is_data(tmp_path, first):
    """Numbers after it: a point missing its first coordinate, not a header."""
    f = tmp_path / "pts.csv"
    f.write_text(first + "\n" + _lines(np.c_[PTS, PTS[:, :1]]))
    with pytest.raises(ValueError, match=r"line 1, field 1: '(|index)' is not a number"):
        Points(str(f))


@pytest.mark.parametrize("sep", [" ", "\t", "  "], ids=["spaces", "tabs", "aligned"])
@pytest.mark.parametrize("header", ["", "x{sep}y\n"], ids=["no-header", "header"])
def test_points_separated_by_spaces_or_tabs_keep_their_first_row(tmp_path, sep, header):
    """numpy.savetxt's default: spaces. A first row that is a point is data, not a "header"."""
    f = tmp_path / "pts.csv"
    f.write_text("# written by numpy.savetxt\n" + header.format(sep=sep) + _lines(PTS, sep))
    _check_points(Points(str(f)))


def test_points_csv_header_of_names_is_skipped_whatever_its_width(tmp_path):
    f = tmp_path / "pts.csv"
    f.write_text("points\n" + _lines(PTS))
    _check_points(Points(str(f)))


@pytest.mark.parametrize("text, message", [
    ("# exported\n\nx,y\n1,2\n3,4x\n", "line 5, field 2: '4x' is not a number"),
    ("# exported\n1,2\n\n3\n5,6\n", "the number of columns changed from 2 (line 2) to 1 at line 4 of the file"),
    ("x;y\n1,5;2,25\n3;4\n", "line 1 separates fields by semicolons (a spreadsheet's export with decimal commas?)"),
    ("1 2\n# note\n3 4\n5 six\n", "line 4, field 2: 'six' is not a number"),
], ids=["typo-after-comments-and-header", "short-row-after-blank", "semicolons", "spaces"])
def test_points_csv_errors_name_the_line_of_the_file(tmp_path, text, message):
    """Line numbers count every line, as an editor does: comments, blank lines and the header too."""
    f = tmp_path / "pts.csv"
    f.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        Points(str(f))


def test_points_csv_header_of_column_numbers_is_a_header(tmp_path):
    """pandas' DataFrame(PTS).to_csv(index=False) names the columns 0, 1, ..., d-1."""
    f = tmp_path / "pts.csv"
    f.write_text("0,1\n" + _lines(PTS))
    _check_points(Points(str(f)))
    f.write_text("0,1,2\n" + _lines(np.c_[PTS, PTS[:, :1]]))
    assert Points(str(f)).data.shape == (4, 3)
    f.write_text("0\n5\n7\n")  # one column: 0 is a point
    assert Points(str(f)).data[:, 0].tolist() == [0, 5, 7]
    f.write_text("0,2\n" + _lines(PTS))  # not 0..d-1: a point
    assert Points(str(f)).data.shape == (5, 2)


def test_points_record_a_fingerprint_of_their_contents(tmp_path):
    """The same points give the same fingerprint in any file; a checkpoint's recorded
    fingerprint refuses a file that holds other points now; a fresh Points takes any."""
    from fm_lightning.spec import from_spec, to_spec

    npy, csv = tmp_path / "pts.npy", tmp_path / "pts.csv"
    np.save(npy, PTS)
    csv.write_text("x,y\n" + _lines(PTS))
    points = Points(str(npy))
    assert points.fingerprint == Points(str(csv)).fingerprint
    assert re.fullmatch(r"4x2:[0-9a-f]{16}", points.fingerprint)
    spec = to_spec(points)
    assert spec["init_args"] == {"file": str(npy), "fingerprint": points.fingerprint, "loc": None, "scale": None}
    _check_points(from_spec(spec))
    np.save(npy, PTS + 10)
    with pytest.raises(ValueError, match=re.escape(
            f"points file {str(npy)!r} changed since training (fingerprint {points.fingerprint}, now "
            f"{Points(str(npy)).fingerprint}); restore it, or pass the file the run used: --source-file")) as err:
        from_spec(spec)
    assert "\n" not in str(err.value)
    assert Points(str(npy)).fingerprint != points.fingerprint  # a fresh one reads what is there
    del spec["init_args"]["fingerprint"]  # a checkpoint written before fingerprints: as before
    assert torch.equal(from_spec(spec).data, torch.as_tensor(PTS + 10, dtype=torch.float32))


def test_points_paths_expand_home_and_resolve_from_the_launch_directory(tmp_path, monkeypatch):
    """``~`` is expanded (``--source-file=~/pts.npy`` reaches Python unexpanded); a relative path is
    taken from the launch directory, also when Hydra has changed into the run directory."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    np.save(tmp_path / "pts.npy", PTS)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Points("~/pts.npy").file == str(tmp_path / "pts.npy")
    run_dir = tmp_path / "outputs/run"
    run_dir.mkdir(parents=True)
    monkeypatch.chdir(run_dir)  # hydra.job.chdir=true: fm-train runs in the run directory
    monkeypatch.setattr(HydraConfig.instance(), "cfg", OmegaConf.create({"hydra": {"runtime": {"cwd": str(tmp_path)}}}))
    _check_points(make_distribution("pts.npy"))
    assert Points("pts.npy").file == str(tmp_path / "pts.npy")


def _write(path, kind):
    """``path`` holding PTS as ``kind`` (``.npy``, ``.npz``, ``.csv`` contents, or nothing), whatever its name."""
    with open(path, "wb") as f:  # np.save/np.savez would append their own extension to the name
        if kind == ".npy":
            np.save(f, PTS)
        elif kind == ".npz":
            np.savez(f, points=PTS)
        elif kind == ".csv":
            f.write("\n".join(",".join(map(str, row)) for row in PTS).encode())
    return str(path)


@pytest.mark.parametrize(("name", "kind", "message"), [
    ("pts.npz", ".npy", "is not a valid .npz file: it holds a single .npy array; rename it to end in .npy"),
    ("pts.npy", ".npz", "is not a valid .npy file: it holds an .npz archive; rename it to end in .npz"),
    ("pts.npy", ".csv", "is not a valid .npy file: it holds text; rename it to end in .csv"),
    ("pts.csv", ".npz", "is not a valid .csv file: it holds an .npz archive; rename it to end in .npz"),
    ("pts.npy", None, "is not a valid .npy file: it holds nothing (it is empty); give a .npy (numpy.save)"),
], ids=["npy-as-npz", "npz-as-npy", "csv-as-npy", "npz-as-csv", "empty-npy"])
def test_a_points_file_whose_contents_are_another_format_gets_one_line_saying_so(tmp_path, name, kind, message):
    """numpy picks the format from the contents; the name must not decide how they are read."""
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        make_distribution(_write(tmp_path / name, kind))
    assert "\n" not in str(err.value)
    assert torch.equal(Points(_write(tmp_path / f"right{kind or '.npy'}", kind or ".npy")).data,
                       torch.as_tensor(PTS, dtype=torch.float32))


@pytest.mark.parametrize(("spec", "message"), [
    ({"radius": 3}, "distribution {'radius': 3} has no name; add name: one of ['2spirals', '8gaussians', "),
    ({"name": "pinwheel", "num_arms": 0}, "distribution 'pinwheel': num_arms must be a whole number >= 1, got 0"),
    ({"name": "circles", "factor": 2}, "distribution 'circles': factor must be in (0, 1), got 2.0"),
    ({"name": "gaussian", "dim": -1}, "distribution 'gaussian': dim must be a whole number >= 1"),
    ({"name": "gaussian", "dim": [1, 0, 8]}, "distribution 'gaussian': dim must be a whole number >= 1"),
    ({"name": "gaussian", "std": 0}, "distribution 'gaussian': std must be > 0 and finite, got 0.0"),
    ({"name": "8gaussians", "std": -0.5}, "distribution '8gaussians': std must be >= 0 and finite, got -0.5"),
])
def test_distribution_arguments_out_of_range_are_refused_by_name(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_distribution(spec, dim=2)


def test_every_distribution_argument_has_its_range_checked():
    """NaN is outside every documented range: each constructor argument refuses it by name."""
    for name, cls in DISTRIBUTIONS.items():
        for param in inspect.signature(cls).parameters:
            # (a points file's loc and scale: test_a_bad_frame_is_refused_in_one_line)
            if (name, param) not in (("points", "file"), ("points", "fingerprint"), ("points", "loc"),
                                     ("points", "scale"), ("gaussian", "dim")):
                with pytest.raises(ValueError, match=f"distribution '{name}': {param} must be .*, got nan"):
                    make_distribution({"name": name, param: float("nan")})
    with pytest.raises(ValueError, match="distribution 'gaussian': dim must be"):
        ToyDataModule("gaussian", "gaussian", dim=-1)
    assert make_distribution({"name": "gaussian", "dim": 3}, dim=2).dim == 3  # the spec's own dim wins


def test_make_distribution_unknown_lists_choices():
    with pytest.raises(ValueError) as err:
        make_distribution("banana")
    msg = str(err.value)
    assert "banana" in msg
    for name in DISTRIBUTIONS:
        assert repr(name) in msg


def test_make_distribution_from_dict_and_instance():
    d = make_distribution({"name": "gaussian", "std": 2.0}, dim=3)
    assert isinstance(d, Gaussian) and d.std == 2.0 and d.dim == 3
    inst = Moons()
    assert make_distribution(inst) is inst
    with pytest.raises(ValueError, match=r"'moons' has no parameter 'radius'; its parameters: noise \(default 0.2\)"):
        make_distribution("moons", radius=3)
    with pytest.raises(ValueError, match="'circles': factor must be a number, got 'abc'"):
        make_distribution({"name": "circles", "factor": "abc"})


# ---- ToyDataModule -------------------------------------------------------------------------


def test_datamodule_mismatched_dims_raise(tmp_path):
    with pytest.raises(ValueError, match="must match"):
        ToyDataModule(source="gaussian", target="moons", dim=3)
    f = tmp_path / "three.npy"
    np.save(f, np.random.default_rng(0).normal(size=(10, 3)))
    with pytest.raises(ValueError, match="must match"):
        ToyDataModule(source="gaussian", target=str(f), dim=2)
    dm = ToyDataModule(source="gaussian", target=str(f), dim=3, batch_size=4, steps_per_epoch=2, val_size=8)
    assert dm.dim == 3


def _batches(dm):
    return list(dm.train_dataloader())


def test_train_stream_shapes_reproducible_and_rank_dependent():
    kw = dict(source="gaussian", target="8gaussians", batch_size=32, steps_per_epoch=3, val_size=50, seed=7)
    a = _batches(ToyDataModule(**kw))
    b = _batches(ToyDataModule(**kw))
    assert len(a) == 3
    for batch in a:
        assert set(batch) == {"x0", "x1"}
        assert batch["x0"].shape == batch["x1"].shape == (32, 2)
    for u, v in zip(a, b):
        assert torch.equal(u["x0"], v["x0"]) and torch.equal(u["x1"], v["x1"])
    assert not torch.equal(a[0]["x0"], a[1]["x0"])  # batches within an epoch differ
    other_seed = _batches(ToyDataModule(**{**kw, "seed": 8}))
    assert not torch.equal(a[0]["x0"], other_seed[0]["x0"])
    dm = ToyDataModule(**kw)
    dm._train.rank = 1
    r1 = _batches(dm)
    for u, v in zip(a, r1):
        assert not torch.equal(u["x0"], v["x0"]) and not torch.equal(u["x1"], v["x1"])
    # The next epoch draws new batches.
    dm0 = ToyDataModule(**kw)
    e0, e1 = _batches(dm0), _batches(dm0)
    assert not torch.equal(e0[0]["x0"], e1[0]["x0"])


def test_val_loader_covers_fixed_set():
    dm = ToyDataModule(source="gaussian", target="moons", batch_size=32, steps_per_epoch=1, val_size=70, seed=1)
    batches = list(dm.val_dataloader())
    assert [b["x0"].shape[0] for b in batches] == [32, 32, 6]
    again = list(ToyDataModule(source="gaussian", target="moons", batch_size=32, steps_per_epoch=1, val_size=70,
                               seed=1).val_dataloader())
    assert torch.equal(torch.cat([b["x1"] for b in batches]), torch.cat([b["x1"] for b in again]))


@pytest.mark.parametrize("kw", [{"batch_size": 0}, {"steps_per_epoch": 0}, {"val_size": 0}])
def test_datamodule_bad_sizes_raise(kw):
    with pytest.raises(ValueError, match=">= 1"):
        ToyDataModule(**kw)


@pytest.mark.parametrize("workers, chunk", [(1, 16), (2, 16), (2, 2), (3, 1)])
def test_loader_workers_give_the_same_stream_in_order(workers, chunk):
    """Any number of workers and any chunk size give the serial stream's batches, in order."""
    kw = dict(source="gaussian", target="moons", batch_size=16, steps_per_epoch=5, val_size=8, seed=3)
    serial = ToyDataModule(**kw, num_workers=0)
    parallel = ToyDataModule(**kw, num_workers=workers)
    parallel._train.chunk = chunk
    for _epoch in range(2):  # each new iterator moves both streams to the next epoch
        a, b = _batches(serial), _batches(parallel)
        assert len(a) == len(b) == 5
        for u, v in zip(a, b):
            assert isinstance(v["x0"], torch.Tensor) and v["x0"].dtype == torch.float32
            assert torch.equal(u["x0"], v["x0"]) and torch.equal(u["x1"], v["x1"])
    # Resuming mid-epoch restarts at the exact batch, with or without workers.
    resumed = ToyDataModule(**kw, num_workers=workers)
    resumed._train.epoch, resumed._train.start, resumed._train.chunk = 1, 3, chunk
    rest = _batches(resumed)
    assert len(rest) == 2 and torch.equal(rest[0]["x1"], b[3]["x1"]) and torch.equal(rest[1]["x0"], b[4]["x0"])


def test_loader_draws_the_regression_problem_with_the_objective():
    from fm_lightning.flow.couplings import ExactOTCoupling, squared_cost
    from fm_lightning.flow.objective import CFMObjective
    from fm_lightning.flow.paths import ICFMPath

    kw = dict(source="gaussian", target="8gaussians", batch_size=32, steps_per_epoch=3, val_size=8, seed=0)
    raw = _batches(ToyDataModule(**kw, num_workers=0))
    dm = ToyDataModule(**kw, num_workers=1)
    dm.objective = CFMObjective(ICFMPath(sigma=0.1), ExactOTCoupling())
    drawn = _batches(dm)
    for r, d in zip(raw, drawn):
        assert set(r) == {"x0", "x1"} and set(d) == {"t", "x0", "x1", "xt", "ut"}
        # The same points, re-paired by the optimal assignment.
        assert torch.equal(d["x0"].sort(0).values, r["x0"].sort(0).values)
        assert torch.equal(d["x1"].sort(0).values, r["x1"].sort(0).values)
        x0, x1, _ = ExactOTCoupling()(r["x0"], r["x1"])
        assert torch.allclose(squared_cost(d["x0"], d["x1"]).diagonal().sum(), squared_cost(x0, x1).diagonal().sum())
        # The I-CFM path: u_t = x1 - x0 and x_t within a few sigma of the straight line.
        assert torch.allclose(d["ut"], d["x1"] - d["x0"])
        t = d["t"][:, None]
        resid = d["xt"] - (t * d["x1"] + (1 - t) * d["x0"])
        assert 0.07 < resid.std() < 0.13 and ((0 <= d["t"]) & (d["t"] <= 1)).all()


def test_trainer_draws_in_the_loader_with_the_models_objective(tmp_path):
    import lightning as L

    from fm_lightning.flow.couplings import ExactOTCoupling
    from fm_lightning.flow.objective import CFMObjective
    from fm_lightning.flow.paths import ICFMPath
    from fm_lightning.module import FlowMatchingModule
    from fm_lightning.nets import MLP

    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(sorted(batch))

    for global_batch in (False, True):
        seen.clear()
        dm = ToyDataModule(source="gaussian", target="moons", batch_size=16, steps_per_epoch=3, val_size=8)
        flow = CFMObjective(ICFMPath(0.0), ExactOTCoupling(global_batch=global_batch))
        model = FlowMatchingModule(MLP(2, 16, 1), flow, source="gaussian")
        trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[Spy()])
        trainer.fit(model, datamodule=dm)
        # In one process a global-batch coupling sees the whole batch too, so the loader draws.
        assert seen == [["t", "ut", "x0", "x1", "xt"]] * 3
        assert dm._loader_objective() is flow


def test_points_in_a_standard_frame_have_zero_mean_unit_std_and_map_back_to_the_file(tmp_path):
    """standardized(): (x - mean) / std per dimension of the file (a constant dimension keeps std
    1); to_data inverts it; the frame is recorded, so the rebuilt points are drawn in it."""
    from fm_lightning.spec import from_spec, to_spec

    rng = np.random.default_rng(0)
    raw = np.stack([1000 + 300 * rng.normal(size=500), 1e-3 * rng.normal(size=500), np.full(500, 7.0)], 1)
    np.save(tmp_path / "pts.npy", raw.astype(np.float32))
    points = Points(str(tmp_path / "pts.npy")).standardized()
    data = torch.as_tensor(raw.astype(np.float32)).double()
    assert points.loc == pytest.approx(data.mean(0).tolist())
    assert points.scale == pytest.approx([*data.std(0, unbiased=False)[:2].tolist(), 1.0])
    drawn = points.sample(100_000, _gen())
    assert drawn.dtype == torch.float32
    assert drawn.mean(0)[:2].abs().max() < 0.02 and (drawn.std(0)[:2] - 1).abs().max() < 0.02
    assert torch.equal(drawn[:, 2], torch.zeros(100_000))
    x = points.sample(50, _gen(2))  # the rows drawn are those of torch.randint with the same generator
    assert torch.allclose(points.to_data(x).double(), data[torch.randint(0, 500, (50,), generator=_gen(2))],
                          rtol=1e-6, atol=1e-6)
    rebuilt = from_spec(to_spec(points))
    assert rebuilt.loc == points.loc and torch.equal(rebuilt.sample(10, _gen(1)), points.sample(10, _gen(1)))
    assert Points(str(tmp_path / "pts.npy")).to_data(x) is x  # no frame: the file's numbers


@pytest.mark.parametrize("loc, scale, message", [
    ([0.0], [1.0, 1.0], r"2-dimensional but loc/scale have 1/2 entries"),
    ([0.0, 0.0], [1.0, 0.0], r"scale > 0 and finite"),
    ([0.0, float("nan")], [1.0, 1.0], r"loc must be finite"),
    ([0.0, 0.0], None, r"loc and scale must be lists of 2 numbers"),
])
def test_a_bad_frame_is_refused_in_one_line(tmp_path, loc, scale, message):
    np.save(tmp_path / "pts.npy", PTS)
    with pytest.raises(ValueError, match=message) as err:
        Points(str(tmp_path / "pts.npy"), loc=loc, scale=scale)
    assert "\n" not in str(err.value)


def test_the_datamodule_puts_points_files_in_the_runs_standard_frame(tmp_path):
    """Of two files, both take the target file's zero-mean, unit-std frame (their relative place
    is kept); a file facing a named distribution takes its mean and std (gaussian: the file
    standardized); named distributions are drawn as they are; standardize=False leaves the files'
    numbers; the model config's make_distribution(source, target=...) gives the datamodule's source."""
    rng = np.random.default_rng(0)
    src, tgt = rng.normal(size=(400, 2)) * 5 + 100, rng.normal(size=(300, 2)) * [50, 2] - 20
    np.save(tmp_path / "src.npy", src.astype(np.float32))
    np.save(tmp_path / "tgt.npy", tgt.astype(np.float32))
    s_file, t_file = str(tmp_path / "src.npy"), str(tmp_path / "tgt.npy")
    dm = ToyDataModule(s_file, t_file)
    t64 = torch.as_tensor(tgt.astype(np.float32)).double()
    assert dm.source.loc == dm.target.loc == pytest.approx(t64.mean(0).tolist())
    assert dm.source.scale == dm.target.scale == pytest.approx(t64.std(0, unbiased=False).tolist())
    assert make_distribution(s_file, 2, standardize=True, target=t_file).loc == dm.source.loc
    for source, target, framed, named in ((s_file, "8gaussians", "source", EightGaussians()),
                                          ("gaussian", t_file, "target", Gaussian())):
        dm = ToyDataModule(source, target)
        drawn = getattr(dm, framed).sample(200_000, _gen())  # the named side's mean and std
        ref = named.sample(200_000, _gen(1))
        torch.testing.assert_close(drawn.mean(0), ref.mean(0), atol=0.03, rtol=0)
        torch.testing.assert_close(drawn.std(0), ref.std(0), atol=0.03, rtol=0.01)
        other = dm.target if framed == "source" else dm.source
        assert torch.equal(other.sample(50, _gen()), named.sample(50, _gen()))
        built = (make_distribution(source, 2, standardize=True, target=target) if framed == "source"
                 else make_distribution(target, 2, standardize=True, source=source))
        assert (built.loc, built.scale) == (getattr(dm, framed).loc, getattr(dm, framed).scale)
    assert ToyDataModule("gaussian", t_file, standardize=False).target.loc is None


def test_pairs_that_record_no_distributions_hold_the_files_numbers_and_are_put_in_the_frame(tmp_path):
    """A hand-made pairs file (no source/target records) holds the points' own numbers: a framed
    points side is put in the run's frame, like the distribution it stands for."""
    rng = np.random.default_rng(0)
    tgt = rng.normal(size=(500, 2)) * [3.0, 0.5] + [100.0, -50.0]
    np.save(tmp_path / "tgt.npy", tgt.astype(np.float32))
    x0 = rng.normal(size=(500, 2)).astype(np.float32)
    np.savez(tmp_path / "pairs.npz", x0=x0, x1=tgt.astype(np.float32))
    for standardize in (True, False):
        dm = ToyDataModule("gaussian", str(tmp_path / "tgt.npy"), pairs=str(tmp_path / "pairs.npz"),
                           standardize=standardize, val_size=500)
        x1 = dm.target.sample(100_000, _gen())
        assert ((dm._val["x1"].mean(0) - x1.mean(0)) / x1.std(0)).abs().max() < 0.2  # the target's space
        torch.testing.assert_close(dm._val["x0"].std(0), torch.ones(2), atol=0.15, rtol=0)


@pytest.mark.parametrize("value", ["off", 1, None])
def test_standardize_must_be_true_or_false(value):
    with pytest.raises(ValueError, match=f"data.standardize must be true or false, got {value!r}"):
        ToyDataModule("gaussian", "moons", standardize=value)
