"""Dataset loaders: the shared benchmark files and malformed files made on the spot."""
from __future__ import annotations

import json

import pytest

from lmedit.data import NAMES, data_dir, load_dataset
from lmedit.errors import DataError

needs_data = pytest.mark.skipif(data_dir() is None, reason="the shared benchmark data directory is not present")


@needs_data
def test_counterfact_flat_first_record():
    data = load_dataset("counterfact", n=50)
    assert len(data) == 50 and data.format == "counterfact-flat" and len(data.sha256) == 64
    r = data.requests[0]
    assert (r.prompt, r.subject, r.target_new, r.target_true) == (
        "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French")
    assert r.rephrases == ("Where Danielle Darrieux is from, people speak the language of",)
    assert r.locality[0].prompt == "Michel Rocard is a native speaker of" and r.locality[0].answer == "French"
    assert r.locality[0].group == "neighborhood" and r.case_id == "0"


@needs_data
def test_counterfact_rome_schema():
    data = load_dataset("counterfact-rome")
    assert len(data) == 500 and data.format == "counterfact-rome"
    r = data.requests[0]
    assert r.template == "{} is located in" and r.subject == "Angola"
    assert (r.target_new, r.target_true) == ("Antarctica", "Africa")
    assert len(r.rephrases) == 2 and len(r.locality) == 10 and len(r.generation_prompts) == 10
    assert all(p.answer == "Africa" for p in r.locality) and len(r.meta["attribute_prompts"]) == 10


@needs_data
def test_zsre_with_portability():
    r = load_dataset("zsre", n=5).requests[0]
    assert r.prompt == "When was the inception of IAAF Combined Events Challenge?"
    assert (r.target_new, r.target_true) == ("2006", "1998")
    assert r.locality[0].prompt.startswith("nq question:") and r.locality[0].answer == "The String"
    assert r.portability[0].answer == "Athletics" and r.portability[0].group == "portability"


@needs_data
def test_knowedit_groups_and_skips():
    data = load_dataset("knowedit-zsre")
    groups = {p.group for r in data.requests for p in (*r.locality, *r.portability)}
    assert {"Relation_Specificity", "Reasoning", "Subject_Aliasing", "Logical_Generalization"} <= groups
    assert len(data.skipped) == 3 and "is not in the prompt" in data.skipped[0][1]
    cf = load_dataset("knowedit-counterfact", n=10).requests[0]
    assert cf.target_new == "Franche-Comté" and cf.target_true == "France"
    assert {p.group for p in cf.portability} == {"Reasoning", "Subject_Aliasing"}


@needs_data
def test_mquake_cases_and_lifelong_sets():
    data = load_dataset("mquake", n=20)
    assert len(data) == 20 and len(data.cases) == 20
    case = data.cases[0]
    assert len(case.requests) == 4 and len(case.questions) == 3
    assert (case.answer, case.new_answer) == ("English", "Arabic") and "Arabic language" in case.new_answer_aliases
    assert case.requests[0].prompt == "Hey Jude was performed by" and case.requests[0].target_new == "Madonna"
    hall = load_dataset("hallucination", n=10).requests[0]
    assert hall.subject == "carole gist" and hall.meta["set"] == "hallucination" and hall.locality
    temporal = load_dataset("temporal").requests[0]
    assert temporal.meta["set"] == "temporal" and temporal.rephrases
    wiki = load_dataset("wikibio", n=3).requests[0]
    assert wiki.subject == "john russell reynolds" and wiki.target_new.startswith("He received")


@needs_data
@pytest.mark.parametrize("name", sorted(NAMES))
def test_every_named_dataset_loads(name):
    data = load_dataset(name, n=30)
    assert 0 < len(data) <= 30 and data.describe()["name"] == name


def _write(tmp_path, records, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


GOOD = {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "ground_truth": "Paris",
        "rephrase_prompt": "France's capital is", "locality_prompt": "The capital of Spain is",
        "locality_ground_truth": "Madrid"}


def test_malformed_records_name_file_index_and_field(tmp_path):
    missing = {k: v for k, v in GOOD.items() if k != "target_new"}
    with pytest.raises(DataError, match=r"bad\.json: record 1: field 'target_new' is missing"):
        load_dataset(_write(tmp_path, [GOOD, missing]), format="counterfact-flat")
    wrong = {**GOOD, "subject": 3}
    with pytest.raises(DataError, match=r"record 0: field 'subject' should be a string, got int"):
        load_dataset(_write(tmp_path, [wrong]), format="counterfact-flat")
    with pytest.raises(DataError, match=r"record 0 is a list"):
        load_dataset(_write(tmp_path, [[1, 2]]), format="counterfact-flat")


def test_unusable_records_are_skipped_or_strict(tmp_path):
    path = _write(tmp_path, [GOOD, {**GOOD, "target_new": "  "}, {**GOOD, "subject": "Germany"},
                             {**GOOD, "subject": "france"}])
    data = load_dataset(path)
    assert len(data) == 2 and [i for i, _ in data.skipped] == [1, 2]
    assert data.requests[1].subject == "France"  # matched case-insensitively, the prompt's spelling kept
    with pytest.raises(DataError, match="record 1: field 'target_new' is empty"):
        load_dataset(path, strict=True)


def test_file_level_errors(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="broken.json is neither JSON nor JSON lines"):
        load_dataset(bad)
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        load_dataset("nope")
    with pytest.raises(DataError, match="cannot tell its format"):
        load_dataset(_write(tmp_path, [{"a": 1}]))
    with pytest.raises(DataError, match="holds no records"):
        load_dataset(_write(tmp_path, []))


def test_jsonl_and_stable_hash(tmp_path):
    path = tmp_path / "cases.jsonl"
    path.write_text("\n".join(json.dumps({**GOOD, "case_id": i}) for i in range(3)) + "\n")
    a, b = load_dataset(path), load_dataset(path, n=2)
    assert len(a) == 3 and len(b) == 2 and a.sha256 == b.sha256
    assert [r.case_id for r in a.requests] == ["0", "1", "2"]
