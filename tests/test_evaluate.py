"""Evaluation metrics and protocols on hand-built cases whose right answers are known."""
from __future__ import annotations

import json
import math

import pytest
import torch

import lmedit
from lmedit.errors import LmeditError
from lmedit.evaluate import EvalError, evaluate, load_report, markdown_table, plot_comparison, resummarize
from lmedit.evaluate.metrics import (generation_matches, ngram_entropy, normalize, perplexity, prob_success,
                                     tfidf_cosine, token_agreement)
from lmedit.evaluate.probes import ItemScore, ProbeItem, case_records, locality_baseline, probe_items, score_items
from lmedit.evaluate.report import curve_label, curve_styles
from lmedit.evaluate.run_files import read_cases
from lmedit.methods.finetune import FTM
from lmedit.continuations import generate
from tiny import tiny

# ----------------------------------------------------------------------------------- pure metrics


def test_normalize_and_generation_match():
    assert normalize("  Paris\n France ") == "paris france"
    assert generation_matches(" Paris, France", ["Paris"])
    assert generation_matches("paris", [" Paris"])
    assert not generation_matches(" Parisian food", ["Paris"])  # must end at a word boundary
    assert generation_matches(" Lyon", ["Paris", "Lyon"])  # any alias
    assert not generation_matches(" Rome", ["Paris"])
    assert not generation_matches("", ["Paris"])


def test_token_agreement_and_prob_success():
    assert token_agreement([1, 2, 3], [1, 2, 4]) == pytest.approx(2 / 3)
    assert token_agreement([], []) == 1.0
    ok, mag = prob_success(math.log(0.6), math.log(0.2))
    assert ok and mag == pytest.approx(0.4)
    assert not prob_success(math.log(0.1), math.log(0.2))[0]


def test_ngram_entropy_known_values():
    assert ngram_entropy("the the the the the the") == 0.0  # one repeated bigram and trigram
    # 5 distinct words: 4 distinct bigrams (log2 4 = 2 bits), 3 distinct trigrams (log2 3 bits).
    expected = (2 / 3 * 2 + 4 / 3 * math.log2(3)) / 2
    assert ngram_entropy("a b c d e") == pytest.approx(expected)


def test_tfidf_cosine_and_perplexity():
    assert tfidf_cosine("paris is in france", ["paris is in france"]) == pytest.approx(1.0)
    assert tfidf_cosine("rome italy", ["paris france"]) == 0.0
    assert 0 < tfidf_cosine("paris is lovely", ["paris is in france"]) < 1
    # two targets of 1 and 3 tokens with mean log-probs log(1/2) and log(1/4): exp(-(1·ln½ + 3·ln¼)/4)
    assert perplexity([math.log(0.5), math.log(0.25)], [1, 3]) == pytest.approx(math.exp((math.log(2) + 3 * math.log(4)) / 4))


def test_case_records_from_known_scores():
    req = lmedit.EditRequest("The capital of {} is", "France", " Rome", " Paris", rephrases=["France's capital is"],
                             locality=[{"prompt": "The capital of Spain is", "answer": " Madrid", "group": "neighborhood"}],
                             portability=[{"prompt": "The capital of France is in", "answer": " Italy", "group": "Reasoning"}],
                             case_id=7)
    items = probe_items([req])
    assert [it.kind for it in items] == ["rewrite", "rephrase", "locality", "portability"]
    assert items[2].alt == " Rome" and items[0].alt == " Paris"
    scores = [
        ItemScore([5], [5], math.log(0.9), 1.0, math.log(0.05), " Rome.", [5, 9]),      # rewrite: hit
        ItemScore([5], [6], math.log(0.2), 0.0, math.log(0.3), " Paris", [6]),          # rephrase: miss
        ItemScore([8, 9], [8, 1], math.log(0.5), 0.5, math.log(0.1), " Madrid", [8, 1]),  # locality
        ItemScore([4], [4], math.log(0.7), 1.0, None, " Italy", [4]),                    # portability
    ]
    baseline = {("The capital of Spain is", " Madrid", " Rome"): ItemScore([8, 9], [8, 9], 0.0, 1.0, None, " Madrid", [8, 9])}
    [rec] = case_records([req], items, scores, baseline)
    assert rec["case_id"] == "7"
    assert rec["rewrite_tf"] == 1.0 and rec["rewrite_em"] == 1.0 and rec["efficacy"] == 1.0
    assert rec["efficacy_mag"] == pytest.approx(0.85)
    assert rec["rephrase_tf"] == 0.0 and rec["rephrase_em"] == 0.0 and rec["paraphrase"] == 0.0
    assert rec["locality_tf"] == 0.5  # one of two argmax tokens changed against the unedited model
    assert rec["locality_em"] == 0.0 and rec["locality_acc"] == 0.5 and rec["neighborhood"] == 1.0
    assert rec["portability_tf"] == 1.0 and rec["portability_em"] == 1.0 and rec["portability[Reasoning]_tf"] == 1.0
    assert rec["rewrite_ppl"] == pytest.approx(1 / 0.9)


