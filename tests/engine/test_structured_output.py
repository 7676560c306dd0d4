"""Structured outputs (JSON schema, regex, choice, grammar), token for token against PEFT under the
same grammar mask (transformers' generate with a logits processor over an llguidance matcher of
its own), joining a running batch and through preemption; the texts match their constraints, and
bad constraints are refused naming the problem."""

import asyncio
import json
import random
import re
import sys

import pytest
import torch

from loramux.server.builder import build_engine
from loramux.server.config import ServerConfig
from loramux.server.engine import EngineObserver
from loramux.server.errors import RequestInvalid
from loramux.server.requests import (
    MAX_STRUCTURED_OUTPUT_CHARS,
    FinishReason,
    GenerationRequest,
    OutputKind,
    SamplingParams,
    StructuredOutput,
)

llguidance = pytest.importorskip("llguidance")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["x", "yz"]}, "maxItems": 2}}}
EMAIL = r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)"
CHOICES = ["alpha", "beta", "gamma delta"]
GRAMMAR = 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,3}/'
MAX_NEW = 24

CONSTRAINTS = {
    "json": StructuredOutput(OutputKind.JSON_SCHEMA, json.dumps(SCHEMA)),
    "object": StructuredOutput(OutputKind.JSON_SCHEMA, '{"type": "object", "maxProperties": 1}'),
    "regex": StructuredOutput(OutputKind.REGEX, EMAIL),
    "choice": StructuredOutput(OutputKind.CHOICE, json.dumps(CHOICES)),
    "grammar": StructuredOutput(OutputKind.GRAMMAR, GRAMMAR),
    "gbnf": StructuredOutput(OutputKind.GRAMMAR, 'root ::= "(" num ("+" num)* ")"\nnum ::= [0-9]{1,3}'),
}


def matches(kind: str, text: str) -> bool:
    if kind == "json":
        value = json.loads(text)
        return (set(value) == {"name", "age", "tags"} and isinstance(value["name"], str) and len(value["name"]) <= 6
                and 0 <= value["age"] <= 120 and set(value["tags"]) <= {"x", "yz"})
    if kind == "object":
        return isinstance(json.loads(text), dict)
    if kind == "regex":
        return re.fullmatch(EMAIL, text) is not None
    if kind == "choice":
        return text in CHOICES
    return re.fullmatch(r"\((\d{1,3})(\+\d{1,3})*\)", text) is not None


def make(tiny_llama, tiny_adapters, **overrides):
    config = ServerConfig(**{
        "model": str(tiny_llama), "max_batch_size": 8, "max_tokens_per_step": 32, "max_model_len": 96,
        "default_max_new_tokens": MAX_NEW, "kv_block_size": 4,
        "adapters": tuple((n, str(p)) for n, p in tiny_adapters.items()), **overrides,
    })
    built = build_engine(config)
    built.engine.start()
    return built


def oracle(tiny_llama, adapter_dir, prompt, output, max_new, eos):
    """PEFT's greedy tokens with the grammar's mask applied before each argmax."""
    from llguidance.hf import from_tokenizer
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

    from loramux.server.structured import JSON_OPTIONS

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    vocab = model.config.vocab_size
    if output.kind is OutputKind.JSON_SCHEMA:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(output.spec, defaults=JSON_OPTIONS)
    else:
        grammar = llguidance.grammar_from({OutputKind.REGEX: "regex", OutputKind.CHOICE: "choice",
                                           OutputKind.GRAMMAR: "grammar"}[output.kind],
                                          json.loads(output.spec) if output.kind is OutputKind.CHOICE else output.spec)
    matcher = llguidance.LLMatcher(from_tokenizer(tok, n_vocab=vocab, eos_token=[eos]), grammar)

    class Mask(LogitsProcessor):
        taken = 0

        def __call__(self, input_ids, scores):
            new = input_ids[0, len(prompt):].tolist()
            assert matcher.consume_tokens(new[self.taken:])
            self.taken = len(new)
            bits = allocate_token_bitmask(1, vocab)
            fill_next_token_bitmask(matcher, bits)
            allowed = ((bits.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).bool().view(1, -1)[:, :vocab]
            return scores.masked_fill(~allowed, float("-inf"))

    with torch.no_grad():
        x = torch.tensor([prompt])
        y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                           eos_token_id=eos, logits_processor=LogitsProcessorList([Mask()]))
    return y[0, len(prompt):].tolist()


