"""Inheritune helpers: data -> inherit -> train -> evaluate -> plots, for GPT-2 and Llama parents.

The numbered notebooks call these modules; nothing here keeps module-level state.
Floors, from the ground up (the README draws them; tests/test_layers.py checks them):
ground -> models -> formats -> text -> checkpoint -> measures -> inherit -> training -> evaluation
-> figures -> pipeline. A module uses its own floor and those below, never one above.
"""
from helpers.errors import CheckpointError, ConfigError, DataError, HelpersError

__all__ = ["CheckpointError", "ConfigError", "DataError", "HelpersError"]
__version__ = "0.1.0"
