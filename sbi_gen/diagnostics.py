r"""Calibration diagnostics for any posterior of the package: SBC, coverage, TARP, C2ST, PPC.

Every diagnostic takes a :class:`BatchedPosterior`, the interface "posteriors of many
observations at once" built from an :class:`~sbi_gen.inference.NPE` (one batched pass of
the estimator per group of observations), an :class:`~sbi_gen.inference.NLE` (vectorized
MCMC per observation: costly, documented on :func:`as_batched_posterior`) or two plain
functions (analytic posteriors, other packages).

The checks, with :math:`N` held-out pairs :math:`(\theta_i, x_i)` simulated from the prior:

- :func:`sbc` — simulation-based calibration (Talts et al. 2018): the rank of each
  :math:`\theta_{i,d}` among :math:`L` posterior draws is uniform on :math:`\{0..L\}` for
  the true posterior; tested by a :math:`\chi^2` test on binned ranks and a
  Kolmogorov–Smirnov test on the randomized PIT :math:`(r + U)/(L + 1)`.
- :func:`expected_coverage` — coverage of highest-posterior-density regions at every
  credible level: the share of posterior mass denser than the truth,
  :math:`\alpha_i = P_{\theta \sim q(\cdot \mid x_i)}[q(\theta \mid x_i) > q(\theta_i \mid x_i)]`,
  is uniform for the true posterior, and the coverage curve is its empirical CDF. Below
  the diagonal: over-confident (or biased); above: under-confident (conservative).
  Without ``log_prob`` a leave-one-out kernel density over the pooled truth and draws takes
  its place (exchangeable, so still exactly uniform under calibration).
- :func:`tarp` — Tests of Accuracy with Random Points (Lemos et al. 2023): with a random
  reference point :math:`\theta_r`, the share of draws closer to it than the truth is uniform
  for the true posterior; the expected-coverage-probability curve is its CDF.
- :func:`c2st_scores` — classifier two-sample test against reference posterior samples
  (sbibm's definition, :func:`sbi_gen.c2st.c2st`), per observation.
- :func:`posterior_predictive_check` — simulate from posterior draws and compare with
  :math:`x_o`: per-observable predictive p-values and standardized distances, and a
  Mahalanobis-distance p-value for the whole vector.

Verdicts use a family-wise level ``alpha`` (default 0.01) with a Bonferroni correction over
the tests made, so a calibrated posterior fails with probability at most ``alpha``.

Example:
    >>> import torch
    >>> # θ ~ N(0, 1), x | θ ~ N(θ, 1): the exact posterior is N(x / 2, 1 / 2)
    >>> exact = gaussian_posterior(lambda x: x / 2, lambda x: torch.full_like(x, 0.5**0.5))
    >>> theta = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    >>> x = theta + torch.randn(500, 2, generator=torch.Generator().manual_seed(1))
    >>> sbc(exact, theta, x, n_samples=100, seed=0).passed
    True
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from sbi_gen.c2st import c2st

__all__ = [
    "BatchedPosterior",
    "CoverageResult",
    "Draws",
    "PPCResult",
    "SBCResult",
    "TARPResult",
    "as_batched_posterior",
    "binomial_band",
    "c2st_scores",
    "central_interval_coverage",
    "expected_coverage",
    "gaussian_posterior",
    "hpd_level",
    "posterior_draws",
    "posterior_predictive_check",
    "sbc",
    "tarp",
]

SampleFn = Callable[[Tensor, int, int], Tensor]
"""``(x (B, *x_shape), n, seed) -> theta (n, B, D)``."""
LogProbFn = Callable[[Tensor, Tensor], Tensor]
"""``(theta (n, B, D), x (B, *x_shape)) -> (n, B)``, normalized or up to a per-observation constant."""

DEFAULT_ALPHA = 0.01


@dataclass(frozen=True)
class BatchedPosterior:
    """Posteriors of many observations at once, the interface of every diagnostic.

    Attributes:
        sample: ``(x (B, *x_shape), n, seed) -> (n, B, D)`` posterior draws per observation.
        log_prob: ``(theta (n, B, D), x (B, *x_shape)) -> (n, B)`` log-densities; a constant per
            observation may be missing (only orderings within an observation are used).
            ``None`` when unavailable (coverage then falls back to a kernel density).
        name: A label for reports and legends.
        sample_and_log_prob: Optional ``(x, n, seed) -> (draws, log_prob)`` in one pass (flows
            give the density of their own draws for free); must draw what ``sample`` draws.
    """

    sample: SampleFn
    log_prob: LogProbFn | None = None
    name: str = "posterior"
    sample_and_log_prob: Callable[[Tensor, int, int], tuple[Tensor, Tensor]] | None = None


def _as_tensor(value: Any, dtype: torch.dtype = torch.float32) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().to(dtype)
    return torch.as_tensor(np.asarray(value), dtype=dtype)


def as_batched_posterior(
    model: Any,
    *,
    batch_size: int = 64,
    mcmc_options: dict[str, Any] | None = None,
) -> BatchedPosterior:
    r"""The :class:`BatchedPosterior` of a fitted :class:`~sbi_gen.inference.NPE` or :class:`~sbi_gen.inference.NLE`.

    NPE: draws come from ``batch_size`` observations per estimator pass, all inside the
    prior's support (without the bijection, draws outside are replaced by further draws for
    the same observation, as :meth:`~sbi_gen.inference.NPE.sample_batched` does);
    ``log_prob`` is the estimator's density inside the support and ``-inf`` outside (not
    renormalized: the diagnostics compare densities within one observation). SBC with 1,000
    observations × 1,000 draws is 1,000,000 flow samples.

    NLE: each observation runs its own vectorized MCMC (:meth:`~sbi_gen.inference.NLE.posterior`'s
    default, independence Metropolis-Hastings with ``clip(n / 40, 100, 250)`` chains and 30
    warm-up steps, thinned by 3 so that ranks are not distorted by rejections; ``mcmc_options``
    override it): about ``3 n + 30 C`` likelihood rows per observation after 10,000 for the
    chains' start, a fraction of a second to seconds each, so use tens to hundreds of
    observations, not thousands.
    ``log_prob`` is the unnormalized :math:`\log p(\theta) + \log q(x \mid \theta)`.

    Anything that already is a :class:`BatchedPosterior` is returned unchanged.

    Example:
        >>> post = as_batched_posterior(npe)  # doctest: +SKIP
        >>> post.sample(x_test[:10], 100, 0).shape  # doctest: +SKIP
        torch.Size([100, 10, 3])
    """
    if isinstance(model, BatchedPosterior):
        return model
    method = getattr(model, "method", None)
    if method == "npe":
        return _npe_posterior(model, batch_size)
    if method == "nle":
        return _nle_posterior(model, dict(mcmc_options or {}))
    raise TypeError(f"cannot diagnose {type(model).__name__}: expected a fitted NPE, NLE or a BatchedPosterior")


def _npe_posterior(npe: Any, batch_size: int) -> BatchedPosterior:
    estimator = npe._require_fitted()
    device = npe.device

    @torch.no_grad()
    def sample_and_log_prob(x: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor]:
        x = _as_tensor(x)
        draws, log_q = [], []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(x), batch_size):
                dist = estimator(x[start : start + batch_size].to(device))
                if npe.bijection:
                    theta, log_prob = dist.sample_and_log_prob((n,))
                else:  # truncated to the support: rejected draws are replaced, then evaluated
                    theta = npe._draw_inside(dist, n)
                    log_prob = dist.log_prob(theta)
                draws.append(theta.cpu())
                log_q.append(log_prob.cpu())
        return torch.cat(draws, dim=1), torch.cat(log_q, dim=1)

    def sample(x: Tensor, n: int, seed: int) -> Tensor:
        return sample_and_log_prob(x, n, seed)[0]

    @torch.no_grad()
    def log_prob(theta: Tensor, x: Tensor) -> Tensor:
        theta, x = _as_tensor(theta), _as_tensor(x)
        out = []
        for start in range(0, len(x), batch_size):
            stop = start + batch_size
            dist = estimator(x[start:stop].to(device))
            out.append(dist.log_prob(theta[:, start:stop].to(device)).cpu())
        log_q = torch.cat(out, dim=1)
        if npe.bijection:
            return log_q
        return torch.where(npe.inside_support(theta), log_q, torch.full_like(log_q, -math.inf))

    return BatchedPosterior(sample, log_prob, f"NPE ({npe.estimator_name})", sample_and_log_prob)


def _nle_posterior(nle: Any, options: dict[str, Any]) -> BatchedPosterior:
    nle._require_fitted()
    prior = nle.prior

    def sample(x: Tensor, n: int, seed: int) -> Tensor:
        x = _as_tensor(x)
        draws, worst_rhat = [], []
        # One summary warning for the whole batch instead of one per observation.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="MCMC chains have not mixed")
            for i in range(len(x)):
                posterior = nle.posterior(x[i], seed=seed + i, **options)
                draws.append(posterior.sample((n,)).cpu())
                worst_rhat.append(float(posterior.mcmc.rhat.max()) if posterior.mcmc is not None else math.nan)
        unmixed = [r for r in worst_rhat if r > 1.05]
        if unmixed:
            warnings.warn(
                f"MCMC chains have not mixed for {len(unmixed)} of {len(x)} observations (R-hat up to {max(unmixed):.3f}); "
                "raise mcmc_options['warmup'] or check for multimodal posteriors",
                stacklevel=2,
            )
        return torch.stack(draws, dim=1)

    @torch.no_grad()
    def log_prob(theta: Tensor, x: Tensor) -> Tensor:
        theta, x = _as_tensor(theta), _as_tensor(x)
        n, b, d = theta.shape
        estimator = nle.estimator
        flat = theta.reshape(n * b, d)
        log_prior = prior.log_prob(flat).reshape(n, b)
        log_lik = estimator(flat.to(nle.device)).log_prob(x.to(nle.device).repeat(n, 1)).cpu().reshape(n, b)
        return log_prior + log_lik

    return BatchedPosterior(sample, log_prob, name=f"NLE ({nle.estimator_name})")


def gaussian_posterior(
    mean: Callable[[Tensor], Tensor],
    scale: Callable[[Tensor], Tensor],
    name: str = "Gaussian",
) -> BatchedPosterior:
    r"""A diagonal-Gaussian :class:`BatchedPosterior` :math:`\mathcal{N}(m(x), \mathrm{diag}(s(x))^2)`.

    For analytic posteriors and for testing the diagnostics: scaling ``scale`` by 0.5 makes an
    over-confident posterior, shifting ``mean`` a biased one.

    Example:
        >>> post = gaussian_posterior(lambda x: x, lambda x: torch.ones_like(x))
        >>> post.sample(torch.zeros(4, 2), 10, 0).shape
        torch.Size([10, 4, 2])
    """

    def sample(x: Tensor, n: int, seed: int) -> Tensor:
        x = _as_tensor(x)
        m, s = mean(x), scale(x)
        noise = torch.randn((n, *m.shape), generator=torch.Generator().manual_seed(seed), dtype=m.dtype)
        return m + s * noise

    def log_prob(theta: Tensor, x: Tensor) -> Tensor:
        x = _as_tensor(x)
        return torch.distributions.Normal(mean(x), scale(x)).log_prob(_as_tensor(theta)).sum(-1)

    return BatchedPosterior(sample, log_prob, name=name)


def _check_pairs(theta: Any, x: Any) -> tuple[Tensor, Tensor]:
    theta, x = _as_tensor(theta), _as_tensor(x)
    if theta.ndim != 2:
        raise ValueError(f"theta must have shape (N, D), got {tuple(theta.shape)}")
    if len(x) != len(theta):
        raise ValueError(f"theta has {len(theta)} rows but x has {len(x)}")
    if len(theta) < 2:
        raise ValueError(f"need at least 2 held-out simulations, got {len(theta)}")
    finite = torch.isfinite(theta).all(1) & torch.isfinite(x.reshape(len(x), -1)).all(1)
    if not bool(finite.all()):
        raise ValueError(f"{int((~finite).sum())} held-out simulations contain NaN or inf; drop invalid rows first")
    return theta, x


def _check_count(name: str, value: int, least: int = 1) -> int:
    if int(value) != value or value < least:
        raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}")
    return int(value)


def _check_alpha(alpha: float) -> float:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha is a significance level and must lie strictly between 0 and 1, got {alpha!r}")
    return float(alpha)


def _check_names(names: Sequence[str] | None, count: int, what: str) -> list[str] | None:
    if names is None:
        return None
    names = list(names)
    if len(names) != count:
        raise ValueError(f"names has {len(names)} entries but there are {count} {what}")
    return names


@dataclass
class Draws:
    """Posterior draws for many observations, shared by several diagnostics (draw once, test thrice).

    Attributes:
        samples: ``(L, N, D)`` draws.
        log_prob: ``(L, N)`` their log-densities, or ``None``.
        seed: The seed they were drawn with.
        seconds: Time spent drawing.
        x_fingerprint: A digest of the observations they were drawn for (see :func:`posterior_draws`),
            so that a diagnostic given other ``x`` refuses them; ``None`` skips that check.
    """

    samples: Tensor
    log_prob: Tensor | None
    seed: int
    seconds: float = 0.0
    x_fingerprint: str | None = field(default=None, repr=False)


def _fingerprint(x: Tensor) -> str:
    """A digest of the values of observations ``x`` as the diagnostics read them (float32).

    The shape is left out: ``(N,)`` and ``(N, 1)`` hold the same observations.
    """
    values = np.ascontiguousarray(x.detach().to(torch.float32).cpu().numpy())
    return hashlib.blake2b(values, digest_size=16).hexdigest()  # hashes the buffer, no copy


def posterior_draws(
    posterior: Any, x: Any, n_samples: int, *, seed: int = 0, with_log_prob: bool = True
) -> Draws:
    """Draws ``n_samples`` posterior samples for each observation in ``x`` (and their log-densities).

    Pass the result as ``draws=`` to :func:`sbc`, :func:`expected_coverage` and :func:`tarp`
    to run all three on the same draws: they are then identical to separate calls with the same
    ``seed``, at a third of the cost.

    Example:
        >>> post = gaussian_posterior(lambda x: x / 2, lambda x: torch.full_like(x, 0.5**0.5))
        >>> posterior_draws(post, torch.zeros(4, 2), 10).samples.shape
        torch.Size([10, 4, 2])
    """
    started = time.perf_counter()
    n_samples = _check_count("n_samples", n_samples)
    posterior = as_batched_posterior(posterior)
    x = _as_tensor(x)
    if x.ndim == 0:
        raise ValueError("x must be observations (N, *x_shape), got a scalar")
    # Otherwise the estimator's draws leave the prior and the message blames the training.
    not_finite = int((~torch.isfinite(x.flatten(1) if x.ndim > 1 else x[:, None]).all(1)).sum())
    if not_finite:
        raise ValueError(f"{not_finite} of {len(x)} observations contain NaN or inf; drop invalid rows first")
    stream = _derived_seed(seed, "posterior")
    log_q = None
    if with_log_prob and posterior.sample_and_log_prob is not None:
        samples, log_q = (_as_tensor(v) for v in posterior.sample_and_log_prob(x, n_samples, stream))
    else:
        samples = _as_tensor(posterior.sample(x, n_samples, stream))
        if with_log_prob and posterior.log_prob is not None and samples.ndim == 3:
            log_q = _as_tensor(posterior.log_prob(samples, x), torch.float64)
    if samples.ndim != 3 or samples.shape[:2] != (n_samples, len(x)):
        raise ValueError(
            f"the posterior returned samples of shape {tuple(samples.shape)}; expected ({n_samples}, {len(x)}, D)"
        )
    if not bool(torch.isfinite(samples).all()):
        raise ValueError("the posterior returned NaN or infinite samples")
    return Draws(samples, log_q, seed, time.perf_counter() - started, _fingerprint(x))


def _draws(
    posterior: BatchedPosterior, x: Tensor, n_samples: int, seed: int, dim: int, draws: Draws | None = None,
    with_log_prob: bool = False, dim_of: str = "theta",
) -> Draws:
    """The draws a diagnostic uses: ``draws`` when given (checked), else ``n_samples`` fresh ones per ``x``."""
    if draws is not None:
        return _check_given_draws(draws, x, dim)
    draws = posterior_draws(posterior, x, n_samples, seed=seed, with_log_prob=with_log_prob)
    if draws.samples.shape[2] != dim:
        raise ValueError(
            f"the posterior returned samples of shape {tuple(draws.samples.shape)}; expected "
            f"({n_samples}, {len(x)}, {dim}), as {dim_of} has {dim} parameters"
        )
    return draws


def _check_given_draws(draws: Any, x: Tensor, dim: int) -> Draws:
    """Refuses ``draws=`` that do not fit the held-out ``x`` (``len(x) == len(theta)``) and ``theta``'s ``dim``.

    Draws of other observations give ranks and coverage that look plausible but mean nothing, so
    the count, the dimension and (when the draws carry it) the fingerprint of ``x`` must match.
    """
    fix = "pass the draws of these observations (diagnostics.posterior_draws(model, x, n_samples))"
    samples = getattr(draws, "samples", None)  # duck-typed: a reloaded module makes a new Draws class
    if not isinstance(samples, Tensor):
        raise TypeError(f"draws must be the Draws that diagnostics.posterior_draws returns, got {type(draws).__name__}")
    if samples.ndim != 3 or len(samples) == 0:
        raise ValueError(f"draws.samples must have shape (n_samples >= 1, N, D), got {tuple(samples.shape)}")
    n_draws, n_obs, n_params = samples.shape
    if n_obs != len(x):
        raise ValueError(f"draws hold posterior draws for {n_obs} observations, but theta has {len(x)} rows: {fix}")
    if n_params != dim:
        raise ValueError(
            f"draws hold {n_params} parameters per draw, but theta has {dim} columns: pass draws of the posterior "
            "of these parameters (diagnostics.posterior_draws(model, x, n_samples))"
        )
    log_prob = getattr(draws, "log_prob", None)
    if log_prob is not None and tuple(log_prob.shape) != (n_draws, n_obs):
        raise ValueError(f"draws.log_prob must have shape ({n_draws}, {n_obs}), one per draw, got {tuple(log_prob.shape)}")
    if not bool(torch.isfinite(samples).all()):
        raise ValueError("draws contain NaN or infinite samples")
    fingerprint = getattr(draws, "x_fingerprint", None)
    if fingerprint is not None and fingerprint != _fingerprint(x):
        raise ValueError(f"draws were drawn for other observations than this x (same number, different values): {fix}")
    return draws


def _derived_seed(seed: int, stream: str) -> int:
    """A seed for one named random stream of a diagnostic, hashed from the user's ``seed``.

    Generators seeded with ``seed`` itself would replay the streams that made the test data
    when the user seeded those with the same small integers (references equal to noise).
    """
    entropy = [int(seed) & 0xFFFFFFFF, *stream.encode()]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def _generator(seed: int, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(_derived_seed(seed, stream))


def _randomized_pit(counts: Tensor, n: int, generator: torch.Generator) -> np.ndarray:
    """``(counts + U) / (n + 1)``: exactly Uniform(0, 1) when ``counts`` is uniform on ``{0..n}``."""
    u = torch.rand(counts.shape, generator=generator, dtype=torch.float64)
    return ((counts.to(torch.float64) + u) / (n + 1)).numpy()


def _ks_p_value(values: np.ndarray) -> float:
    return float(stats.kstest(values, "uniform").pvalue)


def _calibration_curve(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Empirical CDF of ``values (N,)`` at ``levels``."""
    return (values[:, None] <= levels[None, :]).mean(axis=0)


