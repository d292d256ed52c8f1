"""Property tests run on every estimator in ``ESTIMATORS`` (new ones are covered automatically).

Estimators not listed in ``SMALL`` are tested with their default hyperparameters; add a small
setting there when a new one is slow.
"""

import json
import math

import pytest
import torch

from sbi_gen.estimators import (
    DEFAULT_ESTIMATOR,
    ESTIMATORS,
    NSF,
    ConditionalEstimator,
    HyperparameterError,
    build_estimator,
)
from sbi_gen.priors import BoxUniform, Gaussian, IndependentPrior

# Small but complete architectures, so that the whole file runs in well under a minute.
SMALL = {
    "nsf": {"transforms": 2, "hidden_features": [16, 16], "bins": 4},
    "maf": {"transforms": 2, "hidden_features": [16, 16]},
    "cnf": {"hidden_features": [16, 16], "atol": 1e-5, "rtol": 1e-4},
    "diffusion": {"hidden": 16, "blocks": 1, "time_features": 8},
    "ensemble": {"family": "nsf", "members": 2, "family_kwargs": {"transforms": 1, "hidden_features": [16], "bins": 4}},
    "vae": {"latent_features": 2, "hidden_features": [16, 16]},
}
# Estimators whose log_prob is a Monte Carlo estimate: the hyperparameters of its r-th
# independent draw (see test_log_prob_is_a_normalized_density_in_original_space).
ESTIMATED_LOG_PROB = {"vae": lambda r: {"iw_seed": r, "iw_samples": 128}}
NAMES = sorted(ESTIMATORS)
MAP = (8, 8)
CONDITIONS = {
    "vector": {"c_shape": (3,), "embedding": "mlp", "embedding_kwargs": {"out_features": 8, "hidden": [16]}},
    "map": {
        "c_shape": MAP,
        "embedding": "cnn",
        "embedding_kwargs": {"out_features": 8, "channels": [4, 4], "hidden": [8]},
    },
}


def small(name: str, y_dim: int = 2, condition: str = "vector", **kwargs) -> ConditionalEstimator:
    spec = dict(CONDITIONS[condition])
    c_shape = spec.pop("c_shape")
    return build_estimator(name, y_dim, c_shape, **{**spec, **SMALL.get(name, {}), **kwargs})


def conditions(condition: str, *batch: int) -> torch.Tensor:
    return torch.randn(*batch, *CONDITIONS[condition]["c_shape"])


def test_registry_and_default():
    assert DEFAULT_ESTIMATOR in ESTIMATORS
    assert {"nsf", "maf", "cnf"} <= set(ESTIMATORS)
    for name, cls in ESTIMATORS.items():
        assert issubclass(cls, ConditionalEstimator) and cls.name == name
        assert cls.__mro__[1] is ConditionalEstimator  # one level of inheritance


@pytest.mark.parametrize("condition", sorted(CONDITIONS))
@pytest.mark.parametrize("name", NAMES)
def test_sample_and_log_prob_shapes(name, condition):
    torch.manual_seed(0)
    est = small(name, condition=condition)
    dist = est(conditions(condition, 4, 5))
    assert dist.batch_shape == (4, 5) and dist.event_shape == (2,)
    y = dist.sample((6,))
    assert y.shape == (6, 4, 5, 2) and torch.isfinite(y).all()
    log_prob = dist.log_prob(y)
    assert log_prob.shape == (6, 4, 5) and torch.isfinite(log_prob).all()
    assert dist.log_prob(torch.randn(5, 2)).shape == (4, 5)  # y broadcast against the batch
    assert dist.log_prob(torch.randn(3, 1, 1, 2)).shape == (3, 4, 5)
    # One unbatched condition.
    single = est(conditions(condition))
    assert single.batch_shape == () and single.sample((7,)).shape == (7, 2)
    assert single.log_prob(torch.randn(7, 2)).shape == (7,)
    # Sampling with log-densities in one pass agrees with log_prob.
    y, log_prob = dist.sample_and_log_prob((3,))
    assert y.shape == (3, 4, 5, 2) and log_prob.shape == (3, 4, 5)
    torch.testing.assert_close(log_prob, dist.log_prob(y), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_rsample_is_differentiable(name):
    torch.manual_seed(0)
    est = small(name)
    dist = est(conditions("vector", 3))
    if not dist.has_rsample:
        pytest.skip(f"{name} has no reparametrized sampling")
    dist.rsample((2,)).square().sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in est.parameters())


