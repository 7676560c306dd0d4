"""``loramux``: serve, prepare-model, and the client commands. argv -> one ServerConfig."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import threading
from pathlib import Path

from .config import (
    BASE_LINEARS,
    CONTENT_FORMATS,
    CUDA_GRAPHS,
    DTYPES,
    OP_BACKENDS,
    QUANTIZATIONS,
    REASONING_PARSERS,
    SCHEDULING,
    TOOL_CALL_PARSERS,
    ServerConfig,
    StartupError,
    default_cache_dir,
)


class JsonFormatter(logging.Formatter):
    def format(self, record):
        out = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class CallEndedFirst(logging.Filter):
    """gRPC logs an answer it could not send because the call had ended first (the client cancelled,
    or its deadline passed, just as the answer was ready) as an error with a traceback. That race is
    the client's doing and nothing was lost on the server: one INFO line says so."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and type(record.exc_info[1]).__name__ == "ExecuteBatchError":
            record.msg, record.args = "%s: the call ended before its answer was sent (the client cancelled, or its " \
                                      "deadline passed)", (record.getMessage(),)
            record.levelno, record.levelname, record.exc_info, record.exc_text = logging.INFO, "INFO", None, None
        return True


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    grpc_core = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, CallEndedFirst) for f in grpc_core.filters):
        grpc_core.addFilter(CallEndedFirst())


def _adapter_pair(text: str) -> tuple[str, str]:
    adapter_id, sep, path = text.partition("=")
    if not sep or not adapter_id or not path:
        raise argparse.ArgumentTypeError(f"expected ID=PATH, got {text!r}")
    return adapter_id, path