def test_summary_means_and_geometric_perplexity():
    from lmedit.evaluate.runner import summarize

    rows = [{"case_id": "0", "rewrite_tf": 1.0, "rewrite_ppl": 2.0}, {"case_id": "1", "rewrite_tf": 0.5, "rewrite_ppl": 8.0}]
    overall = summarize(rows)["overall"]
    assert overall == {"rewrite_tf": 0.75, "rewrite_ppl": 4.0, "cases": 2}  # √(2·8), not (2+8)/2
    rows[1]["rewrite_ppl"] = 1e70  # a destroyed case weighs like any other, on the log scale
    assert summarize(rows)["overall"]["rewrite_ppl"] == pytest.approx(math.sqrt(2e70), rel=1e-6)


# ----------------------------------------------------------------------------------- on a model

@pytest.fixture(scope="module")
def model():
    return tiny("llama", seed=1)


def _requests(model, n=4):
    prompts = [f"Fact number {i} is about" for i in range(n)]
    return [lmedit.EditRequest(p, "Fact", f" zq{i}.", rephrases=[p.replace("Fact", "Fact")],
                               locality=[{"prompt": f"Unrelated text {i} says", "answer": " hello"}], case_id=i)
            for i, p in enumerate(prompts)]


STRONG = dict(lr=1e-2, steps=60, stop_loss=0.01)


