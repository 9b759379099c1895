"""Typed job config: dataclasses, YAML + dotted CLI overrides, and validation."""

from scaletrain.config.loader import (
    ConfigError,
    MissingDataError,
    config_to_dict,
    field_help,
    load_config,
    parse_overrides,
)
from scaletrain.config.schema import JobConfig, opt
from scaletrain.config.validate import grad_accum_steps, micro_batch_size, validate_config

__all__ = [
    "ConfigError",
    "MissingDataError",
    "JobConfig",
    "config_to_dict",
    "field_help",
    "grad_accum_steps",
    "load_config",
    "micro_batch_size",
    "opt",
    "parse_overrides",
    "validate_config",
]
