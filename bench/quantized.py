"""int8 base weights (``--quantization int8``) beside float32, side by side in one run.

Two engines over the same loaded model, one with the decoder's projections in int8: at each batch
size, base-model requests and requests over as many distinct rank-16 all-projection adapters,
decode tokens/s per engine, the rounds alternating between them so that the machine's drift hits
both alike (median of the rounds); and prefill tokens/s of a batch of long prompts (steps of
hundreds of rows: the kernel's int8 tiles where `--base-linear auto` gives the float32 weights the
kernel at that count, else int8 weights dequantized for each call). The engines'
projection bytes are printed too (lm_head and the
embedding stay float32 in both), and what the rounding costs: the model's perplexity on a fixed
text (this repository's README) with the float32 and the dequantized int8 weights, and how often
their next-token argmax agrees there.

    python bench/quantized.py [--model DIR] [--batches 1 8 32] [--rounds 3] [--new-tokens 32]
                              [--prefill 8x256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).parent))
from loramux.adapters.synthetic import ALL_PROJ  # noqa: E402
from loramux.server.builder import build_engine  # noqa: E402
from loramux.server.config import ServerConfig  # noqa: E402
from loramux.server.model_loader import load_model  # noqa: E402
from loramux.server.models import lora_layout, serving_model_class  # noqa: E402
from loramux.server.ops import cpu_isa  # noqa: E402
from loramux.server.ops.quantize import dequantize_int8, quantize_int8  # noqa: E402

from common import cpu_name, random_prompts, run_batch, write_adapter  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent / "README.md"


@torch.no_grad()
def rounding_cost(hf_model, tokenizer, tokens: int) -> dict:
    """Perplexity of TEXT's first ``tokens`` tokens with the float32 projections, then with the
    int8 ones dequantized into the same HF model (restored after), and their argmax agreement."""
    ids = torch.tensor([tokenizer(TEXT.read_text())["input_ids"][:tokens]])

    def score():
        logits = hf_model(ids).logits[0, :-1].float()
        return float(torch.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:]))), logits.argmax(-1)

    ppl, top = score()
    targets = serving_model_class(hf_model.config.architectures[0]).lora_targets(hf_model.config)
    saved = {}
    for template, _, _ in targets.values():
        for i in range(hf_model.config.num_hidden_layers):
            module = hf_model.get_submodule(template.format(i=i))
            saved[module] = module.weight.detach().clone()
            module.weight.copy_(dequantize_int8(*quantize_int8(module.weight), module.weight.dtype))
    try:
        ppl_q, top_q = score()
    finally:
        for module, w in saved.items():
            module.weight.copy_(w)
    return {"tokens": int(ids.shape[1]), "perplexity_float32": ppl, "perplexity_int8": ppl_q,
            "argmax_agreement": float((top == top_q).float().mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prefill", default="8x256", help="prompts x tokens of the prefill comparison")
    ap.add_argument("--text-tokens", type=int, default=1024, help="README tokens the perplexity is taken over")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    print(f"CPU: {cpu_name()}; torch dispatches {cpu_isa()}; {torch.get_num_threads()} threads")
    n = max(args.batches)
    prefill_n, prefill_len = map(int, args.prefill.split("x"))
    max_len = max(args.prompt_len + args.new_tokens, prefill_len + 1) + 8
    config = ServerConfig(model=args.model, max_batch_size=max(n, prefill_n), max_tokens_per_step=max(512, n),
                          max_model_len=max_len, default_max_new_tokens=args.new_tokens, max_lora_rank=args.rank,
                          max_device_adapters=n, max_host_adapters=n, metrics_port=0, prefix_caching=False,
                          kv_cache_tokens=max(n, prefill_n) * (max_len + 16))
    loaded = load_model(config)
    vocab = loaded.hf_model.config.vocab_size
    with tempfile.TemporaryDirectory() as tmp:
        layout = lora_layout(loaded.hf_model.config)
        adapters = tuple((f"a{i}", str(write_adapter(Path(tmp) / f"a{i}", layout, args.rank, seed=i,
                                                     targets=ALL_PROJ))) for i in range(n))
        engines = {q: build_engine(ServerConfig(**{**config.__dict__, "adapters": adapters, "quantization": q}), loaded)
                   for q in ("none", "int8")}
        sizes = {q: b.engine.runner.model.projection_bytes() for q, b in engines.items()}
        cost = rounding_cost(loaded.hf_model, loaded.tokenizer, args.text_tokens)
        for built in engines.values():
            built.engine.start()
        ids = [a for a, _ in adapters]
        runs = {(q, b, kind): [] for q in engines for b in args.batches for kind in ("base", "mixed")}
        prefills = {q: [] for q in engines}
        try:
            for built in engines.values():  # first touch of pages and weights
                run_batch(built.engine, random_prompts(vocab, n, args.prompt_len), ids, 2)
            for r in range(args.rounds):
                for b in args.batches:
                    prompts = random_prompts(vocab, b, args.prompt_len, seed=r)
                    for kind, names in (("base", [None] * b), ("mixed", ids[:b])):
                        for q, built in engines.items():
                            runs[(q, b, kind)].append(run_batch(built.engine, prompts, names, args.new_tokens))
                long_prompts = random_prompts(vocab, prefill_n, prefill_len, seed=100 + r)
                for q, built in engines.items():
                    prefills[q].append(run_batch(built.engine, long_prompts, [None] * prefill_n, 1).prefill_tokens_per_s)
        finally:
            for built in engines.values():
                built.engine.stop()
    rows = []
    for b in args.batches:
        for kind in ("base", "mixed"):
            tps = {q: median(x.decode_tokens_per_s for x in runs[(q, b, kind)]) for q in engines}
            rows.append({"batch": b, "requests": kind, "float32_tokens_per_s": tps["none"],
                         "int8_tokens_per_s": tps["int8"], "int8_over_float32": tps["int8"] / tps["none"]})
    print(f"model {loaded.name}: decoder projections float32 {sizes['none'] / 2**20:.0f} MiB, int8 "
          f"{sizes['int8'] / 2**20:.0f} MiB (lm_head and embedding float32 in both)")
    print(f"decode tokens/s, median of {args.rounds} alternated rounds ({args.prompt_len}-token prompts, "
          f"{args.new_tokens} new tokens; mixed = as many distinct rank-{args.rank} all-projection adapters as rows):")
    for row in rows:
        print(f"  batch {row['batch']:3d} {row['requests']:5s}: float32 {row['float32_tokens_per_s']:7.1f}, int8 "
              f"{row['int8_tokens_per_s']:7.1f}, int8/float32 {row['int8_over_float32']:.2f}")
    prefill = {q: median(v) for q, v in prefills.items()}
    print(f"prefill tokens/s ({prefill_n} prompts of {prefill_len}, base model): float32 {prefill['none']:.1f}, int8 "
          f"{prefill['int8']:.1f}, int8/float32 {prefill['int8'] / prefill['none']:.2f}")
    print(f"rounding cost over {cost['tokens']} README tokens: perplexity float32 {cost['perplexity_float32']:.3f}, "
          f"int8 {cost['perplexity_int8']:.3f}; next-token argmax agrees at {cost['argmax_agreement']:.1%}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "isa": cpu_isa(), "model": loaded.name,
                                         "projection_bytes": sizes, "decode": rows, "prefill_tokens_per_s": prefill,
                                         "rounding": cost}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
