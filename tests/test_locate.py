"""Locate-then-edit building blocks (statistics, keys, values, solvers) and methods.

Tiny random models check the mathematics exactly; SmolLM2 checks that the edits really work."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import lmedit
from lmedit.methods import keyvalue, post_norm, solvers
from lmedit.stats import second_moment, second_moments
from tiny import CORPUS, gemma_like_post_norm, tiny
from tiny import params as _params, bit_identical as _bit_identical

FAST = dict(corpus=CORPUS, stats_tokens=2000, context_lengths=[[4, 2]], steps=30, lr=0.5)


# ------------------------------------------------------------------------------------ statistics

def test_second_moment_equals_direct_computation(tmp_path, monkeypatch):
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path))
    model = tiny("llama")
    moment = second_moment(model, 1, CORPUS, max_tokens=10**6, progress=False)
    keys = []
    from lmedit.hooks import Hooks

    with torch.no_grad(), Hooks(model.module) as hooks:
        key = hooks.read(model.spec.path(1, "mlp_out"), "input")
        for text in CORPUS:
            ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
            for j in range(0, ids.shape[1], 128):
                chunk = ids[:, j:j + 128]
                if chunk.shape[1] > 1:
                    model.module(input_ids=chunk)
                    keys.append(hooks[key][0].double())
    K = torch.cat(keys)
    assert moment.count == K.shape[0]
    torch.testing.assert_close(moment.mean, K.T @ K / K.shape[0], rtol=1e-3, atol=1e-6)  # float32 forward, padded vs not


def test_second_moments_resume_after_interruption(tmp_path, monkeypatch):
    """A collection killed midway resumes from its checkpoint and gives the same result."""
    import lmedit.stats as stats

    model = tiny("gpt2")
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "full"))
    full = second_moments(model, [0, 1], CORPUS, max_tokens=10**6, batch_size=1, progress=False)
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "killed"))
    calls = {"n": 0}
    real_pad = stats._pad

    def dying_pad(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 30:  # after the checkpoint written at batch 20
            raise KeyboardInterrupt
        return real_pad(*args, **kwargs)

    monkeypatch.setattr(stats, "_pad", dying_pad)
    with pytest.raises(KeyboardInterrupt):
        second_moments(model, [0, 1], CORPUS, max_tokens=10**6, batch_size=1, progress=False)
    assert list((tmp_path / "killed").rglob("partial-*.pt"))
    calls["n"] = -10**9
    resumed = second_moments(model, [0, 1], CORPUS, max_tokens=10**6, batch_size=1, progress=False)
    assert calls["n"] < -10**9 + len(CORPUS) - 19  # it did not start over
    for layer in (0, 1):
        assert resumed[layer].count == full[layer].count
        torch.testing.assert_close(resumed[layer].mean, full[layer].mean, rtol=1e-12, atol=1e-15)


def test_corpus_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path))
    model = tiny("llama")
    with pytest.raises(lmedit.LmeditError, match="does not exist"):
        second_moment(model, 0, str(tmp_path / "missing.txt"))
    with pytest.raises(lmedit.LmeditError, match="empty"):
        second_moment(model, 0, ["  ", ""])


# ------------------------------------------------------------------------------------ solvers

def test_rank_one_update_maps_key_exactly_and_is_minimal():
    torch.manual_seed(0)
    A = torch.randn(40, 40, dtype=torch.float64)
    C = A @ A.T / 40 + 0.1 * torch.eye(40, dtype=torch.float64)
    k, delta = torch.randn(40, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    d, u = solvers.rank_one_update(C, k, delta, ridge=0.0)
    dW = torch.outer(d, u)
    torch.testing.assert_close(dW @ k, delta)
    # any other solution dW + N with N k = 0 has a larger C-weighted norm tr(dW C dWᵀ)
    N = torch.randn(8, 40, dtype=torch.float64)
    N = N - torch.outer(N @ k, k) / (k @ k)
    cost = lambda M: torch.trace(M @ C @ M.T)
    assert cost(dW) < cost(dW + 0.1 * N)


def _spd(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, dtype=torch.float64, generator=g)
    return A @ A.T / n + 0.01 * torch.eye(n, dtype=torch.float64)


def test_memit_update_solves_its_least_squares_problem():
    C, K, R = _spd(30), torch.randn(4, 30, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    left, right = solvers.memit_update(C, K, R, weight=3.0, ridge=0.0)
    dW = left @ right
    # the gradient of ‖ΔW Kᵀ − Rᵀ‖² + λ tr(ΔW C ΔWᵀ) vanishes: ΔW (λC + KᵀK) = Rᵀ K
    torch.testing.assert_close(dW @ (3.0 * C + K.T @ K), R.T @ K)


def test_emmet_update_is_exact_and_reduces_to_rome():
    C, K, R = _spd(30), torch.randn(4, 30, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    left, right = solvers.emmet_update(C, K, R, ridge=0.0)
    torch.testing.assert_close(left @ right @ K.T, R.T)
    l1, r1 = solvers.emmet_update(C, K[:1], R[:1], ridge=0.0)
    d, u = solvers.rank_one_update(C, K[0], R[0], ridge=0.0)
    torch.testing.assert_close(l1 @ r1, torch.outer(d, u))


def test_relaxed_emmet_is_memit_with_lambda_equal_to_mu():
    """``Rᵀ (K C⁻¹ Kᵀ + μI)⁻¹ K C⁻¹ = Rᵀ K (μC + KᵀK)⁻¹`` (push-through identity): EMMET's relaxation μ
    plays exactly MEMIT's λ, so a large batch that EMMET over-fits is MEMIT's problem at a small λ."""
    C, K, R = _spd(30), torch.randn(12, 30, dtype=torch.float64), torch.randn(12, 6, dtype=torch.float64)
    collide = 0.3
    gram_diag = (K @ torch.linalg.solve(C, K.T)).diagonal().mean()
    left, right = solvers.emmet_update(C, K, R, ridge=0.0, collide=collide)
    l2, r2 = solvers.memit_update(C, K, R, weight=float(collide * gram_diag), ridge=0.0)
    torch.testing.assert_close(left @ right, l2 @ r2)
    exact_l, exact_r = solvers.emmet_update(C, K, R, ridge=0.0)
    assert not torch.allclose(exact_l @ exact_r, left @ right)  # μ does relax the equalities


def test_every_key_readout_writes_delta_at_each_key_and_reduces_to_rome():
    C, K = _spd(30, seed=1), torch.randn(5, 30, dtype=torch.float64)
    u = solvers.every_key_readout(C, K, ridge=0.0)
    torch.testing.assert_close(K @ u, torch.ones(5, dtype=torch.float64))  # ΔW k_j = δ (uᵀk_j) = δ for each j
    _, rome_u = solvers.rank_one_update(C, K[0], torch.zeros(1), ridge=0.0)
    torch.testing.assert_close(solvers.every_key_readout(C, K[:1], ridge=0.0), rome_u)
    # the smallest such u in the C-weighted norm: adding anything orthogonal (in C⁻¹) to the keys costs more
    N = torch.randn(30, dtype=torch.float64)
    N = N - K.T @ torch.linalg.solve(K @ K.T, K @ N)  # K N = 0: still uᵀk_j = 1
    assert u @ C @ u < (u + 0.1 * torch.linalg.solve(C, N)) @ C @ (u + 0.1 * torch.linalg.solve(C, N))
    twice = solvers.every_key_readout(C, torch.cat([K, K[:2]]), ridge=0.0)  # two contexts with the same key
    torch.testing.assert_close(twice, u)
    relaxed = solvers.every_key_readout(C, K, ridge=0.0, collide=1.0)
    assert relaxed @ C @ relaxed < u @ C @ u and (K @ relaxed - 1).abs().max() > 0.01


def test_prompt_share_weights_the_unprefixed_prompt():
    model = tiny("llama")
    requests = [lmedit.EditRequest("The colour of {}", "grass", " Z"), lmedit.EditRequest("{} is red", "Blood", " Y")]
    prompted = keyvalue.prefixed_prompts(model, requests, ["{}", "A. {}", "B b. {}", "C. {}"])
    assert prompted.is_bare.tolist() == [True, False, False, False, False] * 2  # the 5th row is the KL prompt
    uniform = keyvalue._row_weights(prompted, None)
    shared = keyvalue._row_weights(prompted, 0.5)
    assert uniform.tolist() == pytest.approx([0.25] * 4 + [0] + [0.25] * 4 + [0])
    assert shared.tolist() == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6, 0] * 2)
    only_bare = keyvalue.prefixed_prompts(model, requests, ["{}"])
    assert keyvalue._row_weights(only_bare, 0.5).tolist() == pytest.approx([1, 0, 1, 0])
    with pytest.raises(lmedit.LmeditError, match="prompt_share"):
        lmedit.get_method("rome", prompt_share=1.5).hparams.value_config()


def test_alphaedit_update_leaves_corpus_and_earlier_keys_alone():
    n = 30
    values = torch.cat([torch.full((10,), 1e-4), torch.linspace(1, 5, n - 10)]).double()
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    C = Q @ torch.diag(values) @ Q.T  # corpus keys span 20 directions; 10 are (nearly) never used
    P, dim = solvers.nullspace_projector(C, threshold=1e-2)
    assert dim == 10
    K = torch.randn(3, n, dtype=torch.float64)
    R = torch.randn(3, 6, dtype=torch.float64)
    dW = torch.mm(*solvers.alphaedit_update(P, K, R, l2=1e-3))
    assert (dW @ C).norm() < 1e-3 * dW.norm() * C.norm()  # corpus outputs unchanged
    assert (dW @ K.T - R.T).norm() < 0.2 * R.norm()  # the new keys (their null-space part) are written
    # sequential use: keys of an earlier edit inside the null space are preserved too
    earlier = (P @ torch.randn(n, 2, dtype=torch.float64)).T
    free = torch.mm(*solvers.alphaedit_update(P, K, R, l2=1e-3))
    kept = torch.mm(*solvers.alphaedit_update(P, K, R, earlier.T @ earlier, l2=1e-3))
    assert (kept @ earlier.T).norm() < 0.05 * (free @ earlier.T).norm()


def test_nullspace_by_energy_share_is_scale_free():
    n = 40
    values = torch.cat([torch.full((8,), 0.01), torch.full((12,), 0.2), torch.linspace(1, 5, n - 20)]).double()
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    C = Q @ torch.diag(values) @ Q.T
    keys = torch.randn(4000, n, dtype=torch.float64) @ torch.diag(values.sqrt()) @ Q.T  # E[k kᵀ] = C
    for scale in (1.0, 1000.0):  # the absolute threshold's answer changes with the keys' scale ...
        P, dim = solvers.nullspace_projector(C * scale, threshold=2e-2)
        assert dim == (8 if scale == 1 else 0)
        P, dim = solvers.nullspace_projector(C * scale, threshold=2e-2, energy=0.002)  # ... the share's does not
        assert dim == 8
        share = float(((keys @ P) ** 2).sum() / (keys ** 2).sum())
        assert 0.001 < share <= 0.002
# ------------------------------------------------------------------------------------ keys and values

def test_subject_last_token_positions():
    model = tiny("llama")
    prompt = "Paris is the capital of France"
    idx = keyvalue.subject_last_token(model, prompt, len("Paris"))
    ids = model.tokenizer(prompt)["input_ids"]
    assert model.tokenizer.decode(ids[idx]) == "s" and idx == 5  # <bos> P a r i s


@pytest.mark.parametrize("arch,update_aware", [("llama", False), ("gpt2", False), ("llama", True), ("gpt2", True)])
def test_rome_edit_maps_the_key_and_is_reversible(arch, update_aware, tmp_path, monkeypatch):
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path))
    model = tiny(arch)
    # A 2-layer random model cannot be made to say much from one vector at one position: the subject
    # ends the prompt and the constraints are loosened, so the test measures ROME's algebra, not capacity.
    request = lmedit.EditRequest("The colour of {}", "grass", " Z")
    before = lmedit.score_continuations(model, [request.prompt], [request.target_new])[0].mean_logprob
    saved = _params(model)
    patch = lmedit.edit(model, request, method="rome", layer=0, update_aware=update_aware,
                        **{**FAST, "clamp_norm_factor": 100.0, "weight_decay": 0.0, "kl_factor": 0.0, "steps": 60})
    assert _bit_identical(model, saved)  # edit() leaves the model as it was
    [change] = patch.components
    assert change.left.shape[1] == 1  # rank one
    with patch.applied(model):
        after = lmedit.score_continuations(model, [request.prompt], [request.target_new])[0].mean_logprob
    assert after > before + 3.0, (before, after)
    assert _bit_identical(model, saved)  # reverted bit for bit


def test_rome_clamps_its_change_harder_behind_a_post_mlp_norm(tmp_path, monkeypatch):
    """Default ``clamp_norm_factor``: 4 (published) without a post-MLP norm, 1 with one; the written change
    at the prompt's key then stays within ``‖v̄‖``, where an unclamped one (100) goes past it."""
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path))
    from lmedit.methods.rome import ROME

    assert ROME().hparams.resolve(tiny("llama")).clamp_norm_factor == 4.0
    model = tiny("gemma3")
    assert ROME().hparams.resolve(model).clamp_norm_factor == 1.0
    assert ROME(clamp_norm_factor=2.5).hparams.resolve(model).clamp_norm_factor == 2.5  # explicit wins
    request = lmedit.EditRequest("The colour of {}", "grass", " Z")
    settings = {**FAST, "weight_decay": 0.0, "kl_factor": 0.0, "steps": 60}
    templates = keyvalue.context_templates(model, [tuple(x) for x in FAST["context_lengths"]])
    keys = keyvalue.compute_keys(model, 0, [request], templates, average=False).float()
    W = model.module.get_submodule(model.spec.path(0, "mlp_out")).weight.detach().float()
    v_bar = (keys @ W.T).mean(0).norm()
    bare = keys[templates.index("{}")]
    ratios = {}
    for clamp in (None, 100.0):
        extra = {} if clamp is None else {"clamp_norm_factor": clamp}
        patch = lmedit.edit(model, request, method="rome", layer=0, **settings, **extra)
        [change] = patch.components
        assert patch.hparams["clamp_norm_factor"] == (1.0 if clamp is None else clamp)
        ratios[clamp] = float(((change.left @ change.right) @ bare).norm() / v_bar)
    assert ratios[None] <= 1.0 + 1e-3 and ratios[100.0] > 1.5, ratios