def binomial_band(n: int, levels: np.ndarray, confidence: float = 0.99) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise central binomial interval of an empirical CDF of ``n`` uniforms at ``levels``."""
    lower = stats.binom.ppf((1 - confidence) / 2, n, levels) / n
    upper = stats.binom.ppf((1 + confidence) / 2, n, levels) / n
    return lower, upper


# ------------------------------------------------------------------------------------- SBC


@dataclass
class SBCResult:
    """Ranks and uniformity tests of simulation-based calibration.

    Attributes:
        ranks: ``(N, D)`` number of posterior draws below the true value, in ``{0..n_samples}``.
        n_samples: Posterior draws per observation.
        chi2_p_values: ``(D,)`` p-values of the χ² test of binned ranks against uniform.
        ks_p_values: ``(D,)`` p-values of the Kolmogorov–Smirnov test of the randomized PIT.
        n_bins: Bins of the χ² test (and of the rank histograms).
        names: Parameter names.
        alpha: Family-wise level of the verdict.
        seconds: Wall time (sampling included).
    """

    ranks: np.ndarray
    n_samples: int
    chi2_p_values: np.ndarray
    ks_p_values: np.ndarray
    n_bins: int
    names: list[str]
    alpha: float = DEFAULT_ALPHA
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """No test rejects uniformity at the Bonferroni-corrected level ``alpha / (2 D)``."""
        p = np.concatenate([self.chi2_p_values, self.ks_p_values])
        return bool((p > self.alpha / len(p)).all())

    @property
    def failing(self) -> list[str]:
        threshold = self.alpha / (2 * len(self.names))
        bad = (self.chi2_p_values <= threshold) | (self.ks_p_values <= threshold)
        return [name for name, b in zip(self.names, bad) if b]

    @property
    def verdict(self) -> str:
        n = len(self.ranks)
        if self.passed:
            return f"SBC: passed — ranks are uniform for every parameter ({n} simulations, {self.n_samples} draws each)"
        return f"SBC: FAILED — ranks are not uniform for {', '.join(self.failing)} ({n} simulations, level {self.alpha})"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ranks"] = self.ranks.tolist()
        out["chi2_p_values"] = self.chi2_p_values.tolist()
        out["ks_p_values"] = self.ks_p_values.tolist()
        out.update(passed=self.passed, verdict=self.verdict)
        return out


def hpd_level(sample_log_probs: torch.Tensor, truth_log_prob: torch.Tensor) -> float:
    """The credibility of the smallest highest-posterior-density region holding the truth: the
    share of posterior draws denser than it. Uniform on [0, 1] over data drawn from the prior
    when the posterior is calibrated (the statistic :func:`expected_coverage` tests over many observations).

    Example:
        >>> normal = torch.distributions.Normal(0.0, 1.0)
        >>> draws = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
        >>> round(hpd_level(normal.log_prob(draws), normal.log_prob(torch.tensor(1.0))), 2)  # one sd out
        0.68
    """
    return float((sample_log_probs > truth_log_prob).double().mean())


def central_interval_coverage(ranks: Any, n_samples: int, levels: Sequence[float] = (0.68, 0.95)) -> np.ndarray:
    """Share of held-out truths inside the central ``level`` interval of their posterior draws.

    From SBC ranks (draws below the truth, in ``{0..n_samples}``): the truth is inside when its
    mid-rank quantile ``(r + 0.5) / (n_samples + 1)`` lies within ``level / 2`` of 0.5. For a
    calibrated posterior each share is ``level`` up to the binomial error
    ``sqrt(level (1 - level) / N)``.

    Returns:
        ``(len(levels), D)`` shares.

    Example:
        >>> central_interval_coverage(np.array([[10], [50], [90]]), 100).round(2).tolist()
        [[0.33], [1.0]]
    """
    quantile = (np.asarray(ranks, dtype=float) + 0.5) / (n_samples + 1)
    return np.stack([np.mean(np.abs(quantile - 0.5) <= level / 2, axis=0) for level in levels])


def _chi2_uniform_ranks(ranks: np.ndarray, n_samples: int, n_bins: int) -> np.ndarray:
    """χ² p-values per column of ``ranks (N, D)`` against uniform on ``{0..n_samples}``, binned."""
    edges = np.linspace(0, n_samples + 1, n_bins + 1)
    # Each bin holds the integer ranks in [edge_k, edge_k+1): expected counts follow their number.
    per_bin = np.diff(np.ceil(edges))
    expected = len(ranks) * per_bin / (n_samples + 1)
    p_values = []
    for column in ranks.T:
        observed = np.histogram(column, bins=np.ceil(edges) - 0.5)[0]
        p_values.append(stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue)
    return np.asarray(p_values, dtype=float)


def sbc(
    posterior: Any,
    theta: Any,
    x: Any,
    *,
    n_samples: int = 1000,
    n_bins: int | None = None,
    seed: int = 0,
    names: Sequence[str] | None = None,
    alpha: float = DEFAULT_ALPHA,
    draws: Draws | None = None,
) -> SBCResult:
    r"""Simulation-based calibration of ``posterior`` on held-out pairs ``(theta, x)``.

    Arguments:
        posterior: A :class:`BatchedPosterior`, NPE or NLE.
        theta: ``(N, D)`` parameters drawn from the prior the posterior was trained with.
        x: ``(N, *x_shape)`` their simulations.
        n_samples: Posterior draws per observation :math:`L` (ranks lie in ``{0..L}``).
        n_bins: Bins of the χ² test, from 2 to the ``n_samples + 1`` possible ranks; default
            ``min(20, N // 10, n_samples + 1)`` (at least 5 expected per bin).
        seed: Seed of the posterior draws and of the PIT randomization.
        names: Parameter names (default ``theta_1 ...``).
        alpha: Family-wise level of the verdict.
        draws: Posterior draws from :func:`posterior_draws` for these ``x`` (then ``n_samples``
            and the seed of the draws are theirs), to share them between diagnostics.

    Returns:
        :class:`SBCResult`.

    Example:
        >>> narrow = gaussian_posterior(lambda x: x / 2, lambda x: torch.full_like(x, 0.5 * 0.5**0.5))
        >>> theta = torch.randn(1000, 1, generator=torch.Generator().manual_seed(0))
        >>> x = theta + torch.randn(1000, 1, generator=torch.Generator().manual_seed(1))
        >>> sbc(narrow, theta, x, n_samples=100).passed  # over-confident: posterior scale x 0.5
        False
    """
    started = time.perf_counter()
    alpha = _check_alpha(alpha)
    posterior = as_batched_posterior(posterior)
    theta, x = _check_pairs(theta, x)
    n, dim = theta.shape
    names = _check_names(names, dim, "parameters") or [f"theta_{d + 1}" for d in range(dim)]
    draws = _draws(posterior, x, n_samples, seed, dim, draws)
    n_samples = len(draws.samples)
    ranks = (draws.samples < theta[None]).sum(0)  # (N, D)
    # A bin holding no possible rank would have zero expected count (χ² p-value NaN).
    if n_bins is None:
        n_bins = max(2, min(20, n // 10, n_samples + 1))
    elif int(n_bins) != n_bins or not 2 <= n_bins <= n_samples + 1:
        raise ValueError(f"n_bins must be an integer from 2 to the {n_samples + 1} possible ranks, got {n_bins!r}")
    n_bins = int(n_bins)
    pit = _randomized_pit(ranks, n_samples, _generator(seed, "pit"))
    return SBCResult(
        ranks=ranks.numpy().astype(np.int64),
        n_samples=n_samples,
        chi2_p_values=_chi2_uniform_ranks(ranks.numpy(), n_samples, n_bins),
        ks_p_values=np.array([_ks_p_value(pit[:, d]) for d in range(dim)]),
        n_bins=n_bins,
        names=names,
        alpha=alpha,
        seconds=time.perf_counter() - started,
    )


# -------------------------------------------------------------------- coverage and TARP


@dataclass
class CoverageResult:
    """An expected-coverage curve and its test.

    Attributes:
        levels: Credible levels ``(L,)`` from 0 to 1.
        coverage: Share of held-out truths inside the region of each level ``(L,)``.
        statistic: ``(N,)`` per observation, the smallest level whose region holds the truth
            (uniform on (0, 1) for a calibrated posterior).
        p_value: Kolmogorov–Smirnov p-value of ``statistic`` against uniform.
        area: :math:`\\int_0^1 (\\mathrm{coverage} - \\alpha)\\, d\\alpha`; negative when
            over-confident, positive when under-confident.
        method: ``"hpd"`` (log_prob), ``"hpd-kde"`` (kernel density fallback) or ``"tarp"``.
        alpha: Level of the verdict.
        seconds: Wall time.
    """

    levels: np.ndarray
    coverage: np.ndarray
    statistic: np.ndarray
    p_value: float
    area: float
    method: str
    alpha: float = DEFAULT_ALPHA
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.p_value > self.alpha

    @property
    def calibration(self) -> str:
        """``"calibrated"``, ``"over-confident"`` (below the diagonal) or ``"under-confident"``."""
        if self.passed:
            return "calibrated"
        return "over-confident" if self.area < 0 else "under-confident"

    @property
    def band(self) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise 99% band of the curve of a calibrated posterior."""
        return binomial_band(len(self.statistic), self.levels)

    @property
    def verdict(self) -> str:
        what = {"hpd": "HPD coverage", "hpd-kde": "HPD coverage (KDE)", "tarp": "TARP"}.get(self.method, self.method)
        if self.passed:
            return f"{what}: passed — calibrated (KS p = {self.p_value:.3g}, area {self.area:+.3f})"
        side = "below" if self.area < 0 else "above"
        # A biased posterior moves TARP's curve to either side, depending on the references.
        cause = f"not calibrated ({self.calibration} or biased)" if self.method == "tarp" else self.calibration
        return f"{what}: FAILED — {cause}, curve {side} the diagonal (KS p = {self.p_value:.2g}, area {self.area:+.3f})"

    def to_dict(self) -> dict[str, Any]:
        out = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items()}
        out.update(passed=self.passed, calibration=self.calibration, verdict=self.verdict)
        return out


