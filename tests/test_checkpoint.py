import hashlib
import json
import os
import pickle
import shutil

import pytest
import torch

import simulators
from sbi_gen.checkpoint import CheckpointError, load_emulator, load_model, save
from sbi_gen.inference import NLE, NPE
from sbi_gen.simulate import simulate
from sbi_gen.train import TrainConfig

SMALL = {"transforms": 1, "hidden_features": [16]}


def _rehash(checkpoint) -> None:
    """Records the current weights file's SHA-256 in the config, as someone editing both files would."""
    config = json.loads((checkpoint / "config.json").read_text())
    config["weights_sha256"] = hashlib.sha256((checkpoint / "weights.pt").read_bytes()).hexdigest()
    (checkpoint / "config.json").write_text(json.dumps(config))


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
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        load_model(tmp_path / "m")
    _rehash(tmp_path / "m")  # an attacker who controls both files: the loader still never unpickles
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
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"mixed: it holds other files \(notes.txt\); a checkpoint needs a directory"):
        save(model, tmp_path / "mixed")
    assert sorted(p.name for p in (tmp_path / "mixed").iterdir()) == ["notes.txt"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["format"] = "something else"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not an sbi_gen model"):
        load_model(tmp_path / "m")
    save(model, tmp_path / "m")
    (tmp_path / "m" / "weights.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        load_model(tmp_path / "m")
    _rehash(tmp_path / "m")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path / "m")


def test_weights_that_do_not_belong_to_the_config_are_refused(tmp_path, moons):
    """Two models of one architecture: the weights of one under the other's config (a save killed
    between its two renames, or a copied file) would load silently with the wrong history and
    metadata; the SHA-256 recorded at save time refuses them. Checkpoints without a hash load."""
    task, data = moons
    first, second = (NPE(task.prior, "nsf", estimator_kwargs=SMALL) for _ in range(2))
    first.fit((data["theta"], data["x"]), config=TrainConfig(max_epochs=1, progress=False, seed=0))
    second.fit((data["theta"], data["x"]), config=TrainConfig(max_epochs=2, progress=False, seed=1))
    save(first, tmp_path / "first")
    save(second, tmp_path / "second")
    config = json.loads((tmp_path / "first" / "config.json").read_text())
    assert config["weights_sha256"] == hashlib.sha256((tmp_path / "first" / "weights.pt").read_bytes()).hexdigest()
    (tmp_path / "first" / "weights.pt").write_bytes((tmp_path / "second" / "weights.pt").read_bytes())
    with pytest.raises(CheckpointError, match=r"first/weights.pt is not the file .*first/config.json was saved with"):
        load_model(tmp_path / "first")
    del config["weights_sha256"]  # as written before the hash was recorded: loaded as it is
    (tmp_path / "first" / "config.json").write_text(json.dumps(config))
    assert load_model(tmp_path / "first").history.best_epoch == first.history.best_epoch


def _broken_copy(tmp_path, saved, name):
    """A copy of the checkpoint ``saved``, to be damaged by the caller."""
    copy = tmp_path / name
    shutil.copytree(saved, copy)
    return copy


def test_config_and_weights_that_are_not_what_they_should_be(tmp_path, moons):
    """Each used to surface as a bare KeyError or OSError ('estimator', [Errno 21] Is a directory)."""
    task, data = moons
    model = NPE(task.prior, "nsf", estimator_kwargs=SMALL)
    model.fit((data["theta"], data["x"]), config=TrainConfig(max_epochs=1, progress=False))
    saved = save(model, tmp_path / "m")

    lacking = _broken_copy(tmp_path, saved, "lacking")
    config = json.loads((lacking / "config.json").read_text())
    del config["estimator"]
    (lacking / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        load_model(lacking)
    assert str(error.value) == (
        f"{lacking / 'config.json'} lacks the key 'estimator': "
        "not an sbi_gen model checkpoint, or one saved by an incompatible version"
    )

    for name, kind in (("config.json", "a model's config file"), ("weights.pt", "a weights file")):
        broken = _broken_copy(tmp_path, saved, f"directory-{name}")
        (broken / name).unlink()
        (broken / name).mkdir()
        with pytest.raises(CheckpointError) as error:
            load_model(broken)
        assert str(error.value) == f"{broken / name} is a directory, not {kind}"

    bad_prior = _broken_copy(tmp_path, saved, "bad-prior")
    config = json.loads((bad_prior / "config.json").read_text())
    del config["prior"]["low"]
    (bad_prior / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        load_model(bad_prior)
    assert str(error.value) == f"{bad_prior / 'config.json'} does not describe a model this sbi_gen can build: 'low'"
    assert load_model(saved).x_shape == (2,)  # the original is untouched and still loads


def test_an_emulator_config_without_its_architecture_is_refused(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text(json.dumps({"format": "sbi_gen.emulator", "format_version": 1}))
    torch.save({}, tmp_path / "e" / "weights.pt")
    with pytest.raises(CheckpointError) as error:
        load_emulator(tmp_path / "e")
    assert str(error.value) == (
        f"{tmp_path / 'e' / 'config.json'} lacks the key 'emulator': "
        "not an sbi_gen emulator, or one saved by an incompatible version"
    )


def test_a_format_1_map_model_loads_with_its_dilated_cnn(tmp_path):
    """Format 1 did not record the CNN's ``pool``, and its CNNs were the dilated ones. The pooled
    CNN (the default since format 2) has the same weight shapes, so only the format version
    tells them apart: such a model must load as dilated, not pooled, giving the same densities."""
    from sbi_gen.priors import BoxUniform

    prior = BoxUniform([0.0], [1.0])
    theta = prior.sample((64,))
    maps = theta[:, :, None] * torch.randn(64, 8, 8)
    small_cnn = {"channels": [2, 2], "out_features": 4, "hidden": [8]}
    model = NPE(prior, "maf", estimator_kwargs=SMALL, embedding_kwargs={**small_cnn, "pool": False})
    model.fit((theta, maps), config=TrainConfig(max_epochs=1, progress=False))
    assert model.estimator.config()["embedding_kwargs"]["pool"] is False
    save(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["format_version"] == 2
    del config["estimator"]["embedding_kwargs"]["pool"], config["embedding_kwargs"]["pool"]
    config["format_version"] = 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    old = load_model(tmp_path / "m")
    assert old.estimator.embedding.pool is False and old.embedding_kwargs["pool"] is False
    grid = torch.linspace(0.05, 0.95, 7)[:, None]
    torch.testing.assert_close(old.posterior(maps[0]).log_prob(grid), model.posterior(maps[0]).log_prob(grid), rtol=0, atol=0)
    # A new model records the default it was built with, so later defaults cannot change it.
    pooled = NPE(prior, "maf", estimator_kwargs=SMALL, embedding_kwargs=small_cnn)
    pooled.fit((theta, maps), config=TrainConfig(max_epochs=1, progress=False))
    assert pooled.estimator.config()["embedding_kwargs"]["pool"] is True
