"""Low-dimensional distributions and the ``ToyDataModule`` that streams pairs from them.

Every distribution has ``dim`` and ``sample(n, generator=None) -> Tensor`` of shape
(n, dim), float32, fully vectorised (no Python loop over points). Names accepted by
:func:`make_distribution`: ``gaussian``, ``8gaussians``, ``moons``, ``scurve``, ``circles``,
``checkerboard``, ``swissroll``, ``pinwheel``, ``2spirals``, ``rings``, ``points`` (a user's
file), or a path ending in ``.npy``, ``.npz`` or ``.csv``.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import numbers
import os
import shlex
import warnings
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
from hydra.utils import to_absolute_path
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fm_lightning.distributed import per_device_batch_size
from fm_lightning.flow.couplings import IndependentCoupling

__all__ = [
    "Distribution", "Gaussian", "EightGaussians", "Moons", "SCurve", "Circles", "Checkerboard",
    "SwissRoll", "Pinwheel", "TwoSpirals", "Rings", "Points", "DISTRIBUTIONS", "make_distribution",
    "ToyDataModule", "load_pairs", "distribution_record", "as_override", "points_fingerprint", "same_points",
    "frame_of", "to_data_units", "in_data_units", "standard_frames", "is_points_spec",
]


def _rand(n: int, generator: torch.Generator | None, *shape: int) -> Tensor:
    return torch.rand(n, *shape, generator=generator)


def _randn(n: int, generator: torch.Generator | None, *shape: int) -> Tensor:
    return torch.randn(n, *shape, generator=generator)


def _check(dist: Distribution, param: str, ok: bool, valid: str) -> None:
    """Refuse a constructor argument of ``dist`` outside its documented range, naming both."""
    if not ok:
        name = _registered_name(type(dist)) or type(dist).__name__
        raise ValueError(f"distribution {name!r}: {param} must be {valid}, got {getattr(dist, param)}")


def _registered_name(cls: type | str) -> str | None:
    """The :data:`DISTRIBUTIONS` name of a class (or of its ``module.Class`` path), if it has one."""
    path = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__name__}"
    return next((n for n, c in DISTRIBUTIONS.items() if path == f"{c.__module__}.{c.__name__}"), None)


def _positive(x: float) -> bool:
    return 0 < x < math.inf


def _non_negative(x: float) -> bool:
    return 0 <= x < math.inf


class Distribution:
    """Base class for samplers. ``sample(n, generator) -> (n, dim)`` float32 tensor."""

    dim: int = 2
    #: True only for N(0, I), the source that Lipman's OT path assumes.
    is_standard_gaussian = False

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def to_data(self, x: Tensor) -> Tensor:
        """Samples (n, dim) of this distribution's space in its data's own units (the same
        here; a points file in a standard frame maps them back)."""
        return x

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items() if k != "data" and not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Gaussian(Distribution):
    """Isotropic Gaussian ``N(0, std^2 I)``.

    Args:
        dim: dimension (>= 1), or a shape list such as ``[3, 32, 32]`` for image noise.
        std: standard deviation, > 0.
    """

    def __init__(self, dim: int | list[int] = 2, std: float = 1.0) -> None:
        self.dim = int(dim) if isinstance(dim, numbers.Integral) else [int(d) for d in dim]
        self.std = float(std)
        _check(self, "dim", min(self.shape, default=0) >= 1, "a whole number >= 1 (or a list of them)")
        _check(self, "std", _positive(self.std), "> 0 and finite")
        self.is_standard_gaussian = self.std == 1.0

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.dim,) if isinstance(self.dim, int) else tuple(self.dim)

    def sample(self, n, generator=None):
        return self.std * _randn(n, generator, *self.shape)

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density (n,) of flattened ``x``."""
        d = x[0].numel()
        sq = x.flatten(1).square().sum(1) / self.std**2
        return -0.5 * sq - 0.5 * d * math.log(2 * math.pi * self.std**2)


class EightGaussians(Distribution):
    """Eight Gaussians evenly spaced on a circle.

    Args:
        radius: radius of the circle of centres, > 0.
        std: standard deviation of each component, >= 0.
    """

    def __init__(self, radius: float = 5.0, std: float = 0.5) -> None:
        self.radius, self.std = float(radius), float(std)
        _check(self, "radius", _positive(self.radius), "> 0 and finite")
        _check(self, "std", _non_negative(self.std), ">= 0 and finite")
        angles = torch.arange(8) * (2 * math.pi / 8)
        self._centers = self.radius * torch.stack([torch.cos(angles), torch.sin(angles)], 1)

    def sample(self, n, generator=None):
        idx = torch.randint(0, 8, (n,), generator=generator)
        return self._centers[idx] + self.std * _randn(n, generator, 2)


class Moons(Distribution):
    """Two interleaving half circles (scikit-learn's ``make_moons``), then ``scale*x + shift``.

    Args:
        noise: std of the Gaussian noise added before scaling, >= 0.
        scale: multiplier applied to the points, > 0.
        shift: offset added after scaling (finite).
    """

    def __init__(self, noise: float = 0.2, scale: float = 3.0, shift: float = -1.0) -> None:
        self.noise, self.scale, self.shift = float(noise), float(scale), float(shift)
        _check(self, "noise", _non_negative(self.noise), ">= 0 and finite")
        _check(self, "scale", _positive(self.scale), "> 0 and finite")
        _check(self, "shift", math.isfinite(self.shift), "finite")

    def sample(self, n, generator=None):
        theta = math.pi * _rand(n, generator)
        upper = _rand(n, generator) < 0.5
        x = torch.where(upper, torch.cos(theta), 1 - torch.cos(theta))
        y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
        pts = torch.stack([x, y], 1) + self.noise * _randn(n, generator, 2)
        return self.scale * pts + self.shift


