"""Saving and loading fitted NPE / NLE models: weights plus a JSON config, never a pickle.

A checkpoint is a directory with ``config.json`` (method, prior, estimator configuration,
observation shape, training summary, the SHA-256 of the weights file) and ``weights.pt``, a
state dict of plain tensors that is read with ``torch.load(weights_only=True)``: a file holding
anything else (code, arbitrary objects) is refused, never executed, and one that is not the file
the config was saved with (changed, or left by an interrupted save) is refused with that reason.
Weights saved on a GPU load on the CPU.

Example:
    >>> import tempfile, simulators, sbi_gen
    >>> from sbi_gen.inference import NPE
    >>> from sbi_gen.train import TrainConfig
    >>> task = simulators.get("two_moons")
    >>> data = sbi_gen.simulate(task, n=300, seed=0)
    >>> npe = NPE(task.prior, "nsf", estimator_kwargs={"transforms": 1, "hidden_features": [8]})
    >>> _ = npe.fit((data["theta"], data["x"]), config=TrainConfig(max_epochs=1, progress=False))
    >>> path = tempfile.mkdtemp() + "/model"
    >>> save(npe, path)
    >>> load_model(path).x_shape
    (2,)
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sbi_gen.estimators import build_estimator
from sbi_gen.inference import NLE, NPE
from sbi_gen.priors import prior_from_dict
from sbi_gen.train import History, resolve_device

if TYPE_CHECKING:
    from sbi_gen.emulator import MapEmulator

__all__ = ["CheckpointError", "load_emulator", "load_model", "save", "save_emulator"]

FORMAT = "sbi_gen.model"
# 2: the CNN embedding's ``pool`` is recorded (format 1 has none; its CNNs are the dilated ones).
FORMAT_VERSION = 2
_METHODS = {"npe": NPE, "nle": NLE}
# The keys load_model reads without a default.
_MODEL_KEYS = ("method", "prior", "estimator_name", "estimator", "x_shape")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says why."""


