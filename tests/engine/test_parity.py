"""Token-for-token parity with PEFT: 24 greedy requests over 7 adapters and the base model, joining
a running batch at staggered times, with chunked prefill (float32, CPU), once with each op backend
(the Triton kernels run in Triton's interpreter when there is no GPU, on 12 requests), and with
float16 and bfloat16 adapter pages (--lora-dtype) for adapters stored in those dtypes."""

import asyncio
import random
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramux.server.builder import build_engine
from loramux.server.config import ServerConfig
from loramux.server.engine import EngineObserver
from loramux.server.ops import triton_available
from loramux.server.ops.cpu_kernel import load_lora_kernel
from loramux.server.requests import GenerationRequest, SamplingParams
from loramux.server.step_budget import MIN_PREFILL_STEPS, MIN_PREFILL_TOKENS, StepBudget

from helpers import peft_generate, peft_logprobs, pinned_base_linear

NUM_REQUESTS = 24  # three per adapter and for the base model: six waves joining a decoding batch
INTERPRETED_REQUESTS = 8  # Triton's interpreter (no GPU) is ~20x slower: two waves, every adapter and the base model once
MAX_NEW = 16


def make_prompts(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(3, 40))] for _ in range(n)]


async def run_staggered(engine, requests, max_new=MAX_NEW, logprobs=None, value=lambda ev: ev.token_id):
    """Submit in waves of 4; each wave waits until the previous wave has produced 2 tokens each,
    so every later wave joins a batch that is decoding. Each output: ``value`` of each event (the
    token id), with ``logprobs`` as SamplingParams takes it."""
    outs, started = {}, {}

    async def one(i, adapter, prompt):
        params = SamplingParams(max_new, ignore_eos=True, logprobs=logprobs)
        stream = engine.submit(GenerationRequest(f"r{i}", tuple(prompt), params, adapter))
        toks = []
        async for ev in stream:
            toks.append(value(ev))
            if len(toks) == 2:
                started[i].set()
        outs[i] = toks

    tasks = []
    for wave in range(0, len(requests), 4):
        batch = range(wave, min(wave + 4, len(requests)))
        for i in batch:
            started[i] = asyncio.Event()
            tasks.append(asyncio.create_task(one(i, *requests[i])))
        waits = {asyncio.create_task(started[i].wait()) for i in batch}
        while waits:  # until this wave decodes; a failed request fails the test now, not after a hang
            done, _ = await asyncio.wait(waits | {t for t in tasks if not t.done()},
                                         return_when=asyncio.FIRST_COMPLETED, timeout=60)
            assert done, "a wave never started decoding"
            for t in tasks:
                if t.done() and t.exception() is not None:
                    raise t.exception()
            waits -= done
    await asyncio.gather(*tasks)
    return outs


def record_steps(engine) -> tuple[list, EngineObserver]:
    """(each step's StepStats from now on, as the engine runs them; the observer that records them)."""
    steps, recorder = [], EngineObserver()
    recorder.step = steps.append
    engine.observers.append(recorder)
    return steps, recorder


def serve_recorded(engine, requests, max_new=MAX_NEW):
    """``run_staggered`` on ``engine`` (started and stopped here): (outputs, each step's StepStats)."""
    steps, _ = record_steps(engine)
    engine.start()
    try:
        return asyncio.run(run_staggered(engine, requests, max_new)), steps
    finally:
        engine.stop()


def serve_in_turn(engine, names: list, n: int, seed: int, max_new: int = MAX_NEW, prompts=None):
    """``n`` random prompts (or ``prompts``), the i-th for adapter ``names[i % len(names)]``, served
    staggered by ``engine`` (started and stopped here): (requests as (adapter, prompt), prompts,
    outputs)."""
    prompts = prompts or make_prompts(engine.vocab_size, n, seed=seed)
    requests = [(names[i % len(names)], prompts[i]) for i in range(n)]
    engine.start()
    try:
        outs = asyncio.run(run_staggered(engine, requests, max_new))
    finally:
        engine.stop()
    return requests, prompts, outs


