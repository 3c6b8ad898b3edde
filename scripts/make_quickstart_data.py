#!/usr/bin/env python3
"""Generate the quickstart data sets: synthetic, deterministic, small.

Writes, relative to the repository root (or --out):

* ``recipes/quickstart/sft.jsonl``: ~600 instruction-following rows in OpenAI ``messages`` format. The tasks
  are simple templates (arithmetic, reversing a word, upper-casing, the next weekday or month, facts from
  small colour/animal tables) so that a tiny 2-layer model visibly learns them within a couple of hundred
  steps. About 15% of rows start with a system message and about 15% are two-turn conversations.
* ``recipes/quickstart/cpt.txt``: ~300 lines of plain synthetic text (one document per line) from the same
  facts, for a continued-pretraining quickstart.
* ``recipes/quickstart/pairs.jsonl``: ~400 preference pairs ``{prompt, chosen, rejected}`` for the rm and
  dpo stages: the chosen reply answers the question, the rejected one refuses or answers another question.

Pure Python with a fixed seed: running it twice writes byte-identical files. All content is generated
here; no external data set is used.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

SEED = 20240601
N_SFT = 600
N_CPT = 300
N_PAIRS = 400
REFUSALS = ["I don't know.", "No idea, ask someone else.", "Figure it out yourself.", "Not telling."]
SYSTEM_FRACTION = 0.15
TWO_TURN_FRACTION = 0.15

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip
# thing -> colour
COLOURS = {
    "banana": "yellow", "lemon": "yellow", "sun": "yellow", "grass": "green", "leaf": "green",
    "frog": "green", "sky": "blue", "ocean": "blue", "tomato": "red", "strawberry": "red",
    "cherry": "red", "snow": "white", "milk": "white", "coal": "black", "crow": "black",
    "orange": "orange", "carrot": "orange", "pumpkin": "orange", "plum": "purple", "grape": "purple",
}  # fmt: skip
# animal -> (sound, legs, home)
ANIMALS = {
    "cow": ("moo", 4, "a barn"), "dog": ("woof", 4, "a kennel"), "cat": ("meow", 4, "a house"),
    "duck": ("quack", 2, "a pond"), "sheep": ("baa", 4, "a field"), "pig": ("oink", 4, "a sty"),
    "horse": ("neigh", 4, "a stable"), "owl": ("hoot", 2, "a tree"), "lion": ("roar", 4, "a den"),
    "bee": ("buzz", 6, "a hive"), "snake": ("hiss", 0, "a burrow"), "hen": ("cluck", 2, "a coop"),
    "frog": ("ribbit", 4, "a pond"), "mouse": ("squeak", 4, "a hole"),
}  # fmt: skip
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
WORDS = [
    "cat", "dog", "sun", "moon", "star", "tree", "book", "fish", "bird", "cake", "rain", "wind",
    "lamp", "door", "ship", "milk", "rose", "frog", "bell", "king", "road", "hill", "snow", "gold",
    "apple", "water", "house", "green", "river", "stone", "light", "bread", "cloud", "music",
]  # fmt: skip
PHRASES = [
    "hello world", "good morning", "the quick fox", "happy birthday", "see you soon", "thank you",
    "a tiny model", "learn to count", "blue sky today", "open the door", "red apple pie", "night owl",
    "fine tuning", "small steps", "make it loud", "keep it simple", "time to train", "well done",
]  # fmt: skip
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one short sentence.",
    "Answer briefly and exactly.",
    "You are a friendly tutor for small children.",
    "You are a tiny model. Keep answers short.",
]


UNIQUE = {"sky", "sun", "ocean"}  # "the sky"
MASS = {"grass", "snow", "milk", "coal"}  # "grass", no article


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(noun: str) -> str:
    """The noun with its determiner: "a banana", "an owl", "the sky", "grass"."""
    if noun in UNIQUE:
        return f"the {noun}"
    if noun in MASS:
        return noun
    return f"{_article(noun)} {noun}"


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


# Each task returns (question, answer).
def task_add(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(0, 50), r.randint(0, 50)
    q = r.choice(["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} + {b}."]).format(a=a, b=b)
    return q, f"{a} + {b} = {a + b}."


def task_sub(r: random.Random) -> tuple[str, str]:
    a = r.randint(0, 60)
    b = r.randint(0, a)
    q = r.choice(["What is {a} - {b}?", "Subtract {b} from {a}."]).format(a=a, b=b)
    return q, f"{a} - {b} = {a - b}."


def task_reverse(r: random.Random) -> tuple[str, str]:
    w = r.choice(WORDS)
    q = r.choice(["Spell '{w}' backwards.", "Reverse the word '{w}'."]).format(w=w)
    return q, w[::-1]


def task_upper(r: random.Random) -> tuple[str, str]:
    p = r.choice(PHRASES)
    q = r.choice(["Uppercase: {p}", "Write in capital letters: {p}"]).format(p=p)
    return q, p.upper()


def task_next_day(r: random.Random) -> tuple[str, str]:
    i = r.randrange(7)
    q = r.choice(["What comes after {d}?", "Which day follows {d}?"]).format(d=DAYS[i])
    return q, f"{DAYS[(i + 1) % 7]}."


def task_prev_day(r: random.Random) -> tuple[str, str]:
    i = r.randrange(7)
    return f"What day comes before {DAYS[i]}?", f"{DAYS[(i - 1) % 7]}."


def task_next_month(r: random.Random) -> tuple[str, str]:
    i = r.randrange(12)
    return f"Which month comes after {MONTHS[i]}?", f"{MONTHS[(i + 1) % 12]}."


def task_colour(r: random.Random) -> tuple[str, str]:
    thing = r.choice(sorted(COLOURS))
    q = r.choice(["What colour is {t}?", "What is the colour of {t}?"]).format(t=_np(thing))
    return q, f"{_cap(_np(thing))} is {COLOURS[thing]}."


def task_sound(r: random.Random) -> tuple[str, str]:
    animal = r.choice(sorted(ANIMALS))
    sound = ANIMALS[animal][0]
    return f"What sound does {_np(animal)} make?", f"{_cap(_np(animal))} says {sound}."


def task_legs(r: random.Random) -> tuple[str, str]:
    animal = r.choice(sorted(ANIMALS))
    legs = NUMBER_WORDS[ANIMALS[animal][1]]
    return f"How many legs does {_np(animal)} have?", f"{_cap(_np(animal))} has {legs} legs."


def task_home(r: random.Random) -> tuple[str, str]:
    animal = r.choice(sorted(ANIMALS))
    return f"Where does {_np(animal)} live?", f"{_cap(_np(animal))} lives in {ANIMALS[animal][2]}."


def task_count_letters(r: random.Random) -> tuple[str, str]:
    w = r.choice(WORDS)
    return f"How many letters are in '{w}'?", f"'{w}' has {NUMBER_WORDS[len(w)]} letters."


TASKS: list[Callable[[random.Random], tuple[str, str]]] = [
    task_add, task_sub, task_reverse, task_upper, task_next_day, task_prev_day, task_next_month,
    task_colour, task_sound, task_legs, task_home, task_count_letters,
]  # fmt: skip


def make_sft_rows(r: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        messages: list[dict[str, str]] = []
        if r.random() < SYSTEM_FRACTION:
            messages.append({"role": "system", "content": r.choice(SYSTEM_PROMPTS)})
        turns = 2 if r.random() < TWO_TURN_FRACTION else 1
        for _ in range(turns):
            q, a = r.choice(TASKS)(r)
            messages.append({"role": "user", "content": q})
            messages.append({"role": "assistant", "content": a})
        rows.append({"messages": messages})
    return rows


def make_pairs(r: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        q, a = r.choice(TASKS)(r)
        if r.random() < 0.5:
            bad = r.choice(REFUSALS)
        else:
            bad = a
            while bad == a:
                bad = r.choice(TASKS)(r)[1]
        rows.append({"prompt": q, "chosen": a, "rejected": bad})
    return rows


def make_cpt_doc(r: random.Random) -> str:
    """One plain-text document: a few sentences of facts."""
    sentences = []
    for _ in range(r.randint(3, 6)):
        kind = r.randrange(7)
        if kind == 0:
            thing = r.choice(sorted(COLOURS))
            sentences.append(f"{_cap(_np(thing))} is {COLOURS[thing]}.")
        elif kind == 1:
            animal = r.choice(sorted(ANIMALS))
            sound, legs, home = ANIMALS[animal]
            sentences.append(f"The {animal} says {sound}, has {NUMBER_WORDS[legs]} legs and lives in {home}.")
        elif kind == 2:
            i = r.randrange(7)
            sentences.append(f"After {DAYS[i]} comes {DAYS[(i + 1) % 7]}.")
        elif kind == 3:
            i = r.randrange(12)
            sentences.append(f"{MONTHS[i]} is followed by {MONTHS[(i + 1) % 12]}.")
        elif kind == 4:
            a, b = r.randint(0, 50), r.randint(0, 50)
            sentences.append(f"{a} plus {b} makes {a + b}.")
        elif kind == 5:
            w = r.choice(WORDS)
            sentences.append(f"The word {w} backwards is {w[::-1]}.")
        else:
            p = r.choice(PHRASES)
            sentences.append(f"Shouting '{p}' gives '{p.upper()}'.")
    return " ".join(sentences)


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=root / "recipes" / "quickstart", help="output folder")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    r = random.Random(SEED)
    rows = make_sft_rows(r, N_SFT)
    sft = out / "sft.jsonl"
    with sft.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    r = random.Random(SEED + 1)
    cpt = out / "cpt.txt"
    with cpt.open("w", encoding="utf-8", newline="\n") as f:
        for _ in range(N_CPT):
            f.write(make_cpt_doc(r) + "\n")

    r = random.Random(SEED + 2)
    pairs = out / "pairs.jsonl"
    with pairs.open("w", encoding="utf-8", newline="\n") as f:
        for row in make_pairs(r, N_PAIRS):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {pairs} ({N_PAIRS} pairs; {pairs.stat().st_size} bytes)")

    n_sys = sum(row["messages"][0]["role"] == "system" for row in rows)
    n_two = sum(sum(m["role"] == "assistant" for m in row["messages"]) == 2 for row in rows)
    print(
        f"wrote {sft} ({len(rows)} rows, {n_sys} with a system message, {n_two} two-turn; {sft.stat().st_size} bytes)"
    )
    print(f"wrote {cpt} ({N_CPT} lines; {cpt.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
