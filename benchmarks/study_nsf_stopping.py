"""How long to train the default NPE estimator (NSF): C2ST and time against epochs.

For each training seed S it does what `compare_sbi.py --tasks TASK --seed S` does for one
method (TASK two_moons unless `--task` says otherwise): simulates 10,000 pairs with seed S, draws 3 observations with seed S + 1, trains
`NPE(prior, "nsf")` with the NSF's training defaults plus the given overrides (training seed
S), draws 10,000 posterior samples per observation and scores them against the reference
posterior with C2ST (`sbi_gen.c2st.c2st`, 2,000 samples per set). It prints one JSON line per
run, with the best validation loss after 20, 40, ... epochs (the curve) and the epochs where
the plateau schedule lowered the learning rate, and appends it to `--out`. Runs of one seed
start from the same initial weights, so curves of different settings are paired.

Usage:
    python benchmarks/study_nsf_stopping.py --name defaults --seeds 0 1 2 3
    python benchmarks/study_nsf_stopping.py --name bins8_e100 --train '{"max_epochs": 100, "min_delta": 0}' \\
        --nsf '{"bins": 8}' --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import simulators
from sbi_gen.c2st import c2st
from sbi_gen.inference import NPE
from sbi_gen.simulate import simulate


def run(name: str, train: dict, nsf: dict, seed: int, task_name: str = "two_moons", n_samples: int = 10_000) -> dict:
    """One training of ``NPE(prior, "nsf", estimator_kwargs=nsf)`` with ``train`` overrides."""
    task = simulators.get(task_name)
    data = simulate(task, n=10_000, seed=seed)
    _, observations = task.observations(3, seed=seed + 1)
    model = NPE(task.prior, "nsf", estimator_kwargs=nsf or None)
    config = model.train_config(progress=False, seed=seed, **train)
    started = time.perf_counter()
    history = model.fit((data["theta"], data["x"]), config=config)
    train_s = time.perf_counter() - started
    val = np.array(history.val_loss)
    torch.manual_seed(seed)  # the posterior draws, as in compare_sbi.py
    scores = [
        c2st(task.reference_posterior(x_o, n_samples, seed=i), model.posterior(x_o).sample((n_samples,)).numpy(), n_max=2000)
        for i, x_o in enumerate(observations)
    ]
    return {"name": name, "task": task_name, "seed": seed, "train": train, "nsf": nsf, "train_s": round(train_s, 1), "epochs": len(val),
            "best_val_loss": round(float(history.best_val_loss), 4),
            "curve": {e: round(float(val[:e].min()), 4) for e in range(20, len(val) + 1, 20)},
            # Epochs whose learning rate is lower than the epoch before's (the plateau's decays).
            "lr_drops": [e for e in range(1, len(val)) if history.learning_rate[e] < history.learning_rate[e - 1]],
            "c2st": round(float(np.mean(scores)), 4), "c2st_each": [round(s, 3) for s in scores]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="a label for the rows")
    parser.add_argument("--train", default="{}", help="TrainConfig overrides, JSON (on top of the NSF's training defaults)")
    parser.add_argument("--nsf", default="{}", help="NSF keyword arguments, JSON")
    parser.add_argument("--task", default="two_moons", choices=["two_moons", "slcp", "gaussian_linear"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/study_nsf_stopping.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        row = run(args.name, json.loads(args.train), json.loads(args.nsf), seed, args.task)
        rows.append(row)
        print(json.dumps(row), flush=True)
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
    print(f"{args.name} on {args.task}: C2ST {np.mean([r['c2st'] for r in rows]):.3f} over seeds {args.seeds}, "
          f"train {np.mean([r['train_s'] for r in rows]):.1f} s, epochs {np.mean([r['epochs'] for r in rows]):.0f}")


if __name__ == "__main__":
    main()