def test_unedited_run_has_perfect_locality_and_writes_outputs(model, tmp_path):
    report = evaluate(model, None, _requests(model), out_dir=tmp_path / "run", progress=False)
    overall = report.summary["overall"]
    assert overall["cases"] == 4 and overall["locality_tf"] == 1.0 and overall["locality_em"] == 1.0
    assert report.config["protocol"] == "unedited" and report.config["model"]["fingerprint"] == model.fingerprint
    lines = (tmp_path / "run" / "cases.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["case_id"] == "0"
    loaded = load_report(tmp_path / "run")
    assert loaded.summary == json.loads(json.dumps(report.summary))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    summary["summary"]["overall"]["locality_tf"] = 0.0  # an outdated summary is recomputed from the cases
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    assert resummarize(tmp_path / "run").summary["overall"]["locality_tf"] == 1.0
    assert load_report(tmp_path / "run").summary["overall"]["locality_tf"] == 1.0
    assert "none (unedited) |" in markdown_table([loaded])  # CPU, float32: no placement mark
    loaded.config["model"].update(device="cuda:0", dtype="torch.bfloat16")
    assert "none (unedited) [cuda:0, bfloat16] |" in markdown_table([loaded])


def test_an_unedited_bfloat16_model_agrees_with_its_locality_baseline():
    """Batched in bfloat16, a prompt's greedy continuation depends on its batchmates by rounding alone
    (this model, scored with all probes mixed in batches: Loc.(gen) 0.88); locality is scored one prompt at
    a time there, in the baseline and after the edit, so an untouched prompt agrees exactly."""
    half = tiny("llama", seed=0)
    half.module.to(torch.bfloat16)
    reqs = [lmedit.EditRequest(f"Fact {'very ' * (i % 7)}number {i} is about", "Fact", f" zq{i}.",
                               locality=[{"prompt": f"Unrelated {'long ' * (i % 5)}text {i} says",
                                          "answer": " hello world"}], case_id=i) for i in range(40)]
    overall = evaluate(half, None, reqs, progress=False).summary["overall"]
    assert overall["locality_tf"] == 1.0 and overall["locality_em"] == 1.0


def test_the_locality_baseline_is_cached_per_dtype(tmp_path):
    """The fingerprint is the same in every dtype; a bfloat16 run must not read a float32 baseline."""
    m = tiny("llama", seed=2)
    items = probe_items(_requests(m, 6))
    for n, dtype in enumerate((torch.float32, torch.bfloat16, torch.float16), start=1):
        m.module.to(dtype)
        cached = locality_baseline(m, items, tmp_path)
        assert len(list(tmp_path.rglob("locality-*.json"))) == n
        assert cached == locality_baseline(m, items, None)  # as computed afresh in this dtype


def test_single_protocol_edits_each_case_and_restores_the_model(model, tmp_path):
    before = {n: p.clone() for n, p in model.module.named_parameters()}
    report = evaluate(model, "ft-m", _requests(model), hparams=STRONG, out_dir=tmp_path / "single", progress=False)
    assert report.summary["overall"]["rewrite_tf"] == 1.0
    assert report.summary["overall"]["rewrite_em"] == 1.0
    assert all(torch.equal(before[n], p) for n, p in model.module.named_parameters())
    assert report.config["hparams"]["lr"] == STRONG["lr"] and report.config["hparams"]["layers"] is not None


def test_edit_diagnostics_are_split_between_the_cases_of_an_edit_call():
    from lmedit.evaluate.runner import edit_diagnostics
    from lmedit.patch import Patch

    patch = Patch("memit", {}, [], "f", [], {"v_prob": [0.97, 0.4], "v_steps": [12], "timing": {"values": 3.5},
                                             "residual_norms": [2.0, 1.0]})
    assert edit_diagnostics(patch, 2) == [
        {"edit_v_prob": 0.97, "edit_v_steps": [12], "edit_timing": {"values": 3.5}},
        {"edit_v_prob": 0.4, "edit_v_steps": [12], "edit_timing": {"values": 3.5}}]
    assert edit_diagnostics(None, 2) == [{}, {}]


def test_batch_protocol_reports_seconds_per_edited_case(model):
    report = evaluate(model, FTM(**{**STRONG, "steps": 5}), _requests(model), protocol="batch", batch_size=2,
                      progress=False, generation=False)
    per_case = [r["edit_seconds"] for r in report.records]
    assert per_case[0] == per_case[1] and per_case[2] == per_case[3]  # a batch's time shared by its cases
    assert report.config["edit_seconds_mean"] == pytest.approx(sum(per_case) / 4, abs=1e-3)


def dies_on_third_call() -> type:
    """An FT-M class that crashes on its third edit call, like a killed run."""

    class Dies(FTM):
        calls = 0

        def compute(self, *args, **kwargs):
            Dies.calls += 1
            if Dies.calls == 3:
                raise KeyboardInterrupt
            return super().compute(*args, **kwargs)

    return Dies


def test_sequential_after_all_curves_and_resume(model, tmp_path):
    reqs = _requests(model, 4)
    before = {n: p.clone() for n, p in model.module.named_parameters()}

    Dies = dies_on_third_call()
    out = tmp_path / "seq"
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, Dies(**STRONG), reqs, protocol="sequential", checkpoints=[1, 2], out_dir=out, progress=False)
    assert all(torch.equal(before[n], p) for n, p in model.module.named_parameters()), "a killed run restores the model"
    stopped = load_report(out)  # a stopped run is reported from its settings and the marks scored so far
    assert stopped.config["in_progress"] and sorted(int(t) for t in stopped.summary["by_T"]) == [1, 2]
    assert "[in progress: 2/4] T=2 | 2 |" in markdown_table([stopped])  # 2 of its 4 edits checkpointed
    with pytest.raises(EvalError, match="resume"):
        evaluate(model, FTM(**STRONG), reqs, protocol="sequential", checkpoints=[1, 2], out_dir=out, progress=False)
    with open(out / "edits.jsonl", "a") as f:  # a call made after the last checkpoint, and one cut short by the kill
        f.write(json.dumps({"call": 2, "cases": ["lost"], "seconds": 1.0, "declined": False, "info": {}}) + "\n{\"call")
    report = evaluate(model, FTM(**STRONG), reqs, protocol="sequential", checkpoints=[1, 2], out_dir=out, resume=True,
                      progress=False)
    assert sorted(report.summary["by_T"]) == [1, 2, 4]
    assert report.summary["by_T"][4]["cases"] == 4 and report.summary["by_T"][1]["cases"] == 1
    lines = [json.loads(x) for x in (out / "cases.jsonl").read_text().splitlines()]
    assert len(lines) == 1 + 2 + 4  # no record written twice
    log = [json.loads(x) for x in (out / "edits.jsonl").read_text().splitlines()]
    assert [e["call"] for e in log] == [0, 1, 2, 3]  # the checkpointed calls, then the resumed ones, none twice
    assert [e["cases"] for e in log] == [[r.case_id] for r in reqs]
    assert all(e["seconds"] > 0 and not e["declined"] and e["info"]["steps"] >= 1 for e in log)
    assert (out / "curves.png").stat().st_size > 1000
    assert all(torch.equal(before[n], p) for n, p in model.module.named_parameters())
    unedited = evaluate(model, None, reqs, out_dir=tmp_path / "none", progress=False)
    assert plot_comparison([load_report(out), stopped, unedited], tmp_path / "cmp.png").stat().st_size > 1000
    assert curve_label(stopped.config) == "ft-m [in progress: 2/4]"
    with pytest.raises(EvalError, match="lifelong"):
        plot_comparison([unedited], tmp_path / "none.png")


