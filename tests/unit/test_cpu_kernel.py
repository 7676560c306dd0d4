"""The packaged C++ CPU kernel: built per ISA variant at install, the widest this CPU runs loaded."""

import ast
import collections
import contextlib
import importlib
import itertools
import os
import platform
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from loramux.server.ops import cpu_kernel
from loramux.server.ops.cpu_kernel import NO_KERNEL_ENV, VARIANTS, load_kernels, variants_for

ROOT = Path(__file__).resolve().parents[2]
needs_kernel = pytest.mark.skipif(os.environ.get(NO_KERNEL_ENV) == "1", reason=f"{NO_KERNEL_ENV}=1: no kernel is built")
each_variant = pytest.mark.parametrize("variant", variants_for(platform.machine(),
                                                               torch.backends.cpu.get_cpu_capability()))


@contextlib.contextmanager
def torch_threads(threads: int):
    """torch's intra-op threads set to ``threads`` inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def variant_module(variant: str):
    return importlib.import_module(f"loramux.server.ops._cpu_{variant}")


def test_variants_are_chosen_by_what_the_cpu_runs():
    assert variants_for("x86_64", "AVX512") == ["avx512", "avx2", "baseline"]
    assert variants_for("x86_64", "AVX2") == ["avx2", "baseline"]
    assert variants_for("AMD64", "DEFAULT") == ["baseline"]
    assert variants_for("aarch64", "DEFAULT") == variants_for("arm64", "SVE256") == ["neon"]
    assert variants_for("riscv64", "DEFAULT") == ["baseline"]


def test_setup_builds_the_variants_the_loader_looks_for():
    tree = ast.parse((ROOT / "setup.py").read_text())
    built = next(ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and node.targets[0].id == "VARIANTS")
    assert {m: set(v) for m, v in built.items()} == {m: {name for name, _ in v} for m, v in VARIANTS.items()}


@needs_kernel
def test_install_built_every_variant_of_this_machine_into_the_package_and_the_widest_loads():
    folder = Path(cpu_kernel.__file__).parent
    machine = platform.machine().lower()
    for name, _ in VARIANTS.get(machine, (("baseline", None),)):
        assert list(folder.glob(f"_cpu_{name}.*")), f"`make install` did not build the {name} variant into {folder}"
    assert load_kernels().variant == variants_for(machine, torch.backends.cpu.get_cpu_capability())[0]


@needs_kernel
@each_variant
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 2, 3, 4, 8, 12, 15, 31])
def test_every_variant_this_cpu_runs_matches_the_reference(variant, dtype, dora, rank):
    """Not only the widest: a CPU without AVX2 loads the baseline build, whose vector code differs.
    Segments of a tile or more (8 rows on AVX-512, 4 elsewhere) take the tiled path (bfloat16
    activations staged in float32), shorter ones and decode rows the per-row one, its pages 8 + 4 +
    3 at a time at rank 15, and 16 + 8 + 4 + 3 at rank 31 (float32 pages in the AVX-512 build; 8 at
    a time elsewhere), except float32 decode rows of a rank below 16 in the AVX-512 build (below 8
    in the AVX2 build), which go 16 / rank rows to a group (8 / rank), a group's pages side by side
    (the rows of each thread's share: partial groups). With ``dora``, the rows of adapters 0 and 2
    are DoRA rows, rescaled with a bias as written."""
    from loramux.server.ops import plan_segments, plan_tokens
    from loramux.server.ops.reference import bgmv_reference, dora_rescale_reference, sgmv_reference

    lora = variant_module(variant).lora
    gen = torch.Generator().manual_seed(5)
    in_f = 37  # rank and widths off every vector and tile multiple
    bounds = (0, 40, 56, 79)  # q | k | v of 40, 16 and 23 columns
    a = (torch.randn(4 * rank + 2, 3, in_f, generator=gen) / in_f**0.5).to(dtype)
    b = (torch.randn(4 * rank + 2, 79, generator=gen) / 4).to(dtype)
    b[-2:] = (1 + torch.randn(2, 79, generator=gen) / 8).to(dtype)  # DoRA's magnitude pages: g near 1
    pages = [torch.randperm(4 * rank, generator=gen)[:rank] for _ in range(3)]
    seg_starts, seg_pages = [0, 9, 10, 10, 17], [pages[0], pages[1], None, pages[2]]
    cases = [(plan_segments(seg_starts, seg_pages), lambda ref, j, cols: sgmv_reference(
        ref, x.float(), a[:, j].float(), b[:, cols].float(), seg_starts, seg_pages))]
    token_adapter = [0, 2, -1, 1, 0, 2, 2]
    cases.append((plan_tokens(token_adapter, pages), lambda ref, j, cols: bgmv_reference(
        ref, x.float(), a[:, j].float(), b[:, cols].float(), token_adapter, pages)))
    row_adapters = [[0] * 9 + [1] + [2] * 7, token_adapter]
    for (plan, reference), adapter_of in zip(cases, row_adapters, strict=True):
        g = plan.groups[0]
        n = len(adapter_of)
        x = torch.randn(n, in_f, generator=gen).to(dtype)
        y = torch.randn(n, 79, generator=gen).to(dtype)
        ref = y.float().clone()
        for j in (0, 2):  # q and v, not k: k's columns stay as they were
            cols = slice(bounds[j], bounds[j + 1])
            out = ref[:, cols].clone()
            reference(out, j, cols)
            ref[:, cols] = out
        ends = g.group_ends if g.group_ends is not None else torch.empty(0, dtype=torch.int32)
        mags, bias = torch.empty(0, dtype=torch.long), torch.empty(0, dtype=dtype)
        if dora:  # adapters 0 and 2
            row_pages = {i: 4 * rank + u // 2 for i, u in enumerate(adapter_of) if u in (0, 2)}
            mags = torch.tensor([row_pages.get(i, -1) for i in range(n)])
            bias = torch.randn(79, generator=gen).to(dtype)
            dora_rescale_reference(ref, b.float(), bias.float(), row_pages, [*range(0, 40), *range(56, 79)])
        lora(y, x, a, b, g.rows, g.pages, ends, rank, list(bounds), [0, 2], mags, bias)
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        assert (y.float() - ref).abs().max() <= tol * ref.abs().max().clamp(min=1)


@needs_kernel
@each_variant
@pytest.mark.parametrize("page_dtype", [torch.float16, torch.bfloat16])
def test_every_variant_widens_narrow_pages_exactly(variant, page_dtype):
    """--lora-dtype float16/bfloat16 under float32 activations: each build (the baseline without
    F16C too) gives what it gives on the pages widened to float32, to float32 rounding (the
    compiler may vectorise the sums in another order), on the tiled prefill path (segments of 4+
    rows), the per-row one, and decode rows."""
    from loramux.server.ops import plan_segments, plan_tokens

    lora = variant_module(variant).lora
    gen = torch.Generator().manual_seed(6)
    rank, in_f = 15, 37
    bounds = [0, 40, 56, 79]
    a = (torch.randn(4 * rank, 3, in_f, generator=gen) / in_f**0.5).to(page_dtype)
    b = (torch.randn(4 * rank, 79, generator=gen) / 4).to(page_dtype)
    pages = [torch.randperm(4 * rank, generator=gen)[:rank] for _ in range(3)]
    plans = [plan_segments([0, 9, 10, 10, 17], [pages[0], pages[1], None, pages[2]]),
             plan_tokens([0, 2, -1, 1, 0, 2, 2], pages)]
    for plan in plans:
        g = plan.groups[0]
        n = 17 if g.group_ends is not None else 7
        x, y = torch.randn(n, in_f, generator=gen), torch.randn(n, 79, generator=gen)
        ends = g.group_ends if g.group_ends is not None else torch.empty(0, dtype=torch.int32)
        narrow, wide = y.clone(), y.clone()
        none = torch.empty(0, dtype=torch.long), torch.empty(0)
        lora(narrow, x, a, b, g.rows, g.pages, ends, rank, bounds, [0, 2], *none)
        lora(wide, x, a.float(), b.float(), g.rows, g.pages, ends, rank, bounds, [0, 2], *none)
        assert (narrow - wide).abs().max() <= 1e-6 * wide.abs().max() and not torch.equal(narrow, y)


# (a value in A, a value in B, the scaling): a NaN, an Inf, an overflow of the scaling, and 7e4
# (past float16's 65504 only)
BAD_VALUES = ((float("nan"), 1.0, 1.0), (1.0, float("-inf"), 1.0), (1.0, 3e38, 2.0), (1.0, 7e4, 1.0))


@needs_kernel
@each_variant
@pytest.mark.parametrize("dst", [torch.float32, torch.float16, torch.bfloat16])
def test_convert_adapter_writes_the_serving_layout_exactly(variant, dst):
    """A and (s * B).T, cast (B to float32 first, then scaled, then rounded once), padded with zero
    rows to the rank, at each module's offset, from every file dtype; nothing outside is touched.
    It reports a NaN or Inf it writes, including an overflow of the scaling or of the cast."""
    convert = variant_module(variant).convert_adapter
    gen = torch.Generator().manual_seed(3)
    rank, shapes = 5, [(37, 70, 5), (70, 19, 3), (8, 129, 1)]  # (in, out, r): off every vector and block width
    for src in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        a = [torch.randn(r, i, generator=gen, dtype=torch.float64).to(src) for i, o, r in shapes]
        b = [torch.randn(o, r, generator=gen, dtype=torch.float64).to(src) for i, o, r in shapes]
        a[0][0] *= 1e-6  # float16 subnormals (and zeros) in the cast
        if src == torch.float32:  # halfway between two bfloat16 or float16 values: ties to even
            a[1][0, :16] = torch.tensor([1 + k * 2**-8 for k in range(8)] + [1 + k * 2**-11 for k in range(8)])
        scales = [0.3, 1.0, 7.25]
        offsets, at = [], 3  # a gap before each module, which must keep its sentinel
        for i, o, _ in shapes:
            offsets.append(at)
            at += rank * (i + o) + 3
        flat = torch.full((at,), -5.0, dtype=dst)
        assert convert(flat, a, b, offsets, scales, rank)
        expected = torch.full((at,), -5.0, dtype=dst)
        for (i, o, r), ai, bi, s, off in zip(shapes, a, b, scales, offsets, strict=True):
            a_ref, b_ref = torch.zeros(rank, i, dtype=dst), torch.zeros(rank, o, dtype=dst)
            a_ref[:r] = ai.to(dst)
            b_ref[:r] = (bi.float() * s).T.to(dst)
            expected[off : off + rank * (i + o)] = torch.cat([a_ref.flatten(), b_ref.flatten()])
        assert torch.equal(flat, expected), src
    # from float32 files (a cast on the way) and from files already in the pages' dtype (copied as they are)
    for src, (bad_a, bad_b, s) in itertools.product({torch.float32, dst}, BAD_VALUES):
        a, b = torch.ones(2, 16), torch.ones(9, 2)
        a[1, 15], b[8, 0] = bad_a, bad_b
        finite = convert(torch.empty(2 * 25, dtype=dst), [a.to(src)], [b.to(src)], [0], [s], 2)
        assert finite == (bad_b == 7e4 and torch.float16 not in (src, dst)), (src, bad_a, bad_b, s)


@needs_kernel
@each_variant
@pytest.mark.parametrize("dst", [torch.float32, torch.bfloat16])
def test_convert_adapter_transposes_high_ranks_exactly(variant, dst):
    """Ranks past 64 take B in blocks of fewer output columns (8192 values a block): the same
    layout as the torch path's, the last block a partial one."""
    gen = torch.Generator().manual_seed(6)
    for r, out in ((100, 300), (600, 40)):
        a, b = torch.randn(r, 17, generator=gen), torch.randn(out, r, generator=gen)
        flat = torch.empty(r * (17 + out), dtype=dst)
        assert variant_module(variant).convert_adapter(flat, [a], [b], [0], [0.5], r)
        assert torch.equal(flat, torch.cat([a.to(dst).flatten(), (b * 0.5).T.to(dst).flatten()])), (r, out)


@needs_kernel
@each_variant
def test_copy_rows_writes_each_row_to_its_page_and_nothing_else(variant):
    copy_rows = variant_module(variant).copy_rows
    gen = torch.Generator().manual_seed(4)
    store = torch.randn(9, 2, 13, generator=gen)  # a fused store: kind j's rows are store[:, j], row stride 26
    wide = torch.randn(9, 30, generator=gen).to(torch.bfloat16)
    index = torch.tensor([7, 0, 4])
    src = [torch.randn(3, 13, generator=gen), torch.randn(3, 13, generator=gen), torch.randn(3, 17).to(torch.bfloat16)]
    expected = [store.clone(), wide.clone()]
    expected[0][:, 0].index_copy_(0, index, src[0])
    expected[0][:, 1].index_copy_(0, index, src[1])
    expected[1][:, 5:22].index_copy_(0, index, src[2])
    copy_rows([store[:, 0], store[:, 1], wide[:, 5:22]], src, index)
    assert torch.equal(store, expected[0]) and torch.equal(wide, expected[1])
    # rows of many 64-byte lines, starting off a line boundary: a head, whole lines (non-temporal
    # stores where the build has them) and a tail
    long = torch.randn(9, 3, 101, generator=gen)  # kind 1 starts 404 bytes into a page
    rows = torch.randn(3, 101, generator=gen)
    expected = long.clone()
    expected[:, 1].index_copy_(0, index, rows)
    copy_rows([long[:, 1]], [rows], index)
    assert torch.equal(long, expected)
    with pytest.raises(RuntimeError, match="out of range"):
        copy_rows([store[:, 0]], [src[0]], torch.tensor([1, 9, 2]))


@needs_kernel
@each_variant
@pytest.mark.parametrize("dst", [torch.float32, torch.float16, torch.bfloat16])
def test_convert_to_pages_writes_what_convert_adapter_then_copy_rows_write(variant, dst):
    """Straight into page rows (a fused store's strided slices, rows off 64-byte lines), from every
    file dtype, padded with zero rows past each module's rank: the values of convert_adapter's
    layout copied into the pages, and nothing else touched. NaN, Inf and overflows are reported."""
    kernel = variant_module(variant)
    gen = torch.Generator().manual_seed(5)
    index = torch.tensor([6, 1, 3, 8, 0])  # R = 5 pages
    shapes = [(37, 70, 5), (37, 19, 3), (101, 129, 1)]  # (in, out, r); the first two share an input
    for src in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        a = [torch.randn(r, i, generator=gen, dtype=torch.float64).to(src) for i, o, r in shapes]
        b = [torch.randn(o, r, generator=gen, dtype=torch.float64).to(src) for i, o, r in shapes]
        scales = [0.3, 1.0, 7.25]
        fused_a = torch.full((9, 2, 37), -5.0, dtype=dst)  # kinds 0 and 1: row stride 74
        fused_b = torch.full((9, 70 + 19), -5.0, dtype=dst)
        lone_a, lone_b = torch.full((9, 101), -5.0, dtype=dst), torch.full((9, 129), -5.0, dtype=dst)
        stores_a, stores_b = [fused_a[:, 0], fused_a[:, 1], lone_a], [fused_b[:, :70], fused_b[:, 70:], lone_b]
        expected = [t.clone() for t in (fused_a, fused_b, lone_a, lone_b)]
        flat = torch.empty(sum(5 * (i + o) for i, o, _ in shapes), dtype=dst)
        offsets = [0, 5 * (37 + 70), 5 * (37 + 70 + 37 + 19)]
        assert kernel.convert_adapter(flat, a, b, offsets, scales, 5)
        ref_a, ref_b = [expected[0][:, 0], expected[0][:, 1], expected[2]], [expected[1][:, :70], expected[1][:, 70:],
                                                                             expected[3]]
        for (i, o, _), off, ra, rb in zip(shapes, offsets, ref_a, ref_b, strict=True):
            ra.index_copy_(0, index, flat[off : off + 5 * i].view(5, i))
            rb.index_copy_(0, index, flat[off + 5 * i : off + 5 * (i + o)].view(5, o))
        assert kernel.convert_to_pages(stores_a, stores_b, a, b, scales, index)
        for got, want in zip((fused_a, fused_b, lone_a, lone_b), expected, strict=True):
            assert torch.equal(got, want), src
    for src, (bad_a, bad_b, s) in itertools.product({torch.float32, dst}, BAD_VALUES):
        a, b = torch.ones(2, 16), torch.ones(9, 2)
        a[1, 15], b[8, 0] = bad_a, bad_b
        finite = kernel.convert_to_pages([torch.empty(4, 16, dtype=dst)], [torch.empty(4, 9, dtype=dst)], [a.to(src)],
                                         [b.to(src)], [s], torch.tensor([2, 0]))
        assert finite == (bad_b == 7e4 and torch.float16 not in (src, dst)), (src, bad_a, bad_b, s)
    with pytest.raises(RuntimeError, match="out of range"):
        kernel.convert_to_pages([torch.empty(4, 16)], [torch.empty(4, 9)], [torch.ones(2, 16)], [torch.ones(9, 2)],
                                [1.0], torch.tensor([2, 4]))


@needs_kernel
@each_variant
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [  # (rows, heads, kv heads, head dim, block size, window, alibi)
    (5, 9, 3, 64, 16, None, False),  # the default model's shape: the vector path (float32, head dim 64)
    (3, 8, 2, 128, 16, None, False),  # head dim 128, KV rows 1 KiB apart
    (2, 16, 8, 128, 4, None, False),  # KV rows 4 KiB apart (one head's rows in few cache sets)
    (1, 12, 3, 64, 16, None, False),  # one row: fewer heads a task, so both threads get work
    (4, 4, 4, 64, 8, 21, True),  # sliding window and ALiBi on the vector path
    (4, 6, 2, 24, 4, None, True),  # a head dim the vector path does not take
    (4, 8, 4, 64, 16, 21, 1.5),  # Gemma 2's soft cap (the scalar path), with a window
    (3, 8, 2, 256, 16, None, 0.75),  # Gemma's head dim 256, a cap that changes the softmax more
    (4, 8, 2, 64, 16, 21, "sinks"),  # GPT-OSS's attention sinks on the vector path, with a window
    (3, 6, 2, 24, 4, None, "sinks"),  # and on the scalar path
    (5, 8, 2, 64, 16, None, "chunk"),  # Llama 4's chunked attention (chunks of 16 positions) on the vector path
    (5, 6, 2, 24, 4, None, "chunk"),  # and on the scalar path
])
def test_every_variant_decode_attention_matches_the_oracle(variant, dtype, case):
    """Lengths off every multiple of 8 and 16 (the vector path's groups of keys) and of the block size,
    scattered block tables, every variant this CPU runs; ALiBi (True), a soft cap (a float) or
    attention sinks ("sinks") or chunks ("chunk")."""
    from loramux.server.ops.attention import paged_attention_reference

    D, H, KV, hd, bs, window, alibi = case
    softcap, alibi = (alibi, False) if isinstance(alibi, float) else (None, alibi)
    sinks, alibi = (torch.randn(H, generator=torch.Generator().manual_seed(H)) * 2 + 1, False) if alibi == "sinks" \
        else (None, alibi)
    chunk_size, alibi = (16, False) if alibi == "chunk" else (None, alibi)
    gen = torch.Generator().manual_seed(D * 1000 + hd)
    lengths = torch.tensor([1, 17, 40, 131, 64][:D] if D > 1 else [203])
    max_blocks = -(-int(lengths.max()) // bs)
    num_blocks = D * max_blocks
    k = torch.randn(num_blocks + 1, bs, KV, hd, generator=gen).to(dtype)
    v = torch.randn(num_blocks + 1, bs, KV, hd, generator=gen).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen).view(D, max_blocks)
    q = (torch.randn(D, H, hd, generator=gen) * 3 / hd**0.25).to(dtype)  # peaked weights: exp's error shows
    slopes = torch.rand(H, generator=gen) * 0.5 if alibi else None
    out = torch.empty_like(q)
    variant_module(variant).paged_decode(out, q, k, v, tables, lengths, 0.3, window or 0,
                                         slopes if alibi else torch.empty(0), softcap or 0.0,
                                         torch.empty(0) if sinks is None else sinks, chunk_size or 0)
    expected = paged_attention_reference(q, k, v, tables, lengths - 1, 0.3, window, slopes, softcap, sinks,
                                         chunk_size).float()
    if softcap is not None or sinks is not None or chunk_size:  # the cap (sinks, chunks) change these rows' outputs
        assert not torch.allclose(expected, paged_attention_reference(q, k, v, tables, lengths - 1, 0.3,
                                                                      window).float(), atol=1e-2)
    tol = 5e-6 if dtype == torch.float32 else 2e-2  # float32: the vector exp within a few ulp
    assert torch.allclose(out.float(), expected, atol=tol, rtol=tol)


