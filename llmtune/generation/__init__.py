"""Generation for eval (and later ppo / rejection sampling): prompts from rows, batched seeded sampling."""