def _coverage_result(statistic: np.ndarray, method: str, levels: int, alpha: float, started: float) -> CoverageResult:
    grid = np.linspace(0.0, 1.0, levels)
    curve = _calibration_curve(statistic, grid)
    # ∫ (F(a) - a) da = (1 - E[s]) - 1/2 for the empirical CDF F of s in [0, 1].
    area = float(0.5 - statistic.mean())
    return CoverageResult(grid, curve, statistic, _ks_p_value(statistic), area, method, alpha, time.perf_counter() - started)


def _kde_log_density(points: Tensor) -> Tensor:
    """Leave-one-out Gaussian-KDE log density of each of ``points (B, M, D)`` under the others.

    Points are whitened by their covariance (per observation) and the bandwidth follows
    Scott's rule :math:`M^{-1/(D+4)}`.
    """
    _, m, d = points.shape
    points = points.to(torch.float64)
    centered = points - points.mean(1, keepdim=True)
    cov = centered.transpose(1, 2) @ centered / (m - 1) + 1e-12 * torch.eye(d, dtype=points.dtype)
    white = torch.linalg.solve_triangular(torch.linalg.cholesky(cov), centered.transpose(1, 2), upper=False).transpose(1, 2)
    bandwidth = m ** (-1.0 / (d + 4))
    sq = torch.cdist(white, white).square() / bandwidth**2
    sq.diagonal(dim1=1, dim2=2).fill_(math.inf)
    return torch.logsumexp(-0.5 * sq, dim=2)