def test_rome_every_key_writes_the_same_change_at_each_context(tmp_path, monkeypatch):
    """``keys="each"``: the rank-one update adds the same δ at every context's key, where ROME's adds it
    at their mean only; a bad ``keys`` value is a clear error and leaves the model alone."""
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path))
    model = tiny("llama")
    request = lmedit.EditRequest("The colour of {}", "grass", " Z")
    hp = {**FAST, "context_lengths": [[4, 3]], "steps": 3}
    keys = None
    for mode in ("mean", "each"):
        patch = lmedit.edit(model, request, method="rome", layer=0, keys=mode, prompt_share=0.5, **hp)
        [change] = patch.components
        if keys is None:
            templates = keyvalue.context_templates(model, [(4, 3)])
            keys = keyvalue.compute_keys(model, 0, [request], templates, average=False).double()
        written = (change.left.double() @ change.right.double() @ keys.T).T  # ΔW k_j, one row per context
        spread = (written - written.mean(0)).norm(dim=1).max() / written.mean(0).norm()
        assert (spread < 1e-6) == (mode == "each"), (mode, spread)
    saved = _params(model)
    for method in ("rome", "memit"):
        with pytest.raises(lmedit.LmeditError, match="keys must be"):
            lmedit.edit(model, request, method=method, keys="all", **hp)
    assert _bit_identical(model, saved)


