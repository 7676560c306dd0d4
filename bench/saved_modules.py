"""What adapters' fully trained modules (PEFT's ``modules_to_save``, ``--max-saved-modules``) cost
a decode step, side by side in one run.

One engine over the default model serves a batch of base-model rows, then the same batch over K
distinct rank-16 q/v adapters, then over K adapters with the same LoRA and a trained lm_head of
their own, then with a trained token embedding of their own, then with both resized to a vocabulary
of ADDED tokens more and their tokenizer (added tokens); the kinds alternate round by round so
that the machine's drift hits all alike (median of the rounds). A trained lm_head costs a read of
the whole layer a step for each distinct copy in the batch (the base lm_head's bytes, printed with
the floor: their read at this machine's copy speed, measured in the same run); a trained
embedding costs a gather of the batch's rows; added tokens should cost what their two copies do.
The -inf fill a step pays where its rows' vocabularies differ is timed alone.

    python bench/saved_modules.py [--model DIR] [--batch 32] [--distinct 1 4] [--rounds 3]
                                  [--new-tokens 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from loramux.server.builder import build_engine  # noqa: E402
from loramux.server.config import ServerConfig  # noqa: E402
from loramux.server.model_loader import load_model  # noqa: E402
from loramux.server.models import lora_layout  # noqa: E402
from loramux.server.ops import cpu_isa  # noqa: E402

from common import cpu_name, random_prompts, run_batch, write_adapter  # noqa: E402

KINDS = ("base", "lora", "lm_head", "embedding", "added")
ADDED = 4


def with_copy(src: Path, out: Path, key: str, module: str, base: torch.Tensor, seed: int) -> Path:
    """The adapter at ``src`` with a trained copy of ``module`` (the base weight plus noise)."""
    out.mkdir(parents=True)
    tensors = load_file(src / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    tensors[key] = base + 0.01 * torch.randn(base.shape, generator=gen)
    save_file(tensors, out / "adapter_model.safetensors")
    config = json.loads((src / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": [module]}))
    return out


def with_added_tokens(src: Path, out: Path, tokenizer, copies: dict[str, tuple[str, torch.Tensor]], seed: int) -> Path:
    """The adapter at ``src`` with trained copies of ``copies`` (module -> (key, base weight)),
    each ADDED rows longer, and the base tokenizer with ADDED tokens saved beside it."""
    out.mkdir(parents=True)
    tensors = load_file(src / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    for key, base in copies.values():
        tensors[key] = torch.cat([base, base[:ADDED]]) + 0.01 * torch.randn(base.shape[0] + ADDED, base.shape[1],
                                                                             generator=gen)
    save_file(tensors, out / "adapter_model.safetensors")
    config = json.loads((src / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": list(copies)}))
    tokenizer.save_pretrained(out)
    return out


def fill_seconds(rows: int, vocab: int, rounds: int = 20) -> float:
    """The least time of a ragged step's extra work on its logits: a [rows, vocab] -inf fill."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        torch.full((rows, vocab), float("-inf"))
        best = min(best, time.perf_counter() - start)
    return best


