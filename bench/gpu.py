"""GPU benchmark: loramux's kernels against the base model alone and against PEFT's mixed batch.

For each model, built in place with random weights (throughput does not depend on them): one shaped
like the default SmolLM2-135M, and one of about 1B parameters shaped like Llama-3.2-1B, both with
the SmolLM2 tokenizer (``--tokenizer DIR``; default: the one of the locally prepared default model):
- decode throughput at batch 1, 32 and 256: the base model alone; one distinct adapter per request
  through loramux (rank 16 on all seven projections); PEFT's mixed batch (``adapter_names=``) with
  the same number of distinct adapters;
- 1000 registered adapters with Zipf(1.0) popularity against the same requests over 8 adapters,
  128 clients in a closed loop. The device tier holds 128 adapters, one batch's working set (each
  block of 128 consecutive requests names 69 to 81 distinct adapters), and the host tier 256: the
  327 the requests use page through both. (A device tier below a batch's working set holds requests back until
  others finish: with 64 the first H200 run measured 0.44.)
- host synchronisations per decode step, counted by ``torch.cuda.set_sync_debug_mode``.
Decode steps replay CUDA graphs unless ``--cuda-graphs off`` (the report counts those captured);
with graphs, the middle batch size is measured again with decode run eagerly, in the same run.
Targets: mixed/base >= 0.9 at batch 32; loramux/PEFT >= 10 at batch 256; 1000/8 >= 0.9.
PEFT gets one model with all its adapters per base model, reused across batch sizes, and 4 new
tokens per row. Sized for a few minutes per model on one H200; ``--models`` runs one base model per
command. ``--quick`` runs a tiny version anywhere (the CPU smoke test). Imports neither grpc nor the
generated stubs, so it runs on a host without them.

    python bench/gpu.py [--json bench/reports/gpu.json] [--models default,llama-1b] [--tokenizer DIR]
                        [--cuda-graphs auto|on|off] [--quick --model DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from loramux.adapters.synthetic import ALL_PROJ  # noqa: E402
from loramux.server.builder import build_engine  # noqa: E402
from loramux.server.config import ServerConfig  # noqa: E402
from loramux.server.model_loader import load_model, resolve_model_dir  # noqa: E402
from loramux.server.models import lora_layout  # noqa: E402

from common import build_random_llama, random_prompts, run_batch, run_closed_loop, write_adapter, zipf_choices  # noqa: E402

RANK = 16
SHAPES = {
    "default": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0),  # SmolLM2-135M
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),  # Llama-3.2-1B
}
TARGETS = {"mixed/base at batch 32": 0.9, "loramux/PEFT at batch 256": 10.0, "1000/8 adapters": 0.9}


def write_adapters(root: Path, layout, distinct: int, ids: int) -> list[tuple[str, str]]:
    """``ids`` registered adapters whose files cycle over ``distinct`` random ones (symlinks): each id
    is still its own entry, with its own pages, in loramux's caches."""
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(distinct):
        path = root / f"file-{i:03d}"
        if not (path / "adapter_model.safetensors").exists():
            write_adapter(path, layout, RANK, seed=i, dtype=torch.float16)
        files.append(path)
    out = []
    for i in range(ids):
        link = root / f"a{i:04d}"
        if not link.exists():
            link.symlink_to(files[i % distinct].resolve())
        out.append((link.name, str(link)))
    return out


def count_host_syncs(engine, prompts, adapters, new_tokens: int) -> float | None:
    """Host synchronisations per engine step (CUDA only): copying the sampled token ids out should be
    the only one."""
    if engine.runner.device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = run_batch(engine, prompts, adapters, new_tokens)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    return len(syncs) / max(1, result.steps)


