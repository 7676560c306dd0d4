"""PEFT safetensors -> :class:`LoRAWeights` in host memory, checked against the base model.

Files are read into memory whole and validated before use: a memory-mapped read of a file that
is truncated later would kill the process with SIGBUS. Registration reads and hashes the weights;
every later load checks that hash, so the weights served are the weights that were validated. A
load of a file whose (device, inode, size, mtime, ctime) are those it had when hashed skips the
hash: any write sets ctime to the current time. A file hashed within RACY_NS of its last change
is hashed at every load, since a write in the same clock tick could leave its ctime as it was.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .config import (
    CONFIG_NAME,
    EMBEDDINGS,
    FOLDED_TOKENS,
    HEAD,
    OPT_IN,
    AdapterSpec,
    leaf,
    opt_in_refusal,
    read_adapter_config,
)
from .errors import AdapterInvalid, clip
from .files import AdapterFile, ReadBuffer, exists
from .saved_modules import SavedModules, SavedModuleStore
from .tokenizers import AdapterTokenizers

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
MAX_HEADER_BYTES = 16 * 1024 * 1024
SAFETENSORS_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
PICKLE_OVERHEAD = 1 << 20  # a pickle's framing beyond its tensors' bytes
RACY_NS = 2_000_000_000  # a file changed less than this before it was hashed is hashed at every load
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\."
                  r"(?:lora_(?P<ab>[AB])(?:\.default)?\.weight|lora_embedding_(?P<eab>[AB])(?:\.default)?"
                  r"|lora_magnitude_vector(?:\.default)?(?:\.weight)?)$")
# PEFT saves the base weights of a LoRA-wrapped lm_head or token embedding with the adapter
# (save_embedding_layers)
_BASE_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.base_layer\.(?P<param>weight|bias)$")
# a biased lm_head's trained or resized copy (modules_to_save, added tokens) saves its bias: not served
_COPY_BIAS_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.bias$")
# PEFT's trainable tokens: the new rows [n, hidden] of the listed tokens (a LoRA adapter's
# trainable_token_indices under token_adapter; a TRAINABLE_TOKENS adapter's on the module itself)
_TOKENS_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?:token_adapter\.)?trainable_tokens_delta"
                         r"(?:\.default)?$")
# PEFT's trainable tokens over a resized vocabulary: the resized layer they are rows of, saved
# beside them (save_embedding_layers), a fully trained copy as far as the server is concerned
_TOKENS_BASE_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.token_adapter\.base_layer\.weight$")
# PEFT's modules_to_save: a fully trained copy of the module (``_copy_of``)
_SAVED_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.weight$")
# beside such a copy, PEFT's save_embedding_layers (on by default for a resized vocabulary) also
# writes the wrapper's two parts: the resized base layer and the copy again; PEFT serves the copy
_WRAPPED_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?:original_module|modules_to_save)\.weight$")


def _copy_of(key: str) -> str | None:
    """The module whose fully trained copy (modules_to_save) tensor ``key`` is: the token
    embedding's or lm_head's, under none of the keys above (but the resized layer under trainable
    tokens); else None."""
    resized = _TOKENS_BASE_KEY.match(key)
    if resized is not None and leaf(resized["module"]) in OPT_IN:
        return resized["module"]
    if _KEY.match(key) or _TOKENS_KEY.match(key) or _BASE_KEY.match(key):
        return None
    copy = _SAVED_KEY.match(key)
    return copy["module"] if copy is not None and leaf(copy["module"]) in OPT_IN else None


def _wrapped(key: str) -> str | None:
    """The module whose fully trained copy's wrapper part (``_WRAPPED_KEY``) ``key`` is, or None."""
    part = _WRAPPED_KEY.match(key)
    return part["module"] if part is not None and leaf(part["module"]) in OPT_IN else None


def _unread(key: str) -> bool:
    """Whether a load leaves the tensor unread: a saved base layer (checked at registration) or a
    fully trained module (registration holds it, adapters/saved_modules.py) and its wrapper's parts."""
    return _BASE_KEY.match(key) is not None or _copy_of(key) is not None or _wrapped(key) is not None


def _part(match: re.Match) -> str:
    """"A", "B", or "M" for DoRA's magnitude vector. An embedding's lora_embedding_A [r, vocab]
    and lora_embedding_B [hidden, r] are its A and B: a one-hot token times A is A's column."""
    return match["ab"] or match["eab"] or "M"


@dataclass(frozen=True)
class LoRALayout:
    """What the base model offers to LoRA: full module name -> (layer index, module kind), the
    (in_features, out_features) of each kind, and the kinds the model computes as one fused linear
    over one input (q|k|v, gate|up): their adapter pages are stored side by side, so that one LoRA
    call shrinks them together."""

    modules: dict[str, tuple[int, str]]
    shapes: dict[str, tuple[int, int]]
    num_layers: int
    fused: tuple[tuple[str, ...], ...] = ()
    # (layer, kind) -> (the base weight W [out, in] as served, on its device; its rows' squared
    # norms [out], float32): DoRA's scale depends on them. None (a layout from the config alone, or
    # a server without --enable-dora): DoRA adapters are refused.
    dora_base: Callable[[int, str], tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, compare=False,
                                                                                    repr=False)
    # (layer, kind) -> the served W [out, in]: what an adapter's saved copy of lm_head or the token
    # embedding (PEFT's base_layer.weight) must equal
    base_weight: Callable[[int, str], torch.Tensor] | None = field(default=None, compare=False, repr=False)
    # lm_head's weight is the token embedding's (tie_word_embeddings): trainable tokens change both
    tied_head: bool = False
    # module name -> the served weight [vocab, hidden] an adapter's fully trained copy (PEFT's
    # modules_to_save) replaces: the token embedding and lm_head where the server holds such copies
    # (--max-saved-modules), else empty
    saveable: dict[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)
    # lm_head's bias where it has one (Phi's; of the base vocabulary's size: no resized vocabulary), which
    # PEFT's saved base_layer.bias of it must equal
    head_bias: torch.Tensor | None = field(default=None, compare=False, repr=False)
    vocab: int | None = None  # the token embedding's rows (None: not known, as in tests' layouts)
    # module name prefixes of a vision-language checkpoint's parts a text request never reaches (its
    # vision tower): an adapter's LoRA on them is skipped, which leaves every text output as PEFT's
    ignored: tuple[str, ...] = ()
    ignored_modules: tuple[str, ...] = field(default=(), compare=False, repr=False)  # their module names

    def serves(self, key: str) -> bool:
        """Whether a tensor of an adapter's file (PEFT's name) is of a part the server runs."""
        return not self.ignored or not key.removeprefix("base_model.model.").startswith(self.ignored)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.shapes)

    @property
    def stores(self) -> tuple[tuple[int, tuple[str, ...]], ...]:
        """(layer, group) of each page store: every group at every layer that has a kind of it."""
        present = set(self.modules.values())
        return tuple((layer, group) for layer in sorted({layer for layer, _ in present}) for group in self.groups
                     if any((layer, kind) in present for kind in group))

    def with_head(self, hidden: int, vocab: int) -> LoRALayout:
        """This layout with LoRA on the output projection too: module and kind "lm_head", in a layer
        of its own after the decoder's (``num_layers``)."""
        return replace(self, modules={**self.modules, HEAD: (self.num_layers, HEAD)},
                       shapes={**self.shapes, HEAD: (hidden, vocab)})

    def with_embedding(self, module: str, vocab: int, hidden: int) -> LoRALayout:
        """This layout with LoRA on the token embedding ``module`` too (its kind: the name's last
        part), in a layer of its own before the decoder's (-1). Its input is the token one-hot."""
        return replace(self, modules={**self.modules, module: (-1, leaf(module))},
                       shapes={**self.shapes, leaf(module): (vocab, hidden)})

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        """Every kind once, in a group of the kinds sharing its input (alone if it is in none)."""
        fused = {k: g for g in self.fused for k in g}
        out: list[tuple[str, ...]] = []
        for kind in self.kinds:
            group = fused.get(kind, (kind,))
            if group not in out:
                out.append(group)
        return tuple(out)


