"""Tests of the sbibm benchmark tasks in ``simulators.benchmarks``.

All seeds are fixed. Statistical tolerances are stated next to each check in units of the
Monte Carlo standard error (SE) of the quantity compared.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import ks_2samp, multivariate_normal

import simulators
from sbi_gen.priors import BoxUniform, Gaussian
from sbi_gen.simulate import Simulator, simulate
from simulators.benchmarks import SLCP, GaussianLinear, TwoMoons, sample_posterior_from_likelihood

TASKS = {"gaussian_linear": GaussianLinear, "two_moons": TwoMoons, "slcp": SLCP}
DIMS = {"gaussian_linear": (10, 10), "two_moons": (2, 2), "slcp": (5, 8)}


def quadrant_fractions(samples: np.ndarray) -> np.ndarray:
    """Fractions of samples in the four sign modes of (theta_3, theta_4)."""
    s3, s4 = samples[:, 2] > 0, samples[:, 3] > 0
    return np.array([np.mean(~s3 & ~s4), np.mean(~s3 & s4), np.mean(s3 & ~s4), np.mean(s3 & s4)])


# ------------------------------------------------------------------------------------------
# Protocol, shapes, reproducibility, bad input
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TASKS))
def test_registry_attributes_and_config(name):
    task = simulators.get(name)
    assert isinstance(task, TASKS[name]) and isinstance(task, Simulator)
    d, dx = DIMS[name]
    assert task.name == name and task.version == "1.0"
    assert len(task.parameter_names) == d and task.parameter_units == [""] * d
    assert task.observable_shape == (dx,) and len(task.observable_names) == dx
    assert task.prior.dim == d and task.prior.names == task.parameter_names
    expected_prior = Gaussian if name == "gaussian_linear" else BoxUniform
    assert isinstance(task.prior, expected_prior)
    rebuilt = type(task)(**task.config())
    assert rebuilt.config() == task.config()


def test_priors_match_sbibm():
    gl = GaussianLinear()
    np.testing.assert_allclose(gl.prior.covariance.numpy(), 0.1 * np.eye(10), rtol=1e-6)  # covariance 0.1 I
    np.testing.assert_allclose(gl.prior.mean.numpy(), np.zeros(10))
    tm, slcp = TwoMoons(), SLCP()
    np.testing.assert_allclose(tm.prior.low.numpy(), [-1.0, -1.0])
    np.testing.assert_allclose(tm.prior.high.numpy(), [1.0, 1.0])
    np.testing.assert_allclose(slcp.prior.low.numpy(), [-3.0] * 5)
    np.testing.assert_allclose(slcp.prior.high.numpy(), [3.0] * 5)


@pytest.mark.parametrize("name", list(TASKS))
def test_simulate_shapes_and_reproducibility(name):
    task = TASKS[name]()
    d, dx = DIMS[name]
    theta, x_obs = task.observations(7, seed=3)
    assert theta.shape == (7, d) and x_obs.shape == (7, dx)
    assert theta.dtype == np.float64 and x_obs.dtype == np.float64
    assert np.all(np.isfinite(task.prior.log_prob(theta).numpy()))
    theta2, x_obs2 = task.observations(7, seed=3)
    np.testing.assert_array_equal(theta, theta2)
    np.testing.assert_array_equal(x_obs, x_obs2)

    out1 = task.simulate(theta, np.random.default_rng(11))
    out2 = task.simulate(theta, np.random.default_rng(11))
    out3 = task.simulate(theta, np.random.default_rng(12))
    assert set(out1) == {"x"} and out1["x"].shape == (7, dx) and out1["x"].dtype == np.float64
    np.testing.assert_array_equal(out1["x"], out2["x"])
    assert not np.array_equal(out1["x"], out3["x"])

    ll = task.log_likelihood(x_obs, theta[:3])
    assert ll.shape == (7, 3) and np.all(np.isfinite(ll))

    # Through the framework: theta drawn from the (torch) prior in chunks.
    data = simulate(task, n=50, seed=0, chunk_size=20)
    assert data["theta"].shape == (50, d) and data["x"].shape == (50, dx) and data["valid"].all()


@pytest.mark.parametrize("name", list(TASKS))
def test_reference_posterior_shape_and_reproducibility(name):
    task = TASKS[name]()
    d, _ = DIMS[name]
    _, x_obs = task.observations(1, seed=5)
    a = task.reference_posterior(x_obs[0], n=300, seed=1)
    b = task.reference_posterior(x_obs[0], n=300, seed=1)
    c = task.reference_posterior(x_obs[0], n=300, seed=2)
    assert a.shape == (300, d) and a.dtype == np.float64
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all(np.isfinite(task.prior.log_prob(a).numpy()))


@pytest.mark.parametrize("name", list(TASKS))
def test_bad_input_raises_naming_expected_shape(name):
    task = TASKS[name]()
    d, dx = DIMS[name]
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=rf"theta must have shape \(n, {d}\), got \(3, {d + 1}\)"):
        task.simulate(np.zeros((3, d + 1)), rng)
    with pytest.raises(ValueError, match=rf"theta must have shape \(n, {d}\), got \({d},\)"):
        task.simulate(np.zeros(d), rng)
    with pytest.raises(ValueError, match=rf"theta must have shape \(n, {d}\)"):
        task.log_likelihood(np.zeros((2, dx)), np.zeros((2, d - 1)))
    with pytest.raises(ValueError, match=rf"x must have shape \(n, {dx}\)"):
        task.log_likelihood(np.zeros((2, dx + 1)), np.zeros((2, d)))
    with pytest.raises(ValueError, match=rf"x_obs must have shape \({dx},\)"):
        task.reference_posterior(np.zeros(dx + 1), n=10, seed=0)
    with pytest.raises(ValueError, match="positive integer"):
        task.reference_posterior(np.zeros(dx), n=0, seed=0)


# ------------------------------------------------------------------------------------------
# Likelihoods
# ------------------------------------------------------------------------------------------


def test_gaussian_linear_log_likelihood_matches_scipy():
    task = GaussianLinear()
    theta, x = task.observations(6, seed=1)
    ll = task.log_likelihood(x, theta)
    expected = np.array([[multivariate_normal(t, 0.1 * np.eye(10)).logpdf(xi) for t in theta] for xi in x])
    np.testing.assert_allclose(ll, expected, rtol=1e-12, atol=1e-12)


def test_slcp_log_likelihood_matches_scipy():
    task = SLCP()
    theta, x = task.observations(5, seed=2)
    ll = task.log_likelihood(x, theta)
    expected = np.empty((5, 5))
    for j, t in enumerate(theta):
        s1, s2, rho = t[2] ** 2, t[3] ** 2, np.tanh(t[4])
        cov = np.array([[s1**2, rho * s1 * s2], [rho * s1 * s2, s2**2]]) + 1e-6 * np.eye(2)  # sbibm's eps
        dist = multivariate_normal(t[:2], cov)
        for i, xi in enumerate(x):
            expected[i, j] = dist.logpdf(xi.reshape(4, 2)).sum()
    np.testing.assert_allclose(ll, expected, rtol=1e-9, atol=1e-8)


def test_slcp_simulator_moments_match_likelihood_parameters():
    task = SLCP()
    theta = np.array([0.5, -1.0, 1.2, -0.9, 0.7])
    x = task.simulate(np.tile(theta, (50_000, 1)), np.random.default_rng(4))["x"].reshape(-1, 2)
    s1, s2, rho = 1.2**2, 0.9**2, np.tanh(0.7)
    cov = np.array([[s1**2, rho * s1 * s2], [rho * s1 * s2, s2**2]]) + 1e-6 * np.eye(2)
    n = x.shape[0]  # 200,000 draws
    se_mean = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(x.mean(0) - theta[:2]) < 4 * se_mean)
    # Var of a sample (co)variance: (S_ij^2 + S_ii S_jj) / n for Gaussian data.
    se_cov = np.sqrt((cov**2 + np.outer(np.diag(cov), np.diag(cov))) / n)
    assert np.all(np.abs(np.cov(x.T) - cov) < 4 * se_cov)


def _two_moons_grid(task: TwoMoons, theta: np.ndarray, h: float, lo: float = -0.02, hi: float = 0.16):
    """Cell edges in x aligned with the density's jump at u = 0 (p_1 = 0.25)."""
    z0 = abs(theta[0] + theta[1]) / math.sqrt(2.0)
    z1 = (theta[1] - theta[0]) / math.sqrt(2.0)
    e0 = task.base_offset - z0 + h * np.arange(round(lo / h), round(hi / h) + 1)
    e1 = z1 + h * np.arange(-round(hi / h), round(hi / h) + 1)
    return e0, e1


