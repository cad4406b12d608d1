"""Every editor, tool and patch on a half-precision model, and on CUDA when the machine has it.

Users load models in bfloat16 on GPUs (the loader's default there). The contract is the same as in
float32 on CPU: ``edit()`` leaves the weights as they were, the patch makes the model prefer the new
target, reverting is bit-exact, and statistics and solves run in float32/64 whatever the model's dtype.
The CPU-bfloat16 cases run everywhere (CI included); the CUDA cases run where CUDA is present
(``pytest -m cuda``)."""
from __future__ import annotations

import pytest
import torch

import lmedit
from lmedit.adaptors import adaptors
from lmedit.patch import Patch
from lmedit.continuations import score_continuations
from lmedit.scoring import encode, forward_logits
from tiny import CORPUS, tiny
from tiny import bit_identical as _unchanged, params as _params

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
PLACEMENTS = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=[CUDA, pytest.mark.cuda]),
    pytest.param("cuda", torch.float32, id="cuda-fp32", marks=[CUDA, pytest.mark.cuda]),
]

EDIT = lmedit.EditRequest("The colour of {} is ", "grass", "Z", "g", rephrases=["Grass has the colour "])
# The MEMIT family writes v* at its last layer, which in a 2-layer model reaches only the subject's own
# position: the subject ends this prompt (tests/test_locate.py does the same).
SUBJECT_LAST = lmedit.EditRequest("The colour of {}", "grass", " Z")
LOCATE_FAMILY = {"rome", "memit", "pmet", "emmet", "alphaedit"}
UNRELATED = ("A completely different sentence about rivers", "Mountains rise above the quiet valley")
LOCATE = dict(corpus=CORPUS, stats_tokens=2000, context_lengths=[[4, 2]], steps=60, lr=0.5,
              clamp_norm_factor=100.0, weight_decay=0.0, kl_factor=0.0)
# Settings that let a 2-layer random model learn one byte-token answer (the other test files explain each).
HPARAMS: dict[str, dict] = {
    "ft-m": dict(steps=10, lr=5e-2),
    "ft-l": dict(steps=10, lr=5e-2, norm_constraint=5e-2),  # the published 5e-4 allows too little here
    "ft-ewc": dict(layers=(1,), lr=5e-2, steps=10, corpus=CORPUS, fisher_tokens=2000),
    "lora": dict(lr=1e-2, rank=4),
    "rome": dict(layer=0, **LOCATE),
    "memit": dict(layers=(0, 1), mom2_weight=1.0, **LOCATE),
    "pmet": dict(layers=(0, 1), mom2_weight=1.0, **LOCATE),
    "emmet": dict(layers=(0, 1), mom2_weight=1.0, **LOCATE),
    "alphaedit": dict(layers=(0, 1), mom2_weight=1.0, nullspace_threshold=1e9, l2=1e-2, **LOCATE),
    "kn": dict(share=0.5),
    "grace": dict(layer=1),
    "wise": dict(layer=1, alpha=0.5, beta=3.0, gamma=4.0, steps=40, lr=1.0, irrelevant=UNRELATED,
                 n_irrelevant=2, context_lengths=((3, 2),), mask_ratio=0.2),
    "defer": dict(layer=1, lr=1e-2, gate_lr=5e-2, steps=60, irrelevant=UNRELATED, n_irrelevant=2),
}


def _placed(arch: str, device: str, dtype: torch.dtype):
    model = tiny(arch)
    model.module.to(device=device, dtype=dtype)
    return model


def _target_logprob(model, request=EDIT) -> float:
    return score_continuations(model, [request.prompt], [request.target_new])[0].mean_logprob


