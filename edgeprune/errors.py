"""User-facing errors: the CLI prints them as one line and exits non-zero, never with a traceback."""


class EdgePruneError(Exception):
    """A problem with the user's input (path, option, data), reported as a single line."""


class FormatUnsupported(EdgePruneError):
    """This model cannot be written in this export format (for example per-layer widths that no llama.cpp
    architecture of its family reads). The pipeline records the artifact as not exported, with this line, and goes
    on; the `export` command reports it as any other error."""


def first_line(e: BaseException) -> str:
    """An exception as one short line, for user-facing messages."""
    text = str(e).strip() or type(e).__name__
    line = text.splitlines()[0]
    return line if len(line) <= 300 else line[:299] + "…"
