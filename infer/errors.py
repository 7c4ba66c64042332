"""The one error type of kiln.infer: a checkpoint, prompt file or option a user got wrong."""


class InferError(Exception):
    """A user error in loading, generating or evaluating; the message is one line with the fix."""
