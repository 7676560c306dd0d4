"""PEFT ``adapter_config.json`` -> validated :class:`AdapterSpec`.

We refuse, naming the field, anything we would otherwise serve wrongly: an adapter must never
silently degrade to the base model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AdapterInvalid

CONFIG_NAME = "adapter_config.json"
REQUIRED_FIELDS = ("r", "lora_alpha", "target_modules")
# Module names PEFT users target that we cannot serve as a LoRA delta on a linear layer.
UNSUPPORTED_TARGETS = ("embed_tokens", "lm_head", "wte", "wpe", "word_embeddings", "embed_out")


def get_pattern_key(pattern_keys, module_name: str) -> str | None:
    """PEFT's rule for ``rank_pattern``/``alpha_pattern``: the first key ``k`` such that
    ``module_name`` ends with ``k`` at a dot boundary (``k`` may be a regex)."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


@dataclass(frozen=True)
class AdapterSpec:
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str  # a list of names, or one regex
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None

    def scaling(self, module_name: str, rank: int) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA; ``rank`` is the module's own rank."""
        key = get_pattern_key(self.alpha_pattern, module_name)
        alpha = float(self.alpha_pattern[key]) if key is not None else self.lora_alpha
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    @property
    def target_names(self) -> list[str]:
        return [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules)

    def unmatched_targets(self, module_names) -> list[str]:
        """The targets that match none of ``module_names``, by PEFT's rule: a regex must match a
        full name; a list entry must equal a name or end it at a dot boundary."""
        names = list(module_names)
        if isinstance(self.target_modules, str):
            return [] if any(re.fullmatch(self.target_modules, n) for n in names) else [self.target_modules]
        return [t for t in self.target_modules if not any(n == t or n.endswith("." + t) for n in names)]


def _refuse(field_name: str, why: str) -> AdapterInvalid:
    return AdapterInvalid(f"adapter_config.json field {field_name!r}: {why}")


def parse_adapter_config(raw: dict) -> AdapterSpec:
    if not isinstance(raw, dict):
        raise AdapterInvalid("adapter_config.json must hold a JSON object")
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise _refuse("peft_type", f"{peft_type} is not supported; only LORA adapters are served")
    for name in REQUIRED_FIELDS:
        if raw.get(name) in (None, "", []):
            raise _refuse(name, "is required")
    if raw.get("use_dora"):
        raise _refuse("use_dora", "DoRA adapters are not supported")
    if raw.get("modules_to_save"):
        raise _refuse("modules_to_save", "fully trained extra modules are not supported")
    if raw.get("bias", "none") != "none":
        raise _refuse("bias", f"{raw['bias']!r} is not supported; only 'none'")
    if raw.get("target_parameters"):
        raise _refuse("target_parameters", "LoRA on raw parameters is not supported")
    if raw.get("trainable_token_indices"):
        raise _refuse("trainable_token_indices", "trainable tokens are not supported")
    try:
        r = int(raw["r"])
        alpha = float(raw["lora_alpha"])
    except (TypeError, ValueError) as e:
        raise _refuse("r", f"r and lora_alpha must be numbers ({e})") from None
    if r <= 0:
        raise _refuse("r", f"must be a positive integer, got {r}")
    targets = raw["target_modules"]
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise _refuse("target_modules", f"invalid regex: {e}") from None
    elif isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        targets = tuple(targets)
        bad = [t for t in targets if t.split(".")[-1] in UNSUPPORTED_TARGETS]
        if bad:
            raise _refuse("target_modules", f"embedding and lm_head targets are not supported: {bad}")
    else:
        raise _refuse("target_modules", "must be a list of module names or a regex string")
    return AdapterSpec(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        use_rslora=bool(raw.get("use_rslora", False)),
        rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        base_model_name_or_path=raw.get("base_model_name_or_path"),
    )


def read_adapter_config(adapter_dir: Path) -> AdapterSpec:
    path = Path(adapter_dir) / CONFIG_NAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterInvalid(f"{CONFIG_NAME} is missing from the adapter directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterInvalid(f"{CONFIG_NAME} is not valid JSON: {e}") from None
    return parse_adapter_config(raw)
