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
import inspect
import os
import sys
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


_imported_paths: dict[str, str] = {}  # realpath of a custom_imports file/folder -> module name


def is_custom_path(entry: str) -> bool:
    return entry.endswith(".py") or "/" in entry or os.sep in entry or entry.startswith(".")


def resolve_custom_path(entry: str, base_dir: str | os.PathLike | None) -> str | None:
    """The file or package folder a ``custom_imports`` path names: relative to ``base_dir`` (the
    config's folder) first, then to the current folder; None if neither exists."""
    expanded = os.path.expanduser(entry)
    candidates = [expanded] if os.path.isabs(expanded) else [os.path.join(os.fspath(base_dir), expanded)] * bool(base_dir) + [expanded]
    for c in candidates:
        if os.path.isfile(c) or os.path.isfile(os.path.join(c, "__init__.py")):
            return os.path.abspath(c)
    return None


def _import_path(path: str) -> str:
    """Import a module file or package folder by its own name, its folder put first on sys.path
    (so it imports as a normal module: its own imports, pickling and DataLoader workers work)."""
    real = os.path.realpath(path)
    if real in _imported_paths:
        return _imported_paths[real]
    folder, leaf = os.path.split(real.rstrip(os.sep))
    name = leaf[:-3] if leaf.endswith(".py") else leaf
    if not name.isidentifier():
        raise ImportError(f"{path}: {name!r} is not a valid module name (rename the file)")
    existing = sys.modules.get(name)
    where = getattr(existing, "__file__", None) or ""
    if existing is not None and os.path.realpath(where) not in (real, os.path.join(real, "__init__.py")):
        raise ImportError(f"{path}: a different module named {name!r} is already imported (from {where or 'a builtin'}); "
                          "rename the file")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    importlib.import_module(name)
    _imported_paths[real] = name
    return name


def import_custom(modules: list[str] | tuple[str, ...] | None, *, where: str = "custom_imports",
                  base_dir: str | os.PathLike | None = None) -> None:
    """Import user modules named by a config's ``custom_imports`` so their decorators run.

    An entry is a module name (``my_project.heads``), also looked up next to the config
    (``base_dir``), or a path to a ``.py`` file or package folder, relative to the config's folder
    or the current one. No PYTHONPATH is needed either way."""
    for i, name in enumerate(modules or []):
        try:
            if is_custom_path(name):
                path = resolve_custom_path(name, base_dir)
                if path is None:
                    looked = ", ".join(dict.fromkeys(os.path.abspath(p) for p in
                                                     ([os.path.join(base_dir, name)] if base_dir else []) + [name]))
                    raise ImportError(f"no such file or package folder (looked at {looked})")
                _import_path(path)
                continue
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as e:
                top = name.split(".")[0]
                local = resolve_custom_path(top if "." in name else name + ".py", base_dir) if base_dir else None
                local = local or (resolve_custom_path(top, base_dir) if base_dir else None)
                if e.name != top or local is None:
                    raise
                # a module (or package) next to the config
                if base_dir and os.fspath(base_dir) not in sys.path:
                    sys.path.insert(0, os.path.abspath(base_dir))
                importlib.import_module(name)
        except ImportError as e:
            hint = ("; give it as a path relative to the config file (e.g. custom_imports: [my_heads.py] or "
                    "[../my_project/]), put it next to the config, or pip install -e the package that holds it")
            raise ImportError(f"{where}[{i}]: cannot import module {name!r}: {e}{hint}") from e


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
    label = f"{where or cfg['type']}: {cfg['type']!r} ({cls.__module__}.{getattr(cls, '__qualname__', cls)})"
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:  # the config's arguments do not fit: a config error, one line
        raise TypeError(f"{where or cfg['type']}: cannot build {cfg['type']!r}: {e}") from None
    except ValueError:  # no signature to check against
        pass
    try:
        return cls(**kwargs)
    except Exception as e:
        # Raised inside the component's own code: keep the exception and its traceback, and say
        # which component it was. Outside vlframe it is user code, shown with its traceback.
        e.add_note(f"while building {label}")
        if not cls.__module__.startswith("vlframe.") and not hasattr(e, "vlframe_component"):
            e.vlframe_component = label
        raise
