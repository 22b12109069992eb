"""The exceptions a user can cause. Each message is one line that names the input and the fix."""


class HelpersError(Exception):
    """Base class: bad input from the user (a path, a parameter, a file), never a bug of ours."""


class CheckpointError(HelpersError):
    """A model source that cannot be loaded: missing, truncated, foreign or mismatched."""


class DataError(HelpersError):
    """A data source or token folder that cannot be used."""


class ConfigError(HelpersError, ValueError):
    """A parameter with an unknown name, a wrong type or a value out of range."""
