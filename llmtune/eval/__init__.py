"""``llmtune eval``: tasks (perplexity, preference, reward, generate, compare), metrics and reports."""