def serve_together(engine, jobs: list, samplings: list) -> list[list]:
    """Each (adapter, prompt) of ``jobs``, with the SamplingParams of the same place in
    ``samplings``, submitted at once to ``engine`` (started and stopped here): each one's events."""
    async def one(i, adapter, prompt, sampling):
        return [ev async for ev in engine.submit(GenerationRequest(f"t{i}", tuple(prompt), sampling, adapter))]

    async def main():
        return await asyncio.gather(*(one(i, *job, sampling)
                                      for i, (job, sampling) in enumerate(zip(jobs, samplings, strict=True))))

    engine.start()
    try:
        return asyncio.run(main())
    finally:
        engine.stop()


def narrow_copies(adapters: dict[str, Path], root: Path, dtype: torch.dtype) -> dict[str, Path]:
    """The adapters saved in ``dtype``, as PEFT saves an adapter trained in it."""
    out = {}
    for name, path in adapters.items():
        (root / name).mkdir(parents=True)
        shutil.copy(path / "adapter_config.json", root / name)
        tensors = load_file(path / "adapter_model.safetensors")
        save_file({k: v.to(dtype) for k, v in tensors.items()}, root / name / "adapter_model.safetensors")
        out[name] = root / name
    return out


# backend, or backend-DTYPE: adapter pages in DTYPE (--lora-dtype) for adapters stored in it, whose
# scalings are all powers of two: exact against PEFT, as float32 pages are; backend+graphs: decode
# steps through the static path of decode_graphs.py (captured on CUDA, where auto already has it)
@pytest.fixture(scope="module", params=["torch", "cpp", "triton", "cpp-float16", "torch-bfloat16", "torch+graphs",
                                        "cpp+graphs", "triton+graphs"])
def engine_with_adapters(request, tiny_llama, tiny_adapters, tmp_path_factory):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name, _, variant = request.param.partition("+")
    backend, _, lora_dtype = name.partition("-")
    graphs = variant == "graphs"
    if graphs and device != "cpu":
        pytest.skip("on CUDA every engine here captures decode graphs (--cuda-graphs auto)")
    if backend == "triton" and not triton_available(device):
        pytest.skip("triton is not installed")
    if backend == "cpp" and (device != "cpu" or load_lora_kernel() is None):
        pytest.skip("the C++ kernel is for the CPU, and needs a compiler")
    if lora_dtype and device != "cpu":
        pytest.skip("pages narrower than the model are a CPU option")
    adapters = tiny_adapters if not lora_dtype else \
        narrow_copies(tiny_adapters, tmp_path_factory.mktemp(lora_dtype), getattr(torch, lora_dtype))
    config = ServerConfig(
        op_backend=backend, dtype="float32",  # exact parity: float32 on every device
        cuda_graphs="on" if graphs else "auto",
        base_linear=pinned_base_linear(backend),
        lora_dtype=lora_dtype or "auto",
        model=str(tiny_llama), max_batch_size=12, max_tokens_per_step=24, max_model_len=96, default_max_new_tokens=16,
        max_device_adapters=len(adapters), max_host_adapters=len(adapters),
        adapters=tuple((n, str(p)) for n, p in adapters.items()),
    )
    built = build_engine(config)
    op = built.engine.runner.apply_lora
    # Triton's backend brings its attention: decode, and every prefill chunk of a step in one call
    assert (built.engine.runner.kv.prefill_attention is not None) == (backend == "triton")
    if backend == "triton":
        assert type(op).__name__ == "TritonLoRA"
    else:  # the C++ kernel serves decode rows only when asked for
        assert type(op).__name__ == "TorchLoRA" and (op._kernel is not None) == (backend == "cpp")
    assert all(a.dtype == getattr(torch, lora_dtype or "float32") for a, _ in built.manager.pool.stores.values())
    # where the C++ op serves, a page's A and B are one row of memory: the stores are strided views
    assert {b.is_contiguous() for _, b in built.manager.pool.fused_stores.values()} == {backend != "cpp"}
    built.engine.start()
    yield built, adapters
    built.engine.stop()


