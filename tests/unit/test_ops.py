"""Fast LoRA ops, every backend, against the pure-torch reference loops. Without a GPU the Triton
kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

import dataclasses

import pytest
import torch

from loramux.server.ops import merge_plans, plan_segments, plan_tokens, select_backend, triton_available
from loramux.server.ops.cpu_kernel import load_lora_kernel
from loramux.server.ops.dora import dora_rescale, used_columns
from loramux.server.ops.plan import MagnitudeRuns
from loramux.server.ops.reference import bgmv_reference, dora_rescale_reference, sgmv_reference

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}
IN, OUT = 48, 80
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "cpp", "triton"]


@pytest.fixture(autouse=True)
def _backend_available(request):
    """Skip a backend this host cannot run. Decided per test, not at collection, so collecting on a
    GPU host never builds the CPU kernel."""
    backend = request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None
    if backend == "cpp" and (DEVICE != "cpu" or load_lora_kernel() is None):
        pytest.skip("the C++ kernel is for the CPU, and needs a compiler (or LORAMUX_NO_CPU_KERNEL is set)")
    if backend == "triton" and not triton_available(DEVICE):
        pytest.skip("triton is not installed")


def _store(num_pages, dtype, gen):
    a = torch.randn(num_pages, IN, generator=gen).to(dtype) / IN**0.5
    b = torch.randn(num_pages, OUT, generator=gen).to(dtype) / 4
    return a, b


def _adapter_pages(ranks, gen):
    """Disjoint, shuffled page sets, one per adapter (pages need not be contiguous)."""
    perm = torch.randperm(sum(ranks), generator=gen)
    out, start = [], 0
    for r in ranks:
        out.append(perm[start : start + r])
        start += r
    return out


def _popularity(kind, num_tokens, num_adapters, gen):
    if kind == "distinct":
        return [i % num_adapters for i in range(num_tokens)]
    if kind == "identical":
        return [0] * num_tokens
    if kind == "uniform":
        return torch.randint(0, num_adapters, (num_tokens,), generator=gen).tolist()
    weights = 1.0 / torch.arange(1, num_adapters + 1, dtype=torch.float64)  # zipf(1.0)
    return torch.multinomial(weights, num_tokens, replacement=True, generator=gen).tolist()


def _assert_close(fast, ref, dtype):
    scale = ref.float().abs().max().clamp(min=1.0)
    assert ((fast.float() - ref.float()).abs().max() / scale) <= TOLERANCE[dtype]


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_fast(backend, y, x, a, b, plan):
    """Apply ``backend`` on DEVICE to copies of the CPU tensors and return y on the CPU."""
    out = y.to(DEVICE)
    select_backend(backend, DEVICE)(out, x.to(DEVICE), a.to(DEVICE), b.to(DEVICE), plan.to(DEVICE))
    return out.cpu()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("popularity", ["distinct", "uniform", "zipf", "identical"])
@pytest.mark.parametrize("base_every", [0, 3])
def test_bgmv_matches_reference(backend, dtype, popularity, base_every):
    gen = torch.Generator().manual_seed(0)
    ranks = [4, 8, 16, 64, 7, 18]  # 7 and 18: ranks that are not a multiple of 4 or 16
    pages = _adapter_pages(ranks, gen)
    a, b = _store(sum(ranks), dtype, gen)
    num_tokens = 37
    token_adapter = _popularity(popularity, num_tokens, len(ranks), gen)
    if base_every:
        token_adapter = [-1 if i % base_every == 0 else t for i, t in enumerate(token_adapter)]
    x = torch.randn(num_tokens, IN, generator=gen).to(dtype)
    y0 = torch.randn(num_tokens, OUT, generator=gen).to(dtype)
    ref = y0.clone().float()
    bgmv_reference(ref, x.float(), a.float(), b.float(), token_adapter, pages)
    fast = run_fast(backend, y0, x, a, b, plan_tokens(token_adapter, pages))
    _assert_close(fast, ref, dtype)
    # base rows are untouched, bit for bit
    for i, t in enumerate(token_adapter):
        if t < 0:
            assert torch.equal(fast[i], y0[i])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sgmv_matches_reference_with_empty_and_base_segments(backend, dtype):
    gen = torch.Generator().manual_seed(1)
    ranks = [64, 4, 16, 8, 16]
    pages = _adapter_pages(ranks, gen)
    a, b = _store(sum(ranks), dtype, gen)
    lengths = [5, 0, 17, 1, 0, 9, 3, 12]
    seg_pages = [pages[0], pages[1], None, pages[2], pages[3], pages[4], None, pages[2]]
    seg_starts = [0]
    for n in lengths:
        seg_starts.append(seg_starts[-1] + n)
    x = torch.randn(seg_starts[-1], IN, generator=gen).to(dtype)
    y0 = torch.randn(seg_starts[-1], OUT, generator=gen).to(dtype)
    ref = y0.clone().float()
    sgmv_reference(ref, x.float(), a.float(), b.float(), seg_starts, seg_pages)
    plan = plan_segments(seg_starts, seg_pages)
    fast = run_fast(backend, y0, x, a, b, plan)
    _assert_close(fast, ref, dtype)
    # the rank-4 and rank-8 segments are empty, so only ranks 16 and 64 do work
    assert sorted(g.rank for g in plan.groups) == [16, 64]


FUSED_OUTS = (40, 16, 24)  # q | k | v of unequal widths, as under grouped-query attention


def _fused_reference(ref, x, a, b, bounds, used, form, rows_spec, pages):
    """The oracle of a fused call: the per-module reference once per used kind, on its columns."""
    for j in used:
        cols = slice(bounds[j], bounds[j + 1])
        out = ref[:, cols].clone()
        if form == "bgmv":
            bgmv_reference(out, x, a[:, j], b[:, cols], rows_spec, pages)
        else:
            sgmv_reference(out, x, a[:, j], b[:, cols], *rows_spec)
        ref[:, cols] = out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["bgmv", "sgmv"])
@pytest.mark.parametrize("used", [(0, 1, 2), (0, 2), (1,)])
def test_fused_kinds_match_the_per_module_reference(backend, dtype, form, used):
    """One call for the kinds sharing an input (a_store [P, m, in]): each used kind's columns get
    its own LoRA, the other kinds' columns are untouched bit for bit."""
    gen = torch.Generator().manual_seed(4)
    ranks = [4, 16, 7, 32]
    pages = _adapter_pages(ranks, gen)
    bounds = (0, FUSED_OUTS[0], FUSED_OUTS[0] + FUSED_OUTS[1], sum(FUSED_OUTS))
    a = (torch.randn(sum(ranks), 3, IN, generator=gen) / IN**0.5).to(dtype)
    b = (torch.randn(sum(ranks), bounds[-1], generator=gen) / 4).to(dtype)
    if form == "bgmv":
        token_adapter = [-1 if i % 5 == 0 else i % len(ranks) for i in range(23)]
        rows_spec, plan, n = token_adapter, plan_tokens(token_adapter, pages), len(token_adapter)
    else:
        lengths, seg_pages = [6, 0, 11, 1, 4], [pages[0], pages[1], pages[3], None, pages[2]]
        seg_starts = [0]
        for length in lengths:
            seg_starts.append(seg_starts[-1] + length)
        rows_spec, plan, n = (seg_starts, seg_pages), plan_segments(seg_starts, seg_pages), seg_starts[-1]
    x = torch.randn(n, IN, generator=gen).to(dtype)
    y0 = torch.randn(n, bounds[-1], generator=gen).to(dtype)
    ref = y0.clone().float()
    _fused_reference(ref, x.float(), a.float(), b.float(), bounds, used, form, rows_spec, pages)
    out = y0.to(DEVICE)
    select_backend(backend, DEVICE)(out, x.to(DEVICE), a.to(DEVICE), b.to(DEVICE), plan.to(DEVICE), bounds, used)
    fast = out.cpu()
    _assert_close(fast, ref, dtype)
    for j in set(range(3)) - set(used):
        assert torch.equal(fast[:, bounds[j] : bounds[j + 1]], y0[:, bounds[j] : bounds[j + 1]])


