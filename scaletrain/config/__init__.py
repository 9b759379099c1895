"""Typed job config: dataclasses, YAML + dotted CLI overrides, and per-field checks.

Plain dataclasses that every layer reads; the checks that need the parallel layout live in
scaletrain/validate.py, above both this package and scaletrain.parallel.
"""

from scaletrain.config.loader import (
    ConfigError,
    MissingDataError,
    config_to_dict,
    field_help,
    load_config,
    parse_overrides,
)
from scaletrain.config.schema import JobConfig, opt

__all__ = [
    "ConfigError",
    "MissingDataError",
    "JobConfig",
    "config_to_dict",
    "field_help",
    "load_config",
    "opt",
    "parse_overrides",
]
