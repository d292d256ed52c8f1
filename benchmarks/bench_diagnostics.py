"""Cost of the calibration diagnostics: SBC, HPD coverage and TARP on N held-out simulations × L draws.

Trains an NPE on the particle simulator (3 parameters) with a capped number of epochs (the
diagnostics' cost does not depend on how well it is trained), then times

- drawing L posterior samples (with their log-densities) for each of N held-out simulations,
  the step that dominates;
- SBC, HPD expected coverage and TARP on those shared draws;
- the same three as separate calls (each draws for itself);
- with `sbi` installed, `sbi.diagnostics.run_sbc` and `run_tarp` on an sbi NPE trained on the
  same simulations (its default flow), for the ratio.

Usage:
    python benchmarks/bench_diagnostics.py                       # N = L = 1000, default NSF
    python benchmarks/bench_diagnostics.py --n-sims 200 --n-samples 200 --estimators nsf maf
"""

from __future__ import annotations

import argparse
import time

import torch

import simulators
from sbi_gen.diagnostics import expected_coverage, posterior_draws, sbc, tarp
from sbi_gen.inference import NPE
from sbi_gen.simulate import simulate
from sbi_gen.train import TrainConfig

ESTIMATOR_SETTINGS = {
    "nsf": {},  # the default: 5 autoregressive spline transforms, (128, 128)
    "nsf-coupling": {"passes": 2},
    "maf": {},
}


def _timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def run_ours(name, theta, x, theta_test, x_test, n_samples, epochs, seed):
    estimator = "nsf" if name.startswith("nsf") else name
    npe = NPE(simulators.get("particle").prior, estimator, estimator_kwargs=ESTIMATOR_SETTINGS[name])
    _, train = _timed(lambda: npe.fit((theta, x), config=TrainConfig(max_epochs=epochs, progress=False, seed=seed)))
    draws, t_draws = _timed(lambda: posterior_draws(npe, x_test, n_samples, seed=seed))
    results, t_tests = _timed(
        lambda: [
            sbc(npe, theta_test, x_test, seed=seed, draws=draws),
            expected_coverage(npe, theta_test, x_test, seed=seed, draws=draws),
            tarp(npe, theta_test, x_test, seed=seed, draws=draws),
        ]
    )
    _, t_sbc_alone = _timed(lambda: sbc(npe, theta_test, x_test, n_samples=n_samples, seed=seed))
    print(f"  sbi_gen NPE ({name}): trained {epochs} epochs in {train:.0f} s")
    print(f"    draws+log_prob {n_samples} x {len(x_test)}: {t_draws:6.1f} s")
    print(f"    SBC + coverage + TARP on shared draws: {t_tests:6.2f} s  -> total {t_draws + t_tests:6.1f} s")
    print(f"    SBC alone (draws included): {t_sbc_alone:6.1f} s")
    for result in results:
        print(f"    {result.verdict}")
    return t_draws + t_tests, t_sbc_alone


def run_sbi(theta, x, theta_test, x_test, n_samples, epochs, seed):
    from sbi.diagnostics import run_sbc, run_tarp
    from sbi.inference import NPE as SbiNPE
    from sbi.utils import BoxUniform

    prior = simulators.get("particle").prior
    torch.manual_seed(seed)
    method = SbiNPE(prior=BoxUniform(prior.low, prior.high), show_progress_bars=False)
    method.append_simulations(theta, x)
    _, train = _timed(lambda: method.train(max_num_epochs=epochs))
    posterior = method.build_posterior()
    _, t_sbc = _timed(lambda: run_sbc(theta_test, x_test, posterior, num_posterior_samples=n_samples, show_progress_bar=False))
    _, t_tarp = _timed(lambda: run_tarp(theta_test, x_test, posterior, num_posterior_samples=n_samples, show_progress_bar=False))
    print(f"  sbi NPE (default maf): trained {epochs} epochs in {train:.0f} s")
    print(f"    run_sbc: {t_sbc:6.1f} s   run_tarp: {t_tarp:6.1f} s   (each draws for itself)")
    return t_sbc, t_sbc + t_tarp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-sims", type=int, default=1000, help="held-out simulations N")
    parser.add_argument("--n-samples", type=int, default=1000, help="posterior draws per simulation L")
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--estimators", nargs="+", default=["nsf", "nsf-coupling", "maf"], choices=sorted(ESTIMATOR_SETTINGS))
    parser.add_argument("--no-sbi", action="store_true", help="skip the sbi comparison")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    task = simulators.get("particle")
    train = simulate(task, args.n_train, seed=args.seed)
    test = simulate(task, args.n_sims, seed=args.seed + 1)
    theta, x = (torch.as_tensor(train[k], dtype=torch.float32) for k in ("theta", "x"))
    theta_test, x_test = (torch.as_tensor(test[k], dtype=torch.float32) for k in ("theta", "x"))
    print(f"particle simulator: {args.n_train:,} training simulations; diagnostics on N = {args.n_sims:,} x L = {args.n_samples:,}"
          f" ({torch.get_num_threads()} threads)")
    ours = {name: run_ours(name, theta, x, theta_test, x_test, args.n_samples, args.epochs, args.seed) for name in args.estimators}
    if not args.no_sbi:
        try:
            sbi_sbc, sbi_both = run_sbi(theta, x, theta_test, x_test, args.n_samples, args.epochs, args.seed)
        except ImportError:
            print("  sbi is not installed (pip install sbi): comparison skipped")
        else:
            for name, (all_three, sbc_alone) in ours.items():
                print(f"  ratio sbi_gen/sbi ({name}): SBC {sbc_alone / sbi_sbc:.2f}; "
                      f"SBC+coverage+TARP vs sbi SBC+TARP {all_three / sbi_both:.2f}")


if __name__ == "__main__":
    main()
