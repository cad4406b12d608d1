"""Speed of the locate-then-edit methods, with a breakdown by phase.

    python benchmarks/locate_speed.py [--model smollm2-135m] [--n 10] [--batch 100] [--stats-tokens 100000]
        [--parts stats,rome,vstep,vgroup,memit] [--hparam KEY=VALUE ...  (ROME's, as for `lmedit edit`)]

Prints: the statistics collector's tokens/s (fresh collection into a temporary cache, then the
cached load time); seconds per ROME edit over the first ``n`` CounterFact cases split into keys,
values (v*), solve; the v* loop's seconds per optimisation step against one forward pass over the
same prefixed prompts; MEMIT's v* for one group of 8 ZsRE requests (cases 8–15, 10 steps, no early
stop: the batched optimisation whose rows have targets of unequal lengths); one MEMIT batch of ``batch``
edits with its breakdown. Run it on an idle machine: it measures wall time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

import lmedit
from lmedit.cli import _parse_hparams
from lmedit.data import load_dataset
from lmedit.methods import keyvalue
from lmedit.scoring import forward_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--stats-tokens", type=int, default=100_000)
    parser.add_argument("--parts", default="stats,rome,vstep,vgroup,memit", help="which measurements, comma-separated")
    parser.add_argument("--hparam", action="append", default=[], help="a ROME hyper-parameter, KEY=VALUE")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    model = lmedit.load_model(args.model)
    requests = load_dataset("counterfact").requests[: max(args.n, args.batch)]
    rome = lmedit.get_method("rome", stats_tokens=args.stats_tokens, **_parse_hparams(args.hparam))
    layer = rome.hparams.resolve(model).layer
    if "stats" in parts:
        _statistics(model, layer, args.stats_tokens)
    if "rome" in parts:
        _rome(model, rome, requests[: args.n])
    if "vstep" in parts:
        _value_step(model, rome, layer, requests[0])
    if "vgroup" in parts:
        _value_group(model, load_dataset("zsre", n=16).requests[8:16])
    if "memit" in parts:
        _memit(model, requests[: args.batch], args.stats_tokens)


def _statistics(model, layer: int, stats_tokens: int) -> None:
    """Tokens/s of a fresh collection (in a throw-away cache), then the cached load."""

    # statistics: a fresh collection in a throw-away cache, then the normal (cached) path
    from lmedit.stats import second_moment

    saved_cache = os.environ.get("LMEDIT_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LMEDIT_CACHE"] = tmp
        start = time.perf_counter()
        moment = second_moment(model, layer, None, stats_tokens, progress=False)
        fresh = time.perf_counter() - start
    if saved_cache is None:
        os.environ.pop("LMEDIT_CACHE")
    else:
        os.environ["LMEDIT_CACHE"] = saved_cache
    second_moment(model, layer, None, stats_tokens, progress=False)  # make sure the real cache has it
    start = time.perf_counter()
    second_moment(model, layer, None, stats_tokens, progress=False)
    cached = time.perf_counter() - start
    print(f"statistics, layer {layer}: {moment.count} tokens in {fresh:.1f} s = {moment.count / fresh:.0f} tokens/s; "
          f"cached load {cached:.2f} s")



def _rome(model, rome, requests) -> None:
    """Seconds per ROME edit, one at a time, by phase."""
    rome.edit(model, requests[0])  # warm-up: context templates are generated once per model
    totals, phases, steps = [], {}, []
    for request in requests:
        start = time.perf_counter()
        patch = rome.edit(model, request)
        totals.append(time.perf_counter() - start)
        steps += patch.info["v_steps"]
        for k, v in patch.info["timing"].items():
            phases.setdefault(k, []).append(v)
    print(f"ROME, {len(requests)} edits: {statistics.mean(totals):.2f} s per edit (median {statistics.median(totals):.2f}); "
          + ", ".join(f"{k} {statistics.mean(v):.2f}" for k, v in phases.items())
          + f"; v* steps {statistics.mean(steps):.1f}")


def _value_step(model, rome, layer: int, request) -> None:
    """The v* loop's seconds per step against one forward pass over the same prefixed prompts."""
    hp = rome.hparams.resolve(model)
    templates = keyvalue.context_templates(model, [tuple(x) for x in hp.context_lengths])
    prompted = keyvalue.prefixed_prompts(model, [request], templates)
    with torch.no_grad():
        forward_logits(model, prompted.batch, last=1)
        start = time.perf_counter()
        for _ in range(3):
            forward_logits(model, prompted.batch, last=1)
        forward = (time.perf_counter() - start) / 3
    cfg = hp.value_config()
    with lmedit.methods.base.weight_transaction(model, []):
        times = {}
        for steps in (0, 10):
            cfg.steps, cfg.stop_prob = steps, 2.0
            start = time.perf_counter()
            keyvalue.optimize_values(model, layer, [request], templates, cfg)
            times[steps] = time.perf_counter() - start
    step = (times[10] - times[0]) / 10
    print(f"v*: {step:.3f} s per step (forward + backward from layer {layer}, prefix cached) vs {forward:.3f} s for "
          f"one full forward over the same {tuple(prompted.batch.input_ids.shape)} prompts: {step / forward:.2f}x")



def _value_group(model, requests) -> None:
    """Seconds for MEMIT's v* over one group of requests, a fixed 10 steps."""
    memit = lmedit.get_method("memit")
    hp = memit.hparams.resolve(model)
    templates = keyvalue.context_templates(model, [tuple(x) for x in hp.context_lengths])
    cfg = hp.value_config(group=len(requests), cache=False)
    cfg.steps, cfg.stop_prob = 10, 2.0
    with lmedit.methods.base.weight_transaction(model, []):
        start = time.perf_counter()
        delta, _, info = keyvalue.optimize_values(model, max(hp.layers), requests, templates, cfg,
                                                  memit.optimised_sites(model))
        seconds = time.perf_counter() - start
    print(f"v*, MEMIT, one group of {len(requests)} ZsRE requests x 10 steps: {seconds:.1f} s; "
          f"‖δ‖ {float(delta.norm()):.6f}, mean NLL {statistics.mean(info['nll']):.4f}")


def _memit(model, requests, stats_tokens: int) -> None:
    """One MEMIT batch, by phase."""
    memit = lmedit.get_method("memit", stats_tokens=stats_tokens)
    memit.edit(model, requests[:2])  # statistics for its layers, once
    start = time.perf_counter()
    patch = memit.edit(model, requests)
    total = time.perf_counter() - start
    print(f"MEMIT, one batch of {len(requests)}: {total:.1f} s ({total / len(requests):.2f} s per edit); "
          + ", ".join(f"{k} {v:.1f}" for k, v in patch.info["timing"].items())
          + f"; v* steps per edit: mean {statistics.mean(patch.info['v_steps']):.1f}, max {max(patch.info['v_steps'])}")


if __name__ == "__main__":
    main()
