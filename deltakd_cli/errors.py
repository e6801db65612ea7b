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


ERROR_TEXT_LIMIT = 400  # characters of a library's own message kept in the one line


def one_line(error: BaseException, limit: int = ERROR_TEXT_LIMIT) -> str:
    """A library's message as one line, whole up to `limit` characters (its first line alone can
    stop mid-sentence, e.g. transformers' "... from one of:"); its type's name when it is empty."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