def test_compared_runs_never_share_a_line_style():
    """Past matplotlib's ten colours a comparison's runs still look different (colour, marker, dashes)."""
    styles = curve_styles(25)
    assert len({tuple(sorted(s.items())) for s in styles}) == 25
    assert styles[0]["color"] == styles[10]["color"] and styles[0]["marker"] != styles[10]["marker"]


def test_a_resumed_sequential_run_scores_as_an_uninterrupted_one(model, tmp_path):
    """A killed and resumed run ends on the same weights, bit for bit, as one that was never stopped: the
    live model is snapped to ``W₀ + (W − W₀)`` at each checkpoint, which is what a resume rebuilds."""
    reqs = _requests(model, 4)
    whole = evaluate(model, FTM(**STRONG), reqs, protocol="sequential", checkpoints=[1, 2], out_dir=tmp_path / "a",
                     progress=False, generation=False)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, dies_on_third_call()(**STRONG), reqs, protocol="sequential", checkpoints=[1, 2],
                 out_dir=tmp_path / "b", progress=False, generation=False)
    resumed = evaluate(model, FTM(**STRONG), reqs, protocol="sequential", checkpoints=[1, 2], out_dir=tmp_path / "b",
                       resume=True, progress=False, generation=False)

    def scores(report):
        return sorted(({k: v for k, v in r.items() if not k.startswith("edit_")} for r in report.records
                       if r["T"] == 4), key=lambda r: r["case_id"])

    assert scores(resumed) == scores(whole)


def test_a_run_killed_while_checkpointing_resumes_from_a_whole_checkpoint(model, tmp_path):
    """A checkpoint is written aside and swapped in, so a kill leaves a whole one: killed mid-swap (only
    ``patch.old`` left), the run resumes from it; killed after the swap but before the progress file (the patch
    one checkpoint ahead), it resumes from the patch's own count and makes no edit twice."""
    reqs = _requests(model, 4)
    whole = evaluate(model, FTM(**STRONG), reqs, protocol="sequential", checkpoints=[1, 2], out_dir=tmp_path / "a",
                     progress=False, generation=False)

    def scores(report):
        return sorted(({k: v for k, v in r.items() if not k.startswith("edit_")} for r in report.records
                       if r["T"] == 4), key=lambda r: r["case_id"])

    for damage in ("mid-swap", "progress behind"):
        out = tmp_path / damage
        with pytest.raises(KeyboardInterrupt):
            evaluate(model, dies_on_third_call()(**STRONG), reqs, protocol="sequential", checkpoints=[1, 2],
                     out_dir=out, progress=False, generation=False)
        state = out / "state"
        assert sorted(p.name for p in state.iterdir()) == ["patch", "progress.json"]  # nothing half-written left
        assert json.loads((state / "progress.json").read_text())["chunks_done"] == 2
        if damage == "mid-swap":
            (state / "patch").rename(state / "patch.old")
        else:
            (state / "progress.json").write_text(json.dumps({"chunks_done": 1, "failed": {}}))

        class Counting(FTM):
            calls = 0

            def compute(self, *args, **kwargs):
                Counting.calls += 1
                return super().compute(*args, **kwargs)

        resumed = evaluate(model, Counting(**STRONG), reqs, protocol="sequential", checkpoints=[1, 2], out_dir=out,
                           resume=True, progress=False, generation=False)
        assert Counting.calls == 2  # cases 3 and 4 only
        assert scores(resumed) == scores(whole)


