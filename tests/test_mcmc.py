"""Tests of sbi_gen.mcmc: samplers on Gaussians, run_mcmc on a truncated Gaussian, R-hat, ESS, SIR.

Tolerances come from Monte Carlo error: means within 4 standard errors ``sd / sqrt(ESS)``
(per dimension, ESS measured on the same chains); covariances within 0.1 in units of
``sqrt(S_ii S_jj)`` (about 5 standard errors for ESS >= 2000).
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import truncnorm
from torch import Tensor

from sbi_gen.mcmc import (
    SAMPLERS,
    MCMCResult,
    MixtureProposal,
    ess,
    fit_gaussian_mixture,
    hmc_sample,
    imh_sample,
    rhat,
    run_mcmc,
    sir_init,
    slice_sample,
)
from sbi_gen.priors import BoxUniform, Gaussian


@pytest.fixture(autouse=True)
def _one_thread():
    """Run single-threaded: tensors here are tiny, and on a busy machine a threaded BLAS call as
    small as (20, 5) @ (5, 5) can take milliseconds instead of microseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gaussian(dim: int) -> tuple[Tensor, Tensor]:
    if dim == 2:  # strongly correlated and badly scaled
        return torch.tensor([1.0, -2.0]), torch.tensor([[1.0, 1.9], [1.9, 4.0]])
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(dim, dim, generator=gen)
    cov = a @ a.T + 0.1 * torch.eye(dim)
    return torch.linspace(-1.0, 1.0, dim), cov / cov.diagonal().mean()


def _potential(mean: Tensor, cov: Tensor):
    precision = torch.linalg.inv(cov)

    def potential(x: Tensor) -> Tensor:
        r = x - mean
        return -0.5 * ((r @ precision) * r).sum(-1)

    return potential


def _check_moments(draws: Tensor, mean: Tensor, cov: Tensor, rhat_max: float = 1.02) -> None:
    dim = mean.numel()
    flat = draws.reshape(-1, dim)
    sd = cov.diagonal().sqrt()
    n_eff = ess(draws).to(flat.dtype)
    assert (n_eff > 1000).all(), n_eff
    z = (flat.mean(0) - mean) / (sd / n_eff.sqrt())
    assert (z.abs() < 4).all(), z
    cov_error = (torch.cov(flat.T) - cov) / torch.outer(sd, sd)
    assert cov_error.abs().max() < 0.1, cov_error
    assert (rhat(draws) < rhat_max).all()


@pytest.mark.parametrize("dim", [2, 5])
@pytest.mark.parametrize("name", ["slice", "hmc"])
def test_samplers_match_gaussian_moments(name: str, dim: int) -> None:
    mean, cov = _gaussian(dim)
    gen = torch.Generator().manual_seed(0)
    init = 3.0 * torch.randn(20, dim, generator=gen)  # over-dispersed, all chains different
    info: dict = {}
    draws = SAMPLERS[name](_potential(mean, cov), init, 250, warmup=150, generator=gen, info=info)
    assert draws.shape == (250, 20, dim)
    _check_moments(draws, mean, cov)
    if name == "hmc":
        assert 0.6 < info["acceptance"] < 0.95
        assert info["divergences"] == 0
    else:
        assert info["shrink_failures"] == 0


@pytest.mark.parametrize("dim", [2, 5])
def test_independence_mh_matches_gaussian_moments(dim: int) -> None:
    mean, cov = _gaussian(dim)
    gen = torch.Generator().manual_seed(0)
    init = 3.0 * torch.randn(250, dim, generator=gen)  # over-dispersed population
    info: dict = {}
    draws = imh_sample(_potential(mean, cov), init, 40, warmup=20, generator=gen, info=info)
    assert draws.shape == (40, 250, dim)
    # Short chains: rejections correlate neighbouring draws, and split-R-hat of 20-draw halves
    # reads about tau / 40 above 1 at stationarity (tau ~ 1.5-2 here), hence the package's 1.05.
    _check_moments(draws, mean, cov, rhat_max=1.05)
    assert 0.5 < info["acceptance"] <= 1.0  # a Gaussian target: the fitted Gaussian part is nearly exact
    assert info["gaussian_weight"] >= 0.5
    assert info["n_evals"] == 250 * (1 + 20 + 40)  # one potential row per chain and step


