"""NPE on cosmology maps: the pooled CNN embedding (the default) against the dilated one.

Trains NPE (the default NSF) on the same simulated maps with each CNN for the same number of
epochs and prints seconds per epoch and the best validation loss (a held-out negative log
posterior density: lower is closer to the true posterior). For scale it also trains the NSF
on the maps' binned power spectrum (12 log bins), a near-sufficient summary of these Gaussian
fields. One CPU thread, training seed 0.

    python benchmarks/bench_cnn_embedding.py                          # 3,000 maps, 12 epochs: about 5 min
    python benchmarks/bench_cnn_embedding.py --epochs 40 --cnns pooled  # the pooled CNN alone, longer
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import simulators
from sbi_gen import load, simulate_to_hdf5
from sbi_gen.inference import NPE

CNNS = {"pooled": {"pool": True}, "dilated": {"pool": False}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="simulated maps (10%% held out for validation)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--cnns", nargs="+", default=list(CNNS), choices=list(CNNS))
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    simulator = simulators.get("cosmology")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "maps.h5"
        simulate_to_hdf5(simulator, n=args.n, path=path, seed=1, progress=False)
        data = load(path)
    spectrum = torch.as_tensor(simulator.summary(data.x.numpy(), log=True), dtype=torch.float32)
    runs = [(name, (data.theta, data.x), {"embedding_kwargs": CNNS[name]}) for name in args.cnns]
    runs.append(("power spectrum", (data.theta, spectrum), {}))
    print(f"{'embedding':<16}{'epochs':>7}{'s/epoch':>9}{'best val. loss':>16}{'at epoch':>10}")
    for name, training_set, options in runs:
        torch.manual_seed(args.seed)
        npe = NPE(simulator.prior, "nsf", **options)
        started = time.perf_counter()
        history = npe.fit(training_set, config=npe.train_config(progress=False, max_epochs=args.epochs, seed=args.seed))
        seconds = time.perf_counter() - started
        epochs = len(history.val_loss)
        print(f"{name:<16}{epochs:>7}{seconds / epochs:>9.2f}{history.best_val_loss:>16.3f}{history.best_epoch + 1:>10}",
              flush=True)


if __name__ == "__main__":
    main()
