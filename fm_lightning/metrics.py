"""Sample-quality metrics, computed in fp32/fp64 on CPU."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import zipfile
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from .progress import num_examples, track
from .reliability import refused_global

__all__ = ["wasserstein2", "rbf_mmd2", "FID", "to_uint8", "fingerprint", "check_reference_path"]

#: torch-fidelity's Inception-v3 weights, which it downloads when no local file is given.
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS}"


def wasserstein2(x: Tensor, y: Tensor) -> float:
    """Exact 2-Wasserstein distance between two empirical sets (n, d) and (m, d) (POT ``emd2``).

    ``W2 = sqrt(min_pi sum_ij pi_ij ||x_i - y_j||^2)`` over couplings of uniform weights.
    """
    import ot

    x, y = x.detach().flatten(1).double().cpu(), y.detach().flatten(1).double().cpu()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"W2 needs equal dimensions, got {x.shape[1]} and {y.shape[1]}")
    cost = torch.cdist(x, y).square().numpy()
    a, b = np.full(len(x), 1.0 / len(x)), np.full(len(y), 1.0 / len(y))
    return float(np.sqrt(max(ot.emd2(a, b, cost, numItermax=10_000_000), 0.0)))


def rbf_mmd2(x: Tensor, y: Tensor, bandwidths: tuple[float, ...] | None = None) -> float:
    """Unbiased squared maximum mean discrepancy between (n, d) samples ``x`` and (m, d) reference samples ``y``.

    ``MMD^2 = E k(x, x') + E k(y, y') - 2 E k(x, y)`` with the multi-scale RBF kernel
    ``k(a, b) = sum_s exp(-||a - b||^2 / (2 s^2))`` over ``bandwidths``; the within-set terms
    leave out the diagonal (U-statistic), so the estimate is unbiased and may be slightly < 0.
    By default the bandwidths are 0.1, 0.2, 0.5, 1, 2 and 5 times the median distance between
    reference points, so the value does not depend on the data's units.
    """
    x, y = x.detach().flatten(1).double().cpu(), y.detach().flatten(1).double().cpu()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"MMD needs equal dimensions, got {x.shape[1]} and {y.shape[1]}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError("MMD needs at least 2 samples on each side")
    if bandwidths is not None and not all(s > 0 for s in bandwidths):
        raise ValueError(f"MMD bandwidths must be positive lengths, got {bandwidths}; or leave them out (None)")
    if bandwidths is None:
        median = float(torch.pdist(y[:1000]).median())
        bandwidths = tuple(f * median for f in (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)) if median > 0 else (1.0,)

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        sq = torch.cdist(a, b).square()
        return sum(torch.exp(-sq / (2 * s**2)) for s in bandwidths)

    n, m = len(x), len(y)
    kxx, kyy = kernel(x, x), kernel(y, y)
    term_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    term_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(term_x + term_y - 2 * kernel(x, y).mean())


def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1] (B, C, H, W) -> uint8 in [0, 255], as a saved PNG would hold them."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def fingerprint(module: torch.nn.Module) -> str:
    """A short hash of ``module``'s state dict (names, dtypes, shapes and values): two extractors
    of one class with other weights get other fingerprints."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}:{flat.dtype}:{tuple(value.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_reference_path(path: str | None) -> None:
    """Refuse a reference statistics path that names a folder (before any statistics are computed)."""
    if path is not None and os.path.isdir(path):
        raise ValueError(f"FID reference {path!r} is a folder; give the path of an .npz file, such as "
                         f"{os.path.join(path, 'reference.npz')}")


