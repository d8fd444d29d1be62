"""Adapter for Gemma 3 text models (``gemma3_text``, Gemma3ForCausalLM: Gemma-3-270M/1B and the text tower).

What differs from Llama is data in the family table: four norms per layer (the attention and MLP outputs are
RMS-normalised before the residual add, so a block's contribution is not linear in its units: bias compensation
and the refit act before that norm), per-head q/k norms, RMSNorm weights stored as w - 1, embeddings scaled by
sqrt(hidden), GeGLU, head_dim independent of hidden/heads, and sliding-window layers listed in
``config.layer_types`` (which follow layer drops).
"""

from __future__ import annotations

from edgeprune.adapters.decoder import DecoderAdapter


class Gemma3TextAdapter(DecoderAdapter):
    family = "gemma3_text"
    model_types = ("gemma3_text",)
