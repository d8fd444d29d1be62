"""The `edgeprune` command line: the model commands (info, eval, score, prune, export, run, report) here, the
device commands in cli_devices.py. User mistakes exit non-zero with one line on stderr, never a traceback."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgeprune import cli_devices
from edgeprune.cli_app import JsonOpt, ModelArg, app, console, out, write_result
from edgeprune.cli_devices import DeviceOpt, ProfileFileOpt
from edgeprune.cli_options import config_options
from edgeprune.config import DataSpec, ModelLoad, PruneConfig
from edgeprune.errors import EdgePruneError


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
    write_result(json_path, data)


def _load(model: str, load: ModelLoad):
    from edgeprune.models import load as load_model

    load.validate()
    return load_model(model, device=load.device, dtype=load.dtype)


@app.command("eval")
@config_options(load=ModelLoad, texts=DataSpec, only={"texts": ("eval",)})
def eval_cmd(
    load: ModelLoad,
    texts: DataSpec,
    model: ModelArg = "default",
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
    from edgeprune.data import resolve_text
    from edgeprune.evaluate.ppl import perplexity

    if batch_size < 1:
        raise EdgePruneError("--batch-size must be at least 1")
    load.validate()
    task_list = _parse_tasks(tasks)
    if task_list:
        tasks_dir = tasks_dir or (Path(os.environ["EDGEPRUNE_TASKS_DIR"]) if "EDGEPRUNE_TASKS_DIR" in os.environ
                                  else None)
        if tasks_dir is None:
            raise EdgePruneError("zero-shot tasks need --tasks-dir (or $EDGEPRUNE_TASKS_DIR) with the jsonl files")
    text = None if no_ppl else resolve_text(texts.eval, "eval")
    lm = _load(model, load)
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
    write_result(json_path, result)


SCORE_FIELDS = ("scorer", "n_samples", "seq_len", "seed", "piem_weights")


@app.command()
@config_options(config=PruneConfig, load=ModelLoad, texts=DataSpec,
                only={"config": SCORE_FIELDS, "texts": ("calib",)})
def score(
    config: PruneConfig,
    load: ModelLoad,
    texts: DataSpec,
    model: ModelArg = "default",
    output: Annotated[Path, typer.Option("-o", "--output", help="scores JSON to write")] = Path("scores.json"),
) -> None:
    """Score every structural unit (KV groups, query heads, MLP channels) and write them as JSON."""
    from edgeprune.data import calibration_batches, resolve_text
    from edgeprune.io import manifest, write_json
    from edgeprune.scoring import make_scorer, score_model

    sc = make_scorer(config.scorer, seed=config.seed, **config.scorer_kwargs())
    load.validate()
    text = resolve_text(texts.calib, "calib")
    lm = _load(model, load)
    batches = calibration_batches(lm.tokenizer, text, config.n_samples, config.seq_len, config.seed)
    scores = score_model(lm.adapter, sc, batches)
    doc = manifest("unit-scores", model=model, source=lm.source,
                   calibration={"text": text.name, "sha256": text.sha256, "n_samples": config.n_samples,
                                "seq_len": config.seq_len, "seed": config.seed},
                   shapes=[s.to_dict() for s in lm.adapter.shapes()], **scores.to_dict())
    write_json(output, doc)
    out.print(f"scored {len(scores.layers)} layers with {config.scorer} in {scores.meta['seconds']:.1f} s "
              f"-> {output}")


@app.command()
@config_options(config=PruneConfig, load=ModelLoad, texts=DataSpec, only={"texts": ("calib",)})
def prune(
    config: PruneConfig,
    load: ModelLoad,
    texts: DataSpec,
    model: ModelArg = "default",
    output: Annotated[Path, typer.Option("-o", "--output", help="checkpoint directory to write")] = Path("out"),
    json_path: JsonOpt = None,
) -> None:
    """Score, allocate and physically remove units; save a Hugging Face-style checkpoint. The defaults are the
    best measured recipe (PIEM, LSPS with Block Influence, several rounds, least-squares refit). --stream: one
    decoder layer in memory at a time, for models larger than memory."""
    from edgeprune.data import resolve_text
    from edgeprune.prune import prune_checkpoint

    config.validate()  # before any model time is spent
    load.validate()
    text = resolve_text(texts.calib, "calib")
    record = prune_checkpoint(model, config, text, output, load)
    b, a = record["params_before"], record["params_after"]
    out.print(f"decoder-layer parameters {b['decoder_layers']:,} -> {a['decoder_layers']:,} "
              f"(-{100 * record['decoder_reduction']:.1f}%)")
    out.print(f"total parameters {b['total']:,} -> {a['total']:,} (-{100 * record['total_reduction']:.1f}%)")
    out.print(f"wrote {output} ({record['seconds']:.0f} s, peak RSS {record['peak_rss_mib']:.0f} MiB)")
    for note in record.get("notes", []):
        out.print(f"note: {note}", highlight=False)
    write_result(json_path, record)


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
    write_result(json_path, info)


@app.command("run")
def run_cmd(
    config: Annotated[str | None, typer.Argument(help="a TOML config file, or a packaged config name "
                                                 "(default: demo, edgeprune/configs/demo.toml)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a setting: SECTION.KEY=VALUE "
                                                   "(TOML value; repeatable), e.g. --set prune.ratio=0.3")] = None,
    model: Annotated[str | None, typer.Option(help="run.model: the model to prune")] = None,
    ratio: Annotated[float | None, typer.Option(help="prune.ratio: share of decoder parameters to remove")] = None,
    device: Annotated[str | None, typer.Option(help="cuda | cuda:N | auto: run.device, the torch device models "
                                               "load on; any other name: profile.device, the device profile to "
                                               "measure on; cpu: both")] = None,
    dtype: Annotated[str | None, typer.Option(help="run.dtype: float32 | bfloat16 | float16")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="run.out: the run directory")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
) -> None:
    """The pipeline: PIEM scoring, LSPS pruning, INT8, ONNX/GGUF export, profiling, for the pruned model and the
    unpruned baseline, then the report. Stages whose inputs did not change are not recomputed."""
    from edgeprune.pipeline import load_config, run_pipeline

    cfg = load_config(config, set_ or [], model=model, ratio=ratio, device=device, dtype=dtype, out=out_dir)
    result = run_pipeline(cfg, progress=not quiet, console=console)
    _print_summary(result)
    out.print(f"report: {result.report_html}  (also report.md, report.json)", highlight=False, soft_wrap=True)


def _print_summary(result) -> None:
    """The stage table and the results table of a finished run."""
    from edgeprune.report import summary_rows
    from edgeprune.report_data import collect

    counts = {k: sum(s.status == k for s in result.stages) for k in ("computed", "cached")}
    t = Table("stage", "status", "seconds", title=f"stages: {counts['computed']} computed, "
              f"{counts['cached']} cached")
    for s in result.stages:
        t.add_row(s.name, s.status, f"{s.seconds:.1f}" if s.status == "computed" else "")
    out.print(t)
    header, rows = summary_rows(collect(result.run_dir))
    r = Table(*header, title="results (change vs the unpruned model in the same runtime)")
    for row in rows:
        r.add_row(*row)
    out.print(r)


@app.command("report")
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by `edgeprune run`")],
    readme: Annotated[Path | None, typer.Option("--readme", help="also rewrite the results block of this README "
                                                "(between <!-- run-table:start --> and <!-- run-table:end -->)")]
    = None,
) -> None:
    """Rewrite RUN_DIR/report (JSON, Markdown, self-contained HTML) from the run directory's stage results."""
    from edgeprune.report import regenerate
    from edgeprune.report_data import collect
    from edgeprune.report_readme import update_readme

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


app.command()(cli_devices.devices)
app.command("profile")(cli_devices.profile_cmd)
app.command("ship")(cli_devices.ship_cmd)


ThreadsOpt = Annotated[str | None, typer.Option(help="runtime threads, or 'auto' (default: the profile's)")]


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
