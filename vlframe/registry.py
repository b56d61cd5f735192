"""Every registry of vlframe, in one place.

Built on mmengine's ``Registry`` (scope ``vlframe``). ``locations`` lets a registry import the
package modules that fill it on first lookup, so ``build`` works without the caller importing
them first. A config node ``{type: Name, **kwargs}`` builds ``Name(**kwargs)`` through
:func:`build`, which fails with the registry's name and the closest registered names when
``Name`` is unknown.
"""
from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from typing import Any

from mmengine.registry import Registry

MODELS = Registry("model", scope="vlframe", locations=["vlframe.modules"])
LOSSES = Registry("loss", scope="vlframe", locations=["vlframe.modules"])
TASKS = Registry("task", scope="vlframe", locations=["vlframe.tasks"])
MASKERS = Registry("masker", scope="vlframe", locations=["vlframe.masking"])
OT_SOLVERS = Registry("ot_solver", scope="vlframe", locations=["vlframe.ot"])
DATASETS = Registry("dataset", scope="vlframe", locations=["vlframe.data"])
SAMPLERS = Registry("sampler", scope="vlframe", locations=["vlframe.data"])
METRICS = Registry("metric", scope="vlframe", locations=["vlframe.metrics"])
HOOKS = Registry("hook", scope="vlframe", locations=["vlframe.engine.hooks"])

ALL_REGISTRIES: dict[str, Registry] = {
    r.name: r
    for r in (MODELS, LOSSES, TASKS, MASKERS, OT_SOLVERS, DATASETS, SAMPLERS, METRICS, HOOKS)
}

PLUGIN_GROUP = "vlframe.plugins"
_plugins_loaded = False


class UnknownComponentError(KeyError):
    """A config named a ``type`` that no registered component has."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


def _import_locations(registry: Registry) -> None:
    # mmengine imports locations lazily inside get(); we also need them for listing names.
    registry.import_from_location()


def registered_names(registry: Registry) -> list[str]:
    _import_locations(registry)
    load_plugins()
    return sorted(registry.module_dict)


def load_plugins() -> list[str]:
    """Import every module advertised under the ``vlframe.plugins`` entry-point group (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return []
    _plugins_loaded = True
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=PLUGIN_GROUP):
        ep.load()
        loaded.append(ep.value)
    return loaded


def import_custom(modules: list[str] | tuple[str, ...] | None, *, where: str = "custom_imports") -> None:
    """Import user modules named by a config's ``custom_imports`` so their decorators run."""
    for i, name in enumerate(modules or []):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"{where}[{i}]: cannot import module {name!r}: {e}") from e


def lookup(registry: Registry, name: str, *, where: str = "type") -> type:
    """Return the class registered as ``name`` or raise naming the closest registered names."""
    load_plugins()
    cls = registry.get(name)
    if cls is None:
        names = registered_names(registry)
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else f"registered: {', '.join(names) or '(none)'}"
        raise UnknownComponentError(f"{where}: {name!r} is not in the {registry.name!r} registry; {hint}")
    return cls


def build(cfg: Mapping[str, Any] | None, registry: Registry, *, where: str = "", **extra: Any) -> Any:
    """Build ``cfg['type']`` from ``registry`` with the other keys (and ``extra``) as kwargs.

    ``where`` is the config path of the node, used in error messages.
    """
    if cfg is None:
        return None
    if not isinstance(cfg, Mapping):
        try:  # omegaconf DictConfig
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover
            pass
    if not isinstance(cfg, Mapping) or "type" not in cfg:
        raise TypeError(f"{where or 'config node'}: expected a mapping with a 'type' key, got {cfg!r}")
    kwargs = {k: v for k, v in cfg.items() if k != "type"}
    kwargs.update(extra)
    cls = lookup(registry, cfg["type"], where=f"{where}.type" if where else "type")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise TypeError(f"{where or cfg['type']}: cannot build {cfg['type']!r}: {e}") from e