@needs_kernel
@each_variant
@pytest.mark.parametrize("hd", [64, 24])
def test_decode_attention_keeps_a_nan_in_its_own_row(variant, hd):
    """A NaN key makes its row's output NaN (the engine then fails that request alone); the other
    rows, whose keys are finite, stay exact."""
    from loramux.server.ops.attention import paged_attention_reference

    gen = torch.Generator().manual_seed(9)
    k, v = torch.randn(2, 2, 16, 4, hd, generator=gen)
    tables, lengths = torch.tensor([[0], [1]]), torch.tensor([16, 16])
    k[0, 5, 1, 3] = float("nan")  # row 0's key 5, KV head 1
    q = torch.randn(2, 8, hd, generator=gen)
    out = torch.empty_like(q)
    variant_module(variant).paged_decode(out, q, k, v, tables, lengths, 0.3, 0, torch.empty(0), 0.0, torch.empty(0), 0)
    assert out[0, 2:4].isnan().all() and not out[0, :2].isnan().any()  # heads 2, 3 read KV head 1
    expected = paged_attention_reference(q[1:], k, v, tables[1:], lengths[1:] - 1, 0.3)
    assert torch.allclose(out[1], expected[0], atol=5e-6, rtol=5e-6)


@needs_kernel
@each_variant
@pytest.mark.parametrize("rows", [*range(1, 34), 47, 64, 130, 171, 515])
def test_few_rows_linear_matches_torch(variant, rows):
    """Row counts the kernel takes (two paths: up to 6 rows, and tiles from 7: decode steps, and
    prefill steps' hundreds of rows, given to the tiles in chunks of x: 84 rows of 1540 inputs, so
    171 ends in a chunk of 3 rows), inputs off its vector width (16 lanes in the AVX-512 build, 8
    in the others), numbers of outputs off its pairs and tiles (the last is computed with a row
    repeated), with and without a bias, and a strided x (rows of a wider buffer); the prefetches run
    past a weight row's end."""
    gen = torch.Generator().manual_seed(rows)
    few_rows_linear = variant_module(variant).few_rows_linear
    for out_features, in_features in ((1728, 576), (577, 1540), (1, 7), (33, 8)):
        w = torch.randn(out_features, in_features, generator=gen)
        wide = torch.randn(rows, in_features + 3, generator=gen)
        x = wide[:, 1 : in_features + 1]
        bias = torch.randn(out_features, generator=gen)
        for b in (None, bias):
            got = few_rows_linear(x, w, torch.empty(0) if b is None else b, torch.empty(0))
            torch.testing.assert_close(got, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="at least 1 row"):
        few_rows_linear(torch.randn(0, 8), torch.randn(4, 8), torch.empty(0), torch.empty(0))
    with pytest.raises(RuntimeError, match="float32"):
        few_rows_linear(torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8), torch.empty(0), torch.empty(0))


