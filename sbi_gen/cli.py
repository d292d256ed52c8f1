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
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


class CLIError(Exception):
    """An error to report to the user as one line."""


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


def _simulator(name: str, config: str | None) -> Any:
    import simulators

    kwargs = _json_object(config, "--config", '{"n_pix": 64}')
    try:
        return simulators.get(name, **kwargs)
    except KeyError:
        raise CLIError(f"unknown simulator {name!r}; registered: {', '.join(simulators.names())}") from None
    except TypeError as error:
        raise CLIError(f"bad --config for simulator {name!r}: {error}") from None


def _parameters(text: str, names: Sequence[str], prior: Any, takes: str, prior_is: str) -> Any:
    """The parameter vector given as ``--theta a,b,...``: one value per name, finite and inside
    ``prior`` (when there is one), or a one-line error."""
    import numpy as np
    import torch

    try:
        theta = np.array([float(v) for v in text.split(",")])
    except ValueError:
        raise CLIError(f"--theta must be comma-separated numbers, got {text!r}") from None
    if len(theta) != len(names):
        raise CLIError(f"--theta has {len(theta)} values but {takes} {len(names)} ({', '.join(names)})")
    if not np.isfinite(theta).all():
        raise CLIError("--theta contains NaN or infinite values")
    if prior is not None and not torch.isfinite(prior.log_prob(torch.as_tensor(theta, dtype=torch.float32))):
        raise CLIError(f"--theta {text} lies outside {prior_is}: {prior.to_json()}")
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
    from sbi_gen.inference import AUTO, AUTO_FAMILIES, NLE, NPE, check_drawn_from_prior
    from sbi_gen.priors import prior_from_dict
    from sbi_gen.store import read_info
    from sbi_gen.train import TrainingStateError

    method = {"npe": NPE, "nle": NLE}[args.method]
    if args.estimator is None:
        args.estimator = method.default_estimator
    if args.estimator not in ESTIMATORS and args.estimator != AUTO:
        raise CLIError(f"unknown estimator {args.estimator!r}; known: {', '.join(sorted(ESTIMATORS))}, or {AUTO}")
    info = read_info(args.data)
    check_drawn_from_prior(prior_from_dict(info["prior_decoded"]), args.data)
    estimator_kwargs = _json_object(args.estimator_kwargs, "--estimator-kwargs", '{"transforms": 3}')
    if estimator_kwargs and args.estimator == AUTO:
        raise CLIError(f"--estimator-kwargs set the hyperparameters of one family: name it with --estimator (e.g. nsf) "
                       f"instead of auto, which races {' and '.join(AUTO_FAMILIES)}")
    if args.bijection and args.method != "npe":
        raise CLIError("--bijection applies to NPE only: NLE models x given θ, and its MCMC runs in the prior's unconstrained space")
    options = {"bijection": True} if args.bijection else {}
    model = method(None, args.estimator, embedding=args.embedding, estimator_kwargs=estimator_kwargs, device=args.device, **options)
    streaming = {"auto": None, "on": True, "off": False}[args.streaming]
    family = AUTO_FAMILIES[0] if args.estimator == AUTO else args.estimator
    config = _train_config(args, ESTIMATORS[family].training_defaults, streaming=streaming)
    # Under torchrun every process trains its shard of the same model; rank 0 alone reports and saves.
    distributed.init_from_env(args.device)
    main = distributed.is_main_process()
    world = distributed.process_info().world_size
    if main:
        print(f"training {args.method.upper()} ({args.estimator}) on {info['n_valid']:,} valid simulations of "
              f"{info['simulator']}" + (f" with {world} processes" if world > 1 else ""), flush=True)
    state_path = _training_state(args) if world == 1 else None
    # --seed decides everything: the initial weights as well as the split and the batches.
    torch.manual_seed(args.seed)
    try:
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


