"""Multi-hop evaluation (MQuAKE): after several related edits, do answers to multi-hop questions follow?

For each case, its edits are made one after another (each patch applied before the next is computed,
so any method works), then each multi-hop question is asked as ``question_template.format(question)``
and answered greedily. A question counts as correct when the generation matches the new answer or one
of its aliases (``generation_matches``). Per case:

* ``multihop_acc`` — 1 if *any* of the case's questions is answered with the new answer (MQuAKE's
  convention), ``multihop_q_acc`` — the fraction of questions;
* ``multihop_old`` — 1 if any question is still answered with the old answer;
* ``edit_acc`` — the fraction of the case's single edits that hold (their prompt generates the target).
"""
from __future__ import annotations

from typing import Any, Sequence

from lmedit.evaluate.metrics import generation_matches
from lmedit.patch import Patch
from lmedit.continuations import generate

QUESTION_TEMPLATE = "Q: {}\nA:"


def multihop_record(model: Any, editor: Any, case: Any, question_template: str = QUESTION_TEMPLATE,
                    max_new_tokens: int = 12) -> dict[str, Any]:
    """Edit ``model`` with all of ``case``'s requests, score its questions, and revert everything."""
    applied: list[Patch] = []
    try:
        if editor is not None:
            for request in case.requests:
                applied.append(editor.edit(model, request).apply(model))
        prompts = [question_template.format(q) for q in case.questions]
        answers = generate(model, prompts, max_new_tokens=max_new_tokens)
        edits = generate(model, [r.prompt for r in case.requests], max_new_tokens=max_new_tokens)
    finally:
        for patch in reversed(applied):
            patch.revert()
    new = [generation_matches(a, [case.new_answer, *case.new_answer_aliases]) for a in answers]
    old = [generation_matches(a, [case.answer, *case.answer_aliases]) for a in answers]
    held = [generation_matches(g, [r.target_new]) for g, r in zip(edits, case.requests)]
    return {"case_id": str(case.case_id), "multihop_acc": float(any(new)), "multihop_q_acc": sum(new) / len(new),
            "multihop_old": float(any(old)), "edit_acc": sum(held) / max(1, len(held)),
            "answers": answers}


def multihop_records(model: Any, editor: Any, cases: Sequence[Any], **kwargs: Any) -> list[dict[str, Any]]:
    return [multihop_record(model, editor, case, **kwargs) for case in cases]
