"""The C2ST a perfect posterior scores: two independent sets of exact reference draws.

C2ST is 0.5 only in the limit of infinitely many draws; with ``n`` draws a side the classifier
still finds chance differences. This script measures that floor for the benchmark tasks, with
the observations and draw counts of ``compare_sbi.py`` (observation seeds ``seed + 1`` for
``--seeds`` seeds, ``--n-obs`` observations each, ``--n-samples`` draws a side), so that a
method's C2ST can be read against what no method can beat.

    python benchmarks/c2st_floor.py [--tasks gaussian_linear two_moons] [--seeds 4] [--n-obs 3]

Measured (one thread, 2,000 draws a side, 12 observations): gaussian_linear 0.5018 ± 0.0017
(0.495–0.514), two_moons 0.5038 ± 0.0035 (0.477–0.518).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import simulators
from sbi_gen.c2st import c2st


def floor(task_name: str, seeds: int, n_obs: int, n_samples: int) -> np.ndarray:
    """C2ST of two independent reference sets, for every observation of ``seeds`` seeds."""
    task = simulators.get(task_name)
    scores = []
    for seed in range(seeds):
        _, observations = task.observations(n_obs, seed=seed + 1)
        for i, x_o in enumerate(observations):
            first = task.reference_posterior(x_o, n_samples, seed=100 + i)
            second = task.reference_posterior(x_o, n_samples, seed=200 + i)
            scores.append(c2st(first, second, n_max=n_samples))
    return np.array(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["gaussian_linear", "two_moons"])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--n-obs", type=int, default=3)
    parser.add_argument("--n-samples", type=int, default=2_000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for task_name in args.tasks:
        scores = floor(task_name, args.seeds, args.n_obs, args.n_samples)
        error = scores.std(ddof=1) / np.sqrt(len(scores))
        print(f"{task_name:<16} C2ST floor {scores.mean():.4f} ± {error:.4f} "
              f"(min {scores.min():.3f}, max {scores.max():.3f}, {len(scores)} observations)", flush=True)


if __name__ == "__main__":
    main()
