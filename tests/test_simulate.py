import numpy as np
import pytest
import torch

from sbi_gen.priors import BoxUniform
from sbi_gen.simulate import SimulatorOutputError, as_simulator, run_chunk, simulate
from sbi_gen.store import simulate_to_hdf5

PRIOR = BoxUniform([0.0, 0.0], [1.0, 1.0], names=["a", "b"])


def test_numpy_function_with_rng_is_reproducible():
    sim = as_simulator(lambda theta, rng: theta + rng.normal(size=theta.shape), PRIOR, name="noisy")
    a = simulate(sim, n=300, seed=4, chunk_size=100)
    b = simulate(sim, n=300, seed=4, chunk_size=100)
    c = simulate(sim, n=300, seed=5, chunk_size=100)
    assert a["x"].shape == (300, 2) and a["valid"].all()
    assert np.array_equal(a["x"], b["x"]) and not np.array_equal(a["x"], c["x"])


def test_torch_function_using_global_rng_is_made_reproducible():
    sim = as_simulator(lambda theta: torch.as_tensor(theta) + torch.randn(len(theta), 2), PRIOR)
    a = simulate(sim, n=50, seed=1)["x"]
    torch.manual_seed(123)
    b = simulate(sim, n=50, seed=1)["x"]
    assert np.array_equal(a, b)


def test_one_at_a_time_function_and_observable_shape_probe():
    sim = as_simulator(lambda theta: np.array([theta.sum(), theta.prod(), 1.0]), PRIOR, batched=False)
    assert sim.observable_shape == (3,)
    out = simulate(sim, n=7, seed=0)
    np.testing.assert_allclose(out["x"][:, 0], out["theta"].sum(axis=1), rtol=1e-6)


def test_explicit_theta():
    sim = as_simulator(lambda theta: 2 * theta, PRIOR)
    out = simulate(sim, theta=np.array([[0.1, 0.2]]))
    np.testing.assert_allclose(out["x"], [[0.2, 0.4]])
    with pytest.raises(ValueError, match=r"theta must have shape \(n, 2\)"):
        simulate(sim, theta=np.zeros((3, 3)))


def test_wrong_output_shape_is_named():
    sim = as_simulator(lambda theta: np.zeros((len(theta), 2)), PRIOR, observable_shape=(3,))
    with pytest.raises(ValueError, match=r"returned x of shape \(4, 2\), expected \(4, 3\)"):
        simulate(sim, n=4)


def test_malformed_output_is_a_bug_named_at_once_not_rows_retried(tmp_path):
    """A function that returns a dict, None or one row too few is broken for every θ: the run
    stops with its name, instead of retrying each row alone (which hid a batch one row short:
    every single row then succeeded, so nothing was counted, and the run was n times slower)."""
    calls = []

    def one_short(theta, rng):
        calls.append(len(theta))
        return theta[:-1] if len(theta) > 1 else theta

    with pytest.raises(SimulatorOutputError, match="^simulator 'short' returned 49 rows of x for 50 parameter rows$"):
        simulate(as_simulator(one_short, PRIOR, name="short"), n=50)
    assert calls == [1, 50]  # the shape probe, then the one batch: no row-by-row retry
    with pytest.raises(SimulatorOutputError, match="returned dict of object; the function must return x as numbers"):
        as_simulator(lambda theta, rng: {"x": theta}, PRIOR)
    lazy = as_simulator(lambda t: None if t[0] > 0.5 else t, PRIOR, batched=False, observable_shape=(2,))
    with pytest.raises(SimulatorOutputError, match="returned NoneType of object"):
        simulate(lazy, n=20)


def test_what_is_not_a_simulator_or_a_prior_is_named(tmp_path):
    with pytest.raises(TypeError, match="function is not a simulator.*wrap a plain function with sbi_gen.as_simulator"):
        simulate(lambda theta, rng: theta, n=10)
    with pytest.raises(TypeError, match="as_simulator needs a prior from sbi_gen.priors"):
        as_simulator(lambda theta: theta, [0.0, 1.0])
    two = as_simulator(lambda theta: theta, PRIOR, name="two")
    message = r"^the prior has 1 parameters, but simulator 'two' takes 2 \(a, b\)$"
    with pytest.raises(ValueError, match=message):
        simulate(two, n=10, prior=BoxUniform([0.0], [1.0]))
    with pytest.raises(ValueError, match=message):
        simulate_to_hdf5(two, 10, tmp_path / "a.h5", prior=BoxUniform([0.0], [1.0]), progress=False)


@pytest.mark.parametrize("n", [0, -3, None])
def test_non_positive_n_is_refused(n):
    sim = as_simulator(lambda theta: theta, PRIOR)
    with pytest.raises(ValueError, match="positive integer"):
        simulate(sim, n=n)


def test_raising_rows_are_isolated_and_counted():
    def fragile(theta):
        if np.any(theta[:, 0] > 0.8):
            raise RuntimeError("diverged at large a")
        return theta.copy()

    sim = as_simulator(fragile, PRIOR, observable_shape=(2,))
    chunk = run_chunk(sim, PRIOR, 200, np.random.SeedSequence(0))
    bad = chunk["theta"][:, 0] > 0.8
    assert chunk["n_failed"] == bad.sum() > 0
    assert "diverged at large a" in chunk["first_error"]
    assert np.array_equal(chunk["valid"], ~bad)
    assert np.isnan(chunk["x"][bad]).all() and np.isfinite(chunk["x"][~bad]).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 2.5}, r"number of simulations must be a positive integer, got 2.5"),
        ({"n": "10"}, r"number of simulations must be a positive integer, got '10'"),
        ({"n": True}, r"number of simulations must be a positive integer, got True"),
        ({"n": 0}, r"number of simulations must be a positive integer, got 0"),
        ({"n": None}, r"number of simulations must be a positive integer, got None"),
        ({"n": 10, "chunk_size": 0}, r"chunk size must be a positive integer, got 0"),
        ({"n": 10, "chunk_size": -1}, r"chunk size must be a positive integer, got -1"),
        ({"n": 10, "chunk_size": 2.0}, r"chunk size must be a positive integer, got 2.0"),
        ({"n": 10, "seed": -1}, r"seed must be an integer from 0 to .*got -1"),
        ({"n": 10, "seed": 1.5}, r"seed must be an integer from 0 to .*got 1.5"),
        ({"theta": np.zeros((3, 2)), "seed": -1}, r"seed must be an integer from 0 to .*got -1"),
    ],
)
def test_bad_counts_chunk_sizes_and_seeds_are_refused_before_simulating(kwargs, match):
    calls = []
    sim = as_simulator(lambda theta: calls.append(len(theta)) or theta, PRIOR, observable_shape=(2,))
    with pytest.raises(ValueError, match=match):
        simulate(sim, **kwargs)
    assert calls == []


def test_numpy_integer_counts_are_accepted():
    sim = as_simulator(lambda theta, rng: theta, PRIOR)
    out = simulate(sim, n=np.int64(7), chunk_size=np.int32(3), seed=np.uint8(2))
    assert out["x"].shape == (7, 2)
