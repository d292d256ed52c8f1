"""Tests of the toy-jet simulator: shapes, reproducibility, the joint likelihood and score, and
the exact reference likelihood of (mass, count, log z_lead).

Statistical checks use fixed seeds and tolerances of a few standard errors (k * sigma / sqrt(n)).
"""

import json
import math
import re

import numpy as np
import pytest
from scipy.stats import poisson

import simulators
from sbi_gen.simulate import simulate
from simulators.particle import ParticleSimulator

LOW = np.array([60.0, 0.5, 1.0])
HIGH = np.array([140.0, 2.0, 6.0])


def _prior_draws(n: int, seed: int) -> np.ndarray:
    return LOW + (HIGH - LOW) * np.random.default_rng(seed).random((n, 3))


def _repeat(theta, n: int) -> np.ndarray:
    return np.tile(np.asarray(theta, dtype=np.float64), (n, 1))


@pytest.fixture(scope="module")
def sim() -> ParticleSimulator:
    return ParticleSimulator()


@pytest.fixture(scope="module")
def prior_batch(sim):
    theta = _prior_draws(20_000, seed=0)
    return theta, sim.simulate(theta, np.random.default_rng(1))


# --------------------------------------------------------------------------------------------
# Protocol, shapes, reproducibility
# --------------------------------------------------------------------------------------------


def test_registry_attributes_and_config_round_trip(sim):
    built = simulators.get("particle", k_max=30)
    assert isinstance(built, ParticleSimulator) and built.k_max == 30
    assert sim.name == "particle" and sim.version == "1.0"
    assert sim.parameter_names == ["m_X", "lam", "beta"] == sim.prior.names
    assert sim.parameter_units == ["GeV", "", ""] == sim.prior.units
    assert sim.observable_shape == (7,) and len(sim.observable_names) == 7
    np.testing.assert_allclose(sim.prior.low.numpy(), LOW)
    np.testing.assert_allclose(sim.prior.high.numpy(), HIGH)
    config = json.loads(json.dumps(sim.config()))
    assert ParticleSimulator(**config).config() == sim.config()
    with pytest.raises(ValueError, match="efficiency"):
        ParticleSimulator(efficiency=1.5)


def test_shapes_dtypes_and_finite(sim, prior_batch):
    theta, out = prior_batch
    n, k_max = theta.shape[0], sim.k_max
    assert out["x"].shape == (n, 7) and out["x"].dtype == np.float64
    assert np.isfinite(out["x"]).all()
    lat, aug = out["latents"], out["augmented"]
    assert lat["z_p"].shape == (n, 3) and lat["z_p"].dtype == np.float64
    assert lat["n_emissions"].shape == (n,) and np.issubdtype(lat["n_emissions"].dtype, np.integer)
    for key in ("z_s_mask", "z_d_detected"):
        assert lat[key].shape == (n, k_max) and lat[key].dtype == bool
    for key in ("z_s_gap", "z_s_virtuality", "z_s_z", "z_s_log1mz", "z_s_angle", "z_s_energy", "z_s_frac", "z_d_smear"):
        assert lat[key].shape == (n, k_max) and lat[key].dtype == np.float32, key
        assert np.isfinite(lat[key]).all(), key
    for key in ("z_d_jes", "z_d_lead_smear", "z_d_u"):
        assert lat[key].shape == (n,) and np.isfinite(lat[key]).all()
    for key in lat:
        assert re.fullmatch(r"[A-Za-z0-9_]+", key), f"{key} is not a valid HDF5 dataset name"
    assert aug["joint_log_prob"].shape == (n,) and aug["joint_log_prob"].dtype == np.float64
    assert aug["joint_score"].shape == (n, 3) and aug["joint_score"].dtype == np.float64
    assert np.isfinite(aug["joint_log_prob"]).all() and np.isfinite(aug["joint_score"]).all()


