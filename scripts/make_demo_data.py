"""Write recipes/data/: the first rows of the public demo files the shipped recipes train on, so that every
recipe validates (and runs) on a fresh clone with nothing beside it. Run once from the repository root with
the full files at SOURCE (default ../shared/data, laid out as llama-factory/ and gsm8k/); the output is
committed. Rows are copied unchanged (JSON arrays re-indented, JSONL lines verbatim)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "recipes" / "data"
# file in SOURCE -> (file in OUT, rows kept): a few hundred at most, about 1.4 MB in all
ROWS = {
    "llama-factory/alpaca_en_demo.json": ("llama-factory/alpaca_en_demo.json", 200),
    "llama-factory/glaive_toolcall_en_demo.json": ("llama-factory/glaive_toolcall_en_demo.json", 100),
    "llama-factory/dpo_en_demo.json": ("llama-factory/dpo_en_demo.json", 80),
    "llama-factory/dpo_zh_demo.json": ("llama-factory/dpo_zh_demo.json", 60),
    "llama-factory/c4_demo.jsonl": ("llama-factory/c4_demo.jsonl", 80),
    "gsm8k/train_first1000.jsonl": ("gsm8k/train_first300.jsonl", 300),
}


def main(source: Path) -> None:
    for name, (out, n) in ROWS.items():
        src, dst = source / name, OUT / out
        dst.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".json"):
            rows = json.loads(src.read_text(encoding="utf-8"))[:n]
            dst.write_text(json.dumps(rows, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        else:
            lines = src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]
            dst.write_text("".join(lines), encoding="utf-8")
        print(f"{dst.relative_to(ROOT)}: {n} rows, {dst.stat().st_size} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data")
