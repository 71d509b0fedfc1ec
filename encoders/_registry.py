"""Encoder registry: one module per family registers its class under a stable name."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from encoders._base import Encoder

_REGISTRY: dict[str, type[Encoder]] = {}


class UnknownEncoderError(ValueError):
    """Raised for a name no module registered; the message lists what exists."""


def register_encoder(name: str):
    """Class decorator: `@register_encoder("dinov2")` makes `encoders.load("dinov2", ...)` work."""

    def wrap(cls: type[Encoder]) -> type[Encoder]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"encoder name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def get_encoder_class(name: str) -> type[Encoder]:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise UnknownEncoderError(f"unknown encoder {name!r}; registered encoders: {known}") from None


def available() -> list[str]:
    return sorted(_REGISTRY)
