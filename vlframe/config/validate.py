"""Check a loaded config before anything is built or queued.

Section keys are checked against the dataclasses of ``schema.py``; component nodes
(``{type: Name, **kwargs}``) against the ``__init__`` signature of the class registered as
``Name``. Every failure is a one-line :class:`ConfigError` that names the full dotted key and,
for a typo, the closest valid name.

Which registry a component node belongs to is decided by where it sits (the two tables below):
a top-level position (``model``, ``tasks.<name>``, ...) or, inside another component, the key
name (``masker``, ``ot_solver``, ...). A component may list in ``injected_kwargs`` (a class
attribute) the arguments its parent passes at build time (e.g. a head's ``hidden_size``); those
are not required from the config.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import types
import typing
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal, Union

from mmengine.registry import Registry
from omegaconf import MISSING, DictConfig, OmegaConf

from vlframe import registry as R
from vlframe.config.loader import ConfigError, config_to_dict, load_config
from vlframe.config.schema import TASK_RESERVED_KEYS, Component, Config
from vlframe.modules.heads import HEAD_SIZE_KWARGS

# Position of a node in the config (dotted path, one fnmatch pattern per segment) -> registry.
# The first matching row wins. ``reserved``: keys the trainer consumes (type-checked here, never
# passed to the class).
POSITIONS: list[tuple[str, Registry, dict[str, type]]] = [
    ("model", R.MODELS, {}),
    ("tasks.*", R.TASKS, TASK_RESERVED_KEYS),
    ("data.sampler", R.SAMPLERS, {}),
    ("data.*", R.DATASETS, {}),  # data.train, data.val and any other split
    ("hooks.*", R.HOOKS, {}),
]

# Key name (fnmatch pattern) of a component node nested in another component -> registry.
# Items of a list take the list's key name.
NESTED: list[tuple[str, Registry]] = [
    ("masker", R.MASKERS),
    ("ot_solver", R.OT_SOLVERS),
    ("loss", R.LOSSES),
    ("*_loss", R.LOSSES),
    ("head", R.MODELS),
    ("*_head", R.MODELS),
    ("metrics", R.METRICS),
    ("sampler", R.SAMPLERS),
]

# Arguments that the parent fills in at build time, by the key name of the nested node: a head's
# sizes come from the model's spec and the data (vlframe.modules.heads.build_head).
NESTED_INJECTED: list[tuple[str, tuple[str, ...]]] = [
    ("head", HEAD_SIZE_KWARGS),
    ("*_head", HEAD_SIZE_KWARGS),
]

_MISSING = MISSING  # omegaconf's "???": a required value nobody set


class UnknownTypeError(ConfigError, R.UnknownComponentError):
    """A node's ``type`` is not registered (both a ConfigError and the registry's own error)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _suggest(key: str, valid: Sequence[str], path: str) -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.6)
    if close:
        return f"did you mean {_join(path, close[0])!r}?"
    return f"valid keys: {', '.join(sorted(valid)) or '(none)'}"


def _position(path: str) -> tuple[Registry, dict[str, type]] | None:
    parts = path.split(".")
    for pattern, registry, reserved in POSITIONS:
        pat = pattern.split(".")
        if len(pat) == len(parts) and all(fnmatchcase(p, q) for p, q in zip(parts, pat, strict=True)):
            return registry, reserved
    return None


def _nested_registry(key: str) -> Registry | None:
    for pattern, registry in NESTED:
        if fnmatchcase(str(key), pattern):
            return registry
    return None


def _is_node(value: Any) -> bool:
    return isinstance(value, Mapping) and "type" in value


# ----------------------------------------------------------------------------- value types


def _describe(ann: Any) -> str:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if ann is Component:
        return "a component node {type: ..., ...}"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(ann, "__name__", str(ann))


def _fail_type(value: Any, ann: Any, path: str) -> None:
    raise ConfigError(f"{path}: expected {_describe(ann)}, got {type(value).__name__} {_short(value)}")