def read_seconds(weight: torch.Tensor, rounds: int = 5) -> float:
    """The least time of a full read of ``weight`` (a sum over it), with the engine's threads."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        weight.sum()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--distinct", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    print(f"CPU: {cpu_name()}; torch dispatches {cpu_isa()}; {torch.get_num_threads()} threads")
    k_max, n = max(args.distinct), args.batch
    max_len = args.prompt_len + args.new_tokens + 8
    config = ServerConfig(model=args.model, max_batch_size=n, max_tokens_per_step=max(512, n), max_model_len=max_len,
                          default_max_new_tokens=args.new_tokens, max_lora_rank=16, max_device_adapters=3 * k_max,
                          max_host_adapters=3 * k_max, metrics_port=0, prefix_caching=False,
                          kv_cache_tokens=n * (max_len + 16), max_saved_modules=4 * k_max)
    loaded = load_model(config)
    hf = loaded.hf_model
    vocab = hf.config.vocab_size
    embedding = next(name for name, m in hf.named_modules() if m is hf.get_input_embeddings())
    head = hf.lm_head.weight.detach().float()
    tokenizer = copy.deepcopy(loaded.tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [f"<added{i}>" for i in range(ADDED)]})
    resized = {embedding.rpartition(".")[2]: (f"base_model.model.{embedding}.weight",
                                              hf.get_input_embeddings().weight.detach().float()),
               "lm_head": ("base_model.model.lm_head.weight", head)}
    with tempfile.TemporaryDirectory() as tmp:
        root, layout = Path(tmp), lora_layout(hf.config)
        adapters = []
        for i in range(k_max):
            plain = write_adapter(root / f"lora{i}", layout, 16, seed=i, targets=("q_proj", "v_proj"))
            adapters += [(f"lora{i}", str(plain)),
                         (f"lm_head{i}", str(with_copy(plain, root / f"head{i}", "base_model.model.lm_head.weight",
                                                       "lm_head", head, seed=100 + i))),
                         (f"embedding{i}", str(with_copy(plain, root / f"emb{i}", f"base_model.model.{embedding}.weight",
                                                         embedding.rpartition(".")[2],
                                                         hf.get_input_embeddings().weight.detach().float(),
                                                         seed=200 + i))),
                         (f"added{i}", str(with_added_tokens(plain, root / f"added{i}", tokenizer, resized,
                                                             seed=300 + i)))]
        built = build_engine(ServerConfig(**{**config.__dict__, "adapters": tuple(adapters)}), loaded)
        engine = built.engine
        floor = read_seconds(next(iter(built.registry.lookup("lm_head0").manifest.saved.values())).weight)
        engine.start()
        runs = {(k, kind): [] for k in args.distinct for kind in KINDS}
        try:
            ids = [a for a, _ in adapters]
            run_batch(engine, random_prompts(vocab, n, args.prompt_len), [ids[j % len(ids)] for j in range(n)], 2)
            for r in range(args.rounds):
                prompts = random_prompts(vocab, n, args.prompt_len, seed=r)
                for k in args.distinct:
                    for kind in KINDS:
                        names = [None if kind == "base" else f"{kind}{j % k}" for j in range(n)]
                        runs[(k, kind)].append(run_batch(engine, prompts, names, args.new_tokens).decode_tokens_per_s)
        finally:
            engine.stop()
    step = {key: n / median(v) for key, v in runs.items()}  # seconds a decode step
    rows = []
    print(f"model {loaded.name}: lm_head {head.numel() * 4 / 2**20:.0f} MiB, read once in {floor * 1e3:.1f} ms "
          f"(the floor of one trained lm_head a step)")
    fill = fill_seconds(n, vocab + ADDED)
    print(f"a ragged step's -inf fill of [{n}, {vocab + ADDED}] logits: {fill * 1e3:.2f} ms")
    print(f"decode step ms at batch {n}, median of {args.rounds} alternated rounds:")
    for k in args.distinct:
        row = {"distinct": k, **{f"{kind}_ms": step[(k, kind)] * 1e3 for kind in KINDS}}
        row["lm_head_extra_ms"] = row["lm_head_ms"] - row["lora_ms"]
        row["lm_head_extra_over_floor"] = row["lm_head_extra_ms"] / (k * floor * 1e3)
        row["embedding_extra_ms"] = row["embedding_ms"] - row["lora_ms"]
        row["added_extra_ms"] = row["added_ms"] - row["lora_ms"]
        rows.append(row)
        print(f"  {k} distinct: base {row['base_ms']:.1f}, q/v LoRA {row['lora_ms']:.1f}, + trained lm_head "
              f"{row['lm_head_ms']:.1f} ({row['lm_head_extra_ms']:+.1f} = {row['lm_head_extra_over_floor']:.2f}x "
              f"{k} reads of it), + trained embedding {row['embedding_ms']:.1f} ({row['embedding_extra_ms']:+.1f}), "
              f"added tokens (both, resized) {row['added_ms']:.1f} ({row['added_extra_ms']:+.1f})")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "isa": cpu_isa(), "model": loaded.name, "batch": n,
                                         "lm_head_read_s": floor, "ragged_fill_s": fill, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
