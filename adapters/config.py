"""PEFT ``adapter_config.json`` -> validated :class:`AdapterSpec`.

We refuse, naming the field, anything we would otherwise serve wrongly: an adapter must never
silently degrade to the base model. Every number must be finite, and every regex (target_modules
as a string, rank_pattern and alpha_pattern keys) is matched by google-re2, in time linear in its
input, because the file may come from anyone allowed to register adapters.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AdapterInvalid, clip
from .files import CONFIG_LIMIT, read_adapter_file

CONFIG_NAME = "adapter_config.json"
MAX_PATTERN_CHARS = 1024
REQUIRED_FIELDS = ("r", "lora_alpha", "target_modules")
# Module names PEFT users target that no served model has, and why
UNSUPPORTED_TARGETS = {
    "wpe": "position embeddings are not supported",
    # transformers 5 renames GPT-NeoX's embed_out (checkpoints too), and PEFT finds no such module
    "embed_out": "GPT-NeoX's output projection is lm_head since transformers 5 (embed_out before): target lm_head",
}
HEAD = "lm_head"  # the output projection: its kind, and its module name in every supported family
EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "embeddings")  # the token embedding's name in each family
# targets served only where the server opts in, and its flag
OPT_IN = {HEAD: "--enable-lm-head-lora", **{e: "--enable-embedding-lora" for e in EMBEDDINGS}}


def leaf(module: str) -> str:
    """A module name's last part: "model.layers.0.self_attn.q_proj" -> "q_proj"."""
    return module.rpartition(".")[2]


def opt_in_refusal(module: str) -> str:
    """Why a target of OPT_IN is refused on a server that has not opted in."""
    kind = leaf(module)
    what = "the output projection" if kind == HEAD else "the token embedding"
    return (f"module {clip(module)}: LoRA on {what} is not enabled on this server (start it with "
            f"{OPT_IN[kind]})")


def compile_regex(pattern: str, field_name: str):
    """A google-re2 pattern (linear-time matching, no backreferences or lookaround)."""
    try:
        import re2
    except ImportError:  # a declared dependency; only a hand-made environment lacks it
        raise AdapterInvalid(f"adapter_config.json field {field_name!r}: regexes need the google-re2 "
                             "package, which is not installed") from None
    if len(pattern) > MAX_PATTERN_CHARS:
        raise _refuse(field_name, f"a regex of {len(pattern)} characters; the limit is {MAX_PATTERN_CHARS}")
    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error as e:
        raise _refuse(field_name, f"regex {clip(pattern)} is not supported by RE2 ({clip(str(e), 120)})") from None


def _pattern_regex(key: str, field_name: str):
    """PEFT's rule for ``rank_pattern``/``alpha_pattern`` keys: ``module_name`` ends with ``key``
    (a regex) at a dot boundary."""
    return compile_regex(rf"(.*\.)?({key})$", field_name)


