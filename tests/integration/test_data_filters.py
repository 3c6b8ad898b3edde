"""data.dedup, data.filter and data.filter.perplexity through the real CLI, on rows generated here.

The perplexity test scores the rows again independently (transformers' own loss on the tiny model, each text
tokenized as cpt does: BOS + text + EOS, every token learned) and checks that exactly the easiest / hardest
rows by those scores were dropped.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL, assert_ok, base_recipe, run_cli, write_recipe

WORDS = [
    "amber",
    "basin",
    "cobalt",
    "delta",
    "ember",
    "fjord",
    "granite",
    "harbor",
    "island",
    "jasmine",
    "kettle",
    "lantern",
    "meadow",
    "nectar",
    "orchard",
    "pebble",
    "quartz",
    "river",
    "saffron",
    "timber",
    "umber",
    "valley",
    "willow",
    "xenon",
    "yarrow",
    "zephyr",
    "anchor",
    "beacon",
    "canyon",
    "dune",
    "estuary",
    "falcon",
    "grove",
    "heron",
    "inlet",
    "juniper",
    "kelp",
    "lagoon",
    "marsh",
    "nettle",
    "oasis",
    "prairie",
    "quill",
    "reef",
    "summit",
    "tundra",
]


def _sentence(rng: random.Random, n: int = 24) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _dedup_rows() -> tuple[list[dict], dict[str, int]]:
    """20 distinct alpaca rows, then 3 exact copies (one re-cased and re-spaced), 4 one-word edits, and 2 rows
    of about 230 tokens (the 24-word ones are about 110)."""
    rng = random.Random(11)
    rows = [{"instruction": _sentence(rng), "input": "", "output": f"reply {i}"} for i in range(20)]
    extra = [dict(rows[0]), dict(rows[5]), {**rows[9], "instruction": "  " + rows[9]["instruction"].upper()}]
    for k in (2, 7, 12, 17):
        words = rows[k]["instruction"].split()
        words[12] = "CHANGED"
        extra.append({**rows[k], "instruction": " ".join(words), "output": "another reply"})
    extra += [{"instruction": _sentence(rng, 60), "input": "", "output": "long"} for _ in range(2)]
    return rows + extra, {"exact": 3, "near": 4, "long": 2}


@pytest.mark.slow  # two CLI runs (the second checks the cache)
def test_dedup_and_length_filter_counts(tmp_path: Path) -> None:
    rows, counts = _dedup_rows()
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    sources = {"train": [{"path": str(data)}], "max_length": 512}
    near = base_recipe(
        tmp_path, data={**sources, "dedup": "near", "filter": {"max_tokens": 180}}, train={"max_steps": 1}
    )
    proc = run_cli("train", str(write_recipe(tmp_path, near)), timeout=300)
    assert_ok(proc)
    out = proc.stdout
    assert f"exact duplicate of an earlier row (data.dedup): {counts['exact']}" in out, out
    assert f"near duplicate of an earlier row (word 3-gram Jaccard >= 0.7, data.dedup): {counts['near']}" in out
    assert f"longer than data.filter.max_tokens=180: {counts['long']}" in out
    assert "filtered 9 rows" in out and "train rows: 20 " in out

    # exact mode on the same file: the cached near tokenization must not be reused; one-word edits stay
    exact = base_recipe(tmp_path, data={**sources, "dedup": "exact"}, train={"max_steps": 1})
    exact["output_dir"] = str(tmp_path / "out-exact")
    proc = run_cli("train", str(write_recipe(tmp_path, exact, "exact.yaml")), timeout=300)
    assert_ok(proc)
    assert f"exact duplicate of an earlier row (data.dedup): {counts['exact']}" in proc.stdout
    assert "near duplicate" not in proc.stdout and "train rows: 26 " in proc.stdout, proc.stdout


def _independent_perplexities(texts: list[str]) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()
    out = []
    for text in texts:
        ids = tok(text)["input_ids"] + [tok.eos_token_id]
        t = torch.tensor([ids])
        with torch.no_grad():
            out.append(math.exp(model(input_ids=t, labels=t).loss.item()))
    return out


@pytest.mark.slow  # two CLI runs (the second checks the cache)
def test_perplexity_filter_drops_the_independently_easiest_and_hardest(tmp_path: Path) -> None:
    rng = random.Random(5)
    texts = []
    for i in range(20):  # repetitive texts are easy, random letters hard: a spread of perplexities
        if i % 3 == 0:
            texts.append(" ".join(["the cat sat on the mat"] * (2 + i % 4)))
        elif i % 3 == 1:
            texts.append(_sentence(rng, 12 + i))
        else:
            texts.append("".join(rng.choice("qxzjvkwy ") for _ in range(60 + 3 * i)))
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    recipe = base_recipe(
        tmp_path,
        stage="cpt",
        data={
            "train": [{"path": str(data)}],
            "max_length": 512,
            "filter": {"perplexity": {"model": None, "drop_low": 0.2, "drop_high": 0.1, "batch_size": 3}},
        },
        train={"max_steps": 1},
    )
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)), timeout=300)
    assert_ok(proc)
    assert "perplexity in the lowest 0.2 (data.filter.perplexity.drop_low): 4" in proc.stdout, proc.stdout
    assert "perplexity in the highest 0.1 (data.filter.perplexity.drop_high): 2" in proc.stdout
    lines = (tmp_path / "out" / "perplexity_scores.jsonl").read_text().splitlines()
    scores = [json.loads(line) for line in lines]
    assert [s["row"] for s in scores] == list(range(20))

    ref = _independent_perplexities(texts)
    order = sorted(range(20), key=lambda i: ref[i])
    for s in scores:
        assert math.isclose(s["perplexity"], ref[s["row"]], rel_tol=1e-3)
    assert {s["row"] for s in scores if s["dropped"] == "low"} == set(order[:4])
    assert {s["row"] for s in scores if s["dropped"] == "high"} == set(order[-2:])
    assert sum(s["kept"] for s in scores) == 14
    assert "perplexity filter: 20 training rows scored with" in proc.stdout and "(scored now)" in proc.stdout

    # other fractions, same model and data: the scores come from the cache, the choice is made again
    recipe["data"]["filter"]["perplexity"].update(drop_low=0.0, drop_high=0.25)
    recipe["output_dir"] = str(tmp_path / "out2")
    proc = run_cli("train", str(write_recipe(tmp_path, recipe, "again.yaml")), timeout=300)
    assert_ok(proc)
    assert "(scores from the cache)" in proc.stdout and "dropped 0 easiest and 5 hardest" in proc.stdout
    again = [json.loads(line) for line in (tmp_path / "out2" / "perplexity_scores.jsonl").read_text().splitlines()]
    assert [s["perplexity"] for s in again] == [s["perplexity"] for s in scores]
    assert {s["row"] for s in again if not s["kept"]} == set(order[-5:])


def test_sft_perplexity_is_scored_on_the_replies(tmp_path: Path) -> None:
    """sft rows are scored on their learned tokens only: the reply and its end-of-turn marker, found here
    independently from the tokenizer's own chat template (prompt rendered with the generation prompt)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rng = random.Random(8)
    rows = []
    for i in range(10):
        reply = " ".join(["yes"] * (3 + i)) if i % 2 else "".join(rng.choice("qzxjkv") for _ in range(20 + i))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Row {i}: {_sentence(rng, 6)}"},
                    {"role": "assistant", "content": reply},
                ]
            }
        )
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = base_recipe(
        tmp_path,
        data={"train": [{"path": str(data)}], "max_length": 512, "filter": {"perplexity": {"drop_high": 0.2}}},
        train={"max_steps": 1},
    )
    proc = run_cli("train", str(write_recipe(tmp_path, recipe)), timeout=300)
    assert_ok(proc)
    scores = [json.loads(x) for x in (tmp_path / "out" / "perplexity_scores.jsonl").read_text().splitlines()]

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()
    ref = []
    for r in rows:
        full = tok.apply_chat_template(r["messages"], tokenize=False)
        prompt = tok.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True)
        end = full.index(tok.eos_token, len(prompt)) + len(tok.eos_token)  # the reply and its <|im_end|>
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])
        labels = torch.tensor(
            [
                [
                    t if s < end and e > len(prompt) else -100
                    for t, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
                ]
            ]
        )
        with torch.no_grad():
            ref.append(math.exp(model(input_ids=ids, labels=labels).loss.item()))
    for s in scores:
        assert math.isclose(s["perplexity"], ref[s["row"]], rel_tol=1e-3), (s, ref[s["row"]])
    hardest = sorted(range(10), key=lambda i: ref[i])[-2:]
    assert {s["row"] for s in scores if not s["kept"]} == set(hardest)
