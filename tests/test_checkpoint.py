import json
import os
import pickle

import pytest
import torch

import simulators
from sbi_gen.checkpoint import CheckpointError, load_model, save
from sbi_gen.inference import NLE, NPE
from sbi_gen.simulate import simulate
from sbi_gen.train import TrainConfig

SMALL = {"transforms": 1, "hidden_features": [16]}


@pytest.fixture(scope="module")
def moons():
    task = simulators.get("two_moons")
    return task, simulate(task, n=600, seed=0)


@pytest.mark.parametrize("method", [NPE, NLE])
def test_round_trip_gives_identical_log_prob(tmp_path, moons, method):
    task, data = moons
    model = method(task.prior, "nsf", estimator_kwargs=SMALL)
    model.fit((data["theta"], data["x"]), config=TrainConfig(max_epochs=2, progress=False))
    save(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert type(again) is method and again.x_shape == (2,)
    theta = task.prior.sample((50,))
    x_obs = data["x"][0]
    torch.testing.assert_close(again.posterior(x_obs).log_prob(theta), model.posterior(x_obs).log_prob(theta), rtol=0, atol=0)
    assert again.history is not None and again.history.best_epoch == model.history.best_epoch


def test_malicious_pickle_is_refused_not_executed(tmp_path, moons):
    task, data = moons
    model = NPE(task.prior, "nsf", estimator_kwargs=SMALL)
    model.fit((data["theta"], data["x"]), config=TrainConfig(max_epochs=1, progress=False))
    save(model, tmp_path / "m")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "m" / "weights.pt", "wb") as f:
        pickle.dump({"weight": Exploit()}, f)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_model(tmp_path / "m")
    assert not marker.exists()


def test_bad_checkpoints(tmp_path, moons):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_model(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(tmp_path / "empty")
    task, data = moons
    model = NPE(task.prior, "nsf", estimator_kwargs=SMALL)
    with pytest.raises(CheckpointError, match="not trained"):
        save(model, tmp_path / "untrained")
    model.fit((data["theta"], data["x"]), config=TrainConfig(max_epochs=1, progress=False))
    save(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["format"] = "something else"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not an sbi_gen model"):
        load_model(tmp_path / "m")
    save(model, tmp_path / "m")
    (tmp_path / "m" / "weights.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path / "m")
