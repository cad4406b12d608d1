"""Sparse autoencoders on a layer's residual stream: train, measure, interpret, steer.

    f = ReLU(W_e (x − b_d) + b_e),     x̂ = W_d f + b_d,     L = ‖x − x̂‖² + λ ‖f‖₁

``x`` are block outputs of one layer over corpus tokens (the document-start and padding positions are
left out). The decoder's columns are kept at unit norm (renormalised after every step, and the
gradient component along each column is removed first), so the L1 penalty cannot be dodged by
shrinking ``f`` while growing ``W_d``. A feature that has not fired for ``dead_after`` tokens is
**resampled**: its encoder row and decoder column are re-initialised towards an input the SAE
reconstructs badly, its bias reset.

Measured by ``evaluate_sae``: explained variance ``1 − E‖x − x̂‖² / E‖x − x̄‖²``, L0 (mean number of
active features per token) and *loss recovered* — the LM's next-token loss with ``x̂`` spliced in place
of ``x``, relative to splicing in zeros: ``(L_zero − L_sae) / (L_zero − L_clean)``. ``top_snippets`` lists
each feature's most strongly activating contexts; ``feature_steering`` turns a feature's decoder
direction into a steering patch.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from lmedit.hooks import Hooks
from lmedit.scoring import tokenize


class SparseAutoencoder(nn.Module):
    """``f = ReLU(W_e (x − b_d) + b_e)``, ``x̂ = W_d f + b_d`` with unit-norm decoder columns."""

    def __init__(self, d_model: int, n_features: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        decoder = torch.randn(d_model, n_features, generator=generator)
        decoder /= decoder.norm(dim=0, keepdim=True)
        self.W_d = nn.Parameter(decoder)
        self.W_e = nn.Parameter(decoder.T.clone())
        self.b_e = nn.Parameter(torch.zeros(n_features))
        self.b_d = nn.Parameter(torch.zeros(d_model))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_d) @ self.W_e.T + self.b_e)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_d.T + self.b_d

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_d /= self.W_d.norm(dim=0, keepdim=True).clamp(min=1e-8)

    @torch.no_grad()
    def project_out_radial_gradient(self) -> None:
        """Remove each decoder column's gradient component along the column (it only changes its norm)."""
        if self.W_d.grad is not None:
            self.W_d.grad -= (self.W_d.grad * self.W_d).sum(0, keepdim=True) * self.W_d


@dataclass
class SAEConfig:
    """Training settings. ``expansion`` × d_model features; ``l1`` = λ; ``tokens`` to train on.

    A corpus smaller than ``tokens`` is cycled; when it has at most ``cache_tokens`` tokens its
    activations are kept in memory after the first pass (float32, ``cache_tokens × d_model × 4`` bytes
    at most), so later passes cost only the SAE's own training.
    """

    layer: int
    expansion: int = 8
    l1: float = 5.0
    lr: float = 1e-3
    tokens: int = 1_000_000
    batch_tokens: int = 1024
    seq_len: int = 128
    dead_after: int = 200_000
    seed: int = 0
    cache_tokens: int = 1_000_000  # keep a corpus's activations in memory after one pass if it has ≤ this many