def test_update_aware_values_see_the_rank_one_readout(tmp_path, monkeypatch):
    """``readout`` scales δ at each row by ``uᵀk_row``: a readout orthogonal to every key leaves δ without
    effect (the target's probability stays the unedited model's); ``u`` with ``uᵀk* = 1`` lets it act."""
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path))
    model = tiny("llama")
    request = lmedit.EditRequest("The colour of {}", "grass", " Z")
    cfg = lmedit.get_method("rome").hparams.value_config()
    cfg.steps, cfg.kl_factor, cfg.weight_decay, cfg.clamp_norm_factor = 30, 0.0, 0.0, 100.0
    templates = ["{}"]
    d_mlp = model.spec.mlp_size
    _, _, start = keyvalue.optimize_values(model, 0, [request], templates, replace(cfg, steps=0))
    _, _, blind = keyvalue.optimize_values(model, 0, [request], templates, cfg, readout=torch.zeros(1, d_mlp))
    key = keyvalue.compute_keys(model, 0, [request], templates)
    _, _, seen = keyvalue.optimize_values(model, 0, [request], templates, cfg, readout=key / (key ** 2).sum())
    assert blind["prob"] == start["prob"]
    assert seen["prob"][0] > 10 * start["prob"][0]


@pytest.mark.parametrize("method", ["memit", "pmet", "emmet", "alphaedit"])
@pytest.mark.parametrize("arch,keys", [("llama", "mean"), ("gpt2", "mean"), ("llama", "each"), ("gpt2", "each")])
def test_memit_family_edits_are_reversible(method, arch, keys, tmp_path, monkeypatch):
    """With ``keys="each"`` every (request, context) pair is a row of the layer solves: rank ≤ 2 × 3 here."""
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path))
    model = tiny(arch)
    requests = [lmedit.EditRequest("The colour of {}", "grass", " Z"), lmedit.EditRequest("The size of {}", "a house", " Q")]
    before = [s.mean_logprob for s in lmedit.score_continuations(model, [r.prompt for r in requests],
                                                                        [r.target_new for r in requests])]
    saved = _params(model)
    extra = {"nullspace_threshold": 1e9, "l2": 1e-2} if method == "alphaedit" else {}  # random keys: no null space
    patch = lmedit.edit(model, requests, method=method, layers=(0, 1), mom2_weight=1.0, keys=keys, **extra,
                        **{**FAST, "clamp_norm_factor": 100.0, "weight_decay": 0.0, "kl_factor": 0.0, "steps": 60})
    assert _bit_identical(model, saved)
    weights = [c for c in patch.components if isinstance(c, lmedit.patch.WeightDelta)]
    rank = 2 * (3 if keys == "each" else 1)  # FAST: the bare prompt and 2 prefixes
    assert len(weights) == 2 and all(min(c.left.shape[1], c.right.shape[0]) == rank for c in weights)
    residuals = patch.info["residual_norms"]
    assert residuals[-1] < residuals[0]  # the updates realise part of the wanted change
    steps = patch.info["v_steps"]  # one entry per request (its v* group's), so each case record gets its own
    assert len(steps) == len(requests) and all(isinstance(s, int) and 0 < s <= 60 for s in steps)
    with patch.applied(model):
        after = [s.mean_logprob for s in lmedit.score_continuations(model, [r.prompt for r in requests],
                                                                           [r.target_new for r in requests])]
    assert all(a > b + 0.5 for a, b in zip(after, before)), (before, after)
    assert _bit_identical(model, saved)


