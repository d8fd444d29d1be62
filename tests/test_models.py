import json

import pytest
import torch

from edgeprune.adapters import get_adapter
from edgeprune.errors import EdgePruneError
from edgeprune.models import load
from edgeprune.models.info import model_info, param_counts


def test_adapter_exposes_layout(tiny):
    a = tiny.adapter
    assert len(a.layers) == 3 and a.head_dim == 16
    layer = a.layers[0]
    assert (layer.num_heads, layer.num_kv_heads, layer.group_size, layer.intermediate_size) == (6, 2, 3, 128)
    a_ = layer.attention_projections()
    assert a_.q.out_features == 96 and a_.k.out_features == 32 and a_.o.in_features == 96
    assert (a_.q.bias is not None) == layer.biases.q == (a.family == "qwen2")


def test_param_counts_add_up(tiny):
    p = param_counts(tiny.adapter)
    assert p["total"] == sum(x.numel() for x in tiny.model.parameters())
    assert p["embeddings"] + p["lm_head"] + p["attention"] + p["mlp"] + p["norms"] == p["total"]


def test_unsupported_architecture_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(EdgePruneError, match="supported: llama, mistral, qwen2"):
        get_adapter(m)


def test_load_errors(tmp_path):
    with pytest.raises(EdgePruneError, match="not found"):
        load(str(tmp_path / "missing"))
    with pytest.raises(EdgePruneError, match="no config.json"):
        load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(EdgePruneError, match="unsupported architecture 'gpt2'"):
        load(str(tmp_path))
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(EdgePruneError, match="not a readable GGUF"):
        load(str(bad))


def test_corrupt_weights_are_a_clear_error(tmp_path):
    from edgeprune.models.tiny import build_tiny

    lm = build_tiny("llama")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(EdgePruneError, match="cannot load model"):
        load(str(tmp_path))


def test_local_hf_directory_roundtrip(tmp_path):
    from edgeprune.models.tiny import build_tiny

    lm = build_tiny("qwen2")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    back = load(str(tmp_path))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(back.model(ids).logits, lm.model(ids).logits, atol=1e-6)
    assert back.adapter.family == "qwen2"


@pytest.mark.slow
def test_default_model_info(default_lm):
    info = model_info(default_lm)
    assert info["num_layers"] == 30 and info["num_heads"] == 9 and info["num_kv_heads"] == 3
    assert info["intermediate_size"] == 1536 and info["hidden_size"] == 576
    assert abs(info["params"]["total"] - 134.5e6) < 0.1e6
    assert "quantization_config" not in default_lm.model.config.to_dict()


@pytest.mark.slow
def test_default_model_is_cached_as_safetensors(default_lm):
    from pathlib import Path

    assert (Path(default_lm.source) / "model.safetensors").is_file()
    assert default_lm.tokenizer("Hello world").input_ids[0] != default_lm.tokenizer.bos_token_id


def test_cache_link_follows_a_moved_gguf(tmp_path):
    """A model cache whose GGUF was deleted (a rebuilt venv) is relinked to the copy being loaded; a live link stays."""
    import json

    from edgeprune.models.loader import relink_cache

    cached, gguf, other = tmp_path / "cache", tmp_path / "m.gguf", tmp_path / "elsewhere.gguf"
    cached.mkdir()
    gguf.write_bytes(b"GGUF")
    (cached / "manifest.json").write_text(json.dumps({"kind": "model-cache", "source": str(tmp_path / "gone.gguf")}))
    relink_cache(cached, gguf)
    assert json.loads((cached / "manifest.json").read_text())["source"] == str(gguf.resolve())
    other.write_bytes(b"GGUF")
    relink_cache(cached, other)  # the recorded file exists: keep it
    assert json.loads((cached / "manifest.json").read_text())["source"] == str(gguf.resolve())
