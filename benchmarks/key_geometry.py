"""The geometry of an MLP's keys at the layer a memory-based editor writes to, model against model.

    python benchmarks/key_geometry.py [--model smollm2-135m gemma3-270m] [--depth 0.871] [--n 40]

For the first ``n`` ZsRE edit prompts, at the layer ``model.spec.layer_at(depth)`` (default 27/31, WISE's and
DEFER's depth fraction), with ``a`` the input of that layer's ``W_out`` (the key) at every prompt token:

* mean ``‖a‖₂`` and ``‖a‖₁`` — the scale a gradient step on a weight beside ``W_out`` is multiplied by (Adam moves
  a gate logit by ``lr · ‖a‖₁`` per step, SGD moves ``τ a`` by ``lr · ‖a‖₂²``);
* mean ``‖W_out a‖₂`` and ``W_out``'s root-mean-square entry — the layer output's own scale, against which a side
  memory's ``τ a`` and its routing margins are large or small;
* the cosine between different prompts' last-token keys (mean, median, largest) — how alike the keys are, so how
  far training one edit moves the others' outputs through a shared side memory.

These are the figures quoted in ``lmedit.methods.defer`` (the gate step) and ``lmedit.methods.wise`` (rehearsal
on Gemma-3). One forward pass per model; a few seconds.
"""
from __future__ import annotations

import argparse

import torch

import lmedit
from lmedit.data import load_dataset
from lmedit.hooks import read_module
from lmedit.models.spec import get_module
from lmedit.scoring import encode


@torch.no_grad()
def key_geometry(model, prompts: list[str], depth: float) -> dict[str, float]:
    """The figures of the module docstring for ``prompts`` at ``model.spec.layer_at(depth)``."""
    layer = model.spec.layer_at(depth)
    path = model.spec.path(layer, "mlp_out")
    batch = encode(model, prompts)
    keys = read_module(model, batch, path).float()  # [B, L, d_mlp], left-padded
    weight = get_module(model.module, path).weight.detach().float()
    if weight.shape[0] == keys.shape[-1]:  # Conv1D stores W_out transposed
        weight = weight.T
    tokens = keys[batch.attention_mask.bool()]
    last = torch.nn.functional.normalize(keys[:, -1], dim=-1)
    cosine = (last @ last.T)[~torch.eye(len(prompts), dtype=torch.bool)]
    return {"layer": layer, "key_l2": float(tokens.norm(dim=-1).mean()), "key_l1": float(tokens.abs().sum(-1).mean()),
            "output_l2": float((tokens @ weight.T).norm(dim=-1).mean()), "weight_rms": float(weight.pow(2).mean().sqrt()),
            "cosine_mean": float(cosine.mean()), "cosine_median": float(cosine.median()), "cosine_max": float(cosine.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--depth", type=float, default=27 / 31, help="depth fraction of the layer (default 27/31)")
    parser.add_argument("--n", type=int, default=40, help="ZsRE edit prompts (at least 2)")
    args = parser.parse_args()
    if args.n < 2:
        parser.error("--n must be at least 2 (the cosine is between different prompts)")
    prompts = [r.prompt for r in load_dataset("zsre", n=args.n)]
    print("| model | layer | mean ‖a‖₂ | mean ‖a‖₁ | mean ‖W_out a‖₂ | W_out rms | cosine between prompts (mean / median / max) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.model:
        g = key_geometry(lmedit.load_model(name), prompts, args.depth)
        print(f"| {name} | {g['layer']} | {g['key_l2']:.2f} | {g['key_l1']:.1f} | {g['output_l2']:.2f} | "
              f"{g['weight_rms']:.4f} | {g['cosine_mean']:.3f} / {g['cosine_median']:.3f} / {g['cosine_max']:.3f} |")


if __name__ == "__main__":
    main()
