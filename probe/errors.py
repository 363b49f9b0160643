"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class ProbeError(Exception):
    """A mistake in the user's input (data folder, template, model, option) with a one-line message; the subclasses
    below say which kind, the CLI prints each the same way (`error: <message>`, exit 2)."""


class DataError(ProbeError):
    """The facts: a data folder, facts file, LAMA or BEAR source, relation, split, vocabulary or candidates file."""


class TemplateError(ProbeError):
    """A template that does not parse or does not fit the model or method, a template file or a prompts file;
    `problems` lists every bad line of a file."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


class ModelError(ProbeError):
    """A model: its name, loading, kind, dtype, device or placement, or one a run or adapter was made for."""


class SettingError(ProbeError):
    """A flag, method option, fit setting, preset, control, executor setting (--jobs, --pack, --ray) or sweep grid."""


class RunFolderError(ProbeError):
    """A folder probe writes or reads back: --out, --resume, a locked or foreign folder, a run or sweep folder, saved
    prompts and adapters."""


def check_positive(**values: int) -> None:
    """Each named setting must be at least 1; the first that is not is a SettingError naming its flag."""
    for name, value in values.items():
        if value < 1:
            raise SettingError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


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