def test_prior_corners_give_finite_output(sim):
    corners = np.array([[lo if (i >> j) & 1 else hi for j, (lo, hi) in enumerate(zip(LOW, HIGH))] for i in range(8)])
    theta = np.repeat(corners, 500, axis=0)
    out = sim.simulate(theta, np.random.default_rng(2))
    assert np.isfinite(out["x"]).all()
    assert np.isfinite(out["augmented"]["joint_log_prob"]).all()
    assert np.isfinite(out["augmented"]["joint_score"]).all()


def test_reproducible_given_seed(sim):
    theta = _prior_draws(300, seed=3)
    a = sim.simulate(theta, np.random.default_rng(7))
    b = sim.simulate(theta, np.random.default_rng(7))
    c = sim.simulate(theta, np.random.default_rng(8))
    np.testing.assert_array_equal(a["x"], b["x"])
    for key in a["latents"]:
        np.testing.assert_array_equal(a["latents"][key], b["latents"][key])
    for key in a["augmented"]:
        np.testing.assert_array_equal(a["augmented"][key], b["augmented"][key])
    assert not np.array_equal(a["x"], c["x"])


def test_framework_simulate_runs_it():
    out = simulate(simulators.get("particle"), n=1500, seed=0, chunk_size=500)
    assert out["x"].shape == (1500, 7) and out["valid"].all()
    assert out["latents"]["z_s_mask"].shape == (1500, 40)
    assert out["augmented"]["joint_score"].shape == (1500, 3)


