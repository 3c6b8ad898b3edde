"""llmtune: YAML-driven adaptation of open LLMs (cpt, sft, and later rm / dpo / ppo / rejection sampling)."""

__version__ = "0.1.0"
