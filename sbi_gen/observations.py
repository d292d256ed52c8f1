"""Make the observations shipped in ``data/observations/``: a few simulations per simulator.

Each file is a training-set file (same HDF5 format) whose rows are observations ``x`` with
their true parameters ``theta``. Regenerate them with::

    python -m sbi_gen.observations            # writes data/observations/<simulator>.h5

The seed is fixed, so the files are reproducible bit for bit (dataset by dataset).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import simulators
from sbi_gen.store import simulate_to_hdf5

__all__ = ["N_OBSERVATIONS", "SEED", "make_observations"]

N_OBSERVATIONS = 5
SEED = 20261125


def make_observations(out_dir: str | Path = "data/observations", n: int = N_OBSERVATIONS, seed: int = SEED) -> list[Path]:
    """Simulate ``n`` observations for every registered simulator into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in simulators.names():
        path = out_dir / f"{name}.h5"
        simulate_to_hdf5(simulators.get(name), n, path, seed=seed, chunk_size=n, overwrite=True, compression="gzip", progress=False)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/observations")
    args = parser.parse_args()
    for path in make_observations(args.out):
        print(path)


if __name__ == "__main__":
    main()
