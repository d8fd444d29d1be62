"""How the pipeline profiles an artifact: `edgeprune profile` (edgeprune.devices' torch-free profiler) in a
separate process, so that peak RSS is the runtime's and not this (torch-sized) process's, and the summary the
report reads from its ``edgeprune.profile/1`` JSON. Not here: the measurement itself (devices/profiler.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from edgeprune.errors import EdgePruneError

PROFILER = "cli"  # part of every profile stage's key (the value earlier run directories were keyed with)


def profile_command(art: Path, prof, json_path: Path) -> list[str]:
    """`edgeprune profile ART` with the [profile] section's settings; ``prof.args`` are passed last and win."""
    extra = [str(a) for a in prof.args]
    settings = {"--prompt-lengths": str(prof.prompt_tokens), "--new-tokens": str(prof.new_tokens),
                "--decode-prompt": str(prof.prompt_tokens), "--repeats": str(prof.repeats),
                "--threads": str(prof.threads) if prof.threads else None}
    cmd = [sys.executable, "-m", "edgeprune", "profile", str(art), "--device", prof.device, "--json", str(json_path)]
    for opt, value in settings.items():
        if value is not None and opt not in extra:
            cmd += [opt, value]
    if "--quiet" not in extra:
        cmd.append("--quiet")
    return cmd + extra


def profile_artifact(art: Path, prof, json_path: Path) -> dict:
    """Run the profiler on ``art`` and return its JSON document."""
    p = subprocess.run(profile_command(art, prof, json_path), capture_output=True, text=True)
    if p.returncode != 0:
        lines = [ln for ln in (p.stderr or p.stdout or "").strip().splitlines() if ln.strip()]
        raise EdgePruneError(f"profiling {art} failed: {lines[-1] if lines else f'exit code {p.returncode}'}")
    try:
        return json.loads(json_path.read_text())
    except (OSError, ValueError):
        raise EdgePruneError(f"the profiler wrote no JSON for {art}") from None


def summarize_profile(raw: dict, prompt_tokens: int) -> dict:
    """TTFT (ms) of the prefill row with ``prompt_tokens``, decode tokens/s and peak RSS (MiB) from an
    ``edgeprune.profile/1`` document."""
    if not str(raw.get("schema", "")).startswith("edgeprune.profile/"):
        raise EdgePruneError(f"the profiler wrote an unknown document (schema {raw.get('schema')!r})")
    rows = raw.get("prefill") or []
    row = next((r for r in rows if r.get("prompt_tokens") == prompt_tokens), rows[0] if rows else {})
    return {"ttft_ms": row.get("ttft_ms"), "ttft_prompt_tokens": row.get("prompt_tokens"),
            "prefill_ms": row.get("prefill_ms"), "decode_tokens_per_s": (raw.get("decode") or {}).get("tokens_per_s"),
            "peak_rss_mib": (raw.get("memory") or {}).get("peak_rss_mb"), "load_s": raw.get("load_s")}