def test_rank_groups_use_each_adapters_own_rank():
    """Mixed ranks are grouped by rank: no adapter is padded to the batch's maximum rank."""
    gen = torch.Generator().manual_seed(2)
    pages = _adapter_pages([4, 64, 4], gen)
    plan = plan_tokens([0, 1, 2, 0, -1], pages)
    by_rank = {g.rank: g for g in plan.groups}
    assert set(by_rank) == {4, 64}
    # per-row form: each row carries its own adapter's pages, at that adapter's rank
    assert by_rank[4].pages.numel() == 3 * 4 and by_rank[64].pages.numel() == 64
    assert by_rank[4].rows.tolist() == [0, 2, 3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_base_batch_does_no_work(backend):
    plan_t = plan_tokens([-1, -1, -1], [])
    plan_s = plan_segments([0, 4, 4], [None, None])
    assert plan_t.empty and plan_s.empty
    y = torch.randn(3, OUT)
    for plan in (plan_t, plan_s):
        assert torch.equal(run_fast(backend, y, torch.randn(3, IN), torch.empty(0, IN), torch.empty(0, OUT), plan), y)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="torch"):
        select_backend("cuda-magic")


def test_auto_backend_on_cpu_is_the_torch_ops_with_the_cpp_kernel_when_it_builds():
    op = select_backend("auto", "cpu")
    assert type(op).__name__ == "TorchLoRA"
    assert op._kernel is load_lora_kernel()


