"""Plug-in commands of `biofm`: a source adds `biofm prepare <name>`, a format `biofm export <name>`, a
modality, source or recipe a top-level `biofm <name>` (e.g. `heatmap`, `predict-meds`, `demo`).

A low module: the sources and modalities register here, and `biofm.platform.cli` reads the registries
after importing the plug-in packages by name (`PLUGINS`), so the platform imports none of them."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]
# `biofm prepare <name>`: each source adds a parser builder and a runner here
PREPARERS: dict[str, Command] = {}
# `biofm export <format>`: predictions → another format (e.g. MEDS evaluation files)
EXPORTERS: dict[str, Command] = {}
# `biofm <command>`: top-level commands a modality, source or recipe adds (e.g. `heatmap`)
COMMANDS: dict[str, Command] = {}
# packages whose import registers commands
PLUGINS = ("biofm.modalities", "biofm.datasets", "biofm.recipes")


def _registrar(registry: dict[str, Command]):
    def decorate(name: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
        def register(run: Callable[[argparse.Namespace], None]):
            registry[name] = (add_arguments, run)
            return run

        return register

    return decorate


preparer = _registrar(PREPARERS)
exporter = _registrar(EXPORTERS)
command = _registrar(COMMANDS)


def load_plugins() -> None:
    for name in PLUGINS:
        importlib.import_module(name)


def comma_list(value: str | None) -> list[str] | None:
    """A comma-separated command-line value as a list (None when not given)."""
    return [x.strip() for x in value.split(",") if x.strip()] if value else None
