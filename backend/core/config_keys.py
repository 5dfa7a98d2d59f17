"""What a run config's keys may name and how large they may be, declared next to each key.

Two markers go into a key's annotation in backend/core/run_config.py:

- `InputRef(...)`: the key names something to read: a local file or folder, a hub id, or a
  built-in name ('demo', 'vader', ...). `resolve_inputs` finds every such key, tells an id
  from a path *without opening anything*, makes paths absolute (so the worker reads exactly
  what was checked) and, for a run queued on the web, refuses any path outside the input
  folders (RA_INPUT_DIRS) before a byte of it is read. A hub id is an id: a value that names a
  local path (with or without 'hf:') is a path, checked as one.
- `DeploymentLimit(setting)`: the key's upper bound is a server setting (RA_<SETTING>);
  `check_deployment_limits` checks every such key. Every other number carries its bound
  itself (`Field(le=...)` or `lt=`): tests/test_config_keys.py fails for a numeric key with
  neither, and for a text key that is neither an InputRef nor declared plain text.
"""
from __future__ import annotations

import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterator, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

if TYPE_CHECKING:
    from backend.core.settings import Settings
    from backend.core.run_config import RunConfig


@dataclass(frozen=True)
class InputRef:
    """Marks a text key that names something to read."""
    builtins: frozenset[str] = frozenset()  # names that are no path ('demo', 'vader', ...)
    hub_ids: bool = False  # a bare hub id (owner/name) is accepted, read by the worker from the hub
    hub_prefix: str | None = None  # a prefix that marks a hub id ('hf:' for dataset.source)
    next_to_config: bool = False  # a relative path is read next to the config file (else: the working directory)


@dataclass(frozen=True)
class DeploymentLimit:
    """Marks a numeric key whose upper bound is this deployment's setting (backend/core/settings.py)."""
    setting: str  # the Settings attribute, e.g. "max_training_tokens"
    unit: str

    @property
    def env(self) -> str:
        return f"RA_{self.setting.upper()}"


# A hub repository id: "name" or "owner/name" (letters, digits, '-', '_', '.'), never '..'.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")


class InputRefused(ValueError):
    """A key names a path outside the folders this server may read, or a malformed id."""


@dataclass(frozen=True)
class Key:
    """One leaf of the config schema: its dotted name, the type at the leaf and its markers."""
    name: str
    leaf: Any
    metadata: tuple


