"""Mean over replicates of `compare_sbi.py` runs: C2ST, training and sampling time per task and method.

Each run of `compare_sbi.py --seed S` draws its own simulations, observations and training
seeds, so runs with different seeds are independent replicates. This script pools the JSON
files they wrote and prints, per task and method, the mean C2ST over runs (each run's value is
already the mean over its observations) with its standard error over runs, the per-run values,
and the mean training and sampling times; then sbi_gen's ratios against sbi and the zuko script.

    python benchmarks/summarize_compare.py benchmarks/results/compare_npe_seed*.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    rows: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for path in args.files:
        run = json.loads(path.read_text())
        for row in run["results"]:
            rows[row["task"], row["method"]].append({**row, "seed": run["args"]["seed"]})
    tasks = list(dict.fromkeys(task for task, _ in rows))
    print(f"{'task':<16}{'method':<20}{'runs':>5}{'C2ST':>8}{'± se':>7}  {'per run (seed: C2ST)':<44}{'train s':>9}{'sample s/obs':>13}")
    for task in tasks:
        for (row_task, method), runs in rows.items():
            if row_task != task:
                continue
            c2st = np.array([r["c2st"] for r in runs])
            se = c2st.std(ddof=1) / np.sqrt(len(c2st)) if len(c2st) > 1 else float("nan")
            each = " ".join(f"{r['seed']}:{r['c2st']:.3f}" for r in sorted(runs, key=lambda r: r["seed"]))
            print(f"{task:<16}{method:<20}{len(runs):>5}{c2st.mean():>8.3f}{se:>7.3f}  {each:<44}"
                  f"{np.mean([r['train_s'] for r in runs]):>9.1f}{np.mean([r['sample_s_per_obs'] for r in runs]):>13.2f}")
    print("\nours against each baseline, runs paired by seed (C2ST difference, < 0 is better; time ratios)")
    for task in tasks:
        # ours-npe-nsf / -maf: one family alone, against the default's race of both.
        for ours, theirs in (("ours-npe", "sbi-npe"), ("ours-npe", "zuko"), ("ours-npe-nsf", "ours-npe"),
                             ("ours-npe-maf", "ours-npe"), ("ours-nle", "sbi-nle")):
            a = {r["seed"]: r for r in rows.get((task, ours), [])}
            b = {r["seed"]: r for r in rows.get((task, theirs), [])}
            seeds = sorted(set(a) & set(b))
            if not seeds:
                continue
            diff = np.array([a[s]["c2st"] - b[s]["c2st"] for s in seeds])
            se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
            train = np.mean([a[s]["train_s"] for s in seeds]) / np.mean([b[s]["train_s"] for s in seeds])
            sample = np.mean([a[s]["sample_s_per_obs"] for s in seeds]) / np.mean([b[s]["sample_s_per_obs"] for s in seeds])
            print(f"{task:<16}{ours} - {theirs:<9} ΔC2ST {diff.mean():+.3f} ± {se:.3f} over {len(seeds)} runs, "
                  f"train ×{train:.2f}, sample ×{sample:.2f}")


if __name__ == "__main__":
    main()
