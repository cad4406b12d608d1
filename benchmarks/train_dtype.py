"""Seconds per training step of a gradient-trained editor with the model in float32 and in bfloat16.

    python benchmarks/train_dtype.py [--model gemma3-270m] [--data zsre] [--method wise]
                                     [--hparam mode=retrieve --hparam rehearse=8] [--steps 5] [--warm 9]

On a CPU with AVX-512 BF16 (or AMX) a bfloat16 matrix product runs several times faster than a float32 one,
and an editor's training step is mostly matrix products (the blocks above the edited layer and, on
Gemma-3's 262k-token vocabulary, the unembedding). For each dtype the model is loaded, ``warm`` edits are
made and applied first with one step each (so WISE has earlier edits to rehearse), then one more edit runs
exactly ``steps`` steps (``stop_loss=0``). Prints seconds per step, the ratio, and the edit's final loss and
NLL in each dtype (the step count is fixed, so the two losses compare). Run it on an idle machine: it
measures wall time; ``OMP_NUM_THREADS`` sets the threads.
"""
from __future__ import annotations

import argparse
import time

import torch

import lmedit
from lmedit.cli import _parse_hparams
from lmedit.data import load_dataset
from lmedit.methods import get_method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--data", default="zsre")
    parser.add_argument("--method", default="wise", choices=["wise", "grace", "ft-l", "ft-m", "ft-ewc", "lora"],
                        help="an editor trained for `steps` steps with a `stop_loss`")
    parser.add_argument("--hparam", action="append", default=[], help="key=value (repeatable)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warm", type=int, default=9, help="edits applied first, one step each")
    args = parser.parse_args()
    hparams = _parse_hparams(args.hparam)
    if args.method == "wise" and "corpus" not in hparams:
        hparams["corpus"] = f"{args.data}-train"
    requests = load_dataset(args.data, n=args.warm + 1).requests
    seconds: dict[str, float] = {}
    for dtype in ("float32", "bfloat16"):
        model = lmedit.load_model(args.model, dtype=dtype, device="cpu")
        for request in requests[: args.warm]:
            get_method(args.method, steps=1, **hparams).edit(model, request).apply(model)
        start = time.perf_counter()
        patch = get_method(args.method, steps=args.steps, stop_loss=0.0, **hparams).edit(model, requests[args.warm])
        seconds[dtype] = (time.perf_counter() - start) / args.steps
        info = patch.info
        print(f"{args.model} {dtype}: {seconds[dtype]:.3f} s/step (threads {torch.get_num_threads()}); "
              f"loss {info.get('loss')}, nll {info.get('nll')}")
        del model
    print(f"bfloat16 / float32 speed-up: {seconds['float32'] / seconds['bfloat16']:.2f}x")


if __name__ == "__main__":
    main()