class SCurve(Distribution):
    """The 2-D projection ``(x, z)`` of scikit-learn's S-curve, times ``scale``.

    Args:
        noise: std of the Gaussian noise added before scaling, >= 0.
        scale: multiplier applied to the points, > 0.
    """

    def __init__(self, noise: float = 0.1, scale: float = 2.0) -> None:
        self.noise, self.scale = float(noise), float(scale)
        _check(self, "noise", _non_negative(self.noise), ">= 0 and finite")
        _check(self, "scale", _positive(self.scale), "> 0 and finite")

    def sample(self, n, generator=None):
        t = 3 * math.pi * (_rand(n, generator) - 0.5)
        pts = torch.stack([torch.sin(t), torch.sign(t) * (torch.cos(t) - 1)], 1)
        return self.scale * (pts + self.noise * _randn(n, generator, 2))


class Circles(Distribution):
    """Two concentric circles of radii ``scale`` and ``factor*scale``.

    Args:
        noise: std of the Gaussian noise added before scaling, >= 0.
        factor: ratio of the inner to the outer radius, in (0, 1).
        scale: outer radius, > 0.
    """

    def __init__(self, noise: float = 0.05, factor: float = 0.5, scale: float = 3.0) -> None:
        self.noise, self.factor, self.scale = float(noise), float(factor), float(scale)
        _check(self, "noise", _non_negative(self.noise), ">= 0 and finite")
        _check(self, "factor", 0 < self.factor < 1, "in (0, 1)")
        _check(self, "scale", _positive(self.scale), "> 0 and finite")

    def sample(self, n, generator=None):
        theta = 2 * math.pi * _rand(n, generator)
        radius = torch.where(_rand(n, generator) < 0.5, 1.0, self.factor)
        pts = radius[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], 1)
        return self.scale * (pts + self.noise * _randn(n, generator, 2))


class Checkerboard(Distribution):
    """Uniform on the dark squares of a ``4x4`` checkerboard spanning ``[-2, 2]^2``, times ``scale``.

    Args:
        scale: multiplier applied to the points, > 0.
    """

    def __init__(self, scale: float = 2.0) -> None:
        self.scale = float(scale)
        _check(self, "scale", _positive(self.scale), "> 0 and finite")

    def sample(self, n, generator=None):
        x1 = 4 * _rand(n, generator) - 2
        x2 = _rand(n, generator) - torch.randint(0, 2, (n,), generator=generator) * 2.0
        x2 = x2 + torch.floor(x1) % 2
        return self.scale * torch.stack([x1, x2], 1)


class SwissRoll(Distribution):
    """The 2-D Swiss roll ``t*(cos t, sin t)`` for ``t ~ 1.5*pi*(1 + 2u)``, normalised to radius ~``scale``.

    Args:
        noise: std of the Gaussian noise (in the unscaled roll, whose radius is ~14), >= 0.
        scale: outer radius after normalisation, > 0.
    """

    def __init__(self, noise: float = 1.0, scale: float = 4.0) -> None:
        self.noise, self.scale = float(noise), float(scale)
        _check(self, "noise", _non_negative(self.noise), ">= 0 and finite")
        _check(self, "scale", _positive(self.scale), "> 0 and finite")

    def sample(self, n, generator=None):
        t = 1.5 * math.pi * (1 + 2 * _rand(n, generator))
        pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) + self.noise * _randn(n, generator, 2)
        return pts * (self.scale / (4.5 * math.pi))


class Pinwheel(Distribution):
    """Pinwheel: ``num_arms`` Gaussian blobs sheared into spiral arms.

    Args:
        num_arms: number of arms, a whole number >= 1.
        radial_std: std along each arm, >= 0.
        tangential_std: std across each arm, >= 0.
        rate: how strongly the arms curl (finite).
        scale: multiplier applied to the points, > 0.
    """

    def __init__(
        self, num_arms: int = 5, radial_std: float = 0.3, tangential_std: float = 0.1, rate: float = 0.25,
        scale: float = 3.0,
    ) -> None:
        self.num_arms, self.radial_std, self.tangential_std = num_arms, float(radial_std), float(tangential_std)
        self.rate, self.scale = float(rate), float(scale)
        _check(self, "num_arms", isinstance(num_arms, numbers.Integral) and not isinstance(num_arms, bool)
               and num_arms >= 1, "a whole number >= 1")
        self.num_arms = int(num_arms)
        _check(self, "radial_std", _non_negative(self.radial_std), ">= 0 and finite")
        _check(self, "tangential_std", _non_negative(self.tangential_std), ">= 0 and finite")
        _check(self, "rate", math.isfinite(self.rate), "finite")
        _check(self, "scale", _positive(self.scale), "> 0 and finite")

    def sample(self, n, generator=None):
        labels = torch.randint(0, self.num_arms, (n,), generator=generator)
        feats = _randn(n, generator, 2) * torch.tensor([self.radial_std, self.tangential_std])
        feats[:, 0] += 1.0
        angles = labels * (2 * math.pi / self.num_arms) + self.rate * torch.exp(feats[:, 0])
        cos, sin = torch.cos(angles), torch.sin(angles)
        x = cos * feats[:, 0] - sin * feats[:, 1]
        y = sin * feats[:, 0] + cos * feats[:, 1]
        return self.scale * torch.stack([x, y], 1)


class TwoSpirals(Distribution):
    """Two interleaved spirals (FFJORD's ``2spirals``), times ``scale``.

    Args:
        noise: std of the Gaussian noise (before scaling; the spirals span ~[-4, 4]), >= 0.
        scale: multiplier applied to the points, > 0.
    """

    def __init__(self, noise: float = 0.1, scale: float = 1.0) -> None:
        self.noise, self.scale = float(noise), float(scale)
        _check(self, "noise", _non_negative(self.noise), ">= 0 and finite")
        _check(self, "scale", _positive(self.scale), "> 0 and finite")

    def sample(self, n, generator=None):
        r = torch.sqrt(_rand(n, generator)) * 540 * (2 * math.pi / 360)
        sign = torch.where(_rand(n, generator) < 0.5, 1.0, -1.0)
        pts = sign[:, None] * torch.stack([-torch.cos(r) * r, torch.sin(r) * r], 1)
        return self.scale * (pts / 3 + self.noise * _randn(n, generator, 2))