# Shapes the engine produces, at the hidden sizes of real models (SmolLM2-135M, Llama-3.2-1B,
# Llama-2-7B): decode batches of 1 to 256 (batch 1 splits the kernel's reduction), ranks 4 to 128,
# and prefill segments longer than a kernel row block next to empty ones.
ENGINE_SHAPES = {
    "decode-1-llama7b-q": ("bgmv", [1], 4096, 4096, [128]),
    "decode-7-llama1b-down": ("bgmv", [7], 8192, 2048, [8, 16]),
    "decode-33-llama1b-up": ("bgmv", [33], 2048, 8192, [16, 64]),
    "decode-256-smollm-k": ("bgmv", [256], 576, 192, [4, 8, 16, 32, 64, 128]),
    "prefill-smollm-up": ("sgmv", [40, 0, 1, 17, 0, 100, 3], 576, 1536, [4, 8, 16, 32, 64, 128]),
    "prefill-llama7b-o": ("sgmv", [70, 0, 33], 4096, 4096, [16, 128, 8]),
    # fused linears: q|k|v and gate|up, one call each
    "decode-32-smollm-qkv": ("bgmv", [32], 576, (576, 192, 192), [4, 8, 16, 32, 64, 128]),
    "decode-3-llama1b-gate-up": ("bgmv", [3], 2048, (8192, 8192), [16, 8]),
    "prefill-smollm-qkv": ("sgmv", [40, 0, 1, 17, 0, 100, 3], 576, (576, 192, 192), [4, 16, 128]),
    "prefill-smollm-gate-up": ("sgmv", [33, 5], 576, (1536, 1536), [16, 64]),
}


