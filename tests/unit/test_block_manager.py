"""The block manager: allocation, the prefix cache and its keys, without a model."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loramux.server.block_manager import NO_HIT, BlockManager, block_keys

BS = 4


def run_prompt(bm, seq_id, identity, tokens):
    """Admit with whatever prefix hit there is, compute the rest, register the full blocks."""
    keys = block_keys(identity, tokens, BS)
    hit = bm.lookup(keys)
    bm.admit(seq_id, hit, keys)
    bm.allocate(seq_id, len(tokens))
    bm.commit(seq_id, identity, tokens, len(tokens))
    return hit


def test_a_shared_prefix_hits_only_for_the_same_weights():
    bm = BlockManager(16, BS)
    prompt = list(range(10))  # two full blocks and a partial one
    assert run_prompt(bm, "a", b"lora:x", prompt).blocks == ()
    bm.free("a")
    same = bm.lookup(block_keys(b"lora:x", prompt, BS))
    assert len(same.blocks) == 2 and same.num_free == 2 and same.cached_tokens(10, BS) == 8
    assert bm.lookup(block_keys(b"lora:y", prompt, BS)).blocks == ()  # another adapter's weights
    assert bm.lookup(block_keys(b"base", prompt, BS)).blocks == ()  # the base model
    diverged = bm.lookup(block_keys(b"lora:x", [0, 1, 2, 3, 9, 9, 9, 9], BS))
    assert len(diverged.blocks) == 1  # the chain stops at the first different block
    assert bm.lookup(block_keys(b"lora:x", [9, 0, 1, 2, 3], BS)).blocks == ()  # same block, other parent


def test_identity_is_length_prefixed_so_that_tokens_cannot_forge_it():
    assert block_keys(b"lora:ab", [1, 2, 3, 4], BS) != block_keys(b"lora:a", [1, 2, 3, 4], BS)


def test_a_fully_cached_prompt_still_computes_its_last_token_into_the_sink():
    bm = BlockManager(8, BS)
    prompt = list(range(8))
    run_prompt(bm, "a", b"base", prompt)
    keys = block_keys(b"base", prompt, BS)
    hit = bm.lookup(keys)
    assert hit.cached_tokens(8, BS) == 7  # the last token is computed, for its logits
    bm.admit("b", hit, keys)
    bm.allocate("b", 8)
    assert bm.table("b") == bm.table("a")  # shared, not copied
    assert bm.slot_mapping("b", 7, 1) == [bm.sink * BS + 3]  # never into the cached block


def test_unreferenced_cached_blocks_are_free_and_evicted_lru_only_when_needed():
    bm = BlockManager(4, BS)
    run_prompt(bm, "a", b"base", [1] * 8)
    bm.free("a")
    assert bm.num_free == 4 and bm.num_cached == 2 and bm.usage() == 0
    bm.allocate("b", 8)  # two free blocks remain: the cache is untouched
    assert bm.num_cached == 2
    bm.allocate("b", 12)  # now one cached block must go: the tail one, released first
    assert bm.num_cached == 1
    assert len(bm.lookup(block_keys(b"base", [1] * 8, BS)).blocks) == 1
    with pytest.raises(RuntimeError, match="exhausted"):
        bm.allocate("b", 24)
    bm.check()


def test_a_preempted_sequences_blocks_are_evicted_after_every_other_cached_block():
    bm = BlockManager(6, BS)
    run_prompt(bm, "done", b"base", [1] * 8)
    run_prompt(bm, "victim", b"base", [2] * 8)
    bm.free("victim", resume=True)  # preempted: it will come back for its two blocks
    bm.free("done")  # released later, yet evicted first
    bm.allocate("new", 16)  # two free blocks, then the two cached blocks of "done"
    victim = block_keys(b"base", [2] * 8, BS)
    assert len(bm.lookup(victim).blocks) == 2 and bm.lookup(block_keys(b"base", [1] * 8, BS)).blocks == ()
    bm.allocate("new", 20)  # nothing else is left: now the victim's tail block goes
    assert len(bm.lookup(victim).blocks) == 1
    bm.check()


@pytest.mark.parametrize("back", ["readmitted", "finished"])
def test_a_preempted_sequence_that_is_back_or_gone_keeps_no_blocks_from_eviction(back):
    bm = BlockManager(6, BS)
    run_prompt(bm, "victim", b"base", [2] * 12)
    bm.free("victim", resume=True)
    if back == "readmitted":  # it takes its first block back; the other two lose their standing
        keys = block_keys(b"base", [2] * 4, BS)
        bm.admit("victim", bm.lookup(keys), keys)
    else:  # cancelled while it waited
        bm.free("victim")
    run_prompt(bm, "other", b"base", [1] * 8)
    bm.free("other")  # released after the victim's blocks: evicted after them now
    bm.allocate("new", 4 * bm.num_free - 8)  # everything but two blocks
    assert len(bm.lookup(block_keys(b"base", [1] * 8, BS)).blocks) == 2
    bm.check()


ops = st.lists(st.tuples(st.sampled_from(["admit", "grow", "draft", "finish", "preempt"]), st.integers(0, 5), st.integers(0, 2),
                         st.integers(1, 12)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops=ops, caching=st.booleans())
def test_no_leak_no_negative_refcount_and_no_cached_block_is_ever_written(ops, caching):
    """Random admit / grow / draft / finish / preempt (finish stands for cancel too; a preempted or
    finished sequence may be admitted again, a waiting one may finish) over a tiny pool. A draft
    writes n speculative positions, keeps the first ``ident`` and trims the rest, whose content (a
    token no sequence has) stays behind in its blocks. A shadow copy of every block's content proves
    that a prefix hit always returns exactly the tokens asked for, so no cached block was
    overwritten and none holds a rejected draft."""
    bm = BlockManager(10, BS, prefix_caching=caching)
    content = {}  # block -> {offset: (identity, token)}
    live = {}  # seq -> (identity, tokens, computed)
    vocab = [0, 1]  # few distinct tokens: many shared prefixes

    def write(seq, start, n):
        identity, tokens, _ = live[seq]
        for slot, pos in zip(bm.slot_mapping(seq, start, n), range(start, start + n), strict=True):
            block, off = divmod(slot, BS)
            if block == bm.sink:
                continue
            assert block not in bm._key_of, "a write into a cached block"
            content.setdefault(block, {})[off] = (identity, tokens[pos])

    for op, seq, ident, n in ops:
        identity = b"id%d" % ident
        if op == "admit" and seq not in live:
            tokens = [vocab[(seq * 7 + i * ident) % 2] for i in range(n)]
            keys = block_keys(identity, tokens, BS)
            hit = bm.lookup(keys)
            if -(-n // BS) - len(hit.blocks) + hit.num_free > bm.num_free:
                continue  # the scheduler would not admit it
            for i, b in enumerate(hit.blocks):  # what the hit returns is what was asked for
                assert [content[b][o] for o in range(BS)] == [(identity, t) for t in tokens[i * BS:(i + 1) * BS]]
            bm.admit(seq, hit, keys)
            start = hit.cached_tokens(n, BS) if hit.blocks else 0
            live[seq] = (identity, tokens, start)
            bm.allocate(seq, n)
            write(seq, start, n - start)
            bm.commit(seq, identity, tokens, n)
            live[seq] = (identity, tokens, n)
        elif op == "grow" and seq in live:
            identity, tokens, computed = live[seq]
            extra = min(n, bm.num_free * BS)
            if -(-(computed + extra) // BS) - len(bm.table(seq)) > bm.num_free:
                continue
            tokens = tokens + [vocab[i % 2] for i in range(extra)]
            live[seq] = (identity, tokens, computed)
            bm.allocate(seq, computed + extra)
            write(seq, computed, extra)
            bm.commit(seq, identity, tokens, computed + extra)
            live[seq] = (identity, tokens, computed + extra)
        elif op == "draft" and seq in live:
            identity, tokens, computed = live[seq]
            if -(-(computed + n) // BS) - len(bm.table(seq)) > bm.num_free:
                continue
            kept = min(ident, n)
            live[seq] = (identity, tokens + [vocab[i % 2] for i in range(kept)] + [2] * (n - kept), computed)
            bm.allocate(seq, computed + n)
            write(seq, computed, n)
            tokens = live[seq][1][: computed + kept]
            bm.commit(seq, identity, tokens, computed + kept)
            bm.trim(seq, computed + kept)
            assert len(bm.table(seq)) == -(-(computed + kept) // BS)
            live[seq] = (identity, tokens, computed + kept)
        elif op in ("finish", "preempt"):
            bm.free(seq, resume=op == "preempt" and seq in live)
            live.pop(seq, None)
        bm.check()
        assert all(r >= 0 for r in bm._ref)
    for seq in list(live):
        bm.free(seq)
    bm.check()
    assert bm.num_held == 0 and bm.num_free == 10
    if not caching:
        assert bm.num_cached == 0 and bm.lookup(block_keys(b"id0", [0] * 8, BS)) is NO_HIT
