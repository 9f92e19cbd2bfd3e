"""The one exception type the CLI turns into a one-line error message."""


class ScalpelError(Exception):
    """A user-facing error: bad input, an unsupported model or target, a missing file."""
