"""data synth's filters (hand-worked ROUGE-L, repetition, length), and the loop's selection, output and
resume, driven by a scripted writer (the command's model writer is tested with real models elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmtune.commands.synth import SynthConfig, Synthesizer, clean, reject_reason, repetitive, rouge_l, words


def test_rouge_l_by_hand() -> None:
    a, b = words("the cat sat on the mat"), words("the cat lay on a mat")
    # LCS "the cat on mat" = 4 of 6 and 6: F1 = 4/6
    assert rouge_l(a, b) == pytest.approx(4 / 6)
    assert rouge_l(a, a) == 1.0 and rouge_l(a, []) == 0.0 and rouge_l(words("x y"), words("z w")) == 0.0


def test_filters() -> None:
    cfg = SynthConfig(min_words=3, max_words=12, similarity=0.7)
    kept = [words("Write a poem about the sea.")]
    assert reject_reason("Hi there", kept, cfg) == "too short"
    assert reject_reason(" ".join(["word"] * 13), kept, cfg) == "too long"
    assert reject_reason("Write a poem about the sea today.", kept, cfg) == "too similar to a kept instruction"
    assert reject_reason("#Rewritten Prompt#: list three rivers", kept, cfg) == "holds the prompt's markers"
    assert repetitive(words("go home go home go home go home go home"))
    assert reject_reason("List three rivers of Africa and their lengths.", kept, cfg) is None
    assert clean('Task 4: "Name two planets."') == "Name two planets."


class Writer:
    """A scripted model: instructions from a list, answers that echo the instruction (ended unless marked)."""

    def __init__(self, instructions: list[str]) -> None:
        self.instructions, self.asked = list(instructions), []

    def __call__(self, asks: list[str], seed: int) -> list[tuple[str, bool]]:
        self.asked.append(asks)
        out = []
        for a in asks:
            if a.startswith(("Come up", "I want you")):
                out.append((self.instructions.pop(0) if self.instructions else "", True))
            else:
                out.append((f"Answer to: {a}", "CUT" not in a))
        return out


SEEDS = ["Write a poem about the sea.", "Explain how a bicycle works.", "Give three tips for sleeping well."]


def test_self_instruct_keeps_what_passes_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "synth.jsonl"
    made = [
        "Write a poem about the sea.",  # a seed again: too similar
        "Name the largest desert on Earth and describe it.",
        "ok",  # too short
        "Describe the CUT steps of brewing green tea.",  # its answer never ended
        "Translate a short greeting into French and Spanish.",
    ]
    cfg = SynthConfig(num=2, batch_size=5, max_attempts=5, seed=1)
    writer = Writer(made)
    result = Synthesizer(writer, SEEDS, out, cfg).run()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["instruction"] for r in rows] == [made[1], made[4]]
    assert rows[0]["output"] == f"Answer to: {made[1]}" and rows[0]["method"] == "self-instruct"
    assert result["rejected"] == {"too similar to a kept instruction": 1, "too short": 1, "answer cut off": 1}
    assert all(a.count("Task ") == 3 for a in writer.asked[0])  # three examples shown per ask
    # the same command again: the file is complete, nothing is generated
    again = Writer([])
    assert Synthesizer(again, SEEDS, out, cfg).run()["rows"] == 2 and again.asked == []
    # asking for more continues after the rows it has, and the next attempts draw new examples
    more = Synthesizer(Writer(["Summarise the plot of a famous novel in two sentences."]), SEEDS, out,
                       SynthConfig(num=3, batch_size=1, max_attempts=6, seed=1))  # fmt: skip
    assert more.attempts == 5 and more.run()["rows"] == 3
    assert len(out.read_text().splitlines()) == 3


def test_evol_rewrites_a_parent_and_names_the_evolution(tmp_path: Path) -> None:
    out = tmp_path / "evol.jsonl"
    writer = Writer(["Explain how a bicycle works, including gear ratios and why they matter on hills."] * 1)
    Synthesizer(writer, SEEDS, out, SynthConfig(method="evol", num=1, batch_size=1, max_attempts=1, seed=3)).run()
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["method"].startswith("evol:") and row["parent"] in SEEDS
    assert "#Given Prompt#" in writer.asked[0][0] and row["parent"] in writer.asked[0][0]


def test_a_foreign_out_file_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "x.jsonl"
    out.write_text("not json\n")
    with pytest.raises(Exception, match="not a file data synth wrote"):
        Synthesizer(Writer([]), SEEDS, out, SynthConfig())
