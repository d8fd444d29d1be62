"""GGUF for every family: a tiny random model of each, pruned, exported and run by llama.cpp against PyTorch.

Uniform shapes go to the family's own llama.cpp architecture; per-layer shapes go to deci where llama.cpp can run
the family that way (Llama 3, Phi-3 with full rotary) and are refused in one line where it cannot.
"""

import pytest
from edgeprune.export.gguf import check_gguf, export_gguf
from edgeprune.export.gguf.reader import metadata

from edgeprune.adapters.families import FAMILIES, family_for
from edgeprune.checkpoint import save_checkpoint
from edgeprune.errors import EdgePruneError, first_line
from edgeprune.models.tiny import build_tiny
from edgeprune.plan import LayerPlan, PruningPlan
from edgeprune.surgery import apply_plan

pytest.importorskip("llama_cpp")

# long enough (bytes = tokens) to cross the tiny Gemma 3's sliding window of 8 and llama3's scaled bands
PROMPTS = ["hello world", "The quick brown fox jumps over the lazy dog, again and again"]
ALL = 128  # tiny MLP width; 6 heads in 2 KV groups


def uniform_plan(keep_heads: bool) -> PruningPlan:
    heads, kv = (list(range(6)), [0, 1]) if keep_heads else ([0, 1, 2], [0])
    return PruningPlan([LayerPlan(i, heads, kv, list(range(0, ALL, 2))) for i in range(3)])


def nonuniform_plan() -> PruningPlan:
    """Every block kept, widths differ per layer: 6/3/6 heads, 128/64/96 channels."""
    return PruningPlan([LayerPlan(0, list(range(6)), [0, 1], list(range(ALL))),
                        LayerPlan(1, [3, 4, 5], [1], list(range(64))),
                        LayerPlan(2, list(range(6)), [0, 1], list(range(96)))])


def pruned(tmp_path, family: str, plan: PruningPlan, **overrides):
    lm = build_tiny(family, **overrides)
    apply_plan(lm.adapter, plan)
    return save_checkpoint(lm, tmp_path / "ck", {})


def assert_parity(report: dict, tol: float) -> None:
    assert report["max_abs_logit_diff"] < tol, report
    assert report["top1_agreement"] == 1.0 and report["greedy_match"] and report["tokenizer_match"], report
    assert report["passed"] and report["runtime"] == "llama.cpp"


# llama.cpp's phi3, qwen2 and chatglm need all heads (their attention is hidden_size wide): MLP channels only.
# Gemma 3 runs GELU through llama.cpp's fp16 lookup table: ~1e-3 off in f32, still far inside TOLERANCE["f32"].
UNIFORM = [("llama3", "llama", False, 1e-3), ("qwen2", "qwen2", True, 1e-3), ("qwen3", "qwen3", False, 1e-3),
           ("gemma3_text", "gemma3", False, 5e-3), ("phi3", "phi3", True, 1e-3), ("glm", "chatglm", True, 1e-3),
           ("glm4", "glm4", False, 1e-3)]


@pytest.mark.parametrize("family, arch, keep_heads, tol", UNIFORM)
def test_uniform_exports_with_the_family_arch(tmp_path, family, arch, keep_heads, tol):
    ckpt = pruned(tmp_path, family, uniform_plan(keep_heads))
    info = export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    assert info["arch"] == arch == family_for(info["family"]).gguf_arch
    assert [(x["heads"], x["ffn"]) for x in info["layers"]] == [(6 if keep_heads else 3, 64)] * 3
    assert_parity(check_gguf(tmp_path / "m.gguf", ckpt, PROMPTS, n_tokens=6), tol)


def test_gemma3_sliding_layers_and_local_rope(tmp_path):
    """The window, which layers slide, and the local RoPE base all reach llama.cpp: a local base of 100 (not the
    usual 10000) and the [sliding, sliding, full] pattern (llama.cpp's default would make all three slide)."""
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1e6}}
    ckpt = pruned(tmp_path, "gemma3_text", uniform_plan(False), rope_parameters=rope)
    export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    meta = metadata(tmp_path / "m.gguf")
    assert meta["gemma3.attention.sliding_window"] == 8
    assert meta["gemma3.attention.sliding_window_pattern"] == [True, True, False]
    assert meta["gemma3.rope.freq_base_swa"] == 100.0 and meta["gemma3.rope.freq_base"] == 1e6
    assert_parity(check_gguf(tmp_path / "m.gguf", ckpt, PROMPTS, n_tokens=6), 5e-3)


@pytest.mark.parametrize("family, overrides", [("llama3", {}), ("phi3", {"partial_rotary_factor": 1.0})])
def test_nonuniform_exports_as_deci(tmp_path, family, overrides):
    ckpt = pruned(tmp_path, family, nonuniform_plan(), **overrides)
    info = export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    assert info["arch"] == "deci" == FAMILIES[family_for(info["family"]).name].gguf_per_layer_arch
    assert [(x["heads"], x["kv_heads"], x["gguf_ffn"]) for x in info["layers"]] == [(6, 2, 128), (3, 1, 64),
                                                                                     (6, 2, 96)]
    assert_parity(check_gguf(tmp_path / "m.gguf", ckpt, PROMPTS, n_tokens=6), 1e-3)


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "phi3", "glm", "glm4"])
def test_nonuniform_without_a_per_layer_arch_is_refused_in_one_line(tmp_path, family):
    ckpt = pruned(tmp_path, family, nonuniform_plan())  # tiny Phi-3 rotates 3/4 of head_dim, as Phi-4-mini
    with pytest.raises(EdgePruneError, match="--allocator uniform") as e:
        export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot export this {family_for(family).name} checkpoint")
    assert "has one head count and FFN width for all layers" in msg
    assert "--no-reconstruct" not in msg  # no output biases here