@pytest.mark.parametrize("condition", sorted(CONDITIONS))
@pytest.mark.parametrize("name", NAMES)
def test_loss_gradients_reach_every_parameter(name, condition):
    torch.manual_seed(0)
    est = small(name, condition=condition)
    est.set_standardization(torch.randn(64, 2) * 3 + 1, conditions(condition, 64))
    loss = est.loss(torch.randn(32, 2) * 3 + 1, conditions(condition, 32))
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    for key, p in est.named_parameters():
        assert p.grad is not None, f"no gradient reached {key}"
        assert torch.isfinite(p.grad).all(), key
    assert sum(p.grad.abs().sum() for p in est.parameters()) > 0
    embedding = [p.grad.abs().sum() for p in est.embedding.parameters()]
    assert all(g > 0 for g in embedding)  # the embedding is trained jointly


@pytest.mark.parametrize("condition", sorted(CONDITIONS))
@pytest.mark.parametrize("name", NAMES)
def test_config_and_state_dict_round_trip(name, condition):
    torch.manual_seed(0)
    prior = BoxUniform([-1.0, 0.0], [2.0, 5.0])
    est = small(name, condition=condition, y_prior=prior.to_dict())
    est.set_standardization(prior.sample((200,)), conditions(condition, 200))
    with torch.no_grad():  # move away from initialization
        for p in est.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config = json.loads(json.dumps(est.config()))  # JSON-serializable
    assert config["name"] == name
    torch.manual_seed(123)  # another initialization: everything must come from the state dict
    again = build_estimator(**config)
    assert again.config() == config
    again.load_state_dict(est.state_dict())
    est.eval()
    again.eval()
    c, y = conditions(condition, 5), prior.sample((3, 5))
    with torch.no_grad():
        torch.testing.assert_close(again(c).log_prob(y), est(c).log_prob(y), atol=0, rtol=0)
        torch.testing.assert_close(again.loss(y[0], c), est.loss(y[0], c), atol=0, rtol=0)
    for key in ("y_mean", "y_std", "c_mean", "c_std"):
        assert key in est.state_dict()


@pytest.mark.parametrize("name", NAMES)
def test_box_prior_samples_inside_and_log_prob_outside_is_minus_inf(name):
    torch.manual_seed(0)
    prior = BoxUniform([60.0, 0.5], [140.0, 2.0])
    est = small(name, y_prior=prior.to_dict())
    est.set_standardization(prior.sample((500,)), torch.randn(500, 3))
    dist = est(torch.randn(4, 3))
    y = dist.sample((200,))
    assert prior.support.check(y).all()
    log_prob = dist.log_prob(y)
    assert torch.isfinite(log_prob).all()
    outside = torch.tensor([[59.0, 1.0], [100.0, 2.5], [150.0, 0.0], [60.0, 0.5]])
    log_prob = dist.log_prob(outside[:, None, :])
    assert torch.isinf(log_prob[:3]).all() and (log_prob[:3] < 0).all()
    assert torch.isfinite(log_prob[3]).all()  # on the (closed) boundary: finite
    assert dist.support.check(y).all()


def _normalization_integrals(name: str, **kwargs) -> torch.Tensor:
    """Trapezoid integrals of exp(log_prob) over y for two conditions, with a 1-D box prior and
    unbounded: shape (4,)."""
    torch.manual_seed(0)
    c = torch.randn(2, 3, dtype=torch.float64)
    # 1-D box prior [-1, 5], non-trivial z-scoring after the logit: nodes uniform in the logit.
    prior = BoxUniform([-1.0], [5.0])
    est = small(name, y_dim=1, y_prior=prior.to_dict(), **kwargs).double()
    est.set_standardization(-1 + 6 * torch.rand(400, 1) ** 2, torch.randn(400, 3))
    y = -1 + 6 * torch.sigmoid(torch.linspace(-30, 30, 2001, dtype=torch.float64))
    with torch.no_grad():
        box = torch.trapezoid(est(c).log_prob(y[:, None, None]).exp(), y, dim=0)
    # Unbounded y with mean 3, scale 0.5: nodes y = 3 + 1.5 sinh(v), reaching ±600 scales.
    est = small(name, y_dim=1, **kwargs).double()
    est.set_standardization(3 + 0.5 * torch.randn(400, 1), torch.randn(400, 3))
    y = 3 + 1.5 * torch.sinh(torch.linspace(-6, 6, 2001, dtype=torch.float64))
    with torch.no_grad():
        unbounded = torch.trapezoid(est(c).log_prob(y[:, None, None]).exp(), y, dim=0)
    return torch.cat((box, unbounded))


