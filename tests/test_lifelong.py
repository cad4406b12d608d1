"""Memory-based lifelong editors on tiny random models: GRACE's codebook."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import lmedit
from lmedit.adaptors import adaptors
from lmedit.evaluate import evaluate
from lmedit.hooks import read_module
from lmedit.methods.grace import Codebook
from lmedit.patch import Patch
from lmedit.continuations import score_continuations
from lmedit.scoring import encode, forward_logits
from tiny import gemma_like_post_norm, tiny
from tiny import params as _params

# Prompts end in a space so the (byte-level) answer is one token: a one-layer, one-position memory of a
# 2-layer random model cannot write more (the real-model tests cover multi-token answers).
EDIT = lmedit.EditRequest("The colour of {} is ", "grass", "Z")
OTHER = "A completely different sentence about rivers"


def _logits(model, prompt):
    return forward_logits(model, encode(model, [prompt]))


def _codebook(model) -> Codebook:
    [book] = adaptors(model).values()
    return book


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_grace_edit_hits_only_its_key_and_reverts(arch, tmp_path):
    model = tiny(arch)
    before_other = _logits(model, OTHER)
    before = score_continuations(model, [EDIT.prompt], [EDIT.target_new])[0].mean_logprob
    patch = lmedit.edit(model, EDIT, method="grace", layer=1)
    assert not adaptors(model)  # edit() leaves the model as it was
    patch.apply(model)
    after = score_continuations(model, [EDIT.prompt], [EDIT.target_new])[0].mean_logprob
    assert after > -0.05 > before
    assert torch.equal(_logits(model, OTHER), before_other)  # no key within ε: the model is untouched
    patch.revert()
    assert not adaptors(model)
    patch.save(tmp_path / "g")
    loaded = Patch.load(tmp_path / "g")
    with loaded.applied(model):
        again = score_continuations(model, [EDIT.prompt], [EDIT.target_new])[0].mean_logprob
    assert again == pytest.approx(after, abs=1e-6)


def test_grace_expands_and_splits():
    model = tiny("llama")
    first = lmedit.edit(model, EDIT, method="grace", layer=1, eps_init=1e-3).apply(model)
    assert _codebook(model).eps.tolist() == pytest.approx([1e-3])
    near = lmedit.EditRequest("The colour of {} is ", "grass", "Z")  # same key (distance 0), same label
    same = lmedit.edit(model, near, method="grace", layer=1, eps_init=1e-3)
    assert same.info["expanded"] == 1 and same.info["added"] == 0
    other = lmedit.EditRequest("The colour of {} is ", "grass", "Q")  # same key, other label: split
    split = lmedit.edit(model, other, method="grace", layer=1, eps_init=1e-3).apply(model)
    book = _codebook(model)
    assert split.info["split"] == 1 and len(book.ids) == 2 and book.eps.tolist() == pytest.approx([0.0, 0.0])
    split.revert()
    assert _codebook(model).eps.tolist() == pytest.approx([1e-3])  # the radius change is undone too
    first.revert()
    assert not adaptors(model)


@pytest.mark.parametrize("arch, sphere", [("gemma3", True), ("llama", False)])
def test_grace_keeps_the_value_norm_behind_a_post_mlp_norm(arch, sphere):
    """Behind a post-MLP norm (Gemma-3) the value stays on the sphere of the layer's own output; elsewhere it is free."""
    model = gemma_like_post_norm(tiny(arch)) if sphere else tiny(arch)  # gains that let one layer's output write
    path = model.spec.path(1, "mlp_out")
    own = read_module(model, encode(model, [EDIT.prompt]), path, "output")[0, -1].norm()
    patch = lmedit.edit(model, EDIT, method="grace", layer=1).apply(model)
    assert patch.hparams["sphere"] is sphere
    assert score_continuations(model, [EDIT.prompt], [EDIT.target_new])[0].mean_logprob > -0.05
    norm = _codebook(model).values[0].norm()
    assert (norm == pytest.approx(float(own), rel=1e-4)) is sphere
    patch.revert()


def test_grace_sequential_run_checkpoints_and_restores(tmp_path):
    model = tiny("llama", seed=2)
    requests = [lmedit.EditRequest(f"Fact {i} is about ", "Fact", "zqxy"[i], case_id=i) for i in range(4)]
    report = evaluate(model, "grace", requests, protocol="sequential", scoring="after_all", checkpoints=[2],
                      hparams={"layer": 1}, out_dir=tmp_path / "run", progress=False, generation=False)
    assert not adaptors(model)  # the run leaves the model as it found it
    assert report.summary["by_T"][4]["rewrite_tf"] == pytest.approx(1.0)  # all four edits hold at T = 4
    state = Patch.load(tmp_path / "run" / "state" / "patch")
    assert sum(len(c.ids) for c in state.components if hasattr(c, "ids")) == 4


