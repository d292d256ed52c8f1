"""The diffusion estimator: the SDE, the samplers and the ODE log-density against closed forms.

With the exact noise predictor of a Gaussian target (its score is analytic), the probability-flow
ODE is linear, x(1) = μ_1 + A⁻¹(x - μ_0) with A = Σ_0^{1/2} Σ_1^{-1/2}, so the ODE samplers and
``log_prob`` can be checked against exact values without any training.
"""

import math

import numpy as np
import pytest
import torch

from sbi_gen.checkpoint import load_model, save
from sbi_gen.estimators import build_estimator
from sbi_gen.estimators.diffusion import (
    SAMPLERS,
    Diffusion,
    VPSchedule,
    _ode_sample_and_log_prob,
    divergence,
    ode_log_prob,
    sample_dopri5,
    sample_heun,
    time_grid,
)
from sbi_gen.inference import NLE, NPE
from sbi_gen.nn import ResidualMLP
from sbi_gen.priors import Gaussian
from sbi_gen.simulate import as_simulator, simulate
from sbi_gen.train import TrainConfig

SCHEDULE = VPSchedule()
MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
FACTOR = torch.tensor([[1.5, 0.0], [0.9, 0.4]], dtype=torch.float64)
COVARIANCE = FACTOR @ FACTOR.T  # correlated, scales 1.5 and 0.98


