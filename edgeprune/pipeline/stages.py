"""The stage bodies of `edgeprune run`, one small object each, with typed inputs (the dataclass fields: what the
stage's key hashes, via ``inputs()``) and a typed, JSON-ready result (``run()`` returns one of the TypedDicts
below; edgeprune/report.py reads them from each stage.json).

    EvalStage          PyTorch PPL (+ zero-shot) of the unpruned or the pruned model
    PruneStage         score -> allocate -> surgery (-> refit, distillation) -> checkpoint
    ExportStage        an ONNX / GGUF artifact with its parity check
    ArtifactPPLStage   the artifact's PPL in its own runtime (onnxruntime, llama.cpp)
    ProfileStage       TTFT, decode tokens/s, peak RSS through `edgeprune profile` (or `ship` to a device)
    ReportStage        report.json, report.md, report.html

Not here: the order and wiring of stages (plan.py) or caching and atomic writes (engine.py).
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypedDict

from edgeprune.config import ModelLoad, PruneConfig
from edgeprune.data import Text
from edgeprune.io import MANIFEST
from edgeprune.pipeline.config import EvaluateSection, ProfileSection, section_dict
from edgeprune.pipeline.engine import Stage
from edgeprune.pipeline.profiling import Target
from edgeprune.rundir import ABLATION, REPORT, StageId, artifact_dir, read_stage, stage_dir


class EvalResult(TypedDict, total=False):
    variant: str
    params: dict[str, int]  # per part (edgeprune.models.info.param_counts)
    shapes: list[dict]  # per layer
    ppl: dict  # edgeprune.evaluate.ppl.perplexity's record
    zeroshot: dict  # edgeprune.evaluate.zeroshot.evaluate_tasks's record, when tasks are set


class PruneResult(TypedDict, total=False):
    """edgeprune.prune.prune_model's record (config, plan, rounds, recovery, params_before/after, ...) and:"""

    shapes_before: list[dict]
    layer_params_before: list[dict]
    layer_params_after: list[dict]
    checkpoint: str  # the pruned model's directory, relative to the stage


class ArtifactResult(TypedDict, total=False):
    variant: str
    format: str
    dtype: str
    skipped: str  # why there is no such artifact (errors.FormatUnsupported); no other fields then


class ExportResult(ArtifactResult, total=False):
    artifact: str  # the artifact directory, relative to the stage
    size_bytes: int  # the model files
    files: dict[str, int]
    parity: dict
    export_seconds: float | None


class ArtifactPPLResult(ArtifactResult, total=False):
    """The runtime's PPL record (ppl, windows, tokens_scored, ...) and:"""

    ppl: float
    runtime: str
    text: str
    text_sha256: str


class ProfileResult(ArtifactResult, total=False):
    device: str
    ttft_ms: float | None
    ttft_prompt_tokens: int | None
    prefill_ms: float | None
    decode_tokens_per_s: float | None
    peak_rss_mib: float | None
    load_s: float | None
    profile: str  # the profiler's full JSON (profile.json)
    profiler: str | None
    warnings: list[str]
    measured_on: dict  # edgeprune.devices.remote.measured_on: host, arch, emulated, CPU, board (the report shows it)
    identity: dict  # the measuring machine as it answered before the stage (its "key" is in the stage's key)


@dataclass
class Context:
    """What stage bodies share and that is not part of any key: where the run lives and how to show progress."""

    run_dir: Path
    console: Any
    progress: bool

    def spinner(self, text: str):
        return self.console.status(text) if self.progress else contextlib.nullcontext()

    def model_spec(self, variant: str, model: str) -> str:
        """The baseline is the configured model; the pruned model is the prune stage's checkpoint."""
        return model if variant == "baseline" else str(stage_dir(self.run_dir, "prune") / "model")


STREAM_FIELDS = ("stream", "stream_gradient")


def load_inputs(load: ModelLoad) -> dict:
    # the default placement adds nothing, so keys of run directories written before it existed stay valid
    return {} if load.is_default else {"load": {"device": load.device, "dtype": load.dtype}}


