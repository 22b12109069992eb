"""Inheritune helpers: data -> inherit -> train -> evaluate -> plots, for GPT-2 and Llama parents.

The numbered notebooks call these modules; nothing here keeps module-level state.
"""
from helpers.errors import CheckpointError, ConfigError, DataError, HelpersError

__all__ = ["CheckpointError", "ConfigError", "DataError", "HelpersError"]
__version__ = "0.1.0"