@needs_kernel
@each_variant
def test_few_rows_linear_gives_a_row_the_same_bits_whatever_the_rows_beside_it(variant):
    """Both paths (up to 6 rows, and tiles from 7) sum each output in the same order, so a row's
    projections do not change with the batch or prefill step it runs in: row 0 of every row count
    to 64, and of a prefill step's 130, is row 0 alone, bit for bit, for float32 and int8 weights,
    inputs on and off the vector width; and every row of 171 (chunks of x of 84, 84 and 3 rows for
    1540 inputs) is that row alone."""
    from loramux.server.ops.quantize import quantize_int8

    gen = torch.Generator().manual_seed(0)
    few_rows_linear = variant_module(variant).few_rows_linear
    for out_features, in_features in ((577, 1540), (33, 8), (20, 576)):
        w = torch.randn(out_features, in_features, generator=gen)
        x = torch.randn(171, in_features, generator=gen)
        bias = torch.randn(out_features, generator=gen)
        for weight, scale in ((w, torch.empty(0)), quantize_int8(w)):
            alone = few_rows_linear(x[:1], weight, bias, scale)[0]
            for rows in (*range(2, 65), 130):
                assert torch.equal(few_rows_linear(x[:rows], weight, bias, scale)[0], alone), rows
            each = torch.cat([few_rows_linear(x[r : r + 1], weight, bias, scale) for r in range(171)])
            assert torch.equal(few_rows_linear(x, weight, bias, scale), each)


