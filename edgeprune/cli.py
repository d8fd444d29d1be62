"""The `edgeprune` command line. User mistakes exit non-zero with one line on stderr, never a traceback."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from edgeprune.errors import EdgePruneError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make LLMs small and fast enough for edge devices: score, prune, quantize, export, profile.",
)
console = Console(stderr=True)
out = Console()

ModelArg = Annotated[str, typer.Argument(help="'default', a local HF model directory, a .gguf file or a hub id")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="also write the result as JSON to this path")]


def _write_json(path: Path | None, data: dict) -> None:
    if path is not None:
        from edgeprune.io import write_json

        write_json(path, data)
        console.print(f"wrote {path}")


def _fmt_int(n: int) -> str:
    return f"{n:,}"


@app.command()
def info(model: ModelArg = "default", json_path: JsonOpt = None) -> None:
    """Architecture, parameter counts (embeddings / attention / MLP / norms) and per-layer shapes."""
    from edgeprune.models import load
    from edgeprune.models.info import model_info

    lm = load(model)
    data = model_info(lm)
    p = data["params"]
    out.print(f"[bold]{data['model']}[/] ({data['family']}, {data['model_type']}) from {data['source']}")
    out.print(
        f"layers {data['num_layers']}  hidden {data['hidden_size']}  heads {data['num_heads']}  "
        f"kv heads {data['num_kv_heads']}  head_dim {data['head_dim']}  MLP {data['intermediate_size']}  "
        f"vocab {data['vocab_size']}  {'uniform' if data['uniform'] else 'per-layer widths'}"
    )
    t = Table("part", "parameters", "share", title="parameters")
    for key in ("embeddings", "lm_head", "attention", "mlp", "norms", "total"):
        t.add_row(key, _fmt_int(p[key]), f"{100 * p[key] / p['total']:.1f}%")
    out.print(t)
    if not data["uniform"]:
        lt = Table("layer", "heads", "kv", "mlp", "params", title="per-layer shapes")
        for layer in data["layers"]:
            lt.add_row(str(layer["index"]), str(layer["num_heads"]), str(layer["num_kv_heads"]),
                       str(layer["intermediate_size"]), _fmt_int(layer["total"]))
        out.print(lt)
    out.print(f"total parameters: {p['total'] / 1e6:.1f}M")
    _write_json(json_path, data)


@app.command("eval")
def eval_cmd(
    model: ModelArg = "default",
    data: Annotated[str, typer.Option(help="evaluation text: 'builtin', a file/dir, or wikitext2|ptb|c4")] = "builtin",
    seq_len: Annotated[int, typer.Option(help="PPL window length (128 and 2048 are the usual ones)")] = 128,
    max_tokens: Annotated[int | None, typer.Option(help="score only the first N tokens (quick runs)")] = None,
    batch_size: Annotated[int, typer.Option(help="windows per forward pass")] = 8,
    tasks: Annotated[str | None, typer.Option(help="zero-shot tasks, comma-separated, or 'all'")] = None,
    tasks_dir: Annotated[Path | None, typer.Option(help="directory with the zero-shot jsonl files "
                                                   "(default: $EDGEPRUNE_TASKS_DIR)")] = None,
    limit: Annotated[int | None, typer.Option(help="first N examples per zero-shot task")] = None,
    no_ppl: Annotated[bool, typer.Option("--no-ppl", help="skip perplexity")] = False,
    json_path: JsonOpt = None,
) -> None:
    """Perplexity (non-overlapping windows) and zero-shot multiple-choice accuracy."""
    from edgeprune.data import load_text
    from edgeprune.evaluate.ppl import perplexity
    from edgeprune.models import load

    if batch_size < 1:
        raise EdgePruneError("--batch-size must be at least 1")
    task_list = _parse_tasks(tasks)
    if task_list:
        tasks_dir = tasks_dir or (Path(os.environ["EDGEPRUNE_TASKS_DIR"]) if "EDGEPRUNE_TASKS_DIR" in os.environ
                                  else None)
        if tasks_dir is None:
            raise EdgePruneError("zero-shot tasks need --tasks-dir (or $EDGEPRUNE_TASKS_DIR) with the jsonl files")
    text = None if no_ppl else load_text(data, "eval")
    lm = load(model)
    result: dict = {"model": model, "source": lm.source}
    if text is not None:
        r = perplexity(lm.model, lm.tokenizer, text, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size)
        result["ppl"] = r
        out.print(f"PPL {r['ppl']:.3f}  ({text.name}, seq_len {seq_len}, {r['windows']} windows, "
                  f"{r['tokens_scored']:,} tokens, {r['seconds']:.0f} s)")
    if task_list:
        from edgeprune.evaluate.zeroshot import evaluate_tasks

        z = evaluate_tasks(lm.model, lm.tokenizer, task_list, tasks_dir, limit=limit)
        result["zeroshot"] = z
        t = Table("task", "n", "acc", "acc_norm", title="zero-shot")
        for name, v in z["tasks"].items():
            t.add_row(name, str(v["n"]), f"{v['acc']:.4f}", f"{v['acc_norm']:.4f}")
        t.add_row("average", "", f"{z['average']['acc']:.4f}", f"{z['average']['acc_norm']:.4f}")
        out.print(t)
    _write_json(json_path, result)


CalibOpt = Annotated[str, typer.Option("--calib", help="calibration text: 'builtin', a file/dir, or wikitext2|ptb|c4")]
ScorerOpt = Annotated[str, typer.Option(help="magnitude | taylor | wanda-sp | fluctuation | random | piem")]
SamplesOpt = Annotated[int, typer.Option(help="calibration windows")]
CalibLenOpt = Annotated[int, typer.Option("--calib-seq-len", help="tokens per calibration window")]
SeedOpt = Annotated[int, typer.Option(help="seed for calibration sampling and the random scorer")]
PiemOpt = Annotated[str | None, typer.Option("--piem-weights",
                                             help="PIEM term weights 'alpha,beta,gamma' (weight, gradient, context)")]


def _scorer_options(scorer: str, piem_weights: str | None) -> dict:
    if piem_weights is None:
        return {}
    if scorer != "piem":
        raise EdgePruneError("--piem-weights only applies to --scorer piem")
    try:
        a, b, g = (float(x) for x in piem_weights.split(","))
    except ValueError:
        raise EdgePruneError("--piem-weights must be three numbers, e.g. 0.1,0.1,0.8") from None
    return {"alpha": a, "beta": b, "gamma": g}


@app.command()
def score(
    model: ModelArg = "default",
    scorer: ScorerOpt = "piem",
    calib: CalibOpt = "builtin",
    n_samples: SamplesOpt = 64,
    calib_seq_len: CalibLenOpt = 128,
    seed: SeedOpt = 0,
    piem_weights: PiemOpt = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="scores JSON to write")] = Path("scores.json"),
) -> None:
    """Score every structural unit (KV groups, query heads, MLP channels) and write them as JSON."""
    from edgeprune.data import calibration_batches, load_text
    from edgeprune.io import manifest, write_json
    from edgeprune.models import load
    from edgeprune.scoring import make_scorer, score_model

    sc = make_scorer(scorer, seed=seed, **_scorer_options(scorer, piem_weights))
    text = load_text(calib, "calib")
    lm = load(model)
    batches = calibration_batches(lm.tokenizer, text, n_samples, calib_seq_len, seed)
    scores = score_model(lm.adapter, sc, batches)
    data = manifest("unit-scores", model=model, source=lm.source,
                    calibration={"text": text.name, "sha256": text.sha256, "n_samples": n_samples,
                                 "seq_len": calib_seq_len, "seed": seed},
                    shapes=[s.to_dict() for s in lm.adapter.shapes()], **scores.to_dict())
    write_json(output, data)
    out.print(f"scored {len(scores.layers)} layers with {scorer} in {scores.meta['seconds']:.1f} s -> {output}")


@app.command()
def prune(
    model: ModelArg = "default",
    ratio: Annotated[float, typer.Option(help="fraction of decoder-layer parameters to remove, in [0, 1)")] = 0.2,
    scorer: ScorerOpt = "piem",
    allocator: Annotated[str, typer.Option(help="how much to remove per layer: uniform | lsps | global | owl | "
                                           "depth")] = "uniform",
    sensitivity: Annotated[str, typer.Option(help="LSPS layer sensitivity: loss | bi | fisher")] = "loss",
    probe_ratio: Annotated[float, typer.Option(help="share of a module's units the loss/fisher probe removes")] = 0.3,
    tau: Annotated[float, typer.Option(help="LSPS: how strongly ratios follow sensitivity (0 = uniform)")] = 1.0,
    min_module_ratio: Annotated[float, typer.Option(help="LSPS: lower bound of a module's ratio")] = 0.0,
    max_module_ratio: Annotated[float, typer.Option(help="LSPS: upper bound of a module's ratio")] = 0.8,
    bias_compensation: Annotated[bool, typer.Option("--bias-compensation",
                                                    help="add removed units' mean output to the bias (FLAP)")] = False,
    reconstruct: Annotated[bool, typer.Option("--reconstruct/--no-reconstruct",
                                              help="refit each pruned block's output projection by least squares "
                                              "on the calibration text (includes the bias)")] = False,
    recover_steps: Annotated[int, typer.Option(help="recovery: distillation steps from the unpruned model "
                                               "on calibration text after pruning (0 = off)")] = 0,
    recover_lr: Annotated[float, typer.Option(help="recovery: peak learning rate")] = 4e-4,
    recover_batch: Annotated[int, typer.Option(help="recovery: windows per step")] = 4,
    recover_ce: Annotated[float, typer.Option(help="recovery: share of next-token cross-entropy in the loss "
                                              "(0 = pure distillation)")] = 0.0,
    attn_unit: Annotated[str, typer.Option(help="attention unit: 'group' (KV head + its query heads) or "
                                           "'head' (query heads, same count from every group)")] = "group",
    round_to: Annotated[int, typer.Option(help="round kept MLP widths to a multiple of this")] = 1,
    rounds: Annotated[int, typer.Option(help="prune in K steps, re-scoring after each")] = 1,
    calib: CalibOpt = "builtin",
    n_samples: SamplesOpt = 64,
    calib_seq_len: CalibLenOpt = 128,
    seed: SeedOpt = 0,
    piem_weights: PiemOpt = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="checkpoint directory to write")] = Path("out"),
    json_path: JsonOpt = None,
) -> None:
    """Score, allocate and physically remove units; save a Hugging Face-style checkpoint."""
    from edgeprune.checkpoint import save_checkpoint
    from edgeprune.data import load_text
    from edgeprune.models import load
    from edgeprune.prune import PruneConfig, prune_model

    cfg = PruneConfig(ratio=ratio, scorer=scorer, allocator=allocator, attn_unit=attn_unit, round_to=round_to,
                      rounds=rounds, n_samples=n_samples, seq_len=calib_seq_len, seed=seed,
                      scorer_options=_scorer_options(scorer, piem_weights), sensitivity=sensitivity,
                      probe_ratio=probe_ratio, tau=tau, min_module_ratio=min_module_ratio,
                      max_module_ratio=max_module_ratio, bias_compensation=bias_compensation,
                      reconstruct=reconstruct, recover_steps=recover_steps, recover_lr=recover_lr,
                      recover_batch=recover_batch, recover_ce=recover_ce)
    cfg.validate()  # before any model time is spent
    text = load_text(calib, "calib")
    lm = load(model)
    record = prune_model(lm, cfg, text)
    save_checkpoint(lm, output, {"source_model": model, "source": lm.source, **record})
    b, a = record["params_before"], record["params_after"]
    out.print(f"decoder-layer parameters {b['decoder_layers']:,} -> {a['decoder_layers']:,} "
              f"(-{100 * record['decoder_reduction']:.1f}%)")
    out.print(f"total parameters {b['total']:,} -> {a['total']:,} (-{100 * record['total_reduction']:.1f}%)")
    out.print(f"wrote {output} ({record['seconds']:.0f} s, peak RSS {record['peak_rss_mib']:.0f} MiB)")
    _write_json(json_path, record)


@app.command("export")
def export_cmd(
    model: Annotated[str, typer.Argument(help="a checkpoint directory (dense or pruned), a .gguf, or 'default'")],
    fmt: Annotated[str, typer.Option("--format", help="onnx | gguf")] = "onnx",
    dtype: Annotated[str, typer.Option(help="fp32 | fp16 | int8 (ONNX: 8-bit weights; GGUF: q8_0) | q8_0 | "
                                       "q4_k_m (GGUF)")] = "fp32",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="artifact directory to write "
                                                "(default: artifacts/NAME-FORMAT-DTYPE)")] = None,
    optimize: Annotated[bool | None, typer.Option("--optimize/--no-optimize",
                                                  help="ONNX: onnxruntime's transformer optimizer")] = None,
    json_path: JsonOpt = None,
) -> None:
    """Export to ONNX (onnxruntime) or GGUF (llama.cpp), then check parity against PyTorch."""
    from edgeprune.export.artifacts import default_output, export_artifact

    out_dir = output or default_output(model, fmt, dtype)
    info = export_artifact(model, fmt, dtype, out_dir, optimize)
    parity = info.get("parity", {})
    out.print(f"wrote {out_dir} ({info.get('size_bytes', 0) / 2**20:.1f} MiB {fmt} {dtype}); parity "
              f"{'passed' if parity.get('passed') else 'FAILED'}: max |logit diff| "
              f"{parity.get('max_abs_logit_diff', float('nan')):.3g}, greedy match {parity.get('greedy_match')}")
    _write_json(json_path, info)


@app.command("run")
def run_cmd(
    config: Annotated[str | None, typer.Argument(help="a TOML config file, or a packaged config name "
                                                 "(default: demo, edgeprune/configs/demo.toml)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a setting: SECTION.KEY=VALUE "
                                                   "(TOML value; repeatable), e.g. --set prune.ratio=0.3")] = None,
    model: Annotated[str | None, typer.Option(help="run.model: the model to prune")] = None,
    ratio: Annotated[float | None, typer.Option(help="prune.ratio: share of decoder parameters to remove")] = None,
    device: Annotated[str | None, typer.Option(help="profile.device: device profile to measure on")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="run.out: the run directory")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
) -> None:
    """The pipeline: PIEM scoring, LSPS pruning, INT8, ONNX/GGUF export, profiling, for the pruned model and the
    unpruned baseline, then the report. Stages whose inputs did not change are not recomputed."""
    from edgeprune.pipeline import load_config, print_summary, run_pipeline

    cfg = load_config(config, set_ or [], model=model, ratio=ratio, device=device, out=out_dir)
    result = run_pipeline(cfg, progress=not quiet, console=console)
    print_summary(result, out)
    out.print(f"report: {result.report_html}  (also report.md, report.json)", highlight=False, soft_wrap=True)


@app.command("report")
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by `edgeprune run`")],
    readme: Annotated[Path | None, typer.Option("--readme", help="also rewrite the results block of this README "
                                                "(between <!-- run-table:start --> and <!-- run-table:end -->)")]
    = None,
) -> None:
    """Rewrite RUN_DIR/report (JSON, Markdown, self-contained HTML) from the run directory's stage results."""
    from edgeprune.report import collect, regenerate, update_readme

    paths = regenerate(run_dir)
    if readme is not None:
        update_readme(readme, collect(run_dir))
        out.print(f"updated the results table in {readme}", highlight=False)
    out.print(f"report: {paths['html']}  (also {paths['markdown'].name}, {paths['json'].name})", highlight=False,
              soft_wrap=True)


