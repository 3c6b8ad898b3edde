"""cpt's peak memory against the corpus size: the default recipe (no `data.memory_map` key: `auto`, the
memory-mapped path) at two sizes, and `memory_map: false` (rows in memory) at the small one for contrast,
each run a child process whose own peak resident memory is read from wait4.

    python benchmarks/cpt_memory.py                      # 30 MB and 300 MB of text, the tiny model
    python benchmarks/cpt_memory.py --sizes 20 200 --steps 5

The corpus is synthetic JSONL text (words drawn from a fixed list, one document a line), written to a
temporary directory; the token cache starts empty, so the memory-mapped runs include tokenizing the corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORDS = [
    *[
        "the",
        "river",
        "stone",
        "cloud",
        "apple",
        "tiger",
        "lamp",
        "green",
        "paper",
        "seven",
        "music",
        "winter",
        "bread",
        "glass",
        "orange",
    ],
    *[
        "north",
        "market",
        "silver",
        "quiet",
        "engine",
        "garden",
        "letter",
        "window",
        "summer",
        "mountain",
        "number",
        "yellow",
        "simple",
    ],
]


def write_corpus(path: Path, megabytes: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    target = megabytes * 1_000_000
    written = docs = 0
    with open(path, "w") as f:
        while written < target:
            text = " ".join(rng.choices(WORDS, k=rng.randint(50, 400)))
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)
            docs += 1
    return docs


def run(recipe: dict, work: Path, env: dict[str, str]) -> tuple[float, float]:
    path = work / f"{Path(recipe['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "llmtune", "train", str(path)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{path} failed:\n{proc.stderr.read()[-3000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # MB (Linux reports kB), seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs=2, default=[30, 300], help="corpus sizes in MB (small, large)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--max-length", type=int, default=512)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "LLMTUNE_CACHE": str(work / "cache")}
        results = []
        for mb, mm in ((a.sizes[0], False), (a.sizes[0], None), (a.sizes[1], None)):
            corpus = work / f"corpus-{mb}.jsonl"
            if not corpus.exists():
                docs = write_corpus(corpus, mb)
                print(f"wrote {corpus.name}: {corpus.stat().st_size / 1e6:.0f} MB, {docs:,} documents", flush=True)
            name = f"{'memory' if mm is False else 'default'}-{mb}"
            recipe = {
                "stage": "cpt",
                "output_dir": str(work / name),
                "seed": 0,
                "model": {"path": str(ROOT / "recipes" / "quickstart" / "model")},
                "finetuning": {"method": "full"},
                "data": {
                    "train": [{"path": str(corpus)}],
                    "max_length": a.max_length,
                    "packing": True,
                    **({} if mm is None else {"memory_map": mm}),
                },
                "train": {"max_steps": a.steps, "micro_batch_size": 4, "lr": 1e-3, "log_every": a.steps},
                "precision": "fp32",
            }
            rss, wall = run(recipe, work, env)
            results.append((name, mb, rss, wall))
            print(f"{name:14} {mb:6d} MB  peak RSS {rss:8.0f} MB  wall {wall:6.1f} s", flush=True)
        mapped = [r for r in results if r[0].startswith("default")]
        print(f"default recipe peak RSS, {a.sizes[1]} MB / {a.sizes[0]} MB corpus: {mapped[1][2] / mapped[0][2]:.3f}x")
        print(f"memory_map false / default peak RSS at {a.sizes[0]} MB: {results[0][2] / mapped[0][2]:.2f}x")


if __name__ == "__main__":
    main()
