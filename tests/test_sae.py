"""Sparse autoencoders on a tiny random model: the architecture's invariants and a training run."""
from __future__ import annotations

import torch

from lmedit.sae import SAEConfig, SparseAutoencoder, evaluate_sae, feature_steering, top_snippets, train_sae
from tiny import tiny

TEXTS = [f"Rivers {i} flow into the sea near town {i * 3}; boats {i % 4} sail there." for i in range(40)]


def test_sae_definition_and_decoder_norms():
    sae = SparseAutoencoder(6, 12)
    x = torch.randn(5, 6)
    f = torch.relu((x - sae.b_d) @ sae.W_e.T + sae.b_e)
    x_hat, got = sae(x)
    torch.testing.assert_close(got, f)
    torch.testing.assert_close(x_hat, f @ sae.W_d.T + sae.b_d)
    torch.testing.assert_close(sae.W_d.norm(dim=0), torch.ones(12))
    sae.W_d.grad = torch.randn_like(sae.W_d)
    sae.project_out_radial_gradient()
    assert float((sae.W_d.grad * sae.W_d.detach()).sum(0).abs().max()) < 1e-5  # no gradient along the columns


def test_train_sae_reconstructs_and_reports(tmp_path):
    model = tiny("llama")
    config = SAEConfig(layer=1, expansion=4, l1=0.5, lr=3e-3, tokens=30_000, batch_tokens=256, dead_after=5_000)
    sae, info = train_sae(model, TEXTS, config, progress=False)
    assert info["tokens"] >= 30_000 and info["tokens_per_second"] > 0
    report = evaluate_sae(model, sae, 1, TEXTS[:10])
    assert report["explained_variance"] > 0.5 and 0 < report["l0"] < 4 * 64
    # a random model's loss is no better than with the layer zeroed, so "recovered" is undefined here;
    # splicing the reconstruction in must still leave the LM's loss nearly unchanged
    assert abs(report["loss_sae"] - report["loss_clean"]) < 0.05 * report["loss_clean"]
    assert torch.allclose(sae.W_d.norm(dim=0), torch.ones(sae.W_d.shape[1]), atol=1e-4)
    snippets = top_snippets(model, sae, 1, TEXTS[:10], [0, 1], k=3)
    assert set(snippets) == {0, 1} and all("«" in s for entries in snippets.values() for _, s in entries)
    with feature_steering(model, sae, 1, 0, 3.0).applied(model):
        pass


def test_cached_activations_train_the_same_sae_as_streaming(monkeypatch):
    """The in-memory activation cache changes the cost of later passes, not the result."""
    import lmedit.sae as sae_module

    model = tiny("llama")
    calls = []
    original = sae_module.activations

    def counted(*args, **kwargs):
        calls.append(1)
        yield from original(*args, **kwargs)

    monkeypatch.setattr(sae_module, "activations", counted)
    base = dict(layer=1, expansion=2, l1=0.5, lr=3e-3, tokens=6_000, batch_tokens=128)
    cached, _ = train_sae(model, TEXTS[:10], SAEConfig(**base), progress=False)
    passes_cached = len(calls)
    streamed, _ = train_sae(model, TEXTS[:10], SAEConfig(**base, cache_tokens=0), progress=False)
    assert passes_cached == 1 and len(calls) - passes_cached > 1  # the corpus is cycled several times
    torch.testing.assert_close(cached.W_e, streamed.W_e)
    torch.testing.assert_close(cached.W_d, streamed.W_d)
