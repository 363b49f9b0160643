"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class ProbeError(Exception):
    """A mistake in the user's input (data folder, template, model, option) with a one-line message."""


class Interrupted(Exception):
    """Ctrl-C during a run: what finished is saved in `folder`."""

    def __init__(self, folder):
        super().__init__(str(folder))
        self.folder = folder
