import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from edgeprune.errors import EdgePruneError
from edgeprune.evaluate.zeroshot import TASKS, Example, accuracy, evaluate_tasks, load_task, score_examples
from edgeprune.models.tiny import build_tiny

DATA = Path(__file__).parents[2] / "shared" / "data"

# lengths vary so batches need padding; one context ends in a space, one is empty, one is long
EXAMPLES = [
    Example("Question: what is red?\nAnswer:", [" apple", " sky", " grass is green"], 0),
    Example("The cat sat on the ", ["mat", "moon"], 1),
    Example("", [" hello", " world!"], 0),
    Example("Passage: " + "lorem ipsum dolor " * 12 + "\nQuestion: is it?\nAnswer:", [" no", " yes"], 1),
    Example("Short", [" a", " bb", " ccc", " dddd"], 3),
]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("llama")


def direct_logprob(lm, context: str, continuation: str, max_length: int = 1024) -> float:
    """Reference score from one unpadded forward pass (the byte tokenizer has one token per byte)."""
    tok = lm.tokenizer
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    prefix = tok(stripped, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = (prefix + cont)[-(max_length + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids[:-1]])).logits[0], dim=-1)
    n = min(len(cont), len(ids) - 1)
    return sum(logp[p, ids[p + 1]].item() for p in range(len(ids) - 1 - n, len(ids) - 1))


# --- loaders on the real files ---------------------------------------------------------------------------------

FIRST = {
    "piqa": ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
             " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips", 2, 0),
    "arc_easy": ("Question: Which statement best explains why photosynthesis is the foundation of most food webs?"
                 "\nAnswer:", " Sunlight is the source of energy for nearly all ecosystems.", 4, 0),
    "arc_challenge": ("Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
                      "Which is the most likely effect of this increase in rotation?\nAnswer:",
                      " Planetary density will decrease.", 4, 2),
    "openbookqa": ("A person wants to start saving money so that they can afford a nice vacation at the end of the "
                   "year. After looking over their budget and expenses, they decide the best way to save money is to",
                   " make more phone calls", 4, 1),
}


@pytest.mark.parametrize("task", TASKS)
def test_loader_reads_real_files(task):
    if not DATA.is_dir():
        pytest.skip(f"no zero-shot data at {DATA}")
    examples = load_task(task, DATA, limit=3)
    assert len(examples) == 3
    ex = examples[0]
    if task == "boolq":
        assert ex.context.startswith("All biomass goes through at least some of these steps")
        assert ex.context.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
        assert (ex.choices, ex.gold) == ([" no", " yes"], 0)
    else:
        context, first_choice, n_choices, gold = FIRST[task]
        assert ex.context == context
        assert ex.choices[0].startswith(first_choice) and len(ex.choices) == n_choices
        assert ex.gold == gold
    assert all(c.startswith(" ") for e in examples for c in e.choices)
    assert all(0 <= e.gold < len(e.choices) for e in examples)


def test_piqa_keeps_raw_solutions_and_aligned_labels():
    if not DATA.is_dir():
        pytest.skip(f"no zero-shot data at {DATA}")
    second = load_task("piqa", DATA, limit=2)[1]
    # lm-eval scores the raw solutions, trailing space included
    assert second.context == "Question: dresser\nAnswer:"
    assert second.choices == [" replace drawer with bobby pin ", " finish, woodgrain with  bobby pin "]
    assert second.gold == 1


# --- errors ------------------------------------------------------------------------------------------------------

def test_unknown_task_lists_known_tasks(tmp_path):
    with pytest.raises(EdgePruneError, match="unknown zero-shot task 'hellaswag'.*piqa, arc_easy") as e:
        load_task("hellaswag", tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(EdgePruneError, match="unknown"):
        evaluate_tasks(None, None, ["piqa", "nope"], tmp_path)


def test_missing_dir_file_or_labels(tmp_path):
    with pytest.raises(EdgePruneError, match="directory not found"):
        load_task("arc_easy", tmp_path / "absent")
    with pytest.raises(EdgePruneError, match="arc_easy data file not found"):
        load_task("arc_easy", tmp_path)
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "b"}) + "\n")
    with pytest.raises(EdgePruneError, match="labels file not found"):
        load_task("piqa", tmp_path)


# --- scoring -----------------------------------------------------------------------------------------------------

def test_scores_match_direct_forward(tiny):
    scores = score_examples(tiny.model, tiny.tokenizer, EXAMPLES, batch_size=4)
    for ex, row in zip(EXAMPLES, scores, strict=True):
        want = [direct_logprob(tiny, ex.context, c) for c in ex.choices]
        assert row == pytest.approx(want, rel=1e-5, abs=1e-4)
    # left truncation keeps the continuation and the end of the context
    truncated = score_examples(tiny.model, tiny.tokenizer, EXAMPLES[3:4], batch_size=2, max_length=16)[0]
    assert truncated == pytest.approx([direct_logprob(tiny, EXAMPLES[3].context, c, 16) for c in EXAMPLES[3].choices],
                                      rel=1e-5, abs=1e-4)


