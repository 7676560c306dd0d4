"""Assemble model, KV cache, adapter tiers and engine from one ServerConfig (no gRPC here)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from ..adapters.config import HEAD
from ..adapters.converted_cache import ConvertedCache
from ..adapters.device_pool import DevicePool
from ..adapters.errors import AdapterError
from ..adapters.host_cache import HostCache
from ..adapters.manager import AdapterManager
from ..adapters.registry import AdapterRegistry
from ..adapters.tokenizers import AdapterTokenizers
from ..clients.runs import row_runs
from .config import ServerConfig, StartupError
from .decode_graphs import DecodeGraphs
from .engine import Engine, adapter_fault_injector, fault_injector
from .kv_cache import PagedKVCache
from .model_loader import LoadedModel, load_model
from .models import serving_model_class
from .ops import cpu_isa
from .ops.attention import select_decode_attention, select_prefill_attention
from .ops.cpu_kernel import load_kernels
from .ops.linear import (
    KERNEL_MAX_ROWS,
    calibration_budget,
    calibration_key,
    calibration_weights,
    faster_rows,
    last_level_cache_bytes,
    select_base_linear,
    time_row_counts,
    timed_rows,
)
from .ops.quantize import select_int8_linear
from .ops.recurrent import kernel_serves
from .preflight import Checked, preflight
from .recurrent_state import RecurrentStates
from .runner import ModelRunner
from .timing_cache import TimingCache
from .torch_threads import IOCoreShare, in_passing_thread, serial_openmp, thread_openmp, usable_cores

log = logging.getLogger(__name__)


@dataclass
class Built:
    engine: Engine
    registry: AdapterRegistry
    manager: AdapterManager
    loaded: LoadedModel
    op_backend: str  # the LoRA ops in use: torch, cpp or triton
    cpu_isa: str  # the CPU's vector ISA as torch dispatches it
    kernel_rows: frozenset[int]  # row counts whose base projections run on the C++ kernel (--base-linear)
    quantization: str = "none"  # the decoder projections' weights (--quantization)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer


CPU_KV_BUDGET_BYTES = 1 << 30  # default KV pool on the CPU: at most 1 GiB ...
CUDA_KV_FRACTION = 0.8  # ... and on CUDA this share of the device memory still free after the model and adapters


def kv_pool_tokens(config: ServerConfig, bytes_per_token: int, device: torch.device, reserved: int = 0) -> int:
    """--kv-cache-tokens, or sized from memory, ``reserved`` bytes (what registrations may take
    later: adapters' fully trained modules) kept out of it. On CUDA, with --gpu-memory-utilization
    F: F of the device's memory less what this process's tensors hold now (the model and the
    adapter pool), refused at start-up when that much is not free (other processes hold it);
    without it CUDA_KV_FRACTION of the memory still free. On the CPU CPU_KV_BUDGET_BYTES, but no
    more than max-batch-size sequences of max-model-len tokens (the most a full batch can hold) and
    no less than one such sequence (--gpu-memory-utilization off CUDA: refused before, by
    refuse_gpu_fraction_off_cuda). A model without attention takes no K/V memory: a full batch's tokens."""
    if config.kv_cache_tokens is not None:
        return config.kv_cache_tokens
    longest = -(-config.max_model_len // config.kv_block_size) * config.kv_block_size  # in whole blocks
    if bytes_per_token == 0:  # no attention layer (Mamba-2): the pool's blocks are bookkeeping alone
        return config.max_batch_size * longest
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        if config.gpu_memory_utilization is None:
            return int(max(0, free - reserved) * CUDA_KV_FRACTION) // bytes_per_token
        held = torch.cuda.memory_allocated(device)
        # memory torch's allocator keeps cached is this process's to reuse, though not free to the device
        available = free + torch.cuda.memory_reserved(device) - held
        share = config.gpu_memory_utilization * total - held
        if share > available:
            raise StartupError(
                f"--gpu-memory-utilization {config.gpu_memory_utilization} asks for {share / 2**30:.1f} GiB more of "
                f"the device's {total / 2**30:.1f} GiB, but {available / 2**30:.1f} GiB is free (other processes "
                "hold the rest): lower it, or free device memory")
        return int(max(0, share - reserved)) // bytes_per_token
    return max(config.max_model_len, min(CPU_KV_BUDGET_BYTES // bytes_per_token, config.max_batch_size * longest))


def register_startup_adapters(registry: AdapterRegistry, startup: list[tuple[str, str | Path]],
                              threads: int | None = None) -> None:
    """Register the start-up adapters (checked by ``startup_adapters``), ``threads`` at a time
    (default: a thread per core, at most 16): each registration reads and hashes its weights (22 MB
    for a rank-16 adapter of a 1B model, all projections: about 20 ms), which releases the GIL, so two
    threads took 1.85x less time than one on a 2-core VM. The first failure in ``startup``'s order
    stops start-up, naming its adapter."""
    threads = max(1, min(threads or min(usable_cores(), 16), len(startup)))
    with ThreadPoolExecutor(threads, thread_name_prefix="register") as pool:
        futures = [pool.submit(registry.register, adapter_id, path, trusted=True) for adapter_id, path in startup]
        for (adapter_id, path), future in zip(startup, futures, strict=True):
            try:
                future.result()
            except (AdapterError, ValueError) as e:
                pool.shutdown(cancel_futures=True)
                raise StartupError(f"adapter {adapter_id!r} ({path}): {e}") from None


def eos_ids(loaded: LoadedModel) -> set[int]:
    ids = set()
    for source in (loaded.hf_model.generation_config, loaded.hf_model.config.get_text_config(), loaded.tokenizer):
        eos = getattr(source, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return ids


def lora_page_dtype(config: ServerConfig, loaded: LoadedModel, ops: str) -> torch.dtype:
    """--lora-dtype: the model's (auto), or float16 / bfloat16 pages under a float32 model on a CPU,
    which the C++ kernel and the torch ops widen to float32 value by value."""
    if config.lora_dtype == "auto":
        return loaded.dtype
    dtype = getattr(torch, config.lora_dtype)
    if dtype != loaded.dtype and (loaded.device.type != "cpu" or loaded.dtype != torch.float32 or ops == "triton"):
        raise StartupError(
            f"--lora-dtype {config.lora_dtype} differs from the model's {str(loaded.dtype).removeprefix('torch.')} on "
            f"{loaded.device} with the {ops} ops: adapter pages in another dtype are served on a CPU under a float32 "
            "model by the cpp or torch ops only; use --lora-dtype auto")
    return dtype


def base_linear_rows(config: ServerConfig, loaded: LoadedModel, kernels, model) -> frozenset[int]:
    """--base-linear: the row counts whose base projections run on the C++ kernel's path: up to the
    most tokens a step takes (--max-tokens-per-step), at most KERNEL_MAX_ROWS."""
    usable = loaded.device.type == "cpu" and loaded.dtype == torch.float32 and kernels is not None
    if config.base_linear == "kernel" and not usable:
        raise StartupError(
            "--base-linear kernel needs a float32 model on a CPU and the C++ kernels (this is "
            f"{str(loaded.dtype).removeprefix('torch.')} on {loaded.device}, kernels "
            f"{'loaded' if kernels is not None else 'not built or not loadable'}); use --base-linear auto or torch")
    if config.base_linear == "torch" or not usable:
        return frozenset()
    max_rows = min(config.max_tokens_per_step, KERNEL_MAX_ROWS)
    if config.base_linear == "kernel":
        return frozenset(range(1, max_rows + 1))
    start = time.perf_counter()
    weights = calibration_weights(model.base_projections(), calibration_budget(last_level_cache_bytes()))
    counts = timed_rows(max_rows)
    cache, key = TimingCache(config.cache_dir / "timings"), calibration_key(kernels, weights, counts)
    timings = kept_timings(cache.get("base-linear", key), counts)
    if timings is not None:
        when = f"on an earlier start ({cache.folder})"
    else:
        timings, when = time_row_counts(kernels, weights, counts), f"in {time.perf_counter() - start:.1f} s"
        cache.put("base-linear", key, {"timings": timings})
    rows = faster_rows(timings)
    log.info("base projections timed at %s rows over %.0f MiB of weights %s: the C++ kernel at %s, "
             "torch's matmul otherwise (kernel/torch time: %s)", row_runs(counts),
             sum(w.numel() * w.element_size() for w, _ in weights) / 2**20, when,
             row_runs(rows) or "none", " ".join(f"{m}:{k / t:.2f}" for m, (t, k) in timings.items()))
    return rows


def kept_timings(value: dict | None, counts: Sequence[int]) -> dict[int, tuple[float, float]] | None:
    """A kept timing of every count in ``counts``, or None (none kept, or not in that form)."""
    try:
        timings = {int(m): (float(t), float(k)) for m, (t, k) in value["timings"].items()}
    except (TypeError, KeyError, ValueError, AttributeError):
        return None
    ok = sorted(timings) == sorted(counts) and all(0 < v < math.inf for tk in timings.values() for v in tk)
    return timings if ok else None


def adapter_io_threads(config: ServerConfig, device: torch.device) -> int:
    """--adapter-io-threads, or its default for ``device``."""
    if config.adapter_io_threads is not None:
        return config.adapter_io_threads
    return 1 if device.type == "cpu" else min(4, max(1, usable_cores() // 4))


def io_openmp(device: torch.device, io_threads: int):
    """Each adapter I/O thread's OpenMP team: on a CPU host its torch ops run serially (the engine
    keeps the only team); on a CUDA host, where the engine runs no parallel CPU ops, the I/O threads
    share the cores (teams of a core each per thread would oversubscribe them io_threads times)."""
    if device.type == "cpu":
        return serial_openmp
    return partial(thread_openmp, max(1, usable_cores() // io_threads))


def use_decode_graphs(config: ServerConfig, device: torch.device, model_class) -> bool:
    """Whether decode steps go through decode_graphs.py: --cuda-graphs auto on a CUDA device, or on."""
    wanted = config.cuda_graphs == "on" or (config.cuda_graphs == "auto" and device.type == "cuda")
    if wanted and not model_class.CUDA_GRAPHS:
        if config.cuda_graphs == "on":
            raise StartupError(f"--cuda-graphs on: {model_class.__name__}'s decode steps cannot be captured "
                               f"({model_class.NO_GRAPHS}); use auto or off")
        log.info("decode CUDA graphs off: %s's decode steps cannot be captured (%s)", model_class.__name__,
                 model_class.NO_GRAPHS)
        return False
    return wanted


def decode_graphs(config: ServerConfig, runner: ModelRunner, zero_page: int) -> DecodeGraphs | None:
    """The runner's static decode path, its graphs captured on CUDA. A capture that fails stops
    start-up under --cuda-graphs on, and leaves decode eager under auto."""
    model = runner.model
    graphs = DecodeGraphs(model, runner.kv, runner.apply_lora, runner.device, runner.groups, zero_page,
                          config.max_batch_size, config.max_lora_rank, config.max_model_len,
                          frozenset({HEAD, model.embedding_kind}))
    if not graphs.capturing:
        return graphs
    try:
        graphs.capture()
    except Exception as e:  # noqa: BLE001 - any capture failure has the same remedy
        if config.cuda_graphs == "on":
            raise StartupError(f"--cuda-graphs on: capturing decode steps failed: {e}") from e
        log.warning("decode CUDA graphs off: capturing decode steps failed (%s); decode runs eagerly", e)
        return None
    return graphs


def recurrent_states(config: ServerConfig, model, loaded: LoadedModel) -> tuple[ServerConfig, RecurrentStates | None]:
    """A hybrid model's recurrent layers get a state for each sequence that can run at once, and
    --max-cached-states more that prefix-cache hits resume from (recurrent_state.py), allocated
    before the KV pool is sized from the memory left; with none cached, such a model is served
    without prefix caching (a cached prefix has no state to resume from). The config as served, and
    the states (None for a model without recurrent layers)."""
    specs = model.state_specs()
    if not specs:
        return config, None
    cached = 0 if not config.prefix_caching else \
        config.max_batch_size if config.max_cached_states is None else config.max_cached_states
    size = RecurrentStates.bytes_for(specs, config.max_batch_size + cached, loaded.dtype)
    try:
        states = RecurrentStates(specs, config.max_batch_size, loaded.dtype, loaded.device, cached)
    except (torch.OutOfMemoryError, MemoryError) as e:
        raise StartupError(f"the recurrent states of --max-batch-size {config.max_batch_size} sequences and "
                           f"--max-cached-states {cached} take {size / 2**30:.2f} GiB, which {loaded.device} cannot hold "
                           f"({e}); lower either") from None
    states.kernel = kernel_serves(config.op_backend, loaded.device)
    log.info("recurrent layers: %d states for each of --max-batch-size %d sequences and --max-cached-states %d, "
             "%.1f MiB in all%s", len(specs), config.max_batch_size, cached, size / 2**20,
             "; prefix caching off (no cached states to resume from)" if config.prefix_caching and not cached else
             f"; a prompt's state also cached every {config.cached_state_interval} tokens (--cached-state-interval)"
             if cached and config.cached_state_interval else "")
    return replace(config, prefix_caching=cached > 0), states


@in_passing_thread
def build_engine(config: ServerConfig, loaded: LoadedModel | None = None, checked: Checked | None = None) -> Built:
    """``checked``: ``preflight``'s findings for this config, where the caller has them (the server
    checks before transformers loads)."""
    checked = checked or preflight(config, loaded.device if loaded else None)
    apply_lora, startup, cache_folder = checked.apply_lora, checked.startup, checked.cache_folder
    loaded = loaded or load_model(config, checked.device)
    hf = loaded.hf_model
    cls = serving_model_class(hf.config.architectures[0] if hf.config.architectures else type(hf).__name__, hf.config)
    limit = cls.position_limit(hf.config)
    if limit is not None and config.max_model_len > limit:
        raise StartupError(f"--max-model-len {config.max_model_len} is more than the {limit} positions this model "
                           "can encode; lower it")
    try:
        model = cls(hf, config.max_model_len, int8=config.quantization == "int8")
    except ValueError as e:  # quantize_int8's refusal of a non-finite weight
        raise StartupError(f"--quantization {config.quantization}: {e}") from None
    if config.quantization == "int8":
        log.info("decoder projections quantized to int8: %.0f MiB of weights and scales (%.0f MiB in %s)",
                 model.projection_bytes() / 2**20, sum(m.weight.numel() for layer in model.layers
                                                       for m in layer.lora_modules()) * loaded.dtype.itemsize / 2**20,
                 str(loaded.dtype).removeprefix("torch."))
    try:
        layout = model.lora_layout(lm_head=config.enable_lm_head_lora, embedding=config.enable_embedding_lora,
                                   saved=config.max_saved_modules > 0)
    except ValueError as e:  # a hybrid whose layer types shape one LoRA kind two ways: not served
        raise StartupError(f"{cls.__name__}: LoRA targets of one name with two shapes are not served: {e}") from None
    if not config.enable_dora:  # a layout without the base weights refuses DoRA adapters, naming the flag
        layout = replace(layout, dora_base=None)
    num_layers, kv_heads, head_dim = model.kv_spec
    kernels = load_kernels()  # its converter and row copy load adapters in one call each (None: torch ops)
    kernel_rows = base_linear_rows(config, loaded, kernels, model)
    # int8 weights take the kernel at every decode count, and at the prefill counts where float32 weights
    # do (a matmul by weights dequantized per call is slower: 0.19-0.51x its time at 64-512 rows on a Zen 5)
    int8_kernels = kernels if config.base_linear != "torch" and loaded.device.type == "cpu" else None
    if config.quantization == "int8" and (int8_kernels is None or loaded.dtype != torch.float32):
        log.warning("--quantization int8 on %s (%s) without the C++ kernel's int8 path (a float32 model on a CPU, "
                    "the kernel built, --base-linear not torch): each projection multiplies by its weights "
                    "dequantized for the call, which saves memory but costs time", loaded.device,
                    str(loaded.dtype).removeprefix("torch."))
    model.use_base_linear(select_base_linear(kernels, kernel_rows), select_int8_linear(int8_kernels, kernel_rows))
    if kernel_rows and apply_lora.name == "cpp":
        apply_lora.use_base_linear(kernels.linear_lora, kernel_rows)  # decode rows' base and LoRA in one call
    page_dtype = lora_page_dtype(config, loaded, apply_lora.name)
    pool = DevicePool(layout, config.device_pages, page_dtype, loaded.device, getattr(kernels, "copy_rows", None),
                      interleave=apply_lora.name == "cpp")
    graphs = use_decode_graphs(config, loaded.device, cls)
    pool.zero_untargeted = graphs  # before any adapter loads: static plans read every kind's pages
    config, states = recurrent_states(config, model, loaded)
    per_token = PagedKVCache.bytes_per_token(num_layers, kv_heads, head_dim, loaded.dtype)
    embedding = model.token_embedding.weight
    saved_bytes = config.max_saved_modules * embedding.numel() * embedding.element_size()  # each as large
    tokens = kv_pool_tokens(config, per_token, loaded.device, saved_bytes)
    if tokens < config.max_model_len:
        raise StartupError(f"the KV pool would hold {tokens} tokens, fewer than --max-model-len {config.max_model_len}; "
                           "free memory, lower --max-model-len or set --kv-cache-tokens"
                           + (" or a higher --gpu-memory-utilization" if config.gpu_memory_utilization else ""))
    kv = PagedKVCache(num_layers, -(-tokens // config.kv_block_size), config.kv_block_size, kv_heads, head_dim,
                      loaded.dtype, loaded.device, select_decode_attention(config.op_backend, loaded.device),
                      select_prefill_attention(config.op_backend, loaded.device))
    kv.states = states
    model.bind_lora_stores(pool.fused_stores)
    element_size = torch.empty(0, dtype=page_dtype).element_size()
    registry = AdapterRegistry(layout, config.max_lora_rank, element_size,
                               tuple(Path(r) for r in config.adapter_roots), config.allow_pickle,
                               config.max_registered_adapters, config.device_pages, config.max_saved_modules,
                               AdapterTokenizers(loaded.tokenizer))
    register_startup_adapters(registry, startup)
    for adapter_id, parts in config.combinations:
        try:
            registry.register_combination(adapter_id, list(parts))
        except (AdapterError, ValueError) as e:
            raise StartupError(f"--combine {adapter_id!r}: {e}") from None
    try:
        converted = ConvertedCache(cache_folder, layout, int(config.adapter_cache_max_gib * 2**30)) \
            if cache_folder else None
    except OSError as e:  # its scan of the folder
        raise StartupError(f"--adapter-cache-dir {cache_folder}: {e.strerror or e}") from None
    io_threads = adapter_io_threads(config, loaded.device)
    manager = AdapterManager(registry, HostCache(config.max_host_adapters), pool, page_dtype,
                             io_initializer=io_openmp(loaded.device, io_threads),
                             read_timeout=config.adapter_read_timeout, converted=converted,
                             convert=getattr(kernels, "convert_adapter", None),
                             convert_to_pages=getattr(kernels, "convert_to_pages", None),
                             io_threads=io_threads)
    if config.inject_fault and config.inject_fault.partition(":")[0] in ("hang-read", "copy-fail"):
        manager.fault_hook = adapter_fault_injector(config.inject_fault, manager.closing)  # before kept reads start
    for adapter_id in config.keep_resident:
        entry = registry.lookup(adapter_id)  # there: startup_adapters checked the id
        entry.keep_resident = True
        try:
            manager.on_register(entry)
        except AdapterError as e:
            raise StartupError(f"--keep-resident {adapter_id!r}: {e}") from None
    share = IOCoreShare.for_this_process() if loaded.device.type == "cpu" else None
    if share is not None:  # the engine's team makes way for each I/O job, checked before every fused linear
        manager.io_span = share.io_job
        for layer in model.layers:
            for fused in layer.lora_modules():
                fused.register_forward_pre_hook(share.check)
    runner = ModelRunner(model, kv, apply_lora, loaded.device, layout)
    if loaded.device.type == "cuda" and hasattr(runner.apply_lora, "warm_up"):
        bounds = {fused.kinds: fused.bounds for layer in model.layers for fused in layer.lora_modules()}
        bounds[(HEAD,)] = model.head_bounds  # LoRA on lm_head, where served
        # compiles now, not mid-step
        runner.apply_lora.warm_up(config.max_lora_rank, pool.fused_stores, loaded.device, bounds)
    if graphs:
        runner.graphs = decode_graphs(config, runner, pool.zero_page)
    try:
        runner.warm_up()
    except Exception as e:  # noqa: BLE001 - a kernel that cannot run here leaves its fallback, loudly
        if kv.prefill_attention is None:
            raise
        log.warning("Triton's prefill attention failed its first step (%s: %s); prefill runs SDPA per chunk",
                    type(e).__name__, e)
        kv.prefill_attention = None
        runner.warm_up()
    engine = Engine(config, runner, loaded.tokenizer, manager, hf.config.get_text_config().vocab_size, eos_ids(loaded))
    if config.inject_fault and manager.fault_hook is None:
        engine.output.fault_hook = fault_injector(config.inject_fault)
    ops_name = runner.apply_lora.name
    if ops_name == "cpp":
        ops_name += f" ({kernels.variant} build)"
    log.info(
        "model %s on %s (%s): KV cache %d blocks x %d tokens = %d tokens, %.0f MiB (prefix caching %s); "
        "adapter pool %.0f MiB of %s (%d pages, one per rank row: %d adapters of rank %d, more of smaller ranks); "
        "%d adapters registered, %d kept resident; LoRA ops %s, CPU ISA %s, subnormal floats %s; speculative decoding %s",
        loaded.name, loaded.device, str(loaded.dtype).removeprefix("torch."), kv.num_blocks, kv.block_size,
        kv.num_blocks * kv.block_size, kv.nbytes / 2**20, "on" if config.prefix_caching else "off",
        sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in pool.stores.values()) / 2**20,
        str(page_dtype).removeprefix("torch."),
        config.device_pages, config.max_device_adapters, config.max_lora_rank, len(registry), manager.num_kept(),
        ops_name, cpu_isa(), "flushed to zero" if config.flush_denormals else "kept",
        f"by prompt lookup, up to {config.num_speculative_tokens} drafts ({config.prompt_lookup_min}- to "
        f"{config.prompt_lookup_max}-grams)" if config.num_speculative_tokens else "off",
    )
    if config.max_saved_modules:
        log.info("fully trained modules (modules_to_save): up to %d copies of the token embedding or lm_head held, "
                 "%.0f MiB in all (on a GPU, kept out of the KV pool's share)", config.max_saved_modules,
                 saved_bytes / 2**20)
    return Built(engine, registry, manager, loaded, runner.apply_lora.name, cpu_isa(), kernel_rows, config.quantization)