def get_pattern_key(patterns: dict, module_name: str) -> str | None:
    """The first key of ``patterns`` (key -> compiled regex) that matches ``module_name``."""
    for key, regex in patterns.items():
        if regex.match(module_name):
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
    use_dora: bool = False  # weight-decomposed: each targeted output row rescaled by its learned magnitude
    base_model_name_or_path: str | None = None
    # PEFT's trainable_token_indices: token ids whose embedding rows the adapter replaces, and the
    # module named for them (None: the model's input embedding)
    trainable_tokens: tuple[int, ...] = ()
    trainable_tokens_module: str | None = None
    tokens_field: str = "trainable_token_indices"  # the config field that lists them (TRAINABLE_TOKENS: token_indices)
    # the tokens written into the adapter's trained copies of a resized vocabulary (registration
    # moves them there from trainable_tokens, which then serves nothing as LoRA)
    folded_tokens: tuple[int, ...] = ()
    # PEFT's modules_to_save: modules (the token embedding, lm_head) the adapter holds a fully trained copy of
    modules_to_save: tuple[str, ...] = ()
    ensure_weight_tying: bool = False  # PEFT's: a tied embedding and lm_head stay tied (both copies saved)
    # compiled regexes, made by parse_adapter_config: key -> pattern, and target_modules as a regex
    _rank_re: dict = field(default_factory=dict, compare=False, repr=False)
    _alpha_re: dict = field(default_factory=dict, compare=False, repr=False)
    _target_re: object = field(default=None, compare=False, repr=False)

    def declared_rank(self, module_name: str) -> int:
        """The rank PEFT builds this module with: its rank_pattern entry, else r."""
        key = get_pattern_key(self._rank_re, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def scaling(self, module_name: str, rank: int) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA; ``rank`` is the module's own rank."""
        key = get_pattern_key(self._alpha_re, module_name)
        alpha = float(self.alpha_pattern[key]) if key is not None else self.lora_alpha
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def scaling_identity(self) -> str:
        """Canonical JSON of every field that changes what the adapter computes: with the
        weights' hash it names the served function (the content hash)."""
        fields = {"r": self.r, "lora_alpha": self.lora_alpha, "use_rslora": self.use_rslora,
                  "rank_pattern": self.rank_pattern, "alpha_pattern": self.alpha_pattern}
        if self.use_dora:  # only when set: plain adapters keep the content hash they had
            fields["use_dora"] = True
        if self.trainable_tokens or self.folded_tokens:
            fields["trainable_token_indices"] = list(self.trainable_tokens or self.folded_tokens)
        if self.modules_to_save:
            fields["modules_to_save"] = list(self.modules_to_save)
        return json.dumps(fields, sort_keys=True)

    @property
    def target_names(self) -> list[str]:
        return [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules)

    def saves(self, module: str) -> bool:
        """Whether modules_to_save names ``module`` (PEFT's rule: the full name, or its end at a dot)."""
        return any(module == m or module.endswith("." + m) for m in self.modules_to_save)

    def unmatched_targets(self, module_names) -> list[str]:
        """The targets that match none of ``module_names``, by PEFT's rule: a regex must match a
        full name; a list entry must equal a name or end it at a dot boundary."""
        names = list(module_names)
        if isinstance(self.target_modules, str):
            return [] if any(self._target_re.fullmatch(n) for n in names) else [self.target_modules]
        return [t for t in self.target_modules if not any(n == t or n.endswith("." + t) for n in names)]


# in ``enabled``: trainable tokens may also be served written into an adapter's trained copies of a
# resized vocabulary's layers (adapters/loader.py), which its weights decide, not its config
FOLDED_TOKENS = "trainable tokens in trained copies"


def _refuse(field_name: str, why: str) -> AdapterInvalid:
    return AdapterInvalid(f"adapter_config.json field {field_name!r}: {why}")


def parse_adapter_config(raw: dict, enabled: Collection[str] = ()) -> AdapterSpec:
    """``enabled``: the targets of OPT_IN this server serves (the others are refused here)."""
    if not isinstance(raw, dict):
        raise AdapterInvalid("adapter_config.json must hold a JSON object")
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type == "TRAINABLE_TOKENS":
        return _trainable_tokens_spec(raw, enabled)
    if peft_type != "LORA":
        raise _refuse("peft_type", f"{clip(peft_type)} is not supported; only LORA and TRAINABLE_TOKENS adapters "
                                   "are served")
    for name in REQUIRED_FIELDS:
        if raw.get(name) in (None, "", []):
            raise _refuse(name, "is required")
    saved = _modules_to_save(raw.get("modules_to_save"))
    if raw.get("bias", "none") != "none":
        raise _refuse("bias", f"{clip(str(raw['bias']))} is not supported; only 'none'")
    if raw.get("target_parameters"):
        raise _refuse("target_parameters", "LoRA on raw parameters (such as MoE experts) is not supported")
    tokens, tokens_module = _trainable_tokens(raw.get("trainable_token_indices"), enabled)
    r = _positive_int(raw["r"], "r")
    alpha = _finite(raw["lora_alpha"], "lora_alpha")
    rank_pattern = _pattern(raw.get("rank_pattern"), "rank_pattern", _positive_int)
    alpha_pattern = _pattern(raw.get("alpha_pattern"), "alpha_pattern", _finite)
    targets = raw["target_modules"]
    target_re = None
    if isinstance(targets, str):
        target_re = compile_regex(targets, "target_modules")
    elif isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        targets = tuple(targets)
        bad = [t for t in targets if leaf(t) in UNSUPPORTED_TARGETS]
        if bad:
            raise _refuse("target_modules", f"{UNSUPPORTED_TARGETS[leaf(bad[0])]}: {clip(str(bad))}")
        off = [t for t in targets if leaf(t) in OPT_IN and leaf(t) not in enabled]
        if off:
            raise _refuse("target_modules", opt_in_refusal(off[0]))
    else:
        raise _refuse("target_modules", "must be a list of module names or a regex string")
    base = raw.get("base_model_name_or_path")
    return AdapterSpec(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        use_rslora=_flag(raw, "use_rslora"),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        fan_in_fan_out=_flag(raw, "fan_in_fan_out"),
        use_dora=_flag(raw, "use_dora"),
        base_model_name_or_path=base if isinstance(base, str) else None,
        trainable_tokens=tokens,
        trainable_tokens_module=tokens_module,
        modules_to_save=saved,
        ensure_weight_tying=_flag(raw, "ensure_weight_tying"),
        _rank_re={k: _pattern_regex(k, "rank_pattern") for k in rank_pattern},
        _alpha_re={k: _pattern_regex(k, "alpha_pattern") for k in alpha_pattern},
        _target_re=target_re,
    )


def _trainable_tokens_spec(raw: dict, enabled: Collection[str]) -> AdapterSpec:
    """PEFT's TrainableTokensConfig, trainable tokens without LoRA: ``token_indices`` on
    ``target_modules`` (the token embedding), served as a LoRA adapter's trainable tokens are."""
    targets = raw.get("target_modules") or ["embed_tokens"]
    names = [targets] if isinstance(targets, str) else targets
    if not isinstance(names, list) or len(names) != 1 or not isinstance(names[0], str) or \
            leaf(names[0]) not in EMBEDDINGS:
        raise _refuse("target_modules", f"trainable tokens are served on the token embedding alone "
                                        f"({', '.join(EMBEDDINGS)}), got {clip(str(targets))}")
    tokens, _ = _trainable_tokens(raw.get("token_indices"), enabled, "token_indices")
    if not tokens:
        raise _refuse("token_indices", "is required")
    return AdapterSpec(r=len(tokens), lora_alpha=float(len(tokens)), target_modules=(names[0],),
                       base_model_name_or_path=raw.get("base_model_name_or_path") if isinstance(
                           raw.get("base_model_name_or_path"), str) else None,
                       trainable_tokens=tokens, trainable_tokens_module=names[0], tokens_field="token_indices")


def _modules_to_save(value) -> tuple[str, ...]:
    """PEFT's ``modules_to_save``: module names whose fully trained copies the adapter holds;
    served for the token embedding and lm_head (adapters/saved_modules.py)."""
    if value in (None, []):
        return ()
    if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
        raise _refuse("modules_to_save", f"must be a list of module names, got {clip(str(value))}")
    other = [m for m in value if leaf(m) != HEAD and leaf(m) not in EMBEDDINGS]
    if other:
        raise _refuse("modules_to_save", f"fully trained copies are served of the token embedding "
                                         f"({', '.join(EMBEDDINGS)}) and {HEAD} only, got {clip(other[0])}")
    return tuple(value)


def _trainable_tokens(value, enabled: Collection[str], name: str = "trainable_token_indices"
                      ) -> tuple[tuple[int, ...], str | None]:
    """PEFT's ``trainable_token_indices``: a list of token ids (the input embedding's), or
    {embedding module name: ids}. They are served as a LoRA on the token embedding (and on a tied
    lm_head), so the server must opt in to that. -> (ids, the module named or None)."""
    if value in (None, [], {}):
        return (), None
    module = None
    if isinstance(value, dict):
        if len(value) != 1 or leaf(next(iter(value))) not in EMBEDDINGS:
            raise _refuse(name, f"trainable tokens are served on the token embedding alone ({', '.join(EMBEDDINGS)}), "
                                f"got {clip(str(list(value)))}")
        (module, value), = value.items()
    if not isinstance(value, list) or not value or \
            not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise _refuse(name, f"must list token ids (non-negative integers), got {clip(str(value))}")
    if len(set(value)) != len(value):
        raise _refuse(name, f"lists a token id twice: {clip(str(value))}")
    if not any(kind in enabled for kind in (*EMBEDDINGS, FOLDED_TOKENS)):
        raise _refuse(name, "trainable tokens are served as LoRA on the token embedding, which is not enabled on this "
                            "server (start it with --enable-embedding-lora)")
    return tuple(value), module


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(value, name: str) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) or \
        isinstance(value, float) and math.isfinite(value) and value.is_integer()
    if not ok or value <= 0:
        raise _refuse(name, f"must be a positive integer, got {clip(str(value))}")
    return int(value)