@torch.no_grad()
def activations(model: Any, layer: int, texts: Sequence[str], seq_len: int = 128, batch: int = 16):
    """Yield ``(activations [n, d], token ids [n], (row, position) of each activation, the rows' token ids)``
    of block ``layer``'s output, a batch of text chunks at a time, skipping each chunk's first position and
    document-start tokens (attention-sink states are outliers, not text)."""
    path = model.spec.block(layer)
    from lmedit.stats import _token_chunks

    chunks = _token_chunks(model, texts, seq_len)
    for start in range(0, len(chunks), batch):
        group = chunks[start:start + batch]
        width = max(len(c) for c in group)
        ids = torch.full((len(group), width), model.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for b, c in enumerate(group):
            ids[b, :len(c)] = torch.tensor(c)
            mask[b, :len(c)] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        with Hooks(model.module) as hooks:
            key = hooks.read(path, "output")
            hooks.forward_until(path, model.module, input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
            states = hooks[key]
        keep = mask.bool()
        keep[:, 0] = False  # the first position is the attention sink (BOS / document start): not text
        if getattr(model, "doc_start", None) is not None:
            keep &= ids != model.doc_start
        yield states[keep].float(), ids[keep], [(b, t) for b, t in keep.nonzero().tolist()], group


def train_sae(model: Any, texts: Sequence[str], config: SAEConfig, progress: bool = True) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Train an SAE on block ``config.layer``'s outputs over ``texts`` (cycled until ``config.tokens``)."""
    from tqdm.auto import tqdm

    d = model.spec.hidden_size
    sae = SparseAutoencoder(d, config.expansion * d, config.seed).to(model.device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr)
    buffer: list[torch.Tensor] = []
    seen = 0
    since_fired = torch.zeros(sae.b_e.shape[0], dtype=torch.long, device=model.device)
    losses, resampled = [], 0
    start = time.perf_counter()
    scale = None  # inputs are scaled so that E‖x‖ = √d (λ then means the same across layers and models)
    with tqdm(total=config.tokens, unit="tok", disable=not progress, desc=f"SAE layer {config.layer}") as bar:
        cached: list[torch.Tensor] | None = []
        complete = False
        while seen < config.tokens:
            if complete:
                source = iter(cached or [])
            else:
                source = (a for a, _, _, _ in activations(model, config.layer, texts, config.seq_len))
            for states in source:
                if not complete and cached is not None:
                    cached.append(states)
                    if sum(len(c) for c in cached) > config.cache_tokens:
                        cached = None  # too large to keep: stream every pass
                buffer.append(states)
                if sum(len(b) for b in buffer) < config.batch_tokens * 8 and seen + sum(len(b) for b in buffer) < config.tokens:
                    continue
                pool = torch.cat(buffer)
                buffer = []
                if scale is None:
                    scale = float(d ** 0.5 / pool.norm(dim=1).mean())
                    with torch.no_grad():
                        sae.b_d.copy_((pool * scale).median(dim=0).values)
                pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seen))] * scale
                for x in pool.split(config.batch_tokens):
                    x_hat, f = sae(x)
                    mse = (x - x_hat).pow(2).sum(-1).mean()
                    loss = mse + config.l1 * f.sum(-1).mean()  # decoder columns have unit norm
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    sae.project_out_radial_gradient()
                    optimizer.step()
                    sae.normalise_decoder()
                    fired = (f > 0).any(0)
                    since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + len(x))
                    dead = since_fired > config.dead_after
                    if bool(dead.any()):
                        resampled += int(dead.sum())
                        _resample(sae, x, x_hat.detach(), dead)
                        since_fired[dead] = 0
                    losses.append(float(mse.detach()))
                    seen += len(x)
                    bar.update(len(x))
                if seen >= config.tokens:
                    break
            complete = cached is not None
    seconds = time.perf_counter() - start
    info = {"config": asdict(config), "tokens": seen, "seconds": round(seconds, 1),
            "tokens_per_second": round(seen / max(seconds, 1e-9)), "final_mse": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
            "resampled": resampled, "input_scale": scale}
    sae.input_scale = scale  # type: ignore[assignment]
    return sae, info


@torch.no_grad()
def _resample(sae: SparseAutoencoder, x: torch.Tensor, x_hat: torch.Tensor, dead: torch.Tensor) -> None:
    """Point dead features at the inputs with the largest reconstruction errors."""
    errors = (x - x_hat).pow(2).sum(-1)
    picks = errors.topk(min(int(dead.sum()), len(x))).indices
    idx = dead.nonzero().flatten()[: len(picks)]
    direction = (x[picks] - sae.b_d)
    direction /= direction.norm(dim=1, keepdim=True).clamp(min=1e-8)
    sae.W_d[:, idx] = direction.T
    sae.W_e[idx] = direction * 0.2
    sae.b_e[idx] = 0.0