def test_a_run_killed_while_writing_a_record_resumes_and_redoes_that_case(model, tmp_path):
    reqs = _requests(model, 3)
    out = tmp_path / "run"
    evaluate(model, FTM(**STRONG), reqs, out_dir=out, progress=False, generation=False)
    whole = (out / "cases.jsonl").read_text().splitlines()
    (out / "cases.jsonl").write_text("\n".join(whole[:2]) + "\n" + whole[2][: len(whole[2]) // 2])  # half a record
    assert len(read_cases(out)) == 2
    report = evaluate(model, FTM(**STRONG), reqs, out_dir=out, resume=True, progress=False, generation=False)
    assert report.summary["overall"]["cases"] == 3
    again = (out / "cases.jsonl").read_text().splitlines()
    assert len(again) == 3 and json.loads(again[2])["case_id"] == json.loads(whole[2])["case_id"]
    (out / "cases.jsonl").write_text("{broken\n" + "\n".join(whole[1:]) + "\n")  # damage elsewhere is not guessed at
    with pytest.raises(EvalError, match="line 1: not a JSON record"):
        read_cases(out)


def test_resume_refuses_other_settings(model, tmp_path, caplog):
    """A run directory is one experiment: resuming with another hyper-parameter or dataset is refused
    (before anything is edited or written), a larger ``n`` extends it, another dtype only warns."""
    reqs = _requests(model, 3)
    out = tmp_path / "run"
    evaluate(model, FTM(**STRONG), reqs[:2], out_dir=out, progress=False)
    recorded = (out / "cases.jsonl").read_text()
    with pytest.raises(EvalError, match=r"hparams\.lr: 0\.01 -> 0\.05"):
        evaluate(model, FTM(**{**STRONG, "lr": 0.05}), reqs, out_dir=out, resume=True, progress=False)
    assert (out / "cases.jsonl").read_text() == recorded
    report = evaluate(model, FTM(**STRONG), reqs, out_dir=out, resume=True, progress=False)
    assert report.summary["overall"]["cases"] == 3
    settings = json.loads((out / "run.json").read_text())
    settings["model"]["dtype"] = "torch.bfloat16"
    del settings["hparams"]["steps"]  # as if the method gained ``steps`` after the run started
    (out / "run.json").write_text(json.dumps(settings))
    with caplog.at_level("WARNING"):
        evaluate(model, FTM(**STRONG), reqs, out_dir=out, resume=True, progress=False)
    assert "another placement" in caplog.text and "new hparams.steps" in caplog.text


def test_an_extended_run_reports_in_progress_until_it_ends(model, tmp_path):
    """Resuming a finished run with a larger ``n`` drops its summary (it described the shorter run) and records
    the new ``n``; a kill before the end leaves a run ``lmedit report`` shows as in progress at that ``n``, which
    a later resume may not shrink."""
    reqs = _requests(model, 4)
    out = tmp_path / "run"
    evaluate(model, FTM(**STRONG), reqs[:2], protocol="sequential", checkpoints=[1], out_dir=out, progress=False)
    assert load_report(out).summary["overall"]["cases"] == 2 and (out / "summary.json").exists()
    Dies = dies_on_third_call()
    Dies.calls = 2  # its next call, the run's third edit, is killed
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, Dies(**STRONG), reqs, protocol="sequential", checkpoints=[1], out_dir=out, resume=True,
                 progress=False)
    assert not (out / "summary.json").exists()
    extended = load_report(out)
    assert extended.config["in_progress"] and extended.config["n"] == 4 and extended.config["cases_done"] == 2
    with pytest.raises(EvalError, match="n may grow, not shrink: 4 -> 3"):  # its edit state holds a third edit
        evaluate(model, FTM(**STRONG), reqs[:3], protocol="sequential", checkpoints=[1], out_dir=out, resume=True,
                 progress=False)
    report = evaluate(model, FTM(**STRONG), reqs, protocol="sequential", checkpoints=[1], out_dir=out, resume=True,
                      progress=False)
    assert report.config["n"] == 4 and load_report(out).summary == json.loads(json.dumps(report.summary))


def test_a_shuffled_sequential_run_edits_the_same_cases_in_the_seeds_order(model, tmp_path):
    """``shuffle`` keeps the first n cases and draws their order from the seed: T = 1 is the first case of that
    order, the last mark holds them all, and the order is part of the run's settings on resume."""
    import random

    reqs = _requests(model, 4)
    order = [str(r.case_id) for r in reqs]
    random.Random(3).shuffle(order)
    assert order != [str(r.case_id) for r in reqs]  # the seed does reorder these four
    out = tmp_path / "shuffled"
    report = evaluate(model, "none", reqs, protocol="sequential", checkpoints=[1, 2], out_dir=out, seed=3, shuffle=True,
                      progress=False, generation=False)
    first = {t: sorted(str(r["case_id"]) for r in report.records if r["T"] == t) for t in (1, 2, 4)}
    assert first == {1: [order[0]], 2: sorted(order[:2]), 4: sorted(order)}
    assert report.config["order"] == "shuffled"
    with pytest.raises(EvalError, match="order: 'shuffled' -> 'file'"):
        evaluate(model, "none", reqs, protocol="sequential", checkpoints=[1, 2], out_dir=out, seed=3, resume=True,
                 progress=False, generation=False)
    with pytest.raises(EvalError, match="n of a shuffled run: 4 -> 3"):  # another n would draw another order
        evaluate(model, "none", reqs[:3], protocol="sequential", checkpoints=[1, 2], out_dir=out, seed=3, shuffle=True,
                 resume=True, progress=False, generation=False)
    settings = json.loads((out / "run.json").read_text())
    del settings["order"]  # a run from before ``order`` was recorded was run in file order
    (out / "run.json").write_text(json.dumps(settings))
    evaluate(model, "none", reqs, protocol="sequential", checkpoints=[1, 2], out_dir=out, seed=3, resume=True,
             progress=False, generation=False)


def test_run_requests_rebuilds_a_runs_cases_in_the_order_it_edited_them(model, tmp_path):
    """``run_requests`` reads a run's ``run.json`` (dataset, n, order, seed) and gives back the requests it
    edited, in its order: the case edited at T = 1 first. A run on plain requests cannot be rebuilt."""
    from lmedit.evaluate import edit_requests, run_requests

    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Fact number {i} is about", "subject": "Fact",
                                        "target_new": f"zq{i}.", "ground_truth": "x", "case_id": i}) + "\n"
                            for i in range(6)))
    out = tmp_path / "shuffled"
    report = evaluate(model, "none", str(data), n=5, protocol="sequential", checkpoints=[1], out_dir=out, seed=7,
                      shuffle=True, progress=False, generation=False)
    rebuilt = [r.case_id for r in run_requests(out)]
    first = next(r["case_id"] for r in report.records if r["T"] == 1)
    assert len(rebuilt) == 5 and rebuilt[0] == str(first) and sorted(rebuilt) == ["0", "1", "2", "3", "4"]
    assert rebuilt == [r.case_id for r in edit_requests(str(data), 5, shuffle=True, seed=7)[1]]
    assert rebuilt != [r.case_id for r in edit_requests(str(data), 5)[1]]  # seed 7 does reorder them
    settings = json.loads((out / "run.json").read_text())
    del settings["order"]  # a run from before ``order`` was recorded was run in file order
    (out / "run.json").write_text(json.dumps(settings))
    assert [r.case_id for r in run_requests(out)] == ["0", "1", "2", "3", "4"]
    evaluate(model, None, _requests(model, 2), out_dir=tmp_path / "plain", progress=False, generation=False)
    with pytest.raises(EvalError, match="plain requests"):
        run_requests(tmp_path / "plain")
    with pytest.raises(EvalError, match="no run"):
        run_requests(tmp_path / "nowhere")


