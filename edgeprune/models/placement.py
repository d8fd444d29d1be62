"""Where a model's weights live and in which float type: the ``device`` and ``dtype`` that ``load`` takes.

- ``dtype``: the working dtype of the weights, ``float32``, ``bfloat16`` or ``float16``. Statistics, Gram
  matrices and score sums are accumulated in float32/float64 by the algorithms whatever this is.
- ``device``: ``cpu``, ``cuda`` (the current GPU), ``cuda:N``, or ``auto``: every visible GPU through
  accelerate's big-model ``device_map="auto"`` (whole decoder layers spread over the GPUs), the CPU when torch
  sees no GPU. A model that does not fit on the GPUs is refused: accelerate would offload layers to CPU or disk
  (weights on the ``meta`` device between forward passes), which the statistics hooks, surgery and refit cannot
  work on.

This module only names and validates placements and moves tensors; it does not decide how much memory a stage
needs, and it never moves a model that accelerate has dispatched (``hf_device_map``) as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeprune.errors import EdgePruneError

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda", "cuda:N", "auto")


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu", "cuda:N" or "auto" (a device map over the GPUs)
    dtype: str  # one of DTYPES

    @property
    def torch_dtype(self):
        return torch_dtype(self.dtype)

    def from_pretrained_kwargs(self) -> dict:
        """What ``from_pretrained`` needs to build the model in place (no full CPU copy on a GPU)."""
        kw = {"dtype": self.torch_dtype}
        if self.device == "auto":
            kw["device_map"] = "auto"
        elif self.device != "cpu":
            kw["device_map"] = {"": self.device}
        return kw


def torch_dtype(name: str):
    import torch

    if isinstance(name, torch.dtype):
        name = str(name).removeprefix("torch.")
    if name not in DTYPES:
        raise EdgePruneError(f"unknown dtype '{name}'; choose from {', '.join(DTYPES)}")
    return getattr(torch, name)


def dtype_name(dtype) -> str:
    """'float32' for torch.float32 (the inverse of torch_dtype)."""
    return str(dtype).removeprefix("torch.")


def resolve(device: str = "cpu", dtype: str = "float32") -> Placement:
    """Validate ``device`` and ``dtype``; one-line errors for unknown names and for CUDA without a GPU."""
    import torch

    dtype = dtype_name(torch_dtype(dtype))
    dev = str(device).strip().lower()
    if dev == "cpu":
        return Placement("cpu", dtype)
    if dev == "auto":
        return Placement("auto" if torch.cuda.is_available() else "cpu", dtype)
    if dev == "cuda" or dev.startswith("cuda:"):
        index = dev.partition(":")[2]
        if index and not index.isdigit():
            raise EdgePruneError(f"unknown device '{device}'; choose from {', '.join(DEVICES)}")
        if not torch.cuda.is_available():
            raise EdgePruneError(f"device '{device}' needs CUDA, but this torch has none "
                                 f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        n = torch.cuda.device_count()
        i = int(index) if index else torch.cuda.current_device()
        if i >= n:
            raise EdgePruneError(f"device '{device}' does not exist: torch sees {n} GPU(s)")
        return Placement(f"cuda:{i}", dtype)
    raise EdgePruneError(f"unknown device '{device}'; choose from {', '.join(DEVICES)}")


def place(model, device: str = "cpu", dtype: str = "float32"):
    """Move and cast an already built model (e.g. a tiny test model) to a placement. ``auto`` dispatches it
    with accelerate over the visible GPUs. Returns the model."""
    p = resolve(device, dtype)
    for param in model.parameters():  # not model.to(dtype): the rotary inv_freq buffers stay float32, as
        param.data = param.data.to(p.torch_dtype)  # from_pretrained(dtype=...) leaves them
    if p.device == "auto":
        from accelerate import dispatch_model, infer_auto_device_map

        no_split = getattr(model, "_no_split_modules", None) or []
        dmap = infer_auto_device_map(model, no_split_module_classes=no_split, dtype=p.torch_dtype)
        return dispatch_model(model, dmap)
    return model.to(p.device)


def check_resident(model) -> None:
    """One-line error when accelerate offloaded part of ``model`` to CPU or disk (see the module docstring)."""
    dmap = getattr(model, "hf_device_map", None) or {}
    gpus = {d for d in dmap.values() if str(d) not in ("cpu", "disk")}
    off = sorted({str(d) for d in dmap.values() if str(d) in ("cpu", "disk")})
    if off and gpus:
        raise EdgePruneError(f"the model does not fit on the GPUs: accelerate offloaded layers to {', '.join(off)}, "
                             "which edgeprune cannot prune; use more GPUs, --dtype bfloat16, or --device cpu")


def native_bf16(device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively, so bf16 autocast speeds training up: a CUDA
    GPU that supports bf16, or a CPU with AVX512-BF16 or AMX (Linux: /proc/cpuinfo). Elsewhere bf16 is emulated and
    slower than float32 (measured: 2.3x faster here, on AVX512-BF16, for a 512 x 576 x 1536 MLP step)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def input_device(model):
    """The device the token ids must be on: the input embedding's."""
    return model.get_input_embeddings().weight.device


def model_dtype(model):
    """The working dtype: the dtype of the decoder's floating-point weights (the embedding's)."""
    return model.get_input_embeddings().weight.dtype