def test_latents_are_consistent_with_each_other_and_with_x(sim, prior_batch):
    _, out = prior_batch
    lat, x = out["latents"], out["x"]
    k_max = sim.k_max
    n_em, mask = lat["n_emissions"], lat["z_s_mask"]
    assert (n_em >= 0).all() and (n_em <= k_max).all()
    np.testing.assert_array_equal(mask, np.arange(k_max) < n_em[:, None])
    assert not (lat["z_d_detected"] & ~mask).any()
    for key in ("z_s_gap", "z_s_virtuality", "z_s_z", "z_s_log1mz", "z_s_angle", "z_s_energy", "z_s_frac", "z_d_smear"):
        assert (lat[key][~mask] == 0).all(), f"{key} is not zero-padded"
    m0, pt, e_jet = lat["z_p"].T
    np.testing.assert_allclose(e_jet, np.hypot(pt, m0), rtol=1e-12)
    # The emissions happen before the evolution length L = ln m0^2 (Q0 = 1 GeV) runs out.
    s = np.cumsum(lat["z_s_gap"].astype(np.float64), axis=1)
    length = 2.0 * np.log(m0)
    assert (s[mask] < np.broadcast_to(length[:, None], s.shape)[mask]).all()
    # Fractions, angles, virtualities.
    z = lat["z_s_z"][mask]
    assert ((z >= 0) & (z <= 1)).all()
    np.testing.assert_allclose(z, -np.expm1(lat["z_s_log1mz"][mask]), rtol=1e-6)
    assert ((lat["z_s_angle"][mask] > 0) & (lat["z_s_angle"][mask] <= 1)).all()
    t = lat["z_s_virtuality"].astype(np.float64)
    np.testing.assert_allclose(t[mask], (m0[:, None] ** 2 * np.exp(-s))[mask], rtol=1e-5)
    # Observables from the latents.
    jes = lat["z_d_jes"]
    np.testing.assert_allclose(x[:, 0], m0 * (1 + jes), rtol=1e-12)
    np.testing.assert_allclose(x[:, 3], pt * (1 + jes), rtol=1e-12)
    np.testing.assert_array_equal(np.floor(x[:, 1]), lat["z_d_detected"].sum(axis=1))
    np.testing.assert_allclose(x[:, 1] - np.floor(x[:, 1]), lat["z_d_u"], atol=1e-12)
    y_total = -lat["z_s_log1mz"].sum(axis=1, dtype=np.float64)
    np.testing.assert_allclose(x[:, 2], -y_total + lat["z_d_lead_smear"], atol=1e-9)
    seen = np.where(lat["z_d_detected"], lat["z_s_frac"] * (1.0 + lat["z_d_smear"]), 0.0)
    np.testing.assert_allclose(x[:, 4], seen.max(axis=1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(x[:, 5], (seen * lat["z_s_angle"]).sum(axis=1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(x[:, 6], (seen * lat["z_s_angle"] ** 2).sum(axis=1), rtol=1e-5, atol=1e-7)


def test_bad_theta_shape_raises(sim):
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        sim.simulate(np.ones((4, 2)), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        sim.reference_log_likelihood(np.zeros((2, 3)), np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        sim.reference_log_likelihood(np.zeros((2, 2)), np.ones((4, 3)))
    out = sim.simulate(_repeat([100.0, 1.0, 2.0], 3), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        sim.joint_log_prob(np.ones((3, 4)), out["latents"])
    with pytest.raises(KeyError, match="z_s_log1mz"):
        sim.joint_score(_repeat([100.0, 1.0, 2.0], 3), {k: v for k, v in out["latents"].items() if k != "z_s_log1mz"})


def test_parameters_outside_the_model_are_failed_rows(sim):
    theta = np.array([[100.0, 1.0, 2.0], [100.0, -1.0, 2.0], [100.0, 1.0, 0.0], [np.nan, 1.0, 2.0]])
    out = sim.simulate(theta, np.random.default_rng(0))
    assert np.isfinite(out["x"][0]).all()
    assert np.isnan(out["x"][1:]).all()
    assert np.isnan(out["augmented"]["joint_log_prob"][1:]).all()


# --------------------------------------------------------------------------------------------
# Joint likelihood and joint score
# --------------------------------------------------------------------------------------------


def test_joint_quantities_are_reproduced_from_latents(sim, prior_batch):
    theta, out = prior_batch
    np.testing.assert_array_equal(sim.joint_log_prob(theta, out["latents"]), out["augmented"]["joint_log_prob"])
    np.testing.assert_array_equal(sim.joint_score(theta, out["latents"]), out["augmented"]["joint_score"])


@pytest.mark.parametrize("k_max", [40, 8])
def test_joint_score_matches_finite_differences(k_max):
    sim = ParticleSimulator(k_max=k_max)
    theta = _prior_draws(2000, seed=4)
    latents = sim.simulate(theta, np.random.default_rng(5))["latents"]
    if k_max == 8:
        assert (latents["n_emissions"] == k_max).mean() > 0.2  # the capped branch is exercised
    # Evaluate at other parameters than the simulated ones too: the score is a function of theta.
    at = _prior_draws(2000, seed=6)
    score = sim.joint_score(at, latents)
    steps = 1e-5 * at
    fd = np.empty_like(score)
    for i in range(3):
        shift = np.zeros(3)
        shift[i] = 1.0
        up = sim.joint_log_prob(at + steps * shift, latents)
        down = sim.joint_log_prob(at - steps * shift, latents)
        fd[:, i] = (up - down) / (2 * steps[:, i])
    np.testing.assert_allclose(fd, score, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("k_max", "theta"),
    [(40, [80.0, 1.5, 2.0]), (40, [130.0, 0.6, 5.0]), (12, [100.0, 1.2, 3.0])],
)
def test_mean_joint_score_is_zero(k_max, theta):
    sim = ParticleSimulator(k_max=k_max)
    n = 100_000
    score = sim.simulate(_repeat(theta, n), np.random.default_rng(11))["augmented"]["joint_score"]
    z = score.mean(axis=0) / (score.std(axis=0, ddof=1) / math.sqrt(n))
    assert np.all(np.abs(z) < 4.0), z


@pytest.mark.parametrize(("k_max", "theta"), [(40, [120.0, 1.8, 2.0]), (12, [100.0, 1.2, 3.0])])
def test_emission_count_is_capped_poisson_and_y_is_gamma(k_max, theta):
    sim = ParticleSimulator(k_max=k_max)
    n = 50_000
    lam, beta = theta[1], theta[2]
    lat = sim.simulate(_repeat(theta, n), np.random.default_rng(12))["latents"]
    n_em = lat["n_emissions"]
    mu = lam * 2.0 * np.log(lat["z_p"][:, 0])
    # P(N = k | m0) is Poisson(lam L) below the cap and its upper tail at the cap.
    expected = poisson.pmf(np.arange(k_max)[None, :], mu[:, None])
    expected = np.column_stack([expected, poisson.sf(k_max - 1, mu)]).mean(axis=0)
    observed = np.bincount(n_em, minlength=k_max + 1) / n
    se = np.sqrt(expected * (1 - expected) / n) + 1e-12
    assert np.all(np.abs(observed - expected) < 4.5 * se + 1.0 / n)
    if k_max >= 40:  # uncapped in practice: E[N - lam L] = 0 with Var = E[lam L]
        resid = n_em - mu
        assert abs(resid.mean()) < 4 * resid.std() / math.sqrt(n)
    # Y | N ~ Gamma(N, beta): E[beta Y - N] = 0.
    y_total = -lat["z_s_log1mz"].sum(axis=1, dtype=np.float64)
    resid = beta * y_total - n_em
    assert abs(resid.mean()) < 4 * resid.std() / math.sqrt(n)


# --------------------------------------------------------------------------------------------
# Exact reference likelihood of (mass, count, log z_lead)
# --------------------------------------------------------------------------------------------


def test_reference_normalizes_and_matches_simulated_histograms(sim):
    theta = np.array([100.0, 0.6, 5.0])
    # Trapezoid sums of smooth (Gaussian-smoothed) densities over the whole line converge
    # exponentially: the aliasing error is ~exp(-2 pi^2 sigma^2 / h^2), < 1e-8 for these steps.
    x_mass = np.arange(28.0, 184.0, 4.0)
    x_lead = np.arange(-6.0, 1.0, 0.1)
    counts = np.arange(0, 26)
    grid = np.stack(np.meshgrid(x_mass, counts + 0.5, x_lead, indexing="ij"), axis=-1).reshape(-1, 3)
    density = np.exp(sim.reference_log_likelihood(grid, theta[None])[:, 0])
    density = density.reshape(x_mass.size, counts.size, x_lead.size) * 4.0 * 0.1
    assert abs(density.sum() - 1.0) < 1e-5
    # Histogram of simulated (count, log z_lead) against the reference, Pearson chi-square.
    n = 40_000
    x = sim.simulate(_repeat(theta, n), np.random.default_rng(13))["x"]
    group = np.arange(x_lead.size) // 5  # wide bins of five grid cells [c - 0.05, c + 0.05)
    prob = np.stack([density[:, :, group == g].sum(axis=(0, 2)) for g in range(group.max() + 1)], axis=1)
    lead_edges = x_lead[0] - 0.05 + 0.5 * np.arange(group.max() + 2)
    hist, _, _ = np.histogram2d(np.floor(x[:, 1]), x[:, 2], bins=[np.arange(-0.5, counts.size), lead_edges])
    expected = n * prob
    keep = expected > 10
    assert hist[keep].sum() > 0.99 * n
    chi2 = ((hist[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = keep.sum() - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)
    # And the mass marginal.
    mass_prob = density.sum(axis=(1, 2))
    mass_hist, _ = np.histogram(x[:, 0], bins=np.append(x_mass - 2.0, x_mass[-1] + 2.0))
    keep = n * mass_prob > 10
    chi2 = ((mass_hist[keep] - n * mass_prob[keep]) ** 2 / (n * mass_prob[keep])).sum()
    dof = keep.sum() - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)


@pytest.mark.parametrize("k_max", [40, 12])
def test_reference_likelihood_ratio_has_unit_mean_and_zero_mean_score(k_max):
    sim = ParticleSimulator(k_max=k_max)
    theta0 = np.array([100.0, 1.2, 3.0])
    n = 4000
    out = sim.simulate(_repeat(theta0, n), np.random.default_rng(14))
    x_ref = out["x"][:, :3]
    # E_theta0[p(x | theta1) / p(x | theta0)] = 1 for a normalized density.
    theta1 = theta0 * np.array([1.03, 1.1, 0.9])
    ll = sim.reference_log_likelihood(x_ref, np.stack([theta0, theta1]))
    ratio = np.exp(ll[:, 1] - ll[:, 0])
    assert abs(ratio.mean() - 1.0) < 4 * ratio.std() / math.sqrt(n)
    # The score of the marginal has mean zero, and it is E[joint score | x_ref]:
    # E[t (x,z) s(x_ref)] = E[s(x_ref)^2] for each component.
    steps = np.array([1e-3, 1e-5, 1e-5]) * theta0
    thetas = np.concatenate([theta0 + np.diag(steps), theta0 - np.diag(steps)])
    ll = sim.reference_log_likelihood(x_ref, thetas)
    s = (ll[:, :3] - ll[:, 3:]) / (2 * steps)
    z = s.mean(axis=0) / (s.std(axis=0) / math.sqrt(n))
    assert np.all(np.abs(z) < 4.0), z
    t = out["augmented"]["joint_score"]
    diff = (t - s) * s
    z = diff.mean(axis=0) / (diff.std(axis=0) / math.sqrt(n))
    assert np.all(np.abs(z) < 4.0), z


def test_reference_quadrature_is_converged_and_handles_edge_cases(sim):
    theta = _prior_draws(40, seed=15)
    x_ref = sim.simulate(_prior_draws(30, seed=16), np.random.default_rng(17))["x"][:, :3]
    ll = sim.reference_log_likelihood(x_ref, theta)
    assert ll.shape == (30, 40) and np.isfinite(ll).all()
    np.testing.assert_allclose(ll, sim.reference_log_likelihood(x_ref, theta, n_quad=48), rtol=0, atol=1e-8)
    # A 7-column x uses its first three columns; impossible observations have zero density.
    x_full = sim.simulate(theta[:5], np.random.default_rng(18))["x"]
    np.testing.assert_array_equal(
        sim.reference_log_likelihood(x_full, theta), sim.reference_log_likelihood(x_full[:, :3], theta)
    )
    bad = np.array([[100.0, -0.5, -1.0], [100.0, 41.5, -1.0], [np.nan, 3.5, -1.0]])
    assert np.all(sim.reference_log_likelihood(bad, theta) == -np.inf)


def test_smeared_gamma_density_matches_quadrature(sim):
    from scipy.integrate import quad
    from scipy.stats import norm

    sigma = sim.lead_sigma
    v = np.array([-0.5, -0.15, 0.0, 0.05, 0.3, 2.0, 10.0, 30.0])
    for beta in (1.0, 6.0):
        log_p = sim._log_lead_density(v, np.full_like(v, beta))  # (k_max + 1, len(v))
        np.testing.assert_allclose(log_p[0], norm.logpdf(v, scale=sigma), rtol=1e-12)
        for n_em in (1, 2, 5, 20, 40):
            for j, vj in enumerate(v):
                lo, hi = max(0.0, vj - 12 * sigma), max(vj + 12 * sigma, 0.0) + 12 * sigma

                def log_integrand(y, n_em=n_em, vj=vj, beta=beta):  # log Gamma(y; n, beta) + log N(v - y; 0, sigma^2)
                    return (
                        n_em * math.log(beta)
                        + (n_em - 1) * np.log(y)
                        - beta * y
                        - math.lgamma(n_em)
                        - 0.5 * ((vj - y) / sigma) ** 2
                        - math.log(sigma)
                        - 0.5 * math.log(2 * math.pi)
                    )

                # Scale by the integrand's maximum so that quad sees numbers of order one.
                grid = np.linspace(lo, hi, 4001)[1:]
                top = log_integrand(grid).max()
                peak = grid[log_integrand(grid).argmax()]
                value, _ = quad(
                    lambda y, f=log_integrand, top=top: math.exp(f(y) - top),
                    lo,
                    hi,
                    points=[peak],
                    epsabs=0,
                    epsrel=1e-11,
                    limit=200,
                )
                assert log_p[n_em, j] == pytest.approx(math.log(value) + top, abs=1e-7), (beta, n_em, vj)