@pytest.mark.real
def test_grace_on_smollm2_sequential_edits():
    from lmedit.continuations import generate

    model = lmedit.load_model("smollm2-135m")
    requests = [lmedit.EditRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", " Rome"),
                lmedit.EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English")]
    other = ["The capital of France is", "The Colosseum is located in the city of"]
    before = generate(model, other, max_new_tokens=6)
    patches = []
    for request in requests:  # sequential: each edit sees the codebook so far
        patches.append(lmedit.edit(model, request, method="grace").apply(model))
    assert len(_codebook(model).ids) == 2
    out = generate(model, [r.prompt for r in requests], max_new_tokens=3)
    assert out[0].startswith(" Rome") and out[1].startswith(" English"), out
    assert generate(model, other, max_new_tokens=6) == before
    for patch in reversed(patches):
        patch.revert()
    assert not adaptors(model)


@pytest.mark.real
def test_wise_on_smollm2_sequential_edits_route_only_their_prompts():
    from lmedit.continuations import generate
    from lmedit.stats import default_corpus

    if default_corpus() is None:  # sampled from the model instead, the unrelated inputs let the Colosseum prompt in
        pytest.skip("WISE's default unrelated inputs are the benchmark data's Wikipedia passages")
    model = lmedit.load_model("smollm2-135m")
    requests = [lmedit.EditRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", " Rome"),
                lmedit.EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English")]
    other = ["The capital of France is", "The Colosseum is located in the city of", "Water boils at a temperature of"]
    logits_before = [_logits(model, p) for p in other]
    weights = _params(model)
    patches = []
    for request in requests:  # sequential: the second edit trains the same shard with the first applied
        patches.append(lmedit.edit(model, request, method="wise").apply(model))
    [side] = adaptors(model).values()
    assert len(side.memories) == 1 and side.memories[0].edits == 2
    out = generate(model, [r.prompt for r in requests], max_new_tokens=3)
    assert out[0].startswith(" Rome") and out[1].startswith(" English"), out
    for prompt, before in zip(other, logits_before):  # not routed: the side memory leaves them bit-identical
        assert torch.equal(_logits(model, prompt), before), prompt
    assert all(torch.equal(weights[n], p) for n, p in model.module.named_parameters())  # W itself never changes
    for patch in reversed(patches):
        patch.revert()
    assert not adaptors(model)


# ---------------------------------------------------------------------------- fine-tuning baselines

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_patch_is_low_rank_and_reversible(arch):
    model = tiny(arch)
    saved = _params(model)
    before = score_continuations(model, [EDIT.prompt], [EDIT.target_new])[0].mean_logprob
    patch = lmedit.edit(model, EDIT, method="lora", lr=1e-2, rank=4)
    assert all(c.left.shape[1] == 4 and c.dense().shape == model.parameter(c.param).shape for c in patch.components)
    assert len(patch.components) == model.spec.n_layers
    with patch.applied(model):
        after = score_continuations(model, [EDIT.prompt], [EDIT.target_new])[0].mean_logprob
    assert after > before + 1.0
    assert all(torch.equal(saved[n], p) for n, p in model.module.named_parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_trains_through_peft_and_leaves_the_model_as_it_was(arch):
    from peft.tuners.lora import LoraLayer

    model = tiny(arch)
    modules = dict(model.module.named_modules())
    flags = {n: p.requires_grad for n, p in model.module.named_parameters()}
    rng = torch.random.get_rng_state()
    seen = []
    real_init = LoraLayer.update_layer

    def spy(self, *args, **kwargs):  # peft builds the adapter: count the layers it wraps
        seen.append(self)
        return real_init(self, *args, **kwargs)

    LoraLayer.update_layer = spy
    try:
        first = lmedit.edit(model, EDIT, method="lora", lr=1e-2, rank=4)
    finally:
        LoraLayer.update_layer = real_init
    assert len(seen) == model.spec.n_layers
    assert dict(model.module.named_modules()).keys() == modules.keys()  # the wrappers are gone again
    assert all(modules[n] is m for n, m in model.module.named_modules())
    assert not hasattr(model.module, "peft_config")
    assert {n: p.requires_grad for n, p in model.module.named_parameters()} == flags
    assert torch.equal(torch.random.get_rng_state(), rng)  # seeded privately: the caller's RNG untouched
    again = lmedit.edit(model, EDIT, method="lora", lr=1e-2, rank=4)
    assert all(torch.equal(a.left, b.left) and torch.equal(a.right, b.right)
               for a, b in zip(first.components, again.components))
    other = lmedit.edit(model, EDIT, method="lora", lr=1e-2, rank=4, seed=1)
    assert not torch.equal(other.components[0].right, first.components[0].right)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_patch_exports_as_a_peft_adapter(arch, tmp_path):
    import copy

    from peft import PeftModel

    from lmedit.errors import EditError
    from lmedit.methods.finetune import save_peft_adapter

    model = tiny(arch)
    second = lmedit.EditRequest("The colour of {} is ", "the sky", "Q")
    p1 = lmedit.edit(model, EDIT, method="lora", lr=1e-2, rank=4).apply(model)
    p2 = lmedit.edit(model, second, method="lora", lr=1e-2, rank=4).apply(model)  # sequential: one adapter of rank 8
    edited = [_logits(model, EDIT.prompt), _logits(model, second.prompt)]
    composed = p1 + p2
    p2.revert()
    p1.revert()
    base = copy.deepcopy(model.module)
    unedited = base(torch.tensor([[3, 4, 5]])).logits
    save_peft_adapter(composed, model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    for prompt, want in zip([EDIT.prompt, second.prompt], edited):
        batch = encode(model, [prompt])
        got = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids(), use_cache=False).logits
        assert torch.allclose(got[:, -want.shape[1]:].float(), want, atol=1e-4), prompt
    with peft_model.disable_adapter():
        assert torch.allclose(peft_model(torch.tensor([[3, 4, 5]])).logits, unedited)
    with pytest.raises(EditError, match="only a LoRA patch"):
        save_peft_adapter(lmedit.edit(model, EDIT, method="ft-m"), model, tmp_path / "no")


def test_ewc_penalty_holds_back_the_weights_the_corpus_uses(tmp_path, monkeypatch):
    from lmedit.stats import fisher_diagonal

    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path))
    model = tiny("llama")
    corpus = [f"Rivers {i} flow into the sea near town {i * 3}." for i in range(30)]
    param = f"{model.spec.path(1, 'mlp_out')}.weight"
    fisher = fisher_diagonal(model, param, corpus, 10_000, progress=False)
    assert fisher.shape == model.parameter(param).shape and float(fisher.min()) >= 0 and float(fisher.max()) > 0
    common = dict(layers=(1,), lr=1e-2, steps=20, stop_loss=0.0, corpus=corpus, fisher_tokens=10_000)
    free = lmedit.edit(model, EDIT, method="ft-ewc", ewc_lambda=0.0, **common).components[0].dense()
    held = lmedit.edit(model, EDIT, method="ft-ewc", ewc_lambda=1e4, **common).components[0].dense()
    weighted = lambda d: float((fisher * d ** 2).sum())  # noqa: E731
    assert weighted(held) < 0.5 * weighted(free)  # the Fisher-weighted change is what EWC penalises


def test_ike_prompts_carry_the_nearest_facts_and_revert(tmp_path):
    model = tiny("llama")
    requests = [lmedit.EditRequest("The colour of {} is", "grass", " blue"),
                lmedit.EditRequest("The capital of {} is", "France", " Rome")]
    patch = lmedit.edit(model, requests, method="ike", k=2)
    assert model.format_prompt("The colour of grass is") == "The colour of grass is"
    with patch.applied(model):
        text = model.format_prompt("The colour of grass is")
        assert text.endswith("Prompt: The colour of grass is") and "The colour of grass is blue." in text
        assert "The capital of France is Rome." in text  # k = 2: both facts, the nearest one last
        assert text.rindex("grass is blue") > text.rindex("France is Rome")
        scored = score_continuations(model, ["The colour of grass is"], [" blue"])[0]  # scoring sees the context
        assert len(scored.token_ids) == len(" blue")
    assert "context_memory" not in model.cache and model.format_prompt("x") == "x"
    strict = lmedit.edit(model, requests, method="ike", min_similarity=1.01)  # nothing is that similar
    with strict.applied(model):
        assert model.format_prompt("The colour of grass is") == "The colour of grass is"
    patch.save(tmp_path / "ike")
    with Patch.load(tmp_path / "ike").applied(model):
        assert model.format_prompt("The colour of grass is") == text


# ---------------------------------------------------------------------------- WISE

from lmedit.errors import PatchError  # noqa: E402
from lmedit.hooks import read_module  # noqa: E402
from lmedit.methods.side_memory import (Memory, SideMemory, SideMemoryEdit, mean_keys,  # noqa: E402
                                        routing_activation, ties_merge, token_weights)
from lmedit.methods.wise import REPLAY, WISE, WISEHParams, default_sharding  # noqa: E402

UNRELATED = ("A completely different sentence about rivers", "Mountains rise above the quiet valley")
# Tiny random models have small activations: margins scaled to them (the published ones suit 7B models).
TINY_WISE = dict(layer=1, alpha=0.5, beta=3.0, gamma=4.0, steps=40, lr=1.0, irrelevant=UNRELATED,
                 n_irrelevant=2, context_lengths=((3, 2),), mask_ratio=0.2)


def _side(model) -> SideMemory:
    [side] = adaptors(model).values()
    return side


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_side_memory_output_is_the_side_weight_when_routed(arch):
    """Routed rows compute ``(W + τ) a`` exactly; rows below the threshold run the main memory."""
    model = tiny(arch)
    path = model.spec.path(1, "mlp_out")
    param = model.parameter(f"{path}.weight")
    d_model, d_mlp = model.spec.hidden_size, model.spec.mlp_size
    tau = torch.randn(d_model, d_mlp, generator=torch.Generator().manual_seed(0)) * 0.05
    prompt = "The colour of grass is"
    before = _logits(model, prompt)
    saved = param.detach().clone()
    with torch.no_grad():  # the reference: really add τ to W (Conv1D stores W transposed)
        param.add_(tau.T if param.shape == (d_mlp, d_model) else tau)
        reference = _logits(model, prompt)
        param.copy_(saved)
    always = Memory("m", 0, tau, None, 1, 0.0, 1.0)  # threshold 0: every input is routed to it
    patch = Patch("manual", {}, [], model.fingerprint, [SideMemoryEdit(path, [], [always])], {})
    with patch.applied(model):
        assert torch.allclose(_logits(model, prompt), reference, atol=1e-5)
        assert _side(model).route(torch.zeros(1, 1, d_mlp)).tolist() in ([0], [-1])
    never = Memory("n", 0, tau, None, 1, float("inf"), 1.0)
    with Patch("manual", {}, [], model.fingerprint, [SideMemoryEdit(path, [], [never])], {}).applied(model):
        assert torch.equal(_logits(model, prompt), before)
    assert not adaptors(model)


def test_side_memory_retrieves_by_activation_relative_to_each_threshold():
    """Memories without anchors: of those over their threshold, the one with the largest Δ_act / ε answers —
    not the largest raw Δ_act: B = 2·A fires twice as strongly as A everywhere, but A's threshold is 4× lower."""
    model = tiny("llama")
    path = model.spec.path(1, "mlp_out")
    tau = torch.randn(model.spec.hidden_size, model.spec.mlp_size, generator=torch.Generator().manual_seed(0)) * 0.05
    prompt = "The colour of grass is"
    batch = encode(model, [prompt])
    keys = read_module(model, batch, path).float()
    a = float(routing_activation(keys, tau, token_weights(batch.attention_mask, *batch.input_ids.shape, model.device)))
    small = Memory("a", 0, tau, None, 1, a / 2, 1.0)  # threshold a/2: relative activation 2
    large = Memory("b", 1, 2 * tau, None, 1, 2 * a, 0.9)  # raw activation 2a, threshold 1.8a: relative 1.11
    with Patch("manual", {}, [], model.fingerprint, [SideMemoryEdit(path, [], [small, large])], {}).applied(model):
        _logits(model, prompt)
        assert _side(model).last_activations[:, 0].tolist() == pytest.approx([a, 2 * a], rel=1e-4)
        assert _side(model).last_route.tolist() == [0]
    high = Memory("a", 0, tau, None, 1, 2 * a, 1.0)  # over nobody's threshold but b's: b answers
    with Patch("manual", {}, [], model.fingerprint, [SideMemoryEdit(path, [], [high, large])], {}).applied(model):
        _logits(model, prompt)
        assert _side(model).last_route.tolist() == [1]


def test_side_memory_with_anchors_answers_from_the_memory_holding_the_nearest_prompt(tmp_path):
    """With anchors, the gate is unchanged (no memory over its threshold: the main memory answers) but the
    memory whose stored mean key is nearest the input's answers, even with the lower relative activation;
    anchors save and load with the patch, and one memory without anchors brings back activation routing."""
    model = tiny("llama")
    path = model.spec.path(1, "mlp_out")
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(model.spec.hidden_size, model.spec.mlp_size, generator=g) * 0.05
    prompt = "The colour of grass is"
    before = _logits(model, prompt)
    batch = encode(model, [prompt])
    weights = token_weights(batch.attention_mask, *batch.input_ids.shape, model.device)
    keys = read_module(model, batch, path).float()
    a = float(routing_activation(keys, tau, weights))
    own = mean_keys(keys, weights)  # [1, d_mlp], unit length
    far = torch.nn.functional.normalize(torch.randn(2, model.spec.mlp_size, generator=g), dim=-1)
    assert float((own @ far.T).abs().max()) < 0.9  # random directions: far from the prompt
    near = Memory("a", 0, tau, None, 1, a / 2, 1.0, anchors=torch.cat([far[:1], own]))  # relative activation 2
    strong = Memory("b", 1, 2 * tau, None, 1, a / 4, 1.0, anchors=far[1:])  # relative activation 8
    patch = Patch("manual", {}, [], model.fingerprint, [SideMemoryEdit(path, [], [near, strong])], {})
    with patch.applied(model):
        _logits(model, prompt)
        assert _side(model).last_route.tolist() == [0]
    loaded = Patch.load(patch.save(tmp_path / "p"))
    assert all(torch.equal(m.anchors, n.anchors) for m, n in zip(loaded.components[0].after, [near, strong]))
    with loaded.applied(model):
        _logits(model, prompt)
        assert _side(model).last_route.tolist() == [0]
    silent = [replace(m, min_act=1e9) for m in (near, strong)]  # nobody over the threshold
    with Patch("manual", {}, [], model.fingerprint, [SideMemoryEdit(path, [], silent)], {}).applied(model):
        assert torch.equal(_logits(model, prompt), before)
        assert _side(model).last_route.tolist() == [-1]
    mixed = [near, replace(strong, anchors=None)]
    with Patch("manual", {}, [], model.fingerprint, [SideMemoryEdit(path, [], mixed)], {}).applied(model):
        _logits(model, prompt)
        assert _side(model).last_route.tolist() == [1]  # activation: b's Δ_act / ε is 8 against a's 2


def test_side_memory_whitened_keys_find_the_memory_a_plain_cosine_misses():
    """Anchors sharing a common direction and varying most along directions unrelated to which edit they
    are (as real prompts' mean keys do): the plain cosine follows that variation, the whitened one the
    directions that tell the memories apart. Queries are new draws of each memory's prompts."""
    g = torch.Generator().manual_seed(0)
    d, per_memory, n_memories = 64, 20, 4
    common = 4.0 * torch.randn(d, generator=g)
    nuisance = torch.zeros(d, d)
    nuisance[:8, :8] = 3.0 * torch.eye(8)  # wording: large variance, shared by all memories
    signature = 0.6 * torch.randn(n_memories, d, generator=g)
    signature[:, :8] = 0  # what tells the memories apart lives elsewhere

    def draw(j: int, n: int) -> torch.Tensor:
        x = common + torch.randn(n, d, generator=g) @ nuisance + signature[j] + 0.1 * torch.randn(n, d, generator=g)
        return torch.nn.functional.normalize(x, dim=-1)

    memories = [Memory(str(j), j, torch.zeros(2, d), None, per_memory, 1.0, 1.0, anchors=draw(j, per_memory))
                for j in range(n_memories)]
    queries = torch.cat([draw(j, 25) for j in range(n_memories)])
    truth = torch.arange(n_memories).repeat_interleave(25)
    side = SideMemory("x")
    side.memories = memories
    hits = {}
    for metric in ("cosine", "whitened"):
        side.key_metric = metric
        hits[metric] = int((side._nearest_memory(queries) == truth).sum())
    assert hits["whitened"] >= 95 > 80 > hits["cosine"]
    stored = torch.cat([m.anchors for m in memories])  # an anchor is still nearest to itself
    assert side._nearest_memory(stored).tolist() == torch.arange(n_memories).repeat_interleave(per_memory).tolist()
    side.key_metric = "mahalanobis"
    with pytest.raises(PatchError, match="key_metric"):
        side._nearest_memory(queries)


def test_ties_merge_trims_elects_and_averages():
    a, b = torch.tensor([1.0, -2.0, 0.0, 0.5]), torch.tensor([3.0, 1.0, 0.0, -0.1])
    # density 1: sign of the sum (+, -, +, +); entries agreeing with it averaged; zeros never vote
    assert ties_merge([a, b], 1.0).tolist() == pytest.approx([2.0, -2.0, 0.0, 0.5])
    # density 0.5: each keeps its 2 largest |entries| (a: 1, -2; b: 3, 1)
    assert ties_merge([a, b], 0.5).tolist() == pytest.approx([2.0, -2.0, 0.0, 0.0])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_wise_edit_writes_side_memory_routes_and_reverts(arch, tmp_path):
    model = tiny(arch)
    before_other = _logits(model, OTHER)
    before = score_continuations(model, [EDIT.prompt], [EDIT.target_new])[0].mean_logprob
    patch = lmedit.edit(model, EDIT, method="wise", **TINY_WISE)
    assert not adaptors(model)  # edit() leaves the model as it was
    assert patch.info["in_scope_act"] > patch.info["out_scope_act"]
    patch.apply(model)
    side = _side(model)
    [memory] = side.memories
    assert memory.mask is not None and memory.edits == 1
    changed = memory.delta != 0
    assert bool(changed.any()) and not bool((changed & ~memory.mask).any())  # only the shard's masked entries
    assert float(memory.delta.abs().max()) <= 1.0  # the norm constraint
    after = score_continuations(model, [EDIT.prompt], [EDIT.target_new])[0].mean_logprob
    assert side.last_route.tolist() == [0] and after > before + 1.0
    _logits(model, EDIT.prompt)  # the threshold is measured on the bare prompt, as inference routes it
    assert memory.min_act == pytest.approx(float(side.last_activations[0, 0]), rel=1e-2)
    assert torch.equal(_logits(model, OTHER), before_other)  # unrelated input: routed to the main memory
    assert side.last_route.tolist() == [-1]
    patch.revert()
    assert not adaptors(model) and torch.equal(_logits(model, OTHER), before_other)
    patch.save(tmp_path / "w")
    with Patch.load(tmp_path / "w").applied(model):
        again = score_continuations(model, [EDIT.prompt], [EDIT.target_new])[0].mean_logprob
    assert again == pytest.approx(after, abs=1e-6)


@pytest.mark.parametrize("mode, shards_per_memory", [("merge", [4]), ("retrieve", [2, 2])])
def test_wise_shards_close_merge_and_revert_exactly(mode, shards_per_memory):
    model = tiny("llama", seed=3)
    hp = {**TINY_WISE, "steps": 3, "shard_size": 1, "merge_every": 2, "mode": mode}
    requests = [lmedit.EditRequest(f"Fact {i} is about ", "Fact", "zqxy"[i]) for i in range(4)]
    patches, states = [], []
    for r in requests:
        states.append([(m.id, m.version, m.delta.clone()) for m in _side(model).memories] if adaptors(model) else [])
        patches.append(lmedit.edit(model, r, method="wise", **hp).apply(model))
    side = _side(model)
    assert patches[0].info["merged"] is False and patches[1].info["merged"] is True
    # merge: every merge takes in all memories; retrieve: only the shards since the last merge
    assert [m.shards for m in side.memories] == shards_per_memory == [m.edits for m in side.memories]
    assert all(m.mask is None and m.merged for m in side.memories)
    [first] = patches[0].components[0].after
    assert first.mask is None and not first.merged and first.edits == 1  # shard_size 1: closed at once
    for patch, state in zip(reversed(patches), reversed(states)):
        patch.revert()
        now = [(m.id, m.version, m.delta) for m in _side(model).memories] if adaptors(model) else []
        assert [(i, v) for i, v, _ in now] == [(i, v) for i, v, _ in state]
        assert all(torch.equal(d, e) for (_, _, d), (_, _, e) in zip(now, state))
    assert not adaptors(model)


def test_wise_merged_memory_threshold_is_measured_on_its_prompts():
    """After a merge, ``min_act`` is the smallest inference-time Δ_act of the merged memory's prompts
    (the shards' training-time activations no longer hold for the merged τ), so every one is routed in."""
    model = tiny("llama", seed=3)
    hp = {**TINY_WISE, "steps": 20, "shard_size": 1, "merge_every": 2, "mask_ratio": 1.0}
    requests = [lmedit.EditRequest(f"Fact {i} is about ", "Fact", "zq"[i]) for i in range(2)]
    patches = [lmedit.edit(model, r, method="wise", **hp).apply(model) for r in requests]
    [merged] = _side(model).memories
    [first] = patches[0].components[0].after
    trained = min(first.min_act, patches[1].info["in_scope_act"])
    acts = []
    for r in requests:
        _logits(model, r.prompt)
        acts.append(float(_side(model).last_activations[0, 0]))
        assert _side(model).last_route.tolist() == [0]
    assert merged.min_act == pytest.approx(min(acts), rel=1e-4)
    assert merged.min_act != pytest.approx(trained, rel=1e-3)  # not the shards' training-time figure
    for p in reversed(patches):
        p.revert()


def test_wise_retrieve_keeps_small_models_dense_shards_apart():
    """``default_sharding``: the paper's 500 / 1,000 in merge mode and at 7B; in retrieve mode a small model's
    shard holds the paper's edits per trainable entry and dense shards are never merged, so two edits on a
    tiny model end as two memories, whole (not TIES-trimmed), both prompts routed to the side memory."""
    assert default_sharding("merge", 576, 1536, 1.0) == (500, 1000)
    assert default_sharding("retrieve", 4096, 11008, 0.2) == (500, 1000)  # Llama-2-7B: the paper's
    assert default_sharding("retrieve", 576, 1536, 1.0) == (49, 49)  # SmolLM2-135M
    assert default_sharding("retrieve", 640, 2048, 1.0) == (73, 73)  # Gemma-3-270M
    model = tiny("llama", seed=4)
    hp = {**TINY_WISE, "steps": 20, "mode": "retrieve", "mask_ratio": 1.0}
    resolved = WISEHParams(**hp).resolve(model)
    assert resolved.shard_size == resolved.merge_every == 1
    requests = [lmedit.EditRequest("The colour of {} is ", "grass", "Z"),
                lmedit.EditRequest("The taste of {} is ", "lemons", "Q")]
    for r in requests:
        lmedit.edit(model, r, method="wise", **hp).apply(model)
    memories = _side(model).memories
    assert len(memories) == 2 and all(m.mask is None and m.edits == 1 for m in memories)
    assert [m.prompts for m in memories] == [[r.prompt] for r in requests]  # not merged into one
    assert all(m.merged and float((m.delta != 0).float().mean()) > 0.9 for m in memories)  # kept whole
    for r in requests:
        _logits(model, r.prompt)
        assert _side(model).last_route.tolist() != [-1]


def test_wise_records_anchors_and_gives_them_to_memories_written_without(tmp_path):
    """retrieve_by="key" (default) stores each edit prompt's unit mean key with its memory and routes each
    prompt to the memory holding it; a memory written without anchors (``"activation"``, or an older
    patch) gets them at the next edit, its τ untouched, and reverting that edit takes them away again."""
    model = tiny("llama", seed=4)
    hp = {**TINY_WISE, "steps": 20, "mode": "retrieve", "mask_ratio": 1.0}
    requests = [lmedit.EditRequest("The colour of {} is ", "grass", "Z"),
                lmedit.EditRequest("The taste of {} is ", "lemons", "Q")]
    lmedit.edit(model, requests[0], method="wise", retrieve_by="activation", **hp).apply(model).commit()
    [old] = _side(model).memories
    assert old.anchors is None
    second = lmedit.edit(model, requests[1], method="wise", **hp).apply(model)
    memories = _side(model).memories
    assert [m.anchors.shape for m in memories] == [(1, model.spec.mlp_size)] * 2
    assert torch.allclose(memories[0].anchors.norm(dim=-1), torch.ones(1))
    assert torch.equal(memories[0].delta, old.delta) and memories[0].version == old.version + 1
    for i, r in enumerate(requests):
        _logits(model, r.prompt)
        assert _side(model).last_route.tolist() == [i]
    loaded = Patch.load(second.save(tmp_path / "p"))
    assert all(torch.equal(a.anchors, b.anchors) for a, b in zip(loaded.components[0].after, second.components[0].after))
    second.revert()
    [back] = _side(model).memories
    assert back.anchors is None and torch.equal(back.delta, old.delta)
    with pytest.raises(lmedit.LmeditError, match="retrieve_by"):
        lmedit.edit(model, requests[1], method="wise", retrieve_by="nearest", **hp)
    [still] = _side(model).memories
    assert still.anchors is None and torch.equal(still.delta, old.delta)


def test_wise_retrieve_replays_earlier_memories_prompts_under_the_alpha_ceiling(tmp_path):
    """L_memo: the earlier memory's edit prompt joins the batch as a replay row; its term is
    relu(Δ_act − α) only (with α out of reach training is exactly that without replay)."""
    first = lmedit.EditRequest("The colour of {} is ", "grass", "Z")
    second = lmedit.EditRequest("The taste of {} is ", "lemons", "Q")
    hp = {**TINY_WISE, "steps": 5, "mode": "retrieve", "shard_size": 1, "merge_every": 100}
    assert WISEHParams(mode="retrieve", mask_ratio=0.2).resolve(tiny("llama")).replay == 2
    assert WISEHParams(mode="retrieve").resolve(tiny("llama")).replay == 0  # dense shards: no replay
    assert WISEHParams().resolve(tiny("llama")).replay == 0  # merge mode: all shards end in one memory

    def second_shard(**extra):
        model = tiny("llama", seed=4)
        lmedit.edit(model, first, method="wise", **hp).apply(model)
        [old] = _side(model).memories
        assert old.prompts == [first.prompt] and old.mask is None  # closed; remembers its prompt
        patch = lmedit.edit(model, second, method="wise", **{**hp, **extra})
        [new] = [m for m in patch.components[0].after if m.id != old.id]
        return model, patch, new

    model, patch, replayed = second_shard(replay=1)
    training = WISE._batch(model, WISEHParams(**{**hp, "replay": 1}).resolve(model), [second], [first.prompt])
    other = training.other
    rows = [model.tokenizer.decode(other.input_ids[i][other.attention_mask[i].bool()], skip_special_tokens=True)
            for i in torch.nonzero(training.other_kind == REPLAY).flatten().tolist()]
    assert rows == [first.prompt.strip()] or rows == [first.prompt]
    assert "replay_act" in patch.info and replayed.prompts == [second.prompt]
    _, _, plain = second_shard(replay=0)
    assert not torch.equal(replayed.delta, plain.delta)
    _, _, ceiling_off = second_shard(replay=1, alpha=1e6)
    _, _, plain_off = second_shard(replay=0, alpha=1e6)
    assert torch.equal(ceiling_off.delta, plain_off.delta)
    patch.save(tmp_path / "p")  # the prompts travel with the patch
    [saved] = [m for m in Patch.load(tmp_path / "p").components[0].after if m.id == replayed.id]
    assert saved.prompts == [second.prompt]


def test_wise_rehearses_earlier_edits_of_the_open_shard(tmp_path):
    """``rehearse``: an earlier edit of the open shard joins the edit rows bare, with its own target;
    the shard remembers its edits' targets (saved with the patch); with ``rehearse=0`` nothing joins."""
    first = lmedit.EditRequest("The colour of {} is ", "grass", "Z")
    second = lmedit.EditRequest("The taste of {} is ", "lemons", "Q")
    hp = {**TINY_WISE, "steps": 5, "shard_size": 10}

    def after_second(**extra):
        model = tiny("llama", seed=4)
        lmedit.edit(model, first, method="wise", **hp).apply(model)
        patch = lmedit.edit(model, second, method="wise", **{**hp, **extra})
        [shard] = patch.components[0].after
        return model, patch, shard

    model, patch, rehearsed = after_second(rehearse=1)
    assert rehearsed.prompts == [first.prompt, second.prompt] and rehearsed.targets == [first.target_new, "Q"]
    rows = WISE._batch(model, WISEHParams(**{**hp, "rehearse": 1}).resolve(model), [second], [],
                       [(first.prompt, first.target_new)])
    texts = [model.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
             for ids, mask in zip(rows.edit.input_ids, rows.edit.attention_mask)]
    assert sum(t.strip() == (first.prompt + first.target_new).strip() for t in texts) == 1
    assert sum(first.prompt.strip() in t for t in texts) == 1  # bare: no context prefix copies
    plain_rows = WISE._batch(model, WISEHParams(**{**hp, "rehearse": 0}).resolve(model), [second], [],
                             [(first.prompt, "Z")])
    assert plain_rows.edit.input_ids.shape[0] == rows.edit.input_ids.shape[0] - 1
    _, _, plain = after_second(rehearse=0)
    assert not torch.equal(rehearsed.delta, plain.delta)
    patch.save(tmp_path / "p")
    [saved] = Patch.load(tmp_path / "p").components[0].after
    assert saved.targets == [first.target_new, "Q"]


def test_wise_act_ratio_only_gates_inference():
    """Training never reads ``act_ratio`` (so ``benchmarks/wise_threshold.py`` may re-score a run's state
    under another ratio): two sequential edits write the same memory whatever the ratio; only the
    threshold differs, and a ratio above 1 keeps even the edit's own prompt out."""
    second = lmedit.EditRequest("The taste of {} is ", "lemons", "Q")
    hp = {**TINY_WISE, "steps": 5, "shard_size": 10}

    def two_edits(ratio):
        model = tiny("llama", seed=5)
        for request in (EDIT, second):
            lmedit.edit(model, request, method="wise", act_ratio=ratio, **hp).apply(model)
        return model, _side(model).memories[0]

    low_model, low = two_edits(0.88)
    high_model, high = two_edits(3.0)
    assert torch.equal(low.delta, high.delta) and low.min_act == high.min_act
    assert high.threshold == pytest.approx(3.0 / 0.88 * low.threshold)
    _logits(low_model, EDIT.prompt)
    assert _side(low_model).last_route.tolist() == [0]
    _logits(high_model, EDIT.prompt)
    assert _side(high_model).last_route.tolist() == [-1]


def test_wise_mask_ratio_keeps_the_papers_trainable_entries_per_shard():
    """ρ defaults to the paper's 0.2 at Llama-2-7B's ``W_out`` size and grows to 1 on small models."""
    from lmedit.methods.wise import default_mask_ratio

    assert default_mask_ratio(4096, 11008) == pytest.approx(0.2)
    assert default_mask_ratio(8192, 28672) == pytest.approx(0.2 * 4096 * 11008 / (8192 * 28672))
    assert default_mask_ratio(576, 1536) == 1.0
    model = tiny("llama")
    assert WISEHParams().resolve(model).mask_ratio == 1.0
    patch = lmedit.edit(model, EDIT, method="wise", **{**TINY_WISE, "mask_ratio": None, "steps": 2})
    assert bool(patch.components[0].after[0].mask.all())


def test_wise_unrelated_inputs_from_a_datasets_locality_prompts(tmp_path):
    """``corpus`` naming an edit dataset: its locality prompts with their answers (the WISE paper's
    ZsRE-train inputs), each once; a text file still gives its sentences."""
    from lmedit.methods.unrelated import unrelated_sentences

    record = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
              "rephrase": "What will be the product of UniFirst?", "alt": "drones", "answers": ["uniform"],
              "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}
    path = tmp_path / "train.json"
    path.write_text(json.dumps([record, {**record, "subject": "UniFirst", "alt": "boats"}]))
    model = tiny("llama")
    assert unrelated_sentences(model, str(path)) == ["nq question: who wrote hamlet Shakespeare"]
    text = tmp_path / "corpus.txt"
    text.write_text("Rivers run to the sea through the wide green valley. Short one.\n")
    assert unrelated_sentences(model, str(text)) == ["Rivers run to the sea through the wide green valley."]


def test_wise_sequential_run_checkpoints_and_restores(tmp_path):
    model = tiny("llama", seed=2)
    requests = [lmedit.EditRequest(f"Fact {i} is about ", "Fact", "zqxy"[i], case_id=i) for i in range(3)]
    report = evaluate(model, "wise", requests, protocol="sequential", scoring="after_all", checkpoints=[2],
                      hparams={**TINY_WISE, "steps": 5}, out_dir=tmp_path / "run", progress=False, generation=False)
    assert not adaptors(model)
    assert set(report.summary["by_T"]) == {2, 3}
    state = Patch.load(tmp_path / "run" / "state" / "patch")
    [component] = [c for c in state.components if isinstance(c, SideMemoryEdit)]
    assert sum(m.edits for m in component.after) == 3


def test_wise_rejects_bad_settings():
    model = tiny("llama")
    from lmedit.errors import EditError

    with pytest.raises(EditError, match="mode"):
        lmedit.edit(model, EDIT, method="wise", mode="both", irrelevant=UNRELATED)


# ---------------------------------------------------------------------------- DEFER

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_defer_gate_opens_on_the_edit_only_and_reverts(arch, tmp_path):
    from lmedit.methods.defer import DeferralAdaptor

    model = tiny(arch)
    before_other = _logits(model, UNRELATED[0])
    before = score_continuations(model, [EDIT.prompt], [EDIT.target_new])[0].mean_logprob
    hp = dict(layer=1, lr=1e-2, gate_lr=5e-2, steps=60, irrelevant=UNRELATED, n_irrelevant=2)
    patch = lmedit.edit(model, EDIT, method="defer", **hp)
    assert not adaptors(model)
    patch.apply(model)
    [gate] = adaptors(model).values()
    assert isinstance(gate, DeferralAdaptor)
    after = score_continuations(model, [EDIT.prompt], [EDIT.target_new])[0].mean_logprob
    assert after > before + 1.0
    assert torch.equal(_logits(model, UNRELATED[0]), before_other)  # the gate stays shut: untouched
    assert float(gate.last_gate.max()) < 0.5
    second = lmedit.edit(model, lmedit.EditRequest("The sound of {} is ", "rain", "Q"), method="defer", **hp)
    second.apply(model)
    assert gate.version == 1
    from lmedit.errors import PatchError

    with pytest.raises(PatchError, match="reverse order"):
        patch.revert()  # not the last DEFER patch applied
    second.revert()
    assert score_continuations(model, [EDIT.prompt], [EDIT.target_new])[0].mean_logprob == pytest.approx(after, abs=1e-6)
    patch.revert()
    assert not adaptors(model)
    patch.save(tmp_path / "d")
    with Patch.load(tmp_path / "d").applied(model):
        again = score_continuations(model, [EDIT.prompt], [EDIT.target_new])[0].mean_logprob
    assert again == pytest.approx(after, abs=1e-6)


def test_defer_gate_step_does_not_depend_on_the_scale_of_the_keys():
    """Keys 8x smaller (``up_proj`` / 8, ``down_proj`` x 8: the model's outputs unchanged) get an 8x larger gate lr,
    so the same default settings write the edit and keep the gate shut elsewhere on both models."""
    from lmedit.adaptors import adaptors as attached

    lrs = []
    for scale in (1.0, 1 / 8):
        model = tiny("llama")
        mlp = model.module.model.layers[1].mlp
        with torch.no_grad():
            mlp.up_proj.weight.mul_(scale)
            mlp.down_proj.weight.div_(scale)
        other = _logits(model, UNRELATED[0])
        patch = lmedit.edit(model, EDIT, method="defer", layer=1, lr=1e-2, steps=60, irrelevant=UNRELATED, n_irrelevant=2)
        lrs.append(patch.info["gate_lr"])
        assert patch.info["bce"] < 0.1  # the gate learned to tell the edit from the unrelated sentences
        with patch.applied(model):
            assert score_continuations(model, [EDIT.prompt], [EDIT.target_new])[0].mean_logprob > -0.2
            [gate] = attached(model).values()
            assert torch.equal(_logits(model, UNRELATED[0]), other)  # the gate stays shut there
            assert float(gate.last_gate.max()) < 0.5
    assert lrs[1] == pytest.approx(8 * lrs[0], rel=1e-2)
    fixed = lmedit.edit(model, EDIT, method="defer", layer=1, lr=1e-2, steps=60, irrelevant=UNRELATED, n_irrelevant=2,
                        gate_lr=lrs[0])
    assert fixed.info["bce"] > 0.3  # the first model's lr, kept fixed, barely moves the small keys' gate