def check_type(value: Any, ann: Any, path: str) -> None:
    """Raise :class:`ConfigError` if ``value`` does not fit the simple annotation ``ann``.

    Checked: bool, int, float (int accepted), str, Optional/Union, Literal, list/tuple/Sequence
    and dict/Mapping with their item types. Anything else (a tensor, a module, a string
    annotation that could not be resolved) cannot come from YAML typing and is not checked.
    """
    if ann is inspect.Parameter.empty or ann is Any or isinstance(ann, (str, typing.ForwardRef)):
        return
    if ann is Component:
        if not isinstance(value, Mapping):
            _fail_type(value, ann, path)
        return
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        if value not in args:
            _fail_type(value, ann, path)
        return
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return
        for arm in args:
            if arm is type(None):
                continue
            try:
                check_type(value, arm, path)
                return
            except ConfigError:
                continue
        _fail_type(value, ann, path)
    if ann is bool:
        if not isinstance(value, bool):
            _fail_type(value, ann, path)
        return
    if ann is int:
        if not isinstance(value, int) or isinstance(value, bool):
            _fail_type(value, ann, path)
        return
    if ann is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            _fail_type(value, ann, path)
        return
    if ann is str:
        if not isinstance(value, str):
            _fail_type(value, ann, path)
        return
    container = origin or ann
    if container in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            _fail_type(value, ann, path)
        item_types = [a for a in args if a is not Ellipsis]
        if container is tuple and len(item_types) == len(args) and len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
        for i, item in enumerate(value):
            if item_types:
                check_type(item, item_types[min(i, len(item_types) - 1)], _join(path, i))
        return
    if container in (dict, Mapping):
        if not isinstance(value, Mapping):
            _fail_type(value, ann, path)
        if len(args) == 2:
            for k, item in value.items():
                check_type(item, args[1], _join(path, k))
        return
    # Other classes (torch.Tensor, nn.Module, ...) cannot be written in YAML; not checked.


# ----------------------------------------------------------------------------- components


