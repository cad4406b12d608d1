"""Evaluation throughput: how fast the harness scores cases, against a plain forward pass.

    python benchmarks/eval_throughput.py [--model smollm2-135m] [--data counterfact] [--n 200]

Measures, on the first ``n`` cases (rewrite + rephrase + locality probes, teacher-forced, probability
comparison and generation metrics):
  * unedited, all cases scored together (``method=None``);
  * ``single`` protocol with the empty edit ``none`` (each case edited, scored, reverted on its own);
  * a plain forward pass over the same (prompt + answer) token sequences, batched the same way,
    which is the floor any evaluator pays; the ratios are evaluation time / that forward time.
"""
from __future__ import annotations

import argparse
import time

import torch

import lmedit
from lmedit.data import load_dataset
from lmedit.evaluate import evaluate
from lmedit.evaluate.probes import probe_items
from lmedit.scoring import encode, forward_logits


def plain_forward_seconds(model, items, batch_size: int = 64) -> float:
    pairs = sorted(((it.prompt, it.answer) for it in items), key=lambda p: len(p[0]) + len(p[1]))
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            forward_logits(model, encode(model, [p for p, _ in chunk], [a for _, a in chunk]), last=1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="counterfact")
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    model = lmedit.load_model(args.model)
    data = load_dataset(args.data, n=args.n)
    items = probe_items(data.requests)
    tokens = sum(encode(model, [it.prompt], [it.answer]).input_ids.numel() for it in items)
    forward = plain_forward_seconds(model, items)
    print(f"{args.model} / {args.data}: {len(data)} cases, {len(items)} probes, {tokens} tokens")
    print(f"plain forward over the probes' tokens: {forward:.2f} s ({tokens / forward:.0f} tokens/s)")
    evaluate(model, None, data, progress=False)  # warm-up and the locality baseline cache
    for label, method in [("unedited, batched", None), ("single protocol, empty edit", "none")]:
        start = time.perf_counter()
        evaluate(model, method, data, progress=False)
        wall = time.perf_counter() - start
        print(f"{label:30s}: {wall:.2f} s = {len(data) / wall:.1f} cases/s; ratio to plain forward {wall / forward:.2f}")


if __name__ == "__main__":
    main()
