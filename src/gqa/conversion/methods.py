"""The conversion methods, registered in one place: a new method is one module (see `interface`) and one
line here. The CLI, `convert()`, the demo and the experiments list and look up methods from `REGISTRY`;
`register()` adds one from anywhere (a plug-in, a test).
"""

from __future__ import annotations

import dataclasses

from ..errors import GQAError
from . import aligned, pooling
from .interface import Method, field_names

REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if not dataclasses.is_dataclass(method.settings):
        raise TypeError(f"method {method.name}: settings must be a dataclass")
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise GQAError(f"unknown method {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def owners(option: str) -> list[str]:
    """The methods whose settings have `option`."""
    return [m.name for m in REGISTRY.values() if option in field_names(m.settings)]


def option_fields() -> dict[str, dataclasses.Field]:
    """Every registered method's settings fields by name (the CLI's method options)."""
    out: dict[str, dataclasses.Field] = {}
    for method in REGISTRY.values():
        for f in dataclasses.fields(method.settings):
            out.setdefault(f.name, f)
    return out


def calibrated() -> list[str]:
    return [m.name for m in REGISTRY.values() if m.calibrated]


register(pooling.MEAN)
register(pooling.FIRST)
register(pooling.RANDOM)
register(aligned.ALIGNED)
