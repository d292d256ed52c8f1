"""Simulation throughput on a Dask cluster against the local executor.

Simulates cosmology maps into HDF5 with the local executor (1 process), then on a Dask
``LocalCluster`` of 1 and of 2 single-threaded worker processes, and prints simulations/s,
Dask 1 worker / local 1 worker (the cost of the Dask route: results travel to the client, which
writes them) and Dask 2 workers / Dask 1 worker (the scaling). Cluster startup is timed apart and
left out of the throughput: a real run pays it once. The files are checked to be identical.

    python benchmarks/bench_dask.py [--n 4000] [--chunk-size 250] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import h5py
import numpy as np

import simulators
from sbi_gen.store import simulate_to_hdf5


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def _same_datasets(a: str, b: str) -> bool:
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names: list[str] = []
        fa.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        return all(np.array_equal(fa[name][()], fb[name][()], equal_nan=True) for name in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="cosmology maps per run (default 4000)")
    parser.add_argument("--chunk-size", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import distributed

    sim = simulators.get("cosmology")
    workdir = tempfile.mkdtemp(prefix="sbi_gen_bench_dask_")
    paths: dict[str, str] = {}

    def run(label: str, **executor: object) -> float:
        path = paths.setdefault(label, os.path.join(workdir, f"{label}.h5"))

        def once() -> None:
            if os.path.exists(path):
                os.remove(path)
            simulate_to_hdf5(sim, args.n, path, seed=0, chunk_size=args.chunk_size, progress=False, **executor)

        return _best(once, args.repeats)

    try:
        simulate_to_hdf5(sim, min(args.n, 500), os.path.join(workdir, "warm.h5"), seed=0, progress=False)
        seconds = {"local, 1 worker": run("local", workers=1)}
        for n_workers in (1, 2):
            started = time.perf_counter()
            with distributed.LocalCluster(
                n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster, distributed.Client(cluster, set_as_default=False) as client:
                client.wait_for_workers(n_workers)
                startup = time.perf_counter() - started
                # A first small run imports the simulator on every worker, as a long run would once.
                simulate_to_hdf5(sim, min(args.n, 500), os.path.join(workdir, "warm.h5"), seed=1,
                                 chunk_size=50, progress=False, overwrite=True, executor="dask", scheduler=client)
                seconds[f"dask, {n_workers} worker{'s' * (n_workers > 1)}"] = run(
                    f"dask{n_workers}", executor="dask", scheduler=client
                )
            print(f"(Dask LocalCluster of {n_workers}: started in {startup:.1f} s)", flush=True)
        print(f"cosmology maps: n = {args.n:,}, chunk size {args.chunk_size}, best of {args.repeats}")
        print(f"{'executor':<18}{'seconds':>9}{'sims/s':>10}")
        for label, value in seconds.items():
            print(f"{label:<18}{value:>9.2f}{args.n / value:>10,.0f}")
        local, dask1, dask2 = seconds.values()
        print(f"dask 1 worker / local 1 worker   {local / dask1:.2f}× the throughput")
        print(f"dask 2 workers / dask 1 worker   {dask1 / dask2:.2f}× the throughput")
        print(f"dask 2 workers / local 1 worker  {local / dask2:.2f}× the throughput")
        same = all(_same_datasets(paths["local"], paths[label]) for label in ("dask1", "dask2"))
        print(f"files identical to the local one: {'yes' if same else 'NO'}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
