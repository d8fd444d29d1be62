"""The BENCHMARKS.md section of bench/export_table.py: ``render(result)`` takes bench/results/export.json (as a dict)
and returns Markdown. Every sentence that states a finding is computed from the numbers in ``result``."""

from __future__ import annotations

import math

MODEL_TITLES = {"dense": "dense default model (SmolLM2-135M-Instruct)",
                "piem-lsps-30": "30 % PIEM-pruned (LSPS, Block Influence, least-squares reconstruction)"}
RECIPE_OF = {"onnx-int8-nbits8": "nbits8", "onnx-int8-nbits8-b64": "nbits8-b64",
             "onnx-int8-smooth-hybrid": "smooth-hybrid", "onnx-int8-dynamic": "dynamic",
             "onnx-int8-dynamic-excl": "dynamic-excl"}


def _num(x, fmt: str = ".2f", empty: str = "") -> str:
    return empty if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _ppl(x) -> str:
    return "" if x is None else (f"{x:.3f}" if x < 1e4 else f"{x:.3g}")


def _speed(row: dict, key: str):
    s = row.get("speed") or {}
    return None if "error" in s else s.get(key)


def _has_speed(row: dict) -> bool:
    return bool(_speed(row, "decode_tokens_per_s"))


def _first_pair(models, first: dict, second: dict, usable, describe) -> str | None:
    """``describe(model, a, b)`` for the first model whose rows in both variants are usable, else None."""
    for m in models:
        a, b = first.get(m), second.get(m)
        if a and b and usable(a) and usable(b):
            return describe(m, a, b)
    return None


def _parity(row: dict) -> str:
    p = row.get("parity")
    if not p:
        return ""
    d = p.get("max_abs_logit_diff")
    cell = _num(d, ".2g") if d is not None and d < 0.01 else _num(d, ".3g")
    return cell + ("" if p.get("passed") else " (fail)")


def _name(row: dict, default_int8: str | None) -> str:
    name = row["artifact"]
    if row.get("product"):
        name = f"**{name}**"
    if default_int8 and RECIPE_OF.get(row["artifact"]) == default_int8:
        name += " (default int8)"
    return name


def _rows(result: dict, model: str) -> list[dict]:
    return [r for r in result.get("rows", []) if r["model"] == model]


