"""The user-facing error types. A `DeltakdError` becomes one line and exit 2; an `Interrupted`
(Ctrl-C) one line saying how to continue, and exit 130."""


class DeltakdError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class WriteFailed(DeltakdError):
    """A write that failed (a full disk, a read-only file system), named with its path."""


class Interrupted(DeltakdError):
    """The user stopped a run (SIGINT); the message says how to continue it."""

    exit_code = 130
