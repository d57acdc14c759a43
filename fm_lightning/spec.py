"""Rebuildable objects: every component records how to construct it from primitives.

Checkpoints must load with ``torch.load(..., weights_only=True)``, so hyperparameters
hold only primitives. A component is stored as ``{"class_path": ..., "init_args": ...}``
(the Lightning CLI / jsonargparse form) and rebuilt from an allow-list of packages, so a
checkpoint can never name arbitrary code to run.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

__all__ = ["to_spec", "from_spec", "TRUSTED_PREFIXES"]

TRUSTED_PREFIXES = ("fm_lightning.", "datamodules.", "torch.optim.", "torch.nn.")


def _is_primitive(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _plain(value: Any) -> Any:
    """Convert containers (including OmegaConf ones) and components to primitives."""
    if _is_primitive(value):
        return value
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    if isinstance(value, dict) or type(value).__name__ == "DictConfig":
        return {str(k): _plain(v) for k, v in value.items()}
    return to_spec(value)


def to_spec(obj: Any) -> dict | None:
    """Describe ``obj`` as ``{"class_path", "init_args"}`` using only primitives.

    Classes are read sklearn-style: every constructor argument must be stored on the
    instance under the same name. ``functools.partial`` objects (optimizer and scheduler
    factories) are read from their keywords.
    """
    if obj is None:
        return None
    if isinstance(obj, dict) and "class_path" in obj:
        return _plain(obj)
    if isinstance(obj, functools.partial):
        func, args = obj.func, obj.args
        if func.__name__ == "call_without_instantiate_context" and len(args) == 2:
            func, args = args[1], ()  # the Lightning CLI's (jsonargparse's) factory of args[1]
        if args:
            raise TypeError(f"cannot record positional arguments of partial {obj!r}; use keywords")
        # Record every keyword with its effective value, so equal factories give equal specs.
        params = inspect.signature(func).parameters.values()
        kwargs = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        kwargs.update(obj.keywords)
        return {"class_path": f"{func.__module__}.{func.__qualname__}", "init_args": _plain(kwargs)}
    cls = obj if inspect.isclass(obj) else type(obj)
    init_args = {}
    if not inspect.isclass(obj):
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if not hasattr(obj, name):
                raise TypeError(f"{cls.__name__} must store constructor argument {name!r} as an attribute")
            init_args[name] = _plain(getattr(obj, name))
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def _import(class_path: str) -> Any:
    if not class_path.startswith(TRUSTED_PREFIXES):
        raise ValueError(
            f"refusing to build {class_path!r}: only classes from {', '.join(TRUSTED_PREFIXES)} "
            "may be rebuilt from a checkpoint or spec"
        )
    module_name, _, attr = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {class_path!r}: {err}") from err


def from_spec(spec: Any, partial: bool = False) -> Any:
    """Rebuild an object (or a factory if ``partial``) from :func:`to_spec` output."""
    if not (isinstance(spec, dict) and "class_path" in spec):
        return spec
    target = _import(spec["class_path"])
    args = {k: from_spec(v) for k, v in (spec.get("init_args") or {}).items()}
    return functools.partial(target, **args) if partial else target(**args)
