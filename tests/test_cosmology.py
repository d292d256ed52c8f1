"""Tests of the weak-lensing convergence-map simulator (simulators/cosmology.py)."""

import itertools
import json
import math

import numpy as np
import pytest
from scipy.integrate import solve_ivp
from scipy.linalg import null_space
from scipy.stats import multivariate_normal, skew

import simulators
from sbi_gen.simulate import simulate
from simulators.cosmology import CosmologySimulator, convergence_power, growth_factor, sigma_8_of

FIDUCIAL = np.array([0.3, 0.8, -1.0])
CORNERS = np.array(list(itertools.product([0.1, 0.5], [0.6, 1.0], [-1.5, -0.5])))


@pytest.fixture(scope="module")
def sim():
    return CosmologySimulator()


def _prior_draws(sim, n, seed):
    rng = np.random.default_rng(seed)
    low, high = sim.prior.low.numpy().astype(np.float64), sim.prior.high.numpy().astype(np.float64)
    return low + (high - low) * rng.random((n, 3))


def _circulant_covariance(power):
    """Dense covariance of a periodic field with per-mode power ``power`` (fft2 grid, E|x_k|^2 = N^2 S_k)."""
    n = power.shape[0]
    xi = np.fft.ifft2(power).real  # xi[d] = Cov(x[r], x[r + d])
    index = np.arange(n)
    dx = (index[None, :] - index[:, None]) % n
    cov = xi[dx[:, None, :, None], dx[None, :, None, :]]  # [i1, j1, i2, j2] -> xi[(i2-i1), (j2-j1)]
    return cov.reshape(n * n, n * n)


# ------------------------------------------------------------------------------------------------
# Protocol, shapes, reproducibility
# ------------------------------------------------------------------------------------------------


def test_protocol_attributes_and_config_round_trip(sim):
    assert sim.name == "cosmology" and sim.version == "1.0"
    assert sim.parameter_names == ["Omega_m", "sigma_8", "w_0"] and sim.parameter_units == ["", "", ""]
    assert sim.observable_shape == (32, 32) and sim.observable_names is None
    assert sim.prior.names == sim.parameter_names
    assert sim.prior.low.tolist() == pytest.approx([0.1, 0.6, -1.5]) and sim.prior.high.tolist() == pytest.approx(
        [0.5, 1.0, -0.5]
    )
    config = json.loads(json.dumps(sim.config()))
    assert config["n_pix"] == 32 and config["field_deg"] == pytest.approx(5.0)  # 9.375 arcmin pixels
    # sigma_n^2 = sigma_e^2 / (n_gal A_pix) with 9.375' pixels: 0.26 / sqrt(20 * 9.375^2)
    assert sim.sigma_n == pytest.approx(0.26 / math.sqrt(20.0 * 9.375**2), rel=1e-12)
    again = simulators.get("cosmology", **config)
    theta = CORNERS[:3]
    np.testing.assert_array_equal(
        again.simulate(theta, np.random.default_rng(3))["x"], sim.simulate(theta, np.random.default_rng(3))["x"]
    )
    assert CosmologySimulator(n_pix=64).config()["field_deg"] == pytest.approx(10.0)


@pytest.mark.parametrize(
    "config", [{}, {"noise": False}, {"lognormal": True}, {"n_pix": 64, "lognormal": True, "noise": False}]
)
def test_shapes_dtypes_finite_over_the_prior_and_its_corners(config):
    sim = CosmologySimulator(**config)
    theta = np.concatenate([_prior_draws(sim, 40, seed=0), CORNERS])
    out = sim.simulate(theta, np.random.default_rng(0))
    n, shape = len(theta), (sim.n_pix, sim.n_pix)
    assert out["x"].shape == (n, *shape) and out["x"].dtype == np.float32
    assert out["latents"]["kappa"].shape == (n, *shape) and out["latents"]["kappa"].dtype == np.float32
    assert out["augmented"] == {}
    assert np.isfinite(out["x"]).all() and np.isfinite(out["latents"]["kappa"]).all()
    if sim.noise:
        assert np.std(out["x"] - out["latents"]["kappa"]) == pytest.approx(sim.sigma_n, rel=0.02)
    else:
        np.testing.assert_array_equal(out["x"], out["latents"]["kappa"])
    if sim.lognormal:
        assert set(out["latents"]) == {"kappa", "g"}
        assert (out["latents"]["kappa"] > -sim.lambda_s).all()
    spectrum = sim.power_spectrum(theta)
    assert spectrum.shape == (n, *shape) and np.isfinite(spectrum).all() and (spectrum >= 0).all()


