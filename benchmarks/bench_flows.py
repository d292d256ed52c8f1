"""Cost of a training step and of sampling for the flow estimators, against zuko's own flows.

sbi_gen's NSF and MAF are zuko's architectures (same modules, same state-dict) with a
hand-written spline gradient, a pass-by-pass inverse and (in training) the fused AdamW update.
This script loads the same weights into ``zuko.flows.NSF`` / ``zuko.flows.MAF`` and times, on
the same data and one thread by default:

- one training step (negative log-likelihood, backward, AdamW update) on a batch of 512;
- drawing 4,096 samples for one condition.

It prints milliseconds and the ratio ours / zuko (< 1 is faster), best of ``--repeats``.

Usage:
    python benchmarks/bench_flows.py
    python benchmarks/bench_flows.py --dims 2 10 --estimators nsf --repeats 20
    python benchmarks/bench_flows.py --device cuda   # where a GPU exists (benchmarks/gpu_check.sh runs it)
"""

from __future__ import annotations

import argparse
import time

import torch
import zuko

from sbi_gen.estimators import build_estimator


def _best(fn, repeats: int, device: torch.device) -> float:
    def timed() -> float:
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    timed()  # warm-up
    return min(timed() for _ in range(repeats))


def _reference(name: str, est) -> torch.nn.Module:
    sizes = {"transforms": est.transforms, "hidden_features": list(est.hidden_features), "passes": est.passes}
    if name == "nsf":
        flow = zuko.flows.NSF(est.y_dim, est.context_features, bins=est.bins, **sizes)
    else:
        flow = zuko.flows.MAF(est.y_dim, est.context_features, **sizes)
    flow.load_state_dict(est.flow.state_dict())
    return flow


def _optimizer(params, fused: bool) -> torch.optim.Optimizer:
    try:
        return torch.optim.AdamW(params, lr=1e-5, fused=fused)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-5)


def bench(name: str, dim: int, context: int, batch: int, n_samples: int, repeats: int,
          device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    est = build_estimator(name, dim, (context,))
    reference = _reference(name, est).to(device)
    est.to(device)
    y, h = torch.randn(batch, dim, device=device), torch.randn(batch, est.context_features, device=device)
    h_one = torch.randn(est.context_features, device=device)
    results = {}
    for label, flow, fused in (("ours", est.flow, True), ("zuko", reference, False)):
        optimizer = _optimizer(flow.parameters(), fused)

        def step(flow=flow, optimizer=optimizer):
            loss = -flow(h).log_prob(y).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def sample(flow=flow):
            with torch.no_grad():
                flow(h_one).sample((n_samples,))

        results[f"{label}_step"] = _best(step, repeats, device)
        results[f"{label}_sample"] = _best(sample, max(3, repeats // 5), device)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--estimators", nargs="+", default=["nsf", "maf"], choices=["nsf", "maf"])
    parser.add_argument("--dims", nargs="+", type=int, default=[2, 5, 10])
    parser.add_argument("--context", type=int, default=10, help="dimension of the condition")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--n-samples", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, {args.threads} CPU thread(s)")
    print(f"{'flow':<6}{'D':>4}{'step ours':>12}{'zuko':>9}{'ratio':>8}{'sample ours':>14}{'zuko':>9}{'ratio':>8}")
    for name in args.estimators:
        for dim in args.dims:
            r = bench(name, dim, args.context, args.batch, args.n_samples, args.repeats, device)
            print(f"{name:<6}{dim:>4}{1e3 * r['ours_step']:>10.1f}ms{1e3 * r['zuko_step']:>7.1f}ms"
                  f"{r['ours_step'] / r['zuko_step']:>8.2f}{1e3 * r['ours_sample']:>12.1f}ms"
                  f"{1e3 * r['zuko_sample']:>7.1f}ms{r['ours_sample'] / r['zuko_sample']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