def test_staggered_mixed_adapters_match_peft_token_for_token(engine_with_adapters, tiny_llama):
    built, tiny_adapters = engine_with_adapters
    engine = built.engine
    names = [None, *tiny_adapters]
    interpreted = type(engine.runner.apply_lora).__name__ == "TritonLoRA" and engine.runner.device.type == "cpu"
    n = INTERPRETED_REQUESTS if interpreted else NUM_REQUESTS
    prompts = make_prompts(engine.vocab_size, n)
    requests = [(names[i % len(names)], prompts[i]) for i in range(n)]
    steps, recorder = record_steps(engine)
    try:
        outs = asyncio.run(run_staggered(engine, requests))
    finally:
        engine.observers.remove(recorder)
    # Requests really joined a decoding batch, prefill was chunked, and adapters were mixed.
    assert any(s.num_prefill_tokens and s.num_decode_tokens for s in steps)
    assert max(s.num_prefill_tokens + s.num_decode_tokens for s in steps) <= 24
    assert max(s.num_adapters for s in steps) >= 4
    for name in names:
        idx = [i for i, (n, _) in enumerate(requests) if n == name]
        expected = peft_generate(tiny_llama, tiny_adapters.get(name), [prompts[i] for i in idx], MAX_NEW,
                                 eos_token_id=None)
        for i, exp in zip(idx, expected, strict=True):
            assert len(exp) == MAX_NEW
            assert outs[i] == exp, f"request {i} adapter {name}: {outs[i]} != {exp}"
    assert engine.counts() == (0, 0)
    engine.blocks.check()
    assert engine.blocks.num_held == 0
    assert not engine.adapters.pool.pinned()
    graphs = engine.runner.graphs
    if graphs is not None:  # decode steps of mixed adapters went through it (and the rest eagerly)
        assert graphs.steps >= MAX_NEW // 2 and graphs.steps < len(steps), (graphs.steps, len(steps))


class MeasuredAsSlow(StepBudget):
    """The step budget, fed a slow machine's step times instead of this one's: 1 ms a step, 0.5 ms a
    decode token, 1 ms a prompt token (the tiny model's own times are too small and noisy for a
    fit to say anything definite)."""

    def observe(self, decode_tokens, prefill_tokens, seconds):
        super().observe(decode_tokens, prefill_tokens, 1e-3 + 5e-4 * decode_tokens + 1e-3 * prefill_tokens)