def test_independence_mh_mixes_between_separated_modes() -> None:
    """Two Gaussians 8 sd apart with weights 0.3 / 0.7: a local sampler keeps each chain in its
    starting mode; global proposals must give each mode its weight (binomial error from ESS)."""
    centers = torch.tensor([[-4.0, 0.0], [4.0, 0.0]])
    log_weights = torch.log(torch.tensor([0.3, 0.7]))

    def potential(x: Tensor) -> Tensor:
        d2 = ((x[:, None] - centers) ** 2).sum(-1)
        return torch.logsumexp(log_weights - 0.5 * d2, dim=1)

    gen = torch.Generator().manual_seed(1)
    init = torch.tensor([-4.0, 0.0]) + torch.randn(250, 2, generator=gen)  # nearly every chain in the light mode
    init[:3] += torch.tensor([8.0, 0.0])  # a handful of starts elsewhere: the population must spread
    draws = imh_sample(potential, init, 40, warmup=30, generator=gen)
    right = (draws[..., 0] > 0).to(torch.float64)
    n_eff = float(ess(right[..., None])[0])
    assert n_eff > 1000
    assert abs(float(right.mean()) - 0.7) < 4 * math.sqrt(0.21 / n_eff)
    assert (rhat(draws) < 1.05).all()


@pytest.mark.parametrize("mixture_weight", [0.0, 0.5])
def test_mixture_proposal_is_a_normalized_density_that_it_samples(mixture_weight: float) -> None:
    gen = torch.Generator().manual_seed(2)
    states = torch.randn(300, 2, generator=gen) * torch.tensor([1.0, 0.3]) + torch.tensor([0.5, -1.0])
    states[::3] += torch.tensor([3.0, 2.0])  # a second cluster, for the mixture part
    q = MixtureProposal(states, defensive=0.1, gaussian_weight=0.2, mixture_weight=mixture_weight)
    grid = torch.linspace(-16.0, 16.0, 801)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    density = q.log_prob(torch.stack([xx.flatten(), yy.flatten()], -1).double()).exp()
    assert float(density.sum()) * float(grid[1] - grid[0]) ** 2 == pytest.approx(1.0, abs=1e-3)
    # Its draws have its mean: the states' mean exactly (kernels and the wide parts are centered
    # on it, and after an M-step the mixture's weighted means average to it).
    draws = q.sample(20_000, gen)[0].double()
    z = (draws.mean(0) - states.double().mean(0)) / (draws.std(0) / math.sqrt(20_000))
    assert (z.abs() < 4).all(), z
    with pytest.raises(ValueError, match="at least 2 chains"):
        imh_sample(lambda x: -(x**2).sum(-1), torch.zeros(1, 2), 5)


