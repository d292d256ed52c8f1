import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from sbi_gen.estimators import build_estimator
from sbi_gen.priors import BoxUniform
from sbi_gen.simulate import as_simulator
from sbi_gen.store import simulate_to_hdf5
from sbi_gen.train import InMemoryState, TrainConfig, TrainingStateError, _mean_loss, fit

SMALL = {"transforms": 1, "hidden_features": [16, 16]}


def _data(n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, 1, generator=g)
    y = 2 * c + 0.3 * torch.randn(n, 1, generator=g)
    return y, c


def test_fit_returns_history_and_restores_best_weights():
    y, c = _data()
    est = build_estimator("nsf", 1, (1,), **SMALL)
    history = fit(est, (y, c), config=TrainConfig(max_epochs=15, progress=False, batch_size=64))
    assert len(history.train_loss) == len(history.val_loss) == len(history.learning_rate) <= 15
    assert history.best_val_loss == min(history.val_loss)
    assert history.n_train + history.n_val == 600
    # The weights left in the estimator are the best epoch's: re-evaluating gives its loss.
    from sbi_gen.store import train_val_split

    _, val = train_val_split(600, 0.1, seed=0)
    assert _mean_loss(est, y[val], c[val], 1024) == pytest.approx(history.best_val_loss, rel=1e-5)
    # Learning happened: the loss fell well below that of the untrained model (~ the marginal entropy).
    assert history.best_val_loss < history.val_loss[0]


