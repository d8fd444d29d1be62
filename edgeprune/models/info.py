"""Architecture summary and parameter counts, split the way compression cares about."""

from __future__ import annotations


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def layer_param_counts(layer) -> dict[str, int]:
    """Parameters of one decoder layer: attention, MLP and norms (a removed block counts its bias only)."""
    attn = _numel(layer.attention)
    mlp = _numel(layer.mlp)
    n = layer.norms()  # q/k norms live inside the attention block and count there
    norms = sum(_numel(m) for m in (n.attention_input, n.mlp_input, n.attention_output, n.mlp_output))
    return {"attention": attn, "mlp": mlp, "norms": norms, "total": attn + mlp + norms}


def param_counts(adapter) -> dict[str, int]:
    model = adapter.model
    embed = _numel(adapter.embed_tokens)
    tied = adapter.lm_head.weight.data_ptr() == adapter.embed_tokens.weight.data_ptr()
    head = 0 if tied else _numel(adapter.lm_head)
    per_layer = [layer_param_counts(layer) for layer in adapter.layers]
    attn = sum(c["attention"] for c in per_layer)
    mlp = sum(c["mlp"] for c in per_layer)
    norms = sum(c["norms"] for c in per_layer) + _numel(adapter.final_norm)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {
        "embeddings": embed,
        "lm_head": head,
        "attention": attn,
        "mlp": mlp,
        "norms": norms,
        "decoder_layers": attn + mlp + sum(c["norms"] for c in per_layer),
        "total": total,
        "tied_embeddings": int(tied),
    }


def model_info(lm) -> dict:
    adapter = lm.adapter
    cfg = adapter.config
    layers = []
    for layer in adapter.layers:
        s = layer.shape
        layers.append({"index": layer.index, **s.to_dict(), **layer_param_counts(layer)})
    shapes = adapter.shapes()
    return {
        "model": lm.spec,
        "source": lm.source,
        "family": adapter.family,
        "model_type": cfg.model_type,
        "num_layers": len(shapes),
        "hidden_size": adapter.hidden_size,
        "head_dim": adapter.head_dim,
        "num_heads": max((s.num_heads for s in shapes), default=0),
        "num_kv_heads": max((s.num_kv_heads for s in shapes), default=0),
        "intermediate_size": max((s.intermediate_size for s in shapes), default=0),
        "uniform": len({(s.num_heads, s.num_kv_heads, s.intermediate_size) for s in shapes}) <= 1,
        "vocab_size": cfg.vocab_size,
        "params": param_counts(adapter),
        "layers": layers,
    }