def test_samplers_are_reproducible_and_handle_minus_inf() -> None:
    def potential(x: Tensor) -> Tensor:  # standard normal restricted to x > 0
        lp = -0.5 * (x**2).sum(-1)
        return torch.where((x > 0).all(-1), lp, torch.full_like(lp, -torch.inf))

    init = torch.full((10, 1), 0.5)
    a = slice_sample(potential, init, 50, generator=torch.Generator().manual_seed(3))
    b = slice_sample(potential, init, 50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert (a > 0).all()
    c = hmc_sample(potential, init, 50, warmup=50, generator=torch.Generator().manual_seed(3))
    assert (c > 0).all() and torch.isfinite(c).all()


def test_potential_shape_is_checked() -> None:
    with pytest.raises(ValueError, match=r"\(N,\)"):
        slice_sample(lambda x: -(x**2), torch.zeros(4, 2), 5)


def test_run_mcmc_truncated_gaussian_in_box() -> None:
    low, high = torch.tensor([0.0, -1.0]), torch.tensor([1.0, 1.0])
    prior = BoxUniform(low, high)
    loc, scale = torch.tensor([0.9, -0.8]), torch.tensor([0.3, 0.5])

    def log_prob(theta: Tensor) -> Tensor:  # Gaussian likelihood times the box prior
        return -0.5 * (((theta - loc) / scale) ** 2).sum(-1) + prior.log_prob(theta)

    result = run_mcmc(log_prob, prior, 4000, n_chains=20, warmup=150, seed=0)
    assert isinstance(result, MCMCResult)
    assert result.samples.shape == (4000, 2)
    assert result.chains.shape == (200, 20, 2)
    assert ((result.samples >= low) & (result.samples <= high)).all()
    a, b = ((low - loc) / scale).numpy(), ((high - loc) / scale).numpy()
    exact = truncnorm(a, b, loc=loc.numpy(), scale=scale.numpy())
    mean, sd = torch.as_tensor(exact.mean()), torch.as_tensor(exact.std())
    z = (result.samples.double().mean(0) - mean) / (sd / result.ess.sqrt())
    assert (z.abs() < 4).all(), z
    assert (result.rhat < 1.05).all()
    assert result.acceptance is None and result.seconds > 0


def test_run_mcmc_hmc_and_thinning() -> None:
    prior = Gaussian([0.0, 0.0], scale=2.0)

    def log_prob(theta: Tensor) -> Tensor:
        return prior.log_prob(theta) - 0.5 * (((theta - 1.0) / 0.5) ** 2).sum(-1)

    result = run_mcmc(log_prob, prior, 1000, n_chains=10, warmup=100, thin=2, sampler="hmc", seed=1)
    assert result.samples.shape == (1000, 2) and result.chains.shape == (100, 10, 2)
    assert 0.5 < result.acceptance < 1.0
    # Exact posterior: precision 1/4 + 4, mean 4 / (1/4 + 4).
    z = (result.samples.double().mean(0) - 4 / 4.25) / (math.sqrt(1 / 4.25) / result.ess.sqrt())
    assert (z.abs() < 4).all(), z


def test_run_mcmc_rejects_wrong_log_prob_shape() -> None:
    prior = BoxUniform([0.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="log_prob"):
        run_mcmc(lambda theta: -(theta**2), prior, 100)
    with pytest.raises(ValueError, match="sampler"):
        run_mcmc(lambda theta: -(theta**2).sum(-1), prior, 100, sampler="nuts")
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        run_mcmc(lambda theta: -(theta**2).sum(-1), prior, 100, seed=-1)

    @torch.no_grad()
    def no_grad_log_prob(theta: Tensor) -> Tensor:
        return -(theta**2).sum(-1)

    with pytest.raises(ValueError, match="differentiable"):
        run_mcmc(no_grad_log_prob, prior, 100, sampler="hmc")


def test_run_mcmc_warns_when_chains_do_not_mix() -> None:
    prior = Gaussian([0.0], scale=10.0)

    def log_prob(theta: Tensor) -> Tensor:  # two far, narrow modes
        t = theta[:, 0]
        return torch.logaddexp(-0.5 * ((t - 10) / 0.5) ** 2, -0.5 * ((t + 10) / 0.5) ** 2)

    with pytest.warns(UserWarning, match="R-hat"):
        result = run_mcmc(log_prob, prior, 400, n_chains=8, warmup=50, sampler="hmc", seed=0)
    assert result.rhat.max() > 1.1


def test_rhat_detects_stuck_chains() -> None:
    gen = torch.Generator().manual_seed(0)
    mixed = torch.randn(500, 4, 2, generator=gen)
    assert (rhat(mixed) < 1.01).all()
    stuck = torch.randn(500, 4, 2, generator=gen)
    stuck[:, :2] += 3.0  # two chains in one mode, two in another
    assert (rhat(stuck) > 1.1).all()
    trending = torch.randn(500, 4, 1, generator=gen) + torch.linspace(0, 3, 500)[:, None, None]
    assert rhat(trending) > 1.1  # only split-R-hat sees a drift shared by all chains


def test_ess_of_iid_and_ar1_draws() -> None:
    gen = torch.Generator().manual_seed(0)
    iid = torch.randn(1000, 4, 3, generator=gen)
    assert ((ess(iid) / 4000 - 1).abs() < 0.15).all()

    rho, n_steps, n_chains = 0.9, 5000, 4
    noise = torch.randn(n_steps, n_chains, 2, generator=gen, dtype=torch.float64)
    ar = torch.empty_like(noise)
    ar[0] = noise[0] / math.sqrt(1 - rho**2)
    for t in range(1, n_steps):
        ar[t] = rho * ar[t - 1] + noise[t]
    expected = n_steps * n_chains * (1 - rho) / (1 + rho)
    assert ((ess(ar) / expected - 1).abs() < 0.25).all(), ess(ar)


def test_sir_init_prefers_high_weights_and_avoids_duplicates() -> None:
    gen = torch.Generator().manual_seed(0)
    proposals = 3.0 * torch.randn(5000, 1, generator=gen)  # q = N(0, 3^2), target N(2, 0.5^2)
    log_weights = -0.5 * ((proposals[:, 0] - 2) / 0.5) ** 2 + 0.5 * (proposals[:, 0] / 3) ** 2
    log_weights[:10] = -torch.inf
    init = sir_init(proposals, log_weights, 50, gen)
    assert init.shape == (50, 1)
    assert init.unique().numel() == 50
    assert abs(init.mean().item() - 2.0) < 0.3 and abs(init.std().item() - 0.5) < 0.2
    with pytest.raises(ValueError, match="non-finite"):
        sir_init(proposals, torch.full((5000,), -torch.inf), 5, gen)
    with pytest.warns(UserWarning, match="reusing"):
        few = sir_init(proposals[:3], torch.zeros(3), 5, gen)
    assert few.shape == (5, 1)


def test_gaussian_mixture_fit_recovers_separated_clusters() -> None:
    gen = torch.Generator().manual_seed(3)
    means = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]])
    scales = torch.tensor([[0.3, 1.0], [1.0, 0.2], [0.5, 0.5]])
    counts = [600, 300, 300]
    z = torch.cat([m + s * torch.randn(n, 2, generator=gen) for m, s, n in zip(means, scales, counts)])
    log_w, fitted, factors = fit_gaussian_mixture(z, 3)
    order = torch.cdist(means, fitted.float()).argmin(1)  # fitted component of each true cluster
    assert sorted(order.tolist()) == [0, 1, 2]
    weights = log_w.exp()[order]
    # Binomial errors of the shares, sd / sqrt(n) errors of the means, sqrt(2 / n) relative ones of the sds.
    for k, n in enumerate(counts):
        share = n / sum(counts)
        assert abs(float(weights[k]) - share) < 4 * math.sqrt(share * (1 - share) / sum(counts))
        assert ((fitted[order[k]] - means[k]).abs() < 4 * scales[k] / math.sqrt(n)).all()
        sd = torch.diagonal(factors[order[k]] @ factors[order[k]].T).sqrt()
        expected = (scales[k] ** 2 + 1e-3).sqrt()  # the covariance floor adds 1e-3
        assert ((sd / expected - 1).abs() < 4 * math.sqrt(1 / (2 * n))).all()
    # Too few points for more components than (K / (D + 1)) cannot make a degenerate fit.
    log_w, fitted, _ = fit_gaussian_mixture(z[:8], 3)
    assert len(fitted) == 1 and float(log_w.exp().sum()) == pytest.approx(1.0)


