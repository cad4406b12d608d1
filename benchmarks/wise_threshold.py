"""Re-score a WISE run's checkpointed state under other routing thresholds ε = act_ratio · min_act, and
with the memory chosen by whitened or plain key cosine (``SideMemory.key_metric``).

``act_ratio`` only decides, at inference, whether an input is let into the side memory: training never
reads it (``lmedit.methods.wise``). So the state a sequential run checkpointed after T edits, scored with
every memory's ``act_ratio`` set to r, scores exactly as a run with ``--hparam act_ratio=r`` would at
that T (``after_all`` scoring: all T edited cases, the model as it is after the T-th edit). One run thus
gives the whole trade-off between locality (unrelated inputs kept out) and reliability/generalisation
(edit inputs and rephrasings let in) without training again. The same holds for the choice among
memories (``--key-metric``): training never routes.

    python benchmarks/wise_threshold.py runs/smollm2-135m-bf16-hallucination-wise-retrieve-sequential-600 \
        --ratios 0.88,1.0,1.1,1.2 --key-metric whitened

Prints one row per ratio (the metrics of ``lmedit report``: Rel./Gen./Loc. teacher-forced, perplexity of the
edited targets; how many of the T cases' locality prompts the gate lets in and how many of their first
rephrasings it sends to the memory holding their edit, both bare, as at inference).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lmedit import Patch, load_model
from lmedit.adaptors import adaptors
from lmedit.evaluate.probes import case_records, locality_baseline, probe_items, score_probes
from lmedit.evaluate import run_requests, summarize
from lmedit.methods.side_memory import SideMemory
from lmedit.models.bundled import cache_dir
from lmedit.scoring import encode

COLUMNS = (("rewrite_tf", "Rel.(tf)"), ("rephrase_tf", "Gen.(tf)"), ("locality_tf", "Loc.(tf)"), ("rewrite_ppl", "PPL"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a sequential WISE run directory with a state/ checkpoint")
    parser.add_argument("--ratios", default="0.88,1.0,1.1,1.2", help="comma-separated act_ratio values")
    parser.add_argument("--key-metric", default="whitened", choices=["whitened", "cosine"],
                        help="how the memory is chosen among several (SideMemory.key_metric)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = json.loads((args.run / "run.json").read_text())
    progress = json.loads((args.run / "state" / "progress.json").read_text())
    edited = progress["chunks_done"] * config["batch_size"]
    dtype = config["model"]["dtype"].removeprefix("torch.")
    model = load_model(config["model"]["name"], dtype=dtype)
    requests = run_requests(args.run)[:edited]
    items = probe_items(requests)
    baseline = locality_baseline(model, items, cache_dir() / "eval")
    Patch.load(args.run / "state" / "patch").apply(model)
    side = next(a for a in adaptors(model).values() if isinstance(a, SideMemory))
    side.key_metric = args.key_metric
    loc_prompts = [it.prompt for it in items if it.kind == "locality"]
    holder = {p: j for j, m in enumerate(side.memories) for p in m.prompts}
    rephrasings = [(r.rephrases[0], holder.get(r.prompt)) for r in requests if r.rephrases]
    print(f"{args.run.name}: {edited} edits in {len(side.memories)} memories "
          f"(min_act {', '.join(f'{m.min_act:.1f}' for m in side.memories)}); {dtype}; key_metric {args.key_metric}")
    print("| act_ratio | " + " | ".join(name for _, name in COLUMNS) +
          " | locality prompts let in | rephrasings to their memory | s |")
    print("|---" * (len(COLUMNS) + 4) + "|")
    for ratio in [float(r) for r in args.ratios.split(",")]:
        start = time.perf_counter()
        for memory in side.memories:
            memory.act_ratio = ratio
        side.forget_route()
        records = case_records(requests, items, score_probes(model, items, generation=False), baseline)
        overall = summarize(records)["overall"]
        let_in = sum(_route(model, side, p) >= 0 for p in loc_prompts)
        own = sum(_route(model, side, p) == j for p, j in rephrasings)
        cells = [f"{overall[key]:.3f}" if key in overall else "–" for key, _ in COLUMNS]
        print(f"| {ratio} | " + " | ".join(cells) + f" | {let_in} / {len(loc_prompts)} | "
              f"{own} / {len(rephrasings)} | {time.perf_counter() - start:.0f} |", flush=True)


@torch.no_grad()
def _route(model, side: SideMemory, prompt: str) -> int:
    """The memory that answers ``prompt`` (bare, as at inference; -1: the main memory)."""
    batch = encode(model, [prompt]).to(model.device)
    side.forget_route()
    model.module(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return int(side.last_route[0])


if __name__ == "__main__":
    main()