def _state_dict_mismatch(message: str) -> str:
    """One line of ``load_state_dict``'s error: how many keys are missing, unexpected or of
    another shape, with the first few names."""
    parts = []
    for what, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*)"),
                          ("unexpected", r"Unexpected key\(s\) in state_dict: (.*)")):
        found = re.search(pattern, message)
        names = re.findall(r'"([^"]+)"', found.group(1)) if found else []
        if names:
            parts.append(f"{len(names)} {what} keys ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    shapes = re.findall(r"size mismatch for ([^:]+):", message)
    if shapes:
        parts.append(f"{len(shapes)} of another shape ({', '.join(shapes[:3])}{', ...' if len(shapes) > 3 else ''})")
    return "; ".join(parts) or message.splitlines()[0]


def _check_weights_only(path: str) -> None:
    """Refuse a weights file that holds more than tensors before torch-fidelity unpickles it
    in full (``weights_only=False``), which would run any code a crafted file carries."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        named = refused_global(err)
        what = f"holds {named}, which is not loaded (unpickling could run code)" if named else "is not a torch file"
        raise ValueError(f"weights_path={path!r} {what}; give the path of a local copy of {INCEPTION_URL}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise ValueError(f"weights_path={path!r} is not readable ({type(err).__name__}: {str(err).splitlines()[0]}); "
                         f"give the path of a local copy of {INCEPTION_URL}") from None
    if not isinstance(state, dict):
        raise ValueError(f"weights_path={path!r} holds a {type(state).__name__}, not a state dict; give the path of "
                         f"a local copy of {INCEPTION_URL}")


class _Injected(torch.nn.Module):
    """Adapts a user's extractor to torchmetrics: uint8 in, ``extractor(x in [-1, 1])`` out."""

    def __init__(self, extractor: torch.nn.Module) -> None:
        super().__init__()
        self.extractor = extractor
        self.num_features = int(extractor.num_features)

    def forward(self, images: Tensor) -> Tensor:
        return self.extractor(images.float() / 127.5 - 1).flatten(1)


class FID:
    """Frechet distance between generated images and reference statistics, on torchmetrics'
    ``FrechetInceptionDistance``: ``||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))``.

    Images are given in [-1, 1] (B, C, H, W) and quantised to 8 bits first, as saved PNGs are.

    Under DDP each rank updates with its own share of the images; :meth:`compute` and
    :meth:`reference` sum the feature statistics of all ranks (torchmetrics' state sync). So that
    the sum stays right, reference statistics loaded from a file sit on rank zero only.

    Args:
        feature: ``2048`` (or 64/192/768) for the standard Inception-v3 features (needs
            ``torch-fidelity`` and its weights), or an ``nn.Module`` with an int attribute
            ``num_features`` that maps float images (B, C, H, W) in [-1, 1] to (B, num_features).
        weights_path: a local copy of torch-fidelity's Inception weights
            (``weights-inception-2015-12-05-6726825d.pth``, :data:`INCEPTION_URL`), for machines
            that cannot download them.

    Attributes:
        name: the extractor's identity, with a fingerprint of its weights; cached reference
            statistics of another are refused.
    """

    def __init__(self, feature: int | torch.nn.Module = 2048, weights_path: str | None = None) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.inception = isinstance(feature, int)
        if self.inception:
            if weights_path is not None and not os.path.isfile(weights_path):
                what = "is a folder" if os.path.isdir(weights_path) else "does not exist"
                raise FileNotFoundError(f"the Inception weights file weights_path={weights_path!r} {what}; give "
                                        f"the path of a local copy of {INCEPTION_URL}")
            if weights_path is not None:
                _check_weights_only(weights_path)
            try:
                self.metric = FrechetInceptionDistance(
                    feature=feature, reset_real_features=False, feature_extractor_weights_path=weights_path
                )
            except ModuleNotFoundError as err:
                raise ModuleNotFoundError(
                    f"FID with Inception features needs torch-fidelity ({err}); `pip install torch-fidelity`, "
                    "or inject a feature extractor (feature=<nn.Module>)"
                ) from err
            except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
                if weights_path is not None:
                    raise ValueError(
                        f"weights_path={weights_path!r} does not hold torch-fidelity's Inception-v3 weights "
                        f"({type(err).__name__}: {_state_dict_mismatch(str(err))}); give the path of a local copy "
                        f"of {INCEPTION_URL}"
                    ) from None
                raise ValueError(
                    f"cannot download the Inception-v3 weights ({type(err).__name__}: {str(err).splitlines()[0]}); "
                    f"without network access, give weights_path=<local copy of {INCEPTION_URL}>, or inject a "
                    "feature extractor"
                ) from err
            self.name = f"inception-v3-{feature}-{fingerprint(self.metric.inception)}"
        else:
            if not isinstance(getattr(feature, "num_features", None), int):
                raise TypeError(f"an injected FID feature extractor needs an int attribute num_features, got {feature!r}")
            self.name = (f"{type(feature).__module__}.{type(feature).__qualname__}-{feature.num_features}-"
                         f"{fingerprint(feature)}")
            self.metric = FrechetInceptionDistance(feature=_Injected(feature), reset_real_features=False)
        self.metric.eval()

    def to(self, device: torch.device | str) -> "FID":
        self.metric = self.metric.to(device)
        return self

    @property
    def has_reference(self) -> bool:
        """Whether any reference statistics are present (on this rank)."""
        return int(self.metric.real_features_num_samples) > 0

    @torch.no_grad()
    def update(self, images: Tensor, real: bool) -> None:
        """Add images (B, C, H, W) in [-1, 1] to the reference (``real``) or generated side."""
        images = to_uint8(images).to(self.metric.device)
        if self.inception and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        self.metric.update(images, real=real)

    def update_reference(self, batches: Iterable[dict[str, Tensor]], progress: bool = True) -> None:
        """Add the real images ``batch["x1"]`` (B, C, H, W) of every batch, e.g. of a datamodule's
        ``reference_dataloader()``, with a progress bar counted in images (``progress``)."""
        batches = track(batches, "FID reference statistics", num_examples(batches), advance=lambda b: len(b["x1"]),
                        unit="img", enabled=progress)
        for batch in batches:
            self.update(batch["x1"], real=True)

    def compute(self) -> float:
        """FID of everything added on all ranks; then forgets the generated side."""
        value = float(self.metric.compute())
        self.metric.reset()
        return value

    def reference(self) -> dict[str, np.ndarray]:
        """The reference statistics summed over ranks: ``mu`` (F,), ``sigma`` (F, F), ``n``."""
        m = self.metric
        with m.sync_context():
            n = int(m.real_features_num_samples)
            if n < 2:
                raise ValueError("reference statistics need at least 2 real images")
            mu = (m.real_features_sum / n).cpu()
            sigma = ((m.real_features_cov_sum.cpu() - n * torch.outer(mu, mu)) / (n - 1)).numpy()
        return {"mu": mu.numpy(), "sigma": sigma, "n": np.array(n)}

    def set_reference(self, mu: np.ndarray, sigma: np.ndarray, n: int, rank: int = 0) -> None:
        """Use fixed reference statistics (held by rank zero; other ranks hold zeros)."""
        m = self.metric
        mu_t = torch.as_tensor(np.asarray(mu), dtype=torch.float64, device=m.device).reshape(-1)
        sigma_t = torch.as_tensor(np.asarray(sigma), dtype=torch.float64, device=m.device)
        if mu_t.shape != m.real_features_sum.shape or sigma_t.shape != m.real_features_cov_sum.shape:
            raise ValueError(
                f"reference statistics have {mu_t.numel()} features but the extractor gives "
                f"{m.real_features_sum.numel()}"
            )
        n = max(int(n), 2)
        if rank == 0:
            m.real_features_sum = mu_t * n
            m.real_features_cov_sum = sigma_t * (n - 1) + n * torch.outer(mu_t, mu_t)
            m.real_features_num_samples = torch.tensor(n, device=m.device)
        else:
            m.real_features_sum = torch.zeros_like(mu_t)
            m.real_features_cov_sum = torch.zeros_like(sigma_t)
            m.real_features_num_samples = torch.tensor(0, device=m.device)

    def save_reference(self, path: str, source: str, rank: int = 0) -> None:
        """Write :meth:`reference` (with the extractor's and the images' names) to an ``.npz``.
        Under DDP every rank must call it (the statistics are summed); rank zero writes."""
        check_reference_path(path)
        stats = self.reference()
        if rank != 0:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp.npz"
        try:
            np.savez(tmp, **stats, extractor=np.array(self.name), source=np.array(source))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load_reference(self, path: str, source: str | None = None, num_images: int | None = None,
                       rank: int = 0) -> None:
        """Read statistics written by :meth:`save_reference` (or any ``.npz`` with ``mu`` and
        ``sigma``, such as pytorch-fid's); refuse ones made with another extractor, other data or
        (``num_images``) another number of images."""
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
            raise ValueError(f"FID reference file {path!r} is not a readable .npz ({type(err).__name__}: {err}); "
                             "delete it to recompute, or point reference at another file") from None
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError(f"FID reference file {path!r} holds one array, not an .npz with 'mu' and 'sigma'")
        with z:
            if "mu" not in z.files or "sigma" not in z.files:
                raise ValueError(f"FID reference file {path!r} must hold arrays 'mu' and 'sigma', has {z.files}")
            for key, expected in (("extractor", self.name), ("source", source)):
                if expected is not None and key in z.files and str(z[key]) != expected:
                    raise ValueError(
                        f"FID reference file {path!r} was made for {key} {str(z[key])!r}, not {expected!r}; "
                        "delete it to recompute, or point reference at another file"
                    )
            if num_images is not None and "n" in z.files and int(z["n"]) != num_images:
                raise ValueError(
                    f"FID reference file {path!r} holds the statistics of {int(z['n'])} images, not of the "
                    f"{num_images} asked for; ask for {int(z['n'])} (the FID callback's num_reference, fm-eval: "
                    "--num-reference), delete it to recompute, or point reference at another file"
                )
            self.set_reference(z["mu"], z["sigma"], int(z["n"]) if "n" in z.files else 50_000, rank)
