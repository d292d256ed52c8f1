"""sbi_gen against the `sbi` package and a tuned plain-zuko script, on the same simulations.

For each benchmark task (two_moons, slcp, gaussian_linear) it simulates a training set once
(10,000 simulations by default), trains every method on it in this process, samples the
posterior of several observations and scores the samples against the task's reference
posterior with C2ST exactly as sbibm defines it (`sbi_gen.c2st.c2st`, 0.5 is perfect).
Wall-clock training and sampling times are printed with ratios against sbi.

Methods:
- `ours-npe`, `ours-nle`: sbi_gen's defaults (`NPE(prior)`, `NLE(prior)`). NPE's default
  races NSF, MAF and a linear Gaussian for a few epochs and trains the one with the lower
  validation loss; the kept family and the race's losses are in the results.
- `ours-npe-nsf`, `ours-npe-maf`, `ours-npe-gaussian` (opt-in): one family, no race.
- `ours-npe-vae`, `ours-npe-diffusion`, `ours-nle-vae`, `ours-nle-diffusion` (opt-in): the
  other two generative families with their defaults (NLE-diffusion is slow: its likelihood is
  an ODE solve per MCMC call).
- `ours-npe-bijection` (opt-in): `NPE(prior, bijection=True)`, θ modelled in the prior's
  unconstrained space (the default models θ as it is and rejects draws outside the prior).
- `sbi-npe`, `sbi-nle`: sbi's defaults (`NPE(prior)`, `NLE(prior)`; NLE sampled with sbi's
  default MCMC, `slice_np_vectorized`).
- `zuko`: what a capable user writes without a package: z-scored θ and x, a zuko NSF
  (5 transforms, 2×128 hidden), AdamW with a plateau schedule and early stopping.

Usage (needs the `bench` extra: `pip install -e ".[bench]"`):

    python benchmarks/compare_sbi.py                       # everything; an hour or more on 2 cores
    python benchmarks/compare_sbi.py --tasks two_moons --methods ours-npe sbi-npe --n-obs 2
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
from sbi_gen.inference import NLE, NPE
from sbi_gen.simulate import simulate

METHODS = ["ours-npe", "ours-nle", "sbi-npe", "sbi-nle", "zuko"]
# The other generative families behind the same interface (``ours-KIND-ESTIMATOR``).
FAMILIES = ["ours-npe-vae", "ours-npe-diffusion", "ours-nle-vae", "ours-nle-diffusion", "ours-npe-nsf",
            "ours-npe-maf", "ours-npe-gaussian", "ours-npe-bijection", "ours-nle-auto", "ours-nle-nsf", "ours-nle-gaussian",
            "ours-npe-ensemble"]


def _sbi_prior(task):
    from sbi.utils import BoxUniform as SbiBox

    prior = task.prior
    if type(prior).__name__ == "BoxUniform":
        return SbiBox(prior.low, prior.high)
    return torch.distributions.MultivariateNormal(prior.loc, prior.covariance)


def run_ours(kind, task, theta, x, observations, n_samples, seed, estimator=None):
    torch.manual_seed(seed)  # as for sbi and the zuko script (our initial weights come from the config's seed)
    options = {}
    if estimator == "bijection":  # the default estimator, θ modelled in the prior's unconstrained space
        estimator, options = None, {"bijection": True}
    model = (NPE if kind == "npe" else NLE)(task.prior, estimator, **options)
    started = time.perf_counter()
    model.fit((theta, x), config=model.train_config(progress=False, seed=seed))
    train = time.perf_counter() - started
    samples, started = [], time.perf_counter()
    for x_o in observations:
        samples.append(model.posterior(x_o).sample((n_samples,)).numpy())
    kept = {"estimator": model.estimator_name}
    if "estimator_selection" in model.metadata:  # the race of estimator="auto"
        kept.update(selection=model.metadata["estimator_selection"], race_epochs=model.metadata["estimator_race_epochs"],
                    race_seconds=model.metadata["estimator_race_seconds"])
    return samples, train, time.perf_counter() - started, kept


def run_sbi(kind, task, theta, x, observations, n_samples, seed):
    from sbi.inference import NLE as SbiNLE
    from sbi.inference import NPE as SbiNPE

    torch.manual_seed(seed)
    method = (SbiNPE if kind == "npe" else SbiNLE)(prior=_sbi_prior(task), show_progress_bars=False)
    started = time.perf_counter()
    method.append_simulations(torch.as_tensor(theta, dtype=torch.float32), torch.as_tensor(x, dtype=torch.float32)).train()
    posterior = method.build_posterior()
    train = time.perf_counter() - started
    samples, started = [], time.perf_counter()
    for x_o in observations:
        kwargs = {"show_progress_bars": False}
        samples.append(posterior.sample((n_samples,), x=torch.as_tensor(x_o, dtype=torch.float32), **kwargs).numpy())
    return samples, train, time.perf_counter() - started


def run_zuko(task, theta, x, observations, n_samples, seed):
    """A careful hand-written NPE with zuko: the baseline a package must beat."""
    import zuko

    torch.manual_seed(seed)
    theta, x = torch.as_tensor(theta, dtype=torch.float32), torch.as_tensor(x, dtype=torch.float32)
    t_mean, t_std, x_mean, x_std = theta.mean(0), theta.std(0), x.mean(0), x.std(0)
    flow = zuko.flows.NSF(theta.shape[1], x.shape[1], transforms=5, hidden_features=[128, 128])
    perm = torch.randperm(len(theta))
    n_val = len(theta) // 10
    val, train_idx = perm[:n_val], perm[n_val:]
    tz, xz = (theta - t_mean) / t_std, (x - x_mean) / x_std
    optimizer = torch.optim.AdamW(flow.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=8)
    best, best_state, wait = float("inf"), None, 0
    started = time.perf_counter()
    for _ in range(1000):
        flow.train()
        for batch in train_idx[torch.randperm(len(train_idx))].split(256):
            loss = -flow(xz[batch]).log_prob(tz[batch]).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), 5.0)
            optimizer.step()
        flow.eval()
        with torch.no_grad():
            val_loss = float(-flow(xz[val]).log_prob(tz[val]).mean())
        scheduler.step(val_loss)
        if val_loss < best:
            best, best_state, wait = val_loss, {k: v.clone() for k, v in flow.state_dict().items()}, 0
        else:
            wait += 1
            if wait >= 20:
                break
    flow.load_state_dict(best_state)
    train = time.perf_counter() - started
    samples, started = [], time.perf_counter()
    for x_o in observations:
        x_o = (torch.as_tensor(x_o, dtype=torch.float32) - x_mean) / x_std
        kept, n_kept = [], 0
        while n_kept < n_samples:  # rejection into the prior's support
            with torch.no_grad():
                drawn = flow(x_o).sample((2 * n_samples,)) * t_std + t_mean
            kept.append(drawn[torch.isfinite(task.prior.log_prob(drawn))])
            n_kept += len(kept[-1])
        samples.append(torch.cat(kept)[:n_samples].numpy())
    return samples, train, time.perf_counter() - started


def task_setup(task_name: str, args: argparse.Namespace) -> tuple:
    """``(task, theta, x, observations, references)``: the one training set and the reference
    posteriors every method of a comparison is scored on (``args``: n_simulations, n_obs,
    n_samples, seed)."""
    task = simulators.get(task_name)
    data = simulate(task, n=args.n_simulations, seed=args.seed)
    _, observations = task.observations(args.n_obs, seed=args.seed + 1)
    references = [task.reference_posterior(x_o, args.n_samples, seed=i) for i, x_o in enumerate(observations)]
    return task, data["theta"], data["x"], observations, references


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["two_moons", "slcp", "gaussian_linear"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS + FAMILIES,
                        help=f"default {' '.join(METHODS)}; also {' '.join(FAMILIES)}")
    parser.add_argument("--n-simulations", type=int, default=10_000)
    parser.add_argument("--n-obs", type=int, default=3)
    parser.add_argument("--n-samples", type=int, default=10_000, help="posterior and reference samples per observation")
    parser.add_argument("--c2st-samples", type=int, default=2_000, help="samples per set in C2ST (sbibm: 10,000)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/compare_sbi.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # torch.optim imports torch._dynamo (1-2 s) the first time an optimizer is built: done here,
    # so that whichever method runs first is not charged a one-time import as training time.
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])

    results = []
    for task_name in args.tasks:
        task, theta, x, observations, references = task_setup(task_name, args)
        for method in args.methods:
            kept = {}
            if method == "zuko":
                samples, train, sample = run_zuko(task, theta, x, observations, args.n_samples, args.seed)
            else:
                source, kind, *estimator = method.split("-")
                if source == "ours":
                    samples, train, sample, kept = run_ours(
                        kind, task, theta, x, observations, args.n_samples, args.seed, *estimator
                    )
                else:
                    samples, train, sample = run_sbi(kind, task, theta, x, observations, args.n_samples, args.seed)
            n = min(args.c2st_samples, *(len(s) for s in samples))
            scores = [c2st(ref, s, n_max=n) for ref, s in zip(references, samples)]
            row = {"task": task_name, "method": method, "c2st": float(np.mean(scores)), "c2st_each": scores,
                   "train_s": train, "sample_s_per_obs": sample / len(observations), **kept}
            results.append(row)
            print(f"{task_name:<16}{method:<20} C2ST {row['c2st']:.3f}  train {train:7.1f} s  "
                  f"sample {row['sample_s_per_obs']:7.2f} s/obs" + (f"  ({kept['estimator']})" if kept else ""), flush=True)
            # Written after every row: a later method that fails does not lose the finished ones.
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))

    print("\nratios against sbi (train time, sample time; < 1 is faster)")
    for task_name in args.tasks:
        by = {r["method"]: r for r in results if r["task"] == task_name}
        for ours, theirs in (("ours-npe", "sbi-npe"), ("ours-nle", "sbi-nle")):
            if ours in by and theirs in by:
                a, b = by[ours], by[theirs]
                print(f"{task_name:<16}{ours} / {theirs}: C2ST {a['c2st']:.3f} vs {b['c2st']:.3f}, "
                      f"train ×{a['train_s'] / b['train_s']:.2f}, sample ×{a['sample_s_per_obs'] / b['sample_s_per_obs']:.3f}")


if __name__ == "__main__":
    main()
