"""PEFT safetensors -> :class:`LoRAWeights` in host memory, checked against the base model.

Files are read into memory whole and validated before use: a memory-mapped read of a file that
is truncated later would kill the process with SIGBUS.
"""

from __future__ import annotations

import io
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes

from .config import AdapterSpec, read_adapter_config
from .errors import AdapterInvalid

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
MAX_HEADER_BYTES = 100 * 1024 * 1024
SAFETENSORS_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


@dataclass(frozen=True)
class LoRALayout:
    """What the base model offers to LoRA: full module name -> (layer index, module kind), and
    the (in_features, out_features) of each kind."""

    modules: dict[str, tuple[int, str]]
    shapes: dict[str, tuple[int, int]]
    num_layers: int

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.shapes)


@dataclass(frozen=True)
class AdapterManifest:
    """What registration learns from the config and the safetensors header, without the weights."""

    spec: AdapterSpec
    rank: int  # pages the adapter needs: the largest rank over its modules
    module_ranks: dict[str, int]  # full module name -> rank
    size_bytes: int  # of the padded host copy in the serving dtype's element size


@dataclass(frozen=True)
class LoRAWeights:
    """One adapter in host memory, padded to ``rank`` rows per module with the scaling folded in.

    ``a[(layer, kind)]``: [rank, in]; ``b[(layer, kind)]``: [rank, out] = (s * B).T.
    Modules the adapter does not target are absent.
    """

    rank: int
    a: dict[tuple[int, str], torch.Tensor]
    b: dict[tuple[int, str], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))

    def pin_memory(self) -> LoRAWeights:
        return LoRAWeights(
            self.rank,
            {k: v.pin_memory() for k, v in self.a.items()},
            {k: v.pin_memory() for k, v in self.b.items()},
        )


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
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = 1
            for d in shape:
                numel *= int(d)
        except (KeyError, TypeError, ValueError):
            raise AdapterInvalid(f"{source}: tensor {name!r} has a malformed header entry") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise AdapterInvalid(f"{source}: tensor {name!r} has dtype {dtype}; expected one of F32, F16, BF16")
        if not (0 <= start <= end <= body) or end - start != numel * SAFETENSORS_DTYPES[dtype]:
            raise AdapterInvalid(
                f"{source}: tensor {name!r} has bad data offsets [{start}, {end}) for {body} data bytes"
            )
    return header


def _read_file(path: Path, limit: int = -1) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except FileNotFoundError:
        raise AdapterInvalid(f"{path.name} is missing from the adapter directory") from None
    except OSError as e:
        raise AdapterInvalid(f"cannot read {path.name}: {e.strerror}") from None


def _header_only(path: Path) -> dict[str, dict]:
    head = _read_file(path, 8)
    header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
    prefix = _read_file(path, 8 + min(header_len, MAX_HEADER_BYTES))
    return read_safetensors_header(prefix, path.stat().st_size, path.name)


