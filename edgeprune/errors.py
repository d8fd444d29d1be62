"""User-facing errors: the CLI prints them as one line and exits non-zero, never with a traceback."""


class EdgePruneError(Exception):
    """A problem with the user's input (path, option, data), reported as a single line."""


def first_line(e: BaseException) -> str:
    """An exception as one short line, for user-facing messages."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
