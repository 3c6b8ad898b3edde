"""llmtune.rewards: rules on hand examples, the weighted / normalised / EOS-penalised total against hand-computed
numbers, check_rewards' refusals before anything loads, and a real tiny reward model scored against a direct
forward pass (with a tokenizer that differs from the policy's)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llmtune.errors import DataError, RecipeError, UserError
from llmtune.recipe.online import RewardConfig
from llmtune.rewards import (
    RewardResult,
    Rewards,
    RewardSource,
    RuleSource,
    build_rewards,
    check_rewards,
    reward_maximum,
)
from llmtune.rewards.rules import get_rule, is_code_rule
from tests.conftest import TINY_MODEL

NO_PROMPT: list[dict] = [{"role": "user", "content": "q"}]


def score(spec: str, completion: str, answer: str | None = None) -> float:
    return RuleSource(spec, trust_code=False).score([NO_PROMPT], [completion], [answer])[0]


def test_builtin_rules_on_hand_examples() -> None:
    assert score("exact_match", " Paris. ", "paris") == 1.0
    assert score("exact_match", "Paris, France", "Paris") == 0.0
    assert score("contains", "The capital is Paris, France.", "paris") == 1.0
    assert score("contains", "The capital is Lyon.", "Paris") == 0.0
    gold = "6 * 7 = 42\n#### 42"
    assert score("gsm8k", "so the total is 42 apples", gold) == 1.0
    assert score("gsm8k", "I reason a lot\n#### 42", gold) == 1.0
    assert score("gsm8k", "#### 41", gold) == 0.0
    # a gsm8k answer is reduced to its number for every rule
    assert score("exact_match", "42", gold) == 1.0
    assert score(r"regex:\bAnswer: [A-D]\b", "so... Answer: C") == 1.0
    assert score(r"regex:\bAnswer: [A-D]\b", "Answer: E") == 0.0


def test_length_penalty() -> None:
    assert score("length_penalty:10", "x" * 4) == 0.0
    assert score("length_penalty:10", "x" * 10) == 0.0
    assert score("length_penalty:10", "x" * 15) == pytest.approx(-0.5)
    assert score("length_penalty:10", "x" * 30) == pytest.approx(-2.0)
    assert not is_code_rule("length_penalty:10") and not is_code_rule(r"regex:a:b") and is_code_rule("m:f")
    for bad in ("length_penalty:0", "length_penalty:-3", "length_penalty:ten"):
        with pytest.raises(UserError, match="positive whole number"):
            get_rule(bad, trust_code=False)


def test_a_rule_that_needs_an_answer_refuses_rows_without_one() -> None:
    with pytest.raises(DataError, match="1 of 2 prompts have none"):
        RuleSource("exact_match", trust_code=False).score([NO_PROMPT] * 2, ["a", "b"], ["a", None])
    assert RuleSource(r"regex:\d", trust_code=False).score([NO_PROMPT], ["7"], [None]) == [1.0]


def _rewards(**kw) -> Rewards:
    cfg = RewardConfig(rule=["exact_match", "length_penalty:4"], **kw)
    return build_rewards(cfg, trust_code=False, device="cpu", dtype="fp32")


COMPLETIONS = ["Paris", "paris!!!", "Lyon"]  # exact_match: 1, 1, 0; length_penalty:4: -1/4, -4/4, 0
ANSWERS: list[str | None] = ["Paris"] * 3
PROMPTS = [NO_PROMPT] * 3


def test_weighted_total_and_missing_eos_penalty() -> None:
    rewards = _rewards(weights=[2.0, 0.5], missing_eos_penalty=0.5)
    assert [s.name for s in rewards.sources] == ["rule/exact_match", "rule/length_penalty:4"]
    assert all(isinstance(s, RewardSource) for s in rewards.sources) and rewards.needs_answer
    out = rewards(PROMPTS, COMPLETIONS, ANSWERS)  # ended unknown: no penalty
    assert isinstance(out, RewardResult)
    assert out.per_source == {"rule/exact_match": [1.0, 1.0, 0.0], "rule/length_penalty:4": [-0.25, -1.0, 0.0]}
    assert out.total == pytest.approx([1.875, 1.5, 0.0])  # 2 * 1 + 0.5 * -0.25, 2 * 1 + 0.5 * -1, 0
    out = rewards(PROMPTS, COMPLETIONS, ANSWERS, ended=[True, False, True])
    assert out.total == pytest.approx([1.875, 1.0, 0.0])
    assert _rewards()(PROMPTS, COMPLETIONS, ANSWERS).total == pytest.approx([0.75, 0.0, 0.0])  # weights 1, 1
    with pytest.raises(ValueError, match="one of each per completion"):
        rewards(PROMPTS, COMPLETIONS, ANSWERS[:2])


def test_batch_normalisation() -> None:
    out = _rewards(weights=[2.0, 0.5], normalize="batch")(PROMPTS, COMPLETIONS, ANSWERS)
    # exact_match [1, 1, 0]: mean 2/3, std sqrt(2)/3 -> [1/sqrt(2), 1/sqrt(2), -sqrt(2)]
    # length [-0.25, -1, 0]: mean -5/12, std sqrt(0.541667 / 3) = 0.4249183 -> [0.3922323, -1.3728129, 0.9805807]
    assert out.per_source["rule/exact_match"] == [1.0, 1.0, 0.0]  # raw scores are kept
    expected = [2 * 0.7071068 + 0.5 * 0.3922323, 2 * 0.7071068 - 0.5 * 1.3728129, -2 * 1.4142136 + 0.5 * 0.9805807]
    assert out.total == pytest.approx(expected, abs=1e-5)
    # one completion: every normalised source is 0 (no nan)
    assert _rewards(normalize="batch")([NO_PROMPT], ["Paris"], ["Paris"]).total == [0.0]


def test_check_rewards_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RecipeError, match="unknown rule 'exact'") as e:
        check_rewards(RewardConfig(rule="exact"), trust_code=True, what="grpo.reward")
    assert "grpo.reward.rule" in str(e.value) and "exact_match, contains, gsm8k, regex:PATTERN" in str(e.value)
    with pytest.raises(RecipeError, match="not a valid regular expression"):
        check_rewards(RewardConfig(rule=["contains", "regex:(unclosed"]), trust_code=False)

    # module:function: refused without trust, and the module is never imported
    (tmp_path / "reward_mod_x.py").write_text("def score(c, a):\n    return 2.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RecipeError, match="--trust-reward-code"):
        check_rewards(RewardConfig(rule="reward_mod_x:score"), trust_code=False)
    with pytest.raises(RecipeError, match="--trust-reward-code"):
        build_rewards(RewardConfig(rule="reward_mod_x:score"), trust_code=False, device="cpu", dtype="fp32")
    assert "reward_mod_x" not in sys.modules
    with pytest.warns(UserWarning, match="running Python code"):
        rewards = build_rewards(RewardConfig(rule="reward_mod_x:score"), trust_code=True, device="cpu", dtype="fp32")
    assert rewards([NO_PROMPT], ["x"], [None]).total == [2.0]

    with pytest.raises(RecipeError, match="does not exist"):
        check_rewards(RewardConfig(model=str(tmp_path / "no_such_rm")), trust_code=False)
    with pytest.raises(RecipeError, match="is not a reward model") as e:
        check_rewards(RewardConfig(model=str(TINY_MODEL), rule="contains"), trust_code=False, what="ppo.reward")
    assert "ppo.reward.model" in str(e.value) and "LlamaForCausalLM" in str(e.value)
    assert "train one with stage: rm" in str(e.value)


def test_importing_rewards_loads_no_torch() -> None:
    code = "import sys, llmtune.rewards, llmtune.rewards.rules; assert 'torch' not in sys.modules, 'torch'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _reward_model(path: Path) -> Path:
    """The tiny model's body with a seeded random score head, saved with a tokenizer whose ids differ from the
    policy's (two tokens swapped)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from tests.swapped_vocab import swap_tokenizer_files

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(TINY_MODEL, num_labels=1)
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)
    rm.save_pretrained(path)
    swap_tokenizer_files(path)
    return path