def test_fit_is_reproducible_with_a_seed():
    y, c = _data()
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        est = build_estimator("nsf", 1, (1,), **SMALL)
        fit(est, (y, c), config=TrainConfig(max_epochs=3, progress=False, seed=5))
        weights.append(torch.cat([p.flatten() for p in est.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_training_draws_come_from_the_config_seed_not_the_global_state():
    # A diffusion model draws noise levels and noise in its loss: with the same initial weights,
    # the same TrainConfig.seed must give the same model whatever torch's global state was, and
    # the caller's global stream must be left where it was.
    y, c = _data(200)
    torch.manual_seed(0)
    initial = build_estimator("diffusion", 1, (1,), hidden=16, blocks=1).state_dict()
    weights, after = [], []
    for global_seed in (1, 2):
        est = build_estimator("diffusion", 1, (1,), hidden=16, blocks=1)
        est.load_state_dict(initial)
        torch.manual_seed(global_seed)
        expected_next = torch.randn(3, generator=torch.Generator().manual_seed(global_seed))
        fit(est, (y, c), config=TrainConfig(max_epochs=2, progress=False, seed=3))
        after.append(torch.randn(3))
        assert torch.equal(after[-1], expected_next)  # fit used none of the caller's stream
        weights.append(torch.cat([p.flatten() for p in est.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_seeded_torch_streams_are_independent_and_restore_the_caller_state():
    from sbi_gen.train import seeded_torch

    torch.manual_seed(7)
    state = torch.get_rng_state()
    with seeded_torch(0, "weights"):
        a = torch.randn(4)
    with seeded_torch(0, "training 0"):
        b = torch.randn(4)
    with seeded_torch(1, "weights"):
        c = torch.randn(4)
    with seeded_torch(0, "weights"):
        assert torch.equal(torch.randn(4), a)
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)


def test_early_stopping_with_patience():
    y, c = _data(300)
    y = torch.randn_like(y)  # nothing to learn: validation loss stops improving quickly
    est = build_estimator("nsf", 1, (1,), **SMALL)
    history = fit(est, (y, c), config=TrainConfig(max_epochs=500, patience=3, progress=False))
    assert history.stopped_early and len(history.val_loss) < 500
    assert len(history.val_loss) - 1 - history.best_epoch <= 3


def test_cosine_schedule_runs_its_budget_along_a_half_cosine():
    y, c = _data(300)
    est = build_estimator("nsf", 1, (1,), **SMALL)
    config = TrainConfig(max_epochs=6, lr_schedule="cosine", learning_rate=1e-2, min_learning_rate=1e-4, progress=False)
    history = fit(est, (y, c), config=config)
    expected = [1e-4 + (1e-2 - 1e-4) * 0.5 * (1 + math.cos(math.pi * e / 6)) for e in range(6)]
    assert history.learning_rate == pytest.approx(expected)
    assert not history.stopped_early and history.best_val_loss == min(history.val_loss)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")


def test_non_finite_rows_never_reach_the_loss():
    y, c = _data(400)
    y[::7] = math.nan
    c[3] = math.inf
    est = build_estimator("nsf", 1, (1,), **SMALL)
    left_out = len(range(0, 400, 7)) + 1
    with pytest.warns(UserWarning, match=f"^{left_out} of 400 training rows hold NaN or infinite values and are left out$"):
        history = fit(est, (y, c), config=TrainConfig(max_epochs=2, progress=False))
    assert all(math.isfinite(v) for v in history.train_loss + history.val_loss)
    assert history.n_train + history.n_val == 400 - left_out


def test_fit_from_an_hdf5_file_uses_only_valid_rows(tmp_path):
    prior = BoxUniform([0.0], [1.0])

    def sim(theta, rng):
        x = theta + 0.1 * rng.normal(size=theta.shape)
        x[theta[:, 0] > 0.9] = np.nan
        return x

    summary = simulate_to_hdf5(as_simulator(sim, prior, name="t", observable_shape=(1,)), 800, tmp_path / "d.h5", seed=0, progress=False)
    est = build_estimator("nsf", 1, (1,), **SMALL)
    history = fit(est, tmp_path / "d.h5", config=TrainConfig(max_epochs=2, progress=False))
    assert history.n_train + history.n_val == summary.n_valid < 800


def test_bad_inputs():
    y, c = _data(100)
    est = build_estimator("nsf", 1, (1,), **SMALL)
    with pytest.raises(ValueError, match="y has 100 rows but c has 50"):
        fit(est, (y, c[:50]), config=TrainConfig(progress=False))
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(val_fraction=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(TypeError, match="config must be a TrainConfig .*got dict"):
        fit(est, (y, c), config={"max_epochs": 1})
    # Wrong types and ranges are named here, not inside torch (or, for a negative clip, not at all:
    # clipping to a negative norm flips every gradient).
    for field, value, wanted in [
        ("clip_grad_norm", -1.0, "a positive finite number or None"),
        ("batch_size", "256", "a positive integer"),
        ("max_epochs", 2.5, "a positive integer"),
        ("learning_rate", math.nan, "a positive finite number"),
        ("lr_factor", 2, "in \\(0, 1\\)"),
        ("weight_decay", -1, "a non-negative finite number"),
    ]:
        with pytest.raises(ValueError, match=f"^{field} must be {wanted}, got "):
            TrainConfig(**{field: value})
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            fit(est, (y, c), config=TrainConfig(device="cuda", progress=False))


class _RecordingMean(torch.nn.Module):
    """Estimates the mean of y by squared error, recording the weight at every loss call."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls = []  # (training?, weight)

    def loss(self, y, c):
        self.calls.append((self.training, float(self.w.detach())))
        return (self.w - y).square().mean()


def test_ema_weights_are_validated_and_restored():
    y = 3.0 + 0.1 * torch.randn(640, 1, generator=torch.Generator().manual_seed(0))
    module = _RecordingMean()
    decay = 0.5  # reached after the warm-up (n = 8): both branches of min() are exercised
    config = TrainConfig(max_epochs=2, batch_size=64, learning_rate=0.05, ema_decay=decay, progress=False)
    history = fit(module, (y, torch.zeros(640, 1)), config=config, standardize=False)
    train = [w for training, w in module.calls if training]
    val = [w for training, w in module.calls if not training]
    steps = len(train) // 2  # 576 training rows / 64 = 9 steps per epoch
    # The average by hand: it starts at the initial weight, then lerps towards each post-step weight
    # (the weight seen by the next training call) with the warmed-up decay.
    average = train[0]
    for n, w in enumerate(train[1 : steps + 1]):
        d = min(decay, (1 + n) / (10 + n))
        average = d * average + (1 - d) * w
    assert val[0] == pytest.approx(average, rel=1e-6)
    # The average lags the raw weights while they move towards 3, and the validated average of the
    # best (last) epoch is what training leaves in the module.
    assert val[-1] < train[-1]
    assert history.best_epoch == 1 and float(module.w.detach()) == pytest.approx(val[-1], rel=1e-6)
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)


def test_min_delta_counts_only_large_enough_falls_as_progress():
    # Adam at 1e-4 moves w by about 1e-4 per step towards 3: 9 steps per epoch lower the
    # squared error by about 2 * 3 * 9e-4 = 0.005 per epoch, a tenth of min_delta.
    y, c = 3.0 + 0.1 * torch.randn(640, 1, generator=torch.Generator().manual_seed(0)), torch.zeros(640, 1)
    common = {"max_epochs": 12, "batch_size": 64, "learning_rate": 1e-4, "progress": False}
    histories = {}
    for min_delta in (0.0, 0.05):
        module = _RecordingMean()
        config = TrainConfig(**common, patience=3, lr_patience=100, min_delta=min_delta)
        histories[min_delta] = fit(module, (y, c), config=config, standardize=False)
        # Every epoch still lowers the loss, so the last one's weights are kept either way.
        assert histories[min_delta].best_epoch == len(histories[min_delta].val_loss) - 1
        assert float(module.w.detach()) == pytest.approx(module.calls[-1][1])
    assert np.all(np.diff(histories[0.0].val_loss) < 0)
    assert len(histories[0.0].val_loss) == 12 and not histories[0.0].stopped_early
    # The first epoch sets the mark; three epochs without a fall of 0.05 stop the run.
    assert len(histories[0.05].val_loss) == 4 and histories[0.05].stopped_early
    # The rate schedule counts progress the same way.
    for min_delta, halved in ((0.0, False), (0.05, True)):
        config = TrainConfig(**common, patience=100, lr_patience=2, min_delta=min_delta)
        rates = fit(_RecordingMean(), (y, c), config=config, standardize=False).learning_rate
        assert (rates[-1] < rates[0]) == halved
    with pytest.raises(ValueError, match="min_delta"):
        TrainConfig(min_delta=-1.0)


class _CtrlC:
    """A forward hook that raises KeyboardInterrupt, as Ctrl-C does, at the ``at``-th call of the
    module it is registered on (torch's own hook mechanism: the interrupt lands inside a step)."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def __call__(self, module, inputs, output):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt


def test_ctrl_c_after_an_epoch_keeps_the_best_weights_so_far():
    y, c = _data()
    est = build_estimator("nsf", 1, (1,), embedding="mlp", **SMALL)
    # 540 training rows in batches of 64: 9 steps and 1 validation call an epoch; the interrupt
    # lands in the 4th epoch's 5th step.
    hook = est.embedding.register_forward_hook(_CtrlC(at=3 * 10 + 5))
    config = TrainConfig(max_epochs=50, patience=50, progress=False, batch_size=64, ema_decay=0.9)
    with pytest.warns(UserWarning, match=r"interrupted in epoch 4: kept the best weights so far \(epoch"):
        history = fit(est, (y, c), config=config)
    hook.remove()
    assert history.interrupted and not history.stopped_early
    assert len(history.val_loss) == 3 and history.best_val_loss == min(history.val_loss)
    # The weights left are the best validated ones (the weight average), not the half-stepped raw ones.
    from sbi_gen.store import train_val_split

    _, val = train_val_split(600, 0.1, seed=0)
    assert _mean_loss(est, y[val], c[val], 1024) == pytest.approx(history.best_val_loss, rel=1e-5)
    assert not est.training


def test_ctrl_c_before_the_first_epoch_ends_propagates():
    y, c = _data()
    est = build_estimator("nsf", 1, (1,), embedding="mlp", **SMALL)
    est.embedding.register_forward_hook(_CtrlC(at=3))
    with pytest.raises(KeyboardInterrupt):
        fit(est, (y, c), config=TrainConfig(max_epochs=5, progress=False, batch_size=64))


@pytest.mark.parametrize("source", ["tensors", "streamed file"])
def test_training_resumes_from_its_state_file_exactly_as_if_never_stopped(tmp_path, source):
    """A run stopped in epoch 4 (Ctrl-C) and resumed from its state file ends with the same
    weights and history, bit for bit, as a run never stopped: the weights, their average, the
    optimizer, the schedule and the shuffling all continue. A finished state is not trained
    again, unless max_epochs grows; another configuration's state, or a damaged file, is
    refused with its reason."""
    if source == "tensors":
        y, c = _data(600)
        data, key = (y, c), {}
    else:
        prior = BoxUniform([-2.0], [2.0])
        sim = as_simulator(lambda theta, rng: 2 * theta + 0.3 * rng.normal(size=theta.shape), prior, name="line")
        simulate_to_hdf5(sim, 1200, tmp_path / "d.h5", seed=0, chunk_size=100, progress=False)
        data, key = tmp_path / "d.h5", {"streaming": True}
    config = TrainConfig(max_epochs=6, patience=50, progress=False, batch_size=64, ema_decay=0.9, **key)

    def estimator():
        torch.manual_seed(0)
        return build_estimator("nsf", 1, (1,), embedding="mlp", **SMALL)

    whole = estimator()
    whole_history = fit(whole, data, config=config, state_path=tmp_path / "whole.pt")

    stopped = estimator()
    hook = stopped.embedding.register_forward_hook(_CtrlC(at=3 * (whole_history.n_train // 64) + 5))
    with pytest.warns(UserWarning, match="interrupted in epoch 4"):
        assert fit(stopped, data, config=config, state_path=tmp_path / "run.pt").interrupted
    hook.remove()
    (tmp_path / "run.pt.tmp-99999").write_bytes(b"half a state")  # left by a process killed while saving
    resumed = estimator()
    history = fit(resumed, data, config=config, state_path=tmp_path / "run.pt")
    assert not (tmp_path / "run.pt.tmp-99999").exists()
    assert history.val_loss == whole_history.val_loss and history.train_loss == whole_history.train_loss
    assert history.best_epoch == whole_history.best_epoch and not history.interrupted
    for a, b in zip(resumed.state_dict().values(), whole.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # Finished: nothing is trained again (no forward pass at all), the best weights are returned.
    again = estimator()
    counter = _CtrlC(at=-1)
    again.embedding.register_forward_hook(counter)
    assert fit(again, data, config=config, state_path=tmp_path / "run.pt").val_loss == whole_history.val_loss
    assert counter.calls == 0
    for a, b in zip(again.state_dict().values(), whole.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # A larger max_epochs trains on: 6 epochs then 2 more are the 8 of one run.
    longer = fit(estimator(), data, config=replace(config, max_epochs=8), state_path=tmp_path / "whole.pt")
    assert longer.val_loss == fit(estimator(), data, config=replace(config, max_epochs=8)).val_loss

    with pytest.raises(ValueError, match="run.pt is the state of another training"):
        fit(estimator(), data, config=replace(config, learning_rate=3e-3), state_path=tmp_path / "run.pt")
    # The cosine schedule spans max_epochs: its epochs done would not be those of a longer run.
    cosine = replace(config, lr_schedule="cosine", max_epochs=2)
    fit(estimator(), data, config=cosine, state_path=tmp_path / "cosine.pt")
    with pytest.raises(ValueError, match="cosine.pt is the state of another training"):
        fit(estimator(), data, config=replace(cosine, max_epochs=3), state_path=tmp_path / "cosine.pt")
    (tmp_path / "run.pt").write_bytes(b"not a state")
    with pytest.raises(ValueError, match="run.pt is not a readable training state"):
        fit(estimator(), data, config=config, state_path=tmp_path / "run.pt")


def test_a_training_state_in_memory_goes_on_as_one_run(tmp_path):
    """3 epochs, then 3 more from the state in memory, are the 6 epochs of one run, bit for bit;
    a resume that does not record leaves the state as it was; the state written to a file is one
    ``state_path`` resumes from; another configuration's state is refused."""
    y, c = _data(600)
    config = TrainConfig(max_epochs=6, patience=50, progress=False, batch_size=64, ema_decay=0.9)

    def estimator():
        torch.manual_seed(0)
        return build_estimator("nsf", 1, (1,), embedding="mlp", **SMALL)

    whole = estimator()
    whole_history = fit(whole, (y, c), config=config)
    state = InMemoryState()
    assert len(fit(estimator(), (y, c), config=replace(config, max_epochs=3), state_path=state).val_loss) == 3
    state.write(tmp_path / "after3.pt")
    state.recording = False
    resumed = estimator()
    assert fit(resumed, (y, c), config=config, state_path=state).val_loss == whole_history.val_loss
    for a, b in zip(resumed.state_dict().values(), whole.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Not recorded: the state still holds 3 epochs, and a second resume trains the same 3 more.
    assert len(state.load()["history"]["val_loss"]) == 3
    assert fit(estimator(), (y, c), config=config, state_path=state).val_loss == whole_history.val_loss
    from_file = fit(estimator(), (y, c), config=config, state_path=tmp_path / "after3.pt")
    assert from_file.val_loss == whole_history.val_loss
    with pytest.raises(TrainingStateError, match="state in memory is that of another training"):
        fit(estimator(), (y, c), config=replace(config, learning_rate=3e-3), state_path=state)
    with pytest.raises(ValueError, match="no training state recorded yet"):
        InMemoryState().write(tmp_path / "none.pt")
