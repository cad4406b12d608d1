"""The targets' log-probabilities and their gradient: ``scoring.token_logprobs`` (chunked, fused) against the
plain ``log_softmax(logits.float()).gather(targets)``, forward and backward, on random logits.

    python benchmarks/token_logprobs.py [--rows 250] [--vocab 262144] [--dtype bfloat16] [--repeat 3]

Prints the best-of-``repeat`` milliseconds of each, the ratio, and the largest difference of the values and
gradients. Gemma-3's vocabulary is 262,144 tokens, SmolLM2's 49,152; a WISE step on Gemma-3 reads ~50–250
rows. ``OMP_NUM_THREADS`` sets the threads; run it on an idle machine.
"""
from __future__ import annotations

import argparse
import time

import torch

from lmedit.scoring import token_logprobs


def plain(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None])[:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=250)
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(args.rows, args.vocab, generator=gen) * 3).to(args.device, getattr(torch, args.dtype))
    targets = torch.randint(0, args.vocab, (args.rows,), generator=gen).to(args.device)
    weights = torch.randn(args.rows, generator=gen).to(args.device)
    best: dict[str, float] = {}
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for _ in range(args.repeat):
        for name, fn in (("fused", token_logprobs), ("plain", plain)):
            z = logits.clone().requires_grad_()
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            value = fn(z, targets)
            (value * weights).sum().backward()
            if args.device == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
            results[name] = (value.detach(), z.grad)
    value_diff = float((results["fused"][0] - results["plain"][0]).abs().max())
    grad_diff = float((results["fused"][1].float() - results["plain"][1].float()).abs().max())
    print(f"{args.rows} x {args.vocab} {args.dtype} on {args.device} (threads {torch.get_num_threads()}): "
          f"plain {best['plain'] * 1e3:.0f} ms, fused {best['fused'] * 1e3:.0f} ms "
          f"({best['plain'] / best['fused']:.1f}x); max difference: values {value_diff:.2g}, gradients {grad_diff:.2g}")


if __name__ == "__main__":
    main()