def expected_coverage(
    posterior: Any,
    theta: Any,
    x: Any,
    *,
    n_samples: int = 1000,
    levels: int = 101,
    seed: int = 0,
    use_log_prob: bool = True,
    alpha: float = DEFAULT_ALPHA,
    draws: Draws | None = None,
    batch_size: int = 64,
) -> CoverageResult:
    r"""Expected coverage of highest-posterior-density regions at every credible level.

    With ``log_prob``: :math:`\alpha_i` is the share of ``n_samples`` draws denser than the
    truth (randomized over ties, so exactly uniform under calibration). Without (or with
    ``use_log_prob=False``): the density is a leave-one-out Gaussian KDE over the truth and
    the draws together, which keeps them exchangeable under calibration; its cost is
    :math:`O(N\,L^2 D)`.

    Arguments:
        posterior: A :class:`BatchedPosterior`, NPE or NLE.
        theta: ``(N, D)`` held-out parameters drawn from the prior.
        x: ``(N, *x_shape)`` their simulations.
        n_samples: Posterior draws per observation.
        levels: Points of the returned curve.
        seed: Seed of the draws and of the tie randomization.
        use_log_prob: Use the posterior's ``log_prob`` when it has one.
        alpha: Level of the verdict.
        draws: Posterior draws from :func:`posterior_draws` for these ``x`` (then ``n_samples``
            and the seed of the draws are theirs), to share them between diagnostics.
        batch_size: Observations per KDE batch.

    Returns:
        :class:`CoverageResult` with ``method`` ``"hpd"`` or ``"hpd-kde"``.

    Example:
        >>> wide = gaussian_posterior(lambda x: x / 2, lambda x: torch.full_like(x, 2 * 0.5**0.5))
        >>> theta = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))
        >>> x = theta + torch.randn(1000, 2, generator=torch.Generator().manual_seed(1))
        >>> expected_coverage(wide, theta, x, n_samples=200).calibration
        'under-confident'
    """
    started = time.perf_counter()
    alpha, levels = _check_alpha(alpha), _check_count("levels", levels, least=2)
    batch_size = _check_count("batch_size", batch_size)
    posterior = as_batched_posterior(posterior)
    theta, x = _check_pairs(theta, x)
    use_log_prob = use_log_prob and posterior.log_prob is not None
    draws = _draws(posterior, x, n_samples, seed, theta.shape[1], draws, with_log_prob=use_log_prob)
    n_samples = len(draws.samples)
    generator = _generator(seed, "ties")
    if use_log_prob:
        log_q_draws = draws.log_prob
        if log_q_draws is None:
            log_q_draws = posterior.log_prob(draws.samples, x)
        log_q_draws = _as_tensor(log_q_draws, torch.float64)
        log_q_true = _as_tensor(posterior.log_prob(theta[None], x), torch.float64)[0]
        denser = (log_q_draws > log_q_true[None]).sum(0)
        ties = (log_q_draws == log_q_true[None]).sum(0)
        method = "hpd"
    else:
        denser = torch.empty(len(theta), dtype=torch.long)
        ties = torch.zeros(len(theta), dtype=torch.long)
        for start in range(0, len(theta), batch_size):
            stop = start + batch_size
            pooled = torch.cat([theta[start:stop, None], draws.samples[:, start:stop].transpose(0, 1)], dim=1)
            log_density = _kde_log_density(pooled)
            denser[start:stop] = (log_density[:, 1:] > log_density[:, :1]).sum(1)
        method = "hpd-kde"
    # A tie splits uniformly between "denser" and "not": keeps the statistic exactly uniform.
    u = torch.rand(len(theta), generator=generator, dtype=torch.float64)
    statistic = ((denser + u * (ties + 1)) / (n_samples + 1)).numpy()
    return _coverage_result(statistic, method, levels, alpha, started)


