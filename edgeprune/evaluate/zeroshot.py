"""Zero-shot multiple-choice accuracy (PIQA, ARC-Easy/Challenge, BoolQ, OpenBookQA), following lm-eval-harness.

Each choice is scored by the summed log-probability of its continuation tokens given the context. ``acc`` takes
the argmax of that sum; ``acc_norm`` divides it by the length of the answer text first (characters of the answer
without the leading " " delimiter, exactly as lm-eval's ``completion_len``), which removes the bias towards
short answers. Prompts and tokenization mirror lm-eval's default task configs, so numbers are comparable.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeprune.errors import EdgePruneError

TASKS: tuple[str, ...] = ("piqa", "arc_easy", "arc_challenge", "boolq", "openbookqa")
_FILES = {
    "piqa": "piqa/valid.jsonl",
    "arc_easy": "arc_easy/arc_easy.jsonl",
    "arc_challenge": "arc_challenge/arc_challenge.jsonl",
    "boolq": "boolq/boolq.jsonl",
    "openbookqa": "openbookqa/openbook_qa.jsonl",
}
_PIQA_LABELS = "piqa/valid-labels.lst"
DELIMITER = " "  # lm-eval's target_delimiter between context and answer


@dataclass
class Example:
    context: str
    choices: list[str]  # continuations, each starting with DELIMITER
    gold: int


def task_files(name: str) -> list[str]:
    """The files of one task, relative to the tasks directory."""
    return [_FILES[name]] + ([_PIQA_LABELS] if name == "piqa" else [])


def _read_jsonl(path: Path, limit: int | None) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EdgePruneError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


def _context(task: str, query: str) -> str:
    if task == "boolq":
        # the file stores "Passage: {passage}\nQuestion: {question}"; lm-eval's prompt has no "Passage: " prefix
        text = query.removeprefix("Passage: ").rstrip()
        return text + ("" if text.endswith("?") else "?") + "\nAnswer:"
    if task.startswith("arc_"):
        return query + "\nAnswer:"
    return query  # openbookqa: the bare question stem


def load_task(name: str, data_dir: str | Path, limit: int | None = None) -> list[Example]:
    """The first ``limit`` examples (all if None) of a task, with lm-eval's prompts."""
    if name not in _FILES:
        raise EdgePruneError(f"unknown zero-shot task {name!r} (known: {', '.join(TASKS)})")
    if limit is not None and limit < 1:
        raise EdgePruneError(f"limit must be a positive number of examples, got {limit}")
    root = Path(data_dir)
    if not root.is_dir():
        raise EdgePruneError(f"zero-shot data directory not found: {root}")
    path = root / _FILES[name]
    if not path.is_file():
        raise EdgePruneError(f"{name} data file not found: {path}")
    rows = _read_jsonl(path, limit)
    if not rows:
        raise EdgePruneError(f"{name} data file has no examples: {path}")
    try:
        if name == "piqa":
            return _piqa(rows, root / _PIQA_LABELS)
        return [Example(_context(name, r["query"]), [DELIMITER + c for c in r["choices"]], int(r["gold"]))
                for r in rows]
    except (KeyError, TypeError, ValueError) as e:
        raise EdgePruneError(f"{name} data file {path} is not in the expected format ({e!r})") from None


def _piqa(rows: list[dict], labels_path: Path) -> list[Example]:
    if not labels_path.is_file():
        raise EdgePruneError(f"piqa labels file not found: {labels_path}")
    labels = labels_path.read_text().split()
    if len(labels) < len(rows):
        raise EdgePruneError(f"piqa labels file {labels_path} has fewer labels than examples")
    return [
        Example(f"Question: {r['goal']}\nAnswer:", [DELIMITER + r["sol1"], DELIMITER + r["sol2"]], int(label))
        for r, label in zip(rows, labels[:len(rows)], strict=True)
    ]


