"""A hybrid model with recurrent layers (Qwen3.5: gated DeltaNet beside attention) through the real
server and the official `openai` client: concurrent streams of mixed adapters, token for token as
PEFT; a repeated prompt, a later turn, prompts sent together and chats sharing their system
message resumed from cached recurrent states (prefix caching on, reported in usage and the metrics); beam search (each step's beams as requests of their own, which
resume from cached states); speculative decoding by prompt lookup."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import FAMILY_ADAPTERS, build_adapter, build_family_model, peft_generate
from server import ServerProcess
from test_openai import peft_beams


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    model = build_family_model("qwen3_5", root / "model")
    adapters = {name: build_adapter(model, root / name, seed=i + 1, **kw)
                for i, (name, kw) in enumerate(FAMILY_ADAPTERS["qwen3_5"].items())}
    proc = ServerProcess(["--model", str(model), "--max-model-len", "128", "--default-max-new-tokens", "8",
                          "--max-batch-size", "4", "--max-tokens-per-step", "24",
                          *(a for name, path in adapters.items() for a in ("--adapter", f"{name}={path}"))],
                         tmp_path_factory.mktemp("logs") / "server.log")
    proc.wait_ready()
    proc.model_dir, proc.adapters = model, adapters
    yield proc
    proc.stop()


def test_concurrent_streams_of_mixed_adapters_match_peft(hybrid):
    """Eight streamed completions over four state slots: requests wait, join running batches and
    take slots others gave back."""
    oa = hybrid.openai()
    base = hybrid.client.server_info().model
    names = [None, *hybrid.adapters]
    prompts = [[(7 * i + 3 * j) % 300 + 3 for j in range(10 + 5 * i)] for i in range(8)]

    def one(i):
        name = names[i % len(names)]
        chunks = oa.completions.create(model=name or base, prompt=prompts[i], max_tokens=10, temperature=0, stream=True,
                                       logprobs=0, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        return [int(t.removeprefix("token_id:")) for c in chunks for t in c.choices[0].logprobs.tokens]

    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(one, range(8)))
    for i, out in enumerate(outs):
        name = names[i % len(names)]
        assert [out] == peft_generate(hybrid.model_dir, hybrid.adapters.get(name), [prompts[i]], 10,
                                      eos_token_id=None), (i, name)


def test_a_repeated_prompt_and_a_later_turn_resume_from_cached_states(hybrid):
    """A 45-token prompt caches its state at 32 (where its last full block of 16 before its last
    token ends), and its answer's decode steps at 48; the same prompt again resumes at 32, and the
    prompt with its answer and 9 more tokens at 48: usage's cached_tokens say so, and the tokens
    are PEFT's."""
    oa = hybrid.openai()
    adapter = "all-r4"
    first = [(11 * j) % 290 + 5 for j in range(45)]

    def complete(prompt):
        got = oa.completions.create(model=adapter, prompt=prompt, max_tokens=8, temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        tokens = [int(t.removeprefix("token_id:")) for t in got.choices[0].logprobs.tokens]
        return tokens, got.usage.prompt_tokens_details.cached_tokens

    before = hybrid.metrics()["loramux_prefix_cache_hit_tokens_total"]
    out, cached = complete(first)
    again, cached_again = complete(first)
    turn = [*first, *out, *range(40, 49)]
    later, cached_later = complete(turn)
    assert (cached, cached_again, cached_later) == (0, 32, 48)
    metrics = hybrid.metrics()
    assert metrics["loramux_prefix_cache_hit_tokens_total"] - before == 80
    assert 3 <= metrics["loramux_cached_states"] <= 4  # at 32, the answer's at 48 and the turn's at 64, of at most 4
    # the turn's answer's at 64 (the first answer's at 48 served the turn's hit: a prompt's since)
    assert 1 <= metrics["loramux_cached_answer_states"] <= 2
    assert [out, again, later] == peft_generate(hybrid.model_dir, hybrid.adapters[adapter], [first, first, turn], 8,
                                                eos_token_id=None)
    assert hybrid.client.server_info().prefix_caching
    assert "--max-cached-states 4" in hybrid.log()


def test_prompts_of_one_request_resume_their_common_prefix_from_one_state(hybrid):
    """Few-shot prompts in one request (as evaluation harnesses send them) share 36 tokens that no
    state holds yet: the first caches its state where the others part from it (32, two blocks of
    16; its own last full block is at 48), and they resume there, not from their first token."""
    oa = hybrid.openai()
    shots = [(13 * j) % 280 + 7 for j in range(36)]
    prompts = [[*shots, *((17 * i + 5 * j) % 290 + 4 for j in range(16))] for i in range(3)]
    before = hybrid.metrics()["loramux_prefix_cache_hit_tokens_total"]
    got = oa.completions.create(model=hybrid.client.server_info().model, prompt=prompts, max_tokens=6, temperature=0,
                                logprobs=0, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    assert got.usage.prompt_tokens_details.cached_tokens == 64
    assert hybrid.metrics()["loramux_prefix_cache_hit_tokens_total"] - before == 64
    outs = [[int(t.removeprefix("token_id:")) for t in c.logprobs.tokens] for c in sorted(got.choices, key=lambda c: c.index)]
    assert outs == peft_generate(hybrid.model_dir, None, prompts, 6, eos_token_id=None)


def test_chats_that_share_only_their_instructions_resume_where_they_end(hybrid):
    """Two chats with the same system message and different questions, one after the other: the
    first caches its state where what they share ends (the renderer marks it: the system message
    and the user turn's header; the last full block before it), and the second resumes there.
    Without that mark it would start from its first token: no state of the first ends inside
    what they share."""
    from transformers import AutoTokenizer

    oa = hybrid.openai()
    tokenizer = AutoTokenizer.from_pretrained(hybrid.model_dir)
    system = {"role": "system", "content": "LoRA adds a low-rank update B A to a frozen weight W, scaled by alpha "
                                           "over r. Once upon a time there was a little server."}
    chats = [[system, {"role": "user", "content": question}] for question in ("The quick brown fox?", "Ünïcödé wörds?")]
    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, return_dict=True)["input_ids"] for m in chats]
    shared = next(i for i, (a, b) in enumerate(zip(*prompts, strict=False)) if a != b)
    assert shared >= 32, shared  # two blocks of 16 at least

    def chat(messages, prompt):
        got = oa.chat.completions.create(model="all-r4", messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                         extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        tokens = [int(t.token.removeprefix("token_id:")) for t in got.choices[0].logprobs.content]
        assert [tokens] == peft_generate(hybrid.model_dir, hybrid.adapters["all-r4"], [prompt], 6, eos_token_id=None)
        return got.usage.prompt_tokens_details.cached_tokens

    assert [chat(*c) for c in zip(chats, prompts, strict=True)] == [0, shared // 16 * 16]


def test_beam_search_returns_the_beams_a_search_over_peft_finds(hybrid):
    oa = hybrid.openai()
    prompt, width, steps, penalty = [5, 17, 99, 123, 44, 7], 3, 5, 0.6
    adapter = "all-r4"
    expected = peft_beams(hybrid.model_dir, hybrid.adapters[adapter], prompt, width, steps, penalty)
    got = oa.completions.create(model=adapter, prompt=prompt, n=width, max_tokens=steps, logprobs=1,
                                extra_body={"use_beam_search": True, "length_penalty": penalty,
                                            "return_tokens_as_token_ids": True})
    assert [[int(t.removeprefix("token_id:")) for t in c.logprobs.tokens] for c in got.choices] == \
        [list(b.tokens) for b in expected]


def test_speculative_decoding_by_prompt_lookup_matches_peft(hybrid, tmp_path):
    """A server with --num-speculative-tokens: prompts that repeat a phrase give prompt lookup
    drafts to check, kept and rejected, through the recurrent states; the tokens are PEFT's."""
    proc = ServerProcess(["--model", str(hybrid.model_dir), "--max-model-len", "128", "--default-max-new-tokens", "8",
                          "--max-batch-size", "4",
                          "--num-speculative-tokens", "3", "--prompt-lookup-min", "1"], tmp_path / "server.log")
    try:
        proc.wait_ready()
        oa = proc.openai()
        phrases = [[(7 * i + 11 * j) % 280 + 5 for j in range(4 + i)] for i in range(3)]
        prompts = [(p * 6)[: 20 + 3 * i] for i, p in enumerate(phrases)]
        got = oa.completions.create(model=proc.client.server_info().model, prompt=prompts, max_tokens=12,
                                    temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        outs = [[int(t.removeprefix("token_id:")) for t in c.logprobs.tokens] for c in sorted(got.choices, key=lambda c: c.index)]
        assert outs == peft_generate(hybrid.model_dir, None, prompts, 12, eos_token_id=None)
        metrics = proc.metrics()
        assert metrics["loramux_spec_decode_draft_tokens_total"] > 0, metrics
    finally:
        proc.stop()