@pytest.mark.parametrize("name", NAMES)
def test_log_prob_is_a_normalized_density_in_original_space(name):
    """exp(log_prob) integrates to 1 over y: the Jacobians of the z-scoring and of the prior
    bijection are accounted for. Trapezoid rule in float64 on 2001 nodes that crowd where an
    untrained density may pile up (box edges, far tails): the quadrature error is ~1e-5, far
    below the 1e-2 tolerance.

    Where log_prob is a Monte Carlo estimate (ESTIMATED_LOG_PROB), exp(log_prob) is an unbiased
    estimate of the density (the VAE's importance-weighted p̂), so its integral is 1 only in
    expectation over the estimate's noise, and one draw of the VAE's noise is shared by every
    node, so it does not average out over the grid (spread per draw at K = 128, untrained:
    ≈ 0.08 with the box prior, ≈ 0.4 unbounded). The mean over R = 16 independent draws must be
    within the quadrature tolerance plus 4 of its standard errors; a Jacobian off by a factor 2
    scales every draw, and so the mean and its standard error, by that factor: outside this band.
    """
    if name not in ESTIMATED_LOG_PROB:
        torch.testing.assert_close(
            _normalization_integrals(name), torch.ones(4, dtype=torch.float64), atol=1e-2, rtol=0
        )
        return
    draws = torch.stack([_normalization_integrals(name, **ESTIMATED_LOG_PROB[name](r)) for r in range(16)])
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert ((mean - 1).abs() < 1e-2 + 4 * se).all(), (mean, se)


@pytest.mark.parametrize("name", NAMES)
def test_float64_keeps_every_tensor_on_the_module(name):
    """A proxy for ``.to("cuda")`` on a CPU-only machine: after ``.to(float64)`` any tensor
    created off the module's buffers (a CPU-only or default-dtype constant) would surface as a
    dtype clash or a float32 result."""
    torch.manual_seed(0)
    prior = IndependentPrior([torch.distributions.Normal(0.0, 1.0), torch.distributions.Gamma(2.0, 1.0)])
    est = small(name, y_prior=prior.to_dict()).to(torch.float64)
    est.set_standardization(prior.sample((100,)), torch.randn(100, 3))
    dist = est(torch.randn(4, 3, dtype=torch.float64))
    y = dist.sample((2,))
    assert y.dtype == torch.float64 and dist.log_prob(y).dtype == torch.float64
    assert est.loss(y[0], torch.randn(4, 3, dtype=torch.float64)).dtype == torch.float64
    assert all(b.dtype == torch.float64 for b in est.buffers() if b.is_floating_point())


def test_standardization_statistics():
    torch.manual_seed(0)
    prior = BoxUniform([0.0, -2.0], [1.0, 2.0])
    est = NSF(2, (3,), y_prior=prior.to_dict(), transforms=1, hidden_features=[8])
    y = prior.sample((5000,))
    c = torch.randn(5000, 3) * torch.tensor([1.0, 10.0, 0.0]) + torch.tensor([0.0, 5.0, 7.0])
    c[0, 0] = math.nan  # a failed simulation: ignored
    est.set_standardization(y, c)
    # y is z-scored after the logit: a uniform's logit is logistic, std π/√3.
    torch.testing.assert_close(est.y_mean, torch.zeros(2), atol=0.1, rtol=0)
    torch.testing.assert_close(est.y_std, torch.full((2,), math.pi / math.sqrt(3)), atol=0.1, rtol=0)
    torch.testing.assert_close(est.c_mean, torch.tensor([0.0, 5.0, 7.0]), atol=0.3, rtol=0)
    assert abs(est.c_std[1] - 10.0) < 0.5 and abs(est.c_std[0] - 1.0) < 0.05
    assert est.c_std[2] > 0  # constant feature: floored, not zero
    assert torch.isfinite(est.embed(c[1:])).all()
    # Maps: one global mean and std.
    maps = NSF(2, (6, 6), transforms=1, hidden_features=[8], embedding_kwargs={"channels": [2]})
    x = 2.0 + 3.0 * torch.randn(400, 6, 6)
    maps.set_standardization(torch.randn(400, 2), x)
    assert maps.c_mean.shape == (1, 1)
    torch.testing.assert_close(maps.c_mean, x.double().mean().float().reshape(1, 1))
    torch.testing.assert_close(maps.c_std, x.double().std().float().reshape(1, 1))
    with pytest.raises(ValueError):
        maps.set_standardization(torch.randn(400, 2), torch.randn(400, 5, 5))


