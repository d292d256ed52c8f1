"""The ``sbi-gen`` command line.

Every command prints errors as one line (``sbi-gen: error: ...``) and exits non-zero.

Example:
    $ sbi-gen simulators
    $ sbi-gen simulate particle --n 100000 --out data/particle.h5 --seed 1 --workers 2
    $ sbi-gen simulate cosmology --n 100000 --out data/cosmology.h5 --seed 1 --scheduler tcp://host:8786
    $ sbi-gen info data/particle.h5
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import sys
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main"]


class CLIError(Exception):
    """An error to report to the user as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (and a pointer to --help) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _json_object(text: str | None, flag: str, example: str) -> dict[str, Any]:
    """The JSON object given to ``flag`` (``{}`` when absent), or a one-line error."""
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as error:
        raise CLIError(f"{flag} is not valid JSON: {error.msg}") from None
    if not isinstance(value, dict):
        raise CLIError(f"{flag} must be a JSON object, e.g. '{example}'")
    return value


def _train_config(args: argparse.Namespace, defaults: dict[str, Any], **extra: Any) -> Any:
    """The :class:`~sbi_gen.train.TrainConfig` of the training options shared by the train commands;
    options not given on the command line take their value from ``defaults``, then TrainConfig's."""
    from sbi_gen.train import TrainConfig

    given = {name: getattr(args, name) for name in _TRAINING_OPTIONS if getattr(args, name) is not None}
    return TrainConfig(**{**defaults, **given, "seed": args.seed, "device": args.device, "progress": not args.quiet, **extra})


# How an error names the JSON type an option takes (a number option takes integers too).
_JSON_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def _option_kinds(parameter: inspect.Parameter) -> tuple[type, ...]:
    """The JSON types a simulator option takes, from its annotation (``float | None``) or else its
    default; empty when neither tells (e.g. an array), and then the simulator itself judges."""
    annotation = parameter.annotation
    if annotation is not inspect.Parameter.empty:
        union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        kinds = typing.get_args(annotation) if union else (annotation,)
        return kinds if all(kind in _JSON_KINDS for kind in kinds) else ()
    default = parameter.default
    if isinstance(default, (bool, str)):
        return (type(default),)
    return (float,) if isinstance(default, (int, float)) else ()  # an unannotated 4 may mean 4.5 too


def _takes(value: Any, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int):
        return int in kinds or float in kinds
    return type(value) in kinds  # lists and objects: never a declared kind


