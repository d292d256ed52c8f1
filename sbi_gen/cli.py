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
        print(f"  {name:<22}{shape}")
    print(f"written by      sbi_gen {info['package_version']}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


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
    p.add_argument("--compression", choices=["lzf", "gzip", "none"], default="lzf")
    p.add_argument("--overwrite", action="store_true", help="replace a different existing file or unfinished run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_simulate)

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