@needs_kernel
@each_variant
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 6, 7, 8, 13, 32, 33, 64, 171])
def test_linear_lora_is_the_linear_then_lora_bit_for_bit(variant, rows, threads):
    """linear_lora (the base tiles and the decode rows' LoRA side by side) gives what
    few_rows_linear then lora give, bit for bit: rows taken by the few-row path (up to 6: the
    linear, then the LoRA rows), by the tiles (claimed from both ends by 1, 2 or 3 threads), and a
    long x (171 rows of 1540 inputs: chunks); two ranks in one call (15 and 7, or 31 (16 + 8 + 4 +
    3 pages) and 16), a subset of the rows with LoRA, q and v of a fused q|k|v store (k's columns
    untouched), a strided x, with and without a bias; rows of a rank below 16 go in groups in the
    AVX-512 build (below 8 in the AVX2 build): 15 and 7, 8 and 4, 1 and 2."""
    kernels = variant_module(variant)
    gen = torch.Generator().manual_seed(rows)
    with torch_threads(threads):
        for in_f, bounds, ranks in ((37, (0, 40, 56, 79), (15, 7)), (1540, (0, 96, 128, 160), (31, 16)),
                                    (37, (0, 40, 56, 79), (8, 4)), (70, (0, 40, 56, 79), (1, 2))):
            out_f = bounds[-1] + 5  # columns past the LoRA's: the base linear's alone
            w = torch.randn(out_f, in_f, generator=gen) / in_f**0.5
            x = torch.randn(rows, in_f + 2, generator=gen)[:, 1 : in_f + 1]
            a = torch.randn(4 * ranks[0], 3, in_f, generator=gen) / in_f**0.5
            b = torch.randn(4 * ranks[0], bounds[-1], generator=gen)
            with_lora = [r for r in range(rows) if r % 3 != 1] or [0]
            groups = [torch.tensor(with_lora[k::2], dtype=torch.long) for k in (0, 1)]  # rank ranks[k]
            pages = [torch.cat([torch.randperm(4 * ranks[0], generator=gen)[:r] for _ in g]) if g.numel()
                     else torch.empty(0, dtype=torch.long) for g, r in zip(groups, ranks, strict=True)]
            starts = torch.tensor([0, *[r for g, r in zip(groups, ranks, strict=True) for _ in g]]).cumsum(0)
            for bias in (torch.empty(0), torch.randn(out_f, generator=gen)):
                want = kernels.few_rows_linear(x, w, bias, torch.empty(0))
                for g, p, r in zip(groups, pages, ranks, strict=True):
                    if g.numel():
                        kernels.lora(want, x, a, b, g, p, torch.empty(0, dtype=torch.int32), r, list(bounds), [0, 2],
                                     torch.empty(0, dtype=torch.long), torch.empty(0))
                got = kernels.linear_lora(x, w, bias, a, b, torch.cat(groups), starts, torch.cat(pages), list(bounds),
                                          [0, 2])
                assert torch.equal(got, want), (in_f, bias.numel())
    with pytest.raises(RuntimeError, match="float32"):
        kernels.linear_lora(torch.randn(8, 4), torch.randn(3, 4), torch.empty(0), torch.randn(2, 1, 4, dtype=torch.float64),
                            torch.randn(2, 3, dtype=torch.float64), torch.tensor([0]), torch.tensor([0, 1]),
                            torch.tensor([1]), [0, 3], [0])
    with pytest.raises(RuntimeError, match="starts"):
        kernels.linear_lora(torch.randn(8, 4), torch.randn(3, 4), torch.empty(0), torch.randn(2, 1, 4),
                            torch.randn(2, 3), torch.tensor([0]), torch.tensor([0, 2]), torch.tensor([1]), [0, 3], [0])


