"""Calibration and evaluation text.

A text spec is one of:
- ``builtin`` (the offline default): English documentation that ships with Python (``pydoc_data.topics``),
  split by topic into disjoint calibration (80%) and evaluation (20%) parts. Needs no download.
- a local text file, or a directory of ``*.txt``/``*.raw`` files. WikiText raw files (``wiki.*.raw``) are joined
  the standard way (the HF rows, joined with blank lines, as GPTQ/Wanda/LLM-Pruner do).
- ``auto`` or a list of specs (``resolve_text``): the first that exists; ``auto`` is WikiText-2 under
  ``$EDGEPRUNE_DATA`` (valid for calibration, test for evaluation), else ``builtin``.
- a dataset name, ``wikitext2``, ``ptb`` or ``c4``, fetched with HF ``datasets`` (online users only):
  calibration reads the train split, evaluation the test (validation for c4) split.

Calibration and evaluation text never overlap for ``builtin`` and dataset names; for files, pass different
files (e.g. WikiText-2 valid for calibration, test for evaluation).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgeprune.errors import EdgePruneError

Split = Literal["calib", "eval"]
BUILTIN = "builtin"
DATASETS = ("wikitext2", "ptb", "c4")


@dataclass
class Text:
    text: str
    name: str  # what the spec resolved to, for manifests

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def load_text(spec: str = BUILTIN, split: Split = "eval") -> Text:
    if spec == BUILTIN:
        return Text(_builtin_text(split), f"builtin:{split}")
    path = Path(spec).expanduser()
    if path.is_file():
        return Text(_read_file(path), str(path))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".raw") and p.is_file())
        if not files:
            raise EdgePruneError(f"no .txt or .raw files in directory {path}")
        return Text("\n\n".join(_read_file(p) for p in files), str(path))
    if spec in DATASETS:
        return Text(_dataset_text(spec, split), f"{spec}:{split}")
    raise EdgePruneError(
        f"text not found: {spec} (expected a file, a directory, '{BUILTIN}' or one of {', '.join(DATASETS)})"
    )


def resolve_text(spec: str | list[str], split: Split = "eval") -> Text:
    """The first of a list of specs that exists ('builtin' always does); ``auto`` is WikiText-2 under the data
    directory, else builtin (edgeprune.config.text_candidates)."""
    from edgeprune.config import text_candidates

    candidates = text_candidates(spec, split)
    if len(candidates) == 1:  # one spec: its own error when it is missing
        return load_text(candidates[0], split)
    for c in candidates:
        if c == BUILTIN or c in DATASETS or Path(c).expanduser().exists():
            return load_text(c, split)
    raise EdgePruneError(f"none of the {split} texts exist: {', '.join(candidates)}")


def _read_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EdgePruneError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise EdgePruneError(f"cannot read {path}: {e.strerror}") from None
    if path.name.startswith("wiki.") and path.suffix == ".raw":
        return wikitext_join(text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"))
    return text


def wikitext_join(lines: list[str]) -> str:
    """The standard WikiText PPL text: HF dataset rows (line + newline, blank lines empty) joined by blank lines."""
    return "\n\n".join(line + "\n" if line.strip() else "" for line in lines)


def _builtin_text(split: Split) -> str:
    from pydoc_data.topics import topics

    def is_eval(key: str) -> bool:  # a stable hash split: each topic lands in exactly one part
        return hashlib.sha256(key.encode()).digest()[0] % 5 == 0

    def paragraphs(keys):
        return [p for k in sorted(keys) for p in topics[k].strip().split("\n\n") if p.strip()]

    eval_paras = paragraphs(k for k in topics if is_eval(k))
    if split == "eval":
        return "\n\n".join(eval_paras)
    # topics repeat some paragraphs verbatim: keep those on the evaluation side only
    seen = set(eval_paras)
    return "\n\n".join(p for p in paragraphs(k for k in topics if not is_eval(k)) if p not in seen)


def _dataset_text(name: str, split: Split) -> str:
    try:
        from datasets import load_dataset
    except ImportError:
        raise EdgePruneError(f"'{name}' needs the `datasets` package: pip install 'edgeprune[datasets]'") from None
    try:
        if name == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="train" if split == "calib" else "test")
            return "\n\n".join(ds["text"])
        if name == "ptb":
            ds = load_dataset("ptb_text_only", "penn_treebank", split="train" if split == "calib" else "test")
            return " ".join(ds["sentence"])
        files = {"calib": "en/c4-train.00000-of-01024.json.gz", "eval": "en/c4-validation.00000-of-00008.json.gz"}
        ds = load_dataset("allenai/c4", data_files={"x": files[split]}, split="x")
        return "\n\n".join(ds.select(range(min(len(ds), 5000)))["text"])
    except Exception as e:
        raise EdgePruneError(f"cannot fetch dataset {name}: {str(e).splitlines()[0] if str(e) else e}") from None


def tokenize(tokenizer, text: Text | str):
    """The whole text as one 1-D LongTensor of token ids, without special tokens."""
    import torch

    raw = text.text if isinstance(text, Text) else text
    ids = tokenizer(raw, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def bos_prefix(tokenizer) -> int | None:
    """The BOS token id when the tokenizer adds one by default (Gemma: the model expects it at position 0 and is
    far worse without it), else None (SmolLM2's GGUF says not to add one)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", return_attention_mask=False)["input_ids"]
    return bos if ids and ids[0] == bos else None


def calibration_batches(tokenizer, text: Text, n_samples: int = 64, seq_len: int = 128, seed: int = 0):
    """``n_samples`` windows of ``seq_len`` tokens at seeded random offsets: a (n_samples, seq_len) tensor. When
    the tokenizer adds a BOS token by default, each window is BOS followed by ``seq_len - 1`` text tokens."""
    import torch

    if n_samples < 1 or seq_len < 2:
        raise EdgePruneError("calibration needs at least 1 sample of at least 2 tokens")
    ids = tokenize(tokenizer, text)
    if ids.numel() < seq_len + 1:
        raise EdgePruneError(
            f"calibration text '{text.name}' has {ids.numel()} tokens, fewer than --seq-len {seq_len} + 1"
        )
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - seq_len) for _ in range(n_samples)]
    windows = torch.stack([ids[s : s + seq_len] for s in starts])
    bos = bos_prefix(tokenizer)
    if bos is not None:
        windows[:, 1:] = windows[:, :-1].clone()
        windows[:, 0] = bos
    return windows
