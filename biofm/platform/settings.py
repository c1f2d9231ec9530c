"""Settings that cannot work are refused before any data is read: number rules for the data module's and the
model's options."""

from __future__ import annotations

import math

from biofm.platform.errors import ConfigError


def _number_rule(value, rule: str) -> bool:
    """Whether `value` keeps `rule`: "int>=1", "int>=0", ">0", ">=0", "[0,1)", "(0,1]"."""
    if rule.startswith("int"):  # "int>=1": a whole number of at least 1
        return isinstance(value, int) and not isinstance(value, bool) and value >= int(rule[len("int>=") :])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return False
    return {">0": value > 0, ">=0": value >= 0, "[0,1)": 0 <= value < 1, "(0,1]": 0 < value <= 1}[rule]


DATA_RULES = {
    "batch_size": "int>=1",
    "eval_batch_size": "int>=1",
    "num_workers": "int>=0",
    "buffer_size": "int>=0",
    "temperature": ">0",
    "train_fraction": "(0,1]",
    "steps_per_epoch": "int>=1",
}


MODEL_RULES = {
    "d_model": "int>=1",
    "depth": "int>=0",
    "heads": "int>=1",
    "latents": "int>=1",
    "dropout": "[0,1)",
    "lr": ">0",
    "weight_decay": ">=0",
    "warmup_steps": "int>=0",
    "layer_decay": "(0,1]",
}


RULE_WORDS = {
    "int>=1": "a whole number of at least 1",
    "int>=0": "a whole number of at least 0",
    ">0": "a number above 0",
    ">=0": "a number of at least 0",
    "[0,1)": "in [0, 1)",
    "(0,1]": "in (0, 1]",
}


def check_settings(group: str, values: dict) -> None:
    """Refuse settings that cannot work, before any data is read: `group` is "data" or "model"."""
    rules = DATA_RULES if group == "data" else MODEL_RULES
    for name, rule in rules.items():
        value = values.get(name)
        if value is not None and not _number_rule(value, rule):
            raise ConfigError(f"{group}.{name} must be {RULE_WORDS[rule]}, got {value!r}")
    if group == "model":
        d_model, heads = values.get("d_model"), values.get("heads")
        if isinstance(d_model, int) and isinstance(heads, int) and heads and d_model % heads:
            raise ConfigError(
                f"model.d_model ({d_model}) must be divisible by model.heads ({heads}): each "
                f"attention head takes d_model / heads features (e.g. --model.d_model "
                f"{max(heads, d_model // heads * heads)})"
            )
        if values.get("schedule", "constant") not in ("constant", "cosine"):
            raise ConfigError(f"model.schedule must be constant or cosine, got {values.get('schedule')!r}")
    else:
        weights = values.get("weights")
        if weights is not None and (
            not isinstance(weights, dict)
            or any(not _number_rule(w, ">=0") for w in weights.values())
            or not sum(weights.values()) > 0
        ):
            raise ConfigError(
                f"data.weights must map source names to numbers of at least 0 with a positive sum, got {weights!r}"
            )
        if values.get("predict_split", "test") not in ("train", "val", "test", "all"):
            raise ConfigError(f"predict_split must be train, val, test or all, got {values.get('predict_split')!r}")
