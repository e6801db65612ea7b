"""The one user-facing error type. Anything raised as `DeltakdError` becomes one line and exit 2."""


class DeltakdError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


def require(condition: bool, message: str) -> None:
    """Raise `DeltakdError(message)` unless `condition` holds."""
    if not condition:
        raise DeltakdError(message)