def _combination(text: str) -> tuple[str, tuple[tuple[str, float], ...]]:
    """ID=PART:WEIGHT,PART:WEIGHT,... -> (id, ((part, weight), ...))."""
    adapter_id, sep, parts = text.partition("=")
    try:
        if not sep or not adapter_id or not parts:
            raise ValueError
        return adapter_id, tuple((part, float(weight)) for part, _, weight in
                                 (item.rpartition(":") for item in parts.split(",")) if part or weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ID=ADAPTER:WEIGHT,ADAPTER:WEIGHT,..., got {text!r}") from None


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    d = ServerConfig.__dataclass_fields__
    p.add_argument("--model", default=None, help="HF model folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                   help="where converted models, and the start-up timings of --base-linear auto, are kept")
    p.add_argument("--host", default=d["host"].default)
    p.add_argument("--port", type=int, default=d["port"].default,
                   help="the gRPC port; 0: one the system picks, named in the log")
    p.add_argument("--http-port", type=int, default=d["http_port"].default,
                   help="the OpenAI-compatible HTTP API (also /health and /metrics); 0 turns it off")
    p.add_argument("--http-host", default=None, help="HTTP address (default: --host)")
    p.add_argument("--max-http-body-bytes", type=int, default=d["max_http_body_bytes"].default,
                   help="HTTP request bodies over this are refused (413) before parsing")
    p.add_argument("--responses-store-bytes", type=int, default=d["responses_store_bytes"].default,
                   help="memory for the Responses API's kept responses (previous_response_id, GET and DELETE "
                        "/v1/responses/{id}), least recently used dropped first; 0 keeps none")
    p.add_argument("--http-keep-alive-timeout", type=float, default=d["http_keep_alive_timeout"].default,
                   help="seconds an idle HTTP keep-alive connection is held open; keep it above the clients' and "
                        "proxies' own idle timeouts")
    p.add_argument("--served-model-name", default=None,
                   help="the base model's name in both APIs (OpenAI's model field; default: the model's own)")
    p.add_argument("--metrics-host", default=d["metrics_host"].default)
    p.add_argument("--metrics-port", type=int, default=d["metrics_port"].default, help="0 disables /metrics")
    p.add_argument("--metrics-top-adapters", type=int, default=d["metrics_top_adapters"].default,
                   help="adapters with their own metrics label; the rest are counted as adapter=\"other\"")
    p.add_argument("--device", default=d["device"].default, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=d["dtype"].default, choices=DTYPES)
    p.add_argument("--lora-dtype", default=d["lora_dtype"].default, choices=DTYPES,
                   help="adapter pages' dtype (auto: the model's). On a CPU, float16 or bfloat16 pages under a "
                        "float32 model halve the adapter bytes each step reads; each value is widened exactly, so "
                        "an adapter stored in that dtype computes as in float32 when its scaling is a power of two")
    p.add_argument("--tool-call-parser", default=None, choices=TOOL_CALL_PARSERS,
                   help="the model's tool-call format (vLLM's name), which serves OpenAI chat requests with "
                        "tool_choice \"auto\" (the default with tools): hermes = <tool_call>{JSON}</tool_call> "
                        "(Hermes, Qwen2.5); llama3_json = JSON objects as the whole answer (Llama 3.1/3.2); "
                        "pythonic = [f(x=1), ...] (Llama 3.2/4); mistral = [TOOL_CALLS] then a JSON list (v7) or "
                        "name[ARGS]{JSON} (v11 on); openai = gpt-oss's harmony calls (with --reasoning-parser "
                        "openai_gptoss)")
    p.add_argument("--reasoning-parser", default=None, choices=REASONING_PARSERS,
                   help="a reasoning model's format (vLLM's name): chat and Responses replies carry its "
                        "<think>...</think> apart from the answer (message.reasoning_content, a reasoning item), "
                        "tool calls are read from the answer, and structured outputs constrain the answer only. "
                        "deepseek_r1: the output thinks first unless the prompt closed the block; qwen3: it thinks "
                        "when it starts with <think> (or the prompt opened the block); openai_gptoss: gpt-oss's "
                        "harmony messages, the analysis channel the thinking and the final channel the answer")
    p.add_argument("--structured-output-in-reasoning", action="store_true",
                   help="with --reasoning-parser: structured outputs constrain the thinking too (vLLM's "
                        "enable_in_reasoning)")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="accept a chat template sent with a request (chat_template), as vLLM's flag: it runs in "
                        "transformers' sandboxed Jinja, but a hostile one can still spend a worker's CPU. Without "
                        "it such requests are refused")
    p.add_argument("--chat-template-content-format", default=d["chat_template_content_format"].default,
                   choices=CONTENT_FORMATS,
                   help="a chat message's content as the chat template reads it (vLLM's flag): string, or openai "
                        "(a list of typed parts, [{\"type\": \"text\", \"text\": ...}], as vision-language "
                        "models' templates read it); auto: openai where the template loops over a message's content "
                        "and never tests it for a string")
    p.add_argument("--op-backend", default=d["op_backend"].default, choices=OP_BACKENDS,
                   help="LoRA kernels: auto = Triton on CUDA when installed, the C++ kernel on CPU when it builds, "
                        "else torch")
    p.add_argument("--cuda-graphs", default=d["cuda_graphs"].default, choices=CUDA_GRAPHS,
                   help="decode steps replayed from CUDA graphs captured at start-up, one per padded batch size "
                        "(up to --max-batch-size) with and without adapters, so a step costs a few launches "
                        "instead of hundreds. auto = on CUDA devices (a capture that fails is logged and decode "
                        "runs eagerly); on = required (a failed capture stops start-up; on a CPU it runs the "
                        "same padded static path without capture, which is how tests check it); off = eager")
    p.add_argument("--base-linear", default=d["base_linear"].default, choices=BASE_LINEARS,
                   help="the base model's projections (decode steps, drafting rows, prefill steps of up to "
                        "--max-tokens-per-step tokens, at most 8192) on a CPU with a float32 model: the C++ kernel "
                        "or torch's matmul. auto = whichever ran faster at each row count when timed on the "
                        "model's weights at start-up (a few seconds); kernel = the C++ kernel at every count; "
                        "torch = torch's matmul always")
    p.add_argument("--no-flush-denormals", dest="flush_denormals", action="store_false",
                   help="keep subnormal floats (below 1.2e-38 in float32) in the engine's CPU ops instead of "
                        "flushing them to zero: IEEE arithmetic to the last bit, at up to twice the time in the "
                        "prefill of recurrent layers, whose decays make them (x86 takes a slow assist per value)")
    p.add_argument("--quantization", default=d["quantization"].default, choices=QUANTIZATIONS,
                   help="int8: the decoder's projections (attention and MLP) kept as int8 weights with one scale "
                        "per output row, a quarter of float32's bytes, so decode steps of few rows read less; "
                        "lm_head, the embedding and adapters keep the model's dtype, activations too. Outputs "
                        "differ from the unquantized model's (the weights are rounded). none: as loaded")
    for name, help_text in (
        ("max_batch_size", "sequences in one step (reserves no memory: the KV pool is --kv-cache-tokens)"),
        ("max_tokens_per_step", "token budget of one step; long prompts are prefilled in chunks"),
        ("max_adapters_per_step", "cap on distinct adapters in one step (default: none; free device pages bound it)"),
        ("max_lora_rank", "largest adapter rank accepted"),
        ("max_device_adapters", "sizes the device adapter pool: this many adapters of max-lora-rank, more of "
                                "smaller ranks (one page per rank row)"),
        ("max_host_adapters", "adapters cached in host memory"),
        ("max_model_len", "prompt + new tokens per request"),
        ("max_input_tokens", "longest prompt accepted (default: max-model-len - 1)"),
        ("max_total_tokens", "prompt + max_new_tokens accepted (default: max-model-len)"),
        ("kv_block_size", "tokens per KV cache block"),
        ("max_cached_states", "models with recurrent layers (hybrids, Mamba): their states kept at prompts' and "
                              "answers' block boundaries, from which prefix-cache hits resume, each as large as a "
                              "running sequence's (default: max-batch-size; 0: no prefix caching for such a model)"),
        ("cached_state_interval", "models with recurrent layers: a prompt's prefill also caches its state every this "
                                  "many tokens (a multiple of kv-block-size), so that a later prompt parting from it "
                                  "anywhere resumes at most this far back (default 0: only where prompts part or end)"),
        ("default_max_new_tokens", "max_new_tokens when a request leaves it unset (shrunk to the room its prompt leaves)"),
        ("max_new_tokens_limit", "largest max_new_tokens a request may ask for"),
        ("max_queued_requests", "requests accepted (queued + running) before RESOURCE_EXHAUSTED"),
        ("max_choices_per_request", "OpenAI API: completions one request may ask for (n, or best_of, times its prompts)"),
        ("max_stop_sequences", "stop strings per request"),
        ("max_stop_length", "characters per stop string"),
        ("max_stop_token_ids", "stop token ids per request"),
        ("max_prompt_bytes", "UTF-8 bytes of a prompt, and of all chat messages together, checked before tokenizing"),
        ("max_chat_messages", "chat messages per request"),
        ("max_registered_adapters", "adapters registered at once (RESOURCE_EXHAUSTED past it)"),
        ("max_concurrent_rpcs", "RPCs served at once (default: max-queued-requests + 64)"),
        ("work_threads", "threads that tokenize prompts and register adapters, off the event loop"),
    ):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=d[name].default, help=help_text)
    for name, help_text in (
        ("work_timeout", "seconds tokenizing one prompt or registering one adapter may take"),
        ("adapter_read_timeout", "seconds a disk read of an adapter may take before its requests fail"),
        ("stream_stall_timeout", "seconds a client may leave streamed events unread before it is cancelled"),
    ):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=d[name].default, help=help_text)
    p.add_argument("--adapter-io-threads", type=int, default=None,
                   help="threads that read, convert and copy adapters at once (default: 1 on a CPU, whose "
                        "cores the engine needs; on CUDA a quarter of the cores, 1 to 4)")
    p.add_argument("--target-step-ms", type=float, default=None,
                   help="also size each step's prompt tokens so that the step is predicted, from the measured "
                        "times of recent steps, to take about this long (default: off, --max-tokens-per-step "
                        "alone). Bounds the gap between tokens, and the wait behind the step in flight, on any "
                        "machine, at the price of prefilling new prompts over more steps; a prompt still gets at "
                        "least 16 tokens a step")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV pool capacity in tokens (default: 80%% of free device memory after the model on CUDA, "
                        "or what --gpu-memory-utilization leaves; on the CPU min(1 GiB of KV, max-batch-size x "
                        "max-model-len tokens))")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="CUDA: the share (0 to 1] of the device's memory this server may hold; the KV pool takes "
                        "what the model and the adapter pool leave of it, and start-up fails if that much is not "
                        "free. For servers sharing a GPU (default: 80%% of the memory free after the model, "
                        "whatever the device's size)")
    p.add_argument("--scheduling", default=d["scheduling"].default, choices=SCHEDULING,
                   help="admission order: fair (the adapter with the least service received first, weighted "
                        "tokens; arrival order within an adapter), fifo (arrival order) or priority (each "
                        "request's priority, lower first, then arrival; a request may preempt running ones of "
                        "a lower priority; vLLM's)")
    p.add_argument("--num-speculative-tokens", type=int, default=d["num_speculative_tokens"].default,
                   help="speculative decoding by prompt lookup: up to this many draft tokens a decoding request "
                        "takes from its own prompt and output (what followed the last occurrence of its last "
                        "tokens), checked in one pass; the tokens are those of plain decoding, for every sampler "
                        "(0: off)")
    p.add_argument("--prompt-lookup-max", type=int, default=d["prompt_lookup_max"].default,
                   help="longest n-gram of a request's last tokens looked up for drafts")
    p.add_argument("--prompt-lookup-min", type=int, default=d["prompt_lookup_min"].default,
                   help="shortest n-gram looked up for drafts")
    p.add_argument("--speculative-disable-by-batch-size", type=int, default=None, metavar="N",
                   help="no drafts in a step with N or more running requests, where a full batch makes the extra "
                        "positions cost more than they save (default: drafts at every batch size)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="turn off prefix caching (reuse of KV blocks between requests with the same weights)")
    p.add_argument("--adapter", action="append", type=_adapter_pair, default=[], metavar="ID=PATH",
                   help="register an adapter at start-up (repeatable)")
    p.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                   help="register each subdirectory of DIR under its name, hidden ones and lost+found "
                   "passed over (repeatable)")
    p.add_argument("--combine", action="append", type=_combination, default=[], metavar="ID=A:W,B:W",
                   help="register ID at start-up as the weighted sum of start-up adapters A, B, ... (repeatable; "
                        "their ranks side by side, at most --max-lora-rank together)")
    p.add_argument("--keep-resident", action="append", default=[], metavar="ID",
                   help="keep this start-up adapter in device memory, never evicted (repeatable; the kept ones "
                        "must leave pages for one adapter of --max-lora-rank)")
    p.add_argument("--adapter-cache-dir", default=None, metavar="DIR",
                   help="keep each adapter converted to the serving layout here (a folder the server owns), so "
                        "reloads read it instead of converting the PEFT file again")
    p.add_argument("--adapter-cache-max-gib", type=float, default=d["adapter_cache_max_gib"].default,
                   help="bound of --adapter-cache-dir in GiB: past it the least recently used files are removed")
    p.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                   help="runtime registration must resolve inside one of these (repeatable)")
    p.add_argument("--allow-runtime-adapters", action="store_true",
                   help="enable RegisterAdapter/UnregisterAdapter (also enabled by --admin-token)")
    p.add_argument("--dynamic-adapters", action="store_true",
                   help="a request naming an unregistered adapter id registers ADAPTER_ROOT/ID on first use")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept adapter_model.bin, read with torch.load(weights_only=True)")
    p.add_argument("--enable-dora", action="store_true",
                   help="serve DoRA adapters (PEFT's use_dora), exactly as PEFT computes them; their loads cost "
                        "about 5x a LoRA load's and skip --adapter-cache-dir. Without it they are refused")
    p.add_argument("--enable-lm-head-lora", action="store_true",
                   help="serve adapters with LoRA on the output projection (target lm_head); every adapter page "
                        "grows by hidden + vocab values. Without it they are refused")
    p.add_argument("--enable-embedding-lora", action="store_true",
                   help="serve adapters with LoRA on the token embedding (target embed_tokens, wte or "
                        "word_embeddings) or with trainable tokens (trainable_token_indices); every adapter page "
                        "grows by vocab + hidden values. Without it they are refused")
    p.add_argument("--max-saved-modules", type=int, default=0,
                   help="serve adapters with fully trained copies of the token embedding or lm_head (PEFT's "
                        "modules_to_save), holding at most this many copies at once, each the size of the base "
                        "layer; registration past it is refused. 0 (the default): such adapters are refused")
    p.add_argument("--auth-token", default=os.environ.get("LORAMUX_AUTH_TOKEN"),
                   help="require 'authorization: Bearer TOKEN' on LoraMux RPCs (env LORAMUX_AUTH_TOKEN)")
    p.add_argument("--admin-token", default=os.environ.get("LORAMUX_ADMIN_TOKEN"),
                   help="require this token on RegisterAdapter/UnregisterAdapter (env LORAMUX_ADMIN_TOKEN)")
    p.add_argument("--insecure-admin", action="store_true",
                   help="allow --allow-runtime-adapters without --admin-token on a non-loopback host")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve gRPC and /metrics over TLS")
    p.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    p.add_argument("--tls-client-ca", default=None, help="PEM CA: require client certificates it signed (mTLS)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds running requests get on SIGTERM")
    p.add_argument("--inject-fault", default=None, help=argparse.SUPPRESS)  # tests only
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-format", default="text", choices=("text", "json"))


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Every serve flag whose dest names a ServerConfig field becomes that field."""
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(adapters=tuple(args.adapter), adapter_dirs=tuple(args.adapter_dir),
                  adapter_roots=tuple(args.adapter_root), keep_resident=tuple(args.keep_resident),
                  combinations=tuple(args.combine))
    return ServerConfig(**values)


def build_parser() -> argparse.ArgumentParser:
    from ..clients.cli import add_client_commands

    parser = argparse.ArgumentParser(prog="loramux", description="Multi-adapter LoRA inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC server")
    add_serve_arguments(serve)
    prep = sub.add_parser("prepare-model", help="convert the embedded default model to safetensors once")
    prep.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    train = sub.add_parser("train", help="train a LoRA adapter with peft (base model frozen)")
    train.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    train.add_argument("--data", type=Path, required=True, help="JSONL of prompt/completion, messages or text")
    train.add_argument("--out", type=Path, required=True, help="where the PEFT adapter is written")
    train.add_argument("--rank", type=int, default=8)
    train.add_argument("--alpha", type=float, default=16.0)
    train.add_argument("--dropout", type=float, default=0.05)
    train.add_argument("--dora", action="store_true", help="train a DoRA adapter (PEFT's use_dora)")
    train.add_argument("--targets", default="", help="comma-separated module names (PEFT's target_modules); "
                       "default: the model's attention projections (q_proj,k_proj,v_proj,o_proj on a Llama)")
    train.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs over the data)")
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--lr", type=float, default=2e-4)
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--max-length", type=int, default=256, help="longest example in tokens")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--checkpoint-every", type=int, default=50, help="steps between resumable checkpoints")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    train.add_argument("--add-token", action="append", default=[], metavar="TOKEN",
                       help="add TOKEN to the tokenizer (repeatable): the embedding and lm_head then train whole "
                            "(modules_to_save) and the tokenizer is saved with the adapter")
    train.add_argument("--add-special-token", action="append", default=[], metavar="TOKEN",
                       help="as --add-token, as a special token (a chat format's marker)")
    train.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    merge = sub.add_parser("merge", help="merge an adapter into a full model folder")
    merge.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    merge.add_argument("--adapter", type=Path, required=True)
    merge.add_argument("--out", type=Path, required=True)
    merge.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    add_client_commands(sub)
    return parser


def _model_dir(args) -> Path:
    from .model_loader import resolve_model_dir

    return resolve_model_dir(ServerConfig(model=args.model, cache_dir=args.cache_dir))[0]


def cmd_train(args) -> int:
    from ..adapters.train import DataError, TrainConfig, train

    cfg = TrainConfig(
        model_dir=_model_dir(args), data=args.data, out=args.out, rank=args.rank, alpha=args.alpha,
        dropout=args.dropout, dora=args.dora, targets=tuple(t for t in args.targets.split(",") if t), steps=args.steps,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
        checkpoint_every=args.checkpoint_every, resume=args.resume, add_tokens=tuple(args.add_token),
        add_special_tokens=tuple(args.add_special_token),
    )
    try:
        summary = train(cfg)
    except DataError as e:
        print(f"loramux train: {e}", file=sys.stderr)
        return 2
    print(f"trained {summary['steps']} steps on {summary['examples']} examples in {summary['seconds']:.0f} s: "
          f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}; adapter in {args.out}")
    return 0


def cmd_merge(args) -> int:
    from ..adapters.errors import AdapterError
    from .merge import merge

    try:
        out = merge(_model_dir(args), args.adapter, args.out)
    except AdapterError as e:
        print(f"loramux merge: {e}", file=sys.stderr)
        return 2
    print(f"merged {args.adapter} into {out}")
    return 0


def cmd_prepare_model(args) -> int:
    from .model_loader import resolve_model_dir

    path, name = resolve_model_dir(ServerConfig(cache_dir=args.cache_dir))
    print(f"{name} ready at {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            config = config_from_args(args)
        except ValueError as e:
            print(f"loramux serve: {e}", file=sys.stderr)
            return 2
        setup_logging(config.log_level, config.log_format)
        from .app import exit_process, serve

        code = serve(config)
        # The server has stopped. Its threads' last jobs finish as at any exit (a converted adapter
        # being written, say); the interpreter's teardown after that is skipped (a rolling restart
        # would wait on it for nothing).
        for thread in threading.enumerate():
            if not thread.daemon and thread is not threading.current_thread():
                thread.join()
        exit_process(code)
    if args.command in ("train", "merge", "prepare-model"):
        setup_logging("INFO", "text")
        try:
            return {"train": cmd_train, "merge": cmd_merge, "prepare-model": cmd_prepare_model}[args.command](args)
        except StartupError as e:  # a --model that is not there, the default model's package missing
            print(f"loramux {args.command}: {e}", file=sys.stderr)
            return 2
    from ..clients.cli import run_client_command

    return run_client_command(args)


if __name__ == "__main__":
    sys.exit(main())