@needs_kernel
@each_variant
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_ops_give_the_same_bits_over_pages_whose_a_and_b_rows_are_one_row_of_memory(variant, dtype):
    """A pool built for the C++ op (DevicePool's ``interleave``) keeps page p's A rows and B row side
    by side, so the stores are strided views: ``lora`` (decode rows of ranks grouped and not, a
    prefill segment) and ``linear_lora`` give over them exactly what they give over separate
    contiguous stores, with one thread and two."""
    from loramux.adapters.device_pool import page_stores
    from loramux.server.ops import plan_segments, plan_tokens

    kernels = variant_module(variant)
    gen = torch.Generator().manual_seed(23)
    in_f, bounds = 37, [0, 40, 56, 79]
    e32, e64, e = torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=dtype)
    for rank in (1, 4, 16, 31):
        pages = [torch.randperm(4 * rank, generator=gen)[:rank] for _ in range(3)]
        a = (torch.randn(4 * rank, 3, in_f, generator=gen) / in_f**0.5).to(dtype)
        b = torch.randn(4 * rank, 79, generator=gen).to(dtype)
        (ai, bi), = page_stores([(a.shape, b.shape)], dtype, "cpu", interleave=True)
        ai.copy_(a), bi.copy_(b)
        align = 64 // a.element_size()  # A's 111 and B's 79 from 64-byte boundaries
        assert ai.stride(0) == bi.stride(0) == -(-111 // align) * align + -(-79 // align) * align
        x = torch.randn(17, in_f, generator=gen).to(dtype)
        y0 = torch.randn(17, 79, generator=gen).to(dtype)
        for plan in (plan_tokens([i % 4 - 1 for i in range(17)], pages), plan_segments([0, 9, 10, 17], pages)):
            g = plan.groups[0]
            ends = e32 if g.group_ends is None else g.group_ends
            for threads in (1, 2):
                with torch_threads(threads):
                    want, got = y0.clone(), y0.clone()
                    kernels.lora(want, x, a, b, g.rows, g.pages, ends, rank, bounds, [0, 2], e64, e)
                    kernels.lora(got, x, ai, bi, g.rows, g.pages, ends, rank, bounds, [0, 2], e64, e)
                    assert torch.equal(got, want), (rank, threads, g.group_ends is None)
                    if dtype == torch.float32 and g.group_ends is None:
                        w = torch.randn(84, in_f, generator=gen)
                        starts = torch.arange(g.num_rows + 1) * rank
                        assert torch.equal(kernels.linear_lora(x, w, e, ai, bi, g.rows, starts, g.pages, bounds, [0, 2]),
                                           kernels.linear_lora(x, w, e, a, b, g.rows, starts, g.pages, bounds, [0, 2]))


@needs_kernel
@each_variant
def test_float32_decode_rows_of_every_rank_to_17_match_the_reference(variant):
    """Each rank below 16 has a group shape of its own in the AVX-512 build (16 // rank rows of
    rank pages; below 8 in the AVX2 build), 16 and 17 go row by row: every rank from 1 to 17
    against the reference, 21 decode rows of seven adapters in no order (full and partial groups,
    with one thread and two), q and v of a fused q|k|v store, inputs and columns off the vector
    width."""
    from loramux.server.ops import plan_tokens
    from loramux.server.ops.reference import bgmv_reference

    lora = variant_module(variant).lora
    gen = torch.Generator().manual_seed(17)
    in_f, bounds = 37, [0, 40, 56, 79]
    token_adapter = [i * 5 % 7 for i in range(21)]
    e32, e64, e = torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.long), torch.empty(0)
    for rank in range(1, 18):
        a = torch.randn(7 * rank, 3, in_f, generator=gen) / in_f**0.5
        b = torch.randn(7 * rank, 79, generator=gen)
        pages = [torch.randperm(7 * rank, generator=gen)[:rank] for _ in range(7)]
        g = plan_tokens(token_adapter, pages).groups[0]
        x = torch.randn(21, in_f, generator=gen)
        y0 = torch.randn(21, 79, generator=gen)
        want = y0.clone()
        for j in (0, 2):
            cols = slice(bounds[j], bounds[j + 1])
            out = want[:, cols].clone()
            bgmv_reference(out, x, a[:, j], b[:, cols], token_adapter, pages)
            want[:, cols] = out
        for threads in (1, 2):
            y = y0.clone()
            with torch_threads(threads):
                lora(y, x, a, b, g.rows, g.pages, e32, rank, bounds, [0, 2], e64, e)
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4, msg=f"rank {rank}, {threads} threads")


