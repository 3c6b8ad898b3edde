#!/usr/bin/env python3
"""Generate the data of the quickstart pipeline (scripts/quickstart.sh): one small family of facts, split so
that every metric the pipeline reports is measured on rows no stage trained on.

The facts: the colour of a thing, the sound and the home of an animal, the day after a weekday, the month
after a month (67 facts). Each fact is asked with five phrasings: three are sft's, one is the online stages'
prompts (grpo, ppo, rejection sampling: questions sft never saw), one is held out for evaluation (which
phrasing plays which part turns from fact to fact). A held-out question asks a known fact in a way no stage
trained on: answering it takes the fact, not a memorised string. Writes, under --out (default
recipes/quickstart/facts):

* ``cpt.txt`` / ``cpt_held.txt``: plain sentences stating the facts, one document per line; the held-out
  documents use sentence forms the training documents never use.
* ``sft.jsonl``: ``messages`` rows, sft's phrasings; ``prompts.jsonl``: the online stages' questions as
  ``{prompt, answer}`` rows; ``held.jsonl``: the held-out questions.
* ``pairs.jsonl`` / ``pairs_held.jsonl``: ``{prompt, chosen, rejected}``: the right answer against a wrong
  one of the same kind, a refusal, or a near-empty reply ("...", "-"), on sft's and the online stages'
  questions (rm and dpo train on them); the held-out pairs ask the held-out questions.

Pure Python with a fixed seed: running it twice writes byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_quickstart_data import ANIMALS, COLOURS, DAYS, MONTHS

SEED = 20261203
REFUSALS = ["I don't know.", "No idea.", "Ask someone else.", "...", "-"]
QUESTIONS = {
    "colour": [
        "What colour is {}?", "Name the colour of {}.", "Tell me the colour of {}.", "{}: which colour?",
        "Which colour does {} have?",
    ],
    "sound": [
        "What sound does a {} make?", "Which noise does a {} make?", "How does a {} sound?", "{}: which sound?",
        "Tell me the sound of a {}.",
    ],
    "home": [
        "Where does a {} live?", "Name the home of a {}.", "Which place does a {} live in?", "{}: which home?",
        "Tell me where a {} lives.",
    ],
    "day": [
        "What day comes after {}?", "Which day follows {}?", "Name the day after {}.", "{}: next day?",
        "Tell me the day after {}.",
    ],
    "month": [
        "Which month comes after {}?", "What month follows {}?", "Name the month after {}.", "{}: next month?",
        "Tell me the month after {}.",
    ],
}  # fmt: skip
SENTENCES = {  # the last form of each kind is held out
    "colour": ["The colour of {} is {}.", "{} is {} in colour.", "A {} looks {}."],
    "sound": ["A {} makes the sound {}.", "The {} says {}.", "You hear {1} from a {0}."],
    "home": ["A {} lives in a {}.", "The home of a {} is a {}.", "You find a {} in a {}."],
    "day": ["After {} comes {}.", "The day after {} is {}.", "{} is followed by {}."],
    "month": ["After {} comes {}.", "The month after {} is {}.", "{} is followed by {}."],
}


def facts() -> list[tuple[str, str, str]]:
    """(kind, subject, answer) for every fact."""
    out = [("colour", thing, colour) for thing, colour in COLOURS.items()]
    for animal, (sound, _legs, home) in ANIMALS.items():
        out += [("sound", animal, sound), ("home", animal, home.split()[-1])]
    out += [("day", d, DAYS[(i + 1) % 7]) for i, d in enumerate(DAYS)]
    out += [("month", m, MONTHS[(i + 1) % 12]) for i, m in enumerate(MONTHS)]
    return out


def build(out: Path) -> dict[str, int]:
    rng = random.Random(SEED)
    all_facts = facts()
    answers: dict[str, list[str]] = {}
    for kind, _, answer in all_facts:
        answers.setdefault(kind, [])
        if answer not in answers[kind]:
            answers[kind].append(answer)
    train, online, held = [], [], []
    for j, (kind, subject, answer) in enumerate(all_facts):
        for i, q in enumerate(QUESTIONS[kind]):
            part = held if i == j % 5 else online if i == (j + 1) % 5 else train
            part.append((kind, q.format(subject), answer))
    rng.shuffle(train)
    rng.shuffle(online)

    def pair(kind: str, prompt: str, answer: str) -> dict[str, str]:
        wrong = [a for a in answers[kind] if a != answer]
        rejected = rng.choice(wrong) if rng.random() < 0.6 else rng.choice(REFUSALS)
        return {"prompt": prompt, "chosen": answer, "rejected": rejected}

    docs, docs_held = [], []
    for _ in range(400):
        picked = rng.sample(all_facts, 4)
        docs.append(" ".join(rng.choice(SENTENCES[k][:-1]).format(s, a) for k, s, a in picked))
    for _ in range(40):
        picked = rng.sample(all_facts, 4)
        docs_held.append(" ".join(SENTENCES[k][-1].format(s, a) for k, s, a in picked))

    files = {
        "cpt.txt": [d for d in docs],
        "cpt_held.txt": docs_held,
        "sft.jsonl": [
            json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]})
            for _, p, a in train
        ],
        "prompts.jsonl": [json.dumps({"prompt": p, "answer": a}) for _, p, a in online],
        "held.jsonl": [json.dumps({"prompt": p, "answer": a}) for _, p, a in held],
        "pairs.jsonl": [json.dumps(pair(k, p, a)) for k, p, a in train + online for _ in range(2)],
        "pairs_held.jsonl": [json.dumps(pair(k, p, a)) for k, p, a in held],
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        (out / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return {name: len(lines) for name, lines in files.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "recipes/quickstart/facts")
    counts = build(ap.parse_args().out)
    print(", ".join(f"{name}: {n}" for name, n in counts.items()))


if __name__ == "__main__":
    main()
