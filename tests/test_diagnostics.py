"""Diagnostics detect what they must, on a problem with an analytic posterior.

θ ~ N(0, I_2), x | θ ~ N(θ, I_2): the exact posterior is N(x / 2, I / 2). Miscalibrated
variants scale its standard deviation by 0.5 (over-confident) or 2 (under-confident), or
shift its mean by one posterior standard deviation (biased). Every verdict is a test at
family-wise level 0.01, so the exact posterior fails with probability at most 1% for a
random seed; the misspecified ones have p-values many orders of magnitude below the level
at N = 1000 (e.g. the 0.5 scale puts ~40% of ranks in the outer 10% of bins).
"""

import json
import math

import numpy as np
import pytest
import torch

from sbi_gen.diagnostics import (
    BatchedPosterior,
    as_batched_posterior,
    c2st_scores,
    expected_coverage,
    gaussian_posterior,
    posterior_draws,
    posterior_predictive_check,
    sbc,
    tarp,
)
from sbi_gen.inference import NLE, NPE
from sbi_gen.priors import Gaussian
from sbi_gen.simulate import as_simulator
from sbi_gen.train import TrainConfig

N, D, L = 1000, 2, 200
SD = math.sqrt(0.5)

CASES = {
    "exact": (lambda x: x / 2, lambda x: torch.full_like(x, SD)),
    "over-confident": (lambda x: x / 2, lambda x: torch.full_like(x, 0.5 * SD)),
    "under-confident": (lambda x: x / 2, lambda x: torch.full_like(x, 2 * SD)),
    "biased": (lambda x: x / 2 + SD, lambda x: torch.full_like(x, SD)),
}


@pytest.fixture(scope="module")
def pairs():
    gen = torch.Generator().manual_seed(2026)
    theta = torch.randn(N, D, generator=gen)
    return theta, theta + torch.randn(N, D, generator=gen)


def posterior(case):
    return gaussian_posterior(*CASES[case], name=case)


@pytest.mark.parametrize("case", sorted(CASES))
def test_sbc_coverage_and_tarp_verdicts(pairs, case):
    theta, x = pairs
    post = posterior(case)
    results = {
        "sbc": sbc(post, theta, x, n_samples=L, seed=1),
        "hpd": expected_coverage(post, theta, x, n_samples=L, seed=1),
        "kde": expected_coverage(post, theta, x, n_samples=L, seed=1, use_log_prob=False),
        "tarp": tarp(post, theta, x, n_samples=L, seed=1),
    }
    if case == "exact":
        for name, result in results.items():
            assert result.passed, (name, result.verdict)
            assert "passed" in result.verdict
    else:
        for name, result in results.items():
            assert not result.passed, (name, result.verdict)
            assert "FAILED" in result.verdict
    for name in ("hpd", "kde"):
        result = results[name]
        mid = result.coverage[np.searchsorted(result.levels, 0.5)]
        expected = {"exact": "calibrated", "over-confident": "over-confident", "biased": "over-confident",
                    "under-confident": "under-confident"}[case]
        assert result.calibration == expected, (name, result.verdict)
        # The curve's side of the diagonal at the 50% level, beyond the binomial noise (±0.04).
        if expected == "over-confident":
            assert mid < 0.5 - 0.1 and result.area < 0
        elif expected == "under-confident":
            assert mid > 0.5 + 0.1 and result.area > 0
        else:
            assert abs(mid - 0.5) < 0.05
    # TARP: over- and under-confidence also land on their sides (Lemos et al. 2023, fig. 2).
    if case == "over-confident":
        assert results["tarp"].area < 0
    if case == "under-confident":
        assert results["tarp"].area > 0


@pytest.mark.parametrize("case", ["exact", "over-confident", "under-confident"])
def test_central_intervals_hold_the_truth_as_often_as_their_level_only_when_calibrated(pairs, case):
    # The truth is N(mean, SD²) given x; a posterior of width s · SD puts its central interval of
    # level a at mean ± z s SD, z = Φ⁻¹((1 + a) / 2), which holds the truth with probability
    # 2 Φ(z s) - 1: a itself for s = 1, 0.381 and 0.673 for s = 1/2, 0.953 and 1.000 for s = 2.
    # N = 1000 pairs: the binomial standard error of a share is at most 0.016.
    from scipy.stats import norm

    from sbi_gen.diagnostics import central_interval_coverage

    theta, x = pairs
    levels = np.array([0.68, 0.95])
    shares = central_interval_coverage(sbc(posterior(case), theta, x, n_samples=L, seed=1).ranks, L, levels)
    assert shares.shape == (2, D)
    scale = {"exact": 1.0, "over-confident": 0.5, "under-confident": 2.0}[case]
    expected = 2 * norm.cdf(norm.ppf((1 + levels) / 2) * scale) - 1
    for probability, share in zip(expected, shares, strict=True):
        np.testing.assert_allclose(share, probability, atol=4 * math.sqrt(probability * (1 - probability) / N) + 1.0 / L)


