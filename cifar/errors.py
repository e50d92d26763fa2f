"""The one exception type users see: its message says what is wrong and what to do."""


class CifarError(Exception):
    """A problem with the user's input or environment, reported as one clear message."""