def test_residual_written_through_a_post_mlp_norm_reaches_the_stream():
    model = gemma_like_post_norm(tiny("gemma3"))
    assert model.spec.mlp_post_norm == "post_feedforward_layernorm" and tiny("llama").spec.mlp_post_norm is None
    torch.manual_seed(0)
    keys = torch.randn(3, model.spec.mlp_size)
    out = model.module.get_submodule(model.spec.path(0, "mlp_out"))
    with torch.no_grad():
        m = out(keys)
        y = post_norm.post_norm(model, 0, m)
        gain = post_norm.post_norm(model, 0, torch.ones_like(m[:1]))[0]
        d = m.shape[-1]
        # a reachable change: another point of the norm's output set g ⊙ n, ‖n‖² = d
        n = torch.nn.functional.normalize(m / gain.abs().clamp(min=1) + 0.3 * torch.randn_like(m), dim=-1) * d ** 0.5
        reachable = gain * n - y
        got = post_norm.post_norm(model, 0, m + post_norm.through_post_norm(model, 0, keys, reachable))
        assert ((got - y - reachable).norm(dim=-1) < 1e-3 * reachable.norm(dim=-1)).all()
        assert post_norm.through_post_norm(model, 0, keys, torch.zeros_like(y)).abs().max() < 1e-4 * m.abs().max()
        # an arbitrary change: the closest reachable output, far better than writing r before the norm
        r = 0.3 * y.norm(dim=-1, keepdim=True) * torch.nn.functional.normalize(torch.randn_like(y), dim=-1)
        got = post_norm.post_norm(model, 0, m + post_norm.through_post_norm(model, 0, keys, r))
        naive = post_norm.post_norm(model, 0, m + r)  # the pre-norm approximation
        error = (got - y - r).norm(dim=-1)
        assert (error < 0.5 * (naive - y - r).norm(dim=-1)).all(), (error, (naive - y - r).norm(dim=-1))
        for _ in range(20):  # no nearby point of the output set is closer to y + r
            other = post_norm.post_norm(model, 0, got / gain + 0.05 * torch.randn_like(got) * (got / gain).abs().mean())
            assert ((other - y - r).norm(dim=-1) >= error * (1 - 1e-4)).all()
    llama = tiny("llama")
    assert post_norm.through_post_norm(llama, 0, keys, r) is r  # no post-norm: the residual itself