def _engine_case(shape, gen, page_dtype, dtype):
    """One call of an ENGINE_SHAPES case: (y0, x, a, b, plan, bounds, used, its float32 reference)."""
    form, lengths, in_features, outs, ranks = ENGINE_SHAPES[shape]
    outs = outs if isinstance(outs, tuple) else (outs,)
    bounds = [0]
    for width in outs:
        bounds.append(bounds[-1] + width)
    used = tuple(range(len(outs)))
    pages = _adapter_pages(ranks, gen)
    a = (torch.randn(sum(ranks), len(outs), in_features, generator=gen) / in_features**0.5).to(page_dtype)
    b = (torch.randn(sum(ranks), bounds[-1], generator=gen) / 4).to(page_dtype)
    num_rows = sum(lengths)
    x = torch.randn(num_rows, in_features, generator=gen).to(dtype)
    y0 = torch.randn(num_rows, bounds[-1], generator=gen).to(dtype)
    if form == "bgmv":
        rows_spec = [i % len(ranks) for i in range(num_rows)]
        plan = plan_tokens(rows_spec, pages)
    else:
        seg_starts = [0]
        for n in lengths:
            seg_starts.append(seg_starts[-1] + n)
        rows_spec = (seg_starts, [pages[s % len(ranks)] for s in range(len(lengths))])
        plan = plan_segments(*rows_spec)
    ref = y0.clone().float()
    _fused_reference(ref, x.float(), a.float(), b.float(), bounds, used, form, rows_spec, pages)
    return y0, x, a, b, plan, tuple(bounds), used, ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ENGINE_SHAPES)
def test_engine_shapes_match_reference(backend, shape):
    dtypes = DTYPES if DEVICE == "cuda" else [torch.float32]  # the interpreter is slow: one dtype on CPU
    gen = torch.Generator().manual_seed(3)
    for dtype in dtypes:
        y0, x, a, b, plan, bounds, used, ref = _engine_case(shape, gen, dtype, dtype)
        out = y0.to(DEVICE)
        select_backend(backend, DEVICE)(out, x.to(DEVICE), a.to(DEVICE), b.to(DEVICE), plan.to(DEVICE), bounds, used)
        _assert_close(out.cpu(), ref, dtype)


@pytest.mark.skipif(not triton_available(DEVICE), reason="triton is not installed")
def test_triton_warm_up_runs_every_rank_block_and_leaves_the_stores_alone():
    from loramux.server.ops.triton_ops import TritonLoRA

    gen = torch.Generator().manual_seed(0)
    stores = {(0, ("q", "k")): (torch.randn(24, 2, IN, generator=gen), torch.randn(24, OUT, generator=gen)),
              (0, ("o",)): (torch.randn(24, 1, 16, generator=gen), torch.randn(24, 8, generator=gen))}
    stores = {k: (a.to(DEVICE), b.to(DEVICE)) for k, (a, b) in stores.items()}
    before = {k: (a.clone(), b.clone()) for k, (a, b) in stores.items()}
    op, calls = TritonLoRA(), []
    original = op._apply_group
    op._apply_group = lambda y, x, a, b, g, meta, bounds, used: (
        calls.append((g.rank, x.shape[0], g.group_ends is None, a.shape[1], len(used))),
        original(y, x, a, b, g, meta, bounds, used))
    op.warm_up(20, stores, DEVICE, bounds={("q", "k"): (0, 8, OUT), ("o",): (0, 8)})
    # the metadata of every set of kinds an adapter can target, made now rather than by a step's copy
    metas = {(bounds, used) for _, bounds, used, _ in op._meta}
    assert {((0, 8, OUT), u) for u in ((0,), (1,), (0, 1))} | {((0, 8), (0,))} <= metas
    made = len(op._meta)
    op(torch.zeros(1, OUT, device=DEVICE), torch.zeros(1, IN, device=DEVICE), *stores[(0, ("q", "k"))],
       plan_tokens([0], [torch.arange(16)], DEVICE), (0, 8, OUT), (1,))
    assert len(op._meta) == made
    assert {c[0] for c in calls} == {16, 20}  # rank blocks 16 and 32
    assert {c[1:3] for c in calls} == {(1, True), (64, True), (2, False)}
    assert {c[3:] for c in calls} == {(2, 1), (2, 2), (1, 1)}  # every number of used kinds per store
    assert all(torch.equal(a, before[k][0]) and torch.equal(b, before[k][1]) for k, (a, b) in stores.items())


