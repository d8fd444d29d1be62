"""Adapters for GLM (``glm``, GLM-4-9B, the ChatGLM family) and GLM-4 (``glm4``, GLM-4-0414).

Both fuse gate and up into ``gate_up_proj`` (handled by row views in the generic decoder adapter), rotate half of
each head with interleaved RoPE and put biases on q/k/v. GLM-4 adds post-attention and post-MLP norms (four norms
per layer).
"""

from __future__ import annotations

from edgeprune.adapters.decoder import DecoderAdapter


class GlmAdapter(DecoderAdapter):
    family = "glm"
    model_types = ("glm",)


class Glm4Adapter(DecoderAdapter):
    family = "glm4"
    model_types = ("glm4",)