def test_the_refusal_names_every_change_at_once(tmp_path):
    """Per-layer widths and refit biases on Gemma 3: the one line asks for uniform widths and no refit together,
    so that the user's next try exports."""
    import torch

    lm = build_tiny("gemma3_text")
    apply_plan(lm.adapter, nonuniform_plan(), attention_bias={1: 0.1 * torch.ones(lm.adapter.hidden_size)})
    ckpt = save_checkpoint(lm, tmp_path / "ck", {})
    with pytest.raises(EdgePruneError) as e:
        export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    assert str(e.value).endswith("prune with --allocator uniform and --no-reconstruct to export it")
    assert first_line(e.value) == str(e.value)  # whole: it fits the 300 characters of a report note
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("family", ["phi3", "glm"])
def test_heads_removed_with_partial_rotary_is_refused(tmp_path, family):
    """Their own architectures need every head; deci, the per-layer one, rotates all of head_dim."""
    ckpt = pruned(tmp_path, family, uniform_plan(False))
    with pytest.raises(EdgePruneError, match="hidden_size wide|rotates all of head_dim"):
        export_gguf(ckpt, tmp_path / "m.gguf", "f32")


def test_qwen2_with_heads_removed_goes_to_deci(tmp_path):
    ckpt = pruned(tmp_path, "qwen2", uniform_plan(False))
    info = export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    assert info["arch"] == "deci"
    assert_parity(check_gguf(tmp_path / "m.gguf", ckpt, PROMPTS, n_tokens=6), 1e-3)


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "glm4"])
def test_output_biases_without_a_per_layer_arch_are_refused(tmp_path, family):
    """llama.cpp's qwen3, gemma3 and glm4 add no attention output bias (Gemma 3 and GLM-4 also normalise a block's
    output before the residual add, so the bias could not be folded elsewhere either)."""
    import torch

    lm = build_tiny(family)
    apply_plan(lm.adapter, uniform_plan(False), attention_bias={i: 0.1 * torch.ones(96) for i in range(3)})
    ckpt = save_checkpoint(lm, tmp_path / "ck", {})
    with pytest.raises(EdgePruneError, match="adds no o output bias") as e:
        export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    assert "--no-reconstruct" in str(e.value) and first_line(e.value) == str(e.value)  # whole, on one line


def test_q8_0_qwen3(tmp_path):
    ckpt = pruned(tmp_path, "qwen3", uniform_plan(False))
    info = export_gguf(ckpt, tmp_path / "m.gguf", "q8_0")
    assert info["arch"] == "qwen3" and info["tensor_types"]["Q8_0"] > 0
    report = check_gguf(tmp_path / "m.gguf", ckpt, PROMPTS, n_tokens=6)
    assert report["dtype"] == "q8_0" and report["passed"] and report["max_abs_logit_diff"] < 0.5, report


def test_cli_refuses_nonuniform_gemma3_with_exit_2(tmp_path):
    import subprocess
    import sys

    ckpt = pruned(tmp_path, "gemma3_text", nonuniform_plan())
    out = tmp_path / "art"
    p = subprocess.run([sys.executable, "-m", "edgeprune", "export", str(ckpt), "--format", "gguf", "--dtype", "fp32",
                        "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "--allocator uniform" in p.stderr and "gemma3" in p.stderr
    assert not out.exists()


def test_exporter_imports_without_torch():
    import subprocess
    import sys

    code = ("import sys, edgeprune.export.gguf, edgeprune.export.parity; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


@pytest.mark.slow
def test_real_gemma3_270m_f16(tmp_path):
    """Gemma-3-270M (the named model of issue 14, a Q4_K_M GGUF on PyPI): its SentencePiece vocabulary is copied
    from that GGUF, and llama.cpp's gemma3 reproduces PyTorch (measured: max |logit diff| 0.037, mean KL 2e-6,
    top-1 1.0, same 12 greedy tokens)."""
    from edgeprune.models import load

    try:
        lm = load("gemma3-270m")
    except EdgePruneError as e:
        pytest.skip(f"gemma3-270m not available: {e}")
    info = export_gguf(lm.source, tmp_path / "m.gguf", "f16")
    assert info["arch"] == "gemma3" and info["tokenizer"]["model"] == "llama"
    assert info["tokenizer"]["pre_source"].startswith("source GGUF")
    report = check_gguf(tmp_path / "m.gguf", lm.source, n_tokens=12, lm=lm)
    assert report["passed"] and report["greedy_match"] and report["tokenizer_match"], report


def test_perplexity_with_a_bos_adding_tokenizer_matches_pytorch(tmp_path):
    """Windows start with an unscored BOS in both runtimes when the tokenizer adds one (as Gemma's does)."""
    from edgeprune.export.gguf import gguf_perplexity
    from tokenizers.processors import TemplateProcessing

    from edgeprune.data import Text
    from edgeprune.evaluate.ppl import perplexity
    from edgeprune.models import load

    lm = build_tiny("qwen3")
    tok = lm.tokenizer
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    ckpt = save_checkpoint(lm, tmp_path / "ck", {})
    info = export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    assert info["tokenizer"]["add_bos"]
    lm = load(str(ckpt))
    assert lm.tokenizer("a")["input_ids"][0] == 256
    text = Text("The quick brown fox jumps over the lazy dog. " * 4, "fox")
    ref = perplexity(lm.model, lm.tokenizer, text, seq_len=32, progress=False)
    got = gguf_perplexity(tmp_path / "m.gguf", text, seq_len=32)
    assert got["windows"] == ref["windows"] == 5
    assert got["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)
