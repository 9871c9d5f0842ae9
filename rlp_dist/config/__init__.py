"""Hydra schema registration and conversion of a composed config into a validated RootConfig."""

from __future__ import annotations

import pathlib
from typing import Iterable, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlp_dist.config.schema import (  # noqa: F401 (re-exported)
    CheckpointConfig,
    ConfigError,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    NTPConfig,
    OptimConfig,
    ParallelConfig,
    RLPConfig,
    RootConfig,
    TrainConfig,
    to_dict,
    validate,
)

CONF_DIR = pathlib.Path(__file__).resolve().parents[2] / "conf"


def register() -> None:
    """Make ``rlp_dist_schema`` (the typed root) available to conf/config.yaml's defaults list."""
    ConfigStore.instance().store(name="rlp_dist_schema", node=RootConfig)


register()


def presets() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def from_hydra(cfg: DictConfig, world_size: Optional[int] = None) -> RootConfig:
    """Convert the composed Hydra config into a validated RootConfig (raises ConfigError)."""
    if OmegaConf.is_missing(cfg, "model"):
        raise ConfigError(
            "no model preset chosen; add +model=NAME with NAME one of: " + ", ".join(presets()))
    _refuse_unknown_keys(cfg, RootConfig, "")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config value(s) {', '.join(missing)} are required (???); set them as overrides")
    try:
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:  # a type error from the schema, e.g. train.steps=abc
        raise ConfigError(f"invalid config: {e.msg if hasattr(e, 'msg') else e}") from None
    except ValueError as e:
        # OmegaConf wraps exceptions raised in __post_init__; surface our own message.
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(str(e)) from None
    return validate(obj, world_size)


def _refuse_unknown_keys(node: DictConfig, schema: type, prefix: str) -> None:
    """A key the schema does not have (``+rlp.grup_size=4`` adds one past Hydra's own check) is an error
    naming the closest field; OmegaConf would drop it silently when building the dataclasses."""
    import dataclasses
    import difflib
    import typing

    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key in node.keys():
        if prefix == "" and key == "hydra":
            continue
        name = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            raise ConfigError(f"unknown config key {name!r}" + (f"; did you mean {prefix}{close[0]}?" if close else
                              f"; valid keys under {prefix.rstrip('.') or 'the root'}: {', '.join(sorted(fields))}"))
        sub = hints.get(key)
        if dataclasses.is_dataclass(sub) and OmegaConf.is_dict(node._get_node(key)) and not OmegaConf.is_missing(node, key):
            _refuse_unknown_keys(node[key], sub, f"{name}.")


def compose(overrides: Iterable[str] = (), world_size: Optional[int] = None) -> RootConfig:
    """Compose conf/config.yaml with overrides outside of @hydra.main (tests, CLI, benchmarks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from hydra.errors import HydraException, MissingConfigException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
    except MissingConfigException as e:  # an unknown option of a config group, e.g. +model=llama
        opts = ", ".join(e.options) if getattr(e, "options", None) else ""
        raise ConfigError(f"{str(e).splitlines()[0]}" + (f"; use one of: {opts}" if opts else "")) from None
    except HydraException as e:  # an unknown key or a value of the wrong type
        cause = e.__cause__ or e
        raise ConfigError(f"{e}: {cause}".splitlines()[0] + "; check the override's name and type") from None
    return from_hydra(cfg, world_size)