class Rings(Distribution):
    """Four concentric rings of radii ``scale*(1, 2, 3, 4)/4``, uniform in angle.

    Args:
        noise: std of the Gaussian noise added after scaling, >= 0.
        scale: radius of the outer ring, > 0.
    """

    def __init__(self, noise: float = 0.08, scale: float = 4.0) -> None:
        self.noise, self.scale = float(noise), float(scale)
        _check(self, "noise", _non_negative(self.noise), ">= 0 and finite")
        _check(self, "scale", _positive(self.scale), "> 0 and finite")

    def sample(self, n, generator=None):
        ring = torch.randint(1, 5, (n,), generator=generator).float()
        theta = 2 * math.pi * _rand(n, generator)
        pts = (self.scale * ring / 4)[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], 1)
        return pts + self.noise * _randn(n, generator, 2)


class Points(Distribution):
    """A user's own points, drawn uniformly with replacement.

    Args:
        file: ``.npy`` (array (N, d)), ``.npz`` (key ``points``, ``samples``, or its only array)
            or ``.csv`` (N rows of d numbers, separated by commas or all by spaces/tabs; comments,
            blank lines and a header are skipped, see :func:`_read_csv`). Its contents must be the
            format its extension names. ``~`` is expanded, and a relative path is taken from the
            directory ``fm-train`` was launched in (``hydra.utils.to_absolute_path``; the working
            directory outside Hydra), also with ``hydra.job.chdir=true``. The absolute path is
            recorded.
        fingerprint: the points' content fingerprint (:func:`points_fingerprint`) that a
            checkpoint recorded; the file must still hold those points, else one clear error.
            ``None`` (a fresh Points): computed from the file. Checkpoints record it, so that a
            file that has changed since training is refused and one that has moved is recognised.
        loc, scale: a standard frame (d floats each, scale > 0): points are drawn as
            ``(x - loc) / scale``, and :meth:`to_data` maps samples back to the file's units.
            ``None``: the file's points as they are. :meth:`standardized` gives the frame of a
            file; checkpoints record it.
    """

    def __init__(self, file: str, fingerprint: str | None = None, loc: list[float] | None = None,
                 scale: list[float] | None = None) -> None:
        # the checkpoint records the absolute path; sampling may run elsewhere
        self.file = os.path.abspath(to_absolute_path(os.path.expanduser(str(file))))
        self.data = load_points(self.file)
        self.dim = self.data.shape[1]
        actual = points_fingerprint(self.data)
        if fingerprint is not None and str(fingerprint) != actual:
            raise ValueError(
                f"points file {self.file!r} changed since training (fingerprint {fingerprint}, now {actual}); restore "
                "it, or pass the file the run used: --source-file (fm-sample, fm-eval, reflow) for a source, "
                "--target (fm-eval) for a target, data.source/data.target for fm-train"
            )
        self.fingerprint = actual
        self._set_frame(loc, scale)

    def __repr__(self) -> str:
        frame = ", in a standard frame" if self.loc is not None else ""
        return f"Points(file={self.file!r}, fingerprint={self.fingerprint!r}{frame})"

    def _set_frame(self, loc: Any, scale: Any) -> None:
        self.loc, self.scale = _check_frame(loc, scale, self.dim, self.file)
        self._points = self.data if self.loc is None else _standardize(self.data, self.loc, self.scale)

    def sample(self, n, generator=None):
        idx = torch.randint(0, self.data.shape[0], (n,), generator=generator)
        return self._points[idx]

    def standardized(self, like: Distribution | None = None) -> Points:
        """These points shifted and scaled per dimension to the mean and std of ``like``: a
        Gaussian's, a 2-D shape's (from 100,000 draws with seed 0), a framed points file's own
        frame, or (``None``, or another dimension) zero mean and unit std."""
        if isinstance(like, Points) and like.loc is not None and like.dim == self.dim:
            return self.in_frame(like.loc, like.scale)
        data = self.data.double()
        mean, std = data.mean(0), data.std(0, unbiased=False)
        std = torch.where(std > 0, std, 1.0)
        if like is not None and not isinstance(like, Points) and like.dim == self.dim:
            if isinstance(like, Gaussian):
                like_mean, like_std = torch.zeros(self.dim, dtype=torch.float64), torch.full((self.dim,), like.std)
            else:  # the 2-D shapes
                drawn = like.sample(100_000, torch.Generator().manual_seed(0)).double()
                like_mean, like_std = drawn.mean(0), drawn.std(0, unbiased=False)
            scale = std / like_std
            return self.in_frame((mean - like_mean * scale).tolist(), scale.tolist())
        return self.in_frame(mean.tolist(), std.tolist())

    def in_frame(self, loc: list[float] | None, scale: list[float] | None) -> Points:
        """These points in the frame ``(loc, scale)`` (``None``: the file's numbers)."""
        out = copy.copy(self)
        out._set_frame(loc, scale)
        return out

    def to_data(self, x: Tensor) -> Tensor:
        """Samples (n, d) of this distribution's space in the file's units (undoes the frame)."""
        return to_data_units(x, self.loc, self.scale)


def in_data_units(dist: Any, x: Tensor) -> Tensor:
    """Samples (n, d) of ``dist``'s space in its data's own units (:meth:`Distribution.to_data`;
    as they are for a sampler without it)."""
    return dist.to_data(x) if hasattr(dist, "to_data") else x


def to_data_units(x: Tensor, loc: list[float] | None, scale: list[float] | None) -> Tensor:
    """Samples (n, d) of the frame ``(loc, scale)`` in the file's units: ``x * scale + loc``."""
    if loc is None:
        return x
    return x * x.new_tensor(scale) + x.new_tensor(loc)


