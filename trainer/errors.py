"""Errors of the trainer that the `kiln` CLI turns into one line (kept free of torch, so that the
CLI can name a mistake without importing it)."""


class CheckpointError(Exception):
    """A checkpoint that cannot be used with this recipe; the message is one line."""
