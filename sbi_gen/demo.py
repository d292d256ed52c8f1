"""The end-to-end demo behind ``make demo``: simulate → train NPE → sample → summarize.

Runs on the embedded defaults in a few minutes on a 2-core laptop::

    python -m sbi_gen.demo [--n 20000] [--workers 2] [--out data/demo]

1. simulates a training set for the particle-physics simulator into ``data/demo/particle.h5``
   (resumable: rerunning continues where a killed run stopped);
2. trains neural posterior estimation (a neural spline flow) and saves it;
3. samples the posterior of the first shipped observation in ``data/observations/particle.h5``,
   prints the posterior mean and 68% intervals against the true parameters and the
   highest-density region whose boundary the truth lies on, and writes a corner plot
   (``data/demo/particle_corner.png``);
4. checks calibration on fresh simulations (``--n-check``, default 200; 0 skips it): SBC,
   expected coverage, TARP and a posterior predictive check (:func:`sbi_gen.report.diagnose`,
   figures and ``report.json`` in ``data/demo/report``), and how often the central 68% and
   95% intervals held the true parameters. A true value falls outside its 68%
   interval a third of the time; this is what says whether that happens more often.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import simulators
from sbi_gen.checkpoint import save
from sbi_gen.cli import posterior_summary
from sbi_gen.diagnostics import central_interval_coverage, hpd_level
from sbi_gen.inference import NPE
from sbi_gen.parallel import default_workers
from sbi_gen.plots import corner, save_figure
from sbi_gen.report import diagnose
from sbi_gen.simulate import simulate
from sbi_gen.store import load, simulate_to_hdf5

__all__ = ["interval_coverage", "main", "run_demo"]

OBSERVATIONS = Path(__file__).resolve().parent.parent / "data" / "observations" / "particle.h5"


def run_demo(
    out: str | Path = "data/demo",
    n: int = 20_000,
    workers: int | None = None,
    seed: int = 1,
    observation: int = 0,
    max_epochs: int = 1000,
    n_check: int = 200,
) -> dict:
    """Run the pipeline; returns the posterior samples, the true parameters, the calibration
    report (``None`` with ``n_check=0``) and the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or default_workers()
    torch.set_num_threads(max(1, workers))
    simulator = simulators.get("particle")

    print(f"== 1. simulate {n:,} jets with the particle simulator ({workers} workers)")
    summary = simulate_to_hdf5(simulator, n, out / "particle.h5", seed=seed, workers=workers)
    print(summary)

    print("\n== 2. train neural posterior estimation (neural spline flow)")
    torch.manual_seed(seed)  # the initial weights: the same model on every run
    npe = NPE(simulator.prior, "nsf")
    # The estimator's training defaults, as npe.fit(path) uses without a config.
    history = npe.fit(out / "particle.h5", config=npe.train_config(seed=seed, max_epochs=max_epochs))
    save(npe, out / "particle_npe")
    print(f"best validation loss {history.best_val_loss:.3f} after {len(history.val_loss)} epochs ({history.seconds:.0f} s); "
          f"model in {out / 'particle_npe'}")

    print(f"\n== 3. posterior of observation {observation} in {OBSERVATIONS}")
    obs = load(OBSERVATIONS, valid_only=False)
    x_obs, theta_true = obs.x[observation], obs.theta[observation]
    started = time.perf_counter()
    posterior = npe.posterior(x_obs)
    samples = posterior.sample((10_000,))
    print(f"10,000 posterior samples in {time.perf_counter() - started:.2f} s")
    print(posterior_summary(samples.numpy(), simulator.prior.labels, theta_true.numpy()))
    level = hpd_level(posterior.log_prob(samples), posterior.log_prob(theta_true[None])[0])
    print(f"jointly, the true parameters lie on the boundary of the {level:.0%} highest-density region\n"
          "(the intervals above ignore the parameters' correlations; a calibrated posterior puts the truth\n"
          "beyond its 68% region a third of the time, beyond its 95% region one time in twenty)")
    figure = corner(
        {f"NPE posterior ({n:,} simulations)": samples},
        labels=simulator.prior.labels,
        truth=theta_true,
        title=f"particle simulator, observation {observation}",
    )
    corner_path = save_figure(figure, out / "particle_corner.png")
    print(f"\ncorner plot written to {corner_path}")

    report = None
    if n_check > 0:
        print(f"\n== 4. calibration on {n_check:,} fresh simulations (not in the training set)")
        # Another root seed: streams independent of every chunk of the training set.
        fresh = simulate(simulator, n_check, seed=seed + 1_000_003)
        keep = fresh["valid"]
        report = diagnose(npe, fresh["theta"][keep], fresh["x"][keep], out / "report", n_samples=500, seed=seed,
                          simulator=simulator, ppc_draws=200)
        print(interval_coverage(report["sbc"]["ranks"], report["sbc"]["n_samples"], simulator.prior.labels))
        print(f"{'calibrated' if report['calibrated'] else 'NOT calibrated'}; figures and report.json in {out / 'report'}")
    return {"samples": samples, "theta_true": theta_true, "out": out, "corner": corner_path, "report": report}


def interval_coverage(ranks: np.ndarray, n_samples: int, names: list[str], levels: tuple[float, ...] = (0.68, 0.95)) -> str:
    """A table of how often the central intervals held the true parameter, from SBC ranks
    (:func:`sbi_gen.diagnostics.central_interval_coverage`), with the binomial standard error of
    a calibrated posterior's share over the ``N`` simulations.

    Example:
        >>> print(interval_coverage(np.array([[10], [50], [90]]), 100, ["a"]))  # doctest: +NORMALIZE_WHITESPACE
        parameter      68% interval holds the truth   95% interval holds the truth
        a                    33% (expect 68% ± 27%)        100% (expect 95% ± 13%)
    """
    shares = central_interval_coverage(ranks, n_samples, levels)
    n = len(ranks)
    lines = [f"{'parameter':<12}" + "".join(f"{f'{level:.0%} interval holds the truth':>31}" for level in levels)]
    for j, name in enumerate(names):
        cells = [
            f"{f'{shares[i, j]:.0%} (expect {level:.0%} ± {np.sqrt(level * (1 - level) / n):.0%})':>31}"
            for i, level in enumerate(levels)
        ]
        lines.append(f"{name:<12}" + "".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="sbi_gen end-to-end demo")
    parser.add_argument("--n", type=int, default=20_000, help="training simulations")
    parser.add_argument("--workers", type=int, default=None, help="simulation worker processes (default: all cores)")
    parser.add_argument("--out", default="data/demo", help="output directory")
    parser.add_argument("--observation", type=int, default=0, help="row of the shipped observation file")
    parser.add_argument("--max-epochs", type=int, default=1000, help="training epochs at most (early stopping decides)")
    parser.add_argument("--n-check", type=int, default=200, help="fresh simulations of the calibration check (0: skip it)")
    args = parser.parse_args()
    run_demo(args.out, args.n, args.workers, observation=args.observation, max_epochs=args.max_epochs, n_check=args.n_check)


if __name__ == "__main__":
    main()