@pytest.mark.parametrize("theta", [[0.3, -0.3], [0.5, 0.2], [-0.9, 0.95]])
def test_two_moons_likelihood_normalizes(theta):
    task = TwoMoons()
    theta = np.array(theta)
    h = 0.0005  # 1/20 of r_scale: midpoint-rule error ~ (h / r_scale)^2 / 24 ~ 1e-4 at most
    e0, e1 = _two_moons_grid(task, theta, h)
    m0, m1 = (e0[:-1] + e0[1:]) / 2, (e1[:-1] + e1[1:]) / 2
    grid = np.stack(np.meshgrid(m0, m1, indexing="ij"), -1).reshape(-1, 2)
    total = np.exp(task.log_likelihood(grid, theta[None])[:, 0]).sum() * h * h
    # The grid reaches 6 r_scale beyond the ring (missing mass ~ 2e-9); grid error bound 1e-3.
    assert abs(total - 1.0) < 1e-3


def test_two_moons_histogram_matches_likelihood():
    task = TwoMoons()
    theta = np.array([0.4, 0.1])
    n = 200_000
    x = task.simulate(np.tile(theta, (n, 1)), np.random.default_rng(8))["x"]
    h = 0.005
    e0, e1 = _two_moons_grid(task, theta, h)
    counts, _, _ = np.histogram2d(x[:, 0], x[:, 1], bins=[e0, e1])
    # Expected bin probabilities: midpoint rule on a 10 x 10 sub-grid of each bin.
    sub = 10
    f0 = e0[0] + h / sub * (np.arange((len(e0) - 1) * sub) + 0.5)
    f1 = e1[0] + h / sub * (np.arange((len(e1) - 1) * sub) + 0.5)
    grid = np.stack(np.meshgrid(f0, f1, indexing="ij"), -1).reshape(-1, 2)
    dens = np.exp(task.log_likelihood(grid, theta[None])[:, 0]).reshape(len(f0), len(f1))
    prob = dens.reshape(len(e0) - 1, sub, len(e1) - 1, sub).sum(axis=(1, 3)) * (h / sub) ** 2
    assert counts.sum() == n  # the grid holds every simulation
    expected = n * prob
    keep = expected >= 20
    assert expected[keep].sum() > 0.99 * n
    chi2 = np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep])
    dof = int(keep.sum())
    # Pearson chi^2 ~ dof +- sqrt(2 dof); allow 5 standard deviations.
    assert abs(chi2 - dof) < 5 * math.sqrt(2 * dof), (chi2, dof)
    # Bins the density calls (nearly) empty are empty.
    assert counts[expected < 1e-6].sum() == 0


