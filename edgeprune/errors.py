"""User-facing errors: the CLI prints them as one line and exits non-zero, never with a traceback."""


class EdgePruneError(Exception):
    """A problem with the user's input (path, option, data), reported as a single line."""