def _encode(tokenizer, examples: Sequence[Example]) -> list[tuple[list[int], list[int]]]:
    """(context tokens, continuation tokens) per choice, in order, split at the boundary the way lm-eval does."""
    pairs = []
    for ex in examples:
        # trailing whitespace belongs to the continuation: BPE tokenizers attach a space to the following word
        context = ex.context.rstrip()
        conts = [ex.context[len(context):] + c for c in ex.choices]
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        if ctx:
            wholes = tokenizer([context + c for c in conts], add_special_tokens=False)["input_ids"]
            pairs.extend((ctx, whole[len(ctx):]) for whole in wholes)
        else:
            # the first continuation token still needs a token to be predicted from
            prefix = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
            pairs.extend(([prefix], tokenizer(c, add_special_tokens=False)["input_ids"]) for c in conts)
    return pairs


def score_examples(model, tokenizer, examples: Sequence[Example], batch_size: int = 16, max_length: int = 1024,
                   progress: bool = False, desc: str = "scoring") -> list[list[float]]:
    """Summed log-probability of each choice's continuation given its context: one list per example."""
    import torch
    from tqdm import tqdm

    pairs = _encode(tokenizer, examples)
    requests = []  # (input ids, number of continuation tokens scored)
    for ctx, cont in pairs:
        tokens = (ctx + cont)[-(max_length + 1):]  # left-truncate, keeping the continuation
        requests.append((tokens, min(len(cont), len(tokens) - 1)))
    # longest first, so each batch has similar lengths and little padding
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    device = next(model.parameters()).device
    # only positions predicting continuation tokens need logits; skipping the rest saves most of the vocab projection
    trim = "logits_to_keep" in inspect.signature(model.forward).parameters
    sums = [0.0] * len(requests)
    with torch.inference_mode(), tqdm(total=len(requests), desc=desc, disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            lengths = [len(requests[i][0]) - 1 for i in idx]
            width = max(lengths)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, :lengths[row]] = torch.tensor(requests[i][0][:-1])
            # right padding under a causal mask leaves the real positions untouched: no attention mask needed
            keep = max(width - (n - requests[i][1]) for n, i in zip(lengths, idx, strict=True)) or 1
            kwargs = {"logits_to_keep": keep} if trim else {}
            logits = model(ids.to(device), **kwargs).logits[:, -keep:].float()
            for row, i in enumerate(idx):
                tokens, n = requests[i]
                if n == 0:
                    continue
                end = lengths[row] - width + keep  # position in `logits` just past this row's last input
                lp = torch.log_softmax(logits[row, end - n:end], dim=-1)
                target = torch.tensor(tokens[-n:], device=lp.device)
                sums[i] = lp.gather(-1, target[:, None]).sum().item()
            bar.update(len(idx))
    out, k = [], 0
    for ex in examples:
        out.append(sums[k:k + len(ex.choices)])
        k += len(ex.choices)
    return out


def _answer_len(choice: str) -> int:
    return max(1, len(choice.removeprefix(DELIMITER)))


def accuracy(examples: Sequence[Example], scores: Sequence[Sequence[float]]) -> dict:
    """acc and acc_norm (see the module docstring) of per-choice log-likelihoods."""
    def argmax(xs):
        return max(range(len(xs)), key=xs.__getitem__)  # first of ties, like numpy

    acc = acc_norm = 0
    for ex, s in zip(examples, scores, strict=True):
        acc += argmax(s) == ex.gold
        acc_norm += argmax([x / _answer_len(c) for x, c in zip(s, ex.choices, strict=True)]) == ex.gold
    n = len(examples)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}


def evaluate_tasks(model, tokenizer, tasks: Sequence[str], data_dir, limit: int | None = None,
                   batch_size: int = 16, max_length: int = 1024, progress: bool = True) -> dict:
    """Zero-shot accuracy on each task, plus their unweighted mean."""
    # load everything first so a bad task name or missing file fails before any model time is spent
    data = {name: load_task(name, data_dir, limit) for name in tasks}
    if not data:
        raise EdgePruneError(f"no zero-shot tasks given (known: {', '.join(TASKS)})")
    results = {}
    for name, examples in data.items():
        scores = score_examples(model, tokenizer, examples, batch_size, max_length, progress, desc=name)
        results[name] = accuracy(examples, scores)
    average = {k: sum(r[k] for r in results.values()) / len(results) for k in ("acc", "acc_norm")}
    return {"tasks": results, "average": average, "limit": limit}
