"""Simulation throughput and the cost of the HDF5 store.

For each simulator: simulations per second in memory (`sbi_gen.simulate`, one process) and
into a crash-safe HDF5 file (`simulate_to_hdf5`) with 1 and 2 worker processes, compressed
(gzip, the default: chunk files assembled at the end) and uncompressed (rows written in place),
and the ratios store / in-memory (the overhead of writing; target ≤ 1.10 for particle at
n = 100,000 and cosmology at n = 10,000) and 2 workers / 1 worker (target ≥ 1.6× for the
cosmology maps). Figures on a machine running nothing else: other load makes the worker
processes and the writing thread compete for cores. The row ``bare`` simulates the same
chunks in 1 and 2 forked processes and keeps nothing: its speed-up is the most that two
processes give on this machine with no store at all (they share caches and memory bandwidth).

    python benchmarks/bench_simulate.py [--repeats 3] [--simulators particle cosmology] [--compression gzip none]
    python benchmarks/bench_simulate.py --simulators cosmology --n cosmology=50000
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

import simulators
from sbi_gen.parallel import run_tasks
from sbi_gen.simulate import run_chunk, simulate
from sbi_gen.store import simulate_to_hdf5

SIZES = {"particle": 100_000, "cosmology": 10_000, "gaussian_linear": 100_000, "two_moons": 100_000, "slcp": 100_000}


def _best(fn, repeats: int, setup=None) -> float:
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()  # untimed: e.g. deleting the previous file, which costs the kernel real time
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def _simulate_only(sim, n: int, chunk_size: int, workers: int) -> None:
    """The store's chunks and streams, simulated in ``workers`` forked processes, nothing kept:
    the most two processes can give on this machine, whatever the store does."""
    seeds = np.random.SeedSequence(0).spawn(-(-n // chunk_size))
    sizes = [min(chunk_size, n - i * chunk_size) for i in range(len(seeds))]

    def chunk(i: int) -> int:
        run_chunk(sim, sim.prior, sizes[i], seeds[i])
        return i  # nothing to pickle back

    for _ in run_tasks(chunk, [(i,) for i in range(len(seeds))], workers=workers):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulators", nargs="+", default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=1000)
    parser.add_argument("--compression", nargs="+", default=["gzip", "none"], choices=["gzip", "none"])
    parser.add_argument("--n", nargs="+", default=[], metavar="NAME=N",
                        help="other sizes, e.g. cosmology=50000 (process start-up weighs less in longer runs)")
    args = parser.parse_args()
    sizes = {**SIZES, **{name: int(value) for name, value in (item.split("=") for item in args.n)}}
    workdir = tempfile.mkdtemp(prefix="sbi_gen_bench_")
    print(f"{'simulator':<16}{'n':>9}{'store':>6}{'memory sim/s':>14}{'file w=1':>12}{'file w=2':>12}{'w=1/mem':>9}"
          f"{'w=2/mem':>9}{'w2 speedup':>11}")
    try:
        for name in args.simulators:
            sim = simulators.get(name)
            n = sizes.get(name, 10_000)
            simulate(sim, n=min(n, 2000), seed=0)  # warm up tables and imports
            memory = _best(lambda sim=sim, n=n: simulate(sim, n=n, seed=0, chunk_size=args.chunk_size), args.repeats)
            bare = {w: _best(lambda sim=sim, n=n, w=w: _simulate_only(sim, n, args.chunk_size, w), args.repeats) for w in (1, 2)}
            print(f"{name:<16}{n:>9,}{'bare':>6}{n / memory:>14,.0f}{n / bare[1]:>12,.0f}{n / bare[2]:>12,.0f}"
                  f"{bare[1] / memory:>9.2f}{bare[2] / memory:>9.2f}{bare[1] / bare[2]:>10.2f}×", flush=True)
            for label in args.compression:
                compression = None if label == "none" else label
                files = {}
                for workers in (1, 2):
                    path = os.path.join(workdir, f"{name}.h5")

                    def run(sim=sim, n=n, path=path, workers=workers, compression=compression):
                        simulate_to_hdf5(sim, n, path, seed=0, chunk_size=args.chunk_size, workers=workers,
                                         compression=compression, progress=False)

                    def remove(path=path):
                        if os.path.exists(path):
                            os.remove(path)

                    files[workers] = _best(run, args.repeats, setup=remove)
                print(f"{name:<16}{n:>9,}{label:>6}{n / memory:>14,.0f}{n / files[1]:>12,.0f}{n / files[2]:>12,.0f}"
                      f"{files[1] / memory:>9.2f}{files[2] / memory:>9.2f}{files[1] / files[2]:>10.2f}×", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
