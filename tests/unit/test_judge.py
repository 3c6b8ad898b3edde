"""Judge models (llmtune.rewards.judge): score and verdict parsing on hand examples, the position swap's
outcome table, the cache (a repeat costs no judge call), the unparsable policy, the recipe block, and the
data commands' selection and resume logic (llmtune.commands.label / revise), driven by scripted judges (the
real model path runs in tests/integration/test_judge.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmtune.commands.label import Item, LabelConfig, Labeler, pairwise_rows, pointwise_rows, read_items
from llmtune.commands.revise import Item as ReviseItem
from llmtune.commands.revise import ReviseConfig, Reviser, clean_revision, read_principles
from llmtune.errors import DataError, UserError
from llmtune.recipe.online import JudgeConfig, RewardConfig
from llmtune.rewards import Rewards, source_names
from llmtune.rewards.judge import (
    Comparison,
    Judge,
    JudgeCache,
    JudgeSource,
    combine_swapped,
    conversation_text,
    fill_pairwise,
    fill_pointwise,
    parse_score,
    parse_verdict,
    read_rubric,
    unit,
)

Q = [{"role": "user", "content": "What is 2+2?"}]


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("Score: 7", (7.0, None)),
        ("**Score:** 9", (9.0, None)),
        ("Rating: 4.5", (4.5, None)),
        ("Score: 7/10", (7.0, None)),  # "N/high" is N
        ("I rate it 8 out of 10.", (8.0, None)),  # the one number left once "out of 10" is read as N
        ("3. It lacks detail.", (3.0, None)),  # a reply that starts with its score
        ("Score 2 at first, but on reflection Score: 6", (6.0, None)),  # the last labelled score
        ("Score: 11", (None, "out of range")),
        ("Score: 0", (None, "out of range")),
        ("Between 1 and 10 I would say 6", (None, "ambiguous")),  # 1, 10 and 6: which?
        ("A fine answer.", (None, "no score")),
        ("   ", (None, "empty")),
    ],
)
def test_parse_score(text: str, want: tuple) -> None:
    assert parse_score(text, 1, 10) == want


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("Verdict: A", "A"),
        ("Verdict: tie", "tie"),
        ("verdict:  **B**", "B"),
        ("[[B]]", "B"),
        ("A.", "A"),
        ("Reply A is better: it is correct.", "A"),
        ("A good reply overall", None),  # the article, not a verdict
        ("Both Reply A and Reply B are fine", None),  # two replies named
        ("no idea", None),
    ],
)
def test_parse_verdict(text: str, want: str | None) -> None:
    assert parse_verdict(text)[0] == want


def test_combine_swapped_outcome_table() -> None:
    """first: x shown as A; second: y shown as A. A judge that always says "A" prefers whatever comes first:
    inconsistent, never a preference."""
    assert combine_swapped("A", "B") == "x"  # x first: A (= x); y first: B (= x)
    assert combine_swapped("B", "A") == "y"
    assert combine_swapped("tie", "tie") == "tie"
    assert combine_swapped("A", "A") == "inconsistent"
    assert combine_swapped("B", "B") == "inconsistent"
    assert combine_swapped("A", "tie") == "inconsistent"
    assert combine_swapped(None, "A") == "unparsable"
    assert combine_swapped("B", None) == "unparsable"


def test_rubrics_fill_by_plain_replacement() -> None:
    text = fill_pointwise("Q: {prompt}\nR: {reply}\n{low}-{high}", Q, "use {braces} freely", 1, 10)
    assert text == "Q: What is 2+2?\nR: use {braces} freely\n1-10"
    multi = [{"role": "system", "content": "Be brief."}, *Q]
    assert conversation_text(multi) == "System: Be brief.\n\nUser: What is 2+2?"
    assert fill_pairwise("{prompt}|{reply_a}|{reply_b}", Q, "4", "5") == "What is 2+2?|4|5"
    assert unit(7, 1, 10) == pytest.approx(6 / 9)


def test_read_rubric(tmp_path: Path) -> None:
    f = tmp_path / "rubric.txt"
    f.write_text("Rate {reply} to {prompt}.")
    assert read_rubric(str(f)) == "Rate {reply} to {prompt}."
    with pytest.raises(UserError, match="no \\{reply_a\\} / \\{reply_b\\} placeholder"):
        read_rubric(str(f), pairwise=True)
    with pytest.raises(UserError, match="does not exist"):
        read_rubric(str(tmp_path / "none.txt"))
    with pytest.raises(UserError, match="no \\{reply\\} placeholder"):
        read_rubric("Rate the answer.")


class ScriptedJudge:
    """A judge that answers from a table: pointwise by reply text, pairwise by (A text, B text); counts calls."""

    def __init__(self, scores: dict[str, str] | None = None, verdicts: dict[tuple[str, str], str] | None = None):
        self.scores, self.verdicts = scores or {}, verdicts or {}
        self.calls: list[list[str]] = []
        self.prefills: list[str] = []

    def __call__(self, texts: list[str], prefill: str) -> list[str]:
        self.calls.append(texts)
        self.prefills.append(prefill)
        out = []
        for t in texts:
            if "[Reply A]" in t:
                a = t.split("[Reply A]\n", 1)[1].split("\n\n[Reply B]", 1)[0]
                b = t.split("[Reply B]\n", 1)[1].split("\n\nWhich reply", 1)[0]
                out.append(prefill + " " + self.verdicts.get((a, b), "?"))
            else:
                reply = t.split("[Assistant's reply]\n", 1)[1].split("\n\nRate the reply", 1)[0]
                out.append(prefill + " " + self.scores.get(reply, "?"))
        return out


def test_judge_cache_asks_once_per_prompt_and_reply() -> None:
    script = ScriptedJudge(scores={"4": "10", "5": "2"})
    judge = Judge(script)
    first = judge.score([Q, Q, Q], ["4", "5", "4"])  # the repeat inside one call is asked once
    assert [j.score for j in first] == [10.0, 2.0, 10.0]
    assert len(script.calls) == 1 and len(script.calls[0]) == 2 and script.prefills == ["Score:"]
    again = judge.score([Q, Q], ["5", "4"])  # both cached: no call
    assert [j.score for j in again] == [2.0, 10.0] and len(script.calls) == 1
    other = [{"role": "user", "content": "What is 2+3?"}]
    judge.score([other], ["5"])  # the same reply to another prompt is another judgement
    assert len(script.calls) == 2
    assert (judge.cache.hits, judge.cache.misses) == (2, 3 + 1)  # the in-call repeat is no cache lookup's hit
    assert (judge.requested, judge.generated) == (6, 3)


def test_cache_drops_the_oldest_past_its_size() -> None:
    cache = JudgeCache(size=2)
    for k in "abc":
        cache.put(k, k.upper())
    assert len(cache) == 2 and cache.get("a") is None and cache.get("c") == "C"


def test_compare_asks_both_orders_and_reuses_them() -> None:
    """x = "4", y = "5": the judge prefers "4" in both orders -> x; a first-position lover -> inconsistent."""
    fair = ScriptedJudge(verdicts={("4", "5"): "A", ("5", "4"): "B"})
    judge = Judge(fair)
    [c] = judge.compare([Q], ["4"], ["5"])
    assert c.outcome == "x" and c.verdicts == ("A", "B") and fair.prefills == ["Verdict:"]
    [back] = judge.compare([Q], ["5"], ["4"])  # the same two orders, cached
    assert back.outcome == "y" and len(fair.calls) == 1
    biased = Judge(ScriptedJudge(verdicts={("4", "5"): "A", ("5", "4"): "A"}))
    assert biased.compare([Q], ["4"], ["5"])[0].outcome == "inconsistent"


def _source(script: ScriptedJudge, **cfg) -> JudgeSource:
    conf = JudgeConfig(model="judges/tiny", **cfg)
    return JudgeSource.from_judge(conf, Judge(script, scale=tuple(conf.scale)))


def test_judge_source_scores_unit_scale_and_the_unparsable_policy() -> None:
    """Scores 10 and 4 on 1-10 -> 1.0 and 1/3; the unparsable third gets the mean of the parsed, 2/3."""
    script = ScriptedJudge(scores={"a": "10", "b": "4"})
    src = _source(script)
    assert src.name == "judge/tiny"
    got = src.score([Q] * 3, ["a", "b", "c"], [None] * 3)
    assert got == pytest.approx([1.0, 1 / 3, 2 / 3])
    assert src.stats == {"judged": 3.0, "unparsable": 1.0, "cached": 0.0} and src.reasons == {"no score": 1}
    src.score([Q], ["a"], [None])
    assert src.stats == {"judged": 1.0, "unparsable": 0.0, "cached": 1.0}
    assert src.totals == {"judged": 4.0, "unparsable": 1.0, "cached": 1.0}
    raw = _source(ScriptedJudge(scores={"a": "10"}), unit_scale=False, unparsable=0)
    assert raw.score([Q] * 2, ["a", "c"], [None] * 2) == [10.0, 0.0]
    none = _source(ScriptedJudge())  # nothing parsed: the scale's middle
    assert none.score([Q], ["x"], [None]) == [0.5]


def test_pairwise_judge_source_scores_each_reply_against_its_answer() -> None:
    """Reference "4": "4x" beats it in both orders (1.0), "5" loses in both (0.0), "6" is preferred only when
    shown first (position bias: 0.5), "7" gets no verdict (unparsable: the mean of the parsed, 0.5)."""
    script = ScriptedJudge(
        verdicts={
            ("4x", "4"): "A", ("4", "4x"): "B",
            ("5", "4"): "B", ("4", "5"): "A",
            ("6", "4"): "A", ("4", "6"): "A",
        }
    )  # fmt: skip
    conf = JudgeConfig(model="judges/tiny", mode="pairwise")
    src = JudgeSource.from_judge(conf, Judge(script))
    assert src.needs_answer
    got = src.score([Q] * 4, ["4x", "5", "6", "7"], ["4"] * 4)
    assert got == pytest.approx([1.0, 0.0, 0.5, 0.5])
    assert src.stats == {"judged": 4.0, "unparsable": 1.0, "cached": 0.0} and src.reasons == {"no verdict": 1}
    assert set(script.prefills) == {"Verdict:"} and len(script.calls[0]) == 8  # both orders, one batch
    assert src.score([Q], ["5"], ["4"]) == [0.0] and src.stats["cached"] == 2.0  # both orders cached
    fixed = JudgeSource.from_judge(JudgeConfig(model="j", mode="pairwise", unparsable=0), Judge(ScriptedJudge()))
    assert fixed.score([Q], ["x"], ["4"]) == [0.0]
    with pytest.raises(DataError, match=r"mode pairwise\) compares each reply with its prompt's `answer`"):
        src.score([Q] * 2, ["4", "5"], ["4", None])
    with pytest.raises(ValueError, match="needs \\{reply_a\\} and \\{reply_b\\}"):
        JudgeConfig(model="j", mode="pairwise", rubric="Which is better? {reply}")
    assert JudgeConfig(model="j", mode="pairwise", rubric="{prompt} {reply_a} or {reply_b}?").mode == "pairwise"


def test_rewards_report_the_judge_counts_per_call() -> None:
    src = _source(ScriptedJudge(scores={"a": "10", "b": "1"}))
    result = Rewards([src], [2.0])([Q] * 3, ["a", "b", "zzz"], [None] * 3)
    assert result.total == pytest.approx([2.0, 0.0, 1.0])  # 2 x (1, 0, mean 0.5)
    assert result.per_source == {"judge/tiny": pytest.approx([1.0, 0.0, 0.5])}
    assert result.stats == {"judge/tiny/judged": 3.0, "judge/tiny/unparsable": 1.0, "judge/tiny/cached": 0.0}


def test_judge_warnings_when_most_judgements_are_unparsable() -> None:
    from llmtune.stages.online import JudgeWarnings

    warn = JudgeWarnings()
    ok = {"reward/judge/j/judged": 8.0, "reward/judge/j/unparsable": 3.0}
    assert warn.check(ok) == []  # 3 of 8: under half
    [message] = warn.check({"reward/judge/j/judged": 8.0, "reward/judge/j/unparsable": 4.0})
    assert message.startswith("warning: this step, 50% of judge/j's judgements had no usable score")
    assert warn.check({"reward/judge/j/judged": 8.0, "reward/judge/j/unparsable": 8.0}) == []  # not again at once


def test_recipe_judge_block() -> None:
    cfg = RewardConfig(model="runs/rm", judge={"model": "judges/q.gguf"}, rule="exact_match", weights=[1, 2, 3])
    assert source_names(cfg) == ["model/rm", "judge/q", "rule/exact_match"]
    assert cfg.judges()[0].scale == [1, 10] and cfg.judges()[0].unparsable == "mean"
    assert RewardConfig(judge=[{"model": "a"}, {"model": "a"}]).judges()[1].model == "a"
    assert source_names(RewardConfig(judge=[{"model": "a"}, {"model": "a"}])) == ["judge/a", "judge/a#2"]
    with pytest.raises(ValueError, match="weights has 2 numbers for 3 sources"):
        RewardConfig(model="runs/rm", judge={"model": "j"}, rule="contains", weights=[1, 2])
    with pytest.raises(ValueError, match="low < high"):
        JudgeConfig(model="j", scale=[5, 5])
    with pytest.raises(ValueError, match="no \\{reply\\} placeholder"):
        JudgeConfig(model="j", rubric="Rate it.")


# --- data label -------------------------------------------------------------------------------------------


def _c(outcome: str) -> Comparison:
    return Comparison(("", ""), (None, None), outcome)


def test_pairwise_rows_all_and_best_worst() -> None:
    """Replies r0, r1, r2: r0 beats r1, r2 beats r1, r0 vs r2 inconsistent."""
    item = Item(7, Q, ["r0", "r1", "r2"])
    outcomes = {(0, 1): _c("x"), (0, 2): _c("inconsistent"), (1, 2): _c("y")}
    rows, drops = pairwise_rows(item, outcomes, "all")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("r0", "r1"), ("r2", "r1")]
    assert drops == ["inconsistent (position bias)"] and rows[0]["row"] == 7 and rows[0]["prompt"] == Q
    # best-worst: wins (1, 0, 1), losses (0, 2, 0): best r0 (fewest losses, then first), worst r1
    rows, drops = pairwise_rows(item, outcomes, "best-worst")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("r0", "r1")] and rows[0]["judge"]["wins"] == [1, 0, 1]
    rows, drops = pairwise_rows(item, {(0, 1): _c("tie"), (0, 2): _c("unparsable"), (1, 2): _c("tie")}, "best-worst")
    assert rows == [] and sorted(drops) == ["no decided best-worst pair", "tie", "tie", "unparsable"]


def test_pointwise_rows() -> None:
    from llmtune.rewards.judge import Judgement

    item = Item(0, Q, ["a", "b", "c"])
    rows, drops = pointwise_rows(item, [Judgement("", 3.0), Judgement("", 9.0), Judgement("", 3.0)], 1, 10)
    assert (rows[0]["chosen"], rows[0]["rejected"], drops) == ("b", "a", [])
    assert pointwise_rows(item, [Judgement("", 5.0)] * 3, 1, 10) == ([], ["tie"])
    assert pointwise_rows(item, [Judgement("", 5.0), Judgement("?", None, "no score"), Judgement("", 1)], 1, 10)[1] == [
        "unparsable"
    ]


def test_read_items_drops_bad_rows_with_reasons(tmp_path: Path) -> None:
    f = tmp_path / "c.jsonl"
    rows = [
        {"prompt": "p1", "responses": ["a", "b", "a ", ""]},  # a repeat and an empty reply left out
        {"prompt": "p2", "chosen": "x", "rejected": "y"},
        {"prompt": "p3", "responses": ["only"]},
        {"responses": ["a", "b"]},
        {"prompt": "p5"},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    drops: list[tuple[str, str]] = []
    items = read_items(str(f), lambda why, where: drops.append((why, where)))
    assert [(i.row, i.replies) for i in items] == [(0, ["a", "b"]), (1, ["x", "y"])]
    assert [d[0] for d in drops] == [
        "repeated reply", "empty reply", "fewer than 2 usable replies", "no prompt", "no replies", "unreadable row",
    ]  # fmt: skip
    f.write_text(json.dumps({"prompt": "p", "text": "t"}) + "\n")
    with pytest.raises(DataError, match="no row has a prompt and two or more"):
        read_items(str(f), lambda *a: None)


def test_labeler_writes_pairs_and_resumes(tmp_path: Path) -> None:
    items = [Item(i, [{"role": "user", "content": f"q{i}"}], [f"good{i}", f"bad{i}"]) for i in range(5)]
    verdicts = {}
    for i in range(5):
        verdicts[(f"good{i}", f"bad{i}")] = "A"
        verdicts[(f"bad{i}", f"good{i}")] = "B" if i != 2 else "A"  # row 2: position bias
    script = ScriptedJudge(verdicts=verdicts)
    out = tmp_path / "pairs.jsonl"
    first = Labeler(Judge(script), items, out, LabelConfig(batch_size=2, max_rows=3))
    assert first.run() == {"pairs": 2, "done": 3, "dropped": {"inconsistent (position bias)": 1}}
    again = Labeler(Judge(script), items, out, LabelConfig(batch_size=2))  # continues at row 3
    result = again.run()
    assert result == {"pairs": 4, "done": 5, "dropped": {"inconsistent (position bias)": 1}}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == [0, 1, 3, 4] and all(r["chosen"].startswith("good") for r in rows)
    asked = [t for call in script.calls for t in call]
    assert len(asked) == 2 * 5  # each row's pair in its two orders, once


# --- data revise ------------------------------------------------------------------------------------------


class ScriptedModel:
    """Writes a critique and a revision: the revision of "bad" is "good"; "same" is revised to itself."""

    def __call__(self, convs: list[list[dict]], seed: int = 0, prefill: str = "") -> list[tuple[str, bool]]:
        out = []
        for c in convs:
            last = c[-1]["content"]
            reply = c[1]["content"] if len(c) > 1 else ""
            if len(c) == 1:
                out.append(("a first reply", True))
            elif last.startswith("Identify"):
                out.append(("" if reply == "silent" else "It could be better.", True))
            elif reply == "echo":
                out.append(("It could be better.", True))  # the critique again
            else:
                out.append(("Revision: good" if reply != "same" else "same", reply != "cut"))
        return out


def test_reviser_keeps_real_revisions_and_resumes(tmp_path: Path) -> None:
    replies = ["bad", "same", "cut", "silent", None, "echo"]
    items = [ReviseItem(i, [{"role": "user", "content": f"q{i}"}], r) for i, r in enumerate(replies)]
    out, pairs = tmp_path / "sft.jsonl", tmp_path / "pairs.jsonl"
    rev = Reviser(ScriptedModel(), items, read_principles(None), out, pairs, ReviseConfig(batch_size=2, max_rows=2))
    assert rev.run() == {"sft": 1, "pairs": 1, "done": 2, "dropped": {"unchanged": 1}}
    rev = Reviser(ScriptedModel(), items, read_principles(None), out, pairs, ReviseConfig(batch_size=2))
    result = rev.run()
    assert result == {
        "sft": 2, "pairs": 2, "done": 6,
        "dropped": {"unchanged": 1, "revision cut off": 1, "empty critique": 1, "a copy of the critique": 1},
    }  # fmt: skip
    sft = [json.loads(line) for line in out.read_text().splitlines()]
    assert sft[0]["messages"] == [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "good"}]
    dpo = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert (dpo[1]["chosen"], dpo[1]["rejected"], dpo[1]["row"]) == ("good", "a first reply", 4)


def test_principles_files(tmp_path: Path) -> None:
    f = tmp_path / "rules.txt"
    f.write_text("# ours\nbe kind\nanswer in English\n")
    ps = read_principles(str(f))
    assert len(ps) == 2 and ps[0].critique.endswith("fails to be kind.") and "be kind." in ps[0].revision
    j = tmp_path / "rules.json"
    j.write_text(json.dumps([{"name": "short", "critique": "Too long?", "revision": "Shorten it."}]))
    assert read_principles(str(j))[0].name == "short"
    j.write_text("[{")
    with pytest.raises(DataError, match="does not parse"):
        read_principles(str(j))
    j.write_text(json.dumps([{"critique": "only"}]))
    with pytest.raises(DataError, match="item 1"):
        read_principles(str(j))
    assert clean_revision("Here is the rewritten reply:\n Four.") == "Four."
