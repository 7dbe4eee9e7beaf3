"""Uncertainty over images: bootstrap confidence intervals and the convergence curve of the mean map.

Both work on the per-image maps of an ERF (``ERFResult.per_image_maps``, shape (N, h, w)), which the engine stores
after each protocol's per-image post-processing, so that the mean of a resample is the map the protocol would have
produced from those images.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["BootstrapResult", "bootstrap_maps", "ConvergenceCurve", "convergence_curve", "check_stack"]


def check_stack(per_image_maps, *, name: str = "per_image_maps") -> np.ndarray:
    """Return a finite, non-negative (N, h, w) stack as float64, or raise :class:`ValueError` saying what is wrong."""
    stack = np.asarray(per_image_maps)
    if stack.ndim != 3:
        raise ValueError(f"{name} must have shape (N, h, w), got {stack.shape}")
    if stack.shape[0] < 1 or stack.shape[1] < 1 or stack.shape[2] < 1:
        raise ValueError(f"{name} is empty: shape {stack.shape}")
    if not np.issubdtype(stack.dtype, np.number) or np.iscomplexobj(stack):
        raise ValueError(f"{name} must be a real numeric array, got dtype {stack.dtype}")
    stack = stack.astype(np.float64, copy=False)
    if not np.all(np.isfinite(stack)):
        bad = sorted({int(i) for i in np.argwhere(~np.isfinite(stack))[:, 0]})
        raise ValueError(f"{name} has non-finite values in images {bad[:10]}: reject those images first")
    if stack.min() < 0:
        raise ValueError(f"{name} has negative values (min {stack.min():.3g}): per-image maps must be non-negative")
    return stack


@dataclass(frozen=True)
class BootstrapResult:
    """Bootstrap over images (see :func:`bootstrap_maps`).

    ``estimate`` is the statistic on the mean of all images; ``samples`` the statistic on each resample (NaN where it
    could not be computed); ``intervals`` the percentile intervals over the finite samples (NaN when fewer than half
    of the resamples gave a finite value).
    """

    estimate: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    samples: dict[str, np.ndarray]
    n_resamples: int
    confidence: float
    seed: int | None
    num_images: int
    method: str = "percentile"

    @property
    def bias(self) -> dict[str, float]:
        """Bootstrap bias estimate: mean of the finite samples minus the estimate."""
        return {k: (float(np.mean(v[np.isfinite(v)])) - self.estimate[k]) if np.isfinite(v).any() else float("nan")
                for k, v in self.samples.items()}

    @property
    def standard_error(self) -> dict[str, float]:
        """Standard deviation of the finite samples."""
        return {k: float(np.std(v[np.isfinite(v)], ddof=1)) if np.isfinite(v).sum() > 1 else float("nan")
                for k, v in self.samples.items()}

    def to_dict(self) -> dict:
        return {
            "estimate": dict(self.estimate),
            "intervals": {k: list(v) for k, v in self.intervals.items()},
            "bias": self.bias, "standard_error": self.standard_error,
            "n_finite": {k: int(np.isfinite(v).sum()) for k, v in self.samples.items()},
            "n_resamples": self.n_resamples, "confidence": self.confidence, "seed": self.seed,
            "num_images": self.num_images, "method": self.method,
        }


def bootstrap_maps(per_image_maps, statistic: Callable[[np.ndarray], Mapping[str, float]], *,
                   n_resamples: int = 200, confidence: float = 0.95, seed: int | None = 0,
                   method: str = "percentile", with_standard_error: bool = False,
                   error_maps: np.ndarray | None = None) -> BootstrapResult:
    """Bootstrap over images of scalar statistics of the mean map.

    Parameters
    ----------
    per_image_maps : array_like, shape (N, h, w)
        Non-negative per-image maps.
    statistic : callable
        ``statistic(mean_map) -> {name: value}``; exceptions are not caught (make it return NaN for failures).
    n_resamples : int
        Number of resamples (images drawn with replacement, N per resample).
    confidence : float
        Coverage of the percentile intervals, e.g. 0.95.
    seed : int or None
        Seed of the NumPy generator that draws the resamples.
    method : {"percentile", "basic"}
        ``"percentile"``: the α/2 and 1−α/2 quantiles of the resampled statistic. ``"basic"``: those quantiles
        reflected about the estimate (2θ̂ − q_hi, 2θ̂ − q_lo), which corrects a bias of the statistic to first order
        (e.g. pixel noise lowering a shape score). With a biased statistic a percentile interval may not contain the
        estimate; ``BootstrapResult.bias`` says by how much the resamples are off.
    with_standard_error : bool
        Call ``statistic(mean_map, standard_error_map)`` with the per-pixel standard error of each resample's mean
        (√(sample variance over the resampled images / N)), for statistics that correct their own noise bias.
    error_maps : array_like, shape (N, h, w), optional
        With ``with_standard_error``: per-image maps whose spread over the resampled images gives the standard error
        (default ``per_image_maps``), e.g. the gain-adjusted maps
        (:func:`~erf_tools.analysis.noise.gain_adjusted_stack`) for statistics that do not change when the map is
        rescaled.

    Returns
    -------
    BootstrapResult

    Examples
    --------
    >>> maps = np.stack([np.full((4, 4), v) for v in (1.0, 2.0, 3.0)])
    >>> res = bootstrap_maps(maps, lambda m: {"mean": float(m.mean())}, n_resamples=50)
    >>> res.estimate["mean"], 1.0 <= res.intervals["mean"][0] <= res.intervals["mean"][1] <= 3.0
    (2.0, True)
    """
    stack = check_stack(per_image_maps)
    if method not in ("percentile", "basic"):
        raise ValueError(f"method must be 'percentile' or 'basic', got {method!r}")
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n = stack.shape[0]
    flat = stack.reshape(n, -1)
    if error_maps is not None:
        errors = np.asarray(error_maps, dtype=np.float64).reshape(n, -1)
        if errors.shape != flat.shape:
            raise ValueError(f"error_maps must have the per-image maps' shape {stack.shape}, got "
                             f"{np.shape(error_maps)}")
    else:
        errors = flat
    squares = errors * errors if with_standard_error else None

    def call(weights):
        mean = np.einsum("i,ij->j", weights, flat)
        if not with_standard_error:
            return statistic(mean.reshape(stack.shape[1:]))
        centre = mean if errors is flat else np.einsum("i,ij->j", weights, errors)
        var = np.maximum(np.einsum("i,ij->j", weights, squares) - centre * centre, 0.0) * n / max(n - 1, 1)
        return statistic(mean.reshape(stack.shape[1:]), np.sqrt(var / n).reshape(stack.shape[1:]))

    estimate = {k: float(v) for k, v in call(np.full(n, 1.0 / n)).items()}
    rng = np.random.default_rng(seed)
    samples = {k: np.full(int(n_resamples), np.nan) for k in estimate}
    for b in range(int(n_resamples)):
        weights = np.bincount(rng.integers(0, n, size=n), minlength=n) / n
        # einsum, not BLAS: a (1×N)·(N×P) product is memory-bound and BLAS threads only add contention
        for k, v in call(weights).items():
            if k in samples:
                samples[k][b] = float(v)
    alpha = (1 - confidence) / 2
    intervals = {}
    for k, values in samples.items():
        finite = values[np.isfinite(values)]
        if finite.size >= max(1, values.size / 2):
            low, high = float(np.quantile(finite, alpha)), float(np.quantile(finite, 1 - alpha))
            if method == "basic":
                low, high = 2 * estimate[k] - high, 2 * estimate[k] - low
            intervals[k] = (low, high)
        else:
            intervals[k] = (float("nan"), float("nan"))
    return BootstrapResult(estimate=estimate, intervals=intervals, samples=samples, n_resamples=int(n_resamples),
                           confidence=float(confidence), seed=seed, num_images=n, method=method)


@dataclass(frozen=True)
class ConvergenceCurve:
    """How the mean map approaches the all-image mean as images are added (see :func:`convergence_curve`)."""

    num_images: np.ndarray
    distance: np.ndarray
    spread: np.ndarray
    tolerance: float
    converged_at: int | None
    images_needed: float

    def to_dict(self) -> dict:
        return {"num_images": self.num_images.tolist(), "hellinger_to_final": self.distance.tolist(),
                "spread": self.spread.tolist(), "tolerance": self.tolerance, "converged_at": self.converged_at,
                "images_needed": self.images_needed}


def _hellinger_rows(maps: np.ndarray, reference: np.ndarray) -> np.ndarray:
    sums = maps.sum(axis=1, keepdims=True)
    p = np.divide(maps, sums, out=np.zeros_like(maps), where=sums > 0)
    q = reference / reference.sum()
    bc = np.sqrt(p * q[None, :]).sum(axis=1)
    h = np.sqrt(np.clip(1.0 - bc, 0.0, 1.0))
    h[sums[:, 0] <= 0] = 1.0
    return h


def convergence_curve(per_image_maps, *, tolerance: float = 0.05, n_orders: int = 5, seed: int | None = 0,
                      max_points: int = 32) -> ConvergenceCurve:
    """Hellinger distance between the mean of the first n images and the mean of all N, for growing n.

    The images are taken in ``n_orders`` random orders and the distances averaged. ``converged_at`` is the smallest n
    from which the mean distance stays ≤ ``tolerance``. Because the n-image mean is compared with the N-image mean it
    reaches 0 at n = N by construction; ``images_needed`` corrects for that: with d(n)² ≈ c²(1/n − 1/N) (sampling
    without replacement), it is the n at which c/√n = ``tolerance``, i.e. how many images the map needs before it
    stops changing by more than the tolerance (inf when N = 1 gives no information, NaN for an empty stack).

    Parameters
    ----------
    per_image_maps : array_like, shape (N, h, w)
    tolerance : float
        Hellinger distance regarded as "no longer changing".
    n_orders : int
        Random image orders averaged.
    seed : int or None
    max_points : int
        At most this many values of n (geometrically spaced, always including 1 and N).

    Returns
    -------
    ConvergenceCurve
    """
    stack = check_stack(per_image_maps)
    if not tolerance > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance}")
    n = stack.shape[0]
    flat = stack.reshape(n, -1)
    final = flat.sum(axis=0)
    points = np.unique(np.round(np.geomspace(1, n, num=min(max_points, n))).astype(int))
    if final.sum() <= 0:
        nan = np.full(points.size, np.nan)
        return ConvergenceCurve(points, nan, nan, float(tolerance), None, float("nan"))
    rng = np.random.default_rng(seed)
    distances = np.empty((max(1, int(n_orders)), points.size))
    for k in range(distances.shape[0]):
        order = rng.permutation(n)
        running = np.empty((points.size, flat.shape[1]))
        total, done = np.zeros(flat.shape[1]), 0
        for j, upto in enumerate(points):  # running sums at the sampled n only (no N×P cumulative array)
            total += flat[order[done:upto]].sum(axis=0)
            running[j], done = total, upto
        distances[k] = _hellinger_rows(running, final)
    mean = distances.mean(axis=0)
    spread = distances.std(axis=0)
    above = np.nonzero(mean > tolerance)[0]
    converged_at = int(points[above[-1] + 1]) if above.size and above[-1] + 1 < points.size else (
        int(points[0]) if not above.size else None)
    usable = points < n
    if usable.any():
        x = 1.0 / points[usable] - 1.0 / n
        c2 = float((x * mean[usable] ** 2).sum() / (x * x).sum())
        images_needed = c2 / tolerance**2 if c2 > 0 else 1.0
    else:
        images_needed = float("inf")
    return ConvergenceCurve(points, mean, spread, float(tolerance), converged_at, float(images_needed))