@dataclass
class EvalStage(Stage):
    """PyTorch PPL (+ zero-shot) of one model."""

    ctx: Context
    variant: str
    model: str
    model_fp: str  # content hash of the model ('' for the pruned model: its dep's key covers it)
    text: Text
    ev: EvaluateSection
    load: ModelLoad
    tasks_dir: Path | None = None
    task_hashes: dict = field(default_factory=dict)

    def __post_init__(self):
        self.name = StageId("eval", self.variant).name
        self.deps = () if self.variant == "baseline" else ("prune",)
        self.title = f"evaluate the {'unpruned' if self.variant == 'baseline' else 'pruned'} model (PyTorch)"

    def inputs(self) -> dict:
        ev = self.ev
        return {**({"model": self.model_fp} if self.variant == "baseline" else {}), "seq_len": ev.seq_len,
                "max_tokens": ev.max_tokens, "text": self.text.sha256, "tasks": ev.tasks, "limit": ev.limit,
                "task_files": self.task_hashes, **load_inputs(self.load)}

    def run(self, out: Path) -> EvalResult:
        from edgeprune.evaluate.ppl import perplexity
        from edgeprune.models import load
        from edgeprune.models.info import param_counts

        ev = self.ev
        lm = load(self.ctx.model_spec(self.variant, self.model), device=self.load.device, dtype=self.load.dtype)
        result: EvalResult = {"variant": self.variant, "params": param_counts(lm.adapter),
                                  "shapes": [s.to_dict() for s in lm.adapter.shapes()]}
        result["ppl"] = perplexity(lm.model, lm.tokenizer, self.text, ev.seq_len, max_tokens=ev.max_tokens or None,
                                   batch_size=ev.batch_size, progress=self.ctx.progress)
        if ev.tasks:
            from edgeprune.evaluate.zeroshot import evaluate_tasks

            result["zeroshot"] = evaluate_tasks(lm.model, lm.tokenizer, ev.tasks, self.tasks_dir,
                                                limit=ev.limit or None, progress=self.ctx.progress)
        return result


@dataclass
class PruneStage(Stage):
    """Prune the model with ``config`` and save the checkpoint (streamed layer by layer when ``config.stream``)."""

    ctx: Context
    model: str
    model_fp: str
    config: PruneConfig
    calib: Text
    load: ModelLoad
    name: str = "prune"

    def __post_init__(self):
        self.title = f"{self.config.scorer.upper()} scoring + {self.config.allocator.upper()} pruning, ratio " \
                     f"{self.config.ratio:g}"

    def inputs(self) -> dict:
        prune = {k: v for k, v in section_dict(self.config).items() if k not in STREAM_FIELDS}
        # streaming's fields join the key only when set, so keys of run directories written before they existed
        # stay valid (and the gradient term of streaming does not key an in-memory prune)
        stream = {"stream": {"gradient": self.config.stream_gradient}} if self.config.stream else {}
        return {"model": self.model_fp, "prune": prune, "calib": self.calib.sha256, **load_inputs(self.load),
                **stream}

    def run(self, out: Path) -> PruneResult:
        if self.config.stream:
            return self._stream(out)
        from edgeprune.checkpoint import save_checkpoint
        from edgeprune.models import load
        from edgeprune.models.info import layer_param_counts
        from edgeprune.prune import prune_model

        lm = load(self.model, device=self.load.device, dtype=self.load.dtype)
        shapes_before = [s.to_dict() for s in lm.adapter.shapes()]
        layer_params_before = [layer_param_counts(layer) for layer in lm.adapter.layers]
        record = prune_model(lm, self.config, self.calib, progress=self.ctx.progress)
        save_checkpoint(lm, out / "model", {"source_model": self.model, "source": lm.source, **record})
        return {**record, "shapes_before": shapes_before, "layer_params_before": layer_params_before,
                "layer_params_after": [layer_param_counts(layer) for layer in lm.adapter.layers],
                "checkpoint": "model"}

    def _stream(self, out: Path) -> PruneResult:
        from edgeprune.prune import prune_checkpoint
        from edgeprune.stream_prune import layer_summary
        from edgeprune.streaming import source_dir

        record = prune_checkpoint(self.model, self.config, self.calib, out / "model", self.load,
                                  progress=self.ctx.progress)
        before, after = layer_summary(source_dir(self.model)), layer_summary(out / "model")
        return {**record, "shapes_before": before["shapes"], "layer_params_before": before["layer_params"],
                "layer_params_after": after["layer_params"], "checkpoint": "model"}