class PeftMixed:
    """PEFT's mixed batch (``adapter_names=``): one model with ``count`` adapters, built once per base
    model and reused for every batch size."""

    def __init__(self, model_dir: Path, count: int, device, dtype):
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(ALL_PROJ), init_lora_weights=False)
        self.model = get_peft_model(base, config, adapter_name="a0")
        # The other adapters go straight into the LoRA layers, made on the device: add_adapter rescans
        # every module, and each layer's update_layer walks all its adapters twice (set_adapter, the
        # move to the base layer's device), so 256 adapters took minutes, quadratically. Both walks
        # are skipped while adding, and set_adapter runs once at the end.
        layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        skip = lambda *args, **kwargs: None  # noqa: E731
        for layer in layers:
            layer.set_adapter = layer._move_adapter_to_device_of_base_layer = skip
        try:
            with torch.device(device):
                for i in range(1, count):
                    self.model.peft_config[f"a{i}"] = config
                    for layer in layers:
                        layer.update_layer(f"a{i}", RANK, 2 * RANK, config)
        finally:
            for layer in layers:
                del layer.set_adapter, layer._move_adapter_to_device_of_base_layer
        self.model.base_model.set_adapter("a0")  # float32 adapters, as get_peft_model keeps a0's
        self.model.eval()
        self.vocab, self.device, self.warm = base.config.vocab_size, device, False

    def decode(self, batch: int, prompt_len: int, new_tokens: int) -> float:
        """Decode tokens/s for ``batch`` requests over ``batch`` distinct adapters (a one-token
        generate is subtracted, as prefill)."""
        ids = torch.tensor(random_prompts(self.vocab, batch, prompt_len), device=self.device)
        mask = torch.ones_like(ids)
        names = [f"a{i}" for i in range(batch)]

        def generate(n):
            sync(self.device)
            t = time.perf_counter()
            self.model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=n,
                                min_new_tokens=n, do_sample=False, pad_token_id=0)
            sync(self.device)
            return time.perf_counter() - t

        with torch.no_grad():
            if not self.warm:  # once per model: later batch sizes find the kernels loaded
                generate(2)
                self.warm = True
            prefill = generate(1)
            total = generate(new_tokens)
        return batch * (new_tokens - 1) / max(total - prefill, 1e-9)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def zipf_run(config, loaded, adapters, picks, prompts, new_tokens: int, batch: int) -> float:
    """Closed loop: ``batch`` clients, each sending its next request (naming adapter ``picks[i]``)
    when its last is answered; tokens/s overall."""
    built = build_engine(ServerConfig(**{**config.__dict__, "adapters": tuple(adapters)}), loaded)
    built.engine.start()
    try:
        ids = [adapters[p][0] for p in picks]
        run_batch(built.engine, prompts[:batch], ids[:batch], 2)  # warm-up
        tokens, seconds = run_closed_loop(built.engine, prompts[:len(ids)], ids, new_tokens, batch)
        return tokens / seconds
    finally:
        built.engine.stop()


def base_and_mixed(engine, prompts, ids, new_tokens: int, rounds: int) -> dict:
    """Decode tokens/s of ``prompts`` for the base model and with adapters ``ids``, best of
    ``rounds`` interleaved (so drift hits both alike), after a warm-up that compiles kernels and
    makes the adapters resident."""
    run_batch(engine, prompts, ids, 2)
    base, mixed = [], []
    for _ in range(rounds):
        base.append(run_batch(engine, prompts, [None] * len(prompts), new_tokens).decode_tokens_per_s)
        mixed.append(run_batch(engine, prompts, ids, new_tokens).decode_tokens_per_s)
    return {"base_tok_s": max(base), "mixed_tok_s": max(mixed), "mixed/base": max(mixed) / max(base)}


