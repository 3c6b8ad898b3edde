"""Process reward models: the loss, the metrics and the aggregations (llmtune.objectives.prm), the step-wise
row shapes and step-end positions (llmtune.data.stepwise), against hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch

from llmtune.data.formats import RowError
from llmtune.data.stepwise import encode_steps, join_steps, split_steps, step_end_tokens, to_steps
from llmtune.objectives.prm import aggregate, first_bad, step_good_probs, step_loss, step_metrics

IG = -100


def test_step_loss_only_at_step_ends() -> None:
    """Two step ends in a row of 4: logits (0, 0) at position 1 (label good: -log 1/2 = ln 2) and (ln 3, 0) at
    position 3 (label bad, class 0: p = 3/4, -log 3/4 = ln 4/3). The other positions have huge logits that
    would dominate if they counted. loss = ln 2 + ln 4/3 = ln 8/3; units 2."""
    logits = torch.tensor([[[50.0, -50.0], [0.0, 0.0], [-50.0, 50.0], [math.log(3.0), 0.0]]])
    labels = torch.tensor([[IG, 1, IG, 0]])
    loss, n = step_loss(logits, labels)
    assert n.item() == 2
    assert loss.item() == pytest.approx(math.log(8 / 3), abs=1e-6)


def test_step_metrics_hand_worked() -> None:
    """Row 0: steps at 0, 2 labelled good, bad; predicted p_good = sigmoid(2), sigmoid(-2) -> good, bad: both
    right, first error at 1 both ways. Row 1: steps at 1, 3 labelled good, good; predicted good, bad: one step
    right, first error predicted at 1, truth none (2): wrong. correct_steps 3, first_error_correct 1, chains 2."""
    logits = torch.zeros(2, 4, 2)
    logits[0, 0, 1], logits[0, 2, 1] = 2.0, -2.0
    logits[1, 1, 1], logits[1, 3, 1] = 2.0, -2.0
    labels = torch.tensor([[1, IG, 0, IG], [IG, 1, IG, 1]])
    m = step_metrics(logits, labels)
    assert (m["correct_steps"].item(), m["first_error_correct"].item(), m["chains"].item()) == (3, 1, 2)
    assert step_good_probs(torch.tensor([0.0, math.log(3.0)])).item() == pytest.approx(0.75)
    assert first_bad(torch.tensor([True, True])) == 2 and first_bad(torch.tensor([True, False, False])) == 1


def test_aggregations_hand_worked() -> None:
    p = [0.9, 0.5, 0.8]
    assert aggregate(p, "min") == 0.5
    assert aggregate(p, "last") == 0.8
    assert aggregate(p, "mean") == pytest.approx(2.2 / 3)
    assert aggregate(p, "product") == pytest.approx(0.36)
    assert aggregate([], "min") == 0.0
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(p, "max")


def test_trl_shape() -> None:
    r = to_steps({"prompt": "2+2?", "completions": ["2+2=4 ", "so 4"], "labels": [True, False]})
    assert r.prompt == [{"role": "user", "content": "2+2?"}] and r.steps == ["2+2=4", "so 4"]
    assert r.labels == [True, False]
    with pytest.raises(RowError, match="2 steps but 1 labels"):
        to_steps({"prompt": "q", "completions": ["a", "b"], "labels": [True]})


def test_math_shepherd_shape() -> None:
    """Tags at 'ки' -> '+' / '-' at the same place in label (each 2-character tag is 1 character there)."""
    row = {
        "input": "What is 2+3*2? Step 1: 3*2=6 ки\nStep 2: 2+6=9 ки",
        "label": "What is 2+3*2? Step 1: 3*2=6 +\nStep 2: 2+6=9 -",
    }
    r = to_steps(row)
    assert r.prompt[0]["content"] == "What is 2+3*2?"
    assert r.steps == ["Step 1: 3*2=6", "Step 2: 2+6=9"] and r.labels == [True, False]


def test_prm800k_shape_neutral_is_good_and_chain_stops_at_first_bad() -> None:
    row = {
        "question": {"problem": "Compute 1+1."},
        "label": {
            "steps": [
                {"completions": [{"text": "One plus one", "rating": 0}], "chosen_completion": 0},
                {"completions": [{"text": "x", "rating": 1}, {"text": "is 2", "rating": 1}], "chosen_completion": 1},
                {"completions": [{"text": "so 3", "rating": -1}], "chosen_completion": None},
                {"completions": [{"text": "never read", "rating": 1}], "chosen_completion": 0},
            ]
        },
    }
    r = to_steps(row)
    assert r.steps == ["One plus one", "is 2", "so 3"] and r.labels == [True, True, False]


def test_unknown_shape_is_refused() -> None:
    with pytest.raises(RowError, match="not a step-wise row"):
        to_steps({"text": "x"})


def test_step_end_tokens_and_split() -> None:
    # tokens "ab" "c" "\nd" "e": a step ending at char 3 ends at token 1; one ending at char 6 at token 3
    assert step_end_tokens([(0, 2), (2, 3), (3, 5), (5, 6)], [3, 6]) == [1, 3]
    assert step_end_tokens([(0, 0), (0, 2), (2, 4)], [1]) == [1]  # a text-less special token is skipped
    assert join_steps(["a", "b"], "\n") == "a\nb\n"
    assert split_steps("a\n\n b \n", "\n") == ["a", "b"]
    assert split_steps("a\nb", "") == ["a\nb"]


def test_encode_steps_on_tiny_model_tokenizer() -> None:
    """Each step-end token's text ends the step's separator: decoding the ids up to it gives the prompt and the
    steps so far, each followed by the separator."""
    from transformers import AutoTokenizer

    from tests.conftest import TINY_MODEL

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    template = tok.chat_template
    prompt = [{"role": "user", "content": "Start from 3."}]
    steps = ["3+4=7", "7*2=14"]
    ids, ends = encode_steps(tok, template, prompt, steps, "\n", None)
    assert len(ends) == 2 and ends[0] < ends[1] < len(ids)
    assert tok.decode(ids[: ends[0] + 1]).endswith("3+4=7\n")
    assert tok.decode(ids[: ends[1] + 1]).endswith("3+4=7\n7*2=14\n")
    cut_ids, cut_ends = encode_steps(tok, template, prompt, steps, "\n", ends[0] + 1)
    assert cut_ends == [ends[0]] and len(cut_ids) == ends[0] + 1


def test_recipe_schema_for_process_loss() -> None:
    """rm.loss process reads format stepwise only; step_separator belongs to it; lm_loss_weight does not."""
    from pydantic import ValidationError

    from llmtune.recipe.stages import RmRecipe

    base = {"stage": "rm", "output_dir": "runs/x", "model": {"path": "m"}, "data": {"train": [{"path": "d.jsonl"}]}}
    r = RmRecipe.model_validate({**base, "rm": {"loss": "process", "step_separator": "\n\n"}})
    assert r.rm.step_separator == "\n\n"
    bad_format = {**base, "data": {"train": [{"path": "d.jsonl", "format": "pairs"}]}, "rm": {"loss": "process"}}
    with pytest.raises(ValidationError, match=r"rm\.loss process reads format stepwise"):
        RmRecipe.model_validate(bad_format)
    with pytest.raises(ValidationError, match="step_separator is for loss process"):
        RmRecipe.model_validate({**base, "rm": {"step_separator": " "}})
    with pytest.raises(ValidationError, match="lm_loss_weight is for loss pairwise or ranked"):
        RmRecipe.model_validate({**base, "rm": {"loss": "process", "lm_loss_weight": 0.1}})


def test_step_scores_read_at_step_ends_and_aggregate() -> None:
    """A random tiny token classifier scored in a batch of 3 (padding included) gives, for each step, the
    softmax of its logits at the step-end token of the unpadded sequence. With the head set to weight 0 and
    bias (0, ln 3), every step's p(good) is 3/4 (hand-worked): min 0.75, product 0.5625, and the PrmSource
    aggregation on top of it matches."""
    from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

    from llmtune.rewards.prm import step_scores
    from tests.conftest import TINY_MODEL

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    config = AutoConfig.from_pretrained(TINY_MODEL, num_labels=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_config(config).eval()
    prompt = [{"role": "user", "content": "Start from 3."}]
    completions = ["3+4=7\n7*2=14", "3+1=4\n\n4+4=8\n8-1=7\n", "   "]
    kw = {"separator": "\n", "template": tok.chat_template, "device": "cpu"}
    scores = step_scores(model, tok, [prompt] * 3, completions, batch_size=3, **kw)
    assert [len(s) for s in scores] == [2, 3, 0]
    for completion, got in zip(completions[:2], scores[:2], strict=True):
        ids, ends = encode_steps(tok, tok.chat_template, prompt, split_steps(completion, "\n"), "\n", None)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        assert got == pytest.approx(step_good_probs(logits[ends]).tolist(), abs=1e-5)
    with torch.no_grad():
        model.score.weight.zero_()
        model.score.bias.copy_(torch.tensor([0.0, math.log(3.0)]))
    fixed = step_scores(model, tok, [prompt] * 2, completions[:2], batch_size=1, **kw)
    assert fixed[1] == pytest.approx([0.75, 0.75, 0.75])
    assert aggregate(fixed[0], "min") == pytest.approx(0.75)
    assert aggregate(fixed[0], "product") == pytest.approx(0.5625)
