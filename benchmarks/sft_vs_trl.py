"""SFT against TRL's SFTTrainer: now the sft cases of benchmarks/run.py (kept for the old command line).

    python benchmarks/sft_vs_trl.py                  # = python benchmarks/run.py --cases sft_lora
    python benchmarks/sft_vs_trl.py --method full    # = python benchmarks/run.py --cases sft_full

Every other argument goes to run.py as is (e.g. --size vocab, --steps 40, --json out.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=["lora", "full", "qlora"], default="lora")
    a, rest = p.parse_known_args()
    run.main(["--cases", f"sft_{a.method}", *rest])