async def staggered(engine, jobs, at_once=False):
    """jobs: (adapter, prompt, SamplingParams); each joins once the one before has a token (all at
    once with ``at_once``). Returns each request's events."""
    outs, started = [None] * len(jobs), [asyncio.Event() for _ in jobs]

    async def one(i, adapter, prompt, params):
        if i and not at_once:
            await started[i - 1].wait()
        events = []
        try:
            async for ev in engine.submit(GenerationRequest(f"s{i}", tuple(prompt), params, adapter)):
                events.append(ev)
                started[i].set()
        finally:
            started[i].set()
        outs[i] = events

    await asyncio.gather(*(one(i, *job) for i, job in enumerate(jobs)))
    return outs


@pytest.mark.parametrize("pool, overlap", [(None, False), (96, False), (None, True)],
                         ids=["staggered", "preempted", "masks-during-forward"])
def test_structured_outputs_match_peft_under_the_same_mask(tiny_llama, tiny_adapters, pool, overlap):
    """Constrained requests over adapters and the base model, next to unconstrained ones (whose
    rows no mask touches), joining a decoding batch one by one; with a 96-token pool, all at once,
    so that requests are preempted and recomputed mid-grammar; and with the masks computed during
    the forward pass (as on an accelerator). Each equals PEFT's greedy decoding under the same
    mask, ends (STOP) where only the end of text could follow, and matches."""
    rng = random.Random(3)
    names = ["attn-r4", None, "all-r8", "regex-mlp-r8", "attn-r4", "all-r8", None, "all-r8"]
    kinds = ["json", "regex", "choice", "grammar", "object", "gbnf", None, None]
    jobs = [(name, [rng.randrange(3, 300) for _ in range(rng.randint(8, 30))],
             SamplingParams(MAX_NEW, structured_output=CONSTRAINTS.get(kind)))
            for name, kind in zip(names, kinds, strict=True)]
    built = make(tiny_llama, tiny_adapters, kv_cache_tokens=pool)
    engine = built.engine
    engine.overlap_masks = overlap
    steps = []
    recorder = EngineObserver()
    recorder.step = steps.append
    engine.observers.append(recorder)
    try:
        outs = asyncio.run(staggered(engine, jobs, at_once=pool is not None))
        eos = next(iter(engine.vocabularies.base.eos_token_ids))
        if pool:
            assert engine.num_preemptions > 0
        else:
            assert any(s.num_prefill_tokens and s.num_decode_tokens for s in steps)
        finished_by_grammar = 0
        for (name, prompt, params), kind, events in zip(jobs, kinds, outs, strict=True):
            tokens, text, reason = [e.token_id for e in events], "".join(e.text for e in events), events[-1].finish_reason
            if kind is None:
                from helpers import peft_generate
                assert tokens == peft_generate(tiny_llama, tiny_adapters.get(name), [prompt], MAX_NEW,
                                               eos_token_id=eos)[0]
                continue
            expected = oracle(tiny_llama, tiny_adapters.get(name), prompt, params.structured_output, MAX_NEW, eos)
            if reason is FinishReason.STOP:  # PEFT goes on to the only token the grammar leaves: EOS
                finished_by_grammar += 1
                assert expected == tokens + [eos], (kind, name)
                assert matches(kind, text), (kind, text)
            else:
                assert tokens == expected, (kind, name)
        assert finished_by_grammar >= 2  # the regex and the choice, at least: their texts are bounded
        assert engine.counts() == (0, 0) and engine.blocks.num_held == 0
    finally:
        built.engine.stop()


