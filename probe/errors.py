"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class ProbeError(Exception):
    """A mistake in the user's input (data folder, template, model, option) with a one-line message."""


def check_positive(**values: int) -> None:
    """Each named setting must be at least 1; the first that is not is a ProbeError naming its flag."""
    for name, value in values.items():
        if value < 1:
            raise ProbeError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


class Interrupted(Exception):
    """Ctrl-C during a run: what finished is saved in `folder`."""

    def __init__(self, folder):
        super().__init__(str(folder))
        self.folder = folder


class CellsFailed(Exception):
    """Some cells (relations, grid cells) failed on every try; the others are written."""

    def __init__(self, failures: list):
        self.failures = failures  # (cell, why) pairs
        first, why = failures[0]
        super().__init__(f"{len(failures)} cell(s) failed, e.g. {first.key}: {why}")