def test_gaussian_and_product_priors_are_accepted():
    gaussian = Gaussian([0.0, 1.0], scale=[1.0, 2.0])
    est = NSF(2, (3,), y_prior=gaussian.to_dict(), transforms=1, hidden_features=[8])
    assert torch.isinf(est.y_lower).all() and torch.isinf(est.y_upper).all()
    product = IndependentPrior([torch.distributions.Uniform(0.0, 2.0), torch.distributions.HalfNormal(1.0)])
    est = NSF(2, (3,), y_prior=product.to_dict(), transforms=1, hidden_features=[8])
    torch.testing.assert_close(est.y_lower, torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(est.y_upper, torch.tensor([2.0, math.inf]))
    y = est(torch.randn(3)).sample((500,))
    assert product.support.check(y).all()


def test_build_estimator_errors():
    with pytest.raises(ValueError, match="unknown estimator"):
        build_estimator("glow", 2, (3,))
    with pytest.raises(TypeError, match="unknown hyperparameters"):
        build_estimator("nsf", 2, (3,), hidden=[3])
    with pytest.raises(ValueError, match="dimension"):
        build_estimator("nsf", 3, (3,), y_prior=BoxUniform([0.0], [1.0]).to_dict())
    est = build_estimator("nsf", 2, (3,), transforms=1, hidden_features=[8])
    with pytest.raises(ValueError, match="conditions must have shape"):
        est(torch.randn(4, 2))
    assert build_estimator("nsf", 2, (16, 16), transforms=1, hidden_features=[8]).embedding_name == "cnn"
    assert est.embedding_name == "identity"


def test_unknown_hyperparameters_are_a_value_error_the_command_line_reports():
    with pytest.raises(ValueError) as caught:
        build_estimator("nsf", 2, (2,), nosuch=1)
    assert isinstance(caught.value, TypeError) and isinstance(caught.value, HyperparameterError)
    assert str(caught.value).startswith("estimator 'nsf' got unknown hyperparameters ['nosuch']; it accepts [")


@pytest.mark.parametrize(
    ("name", "hyperparameters", "message"),
    [
        ("nsf", {"transforms": -2}, "nsf: transforms must be positive, got -2"),
        ("maf", {"transforms": -2}, "maf: transforms must be positive, got -2"),
        ("nsf", {"transforms": 2.5}, "nsf: transforms must be an integer, got 2.5"),
        ("nsf", {"hidden_features": "abc"}, "nsf: hidden_features must be a list of positive integers, got 'abc'"),
        ("nsf", {"hidden_features": 64}, "nsf: hidden_features must be a list of positive integers, got 64"),
        ("maf", {"hidden_features": [0]}, "maf: hidden_features must be a list of positive integers, got [0]"),
        ("cnf", {"hidden_features": [16, -1]}, "cnf: hidden_features must be a list of positive integers, got [16, -1]"),
        ("nsf", {"bins": 0}, "nsf: bins must be positive, got 0"),
        ("nsf", {"passes": 0}, "nsf: passes must be positive, got 0"),
        ("maf", {"passes": "2"}, "maf: passes must be an integer or None, got '2'"),
        ("cnf", {"freqs": -1}, "cnf: freqs must be non-negative, got -1"),
        ("cnf", {"atol": -1e-5}, "cnf: atol must be positive, got -1e-05"),
        ("cnf", {"rtol": "tight"}, "cnf: rtol must be a number, got 'tight'"),
        ("vae", {"hidden_features": [16, True]}, "vae: hidden_features must be a list of positive integers, got [16, True]"),
        ("vae", {"latent_features": "two"}, "vae: latent_features must be an integer, got 'two'"),
        ("diffusion", {"hidden": 0}, "diffusion: hidden must be positive, got 0"),
        ("diffusion", {"blocks": -1}, "diffusion: blocks must be non-negative, got -1"),
        ("diffusion", {"time_features": 1}, "diffusion: time_features must be at least 2, got 1"),
        ("diffusion", {"sampler_steps": 0}, "diffusion: sampler_steps must be positive, got 0"),
        ("diffusion", {"log_prob_steps": 0}, "diffusion: log_prob_steps must be positive, got 0"),
        ("diffusion", {"exact_divergence_max_dim": -1}, "diffusion: exact_divergence_max_dim must be non-negative, got -1"),
    ],
)
def test_bad_hyperparameter_values_are_named_before_anything_is_built(name, hyperparameters, message):
    with pytest.raises(HyperparameterError) as caught:
        build_estimator(name, 2, (3,), **hyperparameters)
    assert str(caught.value) == message


def test_edge_hyperparameters_that_make_valid_networks_still_build():
    assert build_estimator("nsf", 2, (3,), transforms=1, hidden_features=[], bins=1, passes=1).hidden_features == []
    assert build_estimator("maf", 2, (3,), transforms=1, hidden_features=(8.0,)).hidden_features == [8]
    assert build_estimator("cnf", 2, (3,), hidden_features=[8], freqs=0).freqs == 0
    assert build_estimator("diffusion", 2, (3,), hidden=8, blocks=0, time_features=2).blocks == 0


def test_nsf_fits_a_conditional_gaussian():
    r"""Trained 300 Adam steps on y | c ~ N(a c + b, diag(s²)), the default NSF's held-out NLL
    (in original y units) is within a margin of the true conditional entropy.

    Margin. For held-out pairs, ``gap_i = -log q(y_i|c_i) + log p(y_i|c_i)`` has mean
    ``E_c KL(p || q) >= 0``, estimated with standard error ``se = std(gap)/√n`` (paired, so the
    ~1-nat spread of the NLL itself cancels). A Gaussian fit off by δ standard deviations in
    the mean and by a relative error ε in the scale of one coordinate costs δ²/2 + ε² nats; we
    allow 0.05 nats (δ ≈ 0.3 or ε ≈ 0.2 in one coordinate), plus 4 se (se ≈ 0.004). Measured
    over 5 seeds: 0.024–0.040 after 300 steps (0.12 after 30, 2.1 untrained). Failures this
    catches: ignoring c costs Σ a_i² E[c²] / (2 s_i²) ≈ 6.8 nats here, a forgotten log-Jacobian of
    the z-scoring Σ log σ_y ≈ 2.0 nats, an undertrained flow a tenth of a nat or more.
    """
    torch.manual_seed(0)
    a, b, s = torch.tensor([20.0, -1.0]), torch.tensor([10.0, -5.0]), torch.tensor([5.0, 0.2])

    def simulate(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = 2 * torch.rand(n, 1) - 1
        return a * c + b + s * torch.randn(n, 2), c

    y, c = simulate(4000)
    est = build_estimator("nsf", 2, (1,))
    est.set_standardization(y, c)
    optimizer = torch.optim.Adam(est.parameters(), lr=1e-3)
    for _ in range(300):
        index = torch.randint(0, len(y), (256,))
        loss = est.loss(y[index], c[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    est.eval()
    y_test, c_test = simulate(4000)
    with torch.no_grad():
        nll = -est(c_test).log_prob(y_test)
    true_log_prob = torch.distributions.Normal(a * c_test + b, s).log_prob(y_test).sum(-1)
    gap = nll + true_log_prob
    se = gap.std() / math.sqrt(len(gap))
    entropy = (0.5 * torch.log(2 * math.pi * math.e * s**2)).sum()
    assert gap.mean() < 0.05 + 4 * se, f"NLL {nll.mean():.3f} vs entropy {entropy:.3f}"
    assert gap.mean() > -4 * se  # no model beats the truth: a normalization bug would
    assert abs(nll.mean() - entropy) < 0.05 + 4 * se + 4 * nll.std() / math.sqrt(len(nll))


def test_nsf_spline_matches_zukos_and_takes_its_weights():
    import zuko
    from zuko.transforms import MonotonicRQSTransform

    from sbi_gen.estimators.flows import _RQSTransform

    generator = torch.Generator().manual_seed(0)
    # Widely spread parameters (bins squeezed to the minimum slope) as well as typical ones.
    widths, heights = 30 * torch.randn(64, 3, 8, generator=generator), torch.randn(64, 3, 8, generator=generator)
    derivatives = 5 * torch.randn(64, 3, 7, generator=generator)
    for params in ((widths, heights, derivatives), (heights, widths / 30, derivatives / 5)):
        params = [p.clone().requires_grad_() for p in params]
        ours, theirs = _RQSTransform(*params), MonotonicRQSTransform(*params, slope=1e-3)
        x = (6 * torch.randn(64, 3, generator=generator)).requires_grad_()  # some beyond the bound of 5: identity
        y, ladj = ours.call_and_ladj(x)
        y_ref, ladj_ref = theirs.call_and_ladj(x)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ladj, ladj_ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.inv(y), theirs.inv(y_ref), atol=1e-4, rtol=1e-4)
        # Independent upstream weights for y and log|dy/dx|, so neither gradient hides behind the other.
        a, b = torch.randn(2, 64, 3, generator=generator)
        grads = torch.autograd.grad((a * ladj).sum() + (b * y).sum(), [x, *params])
        grads_ref = torch.autograd.grad((a * ladj_ref).sum() + (b * y_ref).sum(), [x, *params])
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)
        # Exactly on knots and on the bound, where the one-sided derivatives jump: the same side
        # as autograd through zuko's formula on our own knots (zuko's knots differ in the last bit).
        x_edge = x.detach().clone()
        x_edge[:4, 0] = ours.horizontal.detach()[:4, 0, 3]
        x_edge[4:8, 1] = torch.tensor([-5.0, 5.0, 5.0, -5.0])
        x_edge.requires_grad_()
        y, ladj = ours.call_and_ladj(x_edge)
        y_ref, ladj_ref = MonotonicRQSTransform.call_and_ladj(ours, x_edge)
        grads = torch.autograd.grad((a * ladj).sum() + (b * y).sum(), [x_edge, *params])
        grads_ref = torch.autograd.grad((a * ladj_ref).sum() + (b * y_ref).sum(), [x_edge, *params])
        for g, g_ref in zip(grads, grads_ref):
            # On the bound, the last knot's pull on the bin widths is exactly zero (the softmax
            # sums to one); float32 leaves it a few roundings of the largest width gradient
            # (thousands here) in either computation. A wrong side would be off by O(1) relatively.
            torch.testing.assert_close(g, g_ref, atol=max(1e-4, 1e-6 * float(g_ref.abs().max())), rtol=1e-4)
    # The hand-written backward against finite differences, in double precision.
    params64 = [p[:8, :2].double().div(4).requires_grad_() for p in (widths, heights, derivatives)]
    x64 = 3 * torch.randn(8, 2, generator=generator, dtype=torch.float64)
    x64[0, 0] = 7.0  # outside the bound
    x64.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, *p: _RQSTransform(*p).call_and_ladj(x), (x64, *params64))
    # A second derivative would be wrong, so it raises instead.
    y, ladj = _RQSTransform(*params64).call_and_ladj(x64)
    (gx,) = torch.autograd.grad(ladj.sum(), x64, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gx.sum(), x64)
    # The whole flow: zuko's NSF loads our weights and gives the same densities.
    torch.manual_seed(0)
    est = build_estimator("nsf", 3, (2,), **SMALL["nsf"])
    reference = zuko.flows.NSF(3, est.context_features, transforms=2, hidden_features=[16, 16], bins=4)
    reference.load_state_dict(est.flow.state_dict())
    c, y = torch.randn(50, est.context_features), torch.randn(50, 3)
    torch.testing.assert_close(est.flow(c).log_prob(y), reference(c).log_prob(y), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["nsf", "maf"])
@pytest.mark.parametrize("passes", [None, 2])
def test_flow_inverse_pass_by_pass_equals_zukos(name, passes):
    """Sampling inverts only the features each pass fixes; the draws are zuko's own."""
    import zuko

    torch.manual_seed(0)
    est = build_estimator(name, 5, (2,), transforms=3, hidden_features=[16, 16], passes=passes)
    flow_class = zuko.flows.NSF if name == "nsf" else zuko.flows.MAF
    extra = {"bins": est.bins} if name == "nsf" else {}
    reference = flow_class(5, est.context_features, transforms=3, hidden_features=[16, 16], passes=passes, **extra)
    reference.load_state_dict(est.flow.state_dict())
    # Draws per condition (the first pass then evaluates one network row per condition), one
    # condition for all draws, and as many conditions as draws.
    for n_conditions, z_shape in ((7, (30, 7, 5)), (1, (30, 5)), (7, (7, 5))):
        c = torch.randn(n_conditions, est.context_features)
        z = torch.randn(*z_shape)
        ours, theirs = est.flow(c).transform.inv(z), reference(c).transform.inv(z)
        assert ours.shape == theirs.shape == z.shape
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(est.flow(c).transform(ours), z, atol=1e-4, rtol=1e-4)  # a true inverse
    # Reparameterized draws keep their gradients.
    draws = est.flow(c).rsample((3,))
    draws.square().sum().backward()
    assert all(p.grad is not None for p in est.flow.parameters() if p.requires_grad)


def test_gaussian_starts_at_the_least_squares_maximum_likelihood_fit():
    """In original units, the start is the textbook fit: mean A c + b by least squares and the
    residuals' covariance (MLE, divided by n). Standardizing y and c is affine, so the fit in
    standardized space maps back onto it exactly (up to float32 rounding)."""
    import numpy as np
    from scipy.stats import multivariate_normal

    generator = torch.Generator().manual_seed(0)
    n = 3000
    c = 3.0 + 2.0 * torch.randn(n, 4, generator=generator)
    mixing = torch.tensor([[1.0, 0.0, 0.0], [0.5, 2.0, 0.0], [-0.3, 0.2, 0.1]])
    y = c[:, :3] @ torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 0.0], [0.3, 0.0, -1.0]]) + 5.0
    y = y + torch.randn(n, 3, generator=generator) @ mixing.T
    est = build_estimator("gaussian", 3, (4,))
    est.set_standardization(y, c)

    design = np.hstack([c.double().numpy(), np.ones((n, 1))])
    solution, *_ = np.linalg.lstsq(design, y.double().numpy(), rcond=None)
    residuals = y.double().numpy() - design @ solution
    covariance = residuals.T @ residuals / n
    c_test, y_test = c[:5], y[:5] + 0.3
    expected = [multivariate_normal(design[i] @ solution, covariance).logpdf(y_test[i].double().numpy()) for i in range(5)]
    torch.testing.assert_close(est(c_test).log_prob(y_test).double(), torch.tensor(expected, dtype=torch.float64),
                               atol=1e-4, rtol=1e-5)
    # It is the optimum of the training loss: a gradient step from it does not lower the loss.
    loss = est.loss(y, c)
    loss.backward()
    assert max(float(p.grad.abs().max()) for p in est.parameters()) < 1e-3
    # Rows with a non-finite value are left out of the fit, as of the statistics.
    y_bad = y.clone()
    y_bad[:10] = float("nan")
    again = build_estimator("gaussian", 3, (4,))
    again.set_standardization(y_bad, c)
    clean = build_estimator("gaussian", 3, (4,))
    clean.set_standardization(y[10:], c[10:])
    for a, b in zip(again.parameters(), clean.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    # A coordinate that is an exact affine function of c: the covariance is singular, the
    # smallest jitter that makes it factor is added, and densities stay finite.
    exact = torch.cat([y[:, :1], 2.0 * c[:, 1:2] - 1.0], dim=1)
    singular = build_estimator("gaussian", 2, (4,))
    singular.set_standardization(exact, c)
    assert torch.isfinite(singular(c[:5]).log_prob(exact[:5])).all() and torch.isfinite(singular.scale_tril()).all()


def test_gaussian_start_on_an_untrained_embedding_is_a_bounded_ridge_fit():
    """An untrained CNN's features are tiny and nearly collinear: least squares on them would fit
    noise with weights near 1e5 and a float32 density off by 0.03 nats. The ridge start bounds
    each standardized weight vector by sd(z) / (2 sqrt(penalty)) (the largest of s / (s^2 + n a)
    times ||z|| is ||z|| / (2 sqrt(n a))), so float32 and float64 densities agree."""
    from sbi_gen.estimators.gaussian import _RIDGE_TRAINED_EMBEDDING, _ridge_start

    torch.manual_seed(0)
    est = small("gaussian", condition="map")
    y, c = torch.randn(256, 2), conditions("map", 256)
    est.set_standardization(y, c)
    with torch.no_grad():
        h = est.embed(c).double()
        z = (y.double() - est.y_mean.double()) / est.y_std.double()
    standardized = est.mean.weight.double() * h.std(0)  # (D, F): per unit of a feature's spread
    bound = z.std(0, correction=0) / (2 * math.sqrt(_RIDGE_TRAINED_EMBEDDING))
    assert (standardized.norm(dim=1) <= bound * 1.001).all()
    as_float64 = small("gaussian", condition="map").double()
    as_float64.load_state_dict({k: v.double() for k, v in est.state_dict().items()})
    draws = est(c[:8]).sample((5,))
    torch.testing.assert_close(est(c[:8]).log_prob(draws).double(), as_float64(c[:8].double()).log_prob(draws.double()),
                               atol=1e-3, rtol=0)
    # On well-conditioned features the penalty shrinks each standardized weight by about 1e-3 of
    # itself: here at most 1e-3 x 6 (the largest, 2 x sd 3) / 3 (sd of h) = 2e-3 in h's units.
    generator = torch.Generator().manual_seed(1)
    h = 2.0 + 3.0 * torch.randn(2000, 4, generator=generator, dtype=torch.float64)
    z = h @ torch.tensor([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0], [0.2, 0.1]], dtype=torch.float64) + 1.0
    z = z + torch.randn(2000, 2, generator=generator, dtype=torch.float64)
    design = torch.cat([h, torch.ones(2000, 1, dtype=torch.float64)], dim=1)
    exact = torch.linalg.lstsq(design, z).solution
    torch.testing.assert_close(_ridge_start(h, z)[:-1], exact[:-1], atol=2e-3, rtol=0.0)