def test_independence_mh_mixture_part_fits_narrow_separated_modes() -> None:
    """Four modes 0.2 wide at the corners of a square 8 apart (sign-degenerate parameters, as in
    slcp): kernels as wide as the modes' spread waste most proposals; the mixture part fits each
    mode, so chains accept far more often and every mode gets its weight."""
    dim = 5
    corners = torch.tensor([[a, b] for a in (-4.0, 4.0) for b in (-4.0, 4.0)])
    centers = torch.cat([corners, torch.zeros(4, dim - 2)], dim=1)
    scale = torch.tensor([0.2, 0.2, 1.0, 1.0, 1.0])

    def potential(x: Tensor) -> Tensor:
        z = (x[:, None] - centers) / scale
        return torch.logsumexp(-0.5 * z.square().sum(-1), dim=1)

    gen = torch.Generator().manual_seed(4)
    init = centers[torch.arange(400) % 4] + scale * torch.randn(400, dim, generator=gen)
    acceptance = {}
    for components in (1, 8):
        info: dict = {}
        draws = imh_sample(potential, init, 40, warmup=30, components=components, thin=2, generator=gen, info=info)
        acceptance[components] = info["acceptance"]
    assert info["mixture_weight"] >= 0.5
    assert acceptance[8] > 0.5 > 2 * acceptance[1]
    mode = ((draws[..., None, :2] - corners).square().sum(-1)).argmin(-1)  # (S, C)
    for k in range(4):
        share = (mode == k).to(torch.float64)
        n_eff = float(ess(share[..., None])[0])
        assert abs(float(share.mean()) - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n_eff)
    n_eff = ess(draws[..., 2:]).to(draws.dtype)
    assert ((draws[..., 2:].std(dim=(0, 1)) - 1).abs() < 4 * (1 / (2 * n_eff)).sqrt()).all()


def test_independence_mh_thins_by_its_warmup_acceptance() -> None:
    mean, cov = _gaussian(2)
    gen = torch.Generator().manual_seed(5)
    init = 3.0 * torch.randn(250, 2, generator=gen)
    info: dict = {}
    draws = imh_sample(_potential(mean, cov), init, 40, warmup=20, thin=None, generator=gen, info=info)
    assert draws.shape == (40, 250, 2)
    assert info["thin"] == min(max(math.ceil(1 / info["warmup_acceptance"]), 2), 20)
    assert info["n_evals"] == 250 * (1 + 20 + 40 * info["thin"])
    _check_moments(draws, mean, cov, rhat_max=1.05)
    # run_mcmc hands the choice to the sampler and returns exactly the draws asked for.
    prior = Gaussian([0.0, 0.0], scale=2.0)
    result = run_mcmc(_potential(mean, cov), prior, 1000, n_chains=100, warmup=20, thin=None, sampler="imh")
    assert result.samples.shape == (1000, 2) and result.info["thin"] >= 2
    with pytest.raises(ValueError, match="thin"):
        run_mcmc(_potential(mean, cov), prior, 10, thin=0)
    with pytest.raises(ValueError, match="thin must be None or >= 1"):
        imh_sample(_potential(mean, cov), init, 5, thin=0)
