"""Run a training command with a token counter on the model, then write what it counted as JSON.

    python benchmarks/probe.py COUNTS.json -m llmtune train recipe.yaml
    python benchmarks/probe.py COUNTS.json benchmarks/trl_driver.py ARGS.json

The same counter wraps ``LlamaModel.forward`` for both sides of a benchmark (llmtune and TRL), so both are
counted the same way: every forward that runs with gradients enabled (a training forward; generation and
reference passes run under ``no_grad``) adds its rows and its non-padding tokens (the attention mask's sum,
or every position when no mask is passed, as in packed / padding-free batches). The benchmark compares the
two sides' totals. On CUDA it also records ``torch.cuda.max_memory_allocated()`` at exit.
"""

from __future__ import annotations

import atexit
import functools
import json
import runpy
import sys


def install(path: str) -> None:
    import torch
    from transformers.models.llama import modeling_llama

    counts = {"forwards": 0, "rows": 0, "tokens": 0, "padded_tokens": 0}
    pending: list[torch.Tensor] = []  # token sums stay on the device until exit: no sync inside the step
    original = modeling_llama.LlamaModel.forward

    @functools.wraps(original)
    def forward(self, input_ids=None, attention_mask=None, *args, **kwargs):
        if torch.is_grad_enabled() and self.training:
            x = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            if x is not None:
                counts["forwards"] += 1
                counts["rows"] += int(x.shape[0])
                counts["padded_tokens"] += int(x.shape[0] * x.shape[1])
                if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
                    pending.append(attention_mask.detach().sum())
                else:  # no mask (packed / padding-free rows) or a prepared 4-D mask: every position is real
                    counts["tokens"] += int(x.shape[0] * x.shape[1])
        return original(self, input_ids, attention_mask, *args, **kwargs)

    modeling_llama.LlamaModel.forward = forward

    def write() -> None:
        counts["tokens"] += int(sum(int(t.item()) for t in pending))
        counts["cuda_peak"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        with open(path, "w", encoding="utf-8") as f:
            json.dump(counts, f)

    atexit.register(write)


def main() -> None:
    out, *rest = sys.argv[1:]
    install(out)
    if rest[0] == "-m":
        sys.argv = [rest[1], *rest[2:]]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = rest
        runpy.run_path(rest[0], run_name="__main__")


if __name__ == "__main__":
    main()
