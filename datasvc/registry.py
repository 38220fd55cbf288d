"""A named registry: a plain dict behind register / create / list, one per family."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from datasvc.errors import UsageError


class UnknownNameError(UsageError, KeyError):
    """A name that is not registered; the message lists the valid ones (a KeyError too)."""


class Registry:
    """Maps names to factories; an unknown name lists the valid ones, a duplicate raises."""

    def __init__(self, family: str):
        self.family = family
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None):
        """Decorator: register ``fn`` under ``name`` (default: its ``__name__``)."""

        def deco(fn):
            key = name or fn.__name__
            if key in self._entries:
                raise KeyError(f"{self.family} {key!r} is already registered")
            self._entries[key] = fn
            return fn

        return deco

    def add(self, name: str, obj: Any) -> Any:
        """Register an object (not a factory function) under ``name``."""
        return self.register(name)(obj)

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(sorted(self._entries)) or "(none)"
            raise UnknownNameError(f"unknown {self.family} {name!r}; valid: {valid}") from None

    def create(self, name: str, *args, **kwargs):
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
