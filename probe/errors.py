"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class ProbeError(Exception):
    """A mistake in the user's input (data folder, template, model, option) with a one-line message."""