@pytest.fixture(scope="module")
def built(tiny_llama, tiny_adapters):
    b = make(tiny_llama, tiny_adapters)
    yield b
    b.engine.stop()


def run(engine, *requests):
    return asyncio.run(staggered(engine, requests, at_once=True))


def test_sampled_structured_outputs_match_and_a_seed_reproduces_them(built):
    """Temperature sampling with top-p, penalties and a bias stays inside the grammar; a seeded
    request gives the same tokens alone and in a crowd."""
    prompt = [11, 22, 33, 44]
    for kind in ("json", "regex", "choice"):  # bounded texts: each ends within max_new_tokens
        params = SamplingParams(80, temperature=1.3, top_p=0.95, repetition_penalty=1.2, presence_penalty=0.5,
                                logit_bias=((40, 5.0),), seed=7, structured_output=CONSTRAINTS[kind])
        alone = run(built.engine, ("attn-r4", prompt, params))[0]
        crowd = run(built.engine, (None, prompt, SamplingParams(20, temperature=1.0)), ("attn-r4", prompt, params),
                    ("all-r8", prompt, SamplingParams(20, structured_output=CONSTRAINTS["choice"])))[1]
        assert [e.token_id for e in alone] == [e.token_id for e in crowd]
        assert alone[-1].finish_reason is FinishReason.STOP
        assert matches(kind, "".join(e.text for e in alone)), kind


def test_min_new_tokens_holds_until_the_grammar_must_end(built):
    """min_new_tokens bans EOS while the grammar can go on (digits keep coming), but yields when
    the grammar allows nothing else: a choice of one short word still ends."""
    digits = StructuredOutput(OutputKind.REGEX, "[0-9]{1,40}")
    eos = next(iter(built.engine.vocabularies.base.eos_token_ids))
    events = run(built.engine, (None, [5, 6, 7], SamplingParams(30, min_new_tokens=12, structured_output=digits)))[0]
    tokens = [e.token_id for e in events]
    assert len(tokens) >= 12 and eos not in tokens[:12]
    assert re.fullmatch("[0-9]+", "".join(e.text for e in events))
    short = StructuredOutput(OutputKind.CHOICE, json.dumps(["ab"]))
    ended = run(built.engine, ("attn-r4", [5, 6, 7], SamplingParams(30, min_new_tokens=20, structured_output=short)))[0]
    assert "".join(e.text for e in ended) == "ab" and ended[-1].finish_reason is FinishReason.STOP
    # the only token the grammar allows is a stop token that min_new_tokens bans: the grammar wins
    (a,) = built.engine.tokenizer.encode("a", add_special_tokens=False)
    one = StructuredOutput(OutputKind.CHOICE, json.dumps(["a"]))
    params = SamplingParams(30, min_new_tokens=5, stop_token_ids=(a,), structured_output=one)
    only = run(built.engine, ("attn-r4", [5, 6, 7], params))[0]
    assert [e.token_id for e in only] == [a] and only[-1].finish_reason is FinishReason.STOP


@pytest.mark.parametrize("output, message", [
    (StructuredOutput(OutputKind.JSON_SCHEMA, "{not json"), "json_schema"),
    (StructuredOutput(OutputKind.JSON_SCHEMA, '{"type": "objekt"}'), "objekt"),
    (StructuredOutput(OutputKind.REGEX, "(ab"), "unclosed group"),
    (StructuredOutput(OutputKind.CHOICE, "[]"), "non-empty list of strings"),
    (StructuredOutput(OutputKind.CHOICE, '["a", 3]'), "non-empty list of strings"),
    (StructuredOutput(OutputKind.GRAMMAR, "start: undefined_rule"), "undefined_rule"),
    (StructuredOutput(OutputKind.REGEX, "a" * (MAX_STRUCTURED_OUTPUT_CHARS + 1)), "the limit is 65536"),
])
def test_bad_structured_outputs_are_refused_naming_the_problem(built, output, message):
    with pytest.raises(RequestInvalid, match=message):
        run(built.engine, (None, [5, 6, 7], SamplingParams(8, structured_output=output)))
    assert built.engine.counts() == (0, 0)
    ok = run(built.engine, (None, [5, 6, 7], SamplingParams(8, structured_output=CONSTRAINTS["choice"])))[0]
    assert "".join(e.text for e in ok) in CHOICES


