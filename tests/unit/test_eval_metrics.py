"""Answer metrics, GSM8K extraction, few-shot selection and win / tie / loss counting, against hand counts."""

from __future__ import annotations

import pytest

from llmtune.data.prompts import to_prompt
from llmtune.eval.fewshot import jaccard, select_examples, word_set
from llmtune.eval.pairs import to_pair
from llmtune.rewards import metrics
from llmtune.rewards.rules import get_rule


def test_exact_match_and_contains_normalise_case_space_and_punctuation() -> None:
    assert metrics.exact_match("  Paris. ", "paris")
    assert metrics.exact_match("New   York", "new york")
    assert not metrics.exact_match("Paris, France", "Paris")
    assert metrics.contains("The capital is Paris, France.", "paris")
    assert not metrics.contains("The capital is Lyon.", "Paris")
    assert not metrics.contains("anything", "")  # an empty gold matches nothing
    preds = ["Paris", "paris!", "Lyon", "It is Paris", "PARIS "]
    # hand count: exact 1, 2, 5 -> 3 of 5; contains: all but Lyon -> 4 of 5
    assert sum(metrics.exact_match(p, "Paris") for p in preds) == 3
    assert sum(metrics.contains(p, "Paris") for p in preds) == 4


def test_regex_extracts_first_group_or_match() -> None:
    assert metrics.regex_extract("Answer: B. Then C", r"Answer: ([A-D])") == "B"
    assert metrics.regex_extract("x = 42", r"\d+") == "42"
    assert metrics.regex_extract("none", r"\d+") is None
    assert metrics.regex_match("so the answer is (c)", "C", r"answer is \(([a-d])\)")
    assert not metrics.regex_match("so the answer is (d)", "C", r"answer is \(([a-d])\)")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
        ("so 1,234 apples\n#### 1,234", "1234"),
        ("She pays $5 then $12.50 in total", "12.50"),
        ("The answer is 7.", "7"),
        ("#### -3 degrees", "-3"),
        ("no number here", None),
    ],
)
def test_gsm8k_extract(text: str, expected: str | None) -> None:
    assert metrics.gsm8k_extract(text) == expected


def test_gsm8k_gold_and_match_by_value() -> None:
    gold = "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 10"
    assert metrics.gsm8k_gold(gold) == "10"
    assert metrics.gsm8k_match("she earned 10.00 dollars", gold)
    assert metrics.gsm8k_match("#### $10", gold)
    assert not metrics.gsm8k_match("she earned 10 dollars in 50 minutes", gold)  # last number is 50
    assert not metrics.gsm8k_match("no idea", gold)
    assert metrics.gsm8k_gold("#### 1,000") == "1000"


def test_win_tie_loss_counts() -> None:
    a = [1.0, 0.5, 0.2, 0.3, 2.0]
    b = [0.0, 0.5, 0.9, 0.25, 1.0]
    # diffs: +1, 0, -0.7, +0.05, +1 -> margin 0: win 3, tie 1, loss 1; margin 0.1: win 2, tie 2, loss 1
    assert metrics.win_tie_loss(a, b) == (3, 1, 1)
    assert metrics.win_tie_loss(a, b, tie_margin=0.1) == (2, 2, 1)
    with pytest.raises(ValueError):
        metrics.win_tie_loss([1.0], [])


def test_mean_std() -> None:
    assert metrics.mean_std([1.0, 3.0]) == (2.0, 1.0)
    assert metrics.mean_std([]) == (0.0, 0.0)


def test_jaccard_by_hand() -> None:
    a, b = word_set("the cat sat"), word_set("The cat ran")
    assert jaccard(a, b) == pytest.approx(2 / 4)  # {the, cat} / {the, cat, sat, ran}
    assert jaccard(frozenset(), frozenset()) == 0.0


def test_few_shot_selection_picks_most_similar_and_never_itself() -> None:
    pool = ["how many apples does tom have", "what colour is the sky", "tom has three red apples", "sky is blue"]
    queries = ["how many red apples", "the sky colour"]
    # q0 vs pool: {how,many,apples}/{how,many,red,apples,does,tom,have}=3/7; {red,apples}/{how,many,red,apples,tom,has,three}=2/7
    assert select_examples(queries, pool, 2) == [[0, 2], [1, 3]]
    # the pool is the queries themselves: an input never gets itself
    same = select_examples(pool, pool, 1, exclude=[0, 1, 2, 3])
    assert all(i not in picks for i, picks in enumerate(same))
    assert same[0] == [2]
    # random: seeded, k distinct, reproducible
    r1 = select_examples(queries, pool, 2, method="random", seed=3)
    assert r1 == select_examples(queries, pool, 2, method="random", seed=3)
    assert all(len(set(p)) == 2 for p in r1)
    assert select_examples(queries, pool, 0) == [[], []]