@dataclass
class ArtifactStage(Stage):
    """A stage about one artifact (variant, format, dtype); it reads the export stage's artifact."""

    ctx: Context
    variant: str
    format: str
    dtype: str
    kind: ClassVar[str] = ""
    verb: ClassVar[str] = ""

    def __post_init__(self):
        self.name = StageId(self.kind, self.variant, self.format, self.dtype).name
        self.deps = (StageId("export", self.variant, self.format, self.dtype).name,)
        self.title = f"{self.verb} {self.variant} {self.format} {self.dtype}"

    @property
    def artifact(self) -> Path:
        return artifact_dir(self.ctx.run_dir, self.variant, self.format, self.dtype)

    def ids(self) -> dict:
        return {"variant": self.variant, "format": self.format, "dtype": self.dtype}

    def not_exported(self) -> str | None:
        """Why the export stage wrote no artifact (the format cannot hold this model), or None."""
        export = read_stage(stage_dir(self.ctx.run_dir, self.deps[0])) or {}
        return (export.get("result") or {}).get("skipped")


@dataclass
class ExportStage(ArtifactStage):
    """Export one artifact and check its parity."""

    model: str
    model_fp: str
    optimize: bool
    kind: ClassVar[str] = "export"
    verb: ClassVar[str] = "export"

    def __post_init__(self):
        super().__post_init__()
        self.deps = () if self.variant == "baseline" else ("prune",)

    def inputs(self) -> dict:
        return {"format": self.format, "dtype": self.dtype, "optimize": self.optimize,
                **({"model": self.model_fp} if self.variant == "baseline" else {})}

    def run(self, out: Path) -> ExportResult:
        from edgeprune.errors import FormatUnsupported, first_line
        from edgeprune.export.artifacts import export_artifact

        art = out / "artifact"  # (self.artifact once the stage is in place)
        try:
            with self.ctx.spinner(f"exporting {self.variant} {self.format} {self.dtype}"):
                info = export_artifact(self.ctx.model_spec(self.variant, self.model), self.format, self.dtype, art,
                                       self.optimize)
        except FormatUnsupported as e:  # the run goes on; the report says why this artifact is missing
            shutil.rmtree(art, ignore_errors=True)
            self.ctx.console.print(f"  not exported: {first_line(e)}", highlight=False)
            return {**self.ids(), "skipped": first_line(e)}
        files = {p.name: p.stat().st_size for p in art.iterdir() if p.is_file()}
        model_files = [n for n in files if n.startswith("model.") and n != MANIFEST]
        return {"variant": self.variant, "format": self.format, "dtype": self.dtype, "artifact": "artifact",
                "size_bytes": sum(files[n] for n in model_files), "files": files,
                "parity": info.get("parity", {}), "export_seconds": info.get("seconds")}