@dataclass(frozen=True)
class TensorPlan:
    """Where a plain LoRA adapter's safetensors file keeps each module's A and B, recorded when
    registration validates the file. A load of the file with the identity it had then views them
    at these offsets: no header parse and no name matching, one tensor op a view (a 420-tensor
    adapter's decode spent more time in those than in reading its 20 MB)."""

    header_sha256: bytes  # of the file's first ``body`` bytes (length and header): a load checks them
    body: int  # where the tensor data starts in the file
    dtype: torch.dtype  # of every A and B
    names: tuple[str, ...]  # full module names, in (layer, kind) order
    spans: array  # 'q', four a module: A's start and end, B's start and end, in elements from ``body``
    scales: array  # 'd', a module's scaling
    skip: tuple[tuple[int, int], ...]  # saved base layers' byte ranges, checked at registration, not read


@dataclass(frozen=True)
class AdapterManifest:
    """What registration learns from the config and the safetensors header, without the weights."""

    spec: AdapterSpec
    rank: int  # pages the adapter needs: the largest rank over its modules
    module_ranks: dict[str, int]  # full module name -> rank
    size_bytes: int  # its pages (the padded copy, in the serving dtype) and its fully trained modules' copies
    weights_name: str  # the file the weights came from
    weights_sha256: str  # of its bytes at registration: later loads must match
    content_hash: str  # sha256 of the weights' hash and the scaling config: what the adapter computes
    # the weights file's (device, inode, size, mtime, ctime) when hashed; a load of the file with
    # the same identity skips the hash (any write changes ctime). None: written too recently to
    # tell, so every load hashes.
    weights_identity: tuple[int, ...] | None = None
    magnitude: bool = False  # DoRA: one page more than ``rank`` rows of LoRA, holding the magnitude scale
    tensors: TensorPlan | None = field(default=None, repr=False, compare=False)  # where the file keeps them
    # module -> its fully trained copy that replaces the served one (modules_to_save), held for the
    # registration (the registry releases it)
    saved: SavedModules = field(default_factory=SavedModules, repr=False, compare=False)
    # its own tokenizer (adapters/tokenizers.py), where it is not the base model's; None: the base model's
    tokenizer: object | None = field(default=None, repr=False, compare=False)
    vocab_size: int | None = None  # the rows of its resized vocabulary (its copies'); None: the base model's

    @property
    def depends_on_base(self) -> bool:
        """Whether its served rows depend on the base weights (DoRA's scale; trainable tokens, served
        as the difference of their rows from the base rows): a converted copy is not reusable by
        content hash alone, and it cannot be combined as a sum of deltas."""
        return self.magnitude or bool(self.spec.trainable_tokens)

    @property
    def changes_kv(self) -> bool:
        """Whether it changes the decoder's keys and values; LoRA on lm_head alone does not, nor a
        trained copy of lm_head."""
        return any(leaf(module) != HEAD for module in (*self.module_ranks, *self.saved))

    def saved_weight(self, head: bool) -> torch.Tensor | None:
        """The trained copy [vocab, hidden] that replaces lm_head (``head``) or the token embedding
        for this adapter's rows, or None."""
        return next((m.weight for module, m in self.saved.items() if (leaf(module) == HEAD) == head), None)

    @property
    def lora_rank(self) -> int:
        """The adapter's largest module rank (``rank`` counts DoRA's magnitude page too)."""
        return self.rank - self.magnitude


@dataclass(frozen=True)
class LoRAWeights:
    """One adapter in host memory, padded to ``rank`` rows per module with the scaling folded in.

    ``a[(layer, kind)]``: [rank, in]; ``b[(layer, kind)]``: [rank, out] = (s * B).T.
    Modules the adapter does not target are absent. A DoRA adapter's last row is its magnitude page.
    """

    rank: int
    a: dict[tuple[int, str], torch.Tensor]
    b: dict[tuple[int, str], torch.Tensor]
    flat: torch.Tensor | None = None  # the one buffer a and b view (see ``over``), if they share one
    # DoRA: the last row is no rank row but the magnitude page, a = 0 and b = g = m / ||W + s B A||
    # per output row (ops/dora.py); the LoRA rows are the ``rank - 1`` before it
    magnitude: bool = False

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))

    @classmethod
    def over(cls, flat: torch.Tensor, modules: list[tuple[int, str]], rank: int, layout: LoRALayout,
             magnitude: bool = False) -> LoRAWeights:
        """Views of ``flat``: per module in ``modules`` order, A [rank, in] then B [rank, out]."""
        a, b, at = {}, {}, 0
        for key in modules:
            in_f, out_f = layout.shapes[key[1]]
            a[key] = flat[at : at + rank * in_f].view(rank, in_f)
            at += rank * in_f
            b[key] = flat[at : at + rank * out_f].view(rank, out_f)
            at += rank * out_f
        if at != flat.numel():
            raise ValueError(f"a flat adapter buffer of {flat.numel()} values for a layout of {at}")
        return cls(rank, a, b, flat, magnitude)

    def clone(self, into: torch.Tensor | None = None) -> LoRAWeights:
        """A copy in a buffer of its own (one copy of ``flat``, the same views into it): a new one,
        or the front of ``into`` (a 1-D buffer of ``flat``'s dtype, at least as long)."""
        if into is None:
            flat = self.flat.clone()
        else:
            flat = into[: self.flat.numel()]
            flat.copy_(self.flat)
        base = self.flat.storage_offset()

        def view(t: torch.Tensor) -> torch.Tensor:
            at = t.storage_offset() - base
            return flat[at : at + t.numel()].view(t.shape)
        return LoRAWeights(self.rank, {k: view(t) for k, t in self.a.items()}, {k: view(t) for k, t in self.b.items()},
                           flat, self.magnitude)

    def nonfinite_module(self) -> tuple[int, str] | None:
        """The first module holding a NaN or an Inf, or None. The sum of finite values is finite
        unless it overflows, so one fast reduction clears almost every adapter."""
        if self.flat is not None and torch.isfinite(self.flat.sum()):
            return None
        return next((k for k in self.a if not (torch.isfinite(self.a[k]).all() and torch.isfinite(self.b[k]).all())),
                    None)


def flat_numel(modules: list[tuple[int, str]], rank: int, layout: LoRALayout) -> int:
    return rank * sum(sum(layout.shapes[kind]) for _, kind in modules)