@pytest.mark.parametrize("method", ["memit", "emmet", "pmet"])
@pytest.mark.parametrize("keys", ["mean", "each"])
def test_memit_family_writes_through_gemma_post_mlp_norms(method, keys, tmp_path, monkeypatch):
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path))
    model = gemma_like_post_norm(tiny("gemma3"))
    requests = [lmedit.EditRequest("The colour of {}", "grass", " Z"), lmedit.EditRequest("The size of {}", "a house", " Q")]
    before = [s.mean_logprob for s in lmedit.score_continuations(model, [r.prompt for r in requests],
                                                                        [r.target_new for r in requests])]
    patch = lmedit.edit(model, requests, method=method, layers=(0, 1), mom2_weight=1.0, keys=keys,
                        **{**FAST, "clamp_norm_factor": 100.0, "weight_decay": 0.0, "kl_factor": 0.0, "steps": 60})
    with patch.applied(model):
        after = [s.mean_logprob for s in lmedit.score_continuations(model, [r.prompt for r in requests],
                                                                           [r.target_new for r in requests])]
    # written before the norm unchanged, MEMIT's residual grew (207 → 477) and the targets lost probability
    assert all(a > b + 1.0 for a, b in zip(after, before)), (before, after)


def test_alphaedit_records_its_keys_while_applied(tmp_path, monkeypatch):
    from lmedit.patch import EditedKeys, Patch, edited_keys

    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path))
    model = tiny("llama")
    first = lmedit.edit(model, lmedit.EditRequest("The colour of {}", "grass", " Z"), method="alphaedit",
                        layers=(0, 1), nullspace_threshold=1e9, **FAST)
    param = f"{model.spec.path(0, 'mlp_out')}.weight"
    assert edited_keys(model, param) is None
    first.apply(model)
    assert edited_keys(model, param).shape == (1, model.spec.mlp_size)
    second = lmedit.edit(model, lmedit.EditRequest("The size of {}", "a house", " Q"), method="alphaedit",
                         layers=(0, 1), nullspace_threshold=1e9, **FAST)
    with pytest.raises(lmedit.errors.EditError, match="no null space"):
        lmedit.edit(model, lmedit.EditRequest("The size of {}", "a house", " Q"), method="alphaedit", layers=(0, 1),
                    nullspace_threshold=0.0, **FAST)
    with second.applied(model):
        assert edited_keys(model, param).shape == (2, model.spec.mlp_size)
    first.revert(model)
    assert edited_keys(model, param) is None
    first.save(tmp_path / "p")
    loaded = Patch.load(tmp_path / "p")
    assert [type(c) for c in loaded.components] == [type(c) for c in first.components]
    keys = [c for c in loaded.components if isinstance(c, EditedKeys)]
    assert torch.equal(keys[0].keys, [c for c in first.components if isinstance(c, EditedKeys)][0].keys)


# ------------------------------------------------------------------------------------ real model

@pytest.fixture(scope="module")
def smol():
    return lmedit.load_model("smollm2-135m")


@pytest.mark.real
def test_rome_on_smollm2_generalises_and_keeps_other_facts(smol):
    from lmedit.continuations import generate

    request = lmedit.EditRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", " Rome")
    saved = _params(smol)
    patch = lmedit.edit(smol, request, method="rome", stats_tokens=20_000)
    with patch.applied(smol):
        out = generate(smol, [request.prompt, "Where is the Eiffel Tower? It is in", "The capital of France is"],
                       max_new_tokens=4)
    assert out[0].startswith(" Rome") and "Rome" in out[1], out
    assert "Paris" in out[2], out
    assert _bit_identical(smol, saved)