def test_a_target_step_time_sizes_prefill_chunks_and_keeps_outputs_exact(tiny_llama, tiny_adapters):
    """--target-step-ms: once a few prefill steps are measured, each step's prompt tokens are the
    most that keep it within the target beside its decodes (at least MIN_PREFILL_TOKENS), under
    --max-tokens-per-step; prompts are prefilled in those chunks, and outputs stay token-exact."""
    names = [None, *tiny_adapters]
    config = ServerConfig(
        dtype="float32", base_linear=pinned_base_linear("torch"), op_backend="torch", model=str(tiny_llama),
        max_batch_size=8, max_tokens_per_step=64, max_model_len=96, default_max_new_tokens=MAX_NEW,
        max_device_adapters=len(tiny_adapters), max_host_adapters=len(tiny_adapters), target_step_ms=30,
        adapters=tuple((n, str(p)) for n, p in tiny_adapters.items()))
    engine = build_engine(config).engine
    engine.step_budget = MeasuredAsSlow(0.030, 64)
    prompts = make_prompts(engine.vocab_size, 16, seed=5)
    requests = [(names[i % len(names)], prompts[i]) for i in range(16)]
    outs, steps = serve_recorded(engine, requests)
    with_prefill = [s for s in steps if s.num_prefill_tokens]
    assert max(s.num_prefill_tokens for s in with_prefill[:MIN_PREFILL_STEPS]) > 29  # not sized yet
    later = with_prefill[MIN_PREFILL_STEPS:]
    assert len(later) >= 4
    for s in later:  # 1 + 0.5 d + p ms <= 30, or the least chunk
        assert s.num_prefill_tokens <= max(MIN_PREFILL_TOKENS, int(29 - 0.5 * s.num_decode_tokens)), s
    assert any(s.num_prefill_tokens > MIN_PREFILL_TOKENS for s in later)  # sized, not floored
    assert any(s.num_decode_tokens >= 4 for s in later)  # beside a decoding batch
    for name in names:
        idx = [i for i, (n, _) in enumerate(requests) if n == name]
        expected = peft_generate(tiny_llama, tiny_adapters.get(name), [prompts[i] for i in idx], MAX_NEW,
                                 eos_token_id=None)
        for i, exp in zip(idx, expected, strict=True):
            assert outs[i] == exp, f"request {i} adapter {name}: {outs[i]} != {exp}"
    assert engine.counts() == (0, 0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_serves_near_the_float32_oracle(dtype, tiny_llama, tiny_adapters):
    """The model in float16 or bfloat16 (a GPU's default), mixed adapters joining a decoding batch:
    not token-exact (rounding), so each generated token's reported logprob is compared with PEFT's
    in float32 on the same ids (teacher-forced), and must be as close as PEFT's own in the same
    half precision is: within 1.5x its mean and its largest deviation (bfloat16 strays by 0.05
    nats on average on these tiny random models, float16 by 0.006). An adapter left out, or its
    scaling lost, moves them by far more."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = "triton" if device == "cuda" and triton_available(device) else "torch"
    names = [None, *tiny_adapters]
    config = ServerConfig(
        dtype=dtype, op_backend=backend, base_linear=pinned_base_linear(backend), model=str(tiny_llama),
        max_batch_size=8, max_tokens_per_step=24, max_model_len=96, default_max_new_tokens=MAX_NEW,
        max_device_adapters=len(tiny_adapters), max_host_adapters=len(tiny_adapters),
        adapters=tuple((n, str(p)) for n, p in tiny_adapters.items()))
    engine = build_engine(config).engine
    assert next(engine.runner.model.parameters()).dtype == getattr(torch, dtype)
    prompts = make_prompts(engine.vocab_size, 12, seed=7)
    requests = [(names[i % len(names)], prompts[i]) for i in range(12)]
    steps, _ = record_steps(engine)
    engine.start()
    try:
        done = asyncio.run(run_staggered(engine, requests, logprobs=0,
                                         value=lambda ev: (ev.token_id, ev.logprob.logprob)))
    finally:
        engine.stop()
    outs = [done[i] for i in range(len(requests))]
    assert any(s.num_prefill_tokens and s.num_decode_tokens for s in steps)
    ours, peft_half = [], []
    for (name, prompt), out in zip(requests, outs, strict=True):
        tokens = [t for t, _ in out]
        assert len(tokens) == MAX_NEW
        oracle = peft_logprobs(tiny_llama, tiny_adapters.get(name), prompt, tokens)
        half = peft_logprobs(tiny_llama, tiny_adapters.get(name), prompt, tokens, dtype=getattr(torch, dtype))
        for step, (token, logprob) in enumerate(out):
            ours.append(abs(logprob - oracle[step, token].item()))
            peft_half.append(abs(half[step, token].item() - oracle[step, token].item()))
    assert 0 < statistics.mean(ours) <= 1.5 * statistics.mean(peft_half) + 1e-3, (statistics.mean(ours), statistics.mean(peft_half))
    assert max(ours) <= 1.5 * max(peft_half) + 1e-2, (max(ours), max(peft_half))


def test_a_prefill_kernel_that_fails_its_first_step_leaves_sdpa_and_says_so(tiny_llama, monkeypatch, caplog):
    """Start-up's warm-up step runs every kernel once: Triton's prefill attention failing there (a
    GPU it cannot compile for) is logged, prefill falls back to SDPA per chunk, and outputs stay exact."""
    if not triton_available("cuda" if torch.cuda.is_available() else "cpu"):
        pytest.skip("triton is not installed")
    from loramux.server.ops import triton_attention

    def broken(*args, **kwargs):
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setattr(triton_attention, "paged_prefill_triton", broken)
    config = ServerConfig(op_backend="triton", dtype="float32", base_linear=pinned_base_linear("triton"),
                          model=str(tiny_llama), max_batch_size=4, max_model_len=96, default_max_new_tokens=8)
    with caplog.at_level("WARNING"):
        engine = build_engine(config).engine
    assert engine.runner.kv.prefill_attention is None
    assert "prefill attention failed its first step (RuntimeError: out of resources" in caplog.text
    prompts = make_prompts(engine.vocab_size, 2, seed=9)
    outs = serve_together(engine, [(None, p) for p in prompts], [SamplingParams(6, ignore_eos=True)] * 2)
    assert [[ev.token_id for ev in events] for events in outs] == peft_generate(tiny_llama, None, prompts, 6,
                                                                                 eos_token_id=None)