def _unwrap(annotation: Any, metadata: tuple = ()) -> Iterator[tuple[Any, tuple, bool]]:
    """(leaf type, metadata, inside a list) for every branch of an annotation."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *extra = get_args(annotation)
        yield from _unwrap(base, metadata + tuple(extra))
    elif origin in (Union, types.UnionType):
        for arg in get_args(annotation):
            if arg is not type(None):
                yield from _unwrap(arg, metadata)
    elif origin is list:
        for leaf, inner, _ in _unwrap(get_args(annotation)[0]):
            yield leaf, inner, True
        if metadata:
            yield list, metadata, False
    else:
        yield annotation, metadata, False


def schema_keys(model: type[BaseModel], prefix: str = "") -> Iterator[Key]:
    """Every leaf key of a config model, nested models followed (a list's items as `key[]`)."""
    for name, field in model.model_fields.items():
        for leaf, metadata, in_list in _unwrap(field.annotation, tuple(field.metadata)):
            key = f"{prefix}{name}" + ("[]" if in_list else "")
            if isinstance(leaf, type) and issubclass(leaf, BaseModel):
                yield from schema_keys(leaf, f"{key}.")
            else:
                yield Key(key, leaf, _flatten(metadata))


def _flatten(metadata: tuple) -> tuple:
    out: list = []
    for item in metadata:
        out.extend(_flatten(tuple(item.metadata)) if isinstance(item, FieldInfo) else [item])
    return tuple(out)


def is_number(key: Key) -> bool:
    return key.leaf in (int, float)


def upper_bound(key: Key) -> Any:
    """The key's upper bound (a number, or its DeploymentLimit), or None."""
    for item in key.metadata:
        if isinstance(item, DeploymentLimit):
            return item
        if isinstance(item, (annotated_types.Le, annotated_types.Lt)):
            return item.le if isinstance(item, annotated_types.Le) else item.lt
    return None


def marker(key: Key, kind: type) -> Any:
    return next((item for item in key.metadata if isinstance(item, kind)), None)


def _values(config: BaseModel, path: list[str]) -> Iterator[tuple[str, Any, Any, Any]]:
    """(dotted key, value, the object holding it, its attribute or index) for a schema path."""
    head, rest = path[0], path[1:]
    in_list = head.endswith("[]")
    value = getattr(config, head.removesuffix("[]"), None)
    if value is None:
        return
    items = list(enumerate(value)) if in_list and isinstance(value, list) else [(None, value)]
    for index, item in items:
        name = head.removesuffix("[]") + ("" if index is None else f"[{index}]")
        if not rest:
            yield name, item, (value if index is not None else config), (index if index is not None else head)
        elif isinstance(item, BaseModel):
            for key, leaf, holder, attr in _values(item, rest):
                yield f"{name}.{key}", leaf, holder, attr


def set_values(config: BaseModel, kind: type) -> Iterator[tuple[str, Any, Any, Any, Any]]:
    """Every value in `config` under a key carrying a `kind` marker: (key, value, marker, holder, attribute)."""
    for key in schema_keys(type(config)):
        found = marker(key, kind)
        if found is not None:
            for name, value, holder, attr in _values(config, key.name.split(".")):
                yield name, value, found, holder, attr


# --- inputs -------------------------------------------------------------------------------

def resolve_inputs(config: RunConfig, base_dir: Path | None, roots: list[Path] | None) -> None:
    """Every InputRef key of `config` resolved in place: built-in names and hub ids as they are,
    paths made absolute (a relative one read next to the config file or in the working
    directory, as its marker says). With `roots` (a run queued on the web), a path outside them
    is refused, symlinks followed, before anything is opened; the message says the same whether
    or not the path exists."""
    cwd = Path.cwd()
    for key, value, ref, holder, attr in list(set_values(config, InputRef)):
        if not isinstance(value, str):
            continue
        resolved = resolve_one(key, value, ref, (base_dir if ref.next_to_config and base_dir else cwd), roots)
        if resolved != value:
            setattr(holder, attr, resolved)


def resolve_one(key: str, value: str, ref: InputRef, base: Path, roots: list[Path] | None) -> str:
    if value in ref.builtins:
        return value
    name, prefixed = value, bool(ref.hub_prefix) and value.startswith(ref.hub_prefix or "")
    if prefixed:
        name = value[len(ref.hub_prefix):]
        if not HUB_ID.fullmatch(name) or ".." in name:
            raise InputRefused(f"{key}: {value[:200]!r}: after {ref.hub_prefix!r} comes a hub id (owner/name); a "
                               f"local file or folder is written without {ref.hub_prefix!r}")
    hub_shaped = (prefixed or ref.hub_ids) and HUB_ID.fullmatch(name) is not None and ".." not in name
    if hub_shaped and not (base / name).exists():  # what the loaders would read as a local path first
        return value
    if prefixed:
        raise InputRefused(f"{key}: {value[:200]!r} names a local folder: write its path without {ref.hub_prefix!r}")
    path = (base / value).resolve()
    if roots is not None and not any(path.is_relative_to(root) for root in roots):
        raise InputRefused(f"{key}: {value[:200]!r} is outside the folders runs queued here may read "
                           f"({', '.join(map(str, roots))}): move it there, or name its folder in RA_INPUT_DIRS")
    return str(path)


# --- limits ----------------------------------------------------------------------------------

def check_deployment_limits(config: RunConfig, settings: Settings) -> list[tuple[str, Any, DeploymentLimit]]:
    """Every DeploymentLimit key against its setting; the first value beyond it raises."""
    checked = []
    for key, value, limit, _, _ in set_values(config, DeploymentLimit):
        bound = getattr(settings, limit.setting)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > bound:
            raise InputRefused(f"{key}: {value:,} is beyond the limit of {bound:,} {limit.unit} (lower it, or raise "
                               f"the limit by setting {limit.env} for the worker and the server)")
        checked.append((key, value, limit))
    return checked
