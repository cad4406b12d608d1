"""Do a sequential AlphaEdit run's first edits still hold where they were written, after the later ones?

    python benchmarks/edited_key_drift.py runs/smollm2-135m-zsre-alphaedit-preserve10-sequential-600 [--n 100]

Loads the run's checkpoint (``state/patch``: the accumulated ``ΔW`` of every edit layer and the keys each edit
recorded when it was written), applies it, and for the run's first ``n`` ZsRE edits prints per edit layer:

* the keys' drift: ``‖k_now − k_recorded‖ / ‖k_recorded‖`` (mean), and its part inside AlphaEdit's null space ``P``
  (the directions its updates use) — later updates at the lower edit layers move the keys the upper ones see;
* how the accumulated update answers them: ``‖ΔW k‖`` at the recorded and the current keys and their cosine;

and the first edits' Rel.(tf) (teacher-forced token accuracy of the new target) with the accumulated ``ΔW`` added
at every position (as the run scores them), only at each prompt's subject's last token (where the edits were
written), and nowhere (the unedited model). With the run's ``cases.jsonl`` (``lmedit report RUN --retention``)
this separates forgetting at the written keys from forgetting through the prompt's other positions. Reads the
run; edits nothing on disk.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

import lmedit
from lmedit.data import load_dataset
from lmedit.methods import get_method
from lmedit.methods.keyvalue import compute_keys, context_templates, subject_last_token
from lmedit.methods.solvers import nullspace_projector
from lmedit.hooks import Hooks
from lmedit.patch import EditedKeys, Patch, WeightDelta
from lmedit.scoring import encode, forward_logits
from lmedit.stats import second_moments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--n", type=int, default=100)
    args = parser.parse_args()
    if not (args.run / "state" / "patch" / "patch.json").exists():
        parser.error(f"{args.run} holds no checkpoint (state/patch): a finished run's state may have left git")
    config = json.loads((args.run / "run.json").read_text())
    model = lmedit.load_model(config["model"]["name"])
    method = get_method(config["method"])
    known = {f.name for f in dataclasses.fields(method.hparams)}  # a run may name a setting since removed
    hp = get_method(config["method"], **{k: v for k, v in config.get("hparams", {}).items() if k in known})
    hp = hp.hparams.resolve(model)
    source = Path(config["dataset"]["path"])
    requests = list(load_dataset(source if source.exists() else config["dataset"]["name"], n=args.n))
    templates = context_templates(model, [tuple(x) for x in hp.context_lengths])
    layers = list(hp.layers)
    moments = second_moments(model, layers, hp.corpus, hp.stats_tokens)
    patch = Patch.load(args.run / "state" / "patch")
    recorded = {c.param: c.keys for c in patch.components if isinstance(c, EditedKeys)}
    in_out = model.spec.weight_layout == "in_out"  # GPT-2's Conv1D stores Wᵀ
    delta = {c.param: (c.dense().T if in_out else c.dense()).double()  # ΔW as [d_model, d_mlp]
             for c in patch.components if isinstance(c, WeightDelta)}
    patch.apply(model)
    print(f"{args.run.name}: first {args.n} edits, after {patch.info.get('chunks_done')} edit calls")
    for i, layer in enumerate(layers):
        name = f"{model.spec.path(layer, 'mlp_out')}.weight"
        moment = moments[layer] if isinstance(moments, dict) else moments[i]
        P, _ = nullspace_projector(moment.mean, hp.nullspace_threshold, hp.nullspace_energy)
        then, now = recorded[name][:args.n].double(), compute_keys(model, layer, requests, templates).double()
        drift = ((now - then).norm(dim=1) / then.norm(dim=1)).mean()
        drift_p = (((now - then) @ P).norm(dim=1) / (then @ P).norm(dim=1)).mean()
        out_then, out_now = then @ delta[name].T, now @ delta[name].T
        cos = torch.nn.functional.cosine_similarity(out_then, out_now, dim=1).mean()
        print(f"layer {layer}: key drift {float(drift):.3f} (in P {float(drift_p):.3f}); ‖ΔW k‖ recorded "
              f"{float(out_then.norm(dim=1).mean()):.2f}, now {float(out_now.norm(dim=1).mean()):.2f}, cosine {float(cos):.3f}")

    patch.revert()
    where = {"every position": "all", "the subject's last token": "subject", "no position (the unedited model)": "none"}
    for label, mode in where.items():
        print(f"first {args.n} edits, Rel.(tf) with ΔW at {label}: {rewrite_accuracy(model, requests, delta, mode):.3f}")


def rewrite_accuracy(model: object, requests: list, delta: dict[str, torch.Tensor], mode: str) -> float:
    """Mean teacher-forced token accuracy of each request's new target, with ``ΔW k`` added to ``W_out``'s
    output at every position (``all``), at the subject's last token (``subject``) or nowhere (``none``)."""
    accuracies = []
    for request in requests:
        # one row, no padding, one pass over prompt and target (the scorer's cached prompt prefix would hide
        # the positions from the hooks)
        batch = encode(model, [request.prompt], [request.target_new])
        mask = torch.zeros(batch.input_ids.shape[1], 1)
        if mode == "all":
            mask[:] = 1.0
        elif mode == "subject":
            mask[subject_last_token(model, request.prompt, request.subject_span()[1])] = 1.0
        with Hooks(model.module) as hooks, torch.no_grad():  # type: ignore[attr-defined]
            for name, d in delta.items():
                path = name.removesuffix(".weight")
                key = hooks.read(path, "input")
                hooks.add(path, "output", lambda out, key=key, d=d: (hooks[key] @ d.T.to(out.dtype)) * mask.to(out))
            logits = forward_logits(model, batch)[0]
        targets = batch.target_mask[0].nonzero().flatten()
        accuracies.append(float((logits[targets - 1].argmax(-1) == batch.input_ids[0, targets]).float().mean()))
    return sum(accuracies) / len(accuracies)


if __name__ == "__main__":
    main()
