"""Perplexity with the standard protocol: the whole text tokenized once, cut into non-overlapping windows of
``seq_len`` tokens (the last partial window dropped), every window scored independently, PPL = exp(mean NLL)
over all predicted tokens. When the tokenizer adds a BOS token by default (Gemma), every window is scored after a
BOS prefix that is not itself predicted, so the same text tokens are predicted as for models without one."""

from __future__ import annotations

import math
import time

from edgeprune.data import Text, bos_prefix, tokenize
from edgeprune.errors import EdgePruneError


def perplexity(model, tokenizer, text: Text, seq_len: int = 128, max_tokens: int | None = None,
               batch_size: int = 8, progress: bool = True) -> dict:
    import torch
    from tqdm.auto import tqdm

    from edgeprune.models.placement import input_device

    if seq_len < 2:
        raise EdgePruneError("--seq-len must be at least 2")
    ids = tokenize(tokenizer, text)
    total_tokens = ids.numel()
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise EdgePruneError(
            f"evaluation text '{text.name}' has {ids.numel()} tokens, fewer than one window of --seq-len {seq_len}"
        )
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    bos = bos_prefix(tokenizer)
    skip = 0
    if bos is not None:
        windows = torch.cat([torch.full((n_windows, 1), bos, dtype=windows.dtype), windows], 1)
        skip = 1  # the prediction made at BOS (of the window's first token) is not scored
    nll_sum, count = 0.0, 0
    start = time.perf_counter()
    model.eval()
    with torch.inference_mode(), tqdm(total=n_windows, desc=f"PPL@{seq_len}", unit="win",
                                      disable=not progress, leave=False) as bar:
        for b in range(0, n_windows, batch_size):
            batch = windows[b : b + batch_size].to(input_device(model))
            logits = model(input_ids=batch, use_cache=False).logits[:, skip:-1].float()
            target = batch[:, 1 + skip :]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum"
            )
            nll_sum += nll.item()
            count += target.numel()
            bar.update(batch.size(0))
    mean_nll = nll_sum / count
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "seq_len": seq_len,
        "windows": n_windows,
        "tokens_scored": n_windows * seq_len,
        "tokens_in_text": total_tokens,
        "max_tokens": max_tokens,
        "text": text.name,
        "text_sha256": text.sha256,
        "seconds": time.perf_counter() - start,
    }