@needs_kernel
@each_variant
@pytest.mark.parametrize("rank", [1, 2, 3, 4, 6, 8, 15, 16])
def test_a_decode_rows_lora_is_the_same_bits_whatever_the_rows_beside_it(variant, rank):
    """Decode rows of a small rank go in groups of up to 16 pages (float32, AVX-512 build), each row's
    sums kept apart from the others': a row's LoRA is the same bits alone, first, inside or last of
    a full group, in a partial one, with rows in any order and between rows of another rank, and
    whether the other threads take a share of the rows or not."""
    kernels = variant_module(variant)
    gen = torch.Generator().manual_seed(rank)
    in_f, bounds, n = 37, [0, 40, 56, 79], 40
    a = torch.randn(40 * rank, 3, in_f, generator=gen) / in_f**0.5
    b = torch.randn(40 * rank, 79, generator=gen)
    x = torch.randn(n, in_f, generator=gen)
    pages = [torch.randperm(40 * rank, generator=gen)[:rank] for _ in range(n)]
    e32, e64, e = torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.long), torch.empty(0)

    def lora(rows, threads=2):
        y = torch.zeros(n, 79)
        with torch_threads(threads):
            kernels.lora(y, x, a, b, torch.tensor(rows), torch.cat([pages[r] for r in rows]), e32, rank, bounds,
                         [0, 1, 2], e64, e)
        return y

    every = lora(list(range(n)))
    for rows in ([0], [15], [16], [39], [39, 3, 17, 2, 30], list(range(5, 22))):
        got = lora(rows)
        assert torch.equal(got[rows], every[rows]), rows
    assert torch.equal(lora(list(range(n)), threads=1), every)
    # through linear_lora, the rows of this rank between rows of rank 3
    w = torch.randn(79, in_f, generator=gen)
    other = torch.randperm(40 * rank, generator=gen)[:3]
    rows = torch.tensor([0, 1, *range(2, 20), 20])
    row_pages = [other, pages[1], *pages[2:20], other]
    starts = torch.tensor([0, *[p.numel() for p in row_pages]]).cumsum(0)
    base = kernels.few_rows_linear(x, w, e, e)
    want = base.clone()
    kernels.lora(want, x, a, b, rows[1:-1], torch.cat(row_pages[1:-1]), e32, rank, bounds, [0, 1, 2], e64, e)
    kernels.lora(want, x, a, b, rows[[0, -1]], torch.cat([other, other]), e32, 3, bounds, [0, 1, 2], e64, e)
    got = kernels.linear_lora(x, w, e, a, b, rows, starts, torch.cat(row_pages), bounds, [0, 1, 2])
    assert torch.equal(got, want)


