"""Per observation and parameter: the posterior's standard deviation, the reference's against NPE's.

C2ST says how far a posterior is from the reference, not where. On slcp the amortized NPE does
well on most observations and badly on those whose posterior is very narrow in one parameter
(its width varies by two orders of magnitude with x); this script shows that, with the same
simulations, observations and reference samples as `compare_sbi.py` and `study_nsf_defaults.py`.

    python benchmarks/posterior_widths.py --task slcp --seed 0
    python benchmarks/posterior_widths.py --task slcp --seed 0 --embedding resmlp
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from compare_sbi import task_setup  # same folder: `python benchmarks/posterior_widths.py`

from sbi_gen.c2st import c2st
from sbi_gen.inference import NPE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="slcp")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--embedding", default=None, help="embedding of x (default: NPE's)")
    parser.add_argument("--n-simulations", type=int, default=10_000)
    parser.add_argument("--n-obs", type=int, default=4)
    parser.add_argument("--n-samples", type=int, default=2_000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = argparse.Namespace(n_simulations=args.n_simulations, n_obs=args.n_obs, n_samples=args.n_samples, seed=0)
    task, theta, x, observations, references = task_setup(args.task, setup)
    torch.manual_seed(args.seed)
    npe = NPE(task.prior, embedding=args.embedding)
    npe.fit((theta, x), config=npe.train_config(progress=False, seed=args.seed))
    names = task.prior.names
    print(f"{args.task}, NPE ({npe.estimator_name}, embedding {args.embedding or 'default'}), training seed {args.seed}")
    print(f"{'obs':>3} {'C2ST':>6}  " + "  ".join(f"{name + ' ref / npe (ratio)':>26}" for name in names))
    for i, (x_o, reference) in enumerate(zip(observations, references, strict=True)):
        samples = npe.posterior(x_o).sample((args.n_samples,)).numpy()
        ref_std, npe_std = np.asarray(reference).std(0), samples.std(0)
        cells = [f"{r:>9.3f} / {q:>6.3f} ({q / r:>5.1f}×)" for r, q in zip(ref_std, npe_std, strict=True)]
        print(f"{i:>3} {c2st(reference, samples):>6.3f}  " + "  ".join(f"{cell:>26}" for cell in cells))


if __name__ == "__main__":
    main()