def test_reproducible_with_the_same_seed(sim):
    theta = _prior_draws(sim, 20, seed=1)
    first = sim.simulate(theta, np.random.default_rng(42))
    second = sim.simulate(theta, np.random.default_rng(42))
    np.testing.assert_array_equal(first["x"], second["x"])
    np.testing.assert_array_equal(first["latents"]["kappa"], second["latents"]["kappa"])
    assert not np.array_equal(first["x"], sim.simulate(theta, np.random.default_rng(43))["x"])


def test_runs_through_the_framework_and_flags_unphysical_parameters(sim):
    out = simulate(sim, n=30, seed=0, chunk_size=16)
    assert out["x"].shape == (30, 32, 32) and out["valid"].all()
    theta = np.array([FIDUCIAL, [-0.1, 0.8, -1.0], [0.3, -0.8, -1.0], [0.3, 0.8, np.nan]])
    out = simulate(sim, theta=theta, seed=0)
    assert out["valid"].tolist() == [True, False, False, False]
    ll = sim.log_likelihood(out["x"][:1], theta)
    assert np.isfinite(ll[0, 0]) and np.all(ll[0, 1:] == -np.inf)


# ------------------------------------------------------------------------------------------------
# Physics: sigma_8 normalization, growth, tabulated spectrum
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("theta", [FIDUCIAL, CORNERS[0], CORNERS[-1]])
def test_sigma_8_of_the_normalized_power_spectrum_equals_the_input(theta):
    # Adaptive quadrature of (1/2 pi^2) int k^2 P(k, 0) W^2(8k) dk, independent of the internal grid.
    assert sigma_8_of(*theta)[0] == pytest.approx(theta[1], rel=1e-6)


def test_spectrum_scales_as_sigma_8_squared():
    sim = CosmologySimulator(noise=False)
    theta = np.array([[0.25, 0.6, -1.2], [0.25, 1.0, -1.2], [0.45, 0.7, -0.7], [0.45, 0.91, -0.7]])
    spectrum = sim.power_spectrum(theta)
    np.testing.assert_allclose(spectrum[1], spectrum[0] * (1.0 / 0.6) ** 2, rtol=1e-12)
    np.testing.assert_allclose(spectrum[3], spectrum[2] * (0.91 / 0.7) ** 2, rtol=1e-12)
    assert np.all(spectrum[:, 0, 0] == 0.0)  # the mean mode carries no signal


def test_linder_growth_matches_the_growth_ode():
    # D'' + (3/a + dlnE/da) D' = 3 Omega_m / (2 a^5 E^2) D, from deep matter domination (D = a).
    for omega_m, w_0 in itertools.product([0.1, 0.3, 0.5], [-1.5, -1.0, -0.5]):

        def e2(a, omega_m=omega_m, w_0=w_0):
            return omega_m * a**-3 + (1 - omega_m) * a ** (-3 * (1 + w_0))

        def rhs(a, y, omega_m=omega_m, w_0=w_0, e2=e2):
            dln_e_da = 0.5 * (-3 * omega_m * a**-4 - 3 * (1 + w_0) * (1 - omega_m) * a ** (-3 * (1 + w_0) - 1)) / e2(a)
            return [y[1], -(3 / a + dln_e_da) * y[1] + 1.5 * omega_m / (a**5 * e2(a)) * y[0]]

        a0 = 1e-3
        solution = solve_ivp(rhs, (a0, 1.0), [a0, 1.0], t_eval=[0.5, 1.0], rtol=1e-10, atol=1e-14)
        ode = solution.y[0, 0] / solution.y[0, 1]  # D(z = 1) / D(0)
        # Linder's fit is within 0.2% for Omega_m >= 0.3 but drifts to 0.47% at (0.1, -0.5).
        assert growth_factor(1.0, omega_m, w_0)[0, 0] == pytest.approx(ode, rel=6e-3)