def test_sbc_ranks_are_counts_of_draws_below_the_truth():
    theta = torch.tensor([[0.0, 10.0], [-10.0, 0.5]])
    x = torch.zeros(2, 2)
    draws = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[-1.0, 1.0], [0.0, 0.0]], [[0.5, 0.0], [0.0, 0.0]]])  # (3, 2, 2)
    result = sbc(BatchedPosterior(lambda x, n, seed: draws), theta, x, n_samples=3)
    # row 0: θ1 = 0 has one draw (-1) below it, θ2 = 10 all three; row 1: θ1 = -10 none, θ2 = 0.5 all three
    assert result.ranks.tolist() == [[1, 3], [0, 3]]


def test_c2st_agrees_with_the_calibration_checks(pairs):
    """C2ST of each variant against exact reference draws for 2 observations.

    Equal distributions give accuracy 0.5 ± 0.011 (binomial sd of 2000 classifications) plus a
    small classifier bias; the variants are far apart: the 1-sd shift in both coordinates has
    Bayes accuracy Φ(√2 / 2) = 0.76, the scale changes above 0.7.
    """
    _, x = pairs
    x_obs = x[:2]
    reference = posterior("exact").sample(x_obs, 1000, 123).transpose(0, 1)  # (2, 1000, 2)
    scores = {case: c2st_scores(posterior(case), x_obs, reference, seed=0, early_stopping=True) for case in CASES}
    assert scores["exact"].mean() < 0.56
    for case in ("over-confident", "under-confident", "biased"):
        assert scores[case].mean() > 0.65, (case, scores[case])


def test_results_serialize_to_json(pairs):
    theta, x = pairs
    post = posterior("exact")
    for result in (sbc(post, theta[:100], x[:100], n_samples=50), tarp(post, theta[:100], x[:100], n_samples=50),
                   expected_coverage(post, theta[:100], x[:100], n_samples=50)):
        data = json.loads(json.dumps(result.to_dict()))
        assert data["verdict"] == result.verdict and isinstance(data["passed"], bool)


def test_same_seed_same_result_and_seeds_independent_of_the_data(pairs):
    theta, x = pairs
    post = posterior("exact")
    a = tarp(post, theta, x, n_samples=50, seed=3)
    b = tarp(post, theta, x, n_samples=50, seed=3)
    assert np.array_equal(a.statistic, b.statistic)
    # Test data made with torch generators seeded 0 and 1 must not share streams with a
    # diagnostic seeded 0 (references equal to the noise once made TARP fail an exact posterior).
    theta0 = torch.randn(N, D, generator=torch.Generator().manual_seed(0))
    x0 = theta0 + torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    assert tarp(post, theta0, x0, n_samples=L, seed=0).passed


def test_bad_inputs_give_clear_errors(pairs):
    theta, x = pairs
    post = posterior("exact")
    with pytest.raises(ValueError, match="theta must have shape"):
        sbc(post, theta[:, 0], x)
    with pytest.raises(ValueError, match="rows"):
        sbc(post, theta, x[:10])
    bad = theta.clone()
    bad[3, 1] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        expected_coverage(post, bad, x)
    wrong = BatchedPosterior(lambda x, n, seed: torch.zeros(n, len(x), 3))
    with pytest.raises(ValueError, match="expected"):
        tarp(wrong, theta, x, n_samples=5)
    with pytest.raises(TypeError, match="cannot diagnose"):
        sbc(object(), theta, x)


