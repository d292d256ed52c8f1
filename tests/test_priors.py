import math

import pytest
import torch
from torch.distributions import Gamma, Normal, Uniform

from sbi_gen.priors import (
    BoxUniform,
    Gaussian,
    IndependentPrior,
    PointMass,
    prior_from_dict,
    prior_from_json,
    sample_prior,
)

PRIORS = {
    "box": lambda: BoxUniform([60.0, 0.5, 1.0], [140.0, 2.0, 6.0], names=["m_X", "lam", "beta"], units=["GeV", "", ""]),
    "diag": lambda: Gaussian([0.0, 1.0], scale=[0.5, 2.0]),
    "full": lambda: Gaussian([0.0, 1.0], covariance=[[1.0, 0.6], [0.6, 2.0]]),
    "product": lambda: IndependentPrior([Normal(0.0, 1.0), Gamma(2.0, 3.0), Uniform(-1.0, 2.0)]),
}


@pytest.mark.parametrize("kind", sorted(PRIORS))
def test_sample_log_prob_and_json_round_trip(kind):
    prior = PRIORS[kind]()
    theta = sample_prior(prior, 500, seed=0)
    assert theta.shape == (500, prior.dim)
    assert torch.isfinite(prior.log_prob(theta)).all()
    assert prior.support.check(theta).all()
    again = prior_from_json(prior.to_json())
    assert again.names == prior.names and again.units == prior.units
    torch.testing.assert_close(again.log_prob(theta), prior.log_prob(theta))


def test_json_numbers_are_the_shortest_decimals_of_the_float32_values():
    # float32(0.1) is 0.100000001490116...: written as 0.1, which reads back as the same float32.
    prior = BoxUniform([0.1, 0.6, -1.5], [0.5, 1.0, -0.5])
    assert prior.to_dict()["low"] == [0.1, 0.6, -1.5] and prior.to_dict()["high"] == [0.5, 1.0, -0.5]
    assert torch.equal(prior_from_dict(prior.to_dict()).low, prior.low)
    gaussian = Gaussian([0.3, 0.0], covariance=[[0.1, 0.01], [0.01, 0.2]])
    assert gaussian.to_dict()["covariance"] == [[0.1, 0.01], [0.01, 0.2]]
    assert torch.equal(prior_from_dict(gaussian.to_dict()).covariance, gaussian.covariance)
    product = IndependentPrior([Normal(0.1, 0.3), Uniform(-0.7, 0.2)])
    assert [f["loc"] if "loc" in f else f["low"] for f in product.to_dict()["factors"]] == [0.1, -0.7]


@pytest.mark.parametrize("kind", sorted(PRIORS))
def test_bijection_inverts_and_maps_onto_support(kind):
    prior = PRIORS[kind]()
    u = torch.randn(1000, prior.dim, generator=torch.Generator().manual_seed(1)) * 3
    theta = prior.transform(u)
    assert prior.support.check(theta).all()
    torch.testing.assert_close(prior.transform.inv(theta), u, atol=2e-3, rtol=2e-3)


def test_box_log_prob_is_minus_infinity_outside_and_normalized_inside():
    prior = BoxUniform([0.0, -1.0], [2.0, 1.0])
    inside = prior.log_prob(torch.tensor([1.0, 0.0]))
    assert inside.item() == pytest.approx(-math.log(4.0))
    assert prior.log_prob(torch.tensor([2.5, 0.0])).item() == -math.inf
    assert prior.log_prob(torch.tensor([[1.0, 0.0], [1.0, 1.5]])).tolist() == [pytest.approx(-math.log(4.0)), -math.inf]


def test_product_prior_minus_infinity_outside_support():
    prior = PRIORS["product"]()
    values = torch.tensor([[0.0, -1.0, 0.0], [0.0, 1.0, 3.0], [0.0, 1.0, 0.0]])
    lp = prior.log_prob(values)
    assert lp[0] == -math.inf and lp[1] == -math.inf and torch.isfinite(lp[2])


def test_sampling_moments_match():
    prior = PRIORS["full"]()
    theta = sample_prior(prior, 200_000, seed=3)
    # Sample covariance error ~ sqrt(2/n) * var: tolerance of 5 standard errors.
    torch.testing.assert_close(torch.cov(theta.T), prior.covariance, atol=5 * 2 * math.sqrt(2 / 200_000), rtol=0)