@pytest.mark.parametrize("device,dtype", PLACEMENTS)
@pytest.mark.parametrize("method", sorted(HPARAMS))
def test_every_editor_edits_and_reverts_exactly_in_place(method, device, dtype, tmp_path, monkeypatch):
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "cache"))
    arch = "gpt2" if method == "kn" else "llama"  # KN's test model (its answers' byte tokens differ there)
    request = SUBJECT_LAST if method in LOCATE_FAMILY else EDIT
    model = _placed(arch, device, dtype)
    saved = _params(model)
    other = forward_logits(model, encode(model, [UNRELATED[0]]))
    before = _target_logprob(model, request)

    patch = lmedit.edit(model, request, method=method, **HPARAMS[method])
    assert _unchanged(model, saved) and not adaptors(model)  # edit() leaves the model as it was
    assert model.device.type == device and model.dtype == dtype

    with patch.applied(model):
        after = _target_logprob(model, request)
        assert all(p.dtype == dtype and p.device.type == device for p in model.module.parameters())
    assert after > before + 0.5, (before, after)
    assert _unchanged(model, saved) and not adaptors(model)  # reverted bit for bit
    assert torch.equal(forward_logits(model, encode(model, [UNRELATED[0]])), other)

    patch.save(tmp_path / "patch")
    with Patch.load(tmp_path / "patch").applied(model):
        assert _target_logprob(model, request) == pytest.approx(after, abs=1e-4)
    assert _unchanged(model, saved)


@pytest.mark.parametrize("device,dtype", PLACEMENTS)
def test_in_context_editing_needs_no_weights(device, dtype):
    model = _placed("llama", device, dtype)
    saved = _params(model)
    with lmedit.edit(model, EDIT, method="ike").applied(model):
        assert "The colour of grass is Z." in model.format_prompt("The colour of grass is ")
        score_continuations(model, [EDIT.prompt], [EDIT.target_new])
    assert _unchanged(model, saved)


@pytest.mark.parametrize("device,dtype", PLACEMENTS)
def test_statistics_stay_in_float64_on_any_model(device, dtype, tmp_path, monkeypatch):
    from lmedit.stats import second_moment

    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path))
    model = _placed("llama", device, dtype)
    moment = second_moment(model, 1, CORPUS, max_tokens=2000, progress=False)
    mean = moment.mean
    assert mean.dtype == torch.float64 and moment.count >= 2000
    assert bool(torch.isfinite(mean).all()) and torch.allclose(mean, mean.T, rtol=1e-12, atol=1e-12)  # GPU sums: not bit-symmetric
    assert float(torch.linalg.eigvalsh(mean).min()) > -1e-9 * float(mean.diagonal().max())  # PSD


@pytest.mark.parametrize("device,dtype", PLACEMENTS)
def test_inspection_and_steering_run_in_place(device, dtype):
    from lmedit.inspect import causal_trace, logit_lens
    from lmedit.steer import steer, steering_vectors

    model = _placed("llama", device, dtype)
    saved = _params(model)
    trace = causal_trace(model, "The colour of grass is", "grass", samples=3, seed=1)
    assert bool(torch.isfinite(trace.scores).all()) and trace.scores.shape[1] == model.spec.n_layers
    lens = logit_lens(model, "The colour of grass is", k=3)
    assert bool(torch.isfinite(lens.final_prob).all()) and lens.top_ids.shape[0] >= model.spec.n_layers
    vectors = steering_vectors(model, ["I love it", "Wonderful day"], ["I hate it", "Awful day"], layers=[1])
    prompt = encode(model, ["Today is"])
    plain = forward_logits(model, prompt)
    with steer(model, vectors, multiplier=4.0).applied(model):
        assert not torch.equal(forward_logits(model, prompt), plain)
    assert torch.equal(forward_logits(model, prompt), plain) and _unchanged(model, saved)


@CUDA
@pytest.mark.cuda
def test_a_model_placed_by_accelerate_edits_and_reverts(tmp_path, monkeypatch):
    """``load_model(device="auto")`` hands placement to accelerate (``device_map="auto"``): edits, their
    statistics and their patches follow each weight to wherever accelerate put it."""
    from tiny import tiny_model, tiny_tokenizer

    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "cache"))
    tiny_model("llama").save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    model = lmedit.load_model(str(tmp_path / "m"), device="auto")
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16  # the GPU default
    saved = _params(model)
    for method, request in (("ft-m", EDIT), ("rome", SUBJECT_LAST)):
        before = _target_logprob(model, request)
        with lmedit.edit(model, request, method=method, **HPARAMS[method]).applied(model):
            assert _target_logprob(model, request) > before + 0.5
        assert _unchanged(model, saved)