def test_sequential_runs_checkpoint_on_time_between_marks(model, tmp_path, monkeypatch):
    from lmedit.evaluate import sequential

    monkeypatch.setattr(sequential, "CHECKPOINT_SECONDS", 0.0)  # every edit call is "long"
    reqs = _requests(model, 4)

    Dies = dies_on_third_call()
    out = tmp_path / "seq"
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, Dies(**STRONG), reqs, protocol="sequential", checkpoints=[4], out_dir=out, progress=False)
    assert json.loads((out / "state" / "progress.json").read_text())["chunks_done"] == 2  # no mark before T=4


class DeclinesOdd(FTM):
    """FT-M that declines (``EditError``) the requests of odd-numbered cases."""

    def compute(self, model, hp, requests, originals):
        if any(int(r.case_id) % 2 for r in requests):
            raise lmedit.errors.EditError("no neurons for this fact")
        return super().compute(model, hp, requests, originals)


@pytest.mark.parametrize("protocol", ["single", "sequential"])
def test_declined_edits_are_recorded_as_failures_and_the_run_goes_on(model, protocol, tmp_path):
    reqs = _requests(model, 4)
    unedited = evaluate(model, None, reqs, progress=False).records
    before = {n: p.clone() for n, p in model.module.named_parameters()}
    report = evaluate(model, DeclinesOdd(**STRONG), reqs, protocol=protocol, checkpoints=[2], out_dir=tmp_path / "r",
                      progress=False)
    final = [r for r in report.records if r.get("T", 4) == 4]
    assert [r["edit_failed"] for r in final] == [0.0, 1.0, 0.0, 1.0]
    assert final[1]["edit_error"] == "no neurons for this fact"
    assert report.summary["overall"]["edit_failed"] == 0.5
    first = [r for r in report.records if r["case_id"] == "0"][0]  # right after its own edit (T=2 when sequential)
    assert first["rewrite_tf"] == 1.0
    if protocol == "single":  # a declined case is scored on the unedited model
        assert final[1]["rewrite_tf"] == unedited[1]["rewrite_tf"] < 1.0
    assert all(torch.equal(before[n], p) for n, p in model.module.named_parameters())
    assert "Failed" in markdown_table([report])