@dataclass
class TARPResult(CoverageResult):
    """A TARP expected-coverage-probability curve (``coverage``) and its test; see :func:`tarp`."""

    references: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("references", None)
        return out


def tarp(
    posterior: Any,
    theta: Any,
    x: Any,
    *,
    n_samples: int = 1000,
    levels: int = 101,
    seed: int = 0,
    references: Any = None,
    bounds: tuple[Any, Any] | None = None,
    alpha: float = DEFAULT_ALPHA,
    draws: Draws | None = None,
) -> TARPResult:
    r"""TARP expected coverage (Lemos et al. 2023) of ``posterior`` on held-out pairs.

    Parameters are rescaled to :math:`[0, 1]^D` by ``bounds`` (default: the range of the
    held-out ``theta``); for each observation a reference point :math:`\theta_r` is drawn
    uniformly in the unit box (or taken from ``references``) and
    :math:`f_i = P[\lVert\theta - \theta_r\rVert < \lVert\theta_i - \theta_r\rVert]` over the
    draws. :math:`f_i` is uniform for the true posterior; the ECP curve is its CDF.

    Arguments:
        posterior: A :class:`BatchedPosterior`, NPE or NLE.
        theta: ``(N, D)`` held-out parameters drawn from the prior.
        x: ``(N, *x_shape)`` their simulations.
        n_samples: Posterior draws per observation.
        levels: Points of the returned curve.
        seed: Seed of draws, references and tie randomization.
        references: ``(N, D)`` reference points in the original units (instead of random ones).
        bounds: ``(lower, upper)`` of the rescaling, e.g. a box prior's bounds.
        alpha: Level of the verdict.
        draws: Posterior draws from :func:`posterior_draws` for these ``x`` (then ``n_samples``
            and the seed of the draws are theirs), to share them between diagnostics.

    Returns:
        :class:`TARPResult`.

    Example:
        >>> exact = gaussian_posterior(lambda x: x / 2, lambda x: torch.full_like(x, 0.5**0.5))
        >>> theta = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))
        >>> x = theta + torch.randn(1000, 2, generator=torch.Generator().manual_seed(1))
        >>> tarp(exact, theta, x, n_samples=200).passed
        True
    """
    started = time.perf_counter()
    alpha, levels = _check_alpha(alpha), _check_count("levels", levels, least=2)
    posterior = as_batched_posterior(posterior)
    theta, x = _check_pairs(theta, x)
    n, dim = theta.shape
    if bounds is None:
        lower, upper = theta.min(0).values, theta.max(0).values
    else:
        lower, upper = (_as_tensor(b) for b in bounds)
        if lower.numel() not in (1, dim) or upper.numel() not in (1, dim):
            raise ValueError(f"bounds must be (lower, upper) with {dim} values each, got {lower.numel()} and {upper.numel()}")
        lower, upper = lower.reshape(-1).expand(dim), upper.reshape(-1).expand(dim)
        # A reversed or empty box would flip or collapse the distances the statistic ranks.
        if not bool((torch.isfinite(lower) & torch.isfinite(upper) & (lower < upper)).all()):
            raise ValueError("bounds must be finite with lower strictly below upper in every coordinate")
    if references is not None and not bool(torch.isfinite(_as_tensor(references)).all()):
        raise ValueError("references contain NaN or inf")
    draws = _draws(posterior, x, n_samples, seed, dim, draws)
    n_samples = len(draws.samples)
    generator = _generator(seed, "references")
    width = torch.where(upper > lower, upper - lower, torch.ones_like(upper))
    if references is None:
        refs = torch.rand(n, dim, generator=generator, dtype=theta.dtype)
    else:
        refs = (_as_tensor(references) - lower) / width
        if refs.shape != theta.shape:
            raise ValueError(f"references must have shape {tuple(theta.shape)}, got {tuple(refs.shape)}")
    d_true = ((theta - lower) / width - refs).norm(dim=-1)  # (N,)
    d_draws = ((draws.samples - lower) / width - refs[None]).norm(dim=-1)  # (L, N)
    closer = (d_draws < d_true[None]).sum(0)
    ties = (d_draws == d_true[None]).sum(0)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    statistic = ((closer + u * (ties + 1)) / (n_samples + 1)).numpy()
    base = _coverage_result(statistic, "tarp", levels, alpha, started)
    return TARPResult(**{k: getattr(base, k) for k in base.__dataclass_fields__}, references=(refs * width + lower).numpy())