def save(model: NPE | NLE, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to the directory ``path`` (created; files inside are replaced atomically)."""
    if model.estimator is None or model.prior is None:
        raise CheckpointError("cannot save a model that is not trained yet: call .fit(data) first")
    from sbi_gen import __version__

    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "method": model.method,
        "prior": model.prior.to_dict(),
        "estimator": model.estimator.config(),
        "estimator_name": model.estimator_name,
        "embedding": model.embedding,
        "estimator_kwargs": model.estimator_kwargs,
        "embedding_kwargs": model.embedding_kwargs,
        "x_shape": list(model.x_shape or ()),
        "metadata": model.metadata,
        "history": model.history.to_dict() if model.history is not None else None,
    }
    return _write_checkpoint(path, config, model.estimator.state_dict())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# What a checkpoint directory holds: the model, its temporary copies, and the training state
# (with its copies) that `sbi-gen train` keeps beside it.
_CHECKPOINT_FILES = ("config.json", "weights.pt", "training_state.pt")


def _write_checkpoint(path: str | os.PathLike[str], config: dict[str, Any], state: dict[str, torch.Tensor]) -> Path:
    """Writes ``weights.pt`` and ``config.json`` (with the weights' SHA-256) into the directory
    ``path``, each through a temporary file and an atomic rename.

    The two renames are not one atomic step: the hash lets a load tell weights that do not belong
    to the config (a save killed between them, or an edited file) from a checkpoint.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"cannot save to {path}: it is a file, a checkpoint is a directory")
    if path.is_dir():
        # A model's files mixed into a folder of other things could not be told apart or replaced safely.
        others = sorted(p.name for p in path.iterdir() if not p.name.startswith(_CHECKPOINT_FILES))
        if others:
            raise CheckpointError(f"cannot save to {path}: it holds other files ({', '.join(others[:3])}"
                                  f"{', ...' if len(others) > 3 else ''}); a checkpoint needs a directory of its own")
    path.mkdir(parents=True, exist_ok=True)
    weights_tmp, config_tmp = path / "weights.pt.tmp", path / "config.json.tmp"
    torch.save({k: v.detach().cpu() for k, v in state.items()}, weights_tmp)
    config = {**config, "weights_sha256": _sha256(weights_tmp)}
    config_tmp.write_text(json.dumps(config, indent=1, default=float))
    os.replace(weights_tmp, path / "weights.pt")
    os.replace(config_tmp, path / "config.json")
    return path


def _read_checkpoint(
    path: Path, fmt: str, what: str, required: tuple[str, ...], device: str
) -> tuple[dict[str, Any], dict[str, Any], torch.device]:
    """``(config, state dict, device)`` of a checkpoint directory, read safely.

    The config must carry ``format == fmt`` and the keys ``required``; the weights are read with
    ``torch.load(weights_only=True)`` and must be a dict of tensors. Every problem is a
    one-line :class:`CheckpointError` naming the file.
    """
    if not path.exists():
        raise CheckpointError(f"no such checkpoint: {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory (expected config.json and weights.pt inside)")
    for name, kind in (("config.json", "a model's config file"), ("weights.pt", "a weights file")):
        if not (path / name).exists():
            raise CheckpointError(f"{path} is not a complete checkpoint: {name} is missing")
        if (path / name).is_dir():
            raise CheckpointError(f"{path / name} is a directory, not {kind}")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON: {error}") from None
    if not isinstance(config, dict) or config.get("format") != fmt:
        raise CheckpointError(f"{path} is not an sbi_gen {what} (format is not {fmt!r})")
    if int(config.get("format_version", -1)) > _FORMAT_VERSIONS.get(fmt, FORMAT_VERSION):
        raise CheckpointError(f"{path} was written by a newer sbi_gen (format {config['format_version']})")
    missing = [key for key in required if key not in config]
    if missing:
        raise CheckpointError(
            f"{path / 'config.json'} lacks the key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}: "
            f"not an sbi_gen {what}, or one saved by an incompatible version"
        )
    # Checkpoints written before the hash was recorded have none to check.
    if "weights_sha256" in config and _sha256(path / "weights.pt") != config["weights_sha256"]:
        raise CheckpointError(
            f"{path / 'weights.pt'} is not the file {path / 'config.json'} was saved with (its SHA-256 differs): "
            "it was changed, or a save was interrupted; save the model again"
        )
    device_ = resolve_device(device)
    try:
        state = torch.load(path / "weights.pt", map_location=device_, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path / 'weights.pt'} is corrupt or holds more than plain tensors; refusing to unpickle it"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise CheckpointError(f"{path / 'weights.pt'} is corrupt or not a weights file: {str(error).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path / 'weights.pt'} is not a state dict of tensors")
    return config, state, device_


def _upgrade(config: dict[str, Any]) -> None:
    """A format-1 model's CNN embedding (maps) is the dilated one: ``pool=False``, which format 1
    did not record. Its weights also fit the pooled CNN, so without this they would load into
    the wrong network without an error."""
    if int(config.get("format_version", 1)) >= 2 or not isinstance(config.get("estimator"), dict):
        return
    estimator = config["estimator"]
    embedding = estimator.get("embedding")
    c_shape = estimator.get("c_shape")
    maps = isinstance(c_shape, list) and len(c_shape) in (2, 3)
    if embedding == "cnn" or (embedding is None and maps):
        estimator["embedding_kwargs"] = {**(estimator.get("embedding_kwargs") or {}), "pool": False}
        if config.get("embedding") in ("cnn", None) and maps:
            config["embedding_kwargs"] = {**(config.get("embedding_kwargs") or {}), "pool": False}


def load_model(path: str | os.PathLike[str], device: str = "cpu") -> NPE | NLE:
    """Load a checkpoint directory written by :func:`save` onto ``device``."""
    path = Path(path)
    config, state, device_ = _read_checkpoint(path, FORMAT, "model checkpoint", _MODEL_KEYS, device)
    if config["method"] not in _METHODS:
        raise CheckpointError(f"{path}: unknown method {config['method']!r}")

    _upgrade(config)
    try:
        model = _METHODS[config["method"]](
            prior_from_dict(config["prior"]),
            config["estimator_name"],
            embedding=config.get("embedding"),
            estimator_kwargs=config.get("estimator_kwargs"),
            embedding_kwargs=config.get("embedding_kwargs"),
            device=str(device_),
        )
        estimator = build_estimator(**config["estimator"])
        x_shape = tuple(config["x_shape"])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{path / 'config.json'} does not describe a model this sbi_gen can build: {error}") from None
    try:
        estimator.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: the weights do not fit the configured estimator: {str(error).splitlines()[0]}") from None
    model.estimator = estimator.to(device_).eval()
    if isinstance(model, NPE):  # the estimator's config says whether θ went through the prior's bijection
        model.bijection = config["estimator"].get("y_prior") is not None
    model.x_shape = x_shape
    model.metadata = config.get("metadata") or {}
    if config.get("history"):
        model.history = History(**config["history"])
    return model


EMULATOR_FORMAT = "sbi_gen.emulator"
# The emulator's own format has not changed since its first version.
EMULATOR_FORMAT_VERSION = 1
_FORMAT_VERSIONS = {FORMAT: FORMAT_VERSION, EMULATOR_FORMAT: EMULATOR_FORMAT_VERSION}


def save_emulator(emulator: MapEmulator, path: str | os.PathLike[str], history: History | None = None) -> Path:
    """Write a :class:`~sbi_gen.emulator.MapEmulator` to the directory ``path``, as :func:`save` does a model.

    ``config.json`` holds the format, the architecture (``emulator.config()``), its metadata and
    the training history; ``weights.pt`` the state dict (standardization included).
    """
    from sbi_gen import __version__

    config = {
        "format": EMULATOR_FORMAT,
        "format_version": EMULATOR_FORMAT_VERSION,
        "package_version": __version__,
        "emulator": emulator.config(),
        "metadata": emulator.metadata,
        "history": history.to_dict() if history is not None else None,
    }
    return _write_checkpoint(path, config, emulator.state_dict())


def load_emulator(path: str | os.PathLike[str], device: str = "cpu") -> MapEmulator:
    """Load an emulator directory written by :func:`save_emulator` onto ``device`` (in eval mode).

    The weights are read with ``torch.load(weights_only=True)``: nothing in the files is executed.
    """
    from sbi_gen.emulator import MapEmulator

    path = Path(path)
    config, state, device_ = _read_checkpoint(path, EMULATOR_FORMAT, "emulator", ("emulator",), device)
    try:
        emulator = MapEmulator(**config["emulator"], metadata=config.get("metadata"))
        emulator.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: the weights do not fit the configured emulator: {str(error).splitlines()[0]}") from None
    return emulator.to(device_).eval()


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON config of a checkpoint (no weights are read)."""
    return json.loads((Path(path) / "config.json").read_text())
