"""The teacher's next-token distributions for distillation, computed once and stored compactly, so the teacher
(the unpruned model) need not stay resident next to the student.

For every position of every training window the streamed pass keeps the teacher's ``k`` most likely tokens with
their log-probabilities (at the distillation temperature) and the log of the mass left over, i.e. the teacher's
distribution coarsened to k + 1 outcomes: the k tokens and "any other token". ``topk_kl`` is the exact KL
divergence from that coarsened teacher to the student coarsened the same way, so it is a proper KL (zero iff the
two agree on the k tokens and the rest mass) and equals the full KL when k is the vocabulary size. Storage is
windows x seq_len x k x 8 bytes (int32 index + float32 log-prob): 26 MB for the demo's 400 windows of 128 tokens
at k = 64, against 10 GB for full float32 logits. README "Scale" has the measurement behind the default k.

Not done here: the training loop (recover.py) and sharding across processes (the targets are indexed by window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_TOP_K = 64
_FLOOR = -1e4  # log-mass floor: keeps 0 * (-inf - -inf) out of the loss and its gradient


@dataclass
class TeacherTargets:
    indices: torch.Tensor  # [windows, seq, k] int32: the teacher's top-k tokens per position
    logprobs: torch.Tensor  # [windows, seq, k] float32: their log-probabilities at ``temperature``
    rest: torch.Tensor  # [windows, seq] float32: log of the teacher's remaining mass (floored)
    temperature: float = 1.0

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.indices[start:stop].long(), self.logprobs[start:stop], self.rest[start:stop]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.indices, self.logprobs, self.rest))


def _rest_logmass(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside ``idx`` (exact: a log-sum-exp over the other tokens)."""
    others = logits.scatter(-1, idx, float("-inf"))
    return (torch.logsumexp(others, -1) - torch.logsumexp(logits, -1)).clamp_min(_FLOOR)


def teacher_targets(model, windows: torch.Tensor, k: int = DEFAULT_TOP_K, temperature: float = 1.0,
                    batch_size: int = 8, progress: bool = True, autocast: bool = False) -> TeacherTargets:
    """One inference pass of ``model`` over ``windows`` keeping the top-``k`` log-probabilities per position
    (``autocast``: the model's products in bfloat16, the softmax statistics in float32)."""
    from tqdm.auto import tqdm

    from edgeprune.models.placement import input_device

    device = input_device(model)
    k = min(k, model.get_output_embeddings().weight.shape[0] - 1)  # keep a rest outcome: no all -inf sums
    n, s = windows.shape
    idx_all = torch.empty(n, s, k, dtype=torch.int32)
    lp_all = torch.empty(n, s, k, dtype=torch.float32)
    rest_all = torch.empty(n, s, dtype=torch.float32)
    was = model.training
    model.eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for b in tqdm(range(0, n, batch_size), desc="teacher targets", unit="batch", disable=not progress,
                      leave=False):
            logits = model(input_ids=windows[b:b + batch_size].to(device), use_cache=False).logits.float()
            logits = logits / temperature
            top, idx = logits.topk(k, dim=-1)
            idx_all[b:b + batch_size] = idx.int().cpu()
            lp_all[b:b + batch_size] = (top - torch.logsumexp(logits, -1, keepdim=True)).cpu()
            rest_all[b:b + batch_size] = _rest_logmass(logits, idx).cpu()
            del logits, top, idx
    model.train(was)
    return TeacherTargets(idx_all, lp_all, rest_all, temperature)


def topk_kl(student_logits: torch.Tensor, idx: torch.Tensor, logprobs: torch.Tensor, rest: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of KL(teacher_k || student_k) between the (k + 1)-outcome coarsenings, scaled by T^2 as
    ``recover.distillation_loss`` is."""
    z = student_logits.float() / temperature
    norm = torch.logsumexp(z, -1)
    idx = idx.to(z.device)
    s_top = z.gather(-1, idx) - norm[..., None]
    s_rest = _rest_logmass(z, idx)
    logprobs, rest = logprobs.to(z.device), rest.to(z.device)
    kl = (logprobs.exp() * (logprobs - s_top)).sum(-1) + rest.exp() * (rest - s_rest)
    return kl.mean() * temperature * temperature