def test_bad_configuration_errors(model):
    with pytest.raises(EvalError, match="protocol"):
        evaluate(model, "ft-m", _requests(model), protocol="nope", progress=False)
    with pytest.raises(EvalError, match="scoring"):
        evaluate(model, "ft-m", _requests(model), scoring="sometimes", progress=False)
    with pytest.raises(EvalError, match="at least 1, not 0"):  # it wrote an empty run before
        evaluate(model, "ft-m", _requests(model), n=0, progress=False)
    with pytest.raises(EvalError, match="batch size must be at least 1"):
        evaluate(model, "ft-m", _requests(model), protocol="batch", batch_size=0, progress=False)
    with pytest.raises(LmeditError, match="no edit requests"):
        evaluate(model, "ft-m", [], progress=False)


def test_fluency_records_measure_generations(model):
    from lmedit.evaluate.probes import fluency_records

    reqs = [lmedit.EditRequest("Fact {} is", "A", " b.", generation_prompts=["Tell me about A", "A is"],
                               meta={"reference_texts": ["A is a letter of the alphabet"]}),
            lmedit.EditRequest("Fact {} is", "B", " c.")]
    with_gen, without = fluency_records(model, reqs, max_new_tokens=20)
    assert without == {}
    texts = [generate(model, p, max_new_tokens=20) for p in reqs[0].generation_prompts]
    assert with_gen["fluency"] == pytest.approx(sum(ngram_entropy(t) for t in texts) / 2)
    assert 0.0 <= with_gen["consistency"] <= 1.0


def test_multihop_record_edits_then_reverts(model):
    from types import SimpleNamespace

    from lmedit.evaluate.multihop import multihop_record

    before = {n: p.clone() for n, p in model.module.named_parameters()}
    question = "Q: Where is it?\nA:"
    answer = generate(model, question, max_new_tokens=4)
    case = SimpleNamespace(case_id=3, requests=[lmedit.EditRequest("Fact {} is", "A", " zq.")],
                           questions=["Where is it?"], answer="nothing", answer_aliases=[],
                           new_answer=answer, new_answer_aliases=[])
    rec = multihop_record(model, FTM(**STRONG), case, max_new_tokens=4)
    assert rec["case_id"] == "3" and rec["edit_acc"] == 1.0 and rec["multihop_old"] == 0.0
    assert all(torch.equal(before[n], p) for n, p in model.module.named_parameters())
    unedited = multihop_record(model, None, case, max_new_tokens=4)
    assert unedited["multihop_acc"] == 1.0 and unedited["answers"] == [answer]


def test_report_command_skips_paths_that_are_not_runs(model, tmp_path):
    from typer.testing import CliRunner

    from lmedit.cli import app

    evaluate(model, None, _requests(model), out_dir=tmp_path / "run", progress=False)
    (tmp_path / "README.md").write_text("not a run")
    runner = CliRunner()
    out = runner.invoke(app, ["report", str(tmp_path / "README.md"), str(tmp_path / "run")])
    assert out.exit_code == 0 and "none (unedited) |" in out.stdout
    assert "skipped:" in out.stderr and "README.md is not an evaluation run" in out.stderr
    alone = runner.invoke(app, ["report", str(tmp_path / "README.md")])  # one path that is no run: an error
    assert isinstance(alone.exception, EvalError) and "is not an evaluation run" in str(alone.exception)
    none = runner.invoke(app, ["report", str(tmp_path / "README.md"), str(tmp_path / "missing")])
    assert isinstance(none.exception, EvalError) and "none of the 2 paths" in str(none.exception)


