"""User-facing errors: one line that says what went wrong and what to do about it."""


class RobauditError(Exception):
    """An error caused by the user's input (file, option, data), shown as one line without a traceback."""


class NonFiniteError(RobauditError):
    """A model produced NaN or infinite values where finite numbers are required."""