# -------------------------------------------------------------------------------- C2ST


def c2st_scores(
    posterior: Any,
    x_obs: Any,
    reference_samples: Any,
    *,
    n_samples: int | None = None,
    seed: int = 0,
    **c2st_options: Any,
) -> np.ndarray:
    """C2ST accuracy of ``posterior`` against reference posterior samples, per observation.

    Arguments:
        posterior: A :class:`BatchedPosterior`, NPE or NLE.
        x_obs: ``(B, *x_shape)`` observations.
        reference_samples: ``(B, M, D)`` reference posterior draws for each observation.
        n_samples: Posterior draws compared (default ``M``, as sbibm).
        seed: Seed of the draws and of the classifier.
        c2st_options: Passed to :func:`sbi_gen.c2st.c2st` (e.g. ``early_stopping=True``).

    Returns:
        ``(B,)`` accuracies: 0.5 for indistinguishable, 1.0 for disjoint.
    """
    posterior = as_batched_posterior(posterior)
    x_obs = _as_tensor(x_obs)
    reference = _as_tensor(reference_samples)
    if reference.ndim != 3 or len(reference) != len(x_obs):
        raise ValueError(f"reference_samples must be (B, M, D) with B = {len(x_obs)}, got {tuple(reference.shape)}")
    n = reference.shape[1] if n_samples is None else int(n_samples)
    draws = _draws(posterior, x_obs, n, seed, reference.shape[2], dim_of="reference_samples").samples
    return np.array([c2st(draws[:, i], reference[i], seed=seed, **c2st_options) for i in range(len(x_obs))])