def _check_config(name: str, kwargs: dict[str, Any]) -> None:
    """A one-line error for an option the simulator's constructor does not have, or a value of
    another JSON type than its signature declares; the simulator itself checks the rest."""
    import simulators

    constructor = simulators.simulator_class(name)
    try:
        signature = inspect.signature(constructor, eval_str=True)
    except Exception:  # an annotation that does not evaluate: check the option names only
        try:
            signature = inspect.signature(constructor)
        except (TypeError, ValueError):
            return
    options = {key: p for key, p in signature.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    for key, value in kwargs.items():
        if key not in options:
            if not takes_any:
                known = f"its options are {', '.join(options)}" if options else "it takes none"
                raise CLIError(f"bad --config for simulator {name!r}: no option {key!r}; {known}")
            continue
        kinds = _option_kinds(options[key])
        if kinds and not _takes(value, kinds):
            wanted = " or ".join(_JSON_KINDS[k] for k in kinds if not (k is int and float in kinds))
            raise CLIError(f"bad --config for simulator {name!r}: {key} must be {wanted}, got {json.dumps(value)}")


def _simulator(name: str, config: str | None) -> Any:
    import simulators

    kwargs = _json_object(config, "--config", '{"n_pix": 64}')
    if name not in simulators.REGISTRY:
        raise CLIError(f"unknown simulator {name!r}; registered: {', '.join(simulators.names())}")
    _check_config(name, kwargs)
    try:
        return simulators.get(name, **kwargs)
    except (TypeError, ValueError) as error:  # the simulator's own checks of the values
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CLIError(f"bad --config for simulator {name!r}: {message}") from None


def _parameters(text: str, names: Sequence[str], prior: Any, takes: str, prior_is: str = "", flag: str = "--theta") -> Any:
    """The parameter vector given as ``--theta a,b,...``: one value per name, finite and inside
    ``prior`` (when there is one), or a one-line error."""
    import numpy as np
    import torch

    try:
        theta = np.array([float(v) for v in text.split(",")])
    except ValueError:
        raise CLIError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if len(theta) != len(names):
        raise CLIError(f"{flag} has {len(theta)} values but {takes} {len(names)} ({', '.join(names)})")
    if not np.isfinite(theta).all():
        raise CLIError(f"{flag} contains NaN or infinite values")
    if prior is not None and not torch.isfinite(prior.log_prob(torch.as_tensor(theta, dtype=torch.float32))):
        raise CLIError(f"{flag} {text} lies outside {prior_is}: {prior.to_json()}")
    return theta


def _cmd_simulators(args: argparse.Namespace) -> None:
    import simulators

    for name in simulators.names():
        sim = simulators.get(name)
        units = getattr(sim, "parameter_units", None) or [""] * len(sim.parameter_names)
        params = ", ".join(f"{p} [{u}]" if u else p for p, u in zip(sim.parameter_names, units, strict=True))
        print(f"{name:<16} v{sim.version:<5} θ: {params}    x: {tuple(sim.observable_shape)}")


def _cmd_simulate(args: argparse.Namespace) -> None:
    from sbi_gen.store import simulate_to_hdf5

    simulator = _simulator(args.simulator, args.config)
    prior = None
    if args.theta is not None:
        from sbi_gen.priors import PointMass

        default = simulator.prior
        value = _parameters(args.theta, default.names, default, f"{simulator.name} has",
                            f"the prior of {simulator.name}, where its simulations are meant to be")
        prior = PointMass(value, names=default.names, units=default.units)
    on_dask = args.scheduler is not None or args.dask_local is not None
    summary = simulate_to_hdf5(
        simulator,
        n=args.n,
        path=args.out,
        seed=args.seed,
        prior=prior,
        chunk_size=args.chunk_size,
        workers=args.workers,
        overwrite=args.overwrite,
        compression=None if args.compression == "none" else args.compression,
        progress=not args.quiet,
        executor="dask" if on_dask else "local",
        scheduler=args.scheduler,
        dask_local_workers=args.dask_local,
        connect_timeout=args.connect_timeout,
    )
    print(summary)
    if summary.n_valid == 0:
        print(f"sbi-gen: warning: no simulation in {args.out} is valid; it cannot train a model", file=sys.stderr)


def _cmd_info(args: argparse.Namespace) -> None:
    from sbi_gen.store import read_info

    info = read_info(args.path)
    if args.json:
        print(json.dumps({k: v for k, v in info.items() if not k.endswith("_decoded")}, indent=1, default=str))
        return
    names = info["parameter_names_decoded"]
    units = info.get("parameter_units_decoded") or [""] * len(names)
    n = info["n_simulations"]
    print(f"file            {args.path} ({info['file_bytes'] / 2**20:.1f} MiB, format {info['format']} v{info['format_version']})")
    print(f"simulator       {info['simulator']} v{info['simulator_version']}  config {info['simulator_config']}")
    print(f"parameters      {', '.join(f'{p} [{u}]' if u else p for p, u in zip(names, units, strict=True))}")
    print(f"prior           {info['prior']}")
    if info.get("observable_names_decoded"):
        print(f"observables     {', '.join(info['observable_names_decoded'])}")
    print(f"seed            {info['seed']}  (chunk size {info['chunk_size']}, {info['n_chunks']} chunks)")
    print(f"simulations     {n:,}: {info['n_valid']:,} valid ({100 * info['n_valid'] / n:.2f}%), "
          f"{info['n_nonfinite']:,} non-finite, {info['n_failed']:,} failed")
    if info.get("first_error"):
        print(f"first error     {info['first_error']}")
    print("datasets")
    for name, shape in info["shapes"].items():
        print(f"  {name:<28}{shape}")
    print(f"written by      sbi_gen {info['package_version']}")


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from sbi_gen import distributed
    from sbi_gen.checkpoint import save
    from sbi_gen.estimators import ESTIMATORS
    from sbi_gen.inference import AUTO, NLE, NPE, check_drawn_from_prior, families_text
    from sbi_gen.priors import prior_from_dict
    from sbi_gen.store import read_info
    from sbi_gen.train import TrainingStateError

    method = {"npe": NPE, "nle": NLE}[args.method]
    estimator_kwargs = _json_object(args.estimator_kwargs, "--estimator-kwargs", '{"transforms": 3}')
    args.estimator = method.estimator_for(args.estimator, estimator_kwargs)
    if args.estimator not in ESTIMATORS and args.estimator != AUTO:
        raise CLIError(f"unknown estimator {args.estimator!r}; known: {', '.join(sorted(ESTIMATORS))}, or {AUTO}")
    info = read_info(args.data)
    check_drawn_from_prior(prior_from_dict(info["prior_decoded"]), args.data)
    _check_some_valid(info, args.data)
    if estimator_kwargs and args.estimator == AUTO:
        raise CLIError(f"--estimator-kwargs set the hyperparameters of one family: name it with --estimator (e.g. nsf) "
                       f"instead of auto, which races {families_text(method.auto_families)}")
    if args.bijection and args.method != "npe":
        raise CLIError("--bijection applies to NPE only: NLE models x given θ, and its MCMC runs in the prior's unconstrained space")
    options = {"bijection": True} if args.bijection else {}
    model = method(None, args.estimator, embedding=args.embedding, estimator_kwargs=estimator_kwargs, device=args.device, **options)
    streaming = {"auto": None, "on": True, "off": False}[args.streaming]
    family = method.auto_families[0] if args.estimator == AUTO else args.estimator
    config = _train_config(args, ESTIMATORS[family].training_defaults, streaming=streaming)
    # Under torchrun every process trains its shard of the same model; rank 0 alone reports and saves.
    distributed.init_from_env(args.device)
    main = distributed.is_main_process()
    world = distributed.process_info().world_size
    state_path = _training_state(args) if world == 1 else None
    if main:
        print(f"training {args.method.upper()} ({args.estimator}) on {info['n_valid']:,} valid simulations of "
              f"{info['simulator']}" + (f" with {world} processes" if world > 1 else ""), flush=True)
    # --seed decides everything: the initial weights as well as the split and the batches.
    torch.manual_seed(args.seed)
    try:
        with _replacing_state(state_path, args.overwrite):
            history = model.fit(args.data, config=config, state_path=state_path)
    except TrainingStateError as error:
        raise CLIError(f"{error}, or pass --overwrite") from None
    if main:
        save(model, args.out)
        if args.estimator == AUTO and model.metadata.get("estimator_unraced"):
            print(f"kept {model.estimator_name} without a race ({model.metadata['estimator_unraced']})")
        elif args.estimator == AUTO:
            losses = ", ".join(f"{name} {'diverged' if loss is None else f'{loss:.4f}'}"
                               for name, loss in model.metadata["estimator_selection"].items())
            raced = ("in the interrupted race" if model.metadata.get("estimator_race_interrupted")
                     else f"after {model.metadata['estimator_race_epochs']} epochs")
            print(f"validation loss by family {raced} ({model.metadata['estimator_race_seconds']:.1f} s): {losses}; "
                  f"kept {model.estimator_name}")
        print(f"best validation loss {history.best_val_loss:.4f} at epoch {history.best_epoch + 1} "
              f"of {len(history.val_loss)} ({history.seconds:.1f} s{', streamed from disk' if history.streaming else ''})")
        print(f"model saved to {args.out}")
    # Only after success: a failed process just exits, and torchrun stops the others.
    distributed.shutdown()
    return _interrupted_training(history, "model", resumable=state_path is not None)


def _check_some_valid(info: dict[str, Any], path: str) -> None:
    if info["n_valid"] == 0:
        raise CLIError(f"{path} has no valid simulation to train on: of {info['n_simulations']:,}, "
                       f"{info['n_failed']:,} failed and {info['n_nonfinite']:,} gave non-finite values")


def _training_state(args: argparse.Namespace) -> Path:
    """``OUT/training_state.pt``, where one training process saves its state after every epoch
    and from which the same command resumes after a crash (or trains on with a larger
    --max-epochs); --overwrite discards a state already there. OUT is created by the first save,
    so a run that fails before it leaves nothing. A saved model with no state to resume is kept
    unless --overwrite, and a directory of other files is never written into."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"cannot save to {out}: it is a file, a model is a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"cannot save to {out}: the directory {parent} does not exist")
    state_path = out / TRAINING_STATE
    if out.is_dir() and any(out.iterdir()):
        if not any((out / name).exists() for name in (TRAINING_STATE, *MODEL_FILES)):
            raise CLIError(f"{out} is a directory of other files, not a model; choose a new --out")
        if not state_path.exists() and not args.overwrite:
            raise CLIError(f"{out} holds a saved model and no training to resume; pass --overwrite to replace it")
    if state_path.exists() and not args.overwrite:
        print(f"resuming the training saved in {state_path}", flush=True)
    return state_path


@contextlib.contextmanager
def _replacing_state(state_path: Path | None, overwrite: bool) -> Iterator[None]:
    """With --overwrite, the training state already in OUT is set aside rather than deleted, and
    put back if the new training fails before saving one of its own (a bad option, say)."""
    aside = None if state_path is None else state_path.with_name(f"{state_path.name}.replaced")
    if aside is not None and overwrite and state_path.exists():
        os.replace(state_path, aside)
    try:
        yield
    except BaseException:
        if aside is not None and aside.exists() and not state_path.exists():
            os.replace(aside, state_path)
        raise
    finally:
        if aside is not None:
            aside.unlink(missing_ok=True)


def _interrupted_training(history: Any, what: str, resumable: bool = False) -> int:
    """0, or 130 (as for Ctrl-C) after saying that an interrupted training's best weights were saved."""
    if not history.interrupted:
        return 0
    print(f"sbi-gen: interrupted; the {what} saved holds the best weights of the {len(history.val_loss)} epochs "
          f"trained (epoch {history.best_epoch + 1})" + ("; rerun the same command to resume" if resumable else ""),
          file=sys.stderr)
    return 130


def _read_observation(path: str, index: int | str | None, model: Any) -> tuple[Any, Any]:
    """``(x_obs, theta_true or None)`` from a .npy array or a row (or ``all`` valid rows) of an
    HDF5 file of simulations, which must come from the simulator ``model`` was trained on."""
    import h5py
    import numpy as np

    from sbi_gen.store import load, read_info

    if not Path(path).is_file():
        raise CLIError(f"no such observation file: {path}" if not Path(path).exists() else f"{path} is not a file")
    if path.endswith(".npy"):
        if index is not None:
            raise CLIError("--index picks a row of an HDF5 observation file; a .npy holds the observation itself")
        with open(path, "rb") as handle:
            if handle.read(6) != b"\x93NUMPY":
                raise CLIError(f"{path} is not a .npy array file (saved by numpy.save)")
        try:
            x_obs = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise CLIError(f"cannot read the observation {path}: {str(error) or 'the file is truncated'}") from None
        if x_obs.dtype.kind not in "iuf":
            raise CLIError(f"{path} holds {x_obs.dtype} values; an observation is real numbers")
        return x_obs, None
    if not h5py.is_hdf5(path):
        raise CLIError(f"{path} is neither a .npy array nor an HDF5 file of simulations")
    simulator, trained_on = read_info(path)["simulator"], model.metadata.get("simulator")
    if trained_on and simulator != trained_on:
        raise CLIError(f"{path} holds simulations of {simulator}, but the model was trained on {trained_on}")
    if index == "all":
        data = load(path, valid_only=True)
        if len(data) == 0:
            raise CLIError(f"{path} holds no valid observation")
        # One θ behind every row (a file from `simulate --theta`) is the truth of the combined posterior.
        same_theta = bool((data.theta == data.theta[0]).all())
        x_obs = data.x[0] if len(data) == 1 else data.x
        return x_obs, data.theta[0] if same_theta else None
    index = index or 0
    data = load(path, valid_only=False)
    if not 0 <= index < len(data):
        raise CLIError(f"--index {index} is out of range: {path} holds {len(data)} observations")
    if not data.valid[index]:
        raise CLIError(f"row {index} of {path} is marked invalid (its simulation failed or gave non-finite values)")
    return data.x[index], data.theta[index]


def _output_file(path: str, file_format: str, command: str, inputs: Sequence[str] = ()) -> Path:
    """``--out`` of a command that writes one HDF5 file: a path whose directory exists, that is
    not one of ``inputs`` and is either new or an earlier output of the same command (so no
    training set, observation or model file is ever replaced by mistake)."""
    import h5py

    out = Path(path)
    if out.is_dir():
        raise CLIError(f"cannot write {out}: it is a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"cannot write {out}: the directory {parent} does not exist")
    if any(Path(p).exists() and out.exists() and out.samefile(p) for p in inputs):
        raise CLIError(f"--out {out} is one of this command's inputs; choose another file")
    if out.exists():
        try:
            with h5py.File(out, "r") as f:
                earlier = f.attrs.get("format") == file_format
        except OSError:
            earlier = False
        if not earlier:
            raise CLIError(f"{out} exists and was not written by `sbi-gen {command}`; remove it or choose another --out")
    return out


@contextlib.contextmanager
def _written_atomically(out: Path) -> Iterator[Path]:
    """A temporary path beside ``out`` that replaces it only once fully written: a failure
    leaves any earlier ``out`` as it was."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _cmd_sample(args: argparse.Namespace) -> None:
    import h5py
    import numpy as np

    from sbi_gen.checkpoint import load_model

    out = _output_file(args.out, "sbi_gen.samples", "sample", inputs=[args.obs])
    model = load_model(args.model, device=args.device)
    x_obs, theta_true = _read_observation(args.obs, args.index, model)
    posterior = model.posterior(x_obs)
    samples = posterior.sample((args.n,)).cpu().numpy()
    names = model.prior.names
    mcmc = getattr(posterior, "mcmc", None)
    with _written_atomically(out) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("samples", data=samples, compression="gzip", compression_opts=1)
        f.create_dataset("x_obs", data=np.asarray(x_obs))
        if theta_true is not None:
            f.create_dataset("theta_true", data=np.asarray(theta_true))
        f.attrs["format"] = "sbi_gen.samples"
        f.attrs["parameter_names"] = json.dumps(names)
        f.attrs["parameter_labels"] = json.dumps(model.prior.labels)
        f.attrs["model"] = str(args.model)
        f.attrs["method"] = model.method
        if mcmc is not None:
            f.attrs["rhat"] = mcmc.rhat.cpu().numpy()
            f.attrs["ess"] = mcmc.ess.cpu().numpy()
    print(posterior_summary(samples, names, theta_true))
    if mcmc is not None:
        print(f"MCMC: max R-hat {float(mcmc.rhat.max()):.3f}, min ESS {float(mcmc.ess.min()):.0f}")
    print(f"{args.n:,} samples written to {out}")


def _cmd_diagnose(args: argparse.Namespace) -> None:
    from sbi_gen.checkpoint import load_model
    from sbi_gen.inference import check_drawn_from_prior
    from sbi_gen.priors import prior_from_dict
    from sbi_gen.report import diagnose
    from sbi_gen.store import load, read_info

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"cannot write the report to {out}: it is a file, --out is a report directory")
    model = load_model(args.model, device=args.device)
    info = read_info(args.data)
    check_drawn_from_prior(prior_from_dict(info["prior_decoded"]), args.data)
    trained = model.metadata
    if trained.get("simulator") and info["simulator"] != trained["simulator"]:
        raise CLIError(f"{args.data} holds simulations of {info['simulator']}, but the model was trained on {trained['simulator']}")
    # The same seed gives the same first draws whatever n and chunk size: not held out.
    if (trained.get("seed") is not None and info["seed"] == trained["seed"]
            and (info["simulator"], info.get("simulator_config")) == (trained["simulator"], trained.get("simulator_config"))):
        raise CLIError(f"{args.data} was simulated with the training set's seed ({info['seed']}), so its simulations "
                       "are training simulations; simulate held-out ones with another --seed")
    data = load(args.data, valid_only=True)
    if tuple(data.x.shape[1:]) != tuple(model.x_shape or ()):
        raise CLIError(f"{args.data} holds x of shape {tuple(data.x.shape[1:])} but the model expects {tuple(model.x_shape or ())}")
    if data.theta.shape[1] != model.prior.dim:
        raise CLIError(f"{args.data} has {data.theta.shape[1]} parameters but the model has {model.prior.dim}")
    # NLE samples each observation by its own MCMC run: seconds per observation.
    n_sims = args.n_sims or (1000 if model.method == "npe" else 100)
    n_samples = args.n_samples or (1000 if model.method == "npe" else 500)
    n_sims = min(n_sims, len(data))
    if n_sims < 10:
        raise CLIError(f"{args.data} has only {len(data)} valid simulations; diagnostics need at least 10")
    print(f"diagnosing {model.method.upper()} ({model.estimator_name}) on {n_sims:,} held-out simulations "
          f"of {args.data}, {n_samples:,} posterior draws each")
    report = diagnose(
        model,
        data.theta[:n_sims],
        data.x[:n_sims],
        args.out,
        n_samples=n_samples,
        seed=args.seed,
        ppc_draws=args.ppc_draws,
        n_c2st=args.c2st,
    )
    print(f"{'calibrated' if report['calibrated'] else 'NOT calibrated'}; report and figures in {args.out}: "
          + ", ".join(["report.json", *(f"{name}.png" for name in report["figures"])]))


def _cmd_plot(args: argparse.Namespace) -> None:
    import h5py
    import numpy as np

    from sbi_gen.plots import corner, save_figure

    if args.label and len(args.label) != len(args.samples):
        raise CLIError(f"{len(args.label)} --label for {len(args.samples)} samples files: give one per file, in order")
    sets, labels, truth = {}, None, None
    for i, path in enumerate(args.samples):
        if not Path(path).is_file():
            raise CLIError(f"no such samples file: {path}" if not Path(path).exists() else f"{path} is not a file")
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") != "sbi_gen.samples" or "samples" not in f:
                    raise CLIError(f"{path} is not a samples file written by `sbi-gen sample`")
                values = f["samples"][()]
                file_labels = json.loads(f.attrs.get("parameter_labels", "null"))
                file_truth = f["theta_true"][()] if "theta_true" in f else None
                method = str(f.attrs.get("method", "posterior")).upper()
        except OSError as error:
            raise CLIError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
        name = args.label[i] if args.label and i < len(args.label) else f"{method} ({path})"
        sets[name] = values
        labels = labels or file_labels
        truth = truth if truth is not None else file_truth
    if args.truth is not None:
        names = labels or [f"theta_{i + 1}" for i in range(np.shape(values)[-1])]
        truth = _parameters(args.truth, names, None, "the samples have", flag="--truth")
    fig = corner(sets, labels=labels, truth=truth, title=args.title)
    print(f"corner plot written to {save_figure(fig, args.out)}")


def _cmd_train_emulator(args: argparse.Namespace) -> int:
    import torch

    from sbi_gen.checkpoint import save_emulator
    from sbi_gen.emulator import FAMILIES, train_emulator
    from sbi_gen.store import read_info
    from sbi_gen.train import TrainingStateError

    hyperparameters = _json_object(args.hyperparameters, "--hyperparameters", '{"channels": [16, 32]}')
    info = read_info(args.data)
    _check_some_valid(info, args.data)
    config = _train_config(args, {"batch_size": 64, "max_epochs": 200, **FAMILIES[args.family].training_defaults})
    transform: dict[str, Any] = {}
    if args.pixel_transform == "shifted_log":
        shift = args.pixel_shift
        simulator_config = info.get("simulator_config_decoded") or {}
        if shift is None and simulator_config.get("lognormal"):  # lognormal cosmology maps record their shift
            shift = simulator_config.get("lambda_s")
        if shift is None:
            raise CLIError(f"--pixel-transform shifted_log needs --pixel-shift: {args.data} does not record a shift")
        transform = {"pixel_transform": "shifted_log", "pixel_shift": float(shift)}
    elif args.pixel_shift is not None:
        raise CLIError("--pixel-shift goes with --pixel-transform shifted_log")
    state_path = _training_state(args)
    print(f"training a {args.family} emulator on {info['n_valid']:,} valid maps of {info['simulator']}", flush=True)
    torch.manual_seed(args.seed)  # --seed decides the initial weights too
    try:
        with _replacing_state(state_path, args.overwrite):
            emulator, history = train_emulator(args.data, args.family, hyperparameters, config=config,
                                               state_path=state_path, **transform)
    except TrainingStateError as error:
        raise CLIError(f"{error}, or pass --overwrite") from None
    except (TypeError, ValueError) as error:
        raise CLIError(str(error)) from None
    save_emulator(emulator, args.out, history)
    print(f"best validation loss {history.best_val_loss:.4f} at epoch {history.best_epoch + 1} "
          f"of {len(history.val_loss)} ({history.seconds:.1f} s)")
    print(f"emulator saved to {args.out}")
    return _interrupted_training(history, "emulator", resumable=True)


def _cmd_emulate(args: argparse.Namespace) -> None:
    import h5py
    import numpy as np
    import torch

    from sbi_gen.checkpoint import load_emulator

    out = _output_file(args.out, "sbi_gen.emulated_maps", "emulate")
    if args.figure:
        from sbi_gen.plots import check_figure_path

        args.figure = check_figure_path(args.figure)  # before the maps are made and written
    emulator = load_emulator(args.model, device=args.device)
    names = emulator.metadata.get("parameter_names") or [f"theta_{i}" for i in range(emulator.theta_dim)]
    prior = None
    if emulator.metadata.get("prior"):
        from sbi_gen.priors import prior_from_dict

        prior = prior_from_dict(emulator.metadata["prior"])
    theta = _parameters(args.theta, names, prior, "the emulator takes", "the prior the emulator was trained on")
    maps = emulator.sample(torch.as_tensor(theta, dtype=torch.float32), args.n, seed=args.seed).cpu().numpy()
    with _written_atomically(out) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("maps", data=maps.astype(np.float32), compression="gzip", compression_opts=1)
        f.create_dataset("theta", data=theta)
        f.attrs["format"] = "sbi_gen.emulated_maps"
        f.attrs["format_version"] = 1
        f.attrs["model"] = str(args.model)
        f.attrs["family"] = emulator.family
        f.attrs["seed"] = args.seed
        f.attrs["parameter_names"] = json.dumps(list(names))
        f.attrs["simulator"] = str(emulator.metadata.get("simulator"))
    print(f"{args.n:,} emulated maps of shape {tuple(maps.shape[1:])} at "
          f"{', '.join(f'{k} = {v:g}' for k, v in zip(names, theta))} written to {out}")
    if args.figure:
        _emulation_figure(emulator, theta, maps, names, args)


def _emulation_figure(emulator: Any, theta: Any, maps: Any, names: Sequence[str], args: argparse.Namespace) -> None:
    """Simulate maps at the same θ with the emulator's simulator and save the side-by-side figure."""
    import numpy as np

    from sbi_gen.emulator import compare_power_spectra, plot_emulated_maps
    from sbi_gen.plots import save_figure

    name = emulator.metadata.get("simulator")
    if not name:
        raise CLIError(f"{args.model} does not record its simulator, so --figure has nothing to compare with")
    config = emulator.metadata.get("simulator_config") or "{}"
    simulator = _simulator(name, config if isinstance(config, str) else json.dumps(config))
    simulated = simulator.simulate(np.tile(theta, (args.n, 1)), np.random.default_rng(args.seed))["x"]
    spectra = None
    if hasattr(simulator, "summary") and args.n >= 2:
        bins = 8
        spectra = compare_power_spectra(
            simulated, maps, lambda m: simulator.summary(m, n_bins=bins), ell=getattr(simulator, "bin_centers", lambda b: None)(bins)
        )
        print("power spectrum ratio emulated/simulated per bin: "
              + " ".join(f"{r:.3f}±{e:.3f}" for r, e in zip(spectra.ratio, spectra.ratio_error)))
    fig = plot_emulated_maps(simulated, maps, theta, parameter_names=names, spectra=spectra)
    print(f"figure written to {save_figure(fig, args.figure, dpi=120)}")


def posterior_summary(samples: Any, names: Sequence[str], theta_true: Any = None) -> str:
    """Posterior mean and central 68% interval per parameter, with the true value if known."""
    import numpy as np

    samples = np.asarray(samples)
    lo, median, hi = np.quantile(samples, [0.16, 0.5, 0.84], axis=0)
    mean = samples.mean(axis=0)
    header = f"{'parameter':<12}{'mean':>10}{'median':>10}{'68% interval':>24}" + (f"{'true':>10}{'inside':>8}" if theta_true is not None else "")
    lines = [header]
    for i, name in enumerate(names):
        line = f"{name:<12}{mean[i]:>10.4g}{median[i]:>10.4g}{f'[{lo[i]:.4g}, {hi[i]:.4g}]':>24}"
        if theta_true is not None:
            t = float(np.asarray(theta_true)[i])
            line += f"{t:>10.4g}{'yes' if lo[i] <= t <= hi[i] else 'no':>8}"
        lines.append(line)
    return "\n".join(lines)


def _integer_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, with a one-line message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value}")
        return value

    return parse


_positive_int = _integer_at_least(1, "positive")
_non_negative_int = _integer_at_least(0, "non-negative")


def _seed(text: str) -> int:
    """An argparse type: a seed the store and torch both take (0 to 2**63 - 1)."""
    value = _non_negative_int(text)
    if value > _MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed from 0 to {_MAX_SEED}, got {value}")
    return value


_MAX_SEED = 2**63 - 1  # sbi_gen.store.MAX_SEED, without importing the store to parse arguments


def _row_index(text: str) -> int | str:
    """An argparse type: a row number, or ``all``."""
    if text == "all":
        return text
    try:
        return _non_negative_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a row number or all, got {text!r}") from None


def _positive_number(what: str, allow_zero: bool = False) -> Callable[[str], float]:
    """An argparse type: a positive (or non-negative) number, with a one-line message otherwise."""
    kind = "non-negative" if allow_zero else "positive"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind} {what}, got {text!r}") from None
        if not (value >= 0 if allow_zero else value > 0):
            raise argparse.ArgumentTypeError(f"expected a {kind} {what}, got {text}")
        if value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a finite {kind} {what}, got {text}")
        return value

    return parse