def _signature(cls: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    try:
        sig = inspect.signature(cls, eval_str=True)
    except (NameError, TypeError, AttributeError, SyntaxError):
        # An annotation that names something only imported for type checkers: keep it unchecked.
        sig = inspect.signature(cls)
    except ValueError:  # no signature (some builtins): nothing can be checked
        return {}, True
    params: dict[str, inspect.Parameter] = {}
    var_kw = False
    for name, p in sig.parameters.items():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            params[name] = p
    return params, var_kw


def check_component(
    node: Any,
    registry: Registry,
    path: str,
    reserved: Mapping[str, type] | None = None,
    injected: tuple[str, ...] = (),
) -> None:
    """Check one component node (and the nodes nested in it) against its registered class."""
    if not _is_node(node):
        raise ConfigError(
            f"{path}: expected a component node {{type: <name>, ...}} of the {registry.name!r} registry, "
            f"got {_short(node)}"
        )
    name = node["type"]
    if not isinstance(name, str):
        raise ConfigError(f"{_join(path, 'type')}: expected str, got {type(name).__name__} {_short(name)}")
    try:
        cls = R.lookup(registry, name, where=_join(path, "type"))
    except R.UnknownComponentError as e:
        raise UnknownTypeError(str(e)) from None
    params, var_kw = _signature(cls)
    reserved = reserved or {}
    where = f"{name!r} ({cls.__module__}.{getattr(cls, '__qualname__', cls)})"
    for key, value in node.items():
        if key == "type":
            continue
        p = _join(path, key)
        if key in reserved:
            check_type(value, reserved[key], p)
            if isinstance(value, (int, float)) and value < 0:
                raise ConfigError(f"{p}: must be >= 0, got {value!r}")
            continue
        param = params.get(key)
        if param is None and not var_kw:
            close = difflib.get_close_matches(str(key), list(params), n=1, cutoff=0.6)
            hint = (
                f"did you mean {_join(path, close[0])!r}?"
                if close
                else f"accepted: {', '.join(params) or '(none)'} (to swap a component for one with other "
                f"arguments, replace the whole node: {path}='{{type: ..., ...}}' or _delete_: true in a file)"
            )
            raise ConfigError(f"{p}: unknown argument of {where}; {hint}")
        if param is not None and not (value is None and param.default is None):
            check_type(value, param.annotation, p)
        _check_nested(value, str(key), p)
    injected = set(injected) | set(getattr(cls, "injected_kwargs", ()))
    missing = [n for n, prm in params.items() if prm.default is prm.empty and n not in node and n not in injected]
    if missing:
        raise ConfigError(f"{path}: missing required argument(s) of {where}: {', '.join(missing)}")


def _check_nested(value: Any, key: str, path: str) -> None:
    if _is_node(value):
        registry = _nested_registry(key)
        if registry is None:
            known = ", ".join(p for p, _ in NESTED)
            raise ConfigError(
                f"{path}: a component node (type {value['type']!r}) under key {key!r}, which names no registry; "
                f"name the key after its registry ({known})"
            )
        injected = next((names for pattern, names in NESTED_INJECTED if fnmatchcase(key, pattern)), ())
        check_component(value, registry, path, injected=injected)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _check_nested(v, str(k), _join(path, k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_nested(v, key, _join(path, i))


# ----------------------------------------------------------------------------- sections


def _component_field(value: Any, ann: Any, path: str) -> bool:
    """Check ``value`` if ``ann`` is a component shape; return False if it is not one."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    optional = origin in (Union, types.UnionType) and type(None) in args
    inner = next((a for a in args if a is not type(None)), None) if optional else ann
    i_origin, i_args = typing.get_origin(inner), typing.get_args(inner)
    if inner is Component:
        if value is None and optional:
            return True
        pos = _position(path)
        if pos is None:
            raise ConfigError(f"{path}: schema field is a Component but no POSITIONS row names its registry")
        check_component(value, pos[0], path, pos[1])
        return True
    if i_origin in (dict, list) and i_args and i_args[-1] is Component:
        if value is None and optional:
            return True
        if (i_origin is dict and not isinstance(value, Mapping)) or (i_origin is list and not isinstance(value, list)):
            _fail_type(value, ann, path)
        items = value.items() if isinstance(value, Mapping) else enumerate(value)
        for k, v in items:
            p = _join(path, k)
            pos = _position(p)
            if pos is None:
                raise ConfigError(f"{p}: schema field holds Components but no POSITIONS row names their registry")
            check_component(v, pos[0], p, pos[1])
        return True
    return False


def check_section(node: Any, schema: type, path: str = "") -> None:
    """Check a mapping against a schema dataclass: unknown keys, required keys, value types."""
    if not isinstance(node, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(node).__name__} {_short(node)}")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in node.items():
        p = _join(path, key)
        if key not in fields:
            pos = _position(p)
            if pos is not None and _is_node(value):  # e.g. an extra data split
                check_component(value, pos[0], p, pos[1])
                continue
            raise ConfigError(f"{p}: unknown key; {_suggest(str(key), list(fields), path)}")
        if value == _MISSING:
            raise ConfigError(f"{p}: required value is missing (???)")
        ann = hints[key]
        if dataclasses.is_dataclass(ann):
            check_section(value, ann, p)
        elif not _component_field(value, ann, p):
            check_type(value, ann, p)
            minimum = fields[key].metadata.get("ge")
            if minimum is not None and value is not None and value < minimum:
                raise ConfigError(f"{p}: must be >= {minimum}, got {value!r}")
    for name, f in fields.items():
        if name not in node and f.default == _MISSING:
            raise ConfigError(f"{_join(path, name)}: required key is missing")


def validate(cfg: DictConfig | Mapping[str, Any], *, schema: type = Config,
             base_dir: str | os.PathLike | None = None) -> None:
    """Validate a loaded config; raise :class:`ConfigError` (one line) at the first problem.

    Imports ``custom_imports`` (paths and modules next to the config are found from
    ``base_dir``, the config's folder) and the ``vlframe.plugins`` entry points first, so user
    components are registered before their nodes are checked.
    """
    data = config_to_dict(cfg)
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    imports = data.get("custom_imports") or []
    check_type(imports, list[str], "custom_imports")
    try:
        R.import_custom(imports, base_dir=base_dir)
    except ImportError as e:
        raise ConfigError(str(e).splitlines()[0]) from e
    R.load_plugins()
    check_section(data, schema)


def apply_defaults(cfg: DictConfig | Mapping[str, Any], config_path: str | os.PathLike | None = None) -> DictConfig:
    """``cfg`` over the schema's defaults; ``work_dir`` defaults to ``work_dirs/<config stem>``."""
    defaults = OmegaConf.create(dataclasses.asdict(Config()))
    merged = OmegaConf.merge(defaults, OmegaConf.create(config_to_dict(cfg)))
    if merged.work_dir is None and config_path is not None:
        merged.work_dir = str(Path("work_dirs") / Path(config_path).stem)
    return merged


def load_and_validate(path: str | os.PathLike, overrides: Sequence[str] = ()) -> DictConfig:
    """Load, validate, and fill in schema defaults: the config a run starts from."""
    cfg = load_config(path, overrides)
    base_dir = os.path.dirname(os.path.abspath(path))
    validate(cfg, base_dir=base_dir)
    cfg = apply_defaults(cfg, path)
    # Paths in custom_imports become absolute: the run (and its saved config) finds them from anywhere.
    cfg.custom_imports = [R.resolve_custom_path(m, base_dir) or m if R.is_custom_path(m) else m
                          for m in cfg.custom_imports]
    return cfg


# ----------------------------------------------------------------------------- listing


def _find_registry(name: str) -> Registry:
    wanted = name.strip().lower()
    for key, reg in R.ALL_REGISTRIES.items():
        if wanted in (key, f"{key}s", f"{key}es"):
            return reg
    close = difflib.get_close_matches(wanted, list(R.ALL_REGISTRIES), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else f"registries: {', '.join(R.ALL_REGISTRIES)}"
    raise ConfigError(f"--registry {name!r}: no such registry; {hint}")


def format_components(config: str | os.PathLike | None = None, registry: str | None = None) -> str:
    """Text listing every registry (or one) with its names and the class each name builds.

    With ``config``, that config's ``custom_imports`` are imported first, so user components show.
    """
    if config is not None:
        imports = config_to_dict(load_config(config)).get("custom_imports") or []
        check_type(imports, list[str], "custom_imports")
        R.import_custom(imports, base_dir=os.path.dirname(os.path.abspath(config)))
    R.load_plugins()
    regs = [_find_registry(registry)] if registry else list(R.ALL_REGISTRIES.values())
    lines: list[str] = []
    for reg in regs:
        try:
            names = R.registered_names(reg)
        except ImportError as e:  # a broken package module must not hide the other registries
            lines.append(f"{reg.name}: cannot import its modules: {e}")
            continue
        lines.append(f"{reg.name} ({len(names)})")
        width = max((len(n) for n in names), default=0)
        for n in names:
            obj = reg.module_dict[n]
            lines.append(f"  {n:<{width}}  {obj.__module__}.{getattr(obj, '__qualname__', obj)}")
            lines.extend(f"  {'':<{width}}    {line}" for line in describe_arguments(obj, reg))
    return "\n".join(lines)


def describe_arguments(cls: Any, registry: Registry) -> list[str]:
    """One line per keyword argument: ``name: type = default``; sizes a task fills in are marked,
    and a task's default head / loss / metrics are shown."""
    params, var_kw = _signature(cls)
    out = []
    for name, p in params.items():
        ann = "" if p.annotation is p.empty else f": {_describe(p.annotation)}"
        if registry is R.MODELS and name in HEAD_SIZE_KWARGS and p.default is p.empty:
            default = "  (as a head: filled in by the task from the model and data)"
        elif p.default is p.empty:
            default = "  (required)"
        else:
            default = f" = {p.default!r}"
        out.append(f"{name}{ann}{default}")
    if var_kw:
        out.append("**kwargs")
    for attr, label in (("default_head", "default head"), ("default_loss", "default loss"),
                        ("default_wra_loss", "default wra_loss"), ("default_metrics", "default metrics")):
        value = getattr(cls, attr, None)
        if value:
            out.append(f"{label}: {list(value) if isinstance(value, tuple) else value}")
    return out
