"""The GPU path, end to end: every estimator, NPE and NLE, training sets read from HDF5, the CLI,
and checkpoints written on the GPU read back on the CPU. Skipped where no CUDA GPU exists."""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

import simulators
from sbi_gen.checkpoint import load_model, save
from sbi_gen.estimators import ESTIMATORS
from sbi_gen.inference import NLE, NPE
from sbi_gen.simulate import simulate
from sbi_gen.store import simulate_to_hdf5
from sbi_gen.train import TrainConfig, fit
from tests.test_estimators import SMALL, conditions, small

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FAST = {"max_epochs": 3, "patience": 3, "progress": False, "device": "cuda", "seed": 0}


@pytest.fixture(scope="module")
def moons():
    task = simulators.get("two_moons")
    data = simulate(task, n=2000, seed=0)
    return task, torch.as_tensor(data["theta"]).float(), torch.as_tensor(data["x"]).float()


@pytest.mark.parametrize("condition", ["vector", "map"])
@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_trains_samples_and_agrees_with_its_cpu_copy(name, condition):
    torch.manual_seed(0)
    est = small(name, condition=condition)
    y, c = torch.randn(256, 2), conditions(condition, 256)
    history = fit(est, (y, c), config=TrainConfig(**{**FAST, "batch_size": 64}))
    assert np.isfinite(history.best_val_loss)
    assert all(p.device.type == "cuda" for p in est.parameters())
    assert all(b.device.type == "cuda" for b in est.buffers())
    # cuDNN convolutions default to TF32 (a 10-bit mantissa) on Ampere and later: off here, so the
    # map embedding's features match the CPU's to float32 precision.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        dist = est.eval()(c[:8].cuda())
        draws = dist.sample((5,))
        log_prob = dist.log_prob(draws)
    assert draws.device.type == "cuda" and draws.shape == (5, 8, 2) and torch.isfinite(draws).all()
    assert log_prob.device.type == "cuda" and torch.isfinite(log_prob).all()
    # The same weights on the CPU give the same density (the VAE's is an importance-weighted
    # estimate whose draws come from each device's own generator, so it is compared loosely).
    cpu = small(name, condition=condition)
    cpu.load_state_dict({k: v.cpu() for k, v in est.state_dict().items()})
    tolerance = {"atol": 0.5, "rtol": 0.1} if name == "vae" else {"atol": 2e-3, "rtol": 2e-3}
    torch.testing.assert_close(log_prob.cpu(), cpu.eval()(c[:8]).log_prob(draws.cpu()), **tolerance)


# Estimators whose loss draws no random numbers (the VAE's and the diffusion model's draw noise,
# the ensemble's resamples the batch, each from its device's own generator).
DETERMINISTIC_LOSS = ["cnf", "gaussian", "maf", "nsf"]


