"""Train a sparse autoencoder on one layer of a bundled model on CPU and report its quality.

    python benchmarks/sae_smollm2.py [--layer 12] [--tokens 1000000] [--expansion 8] [--l1 5] [--out runs/sae-l12]

Corpus: the benchmark data's Wikipedia passages (90 % for training, the last 10 % held out for the
metrics and snippets). Prints training tokens/s, explained variance, L0, loss recovered, and the top
snippets of the most frequently active features.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import lmedit
from lmedit.sae import SAEConfig, activations, evaluate_sae, save_sae, top_snippets, train_sae
from lmedit.stats import default_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--l1", type=float, default=5.0)
    parser.add_argument("--features", type=int, default=24, help="features to show snippets for")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = lmedit.load_model(args.model)
    texts = [t for t in default_corpus().read_text().splitlines() if t.strip()]
    split = int(len(texts) * 0.9)
    train, held = texts[:split], texts[split:]
    config = SAEConfig(layer=args.layer, expansion=args.expansion, l1=args.l1, tokens=args.tokens)
    sae, info = train_sae(model, train, config)
    print(f"trained on {info['tokens']} tokens in {info['seconds']} s = {info['tokens_per_second']} tokens/s; "
          f"resampled {info['resampled']} dead features")
    report = evaluate_sae(model, sae, args.layer, held[:40])
    print(json.dumps(report, indent=2))
    # the features active most often on held-out text, with their strongest snippets
    counts = torch.zeros(sae.b_e.shape[0])
    scale = sae.input_scale
    with torch.no_grad():
        for states, *_ in activations(model, args.layer, held[:40]):
            counts += (sae.encode(states * scale) > 0).float().sum(0).cpu()
    # spread over the frequency ranks: the most frequent features are often positional or generic
    order = counts.argsort(descending=True)
    ranks = torch.linspace(0, max(0, int((counts > 0).sum()) - 1), args.features).long()
    chosen = [int(order[r]) for r in ranks]
    shown = top_snippets(model, sae, args.layer, held, chosen, k=5)
    for feature, entries in shown.items():
        print(f"feature {feature} (active on {int(counts[feature])} held-out tokens):")
        for value, text in entries:
            print(f"   {value:7.2f}  {text!r}")
    if args.out:
        save_sae(sae, {**info, **report}, args.out)
        snippets = {str(f): {"active_tokens": int(counts[f]), "top": [[round(float(v), 3), t] for v, t in e]}
                    for f, e in shown.items()}
        (Path(args.out) / "snippets.json").write_text(json.dumps(snippets, indent=1))
        print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