@torch.no_grad()
def evaluate_sae(model: Any, sae: SparseAutoencoder, layer: int, texts: Sequence[str], seq_len: int = 128) -> dict[str, Any]:
    """Explained variance, L0 and loss recovered on ``texts`` (see the module docstring)."""
    scale = getattr(sae, "input_scale", 1.0) or 1.0
    sq_err = total = l0 = n = 0.0
    sum_x = sum_x2 = None
    for states, _, _, _ in activations(model, layer, texts, seq_len):
        x = states * scale
        x_hat, f = sae(x)
        sq_err += float((x - x_hat).pow(2).sum())
        l0 += float((f > 0).sum())
        n += len(x)
        sum_x = x.sum(0) if sum_x is None else sum_x + x.sum(0)
        sum_x2 = x.pow(2).sum() if sum_x2 is None else sum_x2 + x.pow(2).sum()
    total = float(sum_x2 - sum_x.pow(2).sum() / n)  # type: ignore[union-attr]
    losses = {}
    for mode in ("clean", "sae", "zero"):
        losses[mode] = _spliced_loss(model, sae, layer, texts, seq_len, mode, scale)
    gap = losses["zero"] - losses["clean"]  # how much the layer matters; ≤ 0 (random models): undefined
    recovered = (losses["zero"] - losses["sae"]) / gap if gap > 1e-6 else None
    return {"explained_variance": round(1 - sq_err / total, 4), "l0": round(l0 / n, 2), "tokens": int(n),
            "loss_clean": round(losses["clean"], 4), "loss_sae": round(losses["sae"], 4), "loss_zero": round(losses["zero"], 4),
            "loss_recovered": None if recovered is None else round(recovered, 4)}


def _spliced_loss(model: Any, sae: SparseAutoencoder, layer: int, texts: Sequence[str], seq_len: int, mode: str,
                  scale: float) -> float:
    path = model.spec.block(layer)
    total = count = 0.0
    for text in texts:
        ids = tokenize(model, text)[0][:seq_len]
        if len(ids) < 2:
            continue
        input_ids = torch.tensor([ids], device=model.device)
        with torch.no_grad(), Hooks(model.module) as hooks:
            if mode != "clean":
                def splice(t: torch.Tensor) -> torch.Tensor:
                    if mode == "zero":
                        return torch.zeros_like(t)
                    return (sae(t.float() * scale)[0] / scale).to(t.dtype)
                hooks.replace(path, "output", splice)
            logits = model.module(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
        targets = input_ids[0, 1:]
        total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        count += len(targets)
    return total / max(1.0, count)


@torch.no_grad()
def top_snippets(model: Any, sae: SparseAutoencoder, layer: int, texts: Sequence[str], features: Sequence[int],
                 k: int = 5, width: int = 8, seq_len: int = 128) -> dict[int, list[tuple[float, str]]]:
    """For each feature, the ``k`` strongest activations over ``texts`` with ``width`` tokens of context
    before (and 2 after) the activating token, which is marked «like this»."""
    scale = getattr(sae, "input_scale", 1.0) or 1.0
    best: dict[int, list[tuple[float, list[int], int]]] = {f: [] for f in features}
    index = torch.tensor(list(features), device=model.device)
    for states, _, places, group in activations(model, layer, texts, seq_len):
        acts = sae.encode(states * scale)[:, index]  # [n, F]
        for j, feature in enumerate(features):
            values, rows = acts[:, j].topk(min(k, len(acts)))
            for v, r in zip(values.tolist(), rows.tolist()):
                if v > 0:
                    row, pos = places[r]
                    best[feature].append((v, group[row], pos))
        for feature in features:
            best[feature] = sorted(best[feature], key=lambda e: -e[0])[:k]
    out = {}
    for feature, entries in best.items():
        out[feature] = []
        for v, ids, pos in entries:
            before = model.tokenizer.decode(ids[max(0, pos - width):pos])
            token = model.tokenizer.decode(ids[pos:pos + 1])
            after = model.tokenizer.decode(ids[pos + 1:pos + 3])
            out[feature].append((round(v, 3), f"{before}«{token}»{after}"))
    return out


def feature_steering(model: Any, sae: SparseAutoencoder, layer: int, feature: int, multiplier: float) -> Any:
    """A steering patch adding ``multiplier`` × the feature's decoder direction (in the residual's own scale)."""
    from lmedit.steer import steer

    scale = getattr(sae, "input_scale", 1.0) or 1.0
    return steer(model, {layer: sae.W_d[:, feature].detach().float().cpu() / scale}, multiplier)


def save_sae(sae: SparseAutoencoder, info: dict[str, Any], directory: str | Path) -> Path:
    """``sae.safetensors`` + ``sae.json`` (the training info and input scale)."""
    import json

    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}, str(directory / "sae.safetensors"))
    (directory / "sae.json").write_text(json.dumps({**info, "input_scale": getattr(sae, "input_scale", None)}, indent=2))
    return directory