def frame_of(spec: Any) -> tuple[list[float] | None, list[float] | None]:
    """The frame ``(loc, scale)`` that a distribution spec (``{"class_path", "init_args"}``)
    records: a standardized points file's, else ``(None, None)``."""
    args = (spec.get("init_args") or {}) if is_points_spec(spec) else {}
    return args.get("loc"), args.get("scale")


def _check_frame(loc: Any, scale: Any, dim: int, file: str) -> tuple[list[float] | None, list[float] | None]:
    """``loc`` and ``scale`` as ``dim`` floats each (scale > 0), or both ``None``."""
    if loc is None and scale is None:
        return None, None
    if isinstance(loc, str) or isinstance(scale, str):
        loc = scale = None  # refused below
    try:
        loc, scale = [float(v) for v in loc], [float(v) for v in scale]
    except (TypeError, ValueError):
        raise ValueError(f"points {file!r}: loc and scale must be lists of {dim} numbers, got {loc!r} and {scale!r}") \
            from None
    if len(loc) != dim or len(scale) != dim:
        raise ValueError(f"points {file!r} are {dim}-dimensional but loc/scale have {len(loc)}/{len(scale)} entries")
    if not all(map(math.isfinite, loc)) or not all(s > 0 and math.isfinite(s) for s in scale):
        raise ValueError(f"points {file!r}: loc must be finite and scale > 0 and finite, got {loc} and {scale}")
    return loc, scale


def _standardize(data: Tensor, loc: list[float], scale: list[float]) -> Tensor:
    loc64, scale64 = torch.tensor(loc, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64)
    return ((data.double() - loc64) / scale64).float()


def points_fingerprint(points: Tensor) -> str:
    """Content fingerprint of points (N, d): ``"<N>x<d>:<first 16 hex digits of the sha256 of
    their float32 little-endian bytes>"``. The same points give the same fingerprint whatever the
    file's name, place or format (.npy, .npz or .csv)."""
    arr = np.ascontiguousarray(points.detach().cpu().numpy(), dtype="<f4")
    return f"{arr.shape[0]}x{arr.shape[1]}:{hashlib.sha256(arr.tobytes()).hexdigest()[:16]}"


