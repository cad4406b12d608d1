"""Inspection tools on tiny random models: causal tracing's invariants."""
from __future__ import annotations

import pytest
import torch

from lmedit.errors import RequestError
from lmedit.inspect import causal_trace, subject_token_range, suggest_layers
from tiny import tiny

PROMPT, SUBJECT = "The colour of grass is", "grass"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_causal_trace_invariants(arch, tmp_path):
    model = tiny(arch)
    trace = causal_trace(model, PROMPT, SUBJECT, samples=4, seed=1)
    n_tok = len(model.tokenizer(PROMPT)["input_ids"])
    assert trace.scores.shape == (n_tok, model.spec.n_layers)
    start, end = trace.subject
    assert "".join(trace.tokens[start:end]) == "grass"
    # the final block's output at the last token determines the logits: restoring it restores P exactly
    assert trace.scores[-1, -1].item() == pytest.approx(trace.clean, rel=1e-4, abs=1e-6)
    # states before the subject never see the noise: restoring them changes nothing
    torch.testing.assert_close(trace.scores[:start], torch.full((start, model.spec.n_layers), trace.corrupted),
                               rtol=1e-4, atol=1e-6)
    assert trace.corrupted != pytest.approx(trace.clean)  # the noise does corrupt
    trace.plot(tmp_path / "trace.png")
    assert (tmp_path / "trace.png").stat().st_size > 1000


def test_causal_trace_kinds_and_layer_suggestion():
    model = tiny("llama")
    mlp = causal_trace(model, PROMPT, SUBJECT, " b", kind="mlp", samples=3, window=2)
    assert mlp.kind == "mlp" and mlp.answer == " b"
    found = suggest_layers(model, PROMPT, SUBJECT, samples=3, window=2)
    assert found["rome_layer"] in (0, 1) and found["memit_layers"][-1] == found["rome_layer"]
    assert len(found["effect_by_layer"]) == model.spec.n_layers


def test_trace_errors():
    model = tiny("llama")
    with pytest.raises(RequestError, match="does not occur"):
        subject_token_range(model, PROMPT, "tree")
    with pytest.raises(RequestError, match="kind"):
        causal_trace(model, PROMPT, SUBJECT, kind="neurons")  # type: ignore[arg-type]


def test_inspection_refuses_a_bare_module_an_empty_prompt_and_zero_steps_in_one_line():
    from lmedit.inspect import head_attribution, logit_lens, neuron_attribution

    model = tiny("llama")
    with pytest.raises(RequestError, match="wrap it with lmedit.Model.from_hf"):
        logit_lens(model.module, PROMPT)
    with pytest.raises(RequestError, match="wrap it with lmedit.Model.from_hf"):
        suggest_layers(model.module, PROMPT, SUBJECT)
    with pytest.raises(RequestError, match="non-empty text"):
        head_attribution(model, "  ")
    with pytest.raises(RequestError, match="at least 1 step"):
        neuron_attribution(model, PROMPT, steps=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_logit_lens_last_layer_is_the_model_output(arch, tmp_path):
    from lmedit.inspect import logit_lens
    from lmedit.scoring import encode, forward_logits

    model = tiny(arch)
    lens = logit_lens(model, PROMPT, k=3)
    probs = torch.softmax(forward_logits(model, encode(model, [PROMPT]))[0].float(), -1)
    top_p, top_i = probs.topk(3, -1)
    assert torch.equal(lens.top_ids[-1], top_i)
    torch.testing.assert_close(lens.top_probs[-1], top_p, rtol=1e-4, atol=1e-6)
    assert lens.final_prob.shape == (model.spec.n_layers, len(lens.tokens))
    lens.plot(tmp_path / "lens.png")
    assert (tmp_path / "lens.png").stat().st_size > 1000 and len(lens.to_dict()["top"]) == model.spec.n_layers


def test_integrated_gradients_are_complete():
    """Σ_i IG_i over one layer = P(y | x) − P(y | x, that layer's neurons zeroed), up to the Riemann error."""
    from lmedit.hooks import Hooks
    from lmedit.inspect import neuron_attribution
    from lmedit.scoring import encode, forward_logits

    model = tiny("llama")
    result = neuron_attribution(model, PROMPT, steps=200)
    answer_id = int(forward_logits(model, encode(model, [PROMPT]), last=1)[0, -1].argmax())
    p_clean = torch.softmax(forward_logits(model, encode(model, [PROMPT]), last=1)[0, -1].float(), -1)[answer_id]
    for layer in range(model.spec.n_layers):
        with Hooks(model.module) as hooks:
            hooks.replace(model.spec.path(layer, "mlp_out"), "input",
                          lambda t: torch.cat([t[:, :-1], torch.zeros_like(t[:, -1:])], dim=1))
            p_zero = torch.softmax(forward_logits(model, encode(model, [PROMPT]), last=1)[0, -1].float(), -1)[answer_id]
        assert float(result.by_layer()[layer]) == pytest.approx(float((p_clean - p_zero).detach()), abs=2e-3)
    assert len(result.top(5)) == 5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_head_attribution_is_gradient_times_activation(arch, tmp_path):
    from lmedit.inspect import head_attribution

    model = tiny(arch)
    circuit = head_attribution(model, PROMPT)
    n_tok = len(circuit.tokens)
    assert circuit.scores.shape == (2, 4) and circuit.attention.shape == (2, 4, n_tok)
    torch.testing.assert_close(circuit.attention.sum(-1), torch.ones(2, 4), rtol=1e-4, atol=1e-4)  # rows of softmax
    # first-order check: removing the top head's output at the last token changes log P(answer) by ≈ its score
    layer, head, score = circuit.top_heads(1)[0]
    from lmedit.hooks import Hooks
    from lmedit.scoring import encode, forward_logits

    batch = encode(model, [PROMPT])
    answer_id = int(forward_logits(model, batch, last=1)[0, -1].argmax())

    def logp():
        with torch.no_grad():
            return float(torch.log_softmax(forward_logits(model, batch, last=1)[0, -1].float(), -1)[answer_id])

    def scale(alpha):
        def fn(t):
            t = t.clone()
            width = t.shape[-1] // 4
            t[:, -1, head * width:(head + 1) * width] *= alpha
            return t
        return fn

    eps = 1e-3
    with Hooks(model.module) as hooks:
        hooks.replace(model.spec.path(layer, "attn_out"), "input", scale(1 - eps))
        shrunk = logp()
    assert (logp() - shrunk) / eps == pytest.approx(score, rel=0.05, abs=1e-4)  # d/dα at α = 1
    circuit.plot(tmp_path / "circuit.png")
    assert (tmp_path / "circuit.png").stat().st_size > 1000 and circuit.to_dict()["top_heads"]


def test_inspection_commands_print_json_and_write_their_pictures(tmp_path):
    import json

    from typer.testing import CliRunner

    from lmedit.cli import app
    from tiny import tiny_model, tiny_tokenizer

    tiny_model("llama").save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    runner = CliRunner()
    for command, picture in [("lens", "heatmap"), ("attribute", "chart"), ("circuit", "graph")]:
        png = tmp_path / f"{command}.png"
        out = runner.invoke(app, [command, "--prompt", PROMPT, "--model", str(tmp_path / "m"), "--plot", str(png)])
        assert out.exit_code == 0, out.output
        assert f"{picture} written to {png}" in out.output and png.stat().st_size > 1000
        data = runner.invoke(app, [command, "--prompt", PROMPT, "--model", str(tmp_path / "m"), "--json"])
        assert data.exit_code == 0 and isinstance(json.loads(data.output), dict), data.output
