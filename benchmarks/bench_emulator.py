"""Fidelity of the learned map emulator at held-out parameters: power spectrum and pixel histogram.

For each variant of the cosmology simulator (Gaussian maps with shape noise, and noiseless
lognormal maps) and each emulator family: simulate a training set, train the emulator
(:func:`sbi_gen.emulator.train_emulator`), then at ``--n-theta`` parameter points drawn from
the prior with a separate seed (held out: the training set never saw them) compare
``--n-emulated`` emulated maps with ``--n-simulated`` simulated ones:

- per multipole bin, the ratio of the mean emulated to the mean simulated binned power
  spectrum with its standard error (sample variances of both sets), the worst bin, and
  PASS/FAIL against the 10 % target on the ratio itself; the target is *resolved* when the
  ±2σ interval of the worst bin lies on one side of it;
- for the lognormal variant, the pixel histogram (:func:`sbi_gen.emulator.compare_pixel_histograms`):
  per equal-probability bin of the simulated pixel values the ratio of the mean fractions of
  a map's pixels, a chi-square statistic of the whole histogram (null distribution:
  chi-square with ``bins - 1`` degrees of freedom, from independent maps) and the mean
  per-map skewness and excess kurtosis with the pulls of their differences (standard normal
  under the null). "indistinguishable" means p >= 0.001 and both pulls within 3.9 (family-wise
  false-alarm rate about 1.2e-3 for an exact emulator).

Defaults take about 12 minutes on one CPU thread (16 x 16 maps, 10,000 training maps, 12
epochs). Why 10,000: each map gives one sample of its mean level (the k = 0 mode), so with
3,000 maps the learned power of that mode was 10-15 % off at some θ, enough for the lognormal
pixel histogram to be told apart at one of the 4 held-out θ (χ² p 3e-4); with 10,000 maps all 4
were indistinguishable (p 0.28-0.60).

    python benchmarks/bench_emulator.py [--variants gaussian lognormal] [--families diffusion vae]
        [--n-pix 16] [--n-train 10000] [--epochs 12] [--n-theta 4] [--n-emulated 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sbi_gen.emulator import compare_pixel_histograms, compare_power_spectra, emulator_train_config, train_emulator
from sbi_gen.store import simulate_to_hdf5
from simulators.cosmology import CosmologySimulator

TOLERANCE = 0.10  # the target: mean emulated power within 10 % of the simulator's in every bin
PIXEL_P_MIN = 1e-3  # histogram chi-square: smallest p-value of an "indistinguishable" histogram
PIXEL_PULL_MAX = 3.9  # two-sided normal tail 1e-4 for each of the skewness and kurtosis pulls
DEFAULT_HYPERPARAMETERS = {
    "diffusion": {"channels": [16, 32], "sampler_steps": 16},
    "vae": {"channels": [16, 32], "latent_features": 32},
}


def simulator_for(variant: str, n_pix: int, lognormal_noise: bool) -> CosmologySimulator:
    """The cosmology simulator of a variant: Gaussian maps with noise, or lognormal maps."""
    if variant == "gaussian":
        return CosmologySimulator(n_pix=n_pix)
    return CosmologySimulator(n_pix=n_pix, lognormal=True, noise=lognormal_noise)


def spectrum_report(sim: CosmologySimulator, simulated: np.ndarray, emulated: np.ndarray, n_bins: int) -> dict[str, Any]:
    """Ratio per bin, its error, the worst bin and the verdict against :data:`TOLERANCE`."""
    comparison = compare_power_spectra(
        simulated, emulated, lambda maps: sim.summary(maps, n_bins=n_bins), ell=sim.bin_centers(n_bins)
    )
    deviation = np.abs(comparison.ratio - 1.0)
    worst = int(np.argmax(deviation))
    low, high = deviation[worst] - 2 * comparison.ratio_error[worst], deviation[worst] + 2 * comparison.ratio_error[worst]
    return {
        "ell": comparison.ell.tolist(),
        "ratio": comparison.ratio.tolist(),
        "ratio_error": comparison.ratio_error.tolist(),
        "worst_bin": worst,
        "worst_deviation": float(deviation[worst]),
        "passed": bool(deviation.max() <= TOLERANCE),
        "resolved": bool(low > TOLERANCE or high < TOLERANCE),
    }


def pixel_report(simulated: np.ndarray, emulated: np.ndarray, bins: int) -> dict[str, Any]:
    """Pixel-histogram statistics and whether the emulated histogram is indistinguishable."""
    c = compare_pixel_histograms(simulated, emulated, bins=bins)
    return {
        "ratio": c.ratio.tolist(),
        "ratio_error": c.ratio_error.tolist(),
        "chi2": c.chi2,
        "dof": c.dof,
        "p_value": c.p_value,
        "skewness": list(c.skewness),
        "kurtosis": list(c.kurtosis),
        "skewness_pull": c.skewness_pull,
        "kurtosis_pull": c.kurtosis_pull,
        "indistinguishable": bool(
            c.p_value >= PIXEL_P_MIN and abs(c.skewness_pull) < PIXEL_PULL_MAX and abs(c.kurtosis_pull) < PIXEL_PULL_MAX
        ),
    }


def run(variant: str, family: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Train one emulator and check it at the held-out parameters; prints as it goes."""
    sim = simulator_for(variant, args.n_pix, args.lognormal_noise)
    path = workdir / f"{variant}.h5"
    started = time.perf_counter()
    if not path.exists():
        simulate_to_hdf5(sim, n=args.n_train, path=path, seed=args.seed, chunk_size=500, progress=False)
    simulated_s = time.perf_counter() - started
    hyperparameters = {**DEFAULT_HYPERPARAMETERS[family], **json.loads(getattr(args, f"{family}_hyperparameters"))}
    overrides = {} if args.ema_decay is None else {"ema_decay": args.ema_decay if args.ema_decay > 0 else None}
    config = emulator_train_config(
        family,
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        patience=args.epochs,
        seed=args.seed,
        progress=False,
        **overrides,
    )
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    # The shifted log of lognormal maps takes the simulator's own shift; Gaussian maps have no floor.
    transform = {"pixel_transform": "shifted_log", "pixel_shift": sim.lambda_s} if (
        args.pixel_transform == "shifted_log" and variant == "lognormal") else {}
    emulator, history = train_emulator(path, family, hyperparameters, config=config, **transform)
    trained_s = time.perf_counter() - started
    print(
        f"\n== {variant} maps ({sim.n_pix}x{sim.n_pix}, noise={sim.noise}), {family} emulator {hyperparameters}, weight average {config.ema_decay}, pixel transform {transform or None}: "
        f"{args.n_train} training maps simulated in {simulated_s:.0f} s, {len(history.val_loss)} epochs in "
        f"{trained_s:.0f} s, final validation loss {history.val_loss[-1]:.4f}"
    )
    thetas = sim.prior.sample_numpy(args.n_theta, np.random.default_rng(args.theta_seed))
    results = []
    sampling_s = 0.0
    for i, theta in enumerate(thetas):
        simulated = sim.simulate(np.tile(theta, (args.n_simulated, 1)), np.random.default_rng([args.theta_seed, i]))["x"]
        started = time.perf_counter()
        emulated = emulator.sample(torch.as_tensor(theta), args.n_emulated, seed=args.seed + 1000 + i).numpy()
        sampling_s += time.perf_counter() - started
        spectrum = spectrum_report(sim, simulated, emulated, args.n_bins)
        label = ", ".join(f"{name}={value:.3f}" for name, value in zip(sim.parameter_names, theta))
        print(f"\ntheta = ({label})")
        print("  power spectrum, emulated / simulated per bin:")
        for ell, ratio, error in zip(spectrum["ell"], spectrum["ratio"], spectrum["ratio_error"]):
            print(f"    ell {ell:7.0f}   {ratio:6.3f} ± {error:5.3f}   pull {(ratio - 1) / error:+5.1f}")
        verdict = "PASS" if spectrum["passed"] else "FAIL"
        resolution = "resolved at 2σ" if spectrum["resolved"] else "not resolved at 2σ"
        print(
            f"  worst bin: ell {spectrum['ell'][spectrum['worst_bin']]:.0f}, |ratio - 1| = "
            f"{spectrum['worst_deviation']:.3f}: {verdict} against {TOLERANCE:.0%} ({resolution})"
        )
        entry: dict[str, Any] = {"theta": theta.tolist(), "spectrum": spectrum}
        if variant == "lognormal":
            pixels = pixel_report(simulated, emulated, args.pixel_bins)
            entry["pixels"] = pixels
            print("  pixel histogram, emulated / simulated fraction per equal-probability bin:")
            print("    " + "  ".join(f"{r:.2f}±{e:.2f}" for r, e in zip(pixels["ratio"], pixels["ratio_error"])))
            print(
                f"    chi2 = {pixels['chi2']:.1f} for {pixels['dof']} dof (p = {pixels['p_value']:.2g}); "
                f"skewness {pixels['skewness'][0]:.3f} simulated vs {pixels['skewness'][1]:.3f} emulated "
                f"(pull {pixels['skewness_pull']:+.1f}); excess kurtosis {pixels['kurtosis'][0]:.3f} vs "
                f"{pixels['kurtosis'][1]:.3f} (pull {pixels['kurtosis_pull']:+.1f}): "
                + ("indistinguishable" if pixels["indistinguishable"] else "DISTINGUISHABLE")
            )
        results.append(entry)
    passed = sum(r["spectrum"]["passed"] for r in results)
    print(
        f"\n{variant} / {family}: spectrum within {TOLERANCE:.0%} at {passed} of {len(results)} held-out theta; "
        f"sampling {args.n_emulated} maps per theta took {sampling_s / len(results):.1f} s"
    )
    return {
        "variant": variant,
        "family": family,
        "hyperparameters": hyperparameters,
        "ema_decay": config.ema_decay,
        "pixel_transform": transform,
        "simulator": sim.config(),
        "epochs": len(history.val_loss),
        "val_loss": history.val_loss,
        "train_seconds": trained_s,
        "sampling_seconds_per_theta": sampling_s / len(results),
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["gaussian", "lognormal"], choices=["gaussian", "lognormal"])
    parser.add_argument("--families", nargs="+", default=["diffusion"], choices=sorted(DEFAULT_HYPERPARAMETERS))
    parser.add_argument("--n-pix", type=int, default=16)
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--pixel-transform", choices=["none", "shifted_log"], default="shifted_log",
                        help="lognormal maps: learn ln(x + lambda_s) (MapEmulator's pixel_transform) or the pixels")
    parser.add_argument("--ema-decay", type=float, default=None,
                        help="weight average of training (default: the family's training defaults; 0: none)")
    parser.add_argument("--diffusion-hyperparameters", default="{}", help="JSON, merged into the defaults")
    parser.add_argument("--vae-hyperparameters", default="{}", help="JSON, merged into the defaults")
    parser.add_argument("--n-theta", type=int, default=4, help="held-out parameter points")
    parser.add_argument("--n-emulated", type=int, default=512, help="emulated maps per parameter point")
    parser.add_argument("--n-simulated", type=int, default=4096, help="simulated maps per parameter point")
    parser.add_argument("--n-bins", type=int, default=6, help="multipole bins of the power spectrum")
    parser.add_argument("--pixel-bins", type=int, default=10, help="equal-probability bins of the pixel histogram")
    parser.add_argument("--lognormal-noise", action="store_true", help="add shape noise to the lognormal maps")
    parser.add_argument("--seed", type=int, default=0, help="training set, weights and emulated maps")
    parser.add_argument("--theta-seed", type=int, default=12345, help="held-out parameters and their simulations")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write all figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = []
    with tempfile.TemporaryDirectory(prefix="sbi_gen_bench_emulator_") as tmp:
        for variant in args.variants:
            for family in args.families:
                runs.append(run(variant, family, args, Path(tmp)))
    print("\nsummary")
    for r in runs:
        worst = max(x["spectrum"]["worst_deviation"] for x in r["results"])
        line = f"  {r['variant']:<10}{r['family']:<10} worst spectrum deviation {worst:.3f} over {len(r['results'])} theta"
        if r["variant"] == "lognormal":
            line += f"; pixel histograms indistinguishable at {sum(x['pixels']['indistinguishable'] for x in r['results'])}"
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"arguments": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