def eager_rows(config, loaded, adapters, prompts, args, batch: int) -> dict:
    """Base and mixed decode at ``batch`` with --cuda-graphs off (one round each), in the same run."""
    built = build_engine(ServerConfig(**{**config.__dict__, "cuda_graphs": "off",
                                         "adapters": tuple(adapters[:batch])}), loaded)
    built.engine.start()
    try:
        row = {"batch": batch, **base_and_mixed(built.engine, prompts[:batch], [a for a, _ in adapters[:batch]],
                                                args.new_tokens, 1)}
    finally:
        built.engine.stop()
    print(f"  eager (no CUDA graphs) batch {batch}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()), flush=True)
    return row


def bench_model(name: str, model: str | None, args, work: Path) -> dict:
    sizes = args.batch_sizes
    max_batch = max(sizes)
    max_len = args.prompt_len + args.new_tokens + 8
    config = ServerConfig(model=model, device=args.device, max_batch_size=max_batch, cuda_graphs=args.cuda_graphs,
                          max_tokens_per_step=max(2048, max_batch), max_model_len=max_len,
                          kv_cache_tokens=2 * max_batch * max_len,  # not 80% of the GPU: the Zipf runs build more engines
                          default_max_new_tokens=args.new_tokens, max_lora_rank=RANK,
                          max_device_adapters=max(max_batch, args.zipf_capacity),
                          max_host_adapters=max(max_batch, args.zipf_capacity) * 2, metrics_port=0)
    loaded = load_model(config)
    layout = lora_layout(loaded.hf_model.config)
    adapters = write_adapters(work / f"adapters-{name}", layout, args.distinct_files, max(max_batch, args.zipf_adapters))
    vocab = loaded.hf_model.config.vocab_size
    prompts = random_prompts(vocab, max(max_batch, args.zipf_requests), args.prompt_len)
    report = {"model": loaded.name, "device": str(loaded.device), "dtype": str(loaded.dtype), "batches": {}}

    built = build_engine(ServerConfig(**{**config.__dict__, "adapters": tuple(adapters[:max_batch])}), loaded)
    engine = built.engine
    report["op_backend"] = type(engine.runner.apply_lora).__name__
    graphs = engine.runner.graphs
    report["cuda_graphs"] = 0 if graphs is None else len(graphs.graphs)  # captured (0: decode eager)
    peft = PeftMixed(resolve_model_dir(config)[0], max_batch, loaded.device, loaded.dtype)
    engine.start()
    try:
        for batch in sizes:
            row = base_and_mixed(engine, prompts[:batch], [a for a, _ in adapters[:batch]], args.new_tokens,
                                 args.rounds)
            row["peft_mixed_tok_s"] = peft.decode(batch, args.prompt_len, args.peft_new_tokens)
            row["loramux/PEFT"] = row["mixed_tok_s"] / row["peft_mixed_tok_s"]
            report["batches"][str(batch)] = row
            print(f"  {name} batch {batch:4d}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()), flush=True)
        report["host_syncs_per_step"] = count_host_syncs(
            engine, prompts[:sizes[-1]], [a for a, _ in adapters[:sizes[-1]]], 8)
    finally:
        engine.stop()
        del peft
    if graphs is not None:  # the same batch with decode run eagerly, side by side: what the graphs buy
        report["eager"] = eager_rows(config, loaded, adapters, prompts, args, sizes[len(sizes) // 2])

    rng = random.Random(0)
    zipf = zipf_choices(args.zipf_adapters, args.zipf_requests, 1.0, rng)
    zipf_config = ServerConfig(**{**config.__dict__, "max_device_adapters": args.zipf_capacity,
                                  "max_host_adapters": args.zipf_capacity * 2, "max_batch_size": args.zipf_batch})
    many = zipf_run(zipf_config, loaded, adapters[:args.zipf_adapters], zipf, prompts, args.new_tokens, args.zipf_batch)
    few = zipf_run(zipf_config, loaded, adapters[:8], [p % 8 for p in zipf], prompts, args.new_tokens, args.zipf_batch)
    report["zipf"] = {"adapters": args.zipf_adapters, "requests": args.zipf_requests, "batch": args.zipf_batch,
                      "device_capacity": args.zipf_capacity, "host_capacity": 2 * args.zipf_capacity,
                      "distinct_used": len(set(zipf)), "many_tok_s": many, "eight_tok_s": few,
                      "1000/8": many / few}
    print(f"  {name} zipf: {args.zipf_adapters} adapters {many:.1f} tok/s, 8 adapters {few:.1f} tok/s, "
          f"ratio {many / few:.3f}", flush=True)
    del loaded
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return report


def load_tokenizer(folder: Path | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder or resolve_model_dir(ServerConfig())[0])


def device_dtype(name: str) -> tuple[torch.device, torch.dtype]:
    from loramux.server.model_loader import resolve_dtype
    from loramux.server.preflight import resolve_device

    device = resolve_device(name)
    return device, resolve_dtype("auto", device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="default,llama-1b", help="comma-separated: default, llama-1b")
    ap.add_argument("--model", default=None, help="with --quick: the model folder to use instead of both")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="a tokenizer folder for the built models (default: the prepared default model's)")
    ap.add_argument("--cuda-graphs", default="auto", choices=("auto", "on", "off"),
                    help="the server's flag: decode steps replayed from CUDA graphs (auto: on CUDA)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script end to end, anywhere")
    ap.add_argument("--work", type=Path, default=None, help="where models and adapter files are written")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "gpu.json")
    args = ap.parse_args()
    quick = args.quick
    args.batch_sizes = (1, 4) if quick else (1, 32, 256)
    args.rounds, args.prompt_len = (1, 8) if quick else (2, 64)
    args.new_tokens, args.peft_new_tokens = (4, 3) if quick else (64, 4)
    args.distinct_files = 4 if quick else 32
    args.zipf_adapters, args.zipf_requests, args.zipf_batch, args.zipf_capacity = (
        (16, 8, 4, 8) if quick else (1000, 1024, 128, 128))

    work = args.work or Path(tempfile.mkdtemp(prefix="loramux-gpu-bench-"))
    started = time.perf_counter()
    report = {"quick": quick, "torch": torch.__version__, "targets": TARGETS, "models": {}}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name()
    if args.model:
        models = [("model", args.model)]
    else:
        models = [(m, None) for m in args.models.split(",")]
    for name, path in models:
        if path is None:
            if name not in SHAPES:
                raise SystemExit(f"unknown model {name!r}; choose from {sorted(SHAPES)}")
            path = str(build_random_llama(work / name, SHAPES[name], load_tokenizer(args.tokenizer), *device_dtype(args.device)))
        print(f"{name}:", flush=True)
        report["models"][name] = bench_model(name, path, args, work)
    report["wall_s"] = time.perf_counter() - started
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"report: {args.json} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
