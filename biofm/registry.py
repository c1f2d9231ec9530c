"""Name → class registries (modalities, task kinds, pretexts, balancing strategies), resolved like PyG's `resolver`.

A low module: `tasks/`, `platform/` and the modalities all import it, and it imports none of them."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class RegistryError(ValueError):
    pass


class Registry(Generic[T]):
    """Classes by name; `plugins` is a module imported on first lookup so entries register themselves."""

    def __init__(self, what: str, plugins: str | None = None):
        self.what, self.plugins = what, plugins
        self._entries: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def add(cls: type[T]) -> type[T]:
            if name in self._entries and self._entries[name] is not cls:
                raise RegistryError(f"{self.what} '{name}' is registered twice")
            self._entries[name] = cls
            cls.name = name
            return cls

        return add

    def _load(self) -> None:
        if self.plugins:
            importlib.import_module(self.plugins)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def resolve(self, name: str) -> type[T]:
        self._load()
        if name not in self._entries:
            raise RegistryError(f"could not resolve {self.what} '{name}' among choices {self.names()}")
        return self._entries[name]