def _training_state(args: argparse.Namespace) -> Path:
    """``OUT/training_state.pt``, where one training process saves its state after every epoch
    and from which the same command resumes after a crash (or trains on with a larger
    --max-epochs). Creates OUT; --overwrite discards a state already there."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"cannot save to {out}: it is a file, a model is a directory")
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / TRAINING_STATE
    if args.overwrite:
        state_path.unlink(missing_ok=True)
    elif state_path.exists():
        print(f"resuming the training saved in {state_path}", flush=True)
    return state_path


def _interrupted_training(history: Any, what: str, resumable: bool = False) -> int:
    """0, or 130 (as for Ctrl-C) after saying that an interrupted training's best weights were saved."""
    if not history.interrupted:
        return 0
    print(f"sbi-gen: interrupted; the {what} saved holds the best weights of the {len(history.val_loss)} epochs "
          f"trained (epoch {history.best_epoch + 1})" + ("; rerun the same command to resume" if resumable else ""),
          file=sys.stderr)
    return 130


def _read_observation(path: str, index: int | str) -> Any:
    import numpy as np

    from sbi_gen.store import load

    if path.endswith(".npy"):
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise CLIError(f"cannot read the observation {path}: {error}") from None
    if index == "all":
        data = load(path, valid_only=True)
        if len(data) == 0:
            raise CLIError(f"{path} holds no valid observation")
        # One θ behind every row (a file from `simulate --theta`) is the truth of the combined posterior.
        same_theta = bool((data.theta == data.theta[0]).all())
        x_obs = data.x[0] if len(data) == 1 else data.x
        return x_obs, data.theta[0] if same_theta else None
    data = load(path, valid_only=False)
    if not 0 <= index < len(data):
        raise CLIError(f"--index {index} is out of range: {path} holds {len(data)} observations")
    return data.x[index], data.theta[index]


def _cmd_sample(args: argparse.Namespace) -> None:
    import h5py
    import numpy as np

    from sbi_gen.checkpoint import load_model

    model = load_model(args.model, device=args.device)
    obs = _read_observation(args.obs, args.index)
    x_obs, theta_true = obs if isinstance(obs, tuple) else (obs, None)
    posterior = model.posterior(x_obs)
    samples = posterior.sample((args.n,)).cpu().numpy()
    names = model.prior.names
    with h5py.File(args.out, "w") as f:
        f.create_dataset("samples", data=samples, compression="gzip", compression_opts=1)
        f.create_dataset("x_obs", data=np.asarray(x_obs))
        if theta_true is not None:
            f.create_dataset("theta_true", data=np.asarray(theta_true))
        f.attrs["format"] = "sbi_gen.samples"
        f.attrs["parameter_names"] = json.dumps(names)
        f.attrs["parameter_labels"] = json.dumps(model.prior.labels)
        f.attrs["model"] = str(args.model)
        f.attrs["method"] = model.method
        mcmc = getattr(posterior, "mcmc", None)
        if mcmc is not None:
            f.attrs["rhat"] = mcmc.rhat.cpu().numpy()
            f.attrs["ess"] = mcmc.ess.cpu().numpy()
    print(posterior_summary(samples, names, theta_true))
    if mcmc is not None:
        print(f"MCMC: max R-hat {float(mcmc.rhat.max()):.3f}, min ESS {float(mcmc.ess.min()):.0f}")
    print(f"{args.n:,} samples written to {args.out}")


def _cmd_diagnose(args: argparse.Namespace) -> None:
    from sbi_gen.checkpoint import load_model
    from sbi_gen.inference import check_drawn_from_prior
    from sbi_gen.priors import prior_from_dict
    from sbi_gen.report import diagnose
    from sbi_gen.store import load, read_info

    model = load_model(args.model, device=args.device)
    check_drawn_from_prior(prior_from_dict(read_info(args.data)["prior_decoded"]), args.data)
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

    sets, labels, truth = {}, None, None
    for i, path in enumerate(args.samples):
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
        try:
            truth = np.array([float(v) for v in args.truth.split(",")])
        except ValueError:
            raise CLIError(f"--truth must be comma-separated numbers, got {args.truth!r}") from None
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
    print(f"training a {args.family} emulator on {info['n_valid']:,} valid maps of {info['simulator']}", flush=True)
    state_path = _training_state(args)
    torch.manual_seed(args.seed)  # --seed decides the initial weights too
    try:
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

    emulator = load_emulator(args.model, device=args.device)
    names = emulator.metadata.get("parameter_names") or [f"theta_{i}" for i in range(emulator.theta_dim)]
    prior = None
    if emulator.metadata.get("prior"):
        from sbi_gen.priors import prior_from_dict

        prior = prior_from_dict(emulator.metadata["prior"])
    theta = _parameters(args.theta, names, prior, "the emulator takes", "the prior the emulator was trained on")
    maps = emulator.sample(torch.as_tensor(theta, dtype=torch.float32), args.n, seed=args.seed).cpu().numpy()
    with h5py.File(args.out, "w") as f:
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
          f"{', '.join(f'{k} = {v:g}' for k, v in zip(names, theta))} written to {args.out}")
    if args.figure:
        _emulation_figure(emulator, theta, maps, names, args)