def _modules_from_shapes(
    shapes: dict[str, list[int]], spec: AdapterSpec, layout: LoRALayout, max_rank: int
) -> dict[str, int]:
    """Check tensor names and shapes against the base model; return module -> rank."""
    found: dict[str, dict[str, list[int]]] = {}
    for key, shape in shapes.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterInvalid(f"unexpected tensor {key!r}: only lora_A/lora_B weights are supported")
        found.setdefault(m["module"], {})[m["ab"]] = list(shape)
    if not found:
        raise AdapterInvalid("the adapter holds no LoRA weights")
    unmatched = spec.unmatched_targets(layout.modules)
    if unmatched:
        raise AdapterInvalid(
            f"adapter_config.json field 'target_modules': {unmatched[0]!r} matches no supported module of this "
            f"model; supported: {sorted(layout.kinds)}"
        )
    ranks = {}
    for module, ab in sorted(found.items()):
        if module not in layout.modules:
            raise AdapterInvalid(f"module {module!r} is not a supported LoRA target of this model; "
                                 f"supported kinds: {sorted(layout.kinds)}")
        if set(ab) != {"A", "B"}:
            raise AdapterInvalid(f"module {module!r} has lora_{'A' if 'A' in ab else 'B'} but not its pair")
        _, kind = layout.modules[module]
        in_f, out_f = layout.shapes[kind]
        (ra, ia), (ob, rb) = ab["A"], ab["B"]
        if ia != in_f or ob != out_f or ra != rb:
            raise AdapterInvalid(
                f"module {module!r}: lora_A {ab['A']} and lora_B {ab['B']} do not fit the base model's "
                f"{kind} ({in_f} -> {out_f})"
            )
        if ra > max_rank:
            raise AdapterInvalid(f"module {module!r} has rank {ra}; the server's --max-lora-rank is {max_rank}")
        ranks[module] = ra
    return ranks


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Only with --allow-pickle, and even then weights_only: no code runs while unpickling."""
    data = _read_file(path)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any refusal of the unpickler is the adapter's fault
        raise AdapterInvalid(f"{path.name} cannot be read safely: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterInvalid(f"{path.name} must hold a dict of tensors")
    return state


def _weights_file(adapter_dir: Path, allow_pickle: bool) -> Path:
    path = adapter_dir / WEIGHTS_NAME
    if path.exists():
        return path
    pickled = adapter_dir / PICKLE_WEIGHTS_NAME
    if pickled.exists():
        if allow_pickle:
            return pickled
        raise AdapterInvalid(f"{PICKLE_WEIGHTS_NAME} is pickle-based and refused (start the server with "
                             f"--allow-pickle to accept it); convert it to {WEIGHTS_NAME}")
    raise AdapterInvalid(f"{WEIGHTS_NAME} is missing from the adapter directory")


def inspect_adapter(adapter_dir: Path, layout: LoRALayout, max_rank: int, element_size: int,
                    allow_pickle: bool = False) -> AdapterManifest:
    """Validate config and safetensors header; the weights themselves are not read (a pickle file,
    accepted only with ``allow_pickle``, has no header and is read with weights_only)."""
    adapter_dir = Path(adapter_dir)
    spec = read_adapter_config(adapter_dir)
    path = _weights_file(adapter_dir, allow_pickle)
    if path.name == PICKLE_WEIGHTS_NAME:
        shapes = {k: list(v.shape) for k, v in _read_pickle(path).items()}
    else:
        shapes = {k: v["shape"] for k, v in _header_only(path).items()}
    ranks = _modules_from_shapes(shapes, spec, layout, max_rank)
    rank = max(ranks.values())
    per_page = sum(sum(layout.shapes[layout.modules[m][1]]) for m in ranks)
    return AdapterManifest(spec, rank, ranks, rank * per_page * element_size)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.name == PICKLE_WEIGHTS_NAME:
        return _read_pickle(path)
    data = _read_file(path)
    read_safetensors_header(data, len(data))
    try:
        return load_safetensors_bytes(data)
    except Exception as e:  # safetensors raises its own error types
        raise AdapterInvalid(f"{WEIGHTS_NAME} cannot be decoded: {e}") from None


def load_adapter(adapter_dir: Path, layout: LoRALayout, max_rank: int, dtype: torch.dtype,
                 allow_pickle: bool = False) -> LoRAWeights:
    """Read, validate and convert an adapter into padded, scaled host tensors of ``dtype``."""
    adapter_dir = Path(adapter_dir)
    spec = read_adapter_config(adapter_dir)
    tensors = _read_tensors(_weights_file(adapter_dir, allow_pickle))
    ranks = _modules_from_shapes({k: list(v.shape) for k, v in tensors.items()}, spec, layout, max_rank)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        by_module.setdefault(m["module"], {})[m["ab"]] = t
    rank = max(ranks.values())
    a_out, b_out = {}, {}
    for module, ab in by_module.items():
        a, b = ab["A"].float(), ab["B"].float()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterInvalid(f"module {module!r} has NaN or Inf weights")
        r = ranks[module]
        layer, kind = layout.modules[module]
        a_pad = a.new_zeros(rank, a.shape[1])
        a_pad[:r] = a
        b_pad = b.new_zeros(rank, b.shape[0])
        b_pad[:r] = (b * spec.scaling(module, r)).T
        a_out[(layer, kind)] = a_pad.to(dtype)
        b_out[(layer, kind)] = b_pad.to(dtype)
    return LoRAWeights(rank, a_out, b_out)
