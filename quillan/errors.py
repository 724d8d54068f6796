"""Errors shared by the library's training loops."""


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/Inf; the message names the step (train and grpo stop on it)."""
