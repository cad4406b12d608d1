"""Metric definitions. Model-free functions here; the batched model scoring is in ``probes.py``.

Conventions (the evaluation protocol of ``docs/design.md``):

* **Teacher-forced token accuracy** (EasyEdit's convention): the fraction of the answer's tokens that are
  the argmax of the model's distribution when the true previous tokens are fed in.
* **Exact match by generation**: greedy-generate after the prompt; the probe counts as matched when the
  normalised generation starts with the normalised answer (or one of its aliases) at a word boundary.
  Normalisation lower-cases and collapses whitespace, so ``" Paris"``/``"Paris"`` and tokenisation
  accidents do not matter.
* **Probability comparison** (ROME/MEMIT's CounterFact convention): with ``ℓ(y) = (1/|y|) Σ_t log P(y_t | x, y_<t)``
  the per-token mean log-probability, efficacy succeeds when ``ℓ(new) > ℓ(old)``; its magnitude is
  ``exp ℓ(new) − exp ℓ(old)``. Neighbourhood prompts succeed when ``ℓ(old) > ℓ(new)``.
* **Locality** is agreement with the *unedited* model: the fraction of answer tokens whose teacher-forced
  argmax is unchanged (EasyEdit), and whether the greedy continuation is unchanged; accuracy against the
  dataset's answers is reported separately.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable, Sequence

_WORD = re.compile(r"\w+|[^\w\s]")


def normalize(text: str) -> str:
    """Lower-case, collapse whitespace, strip."""
    return " ".join(text.lower().split())


def generation_matches(generated: str, answers: Iterable[str]) -> bool:
    """Whether ``generated`` starts with one of ``answers`` (normalised), ending at a word boundary."""
    gen = normalize(generated)
    for answer in answers:
        ans = normalize(answer)
        if ans and gen.startswith(ans) and (len(gen) == len(ans) or not (gen[len(ans)].isalnum() and ans[-1].isalnum())):
            return True
    return False


def token_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Fraction of positions where two equally long token sequences agree (1.0 for empty)."""
    if not a and not b:
        return 1.0
    n = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / n


def prob_success(mean_lp_new: float, mean_lp_old: float) -> tuple[bool, float]:
    """(``ℓ(new) > ℓ(old)``, ``exp ℓ(new) − exp ℓ(old)``) from per-token mean log-probabilities."""
    return mean_lp_new > mean_lp_old, math.exp(mean_lp_new) - math.exp(mean_lp_old)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Fluency: weighted average of the n-gram entropies (bits) of a text, ROME's definition.

    ``H_n = −Σ_g f(g) log₂ f(g)`` over the relative frequencies ``f`` of the text's word n-grams;
    result ``Σ w_n H_n / Σ w_n`` with bi- and tri-grams weighted 2/3 and 4/3. Repetitive text scores low.
    """
    words = _WORD.findall(text.lower())
    total = 0.0
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i:i + n]) for i in range(max(0, len(words) - n + 1)))
        count = sum(grams.values())
        h = -sum(c / count * math.log2(c / count) for c in grams.values()) if count else 0.0
        total += w * h
    return total / sum(weights)


def tfidf_cosine(text: str, references: Sequence[str], corpus: Sequence[str] | None = None) -> float:
    """Consistency: cosine similarity of the TF-IDF vectors of ``text`` and the joined ``references``.

    IDF is ``log((1 + N) / (1 + df)) + 1`` over ``corpus`` (default: the references plus the text),
    term frequencies are raw counts, vectors are L2-normalised (the usual TF-IDF).
    """
    docs = list(corpus) if corpus is not None else [*references, text]
    tokenized = [set(_WORD.findall(d.lower())) for d in docs]
    df = Counter(t for doc in tokenized for t in doc)
    n = len(docs)

    def vector(s: str) -> dict[str, float]:
        tf = Counter(_WORD.findall(s.lower()))
        v = {t: c * (math.log((1 + n) / (1 + df.get(t, 0))) + 1) for t, c in tf.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {t: x / norm for t, x in v.items()}

    a, b = vector(text), vector(" ".join(references))
    return sum(x * b.get(t, 0.0) for t, x in a.items())


def perplexity(mean_logprobs: Sequence[float], lengths: Sequence[int]) -> float:
    """``exp(−Σ_i |y_i| ℓ_i / Σ_i |y_i|)``: token-weighted perplexity of target texts."""
    tokens = sum(lengths)
    return math.exp(-sum(lp * n for lp, n in zip(mean_logprobs, lengths)) / max(1, tokens))