# ------------------------------------------------------------------- predictive checks


@dataclass
class PPCResult:
    """A posterior predictive check of one observation.

    Attributes:
        x_obs: The observed summaries ``(K,)``.
        x_predictive: Summaries simulated from posterior draws ``(M, K)`` (finite rows only).
        names: Summary names.
        p_values: ``(K,)`` two-sided predictive p-values ``2 min(P[x ≤ x_o], P[x ≥ x_o])``.
        z_scores: ``(K,)`` ``(x_o - mean) / std`` of the predictive distribution.
        mahalanobis_p_value: Share of predictive draws farther (in the Mahalanobis distance of
            the predictive covariance) from the predictive mean than ``x_o``.
        alpha: Level of the verdict (Bonferroni over ``K + 1`` tests).
    """

    x_obs: np.ndarray
    x_predictive: np.ndarray
    names: list[str]
    p_values: np.ndarray
    z_scores: np.ndarray
    mahalanobis_p_value: float
    alpha: float = DEFAULT_ALPHA

    @property
    def passed(self) -> bool:
        p = np.append(self.p_values, self.mahalanobis_p_value)
        return bool((p > self.alpha / len(p)).all())

    @property
    def verdict(self) -> str:
        if self.passed:
            return f"PPC: passed — the observation is typical of the posterior predictive ({len(self.x_predictive)} simulations)"
        bad = [n for n, p in zip(self.names, self.p_values) if p <= self.alpha / (len(self.names) + 1)]
        what = ", ".join(bad) if bad else "the joint distance"
        return f"PPC: FAILED — the observation is atypical in {what}"

    def to_dict(self) -> dict[str, Any]:
        out = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items()}
        out.pop("x_predictive")
        out.update(passed=self.passed, verdict=self.verdict, n_predictive=len(self.x_predictive))
        return out


