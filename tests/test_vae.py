"""The conditional VAE: its importance-weighted density against exact quadrature, a fit with a
known answer, the KL warm-up counter, NPE / NLE / checkpoints / CLI with ``estimator="vae"``."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import MixtureSameFamily

from sbi_gen.checkpoint import load_model, save
from sbi_gen.estimators import VAE, build_estimator
from sbi_gen.estimators.vae import _LATENT_LOG_SCALE
from sbi_gen.inference import NLE, NPE
from sbi_gen.priors import Gaussian
from sbi_gen.simulate import as_simulator, simulate
from sbi_gen.store import simulate_to_hdf5
from sbi_gen.train import TrainConfig, fit

ROOT = Path(__file__).resolve().parent.parent
TINY = {"latent_features": 2, "hidden_features": [32, 32], "iw_samples": 16}


def _exact_log_prob(est: VAE, z: torch.Tensor, h: torch.Tensor, nodes: int = 8001) -> torch.Tensor:
    r"""log p(z | h) = log Σ_j π_j ∫ p(z | w, h) N(w; m_j, s_j²) dw for a 1-D latent (j over the
    prior's Gaussian components), each integral by the trapezoid rule over w = m_j + s_j t,
    t ∈ [-12, 12]. Truncation at 12 s_j loses e^-72 of the mass; 8001 nodes agree with 32001
    to 1e-14 on the test models (2001 nodes: to 3e-4)."""
    prior = est.latent_prior(h)
    if isinstance(prior, MixtureSameFamily):
        gaussian, log_pi = prior.component_distribution.base_dist, prior.mixture_distribution.logits
    else:
        gaussian, log_pi = prior.base_dist, h.new_zeros(len(h), 1)
    loc, scale = gaussian.loc.reshape(len(h), -1).T, gaussian.scale.reshape(len(h), -1).T  # (components, n)
    t = torch.linspace(-12, 12, nodes, dtype=z.dtype)[:, None, None]
    w = loc + scale * t  # (nodes, components, n)
    log_integrand = est.likelihood(w[..., None], h).log_prob(z) + torch.distributions.Normal(loc, scale).log_prob(w)
    ends = torch.full((nodes, 1, 1), 0.0, dtype=z.dtype)
    ends[[0, -1]] = math.log(0.5)
    per_component = torch.logsumexp(log_integrand + ends, dim=0) + math.log(24 / (nodes - 1)) + scale.log()
    return torch.logsumexp(per_component + torch.log_softmax(log_pi, -1).T, dim=0)


@pytest.fixture(scope="module", params=[1, 4], ids=["gaussian-prior", "mixture-prior"])
def untrained(request):
    """An untrained VAE (1-D latent, float64, a Gaussian or a 4-component latent prior), embedded
    conditions and points, and exact log p(z | h)."""
    torch.manual_seed(0)
    est = VAE(2, (3,), latent_features=1, hidden_features=[16, 16], prior_components=request.param).double()
    with torch.no_grad():  # a decoder that really depends on w, so that importance weights vary
        for p in est.decoder.parameters():
            p.mul_(2.0)
        if request.param > 1:
            # The weights p(w | h) / q(w | z, h) have a finite variance (which the tolerances below
            # need) only if q is wider than every prior component over √2: set q's scale to 2.
            low, high = _LATENT_LOG_SCALE
            fraction = (math.log(2.0) - low) / (high - low)
            last = est.encoder[-1]
            last.weight[1:].zero_()
            last.bias[1:] = math.log(fraction / (1 - fraction)) - math.log(-low / high)
    z, c = torch.randn(40, 2, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    with torch.no_grad():
        h = est.embed(c)
        exact = _exact_log_prob(est, z, h)
        prior = est.latent_prior(h)
        if request.param > 1:
            torch.testing.assert_close(est.latent_posterior(z, h).base_dist.scale, torch.full_like(z[:, :1], 2.0))
            assert float(prior.component_distribution.base_dist.scale.max()) < 2 * math.sqrt(2)
    return est, z, c, h, exact


@torch.no_grad()
def test_importance_weights_are_unbiased_and_the_bound_tightens_with_k(untrained):
    r"""For w_k ~ q the weights p(z, w_k | h) / q(w_k | z, h) have mean p(z | h) (checked against
    quadrature); hence (Jensen) the K-sample estimate log p̂_K is below log p in expectation, the
    ELBO (mean of the log-weights) is below it on every draw, and E log p̂_K grows with K
    (Burda et al., 2016). Expectations are averaged over R = 400 independent draws; every
    tolerance is 4 standard errors of that average."""
    est, z, _, h, exact = untrained
    reps, k_max = 400, 64
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(reps, k_max, len(z), 1, generator=generator, dtype=torch.float64)
    log_weights = est.log_importance_weights(z, h, noise) - exact  # (R, K, n), relative to p
    assert log_weights.shape == (reps, k_max, len(z))

    # Unbiasedness of exp: the mean of w / p over all R·K draws is 1, for every point and pooled
    # over the points (whose standard error, ~0.002 here, would show a bias of a percent).
    ratio = log_weights.exp().reshape(-1, len(z))
    assert ((ratio.mean(0) - 1).abs() < 4 * ratio.std(0) / math.sqrt(len(ratio))).all()
    pooled = ratio.mean(1)
    assert (pooled.mean() - 1).abs() < 4 * pooled.std() / math.sqrt(len(pooled))

    bounds = {k: torch.logsumexp(log_weights[:, :k], dim=1) - math.log(k) for k in (1, 4, 16, 64)}
    elbo = log_weights.mean(dim=1)
    assert (elbo <= bounds[64] + 1e-12).all()  # per draw: the mean of logs is below the log of the mean
    for small, large in ((1, 4), (4, 16), (16, 64)):
        gain = (bounds[large] - bounds[small]).mean(dim=1)  # (R,): averaged over points
        assert gain.mean() > 4 * gain.std() / math.sqrt(reps), (small, large)
    for k, bound in bounds.items():
        per_draw = bound.mean(dim=1)
        assert per_draw.mean() < 4 * per_draw.std() / math.sqrt(reps), k  # below log p in expectation


@torch.no_grad()
def test_log_prob_is_deterministic_and_converges_to_the_exact_density(untrained):
    r"""``log_prob`` uses fixed noise: equal across calls, batchings and global seeds. With K
    samples, log p̂_K - log p ≈ (p̂_K - p) / p has standard deviation √(v / K) by the delta
    method, v the relative variance of the weights (estimated from 16384 draws per point); at
    K = 4096 the error must stay within 4 such deviations plus the bias v / 2K."""
    est, z, c, h, exact = untrained
    est.iw_samples = 4096
    try:
        dist = est(c)
        torch.manual_seed(5)
        first = dist.log_prob(est.y_mean + est.y_std * z)  # y = z: identity standardization
        torch.manual_seed(6)
        again = torch.cat([est(c[i : i + 7]).log_prob(z[i : i + 7]) for i in range(0, len(z), 7)])
        torch.testing.assert_close(first, again, atol=1e-12, rtol=0)
    finally:
        est.iw_samples = 64
    noise = torch.randn(16384, len(z), 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    v = (est.log_importance_weights(z, h, noise) - exact).exp().var(dim=0)
    error = (first - exact).abs()
    assert (error < 4 * torch.sqrt(v / 4096) + v / 8192 + 1e-9).all(), (error.max(), v.max())


def test_training_loss_is_the_importance_weighted_bound(untrained):
    r"""With ``train_samples`` K the training loss is -log p̂_K averaged over the batch: above the
    exact negative log-likelihood in expectation and falling with K (Burda et al., 2016).
    Expectations over R = 200 training-mode evaluations; tolerances are 4 standard errors."""
    est, z, c, _, exact = untrained
    reps, default = 200, est.train_samples
    y = est.y_mean + est.y_std * z
    torch.manual_seed(3)
    losses = {}
    try:
        for k in (1, 8, 64):
            est.train_samples = k
            with torch.enable_grad():
                losses[k] = torch.stack([est.loss(y, c).detach() for _ in range(reps)]) + exact.mean()
    finally:
        est.train_samples = default
    for k, excess in losses.items():  # E[loss] + mean log p >= 0
        assert excess.mean() > -4 * excess.std() / math.sqrt(reps), k
    for small, large in ((1, 8), (8, 64)):
        gain = losses[small] - losses[large]  # independent draws: the variances add
        se = math.sqrt((losses[small].var() + losses[large].var()) / reps)
        assert gain.mean() > 4 * se, (small, large)


def test_samples_follow_the_density_that_log_prob_estimates():
    r"""``sample`` and ``log_prob`` describe one distribution: for y ∈ R, a 1-D latent and a
    3-component prior, the empirical CDF of n = 20000 samples stays within the Kolmogorov–Smirnov
    critical value 1.95 / √n (α = 0.001) of the CDF of the exact density (quadrature over w, then
    the trapezoid rule over a grid of y), the density that ``log_prob`` estimates (tested above)."""
    torch.manual_seed(0)
    est = VAE(1, (3,), latent_features=1, hidden_features=[16, 16], prior_components=3).double().eval()
    with torch.no_grad():
        for p in est.decoder.parameters():
            p.mul_(2.0)  # a decoder that depends on w: a skewed, multimodal p(y | c)
        c = torch.randn(3, dtype=torch.float64)
        h = est.embed(c)
        n = 20_000
        samples = est(c).sample((n,)).squeeze(-1).sort().values
        grid = torch.linspace(float(samples[0]) - 1, float(samples[-1]) + 1, 801, dtype=torch.float64)
        density = _exact_log_prob(est, grid[:, None], h.expand(len(grid), -1), nodes=1001).exp()
        cells = (density[1:] + density[:-1]) / 2 * (grid[1:] - grid[:-1])
        cdf = torch.cat((torch.zeros(1, dtype=torch.float64), cells.cumsum(0)))
        assert abs(float(cdf[-1]) - 1) < 1e-3  # the grid holds the mass
        exact_cdf = np.interp(samples.numpy(), grid.numpy(), cdf.numpy())
        empirical = np.arange(1, n + 1) / n
        ks = max(np.abs(empirical - exact_cdf).max(), np.abs(empirical - 1 / n - exact_cdf).max())
        assert ks < 1.95 / math.sqrt(n), ks


def test_kl_warmup_counts_training_steps_and_survives_a_round_trip():
    torch.manual_seed(0)
    est = VAE(1, (2,), latent_features=2, hidden_features=[8], kl_warmup_steps=10, prior_components=1, train_samples=1)
    y, c = torch.randn(16, 1), torch.randn(16, 2)
    assert float(est.kl_weight()) == pytest.approx(0.1)
    for _ in range(3):
        est.loss(y, c).backward()
    assert int(est.kl_step) == 3
    with torch.no_grad():
        est.loss(y, c)  # not a training step
    est.eval()
    eval_loss = est.loss(y, c)
    assert int(est.kl_step) == 3
    torch.testing.assert_close(est.loss(y, c), eval_loss, rtol=0, atol=0)  # fixed noise in eval mode

    # The training loss weighs the KL by β = (t + 1) / T; the evaluation loss by 1.
    est.train()
    z, h = (y - est.y_mean) / est.y_std, est.embed(c)
    posterior, prior = est.latent_posterior(z, h), est.latent_prior(h)
    kl = torch.distributions.kl_divergence(posterior, prior)
    torch.manual_seed(3)
    w = posterior.base_dist.loc + posterior.base_dist.scale * torch.randn_like(posterior.base_dist.loc)
    expected = (0.4 * kl - est.likelihood(w, h).log_prob(z)).mean()
    torch.manual_seed(3)
    torch.testing.assert_close(est.loss(y, c), expected)
    assert int(est.kl_step) == 4 and float(est.kl_weight()) == pytest.approx(0.5)

    # With K importance samples (and a mixture prior, no analytic KL) β weighs log p(w) - log q(w).
    mixture = VAE(1, (2,), latent_features=2, hidden_features=[8], kl_warmup_steps=10, prior_components=3, train_samples=5)
    mixture.kl_step.fill_(3)
    z, h = (y - mixture.y_mean) / mixture.y_std, mixture.embed(c)
    q = mixture.latent_posterior(z, h)
    torch.manual_seed(4)
    w = q.base_dist.loc + q.base_dist.scale * torch.randn(5, *q.base_dist.loc.shape)
    log_weights = mixture.likelihood(w, h).log_prob(z) + 0.4 * (mixture.latent_prior(h).log_prob(w) - q.log_prob(w))
    torch.manual_seed(4)
    torch.testing.assert_close(mixture.loss(y, c), -(torch.logsumexp(log_weights, 0) - math.log(5)).mean())

    again = build_estimator(**json.loads(json.dumps(est.config())))
    assert int(again.kl_step) == 0
    again.load_state_dict(est.state_dict())
    assert int(again.kl_step) == 4 and float(again.kl_weight()) == pytest.approx(0.5)
    for _ in range(20):
        again.loss(y, c)
    assert float(again.kl_weight()) == 1.0

    # fit() restores the best epoch's state dict, counter included.
    est = VAE(1, (2,), latent_features=2, hidden_features=[8], kl_warmup_steps=50)
    data = (torch.randn(500, 1), torch.randn(500, 2))
    history = fit(est, data, config=TrainConfig(batch_size=64, max_epochs=4, progress=False))
    assert int(est.kl_step) == (history.best_epoch + 1) * (history.n_train // 64)


def test_fits_a_conditional_gaussian():
    r"""Trained on y | c ~ N(a c + b, diag(s²)), the VAE's samples and log_prob match the truth.

    Margins as in the NSF test: a fit off by δ standard deviations in the mean or a relative
    error ε in the scale costs δ²/2 or ε² nats; we allow 0.05 nats of held-out KL, i.e. δ = 0.3,
    ε = 0.2, on top of 4 Monte Carlo standard errors: of the paired NLL gap, of sample means
    (s / √n) and of sample standard deviations (s / √(2n)). ``log_prob`` shares its
    importance noise between points, so its error does not average out over the test set; its
    size is bounded by the spread ``noise`` of the estimate across seeds.
    """
    torch.manual_seed(0)
    a, b, s = torch.tensor([20.0, -1.0]), torch.tensor([10.0, -5.0]), torch.tensor([5.0, 0.2])

    def simulate_pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = 2 * torch.rand(n, 1) - 1
        return a * c + b + s * torch.randn(n, 2), c

    est = build_estimator("vae", 2, (1,))
    fit(est, simulate_pairs(4000), config=TrainConfig(max_epochs=30, progress=False))
    y_test, c_test = simulate_pairs(2000)
    true_log_prob = torch.distributions.Normal(a * c_test + b, s).log_prob(y_test).sum(-1)
    with torch.no_grad():
        estimates = []
        for seed in range(4):
            est.iw_seed = seed
            estimates.append(est(c_test).log_prob(y_test))
        est.iw_seed = 0
        noise = torch.stack(estimates).std(0).mean()
        gap = true_log_prob - estimates[0]
        se = gap.std() / math.sqrt(len(gap))
        assert gap.mean() < 0.05 + 4 * se + 4 * noise, (gap.mean(), se, noise)
        assert gap.mean() > -4 * se - 4 * noise  # no model beats the truth

        n = 4000
        for c in (-0.5, 0.0, 0.5):
            samples = est(torch.tensor([c])).sample((n,))
            mean, std = a * c + b, s
            assert ((samples.mean(0) - mean).abs() < 0.3 * std + 4 * std / math.sqrt(n)).all(), (c, samples.mean(0))
            assert ((samples.std(0) / std - 1).abs() < 0.2 + 4 / math.sqrt(2 * n)).all(), (c, samples.std(0))


NOISE = 0.5


@pytest.fixture(scope="module")
def toy():
    """θ ~ N(0, I₂), x = θ + 0.5 ε: posterior N(4 x / 5, 1/5) for one observation."""
    prior = Gaussian([0.0, 0.0], scale=1.0)
    sim = as_simulator(lambda theta, rng: theta + NOISE * rng.normal(size=theta.shape), prior, name="toy")
    data = simulate(sim, n=2000, seed=0)
    return prior, sim, data


def _exact(x_obs: np.ndarray) -> tuple[np.ndarray, float]:
    precision = 1 + 1 / NOISE**2
    return x_obs / NOISE**2 / precision, 1 / math.sqrt(precision)


def test_npe_and_nle_with_a_vae(toy):
    """A small VAE in NPE and NLE recovers the analytic posterior of the Gaussian toy, with the
    budget of the flows' NLE test for the learned model's error (a quarter of a posterior
    standard deviation in the mean, 20 % in the spread) on top of 4 Monte Carlo errors."""
    prior, _, data = toy
    x_obs = np.array([0.8, -0.5])
    exact_mean, exact_std = _exact(x_obs)
    config = TrainConfig(batch_size=64, max_epochs=15, progress=False)
    torch.manual_seed(0)
    npe = NPE(prior, "vae", estimator_kwargs=TINY)
    npe.fit((data["theta"], data["x"]), config=config)
    samples = npe.posterior(x_obs).sample((2000,)).numpy()
    assert samples.shape == (2000, 2) and np.isfinite(samples).all()
    np.testing.assert_array_less(
        np.abs(samples.mean(0) - exact_mean), 0.25 * exact_std + 4 * exact_std / math.sqrt(2000)
    )
    np.testing.assert_array_less(np.abs(samples.std(0) / exact_std - 1), 0.2 + 4 / math.sqrt(4000))

    torch.manual_seed(0)
    nle = NLE(prior, "vae", estimator_kwargs=TINY)
    nle.fit((data["theta"], data["x"]), config=config)
    posterior = nle.posterior(x_obs, n_chains=20, warmup=50)
    samples = posterior.sample((1000,)).numpy()
    ess = float(posterior.mcmc.ess.min())
    assert samples.shape == (1000, 2) and np.isfinite(samples).all()
    assert float(posterior.mcmc.rhat.max()) < 1.1
    np.testing.assert_array_less(
        np.abs(samples.mean(0) - exact_mean), 0.25 * exact_std + 4 * exact_std / math.sqrt(ess)
    )
    np.testing.assert_array_less(np.abs(samples.std(0) / exact_std - 1), 0.2 + 4 / math.sqrt(2 * ess))


def test_checkpoint_round_trip(tmp_path, toy):
    prior, _, data = toy
    npe = NPE(prior, "vae", estimator_kwargs=TINY)
    npe.fit((data["theta"], data["x"]), config=TrainConfig(max_epochs=2, progress=False))
    save(npe, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.estimator.config() == npe.estimator.config() and again.estimator.name == "vae"
    assert int(again.estimator.kl_step) == int(npe.estimator.kl_step) > 0
    theta, x_obs = prior.sample((50,)), data["x"][0]
    torch.testing.assert_close(
        again.posterior(x_obs).log_prob(theta), npe.posterior(x_obs).log_prob(theta), rtol=0, atol=0
    )
    torch.manual_seed(7)
    first = npe.posterior(x_obs).sample((100,))
    torch.manual_seed(7)
    torch.testing.assert_close(again.posterior(x_obs).sample((100,)), first, rtol=0, atol=0)


def test_cli_trains_a_vae(tmp_path, toy):
    _, sim, _ = toy
    data = tmp_path / "toy.h5"
    simulate_to_hdf5(sim, n=500, path=data, seed=0, progress=False)
    model = tmp_path / "model"
    proc = subprocess.run(
        [sys.executable, "-m", "sbi_gen.cli", "train", str(data), "--estimator", "vae", "--out", str(model),
         "--max-epochs", "2", "--estimator-kwargs", json.dumps(TINY), "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "(vae)" in proc.stdout and "model saved" in proc.stdout
    config = json.loads((model / "config.json").read_text())
    assert config["estimator"]["name"] == "vae" and config["estimator"]["latent_features"] == 2
    assert load_model(model).posterior(np.zeros(2)).sample((10,)).shape == (10, 2)


def test_bad_hyperparameters_are_one_line_errors():
    for kwargs, message in (
        ({"latent_features": 0}, "latent_features must be positive"),
        ({"iw_samples": 0}, "iw_samples must be positive"),
        ({"kl_warmup_steps": -1}, "kl_warmup_steps must be non-negative"),
        ({"prior_components": 0}, "prior_components must be positive"),
        ({"prior_components": 2, "conditional_prior": False}, "prior_components > 1 needs conditional_prior=True"),
        ({"train_samples": 0}, "train_samples must be positive"),
    ):
        with pytest.raises(ValueError, match=message):
            build_estimator("vae", 2, (3,), **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runs_on_cuda():
    torch.manual_seed(0)
    est = build_estimator("vae", 2, (3,), **TINY).to("cuda")
    est.set_standardization(torch.randn(100, 2, device="cuda"), torch.randn(100, 3, device="cuda"))
    est.loss(torch.randn(32, 2, device="cuda"), torch.randn(32, 3, device="cuda")).backward()
    assert est.kl_step.device.type == "cuda" and int(est.kl_step) == 1
    est.eval()
    dist = est(torch.randn(4, 3, device="cuda"))
    y = dist.sample((5,))
    assert y.device.type == "cuda" and dist.log_prob(y).device.type == "cuda"
    cpu = build_estimator(**est.config())
    cpu.load_state_dict({k: v.cpu() for k, v in est.state_dict().items()})
    c = torch.randn(4, 3)
    torch.testing.assert_close(est(c.cuda()).log_prob(y).cpu(), cpu.eval()(c).log_prob(y.cpu()), atol=1e-4, rtol=1e-4)