def test_report_prints_a_sequential_runs_edit_log_and_forgetting_by_blocks(model, tmp_path):
    from typer.testing import CliRunner

    from lmedit.cli import app

    reqs = _requests(model, 4)
    evaluate(model, FTM(**STRONG), reqs, protocol="sequential", checkpoints=[2], out_dir=tmp_path / "seq",
             progress=False, generation=False)
    log = [json.loads(x) for x in (tmp_path / "seq" / "edits.jsonl").read_text().splitlines()]
    evaluate(model, None, reqs, out_dir=tmp_path / "none", progress=False, generation=False)
    out = CliRunner().invoke(app, ["report", str(tmp_path / "seq"), str(tmp_path / "none"), "--edits", "3"])
    assert out.exit_code == 0, out.output
    table = out.stdout.split("edit calls in blocks of 3\n")[1].splitlines()
    assert table[0].startswith("| calls | cases | s/case | declined | ") and "steps" in table[0]
    steps = table[0].split(" | ").index("steps")
    assert [row.split(" | ")[0] for row in table[2:4]] == ["| 1–3", "| 4–4"]
    assert table[2].split(" | ")[1] == "3" and table[3].split(" | ")[1] == "1"
    assert float(table[3].split(" | ")[steps]) == log[3]["info"]["steps"]  # the block's mean: one call
    assert "none: no edit log (edits.jsonl)" in out.stdout
    from lmedit.evaluate.report import edit_log_table

    batches = tmp_path / "batches"  # a batch method's per-case lists count by their mean; text is left out
    batches.mkdir()
    (batches / "edits.jsonl").write_text("".join(json.dumps(
        {"call": c, "cases": ["a", "b"], "seconds": 4.0, "declined": False,
         "info": {"v_prob": [0.5, 1.0 - c / 2], "method": "memit"}}) + "\n" for c in range(2)))
    assert edit_log_table(batches, 2).splitlines()[2] == "| 1–2 | 4 | 2.00 | 0 | 0.62 |"
    bad = CliRunner().invoke(app, ["report", str(tmp_path / "seq"), "--edits", "-1"])
    assert isinstance(bad.exception, EvalError) and "at least 1 call" in str(bad.exception)
    # forgetting: each block of edits (in edit order) at each mark
    cases = [json.loads(x) for x in (tmp_path / "seq" / "cases.jsonl").read_text().splitlines()]
    first = [c["case_id"] for c in cases if c["T"] == 2]

    def mean(t: int, ids: list[str]) -> str:
        return f"{sum(c['rewrite_tf'] for c in cases if c['T'] == t and c['case_id'] in ids) / len(ids):.2f}"

    later = [c["case_id"] for c in cases if c["T"] == 4 and c["case_id"] not in first]
    out = CliRunner().invoke(app, ["report", str(tmp_path / "seq"), str(tmp_path / "none"), "--retention", "2"])
    assert out.exit_code == 0, out.output
    table = out.stdout.split("rewrite_tf by blocks of 2 edits (rows) after T edits (columns)\n")[1].splitlines()
    assert table[0] == "| edits | T=2 | T=4 |"
    assert table[2] == f"| 1–2 | {mean(2, first)} | {mean(4, first)} |"
    assert table[3] == f"| 3–4 | – | {mean(4, later)} |"
    assert "none: no lifelong marks" in out.stdout
    evaluate(model, FTM(**STRONG), reqs[:2], protocol="sequential", scoring="after_each", out_dir=tmp_path / "each",
             progress=False, generation=False)
    from lmedit.evaluate.report import retention_table
    assert retention_table(tmp_path / "each", 1) == ""  # each case scored once, at its own T: no marks
    for args, message in ((["--retention", "-1"], "at least 1 edit"),
                          (["--retention", "2", "--metric", "bogus"], "no per-case 'bogus'")):
        bad = CliRunner().invoke(app, ["report", str(tmp_path / "seq"), *args])
        assert isinstance(bad.exception, EvalError) and message in str(bad.exception)
