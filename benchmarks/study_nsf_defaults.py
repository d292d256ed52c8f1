"""Multi-seed study of the default NPE estimator's (NSF) training settings, scored by C2ST.

Single runs cannot decide between training settings: at 10,000 simulations the C2ST of
default NPE moves by about ±0.04 from seed to seed and differs as much between observations.
This script trains NPE with each named variant on the *same* simulations of each task, for
several training seeds, samples the posterior of the *same* observations and scores them
against the same reference samples (`sbi_gen.c2st.c2st`, sbibm's definition, 0.5 is perfect).
Every (seed, observation) cell is thus paired across variants, and the summary reports, per
variant and task, the mean C2ST with its standard error and the paired difference from the
baseline with the standard error of that difference, over cells and over seeds. The observations
of one trained model share its errors, so the per-seed error (differences of per-seed means) is
the honest one; the per-cell error understates the noise when seeds disagree.

Variants are absolute: each builds its `TrainConfig` from the plain `TrainConfig` defaults
plus its own overrides (not from `NSF.training_defaults`), so the table stays reproducible
when the package defaults change. Rows are appended to a JSON-lines file as they finish and
rows already there are skipped, so an interrupted study resumes where it stopped.

Usage:
    python benchmarks/study_nsf_defaults.py --tasks two_moons gaussian_linear --variants baseline ema999
    python benchmarks/study_nsf_defaults.py --summary-only        # the table of what is recorded
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from compare_sbi import task_setup  # same folder: `python benchmarks/study_nsf_defaults.py`

from sbi_gen.c2st import c2st
from sbi_gen.inference import NPE
from sbi_gen.train import TrainConfig

# name -> {"train": TrainConfig overrides, "nsf": estimator constructor kwargs, optional "estimator" (default
# "nsf"), "unbounded" (no prior bijection) and "embedding" (of x; default: NPE's)}
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "baseline": {"train": {}, "nsf": {}},
    # Weight averaging: the validated and restored weights are an average over the last
    # ~1000 steps, which smooths the optimizer's noise around thin structures.
    "ema999": {"train": {"ema_decay": 0.999}, "nsf": {}},
    # Averaging needs time at a low learning rate to pay off; the same patience as Diffusion's.
    "ema999_long": {"train": {"ema_decay": 0.999, "patience": 40, "lr_patience": 16}, "nsf": {}},
    "long": {"train": {"patience": 40, "lr_patience": 16}, "nsf": {}},
    # Twice the batch, learning rate scaled with the square root of the batch size.
    "batch512": {"train": {"batch_size": 512, "learning_rate": 1.4e-3}, "nsf": {}},
    "batch128": {"train": {"batch_size": 128, "learning_rate": 7e-4}, "nsf": {}},
    "batch512_ema999": {"train": {"batch_size": 512, "learning_rate": 1.4e-3, "ema_decay": 0.999}, "nsf": {}},
    # Half the cost per step: 3 transforms of (64, 64) (within noise of 5 x (128, 128) in the
    # NSF docstring's density study), with the weight average.
    "small_ema999": {"train": {"ema_decay": 0.999}, "nsf": {"transforms": 3, "hidden_features": [64, 64]}},
    # A fixed budget: the rate falls along a half cosine over 60 or 100 epochs (weight average).
    "cos60_ema999": {"train": {"ema_decay": 0.999, "lr_schedule": "cosine", "max_epochs": 60, "patience": 60}, "nsf": {}},
    "cos100_ema999": {"train": {"ema_decay": 0.999, "lr_schedule": "cosine", "max_epochs": 100, "patience": 100}, "nsf": {}},
    "cos60_lr2e3": {"train": {"lr_schedule": "cosine", "max_epochs": 60, "patience": 60, "learning_rate": 2e-3}, "nsf": {}},
    # Fewer epochs: the weight average with half the patience.
    "ema999_short": {"train": {"ema_decay": 0.999, "patience": 10, "lr_patience": 4}, "nsf": {}},
    # gaussian_linear overfits after 2-3 epochs: a slower rate, or narrower conditioners.
    "short_lr3e4": {"train": {"ema_decay": 0.999, "patience": 10, "lr_patience": 4, "learning_rate": 3e-4}, "nsf": {}},
    "short_h64": {"train": {"ema_decay": 0.999, "patience": 10, "lr_patience": 4}, "nsf": {"hidden_features": [64, 64]}},
    # Fewer steps to the same place: a higher rate, alone or with twice the batch.
    "short_lr2e3": {"train": {"ema_decay": 0.999, "patience": 10, "lr_patience": 4, "learning_rate": 2e-3}, "nsf": {}},
    "short_b512_lr2e3": {
        "train": {"ema_decay": 0.999, "patience": 10, "lr_patience": 4, "learning_rate": 2e-3, "batch_size": 512},
        "nsf": {},
    },
    # The 10-D density study's best size (NSF docstring): 3 transforms of (64, 64).
    "short_b512_lr2e3_t3h64": {
        "train": {"ema_decay": 0.999, "patience": 10, "lr_patience": 4, "learning_rate": 2e-3, "batch_size": 512},
        "nsf": {"transforms": 3, "hidden_features": [64, 64]},
    },
    # The affine flow (MAF) under the NSF's training defaults, and with narrow networks, a low
    # rate and long patience: is gaussian_linear's gap to sbi the spline's or the training's?
    "maf_b512_lr2e3": {
        "estimator": "maf",
        "train": {"ema_decay": 0.999, "patience": 10, "lr_patience": 4, "learning_rate": 2e-3, "batch_size": 512},
        "nsf": {},
    },
    "maf_h50_lr5e4": {
        "estimator": "maf",
        "train": {"patience": 20, "lr_patience": 8, "learning_rate": 5e-4, "batch_size": 200},
        "nsf": {"hidden_features": [50, 50]},
    },
    # The defaults, with progress counted only for falls of the validation loss by at least
    # min_delta nats: the rate halves, and training stops, once the late creep is that slow.
    "short_b512_lr2e3_md002": {
        "train": {"ema_decay": 0.999, "patience": 10, "lr_patience": 4, "learning_rate": 2e-3, "batch_size": 512,
                  "min_delta": 0.002},
        "nsf": {},
    },
    "short_b512_lr2e3_md005": {
        "train": {"ema_decay": 0.999, "patience": 10, "lr_patience": 4, "learning_rate": 2e-3, "batch_size": 512,
                  "min_delta": 0.005},
        "nsf": {},
    },
    # The defaults with θ z-scored in its own space, not through the box prior's logit.
    "short_b512_lr2e3_unbounded": {
        "train": {"ema_decay": 0.999, "patience": 10, "lr_patience": 4, "learning_rate": 2e-3, "batch_size": 512},
        "nsf": {},
        "unbounded": True,
    },
    # The default (no bijection) with narrower conditioners: a step of 5 × (64, 64) costs about
    # half of 5 × (128, 128)'s, once the spline's own operations were made cheaper.
    "unbounded_h64": {
        "train": {"ema_decay": 0.999, "patience": 10, "lr_patience": 4, "learning_rate": 2e-3, "batch_size": 512},
        "nsf": {"hidden_features": [64, 64]},
        "unbounded": True,
    },
    "unbounded_h96": {
        "train": {"ema_decay": 0.999, "patience": 10, "lr_patience": 4, "learning_rate": 2e-3, "batch_size": 512},
        "nsf": {"hidden_features": [96, 96]},
        "unbounded": True,
    },
    # The default with AdamW's weight decay at its usual 0.01 (decoupled: 2e-5 of each weight per
    # step at the default rate), or with more transforms or bins (more capacity for slcp's modes).
    "unbounded_wd1e2": {
        "train": {"ema_decay": 0.999, "patience": 10, "lr_patience": 4, "learning_rate": 2e-3, "batch_size": 512,
                  "weight_decay": 1e-2},
        "nsf": {},
        "unbounded": True,
    },
    "unbounded_t8": {
        "train": {"ema_decay": 0.999, "patience": 10, "lr_patience": 4, "learning_rate": 2e-3, "batch_size": 512},
        "nsf": {"transforms": 8},
        "unbounded": True,
    },
    "unbounded_bins16": {
        "train": {"ema_decay": 0.999, "patience": 10, "lr_patience": 4, "learning_rate": 2e-3, "batch_size": 512},
        "nsf": {"bins": 16},
        "unbounded": True,
    },
    # The affine flow alone under plain TrainConfig (θ as it is), alone and with narrower, fewer
    # or regularized conditioners or a weight average: gaussian_linear's posterior is Gaussian,
    # so what limits the MAF there is how much it overfits. ``maf_b512_lr2e3`` is the NSF's
    # training defaults, which the MAF now has too.
    "maf_unbounded": {"estimator": "maf", "train": {}, "nsf": {}, "unbounded": True},
    "maf_unbounded_h64": {"estimator": "maf", "train": {}, "nsf": {"hidden_features": [64, 64]}, "unbounded": True},
    "maf_unbounded_t3": {"estimator": "maf", "train": {}, "nsf": {"transforms": 3}, "unbounded": True},
    "maf_unbounded_ema": {"estimator": "maf", "train": {"ema_decay": 0.999}, "nsf": {}, "unbounded": True},
    "maf_unbounded_wd1e2": {"estimator": "maf", "train": {"weight_decay": 1e-2}, "nsf": {}, "unbounded": True},
    # NPE's default (the race) with x as it is, and with a residual-MLP embedding of x: slcp's
    # posterior widths vary by orders of magnitude with x (sbi_gen.nn.default_embedding).
    "auto": {
        "estimator": "auto",
        "train": {"ema_decay": 0.999, "patience": 10, "lr_patience": 4, "learning_rate": 2e-3, "batch_size": 512},
        "nsf": {},
        "unbounded": True,
    },
    "auto_resmlp": {
        "estimator": "auto",
        "train": {"ema_decay": 0.999, "patience": 10, "lr_patience": 4, "learning_rate": 2e-3, "batch_size": 512},
        "nsf": {},
        "unbounded": True,
        "embedding": "resmlp",
    },
    "short_b1024_lr3e3": {
        "train": {"ema_decay": 0.999, "patience": 10, "lr_patience": 4, "learning_rate": 3e-3, "batch_size": 1024},
        "nsf": {},
    },
}


def run_cell(task: Any, theta: Any, x: Any, observations: Any, references: list, variant: dict, seed: int,
             n_samples: int) -> dict[str, Any]:
    """Trains one NPE with ``variant`` and training seed ``seed``; C2ST of every observation."""
    torch.manual_seed(seed)  # initial weights are drawn when the estimator is built
    # "unbounded": θ z-scored as it is, not through the prior's bijection (NPE(bijection=False)).
    model = NPE(task.prior, variant.get("estimator", "nsf"), estimator_kwargs=variant["nsf"],
                bijection=not variant.get("unbounded", False), embedding=variant.get("embedding"))
    config = TrainConfig(**{"progress": False, "seed": seed, **variant["train"]})
    started = time.perf_counter()
    history = model.fit((theta, x), config=config)
    train_s = time.perf_counter() - started
    scores = []
    for x_o, reference in zip(observations, references, strict=True):
        samples = model.posterior(x_o).sample((n_samples,)).numpy()
        scores.append(c2st(reference, samples))
    return {"c2st_each": scores, "train_s": train_s, "epochs": len(history.val_loss),
            "best_epoch": history.best_epoch, "best_val_loss": history.best_val_loss}


def summarize(rows: list[dict[str, Any]], baseline: str = "baseline") -> None:
    """Prints mean C2ST ± standard error per variant and task, and the paired difference from
    ``baseline`` over the (seed, observation) cells both have."""
    tasks = sorted({r["task"] for r in rows})
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    width = max([14, *(len(v) + 2 for v in variants)])
    print(f"\n{'variant':<{width}}{'task':<17}{'cells':>5}{'C2ST':>8}{'± se':>7}{'Δ base':>9}{'± se':>7}{'seed se':>8}"
          f"{'per seed':>28}{'train s':>9}{'epochs':>8}")
    for task in tasks:
        cells: dict[str, dict[tuple[int, int], float]] = {}
        for variant in variants:
            mine = [r for r in rows if r["task"] == task and r["variant"] == variant]
            if not mine:
                continue
            cells[variant] = {(r["seed"], i): s for r in mine for i, s in enumerate(r["c2st_each"])}
            values = np.array(list(cells[variant].values()))
            se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
            delta = ""
            if variant != baseline and baseline in cells:
                common = sorted(set(cells[variant]) & set(cells[baseline]))
                diff = np.array([cells[variant][k] - cells[baseline][k] for k in common])
                seeds = sorted({k[0] for k in common})
                by_seed = np.array([np.mean([d for d, k in zip(diff, common) if k[0] == seed]) for seed in seeds])
                if len(diff) > 1:
                    delta = f"{diff.mean():+9.3f}{diff.std(ddof=1) / np.sqrt(len(diff)):7.3f}"
                if len(by_seed) > 1:
                    delta += f"{by_seed.std(ddof=1) / np.sqrt(len(by_seed)):7.3f}"
            per_seed = " ".join(f"{np.mean(r['c2st_each']):.3f}" for r in sorted(mine, key=lambda r: r["seed"]))
            print(f"{variant:<{width}}{task:<17}{len(values):>5}{values.mean():8.3f}{se:7.3f}{delta:<23}"
                  f"{per_seed:>29}{np.mean([r['train_s'] for r in mine]):9.1f}"
                  f"{np.mean([r['epochs'] for r in mine]):8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["two_moons", "gaussian_linear"])
    parser.add_argument("--variants", nargs="+", default=["baseline", "ema999"], choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds")
    parser.add_argument("--n-simulations", type=int, default=10_000)
    parser.add_argument("--n-obs", type=int, default=4)
    parser.add_argument("--n-samples", type=int, default=2_000, help="posterior and reference samples per observation")
    parser.add_argument("--sim-seed", type=int, default=0, help="seed of the simulations and observations")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/study_nsf_defaults.jsonl")
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--baseline", default="baseline", help="the variant the paired differences are taken from")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []

    if not args.summary_only:
        setup = argparse.Namespace(n_simulations=args.n_simulations, n_obs=args.n_obs,
                                   n_samples=args.n_samples, seed=args.sim_seed)
        out.parent.mkdir(parents=True, exist_ok=True)
        for task_name in args.tasks:
            task, theta, x, observations, references = task_setup(task_name, setup)
            for name in args.variants:
                for seed in args.seeds:
                    key = {"task": task_name, "variant": name, "seed": seed, "n_obs": args.n_obs,
                           "n_simulations": args.n_simulations, "n_samples": args.n_samples,
                           "sim_seed": args.sim_seed}
                    if any(all(r.get(k) == v for k, v in key.items()) for r in rows):
                        continue
                    row = {**key, **VARIANTS[name], **run_cell(task, theta, x, observations, references,
                                                               VARIANTS[name], seed, args.n_samples)}
                    rows.append(row)
                    with out.open("a") as handle:
                        handle.write(json.dumps(row) + "\n")
                    print(f"{task_name:<16}{name:<14}seed {seed}  C2ST {np.mean(row['c2st_each']):.3f} "
                          f"({' '.join(f'{s:.3f}' for s in row['c2st_each'])})  train {row['train_s']:6.1f} s  "
                          f"epochs {row['epochs']}", flush=True)
    summarize(rows, args.baseline)


if __name__ == "__main__":
    main()
