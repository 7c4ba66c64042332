"""Evaluation tasks of `kiln eval` beyond held-out perplexity (kiln.infer.evaluate)."""