def test_sbc_with_few_draws_bins_only_possible_ranks(pairs):
    from sbi_gen.diagnostics import _chi2_uniform_ranks

    theta, x = pairs
    # 5 draws leave 6 possible ranks: the default 20 bins would include empty ones (p = NaN).
    result = sbc(posterior("exact"), theta, x, n_samples=5, seed=1)
    assert result.n_bins == 6 and np.isfinite(result.chi2_p_values).all()
    assert result.passed, result.verdict
    # Ranks spread exactly evenly over {0..5} fit uniform perfectly (χ² = 0, p = 1) for every
    # binning, also unequal ones such as 4 bins of 2, 1, 2, 1 ranks.
    even = np.repeat(np.arange(6), 50)[:, None]
    for n_bins in range(2, 7):
        np.testing.assert_allclose(_chi2_uniform_ranks(even, 5, n_bins), [1.0])
    for n_bins in (1, 7):
        with pytest.raises(ValueError, match="n_bins must be an integer from 2 to the 6 possible ranks"):
            sbc(posterior("exact"), theta, x, n_samples=5, n_bins=n_bins)


def test_names_must_match_the_dimension(pairs):
    theta, x = pairs
    with pytest.raises(ValueError, match="names has 1 entries but there are 2 parameters"):
        sbc(posterior("exact"), theta, x, n_samples=5, names=["mass"])
    good = posterior("exact").sample(x[:1], 100, 0)[:, 0]
    with pytest.raises(ValueError, match="names has 3 entries but there are 2 summaries"):
        posterior_predictive_check(_toy_simulator(), good, x[0], names=["a", "b", "c"])
    assert sbc(posterior("exact"), theta, x, n_samples=5, names=["a", "b"]).names == ["a", "b"]


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_posterior_predictive_check_refuses_a_non_finite_observation(pairs, value):
    _, x = pairs
    good = posterior("exact").sample(x[:1], 100, 0)[:, 0]
    x_obs = x[0].clone()
    x_obs[1] = value
    with pytest.raises(ValueError, match="x_obs contains NaN or inf"):
        posterior_predictive_check(_toy_simulator(), good, x_obs)


def test_levels_references_and_bounds_are_checked(pairs):
    theta, x = pairs
    post = posterior("exact")
    for alpha in (0.0, 1.5, math.nan):
        with pytest.raises(ValueError, match="alpha is a significance level"):
            expected_coverage(post, theta, x, n_samples=5, alpha=alpha)
    with pytest.raises(ValueError, match="alpha is a significance level"):
        sbc(post, theta, x, n_samples=5, alpha=5)
    with pytest.raises(ValueError, match="alpha is a significance level"):
        tarp(post, theta, x, n_samples=5, alpha=-0.1)
    with pytest.raises(ValueError, match="references contain NaN or inf"):
        tarp(post, theta, x, n_samples=5, references=torch.full_like(theta, math.nan))
    lower, upper = torch.tensor([-5.0, -5.0]), torch.tensor([5.0, 5.0])
    for bounds in ((torch.tensor([-5.0, 5.0]), upper), (upper, lower), (lower, torch.tensor([5.0, math.inf]))):
        with pytest.raises(ValueError, match="lower strictly below upper"):
            tarp(post, theta, x, n_samples=5, bounds=bounds)
    with pytest.raises(ValueError, match="2 values each, got 3 and 2"):
        tarp(post, theta, x, n_samples=5, bounds=(torch.zeros(3), upper))
    assert tarp(post, theta, x, n_samples=L, seed=1, bounds=(-5.0, 5.0)).passed


def test_counts_must_be_positive(pairs):
    theta, x = pairs
    post = posterior("exact")
    for n_samples in (0, -1):
        for diagnostic in (sbc, expected_coverage, tarp):
            with pytest.raises(ValueError, match="n_samples must be an integer of at least 1"):
                diagnostic(post, theta, x, n_samples=n_samples)
    for diagnostic in (expected_coverage, tarp):
        with pytest.raises(ValueError, match="levels must be an integer of at least 2"):
            diagnostic(post, theta, x, n_samples=5, levels=0)


def _toy_simulator():
    return as_simulator(lambda theta, rng: theta + rng.normal(size=theta.shape), Gaussian([0.0, 0.0], scale=1.0))


def test_posterior_predictive_check_flags_a_wrong_posterior(pairs):
    _, x = pairs
    simulator = _toy_simulator()
    x_obs = x[0]
    good = posterior("exact").sample(x_obs[None], 1000, 0)[:, 0]
    ppc = posterior_predictive_check(simulator, good, x_obs, seed=0)
    assert ppc.passed and ppc.x_predictive.shape == (1000, 2)
    # Posterior-predictive x ~ N(x_o / 2, 1.5 I): z-scores are (x_o / 2) / sqrt(1.5).
    np.testing.assert_allclose(ppc.z_scores, (x_obs.numpy() / 2) / math.sqrt(1.5), atol=0.15)
    far = good + 6.0
    bad = posterior_predictive_check(simulator, far, x_obs, seed=0)
    assert not bad.passed and "FAILED" in bad.verdict