def _finite(value, name: str) -> float:
    try:
        number = float(value) if _is_number(value) else math.nan
    except OverflowError:  # an integer beyond float's range
        number = math.inf
    if not math.isfinite(number):
        raise _refuse(name, f"must be a finite number, got {clip(str(value))}")
    return number


def _flag(raw: dict, name: str) -> bool:
    value = raw.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _refuse(name, f"must be true or false, got {clip(str(value))}")
    return value


def _pattern(value, name: str, check) -> dict:
    """rank_pattern / alpha_pattern: {regex key: number}, each value checked."""
    if value in (None, {}):
        return {}
    if not isinstance(value, dict):
        raise _refuse(name, "must be an object of module pattern -> number")
    return {key: check(v, f"{name}[{clip(key)}]") for key, v in value.items()}


def read_adapter_config(adapter_dir: Path, confine: Path | None = None,
                        enabled: Collection[str] = ()) -> tuple[AdapterSpec, bytes]:
    """The spec, and the file's bytes. The file is read confined and bounded (adapters/files.py).
    ``enabled``: as for ``parse_adapter_config``."""
    data = read_adapter_file(adapter_dir, CONFIG_NAME, confine or Path(adapter_dir), CONFIG_LIMIT)
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise AdapterInvalid(f"{CONFIG_NAME} is not valid JSON: {clip(str(e), 120)}") from None
    return parse_adapter_config(raw, enabled), data