@pytest.mark.parametrize("condition", ["vector", "map"])
@pytest.mark.parametrize("name", DETERMINISTIC_LOSS)
def test_a_training_step_has_the_same_gradients_on_both_devices(name, condition):
    """The same weights and batch give the same loss and gradients (the NSF's spline backward is
    hand-written): float32 sums over 256 rows agree to about 1e-6 relative, far inside 1e-3."""
    torch.manual_seed(0)
    cpu = small(name, condition=condition)
    y, c = torch.randn(256, 2), conditions(condition, 256)
    cpu.set_standardization(y, c)
    gpu = copy.deepcopy(cpu).cuda()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        gpu_loss = gpu.loss(y.cuda(), c.cuda())
        gpu_loss.backward()
    cpu_loss = cpu.loss(y, c)
    cpu_loss.backward()
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, atol=1e-5, rtol=1e-5)
    for (key, on_cpu), on_gpu in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        if on_cpu.grad is None:
            assert on_gpu.grad is None, key
            continue
        torch.testing.assert_close(on_gpu.grad.cpu(), on_cpu.grad, atol=1e-4, rtol=1e-3, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("estimator", ["nsf", "diffusion"])
def test_npe_on_gpu_saves_a_checkpoint_that_loads_on_cpu(tmp_path, moons, estimator):
    task, theta, x = moons
    npe = NPE(task.prior, estimator, estimator_kwargs=SMALL[estimator], device="cuda")
    npe.fit((theta, x), config=TrainConfig(**FAST))
    posterior = npe.posterior(x[0])
    draws = posterior.sample((500,))
    assert torch.isfinite(posterior.log_prob(draws)).all()
    assert bool(task.prior.support.check(draws.cpu()).all())  # never outside the prior's box
    save(npe, tmp_path / "model")
    on_cpu = load_model(tmp_path / "model", device="cpu")
    assert all(p.device.type == "cpu" for p in on_cpu.estimator.parameters())
    if estimator == "nsf":  # an exact density: identical on both devices
        torch.testing.assert_close(
            on_cpu.posterior(x[0]).log_prob(draws.cpu()), posterior.log_prob(draws).cpu(), atol=2e-3, rtol=2e-3
        )
    back = load_model(tmp_path / "model", device="cuda")
    assert all(p.device.type == "cuda" for p in back.estimator.parameters())


def test_npe_without_the_bijection_rejects_on_gpu(moons):
    task, theta, x = moons
    npe = NPE(task.prior, "nsf", estimator_kwargs=SMALL["nsf"], device="cuda", bijection=False)
    npe.fit((theta, x), config=TrainConfig(**FAST))
    draws = npe.posterior(x[0]).sample((500,))
    assert draws.device.type == "cuda" and bool(task.prior.support.check(draws.cpu()).all())
    batched = npe.sample_batched(x[:5], 300)
    assert batched.shape == (300, 5, 2) and bool(task.prior.support.check(batched.cpu()).all())


def test_nle_on_gpu_samples_by_mcmc(moons):
    task, theta, x = moons
    nle = NLE(task.prior, "maf", estimator_kwargs=SMALL["maf"], device="cuda")
    nle.fit((theta, x), config=TrainConfig(**FAST))
    posterior = nle.posterior(x[:3])  # three i.i.d. observations
    draws = posterior.sample((400,))
    assert draws.shape == (400, 2) and torch.isfinite(draws).all()
    assert bool(task.prior.support.check(draws.cpu()).all())
    assert posterior.mcmc is not None and torch.isfinite(posterior.mcmc.rhat).all()


def test_npe_with_a_cnn_trains_from_an_hdf5_file_on_gpu_streamed_and_loaded(tmp_path):
    cosmology = simulators.get("cosmology", n_pix=16)
    path = tmp_path / "maps.h5"
    simulate_to_hdf5(cosmology, 256, path, seed=0, chunk_size=64, progress=False)
    kwargs = {"estimator_kwargs": SMALL["nsf"], "embedding_kwargs": {"out_features": 8, "channels": [4, 4], "hidden": [8]}}
    losses = []
    for streaming in (False, True):
        npe = NPE(None, "nsf", device="cuda", **kwargs)
        history = npe.fit(path, config=TrainConfig(**FAST, streaming=streaming, batch_size=64))
        losses.append(history.best_val_loss)
        draws = npe.posterior(torch.zeros(16, 16)).sample((50,))
        assert draws.shape == (50, 3) and torch.isfinite(draws).all()
    assert np.isfinite(losses).all()


def test_cli_trains_and_samples_on_gpu(tmp_path):
    data, model, samples = tmp_path / "moons.h5", tmp_path / "model", tmp_path / "samples.h5"
    obs = tmp_path / "obs.npy"
    np.save(obs, np.zeros(2, dtype=np.float32))
    commands = [
        ["simulate", "two_moons", "--n", "2000", "--out", str(data), "--seed", "0"],
        ["train", str(data), "--method", "npe", "--out", str(model), "--device", "cuda", "--max-epochs", "2", "--quiet"],
        ["sample", str(model), "--obs", str(obs), "--n", "500", "--out", str(samples), "--device", "cuda"],
    ]
    for command in commands:
        done = subprocess.run([sys.executable, "-m", "sbi_gen.cli", *command], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    import h5py

    with h5py.File(samples) as handle:
        assert np.isfinite(handle["samples"][...]).all()