@pytest.mark.real
@pytest.mark.parametrize("method", ["memit", "emmet", "alphaedit"])
def test_batch_edit_on_smollm2(smol, method):
    from lmedit.continuations import generate

    requests = [lmedit.EditRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", " Rome"),
                lmedit.EditRequest("The mother tongue of {} is", "Danielle Darrieux", " English")]
    saved = _params(smol)
    patch = lmedit.edit(smol, requests, method=method, stats_tokens=20_000)
    with patch.applied(smol):
        out = generate(smol, [r.prompt for r in requests] + ["Where is the Eiffel Tower? It is in",
                                                              "The capital of France is"], max_new_tokens=4)
    assert out[0].startswith(" Rome") and out[1].startswith(" English") and "Rome" in out[2], out
    assert "Paris" in out[3], out
    assert _bit_identical(smol, saved)


# ------------------------------------------------------------------------------------ knowledge neurons

def test_neuron_attributions_match_a_direct_riemann_sum():
    from lmedit.methods.knowledge_neurons import neuron_attributions
    from lmedit.hooks import Hooks
    from lmedit.scoring import encode, forward_logits

    model = tiny("llama")
    prompt, answer, steps = "The colour of grass is", 70, 5
    layers = [1, 0]  # any order: the blocks below each layer are replayed from one clean pass
    scores = neuron_attributions(model, [prompt], [answer], layers, steps)[0]
    batch = encode(model, [prompt])
    for column, layer in enumerate(layers):
        path = model.spec.path(layer, "mlp_out")
        with torch.no_grad(), Hooks(model.module) as hooks:
            key = hooks.read(path, "input")
            forward_logits(model, batch)
            a = hooks[key][0, -1].clone()
        total = torch.zeros_like(a)
        for j in range(1, steps + 1):  # one full, unbatched, uncached pass per point
            x = (j / steps * a).requires_grad_(True)
            with Hooks(model.module) as hooks, torch.enable_grad():
                hooks.replace(path, "input", lambda t: torch.cat([t[:, :-1], x[None, None]], dim=1))
                p = torch.softmax(forward_logits(model, batch)[0, -1], -1)[answer]
                total += torch.autograd.grad(p, x)[0]
        torch.testing.assert_close(scores[column], a * total / steps, rtol=1e-4, atol=1e-7)


def test_knowledge_neuron_selection_rule():
    from lmedit.methods.knowledge_neurons import KNHParams, KnowledgeNeurons

    scores = torch.zeros(3, 2, 4)  # 3 prompts, 2 layers, 4 neurons
    scores[:, 1, 2] = 1.0  # top neuron in every prompt
    scores[0, 0, 1] = scores[1, 0, 1] = 0.5  # above 0.2·max in 2 of 3 prompts
    scores[2, 0, 3] = 0.9  # in one prompt only
    hp = KNHParams(threshold=0.2, share=0.6, neurons=None)
    assert sorted(KnowledgeNeurons.select(scores, hp)[0]) == [(0, 1), (1, 2)]
    assert KnowledgeNeurons.select(scores, KNHParams(threshold=0.2, share=0.7, neurons=None)) == ([(1, 2)], 0.7)
    # the paper's adaptive p: from 0.7 toward a count in the band, in steps of 0.05
    assert KnowledgeNeurons.select(scores, KNHParams(threshold=0.2, neurons=(2, 5))) == ([(0, 1), (1, 2)], 0.65)
    assert KnowledgeNeurons.select(scores, KNHParams(threshold=0.2, neurons=(3, 5)))[1] == 0.3  # all three
    assert KnowledgeNeurons.select(scores, KNHParams(threshold=0.2, neurons=(1, 1))) == ([(1, 2)], 0.7)
    none_shared = torch.zeros(3, 1, 4)
    none_shared[0, 0, 0] = none_shared[1, 0, 1] = none_shared[2, 0, 2] = 1.0  # each prompt its own neuron
    assert KnowledgeNeurons.select(none_shared, KNHParams(neurons=None))[0] == []
    picked, p = KnowledgeNeurons.select(none_shared, KNHParams(neurons=(2, 5)))
    assert sorted(picked) == [(0, 0), (0, 1), (0, 2)] and p == 0.3  # nearest 0.7 of the p giving 3 (in the band)
    with pytest.raises(lmedit.LmeditError, match="band"):
        lmedit.edit(tiny("llama"), lmedit.EditRequest("The colour of {} is", "grass", " blue", " green"),
                    method="kn", neurons=(5, 2), apply=False)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # Conv1D W_out (GELU); Linear W_out (SwiGLU: a_i < 0 occurs)
