"""Fast LoRA ops against the pure-torch reference loops."""

import pytest
import torch

from loramux.server.ops import plan_segments, plan_tokens, select_backend
from loramux.server.ops.reference import bgmv_reference, sgmv_reference

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}
IN, OUT = 48, 80
apply_lora = select_backend("auto")


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("popularity", ["distinct", "uniform", "zipf", "identical"])
@pytest.mark.parametrize("base_every", [0, 3])
def test_bgmv_matches_reference(dtype, popularity, base_every):
    gen = torch.Generator().manual_seed(0)
    ranks = [4, 8, 16, 64, 8, 16]
    pages = _adapter_pages(ranks, gen)
    a, b = _store(sum(ranks), dtype, gen)
    num_tokens = 37
    token_adapter = _popularity(popularity, num_tokens, len(ranks), gen)
    if base_every:
        token_adapter = [-1 if i % base_every == 0 else t for i, t in enumerate(token_adapter)]
    x = torch.randn(num_tokens, IN, generator=gen).to(dtype)
    y0 = torch.randn(num_tokens, OUT, generator=gen).to(dtype)
    ref, fast = y0.clone().float(), y0.clone()
    bgmv_reference(ref, x.float(), a.float(), b.float(), token_adapter, pages)
    apply_lora(fast, x, a, b, plan_tokens(token_adapter, pages))
    _assert_close(fast, ref, dtype)
    # base rows are untouched, bit for bit
    for i, t in enumerate(token_adapter):
        if t < 0:
            assert torch.equal(fast[i], y0[i])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgmv_matches_reference_with_empty_and_base_segments(dtype):
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
    ref, fast = y0.clone().float(), y0.clone()
    sgmv_reference(ref, x.float(), a.float(), b.float(), seg_starts, seg_pages)
    plan = plan_segments(seg_starts, seg_pages)
    apply_lora(fast, x, a, b, plan)
    _assert_close(fast, ref, dtype)
    # the rank-4 and rank-8 segments are empty, so only ranks 16 and 64 do work
    assert sorted(g.rank for g in plan.groups) == [16, 64]


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


def test_all_base_batch_does_no_work():
    plan_t = plan_tokens([-1, -1, -1], [])
    plan_s = plan_segments([0, 4, 4], [None, None])
    assert plan_t.empty and plan_s.empty
    y = torch.randn(3, OUT)
    before = y.clone()
    apply_lora(y, torch.randn(3, IN), torch.empty(0, IN), torch.empty(0, OUT), plan_t)
    assert torch.equal(y, before)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="torch"):
        select_backend("cuda-magic")