def test_batched_equals_unbatched(tiny):
    one = score_examples(tiny.model, tiny.tokenizer, EXAMPLES, batch_size=1)
    seven = score_examples(tiny.model, tiny.tokenizer, EXAMPLES, batch_size=7)
    assert [len(r) for r in one] == [len(e.choices) for e in EXAMPLES]
    for a, b in zip(one, seven, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)


def test_accuracy_is_argmax_of_sum_and_of_sum_per_answer_character(tiny):
    scores = score_examples(tiny.model, tiny.tokenizer, EXAMPLES, batch_size=3)
    acc = sum(max(range(len(s)), key=s.__getitem__) == ex.gold for ex, s in zip(EXAMPLES, scores, strict=True))
    norm = sum(max(range(len(s)), key=lambda i, s=s, ex=ex: s[i] / len(ex.choices[i].removeprefix(" "))) == ex.gold
               for ex, s in zip(EXAMPLES, scores, strict=True))
    got = accuracy(EXAMPLES, scores)
    assert got == {"acc": acc / len(EXAMPLES), "acc_norm": norm / len(EXAMPLES), "n": len(EXAMPLES)}

    # the delimiter does not count towards the length: -3 over "abc" (3) beats -2 over "z" (1); with the
    # leading space counted (4 vs 2) the two would tie and the first would win
    ex = [Example("q", [" z", " abc"], 1)]
    assert accuracy(ex, [[-2.0, -3.0]]) == {"acc": 0.0, "acc_norm": 1.0, "n": 1}


class PrefersA(torch.nn.Module):
    """Wraps a model and makes byte "a" overwhelmingly likely; its forward takes no ``logits_to_keep``."""

    def __init__(self, lm):
        super().__init__()
        self.inner = lm.model
        self.a = lm.tokenizer("a", add_special_tokens=False)["input_ids"][0]

    def forward(self, input_ids):
        logits = self.inner(input_ids).logits.clone()
        logits[..., self.a] += 50.0
        return SimpleNamespace(logits=logits)


def test_model_preferring_the_gold_token_scores_perfectly(tiny):
    options = [" bcd", " aaaa", " ebca", " xyz zy"]
    examples = [Example(f"Question {i}\nAnswer:", options[i % 4:] + options[:i % 4], (1 - i) % 4) for i in range(6)]
    assert all(ex.choices[ex.gold] == " aaaa" for ex in examples)
    res = accuracy(examples, score_examples(PrefersA(tiny), tiny.tokenizer, examples, batch_size=4))
    assert res == {"acc": 1.0, "acc_norm": 1.0, "n": 6}


class Untrimmed(torch.nn.Module):
    """A model whose forward has no ``logits_to_keep``: scoring must fall back to full logits."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids):
        return self.inner(input_ids)


def test_models_without_logits_to_keep_score_the_same(tiny):
    trimmed = score_examples(tiny.model, tiny.tokenizer, EXAMPLES, batch_size=3)
    full = score_examples(Untrimmed(tiny.model), tiny.tokenizer, EXAMPLES, batch_size=3)
    for a, b in zip(trimmed, full, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)


# --- end to end --------------------------------------------------------------------------------------------------

def test_evaluate_tasks_on_synthetic_data(tiny, tmp_path):
    (tmp_path / "arc_easy").mkdir()
    rows = [{"query": f"Question: q{i}?", "choices": ["x", "yy", "zzz"], "gold": i % 3} for i in range(5)]
    (tmp_path / "arc_easy" / "arc_easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "boolq").mkdir()
    rows = [{"query": f"Passage: p{i}\nQuestion: q{i}", "choices": ["no", "yes"], "gold": i % 2} for i in range(5)]
    (tmp_path / "boolq" / "boolq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    assert load_task("boolq", tmp_path)[0].context == "p0\nQuestion: q0?\nAnswer:"
    res = evaluate_tasks(tiny.model, tiny.tokenizer, ["arc_easy", "boolq"], tmp_path, limit=3, batch_size=4,
                         progress=False)
    assert res["limit"] == 3 and set(res["tasks"]) == {"arc_easy", "boolq"}
    examples = load_task("arc_easy", tmp_path, limit=3)
    assert res["tasks"]["arc_easy"] == accuracy(examples, score_examples(tiny.model, tiny.tokenizer, examples))
    for key in ("acc", "acc_norm"):
        assert res["average"][key] == pytest.approx((res["tasks"]["arc_easy"][key] + res["tasks"]["boolq"][key]) / 2)
    assert all(r["n"] == 3 for r in res["tasks"].values())
