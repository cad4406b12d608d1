"""Second-moment statistics ``C = E[k kᵀ]`` of MLP keys (the inputs of ``W_out``) over a text corpus.

Locate-then-edit methods weight their least-squares updates by ``C``: it says which key directions
the layer actually sees, so an edit changes ``W_out`` where it disturbs the least.

``second_moment(model, layer, corpus, max_tokens)`` streams the corpus through the model (all layers
asked for are collected in the same forward passes), accumulates ``Σ k kᵀ`` in float64 over real
(non-padding) tokens, and returns the mean. Results are cached on disk under
``$LMEDIT_CACHE/stats/<fingerprint>/`` keyed by (layer, corpus hash, token budget); an interrupted
collection resumes from its last checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from lmedit.errors import LmeditError
from lmedit.hooks import Hooks
from lmedit.models.bundled import cache_dir
from lmedit.scoring import tokenize

log = logging.getLogger(__name__)


@dataclass
class Moment:
    """``mean = Σ k kᵀ / count`` over ``count`` tokens (float64, on CPU)."""

    mean: torch.Tensor
    count: int


def default_corpus() -> Path | None:
    """The offline default corpus: ``corpus/wiki_passages.txt`` in the benchmark data directory."""
    from lmedit.data import data_dir

    root = data_dir()
    path = root / "corpus" / "wiki_passages.txt" if root else None
    return path if path is not None and path.is_file() else None


def corpus_texts(corpus: str | Path | Sequence[str] | None, model: Any = None,
                 max_tokens: int = 100_000) -> tuple[list[str], str]:
    """(texts, a content hash) of a corpus.

    ``corpus`` is a text file (one passage a line), a list of texts, ``"model"`` (text sampled from the
    model itself, see ``model_corpus``), ``"hf:<dataset>[:<config>[:<split>]]"`` (a Hugging Face dataset's
    ``text`` column, needs the ``datasets`` package and the dataset in its local cache), or ``None``: the
    benchmark data's Wikipedia passages when present, else text sampled from the model.
    """
    if corpus is None:
        corpus = default_corpus()
        if corpus is None:
            if model is None:
                raise LmeditError("no corpus for second-moment statistics: pass corpus= (a text file, a list of "
                                  "texts or 'model') or set LMEDIT_DATA to the benchmark data directory")
            log.warning("no corpus given and no benchmark data found: sampling the corpus from the model")
            corpus = "model"
    if isinstance(corpus, str) and corpus == "model":
        if model is None:
            raise LmeditError("corpus='model' needs the model to sample from")
        texts = model_corpus(model, max_tokens)
    elif isinstance(corpus, str) and corpus.startswith("hf:"):
        texts = _hf_texts(corpus[3:])
    elif isinstance(corpus, (str, Path)):
        path = Path(corpus)
        if not path.is_file():
            raise LmeditError(f"corpus file {str(path)!r} does not exist; pass a text file, a list of texts, "
                              "'model' or 'hf:<dataset>'")
        texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        texts = [t for t in corpus if t.strip()]
    if not texts:
        raise LmeditError("the corpus for second-moment statistics is empty")
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    return texts, digest


def model_corpus(model: Any, max_tokens: int, length: int = 128, seed: int = 0) -> list[str]:
    """Texts sampled from the model (top-k 40 from short seed words), about ``max_tokens`` tokens in all.

    A corpus for models whose training text is not at hand: the keys it excites are the ones the
    model itself produces. Cached on disk per model fingerprint, seed and size.
    """
    path = cache_dir() / "stats" / model.fingerprint[:16] / f"model-corpus-{seed}-{max_tokens}-{length}.json"
    if path.exists():
        return json.loads(path.read_text())
    from lmedit.continuations import hf_generate_ids

    seeds = ["The", "In", "A", "It", "This", "When", "After", "He", "She", "They"]
    count = max(1, -(-max_tokens // length))
    prompts = [seeds[i % len(seeds)] for i in range(count)]
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        rows = hf_generate_ids(model, prompts, length, 64, do_sample=True, top_k=40)
    finally:
        torch.random.set_rng_state(state)
    texts = [p + model.tokenizer.decode(r, skip_special_tokens=True) for p, r in zip(prompts, rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(texts))
    return texts


def _hf_texts(spec: str) -> list[str]:
    """The ``text`` column of a Hugging Face dataset ``name[:config[:split]]`` (from the local cache)."""
    try:
        import datasets
    except ImportError:
        raise LmeditError("corpus 'hf:…' needs the datasets package: pip install datasets") from None
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        data = datasets.load_dataset(name, config, split=split or "train")
    except Exception as e:  # the library raises many types (offline, missing config …)
        raise LmeditError(f"cannot load the Hugging Face dataset {spec!r}: {str(e).splitlines()[0]}") from None
    if "text" not in data.column_names:
        raise LmeditError(f"dataset {spec!r} has no 'text' column (it has {', '.join(data.column_names)})")
    return [t for t in data["text"] if t and t.strip()]


def second_moments(model: Any, layers: Sequence[int], corpus: str | Path | Sequence[str] | None = None,
                   max_tokens: int = 100_000, seq_len: int = 128, batch_size: int = 16,
                   progress: bool = True) -> dict[int, Moment]:
    """``E[k kᵀ]`` of the keys of ``W_out`` at each of ``layers``, over up to ``max_tokens`` corpus tokens."""
    from tqdm.auto import tqdm

    texts, digest = corpus_texts(corpus, model, max_tokens)
    digest += f"-s{getattr(model, 'doc_start', None)}c2"  # how the passages are tokenised and chunked
    spec = model.spec
    layers = [spec._layer(layer) for layer in layers]
    folder = cache_dir() / "stats" / model.fingerprint[:16]
    paths = {layer: folder / f"layer{layer}-{digest}-{max_tokens}.pt" for layer in layers}
    result = {layer: _load(paths[layer]) for layer in layers}
    todo = [layer for layer in layers if result[layer] is None]
    if not todo:
        return result  # type: ignore[return-value]
    partial = folder / f"partial-{'-'.join(map(str, todo))}-{digest}-{max_tokens}.pt"
    state = torch.load(partial) if partial.exists() else None
    d = spec.mlp_size
    sums = state["sums"] if state else {layer: torch.zeros(d, d, dtype=torch.float64) for layer in todo}
    count, start = (state["count"], state["next"]) if state else (0, 0)
    chunks = _token_chunks(model, texts, seq_len)
    bar = tqdm(total=min(max_tokens, sum(len(c) for c in chunks)), initial=count, unit="tok",
               desc=f"second moments, layers {todo}", disable=not progress)
    i = start
    with torch.no_grad(), Hooks(model.module) as hooks:
        keys = {layer: hooks.read(spec.path(layer, "mlp_out"), "input", key=str(layer)) for layer in todo}
        while i < len(chunks) and count < max_tokens:
            batch = chunks[i:i + batch_size]
            ids, mask = _pad(batch, model.tokenizer.pad_token_id, model.device)
            hooks.forward_until(spec.path(max(todo), "mlp_out"), model.module, input_ids=ids,
                                attention_mask=mask, use_cache=False, logits_to_keep=1)
            real = mask.reshape(-1).bool()
            for layer in todo:
                k = hooks[keys[layer]].reshape(-1, d)[real].to("cpu", torch.float64)
                sums[layer] += k.T @ k
            count += int(real.sum())
            i += len(batch)
            bar.update(int(real.sum()))
            if i % (batch_size * 20) == 0:
                _save({"sums": sums, "count": count, "next": i}, partial)
    bar.close()
    for layer in todo:
        result[layer] = Moment(sums[layer] / max(1, count), count)
        _save({"mean": result[layer].mean, "count": count}, paths[layer])
    partial.unlink(missing_ok=True)
    log.info("second moments of layers %s over %d tokens", todo, count)
    return result  # type: ignore[return-value]


def second_moment(model: Any, layer: int, corpus: Any = None, max_tokens: int = 100_000, **kwargs: Any) -> Moment:
    """``E[k kᵀ]`` for one layer (see ``second_moments``)."""
    return second_moments(model, [layer], corpus, max_tokens, **kwargs)[model.spec._layer(layer)]


def _token_chunks(model: Any, texts: Sequence[str], seq_len: int) -> list[list[int]]:
    """The corpus tokenised passage by passage, cut into chunks of at most ``seq_len`` tokens; every chunk
    starts with the passage's BOS / document-start token (when it has one), so no text token sits at
    the attention-sink position."""
    starters = {getattr(model, "doc_start", None), getattr(model.tokenizer, "bos_token_id", None)} - {None}
    chunks = []
    for text in texts:
        ids = tokenize(model, text)[0]
        start = ids[0] if ids and ids[0] in starters else None  # the BOS / document-start token, if any
        body = ids[1:] if start is not None else ids
        step = seq_len - 1 if start is not None else seq_len
        for j in range(0, len(body), step):
            piece = ([start] if start is not None else []) + body[j:j + step]
            if len(piece) > 1:
                chunks.append(piece)
    return chunks


def _pad(batch: list[list[int]], pad: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(c) for c in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, c in enumerate(batch):
        ids[b, : len(c)] = torch.tensor(c)
        mask[b, : len(c)] = 1
    return ids.to(device), mask.to(device)


def _load(path: Path) -> Moment | None:
    if not path.exists():
        return None
    data = torch.load(path)
    return Moment(data["mean"], data["count"])


def _save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
    (path.parent / "README.json").write_text(json.dumps({"what": "lmedit second-moment statistics"}))


def fisher_diagonal(model: Any, param: str, corpus: str | Path | Sequence[str] | None = None,
                    max_tokens: int = 20_000, seq_len: int = 128, progress: bool = True) -> torch.Tensor:
    """Diagonal empirical Fisher ``Fᵢ = E_x[(∂ log p(x) / ∂θᵢ)²]`` of one weight matrix over corpus text.

    ``log p(x)`` is the mean next-token log-likelihood of one corpus chunk (≤ ``seq_len`` tokens); the
    expectation is over chunks, up to ``max_tokens`` tokens. The gradient is taken through a zero
    delta added to the weight (the weights themselves stay frozen). Cached on disk like the moments.
    """
    from tqdm.auto import tqdm

    texts, digest = corpus_texts(corpus, model, max_tokens)
    digest += f"-s{getattr(model, 'doc_start', None)}c2"
    path = cache_dir() / "stats" / model.fingerprint[:16] / f"fisher-{param}-{digest}-{max_tokens}.pt"
    if path.exists():
        return torch.load(path)
    weight = model.parameter(param)
    module_path = param.rsplit(".", 1)[0]
    delta = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device, requires_grad=True)
    total = torch.zeros(weight.shape, dtype=torch.float64)
    count = tokens = 0
    chunks = _token_chunks(model, texts, seq_len)
    with Hooks(model.module) as hooks, torch.enable_grad(), tqdm(total=max_tokens, unit="tok", disable=not progress,
                                                                  desc=f"Fisher of {param}") as bar:
        hooks.add_to_weight(module_path, delta)
        for chunk in chunks:
            if tokens >= max_tokens:
                break
            ids = torch.tensor([chunk], device=weight.device)
            logits = model.module(input_ids=ids, use_cache=False).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
            (grad,) = torch.autograd.grad(loss, delta)
            total += grad.double().cpu() ** 2
            count += 1
            tokens += len(chunk)
            bar.update(len(chunk))
    fisher = (total / max(1, count)).float()
    _save(fisher, path)  # type: ignore[arg-type]
    return fisher