# ------------------------------------------------------------------------------------------
# Reference posteriors
# ------------------------------------------------------------------------------------------


def test_gaussian_linear_posterior_closed_form_and_samples():
    task = GaussianLinear()
    _, x_obs = task.observations(1, seed=7)
    x = x_obs[0]
    mean, cov = task.posterior_mean_cov(x)
    prior_cov, noise_cov = 0.1 * np.eye(10), 0.1 * np.eye(10)
    cov_direct = np.linalg.inv(np.linalg.inv(prior_cov) + np.linalg.inv(noise_cov))
    np.testing.assert_allclose(cov, cov_direct, atol=1e-14)
    np.testing.assert_allclose(mean, cov_direct @ np.linalg.inv(noise_cov) @ x, atol=1e-14)
    np.testing.assert_allclose(mean, x / 2, atol=1e-14)  # equal variances: posterior mean x / 2

    n = 20_000
    samples = task.reference_posterior(x, n=n, seed=0)
    se = np.sqrt(0.05 / n)
    assert np.all(np.abs(samples.mean(0) - mean) < 4 * se)
    emp = np.cov(samples.T)
    # SE of a sample variance 0.05 sqrt(2/n); of a covariance 0.05 sqrt(1/n).
    assert np.all(np.abs(np.diag(emp) - 0.05) < 4 * 0.05 * math.sqrt(2 / n))
    off = emp[~np.eye(10, dtype=bool)]
    assert np.all(np.abs(off) < 5 * 0.05 * math.sqrt(1 / n))