def _parse_tasks(tasks: str | None) -> list[str]:
    if not tasks:
        return []
    from edgeprune.evaluate.zeroshot import TASKS

    if tasks == "all":
        return list(TASKS)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise EdgePruneError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    return names


DeviceOpt = Annotated[str, typer.Option("--device", help="device profile name (see `edgeprune devices`) or a .toml")]
ProfileFileOpt = Annotated[Path | None, typer.Option("--profile-file", help="a device profile TOML file (overrides "
                                                     "--device's lookup)")]
ThreadsOpt = Annotated[str | None, typer.Option(help="runtime threads, or 'auto' (default: the profile's)")]
LengthsOpt = Annotated[str | None, typer.Option("--prompt-lengths", help="prompt lengths for prefill/TTFT, "
                                                "comma-separated (default: the profile's)")]
NewTokensOpt = Annotated[int | None, typer.Option(help="decode steps per repeat (default: the profile's)")]
RepeatsOpt = Annotated[int | None, typer.Option(help="measured repeats; medians are reported (default: the "
                                                "profile's)")]
WarmupOpt = Annotated[int | None, typer.Option(help="warm-up runs before measuring (default: the profile's)")]
BudgetOpt = Annotated[str | None, typer.Option("--memory-budget", help="MiB or 'auto'; refuse artifacts that do "
                                               "not fit (default: the profile's memory_budget_mb)")]