_positive_seconds = _positive_number("number of seconds")
_positive_float = _positive_number("number")
_non_negative_float = _positive_number("number", allow_zero=True)


# Beside a model from `sbi-gen train` or `train-emulator`: the state its training resumes from (fit's state_path).
TRAINING_STATE = "training_state.pt"
# What sbi_gen.checkpoint writes into a model's directory.
MODEL_FILES = ("config.json", "weights.pt")
_TRAINING_OPTIONS = ("batch_size", "learning_rate", "max_epochs", "patience", "min_delta")


def _training_options(parser: argparse.ArgumentParser, defaults: str) -> None:
    """The options read by :func:`_train_config` (with ``--quiet``, added by each command)."""
    default = f"default: {defaults}"
    parser.add_argument("--batch-size", type=_positive_int, default=None, help=default)
    parser.add_argument("--learning-rate", type=_positive_float, default=None, help=default)
    parser.add_argument("--max-epochs", type=_positive_int, default=None, help=default)
    parser.add_argument("--patience", type=_positive_int, default=None, help=f"epochs without improvement before stopping ({default})")
    parser.add_argument("--min-delta", type=_non_negative_float, default=None,
                        help="fall of the validation loss that counts as improvement: faster, less accurate "
                        "(default: the estimator's, 0.015 for nsf and auto, 0.005 for ensemble, 0 (any fall) for the others)")
    parser.add_argument("--seed", type=_seed, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sbi-gen", description="Simulation-based inference with deep generative models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("simulators", help="list the registered simulators")
    p.set_defaults(func=_cmd_simulators)

    p = sub.add_parser("simulate", help="simulate a training set into an HDF5 file (resumable)")
    p.add_argument("simulator", help="registered simulator name (see `sbi-gen simulators`)")
    p.add_argument("--n", type=_positive_int, required=True, help="number of simulations")
    p.add_argument("--out", required=True, help="output HDF5 file")
    p.add_argument("--seed", type=_seed, default=None, help="root seed (default: random, recorded in the file)")
    p.add_argument("--workers", type=_positive_int, default=1, help="local worker processes (default 1)")
    p.add_argument("--chunk-size", type=_positive_int, default=1000, help="simulations per chunk (default 1000)")
    p.add_argument("--config", default=None, help="simulator configuration as a JSON object")
    p.add_argument("--theta", default=None,
                   help="simulate at these parameters, comma-separated, instead of drawing them from the prior: "
                   "observations with known truth, e.g. k i.i.d. ones for NLE (use --theta=-1,... when the first is negative)")
    p.add_argument("--compression", choices=["gzip", "none"], default="gzip", help="gzip (default, done by the workers) or none (each chunk written once, in place: "
                   "the fastest for cheap simulators, larger files)")
    p.add_argument("--overwrite", action="store_true", help="replace a different existing file or unfinished run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    cluster = p.add_mutually_exclusive_group()
    cluster.add_argument("--scheduler", metavar="ADDRESS", default=None,
                         help="simulate on the Dask cluster whose scheduler is at ADDRESS, e.g. tcp://host:8786 (needs sbi_gen[dask])")
    cluster.add_argument("--dask-local", metavar="N", type=_positive_int, default=None,
                         help="simulate on a Dask cluster of N single-threaded worker processes started on this machine")
    p.add_argument("--connect-timeout", metavar="SECONDS", type=_positive_seconds, default=10.0,
                   help="how long to wait for the --scheduler to answer (default 10)")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("train", help="train NPE or NLE on an HDF5 training set and save the model")
    p.add_argument("data", help="HDF5 training set from `sbi-gen simulate`")
    p.add_argument("--method", choices=["npe", "nle"], default="npe")
    p.add_argument("--estimator", default=None, help="estimator name: auto (the default: for npe nsf, maf and gaussian raced for 3 epochs, "
                   "the one with the lower validation loss trained in full, maps train nsf, not raced; for nle maf and gaussian "
                   "raced), nsf, maf, gaussian, cnf, vae, diffusion, ensemble")
    p.add_argument("--estimator-kwargs", default=None, help="estimator hyperparameters as a JSON object")
    p.add_argument("--embedding", default=None, help="embedding of x for NPE: identity (default for vectors), mlp, resmlp, cnn (default for maps)")
    p.add_argument("--out", required=True, help="output model directory (it also holds the training state, "
                   f"{TRAINING_STATE}, from which the same command resumes)")
    p.add_argument("--bijection", action="store_true",
                   help="NPE: model θ in the prior's unconstrained space, so no draw is rejected (default: θ as it is, "
                   "draws outside the prior rejected; see NPE's bijection argument)")
    _training_options(p, "the estimator's recommendation, see `NPE.train_config`")
    p.add_argument("--streaming", choices=["auto", "on", "off"], default="auto",
                   help="stream the file from disk instead of loading it (auto: when it would fill a quarter of the free memory)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true",
                   help="train from the start, discarding the training state OUT holds (by default a run resumes it)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sample", help="sample the posterior of an observation with a trained model")
    p.add_argument("model", help="model directory from `sbi-gen train`")
    p.add_argument("--obs", required=True, help="observation: a .npy file or an HDF5 file in the training-set format; "
                   "for NLE, a .npy of shape (k, *x_shape) holds k i.i.d. observations of one θ (or see --index all)")
    p.add_argument("--index", type=_row_index, default=None,
                   help="row of the HDF5 observation file (default 0), or all: for NLE, every valid row as i.i.d. "
                   "observations of one θ (e.g. a file from `sbi-gen simulate --theta`)")
    p.add_argument("--n", type=_positive_int, default=10_000, help="number of posterior samples")
    p.add_argument("--out", required=True, help="output HDF5 file of samples")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("diagnose", help="calibration report of a trained model on held-out simulations (JSON + PNG)")
    p.add_argument("model", help="model directory from `sbi-gen train`")
    p.add_argument("data", help="HDF5 file of held-out simulations (simulated with another seed than the training set)")
    p.add_argument("--out", required=True, help="report directory (report.json and PNG figures)")
    p.add_argument("--n-sims", type=_positive_int, default=None, help="held-out simulations used (default 1000 for NPE, 100 for NLE)")
    p.add_argument("--n-samples", type=_positive_int, default=None, help="posterior draws per simulation (default 1000 for NPE, 500 for NLE)")
    p.add_argument("--ppc-draws", type=_non_negative_int, default=500, help="posterior draws simulated in the predictive check (0: skip)")
    p.add_argument("--c2st", type=_non_negative_int, default=0, help="observations compared by C2ST with the simulator's reference posterior")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_diagnose)

    p = sub.add_parser("plot", help="corner plot of posterior samples from `sbi-gen sample` (several files overlay)")
    p.add_argument("samples", nargs="+", help="samples files (HDF5) from `sbi-gen sample`")
    p.add_argument("--out", required=True, help="output image (.png, .pdf, .svg)")
    p.add_argument("--truth", default=None, help="true parameters, comma-separated (default: theta_true of the file, if any)")
    p.add_argument("--label", action="append", default=None, help="legend label of each samples file, in order (repeatable)")
    p.add_argument("--title", default=None)
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("train-emulator", help="train a learned emulator of a map simulator on an HDF5 training set")
    p.add_argument("data", help="HDF5 training set of maps from `sbi-gen simulate`")
    p.add_argument("--family", choices=["diffusion", "vae"], default="diffusion", help="generative model (default diffusion)")
    p.add_argument("--hyperparameters", default=None, help="hyperparameters of the family as a JSON object")
    p.add_argument("--out", required=True, help="output emulator directory (it also holds the training state, "
                   f"{TRAINING_STATE}, from which the same command resumes)")
    p.add_argument("--overwrite", action="store_true",
                   help="train from the start, discarding the training state OUT holds (by default a run resumes it)")
    p.add_argument("--pixel-transform", choices=["none", "shifted_log"], default="none",
                   help="shifted_log: learn ln(x + shift) of every pixel (exact for shifted-lognormal maps)")
    p.add_argument("--pixel-shift", type=float, default=None,
                   help="shift of --pixel-transform shifted_log (default: the simulator's lambda_s, if recorded)")
    _training_options(p, "batch size 64, at most 200 epochs, TrainConfig's learning rate and patience")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train_emulator)

    p = sub.add_parser("emulate", help="generate maps at given parameters with a trained emulator")
    p.add_argument("model", help="emulator directory from `sbi-gen train-emulator`")
    p.add_argument("--theta", required=True, help="parameters, comma-separated (use --theta=-1,... when the first is negative)")
    p.add_argument("--n", type=_positive_int, default=16, help="number of maps (default 16)")
    p.add_argument("--out", required=True, help="output HDF5 file (datasets maps and theta)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--figure", default=None, help="also simulate maps at theta and save a side-by-side figure with power spectra (PNG)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_emulate)

    p = sub.add_parser("info", help="show a training set's metadata, counts and shapes")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_info)
    return parser


def _show_warning(message: Warning | str, *_: Any, **__: Any) -> None:
    print(f"sbi-gen: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sbi-gen``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        with warnings.catch_warnings():
            # A warning is a line for the user, not a source location.
            warnings.showwarning = _show_warning
            status = func(args)
    except KeyboardInterrupt:
        kept = {
            "simulate": "finished chunks are kept, rerun the same command to resume",
            "train": "no model was saved (none is kept before the first epoch ends)",
            "train-emulator": "no emulator was saved (none is kept before the first epoch ends)",
        }.get(args.command)
        print(f"sbi-gen: interrupted{f'; {kept}' if kept else ''}", file=sys.stderr)
        return 130
    except (CLIError, ValueError, KeyError, OSError, RuntimeError, FloatingPointError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"sbi-gen: error: {message}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