def _emulation_figure(emulator: Any, theta: Any, maps: Any, names: Sequence[str], args: argparse.Namespace) -> None:
    """Simulate maps at the same θ with the emulator's simulator and save the side-by-side figure."""
    import numpy as np

    from sbi_gen.emulator import compare_power_spectra, plot_emulated_maps

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
    fig.savefig(args.figure, dpi=120)
    print(f"figure written to {args.figure}")


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
        return value

    return parse


_positive_seconds = _positive_number("number of seconds")
_positive_float = _positive_number("number")
_non_negative_float = _positive_number("number", allow_zero=True)


# Beside a model from `sbi-gen train` or `train-emulator`: the state its training resumes from (fit's state_path).
TRAINING_STATE = "training_state.pt"
_TRAINING_OPTIONS = ("batch_size", "learning_rate", "max_epochs", "patience", "min_delta")


def _training_options(parser: argparse.ArgumentParser, defaults: str) -> None:
    """The options read by :func:`_train_config` (with ``--quiet``, added by each command)."""
    default = f"default: {defaults}"
    parser.add_argument("--batch-size", type=_positive_int, default=None, help=default)
    parser.add_argument("--learning-rate", type=_positive_float, default=None, help=default)
    parser.add_argument("--max-epochs", type=_positive_int, default=None, help=default)
    parser.add_argument("--patience", type=_positive_int, default=None, help=f"epochs without improvement before stopping ({default})")
    parser.add_argument("--min-delta", type=_non_negative_float, default=None,
                        help="fall of the validation loss that counts as improvement: faster, slightly less accurate "
                        "(default: 0, any fall)")
    parser.add_argument("--seed", type=_non_negative_int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sbi-gen", description="Simulation-based inference with deep generative models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("simulators", help="list the registered simulators")
    p.set_defaults(func=_cmd_simulators)

    p = sub.add_parser("simulate", help="simulate a training set into an HDF5 file (resumable)")
    p.add_argument("simulator", help="registered simulator name (see `sbi-gen simulators`)")
    p.add_argument("--n", type=_positive_int, required=True, help="number of simulations")
    p.add_argument("--out", required=True, help="output HDF5 file")
    p.add_argument("--seed", type=_non_negative_int, default=None, help="root seed (default: random, recorded in the file)")
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
    p.add_argument("--estimator", default=None, help="estimator name: auto (default for npe: nsf and maf raced for 3 epochs, the one with the lower "
                   "validation loss trained in full; maps train nsf, not raced), nsf, maf (default for nle), cnf, vae, diffusion")
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
    p.add_argument("--index", type=_row_index, default=0,
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
    p.add_argument("--seed", type=_non_negative_int, default=0)
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
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--figure", default=None, help="also simulate maps at theta and save a side-by-side figure with power spectra (PNG)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_emulate)

    p = sub.add_parser("info", help="show a training set's metadata, counts and shapes")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sbi-gen``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        status = func(args)
    except KeyboardInterrupt:
        kept = {
            "simulate": "finished chunks are kept, rerun the same command to resume",
            "train": "no model was saved (none is kept before the first epoch ends)",
            "train-emulator": "no emulator was saved (none is kept before the first epoch ends)",
        }.get(args.command)
        print(f"sbi-gen: interrupted{f'; {kept}' if kept else ''}", file=sys.stderr)
        return 130
    except (CLIError, ValueError, KeyError, OSError, RuntimeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"sbi-gen: error: {message}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
