"""Adapter for Phi-3 / Phi-3.5 / Phi-4-mini (``phi3``).

Phi-3 fuses q, k and v into ``qkv_proj`` and gate and up into ``gate_up_proj``. The generic decoder adapter hands
out row views of the fused weights (``FusedRows``), so scorers, masking and the refit see q/k/v and gate/up as
for Llama, and fuses the smaller matrices again after surgery. Phi-3's attention splits its fused output by
``config.num_attention_heads``, so every layer whose widths change gets its own copy of the config.
"""

from __future__ import annotations

from edgeprune.adapters.decoder import DecoderAdapter


class Phi3Adapter(DecoderAdapter):
    family = "phi3"
    model_types = ("phi3",)
