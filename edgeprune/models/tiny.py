"""Tiny random-initialised models of each supported family, for fast tests (never a stand-in for real models)."""

from __future__ import annotations

from edgeprune.models.loader import LoadedModel

TINY_CONFIG = dict(
    hidden_size=96, intermediate_size=128, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
)


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus <s>, </s>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for tok in ("<s>", "</s>", "<pad>"):
        vocab[tok] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


# per-family extras: each family's quirks switched on, so the tiny model exercises them (HF model_type, overrides)
TINY_FAMILIES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {"use_sliding_window": False}),
    # Llama 3: llama3 RoPE scaling (a config setting of the llama family)
    "llama3": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 64}}),
    "qwen3": ("qwen3", {"use_sliding_window": False}),
    # Gemma 3: head_dim (24) is not hidden/heads (16), sliding-window layers with a small window, GeGLU,
    # (1 + w) norms, scaled embeddings, q/k norms
    "gemma3_text": ("gemma3_text", {"head_dim": 24, "query_pre_attn_scalar": 24, "sliding_window": 8,
                                    "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}),
    # Phi-3: fused qkv_proj / gate_up_proj; partial rotary as Phi-4-mini
    "phi3": ("phi3", {"partial_rotary_factor": 0.75}),
    "glm": ("glm", {}),
    "glm4": ("glm4", {}),
}


def build_tiny(family: str = "llama", seed: int = 0, *, device: str = "cpu", dtype: str = "float32",
               **overrides) -> LoadedModel:
    """A tiny model, initialised in float32 (the same weights for every dtype) and then placed."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgeprune.adapters import get_adapter

    tok = byte_tokenizer()
    model_type, extra = TINY_FAMILIES[family]
    kw = dict(TINY_CONFIG, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    kw.update(extra)
    kw.update(overrides)
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # random init gives near-uniform outputs; larger weights make units differ, as in a trained model
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    if (device, dtype) != ("cpu", "float32"):
        from edgeprune.models.placement import place

        model = place(model, device, dtype)
    model.eval()
    return LoadedModel(model, tok, get_adapter(model), f"tiny-{family}", f"tiny-{family}")