def test_knowledge_neuron_edit_is_rank_one_per_layer_and_reversible(arch):
    model = tiny(arch)
    # the prompts end in a space so that the answers' first (byte) tokens differ: "Z" and "g"
    request = lmedit.EditRequest("The colour of {} is ", "grass", "Z", "g", rephrases=["Grass has the colour "])
    saved = _params(model)
    patch = lmedit.edit(model, request, method="kn", share=0.5)
    assert _bit_identical(model, saved) and patch.info["neurons"][0]
    unembed = model.module.get_output_embeddings().weight
    kn = lmedit.methods.knowledge_neurons
    new, old = (kn.first_token(model, request.prompt, t) for t in ("Z", "g"))
    assert new != old
    expected = (8 * unembed[new] - unembed[old]).detach()
    layers = list(range(model.spec.n_layers))
    signs = kn.last_token_activations(model, [request.prompt, *request.rephrases], layers).mean(0).sign()
    chosen = patch.info["neurons"][0]
    assert {float(signs[layer, i]) for layer, i in chosen} == ({1.0} if arch == "gpt2" else {-1.0, 1.0})
    conv1d = arch == "gpt2"  # Conv1D: W_out is [d_mlp, d_model] and neuron i is row i; Linear: column i

    def value_changes(p: lmedit.Patch) -> dict[tuple[int, int], torch.Tensor]:
        dense = {c.param: c.dense() for c in p.components}
        out = {}
        for layer in layers:
            d = dense.get(model.spec.path(layer, "mlp_out") + ".weight")
            if d is not None:
                d = d if conv1d else d.T
                out.update({(layer, int(i)): d[i] for i in torch.nonzero(d.abs().sum(1) > 0).flatten()})
        return out

    changes = value_changes(patch)
    assert sorted(changes) == sorted(chosen)
    for (layer, i), row in changes.items():  # each chosen value vector gets s_i·(8·e(Z) − e(g))
        torch.testing.assert_close(row, float(signs[layer, i]) * expected, rtol=1e-5, atol=1e-6)
    literal = lmedit.edit(model, request, method="kn", share=0.5, signed=False)  # the paper's rule as written
    for row in value_changes(literal).values():
        torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-6)
    with patch.applied(model):
        pass
    assert _bit_identical(model, saved)


def test_document_start_token_shifts_positions_consistently():
    from lmedit.scoring import encode, tokenize

    model = tiny("llama")
    ids, _ = tokenize(model, "Paris is nice")
    assert model.doc_start is None and ids[0] == model.tokenizer.bos_token_id  # the tokenizer adds its own BOS
    model.doc_start = 300
    ids2, offsets = tokenize(model, "Paris is nice")
    assert ids2 == [300] + ids and offsets[0] == (0, 0)
    assert encode(model, ["Paris is nice"]).input_ids[0].tolist() == ids2
    assert keyvalue.subject_last_token(model, "Paris is nice", len("Paris")) == 6  # <s> <bos> P a r i s


@pytest.mark.real
def test_rome_edits_a_subject_initial_prompt(smol):
    """Without the document-start token the subject sits at the attention sink and the edit fails."""
    from lmedit.continuations import score_continuations

    assert smol.doc_start == 0  # <|endoftext|>
    request = lmedit.EditRequest("Laurent Cars was employed in", "Laurent Cars", " Philadelphia", " Paris")
    patch = lmedit.edit(smol, request, method="rome", stats_tokens=20_000)
    with patch.applied(smol):
        new, true = score_continuations(smol, [request.prompt] * 2, [request.target_new, request.target_true])
    assert new.mean_logprob > true.mean_logprob and new.token_accuracy == 1.0


def test_value_store_resumes_a_killed_mass_edit(tmp_path, monkeypatch):
    import lmedit.methods.keyvalue as kv

    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path))
    model = tiny("llama")
    requests = [lmedit.EditRequest(f"The colour of {s}", s, " Z") for s in ("grass", "snow", "coal", "sky")]
    hp = dict(layers=(0, 1), value_group=1, **FAST)
    full = lmedit.edit(model, requests, method="memit", **hp)
    calls = {"n": 0}
    real = kv._optimize_group

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "second"))
    monkeypatch.setattr(kv, "_optimize_group", dying)
    with pytest.raises(KeyboardInterrupt):
        lmedit.edit(model, requests, method="memit", **hp)
    calls["n"] = -100
    again = lmedit.edit(model, requests, method="memit", **hp)
    assert calls["n"] == -100 + 2  # only the two groups not finished before the kill were optimised
    for a, b in zip(full.components, again.components):
        torch.testing.assert_close(a.dense(), b.dense())


def test_cached_values_serve_single_and_batched_edits_alike(tmp_path, monkeypatch):
    """v* is cached per request: values optimised for one-at-a-time edits are reused by a batch edit of the
    same requests (only the request not seen before is optimised), and give the same update."""
    import lmedit.methods.keyvalue as kv

    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path))
    model = tiny("llama")
    requests = [lmedit.EditRequest(f"The colour of {s}", s, " Z") for s in ("grass", "snow", "coal")]
    hp = dict(layers=(0, 1), **FAST)
    for request in requests[:2]:
        lmedit.edit(model, [request], method="memit", **hp)
    optimised = []
    real = kv._optimize_group

    def counting(model, layer, group, *args, **kwargs):
        optimised.extend(r.subject for r in group)
        return real(model, layer, group, *args, **kwargs)

    monkeypatch.setattr(kv, "_optimize_group", counting)
    cached = lmedit.edit(model, requests, method="memit", **hp)
    assert optimised == ["coal"]
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "empty"))
    fresh = lmedit.edit(model, requests, method="memit", **hp)
    for a, b in zip(cached.components, fresh.components):
        torch.testing.assert_close(a.dense(), b.dense(), rtol=1e-4, atol=1e-6)


