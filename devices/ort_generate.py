"""Text generation and perplexity over onnxruntime, for devices: imports only numpy, onnxruntime, tokenizers and
the standard library (no torch, no transformers).

Works with the graphs ``edgeprune.export.onnx`` writes (and optimum-style decoder graphs): inputs ``input_ids``,
``attention_mask``, optional ``position_ids`` and ``past_key_values.{i}.key/value``; outputs ``logits`` and
``present.{i}.key/value``. The KV head count of every layer is read from the graph's past inputs (pruned models
differ per layer; layers without attention have no past tensors), never from config.json.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32}


@dataclass
class Timing:
    """Latencies of the last ``generate`` call, in seconds."""

    prompt_tokens: int = 0
    ttft_s: float = 0.0  # prompt submitted -> first new token chosen (prefill + sampling)
    token_s: list[float] = field(default_factory=list)  # per new token after the first (decode steps)

    @property
    def new_tokens(self) -> int:
        return len(self.token_s) + (1 if self.ttft_s else 0)

    @property
    def decode_ms_per_token(self) -> float:
        return 1000 * sum(self.token_s) / len(self.token_s) if self.token_s else float("nan")

    @property
    def tokens_per_s(self) -> float:
        total = self.ttft_s + sum(self.token_s)
        return self.new_tokens / total if total else float("nan")

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens, "ttft_s": self.ttft_s,
                "decode_ms_per_token": self.decode_ms_per_token, "tokens_per_s": self.tokens_per_s}


class OrtGenerator:
    """Greedy or sampled generation, prefill logits and perplexity with an ONNX decoder.

    ``model_dir_or_onnx_path``: a directory with ``model.onnx`` (and ``tokenizer.json``, ``config.json``), or the
    .onnx file itself. ``providers``: onnxruntime execution providers (default CPU). ``threads``: intra-op threads
    (default: onnxruntime's choice).
    """

    def __init__(self, model_dir_or_onnx_path, providers: Sequence[str] | None = None, threads: int | None = None):
        path = Path(model_dir_or_onnx_path)
        if path.is_dir():
            path = path / "model.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX model at {model_dir_or_onnx_path}")
        self.path = path
        self.dir = path.parent
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=list(providers or ["CPUExecutionProvider"]))
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = set(inputs)
        self.output_names = [o.name for o in self.session.get_outputs()]
        past: dict[int, dict[str, object]] = {}
        for name, arg in inputs.items():
            m = _PAST.match(name)
            if m:
                past.setdefault(int(m.group(1)), {})[m.group(2)] = arg
        self.kv_layers = sorted(past)
        self.kv_heads = {i: int(past[i]["key"].shape[1]) for i in self.kv_layers}
        self.head_dims = {i: int(past[i]["key"].shape[3]) for i in self.kv_layers}
        self.past_dtype = {i: _NP_TYPES.get(past[i]["key"].type, np.float32) for i in self.kv_layers}
        self.has_position_ids = "position_ids" in inputs
        self.present_index = {}
        for j, name in enumerate(self.output_names):
            m = re.match(r"^present\.(\d+)\.(key|value)$", name)
            if m:
                self.present_index[(int(m.group(1)), m.group(2))] = j
        self.logits_index = self.output_names.index("logits")
        self.tokenizer = None
        if (self.dir / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(self.dir / "tokenizer.json"))
        self.eos_token_ids = self._read_eos()
        self.last_timing = Timing()
        self.last_logits: np.ndarray | None = None

    # ---- low level ----------------------------------------------------------------------------------------
    def _read_eos(self) -> set[int]:
        eos: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            f = self.dir / name
            if f.is_file():
                try:
                    value = json.loads(f.read_text()).get("eos_token_id")
                except (OSError, ValueError):
                    continue
                if isinstance(value, int):
                    eos.add(value)
                elif isinstance(value, list):
                    eos.update(int(v) for v in value)
        return eos

    def empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Past tensors of length 0 (the first step), keyed by input name."""
        return {f"past_key_values.{i}.{kind}": np.zeros((batch, self.kv_heads[i], 0, self.head_dims[i]),
                                                         dtype=self.past_dtype[i])
                for i in self.kv_layers for kind in ("key", "value")}

    def forward(self, input_ids, past: dict | None = None, attention_mask=None, position_ids=None):
        """One run of the graph. Returns ``(logits [b, s, vocab] float32, presents)``; ``presents`` is keyed by
        past input name, ready to be the next call's ``past``. ``attention_mask`` covers past + new tokens
        (default: all ones); ``position_ids`` default to the running count of unmasked tokens."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        b, s = ids.shape
        past = past if past is not None else self.empty_past(b)
        past_len = next(iter(past.values())).shape[2] if past else 0
        if attention_mask is None:
            attention_mask = np.ones((b, past_len + s), dtype=np.int64)
        mask = np.asarray(attention_mask, dtype=np.int64)
        if past and mask.shape[1] != past_len + s:
            raise ValueError(f"attention_mask covers {mask.shape[1]} tokens, expected {past_len + s}")
        feeds = {"input_ids": ids, "attention_mask": mask, **past}
        if self.has_position_ids:
            if position_ids is None:
                position_ids = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, mask.shape[1] - s:]
            feeds["position_ids"] = np.asarray(position_ids, dtype=np.int64)
        outs = self.session.run(None, feeds)
        presents = {f"past_key_values.{i}.{kind}": outs[j] for (i, kind), j in self.present_index.items()}
        logits = outs[self.logits_index]
        return (logits if logits.dtype == np.float32 else logits.astype(np.float32)), presents

    def prefill(self, input_ids, attention_mask=None) -> np.ndarray:
        """Logits [batch, seq, vocab] of a prompt (past length 0)."""
        return self.forward(input_ids, attention_mask=attention_mask)[0]

    # ---- text -----------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"no tokenizer.json in {self.dir}")
        return self.tokenizer.encode(text).ids

    def special_prefix(self) -> list[int]:
        """The ids the tokenizer puts before any text (Gemma's BOS; none for SmolLM2), as ``encode`` adds them."""
        if self.tokenizer is None:
            return []
        plain = self.tokenizer.encode("a", add_special_tokens=False).ids
        full = self.tokenizer.encode("a").ids
        return full[: len(full) - len(plain)] if plain and full[len(full) - len(plain):] == plain else []

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise ValueError(f"no tokenizer.json in {self.dir}")
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate(self, prompt, max_new_tokens: int = 32, greedy: bool = True, use_cache: bool = True,
                 temperature: float = 1.0, top_k: int = 0, seed: int | None = None, stop_at_eos: bool = True,
                 on_token: Callable[[int, float], None] | None = None, keep_logits: bool = False) -> list[int]:
        """Generate up to ``max_new_tokens`` tokens after ``prompt`` (text or token ids); returns the new ids.

        ``use_cache=False`` recomputes the whole sequence every step (the reference for the cache). Timing of the
        call is in ``self.last_timing`` (time to first token, per-token latency); ``on_token(id, seconds)`` is
        called for every new token with its latency. ``keep_logits``: keep the logits each new token was chosen
        from in ``self.last_logits`` ([new_tokens, vocab] float32).
        """
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in np.asarray(prompt).reshape(-1)]
        if not ids:
            raise ValueError("empty prompt")
        rng = np.random.default_rng(seed)
        timing = Timing(prompt_tokens=len(ids))
        seq = list(ids)
        out: list[int] = []
        past = None
        step_input = ids
        kept = []
        for step in range(max_new_tokens):
            t0 = time.perf_counter()
            if use_cache:
                logits, past = self.forward(np.array([step_input], dtype=np.int64), past=past)
            else:
                logits, _ = self.forward(np.array([seq], dtype=np.int64))
            nxt = self._pick(logits[0, -1], greedy, temperature, top_k, rng)
            if keep_logits:
                kept.append(logits[0, -1].copy())
            dt = time.perf_counter() - t0
            if step == 0:
                timing.ttft_s = dt
            else:
                timing.token_s.append(dt)
            out.append(nxt)
            seq.append(nxt)
            step_input = [nxt]
            if on_token is not None:
                on_token(nxt, dt)
            if stop_at_eos and nxt in self.eos_token_ids:
                break
        self.last_timing = timing
        self.last_logits = np.stack(kept) if kept else None
        return out

    @staticmethod
    def _pick(logits: np.ndarray, greedy: bool, temperature: float, top_k: int, rng) -> int:
        if greedy:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / max(temperature, 1e-6)
        if top_k and top_k < z.size:
            cut = np.partition(z, -top_k)[-top_k]
            z = np.where(z < cut, -np.inf, z)
        z = np.exp(z - z.max())
        return int(rng.choice(z.size, p=z / z.sum()))

    # ---- evaluation -----------------------------------------------------------------------------------------
    def perplexity(self, ids, seq_len: int = 128, max_tokens: int | None = None, batch_size: int = 1) -> dict:
        """PPL with edgeprune's protocol (``edgeprune.evaluate.ppl``): non-overlapping windows of ``seq_len`` text
        tokens (last partial window dropped), each scored independently after the tokenizer's special prefix (an
        unscored BOS for Gemma, which is several times worse without it), PPL = exp(mean NLL over all predicted
        tokens)."""
        if seq_len < 2:
            raise ValueError("seq_len must be at least 2")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if max_tokens is not None:
            ids = ids[:max_tokens]
        n = ids.size // seq_len
        if n == 0:
            raise ValueError(f"{ids.size} tokens are fewer than one window of {seq_len}")
        prefix = self.special_prefix()
        windows = ids[: n * seq_len].reshape(n, seq_len)
        windows = np.concatenate([np.tile(np.asarray(prefix, dtype=np.int64), (n, 1)), windows], 1)
        skip = len(prefix)  # the predictions made at the prefix (of the window's first token) are not scored
        nll, count = 0.0, 0
        start = time.perf_counter()
        for b in range(0, n, batch_size):
            batch = windows[b : b + batch_size]
            logits = self.prefill(batch)[:, skip:-1].astype(np.float32)
            target = batch[:, skip + 1:]
            m = logits.max(axis=-1, keepdims=True)
            lse = np.log(np.exp(logits - m).sum(axis=-1)) + m[..., 0]
            picked = np.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
            nll += float((lse - picked).astype(np.float64).sum())
            count += target.size
        mean = nll / count
        return {"ppl": math.exp(mean), "nll": mean, "seq_len": seq_len, "windows": n,
                "tokens_scored": n * seq_len, "prefix": prefix, "seconds": time.perf_counter() - start}

    def benchmark(self, prompt_tokens: int = 128, new_tokens: int = 32, repeats: int = 3) -> dict:
        """Prefill latency of ``prompt_tokens`` tokens and decode ms/token (median over ``repeats``)."""
        rng = np.random.default_rng(0)
        ids = rng.integers(10, 1000, prompt_tokens).tolist()  # ids every tokenizer has
        self.forward(np.array([ids[:8]]))  # warm up
        prefill, decode = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.prefill(np.array([ids]))
            prefill.append(time.perf_counter() - t0)
            self.generate(ids, max_new_tokens=new_tokens, stop_at_eos=False)
            decode.append(self.last_timing.decode_ms_per_token)
        prefill.sort()
        decode.sort()
        return {"prefill_ms": 1000 * prefill[len(prefill) // 2], "decode_ms_per_token": decode[len(decode) // 2],
                "prompt_tokens": prompt_tokens, "new_tokens": new_tokens}
