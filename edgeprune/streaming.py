"""Models larger than memory: a model whose decoder layers stay in their safetensors files until a pass needs one.

``StreamedModel(dir)`` builds the model skeleton on the ``meta`` device (accelerate's ``init_empty_weights``: no
parameter storage, buffers such as the rotary frequencies stay real), materialises everything that is not a
decoder layer (embeddings, final norm, lm_head: the "resident" part) and then one decoder layer at a time on
request (``with sm.layer(i) as layer``), read tensor by tensor with safetensors' ``safe_open`` and put in place
with accelerate's ``set_module_tensor_to_device``. Leaving the block returns the layer to ``meta``, so at most one
layer's weights (plus what a pass holds) are resident. ``LayerShardWriter`` writes a checkpoint the same way: one
safetensors shard per decoder layer as soon as it is pruned, the resident part, the index and the config last.
A ``StreamedModel`` also fixes glibc's malloc thresholds for the process (``edgeprune.heap.bound_heap``), so the
passes' freed temporaries leave the process instead of growing the heap.

The passes that use it live in ``edgeprune.stream_prune``. This module does not score or cut anything, does not
read GGUF files (a GGUF model streams from its safetensors cache, see ``source_dir``) and does not run whole-model
forward passes over decoder layers (a layer on ``meta`` cannot compute).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from edgeprune.errors import EdgePruneError
from edgeprune.heap import bound_heap, trim_heap

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def source_dir(spec: str) -> Path:
    """The safetensors directory a model spec streams from: a model directory as is; a packaged model name
    (``default``, ``gemma3-270m``) or a ``.gguf`` file through its safetensors cache (written by one ordinary load the first time)."""
    from edgeprune.models.loader import gguf_cache_path, packaged_gguf

    path = Path(spec).expanduser()
    gguf = packaged_gguf(spec) or (path if path.suffix == ".gguf" else None)
    if gguf is not None:
        cached = gguf_cache_path(gguf)
        if not (cached / "manifest.json").is_file():
            from edgeprune.models import load

            load(spec)  # dequantizes once and writes the cache
        if not (cached / "manifest.json").is_file():
            raise EdgePruneError(f"streaming {spec} needs its safetensors cache, which could not be written")
        return cached
    if not path.is_dir():
        raise EdgePruneError(f"streaming needs a local model directory with safetensors weights, not {spec}")
    return path


def tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (a single file or a sharded index)."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / SINGLE_FILE
    if not single.is_file():
        raise EdgePruneError(f"{path} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}); "
                             "streaming cannot read .bin checkpoints")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)


def skeleton(path: Path, dtype: torch.dtype = torch.float32):
    """The model built on ``meta`` (parameters only) from the directory's config, with per-layer widths."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgeprune.adapters import check_model_type
    from edgeprune.models.loader import read_config

    model_type = read_config(path).get("model_type", "?")
    check_model_type(model_type)
    with init_empty_weights():
        if model_type.startswith("edgeprune_"):
            from edgeprune.adapters.families import remote_layout
            from edgeprune.models import remote_code

            family = model_type.removeprefix("edgeprune_")
            config_cls, cls = remote_code.make_classes(family, remote_layout(family))
            model = cls(config_cls.from_pretrained(path))
        else:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    model.to(dtype)  # meta parameters take the working dtype; buffers (rotary frequencies) are float32 anyway
    model.requires_grad_(False)  # kept when materialised: a pass that wants gradients asks for them per weight
    return model.eval()