def test_likelihood_sampler_recovers_gaussian_linear_posterior():
    task = GaussianLinear()
    _, x_obs = task.observations(1, seed=9)
    mean, cov = task.posterior_mean_cov(x_obs[0])
    n = 5000
    samples = sample_posterior_from_likelihood(task.log_likelihood, task.prior, x_obs[0], n=n, seed=3)
    assert samples.shape == (n, 10)
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(samples.mean(0) - mean) < 4 * sd / math.sqrt(n))  # 4 SE
    assert np.all(np.abs(samples.std(0) / sd - 1.0) < 0.1)
    # Correlations vanish: |r| < 5 / sqrt(n).
    corr = np.corrcoef(samples.T)[~np.eye(10, dtype=bool)]
    assert np.all(np.abs(corr) < 5 / math.sqrt(n))


def test_two_moons_reference_posterior_high_likelihood_in_prior():
    task = TwoMoons()
    # theta near the anti-diagonal: |theta_1 + theta_2| small, the case where p_1 < x_1 happens
    # for many simulator draws (sbibm's inversion would turn those into off-posterior samples).
    theta_true = np.array([[0.3, -0.28]])
    x_obs = task.simulate(theta_true, np.random.default_rng(2))["x"][0]
    samples = task.reference_posterior(x_obs, n=10_000, seed=4)
    assert np.all(np.abs(samples) <= 1.0)
    ll = task.log_likelihood(x_obs[None], samples)[0]
    peak = -0.5 * math.log(2 * math.pi) - math.log(0.01) - math.log(math.pi * 0.1)  # ~4.84 on the ring
    # Every sample lies on the ring: within 6 r_scale (and 1/r changes the density by < 2x there).
    assert ll.min() > peak - 0.5 * 6**2 - math.log(2.0)
    assert np.median(ll) > peak - 1.5
    # Both branches theta_1 + theta_2 > 0 and < 0 carry posterior mass.
    frac = np.mean(samples.sum(axis=1) > 0)
    assert 0.2 < frac < 0.8


@pytest.mark.parametrize("obs_seed", [1, 6])
def test_two_moons_reference_matches_likelihood_sampler(obs_seed):
    task = TwoMoons()
    _, x_obs = task.observations(1, seed=obs_seed)
    n = 4000
    ref = task.reference_posterior(x_obs[0], n=n, seed=0)
    smc = sample_posterior_from_likelihood(task.log_likelihood, task.prior, x_obs[0], n=n, seed=1)
    for j in range(2):
        # Two-sample KS at n = m = 4000: the 0.1 % critical value is ~1.95 sqrt(2/n) = 0.044.
        assert ks_2samp(ref[:, j], smc[:, j]).statistic < 0.044
    se = np.sqrt(ref.var(0) / n + smc.var(0) / n)
    assert np.all(np.abs(ref.mean(0) - smc.mean(0)) < 4 * se)