DecodePromptOpt = Annotated[int | None, typer.Option(help="prompt tokens before the decode steps (default: 128, "
                                                     "or the longest prompt length if shorter)")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="no progress on stderr")]


def _profile_overrides(threads, prompt_lengths, new_tokens, repeats, warmup, memory_budget, decode_prompt) -> dict:
    lengths = None
    if prompt_lengths:
        try:
            lengths = [int(x) for x in prompt_lengths.split(",") if x.strip()]
        except ValueError:
            raise EdgePruneError("--prompt-lengths must be comma-separated integers, e.g. 32,128,512") from None
    return {"threads": threads, "prompt_lengths": lengths, "new_tokens": new_tokens, "repeats": repeats,
            "warmup": warmup, "memory_budget_mb": memory_budget, "decode_prompt": decode_prompt}


@app.command()
def devices(json_path: JsonOpt = None) -> None:
    """List the device profiles (shipped ones and yours in ~/.config/edgeprune/devices or $EDGEPRUNE_DEVICES)."""
    from dataclasses import asdict

    from edgeprune.devices import profiles

    t = Table("device", "threads", "budget MiB", "prefers", "GGUF runtime", "from", title="device profiles")
    data = {}
    for name, path in sorted(profiles.available().items()):
        p = profiles.load(name)
        data[name] = asdict(p)
        origin = "built-in" if path.parent == profiles.BUILTIN_DIR else str(path)
        t.add_row(name, str(p.threads), str(p.memory_budget_mb), f"{p.preferred_format} {p.preferred_dtype}",
                  p.gguf_backend, origin)
    out.print(t)
    _write_json(json_path, data)


