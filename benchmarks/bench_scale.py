"""Training beyond memory: peak memory of streamed training as the file grows, and GPU vs CPU.

1. For each size (default 1 GiB and 4 GiB of θ and x) it simulates a training set into HDF5
   with the store (a cheap linear-Gaussian simulator: 4 parameters, 1024 float32 observables,
   so 4 GiB is about a million rows), then trains NPE streamed from the file
   (``TrainConfig(streaming=True)``) for a short, fixed number of epochs in a fresh process per
   size, and reports that process's peak resident memory (``ru_maxrss``) with the ratio between
   the largest and the smallest size. Target: flat within 20%. ``--in-memory`` adds the same
   training with the file loaded, at the smallest size, for contrast.
2. When a CUDA GPU is present, NPE trainings on the GPU and on the CPU with identical settings:
   two_moons (small flows, where kernel launches dominate) and 64x64 cosmology maps with the
   CNN embedding (where convolutions dominate), and one streamed epoch of the smallest file
   on each; otherwise it says it skipped them. ``--skip-memory`` runs this part alone.

    python benchmarks/bench_scale.py                         # 1 GiB and 4 GiB (about 10 GiB of disk while simulating)
    python benchmarks/bench_scale.py --sizes 64MB 256MB      # quick
    python benchmarks/bench_scale.py --workdir /data/bench --keep   # reuse the files in later runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

N_PARAMETERS = 4
N_OBSERVABLES = 1024
CHUNK_SIZE = 1000
ESTIMATOR = {"transforms": 2, "hidden_features": [64, 64]}
_UNITS = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}


def parse_size(text: str) -> int:
    """``"256MB"`` → bytes (binary units: MB = 2^20, GB = 2^30)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMG]i?B)\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size such as 256MB or 4GB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _linear_gaussian():
    """x = θ W + 0.1 ε: cheap to simulate, large rows, a posterior worth learning."""
    from sbi_gen.priors import BoxUniform
    from sbi_gen.simulate import as_simulator

    weights = np.random.default_rng(0).normal(size=(N_PARAMETERS, N_OBSERVABLES)).astype(np.float32)

    def simulate(theta, rng):
        noise = rng.standard_normal((len(theta), N_OBSERVABLES), dtype=np.float32)
        return theta.astype(np.float32) @ weights + 0.1 * noise

    prior = BoxUniform([-1.0] * N_PARAMETERS, [1.0] * N_PARAMETERS)
    return as_simulator(simulate, prior, name="linear_gaussian_1024", observable_shape=(N_OBSERVABLES,))


def make_file(path: str, size: int) -> dict:
    from sbi_gen.store import read_info, simulate_to_hdf5

    row_bytes = 4 * (N_PARAMETERS + N_OBSERVABLES)
    n = max(CHUNK_SIZE, size // row_bytes // CHUNK_SIZE * CHUNK_SIZE)
    started = time.perf_counter()
    summary = simulate_to_hdf5(_linear_gaussian(), n, path, seed=1, chunk_size=CHUNK_SIZE, compression=None, progress=False)
    seconds = 0.0 if summary.already_complete else time.perf_counter() - started
    return {"rows": n, "file_bytes": read_info(path)["file_bytes"], "simulate_s": seconds}


def _rss_now() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child(path: str, streaming: bool, epochs: int, batch_size: int, device: str, threads: int) -> None:
    """Train in this process and print one JSON line: times, peak and baseline memory."""
    torch.set_num_threads(threads)
    from sbi_gen.inference import NPE
    from sbi_gen.train import TrainConfig

    model = NPE(None, "nsf", estimator_kwargs=ESTIMATOR, device=device)
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # its lazy imports are not data
    baseline = _rss_now()  # interpreter, torch and sbi_gen loaded, before any data
    config = TrainConfig(max_epochs=epochs, patience=epochs, batch_size=batch_size, progress=False,
                         streaming=streaming, device=device)
    started = time.perf_counter()
    history = model.fit(path, config=config)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({
        "seconds": seconds, "peak_rss": peak, "baseline_rss": baseline, "streaming": history.streaming,
        "n_train": history.n_train, "epochs": len(history.val_loss), "val_loss": history.best_val_loss,
    }))