def test_sample_prior_is_reproducible_and_leaves_global_rng_alone():
    prior = PRIORS["box"]()
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a = sample_prior(prior, 10, seed=[1, 2])
    after = torch.rand(1)
    assert torch.equal(before, after)
    assert torch.equal(a, sample_prior(prior, 10, seed=[1, 2]))
    assert not torch.equal(a, sample_prior(prior, 10, seed=[1, 3]))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: BoxUniform([0.0, 1.0], [1.0, 0.5]), "upper bound"),
        (lambda: BoxUniform([0.0], [1.0, 2.0]), "shape"),
        (lambda: BoxUniform([0.0, 0.0], [1.0, 1.0], names=["a"]), "names"),
        (lambda: Gaussian([0.0], scale=-1.0), "positive"),
        (lambda: Gaussian([0.0, 0.0], covariance=[[1.0, 2.0], [2.0, 1.0]]), "positive definite"),
        (lambda: Gaussian([0.0]), "exactly one"),
        (lambda: prior_from_dict({"type": "Cauchy"}), "unknown prior"),
        (lambda: PointMass([0.0, float("nan")]), "finite"),
        (lambda: BoxUniform([0.0, 0.0], [1.0, 1.0], names="ab"), "names must be a list of strings, one per parameter"),
        (lambda: BoxUniform([], []), "at least one parameter"),
        (lambda: PointMass([]), "finite"),
    ],
)
def test_bad_priors_are_refused_with_a_clear_message(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_point_mass_puts_every_draw_on_its_value_and_has_no_bijection():
    """The "prior" of observations simulated at a fixed θ: every draw is the value, log_prob is 0
    there and -inf elsewhere, its JSON round-trips, and asking for a bijection (training or MCMC)
    is refused."""
    prior = PointMass([0.2, -0.3], names=["a", "b"], units=["GeV", ""])
    theta = sample_prior(prior, 7, seed=0)
    assert theta.shape == (7, 2) and (theta == torch.tensor([0.2, -0.3])).all()
    assert prior.log_prob(theta).eq(0).all() and prior.support.check(theta).all()
    assert prior.log_prob(torch.tensor([0.2, -0.29])) == -math.inf
    again = prior_from_json(prior.to_json())
    assert isinstance(again, PointMass) and again.labels == ["a [GeV]", "b"]
    assert again.to_dict()["value"] == [0.2, -0.3]
    with pytest.raises(ValueError, match="no bijection"):
        prior.transform  # noqa: B018


@pytest.mark.parametrize("kind", sorted(PRIORS))
def test_log_prob_refuses_theta_of_the_wrong_width(kind):
    prior = PRIORS[kind]()
    narrow = torch.zeros(4, prior.dim - 1)
    with pytest.raises(ValueError, match=rf"theta has {prior.dim - 1} parameters per row, but the prior has {prior.dim} \({prior.names[0]}, "):
        prior.log_prob(narrow)
    with pytest.raises(ValueError, match=rf"theta has {prior.dim + 1} parameters per row"):
        prior.log_prob(torch.zeros(prior.dim + 1))


def test_a_one_wide_theta_is_not_broadcast_against_a_box_or_a_point_mass():
    with pytest.raises(ValueError, match=r"theta has 1 parameters per row, but the prior has 2 \(a, b\)"):
        BoxUniform([0.0, 0.0], [1.0, 1.0], names=["a", "b"]).log_prob(torch.tensor([[0.5], [2.0]]))
    with pytest.raises(ValueError, match=r"theta is a scalar, but the prior has 2 \(a, b\)"):
        PointMass([0.3, 0.8], names=["a", "b"]).log_prob(torch.tensor(0.3))
    assert PointMass([0.3, 0.8]).log_prob(torch.tensor([0.3, 0.8])) == 0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: BoxUniform([-math.inf], [1.0]), r"bounds of a uniform prior must be finite, got low=\[-inf\]"),
        (lambda: BoxUniform([0.0, 0.0], [1.0, math.inf]), r"bounds of a uniform prior must be finite.*high=\[1.0, inf\]"),
        (lambda: BoxUniform([math.nan], [1.0]), r"bounds of a uniform prior must be finite, got low=\[nan\]"),
        (lambda: Gaussian([0.0, math.nan], scale=1.0), r"mean of a Gaussian prior must be finite, got \[0.0, nan\]"),
        (lambda: Gaussian([math.inf], scale=1.0), r"mean of a Gaussian prior must be finite"),
        (lambda: Gaussian([0.0], scale=math.nan), r"scales must be finite, got \[nan\]"),
        (lambda: Gaussian([0.0, 0.0], scale=[1.0, math.inf]), r"scales must be finite, got \[1.0, inf\]"),
        (lambda: Gaussian([0.0], covariance=[[math.nan]]), r"covariance matrix must be finite"),
        (lambda: Gaussian([0.0, 0.0], covariance=[[1.0, math.inf], [math.inf, 1.0]]), r"covariance matrix must be finite"),
        (lambda: Gaussian([0.0, 0.0], scale=[1.0, 2.0, 3.0]), r"scale must be one number or 2 .*got shape \(3,\)"),
        (lambda: Gaussian([0.0, 0.0], scale=[[1.0, 2.0]]), r"scale must be one number or 2 .*got shape \(1, 2\)"),
    ],
)
def test_non_finite_or_misshapen_prior_arguments_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()
