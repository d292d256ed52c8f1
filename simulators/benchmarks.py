"""The classic SBI benchmark tasks of sbibm: ``gaussian_linear``, ``two_moons`` and ``slcp``.

Each task follows the definitions of sbibm (Lueckmann et al. 2021, "Benchmarking
simulation-based inference") and adds what a benchmark needs beyond the simulator:

* ``simulate(theta, rng)`` -- batched simulation, ``theta`` of shape ``(n, D)``;
* ``log_likelihood(x, theta)`` -- the exact, normalized :math:`\\log p(x \\mid \\theta)` for every
  pair of rows, shape ``(m, k)``;
* ``reference_posterior(x_obs, n, seed)`` -- reference posterior samples ``(n, D)``;
* ``observations(n_obs, seed)`` -- true parameters drawn from the prior and one observation each.

Reference posteriors: ``gaussian_linear`` is sampled from its closed form, ``two_moons`` by
inverting the simulator (as sbibm does), ``slcp`` by :func:`sample_posterior_from_likelihood`, a
tempered sequential Monte Carlo sampler on the exact likelihood, followed by an exact
symmetrization over the four sign modes of :math:`(\\theta_3, \\theta_4)`.

Example:
    >>> import numpy as np
    >>> task = TwoMoons()
    >>> theta_true, x_obs = task.observations(1, seed=0)
    >>> samples = task.reference_posterior(x_obs[0], n=100, seed=1)
    >>> samples.shape
    (100, 2)
    >>> bool(np.all(np.abs(samples) <= 1.0))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sbi_gen.priors import BoxUniform, Gaussian, Prior, sample_prior
from sbi_gen.simulate import Simulator

__all__ = [
    "SLCP",
    "GaussianLinear",
    "TwoMoons",
    "sample_posterior_from_likelihood",
]

_LOG_2PI = math.log(2.0 * math.pi)
# Number of float64 elements one broadcast block of a likelihood evaluation may hold.
_BLOCK_ELEMENTS = 2_000_000


# --------------------------------------------------------------------------------------------
# Input checks and small helpers
# --------------------------------------------------------------------------------------------


def _as_rows(array: Any, dim: int, what: str) -> np.ndarray:
    """``array`` as float64 of shape ``(n, dim)``; ValueError naming the expected shape otherwise."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    out = np.asarray(array, dtype=np.float64)
    if out.ndim != 2 or out.shape[1] != dim:
        raise ValueError(f"{what} must have shape (n, {dim}), got {out.shape}")
    return out


def _as_observation(x_obs: Any, dim: int) -> np.ndarray:
    """One observation as a float64 vector ``(dim,)``; accepts ``(dim,)`` or ``(1, dim)``."""
    if isinstance(x_obs, torch.Tensor):
        x_obs = x_obs.detach().cpu().numpy()
    out = np.asarray(x_obs, dtype=np.float64)
    if out.shape not in ((dim,), (1, dim)):
        raise ValueError(f"x_obs must have shape ({dim},) or (1, {dim}), got {out.shape}")
    out = out.reshape(dim)
    if not np.all(np.isfinite(out)):
        raise ValueError("x_obs must be finite")
    return out


def _check_count(n: Any, what: str = "n") -> int:
    if isinstance(n, bool) or int(n) != n or int(n) <= 0:
        raise ValueError(f"{what} must be a positive integer, got {n!r}")
    return int(n)