def test_ensemble_is_the_equal_mixture_of_its_members_and_refuses_useless_families():
    torch.manual_seed(0)
    est = small("ensemble", y_dim=2)
    est.set_standardization(torch.randn(200, 2) * 3 + 1, torch.randn(200, 3))
    c, y = conditions("vector", 4), torch.randn(6, 4, 2)
    h = est.embed(c)
    members = torch.stack([member.core(h).log_prob((y - est.y_mean) / est.y_std) for member in est.members])
    assert not torch.allclose(members[0], members[1])  # their own initial weights
    expected = torch.logsumexp(members, 0) - math.log(2) - est.y_std.log().sum()
    torch.testing.assert_close(est(c).log_prob(y), expected)
    # Validation scores every member on the same rows; training resamples each member's rows.
    z = (torch.randn(64, 2) - est.y_mean) / est.y_std
    hz = est.embed(torch.randn(64, 3))
    est.eval()
    torch.testing.assert_close(est.core_loss(z, hz), torch.stack([m.core_loss(z, hz) for m in est.members]).mean())
    est.train()
    assert not torch.allclose(est.core_loss(z, hz), torch.stack([m.core_loss(z, hz) for m in est.members]).mean())
    for family in ("gaussian", "ensemble", "nope"):
        with pytest.raises(HyperparameterError, match="family must be one of"):
            build_estimator("ensemble", 2, (3,), family=family)
    with pytest.raises(HyperparameterError, match="members"):
        build_estimator("ensemble", 2, (3,), members=1)
    with pytest.raises(HyperparameterError, match="'nsf' got unknown hyperparameters"):
        build_estimator("ensemble", 2, (3,), family_kwargs={"widths": 3})
