"""One validated, frozen configuration. The CLI builds it; nothing below reads argv or env."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from pathlib import Path

DTYPES = ("auto", "float16", "bfloat16", "float32")
LOG_FORMATS = ("text", "json")
OP_BACKENDS = ("auto", "torch", "cpp", "triton")  # server.ops.BACKENDS, kept import-free here
SCHEDULING = ("fair", "fifo", "priority")
BASE_LINEARS = ("auto", "kernel", "torch")
CUDA_GRAPHS = ("auto", "on", "off")  # decode steps replayed from CUDA graphs (decode_graphs.py)
QUANTIZATIONS = ("none", "int8")  # the decoder projections' weights (ops/quantize.py)
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "pythonic", "mistral", "openai")  # tool_parsers.PARSERS' names, kept import-free here
REASONING_PARSERS = ("deepseek_r1", "qwen3", "openai_gptoss")  # reasoning.PARSERS' names
CONTENT_FORMATS = ("auto", "string", "openai")  # a chat message's content as the template reads it (prompts.py)
MAX_SPECULATIVE_TOKENS = 16  # drafts a row verifies in one step; more is rarely kept, and costs the batch


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "loramux"


def _may_share(host: str, other: str) -> bool:
    """Whether listeners on these two hosts collide on one port: the same host, or a wildcard."""
    return host == other or not {host.strip("[]"), other.strip("[]")}.isdisjoint({"", "0.0.0.0", "::"})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name other than localhost may resolve anywhere
        return False


class StartupError(ValueError):
    """A setting that only the loaded model or the environment shows to be wrong."""


@dataclass(frozen=True)
class ServerConfig:
    model: str | None = None  # HF model folder, or a .gguf file; None: the embedded SmolLM2-135M-Instruct
    cache_dir: Path = field(default_factory=default_cache_dir)  # the converted default model, start-up timings
    host: str = "127.0.0.1"
    port: int = 50051
    http_host: str | None = None  # None: the gRPC host
    http_port: int = 8000  # the OpenAI-compatible HTTP API; 0: off (FastAPI and uvicorn are not imported)
    max_http_body_bytes: int = 8 << 20  # HTTP request bodies are refused (413) past this, before parsing
    # the Responses API's kept responses (previous_response_id, GET/DELETE /v1/responses/{id}); 0: none
    responses_store_bytes: int = 64 << 20
    # longer than clients' and proxies' own idle limits (httpx 5 s, load balancers 60 s), so that they, not the
    # server, close an idle connection: a close racing a request on it loses that request
    http_keep_alive_timeout: float = 75.0
    served_model_name: str | None = None  # the base model's name in both APIs; None: the loaded model's
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9400  # 0: no metrics endpoint
    metrics_top_adapters: int = 20  # adapters with their own label; the rest count as adapter="other"
    device: str = "auto"  # auto: CUDA when present, else CPU
    dtype: str = "auto"  # auto: bfloat16 on CUDA where supported (else float16), float32 on CPU
    lora_dtype: str = "auto"  # adapter pages' dtype; auto: the model's. CPU: float16/bfloat16 halve the bytes read
    max_batch_size: int = 32
    max_tokens_per_step: int = 512  # prefill chunking: a step never runs more tokens than this
    max_adapters_per_step: int | None = None  # None: bounded only by free device adapter pages
    # a step's prompt tokens also sized so that the step is predicted to take this long (step_budget.py)
    target_step_ms: float | None = None
    max_lora_rank: int = 64
    max_device_adapters: int = 16
    max_host_adapters: int = 64
    max_model_len: int = 1024  # prompt + output of one request
    max_input_tokens: int | None = None  # None: max_model_len - 1
    max_total_tokens: int | None = None  # prompt + max_new_tokens; None: max_model_len
    kv_block_size: int = 16  # tokens per KV block
    kv_cache_tokens: int | None = None  # KV pool capacity; None: sized from memory (see kv_pool_tokens)
    # CUDA: the share of the device's memory this server's tensors may reach, the KV pool taking what the
    # model and adapters leave (vLLM's flag); None: CUDA_KV_FRACTION of the memory still free after them
    gpu_memory_utilization: float | None = None
    prefix_caching: bool = True
    # a recurrent model's states copied at prompts' block boundaries, from which prefix-cache hits resume
    # (recurrent_state.py); None: max_batch_size of them; 0: no prefix caching for such a model
    max_cached_states: int | None = None
    # such a model's prefill also caches its state every this many tokens (a multiple of kv_block_size):
    # a later prompt that parts from it anywhere resumes at most this far back; 0: only where prefixes end
    cached_state_interval: int = 0
    # speculative decoding by prompt lookup: draft tokens a decoding row proposes from its own text per step
    num_speculative_tokens: int = 0  # 0: off
    prompt_lookup_max: int = 4  # longest suffix n-gram matched against the row's earlier tokens
    prompt_lookup_min: int = 2  # shortest
    speculative_disable_by_batch_size: int | None = None  # no drafts in a step with this many running requests
    scheduling: str = "fair"  # admission order: fair (least service per adapter first), fifo or priority
    default_max_new_tokens: int = 256
    max_new_tokens_limit: int = 1024
    max_queued_requests: int = 1024
    max_choices_per_request: int = 128  # OpenAI API: n (or best_of) times the prompts of one request
    max_stop_sequences: int = 8
    max_stop_length: int = 64
    max_stop_token_ids: int = 64
    max_prompt_bytes: int = 1 << 20  # UTF-8 bytes of a prompt, and of all chat messages together
    max_chat_messages: int = 256
    max_registered_adapters: int = 4096  # keeps ListAdapters far below gRPC's 4 MiB message limit
    max_concurrent_rpcs: int | None = None  # None: max_queued_requests + 64 (room for health and admin calls)
    work_threads: int = 4  # tokenizing, chat templates and registrations run here, off the event loop
    work_timeout: float = 30.0  # seconds one such job may take before its call fails
    adapter_read_timeout: float = 30.0  # seconds a disk read of an adapter may take
    # threads reading and converting adapters at once; None: 1 on a CPU (the engine needs the cores),
    # on CUDA a quarter of the cores, 1 to 4 (first loads of many adapters outpace one thread there)
    adapter_io_threads: int | None = None
    stream_stall_timeout: float = 60.0  # seconds a client may leave events unread before it is cancelled
    adapters: tuple[tuple[str, str], ...] = ()  # (id, path) registered at start-up
    adapter_dirs: tuple[str, ...] = ()  # each subdirectory registers under its own name
    combinations: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = ()  # (id, ((adapter, weight), ...))
    keep_resident: tuple[str, ...] = ()  # start-up adapter ids never evicted from the device
    adapter_cache_dir: str | None = None  # converted adapters kept here between loads; None: none kept
    adapter_cache_max_gib: float = 10.0  # that folder's bound; least recently used files go past it
    adapter_roots: tuple[str, ...] = ()  # runtime registration must resolve inside one of these
    allow_runtime_adapters: bool = False  # RegisterAdapter/UnregisterAdapter (also enabled by admin_token)
    dynamic_adapters: bool = False  # a request for an unregistered id registers ADAPTER_ROOT/ID on first use
    allow_pickle: bool = False  # accept adapter_model.bin, read with torch.load(weights_only=True)
    enable_dora: bool = False  # serve DoRA adapters (use_dora); without it they are refused, naming the flag
    # serve LoRA on lm_head: every adapter page grows by hidden + vocab values; without it such adapters are refused
    enable_lm_head_lora: bool = False
    # serve LoRA on the token embedding: every adapter page grows by vocab + hidden values
    enable_embedding_lora: bool = False
    # fully trained copies of the token embedding or lm_head (modules_to_save) held at once; 0: refused
    max_saved_modules: int = 0
    auth_token: str | None = None  # required as "authorization: Bearer <token>" on LoraMux RPCs
    admin_token: str | None = None  # required on RegisterAdapter/UnregisterAdapter instead
    insecure_admin: bool = False  # allow runtime registration without an admin token on a non-loopback host
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # mutual TLS: client certificates signed by this CA are required
    drain_timeout: float = 30.0  # seconds running requests get after SIGTERM
    inject_fault: str | None = None  # testing hook: request:, fatal:, fatal-busy:<request id>; hang-read:, copy-fail:<adapter id>
    op_backend: str = "auto"  # LoRA ops: auto (Triton on CUDA, the C++ kernel on CPU), torch, cpp, triton
    # auto: on CUDA devices; on: also on a CPU, the same static-buffer path run without capture (tests)
    cuda_graphs: str = "auto"
    # the engine thread's float ops (and its OpenMP team's) flush subnormal numbers to zero (torch_threads.py)
    flush_denormals: bool = True
    base_linear: str = "auto"  # base projections of 1-8192 rows (CPU, float32): auto (timed at start-up), kernel, torch
    quantization: str = "none"  # int8: the decoder projections' weights as int8 rows with a scale each
    tool_call_parser: str | None = None  # the model's tool-call format, for tool_choice "auto" (HTTP chat)
    reasoning_parser: str | None = None  # a reasoning model's <think> block, split from the answer (reasoning.py)
    structured_output_in_reasoning: bool = False  # with reasoning_parser: structured outputs constrain the thinking too
    trust_request_chat_template: bool = False  # a request may bring its own chat template (vLLM's flag)
    # a message's content as the chat template reads it: a string, or OpenAI's list of typed parts
    # (vision-language models' templates); auto: by what the template does with it (prompts.py)
    chat_template_content_format: str = "auto"
    log_level: str = "INFO"
    log_format: str = "text"

    def __post_init__(self):
        def positive(name):
            if not getattr(self, name) > 0:  # NaN too
                raise ValueError(f"{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")

        for name in ("metrics_top_adapters", "max_batch_size", "max_tokens_per_step", "max_lora_rank", "max_device_adapters",
                     "max_host_adapters", "max_model_len", "default_max_new_tokens", "max_new_tokens_limit",
                     "max_queued_requests", "max_choices_per_request", "max_stop_token_ids", "max_prompt_bytes",
                     "max_chat_messages", "max_registered_adapters", "work_threads", "work_timeout",
                     "adapter_read_timeout", "stream_stall_timeout", "max_http_body_bytes", "http_keep_alive_timeout",
                     "kv_block_size", "adapter_cache_max_gib"):
            positive(name)
        if self.adapter_io_threads is not None and self.adapter_io_threads < 1:
            raise ValueError(f"adapter-io-threads must be >= 1, got {self.adapter_io_threads}")
        if self.max_cached_states is not None and self.max_cached_states < 0:
            raise ValueError(f"max-cached-states must be >= 0, got {self.max_cached_states}")
        if self.cached_state_interval < 0 or self.cached_state_interval % self.kv_block_size:
            raise ValueError(f"cached-state-interval must be 0 or a positive multiple of kv-block-size "
                             f"({self.kv_block_size}): a state is cached where a block ends; got {self.cached_state_interval}")
        if self.max_saved_modules < 0:
            raise ValueError(f"max-saved-modules must be >= 0, got {self.max_saved_modules}")
        if self.responses_store_bytes < 0:
            raise ValueError(f"responses-store-bytes must be >= 0, got {self.responses_store_bytes}")
        if not math.isfinite(self.adapter_cache_max_gib):
            raise ValueError(f"adapter-cache-max-gib must be finite, got {self.adapter_cache_max_gib}")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs <= self.max_queued_requests:
            raise ValueError(f"max-concurrent-rpcs ({self.max_concurrent_rpcs}) must be > max-queued-requests "
                             f"({self.max_queued_requests}), or health checks are refused on a full queue")
        for name, env in (("auth_token", "LORAMUX_AUTH_TOKEN"), ("admin_token", "LORAMUX_ADMIN_TOKEN")):
            if getattr(self, name) == "":  # an empty token must never mean "auth off"
                raise ValueError(f"{name.replace('_', '-')} is empty (check --{name.replace('_', '-')} and {env}); "
                                 "leave it unset to turn it off")
        if self.allow_runtime_adapters and self.admin_token is None and not is_loopback(self.host) \
                and not self.insecure_admin:
            raise ValueError(f"--allow-runtime-adapters on {self.host}, which is not a loopback address, needs "
                             "--admin-token (or an explicit --insecure-admin)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.lora_dtype not in DTYPES:
            raise ValueError(f"lora-dtype must be one of {DTYPES}, got {self.lora_dtype!r}")
        if self.scheduling not in SCHEDULING:
            raise ValueError(f"scheduling must be one of {SCHEDULING}, got {self.scheduling!r}")
        if self.op_backend not in OP_BACKENDS:
            raise ValueError(f"op-backend must be one of {OP_BACKENDS}, got {self.op_backend!r}")
        if self.cuda_graphs not in CUDA_GRAPHS:
            raise ValueError(f"cuda-graphs must be one of {CUDA_GRAPHS}, got {self.cuda_graphs!r}")
        if self.base_linear not in BASE_LINEARS:
            raise ValueError(f"base-linear must be one of {BASE_LINEARS}, got {self.base_linear!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool-call-parser must be one of {TOOL_CALL_PARSERS}, got {self.tool_call_parser!r}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning-parser must be one of {REASONING_PARSERS}, got {self.reasoning_parser!r}")
        if self.tool_call_parser == "openai" and self.reasoning_parser != "openai_gptoss":
            raise ValueError("tool-call-parser openai reads gpt-oss's harmony calls, which needs "
                             "--reasoning-parser openai_gptoss")
        if self.structured_output_in_reasoning and self.reasoning_parser is None:
            raise ValueError("structured-output-in-reasoning needs --reasoning-parser")
        if self.chat_template_content_format not in CONTENT_FORMATS:
            raise ValueError(f"chat-template-content-format must be one of {CONTENT_FORMATS}, "
                             f"got {self.chat_template_content_format!r}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log-format must be one of {LOG_FORMATS}, got {self.log_format!r}")
        if self.max_host_adapters < self.max_device_adapters:
            raise ValueError(
                f"max-host-adapters ({self.max_host_adapters}) must be >= max-device-adapters ({self.max_device_adapters})"
            )
        if self.max_tokens_per_step < self.max_batch_size:
            raise ValueError(
                f"max-tokens-per-step ({self.max_tokens_per_step}) must be >= max-batch-size ({self.max_batch_size}) "
                "so that every running sequence decodes each step"
            )
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.max_model_len:
            raise ValueError(f"kv-cache-tokens ({self.kv_cache_tokens}) must be >= max-model-len ({self.max_model_len}): "
                             "one request of the longest length must fit the KV pool")
        if self.gpu_memory_utilization is not None:
            if not 0 < self.gpu_memory_utilization <= 1:
                raise ValueError(f"gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
            if self.kv_cache_tokens is not None:
                raise ValueError("set kv-cache-tokens or gpu-memory-utilization, not both: each sizes the KV pool")
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("default-max-new-tokens must be <= max-new-tokens-limit")
        if self.default_max_new_tokens >= self.max_model_len:
            raise ValueError(
                f"default-max-new-tokens ({self.default_max_new_tokens}) must be < max-model-len ({self.max_model_len}), "
                "or every request that leaves max_new_tokens unset is refused"
            )
        if not 0 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num-speculative-tokens must be in [0, {MAX_SPECULATIVE_TOKENS}], "
                             f"got {self.num_speculative_tokens}")
        if self.speculative_disable_by_batch_size is not None and self.speculative_disable_by_batch_size < 1:
            raise ValueError(f"speculative-disable-by-batch-size must be >= 1, got {self.speculative_disable_by_batch_size}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt-lookup-min ({self.prompt_lookup_min}) <= prompt-lookup-max "
                             f"({self.prompt_lookup_max})")
        if self.target_step_ms is not None and not (0 < self.target_step_ms < math.inf):
            raise ValueError(f"target-step-ms must be a finite number > 0, got {self.target_step_ms}")
        if self.max_adapters_per_step is not None and self.max_adapters_per_step < 1:
            raise ValueError("max-adapters-per-step must be >= 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls-cert and tls-key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls-client-ca needs tls-cert and tls-key")
        if self.max_input_tokens is not None and not 0 < self.max_input_tokens < self.max_model_len:
            raise ValueError(f"max-input-tokens must be in [1, max-model-len ({self.max_model_len}))")
        if self.max_total_tokens is not None and not 1 < self.max_total_tokens <= self.max_model_len:
            raise ValueError(f"max-total-tokens must be in [2, max-model-len ({self.max_model_len})]")
        fault_kinds = ("request", "fatal", "fatal-busy", "hang-read", "copy-fail")
        if self.inject_fault is not None and self.inject_fault.partition(":")[0] not in fault_kinds:
            raise ValueError(f"inject-fault must be KIND:<id> with KIND one of {fault_kinds}")
        if self.dynamic_adapters and not self.adapter_roots:
            raise ValueError("--dynamic-adapters needs at least one --adapter-root to find adapters in")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError("served-model-name is empty")
        listeners = (("port", self.port, self.host), ("http-port", self.http_port, self.http_bind_host),
                     ("metrics-port", self.metrics_port, self.metrics_host))
        for i, (name, port, host) in enumerate(listeners):
            if not 0 <= port < 65536:
                raise ValueError(f"{name} must be in [0, 65535]")
            for other, other_port, other_host in listeners[:i]:  # refused now, not after the model has loaded
                if port and port == other_port and _may_share(host, other_host):
                    raise ValueError(f"--{name} and --{other} are both {port}: each listener needs a port of its own")

    @property
    def input_token_limit(self) -> int:
        return self.max_input_tokens or self.max_model_len - 1

    @property
    def total_token_limit(self) -> int:
        return self.max_total_tokens or self.max_model_len

    @property
    def http_bind_host(self) -> str:
        return self.http_host or self.host

    @property
    def concurrent_rpc_limit(self) -> int:
        return self.max_concurrent_rpcs or self.max_queued_requests + 64

    @property
    def runtime_adapters_enabled(self) -> bool:
        return self.allow_runtime_adapters or self.admin_token is not None

    @property
    def device_pages(self) -> int:
        """Device page budget: room for max_device_adapters adapters of max_lora_rank, and for more
        of smaller ranks (one page per rank row)."""
        return self.max_device_adapters * self.max_lora_rank