class StreamedModel:
    """A causal LM with its decoder layers on disk. ``model``/``adapter`` are the usual objects, except that a
    decoder layer has real weights only inside ``with self.layer(i)``."""

    def __init__(self, path: str | Path, dtype: str = "float32"):
        from edgeprune.adapters import get_adapter
        from edgeprune.models.loader import quiet_transformers

        if dtype not in DTYPES:
            raise EdgePruneError(f"unknown dtype '{dtype}'; choose from {', '.join(DTYPES)}")
        quiet_transformers()
        bound_heap()  # streaming is the memory-first mode: a pass's freed temporaries must not stay resident
        self.path = Path(path)
        self.dtype = DTYPES[dtype]
        self.files = tensor_files(self.path)
        try:
            self.model = skeleton(self.path, self.dtype)
        except EdgePruneError:
            raise
        except Exception as e:
            from edgeprune.errors import first_line

            raise EdgePruneError(f"cannot build the model skeleton of {path}: {first_line(e)}") from None
        self.adapter = get_adapter(self.model)
        self._names = {id(m): n for n, m in self.model.named_modules()}
        self._layer_ids = {id(layer.layer) for layer in self.adapter.layers}
        self._resident = self._resident_names()  # fixed now: dropping layers renumbers the layer names
        self._materialise(self._resident)
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.adapter.lm_head.weight = self.adapter.embed_tokens.weight

    # ---- names --------------------------------------------------------------------------------------------
    def prefix(self, module: torch.nn.Module) -> str:
        """The state-dict prefix of a module of the skeleton (``model.layers.3.``)."""
        return self._names[id(module)] + "."

    def resident_names(self) -> list[str]:
        """Parameter names outside the decoder layers (a tied lm_head is left out: it is the embedding)."""
        return list(self._resident)

    def _resident_names(self) -> list[str]:
        layer_prefixes = tuple(self.prefix(layer.layer) for layer in self.adapter.layers)
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        head = self.prefix(self.adapter.lm_head) + "weight"
        return [n for n, _ in self.model.named_parameters(remove_duplicate=False)
                if not n.startswith(layer_prefixes) and not (tied and n == head)]

    def layer_names(self, index: int) -> list[str]:
        layer = self.adapter.layers[index].layer
        pre = self.prefix(layer)
        return [pre + n for n, _ in layer.named_parameters()]

    # ---- reading ------------------------------------------------------------------------------------------
    def _materialise(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise EdgePruneError(f"{self.path}: tensor {name} is missing from the safetensors files")
            by_file.setdefault(self.files[name], []).append(name)
        for file, group in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for name in group:
                    value = f.get_tensor(name).to(self.dtype)
                    set_module_tensor_to_device(self.model, name, "cpu", value=value)

    @contextlib.contextmanager
    def layer(self, index: int) -> Iterator:
        """Decoder layer ``index`` with real weights (a LayerAdapter); back on ``meta`` afterwards, with
        whatever shapes surgery gave it inside the block."""
        adapter = self.adapter.layers[index]
        self._materialise(self.layer_names(index))
        try:
            yield adapter
        finally:
            release(adapter.layer)
            trim_heap()

    def layer_bytes(self) -> int:
        """Bytes of the largest decoder layer in the working dtype (what one materialised layer costs)."""
        size = torch.finfo(self.dtype).bits // 8
        return max(sum(p.numel() for p in layer.layer.parameters()) * size for layer in self.adapter.layers)

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path, trust_remote_code=False)


def release(module: torch.nn.Module) -> None:
    """Put a module's parameters back on ``meta`` (frees their storage, keeps their shapes)."""
    module.to("meta")


class LayerShardWriter:
    """Write a checkpoint one decoder layer at a time: ``add`` saves a shard right away, ``finish`` adds the
    resident tensors and the sharded index. Used inside an ``atomic_dir``, so a crash leaves nothing."""

    def __init__(self, out: Path, n_shards: int):
        self.out = Path(out)
        self.n_shards = n_shards
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self._next = 1

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if self._next > self.n_shards:
            raise ValueError("more shards than announced")
        name = f"model-{self._next:05d}-of-{self.n_shards:05d}.safetensors"
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(self.out / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            self.weight_map[k] = name
            self.total += v.numel() * v.element_size()
        self._next += 1

    def finish(self) -> None:
        if self._next != self.n_shards + 1:
            raise ValueError(f"wrote {self._next - 1} shards, announced {self.n_shards}")
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def layer_state(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A materialised module's parameters and persistent buffers under ``prefix``."""
    return {prefix + k: v for k, v in module.state_dict().items()}


def write_config(sm: StreamedModel, out: Path) -> str:
    """config.json of the (pruned) skeleton, in the format ``checkpoint.save_checkpoint`` writes: the base
    family's config when every layer has the same widths, else per-layer lists with ``modeling_edgeprune.py``.
    Returns the layout."""
    from edgeprune.checkpoint import finish_config

    adapter = sm.adapter
    adapter.sync_config()
    config = sm.model.config
    config.architectures = [type(sm.model).__name__]
    config.dtype = str(sm.dtype).removeprefix("torch.")
    config.save_pretrained(out)
    return finish_config(adapter, out)