def _marginal(t):
    """Mean and covariance of x_t for x_0 ~ N(MEAN, COVARIANCE)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    alpha, sigma = SCHEDULE.alpha(t), SCHEDULE.sigma(t)
    return alpha[..., None] * MEAN, alpha[..., None, None] ** 2 * COVARIANCE + sigma[..., None, None] ** 2 * torch.eye(
        2, dtype=torch.float64
    )


EIGENVALUES, EIGENVECTORS = torch.linalg.eigh(COVARIANCE)


def exact_eps(x, t, context):
    r"""ε(x, t) = σ(t) Σ_t⁻¹ (x - μ_t) = -σ(t) ∇ log p_t(x): the exact noise predictor.

    Σ_t = α² Σ + σ² I shares the eigenvectors V of Σ: Σ_t⁻¹ = V diag(1 / (α² λ + σ²)) Vᵀ.
    """
    alpha, sigma = SCHEDULE.alpha(t)[:, None], SCHEDULE.sigma(t)[:, None]
    rotated = (x - alpha * MEAN) @ EIGENVECTORS
    return sigma * (rotated / (alpha**2 * EIGENVALUES + sigma**2)) @ EIGENVECTORS.T


def _sqrtm(matrix):
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.sqrt()) @ vectors.T


def _linear_flow():
    """(A, μ_0, μ_1, Σ_0): the exact probability-flow map x_tmin = μ_0 + A (x_1 - μ_1)."""
    mean0, cov0 = _marginal(SCHEDULE.t_min)
    mean1, cov1 = _marginal(1.0)
    return _sqrtm(cov0) @ torch.linalg.inv(_sqrtm(cov1)), mean0, mean1, cov0


def _context(n):
    return torch.zeros(n, 0, dtype=torch.float64)


def test_schedule_closed_forms():
    t = torch.linspace(0.0, 1.0, 101, dtype=torch.float64, requires_grad=True)
    alpha = SCHEDULE.alpha(t)
    (d_alpha,) = torch.autograd.grad(alpha.sum(), t)
    # d alpha / dt = -beta alpha / 2: the drift of the SDE.
    torch.testing.assert_close(d_alpha, -0.5 * SCHEDULE.beta(t.detach()) * alpha.detach())
    torch.testing.assert_close(alpha**2 + SCHEDULE.sigma(t) ** 2, torch.ones_like(t))
    assert abs(float(SCHEDULE.alpha(torch.tensor(1.0))) - math.exp(-0.5 * (0.1 + 0.5 * 19.9))) < 1e-7
    grid = time_grid(SCHEDULE, 10, torch.zeros(()))
    assert grid[0] == 1.0 and grid[-1] == pytest.approx(SCHEDULE.t_min) and (grid.diff() < 0).all()
    with pytest.raises(ValueError, match="t_min"):
        VPSchedule(t_min=0.0)


def test_forward_sde_matches_the_closed_form_marginals():
    """Euler–Maruyama on dx = -β x/2 dt + √β dw from a two-point (non-Gaussian) x_0 has mean α E x_0
    and variance α² Var x_0 + σ². Tolerance: 4 standard errors (n = 40,000) plus the scheme's
    bias, which is first order in the step: Σ (β Δt / 2)² / 2 ≈ Δt/8 ∫ β² = 0.008 relative at
    2,000 steps."""
    generator = torch.Generator().manual_seed(0)
    n, steps = 20_000, 2000
    x0 = torch.where(torch.rand(n, generator=generator) < 0.3, 2.0, -1.0).double()
    mean0, var0 = 0.3 * 2.0 + 0.7 * -1.0, 0.3 * 0.7 * 9.0
    x, dt = x0.clone(), 1.0 / steps
    checkpoints = {200: 0.1, 1000: 0.5, 2000: 1.0}
    for i in range(steps):
        beta = SCHEDULE.beta(torch.tensor(i * dt, dtype=torch.float64))
        x = x - 0.5 * beta * x * dt + torch.sqrt(beta * dt) * torch.randn(n, generator=generator, dtype=torch.float64)
        if i + 1 in checkpoints:
            t = torch.tensor(checkpoints[i + 1], dtype=torch.float64)
            alpha, sigma = SCHEDULE.alpha(t), SCHEDULE.sigma(t)
            mean, var = alpha * mean0, alpha**2 * var0 + sigma**2
            assert abs(x.mean() - mean) < 4 * math.sqrt(var / n) + 0.008 * abs(mean)
            assert abs(x.var() / var - 1) < 4 * math.sqrt(2 / n) + 0.008
            # The closed-form noising used for training draws from the same marginal.
            x_t, eps = SCHEDULE.noise(x0, t.expand(n), generator)
            assert abs(x_t.var() / var - 1) < 4 * math.sqrt(2 / n)
            torch.testing.assert_close(x_t, alpha * x0 + sigma * eps)


def test_ode_samplers_follow_the_exact_flow():
    """Same noise → the exact linear map. Heun is 2nd order: its error falls ~4x per doubling
    of the steps (3–5 allowed); Dormand–Prince meets a tight tolerance (measured 8e-6 at 1e-6)."""
    A, mean0, mean1, _ = _linear_flow()
    noise = torch.randn(500, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = mean0 + (noise - mean1) @ A.T
    errors = [
        float((sample_heun(exact_eps, SCHEDULE, noise, _context(500), steps=s) - exact).abs().max()) for s in (32, 64)
    ]
    assert errors[1] < 1e-3 and 3 < errors[0] / errors[1] < 5, errors
    x = sample_dopri5(exact_eps, SCHEDULE, noise, _context(500), atol=1e-6, rtol=1e-6)
    assert float((x - exact).abs().max()) < 1e-4
    # Per-row step control: a row's result does not depend on the rest of the batch.
    alone = sample_dopri5(exact_eps, SCHEDULE, noise[:3], _context(3), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(alone, x[:3], atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["ddpm", "euler_maruyama"])
def test_stochastic_samplers_reach_the_target_marginal(name):
    """Mean and covariance of 20,000 draws vs N(μ_0, Σ_0). Tolerances: 4 standard errors
    (mean: √(Σ_ii/n); covariance entries: √((Σ_ii Σ_jj + Σ_ij²)/n)) plus the samplers' first-order
    bias, measured with this exact score at 3 % of the scale at 100 steps for DDPM (too narrow)
    and 0.5–2 % for Euler–Maruyama (too wide), hence 0.03·(100/steps) of the scale."""
    _, mean0, _, cov0 = _linear_flow()
    n, steps = 20_000, 200
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    x = SAMPLERS[name](exact_eps, SCHEDULE, noise, _context(n), steps=steps, generator=generator)
    bias = 0.03 * 100 / steps
    scale = cov0.diagonal().sqrt()
    assert ((x.mean(0) - mean0).abs() < 4 * scale / math.sqrt(n) + bias * scale).all()
    cov = torch.cov(x.T)
    se = torch.sqrt((cov0.diagonal()[:, None] * cov0.diagonal()[None] + cov0**2) / n)
    assert ((cov - cov0).abs() < 4 * se + 2 * bias * scale[:, None] * scale[None]).all(), (cov, cov0)


def test_ode_log_prob_is_the_exact_density_of_the_flow():
    """log N(x(1); 0, I) + log|det A⁻¹| exactly; it differs from log p_tmin only by the
    terminal approximation p_1 ≈ N(0, I) (α(1)² = 4e-5), checked loosely."""
    A, mean0, mean1, cov0 = _linear_flow()
    x = torch.distributions.MultivariateNormal(mean0, cov0).sample((400,))
    x1 = mean1 + (x - mean0) @ torch.linalg.inv(A).T
    exact = torch.distributions.Normal(0.0, 1.0).log_prob(x1).sum(-1) - torch.logdet(A)
    info = {}
    log_prob = ode_log_prob(exact_eps, SCHEDULE, x, _context(400), atol=1e-7, rtol=1e-7, info=info)
    torch.testing.assert_close(log_prob, exact, atol=1e-4, rtol=0)
    assert info["calls"] > 10 and info["evaluations"] > 0
    heun = ode_log_prob(exact_eps, SCHEDULE, x, _context(400), method="heun", steps=64)
    assert float((heun - exact).abs().max()) < 5e-3  # measured 1e-3 at 64 steps (2nd order)
    truth = torch.distributions.MultivariateNormal(mean0, cov0).log_prob(x)
    assert float((log_prob - truth).abs().mean()) < 0.05
    # One solve from the noise gives samples with the same log-densities.
    noise = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    samples, log_q = _ode_sample_and_log_prob(
        exact_eps,
        SCHEDULE,
        noise,
        _context(50),
        method="dopri5",
        steps=0,
        atol=1e-7,
        rtol=1e-7,
        divergence_method="exact",
        create_graph=False,
    )
    again = ode_log_prob(exact_eps, SCHEDULE, samples, _context(50), atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(log_q, again, atol=1e-4, rtol=0)


def test_hutchinson_divergence_is_unbiased_with_the_stated_variance():
    """Against the trace of the autograd Jacobian of an untrained 5-D network: the exact method
    matches; K Rademacher probes average to it within 4 √(V/K) with
    V = ½ Σ_{i≠j} (J_ij + J_ji)², and their sample variance matches V (±15 %, about 6 standard
    errors of a variance from 4,000 draws of this bounded quantity)."""
    torch.manual_seed(0)
    net = ResidualMLP(5 + 1, 5, hidden=16, blocks=1).double()

    def eps(x, t, context):
        return net(torch.cat([x, t[:, None]], dim=-1))

    x, t = torch.randn(3, 5, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    jacobians = torch.stack(
        [torch.autograd.functional.jacobian(lambda v, i=i: eps(v[None], t[i : i + 1], None)[0], x[i]) for i in range(3)]
    )
    trace = jacobians.diagonal(dim1=-2, dim2=-1).sum(-1)
    _, exact = divergence(eps, x, t, _context(3), method="exact")
    torch.testing.assert_close(exact, trace)
    k = 4000
    generator = torch.Generator().manual_seed(4)
    _, estimates = divergence(
        eps, x.repeat(k, 1), t.repeat(k), _context(3 * k), method="hutchinson", generator=generator
    )
    estimates = estimates.reshape(k, 3)
    symmetric = jacobians + jacobians.transpose(-1, -2)
    variance = 0.5 * (symmetric**2).sum((-1, -2)) - 0.5 * (symmetric.diagonal(dim1=-2, dim2=-1) ** 2).sum(-1)
    assert ((estimates.mean(0) - trace).abs() < 4 * torch.sqrt(variance / k)).all()
    assert ((estimates.var(0) / variance - 1).abs() < 0.15).all()


def test_hutchinson_log_prob_averages_to_the_exact_one():
    """With the exact score of the correlated Gaussian, ``log_prob`` by Hutchinson's estimator
    (one probe per row along the whole path) averages over 600 repetitions to the exact value
    within 4 standard errors (from the repetitions' own spread)."""
    _, mean0, _, cov0 = _linear_flow()
    x = torch.distributions.MultivariateNormal(mean0, cov0).sample((2,))
    reps = 600
    exact = ode_log_prob(exact_eps, SCHEDULE, x, _context(2), atol=1e-6, rtol=1e-6)
    noisy = ode_log_prob(
        exact_eps,
        SCHEDULE,
        x.repeat(reps, 1),
        _context(2 * reps),
        method="heun",
        steps=48,
        divergence_method="hutchinson",
        generator=torch.Generator().manual_seed(5),
    ).reshape(reps, 2)
    heun_exact = ode_log_prob(exact_eps, SCHEDULE, x, _context(2), method="heun", steps=48)
    assert noisy.std(0).min() > 0.01  # the estimator is noisy here (correlated target)
    assert ((noisy.mean(0) - heun_exact).abs() < 4 * noisy.std(0) / math.sqrt(reps)).all()
    assert ((heun_exact - exact).abs() < 5e-3).all()


def _conditional_gaussian(n, generator):
    """y | c ~ N(a c + b, diag(s²)), c ~ U(-1, 1) (the test problem of the NSF test)."""
    a, b, s = torch.tensor([20.0, -1.0]), torch.tensor([10.0, -5.0]), torch.tensor([5.0, 0.2])
    c = 2 * torch.rand(n, 1, generator=generator) - 1
    return a * c + b + s * torch.randn(n, 2, generator=generator), c, (a, b, s)


def test_trained_diffusion_fits_a_conditional_gaussian():
    r"""600 Adam steps; held-out NLL within a margin of the truth, samples with the right moments.

    Margin, as in the NSF test: the paired gap ``-log q + log p`` has mean KL(p‖q) ≥ 0, allowed
    0.05 nats plus 4 standard errors (measured 0.001 ± 0.002 after 1,000 steps). Ignoring c
    would cost 6.8 nats, a forgotten Jacobian of the z-scoring 2.0. Samples: standardized
    residuals with mean 0 ± (0.1 + 4 se) and standard deviation 1 ± (0.1 + 4 se) — 0.1 is a
    δ ≈ 0.3 / ε ≈ 0.2 model error of 0.05 nats, as the margin above.
    """
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    y, c, (a, b, s) = _conditional_gaussian(4000, generator)
    est = build_estimator("diffusion", 2, (1,), hidden=64, blocks=2)
    est.set_standardization(y, c)
    optimizer = torch.optim.Adam(est.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 600)
    for _ in range(600):
        index = torch.randint(0, len(y), (256,), generator=generator)
        loss = est.loss(y[index], c[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    est.eval()
    y_test, c_test, _ = _conditional_gaussian(1000, generator)
    with torch.no_grad():
        nll = -est(c_test).log_prob(y_test)
        samples = est(c_test).sample()
    gap = nll + torch.distributions.Normal(a * c_test + b, s).log_prob(y_test).sum(-1)
    se = gap.std() / math.sqrt(len(gap))
    assert -4 * se < gap.mean() < 0.05 + 4 * se, float(gap.mean())
    residual = (samples - (a * c_test + b)) / s
    se = 1 / math.sqrt(len(residual))
    assert (residual.mean(0).abs() < 0.1 + 4 * se).all(), residual.mean(0)
    assert ((residual.std(0) - 1).abs() < 0.1 + 4 * se * math.sqrt(0.5)).all(), residual.std(0)


NOISE = 0.5
SMALL = {"hidden": 32, "blocks": 1, "time_features": 8}


@pytest.fixture(scope="module")
def toy():
    """θ ~ N(0, I₂), x ~ N(θ, 0.5² I): the posterior of x_obs is N(0.8 x_obs, 0.447²)."""
    prior = Gaussian([0.0, 0.0], scale=1.0, names=["a", "b"])
    simulator = as_simulator(lambda theta, rng: theta + NOISE * rng.normal(size=theta.shape), prior, name="toy")
    data = simulate(simulator, n=2000, seed=0)
    return prior, (data["theta"], data["x"])


def _posterior_checks(samples, prior, x_obs):
    precision = 1 + 1 / NOISE**2
    mean = torch.as_tensor(x_obs, dtype=torch.float32) / NOISE**2 / precision
    assert torch.isfinite(samples).all() and prior.support.check(samples).all()
    # A learned model after a few epochs: its mean within 0.3 (2/3 of a posterior sd) of the
    # exact one; a model that ignores x would sit at the prior mean, 0.72 away.
    assert (samples.mean(0) - mean).norm() < 0.3, samples.mean(0)


@pytest.mark.filterwarnings("ignore:MCMC chains have not mixed")  # short chains: a smoke test of NLE sampling
def test_npe_and_nle_with_diffusion(toy, tmp_path):
    prior, data = toy
    x_obs = np.array([0.8, -0.4])
    config = TrainConfig(max_epochs=15, batch_size=128, learning_rate=2e-3, progress=False)
    torch.manual_seed(0)
    npe = NPE(prior, "diffusion", estimator_kwargs={**SMALL, "sampler": "heun", "sampler_steps": 16})
    npe.fit(data, config=config)
    _posterior_checks(npe.posterior(x_obs).sample((500,)), prior, x_obs)
    # Checkpoint round trip: same densities, same samples for the same seed.
    save(npe, tmp_path / "npe")
    again = load_model(tmp_path / "npe")
    theta = prior.sample((20,))
    torch.testing.assert_close(
        again.posterior(x_obs).log_prob(theta), npe.posterior(x_obs).log_prob(theta), atol=0, rtol=0
    )
    torch.manual_seed(1)
    first = npe.posterior(x_obs).sample((5,))
    torch.manual_seed(1)
    torch.testing.assert_close(again.posterior(x_obs).sample((5,)), first, atol=0, rtol=0)

    # NLE: the cheap fixed-step log_prob for MCMC.
    torch.manual_seed(0)
    nle = NLE(prior, "diffusion", estimator_kwargs={**SMALL, "log_prob_method": "heun", "log_prob_steps": 8})
    nle.fit(data, config=config)
    samples = nle.posterior(x_obs, n_chains=20, warmup=20).sample((200,))  # 20 + 10 steps per chain
    assert samples.shape == (200, 2)
    _posterior_checks(samples, prior, x_obs)


def test_sampler_options_and_errors():
    torch.manual_seed(0)
    est = Diffusion(2, (3,), hidden=16, blocks=1, sampler="ddpm", sampler_steps=10)
    assert est(torch.randn(4, 3)).sample((2,)).shape == (2, 4, 2)
    assert not est.samples_by_log_prob_solver
    heun = Diffusion(
        2, (3,), hidden=16, blocks=1, sampler="heun", sampler_steps=32, log_prob_method="heun", log_prob_steps=32
    )
    assert heun.samples_by_log_prob_solver
    dist = heun(torch.randn(4, 3))
    with torch.no_grad():
        y, log_prob = dist.sample_and_log_prob((5,))
        # Heun backwards and forwards differ by the discretization error only (0.004 for the
        # exact Gaussian flow at 32 steps).
        torch.testing.assert_close(log_prob, dist.log_prob(y), atol=0.02, rtol=0)
    assert Diffusion(20, (3,), hidden=16, blocks=1).divergence_method == "hutchinson"
    assert Diffusion(20, (3,), hidden=16, blocks=1, exact_divergence_max_dim=20).divergence_method == "exact"
    with pytest.raises(ValueError, match="unknown sampler"):
        Diffusion(2, (3,), sampler="euler")
    with pytest.raises(ValueError, match="log_prob_method"):
        Diffusion(2, (3,), log_prob_method="rk4")
    with pytest.raises(ValueError, match="time_power must be positive"):
        Diffusion(2, (3,), time_power=0)
    with pytest.raises(ValueError, match="steps must be positive"):
        sample_heun(exact_eps, SCHEDULE, torch.zeros(2, 2, dtype=torch.float64), _context(2), steps=0)
    with pytest.raises(RuntimeError, match="more than 3 steps"):
        sample_dopri5(exact_eps, SCHEDULE, torch.zeros(2, 2, dtype=torch.float64), _context(2), steps=3)


@pytest.mark.parametrize("power", [1.0, 3.0])
def test_training_times_are_stratified_on_the_power_scale(power):
    """Uniform in t^(1/p) on [t_min^(1/p), 1]: on that scale the sorted times of one batch are
    evenly spaced by (1 - t_min^(1/p)) / n (one shared offset)."""
    schedule = VPSchedule(t_min=1e-5)
    n = 1000
    t = schedule.sample_time(n, torch.zeros((), dtype=torch.float64), torch.Generator().manual_seed(0), power=power)
    start = schedule.t_min ** (1 / power)
    assert schedule.t_min <= float(t.min()) and float(t.max()) <= 1.0
    gaps = t.sort().values.pow(1 / power).diff()
    torch.testing.assert_close(gaps, torch.full_like(gaps, (1 - start) / n), atol=1e-12, rtol=1e-9)


def test_training_defaults_are_train_config_fields_used_by_npe():
    config = NPE(None, "diffusion").train_config(progress=False)
    assert config == TrainConfig(progress=False, **Diffusion.training_defaults)
    assert config.ema_decay is not None


def test_validation_loss_uses_common_random_numbers():
    """In eval mode the loss is a deterministic function of the weights (fixed-seed noise), so
    early stopping compares models, not draws; in training mode fresh noise each call."""
    est = Diffusion(2, (3,), hidden=16, blocks=1)
    y, c = torch.randn(64, 2), torch.randn(64, 3)
    est.eval()
    assert est.loss(y, c) == est.loss(y, c)
    est.train()
    assert est.loss(y, c) != est.loss(y, c)


def test_sampling_with_a_generator_is_reproducible():
    est = Diffusion(2, (3,), hidden=16, blocks=1, sampler="ddpm", sampler_steps=10)
    h = est.embed(torch.randn(6, 3))
    draws = []
    for _ in range(2):
        generator = torch.Generator().manual_seed(7)
        noise = torch.randn(6, 2, generator=generator)
        with torch.no_grad():
            draws.append(est.sample_flat(noise, h, generator))
    torch.testing.assert_close(draws[0], draws[1], atol=0, rtol=0)