def load_points(file: str) -> Tensor:
    """Read and validate a points file into a float32 tensor (N, d)."""
    if not os.path.isfile(file):
        raise FileNotFoundError(f"points file {file!r} does not exist; give an existing .npy, .npz or .csv file")
    ext = os.path.splitext(file)[1].lower()
    held = _contents(file)
    if ext in _EXPECTED and held not in _EXPECTED[ext]:
        fix = (f"rename it to end in {held}" if held in (".npy", ".npz") else
               "rename it to end in .csv if it holds comma-separated numbers" if held == "text" else
               "give a .npy (numpy.save), .npz (numpy.savez) or .csv file")
        raise ValueError(f"points file {file!r} is not a valid {ext} file: it holds {_HOLDS[held]}; {fix}")
    try:
        if ext == ".npy":
            arr = np.load(file, allow_pickle=False)
        elif ext == ".npz":
            with np.load(file, allow_pickle=False) as z:
                keys = [k for k in ("points", "samples") if k in z.files] or z.files
                if len(keys) != 1 and not set(keys) & {"points", "samples"}:
                    raise ValueError(f"{file!r} holds arrays {z.files}; name the points array 'points'")
                arr = z[keys[0]]
        elif ext == ".csv":
            arr = _read_csv(file)
        else:
            raise ValueError(f"points file {file!r} must end in .npy, .npz or .csv")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read points file {file!r}: {err}") from err
    if arr.ndim != 2 or arr.shape[0] < 2 or arr.shape[1] < 1:
        raise ValueError(f"points file {file!r} must hold an array of shape (N, d) with N >= 2, got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"points file {file!r} holds {arr.dtype} values; points must be real numbers")
    points = torch.as_tensor(arr, dtype=torch.float32)
    if not torch.isfinite(points).all():
        raise ValueError(f"points file {file!r} contains non-finite values (NaN/inf, or beyond float32 range "
                         "|x| > 3.4e38); clean it first")
    return points


#: What a file of each extension may hold, by :func:`_contents` (an empty .csv: no points, said later).
_EXPECTED = {".npy": (".npy",), ".npz": (".npz",), ".csv": ("text", "empty")}
_HOLDS = {".npy": "a single .npy array", ".npz": "an .npz archive", "text": "text", "empty": "nothing (it is empty)",
          "binary": "binary data that is not numpy's"}


def _contents(file: str) -> str:
    """What ``file`` holds, judged from its first bytes (numpy picks the format from them, not from
    the name): ``.npy``, ``.npz``, ``text``, ``empty`` or ``binary``."""
    with open(file, "rb") as f:
        head = f.read(1024)
    if head.startswith(b"\x93NUMPY"):
        return ".npy"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return ".npz"
    return "empty" if not head else "binary" if b"\0" in head else "text"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


#: First header fields that name pandas' row-index column (``to_csv()`` writes an empty one,
#: ``read_csv`` names it ``Unnamed: 0``, ``reset_index`` ``index``).
_INDEX_NAMES = ("", "unnamed: 0", "index")
_CSV_FORMAT = ("a .csv needs one point per line, its numbers separated by commas (or all by spaces/tabs), "
               "after an optional header line")


def _is_header(fields: list[str]) -> bool:
    """No number in it (``x,y``; a row with a typo stays data, and is reported), or the names
    pandas gives unnamed columns, ``0,1,...,d-1`` with ``d >= 2`` (a one-column ``0`` is data)."""
    return not any(map(_is_number, fields)) or (len(fields) >= 2 and fields == [str(i) for i in range(len(fields))])


def _bad_line(rows: list[tuple[int, list[str]]]) -> str | None:
    """The first data line numpy could not read, named by its line in the file."""
    width, first = len(rows[0][1]), rows[0][0]
    for n, fields in rows:
        if len(fields) != width:
            return f"the number of columns changed from {width} (line {first}) to {len(fields)} at line {n} of the file"
        for j, x in enumerate(fields, 1):
            if not _is_number(x):
                return f"line {n}, field {j}: {x!r} is not a number"
    return None


def _read_csv(file: str) -> np.ndarray:
    """Rows of numbers (N, d) of a text file: comma-separated (when any line holds a comma), else
    separated by spaces/tabs (numpy's ``savetxt``). ``#`` comments and blank lines are skipped, and
    so is a header line (:func:`_is_header`); a UTF-8 byte-order mark (Excel's "CSV UTF-8") is
    dropped. Refused in one line: semicolons (a spreadsheet's export with decimal commas), and
    pandas' row index as a first column (``to_csv()`` with its default ``index=True``). Errors
    name the line of the file (1-based, as an editor counts them)."""
    with open(file, encoding="utf-8-sig") as f:
        lines = [(n, text) for n, line in enumerate(f, 1) if (text := line.split("#", 1)[0].strip())]
    if not lines:
        return np.empty((0, 0))
    semicolon = next((n for n, text in lines if ";" in text), None)
    if semicolon is not None:
        raise ValueError(f"line {semicolon} separates fields by semicolons (a spreadsheet's export with decimal "
                         f"commas?); export it with commas between numbers and points in them ({_CSV_FORMAT})")
    sep = "," if any("," in text for _, text in lines) else None
    rows = [(n, [x.strip() for x in text.split(sep)]) for n, text in lines]
    (n, first), below = rows[0], rows[1][1] if len(rows) > 1 else []
    # pandas' index column: named as above, or (separated by spaces) not at all, one field short.
    if (len(first) > 1 and first[0].lower() in _INDEX_NAMES and _is_header(first[1:])) or (
            sep is None and _is_header(first) and len(first) + 1 == len(below)):
        raise ValueError(f"its first column is pandas' row index, not a coordinate (header on line {n}: "
                         f"{lines[0][1]!r}); write the file with DataFrame.to_csv(..., index=False), or drop that column")
    if _is_header(first):
        lines, rows = lines[1:], rows[1:]
    if not rows:
        return np.empty((0, 0))
    try:  # numpy's parser is fast; where it fails, name the line
        return np.loadtxt([text for _, text in lines], delimiter=sep, comments=None, ndmin=2)
    except ValueError as err:
        raise ValueError(f"{_bad_line(rows) or err} ({_CSV_FORMAT})") from None


DISTRIBUTIONS: dict[str, type[Distribution]] = {
    "gaussian": Gaussian,
    "8gaussians": EightGaussians,
    "moons": Moons,
    "scurve": SCurve,
    "circles": Circles,
    "checkerboard": Checkerboard,
    "swissroll": SwissRoll,
    "pinwheel": Pinwheel,
    "2spirals": TwoSpirals,
    "rings": Rings,
    "points": Points,
}


def make_distribution(spec: Any, dim: int | None = None, standardize: bool = False, source: Any = None,
                      target: Any = None, **kwargs: Any) -> Distribution:
    """Build a distribution from a name, a points-file path, a dict or an instance.

    Args:
        spec: ``"moons"``, ``"data/my_points.npy"``, ``{"name": "gaussian", "std": 2}``, or a
            :class:`Distribution` (returned as is).
        dim: dimension for ``gaussian`` (ignored by the fixed 2-D shapes).
        standardize: put a points file (without a frame of its own) in the run's standard
            frame (:func:`standard_frames`): ``spec`` is the run's source when ``target`` is given,
            else its target (of ``source``, if given).
        source, target: the run's other side (spec or instance), for ``standardize``.
        **kwargs: constructor arguments of the chosen distribution.
    """
    _check_bool("standardize", standardize)
    if source is not None and target is not None:
        raise ValueError("make_distribution takes the run's source or its target (the other side), not both")
    dist = _build(spec, dim, **kwargs)
    if not (standardize and isinstance(dist, Points)):
        return dist
    if target is not None:
        return standard_frames(dist, _build(target, dim))[0]
    return standard_frames(None if source is None else _build(source, dim), dist)[1]


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"data.{name} must be true or false, got {value!r}")


def standard_frames(source: Distribution | None, target: Distribution) -> tuple[Distribution | None, Distribution]:
    """``source`` and ``target`` with their points files (those without a frame) in the run's
    standard frame, where the default recipe is tuned: a file facing a named distribution takes
    its mean and std per dimension (``gaussian`` -> points: the file standardized), so the flow
    moves between distributions of one scale; of two files, both take the target file's zero-mean,
    unit-std frame, which keeps their relative place. Named distributions stay as they are."""
    if isinstance(target, Points) and target.loc is None:
        target = target.standardized(None if isinstance(source, Points) else source)
    if isinstance(source, Points) and source.loc is None:
        source = source.standardized(target)
    return source, target