@pytest.fixture(scope="module")
def training_pairs():
    gen = torch.Generator().manual_seed(7)
    theta = torch.randn(4000, D, generator=gen)
    return theta, theta + torch.randn(4000, D, generator=gen)


@pytest.fixture(scope="module")
def trained_npe(training_pairs):
    torch.manual_seed(0)
    prior = Gaussian([0.0, 0.0], scale=1.0)
    npe = NPE(prior, "maf", estimator_kwargs={"transforms": 2, "hidden_features": [32, 32]})
    npe.fit(training_pairs, config=TrainConfig(max_epochs=40, progress=False, seed=0))
    return npe


def test_npe_batched_posterior_matches_its_single_posterior(trained_npe, pairs):
    _, x = pairs
    post = as_batched_posterior(trained_npe)
    draws = post.sample(x[:5], 300, 0)
    assert draws.shape == (300, 5, 2)
    assert torch.equal(draws, post.sample(x[:5], 300, 0))
    log_q = post.log_prob(draws, x[:5])
    expected = torch.stack([trained_npe.posterior(x[i]).log_prob(draws[:, i]) for i in range(5)], dim=1)
    torch.testing.assert_close(log_q, expected, atol=1e-4, rtol=1e-4)


def test_a_trained_npe_on_the_linear_gaussian_is_calibrated(trained_npe, pairs):
    """4,000 simulations are plenty for a 2-D Gaussian posterior: every check should pass."""
    theta, x = pairs
    for result in (
        sbc(trained_npe, theta, x, n_samples=L, seed=0),
        expected_coverage(trained_npe, theta, x, n_samples=L, seed=0),
        tarp(trained_npe, theta, x, n_samples=L, seed=0),
    ):
        assert result.passed, result.verdict


def test_nle_batched_posterior_samples_each_observation_by_mcmc(pairs, training_pairs):
    torch.manual_seed(0)
    _, x = pairs
    prior = Gaussian([0.0, 0.0], scale=1.0)
    nle = NLE(prior, "maf", estimator_kwargs={"transforms": 2, "hidden_features": [32, 32]})
    nle.fit(training_pairs, config=TrainConfig(max_epochs=40, progress=False, seed=0))
    post = as_batched_posterior(nle)  # independence MH, 100 chains
    draws = post.sample(x[:2], 100, 0)
    assert draws.shape == (100, 2, 2) and torch.isfinite(draws).all()
    # the two observations get their own posteriors, centred near x / 2 (posterior sd 0.71)
    centres = draws.mean(0)
    assert torch.all((centres - x[:2] / 2).abs() < 0.5), (centres, x[:2] / 2)
    assert post.log_prob(draws, x[:2]).shape == (100, 2)


def test_shared_draws_give_the_same_results_as_separate_calls(pairs, trained_npe):
    from sbi_gen.diagnostics import posterior_draws

    theta, x = pairs
    for post in (posterior("exact"), trained_npe):
        draws = posterior_draws(post, x[:200], 50, seed=4)
        assert np.array_equal(sbc(post, theta[:200], x[:200], n_samples=50, seed=4).ranks,
                              sbc(post, theta[:200], x[:200], seed=4, draws=draws).ranks)
        separate = expected_coverage(post, theta[:200], x[:200], n_samples=50, seed=4).statistic
        shared = expected_coverage(post, theta[:200], x[:200], seed=4, draws=draws).statistic
        np.testing.assert_allclose(shared, separate, atol=1.0 / 51)  # log_prob by one pass or two: rare tie flips
        assert np.array_equal(tarp(post, theta[:200], x[:200], n_samples=50, seed=4).statistic,
                              tarp(post, theta[:200], x[:200], seed=4, draws=draws).statistic)


