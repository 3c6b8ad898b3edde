"""Generation for eval, ppo, grpo and rejection sampling: batched seeded sampling from token ids."""
