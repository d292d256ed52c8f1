"""The ``sbi-gen`` command line.

Every command prints errors as one line (``sbi-gen: error: ...``) and exits non-zero.

Example:
    $ sbi-gen simulators
    $ sbi-gen simulate particle --n 100000 --out data/particle.h5 --seed 1 --workers 2
    $ sbi-gen info data/particle.h5
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["main"]


class CLIError(Exception):
    """An error to report to the user as one line."""


def _simulator(name: str, config: str | None) -> Any:
    import simulators

    try:
        kwargs = json.loads(config) if config else {}
    except json.JSONDecodeError as error:
        raise CLIError(f"--config is not valid JSON: {error.msg}") from None
    if not isinstance(kwargs, dict):
        raise CLIError("--config must be a JSON object, e.g. '{\"n_pix\": 64}'")
    try:
        return simulators.get(name, **kwargs)
    except KeyError:
        raise CLIError(f"unknown simulator {name!r}; registered: {', '.join(simulators.names())}") from None
    except TypeError as error:
        raise CLIError(f"bad --config for simulator {name!r}: {error}") from None


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
    summary = simulate_to_hdf5(
        simulator,
        n=args.n,
        path=args.out,
        seed=args.seed,
        chunk_size=args.chunk_size,
        workers=args.workers,
        overwrite=args.overwrite,
        compression=None if args.compression == "none" else args.compression,
        progress=not args.quiet,
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


def _cmd_train(args: argparse.Namespace) -> None:
    from sbi_gen.checkpoint import save
    from sbi_gen.estimators import ESTIMATORS
    from sbi_gen.inference import NLE, NPE
    from sbi_gen.store import read_info
    from sbi_gen.train import TrainConfig

    if args.estimator not in ESTIMATORS:
        raise CLIError(f"unknown estimator {args.estimator!r}; known: {', '.join(sorted(ESTIMATORS))}")
    info = read_info(args.data)
    try:
        estimator_kwargs = json.loads(args.estimator_kwargs) if args.estimator_kwargs else {}
    except json.JSONDecodeError as error:
        raise CLIError(f"--estimator-kwargs is not valid JSON: {error.msg}") from None
    method = {"npe": NPE, "nle": NLE}[args.method]
    model = method(None, args.estimator, embedding=args.embedding, estimator_kwargs=estimator_kwargs, device=args.device)
    config = TrainConfig(
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_epochs=args.max_epochs,
        patience=args.patience,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
    )
    print(f"training {args.method.upper()} ({args.estimator}) on {info['n_valid']:,} valid simulations of {info['simulator']}")
    history = model.fit(args.data, config=config)
    save(model, args.out)
    print(f"best validation loss {history.best_val_loss:.4f} at epoch {history.best_epoch + 1} "
          f"of {len(history.val_loss)} ({history.seconds:.1f} s)")
    print(f"model saved to {args.out}")


def _read_observation(path: str, index: int) -> Any:
    import numpy as np

    from sbi_gen.store import load

    if path.endswith(".npy"):
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise CLIError(f"cannot read the observation {path}: {error}") from None
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
    p.add_argument("--compression", choices=["gzip", "none"], default="gzip", help="gzip (default, done by the workers) or none")
    p.add_argument("--overwrite", action="store_true", help="replace a different existing file or unfinished run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("train", help="train NPE or NLE on an HDF5 training set and save the model")
    p.add_argument("data", help="HDF5 training set from `sbi-gen simulate`")
    p.add_argument("--method", choices=["npe", "nle"], default="npe")
    p.add_argument("--estimator", default="nsf", help="estimator name (nsf, maf, cnf, ...)")
    p.add_argument("--estimator-kwargs", default=None, help="estimator hyperparameters as a JSON object")
    p.add_argument("--embedding", default=None, help="embedding of x for NPE: identity (default for vectors), mlp, resmlp, cnn (default for maps)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--max-epochs", type=_positive_int, default=1000)
    p.add_argument("--patience", type=_positive_int, default=20)
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sample", help="sample the posterior of an observation with a trained model")
    p.add_argument("model", help="model directory from `sbi-gen train`")
    p.add_argument("--obs", required=True, help="observation: a .npy file or an HDF5 file in the training-set format")
    p.add_argument("--index", type=_non_negative_int, default=0, help="row of the HDF5 observation file (default 0)")
    p.add_argument("--n", type=_positive_int, default=10_000, help="number of posterior samples")
    p.add_argument("--out", required=True, help="output HDF5 file of samples")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("info", help="show a training set's metadata, counts and shapes")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sbi-gen``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except KeyboardInterrupt:
        print("sbi-gen: interrupted; finished chunks are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    except (CLIError, ValueError, KeyError, OSError, RuntimeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"sbi-gen: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
