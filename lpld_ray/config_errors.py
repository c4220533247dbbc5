"""One-line config errors: the key, the bad value (credentials redacted) and what its type, bounds and choices allow."""

from __future__ import annotations

import math
import types
import typing
from typing import Annotated, Any, Literal, Sequence, Union

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from lpld_ray.errors import ConfigError

SECRET_KEYS = frozenset({"storage.access_key_id", "storage.secret_access_key", "storage.session_token"})


REDACTED = "<redacted>"


def bad_value(key: str, value: Any, allowed: str) -> ConfigError:
    """A one-line ConfigError naming the key, the bad value (credentials redacted) and what is allowed."""
    shown = REDACTED if key in SECRET_KEYS else repr(value)
    return ConfigError(f"bad value for '{key}': {shown} (allowed: {allowed})")


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ``bad_value(key, value, allowed)`` unless ``ok``."""
    if not ok:
        raise bad_value(key, value, allowed)


_BASE_TEXT = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


_BOUND_OPS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _num(x: Any) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def _bounds_text(metadata: Sequence[Any]) -> str:
    """' >= 1', ' > 0', ' in [0, 1)' ... from annotated_types bounds."""
    b = {k: getattr(m, k) for m in metadata for k, _ in _BOUND_OPS if getattr(m, k, None) is not None}
    low, high = [k for k in ("ge", "gt") if k in b], [k for k in ("le", "lt") if k in b]
    if low and high:
        left, right = "[" if low[0] == "ge" else "(", "]" if high[0] == "le" else ")"
        return f" in {left}{_num(b[low[0]])}, {_num(b[high[0]])}{right}"
    return "".join(f" {op} {_num(b[k])}" for k, op in _BOUND_OPS if k in b)


def _describe(tp: Any, metadata: Sequence[Any]) -> str:
    """What a value of annotation ``tp`` with constraints ``metadata`` may be, in words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is Annotated:
        return _describe(args[0], [*metadata, *tp.__metadata__])
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return ("null or " if len(inner) < len(args) else "") + " or ".join(_describe(a, metadata) for a in inner)
    if origin is tuple:
        return f"a list of {len(args)} values"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "a mapping of keys to values"
    return _BASE_TEXT.get(tp, "a value") + _bounds_text(metadata)


def _allowed(field: FieldInfo) -> str:
    return field.description or _describe(field.annotation, field.metadata)


def _non_finite(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    try:
        return not math.isfinite(float(value))
    except (ValueError, OverflowError):
        return False


def _finite_text(allowed: str) -> str:
    return allowed.replace("number", "finite number", 1) if "number" in allowed else f"finite numbers, {allowed}"


def config_error(err: ValidationError, model: type[BaseModel], data: Any, section: str | None) -> ConfigError:
    """The first error (unknown keys first) as one line: the dotted key, the value and what is allowed
    (``section``: the model's section name, None for the whole config)."""
    errors = err.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    path, owner, field = ([section] if section else []), model, None
    for part in first["loc"]:  # stops at a leaf field: tuple indexes and union tags are not keys
        if owner is None or not isinstance(part, str) or part not in owner.model_fields:
            break
        path.append(part)
        field = owner.model_fields[part]
        ann = field.annotation
        owner = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if first["type"] == "extra_forbidden":
        where = f"section '{'.'.join(path)}'" if path else "the top level"
        names = ", ".join((owner or model).model_fields)
        return ConfigError(f"unknown config key '{'.'.join([*path, str(first['loc'][-1])])}' (allowed in {where}: {names})")
    if field is None:
        return ConfigError(f"bad config: {first['msg']} (allowed: a mapping of sections)")
    key, value = ".".join(path), _lookup(data, path[1:] if section else path, first["input"])
    allowed = _allowed(field)
    if first["type"] == "finite_number" or _non_finite(first["input"]):
        allowed = _finite_text(allowed)
    return bad_value(key, value, allowed)


def _lookup(data: Any, parts: Sequence[str], default: Any) -> Any:
    """The value the user gave at ``parts`` (the whole pair, not the bad element of it)."""
    for part in parts:
        if not isinstance(data, dict) or part not in data:
            return default
        data = data[part]
    return data
