"""Unrelated inputs for the memory editors' "keep out" terms (WISE's routing margins, DEFER's gate):
sentences from a text corpus or an edit dataset's locality prompts, and a reproducible per-request sample
of them."""

from __future__ import annotations

import random
import re
from typing import Any, Sequence, TypeVar

from lmedit.errors import EditError
from lmedit.requests import EditRequest

Item = TypeVar("Item")

__all__ = ["sample_per_request", "unrelated_sentences"]


def sample_per_request(requests: Sequence[EditRequest], pool: Sequence[Item], n: int, seed: int, salt: str = ""
                       ) -> list[list[Item]]:
    """``min(n, len(pool))`` items of ``pool`` for each request, drawn without replacement by a generator
    seeded with the seed, ``salt`` and the request (so a request always gets the same ones)."""
    if n <= 0 or not pool:
        return [[] for _ in requests]
    return [random.Random(f"{seed}:{salt}{r.prompt}:{r.target_new}").sample(list(pool), min(n, len(pool)))
            for r in requests]


def unrelated_sentences(model: Any, corpus: str | None = None) -> list[str]:
    """Unrelated inputs for the routing margins: sentences of 6–40 words from the text ``corpus``
    (default: the benchmark data's Wikipedia passages), or — when ``corpus`` names an edit dataset
    (``"zsre-train"``, a ``.json``/``.jsonl`` file) — its locality prompts followed by their answers.

    The second is what the WISE paper trains on (ZsRE's *train* split, ``"{loc} {loc_ans}"``): unrelated
    inputs in the format of the queries the edited model will see. The routing activation partly
    measures format, so Wikipedia sentences teach it less about keeping unrelated *questions* out.
    """
    key = ("wise_unrelated", corpus)
    if key not in model.cache:
        model.cache[key] = _dataset_locality(corpus) if _is_dataset(corpus) else _corpus_sentences(model, corpus)
    return model.cache[key]


def _is_dataset(source: str | None) -> bool:
    from lmedit.data import NAMES

    return source is not None and (source in NAMES or str(source).endswith((".json", ".jsonl")))


def _dataset_locality(source: str) -> list[str]:
    from lmedit.data import load_dataset

    texts = [f"{p.prompt} {p.answer}" for r in load_dataset(source).requests for p in r.locality]
    if not texts:
        raise EditError(f"the dataset {source!r} has no locality prompts to use as unrelated inputs")
    return list(dict.fromkeys(texts))


def _corpus_sentences(model: Any, corpus: str | None) -> list[str]:
    from lmedit.stats import corpus_texts

    texts, _ = corpus_texts(corpus, model, max_tokens=5_000)
    sentences = [s.strip() for text in texts for s in re.split(r"(?<=[.!?])\s+", text)]
    return [s for s in sentences if 6 <= len(s.split()) <= 40] or texts