def run_child(path: str, streaming: bool, args: argparse.Namespace, device: str = "cpu") -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", path, "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--device", device, "--threads", str(args.threads)]
    if not streaming:
        command.append("--no-streaming")
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training on {path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gib(value: float) -> str:
    return f"{value / (1 << 30):.2f} GiB"


def memory_section(args: argparse.Namespace, workdir: str) -> list[str]:
    print(f"Streamed NPE training, {args.epochs} epoch(s), batch {args.batch_size}, {args.threads} thread(s), "
          f"peak resident memory of a fresh process per size")
    print(f"{'size':>9}{'rows':>11}{'file':>12}{'simulate':>10}{'train':>9}{'rows/s':>9}{'baseline RSS':>14}"
          f"{'peak RSS':>12}{'peak-base':>12}")
    results, paths = [], []
    for size in sorted(args.sizes):
        path = os.path.join(workdir, f"scale-{size >> 20}MiB.h5")
        made = make_file(path, size)
        run = run_child(path, True, args)
        assert run["streaming"], "the benchmark must exercise the streaming path"
        results.append((size, made, run))
        paths.append(path)
        print(f"{size >> 20:>6}MiB{made['rows']:>11,}{_gib(made['file_bytes']):>12}{made['simulate_s']:>9.0f}s"
              f"{run['seconds']:>8.0f}s{run['n_train'] * run['epochs'] / run['seconds']:>9,.0f}"
              f"{_gib(run['baseline_rss']):>14}{_gib(run['peak_rss']):>12}{_gib(run['peak_rss'] - run['baseline_rss']):>12}",
              flush=True)
    if len(results) > 1:
        (small, _, first), (large, _, last) = results[0], results[-1]
        ratio = last["peak_rss"] / first["peak_rss"]
        growth = (last["peak_rss"] - last["baseline_rss"]) / max(first["peak_rss"] - first["baseline_rss"], 1)
        verdict = "flat within 20%: yes" if ratio <= 1.2 else "flat within 20%: NO"
        print(f"peak RSS {large >> 20} MiB / {small >> 20} MiB file: {ratio:.3f} ({verdict}); "
              f"above the baseline: {growth:.3f}; data ratio {large / small:.1f}")
    if args.in_memory:
        run = run_child(paths[0], False, args)
        print(f"for contrast, the {sorted(args.sizes)[0] >> 20} MiB file loaded in memory: train {run['seconds']:.0f} s, "
              f"peak RSS {_gib(run['peak_rss'])} (streamed: {_gib(results[0][2]['peak_rss'])})")
    return paths


def _time_fit(make_npe, theta: torch.Tensor, x: torch.Tensor, device: str, epochs: int, batch_size: int):
    """Seconds and history of one fixed-length NPE training on ``device``."""
    from sbi_gen.train import TrainConfig

    torch.manual_seed(0)
    npe = make_npe(device)
    config = TrainConfig(max_epochs=epochs, patience=epochs, batch_size=batch_size, progress=False, device=device)
    started = time.perf_counter()
    history = npe.fit((theta, x), config=config)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, history


def gpu_section(args: argparse.Namespace, paths: list[str]) -> None:
    if not torch.cuda.is_available():
        print("GPU vs CPU: skipped (no CUDA GPU: torch.cuda.is_available() is False)")
        return
    import simulators
    from sbi_gen.inference import NPE
    from sbi_gen.simulate import simulate

    torch.set_num_threads(args.threads)
    moons = simulators.get("two_moons")
    cosmology = simulators.get("cosmology", n_pix=args.gpu_map_pixels)
    workloads = [
        (f"NPE on two_moons, {args.gpu_n:,} simulations, NSF 5 x (128, 128), batch 256",
         moons, args.gpu_n, 256, lambda device: NPE(moons.prior, "nsf", estimator_kwargs={"transforms": 5, "hidden_features": [128, 128]},
                                                     device=device)),
        (f"NPE on cosmology maps {args.gpu_map_pixels}x{args.gpu_map_pixels}, {args.gpu_maps:,} simulations, "
         "NSF with the default CNN embedding, batch 128",
         cosmology, args.gpu_maps, 128, lambda device: NPE(cosmology.prior, device=device)),
    ]
    print(f"GPU vs CPU, {args.gpu_epochs} epochs each ({torch.cuda.get_device_name()}; CPU with {args.threads} thread(s))")
    for title, task, n, batch_size, make_npe in workloads:
        data = simulate(task, n=n, seed=0)
        theta, x = torch.as_tensor(data["theta"]).float(), torch.as_tensor(data["x"]).float()
        print(title, flush=True)
        seconds = {}
        for device in ("cpu", "cuda"):
            seconds[device], history = _time_fit(make_npe, theta, x, device, args.gpu_epochs, batch_size)
            print(f"  {device:<5} {seconds[device]:7.1f} s ({seconds[device] / len(history.val_loss):.2f} s/epoch), "
                  f"best validation loss {history.best_val_loss:.3f}", flush=True)
        print(f"  GPU speed-up: {seconds['cpu'] / seconds['cuda']:.1f}x", flush=True)
    if paths:
        for device in ("cpu", "cuda"):
            run = run_child(paths[0], True, args, device=device)
            print(f"  streamed {os.path.basename(paths[0])} on {device}: {run['seconds']:.1f} s "
                  f"for {run['epochs']} epoch(s), peak RSS {_gib(run['peak_rss'])}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[1 << 30, 4 << 30],
                        help="data sizes to stream, e.g. 256MB 1GB 4GB (default 1GB 4GB)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per training (default 1: one full pass)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each training process")
    parser.add_argument("--in-memory", action="store_true", help="also train on the smallest file loaded in memory")
    parser.add_argument("--gpu-n", type=int, default=50_000, help="simulations of the GPU vs CPU timing")
    parser.add_argument("--gpu-maps", type=int, default=5_000, help="cosmology maps of the GPU vs CPU timing")
    parser.add_argument("--gpu-map-pixels", type=int, default=64, help="side of the cosmology maps (default 64)")
    parser.add_argument("--gpu-epochs", type=int, default=5)
    parser.add_argument("--skip-memory", action="store_true", help="only the GPU vs CPU section")
    parser.add_argument("--workdir", default=None, help="where the files go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the files (rerunning with the same --workdir reuses them)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-streaming", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, not args.no_streaming, args.epochs, args.batch_size, args.device, args.threads)
        return
    workdir = args.workdir or tempfile.mkdtemp(prefix="sbi_gen_scale_")
    os.makedirs(workdir, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    needed = int(2.2 * max(args.sizes)) + sum(args.sizes)  # the file, its shards while simulating, the others
    if not args.skip_memory and free < needed:
        parser.error(f"{workdir} has {_gib(free)} free; these sizes need about {_gib(needed)} (use smaller --sizes)")
    paths: list[str] = []
    try:
        paths = [] if args.skip_memory else memory_section(args, workdir)
        gpu_section(args, paths)
    finally:
        if not args.keep:
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
            else:  # a directory of the user's: remove only the files made here
                for size in args.sizes:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(workdir, f"scale-{size >> 20}MiB.h5"))


if __name__ == "__main__":
    main()