def read_safetensors_header(prefix: bytes, file_size: int, source: str = WEIGHTS_NAME) -> dict[str, dict]:
    """Parse and check a safetensors header: its size, its JSON, dtypes, and that every tensor's
    data offsets lie inside a file of ``file_size`` bytes. ``prefix`` holds at least the header."""
    if len(prefix) < 8:
        raise AdapterInvalid(f"{source} is truncated: {file_size} bytes, no header")
    (header_len,) = struct.unpack("<Q", prefix[:8])
    if header_len > MAX_HEADER_BYTES:
        raise AdapterInvalid(f"{source} header is {header_len} bytes; the limit is {MAX_HEADER_BYTES}")
    if 8 + header_len > min(len(prefix), file_size):
        raise AdapterInvalid(f"{source} is truncated: its header of {header_len} bytes runs past the end")
    try:
        header = json.loads(prefix[8 : 8 + header_len])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterInvalid(f"{source} header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise AdapterInvalid(f"{source} header is not a JSON object")
    header.pop("__metadata__", None)
    body = file_size - 8 - header_len
    spans = []
    for name, info in header.items():
        ok = isinstance(info, dict) and isinstance(info.get("dtype"), str) and _ints(info.get("shape")) and \
            _ints(info.get("data_offsets")) and len(info["data_offsets"]) == 2
        if not ok:
            raise AdapterInvalid(f"{source}: tensor {clip(name)} has a malformed header entry")
        dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise AdapterInvalid(f"{source}: tensor {clip(name)} has dtype {clip(dtype)}; expected one of F32, F16, "
                                 "BF16, F64")
        numel = 1
        for d in shape:
            numel *= d
        if not (0 <= start <= end <= body) or end - start != numel * SAFETENSORS_DTYPES[dtype]:
            raise AdapterInvalid(
                f"{source}: tensor {clip(name)} has bad data offsets [{start}, {end}) for {body} data bytes"
            )
        spans.append((start, end))
    covered = 0  # the tensors tile the data exactly: no overlap, no gap, no trailing bytes
    for start, end in sorted(spans):
        if start != covered:
            raise AdapterInvalid(f"{source}: bad data offsets: tensors overlap or leave a gap at byte {covered}")
        covered = end
    if covered != body:
        raise AdapterInvalid(f"{source}: bad data offsets: {body - covered} trailing bytes after the tensors")
    return header


def _ints(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _read_safetensors(f: AdapterFile, layout: LoRALayout, max_rank: int, into: ReadBuffer | None = None,
                      validated: tuple[int, ...] | None = None) -> tuple[dict[str, dict], bytearray | memoryview]:
    """Header first, then the whole file (into ``into``'s memory, if given), which must be no
    larger than the header says: a file of the wrong size is refused before its data is read.
    A file that still has the identity registration ``validated`` is trusted: its header is
    parsed, not checked again (for a 420-tensor adapter the checks took longer than the read), and
    a saved base layer (lm_head's or the embedding's, which registration compared with the served
    weights and a load does not use: most of such a file) is not read. A change during the read
    fails the load's identity and hash check before any decoding: the file is then read whole."""
    trusted = validated is not None and f.identity() == validated
    head = f.read_prefix(8)
    header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
    prefix = f.read_prefix(8 + min(header_len, MAX_HEADER_BYTES))
    if trusted:
        try:
            header = json.loads(prefix[8 : 8 + header_len])
        except (ValueError, UnicodeDecodeError):
            header = None
        if not isinstance(header, dict):
            raise AdapterInvalid(f"{f.name} changed while it was read")
        header.pop("__metadata__", None)
        header = _served(header, layout)
    else:
        header = _served(read_safetensors_header(prefix, f.size, f.name), layout)
        # the shapes must fit the base model before the body is read
        _modules_from_shapes({k: v["shape"] for k, v in header.items()}, None, layout, max_rank)
    prefix = prefix[: 8 + header_len]
    skip = sorted((8 + header_len + start, 8 + header_len + end) for key, info in header.items()
                  if _unread(key) for start, end in [info["data_offsets"]]) if trusted else []
    data = f.read_except(skip, into) if skip else f.read(f.size, into=into)
    if skip and f.identity() != validated:  # changed meanwhile: the hash check needs every byte
        data = f.read(f.size, into=into)
    if len(data) != f.size or data[: len(prefix)] != prefix:  # the bytes read are the bytes checked
        raise AdapterInvalid(f"{f.name} changed while it was read")
    return header, data


def _served(tensors: dict, layout: LoRALayout) -> dict:
    """``tensors`` (name -> anything) less those of the parts the server does not run (``ignored``)."""
    return tensors if not layout.ignored else {k: v for k, v in tensors.items() if layout.serves(k)}


def _modules_from_shapes(
    shapes: dict[str, list[int]], spec: AdapterSpec, layout: LoRALayout, max_rank: int
) -> tuple[dict[str, int], int | None]:
    """Check tensor names and shapes (of the parts the server runs: ``_served``) against the base
    model; return module -> rank, and the resized vocabulary its fully trained copies hold
    (``resized_vocabulary``), if any."""
    found: dict[str, dict[str, list[int]]] = {}
    saved_base: dict[str, list[int]] = {}
    tokens: dict[str, list[int]] = {}
    saved: dict[str, list[int]] = {}
    wrapped: dict[str, list[int]] = {}
    for key, shape in shapes.items():
        m = _KEY.match(key)
        if m is None:
            base, rows, copy = _BASE_KEY.match(key), _TOKENS_KEY.match(key), _copy_of(key)
            if _wrapped(key) is not None:
                wrapped[key] = list(shape)
                continue
            if rows is not None:
                tokens[rows["module"]] = list(shape)
                continue
            if copy is not None:
                saved[copy] = list(shape)
                continue
            bias = _COPY_BIAS_KEY.match(key)
            if base is None and bias is not None and leaf(bias["module"]) == HEAD and layout.head_bias is not None:
                raise AdapterInvalid(f"{clip(key)}: this model's {HEAD} has a bias, and a trained or resized copy of "
                                     f"it (modules_to_save, added tokens) is not served; LoRA on {HEAD} is")
            if base is not None and base["param"] == "bias":  # a biased lm_head's, saved with its LoRA
                if leaf(base["module"]) != HEAD or layout.head_bias is None:
                    raise AdapterInvalid(f"unexpected tensor {key!r}: a saved base layer's bias is {HEAD}'s alone")
                continue  # checked against the served bias by _check_saved_base
            if base is None or leaf(base["module"]) not in OPT_IN:
                raise AdapterInvalid(f"unexpected tensor {key!r}: only lora_A/lora_B weights, DoRA's "
                                     "lora_magnitude_vector, trainable tokens' rows, the saved base layer of "
                                     "lm_head or the token embedding and their fully trained copies "
                                     "(modules_to_save) are supported")
            saved_base[base["module"]] = list(shape)
            continue
        found.setdefault(m["module"], {})[_part(m)] = list(shape)
    if not found and not tokens:
        raise AdapterInvalid("the adapter holds no LoRA weights")
    for module in found:  # a regex target_modules, or tensors the config does not declare
        if leaf(module) in OPT_IN and leaf(module) not in layout.kinds:
            raise AdapterInvalid(f"adapter_config.json field 'target_modules': {opt_in_refusal(module)}")
    for module, shape in saved_base.items():
        if module not in found or module not in layout.modules:
            raise AdapterInvalid(f"{clip(module + '.base_layer.weight')}: a saved base layer of a module the "
                                 "adapter has no LoRA weights for")
        in_f, out_f = layout.shapes[layout.modules[module][1]]
        expected = [in_f, out_f] if leaf(module) in EMBEDDINGS else [out_f, in_f]  # an embedding: [vocab, hidden]
        if shape != expected:
            raise AdapterInvalid(f"{clip(module + '.base_layer.weight')} {shape} is not the base model's {module} "
                                 f"{expected}: the adapter was trained on a resized vocabulary, which is not served")
    if spec is not None:
        unmatched = spec.unmatched_targets([*layout.modules, *layout.ignored_modules])
        if unmatched:
            raise AdapterInvalid(
                f"adapter_config.json field 'target_modules': {clip(unmatched[0])} matches no supported module of "
                f"this model; supported: {sorted(layout.kinds)}"
            )
    ranks = {}
    for module, ab in sorted(found.items()):
        if module not in layout.modules:
            raise AdapterInvalid(f"module {clip(module)} is not a supported LoRA target of this model; "
                                 f"supported kinds: {sorted(layout.kinds)}")
        if not {"A", "B"} <= set(ab):
            have = "lora_A" if "A" in ab else "lora_B" if "B" in ab else "lora_magnitude_vector"
            raise AdapterInvalid(f"module {clip(module)} has {have} but not lora_A and lora_B")
        _, kind = layout.modules[module]
        in_f, out_f = layout.shapes[kind]
        if "M" in ab and ab["M"] != [out_f]:
            raise AdapterInvalid(f"module {clip(module)}: lora_magnitude_vector {ab['M']} does not fit the base "
                                 f"model's {kind}, which has {out_f} outputs")
        if spec is not None and spec.use_dora != ("M" in ab):
            raise AdapterInvalid(
                f"adapter_config.json field 'use_dora' is true, but module {clip(module)} has no lora_magnitude_vector"
                if spec.use_dora else
                f"module {clip(module)} has a DoRA lora_magnitude_vector, but adapter_config.json field 'use_dora' "
                "is not true")
        if len(ab["A"]) != 2 or len(ab["B"]) != 2:
            raise AdapterInvalid(f"module {clip(module)}: lora_A and lora_B must be matrices")
        (ra, ia), (ob, rb) = ab["A"], ab["B"]
        if ia != in_f or ob != out_f or ra != rb:
            raise AdapterInvalid(
                f"module {clip(module)}: lora_A {ab['A']} and lora_B {ab['B']} do not fit the base model's "
                f"{kind} ({in_f} -> {out_f})"
            )
        if ra > max_rank:
            raise AdapterInvalid(f"module {clip(module)} has rank {ra}; the server's --max-lora-rank is {max_rank}")
        if spec is not None and spec.declared_rank(module) != ra:  # PEFT refuses it with a size mismatch
            source = "rank_pattern" if spec.declared_rank(module) != spec.r else "r"
            raise AdapterInvalid(
                f"adapter_config.json field {source!r}: declares rank {spec.declared_rank(module)} for module "
                f"{clip(module)}, whose tensors have rank {ra}"
            )
        ranks[module] = ra
    resized = _check_saved(saved, spec, layout, found, tokens)
    for key, shape in wrapped.items():
        module = _wrapped(key)
        if saved.get(module) != shape:
            raise AdapterInvalid(f"{clip(key)} {shape}: a part of PEFT's wrapper of {clip(module)} without the fully "
                                 f"trained copy it wraps ({clip(module + '.weight')}) of that shape")
    if resized is not None and tokens:  # written into the copies at registration (inspect_adapter)
        _check_folded_tokens(tokens, spec, saved, resized)
        return ranks, resized
    return {**ranks, **_token_ranks(tokens, spec, layout, max_rank, found)}, resized


def _check_saved(saved: dict[str, list[int]], spec: AdapterSpec | None, layout: LoRALayout, lora_modules,
                 tokens) -> int | None:
    """Fully trained copies (module -> shape) against the config, the model and the adapter's
    other weights. Returns their resized vocabulary (``resized_vocabulary``), if any."""
    field_name = "adapter_config.json field 'modules_to_save'"
    if not layout.saveable:  # none served here
        if spec is None or not (saved or spec.modules_to_save):  # without the config: checked again with it
            return None
        if not spec.modules_to_save:  # e.g. PEFT's copy of an embedding it resized
            module = next(iter(saved))
            raise AdapterInvalid(f"{clip(module + '.weight')} {saved[module]}: a fully trained copy of a module "
                                 f"that {field_name} does not list (PEFT saves a resized vocabulary's embedding "
                                 "layers so; serving them needs --max-saved-modules N)")
        raise AdapterInvalid(f"{field_name}: fully trained modules are not enabled on this server (start it with "
                             "--max-saved-modules N: how many copies of the token embedding or lm_head it may hold)")
    for module, shape in saved.items():
        served = layout.saveable.get(module)
        if served is None:
            raise AdapterInvalid(f"{clip(module + '.weight')}: a fully trained copy of a module that is not this "
                                 f"model's token embedding or {HEAD} ({', '.join(layout.saveable)})")
        if len(shape) != 2 or shape[1] != served.shape[1] or shape[0] < 1:
            raise AdapterInvalid(f"{clip(module + '.weight')} {shape} does not fit the base model's {module} "
                                 f"{list(served.shape)}: [vocabulary, {served.shape[1]}]")
        if module in lora_modules:
            raise AdapterInvalid(f"module {clip(module)}: LoRA and a fully trained copy of the same module are not "
                                 "supported")
    resized = resized_vocabulary(saved, layout)
    if saved and tokens and resized is None:  # over a resized vocabulary they are rows of its copies
        raise AdapterInvalid("trainable tokens together with fully trained modules (modules_to_save) are not "
                             "supported")
    if spec is None:
        return resized
    tied = spec.ensure_weight_tying and layout.tied_head
    listed = {m for m in layout.saveable if spec.saves(m)}
    if tied and listed:  # PEFT keeps them tied: listing one saves both
        listed = set(layout.saveable)
    missing, unlisted = sorted(listed - saved.keys()), sorted(saved.keys() - listed)
    if missing:
        raise AdapterInvalid(f"{field_name} lists {clip(missing[0])}, but the weights hold no copy of it "
                             f"({clip(missing[0] + '.weight')})")
    if unlisted and resized is None:  # a resized vocabulary's layers PEFT saves unlisted (save_embedding_layers)
        raise AdapterInvalid(f"{clip(unlisted[0] + '.weight')}: a fully trained copy of a module that {field_name} "
                             "does not list")
    return resized


def _check_folded_tokens(tokens: dict[str, list[int]], spec: AdapterSpec | None, saved: dict[str, list[int]],
                         vocab: int) -> None:
    """Trainable tokens' rows (module -> shape [n, hidden]) over a resized vocabulary, which
    registration writes into the copies (``_fold_tokens``): each module's copy is in the weights,
    the rows fit it, and the config lists as many tokens, inside the vocabulary."""
    field_name = f"adapter_config.json field {spec.tokens_field if spec else 'trainable_token_indices'!r}"
    for module, shape in tokens.items():
        if module not in saved:
            raise AdapterInvalid(f"module {clip(module)}: trainable tokens' rows over a resized vocabulary without "
                                 f"its resized layer ({clip(module + '.token_adapter.base_layer.weight')})")
        if len(shape) != 2 or shape[1] != saved[module][1] or shape[0] != next(iter(tokens.values()))[0]:
            raise AdapterInvalid(f"module {clip(module)}: trainable tokens' rows {shape} do not fit its rows of "
                                 f"{saved[module][1]} values, or the other module's count")
    if spec is None:
        return
    n = next(iter(tokens.values()))[0]
    if not spec.trainable_tokens or n != len(spec.trainable_tokens):
        raise AdapterInvalid(f"{field_name} lists {len(spec.trainable_tokens)} tokens, but the weights hold "
                             f"trainable tokens' rows for {n}")
    outside = [t for t in spec.trainable_tokens if t >= vocab]
    if outside:
        raise AdapterInvalid(f"{field_name}: token id {outside[0]} is outside the adapter's vocabulary of {vocab}")


def _fold_tokens(copies: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], ids: tuple[int, ...]
                 ) -> dict[str, torch.Tensor]:
    """The copies with the trainable tokens' rows written in, as PEFT serves them (the rows replace
    rows ``ids`` of the resized layer: of the embedding, and of lm_head where the adapter saves rows
    for it, a tied one)."""
    out = dict(copies)
    for key, rows in tensors.items():
        match = _TOKENS_KEY.match(key)
        if match is not None:
            module = match["module"]
            out[module] = out[module].clone().index_copy_(0, torch.tensor(ids), rows.to(out[module].dtype))
    return out


def resized_vocabulary(saved: dict[str, list[int]], layout: LoRALayout) -> int | None:
    """The vocabulary an adapter's fully trained copies (module -> shape [vocab, hidden]) were
    trained on where it is not the base model's, else None. Such an adapter carries its token
    embedding and lm_head both, of the same vocabulary (PEFT resizes both), and its tokenizer
    (``inspect_adapter``)."""
    served = next(iter(layout.saveable.values()), None)
    rows = {shape[0] for shape in saved.values()}
    if served is None or rows <= {served.shape[0]}:
        return None
    named = ", ".join(f"{m} {shape[0]}" for m, shape in sorted(saved.items()))
    if len(rows) > 1 or saved.keys() != layout.saveable.keys():
        raise AdapterInvalid(f"the adapter's fully trained copies ({named} tokens) resize the base model's vocabulary "
                             f"of {served.shape[0]}: a resized vocabulary is served with trained copies of both "
                             f"{' and '.join(layout.saveable)} of one size")
    if layout.head_bias is not None:
        raise AdapterInvalid(f"a resized vocabulary ({named} tokens) on a model whose {HEAD} has a bias is not served")
    return rows.pop()


def _token_ranks(tokens: dict[str, list[int]], spec: AdapterSpec | None, layout: LoRALayout, max_rank: int,
                 lora_modules) -> dict[str, int]:
    """Trainable tokens' rows (module -> shape [n, hidden]) are served as a LoRA of rank n on the
    token embedding, and on lm_head too when it is tied to it (``_token_lora``): module -> n.
    Checked against the config, the model and the adapter's LoRA modules."""
    field_name = f"adapter_config.json field {spec.tokens_field if spec else 'trainable_token_indices'!r}"
    if spec is not None and bool(tokens) != bool(spec.trainable_tokens):
        if tokens:
            raise AdapterInvalid(f"module {clip(next(iter(tokens)))} has trainable tokens' rows, but "
                                 "adapter_config.json lists no trainable_token_indices")
        raise AdapterInvalid(f"{field_name} lists tokens, but the weights hold no trainable_tokens_delta")
    if not tokens:
        return {}
    head_rows = tokens.pop(HEAD, None)  # a TRAINABLE_TOKENS adapter saves a tied lm_head's rows too
    if head_rows is not None and not (layout.tied_head and tokens):
        raise AdapterInvalid(f"module {HEAD!r}: trainable tokens are served on the token embedding alone (and on an "
                             f"{HEAD} tied to it)")
    if len(tokens) > 1:
        raise AdapterInvalid(f"trainable tokens on {len(tokens)} modules: they are served on the token embedding "
                             "alone")
    (module, shape), = tokens.items()
    where = layout.modules.get(module)
    if where is None or where[0] != -1:
        raise AdapterInvalid(f"module {clip(module)}: trainable tokens are served on the token embedding alone, as a "
                             "LoRA on it" + ("" if -1 in {layer for layer, _ in layout.modules.values()} else
                                             ", which is not enabled on this server (start it with "
                                             "--enable-embedding-lora)"))
    vocab, hidden = layout.shapes[where[1]]
    if len(shape) != 2 or shape[1] != hidden:
        raise AdapterInvalid(f"module {clip(module)}: trainable tokens' rows {shape} do not fit the base model's "
                             f"embedding rows of {hidden} values")
    if head_rows is not None and head_rows != shape:
        raise AdapterInvalid(f"module {HEAD!r}: trainable tokens' rows {head_rows} are not those of the embedding it "
                             f"is tied to, {shape}")
    if module in lora_modules:
        raise AdapterInvalid(f"module {clip(module)}: LoRA and trainable tokens on the same module are not supported")
    n = shape[0]
    if n > max_rank:
        raise AdapterInvalid(f"{field_name}: {n} trainable tokens take {n} rank rows of the token embedding's LoRA "
                             f"pages; the server's --max-lora-rank is {max_rank}")
    ranks = {module: n}
    if layout.tied_head:
        if HEAD not in layout.modules:
            raise AdapterInvalid(f"{field_name}: this model's lm_head is tied to the token embedding, so trainable "
                                 "tokens change it too, and LoRA on the output projection is not enabled on this "
                                 "server (start it with --enable-lm-head-lora)")
        if HEAD in lora_modules:
            raise AdapterInvalid(f"{field_name}: LoRA on lm_head together with trainable tokens on the embedding it "
                                 "is tied to is not supported")
        ranks[HEAD] = n
    if spec is not None:
        if n != len(spec.trainable_tokens):
            raise AdapterInvalid(f"{field_name} lists {len(spec.trainable_tokens)} tokens, but module {clip(module)} "
                                 f"has trainable tokens' rows for {n}")
        named = spec.trainable_tokens_module
        if named is not None and module != named and not module.endswith("." + named):
            raise AdapterInvalid(f"{field_name} names module {clip(named)}, but the trainable tokens' rows are "
                                 f"{clip(module)}'s")
        outside = [t for t in spec.trainable_tokens if t >= vocab]
        if outside:
            raise AdapterInvalid(f"{field_name}: token id {outside[0]} is outside the model's vocabulary of {vocab}")
    return ranks


def _token_lora(spec: AdapterSpec, tensors: dict[str, torch.Tensor], layout: LoRALayout
                ) -> dict[str, dict[str, torch.Tensor]]:
    """Trainable tokens as LoRA A and B (scaling 1) that replace the embedding rows E[t_j] of
    tokens t (n of them) by the adapter's V_j: with the one-hot P [vocab, n] (P[t_j, j] = 1) and
    D = V - E[t] [n, hidden], the embedding gains P D (A = P^T [n, vocab], B = D^T [hidden, n]),
    so that row t_j is E[t_j] + D_j = V_j to float32 rounding. A tied lm_head gains the same rows
    (A = D, B = P): logit t_j becomes h . V_j. module -> {"A", "B"}."""
    found = {m["module"]: t for k, t in tensors.items() if (m := _TOKENS_KEY.match(k)) is not None}
    head_rows = found.pop(HEAD, None)  # a TRAINABLE_TOKENS adapter's copy for a tied lm_head (checked shape)
    (module, rows), = found.items()
    if head_rows is not None and not torch.equal(head_rows, rows):
        raise AdapterInvalid(f"module {HEAD!r}: trainable tokens' rows differ from those of the embedding it is tied to")
    if not torch.isfinite(rows).all():
        raise AdapterInvalid(f"module {clip(module)}: trainable tokens' rows hold NaN or Inf")
    if layout.base_weight is None:
        raise AdapterInvalid(f"module {clip(module)}: this server cannot serve trainable tokens")
    layer, kind = layout.modules[module]
    ids = torch.tensor(spec.trainable_tokens)
    served = layout.base_weight(layer, kind)  # [hidden, vocab]
    delta = rows.float() - served[:, ids.to(served.device)].T.to("cpu", torch.float32)
    onehot = torch.zeros(len(ids), layout.shapes[kind][0])
    onehot[torch.arange(len(ids)), ids] = 1.0
    lora = {module: {"A": onehot, "B": delta.T.contiguous()}}
    if layout.tied_head:
        lora[HEAD] = {"A": delta, "B": onehot.T.contiguous()}
    return lora


def _check_saved_base(tensors: dict[str, torch.Tensor], layout: LoRALayout) -> None:
    """A saved copy of lm_head's or the token embedding's base weights (PEFT saves one with their
    LoRA) must be the served weights: PEFT would serve the copy, so a different one (a trained
    layer) is refused."""
    for key, saved in tensors.items():
        base = _BASE_KEY.match(key)
        if base is None or _copy_of(key):  # trainable tokens' resized layer: a copy, held
            continue
        if layout.base_weight is None:
            raise AdapterInvalid(f"{clip(key)}: this server cannot check a saved base layer")
        if base["param"] == "bias":
            served = layout.head_bias
            if served is None or not torch.equal(saved.to(served.device, served.dtype), served):
                raise AdapterInvalid(f"{clip(key)} differs from the served model's {HEAD} bias: an adapter that "
                                     "trains the layer itself is not served, only LoRA on it")
            continue
        served = layout.base_weight(*layout.modules[base["module"]])  # [out, in]
        if leaf(base["module"]) in EMBEDDINGS:
            saved = saved.T  # an embedding's weight is [vocab, hidden]: [in, out]
        if not torch.equal(saved.to(served.device, served.dtype), served):
            raise AdapterInvalid(f"{clip(key)} differs from the served model's {base['module']} weights: an adapter "
                                 "that trains the layer itself is not served, only LoRA on it")


def _check_dora(spec: AdapterSpec, layout: LoRALayout, modules) -> None:
    if spec.use_dora and spec.trainable_tokens:
        raise AdapterInvalid("adapter_config.json field 'trainable_token_indices': trainable tokens in a DoRA adapter "
                             "are not supported")
    embedding = next((m for m in modules if leaf(m) in EMBEDDINGS), None)
    if spec.use_dora and embedding is not None:
        raise AdapterInvalid(f"adapter_config.json field 'use_dora': DoRA on the token embedding ({clip(embedding)}) "
                             "is not supported")
    if spec.use_dora and layout.dora_base is None:
        raise AdapterInvalid("adapter_config.json field 'use_dora': DoRA adapters are not enabled on this server "
                             "(start it with --enable-dora)")


def _unpickle(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """Only with --allow-pickle, and even then weights_only: no code runs while unpickling."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any refusal of the unpickler is the adapter's fault
        raise AdapterInvalid(f"{name} cannot be read safely: {clip(str(e).splitlines()[0], 200)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterInvalid(f"{name} must hold a dict of tensors")
    return state


def adapter_files(adapter_dir: Path, allow_pickle: bool) -> str:
    """What can be checked of an adapter before the model it is for is known: ``adapter_dir`` is a
    folder with a config and a weights file this server reads. Returns the weights file's name."""
    if not Path(adapter_dir).is_dir():
        raise AdapterInvalid("the adapter path is not a directory")
    if not exists(adapter_dir, CONFIG_NAME):
        raise AdapterInvalid(f"{CONFIG_NAME} is missing from the adapter directory")
    return _weights_name(adapter_dir, allow_pickle)


def _weights_name(adapter_dir: Path, allow_pickle: bool) -> str:
    if exists(adapter_dir, WEIGHTS_NAME):
        return WEIGHTS_NAME
    if exists(adapter_dir, PICKLE_WEIGHTS_NAME):
        if allow_pickle:
            return PICKLE_WEIGHTS_NAME
        raise AdapterInvalid(f"{PICKLE_WEIGHTS_NAME} is pickle-based and refused (start the server with "
                             f"--allow-pickle to accept it); convert it to {WEIGHTS_NAME}")
    raise AdapterInvalid(f"{WEIGHTS_NAME} is missing from the adapter directory")


def _largest_adapter_bytes(layout: LoRALayout, max_rank: int) -> int:
    """Every supported module at max_rank in float64: no valid weights file is larger."""
    per_rank = sum(sum(layout.shapes[kind]) for _, kind in layout.modules.values())
    saved = sum(layout.shapes[k][0] * layout.shapes[k][1] for k in layout.kinds if k in OPT_IN)  # base layers
    saved += sum(w.numel() for w in layout.saveable.values())  # fully trained copies
    return (max_rank * per_rank + saved) * 8


def _read_weights(adapter_dir: Path, name: str, confine: Path, layout: LoRALayout, max_rank: int,
                  into: ReadBuffer | None = None, validated: tuple[int, ...] | None = None
                  ) -> tuple[dict[str, dict] | None, bytearray | memoryview, tuple[int, ...]]:
    """(the safetensors header, None for a pickle file; the file's bytes; the file's identity
    once read), read confined and bounded (adapters/files.py); safetensors into ``into``, if given.
    ``validated``: the identity of the file registration validated; a file that still has it is
    not checked again."""
    with AdapterFile(adapter_dir, name, confine) as f:
        if name == PICKLE_WEIGHTS_NAME:
            header, data = None, f.read(_largest_adapter_bytes(layout, max_rank) + PICKLE_OVERHEAD,
                                        "the largest adapter this model and --max-lora-rank allow")
        else:
            header, data = _read_safetensors(f, layout, max_rank, into, validated)
        return header, data, f.identity()


def inspect_adapter(adapter_dir: Path, layout: LoRALayout, max_rank: int, element_size: int,
                    allow_pickle: bool = False, confine: Path | None = None,
                    saved_store: SavedModuleStore | None = None, replacing: SavedModules | None = None,
                    tokenizers: AdapterTokenizers | None = None) -> AdapterManifest:
    """Validate the config, the weights' header and shapes, and hash the weights' bytes. The
    values are decoded (and checked finite) at load. Files must resolve inside ``confine``
    (default: the adapter directory). A pickle file is accepted only with ``allow_pickle``.
    Fully trained modules (modules_to_save) are converted now and held in ``saved_store``
    (``replacing``: those of the version this registration replaces, SavedModuleStore.hold). A
    tokenizer saved beside the weights that is not the base model's is loaded by ``tokenizers``
    (without them: not read); an adapter trained on a resized vocabulary must have one."""
    adapter_dir = Path(adapter_dir)
    confine = confine or Path(adapter_dir).resolve()
    name = adapter_files(adapter_dir, allow_pickle)
    spec, _ = read_adapter_config(adapter_dir, confine, (*layout.kinds, *((FOLDED_TOKENS,) if layout.saveable else ())))
    header, data, identity = _read_weights(adapter_dir, name, confine, layout, max_rank)
    if time.time_ns() - identity[-1] < RACY_NS:  # a write in this clock tick could leave the same ctime
        identity = None
    if header is None:  # pickled: its tensors now, read once
        tensors = _served(_unpickle(data, name), layout)
        shapes = {k: list(v.shape) for k, v in tensors.items()}
    else:
        tensors, shapes = None, {k: v["shape"] for k, v in header.items()}
    ranks, vocab = _modules_from_shapes(shapes, spec, layout, max_rank)
    _check_dora(spec, layout, ranks)
    found = None if tokenizers is None else tokenizers.load(adapter_dir, confine)
    tokenizer = None if tokenizers is None or found is tokenizers.base else found  # None: the base model's
    _check_tokenizer(found, tokenizer, vocab, layout)
    if any(_unread(k) for k in shapes):  # later loads check the bytes checked here (hash or identity)
        tensors = _decode(data, header) if tensors is None else tensors
        _check_saved_base(tensors, layout)
    rank = max(ranks.values()) + spec.use_dora
    per_page = sum(sum(layout.shapes[layout.modules[m][1]]) for m in ranks)
    digest = hashlib.sha256(data).hexdigest()
    copies = {} if tensors is None else {_copy_of(key): t for key, t in tensors.items() if _copy_of(key)}
    if vocab is not None and spec.trainable_tokens:  # rows of the copies now; nothing of them is paged
        copies = _fold_tokens(copies, tensors, spec.trainable_tokens)
        spec = replace(spec, trainable_tokens=(), trainable_tokens_module=None, folded_tokens=spec.trainable_tokens)
    if copies and saved_store is None:
        raise AdapterInvalid("adapter_config.json field 'modules_to_save': this server cannot hold fully trained "
                             "modules")
    saved = saved_store.hold(digest, copies, layout.saveable, replacing) if copies else SavedModules()
    content = hashlib.sha256(f"{digest}\n{spec.scaling_identity()}".encode()).hexdigest()
    plan = None if header is None or identity is None else _tensor_plan(data, header, spec, layout, ranks)
    size = rank * per_page * element_size + sum(m.weight.nbytes for m in saved.values())
    return AdapterManifest(spec, rank, ranks, size, name, digest, content, identity, spec.use_dora, plan, saved,
                           tokenizer, vocab)


def _check_tokenizer(found, own, vocab: int | None, layout: LoRALayout) -> None:
    """A resized vocabulary needs a tokenizer beside it (``found``; the base model's, for a
    vocabulary padded without new tokens); the adapter's ``own`` one must fit its vocabulary (the
    base model's is served as the base model serves it)."""
    if vocab is not None and found is None:
        raise AdapterInvalid(f"the adapter was trained on a resized vocabulary of {vocab} tokens, and no tokenizer is "
                             "saved beside its weights (tokenizer.json or tokenizer_config.json)")
    rows = vocab or layout.vocab
    if own is not None and rows is not None and len(own) > rows:
        raise AdapterInvalid(f"the adapter's tokenizer has {len(own)} tokens; its vocabulary (the token "
                             f"embedding's rows) has {rows}: tokens past it have no embedding")


def _tensor_plan(data, header: dict[str, dict], spec: AdapterSpec, layout: LoRALayout,
                 ranks: dict[str, int]) -> TensorPlan | None:
    """The plan of a validated file's tensors, or None where a load decodes the file in full:
    DoRA's magnitudes and trainable tokens' rows, A and B of mixed dtypes, or offsets that are
    not a whole number of elements."""
    if spec.use_dora or spec.trainable_tokens:
        return None
    parts, dtypes = {}, set()
    for key, info in header.items():
        m = _KEY.match(key)
        if m is not None:
            parts.setdefault(m["module"], {})[_part(m)] = info["data_offsets"]
            dtypes.add(info["dtype"])
    if len(dtypes) != 1 or parts.keys() != ranks.keys():
        return None
    (dtype,) = dtypes
    size = SAFETENSORS_DTYPES[dtype]
    names = tuple(sorted(ranks, key=layout.modules.__getitem__))  # the manifest's own strings
    offsets = [offset for n in names for part in ("A", "B") for offset in parts[n][part]]
    if any(offset % size for offset in offsets):
        return None
    body = 8 + struct.unpack("<Q", data[:8])[0]
    skip = tuple(sorted((body + start, body + end) for key, info in header.items() if _unread(key)
                        for start, end in [info["data_offsets"]]))
    return TensorPlan(hashlib.sha256(data[:body]).digest(), body, TORCH_DTYPES[dtype], names,
                      array("q", [offset // size for offset in offsets]),
                      array("d", [spec.scaling(n, ranks[n]) for n in names]), skip)


def _decode_planned(adapter_dir: Path, layout: LoRALayout, confine: Path, manifest: AdapterManifest,
                    read_buffer: ReadBuffer | None) -> DecodedAdapter | None:
    """``decode_adapter`` by the manifest's plan, or None where the file is not the one the plan
    describes (another identity, another header): the full decode reads it then, and checks it."""
    plan = manifest.tensors
    with AdapterFile(adapter_dir, manifest.weights_name, confine) as f:
        if f.identity() != manifest.weights_identity:
            return None
        data = f.read_except(plan.skip, read_buffer)  # the size it was opened with: a change shows below
        if len(data) != f.size or f.identity() != manifest.weights_identity:
            return None
    if hashlib.sha256(data[: plan.body]).digest() != plan.header_sha256:
        return None
    size = plan.dtype.itemsize
    flat = torch.frombuffer(data, dtype=plan.dtype, offset=plan.body, count=(len(data) - plan.body) // size)
    a, b, spans, ranks = [], [], plan.spans, manifest.module_ranks
    for i, name in enumerate(plan.names):
        r, a0, a1, b0, b1 = ranks[name], *spans[4 * i : 4 * i + 4]
        a.append(flat.as_strided((r, (a1 - a0) // r), ((a1 - a0) // r, 1), a0))  # A [r, in]
        b.append(flat.as_strided(((b1 - b0) // r, r), (r, 1), b0))  # B [out, r]
    return DecodedAdapter(manifest.spec, max(ranks.values()), [layout.modules[n] for n in plan.names],
                          list(plan.names), a, b, list(plan.scales), [None] * len(a))


TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _decode(data: bytearray | memoryview, header: dict[str, dict]) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (those ``header`` lists) over its bytes, without copying them:
    views at the checked offsets of a little-endian body."""
    body = 8 + struct.unpack("<Q", data[:8])[0]
    buffer = memoryview(data)
    out = {}
    for key, info in header.items():
        start, end = info["data_offsets"]
        dtype = TORCH_DTYPES[info["dtype"]]
        if start == end:
            out[key] = torch.empty(info["shape"], dtype=dtype)
            continue
        out[key] = torch.frombuffer(buffer[body + start : body + end], dtype=dtype).view(info["shape"])
    return out


class AdapterChanged(AdapterInvalid):
    """The files differ from what registration validated: register the adapter again."""


@dataclass
class DecodedAdapter:
    """An adapter read and checked, not yet converted: per module (layer, kind), in ``modules``
    order, A [r, in] and B [out, r] as the file holds them (views of its bytes; trainable tokens'
    LoRA, ``_token_lora``), its scaling, and DoRA's magnitude vector (else None). ``rank``: its
    pages (DoRA's magnitude page included)."""

    spec: AdapterSpec
    rank: int
    modules: list[tuple[int, str]]
    names: list[str]  # each module's full name
    a: list[torch.Tensor]
    b: list[torch.Tensor]
    scales: list[float]
    magnitudes: list[torch.Tensor | None]

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(kind for _, kind in self.modules)

    def nonfinite(self, dtype: torch.dtype) -> AdapterInvalid:
        """The refusal of a conversion that wrote a NaN or Inf: it names the first module whose
        A or s * B, cast to ``dtype``, is not finite."""
        for name, a, b, s in zip(self.names, self.a, self.b, self.scales, strict=True):
            if not (torch.isfinite(a.to(dtype)).all() and torch.isfinite((b.float() * s).to(dtype)).all()):
                return AdapterInvalid(f"module {clip(name)} has NaN or Inf weights once scaled by {s:g} and cast to "
                                      f"{str(dtype).removeprefix('torch.')}")
        return AdapterInvalid(f"the adapter has NaN or Inf weights once cast to {str(dtype).removeprefix('torch.')}")


def decode_adapter(adapter_dir: Path, layout: LoRALayout, max_rank: int, allow_pickle: bool = False,
                   confine: Path | None = None, manifest: AdapterManifest | None = None,
                   read_buffer: ReadBuffer | None = None) -> DecodedAdapter:
    """Read and check an adapter (``load_adapter``'s first half). With the ``manifest`` registration
    made, its spec is used and the weights must have the hash registration recorded (else
    AdapterChanged); without one, the config is read too. ``read_buffer``: where the file's bytes
    go, reused from load to load; the result views it until it is written again."""
    adapter_dir = Path(adapter_dir)
    confine = confine or Path(adapter_dir).resolve()
    if manifest is not None and manifest.tensors is not None:
        planned = _decode_planned(adapter_dir, layout, confine, manifest, read_buffer)
        if planned is not None:
            return planned
    if manifest is None:
        spec, _ = read_adapter_config(adapter_dir, confine, layout.kinds)
        name = _weights_name(adapter_dir, allow_pickle)
    else:
        spec, name = manifest.spec, manifest.weights_name
    header, data, identity = _read_weights(adapter_dir, name, confine, layout, max_rank, read_buffer,
                                           None if manifest is None else manifest.weights_identity)
    unchanged = manifest is not None and identity == manifest.weights_identity
    if manifest is not None and not unchanged and hashlib.sha256(data).hexdigest() != manifest.weights_sha256:
        raise AdapterChanged(f"{name} changed after the adapter was registered; register it again to serve the "
                             "new weights")
    tensors = _decode(data, header) if header is not None else _served(_unpickle(data, name), layout)
    if manifest is not None:  # the bytes registration checked (same identity or same hash): its ranks hold
        ranks = manifest.module_ranks
    else:
        ranks, _ = _modules_from_shapes({k: list(v.shape) for k, v in tensors.items()}, spec, layout, max_rank)
        _check_saved_base(tensors, layout)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is not None:  # else a saved base layer, checked
            by_module.setdefault(m["module"], {})[_part(m)] = t
    _check_dora(spec, layout, ranks)
    tokens = _token_lora(spec, tensors, layout) if spec.trainable_tokens else {}
    by_module.update(tokens)
    names = {layout.modules[m]: m for m in by_module}
    modules = sorted(names)
    parts = [by_module[names[key]] for key in modules]
    return DecodedAdapter(
        spec, max(ranks.values()) + spec.use_dora, modules, [names[key] for key in modules],
        [p["A"].contiguous() for p in parts], [p["B"].contiguous() for p in parts],
        [1.0 if names[key] in tokens else spec.scaling(names[key], ranks[names[key]]) for key in modules],
        [p.get("M") for p in parts])


def load_adapter(adapter_dir: Path, layout: LoRALayout, max_rank: int, dtype: torch.dtype,
                 allow_pickle: bool = False, confine: Path | None = None,
                 manifest: AdapterManifest | None = None, pin_memory: bool = False, convert=None,
                 out: torch.Tensor | None = None, read_buffer: ReadBuffer | None = None) -> LoRAWeights:
    """Read, validate and convert an adapter into padded, scaled host tensors of ``dtype``.

    One pass from the file's bytes into the serving layout: every module's A and (s * B).T are
    written, cast, into one flat buffer (pinned with ``pin_memory``, for copies to an
    accelerator), and one check over that buffer proves every served value finite. ``manifest``
    and ``read_buffer`` as for ``decode_adapter``. ``convert``: the C++ ``convert_adapter``
    (server/ops/cpu_kernel.py), which does that pass in one call and reports finiteness as it
    writes; without it, a few torch ops per module do it (the same values). ``out``: a buffer of
    ``dtype`` to write into (its front), reused from load to load, in place of a new one; the
    result views it until it is written again."""
    return convert_adapter(decode_adapter(adapter_dir, layout, max_rank, allow_pickle, confine, manifest, read_buffer),
                           layout, dtype, pin_memory, convert, out)


def convert_adapter(decoded: DecodedAdapter, layout: LoRALayout, dtype: torch.dtype, pin_memory: bool = False,
                    convert=None, out: torch.Tensor | None = None) -> LoRAWeights:
    """``load_adapter``'s second half: ``decoded`` into the serving layout."""
    rank, modules = decoded.rank, decoded.modules
    numel = flat_numel(modules, rank, layout)
    if out is None:
        flat = torch.empty(numel, dtype=dtype, pin_memory=pin_memory)
    elif out.dtype != dtype or out.dim() != 1 or not out.is_contiguous() or out.numel() < numel:
        raise ValueError(f"out must be a contiguous 1-D {dtype} buffer of at least {numel} values")
    else:
        flat = out[:numel]
    weights = LoRAWeights.over(flat, modules, rank, layout, decoded.spec.use_dora)
    if convert is not None:
        finite = convert(weights.flat, decoded.a, decoded.b,
                         [weights.a[k].storage_offset() - weights.flat.storage_offset() for k in modules],
                         decoded.scales, rank)
    else:
        for key, a, b, s in zip(modules, decoded.a, decoded.b, decoded.scales, strict=True):
            a_dst, b_dst, r = weights.a[key], weights.b[key], a.shape[0]
            a_dst[:r].copy_(a)
            if dtype == torch.float32:  # cast, then scale: the same float32 arithmetic as scaling first
                b_dst[:r].copy_(b.T)
                if s != 1.0:
                    b_dst[:r].mul_(s)
            else:  # scale in float32, round once
                b_dst[:r].copy_(b.T.float() * s)
            if r < rank:
                a_dst[r:].zero_()
                b_dst[r:].zero_()
        finite = weights.nonfinite_module() is None
    if not finite:  # checked as served: the scaling or the cast can overflow
        raise decoded.nonfinite(dtype)
    if decoded.spec.use_dora:
        for key, name, a, b, s, m in zip(modules, decoded.names, decoded.a, decoded.b, decoded.scales,
                                         decoded.magnitudes, strict=True):
            g = dora_scale(m, *layout.dora_base(*key), a, b, s)
            weights.b[key][-1].copy_(g)
            if not torch.isfinite(weights.b[key][-1]).all():
                raise AdapterInvalid(f"module {clip(name)}: DoRA's scale (lora_magnitude_vector over the norm of "
                                     f"each row of W + s B A) is NaN or Inf in {str(dtype).removeprefix('torch.')}")
    return weights


def dora_scale(magnitude: torch.Tensor, weight: torch.Tensor, weight_sq_norms: torch.Tensor, a: torch.Tensor,
               b: torch.Tensor, s: float) -> torch.Tensor:
    """DoRA's factor on each output (PEFT's ``mag_norm_scale``), in float32 on the host:
        g = m / ||W + s B A||_row,   so that DoRA's y = g * (x W^T + s x A^T B^T) + bias.
    magnitude m: [out]; weight W: [out, in], on any device (computed there), and ``weight_sq_norms``
    its rows' ||W_o||^2 [out]; a: [r, in]; b: [out, r]. Row o's squared norm expands to
    ||W_o||^2 + 2 s B_o . (W A^T)_o + s^2 B_o (A A^T) B_o^T: one GEMM over W and no [out, in]
    temporary, about 4x faster than forming W + s B A (the same value to float32 rounding)."""
    w = weight.float()
    a, b = a.to(w.device, torch.float32), b.to(w.device, torch.float32)
    squared = weight_sq_norms + 2 * s * (b * (w @ a.T)).sum(1) + s * s * ((b @ (a @ a.T)) * b).sum(1)
    return (magnitude.to(w.device, torch.float32) / squared.clamp_min(0).sqrt()).cpu()


def row_sq_norms(weight: torch.Tensor) -> torch.Tensor:
    """||W_o||^2 for each row o of W, float32 (``dora_scale``'s ``weight_sq_norms``)."""
    return torch.linalg.vector_norm(weight.float(), dim=1).square()


def combine_weights(parts: list[tuple[LoRAWeights, float]], layout: LoRALayout, dtype: torch.dtype,
                    out: torch.Tensor | None = None, pin_memory: bool = False) -> LoRAWeights:
    """Several adapters as one, their ranks side by side: for every module any of them targets,
    A = [A_1; A_2; ...] and B = [w_1 B_1; w_2 B_2; ...] (B already holds each one's scaling), so
    that B A x = sum_i w_i s_i B_i A_i x exactly, PEFT's add_weighted_adapter with
    combination_type "cat". A part that does not target a module adds zero rows there. ``out`` and
    ``pin_memory`` as for ``load_adapter``."""
    rank = sum(w.rank for w, _ in parts)
    modules = sorted({key for w, _ in parts for key in w.a})
    numel = flat_numel(modules, rank, layout)
    flat = torch.zeros(numel, dtype=dtype, pin_memory=pin_memory) if out is None else out[:numel].zero_()
    combined = LoRAWeights.over(flat, modules, rank, layout)
    at = 0
    for w, weight in parts:
        for key in w.a:
            combined.a[key][at : at + w.rank].copy_(w.a[key])
            combined.b[key][at : at + w.rank].copy_(w.b[key].float() * weight)  # rounded once to dtype
        at += w.rank
    bad = combined.nonfinite_module()
    if bad is not None:
        raise AdapterInvalid(f"the combination's weights overflow {str(dtype).removeprefix('torch.')} in module "
                             f"{bad[1]} of layer {bad[0]}")
    return combined


def combination_manifest(parts: list[tuple[AdapterManifest, float]], layout: LoRALayout,
                         element_size: int) -> AdapterManifest:
    """What registration knows of a combination (``combine_weights``) of registered adapters: its
    rank (the sum of theirs), the modules any of them targets, its size, and a content hash of
    theirs and the weights. Its spec is PEFT's for the combined adapter: r = lora_alpha = the rank
    (scaling 1: each part's scaling and weight are in its rows)."""
    rank = sum(m.rank for m, _ in parts)
    module_ranks = {module: rank for m, _ in parts for module in m.module_ranks}
    targets = tuple(sorted({name for m, _ in parts for name in m.spec.target_names}))
    spec = AdapterSpec(r=rank, lora_alpha=float(rank), target_modules=targets)
    per_page = sum(sum(layout.shapes[layout.modules[module][1]]) for module in module_ranks)
    identity = "\n".join(f"{m.content_hash} {weight!r}" for m, weight in parts)
    content = hashlib.sha256(f"combination\n{identity}".encode()).hexdigest()
    return AdapterManifest(spec, rank, module_ranks, rank * per_page * element_size, "", "", content)
