"""kiln: distributed training for efficient LLM pretraining."""

__version__ = "0.1.0"