def test_a_steps_metadata_goes_over_in_one_packed_copy():
    """The packing the CUDA path uses (one pinned buffer, one copy), checked here on the CPU."""
    from loramux.server.models.batch import StepBatch
    from loramux.server.ops import merge_plans
    from loramux.server.runner import upload_step

    pages = [torch.arange(4), torch.arange(4, 12)]
    shared = merge_plans(plan_segments([0, 3, 5], [pages[0], pages[1]]), plan_tokens([-1] * 5 + [1, 0], pages))
    other = plan_tokens([-1] * 5 + [0, -1], pages)
    longs = lambda *v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    shared = dataclasses.replace(shared, magnitude=MagnitudeRuns(((0, 3, 13), (3, 5, longs(12, 14)))))
    batch = StepBatch(input_ids=longs(5, 6, 7, 8, 9, 10, 11), positions=longs(0, 1, 2, 0, 1, 7, 9),
                      slot_mapping=longs(0, 1, 2, 16, 17, 39, 57), prefill=(), prefill_blocks=longs(0, 1),
                      prefill_chunks=longs(0, 3, 0, 0, 3, 2, 0, 1).view(2, 4),
                      num_prefill_rows=5, decode_tables=longs(2, 4, 3, 5).view(2, 2), decode_lengths=longs(8, 10),
                      decode_ctx=10, logits_rows=longs(2, 4, 5, 6),
                      lora={("q", "k"): (((0, 1), shared),), ("v",): (((0,), other),), ("o",): (((0,), shared),)},
                      rope_positions=longs(0, 1, 2, 0, 1, 15, 17))  # a split RoPE table's rows (rope_split 8)
    moved = upload_step(batch, "cpu", pin=False)
    for name in ("input_ids", "positions", "slot_mapping", "prefill_blocks", "prefill_chunks", "decode_tables",
                 "decode_lengths", "logits_rows", "rope_positions"):
        assert torch.equal(getattr(moved, name), getattr(batch, name))
    plan = {kinds: entries[0][1] for kinds, entries in moved.lora.items()}
    assert plan[("q", "k")] is plan[("o",)] and plan[("q", "k")] is not plan[("v",)]  # sharing kept
    assert [used for used, _ in moved.lora[("q", "k")]] == [(0, 1)]
    assert plan[("v",)].magnitude is None
    (lo, hi, page), (lo2, hi2, pages) = plan[("q", "k")].magnitude.runs  # DoRA adapters' rows and pages
    assert (lo, hi, page, lo2, hi2) == (0, 3, 13, 3, 5) and torch.equal(pages, longs(12, 14))
    storages = {pages.untyped_storage().data_ptr(), moved.rope_positions.untyped_storage().data_ptr()}
    for kinds in batch.lora:
        for old, new in zip(batch.lora[kinds][0][1].groups, moved.lora[kinds][0][1].groups, strict=True):
            assert torch.equal(new.rows, old.rows) and torch.equal(new.pages, old.pages)
            assert (new.group_ends is None) == (old.group_ends is None)
            if old.group_ends is not None:
                assert new.group_ends.dtype == old.group_ends.dtype and torch.equal(new.group_ends, old.group_ends)
            assert (new.rank, new.row_start, new.max_rows_per_adapter) == (old.rank, old.row_start,
                                                                          old.max_rows_per_adapter)
            storages |= {new.rows.untyped_storage().data_ptr(), new.pages.untyped_storage().data_ptr()}
    assert storages == {moved.input_ids.untyped_storage().data_ptr()}  # one buffer: one copy


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("page_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", ENGINE_SHAPES)
def test_narrow_pages_under_float32_activations_compute_as_their_widened_values(backend, page_dtype, shape):
    """--lora-dtype float16/bfloat16 on a CPU: pages narrower than the float32 activations are
    widened value by value, so each backend gives what it gives on the widened pages, to float32
    rounding, at every shape the engine produces; and both match the reference."""
    y0, x, a, b, plan, bounds, used, ref = _engine_case(shape, torch.Generator().manual_seed(5), page_dtype,
                                                        torch.float32)
    op = select_backend(backend, "cpu")
    narrow, wide = y0.clone(), y0.clone()
    op(narrow, x, a, b, plan, bounds, used)
    op(wide, x, a.float(), b.float(), plan, bounds, used)
    _assert_close(narrow, wide, torch.float32)
    _assert_close(narrow, ref, torch.float32)


