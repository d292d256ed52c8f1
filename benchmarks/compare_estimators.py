"""The three generative families side by side: C2ST, train and sample times of NPE and NLE
with `nsf`, `vae` and `diffusion` on the benchmark tasks (10,000 simulations by default).

Same protocol as `compare_sbi.py` (one training set per task, reference posteriors of the
tasks, C2ST as sbibm defines it). Targets from the estimator issue: diffusion NPE within 0.03
C2ST of the best flow on every task, VAE NPE <= 0.65 on two_moons and gaussian_linear.

Usage:
    python benchmarks/compare_estimators.py                                   # all tasks, NPE and NLE
    python benchmarks/compare_estimators.py --tasks two_moons --kinds npe --n-obs 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from compare_sbi import run_ours, task_setup  # same folder: `python benchmarks/compare_estimators.py`

from sbi_gen.c2st import c2st

ESTIMATORS = ["nsf", "maf", "vae", "diffusion"]  # maf: the default NLE estimator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["two_moons", "slcp", "gaussian_linear"])
    parser.add_argument("--estimators", nargs="+", default=ESTIMATORS, choices=ESTIMATORS)
    parser.add_argument("--kinds", nargs="+", default=["npe", "nle"], choices=["npe", "nle"])
    parser.add_argument("--n-simulations", type=int, default=10_000)
    parser.add_argument("--n-obs", type=int, default=3)
    parser.add_argument("--n-samples", type=int, default=2_000, help="posterior and reference samples per observation")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/compare_estimators.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = []
    for task_name in args.tasks:
        task, theta, x, observations, references = task_setup(task_name, args)
        for kind in args.kinds:
            for estimator in args.estimators:
                torch.manual_seed(args.seed)
                started = time.perf_counter()
                samples, train, sample = run_ours(
                    kind, task, theta, x, observations, args.n_samples, args.seed, estimator
                )
                scores = [c2st(ref, s) for ref, s in zip(references, samples)]
                row = {"task": task_name, "kind": kind, "estimator": estimator, "c2st": float(np.mean(scores)),
                       "c2st_each": scores, "train_s": train, "sample_s_per_obs": sample / len(observations),
                       "total_s": time.perf_counter() - started}
                results.append(row)
                print(f"{task_name:<16}{kind.upper()} {estimator:<10} C2ST {row['c2st']:.3f}  train {train:7.1f} s  "
                      f"sample {row['sample_s_per_obs']:7.2f} s/obs", flush=True)
    print("\nagainst the targets")
    for task_name in args.tasks:
        by = {r["estimator"]: r for r in results if r["task"] == task_name and r["kind"] == "npe"}
        if "nsf" in by and "diffusion" in by:
            gap = by["diffusion"]["c2st"] - by["nsf"]["c2st"]
            print(f"{task_name:<16}NPE diffusion - nsf: {gap:+.3f} (target <= 0.03)")
        if "vae" in by and task_name in ("two_moons", "gaussian_linear"):
            print(f"{task_name:<16}NPE vae: {by['vae']['c2st']:.3f} (target <= 0.65)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
