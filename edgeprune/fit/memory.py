"""Memory prediction for an artifact that does not exist yet: the device profiler's own budget check
(``devices.profiler.estimate_memory_for``) applied to a predicted artifact description (the weight file's size
from ``shapes.file_bytes``, the KV heads and sizes from the shape), with the context the profiler would plan for
the device profile's prompt lengths and decode steps.

So ``edgeprune fit`` refuses exactly what ``edgeprune profile`` would refuse, before pruning anything.
Does NOT measure anything (the profiler does) and does not know the device's free memory (its profile does).
"""

from __future__ import annotations

from edgeprune.devices import profiler
from edgeprune.fit.shapes import ModelShape, file_bytes


def profile_settings(profile, overrides: dict | None = None) -> dict:
    """Prompt lengths, decode steps and decode prompt a profile run would use (``profiles.DeviceProfile``)."""
    o = overrides or {}
    return {"prompt_lengths": list(o.get("prompt_lengths") or profile.prompt_lengths),
            "new_tokens": int(o.get("new_tokens") or profile.new_tokens),
            "decode_prompt": o.get("decode_prompt")}


def describe(shape: ModelShape, fmt: str, dtype: str) -> dict:
    """The predicted artifact: what ``profiler.artifact_info`` and ``profiler.model_shape`` would report."""
    return {"format": fmt, "dtype": dtype, "model_bytes": file_bytes(shape, fmt, dtype),
            "shape": shape.profiler_shape()}


def predict_memory(shape: ModelShape, fmt: str, dtype: str, settings: dict) -> dict:
    """The profiler's memory estimate for this shape exported as ``fmt``/``dtype`` (its ``expected_mb`` is the
    prediction of peak RSS, ``estimate_mb`` adds the budget check's margin), plus the predicted file size."""
    desc = describe(shape, fmt, dtype)
    limit = shape.context or None
    lengths, _, _, n_ctx = profiler.plan_context(settings["prompt_lengths"], settings["new_tokens"],
                                                 settings.get("decode_prompt"), limit)
    est = profiler.estimate_memory_for(fmt, desc["model_bytes"], desc["shape"], n_ctx, lengths[-1], dtype)
    est["size_bytes"] = desc["model_bytes"]
    return est
