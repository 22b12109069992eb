"""The exceptions a user can cause. Each message is one line that names the input and the fix.
Floor "ground": imports nothing of the package."""


class HelpersError(Exception):
    """Base class: bad input from the user (a path, a parameter, a file), never a bug of ours."""

    def _render_traceback_(self) -> list[str]:
        """What Jupyter (IPython) shows for it: the one line, not a traceback through our code."""
        return [f"{type(self).__name__}: {self}"]


class CheckpointError(HelpersError):
    """A model source that cannot be loaded: missing, truncated, foreign or mismatched."""


class DataError(HelpersError):
    """A data source or token folder that cannot be used."""


class ConfigError(HelpersError, ValueError):
    """A parameter with an unknown name, a wrong type or a value out of range."""


class StorageError(HelpersError, OSError):
    """An output folder that cannot take what a run writes (its disk is full); what was written
    before is intact, and the message names the checkpoint to resume from."""


class RunStopped(HelpersError):
    """A run stopped on request (Ctrl-C, a notebook's interrupt, SIGTERM from a scheduler or Kaggle)
    after writing a checkpoint of the step it had reached; the message says how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
