"""Detoxification by activation steering on the SafeEdit-derived prompts (``safety/`` in the benchmark data).

    python benchmarks/detox_demo.py [--model smollm2-135m] [--layers 10 14 18] [--multipliers 1 2 4]
                                    [--train 200] [--held-out 40] [--attacks 20]

A CAA vector from the first ``--train`` (of 135) unique unsafe questions (each with a refusal vs a compliance answer) is
added at one layer; scored on held-out questions and held-out adversarial attack prompts (the
``input`` field, truncated to 400 characters): refusal log-odds, the rate of answers with a refusal
marker (a proxy: swap in a toxicity classifier through ``detox_report(proxy=...)``) and fluency, plus
fluency on neutral prompts (the cost on ordinary use). Prompts are written in the model's chat template,
and the vector is read at the answer's opening word (refusal vs compliance) after the assistant header.
"""
from __future__ import annotations

import argparse
import json
import time

import lmedit
from lmedit.data import data_dir
from lmedit.steer import chat_prompt, detox_pairs, detox_report, steer, steering_vectors

NEUTRAL_QUESTIONS = ["Write a sentence about the ocean.", "What is a good name for a cat?", "Describe your favourite season.",
           "How do plants grow?", "Tell me about the city of Paris.", "What should I cook for dinner tonight?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs="+", default=[10, 14, 18])
    parser.add_argument("--multipliers", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--train", type=int, default=90, help="of the 135 unique questions")
    parser.add_argument("--held-out", type=int, default=45)
    parser.add_argument("--attacks", type=int, default=20)
    parser.add_argument("--data", default=None, help="the detoxify JSON file (default: the benchmark data's)")
    args = parser.parse_args()
    path = args.data or data_dir() / "safety" / "nlpcc2024_track2_detoxify_val.json"
    records = json.loads(open(path).read())
    questions = list(dict.fromkeys(r["question"] for r in records))  # unique questions, file order
    train, held = questions[: args.train], questions[args.train: args.train + args.held_out]
    train_set = set(train)
    attacks = [r["input"][:400] for r in records if r["attack name"] != "None" and r["question"] not in train_set]
    attacks = attacks[: args.attacks]
    model = lmedit.load_model(args.model)  # prompts are chat-formatted below, answers after the assistant header
    train, held, attacks = ([chat_prompt(model, q) for q in group] for group in (train, held, attacks))
    start = time.perf_counter()
    positive, negative = detox_pairs(train)
    vectors = steering_vectors(model, positive, negative, layers=args.layers)
    print(f"{len(train)} training questions, {len(held)} held-out questions, {len(attacks)} held-out attacks; "
          f"vectors in {time.perf_counter() - start:.1f} s")
    sets = {"questions": held, "attacks": attacks}
    print("layer  mult   set        refusal-logodds  safe-rate  fluency  neutral-fluency  example")

    def row(layer: str, mult: str) -> None:
        for name, prompts in sets.items():
            r = detox_report(model, prompts, [chat_prompt(model, q) for q in NEUTRAL_QUESTIONS])
            print(f"{layer:>5}  {mult:>4}   {name:<9}  {r['refusal_logodds']:+15.2f}  {r['safe_rate']:9.2f}  "
                  f"{r['fluency']:7.2f}  {r['neutral_fluency']:15.2f}  {r['example'][:60]!r}", flush=True)

    row("-", "0")
    for layer in args.layers:
        for multiplier in args.multipliers:
            with steer(model, {layer: vectors[layer]}, multiplier).applied(model):
                row(str(layer), f"{multiplier:g}")


if __name__ == "__main__":
    main()
