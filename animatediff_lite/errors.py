"""Exceptions raised by animatediff-lite."""


class CheckpointError(ValueError):
    """A weights file is missing, truncated, unreadable, of the wrong kind or does not fit the model.

    The message always names the file and what was expected.
    """