def test_npe_without_the_bijection_is_diagnosed_inside_the_support():
    from sbi_gen.priors import BoxUniform
    from sbi_gen.simulate import simulate

    prior = BoxUniform([0.0, 0.0], [1.0, 1.0])
    sim = as_simulator(lambda theta, rng: theta + 0.3 * rng.normal(size=theta.shape), prior, name="box")
    data = simulate(sim, n=1000, seed=0)
    torch.manual_seed(0)
    npe = NPE(prior, "nsf", estimator_kwargs={"transforms": 1, "hidden_features": [16]})
    npe.fit((data["theta"], data["x"]), config=TrainConfig(max_epochs=3, progress=False))
    batched = as_batched_posterior(npe, batch_size=2)
    x = torch.tensor([[0.98, 0.02], [0.5, 0.5], [0.0, 1.0]])  # two near corners: much leaks
    theta, log_prob = batched.sample_and_log_prob(x, 500, 0)
    assert theta.shape == (500, 3, 2) and torch.isfinite(prior.log_prob(theta.reshape(-1, 2))).all()
    torch.testing.assert_close(log_prob, batched.log_prob(theta, x))
    outside = torch.tensor([[[1.5, 0.5], [0.5, -0.2], [0.5, 0.5]]])
    assert batched.log_prob(outside, x)[0].tolist()[:2] == [-math.inf, -math.inf]
    assert math.isfinite(batched.log_prob(outside, x)[0, 2].item())


def test_posterior_draws_refuse_observations_with_nan():
    """NaN observations sent to the estimator gave draws outside the prior, and a message that
    blamed the training."""
    post = gaussian_posterior(lambda x: x / 2, lambda x: torch.full_like(x, 0.5**0.5))
    with pytest.raises(ValueError, match="^1 of 3 observations contain NaN or inf; drop invalid rows first$"):
        posterior_draws(post, torch.tensor([[0.0, 0.0], [float("nan"), 0.0], [1.0, 1.0]]), 10)


@pytest.mark.parametrize("diagnostic", [sbc, expected_coverage, tarp])
def test_shared_draws_must_be_those_of_the_observations_diagnosed(pairs, diagnostic):
    """Draws of other observations gave ranks and coverage that looked plausible and meant nothing."""
    theta, x = pairs
    post = posterior("exact")
    draws = posterior_draws(post, x[:100], 20, seed=1)
    fix = r"pass the draws of these observations \(diagnostics\.posterior_draws\(model, x, n_samples\)\)$"
    with pytest.raises(ValueError, match="^draws hold posterior draws for 100 observations, but theta has 200 rows: " + fix):
        diagnostic(post, theta[:200], x[:200], draws=draws)
    with pytest.raises(ValueError, match=r"^draws were drawn for other observations than this x \(same number, different values\): " + fix):
        diagnostic(post, theta[100:200], x[100:200], draws=draws)
    three = posterior_draws(gaussian_posterior(lambda x: x[:, [0, 1, 1]], lambda x: torch.ones(len(x), 3)), x[:100], 20)
    with pytest.raises(ValueError, match="^draws hold 3 parameters per draw, but theta has 2 columns: pass draws of the posterior"):
        diagnostic(post, theta[:100], x[:100], draws=three)
    with pytest.raises(TypeError, match="^draws must be the Draws that diagnostics.posterior_draws returns, got Tensor$"):
        diagnostic(post, theta[:100], x[:100], draws=draws.samples)
    # the same observations in another dtype or container are the same observations
    diagnostic(post, theta[:100].double(), x[:100].numpy().astype(np.float64), draws=draws)


def test_hand_made_draws_are_checked_by_shape_and_values(pairs):
    from sbi_gen.diagnostics import Draws

    theta, x = pairs
    post = posterior("exact")
    draws = posterior_draws(post, x[:100], 20, seed=1)
    # without a fingerprint only the shapes can be checked, and results are those of the drawn ones
    plain = Draws(draws.samples, draws.log_prob, draws.seed)
    assert np.array_equal(sbc(post, theta[:100], x[:100], draws=plain).ranks,
                          sbc(post, theta[:100], x[:100], draws=draws).ranks)
    with pytest.raises(ValueError, match=r"^draws\.log_prob must have shape \(20, 100\), one per draw, got \(20, 99\)$"):
        expected_coverage(post, theta[:100], x[:100], draws=Draws(draws.samples, draws.log_prob[:, :99], 1))
    with pytest.raises(ValueError, match=r"^draws\.samples must have shape \(n_samples >= 1, N, D\), got \(100, 2\)$"):
        sbc(post, theta[:100], x[:100], draws=Draws(draws.samples[0], None, 1))
    nan = draws.samples.clone()
    nan[3, 5, 1] = math.nan
    with pytest.raises(ValueError, match="^draws contain NaN or infinite samples$"):
        tarp(post, theta[:100], x[:100], draws=Draws(nan, None, 1))