@needs_kernel
def test_a_fused_linear_takes_the_one_call_only_where_it_gives_the_same_bits():
    """A q|k|v FusedLoRALinear over the C++ ops: with the base linear's kernel rows given to the op
    (TorchLoRA.use_base_linear), a decode plan of two ranks (two per-row groups, one row without an
    adapter) takes linear_lora once for both, the same y as the linear then the op, and so does a
    step of decode rows and a prefill chunk's segments (which follow the call); where the kernel
    is not the base linear at that count, or the plan is in segments or has DoRA rows, with_linear
    declines (None) and the module runs the linear then the op."""
    from loramux.server.models.layers import FusedLoRALinear
    from loramux.server.ops import plan_segments, plan_tokens
    from loramux.server.ops.linear import select_base_linear
    from loramux.server.ops.plan import LoRAPlan, MagnitudeRuns
    from loramux.server.ops.torch_ops import TorchLoRA

    kernels = load_kernels()
    gen = torch.Generator().manual_seed(1)
    in_f, outs, n = 40, (24, 8, 8), 9
    fused = FusedLoRALinear([torch.randn(o, in_f, generator=gen) for o in outs], [None] * 3, ("q", "k", "v"), 0)
    fused.linear = select_base_linear(kernels, range(1, 33))
    fused.a_store = torch.randn(49, 3, in_f, generator=gen) / in_f**0.5
    fused.b_store = torch.randn(49, sum(outs), generator=gen)
    adapters = [torch.arange(0, 8), torch.arange(8, 24), torch.arange(24, 40)]  # ranks 8, 16, 16
    decode = plan_tokens([0, 1, -1, 2, 1, 0, 2, 2, 1], adapters)
    assert len(decode.groups) == 2
    x = torch.randn(n, in_f, generator=gen)
    plain, one_call = TorchLoRA(kernels.lora), TorchLoRA(kernels.lora)
    one_call.use_base_linear(kernels.linear_lora, range(1, 33))
    calls = []
    spy = lambda *args: calls.append(args) or kernels.linear_lora(*args)  # noqa: E731
    one_call._linear_lora = spy
    for used in ((0, 1, 2), (0, 2)):
        plans = {("q", "k", "v"): [(used, decode)]}
        assert torch.equal(fused(x, plans, one_call), fused(x, plans, plain))
    assert len(calls) == 2
    # a step of decode rows (0-8) and a prefill chunk's segments (rows 9-12): the segments after the call
    mixed = LoRAPlan(plan_tokens([0, 1, -1, 2, 1, 0, 2, 2, 1, -1, -1, -1, -1], adapters).groups
                     + plan_segments([9, 11, 13], [adapters[0], adapters[2]]).groups)
    x13 = torch.randn(13, in_f, generator=gen)
    plans = {("q", "k", "v"): [((0, 1, 2), mixed)]}
    assert torch.equal(fused(x13, plans, one_call), fused(x13, plans, plain))
    assert len(calls) == 3
    segments = plan_segments([0, 4, 9], [adapters[1], adapters[2]])
    dora = LoRAPlan(decode.groups, MagnitudeRuns(((0, 1, 48),)))
    for rows, plan in ((n, segments), (n, dora), (40, decode)):
        xr = torch.randn(rows, in_f, generator=gen)
        assert one_call.with_linear(xr, fused.weight, None, fused.a_store, fused.b_store, plan, fused.bounds) is None
    assert len(calls) == 3


@needs_kernel
@each_variant
@pytest.mark.parametrize("rows", [*range(1, 18), 31, 47, 64])
def test_few_rows_linear_of_int8_weights_matches_the_dequantized_linear(variant, rows):
    """int8 rows with a scale each: the linear by Ŵ = q * s in float32 (ops/quantize.py), on both
    paths, shapes off the vector width and the tiles, with and without a bias, a strided x, a row
    of zeros (scale 1) and the extreme values -127 and 127; a scale that does not fit is refused."""
    from loramux.server.ops.quantize import dequantize_int8, quantize_int8

    gen = torch.Generator().manual_seed(rows)
    few_rows_linear = variant_module(variant).few_rows_linear
    for out_features, in_features in ((1728, 576), (577, 1540), (1, 7), (33, 8)):
        w = torch.randn(out_features, in_features, generator=gen)
        w[-1] = 0
        q, scale = quantize_int8(w)
        assert (q[:-1].abs().amax(1) == 127).all() and (q[-1] == 0).all() and scale[-1] == 1
        x = torch.randn(rows, in_features + 3, generator=gen)[:, 1 : in_features + 1]
        bias = torch.randn(out_features, generator=gen)
        for b in (None, bias):
            got = few_rows_linear(x, q, torch.empty(0) if b is None else b, scale)
            expected = torch.nn.functional.linear(x, dequantize_int8(q, scale), b)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    q, scale = quantize_int8(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="scale"):
        few_rows_linear(torch.randn(2, 8), q, torch.empty(0), scale[:3])
    with pytest.raises(RuntimeError, match="scale"):
        few_rows_linear(torch.randn(2, 8), q.float(), torch.empty(0), scale)


class RecordingKernels:
    """A stand-in for the C++ module's few_rows_linear: torch's result, each call's row count kept."""

    def __init__(self):
        self.calls = []

    def few_rows_linear(self, x, w, b, scale):
        self.calls.append(x.shape[0])
        return torch.nn.functional.linear(x, w, b if b.numel() else None)


def test_base_linear_takes_the_kernel_at_exactly_its_row_counts():
    """select_base_linear: the kernel for float32 x of the given row counts, F.linear otherwise
    (other counts, other dtypes, a weight without unit column stride); no counts: F.linear itself."""
    from loramux.server.ops.linear import select_base_linear

    kernels = RecordingKernels()
    linear = select_base_linear(kernels, {1, 4, 16, 64})
    w, bias = torch.randn(5, 4), torch.randn(5)
    for rows in (1, 2, 4, 15, 16, 17, 64, 65):
        x = torch.randn(rows, 4)
        torch.testing.assert_close(linear(x, w), torch.nn.functional.linear(x, w))
        torch.testing.assert_close(linear(x, w, bias), torch.nn.functional.linear(x, w, bias))
    linear(torch.randn(4, 4, dtype=torch.float64), w.double())
    linear(torch.randn(4, 4), torch.randn(4, 5).T)
    assert kernels.calls == [1, 1, 4, 4, 16, 16, 64, 64]
    assert select_base_linear(kernels, ()) is torch.nn.functional.linear
    with pytest.raises(ValueError, match="1 to 8192 rows"):
        select_base_linear(kernels, {0, 3})
    with pytest.raises(ValueError, match="1 to 8192 rows"):
        select_base_linear(kernels, {8193})


