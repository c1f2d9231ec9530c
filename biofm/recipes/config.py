"""The repository's `configs/` folder, read by the recipes."""

from __future__ import annotations

from pathlib import Path

import yaml

# the repository's configs (an editable install, as the README's commands make)
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def read_config(name: str) -> dict:
    """`configs/<name>` as a dict (a YAML file; `name` is relative to `configs/`)."""
    path = CONFIGS / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the recipe's settings are not there; biofm's recipes read the "
            "configs/ folder of the repository (install it with `pip install -e .`)"
        )
    return yaml.safe_load(path.read_text()) or {}