def test_prompt_shapes() -> None:
    assert to_prompt({"prompt": "hi", "answer": 3}).answer == "3"
    p = to_prompt({"question": "2+2?", "answer": "4\n#### 4"})
    assert p.messages == [{"role": "user", "content": "2+2?"}]
    p = to_prompt({"instruction": "Add", "input": "2 and 2", "output": "4"})
    assert p.messages[-1]["content"] == "Add\n\n2 and 2" and p.answer == "4"
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    p = to_prompt({"messages": msgs})
    assert [m["content"] for m in p.messages] == ["be brief", "a", "b", "c"] and p.answer == "d"
    p = to_prompt({"messages": msgs[:4]})  # ends on the user: no answer
    assert p.answer is None and p.messages[-1]["content"] == "c"


def test_pair_shapes() -> None:
    p = to_pair({"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert (p.messages, p.chosen, p.rejected) == ([{"role": "user", "content": "q"}], "good", "bad")
    lf = {
        "conversations": [{"from": "human", "value": "q"}],
        "chosen": {"from": "gpt", "value": "good"},
        "rejected": {"from": "gpt", "value": "bad"},
    }
    p = to_pair(lf)
    assert (p.messages[-1]["content"], p.chosen, p.rejected) == ("q", "good", "bad")
    u = {"role": "user", "content": "q"}
    trl = {
        "chosen": [u, {"role": "assistant", "content": "good"}],
        "rejected": [u, {"role": "assistant", "content": "bad"}],
    }
    p = to_pair(trl)
    assert (p.messages, p.chosen, p.rejected) == ([u], "good", "bad")


def test_rules() -> None:
    em, needs = get_rule("exact_match", trust_code=False)
    assert needs and em("Paris", "paris") == 1.0 and em("Lyon", "paris") == 0.0
    rx, needs = get_rule(r"regex:\d+", trust_code=False)
    assert not needs and rx("abc 12", None) == 1.0 and rx("abc", None) == 0.0
    with pytest.warns(UserWarning, match="running Python code from module tests.unit.test_eval_metrics"):
        mod, _ = get_rule("tests.unit.test_eval_metrics:length_rule", trust_code=True)
    assert mod("abcd", None) == 4.0
    from llmtune.errors import UserError

    for bad in ("nope", "regex:(", "no_such_module_x:f"):
        with pytest.raises(UserError):
            get_rule(bad, trust_code=True)


def length_rule(completion: str, answer: str | None) -> float:
    return float(len(completion))


def test_code_rules_need_trust_reward_code(tmp_path) -> None:
    from llmtune.errors import RecipeError
    from llmtune.eval.config import load_eval_config

    options = {"task": "reward", "model": "m", "data": "d.jsonl", "rules": ["contains", "mymod:score"]}
    with pytest.raises(RecipeError, match="imports and runs Python code from module 'mymod'"):
        load_eval_config(None, options)
    assert load_eval_config(None, {**options, "trust_reward_code": True}).trust_reward_code
    # built-in and regex rules need nothing
    assert load_eval_config(None, {**options, "rules": ["contains", r"regex:\d+"]}).rules[1] == r"regex:\d+"


def test_a_bad_eval_file_is_called_an_eval_file(tmp_path) -> None:
    from llmtune.errors import RecipeError
    from llmtune.eval.config import load_eval_config

    path = tmp_path / "eval.yaml"
    path.write_text("task: perplexity\nmodel: m\ndata: d.jsonl\nbatch_sise: 4\n")
    with pytest.raises(RecipeError) as exc:
        load_eval_config(path, {})
    assert f"{path} is not a valid eval file (1 problem)" in str(exc.value)
    assert "recipe" not in str(exc.value).splitlines()[0]


def test_degenerate_replies_by_reason() -> None:
    from llmtune.rewards.metrics import degenerate, is_repetitive

    assert degenerate("", True) == "empty" and degenerate(" \n\t", False) == "empty"
    loop = "I think so. " * 10
    assert is_repetitive(loop) and degenerate(loop, True) == "repeated"
    assert degenerate(loop, False) == "repeated"  # a loop cut at the limit is named for the loop
    assert degenerate("The capital of France is Paris, a city on the Seine.", False) == "truncated"
    assert degenerate("The capital of France is Paris, a city on the Seine.", True) is None
    prose = "To add 37 and 45, add the tens: 30 and 40 make 70; then the ones: 7 and 5 make 12; 70 and 12 make 82."
    assert not is_repetitive(prose)
    assert is_repetitive("哈哈哈哈" * 20) and not is_repetitive(
        "東京は日本の首都であり、世界有数の大都市です。人口は約千四百万人です。多くの観光客が訪れます。"
    )
    assert not is_repetitive("yes yes yes")  # too short to call