def test_the_cpp_kernel_refuses_mixed_dtypes_it_does_not_serve():
    kernel = load_lora_kernel()
    if kernel is None:
        pytest.skip("the C++ kernel was not built")
    y, x = torch.zeros(1, 8, dtype=torch.float16), torch.zeros(1, 8, dtype=torch.float16)
    a, b = torch.zeros(4, 1, 8), torch.zeros(4, 8)  # float32 pages under float16 activations
    with pytest.raises(RuntimeError, match="float16 / bfloat16 pages under float32 activations"):
        kernel(y, x, a, b, torch.zeros(1, dtype=torch.long), torch.arange(4), torch.empty(0, dtype=torch.int32), 4,
               [0, 8], [0], torch.empty(0, dtype=torch.long), torch.empty(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("used", [(0, 1, 2), (0, 2), (1,)], ids=["qkv", "q-v", "k"])
def test_dora_rescale_matches_the_reference(dtype, with_bias, used):
    """Rows of several DoRA adapters (prefill runs of one page, decode runs of a page per row),
    within a fused q|k|v output; columns of unused kinds and other rows unchanged."""
    gen = torch.Generator().manual_seed(len(used) + with_bias)
    bounds = (0, 32, 48, 64)
    y = torch.randn(12, 64, generator=gen, dtype=torch.float32).to(DEVICE)
    b_store = (torch.rand(9, 64, generator=gen) + 0.5).to(dtype).to(DEVICE)
    bias = torch.randn(64, generator=gen).to(DEVICE) if with_bias else None
    runs = ((0, 3, 3), (4, 6, 7), (8, 9, torch.tensor([1], device=DEVICE)), (10, 12, torch.tensor([7, 2], device=DEVICE)))
    row_pages = {0: 3, 1: 3, 2: 3, 4: 7, 5: 7, 8: 1, 10: 7, 11: 2}
    expected = y.clone()
    columns = used_columns(bounds, used)
    dora_rescale_reference(expected, b_store, bias, row_pages, [c for lo, hi in columns for c in range(lo, hi)])
    dora_rescale(y, b_store, bias, runs, columns)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    untouched = [i for i in range(12) if i not in row_pages]
    assert torch.equal(y[untouched], expected[untouched])


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("page_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("used", [(0, 1, 2), (0, 2)], ids=["qkv", "q-v"])
def test_dora_rows_in_every_backend_match_the_torch_ops(backend, page_dtype, with_bias, used):
    """A fused q|k|v call whose plan mixes DoRA and plain adapters: prefill segments long enough
    for the C++ kernel's tiles and shorter ones, decode rows of DoRA adapters apart and together.
    The C++ kernel rescales each row as it writes it; the Triton backend after the groups; the
    torch ops (checked against the reference above) are the oracle."""
    if backend == "triton" and page_dtype != torch.float32:
        pytest.skip("pages narrower than the activations are a CPU option")
    gen = torch.Generator().manual_seed(len(used) * 2 + with_bias)
    bounds, rank, num_pages = (0, 32, 48, 80), 4, 64
    a_store = (torch.randn(num_pages, 3, IN, generator=gen) / IN**0.5).to(page_dtype).to(DEVICE)
    b_store = (torch.rand(num_pages, OUT, generator=gen) + 0.5).to(page_dtype).to(DEVICE)  # magnitudes near 1
    bias = torch.randn(OUT, generator=gen).to(DEVICE) if with_bias else None
    x = torch.randn(24, IN, generator=gen).to(DEVICE)
    y0 = torch.randn(24, OUT, generator=gen).to(DEVICE)
    pages = [torch.arange(k * rank, (k + 1) * rank) for k in range(4)]  # adapters 0 and 2 DoRA: pages 60, 61
    plan = merge_plans(plan_segments([0, 9, 12, 17], [pages[0], pages[1], pages[2]], DEVICE),
                       plan_tokens([-1] * 17 + [0, 1, 2, 2, 3, -1, 0], pages, DEVICE))
    runs = ((0, 9, 60), (12, 17, 61), (17, 18, torch.tensor([60])), (19, 21, torch.tensor([61, 61])),
            (23, 24, torch.tensor([60])))
    plan = dataclasses.replace(plan, magnitude=MagnitudeRuns(runs).to(DEVICE))
    results = {}
    for name in ("torch", backend):
        y = y0.clone()
        select_backend(name, DEVICE)(y, x, a_store, b_store, plan, bounds, used, bias)
        results[name] = y
    plain = y0.clone()
    select_backend("torch", DEVICE)(plain, x, a_store, b_store, dataclasses.replace(plan, magnitude=None), bounds,
                                    used, bias)
    assert not torch.allclose(plain[:9], results["torch"][:9])  # the rescale is there to see
    torch.testing.assert_close(results[backend], results["torch"], rtol=1e-5, atol=1e-5)


def test_used_columns_merges_adjacent_kinds():
    assert used_columns((0, 32, 48, 64), (0, 1, 2)) == [(0, 64)]
    assert used_columns((0, 32, 48, 64), (0, 2)) == [(0, 32), (48, 64)]
    assert used_columns((0, 32, 48, 64), (1, 2)) == [(32, 64)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kinds", [1, 3])
def test_stores_whose_pages_are_one_row_of_memory_give_what_contiguous_stores_give(backend, kinds):
    """A pool with ``interleave`` keeps page p's A rows and B row in one row of memory: its stores are
    strided views, which every backend reads as it reads contiguous ones (the torch op's BGMV
    expand of a single-kind store too, by its gather path)."""
    from loramux.adapters.device_pool import page_stores

    gen = torch.Generator().manual_seed(6)
    ranks = [4, 16, 7]
    pages = _adapter_pages(ranks, gen)
    outs = FUSED_OUTS if kinds == 3 else (OUT,)
    bounds = [0]
    for o in outs:
        bounds.append(bounds[-1] + o)
    a = torch.randn(sum(ranks), kinds, IN, generator=gen) / IN**0.5
    b = torch.randn(sum(ranks), bounds[-1], generator=gen) / 4
    (ai, bi), = page_stores([(a.shape, b.shape)], torch.float32, DEVICE, interleave=True)
    ai.copy_(a), bi.copy_(b)
    assert not bi.is_contiguous() and bi.stride(0) == ai.stride(0)
    token_adapter = [-1 if i % 5 == 0 else i % len(ranks) for i in range(23)]
    for plan in (plan_tokens(token_adapter, pages), plan_segments([0, 6, 6, 17, 23], [pages[0], pages[1], None, pages[2]])):
        x = torch.randn(23, IN, generator=gen).to(DEVICE)
        y0 = torch.randn(23, bounds[-1], generator=gen).to(DEVICE)
        want, got = y0.clone(), y0.clone()
        op = select_backend(backend, DEVICE)
        op(want, x, a.to(DEVICE), b.to(DEVICE), plan.to(DEVICE), tuple(bounds))
        op(got, x, ai, bi, plan.to(DEVICE), tuple(bounds))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