def model_table(result: dict, model: str) -> list[str]:
    info = result["models"].get(model, {})
    torch_ppl = (info.get("pytorch") or {}).get("ppl")
    lines = [f"### {MODEL_TITLES.get(model, model)}", "",
             f"PyTorch (float32) PPL on these windows: **{_ppl(torch_ppl)}**"
             + (f" (checkpoint `{info['spec']}`)" if info.get("spec") and info["spec"] != "default" else "") + ".", "",
             "| artifact | what | size MiB | runtime | PPL | PyTorch PPL | Δ % | parity max\\|Δlogit\\| "
             "| prefill ms (128) | decode tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in _rows(result, model):
        if r.get("error") and r.get("ppl") is None:
            lines.append(f"| {_name(r, result.get('default_int8'))} | {r['path']} | {_num(r.get('size_mib'))} | "
                         f"| failed: {r['error'][:120]} | | | | | |")
            continue
        lines.append(
            f"| {_name(r, result.get('default_int8'))} | {r['path']} | {_num(r.get('size_mib'), '.1f')} | "
            f"{r.get('runtime', '')} | {_ppl(r.get('ppl'))} | {_ppl(r.get('pytorch_ppl'))} | "
            f"{_num(r.get('delta_pct'), '+.2f')} | {_parity(r)} | {_num(_speed(r, 'prefill_ms'), '.1f')} | "
            f"{_num(_speed(r, 'decode_tokens_per_s'), '.1f')} |")
    lines.append("")
    return lines


def _by_artifact(result: dict) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for r in result.get("rows", []):
        out.setdefault(r["artifact"], {})[r["model"]] = r
    return out


def float_paragraph(result: dict) -> list[str]:
    tol = result.get("float_tolerance_pct", {})
    fails, worst = [], {}
    for r in result.get("rows", []):
        if r["dtype"] in tol and r.get("delta_pct") is not None:
            if abs(r["delta_pct"]) > tol[r["dtype"]]:
                fails.append(f"{r['model']}/{r['artifact']} ({r['delta_pct']:+.3f} %)")
            key = "32" if r["dtype"] in ("fp32", "f32") else "16"
            worst[key] = max(worst.get(key, 0.0), abs(r["delta_pct"]))
    if not worst:
        return []
    t32 = tol.get("f32", tol.get("fp32"))
    t16 = tol.get("f16", tol.get("fp16"))
    text = (f"**Float exports.** Tolerance, fixed before measuring: the PPL of an F32/fp32 artifact within "
            f"{t32:g} % of PyTorch's on the same windows, F16/fp16 within {t16:g} %. Largest |Δ|: "
            + ", ".join(f"{k}-bit {v:.3f} %" for k, v in sorted(worst.items(),
                                                                                         reverse=True))
            + (". All float rows are within tolerance." if not fails else ". Outside tolerance: " + ", ".join(fails)
               + "."))
    by = _by_artifact(result)
    q8 = by.get("gguf-q8_0", {})
    if q8:
        text += " llama.cpp Q8_0 vs PyTorch: " + ", ".join(
            f"{m} {r['delta_pct']:+.2f} %" for m, r in q8.items() if r.get("delta_pct") is not None) + "."
    q4 = by.get("gguf-q4_k_m", {})
    if q4:
        text += " Q4_K_M: " + ", ".join(
            f"{m} {r['delta_pct']:+.2f} %" for m, r in q4.items() if r.get("delta_pct") is not None) + "."
    return [text, ""]


def gguf_types_paragraph(result: dict) -> list[str]:
    """Which ggml types the quantized GGUF files hold (llama.cpp falls back where a row length does not fit)."""
    parts, f16 = [], {}
    for r in result.get("rows", []):
        types = r.get("tensor_types") or {}
        if r["format"] != "gguf" or r["dtype"] in ("f32", "f16") or not types:
            continue
        cells = ", ".join(f"{n} {t}" for t, n in sorted(types.items(), key=lambda kv: -kv[1]))
        parts.append(f"{r['model']} {r['dtype']}: {cells}")
        if types.get("F16"):
            f16[r["model"]] = max(f16.get(r["model"], 0), types["F16"])
    if not parts:
        return []
    text = ("**GGUF tensor types** (F32 = norms and biases): " + "; ".join(parts) + ". llama.cpp keeps a weight in "
            "F16 where its row length is not a multiple of the quantized type's block (32 for Q8_0/Q5_0, 256 for "
            "the K-quants) and falls back from K-quants to Q5_0/Q8_0 where it is not a multiple of 256")
    if f16:
        text += ("; F16 weights in the quantized files: " + ", ".join(f"{m} {n}" for m, n in f16.items())
                 + " (FFN widths that are not multiples of 32)")
    return [text + ".", ""]


def parity_paragraph(result: dict) -> list[str]:
    """Rows whose parity check failed but whose PPL is close: the check, not the artifact, is in question."""
    rows = [r for r in result.get("rows", []) if r.get("parity") and not r["parity"].get("passed")
            and r.get("delta_pct") is not None and abs(r["delta_pct"]) <= result.get("int8_target_pct", 3.0)]
    if not rows:
        return []
    return ["**Parity failures with a small PPL change** (`edgeprune export` refuses these; the rows above come from "
            "the same export without the check): " + "; ".join(
                f"{r['model']}/{r['artifact']}: max |Δlogit| {r['parity']['max_abs_logit_diff']:.3g} > "
                f"{_tol(r['parity'])}, top-1 agreement {r['parity'].get('top1_agreement', float('nan')):.2f}, "
                f"PPL {r['delta_pct']:+.2f} %" for r in rows) + ".", ""]


def _tol(p: dict):
    t = p.get("tolerance")
    return t.get("max_abs_logit_diff") if isinstance(t, dict) else t


def int8_paragraph(result: dict) -> list[str]:
    target = result.get("int8_target_pct", 3.0)
    default = result.get("default_int8")
    models = list(result.get("models", {}))
    by = _by_artifact(result)
    int8 = {a: ms for a, ms in by.items() if a.startswith("onnx-int8")}
    if not int8:
        return []

    def ok(ms: dict) -> bool:
        return all(m in ms and ms[m].get("delta_pct") is not None and ms[m]["delta_pct"] <= target
                   and (ms[m].get("parity") or {}).get("passed") for m in models)

    qualifying = [a for a, ms in int8.items() if ok(ms)]
    new_tokens = result.get("speed_settings", {}).get("new_tokens", 64)
    prompt = result.get("speed_settings", {}).get("prompt_tokens", 128)
    rejected = []
    for a, ms in int8.items():
        if a in qualifying:
            continue
        worst = max((float("inf") if r.get("delta_pct") is None else r["delta_pct"] for r in ms.values()),
                    default=float("inf"))
        why = []
        if worst > target:
            why.append(f"PPL up to {worst:+.1f} %" if math.isfinite(worst) else "not measured")
        if any(not (r.get("parity") or {}).get("passed") for r in ms.values()):
            why.append("fails the parity check")
        if any(m not in ms for m in models):
            why.append("not measured on every model")
        rejected.append(f"`{a}` ({', '.join(why)})")
    lines = [f"**INT8 for ONNX.** Criterion: PPL within {target:g} % of PyTorch float32 on every model above and "
             f"the parity check passed; among those, the fastest on this CPU: the least time for one request as the "
             f"profiler runs it ({prompt}-token prefill + {new_tokens} decode steps, mean over the models). "
             f"Qualifying: " + (", ".join(f"`{a}`" for a in qualifying) or "none") + ". "
             + ("Rejected: " + "; ".join(rejected) + "." if rejected else "")]

    def request_ms(row: dict):  # prefill of the prompt + the decode steps: one request as the profiler runs it
        pre, dec = _speed(row, "prefill_ms"), _speed(row, "decode_tokens_per_s")
        return None if pre is None or not dec else pre + new_tokens * 1000 / dec

    times = {a: [request_ms(int8[a][m]) for m in models] for a in qualifying}
    measured = {a: sum(v) / len(v) for a, v in times.items() if v and all(x is not None for x in v)}
    default_art = next((a for a, r in RECIPE_OF.items() if r == default), None)
    if measured and len(measured) == len(qualifying):
        best = min(measured, key=measured.get)

        def describe(a: str) -> str:
            return (f"{measured[a]:.0f} ms per request, mean over the models; prefill "
                    + " / ".join(_num(_speed(int8[a][m], "prefill_ms"), ".0f") for m in models) + " ms, decode "
                    + " / ".join(_num(_speed(int8[a][m], "decode_tokens_per_s"), ".1f") for m in models) + " tok/s, "
                    + " / ".join(_num(int8[a][m].get("size_mib"), ".0f") for m in models) + " MiB")

        text = f" Fastest qualifying path: `{best}` ({describe(best)})."
        if default_art == best:
            text += f" It is the exporter's default (`DEFAULT_INT8 = \"{default}\"`)."
        elif default_art in measured:
            text += (f" The exporter's default `{default}`: {describe(default_art)}; the measurement favours "
                     f"`{best}`" + (f" (recipe `{RECIPE_OF[best]}`)." if best in RECIPE_OF else
                                    " (not a recipe of the exporter yet)."))
        else:
            text += f" The exporter's default is `{default}`."
        lines[0] += text
    else:
        lines[0] += (f" Speed not measured for every qualifying path yet (`python bench/export_table.py --speed` "
                     f"on a quiet machine); the exporter's default is `{default}`"
                     + (", which qualifies." if default_art in qualifying else "."))
    acc0, acc4 = int8.get("onnx-int8-nbits8-acc0", {}), int8.get("onnx-int8-nbits8", {})
    head, fp32, opt = int8.get("onnx-int8-nbits8-floathead", {}), by.get("onnx-fp32", {}), by.get("onnx-fp32-opt", {})
    notes = [note for note in (
        _first_pair(models, acc0, acc4, _has_speed, lambda m, a, b: (
            f"accuracy_level 4 vs 0 ({m}): prefill {_speed(b, 'prefill_ms'):.0f} vs "
            f"{_speed(a, 'prefill_ms'):.0f} ms, decode {_speed(b, 'decode_tokens_per_s'):.1f} vs "
            f"{_speed(a, 'decode_tokens_per_s'):.1f} tok/s")),
        _first_pair(models, head, acc4, lambda r: bool(r.get("size_mib")), lambda m, a, b: (
            f"quantizing the tied lm_head and the embedding too ({m}): {a['size_mib']:.0f} -> "
            f"{b['size_mib']:.0f} MiB, PPL {a['delta_pct']:+.2f} % -> {b['delta_pct']:+.2f} %")),
        _first_pair(models, fp32, opt, _has_speed, lambda m, a, b: (
            f"transformer optimizer on fp32 ({m}): prefill {_speed(a, 'prefill_ms'):.0f} -> "
            f"{_speed(b, 'prefill_ms'):.0f} ms, decode {_speed(a, 'decode_tokens_per_s'):.1f} -> "
            f"{_speed(b, 'decode_tokens_per_s'):.1f} tok/s")),
    ) if note]
    if notes:
        lines[0] += " Other measurements: " + "; ".join(notes) + "."
    before = [a for a, ms in int8.items() if any((r.get("quantization") or {}).get("quantized_embeddings")
                                                 and "shared_tied_head" not in r["quantization"]
                                                 for r in ms.values())]
    if before:
        lines[0] += (" The sizes of " + ", ".join(f"`{a}`" for a in before) + " were measured before a tied lm_head "
                     "shared the embedding's int8 table (export/onnx_quant.py); exported now, those files are one "
                     "int8 table smaller (SmolLM2: 30 MiB), with the same resident memory within 15 MiB "
                     "(`python bench/export_table.py` remeasures).")
    return lines + [""]


def render(result: dict) -> str:
    """The Markdown section(s) for BENCHMARKS.md from bench/results/export.json."""
    if not result or not result.get("rows"):
        return ""
    tokens, seq = result.get("tokens", 8192), result.get("seq_len", 128)
    proto = next(iter(result.get("models", {}).values()), {}).get("protocol", {})
    sp = result.get("speed_settings", {})
    mach = result.get("speed_machine") or {}
    loads = [x for r in result["rows"] if r.get("speed") and "error" not in r["speed"]
             for part in r["speed"].get("load_avg") or [] if part for x in part]
    lines = ["## Export formats: ONNX and GGUF (`bench/export_table.py`)", "",
             f"Each artifact is scored in its own runtime (onnxruntime CPU, llama.cpp CPU) on the same token windows "
             f"as PyTorch: WikiText-2 raw test tokenized once with the model's tokenizer, the first {tokens:,} "
             f"tokens in {proto.get('windows', tokens // seq)} windows of {seq}, each scored independently (the "
             f"token ids are handed to every runtime). Size = model file(s) only. Parity = the export's check "
             f"against PyTorch (max |logit difference| over the check prompts; \"fail\" = outside the dtype's "
             f"tolerance or KL/top-1 limits). Speed: the device profiler (`edgeprune profile ARTIFACT --device "
             f"cpu`), prefill of {sp.get('prompt_tokens', 128)} tokens and {sp.get('new_tokens', 64)} greedy "
             f"decode steps, median of {sp.get('repeats', 3)}"
             + (f"; load average when measured up to {max(loads):.1f}" if loads else
                "; empty columns: not measured yet (`python bench/export_table.py --speed`)")
             + (f"; CPU: {mach.get('cpu_model') or mach.get('arch')}, {mach.get('logical_cores')} logical cores"
                if mach else "")
             + ". Bold: what `edgeprune export` writes for that format/dtype.", ""]
    for model in result.get("models", {}):
        lines += model_table(result, model)
    lines += float_paragraph(result)
    lines += gguf_types_paragraph(result)
    lines += parity_paragraph(result)
    lines += int8_paragraph(result)
    return "\n".join(lines)


if __name__ == "__main__":
    from common import load_result

    print(render(load_result("export") or {}))