def test_timed_rows_cover_decode_counts_one_by_one_and_prefill_counts_up_to_the_step_budget():
    """Every count to 32, a few to 64, then prefill counts by factors of at most 1.5, ending at the
    budget itself (so that faster_rows can fill every count below it)."""
    from loramux.server.ops.linear import timed_rows

    assert timed_rows(16) == tuple(range(1, 17))
    assert timed_rows(64) == (*range(1, 33), 40, 48, 56, 64)
    assert timed_rows(512) == (*range(1, 33), 40, 48, 56, 64, 96, 128, 192, 256, 384, 512)
    assert timed_rows(600) == (*timed_rows(512), 600)
    counts = timed_rows(8192)
    assert counts[-1] == 8192 and all(b - a == 1 or b / a <= 1.5 for a, b in zip(counts, counts[1:], strict=False))


@given(st.dictionaries(st.integers(1, 64), st.tuples(st.floats(1e-6, 1.0), st.floats(1e-6, 1.0))),
       st.floats(0.0, 0.5))
def test_faster_rows_are_the_counts_the_kernel_wins_by_the_margin(timings, margin):
    """Each timed count by its own timing; an untimed one between two timed ones when both won."""
    from loramux.server.ops.linear import faster_rows

    rows = faster_rows(timings, margin)
    won = {m for m, (torch_s, kernel_s) in timings.items() if kernel_s < (1 - margin) * torch_s}
    for m in range(1, 66):
        if m in timings:
            assert (m in rows) == (m in won)
        else:
            below, above = [t for t in timings if t < m], [t for t in timings if t > m]
            assert (m in rows) == bool(below and above and max(below) in won and min(above) in won)


def test_calibration_times_both_paths_and_keeps_the_faster(monkeypatch):
    """time_row_counts + faster_rows: on a simulated clock (so that a loaded machine cannot flip a
    count), a stand-in kernel that costs nothing at some row counts and 3x torch's time at the
    others is chosen at exactly the former; every count is timed on both paths, and a count whose
    paths are close is timed again. Decode counts pass over every weight given, prefill counts
    (past 64 rows) over the first prefill_calibration_bytes of them (here the first weight)."""
    import types

    import loramux.server.ops.linear as linear
    from loramux.server.ops.linear import faster_rows, time_row_counts, timed_rows

    TIMED_ROWS = timed_rows(512)
    fast, close = {1, 5, 16, 30, 48, 56, 384, 512}, {7, 40, 128}
    now = [0.0]
    torch_linear = torch.nn.functional.linear

    def timed_torch(x, w, b=None):
        now[0] += 1.0
        return torch_linear(x, w, b)

    class Kernels(RecordingKernels):
        def few_rows_linear(self, x, w, b, scale):
            self.calls.append(x.shape[0])
            now[0] += 0.0 if x.shape[0] in fast else 1.0625 if x.shape[0] in close else 3.0
            return x.new_zeros(x.shape[0], w.shape[0])

    monkeypatch.setattr(linear, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(linear, "PREFILL_CALIBRATION_BYTES", 1)
    monkeypatch.setattr(linear, "PREFILL_MIN_BYTES", 1)
    monkeypatch.setattr(linear.F, "linear", timed_torch)
    kernels = Kernels()
    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randn(768, 512, generator=gen), None), (torch.randn(512, 768, generator=gen), torch.randn(512))]
    timings = time_row_counts(kernels, weights, TIMED_ROWS)
    assert sorted(timings) == list(TIMED_ROWS)
    weights_timed = {m: 2 if m <= 64 else 1 for m in TIMED_ROWS}  # a pass's calls: one a weight
    assert all(t == weights_timed[m] and k == weights_timed[m] * (0.0 if m in fast else 1.0625 if m in close else 3.0)
               for m, (t, k) in timings.items())
    calls = collections.Counter(kernels.calls)
    # the warm-up pass at the first count, a second pass at the close counts only
    assert calls == {m: weights_timed[m] * (1 + (m in close) + (m == TIMED_ROWS[0])) for m in TIMED_ROWS}
    # and between two timed counts that won
    assert faster_rows(timings) == fast | set(range(49, 56)) | set(range(385, 512))


def test_prefill_counts_are_timed_over_weights_of_about_the_same_arithmetic():
    """Up to PREFILL_FULL_ROWS rows, PREFILL_CALIBRATION_BYTES of weights; past it, bytes x rows stay
    the same (twice the rows, half the bytes) down to PREFILL_MIN_BYTES."""
    from loramux.server.ops.linear import (
        PREFILL_CALIBRATION_BYTES,
        PREFILL_FULL_ROWS,
        PREFILL_MIN_BYTES,
        PREFILL_TIMED,
        prefill_calibration_bytes,
    )

    for m in PREFILL_TIMED:
        got = prefill_calibration_bytes(m)
        if m <= PREFILL_FULL_ROWS:
            assert got == PREFILL_CALIBRATION_BYTES
        else:
            assert got == max(PREFILL_MIN_BYTES, PREFILL_CALIBRATION_BYTES * PREFILL_FULL_ROWS // m)
    assert prefill_calibration_bytes(2 * PREFILL_FULL_ROWS) == PREFILL_CALIBRATION_BYTES // 2
    assert prefill_calibration_bytes(10**9) == PREFILL_MIN_BYTES


def test_calibration_weights_stop_at_the_budget(tmp_path):
    """The first weights past the budget; the budget is 4x the outermost cache (the highest level
    sysfs lists), within 128-512 MiB, and 512 MiB where sysfs says nothing."""
    from loramux.server.ops.linear import calibration_budget, calibration_weights, last_level_cache_bytes

    weights = [(torch.empty(256), None)] * 10  # 1 KiB each
    assert len(calibration_weights(weights, budget=3000)) == 3  # the third crosses it
    assert len(calibration_weights(weights, budget=2**20)) == 10
    for name, level, size in (("index0", 1, "32K"), ("index2", 2, "1024K"), ("index3", 3, "96M"), ("index4", "x", "1G")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "level").write_text(f"{level}\n")
        (tmp_path / name / "size").write_text(f"{size}\n")
    assert last_level_cache_bytes(tmp_path) == 96 * 2**20
    assert last_level_cache_bytes(tmp_path / "none") is None
    mib = 2**20
    assert [calibration_budget(c) for c in (None, 8 * mib, 32 * mib, 96 * mib, 480 * mib)] == \
        [512 * mib, 128 * mib, 128 * mib, 384 * mib, 512 * mib]
