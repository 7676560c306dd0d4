"""Assemble model, KV cache, adapter tiers and engine from one ServerConfig (no gRPC here)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters.device_pool import DevicePool
from ..adapters.errors import AdapterError
from ..adapters.host_cache import HostCache
from ..adapters.manager import AdapterManager
from ..adapters.registry import AdapterRegistry
from .config import ServerConfig, StartupError
from .engine import Engine, adapter_fault_injector, fault_injector
from .kv_cache import SlotKVCache
from .model_loader import LoadedModel, load_model
from .models import serving_model_class
from .ops import select_backend
from .runner import ModelRunner
from .torch_threads import in_passing_thread, serial_openmp

log = logging.getLogger(__name__)


@dataclass
class Built:
    engine: Engine
    registry: AdapterRegistry
    manager: AdapterManager
    loaded: LoadedModel

    @property
    def tokenizer(self):
        return self.loaded.tokenizer


def eos_ids(loaded: LoadedModel) -> set[int]:
    ids = set()
    for source in (loaded.hf_model.generation_config, loaded.hf_model.config, loaded.tokenizer):
        eos = getattr(source, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return ids


@in_passing_thread
def build_engine(config: ServerConfig, loaded: LoadedModel | None = None) -> Built:
    loaded = loaded or load_model(config)
    hf = loaded.hf_model
    cls = serving_model_class(hf.config.architectures[0] if hf.config.architectures else type(hf).__name__)
    limit = cls.position_limit(hf.config)
    if limit is not None and config.max_model_len > limit:
        raise StartupError(f"--max-model-len {config.max_model_len} is more than the {limit} positions this model "
                           "can encode; lower it")
    model = cls(hf, config.max_model_len)
    layout = model.lora_layout()
    num_layers, kv_heads, head_dim = model.kv_spec
    kv = SlotKVCache(num_layers, config.max_batch_size, kv_heads, config.max_model_len, head_dim,
                     loaded.dtype, loaded.device)
    pool = DevicePool(layout, config.device_pages, config.max_device_adapters, loaded.dtype, loaded.device)
    model.bind_lora_stores(pool.stores)
    element_size = torch.empty(0, dtype=loaded.dtype).element_size()
    registry = AdapterRegistry(layout, config.max_lora_rank, element_size,
                               tuple(Path(r) for r in config.adapter_roots), config.allow_pickle,
                               config.max_registered_adapters)
    startup = [*config.adapters, *((sub.name, sub) for folder in config.adapter_dirs
                                   for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir()))]
    for adapter_id, path in startup:
        try:
            registry.register(adapter_id, path, trusted=True)
        except (AdapterError, ValueError) as e:
            raise StartupError(f"adapter {adapter_id!r} ({path}): {e}") from None
    # On a CPU host the I/O thread's torch ops run serially, so the engine keeps the only OpenMP team;
    # on a CUDA host the engine runs no parallel CPU ops, and the I/O thread needs its threads.
    manager = AdapterManager(registry, HostCache(config.max_host_adapters), pool, loaded.dtype,
                             io_initializer=serial_openmp if loaded.device.type == "cpu" else None,
                             read_timeout=config.adapter_read_timeout)
    runner = ModelRunner(model, kv, select_backend(config.op_backend, loaded.device), loaded.device)
    if loaded.device.type == "cuda" and hasattr(runner.apply_lora, "warm_up"):
        runner.apply_lora.warm_up(config.max_lora_rank, pool.stores, loaded.device)  # compiles now, not mid-step
    engine = Engine(config, runner, loaded.tokenizer, manager, hf.config.vocab_size, eos_ids(loaded))
    if config.inject_fault and config.inject_fault.partition(":")[0] in ("hang-read", "copy-fail"):
        manager.fault_hook = adapter_fault_injector(config.inject_fault, manager.closing)
    elif config.inject_fault:
        engine.fault_hook = fault_injector(config.inject_fault)
    log.info(
        "model %s on %s (%s): KV cache %.0f MiB for %d slots x %d tokens; adapter pool %.0f MiB "
        "(%d pages: %d adapters of rank <= %d); %d adapters registered",
        loaded.name, loaded.device, str(loaded.dtype).removeprefix("torch."), kv.nbytes / 2**20,
        config.max_batch_size, config.max_model_len,
        sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in pool.stores.values()) / 2**20,
        config.device_pages, config.max_device_adapters, config.max_lora_rank, len(registry),
    )
    return Built(engine, registry, manager, loaded)