@dataclass
class ArtifactPPLStage(ArtifactStage):
    """PPL of one artifact in its own runtime, on the same tokens as PyTorch's."""

    text: Text
    ev: EvaluateSection
    kind: ClassVar[str] = "ppl"
    verb: ClassVar[str] = "PPL of"

    def inputs(self) -> dict:
        keys = {"seq_len": self.ev.seq_len, "max_tokens": self.ev.max_tokens, "batch_size": self.ev.batch_size,
                "text": self.text.sha256}
        if self.format == "onnx":  # onnxruntime's windows start with the tokenizer's BOS since this protocol
            keys["protocol"] = "special-prefix"
        return keys

    def run(self, out: Path) -> ArtifactPPLResult:
        from edgeprune.errors import EdgePruneError

        if why := self.not_exported():
            return {**self.ids(), "skipped": why}
        ev = self.ev
        art = self.artifact
        ids = None
        if (art / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            ids = Tokenizer.from_file(str(art / "tokenizer.json")).encode(self.text.text,
                                                                           add_special_tokens=False).ids
        with self.ctx.spinner(f"PPL of {self.variant} {self.format} {self.dtype}"):
            if self.format == "onnx":
                from edgeprune.devices.ort_generate import OrtGenerator

                if ids is None:
                    raise EdgePruneError(f"no tokenizer.json in {art}")
                gen = OrtGenerator(art, threads=ev.threads or None)
                r = gen.perplexity(ids, ev.seq_len, max_tokens=ev.max_tokens or None, batch_size=ev.batch_size)
                r["runtime"] = "onnxruntime"
            else:
                from edgeprune.export.gguf import gguf_perplexity

                r = gguf_perplexity(art / "model.gguf", self.text, ev.seq_len, ev.max_tokens or None,
                                    token_ids=ids, n_threads=ev.threads or None)
                r["runtime"] = "llama.cpp"
        r.update(text=self.text.name, text_sha256=self.text.sha256, variant=self.variant, format=self.format,
                 dtype=self.dtype)
        return r


@dataclass
class ProfileStage(ArtifactStage):
    """Profile one artifact with the configured device profile, on the machine ``target`` names (this one, or a
    device over SSH); that machine's identity is part of the key."""

    prof: ProfileSection
    target: Target
    kind: ClassVar[str] = "profile"
    verb: ClassVar[str] = "profile"

    def __post_init__(self):
        super().__post_init__()
        self.title += f" on {self.prof.device}" + (f" at {self.target.label}" if self.target.remote else "")

    def inputs(self) -> dict:
        from edgeprune.pipeline.profiling import CONNECTION, PROFILER

        settings = {k: v for k, v in section_dict(self.prof).items() if k not in CONNECTION}
        return {**settings, "profiler": PROFILER, "machine": self.target.identity()["key"]}

    def run(self, out: Path) -> ProfileResult:
        from edgeprune.devices.remote import measured_on
        from edgeprune.pipeline.profiling import summarize_profile

        if why := self.not_exported():
            return {**self.ids(), "device": self.prof.device, "skipped": why}
        art = self.artifact
        with self.ctx.spinner(f"profiling {self.variant} {self.format} {self.dtype} on {self.target.label}"):
            raw = self.target.profile(art, out / "profile.json")
        return {"variant": self.variant, "format": self.format, "dtype": self.dtype, "device": self.prof.device,
                **summarize_profile(raw, self.prof.prompt_tokens), "profile": "profile.json",
                "profiler": raw.get("schema"), "warnings": raw.get("warnings") or [],
                "measured_on": measured_on(raw), "identity": self.target.identity()}


@dataclass
class ReportStage(Stage):
    """Write the report; the result names its files (json, markdown, html), relative to the report directory."""

    ctx: Context
    ablation: Path | None  # the ablation table to copy into the run, when there is one
    ablation_sha256: str | None
    deps: tuple[str, ...] = ()
    name: str = REPORT
    title: str = "report"

    def inputs(self) -> dict:
        return {"ablation": self.ablation_sha256}

    def run(self, out: Path) -> dict[str, str]:
        from edgeprune.report import write_report

        copy = self.ctx.run_dir / ABLATION
        if self.ablation is not None:
            copy.parent.mkdir(exist_ok=True)
            shutil.copy2(self.ablation, copy)
        elif copy.exists():
            copy.unlink()
        paths = write_report(self.ctx.run_dir, out)
        return {name: str(p.relative_to(out)) for name, p in paths.items()}
