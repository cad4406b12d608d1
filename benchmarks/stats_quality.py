"""How many corpus tokens the second-moment statistics need: ROME quality against the token budget.

    python benchmarks/stats_quality.py [--n 20] [--budgets 1000 5000 20000 90000]

For each budget, ROME edits the first n CounterFact cases (each on the clean model) and scores the
rewrite (P(new) > P(true) on the prompt), the paraphrases and the neighbourhood prompts (P(true) >
P(new)); statistics are collected once per budget (cached).
"""
from __future__ import annotations

import argparse
import statistics
import time

import lmedit
from lmedit.data import load_dataset
from lmedit.continuations import score_prompts


def prob_wins(model, prompts, first, second) -> float:
    scores = score_prompts(model, prompts, [[first, second]] * len(prompts))
    return statistics.mean(float(s.continuations[0].mean_logprob > s.continuations[1].mean_logprob) for s in scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--budgets", type=int, nargs="+", default=[1000, 5000, 20000, 90000])
    args = parser.parse_args()
    model = lmedit.load_model(args.model)
    requests = load_dataset("counterfact-rome").requests[: args.n]
    print("tokens   efficacy  paraphrase  neighbourhood  s/edit")
    for budget in args.budgets:
        method = lmedit.get_method("rome", stats_tokens=budget)
        method.edit(model, requests[0])  # statistics (and templates) once
        eff, para, neigh, times = [], [], [], []
        for r in requests:
            start = time.perf_counter()
            patch = method.edit(model, r)
            times.append(time.perf_counter() - start)
            with patch.applied(model):
                eff.append(prob_wins(model, [r.prompt], r.target_new, r.target_true))
                para.append(prob_wins(model, list(r.rephrases), r.target_new, r.target_true))
                neigh.append(prob_wins(model, [p.prompt for p in r.locality], r.target_true, r.target_new)
                             if r.locality else 1.0)
        print(f"{budget:>7}  {statistics.mean(eff):8.2f}  {statistics.mean(para):10.2f}  {statistics.mean(neigh):13.2f}"
              f"  {statistics.mean(times):6.2f}")


if __name__ == "__main__":
    main()