def _build(spec: Any, dim: int | None = None, **kwargs: Any) -> Distribution:
    """:func:`make_distribution` without standardization."""
    if isinstance(spec, Distribution):
        return spec
    if isinstance(spec, dict) or type(spec).__name__ == "DictConfig":
        spec = dict(spec)
        if "name" not in spec:
            raise ValueError(f"distribution {spec} has no name; add name: one of {sorted(DISTRIBUTIONS)}, "
                             "e.g. {name: circles, factor: 0.3}")
        return _build(spec.pop("name"), dim=spec.pop("dim", dim), **spec, **kwargs)
    name = str(spec)
    if name.lower().endswith((".npy", ".npz", ".csv")):
        name, kwargs = "points", {"file": name, **kwargs}
    if name not in DISTRIBUTIONS:
        raise ValueError(
            f"unknown distribution {name!r}; choose one of {sorted(DISTRIBUTIONS)} or give a .npy/.npz/.csv file"
        )
    if name == "points" and "file" not in kwargs:
        raise ValueError("distribution 'points' needs a file: give its path instead, e.g. data.target=my_points.npy")
    if name == "gaussian" and dim is not None:
        kwargs.setdefault("dim", dim)
    params = inspect.signature(DISTRIBUTIONS[name]).parameters
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        known = ", ".join(k if p.default is p.empty else f"{k} (default {p.default})" for k, p in params.items())
        raise ValueError(f"distribution {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                         f"its parameters: {known or 'none'}")
    for key, value in kwargs.items():
        default = params[key].default
        if type(default) in (int, float) and isinstance(value, (str, bool)):
            raise ValueError(f"distribution {name!r}: {key} must be a number, got {value!r}")
    return DISTRIBUTIONS[name](**kwargs)


def distribution_record(dist: Distribution | dict) -> str:
    """``dist`` (or its ``class_path``/``init_args`` spec) as a JSON spec, as reflow stores its
    source and target with the pairs so that training on them can check ``data.source`` and
    ``data.target`` (:func:`load_pairs`)."""
    from fm_lightning.spec import to_spec

    return json.dumps(to_spec(dist), sort_keys=True)


def as_override(role: str, record: str) -> str:
    """The shell argument ``data.<role>=<value>`` that builds a recorded distribution: its name
    with the arguments that differ from the defaults (``'data.target={name:moons,noise:0.1}'``),
    or its points file."""
    spec = json.loads(record)
    args = spec.get("init_args") or {}
    name = _registered_name(spec["class_path"])
    if name is None:
        value = record
    elif name == "points":
        value = args["file"]
    else:
        params = inspect.signature(DISTRIBUTIONS[name]).parameters
        changed = [f"{k}:{json.dumps(v, separators=(',', ':'))}" for k, v in args.items() if params[k].default != v]
        value = "{" + ",".join([f"name:{name}", *changed]) + "}" if changed else name
    return shlex.quote(f"data.{role}={value}")


def load_pairs(file: str, dim: int, source: Distribution | None = None,
               target: Distribution | None = None) -> tuple[Tensor, Tensor]:
    """Read fixed ``(x0, x1)`` pairs (e.g. written by reflow) from an ``.npz`` with arrays ``x0``
    and ``x1`` of shape (N, dim); one clear error for a missing file, a file that is no ``.npz``,
    missing arrays, shapes that differ or do not match the model's ``dim``, non-finite values, or
    (when the file records the source and target of its pairs, as reflow's do) a ``source`` or
    ``target`` other than those (a points file that has moved since is taken as given; at the
    recorded path, a points file whose record has a fingerprint must still hold those points).
    Recorded pairs are in the frame of their records (reflow draws them in the run's); a side that
    records nothing holds a points file's own numbers, and is put in ``source``'s or ``target``'s
    standard frame."""
    if not os.path.isfile(file):
        raise FileNotFoundError(f"pairs file {file!r} does not exist; give an .npz with arrays x0 and x1")
    held = _contents(file)
    if held != ".npz":
        raise ValueError(f"pairs file {file!r} is not a valid .npz file: it holds {_HOLDS[held]}; give an .npz with "
                         "arrays x0 and x1, as python -m fm_lightning.reflow writes")
    try:
        with np.load(file, allow_pickle=False) as z:
            if "x0" not in z.files or "x1" not in z.files:
                raise ValueError(f"pairs file {file!r} must hold arrays 'x0' and 'x1', has {z.files}")
            x0, x1 = z["x0"], z["x1"]
            recorded = {role: str(z[role]) for role in ("source", "target") if role in z.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read pairs file {file!r}: {err}") from err
    why = {"source": "so that sampling draws x0 as training saw it",
           "target": "so that val/w2 and the checkpoint's target are the data the pairs end at"}
    for role, dist in (("source", source), ("target", target)):
        if dist is None or role not in recorded:
            continue
        theirs, mine = json.loads(recorded[role]), json.loads(distribution_record(dist))
        if theirs == mine or same_points(theirs, mine):
            continue
        their_points, my_points = ((spec.get("init_args") or {}).get("fingerprint") for spec in (theirs, mine))
        if is_points_spec(theirs) and is_points_spec(mine) and their_points is not None and their_points == my_points:
            raise ValueError(f"the pairs in {file!r} were drawn in another standard frame of the {role} points than "
                             f"this run's; set data.standardize={str(frame_of(theirs)[0] is not None).lower()}, as "
                             "the run that drew them")
        if is_points_spec(theirs) and is_points_spec(mine) and theirs["init_args"]["file"] == mine["init_args"]["file"]:
            raise ValueError(f"points file {dist.file!r} has changed since the pairs in {file!r} were drawn from it; "
                             f"restore it, or generate the pairs again")
        raise ValueError(
            f"the pairs in {file!r} were drawn for {as_override(role, recorded[role])} but data.{role} is "
            f"{dist}; set {as_override(role, recorded[role])}, {why[role]}"
        )
    if x0.shape != x1.shape or x0.ndim != 2 or x0.shape[0] < 2:
        raise ValueError(
            f"reflow pairs in {file!r} must be x0 and x1 of one shape (N, d) with N >= 2, got {x0.shape} and {x1.shape}"
        )
    if x0.shape[1] != dim:
        raise ValueError(
            f"reflow pairs in {file!r} are {x0.shape[1]}-dimensional but the model and data are {dim}-dimensional "
            f"(data.dim={dim}); generate the pairs from a model of this task"
        )
    if not (np.isfinite(x0).all() and np.isfinite(x1).all()):
        raise ValueError(f"pairs file {file!r} contains non-finite values")
    pairs = {"source": torch.as_tensor(x0, dtype=torch.float32), "target": torch.as_tensor(x1, dtype=torch.float32)}
    for role, dist in (("source", source), ("target", target)):
        if role not in recorded and isinstance(dist, Points) and dist.loc is not None:  # the file's own numbers
            pairs[role] = _standardize(pairs[role], dist.loc, dist.scale)
    return pairs["source"], pairs["target"]


def is_points_spec(spec: Any) -> bool:
    """Whether ``spec`` (``{"class_path", "init_args"}``) describes a points file."""
    return isinstance(spec, dict) and _registered_name(str(spec.get("class_path", ""))) == "points"


def same_points(recorded: Any, current: Any) -> bool:
    """Whether two distribution specs (``{"class_path", "init_args"}``) are points files holding
    the same data in the same frame (:func:`frame_of`): by content fingerprint when both record
    one, wherever the file is now; else (a record from before fingerprints) by path, a recorded
    file that no longer exists (moved since) standing for the one given."""
    if not (is_points_spec(recorded) and is_points_spec(current)) or frame_of(recorded) != frame_of(current):
        return False
    theirs, mine = recorded.get("init_args") or {}, current.get("init_args") or {}
    if "fingerprint" in theirs and "fingerprint" in mine:
        return theirs["fingerprint"] == mine["fingerprint"]
    return theirs.get("file") == mine.get("file") or not os.path.exists(str(theirs.get("file")))


class _PairStream(IterableDataset):
    """Yields ``{"x0": (B, d), "x1": (B, d)}`` numpy batches; batch ``k`` of epoch ``e`` is a pure
    function of ``(seed, rank, e, k)``, so a stream can restart at any batch. With fixed
    ``pairs`` ``(x0, x1)`` (N, d) each batch draws B of them (with replacement), kept together.
    With an ``objective``, each batch is its drawn regression problem instead (the fields of a
    ``PathSample``: ``t, x0, x1, xt, ut``), with the batch's generator. The stream yields
    chunks of up to ``chunk`` consecutive batches (each field stacked: (K, B, ...)), which
    loader workers split round-robin, in order: the loader's per-item cost (index queue,
    pickling, profiler record; ~0.3 ms) is paid once per chunk, not once per training step."""

    def __init__(self, source: Distribution, target: Distribution, batch_size: int, length: int, seed: int,
                 pairs: tuple[Tensor, Tensor] | None = None) -> None:
        self.source, self.target, self.pairs = source, target, pairs
        self.batch_size, self.length, self.seed = batch_size, length, seed
        self.rank, self.epoch, self.start, self.chunk = 0, 0, 0, 16
        self.objective: Any = None

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        # Read the position now, not when the first batch is asked for: _StreamLoader moves
        # the main process's copy on as soon as an iterator exists. A (persistent) worker
        # moves its own copy.
        epoch, start = self.epoch, self.start
        worker = get_worker_info()
        chunks = range(start, self.length, self.chunk)
        if worker is not None:
            self.epoch, self.start = epoch + 1, 0
            chunks = chunks[worker.id :: worker.num_workers]
        return (self._chunk(epoch, range(c, min(c + self.chunk, self.length))) for c in chunks)

    def _chunk(self, epoch: int, ks: range) -> dict[str, np.ndarray]:
        batches = list(self._batches(epoch, ks))
        return {k: np.stack([b[k] for b in batches]) for k in batches[0]}

    def _batches(self, epoch: int, ks: range) -> Iterator[dict[str, np.ndarray]]:
        gen = torch.Generator()
        for k in ks:
            gen.manual_seed(hash((self.seed, self.rank, epoch, k)) % (2**63))
            if self.pairs is not None:
                idx = torch.randint(0, self.pairs[0].shape[0], (self.batch_size,), generator=gen)
                x0, x1 = self.pairs[0][idx], self.pairs[1][idx]
            else:
                x0, x1 = self.source.sample(self.batch_size, gen), self.target.sample(self.batch_size, gen)
            batch = {"x0": x0, "x1": x1} if self.objective is None else vars(self.objective.draw(x0, x1, generator=gen)[0])
            # As numpy: a worker hands arrays over ~10x cheaper than tensors (no shared memory).
            yield {k: v.numpy() for k, v in batch.items()}


def _as_is(batch: Any) -> Any:
    return batch


# Lightning warns about every IterableDataset with a length that loader workers might
# duplicate data; _PairStream splits its batches between workers, so the length is exact.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


class _StreamLoader(DataLoader):
    """A loader over a :class:`_PairStream` that yields its batches as tensors and moves the
    stream to the next epoch each time an iterator is created (after new workers have copied
    the stream), in the main process. The trainer stops after ``len(stream)`` batches and
    never resumes an iterator past them. Workers persist across epochs."""

    def __init__(self, stream: _PairStream, num_workers: int) -> None:
        # Its own generator: creating an iterator must not draw from the global RNG (exact resume).
        super().__init__(stream, batch_size=None, collate_fn=_as_is, generator=torch.Generator(),
                         num_workers=num_workers, persistent_workers=num_workers > 0)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        iterator = super().__iter__()
        self.dataset.epoch, self.dataset.start = self.dataset.epoch + 1, 0
        return _unchunk(iterator)


def _unchunk(chunks: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, Tensor]]:
    """The batches of each chunk of stacked fields (K, B, ...), as tensors (B, ...)."""
    for chunk in chunks:
        fields = {k: torch.from_numpy(v) for k, v in chunk.items()}
        for batch in zip(*fields.values()):
            yield dict(zip(fields, batch))


class ToyDataModule(L.LightningDataModule):
    """Streams ``(x0, x1)`` minibatches from a source and a target distribution.

    Args:
        source: distribution of ``x0`` (name, points file, dict or instance; see module doc).
        target: distribution of ``x1``.
        dim: dimension of ``gaussian`` source/target; fixed shapes are 2-D.
        batch_size: GLOBAL batch size per optimizer step; each device draws
            ``batch_size / (world_size * accumulate_grad_batches)`` (see ``setup``).
        steps_per_epoch: training batches per epoch (the stream is infinite in principle).
        val_size: size of the fixed validation set (drawn once from ``seed``).
        seed: base seed; each rank and epoch derive their own stream from it.
        pairs: an ``.npz`` of fixed ``(x0, x1)`` pairs (arrays ``x0``, ``x1`` of shape (N, dim)),
            such as reflow writes: training and validation batches draw whole pairs from it
            instead of independent source and target samples (train it with the independent
            coupling, ``flow=icfm``). ``source`` stays the model's source and ``target`` the
            reference of ``val/w2``; both must be the ones the file records, if it does.
        num_workers: loader worker processes. Workers draw the batches *and their regression
            problem* (minibatch OT pairing, ``t``, noise, ``x_t`` and ``u_t``) while the main
            process trains, so none of it costs training time as long as a core is free. 0 does
            everything in the main process; the batches are the same either way.
        standardize: put points files in the run's standard frame (:func:`standard_frames`; the
            default recipe's sigma, tolerances and learning rate are tuned for the scale of the
            named distributions): a file facing a named distribution takes its mean and std per
            dimension (``gaussian`` -> file: the file standardized); two files take the target
            file's zero-mean, unit-std frame. The flow, its samples and the plots are in the
            frame; ``val/w2``, fm-eval's W2, MMD and NLL, and fm-sample's samples in the target
            file's units (:meth:`Points.to_data`). ``False``: use the files' numbers as they are.

    Training batches are drawn in the loader by :attr:`objective`: the one given, else the
    trainer's model's (``model.flow``), except one whose coupling gathers the global batch
    across ranks, which stays in the training step.

    The target's spec is saved in the checkpoint (``datamodule_hyper_parameters["target"]``), so
    that ``fm-eval`` finds the data a checkpoint was trained on.
    """

    def __init__(
        self,
        source: Any = "8gaussians",
        target: Any = "moons",
        dim: int = 2,
        batch_size: int = 256,
        steps_per_epoch: int = 1000,
        val_size: int = 2000,
        seed: int = 0,
        pairs: str | None = None,
        num_workers: int = 1,
        standardize: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1 or steps_per_epoch < 1 or val_size < 1:
            raise ValueError("batch_size, steps_per_epoch and val_size must all be >= 1")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0 draws batches in the training process), got {num_workers}")
        self.num_workers = num_workers
        self.objective: Any = None
        _check_bool("standardize", standardize)
        self.standardize = standardize
        self.source, self.target = make_distribution(source, dim=dim), make_distribution(target, dim=dim)
        if self.standardize:
            self.source, self.target = standard_frames(self.source, self.target)
        if self.source.dim != self.target.dim:
            raise ValueError(
                f"source {self.source} has dim {self.source.dim} but target {self.target} has dim "
                f"{self.target.dim}; they must match (set data.dim, fm-cli: --data.init_args.dim, for gaussian, or "
                "use matching files)"
            )
        if self.source.dim != dim:
            raise ValueError(f"the data are {self.source.dim}-dimensional but data.dim={dim}; set "
                             f"data.dim={self.source.dim} (fm-cli: --data.init_args.dim={self.source.dim})")
        self.dim = self.source.dim
        self.batch_size, self.steps_per_epoch, self.val_size, self.seed = batch_size, steps_per_epoch, val_size, seed
        self.pairs = None if pairs is None else str(pairs)
        fixed = None if pairs is None else load_pairs(self.pairs, self.dim, self.source, self.target)
        self._train = _PairStream(self.source, self.target, batch_size, steps_per_epoch, seed, fixed)
        gen = torch.Generator().manual_seed(seed + 12345)
        if fixed is None:
            self._val = {"x0": self.source.sample(val_size, gen), "x1": self.target.sample(val_size, gen)}
        else:
            idx = torch.randint(0, fixed[0].shape[0], (val_size,), generator=gen)
            self._val = {"x0": fixed[0][idx], "x1": fixed[1][idx]}
        self._save_target_spec()

    def _save_target_spec(self) -> None:
        """Record the target (as a ``{"class_path", "init_args"}`` spec of primitives) in the
        checkpoint's datamodule hyperparameters; a custom distribution that cannot be described
        is left out."""
        from fm_lightning.spec import to_spec

        try:
            spec = to_spec(self.target)
        except TypeError:
            return
        self.save_hyperparameters({"target": spec}, logger=False)

    def setup(self, stage: str | None = None) -> None:
        """Split the global ``batch_size`` over devices and accumulation steps; seed per rank."""
        if self.trainer is not None:
            self._train.rank = self.trainer.global_rank
            self._train.batch_size = per_device_batch_size(
                self.batch_size, self.trainer.world_size, self.trainer.accumulate_grad_batches
            )

    def state_dict(self) -> dict[str, int]:
        """Where the training stream stands: batches consumed per rank (one per step per
        accumulation), so a resumed run continues at the exact draw."""
        consumed = self.trainer.global_step * self.trainer.accumulate_grad_batches if self.trainer else 0
        return {"batches_consumed": consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._train.epoch, self._train.start = divmod(int(state["batches_consumed"]), self.steps_per_epoch)

    def _loader_objective(self) -> Any:
        """:attr:`objective`, else the trainer's model's, unless it must see the global batch."""
        objective = self.objective
        if objective is None and self.trainer is not None:
            objective = getattr(getattr(self.trainer, "lightning_module", None), "flow", None)
        coupling = getattr(objective, "coupling", None)
        if self.pairs is not None and coupling is not None and not isinstance(coupling, IndependentCoupling):
            raise ValueError(
                f"data.pairs are trained on whole, but this flow re-pairs them ({type(coupling).__name__}); "
                "use flow=icfm or flow=rf"
            )
        world = self.trainer.world_size if self.trainer is not None else 1
        return None if getattr(getattr(objective, "coupling", None), "global_batch", False) and world > 1 else objective

    def train_dataloader(self) -> DataLoader:
        self._train.objective = self._loader_objective()
        return _StreamLoader(self._train, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        n, b = self.val_size, self.batch_size
        batches = [{k: v[i : i + b] for k, v in self._val.items()} for i in range(0, n, b)]
        return DataLoader(batches, batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