def _pairwise(x: np.ndarray, theta: np.ndarray, fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """``fn(x[:, None], theta[None])`` -> ``(m, k)``, evaluated in blocks of ``x`` rows to bound memory."""
    m, k = x.shape[0], theta.shape[0]
    width = max(x.shape[1], theta.shape[1])
    rows = max(1, _BLOCK_ELEMENTS // max(1, k * width))
    out = np.empty((m, k), dtype=np.float64)
    for start in range(0, m, rows):
        out[start : start + rows] = fn(x[start : start + rows, None, :], theta[None, :, :])
    return out


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    peak = np.max(a, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(peak, axis=axis) + np.log(np.sum(np.exp(a - peak), axis=axis))


def _prior_arrays(prior: Prior) -> tuple[str, dict[str, np.ndarray]]:
    """Float64 parameters of the priors handled exactly in numpy (BoxUniform, Gaussian)."""
    if isinstance(prior, BoxUniform):
        return "box", {"low": prior.low.double().numpy(), "high": prior.high.double().numpy()}
    if isinstance(prior, Gaussian):
        cov = prior.covariance.double().numpy()
        chol = np.linalg.cholesky(cov)
        return "gaussian", {"loc": prior.loc.double().numpy(), "chol": chol}
    return "torch", {}


def _prior_sample_np(prior: Prior, n: int, rng: np.random.Generator) -> np.ndarray:
    kind, p = _prior_arrays(prior)
    if kind == "box":
        return p["low"] + (p["high"] - p["low"]) * rng.random((n, p["low"].size))
    if kind == "gaussian":
        return p["loc"] + rng.standard_normal((n, p["loc"].size)) @ p["chol"].T
    seed = [int(s) for s in rng.integers(2**32, size=2)]
    return sample_prior(prior, n, seed).detach().cpu().numpy().astype(np.float64)


def _prior_log_prob_np(prior: Prior, theta: np.ndarray) -> np.ndarray:
    kind, p = _prior_arrays(prior)
    if kind == "box":
        inside = np.all((theta >= p["low"]) & (theta <= p["high"]), axis=1)
        return np.where(inside, -np.sum(np.log(p["high"] - p["low"])), -np.inf)
    if kind == "gaussian":
        chol = p["chol"]
        z = np.linalg.solve(chol, (theta - p["loc"]).T).T
        half_logdet = np.sum(np.log(np.diag(chol)))
        return -0.5 * np.sum(z**2, axis=1) - half_logdet - 0.5 * theta.shape[1] * _LOG_2PI
    with torch.no_grad():
        return prior.log_prob(torch.from_numpy(theta)).double().numpy()


# --------------------------------------------------------------------------------------------
# Generic likelihood-based posterior sampler: tempered SMC with differential-evolution moves
# --------------------------------------------------------------------------------------------


def _systematic_resample(log_weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    w = np.exp(log_weights - np.max(log_weights))
    cumulative = np.cumsum(w / w.sum())
    cumulative[-1] = 1.0
    n = log_weights.size
    positions = (rng.random() + np.arange(n)) / n
    return np.searchsorted(cumulative, positions)


def _ess_fraction(log_weights: np.ndarray) -> float:
    w = np.exp(log_weights - np.max(log_weights))
    return float(w.sum() ** 2 / np.sum(w**2) / w.size)


def _next_temperature(loglik: np.ndarray, beta: float, target: float) -> float:
    """Largest ``beta' <= 1`` whose incremental weights keep an ESS fraction of ``target``."""
    finite = np.isfinite(loglik)

    def ess(delta: float) -> float:
        return _ess_fraction(np.where(finite, delta * np.where(finite, loglik, 0.0), -np.inf))

    if ess(1.0 - beta) >= target:
        return 1.0
    lo, hi = 0.0, 1.0 - beta
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if ess(mid) >= target:
            lo = mid
        else:
            hi = mid
    # Always advance: a vanishing step would only happen for degenerate likelihoods.
    return beta + max(lo, 1e-12 * (1.0 - beta))


def _de_sweep(
    theta: np.ndarray,
    log_prior: np.ndarray,
    loglik: np.ndarray,
    beta: float,
    gamma: float,
    rng: np.random.Generator,
    log_target_prior: Callable[[np.ndarray], np.ndarray],
    log_likelihood: Callable[[np.ndarray], np.ndarray],
    jump_probability: float,
) -> np.ndarray:
    """One in-place sweep of differential-evolution Metropolis moves; returns the accepted mask.

    The population is split in two halves; each half moves with differences of two distinct
    members of the other (fixed) half, so every half-update is a Metropolis kernel with a
    symmetric proposal that leaves the product of the tempered targets invariant (the
    "split ensemble" construction of emcee's ``DEMove``).
    """
    n, dim = theta.shape
    accepted = np.zeros(n, dtype=bool)
    order = rng.permutation(n)
    halves = (order[: n // 2], order[n // 2 :])
    for moving, fixed in (halves, halves[::-1]):
        m, f = moving.size, fixed.size
        # The jitter scale comes from the fixed half only, so the proposal stays symmetric.
        scale = np.std(theta[fixed], axis=0)
        scale = np.where(scale > 0, scale, 1.0)
        ia = rng.integers(f, size=m)
        ib = rng.integers(f - 1, size=m)
        ib += ib >= ia
        g = np.where(rng.random(m) < jump_probability, 1.0, gamma * np.exp(0.1 * rng.standard_normal(m)))
        proposal = (
            theta[moving]
            + g[:, None] * (theta[fixed[ia]] - theta[fixed[ib]])
            + 1e-4 * gamma * scale * rng.standard_normal((m, dim))
        )
        lp_new = log_target_prior(proposal)
        ll_new = np.full(m, -np.inf)
        ok = np.isfinite(lp_new)
        if np.any(ok):
            ll_new[ok] = log_likelihood(proposal[ok])
        log_ratio = lp_new + beta * np.where(np.isfinite(ll_new), ll_new, -np.inf)
        log_ratio = log_ratio - (log_prior[moving] + beta * loglik[moving])
        with np.errstate(invalid="ignore"):
            accept = np.log(rng.random(m)) < log_ratio
        accept &= np.isfinite(lp_new) & np.isfinite(ll_new)
        idx = moving[accept]
        theta[idx] = proposal[accept]
        log_prior[idx] = lp_new[accept]
        loglik[idx] = ll_new[accept]
        accepted[idx] = True
    return accepted


class _Mixture:
    """A Gaussian mixture in float64 with exact sampling and log density (proposal for MH moves)."""

    def __init__(self, means: np.ndarray, chols: np.ndarray, log_weights: np.ndarray):
        self.means = means  # (K, D)
        self.chols = chols  # (K, D, D), lower Cholesky factors of the covariances
        self.log_weights = log_weights - _logsumexp(log_weights, axis=0)  # (K,)
        self.half_logdets = np.sum(np.log(np.diagonal(chols, axis1=1, axis2=2)), axis=1)
        self.inv_chols = np.linalg.inv(chols)

    def component_log_probs(self, theta: np.ndarray) -> np.ndarray:
        """``log w_k + log N(theta_i; mu_k, Sigma_k)``, shape ``(n, K)``."""
        dim = theta.shape[1]
        out = np.empty((theta.shape[0], self.means.shape[0]))
        for k in range(self.means.shape[0]):
            z = (theta - self.means[k]) @ self.inv_chols[k].T
            out[:, k] = -0.5 * np.einsum("ij,ij->i", z, z) - self.half_logdets[k] - 0.5 * dim * _LOG_2PI
        return out + self.log_weights

    def log_prob(self, theta: np.ndarray) -> np.ndarray:
        return _logsumexp(self.component_log_probs(theta), axis=1)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        comp = rng.choice(self.means.shape[0], size=n, p=np.exp(self.log_weights))
        z = rng.standard_normal((n, self.means.shape[1]))
        return self.means[comp] + np.einsum("nij,nj->ni", self.chols[comp], z)


def _fit_mixture(
    theta: np.ndarray,
    n_components: int,
    rng: np.random.Generator,
    inflation: float,
    start: _Mixture | None = None,
    max_points: int = 5000,
) -> _Mixture:
    """Rough EM fit of a full-covariance Gaussian mixture to the particles; covariances inflated.

    Only the efficiency of the moves depends on the fit (the proposal also holds a prior
    component), so a few EM iterations on at most ``max_points`` particles suffice: 30 from a
    random start, or 10 from ``start`` (the previous temperature's mixture, deflated).
    """
    if theta.shape[0] > max_points:
        theta = theta[rng.choice(theta.shape[0], size=max_points, replace=False)]
    n, dim = theta.shape
    pop_cov = np.atleast_2d(np.cov(theta.T)) + 1e-12 * np.eye(dim)
    reg = 1e-6 * np.diag(np.diag(pop_cov)) + 1e-300 * np.eye(dim)
    if start is not None and start.means.shape[1] == dim:
        k = start.means.shape[0]
        means = start.means.copy()
        covs = np.einsum("kij,klj->kil", start.chols, start.chols) / inflation
        log_weights = start.log_weights.copy()
        iterations = 10
    else:
        k = max(1, min(n_components, n // (5 * (dim + 1))))
        means = theta[rng.choice(n, size=k, replace=False)]
        covs = np.broadcast_to(pop_cov / k ** (2.0 / dim), (k, dim, dim)).copy()
        log_weights = np.full(k, -math.log(k))
        iterations = 30
    for _ in range(iterations):
        mixture = _Mixture(means, np.linalg.cholesky(covs), log_weights)
        log_r = mixture.component_log_probs(theta)
        log_r -= _logsumexp(log_r, axis=1)[:, None]
        r = np.exp(log_r)
        nk = r.sum(axis=0) + 1e-12
        log_weights = np.log(nk / n)
        means = (r.T @ theta) / nk[:, None]
        for j in range(k):
            d = theta - means[j]
            covs[j] = (r[:, j, None] * d).T @ d / nk[j] + reg
        # Re-seed components that lost (almost) all their particles.
        dead = nk < dim + 1
        if np.any(dead):
            means[dead] = theta[rng.choice(n, size=int(dead.sum()), replace=False)]
            covs[dead] = pop_cov / k ** (2.0 / dim)
            log_weights[dead] = math.log(1.0 / n)
    return _Mixture(means, np.linalg.cholesky(inflation * covs), log_weights)


def _independence_sweep(
    theta: np.ndarray,
    log_prior: np.ndarray,
    loglik: np.ndarray,
    log_q: np.ndarray,
    beta: float,
    mixture: _Mixture,
    prior_fraction: float,
    rng: np.random.Generator,
    prior: Prior,
    log_likelihood: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """One in-place sweep of independence Metropolis-Hastings moves; returns the accepted mask.

    The proposal ``q = (1 - prior_fraction) * mixture + prior_fraction * prior`` is fixed during
    the sweep; ``log_q`` holds ``log q`` at the current particles and is updated in place.
    """
    n = theta.shape[0]
    from_prior = rng.random(n) < prior_fraction
    proposal = mixture.sample(n, rng)
    if np.any(from_prior):
        proposal[from_prior] = _prior_sample_np(prior, int(from_prior.sum()), rng)
    lp_new = _prior_log_prob_np(prior, proposal)
    ok = np.isfinite(lp_new)
    lq_new = np.full(n, np.inf)
    ll_new = np.full(n, -np.inf)
    if np.any(ok):
        lq_new[ok] = _proposal_log_prob(mixture, prior, prior_fraction, proposal[ok], lp_new[ok])
        ll_new[ok] = log_likelihood(proposal[ok])
    with np.errstate(invalid="ignore"):
        log_ratio = (lp_new + beta * ll_new - lq_new) - (log_prior + beta * loglik - log_q)
        accept = np.log(rng.random(n)) < log_ratio
    accept &= ok & np.isfinite(ll_new)
    theta[accept] = proposal[accept]
    log_prior[accept] = lp_new[accept]
    loglik[accept] = ll_new[accept]
    log_q[accept] = lq_new[accept]
    return accept


def _proposal_log_prob(
    mixture: _Mixture, prior: Prior, prior_fraction: float, theta: np.ndarray, log_prior: np.ndarray
) -> np.ndarray:
    return np.logaddexp(math.log1p(-prior_fraction) + mixture.log_prob(theta), math.log(prior_fraction) + log_prior)


def sample_posterior_from_likelihood(
    log_likelihood_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    prior: Prior,
    x_obs: np.ndarray,
    n: int,
    seed: int,
    *,
    n_particles: int | None = None,
    ess_target: float = 0.7,
    moves_per_stage: float = 6.0,
    final_moves: float = 20.0,
    max_sweeps_per_stage: int = 100,
    mixture_components: int = 16,
    mixture_inflation: float = 1.5,
    prior_fraction: float = 0.05,
    jump_probability: float = 0.1,
    return_info: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
    r"""Posterior samples from an exact likelihood by tempered sequential Monte Carlo.

    Particles start from the prior and move through the tempered targets
    :math:`p(\theta)\, p(x_{obs} \mid \theta)^{\beta}` from :math:`\beta = 0` to 1; each next
    :math:`\beta` is chosen so that the importance weights keep an effective sample size of
    ``ess_target`` of the particles. After each reweighting the particles are resampled
    (systematic resampling) and moved by Metropolis-Hastings sweeps that leave the current
    tempered target invariant, until each particle has made on average ``moves_per_stage``
    accepted moves (``final_moves`` at :math:`\beta = 1`, so that the output is close to
    independent draws). Each sweep has two kernels:

    * differential-evolution Metropolis: the step is a scaled difference of two particles of
      the other half of the population (so it adapts to scales, correlations and separated
      modes; a fraction ``jump_probability`` of steps use the full difference, which carries
      particles between modes of equal shape);
    * independence Metropolis-Hastings with a Gaussian mixture fitted to the resampled
      particles (covariances times ``mixture_inflation``), mixed with the prior
      (``prior_fraction``): global moves that reach the tails of funnel-shaped posteriors and
      rebalance modes that the particles over- or under-populate.

    Arguments:
        log_likelihood_fn: ``f(x (m, dx), theta (k, D)) -> (m, k)`` exact log-likelihood, as the
            ``log_likelihood`` methods of the tasks here.
        prior: The prior, a :class:`sbi_gen.priors.Prior` (BoxUniform and Gaussian are evaluated
            exactly in float64, others through torch).
        x_obs: One observation ``(dx,)``.
        n: Number of samples to return.
        seed: Seed of the sampler's random stream.
        n_particles: Number of SMC particles; default ``max(n, 2000)``. The first ``n`` of a
            random permutation of the final particles are returned.
        ess_target: Effective-sample-size fraction kept between temperatures.
        moves_per_stage: Mean accepted moves per particle at each intermediate temperature.
        final_moves: Mean accepted moves per particle at the final temperature.
        max_sweeps_per_stage: Cap on sweeps per temperature.
        mixture_components: Components of the mixture proposal (0 disables independence moves).
        mixture_inflation: Factor on the fitted covariances.
        prior_fraction: Weight of the prior in the independence proposal.
        jump_probability: Probability of a full-difference (mode-jumping) step.
        return_info: Also return a dict with the temperatures, sweeps and acceptance rates.

    Returns:
        Samples ``(n, D)`` (and the info dict if ``return_info``).

    Raises:
        ValueError: If no prior draw has a finite likelihood, or on bad arguments.

    Example:
        >>> task = GaussianLinear(dim=2)
        >>> x_obs = np.array([0.1, -0.2])
        >>> samples = sample_posterior_from_likelihood(task.log_likelihood, task.prior, x_obs, n=500, seed=0)
        >>> samples.shape
        (500, 2)
    """
    n = _check_count(n)
    if not 0.0 < ess_target < 1.0:
        raise ValueError(f"ess_target must lie in (0, 1), got {ess_target}")
    if not 0.0 < prior_fraction < 1.0:
        raise ValueError(f"prior_fraction must lie in (0, 1), got {prior_fraction}")
    n_particles = max(n, 2000) if n_particles is None else _check_count(n_particles, "n_particles")
    if n_particles < n:
        raise ValueError(f"n_particles ({n_particles}) must be at least n ({n})")
    x_row = np.asarray(x_obs, dtype=np.float64).reshape(1, -1)
    rng = np.random.default_rng(seed)

    def log_likelihood(theta: np.ndarray) -> np.ndarray:
        out = np.asarray(log_likelihood_fn(x_row, theta), dtype=np.float64).reshape(-1)
        return np.where(np.isnan(out), -np.inf, out)

    def log_prior_fn(theta: np.ndarray) -> np.ndarray:
        return _prior_log_prob_np(prior, theta)

    theta = _prior_sample_np(prior, n_particles, rng)
    dim = theta.shape[1]
    log_prior = log_prior_fn(theta)
    loglik = log_likelihood(theta)
    if not np.any(np.isfinite(loglik)):
        raise ValueError("no prior draw has a finite likelihood for this observation")

    gamma = 2.38 / math.sqrt(2.0 * dim)
    beta = 0.0
    mixture: _Mixture | None = None
    info: dict[str, Any] = {"betas": [0.0], "sweeps": [], "acceptance_de": [], "acceptance_independence": []}
    while True:
        if beta < 1.0:
            new_beta = _next_temperature(loglik, beta, ess_target)
            finite = np.isfinite(loglik)
            log_w = np.where(finite, (new_beta - beta) * np.where(finite, loglik, 0.0), -np.inf)
            idx = _systematic_resample(log_w, rng)
            theta, log_prior, loglik = theta[idx], log_prior[idx], loglik[idx]
            beta = new_beta
            info["betas"].append(beta)
        if mixture_components > 0:
            mixture = _fit_mixture(theta, mixture_components, rng, mixture_inflation, start=mixture)
            log_q = _proposal_log_prob(mixture, prior, prior_fraction, theta, log_prior)
        target_moves = final_moves if beta >= 1.0 else moves_per_stage
        moves = 0.0
        sweeps = 0
        rates_de, rates_ind = [], []
        while moves < target_moves and sweeps < max_sweeps_per_stage:
            accepted = _de_sweep(
                theta, log_prior, loglik, beta, gamma, rng, log_prior_fn, log_likelihood, jump_probability
            )
            rate = float(accepted.mean())
            rates_de.append(rate)
            moves += rate
            # Robbins-Monro step on the log step size, towards ~30 % acceptance.
            gamma = float(np.clip(gamma * math.exp(rate - 0.3), 1e-4, 2.0))
            if mixture is not None:
                if np.any(accepted):
                    log_q[accepted] = _proposal_log_prob(
                        mixture, prior, prior_fraction, theta[accepted], log_prior[accepted]
                    )
                accepted_ind = _independence_sweep(
                    theta, log_prior, loglik, log_q, beta, mixture, prior_fraction, rng, prior, log_likelihood
                )
                rates_ind.append(float(accepted_ind.mean()))
                moves += rates_ind[-1]
            sweeps += 1
        info["sweeps"].append(sweeps)
        info["acceptance_de"].append(float(np.mean(rates_de)))
        info["acceptance_independence"].append(float(np.mean(rates_ind)) if rates_ind else float("nan"))
        if beta >= 1.0:
            break
    info["gamma"] = gamma
    samples = theta[rng.permutation(n_particles)[:n]]
    return (samples, info) if return_info else samples


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


class GaussianLinear(Simulator):
    r"""sbibm's ``gaussian_linear``: a Gaussian mean under a Gaussian prior.

    :math:`\theta \sim \mathcal N(0, \sigma_p^2 I_D)`, :math:`x \mid \theta \sim \mathcal N(\theta, \sigma_n^2 I_D)`
    with :math:`D = 10` and :math:`\sigma_p^2 = \sigma_n^2 = 0.1` (sbibm names these
    ``prior_scale`` and ``simulator_scale`` but uses them as variances: its precision matrices
    are ``inverse(0.1 * eye)``). The posterior is Gaussian with covariance
    :math:`(\sigma_p^{-2} + \sigma_n^{-2})^{-1} I` and mean :math:`\Sigma\, x / \sigma_n^2`.

    Arguments:
        dim: Dimension ``D`` of parameters and data.
        prior_variance: Prior variance :math:`\sigma_p^2` per coordinate.
        noise_variance: Noise variance :math:`\sigma_n^2` per coordinate.

    Example:
        >>> import numpy as np
        >>> task = GaussianLinear()
        >>> task.simulate(np.zeros((3, 10)), np.random.default_rng(0))["x"].shape
        (3, 10)
        >>> mean, cov = task.posterior_mean_cov(np.ones(10))
        >>> float(mean[0]), float(cov[0, 0])
        (0.5, 0.05)
    """

    name = "gaussian_linear"
    version = "1.0"

    def __init__(self, *, dim: int = 10, prior_variance: float = 0.1, noise_variance: float = 0.1):
        self.dim = _check_count(dim, "dim")
        if not (prior_variance > 0 and noise_variance > 0):
            raise ValueError("prior_variance and noise_variance must be positive")
        self.prior_variance = float(prior_variance)
        self.noise_variance = float(noise_variance)
        self.parameter_names = [f"theta_{i + 1}" for i in range(self.dim)]
        self.parameter_units = [""] * self.dim
        self.observable_shape = (self.dim,)
        self.observable_names = [f"x_{i + 1}" for i in range(self.dim)]
        self.prior = Gaussian(np.zeros(self.dim), scale=math.sqrt(self.prior_variance), names=self.parameter_names)

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "prior_variance": self.prior_variance, "noise_variance": self.noise_variance}

    def simulate(self, theta: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        """Simulate ``x = theta + noise``; ``theta`` ``(n, D)`` -> ``{"x": (n, D)}``."""
        theta = _as_rows(theta, self.dim, "theta")
        return {"x": theta + math.sqrt(self.noise_variance) * rng.standard_normal(theta.shape)}

    def log_likelihood(self, x: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """Exact :math:`\\log p(x_i \\mid \\theta_j)`, ``x`` ``(m, D)``, ``theta`` ``(k, D)`` -> ``(m, k)``."""
        x = _as_rows(x, self.dim, "x")
        theta = _as_rows(theta, self.dim, "theta")
        var = self.noise_variance
        const = -0.5 * self.dim * (_LOG_2PI + math.log(var))
        return _pairwise(x, theta, lambda a, b: const - 0.5 * np.sum((a - b) ** 2, axis=-1) / var)

    def posterior_mean_cov(self, x_obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Closed-form posterior mean ``(D,)`` and covariance ``(D, D)`` given one observation."""
        x_obs = _as_observation(x_obs, self.dim)
        var = 1.0 / (1.0 / self.prior_variance + 1.0 / self.noise_variance)
        return var * x_obs / self.noise_variance, var * np.eye(self.dim)

    def reference_posterior(self, x_obs: np.ndarray, n: int, seed: int) -> np.ndarray:
        """``n`` exact draws ``(n, D)`` from the Gaussian posterior given ``x_obs`` ``(D,)``."""
        n = _check_count(n)
        mean, cov = self.posterior_mean_cov(x_obs)
        rng = np.random.default_rng(seed)
        return mean + math.sqrt(cov[0, 0]) * rng.standard_normal((n, self.dim))

    def sample_prior(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` prior draws ``(n, D)`` in float64."""
        return math.sqrt(self.prior_variance) * rng.standard_normal((_check_count(n), self.dim))

    def observations(self, n_obs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """True parameters ``(n_obs, D)`` drawn from the prior and one observation ``(n_obs, D)`` each."""
        prior_seq, sim_seq = np.random.SeedSequence(seed).spawn(2)
        theta = self.sample_prior(n_obs, np.random.default_rng(prior_seq))
        return theta, self.simulate(theta, np.random.default_rng(sim_seq))["x"]


class TwoMoons(Simulator):
    r"""sbibm's ``two_moons``: a crescent-shaped, bimodal posterior in 2-D.

    :math:`\theta \sim U(-1, 1)^2`; :math:`a \sim U(-\pi/2, \pi/2)`, :math:`r \sim \mathcal N(0.1, 0.01^2)`,
    :math:`p = (r\cos a + 0.25,\; r \sin a)` and
    :math:`x = p + \big(-|\theta_1 + \theta_2| / \sqrt 2,\; (-\theta_1 + \theta_2) / \sqrt 2\big)`.

    The likelihood is the density of :math:`p` at :math:`x - \mathrm{shift}(\theta)`. In polar
    coordinates :math:`(u, v) = p - (0.25, 0) = \rho(\cos\varphi, \sin\varphi)` the map
    :math:`(a, r) \mapsto (u, v)` has Jacobian :math:`|r|`, so
    :math:`p(u, v) = \mathcal N(\pm\rho; 0.1, 0.01^2) / (\pi \rho)` with :math:`+` on the half-plane
    :math:`u > 0` (:math:`r > 0`) and :math:`-` on :math:`u < 0` (the :math:`r < 0` tail,
    :math:`\sim 10^{-23}` of the mass). sbibm's own ``_likelihood`` keeps only the
    :math:`\mathcal N(\rho)` factor (not a density in :math:`x`); this one is normalized.

    Arguments:
        prior_bound: Half-width of the uniform prior box.
        r_loc: Mean of the radius ``r``.
        r_scale: Standard deviation of ``r``.
        base_offset: Offset of the crescent along the first axis.

    Example:
        >>> import numpy as np
        >>> task = TwoMoons()
        >>> out = task.simulate(np.zeros((4, 2)), np.random.default_rng(0))
        >>> out["x"].shape, task.log_likelihood(out["x"], np.zeros((1, 2))).shape
        ((4, 2), (4, 1))
    """

    name = "two_moons"
    version = "1.0"

    def __init__(
        self,
        *,
        prior_bound: float = 1.0,
        r_loc: float = 0.1,
        r_scale: float = 0.01,
        base_offset: float = 0.25,
    ):
        if not (prior_bound > 0 and r_scale > 0):
            raise ValueError("prior_bound and r_scale must be positive")
        self.prior_bound = float(prior_bound)
        self.r_loc = float(r_loc)
        self.r_scale = float(r_scale)
        self.base_offset = float(base_offset)
        self.parameter_names = ["theta_1", "theta_2"]
        self.parameter_units = ["", ""]
        self.observable_shape = (2,)
        self.observable_names = ["x_1", "x_2"]
        self.prior = BoxUniform([-self.prior_bound] * 2, [self.prior_bound] * 2, names=self.parameter_names)

    def config(self) -> dict[str, Any]:
        return {
            "prior_bound": self.prior_bound,
            "r_loc": self.r_loc,
            "r_scale": self.r_scale,
            "base_offset": self.base_offset,
        }

    @staticmethod
    def _shift(theta: np.ndarray) -> np.ndarray:
        """``(-|theta_1 + theta_2| / sqrt 2, (-theta_1 + theta_2) / sqrt 2)``, shape ``(..., 2)``."""
        z0 = (theta[..., 0] + theta[..., 1]) / math.sqrt(2.0)
        z1 = (theta[..., 1] - theta[..., 0]) / math.sqrt(2.0)
        return np.stack([-np.abs(z0), z1], axis=-1)

    def simulate(self, theta: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        """Simulate the two moons; ``theta`` ``(n, 2)`` -> ``{"x": (n, 2)}``."""
        theta = _as_rows(theta, 2, "theta")
        n = theta.shape[0]
        a = rng.uniform(-math.pi / 2.0, math.pi / 2.0, size=n)
        r = self.r_loc + self.r_scale * rng.standard_normal(n)
        p = np.stack([r * np.cos(a) + self.base_offset, r * np.sin(a)], axis=1)
        return {"x": p + self._shift(theta)}

    def _log_density_p(self, p: np.ndarray) -> np.ndarray:
        """Log density of ``p = (r cos a + offset, r sin a)`` at ``p`` (last axis 2)."""
        u = p[..., 0] - self.base_offset
        v = p[..., 1]
        rho = np.hypot(u, v)
        signed = np.where(u >= 0.0, rho, -rho)
        log_normal = -0.5 * ((signed - self.r_loc) / self.r_scale) ** 2 - 0.5 * _LOG_2PI - math.log(self.r_scale)
        with np.errstate(divide="ignore"):
            return log_normal - math.log(math.pi) - np.log(rho)

    def log_likelihood(self, x: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """Exact :math:`\\log p(x_i \\mid \\theta_j)`, ``x`` ``(m, 2)``, ``theta`` ``(k, 2)`` -> ``(m, k)``."""
        x = _as_rows(x, 2, "x")
        theta = _as_rows(theta, 2, "theta")
        return _pairwise(x, theta, lambda a, b: self._log_density_p(a - self._shift(b)))

    def reference_posterior(self, x_obs: np.ndarray, n: int, seed: int, max_proposals: int = 10**8) -> np.ndarray:
        r"""``n`` exact posterior draws ``(n, 2)`` by inverting the simulator (sbibm's method).

        Draw :math:`p` from its distribution; then :math:`|z_0| = p_1 - x_1` and
        :math:`z_1 = x_2 - p_2` with :math:`z = R_{-\pi/4}\theta`; pick the sign of :math:`z_0`
        with probability 1/2 each, rotate back, and keep draws inside the prior. The proposal
        density in :math:`z` is half the likelihood, so the kept draws are exact posterior draws.
        Unlike sbibm, draws with :math:`p_1 < x_1` (no :math:`\theta` gives such :math:`p`) are
        rejected rather than given :math:`|z_0| = x_1 - p_1`, which would be outside the posterior.

        Arguments:
            x_obs: One observation ``(2,)``.
            n: Number of samples.
            seed: Seed of the random stream.
            max_proposals: Give up (ValueError) after this many proposals.
        """
        x_obs = _as_observation(x_obs, 2)
        n = _check_count(n)
        rng = np.random.default_rng(seed)
        kept: list[np.ndarray] = []
        n_kept = 0
        n_proposed = 0
        batch = max(1000, 2 * n)
        while n_kept < n:
            if n_proposed >= max_proposals:
                raise ValueError(
                    f"only {n_kept} of {n} posterior draws after {n_proposed} proposals: x_obs={x_obs.tolist()} "
                    "is (nearly) impossible under the prior"
                )
            a = rng.uniform(-math.pi / 2.0, math.pi / 2.0, size=batch)
            r = self.r_loc + self.r_scale * rng.standard_normal(batch)
            p0 = r * np.cos(a) + self.base_offset
            p1 = r * np.sin(a)
            sign = np.where(rng.random(batch) < 0.5, -1.0, 1.0)
            q0 = sign * (p0 - x_obs[0])
            q1 = x_obs[1] - p1
            theta = np.stack([(q0 - q1) / math.sqrt(2.0), (q0 + q1) / math.sqrt(2.0)], axis=1)
            ok = (p0 >= x_obs[0]) & np.all(np.abs(theta) <= self.prior_bound, axis=1)
            kept.append(theta[ok])
            n_kept += int(ok.sum())
            n_proposed += batch
            rate = max(n_kept / n_proposed, 1e-6)
            batch = int(min(max(1000, 1.2 * (n - n_kept) / rate), 4 * 10**6))
        return np.concatenate(kept)[:n]

    def sample_prior(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` prior draws ``(n, 2)`` in float64."""
        return rng.uniform(-self.prior_bound, self.prior_bound, size=(_check_count(n), 2))

    def observations(self, n_obs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """True parameters ``(n_obs, 2)`` drawn from the prior and one observation ``(n_obs, 2)`` each."""
        prior_seq, sim_seq = np.random.SeedSequence(seed).spawn(2)
        theta = self.sample_prior(n_obs, np.random.default_rng(prior_seq))
        return theta, self.simulate(theta, np.random.default_rng(sim_seq))["x"]


class SLCP(Simulator):
    r"""sbibm's ``slcp`` ("simple likelihood, complex posterior") without distractors.

    :math:`\theta \sim U(-3, 3)^5`; :math:`m = (\theta_1, \theta_2)`, :math:`s_1 = \theta_3^2`,
    :math:`s_2 = \theta_4^2` (standard deviations), :math:`\rho = \tanh\theta_5`, and
    :math:`x` is ``num_data = 4`` i.i.d. draws from :math:`\mathcal N(m, S)` with
    :math:`S = \begin{pmatrix} s_1^2 + \epsilon & \rho s_1 s_2 \\ \rho s_1 s_2 & s_2^2 + \epsilon\end{pmatrix}`,
    :math:`\epsilon = 10^{-6}` as in sbibm, flattened to ``x = (x_{1,1}, x_{1,2}, x_{2,1}, ...)``
    of length 8. The likelihood depends on :math:`\theta_3, \theta_4` only through their squares,
    so the posterior has four sign modes of equal mass.

    The reference posterior runs :func:`sample_posterior_from_likelihood` and then folds
    :math:`(\theta_3, \theta_4)` to their absolute values and gives each a random sign, which is
    exact for this symmetric posterior and balances the four modes whatever weights the sampler
    found. (sbibm itself uses sampling-importance-resampling followed by rejection sampling
    from a flow proposal.)

    Arguments:
        num_data: Number of i.i.d. 2-D draws per observation.
        prior_bound: Half-width of the uniform prior box.
        eps: Jitter added to the diagonal of ``S``.

    Example:
        >>> import numpy as np
        >>> task = SLCP()
        >>> theta = np.array([[0.7, -2.9, -1.0, -0.9, 0.6]])
        >>> x = task.simulate(theta, np.random.default_rng(0))["x"]
        >>> x.shape, task.log_likelihood(x, theta).shape
        ((1, 8), (1, 1))
    """

    name = "slcp"
    version = "1.0"

    def __init__(self, *, num_data: int = 4, prior_bound: float = 3.0, eps: float = 1e-6):
        self.num_data = _check_count(num_data, "num_data")
        if not (prior_bound > 0 and eps >= 0):
            raise ValueError("prior_bound must be positive and eps non-negative")
        self.prior_bound = float(prior_bound)
        self.eps = float(eps)
        self.parameter_names = [f"theta_{i + 1}" for i in range(5)]
        self.parameter_units = [""] * 5
        self.observable_shape = (2 * self.num_data,)
        self.observable_names = [f"x_{j + 1}_{c}" for j in range(self.num_data) for c in (1, 2)]
        self.prior = BoxUniform([-self.prior_bound] * 5, [self.prior_bound] * 5, names=self.parameter_names)

    def config(self) -> dict[str, Any]:
        return {"num_data": self.num_data, "prior_bound": self.prior_bound, "eps": self.eps}

    def _covariance(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Entries ``(S11, S22, S12)`` of the covariance, each of shape ``theta.shape[:-1]``."""
        s1 = theta[..., 2] ** 2
        s2 = theta[..., 3] ** 2
        rho = np.tanh(theta[..., 4])
        return s1**2 + self.eps, s2**2 + self.eps, rho * s1 * s2

    def simulate(self, theta: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        """Simulate ``num_data`` 2-D Gaussian draws; ``theta`` ``(n, 5)`` -> ``{"x": (n, 2 num_data)}``."""
        theta = _as_rows(theta, 5, "theta")
        n = theta.shape[0]
        s11, s22, s12 = self._covariance(theta)
        l11 = np.sqrt(s11)
        l21 = s12 / l11
        l22 = np.sqrt(np.maximum(s22 - l21**2, 0.0))
        z = rng.standard_normal((n, self.num_data, 2))
        x0 = theta[:, None, 0] + l11[:, None] * z[..., 0]
        x1 = theta[:, None, 1] + l21[:, None] * z[..., 0] + l22[:, None] * z[..., 1]
        return {"x": np.stack([x0, x1], axis=-1).reshape(n, 2 * self.num_data)}

    def _log_lik_block(self, x: np.ndarray, theta: np.ndarray) -> np.ndarray:
        # x (m, 1, dx), theta (1, k, 5) -> (m, k)
        s11, s22, s12 = self._covariance(theta[..., None, :])  # (1, k, 1)
        det = s11 * s22 - s12**2
        pts = x.reshape(*x.shape[:-1], self.num_data, 2)  # (m, 1, J, 2)
        d0 = pts[..., 0] - theta[..., None, 0]
        d1 = pts[..., 1] - theta[..., None, 1]
        quad = (s22 * d0**2 - 2.0 * s12 * d0 * d1 + s11 * d1**2) / det
        return np.sum(-_LOG_2PI - 0.5 * np.log(det) - 0.5 * quad, axis=-1)

    def log_likelihood(self, x: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """Exact :math:`\\log p(x_i \\mid \\theta_j)`, ``x`` ``(m, 8)``, ``theta`` ``(k, 5)`` -> ``(m, k)``."""
        x = _as_rows(x, 2 * self.num_data, "x")
        theta = _as_rows(theta, 5, "theta")
        return _pairwise(x, theta, self._log_lik_block)

    def reference_posterior(self, x_obs: np.ndarray, n: int, seed: int, **sampler_options: Any) -> np.ndarray:
        """``n`` reference posterior draws ``(n, 5)`` given ``x_obs`` ``(8,)``.

        Tempered SMC on the exact likelihood (:func:`sample_posterior_from_likelihood`, options
        passed through), then an exact random-sign symmetrization of ``theta_3`` and ``theta_4``.
        """
        x_obs = _as_observation(x_obs, 2 * self.num_data)
        n = _check_count(n)
        smc_seed, sign_seed = np.random.SeedSequence(seed).spawn(2)
        samples = sample_posterior_from_likelihood(
            self.log_likelihood, self.prior, x_obs, n, int(smc_seed.generate_state(1)[0]), **sampler_options
        )
        if isinstance(samples, tuple):
            samples = samples[0]
        signs = np.where(np.random.default_rng(sign_seed).random((n, 2)) < 0.5, -1.0, 1.0)
        samples = samples.copy()
        samples[:, 2:4] = np.abs(samples[:, 2:4]) * signs
        return samples

    def sample_prior(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` prior draws ``(n, 5)`` in float64."""
        return rng.uniform(-self.prior_bound, self.prior_bound, size=(_check_count(n), 5))

    def observations(self, n_obs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """True parameters ``(n_obs, 5)`` drawn from the prior and one observation ``(n_obs, 8)`` each."""
        prior_seq, sim_seq = np.random.SeedSequence(seed).spawn(2)
        theta = self.sample_prior(n_obs, np.random.default_rng(prior_seq))
        return theta, self.simulate(theta, np.random.default_rng(sim_seq))["x"]