def test_tabulated_spectrum_matches_direct_integration(sim):
    theta = np.concatenate(
        [
            _prior_draws(sim, 30, seed=5),
            CORNERS,
            [[0.3, 0.8, -1.0], [0.1234, 0.8, -1.0], [0.6, 0.8, -1.0], [0.3, 0.8, -1.8]],  # last two: direct path
        ]
    )
    spectrum = CosmologySimulator(noise=False).power_spectrum(theta)
    nonzero = sim.ell > 0
    direct = convergence_power(sim.ell[nonzero], theta[:, 0], theta[:, 1], theta[:, 2]) / sim.pixel_rad**2
    np.testing.assert_allclose(spectrum[:, nonzero], direct, rtol=1e-5)


def test_spectrum_is_continuous_across_the_table_edges():
    sim = CosmologySimulator(noise=False)
    eps = 1e-9
    pairs = [([0.3, 0.8, -1.0 - eps], [0.3, 0.8, -1.0 + eps]), ([0.5, 0.8, -0.7], [0.5 + eps, 0.8, -0.7])]
    for left, right in pairs:
        spectrum = sim.power_spectrum([left, right])[:, sim.ell > 0]
        np.testing.assert_allclose(spectrum[0], spectrum[1], rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Statistics of the maps
# ------------------------------------------------------------------------------------------------


def test_measured_power_spectrum_matches_the_input_within_sampling_error():
    sim = CosmologySimulator()  # with noise: the expectation is S + sigma_n^2
    n_maps, n_bins = 1500, 12
    x = sim.simulate(np.tile(FIDUCIAL, (n_maps, 1)), np.random.default_rng(11))["x"]
    measured = sim.summary(x, n_bins=n_bins).mean(axis=0)
    # Expectation and exact variance from the fft2 grid: for Gaussian maps the bin average of
    # |x_k|^2 / N^2 over c modes has variance (2 / c^2) sum_k S_k^2 (pairs k, -k are copies).
    total = sim.power_spectrum(FIDUCIAL)[0]
    which = np.digitize(sim.ell, sim.bin_edges(n_bins)) - 1
    expected, std = np.empty(n_bins), np.empty(n_bins)
    for b in range(n_bins):
        modes = total[(which == b) & (sim.ell > 0)]
        expected[b] = modes.mean()
        std[b] = math.sqrt(2.0 * np.sum(modes**2) / modes.size**2 / n_maps)
    np.testing.assert_allclose(sim.expected_summary(FIDUCIAL, n_bins=n_bins)[0], expected, rtol=1e-12)
    z = (measured - expected) / std
    assert np.all(np.abs(z) < 4.0), z
    assert np.all(np.diff(sim.bin_centers(n_bins)) > 0)


def test_summary_equals_a_full_fft_computation(sim):
    x = sim.simulate(CORNERS[:4], np.random.default_rng(2))["x"].astype(np.float64)
    power = np.abs(np.fft.fft2(x - x.mean(axis=(1, 2), keepdims=True))) ** 2 / sim.n_pix**2
    which = np.digitize(sim.ell, sim.bin_edges(8)) - 1
    reference = np.stack([power[:, (which == b) & (sim.ell > 0)].mean(axis=1) for b in range(8)], axis=1)
    np.testing.assert_allclose(sim.summary(x, n_bins=8), reference, rtol=1e-10)
    np.testing.assert_allclose(sim.summary(x, n_bins=8, log=True), np.log(reference), rtol=1e-10)


def test_lognormal_maps_are_skewed_with_zero_mean():
    sim = CosmologySimulator(lognormal=True, noise=False)
    out = sim.simulate(np.tile(FIDUCIAL, (300, 1)), np.random.default_rng(4))
    kappa = out["latents"]["kappa"].astype(np.float64)
    assert skew(kappa.ravel()) > 0.3
    gaussian = CosmologySimulator(noise=False).simulate(np.tile(FIDUCIAL, (300, 1)), np.random.default_rng(4))["x"]
    assert abs(skew(gaussian.ravel().astype(np.float64))) < 0.05
    # E[kappa] = 0 exactly; each map's mean fluctuates (g's mean mode), so compare with its spread.
    map_means = kappa.mean(axis=(1, 2))
    assert abs(map_means.mean()) < 4.0 * map_means.std() / math.sqrt(len(map_means))
    # kappa = lambda_s (exp(g - sigma_g^2 / 2) - 1) with sigma_g^2 the pixel variance of g.
    g = out["latents"]["g"].astype(np.float64)
    variance_g = 2.0 * np.log(sim.lambda_s / (kappa + sim.lambda_s) * np.exp(g)).mean()
    assert g.var() == pytest.approx(variance_g, rel=0.05)


# ------------------------------------------------------------------------------------------------
# Exact likelihood
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("noise", [True, False])
def test_gaussian_log_likelihood_matches_a_dense_normal_density(noise):
    sim = CosmologySimulator(n_pix=4, noise=noise)
    theta = np.array([FIDUCIAL, CORNERS[0], CORNERS[-1], [0.2, 0.7, -0.8]])
    x = sim.simulate(theta[[0, 1, 3]], np.random.default_rng(7))["x"].astype(np.float64)
    ll = sim.log_likelihood(x, theta)
    assert ll.shape == (3, 4)
    basis = null_space(np.ones((1, 16)))  # orthonormal basis of mean-free maps, (16, 15)
    for k, row in enumerate(theta):
        cov = _circulant_covariance(sim.power_spectrum(row)[0])
        dense = multivariate_normal(np.zeros(15), basis.T @ cov @ basis).logpdf(x.reshape(3, 16) @ basis)
        np.testing.assert_allclose(ll[:, k], dense, rtol=0, atol=1e-8)


def _lognormal_power(sim, row):
    """Spectrum and variance of g: xi_g = ln(1 + xi_kappa / lambda^2), mean mode as the fundamental mode."""
    xi_kappa = np.fft.ifft2(sim.power_spectrum(row)[0]).real
    power_g = np.fft.fft2(np.log1p(xi_kappa / sim.lambda_s**2)).real
    power_g[0, 0] = power_g[0, 1]
    return power_g, power_g.mean()


def test_lognormal_log_likelihood_matches_a_dense_density():
    sim = CosmologySimulator(n_pix=4, lognormal=True, noise=False)
    theta = np.array([FIDUCIAL, CORNERS[-1], [0.2, 0.7, -0.8]])
    out = sim.simulate(theta, np.random.default_rng(8))
    kappa = out["x"].astype(np.float64)
    ll = sim.log_likelihood(kappa, theta)
    for k, row in enumerate(theta):
        power_g, variance_g = _lognormal_power(sim, row)
        g = np.log1p(kappa / sim.lambda_s) + variance_g / 2
        dense = multivariate_normal(np.zeros(16), _circulant_covariance(power_g)).logpdf(g.reshape(3, 16))
        dense -= np.log(kappa + sim.lambda_s).sum(axis=(1, 2))
        np.testing.assert_allclose(ll[:, k], dense, rtol=0, atol=1e-8)
        # The generated Gaussian field is the g the density is written in.
        np.testing.assert_allclose(out["latents"]["g"][k], g[k], atol=1e-5)
    assert sim.log_likelihood(np.full((4, 4), -2 * sim.lambda_s), FIDUCIAL)[0, 0] == -np.inf


def test_likelihood_peaks_near_the_truth_in_sigma_8():
    sim = CosmologySimulator()
    x = sim.simulate(np.tile(FIDUCIAL, (20, 1)), np.random.default_rng(9))["x"]
    grid = np.column_stack([np.full(81, 0.3), np.linspace(0.6, 1.0, 81), np.full(81, -1.0)])
    total = sim.log_likelihood(x, grid).sum(axis=0)
    assert abs(grid[np.argmax(total), 1] - 0.8) < 0.03


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_bad_input_raises(sim):
    for theta in (np.zeros((4, 2)), np.zeros((2, 3, 1)), np.zeros(4)):
        with pytest.raises(ValueError, match=r"\(n, 3\)"):
            sim.simulate(theta, np.random.default_rng(0))
        with pytest.raises(ValueError, match=r"\(n, 3\)"):
            sim.power_spectrum(theta)
    with pytest.raises(ValueError, match=r"\(m, 32, 32\)"):
        sim.log_likelihood(np.zeros((2, 16, 16)), FIDUCIAL)
    with pytest.raises(ValueError, match="only available"):
        CosmologySimulator(lognormal=True).log_likelihood(np.zeros((1, 32, 32)), FIDUCIAL)
    with pytest.raises(ValueError, match="n_pix"):
        CosmologySimulator(n_pix=1)
    with pytest.raises(ValueError, match="field_deg"):
        CosmologySimulator(field_deg=-1.0)
    with pytest.raises(ValueError, match="bins"):
        CosmologySimulator(n_pix=4).summary(np.zeros((1, 4, 4)), n_bins=12)