def test_reward_model_scores_equal_a_direct_forward_pass(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_dir = _reward_model(tmp_path / "rm")
    prompts = [
        [{"role": "user", "content": "Name a river."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello to the team."}],
        [{"role": "user", "content": "Capital of France?"}],
    ]
    completions = ["The Seine, a long river in France.", "e a e", "Paris"]
    answers: list[str | None] = ["seine", "bye", "Paris"]
    cfg = RewardConfig(model=str(rm_dir), rule="contains", weights=[1.0, 3.0], batch_size=2)
    with build_rewards(cfg, trust_code=False, device="cpu", dtype="fp32") as rewards:
        source = rewards.sources[0]
        assert source.name == "model/rm" and not source.model.training
        assert all(not p.requires_grad for p in source.model.parameters())
        out = rewards(prompts, completions, answers)

    tok = AutoTokenizer.from_pretrained(rm_dir)
    policy_tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    direct, differs = [], []
    for p, c in zip(prompts, completions, strict=True):
        text = tok.apply_chat_template([*p, {"role": "assistant", "content": c}], tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        differs.append(ids[0].tolist() != policy_tok(text, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            direct.append(rm.score(rm.model(input_ids=ids).last_hidden_state[:, -1]).item())
    assert any(differs)  # the reward model's own tokenizer, not the policy's, gives these ids
    assert out.per_source["model/rm"] == pytest.approx(direct, abs=1e-4)
    assert out.per_source["rule/contains"] == [1.0, 0.0, 1.0]
    assert out.total == pytest.approx([direct[0] + 3.0, direct[1], direct[2] + 3.0], abs=1e-4)
    assert source.loaded is None  # closed by the with block


def test_source_names_are_readable_and_unique() -> None:
    from llmtune.rewards import source_names

    cfg = RewardConfig(model=["runs/a/rm", "runs/b/rm/", "org/judge-1b"], rule=["contains", "contains", "regex:x"])
    assert source_names(cfg) == [
        "model/rm", "model/rm#2", "model/judge-1b", "rule/contains", "rule/contains#2", "rule/regex:x",
    ]  # fmt: skip


def test_reward_maximum_is_known_for_rules_only() -> None:
    """exact_match / contains / gsm8k / regex give at most 1.0; length_penalty at most 0.0; weights scale them
    (a negative weight takes the rule's minimum: 0.0 for 0/1 rules, unbounded for length_penalty)."""
    assert reward_maximum(RewardConfig(rule="exact_match")) == 1.0
    assert reward_maximum(RewardConfig(rule=["contains", "length_penalty:50"])) == 1.0
    assert reward_maximum(RewardConfig(rule=["gsm8k", "regex:^A"], weights=[2.0, 0.5])) == 2.5
    assert reward_maximum(RewardConfig(rule=["gsm8k", "regex:x"], weights=[1.0, -1.0])) == 1.0
    assert reward_maximum(RewardConfig(rule="length_penalty:50", weights=[-1.0])) is None  # unbounded
    assert reward_maximum(RewardConfig(rule="mymodule:score")) is None  # user code
    assert reward_maximum(RewardConfig(model="runs/rm")) is None
    assert reward_maximum(RewardConfig(model="runs/rm", rule="exact_match")) is None
    assert reward_maximum(RewardConfig(rule="exact_match", normalize="batch")) is None
