"""Configs: YAML with ``_base_`` inheritance and CLI overrides (loader), the schema of every
section (schema), and validation before anything is built (validate)."""
from vlframe.config.loader import ConfigError, apply_overrides, config_to_dict, load_config, save_config
from vlframe.config.schema import TASK_RESERVED_KEYS, Component, Config, DataConfig, TrainConfig
from vlframe.config.validate import (
    UnknownTypeError,
    apply_defaults,
    check_component,
    format_components,
    load_and_validate,
    validate,
)

__all__ = [
    "TASK_RESERVED_KEYS",
    "Component",
    "Config",
    "ConfigError",
    "DataConfig",
    "TrainConfig",
    "UnknownTypeError",
    "apply_defaults",
    "apply_overrides",
    "check_component",
    "config_to_dict",
    "format_components",
    "load_and_validate",
    "load_config",
    "save_config",
    "validate",
]
