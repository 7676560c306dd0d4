"""DoRA adapters (weight-decomposed LoRA: y = g * (x W^T + s x A^T B^T) + bias, g = m / ||W + s B A||
per output row), token for token against PEFT: in every family, in one batch with plain LoRA
adapters and the base model, joining at staggered times, through a pool small enough that their
magnitude pages are evicted and reused; and the refusals that name what cannot be served."""

from pathlib import Path

import pytest

from loramux.adapters.errors import AdapterInvalid
from loramux.server.builder import build_engine
from loramux.server.config import ServerConfig
from loramux.server.ops.cpu_kernel import load_lora_kernel

from helpers import ALL_PROJ, FAMILY_ADAPTERS, build_adapter, build_family_model, peft_generate
from test_parity import make_prompts, serve_in_turn, serve_recorded

MAX_NEW = 12

# DoRA with mixed ranks and targets, rsLoRA, rank/alpha patterns, a layer left out; and plain LoRA
LLAMA_ADAPTERS = {
    "dora-qv-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
    "dora-all-r8-rslora": dict(r=8, lora_alpha=8, target_modules=ALL_PROJ, use_rslora=True, use_dora=True),
    "dora-pattern-r8": dict(r=8, lora_alpha=16, target_modules=ALL_PROJ, rank_pattern={"v_proj": 2},
                            alpha_pattern={"down_proj": 4}, use_dora=True),
    "dora-layer1-r4": dict(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"], layers_to_transform=[1],
                           use_dora=True),
    "lora-qv-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
}


@pytest.fixture(scope="module")
def llama_dora(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dora")
    return {name: build_adapter(tiny_llama, root / name, seed=40 + i, **kw)
            for i, (name, kw) in enumerate(LLAMA_ADAPTERS.items())}


def check_against_peft(model, adapters, requests, prompts, outs):
    for name in {n for n, _ in requests}:
        idx = [i for i, (n, _) in enumerate(requests) if n == name]
        expected = peft_generate(model, adapters.get(name), [prompts[i] for i in idx], MAX_NEW, eos_token_id=None)
        for i, exp in zip(idx, expected, strict=True):
            assert outs[i] == exp, f"request {i} adapter {name}: {outs[i]} != {exp}"


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_dora_matches_peft_in_a_mixed_batch_through_evictions(backend, tiny_llama, llama_dora, tmp_path):
    """A pool of 24 pages for 33 pages of adapters: DoRA adapters are evicted and load again into
    pages another adapter's magnitude or rank rows held. The converted-adapter cache keeps the plain
    adapter only: a DoRA scale depends on the base weights, which its file name does not."""
    if backend == "cpp" and load_lora_kernel() is None:
        pytest.skip("the C++ kernel needs a compiler")
    built = build_engine(ServerConfig(
        model=str(tiny_llama), op_backend=backend, dtype="float32", enable_dora=True, max_batch_size=8,
        max_tokens_per_step=20, max_model_len=96, default_max_new_tokens=MAX_NEW, max_lora_rank=8,
        max_device_adapters=3, max_host_adapters=3, adapter_cache_dir=str(tmp_path / "converted"), adapters=tuple((n, str(p)) for n, p in llama_dora.items())))
    engine = built.engine
    assert built.manager.pool.num_pages == 24
    names = [None, *llama_dora]
    prompts = make_prompts(engine.vocab_size, 18, seed=5)
    requests = [(names[i % len(names)], prompts[i]) for i in range(18)]
    outs, steps = serve_recorded(engine, requests, MAX_NEW)
    assert built.manager.pool.evictions > 0 and max(s.num_adapters for s in steps) >= 2
    check_against_peft(tiny_llama, llama_dora, requests, prompts, outs)
    assert len(list((tmp_path / "converted").iterdir())) == 1  # the plain adapter's
    assert not engine.adapters.pool.pinned()
    info = {e.adapter_id: e.manifest for e in built.registry.list()}
    assert (info["dora-all-r8-rslora"].lora_rank, info["dora-all-r8-rslora"].rank) == (8, 9)


@pytest.mark.parametrize("family", sorted(FAMILY_ADAPTERS))
def test_dora_matches_peft_in_every_family(family, tmp_path):
    """GPT-2's Conv1D (fan_in_fan_out), Qwen2's q/k/v biases with q and v only, BLOOM's fused
    query_key_value with its bias, GPT-Neo, Mistral's sliding window."""
    model = build_family_model(family, tmp_path / "model")
    adapters = {name: build_adapter(model, tmp_path / name, seed=i + 1, use_dora=True, **kw)
                for i, (name, kw) in enumerate(FAMILY_ADAPTERS[family].items())}
    built = build_engine(ServerConfig(model=str(model), dtype="float32", enable_dora=True, max_batch_size=8,
                                      max_tokens_per_step=20, max_model_len=80, default_max_new_tokens=MAX_NEW,
                                      kv_block_size=4,
                                      adapters=tuple((n, str(p)) for n, p in adapters.items())))
    requests, prompts, outs = serve_in_turn(built.engine, [None, *adapters], 9, seed=3, max_new=MAX_NEW)
    check_against_peft(model, adapters, requests, prompts, outs)


def test_dora_refusals_name_the_limit(tiny_llama, tmp_path):
    """DoRA is served only with --enable-dora; a DoRA adapter of rank --max-lora-rank needs one page
    more than a pool of one such adapter holds; and a DoRA adapter cannot be part of a combination
    (its scale multiplies W + s B A)."""
    full = build_adapter(tiny_llama, tmp_path / "full", seed=1, r=8, lora_alpha=8, target_modules=["q_proj"],
                         use_dora=True)
    small = build_adapter(tiny_llama, tmp_path / "small", seed=2, r=4, lora_alpha=8, target_modules=["q_proj"],
                          use_dora=True)
    plain = build_engine(ServerConfig(model=str(tiny_llama), max_lora_rank=8, adapter_roots=(str(tmp_path),)))
    with pytest.raises(AdapterInvalid, match="'use_dora': DoRA adapters are not enabled on this server "
                                             r"\(start it with --enable-dora\)"):
        plain.registry.register("small", small)
    built = build_engine(ServerConfig(model=str(tiny_llama), max_lora_rank=8, max_device_adapters=1, enable_dora=True,
                                      adapter_roots=(str(tmp_path),), adapters=(("small", str(small)),)))
    with pytest.raises(AdapterInvalid, match=r"DoRA adapter of rank 8 needs 9 device pages; the pool holds 8 "
                                             r"\(--max-device-adapters x --max-lora-rank\)"):
        built.registry.register("full", full)
    with pytest.raises(ValueError, match="'small' is a DoRA adapter, which cannot be combined"):
        built.registry.register_combination("mix", [("small", 1.0)])