@pytest.mark.parametrize("obs_seed", [0, 3])
def test_slcp_reference_posterior_modes_and_likelihood(obs_seed):
    task = SLCP()
    theta_true, x_obs = task.observations(1, seed=obs_seed)
    n = 4000
    samples = task.reference_posterior(x_obs[0], n=n, seed=1)
    assert samples.shape == (n, 5)
    assert np.all(np.abs(samples) <= 3.0)
    # The four sign modes of (theta_3, theta_4) have equal mass: binomial SE sqrt(3/16/n).
    frac = quadrant_fractions(samples)
    assert np.all(np.abs(frac - 0.25) < 4 * math.sqrt(3 / 16 / n)), frac
    ll = task.log_likelihood(x_obs, samples)[0]
    ll_true = task.log_likelihood(x_obs, theta_true)[0, 0]
    assert np.all(np.isfinite(ll))
    # The true parameter is a posterior draw, so its log-likelihood is a typical posterior value.
    rank = np.mean(ll < ll_true)
    assert 0.005 < rank < 0.995, rank
    # The sign-reflected true parameters have the same likelihood (the source of the 4 modes).
    flipped = theta_true * np.array([1, 1, -1, -1, 1])
    assert task.log_likelihood(x_obs, flipped)[0, 0] == pytest.approx(ll_true, rel=1e-12)


def test_slcp_generic_sampler_finds_all_modes_unsymmetrized():
    task = SLCP()
    _, x_obs = task.observations(1, seed=0)
    samples = sample_posterior_from_likelihood(task.log_likelihood, task.prior, x_obs[0], n=4000, seed=2)
    # Without the symmetrization step every mode must still be populated near its 1/4 share.
    frac = quadrant_fractions(samples)
    assert np.all(np.abs(frac - 0.25) < 0.05), frac


def test_slcp_reference_agrees_with_importance_sampling():
    """Cross-check the SMC sampler by importance sampling with an independent proposal.

    Folded parameters (|theta_3|, |theta_4|); the proposal is a mixture of a Gaussian fit
    (independent code: moments of the SMC samples, covariance doubled) and the folded prior
    (30 %), so importance weights are bounded away from regions the SMC may have missed.
    """
    task = SLCP()
    _, x_obs = task.observations(1, seed=3)
    n = 4000
    samples = task.reference_posterior(x_obs[0], n=n, seed=5)
    folded = samples.copy()
    folded[:, 2:4] = np.abs(folded[:, 2:4])
    lo, hi = np.array([-3.0, -3.0, 0.0, 0.0, -3.0]), np.full(5, 3.0)

    # Proposal: mixture of Gaussians, one per k-means-like cluster of the folded samples.
    rng = np.random.default_rng(0)
    order = np.argsort(folded[:, 4])
    clusters = np.array_split(order, 4)
    means = np.array([folded[c].mean(0) for c in clusters])
    covs = np.array([2.0 * np.cov(folded[c].T) + 1e-8 * np.eye(5) for c in clusters])
    m = 200_000
    comp = rng.integers(4, size=m)
    prop = np.empty((m, 5))
    for k in range(4):
        idx = comp == k
        prop[idx] = rng.multivariate_normal(means[k], covs[k], size=int(idx.sum()))
    uni = rng.random(m) < 0.3
    prop[uni] = lo + (hi - lo) * rng.random((int(uni.sum()), 5))
    log_q_gauss = np.logaddexp.reduce(
        [multivariate_normal(means[k], covs[k]).logpdf(prop) - math.log(4) for k in range(4)], axis=0
    )
    log_q = np.logaddexp(math.log(0.7) + log_q_gauss, math.log(0.3) - np.sum(np.log(hi - lo)))
    inside = np.all((prop >= lo) & (prop <= hi), axis=1)
    log_w = np.full(m, -np.inf)
    log_w[inside] = task.log_likelihood(x_obs, prop[inside])[0] - log_q[inside]
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    ess = 1.0 / np.sum(w**2)
    assert ess > 2000
    is_mean = w @ prop
    is_sd = np.sqrt(w @ (prop - is_mean) ** 2)
    # Tolerance: 5 SE of the SMC mean (the IS estimate's error is smaller, ESS >> n).
    se = folded.std(0) / math.sqrt(n) + is_sd / math.sqrt(ess)
    assert np.all(np.abs(folded.mean(0) - is_mean) < 5 * se), (folded.mean(0), is_mean)
    assert np.all(np.abs(folded.std(0) / is_sd - 1.0) < 0.1), (folded.std(0), is_sd)
