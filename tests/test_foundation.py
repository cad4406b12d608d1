"""The foundation on tiny random models: structure discovery, hooks, patches, requests, scoring.

Every test runs on the randomly initialised models of ``tests/tiny.py`` (no download, CPU, seconds)."""
from __future__ import annotations

import json

import pytest
import torch

import lmedit
from lmedit.errors import PatchError, RequestError, SpecError
from lmedit.hooks import Hooks, ReplayBelow
from lmedit.models.spec import ModelSpec, discover_spec, get_module, is_conv1d, linear_dims, mlp_out_weight
from lmedit.patch import Patch, WeightDelta
from lmedit.requests import EditRequest, Probe, as_requests
from lmedit.continuations import generate, score_continuations, score_prompts
from lmedit.scoring import FixedPrefix, encode, forward_logits, join, target_logprobs
from tiny import CONFIGS, tiny
from tiny import params as _params

ARCHS = sorted(CONFIGS)
PROMPTS = ["The capital of France is", "Hi", "A much longer prompt about rivers and"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models are tiny: one intra-op thread is fastest, and robust to a busy 2-core machine (where
    OpenMP's thread hand-offs make every small matmul ~1000x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_bit_identical(model, saved: dict[str, torch.Tensor]) -> None:
    current = dict(model.module.named_parameters())
    assert current.keys() == saved.keys()
    changed = [n for n, p in current.items() if not torch.equal(saved[n], p.detach())]
    assert not changed, f"parameters changed: {changed}"


def _hook_counts(module: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in module.named_modules()}


@torch.no_grad()
def _logits(model, prompts=PROMPTS) -> torch.Tensor:
    return forward_logits(model, encode(model, prompts))


def _main(out):
    return out[0] if isinstance(out, (tuple, list)) else out


# ============================================================================== structure discovery

@pytest.mark.parametrize("arch", ARCHS)
def test_spec_discovery(arch):
    model = tiny(arch)
    spec, root = model.spec, model.module
    assert isinstance(spec, ModelSpec)
    assert (spec.n_layers, spec.hidden_size, spec.mlp_size) == (2, 64, 128)
    blocks = get_module(root, spec.blocks)
    assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) == 2
    # every path the spec names resolves, per block and globally
    for layer in range(spec.n_layers):
        assert get_module(root, spec.block(layer)) is blocks[layer]
        for role in ("attn", "attn_out", "mlp_out") + (("mlp",) if spec.mlp is not None else ()):
            get_module(root, spec.path(layer, role))
        for rel in spec.mlp_in:
            mod = get_module(root, f"{spec.block(layer)}.{rel}")
            d_in, d_out = linear_dims(mod)
            assert d_in == 64 and d_out in (128, 256), (rel, d_in, d_out)
    assert spec.mlp_in, "no MLP input projection found"
    for name in (spec.embed, spec.unembed, spec.final_norm):
        assert name is not None
        get_module(root, name)
    assert get_module(root, spec.embed) is root.get_input_embeddings()
    assert get_module(root, spec.unembed) is root.get_output_embeddings()
    assert "norm" in type(get_module(root, spec.final_norm)).__name__.lower()
    # the MLP output projection maps d_mlp → d_model, in the storage orientation the spec declares
    mlp_out = get_module(root, spec.path(0, "mlp_out"))
    assert linear_dims(mlp_out) == (128, 64)
    if arch == "gpt2":
        assert is_conv1d(mlp_out) and spec.weight_layout == "in_out"
        assert tuple(mlp_out.weight.shape) == (128, 64)
    else:
        assert isinstance(mlp_out, torch.nn.Linear) and spec.weight_layout == "out_in"
        assert tuple(mlp_out.weight.shape) == (64, 128)
    assert tuple(mlp_out_weight(root, spec, 0).shape) == (64, 128)
    attn_out = get_module(root, spec.path(0, "attn_out"))
    assert linear_dims(attn_out)[1] == 64
    assert spec.path(0, "attn_out").startswith(spec.path(0, "attn") + ".")
    assert isinstance(spec.tied_embeddings, bool)
    tied = get_module(root, spec.unembed).weight.data_ptr() == get_module(root, spec.embed).weight.data_ptr()
    assert spec.tied_embeddings == tied
    assert spec.overridden == ()


def test_spec_paths_and_layer_indices():
    spec = tiny("llama").spec
    assert spec.path(-1, "mlp_out") == spec.path(1, "mlp_out") == "model.layers.1.mlp.down_proj"
    assert spec.path(0, "block") == "model.layers.0"
    with pytest.raises(SpecError, match="out of range"):
        spec.path(2, "mlp_out")
    with pytest.raises(SpecError, match="unknown block role"):
        spec.path(0, "ffn")
    opt = tiny("opt").spec
    assert opt.mlp is None
    with pytest.raises(SpecError):
        opt.path(0, "mlp")
    with pytest.raises(SpecError, match="no module"):
        get_module(tiny("llama").module, "model.layers.7")


def test_spec_overrides_are_honoured_and_validated():
    model = tiny("llama")
    spec = discover_spec(model.module, final_norm=None, attn_out="self_attn.v_proj", mlp_in=["mlp.up_proj"])
    assert spec.final_norm is None
    assert spec.attn_out == "self_attn.v_proj"
    assert spec.mlp_in == ("mlp.up_proj",)
    assert spec.overridden == ("attn_out", "final_norm", "mlp_in")
    assert spec.mlp_out == model.spec.mlp_out  # untouched entries are still discovered
    # an override of mlp_out changes the derived mlp_size and mlp
    gpt2 = tiny("gpt2")
    s2 = discover_spec(gpt2.module, mlp_out="attn.c_proj")
    assert s2.mlp_out == "attn.c_proj" and s2.mlp_size == 64 and s2.mlp == "attn"
    # Model.from_hf passes overrides through
    from tiny import tiny_model, tiny_tokenizer
    wrapped = lmedit.Model.from_hf(tiny_model("llama"), tiny_tokenizer(), final_norm=None)
    assert wrapped.spec.final_norm is None and wrapped.spec.overridden == ("final_norm",)
    # invalid overrides are refused with SpecError
    with pytest.raises(SpecError, match="no module"):
        discover_spec(model.module, mlp_out="mlp.nonexistent")
    with pytest.raises(SpecError, match="no module"):
        discover_spec(model.module, final_norm="model.nonexistent_norm")
    with pytest.raises(SpecError, match="unknown ModelSpec entries"):
        discover_spec(model.module, mlp_outt="mlp.down_proj")
    with pytest.raises(SpecError, match="not a linear layer"):
        discover_spec(model.module, mlp_out="mlp")


@pytest.mark.parametrize("key,value", [("hidden_size", 32), ("weight_layout", "in_out"), ("n_layers", 1)])
def test_spec_derived_field_override_is_honoured_or_refused(key, value):
    model = tiny("llama")
    try:
        spec = discover_spec(model.module, **{key: value})
    except SpecError:
        return
    assert getattr(spec, key) == value, f"override {key}={value!r} ignored but recorded in {spec.overridden}"


# ============================================================================================ hooks

@pytest.fixture(params=["llama", "gpt2"])
def hook_model(request):
    return tiny(request.param)


def test_hooks_read_matches_manual_hook(hook_model):
    model, spec = hook_model, hook_model.spec
    batch = encode(model, PROMPTS)
    seen = {}
    block0 = get_module(model.module, spec.block(0))
    mlp_out = get_module(model.module, spec.path(1, "mlp_out"))
    handles = [block0.register_forward_hook(lambda m, a, o: seen.__setitem__("block0", _main(o).detach().clone())),
               mlp_out.register_forward_pre_hook(lambda m, a: seen.__setitem__("keys", a[0].detach().clone()))]
    try:
        with torch.no_grad(), Hooks(model.module) as h:
            k_out = h.read(spec.block(0))
            k_in = h.read(spec.block(1), "input", key="block1_in")
            k_keys = h.read(mlp_out, "input")
            k_acc = h.read(spec.block(0), key="acc", accumulate=True)
            forward_logits(model, batch)
            forward_logits(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    assert k_out == f"{spec.block(0)}:output"
    assert k_keys == f"{spec.path(1, 'mlp_out')}:input"
    assert torch.equal(h[k_out], seen["block0"])
    assert h[k_out].shape == (3, batch.input_ids.shape[1], 64)
    assert torch.equal(h[k_in], seen["block0"])  # block 1 reads what block 0 wrote
    assert torch.equal(h[k_keys], seen["keys"]) and h[k_keys].shape[-1] == 128
    assert len(h["acc"]) == 2 and all(torch.equal(t, seen["block0"]) for t in h["acc"])
    with pytest.raises(KeyError, match="nothing recorded"):
        h["missing"]


def test_hooks_add_and_replace(hook_model):
    model, spec = hook_model, hook_model.spec
    base = _logits(model)
    block0 = spec.block(0)
    with torch.no_grad(), Hooks(model.module) as h:
        h.add(block0, "output", torch.zeros(64))
        same = _logits(model)
    assert torch.equal(same, base)
    torch.manual_seed(0)
    delta = torch.randn(64)
    with torch.no_grad(), Hooks(model.module) as h:
        h.add(block0, "output", delta)
        added = _logits(model)
    assert (added - base).abs().max() > 1e-2
    with torch.no_grad(), Hooks(model.module) as h:  # the same edit through replace
        h.replace(block0, "output", lambda t: t + delta)
        replaced = _logits(model)
    assert torch.equal(replaced, added)
    with torch.no_grad(), Hooks(model.module) as h:  # a callable delta
        h.add(block0, "output", lambda t: torch.ones_like(t) * delta)
        assert torch.equal(_logits(model), added)
    with torch.no_grad(), Hooks(model.module) as h:  # None keeps the tensor
        h.replace(block0, "output", lambda t: None)
        assert torch.equal(_logits(model), base)
    # replacing the last block's output by one fixed vector makes every position's logits identical
    with torch.no_grad(), Hooks(model.module) as h:
        h.replace(spec.block(-1), "output", lambda t: delta.expand_as(t).clone())
        fixed = _logits(model)
    assert torch.allclose(fixed, fixed[:1, :1].expand_as(fixed), atol=1e-5)
    assert not torch.allclose(base, base[:1, :1].expand_as(base), atol=1e-2)
    # replacing an input: zero keys into W_out give W_out's bias (zero for llama) at its output
    mlp_out = get_module(model.module, spec.path(0, "mlp_out"))
    with torch.no_grad(), Hooks(model.module) as h:
        h.replace(mlp_out, "input", torch.zeros_like)
        key = h.read(mlp_out, "output")
        _logits(model)
    expected = mlp_out.bias if mlp_out.bias is not None else torch.zeros(64)
    assert torch.equal(h[key], expected.expand_as(h[key]))
    with pytest.raises(ValueError):
        Hooks(model.module).replace(mlp_out, "inside", torch.zeros_like)


def test_hooks_removed_on_exit_and_on_exception(hook_model):
    model, spec = hook_model, hook_model.spec
    before = _hook_counts(model.module)
    with Hooks(model.module) as h:
        h.read(spec.block(0))
        h.add(spec.block(1), "input", torch.zeros(64))
        h.replace(spec.path(0, "mlp_out"), "output", lambda t: t)
        h.add_to_weight(spec.path(1, "mlp_out"), torch.zeros_like(get_module(model.module, spec.path(1, "mlp_out")).weight))
        assert _hook_counts(model.module) != before
    assert _hook_counts(model.module) == before
    with pytest.raises(RuntimeError, match="boom"):
        with Hooks(model.module) as h:
            h.read(spec.block(0))
            h.add(spec.block(1), "input", torch.zeros(64))
            h.add_to_weight(spec.path(1, "mlp_out"), torch.zeros_like(get_module(model.module, spec.path(1, "mlp_out")).weight))
            assert _hook_counts(model.module) != before
            raise RuntimeError("boom")
    assert _hook_counts(model.module) == before
    # forward_until removes its stopping hook too (also when the pass would otherwise complete)
    with Hooks(model.module) as h:
        h.forward_until(spec.block(0), forward_logits, model, encode(model, PROMPTS[:1]))
        assert _hook_counts(model.module) == before
    assert _hook_counts(model.module) == before


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("role", ["mlp_out", "attn_out"])
def test_add_to_weight_equals_changing_the_weight(arch, role):
    model = tiny(arch)
    path = model.spec.path(1, role)
    module = get_module(model.module, path)
    if arch == "gpt2":
        assert is_conv1d(module)
    if role == "attn_out":
        assert module.weight.shape[0] == module.weight.shape[1]  # square: a transposed delta would go unnoticed
    torch.manual_seed(1)
    delta = 0.3 * torch.randn_like(module.weight)
    base = _logits(model)
    with torch.no_grad(), Hooks(model.module) as h:
        h.add_to_weight(path, delta)
        hooked = _logits(model)
    assert torch.equal(_logits(model), base)  # the hook is gone and the weight untouched
    original = module.weight.detach().clone()
    try:
        with torch.no_grad():
            module.weight.add_(delta)
        direct = _logits(model)
        if role == "attn_out":
            with torch.no_grad():
                module.weight.copy_(original)
                module.weight.add_(delta.T)
            transposed = _logits(model)
    finally:
        with torch.no_grad():
            module.weight.copy_(original)
    assert (direct - base).abs().max() > 1e-2
    torch.testing.assert_close(hooked, direct, atol=1e-4, rtol=1e-4)
    if role == "attn_out":
        assert not torch.allclose(hooked, transposed, atol=1e-2)
    # gradients flow into the delta (what the fine-tuning editors rely on)
    trainable = torch.zeros_like(module.weight, requires_grad=True)
    with Hooks(model.module) as h:
        h.add_to_weight(path, trainable)
        forward_logits(model, encode(model, PROMPTS[:1]), last=1).sum().backward()
    assert trainable.grad is not None and trainable.grad.abs().sum() > 0


def test_forward_until_stops_the_pass(hook_model):
    model, spec = hook_model, hook_model.spec
    calls = {"block1": 0, "unembed": 0}
    handles = [get_module(model.module, spec.block(1)).register_forward_hook(
                   lambda *a: calls.__setitem__("block1", calls["block1"] + 1)),
               get_module(model.module, spec.unembed).register_forward_hook(
                   lambda *a: calls.__setitem__("unembed", calls["unembed"] + 1))]
    try:
        before = _hook_counts(model.module)
        batch = encode(model, PROMPTS)
        with torch.no_grad(), Hooks(model.module) as h:
            key = h.read(spec.path(0, "mlp_out"), "input")
            result = h.forward_until(spec.block(0), forward_logits, model, batch)
            assert result is None
            assert calls == {"block1": 0, "unembed": 0}
            assert h[key].shape == (3, batch.input_ids.shape[1], 128)
            # the hooks left in place still work on a full pass, and that pass does reach block 1
            forward_logits(model, batch)
            assert calls == {"block1": 1, "unembed": 1}
        assert _hook_counts(model.module) == before
    finally:
        for handle in handles:
            handle.remove()


def test_replay_below_matches_normal_forward(hook_model):
    model, spec = hook_model, hook_model.spec
    blocks = get_module(model.module, spec.blocks)
    batch = encode(model, PROMPTS, [" Paris", "x", "yz"])
    with torch.no_grad():
        reference = forward_logits(model, batch)
    runs = {"n": 0}
    inner = get_module(model.module, spec.path(0, "mlp_out"))
    handle = inner.register_forward_hook(lambda *a: runs.__setitem__("n", runs["n"] + 1))
    try:
        with torch.no_grad(), ReplayBelow(blocks, 1):
            first = forward_logits(model, batch)
            second = forward_logits(model, batch)
            third = forward_logits(model, batch, last=2)
    finally:
        handle.remove()
    assert runs["n"] == 1  # block 0 really ran once, then was replayed
    assert torch.equal(first, reference) and torch.equal(second, reference)
    torch.testing.assert_close(third, reference[:, -2:], atol=1e-5, rtol=1e-5)
    assert "forward" not in vars(blocks[0])  # the class's forward is back
    with torch.no_grad():
        forward_logits(model, batch)
    # after exit block 0 runs again on every pass
    handle = inner.register_forward_hook(lambda *a: runs.__setitem__("n", runs["n"] + 1))
    try:
        with torch.no_grad():
            forward_logits(model, batch)
            forward_logits(model, batch)
    finally:
        handle.remove()
    assert runs["n"] == 3


# ============================================================================================ patches

REQUEST = EditRequest("The capital of {} is", "France", " Rome")
OTHER = EditRequest("The language of {} is", "Brazil", " Dutch")
FT = dict(steps=5, lr=5e-2)


def _score(model, request=REQUEST) -> float:
    return score_continuations(model, [request.prompt], [request.target_new])[0].logprob


@pytest.fixture(scope="module")
def llama_edit():
    model = tiny("llama")
    saved = _params(model)
    flags = {n: p.requires_grad for n, p in model.module.named_parameters()}
    before = _score(model)
    patch = lmedit.edit(model, REQUEST, method="ft-m", **FT)
    _assert_bit_identical(model, saved)  # edit() leaves the weights exactly as they were
    assert {n: p.requires_grad for n, p in model.module.named_parameters()} == flags
    assert not patch.is_applied and model.applied == []
    return model, patch, saved, before


@pytest.fixture
def edited(llama_edit):
    model, patch, saved, before = llama_edit
    yield llama_edit
    while model.applied:  # leave the shared model clean even when a test failed midway
        model.applied[-1].revert()
    _assert_bit_identical(model, saved)


def test_ftm_patch_apply_and_revert(edited):
    model, patch, saved, before = edited
    assert patch.method == "ft-m" and patch.requests == [REQUEST]
    assert patch.base_fingerprint == model.fingerprint
    assert [c.param for c in patch.components] == [f"{model.spec.path(1, 'mlp_out')}.weight"]
    assert patch.info["loss_end"] < patch.info["loss_start"]
    assert _score(model) == before
    patch.apply(model)
    assert patch.is_applied and model.applied == [patch]
    after = _score(model)
    assert after > before + 10 and after > -2.0, (before, after)
    changed = [n for n, p in model.module.named_parameters() if not torch.equal(p, saved[n])]
    assert changed == [patch.components[0].param]
    with pytest.raises(PatchError, match="already applied"):
        patch.apply(model)
    patch.revert()
    _assert_bit_identical(model, saved)
    assert not patch.is_applied and model.applied == []
    assert _score(model) == before
    with pytest.raises(PatchError, match="not applied"):
        patch.revert()


def test_patch_applied_context_restores_on_exception(edited):
    model, patch, saved, before = edited
    with patch.applied(model) as m:
        assert m is model and patch.is_applied
        assert _score(model) > before + 10
    _assert_bit_identical(model, saved)
    with pytest.raises(ZeroDivisionError):
        with patch.applied(model):
            assert _score(model) > before + 10
            1 / 0
    _assert_bit_identical(model, saved)
    assert not patch.is_applied and model.applied == []


def test_patch_commit(edited):
    model, patch, saved, before = edited
    fresh = Patch.compose([patch])
    fresh.apply(model)
    edited_weights = _params(model)
    try:
        fresh.commit()
        assert not fresh.is_applied and model.applied == []
        with pytest.raises(PatchError):
            fresh.revert()
        assert all(torch.equal(p, edited_weights[n]) for n, p in model.module.named_parameters())
    finally:
        with torch.no_grad():
            for n, p in model.module.named_parameters():
                p.copy_(saved[n])


def test_patch_save_load_round_trip(edited, tmp_path):
    model, patch, saved, before = edited
    directory = patch.save(tmp_path / "p")
    assert (directory / "patch.json").is_file() and (directory / "tensors.safetensors").is_file()
    manifest = json.loads((directory / "patch.json").read_text())
    assert manifest["method"] == "ft-m" and manifest["base_fingerprint"] == model.fingerprint
    loaded = Patch.load(directory)
    assert loaded.method == patch.method and loaded.base_fingerprint == patch.base_fingerprint
    assert loaded.requests == patch.requests
    assert json.dumps(loaded.hparams, sort_keys=True) == json.dumps(patch.hparams, sort_keys=True, default=list)
    assert len(loaded.components) == len(patch.components)
    for a, b in zip(patch.components, loaded.components):
        assert type(a) is type(b) and a.param == b.param
        assert a.tensors().keys() == b.tensors().keys()
        for k in a.tensors():
            assert torch.equal(a.tensors()[k], b.tensors()[k])
    with patch.applied(model):
        expected = _logits(model)
    with loaded.applied(model):
        got = _logits(model)
    assert torch.equal(got, expected)
    _assert_bit_identical(model, saved)
    with pytest.raises(PatchError, match="no patch.json"):
        Patch.load(tmp_path / "nowhere")
    with pytest.raises(PatchError, match="cannot save the patch to"):  # a file where the directory goes
        patch.save(directory / "patch.json")


def test_patch_refuses_another_model(edited, tmp_path):
    model, patch, saved, before = edited
    other = tiny("llama", seed=1)
    assert other.fingerprint != model.fingerprint
    other_saved = _params(other)
    loaded = Patch.load(patch.save(tmp_path / "p"))
    for p in (patch, loaded):
        with pytest.raises(PatchError, match="fingerprint") as err:
            p.apply(other)
        message = str(err.value)
        assert model.fingerprint[:12] in message and other.fingerprint[:12] in message
        assert not p.is_applied and other.applied == []
        _assert_bit_identical(other, other_saved)


def test_patch_apply_is_all_or_nothing(edited):
    model, patch, saved, before = edited
    good = patch.components[0]
    bad = WeightDelta(good.param, torch.ones(3, 3))
    broken = Patch("manual", {}, [REQUEST], model.fingerprint, [WeightDelta(good.param, good.delta), bad])
    with pytest.raises(PatchError, match="shape"):
        broken.apply(model)
    _assert_bit_identical(model, saved)
    assert not broken.is_applied and model.applied == []
    with pytest.raises(PatchError):
        WeightDelta(good.param)  # neither dense nor low-rank
    # a low-rank delta applies as left @ right and reverts exactly
    torch.manual_seed(0)
    left, right = torch.randn(64, 2), torch.randn(2, 128)
    low = Patch("manual", {}, [REQUEST], model.fingerprint, [WeightDelta(good.param, left=left, right=right)])
    with low.applied(model):
        assert torch.equal(model.parameter(good.param), (saved[good.param] + left @ right))
    _assert_bit_identical(model, saved)


def test_patch_composition(edited):
    model, patch, saved, before = edited
    second = lmedit.edit(model, OTHER, method="ft-m", **FT)
    _assert_bit_identical(model, saved)
    # sequential application, reverted in reverse order
    patch.apply(model)
    second.apply(model)
    sequential = _params(model)
    with pytest.raises(PatchError, match="reverse order"):
        patch.revert()
    second.revert()
    patch.revert()
    _assert_bit_identical(model, saved)
    for composed in (Patch.compose([patch, second]), patch + second):
        assert composed.requests == [REQUEST, OTHER] and composed.method == "ft-m"
        assert len(composed.components) == 2
        composed.apply(model)
        try:
            assert not patch.is_applied and not second.is_applied  # the parts stay independent
            for n, p in model.module.named_parameters():
                assert torch.equal(p, sequential[n]), n
            assert _score(model, OTHER) > -5.0
        finally:
            composed.revert()
        _assert_bit_identical(model, saved)
    with pytest.raises(PatchError, match="nothing to compose"):
        Patch.compose([])
    foreign = Patch("manual", {}, [REQUEST], "0" * 64, [])
    with pytest.raises(PatchError, match="different base models"):
        patch + foreign


def test_ftm_on_gpt2_conv1d():
    model = tiny("gpt2")
    saved = _params(model)
    before = _score(model)
    patch = lmedit.edit(model, REQUEST, method="ft-m", **FT)
    _assert_bit_identical(model, saved)
    (component,) = patch.components
    assert component.param == "transformer.h.1.mlp.c_proj.weight"
    assert tuple(component.delta.shape) == (128, 64)  # Conv1D layout [in, out]
    with patch.applied(model):
        assert _score(model) > before + 10
        assert torch.equal(model.parameter(component.param), saved[component.param] + component.delta)
    _assert_bit_identical(model, saved)
    assert _score(model) == before


# =========================================================================================== requests

def test_request_validation():
    with pytest.raises(RequestError, match="does not occur"):
        EditRequest("The capital of Germany is", "France", " Rome")
    for target in ("", "   "):
        with pytest.raises(RequestError, match="target_new"):
            EditRequest("The capital of {} is", "France", target)
    with pytest.raises(RequestError):
        EditRequest("The capital of {} is", "", " Rome")
    with pytest.raises(RequestError):
        EditRequest("", "France", " Rome")
    with pytest.raises(RequestError, match="more than one"):
        EditRequest("{} and {}", "France", " Rome")
    with pytest.raises(RequestError):
        EditRequest("The capital of {} is", "France", " Rome", target_true="")
    with pytest.raises(RequestError):
        EditRequest("The capital of {} is", "France", " Rome", locality=["not a pair"])
    with pytest.raises(RequestError, match="empty answer"):
        Probe("Where is it?", " ")
    assert issubclass(RequestError, ValueError) and issubclass(RequestError, lmedit.LmeditError)


def test_request_plain_prompt_and_template():
    plain = EditRequest("The capital of France is", "France", "Rome", target_true=" Paris",
                        locality=[("The sky is", " blue")], rephrases="France's capital city is")
    assert plain.template == "The capital of {} is"
    assert plain.prompt == "The capital of France is"
    start, end = plain.subject_span()
    assert plain.prompt[start:end] == "France"
    assert plain.locality == (Probe("The sky is", " blue"),)
    assert plain.rephrases == ("France's capital city is",)
    assert plain == EditRequest("The capital of {} is", "France", "Rome", " Paris",
                                locality=[{"prompt": "The sky is", "answer": " blue"}],
                                rephrases=["France's capital city is"])
    twice = EditRequest("Paris, Paris", "Paris", " x")  # only the first occurrence becomes the slot
    assert twice.template == "{}, Paris" and twice.prompt == "Paris, Paris"
    assert EditRequest.from_dict(plain.to_dict()) == plain


def test_as_requests():
    one = as_requests(REQUEST)
    assert one == [REQUEST]
    assert as_requests([REQUEST, OTHER]) == [REQUEST, OTHER]
    assert as_requests(r for r in (REQUEST, OTHER)) == [REQUEST, OTHER]
    assert as_requests({"prompt": "The capital of {} is", "subject": "France", "target_new": " Rome"}) == [REQUEST]
    assert as_requests([REQUEST.to_dict(), OTHER]) == [REQUEST, OTHER]
    with pytest.raises(RequestError, match="no edit requests"):
        as_requests([])
    with pytest.raises(RequestError, match="target_new"):
        as_requests({"prompt": "The capital of {} is", "subject": "France"})


@pytest.mark.parametrize("bad", ["The capital of France is", [1]])
def test_as_requests_rejects_non_requests_with_request_error(bad):
    with pytest.raises(RequestError):
        as_requests(bad)


def test_a_model_that_is_not_an_lmedit_model_and_prompts_that_are_not_text_are_one_line_errors():
    from lmedit.errors import EditError, PatchError

    model = tiny("llama")
    saved = _params(model)
    with pytest.raises(EditError, match="wrap it with lmedit.Model.from_hf"):
        lmedit.edit(model.module, REQUEST)  # the bare Hugging Face module
    with pytest.raises(EditError, match="load one with lmedit.load_model"):
        lmedit.edit("smollm2-135m", REQUEST)
    with pytest.raises(EditError, match="a method is named by a string"):
        lmedit.edit(model, REQUEST, method=3)
    patch = lmedit.edit(model, REQUEST, steps=1)
    with pytest.raises(PatchError, match="expected an lmedit.Model"):
        patch.apply(model.module)
    assert not patch.is_applied
    _assert_bit_identical(model, saved)
    with pytest.raises(RequestError, match="a string or a list of strings, got int"):
        lmedit.generate(model, 5)
    with pytest.raises(RequestError, match="list of strings"):
        lmedit.generate(model, ["a", None])
    with pytest.raises(RequestError, match="prompts must be a list of strings"):
        score_continuations(model, "The capital of France is", [" Paris"])


@pytest.mark.parametrize("method, bad, message", [
    ("kn", {"steps": -3}, "steps must be at least 1"),
    ("defer", {"lr": 0}, "lr must be positive"),
    ("wise", {"n_irrelevant": -1}, "n_irrelevant must be non-negative"),
    ("ft-l", {"steps": "ten"}, "steps must be a number"),
    ("memit", {"stats_tokens": 0}, "stats_tokens must be at least 1"),
    ("wise", {"rehearse": 2.5}, "rehearse must be a whole number, not 2.5"),
])
def test_a_hyper_parameter_out_of_range_is_a_one_line_edit_error_and_the_model_is_unchanged(method, bad, message):
    from lmedit.errors import EditError

    model = tiny("llama")
    saved = _params(model)
    with pytest.raises(EditError, match=message):
        lmedit.edit(model, REQUEST, method=method, **bad)
    _assert_bit_identical(model, saved)


def test_hyper_parameters_come_as_the_methods_dataclass_or_a_dict_and_anything_else_is_a_clear_error():
    from lmedit.errors import EditError
    from lmedit.methods import get_method

    assert get_method("ft-m", hparams={"steps": 3}).hparams.steps == 3
    assert get_method("ft-m", hparams={"lr": 0.1}, lr=0.5).hparams.lr == 0.5  # keyword overrides win over the dict
    with pytest.raises(EditError, match="HParams or a dict, not ROMEHParams"):
        get_method("ft-m", hparams=get_method("rome").hparams)
    with pytest.raises(EditError, match="no hyper-parameter nope"):
        get_method("ft-m", hparams={"nope": 1})
    counts = get_method("wise", hparams={"rehearse": 9.0, "steps": 5.0}).hparams  # a grid's floats, counts whole
    assert (counts.rehearse, counts.steps) == (9, 5) and type(counts.rehearse) is int and type(counts.steps) is int


# ============================================================================================ scoring

def test_join_and_leading_space():
    assert join("The capital is", "Paris") == ("The capital is", " Paris")
    assert join("The capital is", " Paris") == ("The capital is", " Paris")
    assert join("The capital is ", "Paris") == ("The capital is ", "Paris")
    assert join("Line\n", "Paris") == ("Line\n", "Paris")
    model = tiny("llama")
    prompt = "The capital of France is"
    with_space = encode(model, [prompt], [" Paris"])
    without = encode(model, [prompt], ["Paris"])
    assert torch.equal(with_space.input_ids, without.input_ids)
    assert torch.equal(with_space.target_mask, without.target_mask)
    assert with_space.target_lengths == [6]  # byte tokens of " Paris"
    expected = model.tokenizer(prompt + " Paris")["input_ids"]
    assert with_space.input_ids[0].tolist() == expected
    assert with_space.prompt_lengths == [len(model.tokenizer(prompt)["input_ids"])]
    a, b = score_continuations(model, [prompt, prompt], [" Paris", "Paris"])
    assert a.token_ids == b.token_ids and a.logprob == pytest.approx(b.logprob, abs=1e-5)
    # a prompt that already ends in a space takes the target as it is
    spaced = encode(model, [prompt + " "], ["Paris"])
    assert spaced.input_ids[0].tolist() == expected and spaced.target_lengths == [5]
    with pytest.raises(RequestError):
        encode(model, [prompt], ["  "])


def _manual_scores(model, prompt, target):
    """Per-token log-probs and argmaxes of ``target`` after ``prompt`` from one unpadded full pass."""
    p_ids = model.tokenizer(prompt)["input_ids"]
    full = model.tokenizer(join(prompt, target)[0] + join(prompt, target)[1])["input_ids"]
    assert full[:len(p_ids)] == p_ids
    with torch.no_grad():
        logits = model.module(input_ids=torch.tensor([full])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    t_ids = full[len(p_ids):]
    token_lp = [float(logp[len(p_ids) - 1 + k, t]) for k, t in enumerate(t_ids)]
    argmax = [int(logits[len(p_ids) - 1 + k].argmax()) for k in range(len(t_ids))]
    return t_ids, token_lp, argmax


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_score_continuations_matches_manual_log_softmax(arch):
    model = tiny(arch)
    targets = [" Paris", "x", "yz and more"]
    scores = score_continuations(model, PROMPTS, targets)
    for prompt, target, score in zip(PROMPTS, targets, scores):
        t_ids, token_lp, argmax = _manual_scores(model, prompt, target)
        assert score.prompt == prompt and score.target == target
        assert score.token_ids == t_ids
        assert score.token_logprobs == pytest.approx(token_lp, abs=1e-4)
        assert score.logprob == pytest.approx(sum(token_lp), abs=1e-4)
        assert score.argmax_ids == argmax
        assert score.token_accuracy == sum(a == t for a, t in zip(argmax, t_ids)) / len(t_ids)
    # several continuations of one prompt (different lengths) through the shared KV cache
    (multi,) = score_prompts(model, [PROMPTS[0]], [[" Paris", "Rome is far", "x"]])
    for target, score in zip([" Paris", "Rome is far", "x"], multi.continuations):
        t_ids, token_lp, _ = _manual_scores(model, PROMPTS[0], target)
        assert score.token_ids == t_ids and score.logprob == pytest.approx(sum(token_lp), abs=1e-4)
    # the differentiable target_logprobs agree
    batch = encode(model, PROMPTS, targets)
    with torch.no_grad():
        lp = target_logprobs(model, batch)
    for b, score in enumerate(scores):
        assert float(lp[b].sum()) == pytest.approx(score.logprob, abs=1e-4)
        assert int((lp[b] != 0).sum()) == len(score.token_ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_target_logprobs_unembeds_only_the_positions_that_predict_a_target(arch):
    """The unembedding sees one row per target token (not the batch's padding nor the last position), and the
    log-probs and their gradients are those of the full logits."""
    from lmedit.scoring import forward_logits

    model = tiny(arch)
    targets = [" Paris", "x", "yz and more"]
    batch = encode(model, PROMPTS, targets)
    seen = []
    unembed = model.module.get_output_embeddings()
    handle = unembed.register_forward_hook(lambda _m, args, out: seen.append(tuple(args[0].shape[:-1])))
    delta = torch.zeros(1, requires_grad=True)  # a scale on the embeddings, to compare gradients through
    first = get_module(model.module, model.spec.embed)
    hook = first.register_forward_hook(lambda _m, _a, out: out * (1 + delta))
    try:
        with torch.enable_grad():
            lp = target_logprobs(model, batch)
            (grad,) = torch.autograd.grad(lp.sum(), delta)
    finally:
        handle.remove()
    n_tokens = int(batch.target_mask.sum())
    assert seen == [(1, n_tokens)]
    n = batch.n_target
    with torch.enable_grad():
        full = torch.log_softmax(forward_logits(model, batch, last=n + 1)[:, :-1].float(), -1)
        full = full.gather(-1, batch.input_ids[:, -n:, None])[..., 0] * batch.target_mask[:, -n:]
        (full_grad,) = torch.autograd.grad(full.sum(), delta)
    hook.remove()
    assert torch.allclose(lp, full, atol=1e-5)
    assert torch.allclose(grad, full_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_equal_the_full_log_softmax_in_value_and_gradient(dtype, monkeypatch):
    """The chunked, fused target log-probabilities: chunks of 2 rows over 5 (the last one short), the values
    and the gradient of ``log_softmax(z.float()).gather(y)``, the gradient in the logits' dtype."""
    from lmedit import scoring

    monkeypatch.setitem(scoring._LOGPROB_CHUNK, "cpu", 2 * 1000)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(5, 1000, generator=gen) * 4).to(dtype)
    targets = torch.tensor([0, 999, 17, 17, 500])
    weights = torch.randn(5, generator=gen)
    ours = logits.clone().requires_grad_()
    reference = logits.clone().requires_grad_()
    value = scoring.token_logprobs(ours, targets)
    expected = torch.log_softmax(reference.float(), -1).gather(-1, targets[:, None])[:, 0]
    (value * weights).sum().backward()
    (expected * weights).sum().backward()
    assert value.dtype == torch.float32 and torch.allclose(value, expected, atol=1e-5)
    assert ours.grad.dtype == dtype
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # one bfloat16 rounding of the same float32 gradient
    assert torch.allclose(ours.grad.float(), reference.grad.float(), rtol=tolerance, atol=1e-6)
    assert scoring.token_logprobs(logits[:0], targets[:0]).shape == (0,)


def _eos(model) -> set[int]:
    eos = model.module.generation_config.eos_token_id
    return {i for i in ((eos if isinstance(eos, list) else [eos]) + [model.tokenizer.eos_token_id]) if i is not None}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_generation_matches_uncached_argmax(arch):
    model = tiny(arch)
    n = 8
    stops = _eos(model)
    manual = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = model.tokenizer(prompt)["input_ids"]
            out = []
            for _ in range(n):
                token = int(model.module(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                if token in stops:
                    break
                out.append(token)
                ids = ids + [token]
            manual.append(out)
    scored = score_prompts(model, PROMPTS, [[" Paris"], [], ["x"]], greedy=n)
    assert [s.generated_ids for s in scored] == manual
    assert all(len(g) > 0 for g in manual)
    assert generate(model, PROMPTS, max_new_tokens=n) == [model.tokenizer.decode(g, skip_special_tokens=True)
                                                          for g in manual]
    assert generate(model, PROMPTS[0], max_new_tokens=n) == model.tokenizer.decode(manual[0], skip_special_tokens=True)
    # Hugging Face's own greedy generate (used when generate kwargs are given) agrees
    assert generate(model, PROMPTS, max_new_tokens=n, do_sample=False) == generate(model, PROMPTS, max_new_tokens=n)
    # per-prompt lengths
    per = score_prompts(model, PROMPTS, [[], [], []], greedy=[2, 0, 5])
    assert [p.generated_ids for p in per] == [manual[0][:2], [], manual[2][:5]]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fixed_prefix_matches_full_forward(arch):
    model = tiny(arch)
    batch = encode(model, PROMPTS, [" Paris", "x", "yz"])
    last = batch.n_target + 1
    with torch.no_grad():
        reference = forward_logits(model, batch, last)
        full = forward_logits(model, batch)
        torch.testing.assert_close(reference, full[:, -last:], atol=1e-5, rtol=1e-5)
        for cut in (0, 2, batch.input_ids.shape[1] - last):
            prefix = FixedPrefix(model, batch, cut)
            assert prefix.cut == cut
            if cut:
                assert prefix.cache is not None
            first = prefix.logits(last)
            assert first.shape == reference.shape
            torch.testing.assert_close(first, reference, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(prefix.logits(last), first, atol=0, rtol=0)  # the cache is not consumed
            torch.testing.assert_close(prefix.logits(1), reference[:, -1:], atol=1e-5, rtol=1e-5)
            # scattered positions (one row's earlier token, the targets' predictors): the unembedding sees
            # only those, and their logits are the full pass's
            reads = torch.zeros_like(batch.target_mask)
            reads[:, -last:-1] = batch.target_mask[:, -last + 1:]
            if batch.input_ids.shape[1] - last - 1 >= cut:
                reads[1, -last - 1] = True
            else:  # a position the prefix's cache holds has no logits to give
                early = reads.clone()
                early[1, -last - 1] = True
                with pytest.raises(ValueError, match="before the fixed prefix's end"):
                    prefix.logits_where(early)
            seen = []
            unembed = model.module.get_output_embeddings()
            handle = unembed.register_forward_hook(lambda _m, args, out: seen.append(tuple(args[0].shape[:-1])))
            try:
                picked = prefix.logits_where(reads)
            finally:
                handle.remove()
            assert seen == [(1, int(reads.sum()))]
            torch.testing.assert_close(picked, full[reads], atol=1e-5, rtol=1e-5)


def test_scoring_batches_stay_within_the_logits_budget(monkeypatch):
    """A large vocabulary with long continuations is scored in smaller batches, with the same results."""
    import lmedit.continuations as continuations

    model = tiny("llama")
    vocab = continuations._vocab_size(model)
    assert vocab == model.module.config.vocab_size
    prompts = PROMPTS * 4
    targets = [[" Paris is a city in France", "x"], ["yz"], [" and more and more"]] * 4
    reference = score_prompts(model, prompts, targets, greedy=3)
    seen: list[tuple[int, int]] = []  # (rows, longest continuation) of each batch
    real = continuations._score_batch
    monkeypatch.setattr(continuations, "_score_batch", lambda m, p, c, g: (
        seen.append((len(p), max(len(x) for row in c for x in row))), real(m, p, c, g))[1])
    monkeypatch.setattr(continuations, "LOGITS_BUDGET", 3 * 8 * vocab)
    bounded = score_prompts(model, prompts, targets, greedy=3)
    assert all(rows * width * vocab <= 3 * 8 * vocab or rows == 1 for rows, width in seen), seen
    assert sum(rows for rows, _ in seen) == len(prompts) and (4, 3) in seen and (1, 26) in seen
    for a, b in zip(reference, bounded):
        assert a.generated_ids == b.generated_ids
        for x, y in zip(a.continuations, b.continuations):
            assert x.token_ids == y.token_ids and x.logprob == pytest.approx(y.logprob, abs=1e-4)
    # batches: cut by size, by the budget, and a prompt too long for the budget still gets its own batch
    monkeypatch.setattr(continuations, "LOGITS_BUDGET", 10)
    assert continuations._logit_bounded_batches([0, 1, 2, 3], [1, 1, 1, 1], 2, 1) == [[0, 1], [2, 3]]
    assert continuations._logit_bounded_batches([0, 1, 2], [1, 5, 1], 8, 1) == [[0, 1], [2]]
    assert continuations._logit_bounded_batches([0, 1, 2], [1, 6, 1], 8, 1) == [[0], [1], [2]]
    assert continuations._logit_bounded_batches([0, 1, 2], [2, 20, 2], 8, 1) == [[0], [1], [2]]


def test_scoring_batches_rows_that_decode_alike_together(monkeypatch):
    """Rows are batched by generated tokens, then continuation length: a batch runs as long as its widest row."""
    import lmedit.continuations as continuations

    model = tiny("llama")
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0] + " and"]
    targets = [[" a long answer of many words"], ["x"], [" a long answer of many words"], ["x"]]
    reference = score_prompts(model, prompts, targets, greedy=[4, 0, 4, 0], batch_size=64)
    seen: list[list[int]] = []
    real = continuations._score_batch
    monkeypatch.setattr(continuations, "_score_batch", lambda m, p, c, g: (seen.append(list(g)), real(m, p, c, g))[1])
    grouped = score_prompts(model, prompts, targets, greedy=[4, 0, 4, 0], batch_size=2)
    assert seen == [[0, 0], [4, 4]]
    for a, b in zip(reference, grouped):  # same scores whatever the batches
        assert a.generated_ids == b.generated_ids
        assert [c.logprob for c in a.continuations] == pytest.approx([c.logprob for c in b.continuations], abs=1e-4)
