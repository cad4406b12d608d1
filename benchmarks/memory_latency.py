"""Inference cost of the memory-based editors at T edits: latency overhead per query and added parameters.

    python benchmarks/memory_latency.py [--model smollm2-135m] [--T 1000 10000] [--queries 40]
    python benchmarks/memory_latency.py --state runs/<sequential run>/state    # a real edited state
    python benchmarks/memory_latency.py --model gemma3-270m --dtype bfloat16 --state runs/<bf16 run>/state

A query is one ZsRE prompt answered with ``generate`` (prefill + 10 greedy tokens, batch 1): what a user
of an edited model waits for. Each configuration's median seconds per query is compared with the
unedited model's on the same query, configurations taking turns so drifts in load hit all alike.

What is timed is the memory's *structure* at size T, built directly through each method's own patch
component (the same code path inference runs after real edits), with placeholder contents:

- GRACE: a codebook of T entries (keys with the statistics of the layer's real inputs, radius 1); every
  query pays the distance to all T keys at every position.
- WISE-Merge: one side memory (merging keeps one for any T); WISE-Retrieve: one memory per merge group
  (``default_sharding``: ⌈T/1000⌉ at 7B; on small models every shard is kept, ⌈T/49⌉ on SmolLM2).
  Each memory carries one anchor per edit (``retrieve_by="key"``, the default, picks the memory by them).
  Both are timed twice: routing only (no memory answers) and routed (a memory answers every query,
  the extra side-FFN product included) — real traffic lies between the two.
- DEFER: one gate + adaptor (its size does not grow with T).
- IKE: T stored facts (ZsRE sentences, placeholder embeddings); a query pays the retrieval embedding
  pass and the longer prompt.
Weight-editing methods (FT-L/FT-M, LoRA merged, FT-EWC, ROME, MEMIT, AlphaEdit …) add no inference
cost: their patches change the weights in place.

With ``--state DIR`` the edit state a sequential run checkpointed (``DIR/patch``) is timed instead.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
import uuid
from typing import Any, Callable

import torch

import lmedit
from lmedit.data import load_dataset
from lmedit.hooks import Hooks
from lmedit.methods.defer import DEFER, DeferralEdit
from lmedit.methods.grace import CodebookEdit
from lmedit.methods.ike import ContextFacts
from lmedit.methods.side_memory import Memory, SideMemoryEdit
from lmedit.methods.wise import default_mask_ratio, default_sharding
from lmedit.patch import Patch
from lmedit.continuations import generate
from lmedit.scoring import join, tokenize


def layer_inputs(model: Any, path: str, prompts: list[str]) -> torch.Tensor:
    """The real inputs ``[n_tokens, d_mlp]`` of module ``path`` over ``prompts`` (for key statistics)."""
    rows = []
    for p in prompts:
        ids = torch.tensor([tokenize(model, p)[0]], device=model.device)
        with Hooks(model.module) as hooks, torch.no_grad():
            key = hooks.read(path, "input")
            hooks.forward_until(path, model.module, input_ids=ids, use_cache=False)  # the layers above never run
            rows.append(hooks[key][0].float().cpu())
    return torch.cat(rows)


def grace(model: Any, T: int, path: str, stats: torch.Tensor) -> Patch:
    g = torch.Generator().manual_seed(0)
    mu, sd = stats.mean(0), stats.std(0)
    keys = mu + sd * torch.randn(T, stats.shape[1], generator=g)
    values = torch.randn(T, model.spec.hidden_size, generator=g)
    comp = CodebookEdit(path, [f"g{i}" for i in range(T)], keys, values, torch.ones(T), ["x"] * T, {})
    return Patch("grace", {}, [], model.fingerprint, [comp])


def wise(model: Any, T: int, path: str, mode: str, routed: bool) -> Patch:
    d_model, d_mlp = model.spec.hidden_size, model.spec.mlp_size
    shard_size, merge_every = default_sharding(mode, d_model, d_mlp, default_mask_ratio(d_model, d_mlp))
    n = 1 if mode == "merge" else max(1, math.ceil(T / merge_every))  # memories once merged (or kept apart)
    g = torch.Generator().manual_seed(0)
    threshold = 0.0 if routed else float("inf")
    edits = [min(T - i * merge_every, merge_every) if mode == "retrieve" else T for i in range(n)]
    memories = [Memory(uuid.uuid4().hex[:16], i, 1e-3 * torch.randn(d_model, d_mlp, generator=g), None,
                       edits[i], threshold, 1.0, merged=mode == "merge",
                       anchors=torch.nn.functional.normalize(torch.randn(edits[i], d_mlp, generator=g), dim=-1))
                for i in range(n)]  # anchors: one per edit, as retrieve_by="key" (the default) stores them
    return Patch("wise", {}, [], model.fingerprint, [SideMemoryEdit(path, [], memories)])


def defer(model: Any, path: str) -> Patch:
    state = DEFER._initial(model, path)
    state["gate_b"] = torch.tensor(10.0)  # the gate opens everywhere: the adaptor answers every position
    return Patch("defer", {}, [], model.fingerprint, [DeferralEdit(path, None, state, 0.5, -1, 0)])


def ike(model: Any, T: int, facts: list[str]) -> Patch:
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(T, model.spec.hidden_size, generator=g), dim=1)
    texts = [facts[i % len(facts)] for i in range(T)]
    return Patch("ike", {}, [], model.fingerprint, [ContextFacts([f"i{i}" for i in range(T)], texts, emb)])


def added_parameters(patch: Patch) -> int:
    return sum(t.numel() for c in patch.components for t in c.tensors().values())


def time_query(model: Any, prompt: str, tokens: int) -> float:
    """Seconds for prefill + exactly ``tokens`` greedy steps (EOS does not end it: equal work everywhere)."""
    t0 = time.perf_counter()
    generate(model, [prompt], max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", help="load the model in this dtype (a --state saved from a bfloat16 run)")
    parser.add_argument("--T", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--state", help="time this checkpointed edit state (a sequential run's state dir)")
    parser.add_argument("--only", nargs="+", choices=["grace", "wise", "ike", "defer"],
                        default=["grace", "wise", "ike", "defer"], help="the memory editors to time")
    args = parser.parse_args()

    model = lmedit.load_model(args.model, dtype=args.dtype)
    cases = load_dataset("zsre", n=max(args.queries, 200))
    prompts = [r.prompt for r in cases.requests[: args.queries]]
    facts = ["".join(join(r.prompt, r.target_new)).strip() + "." for r in cases.requests]
    path = model.spec.path(model.spec.layer_at(27 / 31), "mlp_out")

    configs: dict[str, Callable[[], Patch]] = {}
    if args.state:
        configs[f"state {args.state}"] = lambda: Patch.load(f"{args.state}/patch")
    else:
        stats = layer_inputs(model, path, prompts[:20])
        for T in args.T:
            if "grace" in args.only:
                configs[f"GRACE T={T}"] = lambda T=T: grace(model, T, path, stats)
            for mode in ("merge", "retrieve") if "wise" in args.only else ():
                for routed in (False, True):
                    configs[f"WISE-{mode.capitalize()} T={T} {'routed' if routed else 'routing only'}"] = \
                        lambda T=T, mode=mode, routed=routed: wise(model, T, path, mode, routed)
            if "ike" in args.only:
                configs[f"IKE T={T}"] = lambda T=T: ike(model, T, facts)
        if "defer" in args.only:
            configs["DEFER (any T)"] = lambda: defer(model, path)

    patches = {name: make() for name, make in configs.items()}
    names = ["unedited", *patches]
    for p in prompts[:3]:  # warm-up
        time_query(model, p, args.tokens)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for q, prompt in enumerate(prompts):  # paired design: every configuration answers the same query in turn
            shift = (r * len(prompts) + q) % len(names)
            for name in names[shift:] + names[:shift]:
                if name == "unedited":
                    times[name].append(time_query(model, prompt, args.tokens))
                else:
                    with patches[name].applied(model):
                        times[name].append(time_query(model, prompt, args.tokens))
    base = statistics.median(times["unedited"])
    print(f"model {args.model}, {args.queries} ZsRE queries × {args.rounds} rounds, batch 1, "
          f"prefill + {args.tokens} greedy tokens; torch threads {torch.get_num_threads()}")
    print("overhead = median over queries of (time with the memory / time unedited), the same query in turn")
    print(f"{'configuration':44s} {'ms/query':>9s} {'overhead':>9s} {'added params':>13s}")
    print(f"{'unedited':44s} {1000 * base:9.1f} {'':>9s} {0:13,d}")
    for name, patch in patches.items():
        ratio = statistics.median(a / b for a, b in zip(times[name], times["unedited"]))
        print(f"{name:44s} {1000 * statistics.median(times[name]):9.1f} {100 * (ratio - 1):8.1f}% "
              f"{added_parameters(patch):13,d}")


if __name__ == "__main__":
    main()
