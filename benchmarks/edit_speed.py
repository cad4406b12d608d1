"""Seconds per edit and EasyEdit-style teacher-forced scores on the first CounterFact cases.

    python benchmarks/edit_speed.py [--model smollm2-135m] [--methods ft-m ft-l] [--n 20] [--data PATH]

For each case: edit on the clean model, apply, score, revert (bit-exact). Scores are the reference
toolkit's teacher-forced conventions, so the figures compare with its published/measured numbers:
rewrite = token accuracy of target_new after the prompt; rephrase = the same after the rephrased
prompt; locality = fraction of the locality answer's tokens whose argmax is unchanged by the edit.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import lmedit
from lmedit.continuations import score_continuations

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "counterfact-edit.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=["ft-m", "ft-l"])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()

    records = json.loads(args.data.read_text())[: args.n]
    model = lmedit.load_model(args.model)
    requests = [lmedit.EditRequest(r["prompt"], r["subject"], r["target_new"], r["ground_truth"],
                                   rephrases=[r["rephrase_prompt"]],
                                   locality=[(r["locality_prompt"], r["locality_ground_truth"])], case_id=r["case_id"])
                for r in records]
    loc_prompts = [r.locality[0].prompt for r in requests]
    loc_answers = [r.locality[0].answer for r in requests]
    base_loc = score_continuations(model, loc_prompts, loc_answers)
    for method in args.methods:
        editor = lmedit.get_method(method)
        times, rewrite, rephrase, locality = [], [], [], []
        for req, base in zip(requests, base_loc):
            start = time.perf_counter()
            patch = editor.edit(model, req)
            times.append(time.perf_counter() - start)
            with patch.applied(model):
                rw, rp, lc = score_continuations(model, [req.prompt, req.rephrases[0], req.locality[0].prompt],
                                                 [req.target_new, req.target_new, req.locality[0].answer])
            rewrite.append(rw.token_accuracy)
            rephrase.append(rp.token_accuracy)
            locality.append(sum(a == b for a, b in zip(lc.argmax_ids, base.argmax_ids)) / len(base.argmax_ids))
        print(f"{method:6s} {args.model} n={len(requests)}: {statistics.mean(times):.2f} s/edit "
              f"(median {statistics.median(times):.2f}); rewrite {statistics.mean(rewrite):.2f}, "
              f"rephrase {statistics.mean(rephrase):.2f}, locality {statistics.mean(locality):.2f}")


if __name__ == "__main__":
    main()
