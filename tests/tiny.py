"""Tiny randomly initialised causal LMs of many architectures, built from configs (no download)."""
from __future__ import annotations

import torch
import transformers as tf

VOCAB = 320  # 256 byte tokens + specials, rounded up
# A small corpus for statistics on tiny models (second moments, Fisher estimates).
CORPUS = [f"Sentence {i}: the {w} of {v} is {i * 7 % 13} and it was seen in {w}town." for i, (w, v) in
          enumerate([("colour", "grass"), ("size", "a house"), ("speed", "light"), ("name", "the river")] * 12)]

# Common small sizes: d_model 64, 2 layers, 4 heads, d_mlp 128 (so shapes identify roles).
_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)

CONFIGS = {
    "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=VOCAB, n_positions=128,
                                  bos_token_id=0, eos_token_id=0),
    "gptj": lambda: tf.GPTJConfig(n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=VOCAB, n_positions=128, rotary_dim=8,
                                  bos_token_id=0, eos_token_id=0),
    "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         vocab_size=VOCAB, max_position_embeddings=128),
    "opt": lambda: tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                                max_position_embeddings=128, word_embed_proj_dim=64),
    "llama": lambda: tf.LlamaConfig(**_LLAMA_LIKE),
    "mistral": lambda: tf.MistralConfig(**_LLAMA_LIKE),
    "qwen2": lambda: tf.Qwen2Config(**_LLAMA_LIKE),
    "qwen3": lambda: tf.Qwen3Config(**_LLAMA_LIKE, head_dim=16),
    "gemma": lambda: tf.GemmaConfig(**_LLAMA_LIKE, head_dim=16),
    "gemma2": lambda: tf.Gemma2Config(**_LLAMA_LIKE, head_dim=16),
    "gemma3": lambda: tf.Gemma3TextConfig(**_LLAMA_LIKE, head_dim=16),
    "phi3": lambda: tf.Phi3Config(**_LLAMA_LIKE, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "falcon": lambda: tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                                      ffn_hidden_size=128, new_decoder_architecture=False, multi_query=True),
}


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random ``*ForCausalLM`` of the given architecture, in eval mode, float32."""
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    # Wider initialisation than the default 0.02, so that the random model's logits are not near-uniform
    # and a small edit can make it confident (the default leaves every log-prob near -log V).
    config.initializer_range = 0.2
    model = tf.AutoModelForCausalLM.from_config(config)
    return model.eval()


def tiny_tokenizer():
    """A byte-level tokenizer (one token per byte, plus <bos>/<eos>/<pad>) built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<bos>", "<eos>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny(arch: str = "llama", seed: int = 0):
    """A ``lmedit.Model`` wrapping a tiny random model of ``arch`` and the byte tokenizer."""
    from lmedit.models import Model

    return Model.from_hf(tiny_model(arch, seed), tiny_tokenizer(), name=f"tiny-{arch}")


def params(model) -> dict[str, torch.Tensor]:
    """A copy of every parameter of a ``lmedit.Model``, by name (to check later that nothing changed)."""
    return {n: p.detach().clone() for n, p in model.module.named_parameters()}


def bit_identical(model, saved: dict[str, torch.Tensor]) -> bool:
    """Whether every parameter equals its copy in ``saved`` bit for bit."""
    return all(torch.equal(saved[n], p) for n, p in model.module.named_parameters())


def gemma_like_post_norm(model, scale=30.0):
    """Give the tiny Gemma-3 post-MLP norms Gemma-3-270M-like gains (|1 + w| up to hundreds)."""
    torch.manual_seed(1)
    for layer in range(model.spec.n_layers):
        norm = model.module.get_submodule(f"{model.spec.block(layer)}.{model.spec.mlp_post_norm}")
        norm.weight.data = (torch.randn_like(norm.weight) * scale).to(norm.weight.dtype)
    return model