def posterior_predictive_check(
    simulator: Any,
    theta_samples: Any,
    x_obs: Any,
    *,
    summary: Callable[[np.ndarray], np.ndarray] | None = None,
    names: Sequence[str] | None = None,
    seed: int = 0,
    alpha: float = DEFAULT_ALPHA,
) -> PPCResult:
    r"""Simulate from posterior draws and compare with the observation.

    Arguments:
        simulator: A simulator (``simulator(theta, seed) -> {"x": ...}``).
        theta_samples: ``(M, D)`` posterior draws; each is simulated once.
        x_obs: The observation, of the simulator's output shape.
        summary: Maps a batch of outputs ``(M, *x_shape)`` to summaries ``(M, K)``; default:
            flattened outputs for vectors, the simulator's ``summary`` for maps when it has one.
        names: Summary names (default: the simulator's ``observable_names`` or ``s_1 ...``).
        seed: Seed of the simulations.
        alpha: Family-wise level of the verdict.

    Returns:
        :class:`PPCResult`.
    """
    alpha = _check_alpha(alpha)
    theta_samples = np.asarray(_as_tensor(theta_samples, torch.float64))
    x_obs = np.asarray(_as_tensor(x_obs, torch.float64))
    if not np.isfinite(x_obs).all():
        raise ValueError("x_obs contains NaN or inf; a posterior predictive check needs a finite observation")
    x_pred = np.asarray(simulator(theta_samples, seed)["x"], dtype=np.float64)
    if x_pred.shape[1:] != x_obs.shape:
        raise ValueError(f"x_obs has shape {x_obs.shape} but the simulator returns {x_pred.shape[1:]}")
    if summary is None:
        if x_obs.ndim > 1 and hasattr(simulator, "summary"):
            summary = simulator.summary
        else:

            def summary(v: np.ndarray) -> np.ndarray:
                return v.reshape(len(v), -1)

    pred = np.asarray(summary(x_pred), dtype=np.float64).reshape(len(x_pred), -1)
    obs = np.asarray(summary(x_obs[None]), dtype=np.float64).reshape(-1)
    pred = pred[np.isfinite(pred).all(axis=1)]
    if len(pred) < 10:
        raise ValueError(f"only {len(pred)} posterior-predictive simulations are finite; need at least 10")
    names = _check_names(names, len(obs), "summaries")
    if names is None:
        given = getattr(simulator, "observable_names", None)
        names = list(given) if given and len(given) == len(obs) else [f"s_{k + 1}" for k in range(len(obs))]
    m = len(pred)
    below = ((pred <= obs).sum(0) + 1) / (m + 1)
    above = ((pred >= obs).sum(0) + 1) / (m + 1)
    p_values = np.minimum(1.0, 2 * np.minimum(below, above))
    mean, std = pred.mean(0), pred.std(0, ddof=1)
    z = (obs - mean) / np.where(std > 0, std, np.inf)
    cov = np.cov(pred, rowvar=False).reshape(len(obs), len(obs))
    precision = np.linalg.pinv(cov + 1e-12 * np.diag(np.diag(cov) + 1e-300))
    d_pred = np.einsum("mi,ij,mj->m", pred - mean, precision, pred - mean)
    d_obs = float((obs - mean) @ precision @ (obs - mean))
    mahalanobis_p = float(((d_pred >= d_obs).sum() + 1) / (m + 1))
    return PPCResult(obs, pred, list(names), p_values, z, mahalanobis_p, alpha)