@app.command("profile")
def profile_cmd(
    artifact: Annotated[Path, typer.Argument(help="an artifact directory from `edgeprune export`")],
    device: DeviceOpt = "cpu",
    profile_file: ProfileFileOpt = None,
    threads: ThreadsOpt = None,
    prompt_lengths: LengthsOpt = None,
    new_tokens: NewTokensOpt = None,
    repeats: RepeatsOpt = None,
    warmup: WarmupOpt = None,
    memory_budget: BudgetOpt = None,
    decode_prompt: DecodePromptOpt = None,
    quiet: QuietOpt = False,
    json_path: JsonOpt = None,
) -> None:
    """Profile an ONNX/GGUF artifact on this machine with a device profile's settings: load time, prefill and TTFT
    per prompt length, decode tokens/s, per-token p50/p95, peak RSS (the torch-free device profiler)."""
    from edgeprune.devices import profiles, ship

    prof = profiles.load(device, profile_file)
    doc = ship.profile_local(artifact, prof, _profile_overrides(threads, prompt_lengths, new_tokens, repeats,
                                                                  warmup, memory_budget, decode_prompt), quiet=quiet)
    for line in ship.summary(doc):
        out.print(line, highlight=False, soft_wrap=True)
    _write_json(json_path, doc)


@app.command("ship")
def ship_cmd(
    artifact: Annotated[Path, typer.Argument(help="an artifact directory from `edgeprune export`")],
    device: DeviceOpt,
    host: Annotated[str | None, typer.Option(help="user@address (default: the profile's [ssh] host)")] = None,
    port: Annotated[int | None, typer.Option(help="SSH port (default: the profile's, else ssh's)")] = None,
    key: Annotated[str | None, typer.Option(help="SSH identity file (default: ssh's own / the agent)")] = None,
    known_hosts: Annotated[str | None, typer.Option("--known-hosts", help="known_hosts file to check the host "
                                                    "key against (default: ssh's)")] = None,
    connect_timeout: Annotated[int | None, typer.Option(help="seconds to wait for the connection")] = None,
    python: Annotated[str | None, typer.Option(help="python on the device (default: the profile's, python3)")] = None,
    remote_dir: Annotated[str | None, typer.Option(help="directory on the device (default: the profile's)")] = None,
    transport: Annotated[str, typer.Option(help="auto (rsync when both ends have it) | rsync | scp")] = "auto",
    bwlimit: Annotated[int | None, typer.Option(help="upload bandwidth limit, KiB/s")] = None,
    no_profile: Annotated[bool, typer.Option("--no-profile", help="copy and verify only")] = False,
    timeout: Annotated[float, typer.Option(help="seconds the profiler may run on the device")] = 3600,
    profile_file: ProfileFileOpt = None,
    threads: ThreadsOpt = None,
    prompt_lengths: LengthsOpt = None,
    new_tokens: NewTokensOpt = None,
    repeats: RepeatsOpt = None,
    warmup: WarmupOpt = None,
    memory_budget: BudgetOpt = None,
    decode_prompt: DecodePromptOpt = None,
    quiet: QuietOpt = False,
    json_path: JsonOpt = None,
) -> None:
    """Copy an artifact bundle (artifact, tokenizer, device code, sha256 manifest) to a device over SSH, verify it
    there, run the profiler there and bring the JSON back. Interrupted uploads resume on the next run."""
    from edgeprune.devices import profiles, ship

    prof = profiles.load(device, profile_file)
    remote = ship.resolve_remote(prof, host, port, key, known_hosts, connect_timeout)
    doc = ship.ship(artifact, prof, remote, python=python, remote_dir=remote_dir, transport=transport,
                    bwlimit=bwlimit, run_profile=not no_profile, timeout=timeout, quiet=quiet,
                    overrides=_profile_overrides(threads, prompt_lengths, new_tokens, repeats, warmup, memory_budget,
                                                 decode_prompt))
    s = doc["ship"]
    out.print(f"bundle {s['bundle']} on {s['host']}: {len(s['uploaded'])} files uploaded, {len(s['reused'])} reused, "
              f"checksums verified", highlight=False, soft_wrap=True)
    if not no_profile:
        for line in ship.summary(doc):
            out.print(line, highlight=False, soft_wrap=True)
    _write_json(json_path, doc)