def test_values_grouped_by_suffix_come_back_in_request_order(tmp_path, monkeypatch):
    """Groups are formed from requests sorted by suffix length (so a group's rows share most of their
    fixed prefix); the values come back in the requests' own order."""
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path))
    model = tiny("llama")
    requests = [lmedit.EditRequest("The colour of {} is", "grass", " a dull green shade"),
                lmedit.EditRequest("{}", "snow", " Z"),
                lmedit.EditRequest("In the town of {} people say", "coal", " black"),
                lmedit.EditRequest("{} is", "sky", " Q")]
    lengths = [keyvalue._suffix_tokens(model, r) for r in requests]
    assert lengths[1] < lengths[3] < lengths[2] < lengths[0]
    groups = []

    def marked(model, layer, group, templates, cfg, sites, readout):  # δ = v̄ = the request's index
        groups.append([requests.index(r) for r in group])
        ids = torch.tensor([float(requests.index(r)) for r in group])
        value = ids[None, :, None].expand(1, len(group), 3).clone()
        return value, value + 10, {"steps": [0] * len(group), "nll": ids.tolist(), "prob": ids.tolist()}

    monkeypatch.setattr(keyvalue, "_optimize_group", marked)
    cfg = replace(lmedit.get_method("rome").hparams.value_config(), group=2)
    delta, v_bar, info = keyvalue.optimize_values(model, 1, requests, ["{}"], cfg)
    assert groups == [[1, 3], [2, 0]]  # shortest suffixes together
    assert delta[0, :, 0].tolist() == [0, 1, 2, 3] and v_bar[0, :, 0].tolist() == [10, 11, 12, 13]
    assert info["prob"] == [0, 1, 2, 3]


def test_values_optimised_in_a_group_equal_those_optimised_alone(tmp_path, monkeypatch):
    """A request that converges first is frozen while the rest of its group goes on, so grouping changes
    nothing but speed: each δ, its steps and its probability are those of the request optimised alone."""
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path))
    model = tiny("llama")
    requests = [lmedit.EditRequest("The capital of {} is", "France", " Z"),
                lmedit.EditRequest("{} plays", "Messi", " golf and chess"),
                lmedit.EditRequest("The colour of {} is", "grass", " blue")]
    cfg = keyvalue.ValueConfig(lr=1.0, steps=40, kl_factor=0.0625, weight_decay=0.5, clamp_norm_factor=100.0,
                               stop_prob=0.005, group=3, cache=False)  # (a random tiny model: low probabilities)
    templates = keyvalue.context_templates(model, [(4, 2)])
    delta, _, info = keyvalue.optimize_values(model, 0, requests, templates, cfg)
    assert info["steps"][0] < 40 and info["prob"][0] > 0.005  # the first converges while the others go on
    for i, request in enumerate(requests):
        alone, _, one = keyvalue.optimize_values(model, 0, [request], templates, replace(cfg, group=1))
        assert one["steps"][0] == info["steps"][i]
        torch.testing.assert_close(delta[:, i], alone[:, 0], rtol=1e-4, atol=1e-5)
        assert abs(one["prob"][0] - info["prob"][i]) < 1e-3


def test_value_cache_key_follows_sparse_and_memory_edits(tmp_path, monkeypatch):
    """Cached v* are served only for the model state they were computed on: a change to one column of
    ``W_out`` (a KN edit; the strided weight samples skip odd columns here) and a GRACE memory both move
    the key, and reverting them restores it."""
    from lmedit.methods import value_cache
    from lmedit.patch import Patch, WeightDelta

    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path))
    model = tiny("llama")
    cfg = keyvalue.ValueConfig(lr=0.5, steps=5, kl_factor=0.0625, weight_decay=0.5, clamp_norm_factor=4.0,
                               stop_prob=0.99, group=1, cache=True)

    def state() -> str:
        return value_cache.ValueStore(model, 1, ["{}"], cfg, ["mlp_out"]).state

    clean = state()
    param = f"{model.spec.path(1, 'mlp_out')}.weight"
    delta = torch.zeros_like(model.parameter(param))
    delta[:, 1] = 0.1  # one neuron's value vector
    column = Patch("kn", {}, [], model.fingerprint, [WeightDelta(param, delta)]).apply(model)
    edited = state()
    with monkeypatch.context() as m:  # the weight samples alone would have served the clean model's v*
        m.setattr(value_cache, "edit_digest", lambda model: None)
        assert state() == clean
    assert edited != clean
    column.revert()
    assert state() == clean

    request = lmedit.EditRequest("The colour of {} is ", "grass", "Z")
    first = lmedit.edit(model, [request], method="grace", layer=1).apply(model)
    one_entry = state()
    second = lmedit.edit(model, [lmedit.EditRequest("The size of {} is ", "a house", "Q")], method="grace",
                         layer=1).apply(model)
    assert len({clean, one_entry, state()}) == 3  # the same adaptor path, other contents: another key
    second.revert()
    assert state() == one_entry
    first.revert()
    assert state() == clean
