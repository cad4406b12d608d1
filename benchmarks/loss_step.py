"""Seconds per training-loss step (forward + backward of ``target_logprobs``) against the same step over all
of the last ``n_target + 1`` positions, the way every gradient-based editor (FT, LoRA, DEFER, GRACE, WISE)
computed its NLL before the unembedding was cut to the target-predicting positions.

    python benchmarks/loss_step.py [--model smollm2-135m gemma3-270m] [--rows 10] [--repeat 5]

The batch is WISE's shape: one ZsRE edit under ``rows`` context prefixes plus four earlier edits with their
own (shorter or longer) targets. Prints positions unembedded, seconds per step, the ratio, and the largest
difference between the two log-probability tensors. Run it on an idle machine: it measures wall time.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import lmedit
from lmedit.data import load_dataset
from lmedit.models.spec import get_module
from lmedit.scoring import encode, forward_logits, target_logprobs


def full_positions(model, batch) -> torch.Tensor:
    """The earlier computation: logits at the last ``n + 1`` positions of every row."""
    n = batch.n_target
    logits = forward_logits(model, batch, last=n + 1)[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, batch.input_ids[:, -n:, None])[..., 0]
    return logp * batch.target_mask[:, -n:]


def step_seconds(model, batch, fn, delta: torch.Tensor, repeat: int) -> tuple[float, torch.Tensor]:
    """Median wall time of ``fn``'s forward and backward to ``delta`` (a scale on a block's output)."""
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        with torch.enable_grad():
            out = fn(model, batch)
            (-out.sum()).backward()
        times.append(time.perf_counter() - start)
        delta.grad = None
    return statistics.median(times), out.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--rows", type=int, default=10, help="context prefixes of the edit")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    requests = load_dataset("zsre", n=5).requests
    edit, earlier = requests[4], requests[:4]
    for name in args.model:
        model = lmedit.load_model(name)
        prompts = [f"{'Note. ' * i}{edit.prompt}" for i in range(args.rows)] + [r.prompt for r in earlier]
        targets = [edit.target_new] * args.rows + [r.target_new for r in earlier]
        batch = encode(model, prompts, targets)
        delta = torch.ones(1, requires_grad=True)
        block = get_module(model.module, model.spec.block(model.spec.layer_at(0.75)))  # where WISE edits
        handle = block.register_forward_hook(
            lambda _m, _a, out: (out[0] * delta, *out[1:]) if isinstance(out, tuple) else out * delta)
        try:
            full_s, full = step_seconds(model, batch, full_positions, delta, args.repeat)
            cut_s, cut = step_seconds(model, batch, target_logprobs, delta, args.repeat)
        finally:
            handle.remove()
        n = batch.n_target
        print(f"{name}: {len(prompts)} rows, unembedded positions {len(prompts) * (n + 1)} -> "
              f"{int(batch.target_mask.sum())}; step {full_s:.3f} s -> {cut_s:.3f} s "
              f"({full_s / cut_s:.2f}x); max |Δ log p| {float((full - cut).abs().max()):.2e}")


if __name__ == "__main__":
    main()
