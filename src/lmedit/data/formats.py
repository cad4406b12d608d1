"""One function per public dataset format: a JSON record → an ``EditRequest`` (or a ``MultiHopCase``).

Each converter reads fields through ``Record``, which turns a missing or mistyped field into a
``DataError`` naming the file, the record index and the field. Subjects not found verbatim in the
prompt, and empty texts, raise ``Unusable``; the loader skips and counts those records.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lmedit.errors import DataError, RequestError
from lmedit.requests import EditRequest, Probe


class Unusable(Exception):
    """A well-formed record that cannot make an edit: its subject is not in its prompt, or a text field
    is empty. Loaders skip and count these (``strict=True`` turns them into ``DataError``s)."""


@dataclass
class MultiHopCase:
    """An MQuAKE case: several edits and the multi-hop questions whose answers should follow."""

    case_id: str
    requests: list[EditRequest]
    questions: list[str]
    answer: str
    answer_aliases: list[str] = field(default_factory=list)
    new_answer: str = ""
    new_answer_aliases: list[str] = field(default_factory=list)


class Record:
    """Typed access to one record's fields, with errors that say where the problem is."""

    def __init__(self, data: Any, path: Path, index: int) -> None:
        if not isinstance(data, dict):
            raise DataError(f"{path.name}: record {index} is a {type(data).__name__}, not an object")
        self.data, self.path, self.index = data, path, index

    def error(self, name: str, problem: str) -> DataError:
        return DataError(f"{self.path.name}: record {self.index}: field {name!r} {problem}")

    def get(self, name: str, kind: type | tuple[type, ...] = str, optional: bool = False) -> Any:
        value = self.data.get(name)
        if value is None:
            if optional:
                return None
            raise self.error(name, "is missing")
        if not isinstance(value, kind):
            raise self.error(name, f"should be {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def text(self, name: str, optional: bool = False) -> str | None:
        value = self.get(name, str, optional)
        if value is not None and not value.strip():
            raise Unusable(f"{self.path.name}: record {self.index}: field {name!r} is empty")
        return value

    def probes(self, prompt_field: str, answer_field: str, group: str | None = None) -> list[Probe]:
        """A one-probe list from two string fields, or ``[]`` when either is absent or empty."""
        prompt = self.get(prompt_field, str, optional=True)
        answer = self.get(answer_field, str, optional=True)
        return [Probe(prompt, answer, group=group)] if prompt and prompt.strip() and answer and answer.strip() else []

    def sub(self, name: str) -> "Record":
        return Record(self.get(name, dict), self.path, self.index)

    def request(self, prompt: str, subject: str, target_new: str, target_true: str | None = None,
                **kwargs: Any) -> EditRequest:
        """An ``EditRequest``; a subject absent from the prompt (even case-insensitively) → ``SubjectMissing``."""
        if "{}" not in prompt and subject not in prompt:
            at = prompt.lower().find(subject.lower())
            if at < 0:
                raise Unusable(f"{self.path.name}: record {self.index}: subject {subject!r} is not in the prompt {prompt!r}")
            subject = prompt[at:at + len(subject)]
        kwargs.setdefault("case_id", self.data.get("case_id", self.index))
        try:
            return EditRequest(prompt, subject, target_new, target_true, **kwargs)
        except RequestError as e:
            raise DataError(f"{self.path.name}: record {self.index}: {e}") from None


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", list: "a list", dict: "an object", int: "an integer"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _answers(value: Any, rec: Record, name: str) -> list[str]:
    """A ground truth given as a string, a list of strings, or a list of lists of aliases → flat list."""
    if isinstance(value, str):
        out = [value]
    elif isinstance(value, list):
        out = [x for v in value for x in (v if isinstance(v, list) else [v])]
    else:
        raise rec.error(name, f"should be a string or a list, got {type(value).__name__}")
    out = [x for x in out if isinstance(x, str) and x.strip()]
    if not out:
        raise Unusable(f"{rec.path.name}: record {rec.index}: field {name!r} has no answer")
    return out


def _probe_groups(rec: Record, name: str) -> list[Probe]:
    """KnowEdit's ``{group: [{prompt, ground_truth}]}`` → probes labelled with their group."""
    groups = rec.get(name, dict, optional=True) or {}
    probes = []
    for group, entries in groups.items():
        if not isinstance(entries, list):
            raise rec.error(f"{name}.{group}", "should be a list")
        for entry in entries:
            if not isinstance(entry, dict) or "prompt" not in entry or "ground_truth" not in entry:
                raise rec.error(f"{name}.{group}", "entries need 'prompt' and 'ground_truth'")
            try:  # a probe without a usable answer or prompt is left out; the edit itself stays
                answers = _answers(entry["ground_truth"], rec, f"{name}.{group}.ground_truth")
            except Unusable:
                continue
            prompt = entry["prompt"]
            if isinstance(prompt, str) and prompt.strip():
                probes.append(Probe(prompt, answers[0], tuple(answers[1:]), group))
    return probes


# ----------------------------------------------------------------------------------------- formats
def counterfact_rome(rec: Record) -> EditRequest:
    """The original ROME CounterFact schema."""
    rw = rec.sub("requested_rewrite")
    target_true = rw.sub("target_true").text("str")
    meta = {"attribute_prompts": rec.get("attribute_prompts", list, optional=True) or [],
            "relation_id": rw.get("relation_id", str, optional=True), "pararel_idx": rec.data.get("pararel_idx")}
    snippets = rec.get("attribute_snippets", list, optional=True)
    if snippets:
        meta["reference_texts"] = [s["text"] if isinstance(s, dict) else str(s) for s in snippets]
    return rec.request(rw.text("prompt"), rw.text("subject"), rw.sub("target_new").text("str"), target_true,
                       rephrases=rec.get("paraphrase_prompts", list, optional=True) or [],
                       locality=[Probe(p, target_true, group="neighborhood")
                                 for p in rec.get("neighborhood_prompts", list, optional=True) or []],
                       generation_prompts=rec.get("generation_prompts", list, optional=True) or [], meta=meta)


def counterfact_flat(rec: Record) -> EditRequest:
    """EasyEdit / MEND's flat CounterFact schema."""
    rephrase = rec.text("rephrase_prompt", optional=True)
    return rec.request(rec.text("prompt"), rec.text("subject"), rec.text("target_new"), rec.text("ground_truth"),
                       rephrases=[rephrase] if rephrase else [],
                       locality=rec.probes("locality_prompt", "locality_ground_truth", "neighborhood"))


def zsre(rec: Record) -> EditRequest:
    """MEND's ZsRE schema (question ``src``, new answer ``alt``, old ``answers``, NQ locality)."""
    answers = _answers(rec.get("answers", (list, str)), rec, "answers")
    portability = []
    port = rec.get("portability", dict, optional=True)
    if port and port.get("New Question") and port.get("New Answer"):
        portability.append(Probe(port["New Question"], port["New Answer"], group="portability"))
    return rec.request(rec.text("src"), rec.text("subject"), rec.text("alt"), answers[0],
                       rephrases=[rec.text("rephrase")], locality=rec.probes("loc", "loc_ans", "nq"),
                       portability=portability, meta={"answer_aliases": answers[1:]})


def knowedit(rec: Record) -> EditRequest:
    """KnowEdit's ZsRE / wiki_counterfact / wiki_recent schema with locality and portability groups."""
    truth = rec.data.get("ground_truth")
    target_true = _answers(truth, rec, "ground_truth")[0] if truth not in (None, "", []) else None
    rephrase = rec.text("rephrase_prompt", optional=True) or rec.text("rephrase", optional=True)
    return rec.request(rec.text("prompt"), rec.text("subject"), rec.text("target_new"), target_true,
                       rephrases=[rephrase] if rephrase else [], locality=_probe_groups(rec, "locality"),
                       portability=_probe_groups(rec, "portability"))


def wikibio(rec: Record) -> EditRequest:
    """KnowEdit WikiBio: continue a biography passage (``text``) with its true next sentence (``labels``)."""
    return rec.request(rec.text("text"), rec.text("concept"), rec.text("labels"),
                       locality=_probe_groups(rec, "locality"), meta={"set": "wikibio"})


def lifelong(rec: Record) -> EditRequest:
    """The hallucination and temporal sets of the lifelong-editing literature."""
    ood = rec.text("ood_rephrase", optional=True)
    return rec.request(rec.text("prompt"), rec.text("subject"), rec.text("target_new"),
                       rephrases=[ood] if ood else [], locality=rec.probes("locality_prompt", "locality_ground_truth"),
                       meta={"set": "temporal" if ood else "hallucination"})


def mquake(rec: Record) -> MultiHopCase:
    """MQuAKE: several requested rewrites and multi-hop questions."""
    rewrites = rec.get("requested_rewrite", list)
    requests = []
    for j, raw in enumerate(rewrites):
        rw = Record(raw, rec.path, rec.index)
        question = rw.text("question", optional=True)
        requests.append(rw.request(rw.text("prompt"), rw.text("subject"), rw.sub("target_new").text("str"),
                                   rw.sub("target_true").text("str"), rephrases=[question] if question else [],
                                   case_id=f"{rec.data.get('case_id', rec.index)}.{j}"))
    questions = [q for q in rec.get("questions", list) if isinstance(q, str) and q.strip()]
    if not questions:
        raise rec.error("questions", "has no question")
    return MultiHopCase(str(rec.data.get("case_id", rec.index)), requests, questions, rec.text("answer"),
                        list(rec.get("answer_alias", list, optional=True) or []), rec.text("new_answer"),
                        list(rec.get("new_answer_alias", list, optional=True) or []))


FORMATS: dict[str, Callable[[Record], Any]] = {
    "counterfact-rome": counterfact_rome, "counterfact-flat": counterfact_flat, "zsre": zsre,
    "knowedit": knowedit, "wikibio": wikibio, "lifelong": lifelong, "mquake": mquake,
}


def detect_format(record: Any) -> str | None:
    """The format of a record, from its keys."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if "requested_rewrite" in keys:
        return "mquake" if isinstance(record["requested_rewrite"], list) else "counterfact-rome"
    if {"src", "alt"} <= keys:
        return "zsre"
    if {"text", "labels", "concept"} <= keys:
        return "wikibio"
    if "locality" in keys or "portability" in keys:
        return "knowedit"
    if "locality_prompt" in keys and "ground_truth" in keys:
        return "counterfact-flat"
    if "locality_prompt" in keys or "ood_rephrase" in keys:
        return "lifelong"
    if {"prompt", "subject", "target_new", "ground_truth"} <= keys:
        return "counterfact-flat"
    return None
