"""Steering vectors (CAA) on tiny random models: the definition, and patches that revert exactly."""
from __future__ import annotations

import pytest
import torch

from lmedit.adaptors import adaptors
from lmedit.hooks import Hooks
from lmedit.patch import Patch
from lmedit.scoring import encode, forward_logits
from lmedit.steer import behaviour_score, steer, steering_vectors
from tiny import tiny

POS = ["I love it", "Wonderful day"]
NEG = ["I hate it today", "Awful"]


def test_steering_vector_is_the_mean_difference_at_the_last_token():
    model = tiny("llama")
    vectors = steering_vectors(model, POS, NEG, layers=[0, 1])

    def last_state(text, layer):  # one unpadded text at a time, by hand
        with Hooks(model.module) as hooks:
            key = hooks.read(model.spec.block(layer), "output")
            model.module(input_ids=torch.tensor([model.tokenizer(text)["input_ids"]]))
            return hooks[key][0, -1].double()

    for layer in (0, 1):
        expected = sum(last_state(t, layer) for t in POS) / 2 - sum(last_state(t, layer) for t in NEG) / 2
        torch.testing.assert_close(vectors[layer].double(), expected, rtol=1e-4, atol=1e-5)


def test_steering_refuses_a_string_of_examples_and_vectors_of_the_wrong_width():
    from lmedit.errors import RequestError
    from lmedit.steer import train_lm_steer

    model = tiny("llama")
    with pytest.raises(RequestError, match="positive examples must be a list of strings"):
        steering_vectors(model, "I love it", ["I hate it"])  # not its 9 characters
    with pytest.raises(RequestError, match="negative examples must be a list of strings"):
        train_lm_steer(model, ["I love it"], "I hate it")
    with pytest.raises(RequestError, match=r"layer 0 must be a tensor of shape \(64,\), got \(3,\)"):
        steer(model, {0: torch.zeros(3)})


def test_steering_patch_adds_the_vector_and_reverts_exactly(tmp_path):
    model = tiny("gpt2")
    vectors = steering_vectors(model, POS, NEG, layers=[1])
    batch = encode(model, ["The weather is"])
    base = forward_logits(model, batch)
    patch = steer(model, vectors, multiplier=2.0)
    with Hooks(model.module) as hooks:
        key = hooks.read(model.spec.block(1), "output")
        forward_logits(model, batch)
        plain = hooks[key].clone()
    with patch.applied(model), Hooks(model.module) as hooks:
        key = hooks.read(model.spec.block(1), "output")
        steered_logits = forward_logits(model, batch)
        torch.testing.assert_close(hooks[key], plain + 2.0 * vectors[1], rtol=1e-5, atol=1e-5)
    assert not torch.equal(steered_logits, base)
    assert torch.equal(forward_logits(model, batch), base) and not adaptors(model)
    patch.save(tmp_path / "s")
    with Patch.load(tmp_path / "s").applied(model):
        torch.testing.assert_close(forward_logits(model, batch), steered_logits)
    # steering in both directions moves a behaviour score in opposite directions
    prompts = ["The weather is", "My day was"]
    score = behaviour_score(model, prompts, [" love"], [" hate"])
    with steer(model, vectors, 4.0).applied(model):
        up = behaviour_score(model, prompts, [" love"], [" hate"])
    with steer(model, vectors, -4.0).applied(model):
        down = behaviour_score(model, prompts, [" love"], [" hate"])
    assert down < score < up or up < score < down


def test_lm_steer_fits_both_directions_and_patches_exactly(tmp_path):
    from lmedit.steer import train_lm_steer

    model = tiny("llama")
    steer_ = train_lm_steer(model, ["aaaa bbbb aaaa", "aaa bbb aaa"], ["zzzz yyyy zzzz", "zzz yyy zzz"], rank=4, steps=60,
                            lr=5e-2)
    assert steer_.info["nll_end"] < steer_.info["nll_start"]
    batch = encode(model, ["aaaa bbbb"])
    base = forward_logits(model, batch)
    h = {}
    with Hooks(model.module) as hooks:
        key = hooks.read(model.spec.unembed, "input")
        forward_logits(model, batch)
        h = hooks[key]
    W_out = model.module.get_output_embeddings().weight
    for eps in (1.0, -1.0):
        patch = steer_.patch(model, eps)
        with patch.applied(model):
            got = forward_logits(model, batch)
        expected = (h + eps * (h @ steer_.B) @ steer_.A.T) @ W_out.T  # logit_v = e_vᵀ(h + εWᵀh)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(forward_logits(model, batch), base) and not adaptors(model)
    # +ε makes the positive texts likelier than −ε does
    from lmedit.continuations import score_continuations

    def nll(eps):
        with steer_.patch(model, eps).applied(model):
            return -score_continuations(model, ["aaaa"], [" bbbb aaaa"])[0].mean_logprob

    assert nll(1.0) < nll(-1.0)
    steer_.patch(model, 1.0).save(tmp_path / "lm")
    with Patch.load(tmp_path / "lm").applied(model):
        torch.testing.assert_close(forward_logits(model, batch), (h + (h @ steer_.B) @ steer_.A.T) @ W_out.T,
                                   rtol=1e-4, atol=1e-4)


def test_detox_helpers_pair_refusals_with_compliances_and_score_them():
    from lmedit.steer import COMPLIANCES, REFUSALS, detox_pairs, detox_report, refusal_rate

    assert refusal_rate(["I'm sorry, I cannot do that.", "Sure! Step one: ...", "That would be ILLEGAL."]) == pytest.approx(2 / 3)
    with pytest.raises(Exception, match="at least one"):
        detox_report(tiny("llama"), [], ["x"])
    positive, negative = detox_pairs(["How do I pick a lock?", "Insult my neighbour."])
    assert positive == ["How do I pick a lock?" + REFUSALS[0], "Insult my neighbour." + REFUSALS[1]]
    assert negative == ["How do I pick a lock?" + COMPLIANCES[0], "Insult my neighbour." + COMPLIANCES[1]]
    model = tiny("llama")
    report = detox_report(model, ["How do I pick a lock?"], ["Tell me a story."], max_new_tokens=5,
                          proxy=lambda texts: 0.25)  # the proxy is swappable
    assert report["safe_rate"] == 0.25 and report["refusal_logodds"] == report["refusal_logodds"]  # not NaN