def test_without_llguidance_structured_output_is_a_failed_precondition(built, monkeypatch):
    """Where the package is missing (a hand-made environment), only structured output is refused."""
    from loramux.server.errors import Unsupported, status_name
    from loramux.server.structured import Grammars

    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now raises ImportError
    bare = Grammars(built.engine.tokenizer, built.engine.vocab_size, {2})
    with pytest.raises(Unsupported, match="llguidance package") as e:
        bare.prepare(CONSTRAINTS["choice"])
    assert status_name(e.value) == "FAILED_PRECONDITION"


@pytest.mark.parametrize("n", [1, 31, 32, 33, 64, 95])
def test_any_bit_below_reads_the_words_as_the_masks_do(n):
    from loramux.server.structured import any_bit_below

    gen = torch.Generator().manual_seed(n)
    words = torch.randint(-(2**31), 2**31 - 1, (40, 3), dtype=torch.int32, generator=gen)
    words[::2] &= torch.randint(0, 2, (20, 3), dtype=torch.int32, generator=gen) << 31  # sparse rows, top bits
    words[::5] = 0
    unpacked = ((words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).bool().view(40, -1)
    assert torch.equal(any_bit_below(words, n), unpacked[:, :n].any(-1))



@pytest.mark.parametrize("when", ["token", "step"])
def test_a_grammar_that_fails_mid_generation_fails_its_request_alone(built, when):
    """A matcher that enters an error state mid-generation (forced here: as its second token comes,
    so that taking the token fails; or between steps, so that the next mask finds it) fails its own
    request; the request beside it finishes as usual."""
    from loramux.server.errors import RequestFailed

    def corrupt_matcher(seq):
        seq.grammar.matcher.consume_token(built.engine.vocab_size + 5)  # no such token: an error state

    class Corrupt(EngineObserver):
        def token(self, seq, gap_seconds):
            if when == "token" and seq.grammar is not None and seq.num_generated == 1:  # before it is appended
                corrupt_matcher(seq)

        def step(self, stats):
            for seq in list(built.engine._running):
                if when == "step" and seq.grammar is not None and seq.num_generated == 2:
                    corrupt_matcher(seq)

    corrupt = Corrupt()
    built.engine.observers.append(corrupt)
    try:
        async def main():
            async def one(rid, params):
                req = GenerationRequest(rid, (5, 6, 7), params, None)
                return [ev async for ev in built.engine.submit(req)]
            return await asyncio.gather(one("bad", SamplingParams(12, structured_output=CONSTRAINTS["grammar"])),
                                        one("ok", SamplingParams(12, ignore_eos=True)), return_exceptions=True)

        bad, ok = asyncio.run(main())
    finally:
        built.engine.observers.remove(corrupt)
    assert isinstance(bad, RequestFailed) and "structured output" in str(bad), bad
    assert ("allows no next token" in str(bad)) is (when == "step")
    assert len(ok) == 12 and ok[-1].finish_reason is FinishReason.LENGTH
    assert built.engine.counts() == (0, 0) and built.engine.blocks.num_held == 0


def test_added_tokens_are_allowed_only_where_the_matcher_takes_them(tmp_path):
    """llguidance matches an added token (Qwen's <think>, <tool_call>) by id only, yet its mask
    allows it where the grammar's text spells it: such a mask is cleared of it (the text then has
    no way on, and the request fails alone, its mistake named), while a Lark grammar that names it by id
    keeps it; a reasoning gate still undecided also allows the start marker."""
    from loramux.server.reasoning import UNDECIDED, Qwen3, ReasoningGate
    from loramux.server.structured import Grammars

    from helpers import build_tokenizer

    tok = build_tokenizer(tmp_path, extra_tokens=("<think>", "</think>"))
    grammars = Grammars(tok, len(tok), {tok.eos_token_id})

    def allowed(output, gate=None):
        masks, _, failed = grammars.masks([grammars.matcher(output, gate)], [None])
        return failed, None if masks[0] is None else torch.isfinite(masks[0]).nonzero().flatten().tolist()

    failed, _ = allowed(StructuredOutput(OutputKind.REGEX, "<think>plan</think>x"))
    assert isinstance(failed[0], RequestInvalid) and "spells the added token '<think>' (id 384)" in str(failed[0])
    assert allowed(StructuredOutput(OutputKind.GRAMMAR, 'start: <[384]> "plan" <[385]> "x"')) == ({}, [384])
    gate = ReasoningGate(Qwen3(384, 385), UNDECIDED)
    failed, ids = allowed(StructuredOutput(OutputKind.CHOICE, json.dumps(["yes"])), gate)
    assert not failed and 384 in ids and len(ids) > 1


def test_a_reasoning_gate_frees_the_thinking_and_constrains_the_answer(tmp_path):
    """--reasoning-parser qwen3, no marker in the prompt (undecided): the first token is the
    choice's, or the start marker, after which the thinking is free (here the biased marker again,
    which the choice forbids), in the same step as a request biased away from the marker, whose
    answer is constrained at once;
    the same server with --structured-output-in-reasoning constrains the whole text. The markers
    must be tokens of the model (tests/integration/test_reasoning.py covers the APIs)."""
    from loramux.server.config import StartupError

    from helpers import build_llama

    model = build_llama(tmp_path / "think", extra_tokens=("<think>", "</think>"))
    choice = StructuredOutput(OutputKind.CHOICE, json.dumps(["alpha", "beta"]))

    def served(**flags):
        b = make(model, {}, reasoning_parser="qwen3", **flags)
        try:
            opened, answered = run(b.engine, (None, [11, 22, 33], SamplingParams(
                max_new_tokens=5, structured_output=choice, logit_bias=((384, 100.0),))),
                (None, [11, 22, 33], SamplingParams(max_new_tokens=5, structured_output=choice,
                                                    logit_bias=((384, -100.0),))))
        finally:
            b.engine.stop()
        return [e.token_id for e in opened], "".join(e.text for e in answered)

    opened, answered = served()
    assert opened == [384] * 5 and answered in ("alpha", "beta")
    opened, _ = served(structured_output_in_reasoning=True)
    assert 384 not in opened
    plain = build_llama(tmp_path / "plain")
    with pytest.raises(StartupError, match="--reasoning-parser qwen3 needs <think>, </think> to be tokens"):
        build_engine(ServerConfig(model=str(plain), reasoning_parser="qwen3"))


def test_a_grammar_beyond_llguidances_limits_is_the_requests_own_mistake(built):
    """A regex that compiles but outgrows llguidance's lexer as it is followed (a{1000000}: "too many
    expressions constructed") fails its request as INVALID_ARGUMENT naming the limit, as does the
    next request for it (its cached lexer has hit the limit), not as an internal error; the request
    beside it finishes as usual."""
    from loramux.server.errors import status_name

    huge = StructuredOutput(OutputKind.REGEX, "a{1000000}")

    async def main():
        async def one(rid, params):
            return [ev async for ev in built.engine.submit(GenerationRequest(rid, (5, 6, 7), params, None))]
        return await asyncio.gather(one("huge", SamplingParams(12, structured_output=huge)),
                                    one("ok", SamplingParams(12, ignore_eos=True)), return_exceptions=True)

    for _ in range(2):
        huge_run, ok = asyncio.run(main())
        assert isinstance(huge_run, RequestInvalid) and status_name(huge_run) == "INVALID_ARGUMENT", huge_run
        assert "beyond llguidance's limits" in str(huge_run) and "too many expressions" in str(huge_run)
        assert len(ok) == 12 and ok[-1].finish_reason is FinishReason.LENGTH
        assert built.engine.counts() == (0, 0) and built.engine.blocks.num_held == 0