@app.command("fit")
def fit_cmd(
    model: ModelArg = "default",
    device: DeviceOpt = "cpu",
    max_memory_mb: Annotated[float | None, typer.Option(help="peak memory target, MiB (default: the profile's "
                                                        "memory budget)")] = None,
    min_decode_tok_s: Annotated[float | None, typer.Option(help="decode speed target, tokens/s")] = None,
    max_ttft_ms: Annotated[float | None, typer.Option(help="time to first token target, ms (with --prompt-tokens)")]
    = None,
    prompt_tokens: Annotated[int | None, typer.Option(help="prompt length of --max-ttft-ms")] = None,
    max_size_mb: Annotated[float | None, typer.Option(help="artifact size target, MiB")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="gguf | onnx (default: the profile's)")] = None,
    dtypes: Annotated[str | None, typer.Option(help="dtypes to consider, comma-separated (default: q8_0,q4_k_m for "
                                               "GGUF, int8 for ONNX)")] = None,
    max_ppl_ratio: Annotated[float | None, typer.Option(help="quality target: PPL / dense PPL (predicted in the "
                                                        "search, measured after)")] = None,
    host: Annotated[str | None, typer.Option(help="profile on this SSH host (user@address) with `edgeprune ship`")]
    = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="output directory")] = Path("out/fit"),
    threads: ThreadsOpt = None,
    budget: Annotated[str, typer.Option(help="what LSPS spends: params, or latency (units cost their measured "
                                        "decode time on the device)")] = "params",
    set_: Annotated[list[str] | None, typer.Option("--set", help="override the pruning recipe: KEY=VALUE (TOML "
                                                   "value; repeatable), e.g. --set recover_steps=0")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="PPL: score only the first N tokens")] = None,
    profile_file: ProfileFileOpt = None,
    json_path: JsonOpt = None,
) -> None:
    """Find the least compression (pruning ratio and dtype) predicted to meet a device's memory, speed, size and
    quality targets; prune, export, evaluate and profile it on the device; report predicted vs measured."""
    from edgeprune.fit.cli import command

    code = command(model, device, max_memory_mb, min_decode_tok_s, max_ttft_ms, prompt_tokens, max_size_mb, fmt,
                   dtypes, max_ppl_ratio, host, out_dir, threads, budget, set_ or [], max_tokens, profile_file,
                   json_path, out.print)
    if code:
        raise typer.Exit(code)


def main() -> None:
    try:
        app()
    except EdgePruneError as e:
        console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
