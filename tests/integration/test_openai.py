"""The OpenAI-compatible HTTP API against the real server, through the official `openai` package."""

import functools
import itertools
import json
import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import openai
import pytest

from loramux.clients.types import Sampling

try:  # the HTTP client the installed openai package uses
    import httpx2 as httpx
except ImportError:  # pragma: no cover - older openai releases use httpx
    import httpx

from helpers import build_adapter, build_llama, peft_cat_generate, peft_generate, peft_logprobs
from server import ServerProcess
from test_grpc import PROMPT_IDS, code_of, total, wait_idle

GREEDY = dict(temperature=0, max_tokens=10, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def oserver(tiny_llama, tiny_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("oroot")
    proc = ServerProcess(
        ["--model", str(tiny_llama), "--adapter-dir", str(next(iter(tiny_adapters.values())).parent),
         "--adapter-root", str(root), "--dynamic-adapters", "--max-registered-adapters", "10",
         "--max-batch-size", "8", "--max-model-len", "256", "--default-max-new-tokens", "16",
         "--max-http-body-bytes", "200000", "--tool-call-parser", "hermes", "--base-linear", "torch",
         "--scheduling", "priority"],  # every request here goes through priority admission
        tmp_path_factory.mktemp("ologs") / "server.log",
    )
    proc.wait_ready()
    proc.root = root
    proc.oa = proc.openai()
    yield proc
    proc.stop()


def grpc_tokens(server, adapter="", **sampling):
    return server.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id=adapter,
                                  sampling=Sampling(max_new_tokens=10, ignore_eos=True, **sampling))


def test_models_lists_the_base_model_and_every_adapter(oserver, tiny_adapters):
    info = oserver.client.server_info()
    assert info.base_kernel_rows == ()  # --base-linear torch
    models = {m.id: m for m in oserver.oa.models.list().data}
    assert info.model in models and models[info.model].parent is None
    for name in tiny_adapters:
        assert models[name].parent == info.model
    assert {m.max_model_len for m in models.values()} == {256}  # vLLM's field, which clients size prompts by


def test_a_request_of_higher_priority_preempts_lower_ones_and_a_lower_one_waits(oserver, tiny_adapters):
    """--scheduling priority, the batch full of HTTP streams of priority 2: a gRPC request of
    priority 3 waits without preempting anything, and an HTTP request of priority 1 preempts one at
    once and finishes while they still run. Either field dropped on its way to the engine (0 for
    all) would swap those outcomes."""
    info = oserver.client.server_info()
    assert info.scheduling == "priority"
    wait_idle(oserver)
    preempted = oserver.metrics()["loramux_preemptions_total"]
    threads, lows, worse = [], [], []

    def low(i):
        lows.append(oserver.oa.completions.create(
            model="attn-r4", prompt=[11 + i, 12, 13], max_tokens=200, temperature=0,
            extra_body={"ignore_eos": True, "priority": 2}))

    for i in range(info.max_batch_size):
        threads.append(threading.Thread(target=low, args=(i,)))
        threads[-1].start()
    deadline = time.monotonic() + 30
    while oserver.metrics()["loramux_running_requests"] < info.max_batch_size:
        assert time.monotonic() < deadline, "the batch never filled"
        time.sleep(0.005)
    threads.append(threading.Thread(target=lambda: worse.append(oserver.client.generate(
        prompt_token_ids=PROMPT_IDS, sampling=Sampling(max_new_tokens=4, ignore_eos=True), priority=3))))
    threads[-1].start()
    while oserver.metrics()["loramux_waiting_requests"] < 1:
        assert time.monotonic() < deadline, "the priority-3 request never queued"
        time.sleep(0.005)
    assert oserver.metrics()["loramux_preemptions_total"] == preempted
    better = oserver.oa.completions.create(model=info.model, prompt=[7, 8, 9], max_tokens=4, temperature=0,
                                           extra_body={"ignore_eos": True, "priority": 1})
    assert better.usage.completion_tokens == 4
    assert len(lows) < info.max_batch_size and not worse  # it finished while they ran
    assert oserver.metrics()["loramux_preemptions_total"] == preempted + 1
    for t in threads:
        t.join(timeout=60)
    assert [r.usage.completion_tokens for r in lows] == [200] * info.max_batch_size
    assert len(worse[0].token_ids) == 4
    with pytest.raises(openai.BadRequestError, match="priority") as e:  # gRPC's field is an int32: so is this one
        oserver.oa.completions.create(model=info.model, prompt="x", max_tokens=1, extra_body={"priority": 1 << 31})
    assert e.value.body["param"] == "priority"


@pytest.mark.parametrize("adapter", ["", "attn-r4", "all-r16-rslora"])
def test_completions_give_grpc_tokens_plain_and_streamed(oserver, adapter):
    model = adapter or oserver.client.server_info().model
    expected = grpc_tokens(oserver, adapter)
    got = oserver.oa.completions.create(model=model, prompt=PROMPT_IDS, **GREEDY)
    assert got.choices[0].text == expected.text and got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == \
        (len(PROMPT_IDS), 10, len(PROMPT_IDS) + 10)
    chunks = list(oserver.oa.completions.create(model=model, prompt=PROMPT_IDS, stream=True,
                                                stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_chat_gives_grpc_text_plain_and_streamed(oserver):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about LoRA."}]
    expected = oserver.client.generate(messages=[(m["role"], m["content"]) for m in messages], adapter_id="all-r8",
                                       sampling=Sampling(max_new_tokens=10, ignore_eos=True))
    got = oserver.oa.chat.completions.create(model="all-r8", messages=messages, **GREEDY)
    assert got.choices[0].message.content == expected.text and got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == expected.prompt_tokens and got.usage.completion_tokens == 10
    stream = oserver.oa.chat.completions.create(model="all-r8", messages=messages, stream=True, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    # max_completion_tokens works too, and the text is a prefix of the longer run
    short = oserver.oa.chat.completions.create(model="all-r8", messages=messages, temperature=0,
                                               max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert short.usage.completion_tokens == 3 and expected.text.startswith(short.choices[0].message.content)
    # vLLM's stop_reason: the stop token id that ended the reply, plain and on the streamed last choice
    stop_id = expected.token_ids[4]
    ask = dict(model="all-r8", messages=messages, **{**GREEDY, "extra_body": {"ignore_eos": True,
                                                                            "stop_token_ids": [stop_id]}})
    stopped = oserver.oa.chat.completions.create(**ask).choices[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_id and got.choices[0].stop_reason is None
    last = [c.choices[0] for c in oserver.oa.chat.completions.create(**ask, stream=True) if c.choices][-1]
    assert last.finish_reason == "stop" and last.stop_reason == stop_id


def test_sampling_parameters_reach_the_engine(oserver, tiny_llama):
    seeded = dict(model="attn-r4", prompt=PROMPT_IDS, max_tokens=8, temperature=0.9, top_p=0.9, seed=11,
                  extra_body={"top_k": 20, "repetition_penalty": 1.2, "ignore_eos": True})
    a = oserver.oa.completions.create(**seeded).choices[0].text
    assert a == oserver.oa.completions.create(**seeded).choices[0].text
    expected = grpc_tokens(oserver, "attn-r4", temperature=0.9, top_p=0.9, seed=11, top_k=20, repetition_penalty=1.2)
    full = oserver.oa.completions.create(**{**seeded, "max_tokens": 10}).choices[0]
    assert full.text == expected.text and full.finish_reason == "length" and full.stop_reason is None
    stop = expected.text[3:6]
    if stop.strip():
        cut = oserver.oa.completions.create(**{**seeded, "max_tokens": 10, "stop": [stop]}).choices[0]
        assert stop not in cut.text and cut.finish_reason == "stop" and cut.stop_reason == stop  # vLLM's field
        chunks = [c.choices[0] for c in oserver.oa.completions.create(
            **{**seeded, "max_tokens": 10, "stop": ["no such stop", stop]}, stream=True) if c.choices]
        assert chunks[-1].finish_reason == "stop" and chunks[-1].stop_reason == stop
        assert all(c.stop_reason is None for c in chunks[:-1])
        assert oserver.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id="attn-r4", sampling=Sampling(
            max_new_tokens=10, ignore_eos=True, temperature=0.9, top_p=0.9, seed=11, top_k=20,
            repetition_penalty=1.2, stop=[stop])).stop_reason == stop
        including = {**seeded["extra_body"], "include_stop_str_in_output": True}  # vLLM's extension
        kept = oserver.oa.completions.create(**{**seeded, "max_tokens": 10, "stop": [stop], "extra_body": including})
        assert kept.choices[0].text == expected.text[: expected.text.index(stop) + len(stop)] == grpc_tokens(
            oserver, "attn-r4", temperature=0.9, top_p=0.9, seed=11, top_k=20, repetition_penalty=1.2, stop=[stop],
            include_stop_str_in_output=True).text
    # min_p (vLLM's extra, after temperature, top-k and top-p as in HF): 1 keeps the most likely
    # token alone, so a hot seeded run gives the greedy tokens, in both APIs
    hot = dict(model="attn-r4", prompt=PROMPT_IDS, max_tokens=10, temperature=1.5, seed=3,
               extra_body={"min_p": 1.0, "ignore_eos": True})
    greedy = grpc_tokens(oserver, "attn-r4").text
    assert oserver.oa.completions.create(**hot).choices[0].text == greedy
    assert grpc_tokens(oserver, "attn-r4", temperature=1.5, seed=3, min_p=1.0).text == greedy
    assert grpc_tokens(oserver, "attn-r4", temperature=1.5, seed=3).text != greedy  # it does sample without
    # allowed_token_ids (vLLM's extra): the same tokens in both APIs, only those
    allowed = [11, 42, 97, 200, 311]
    via_http = oserver.oa.completions.create(model="attn-r4", prompt=PROMPT_IDS, max_tokens=10, temperature=1.2, seed=5,
                                             logprobs=0, extra_body={"allowed_token_ids": allowed, "ignore_eos": True})
    via_grpc = grpc_tokens(oserver, "attn-r4", temperature=1.2, seed=5, allowed_token_ids=allowed, logprobs=0)
    assert via_http.choices[0].text == via_grpc.text and set(via_grpc.token_ids) <= set(allowed)
    # bad_words (vLLM's extra): a token of the greedy reply that is a word of its own is never
    # written once it is banned; the same tokens in both APIs
    from transformers import AutoTokenizer

    from loramux.server import bad_words

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    free = grpc_tokens(oserver, "attn-r4")
    word, banned = next((w, t) for t in free.token_ids if (w := tokenizer.decode([t])).strip()
                        and bad_words.BadWord((), t) in bad_words.tokenize(tokenizer, (w,), 384))
    via_http = oserver.oa.completions.create(model="attn-r4", prompt=PROMPT_IDS, max_tokens=10, temperature=0,
                                             extra_body={"bad_words": [word], "ignore_eos": True})
    via_grpc = grpc_tokens(oserver, "attn-r4", bad_words=[word])
    assert via_http.choices[0].text == via_grpc.text != free.text and banned not in via_grpc.token_ids


def test_logprobs_equal_peft_log_softmax_in_both_apis(oserver, tiny_llama, tiny_adapters):
    got = oserver.oa.chat.completions.create(
        model="attn-r4", messages=[{"role": "user", "content": "Tell me about LoRA."}], logprobs=True,
        top_logprobs=5, **GREEDY)
    grpc = oserver.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id="attn-r4",
                                   sampling=Sampling(max_new_tokens=10, ignore_eos=True, logprobs=5))
    ref = peft_logprobs(tiny_llama, tiny_adapters["attn-r4"], PROMPT_IDS, grpc.token_ids)
    for i, lp in enumerate(grpc.logprobs):
        assert lp.token_id == grpc.token_ids[i]
        assert abs(lp.logprob - ref[i, lp.token_id].item()) < 1e-4
        top = ref[i].topk(5)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert max(abs(v - r) for (_, v), r in zip(lp.top, top.values.tolist(), strict=True)) < 1e-4
    content = got.choices[0].logprobs.content
    assert len(content) == 10 and all(len(c.top_logprobs) == 5 for c in content)
    assert all(c.logprob <= 0 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)  # greedy
    # completions: the legacy shape, and the same numbers for the same tokens as gRPC
    comp = oserver.oa.completions.create(model="attn-r4", prompt=PROMPT_IDS, logprobs=3, **GREEDY)
    lps = comp.choices[0].logprobs
    assert max(abs(a - b.logprob) for a, b in zip(lps.token_logprobs, grpc.logprobs, strict=True)) < 1e-5
    assert len(lps.tokens) == 10 and all(1 <= len(t) <= 3 for t in lps.top_logprobs)  # keyed by text: may merge
    # vLLM's return_tokens_as_token_ids: tokens named "token_id:<id>", the gRPC ids, streamed or
    # not; text_offset still counts the text
    as_ids = {**GREEDY["extra_body"], "return_tokens_as_token_ids": True}
    named = oserver.oa.completions.create(model="attn-r4", prompt=PROMPT_IDS, logprobs=3,
                                          **{**GREEDY, "extra_body": as_ids}).choices[0]
    assert named.logprobs.tokens == [f"token_id:{t}" for t in grpc.token_ids] and named.text == comp.choices[0].text
    assert named.logprobs.text_offset == lps.text_offset and named.logprobs.token_logprobs == lps.token_logprobs
    assert all(set(top) == {f"token_id:{t}" for t, _ in lp.top[:3]} for top, lp in
               zip(named.logprobs.top_logprobs, grpc.logprobs, strict=True))
    streamed = [c.choices[0].logprobs.tokens for c in oserver.oa.completions.create(
        model="attn-r4", prompt=PROMPT_IDS, logprobs=0, stream=True, **{**GREEDY, "extra_body": as_ids})
        if c.choices and c.choices[0].logprobs]
    assert sum(streamed, []) == named.logprobs.tokens
    chat = oserver.oa.chat.completions.create(
        model="attn-r4", messages=[{"role": "user", "content": "Tell me about LoRA."}], logprobs=True,
        top_logprobs=2, **{**GREEDY, "extra_body": as_ids}).choices[0].logprobs.content
    chat_ids = oserver.client.generate(messages=[("user", "Tell me about LoRA.")], adapter_id="attn-r4",
                                       sampling=Sampling(max_new_tokens=10, ignore_eos=True)).token_ids
    assert [c.token for c in chat] == [f"token_id:{t}" for t in chat_ids]
    assert all(c.bytes == list(c.token.encode()) and len(c.top_logprobs) == 2
               and all(t.token.startswith("token_id:") for t in c.top_logprobs) for c in chat)
    # and nothing when nobody asks
    assert oserver.oa.completions.create(model="attn-r4", prompt=PROMPT_IDS, **GREEDY).choices[0].logprobs is None
    assert grpc_tokens(oserver, "attn-r4").logprobs == []


def test_documents_reach_the_models_chat_template(oserver):
    """vLLM's chat extra documents: the model's template shows them, the same prompt as gRPC's."""
    docs = [{"title": "a", "text": "LoRA is low-rank"}]
    said = oserver.oa.chat.completions.create(model="attn-r4", messages=[{"role": "user", "content": "x"}],
                                              max_tokens=1, extra_body={"documents": docs})
    rendered = oserver.client.tokenize(messages=[("user", "x")], documents=docs).token_ids
    assert said.usage.prompt_tokens == len(rendered) > len(oserver.client.tokenize(messages=[("user", "x")]).token_ids)


def peft_beams(model_dir, adapter_dir, prompt, width, steps, length_penalty):
    """The same search (server/beam_search.py) scored by PEFT's log-softmax, float32: the oracle."""
    import asyncio

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loramux.server.beam_search import BeamSearchParams, beam_search
    from loramux.server.requests import TokenLogprob

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = {model.generation_config.eos_token_id, model.config.eos_token_id} - {None}
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()

    async def step(seqs):
        out = []
        for seq in seqs:
            with torch.no_grad():
                values, ids = torch.log_softmax(model(torch.tensor([list(seq)])).logits[0, -1], -1).topk(2 * width)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
            out.append(TokenLogprob(*top[0], top, 1))
        return out

    return asyncio.run(beam_search(tuple(prompt), BeamSearchParams(width, steps, length_penalty, False,
                                                                   frozenset(eos)), step))


@pytest.mark.parametrize("adapter", ["", "all-r8"])
def test_beam_search_returns_the_beams_a_search_over_peft_finds(oserver, tiny_llama, tiny_adapters, adapter):
    """vLLM's use_beam_search, completions and chat: the n beams, best first, are the ones the same
    search finds over PEFT's log-softmax, token for token (their logprobs to 1e-4), with the
    length penalty; each choice's text is its tokens decoded, and usage counts every beam's tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = adapter or oserver.client.server_info().model
    width, steps, penalty = 3, 5, 0.6
    beam = {"use_beam_search": True, "length_penalty": penalty, "return_tokens_as_token_ids": True}
    prompt = [5, 17, 99, 123, 44, 7]
    messages = [{"role": "user", "content": "Tell me about beams"}]
    rendered = oserver.client.tokenize(messages=[("user", "Tell me about beams")]).token_ids
    for kind, ids in (("completion", prompt), ("chat", rendered)):
        expected = peft_beams(tiny_llama, tiny_adapters.get(adapter), ids, width, steps, penalty)
        if kind == "completion":
            r = oserver.oa.completions.create(model=model, prompt=prompt, n=width, max_tokens=steps, logprobs=2,
                                              extra_body=beam)
            got = [([int(t.removeprefix("token_id:")) for t in c.logprobs.tokens], c.logprobs.token_logprobs,
                    c.text, c.finish_reason) for c in r.choices]
        else:
            r = oserver.oa.chat.completions.create(model=model, messages=messages, n=width, max_tokens=steps,
                                                   logprobs=True, top_logprobs=2, extra_body=beam)
            got = [([int(t.token.removeprefix("token_id:")) for t in c.logprobs.content],
                    [t.logprob for t in c.logprobs.content], c.message.content, c.finish_reason) for c in r.choices]
        assert [g[0] for g in got] == [list(b.tokens) for b in expected], kind
        for (_, logprobs, text, finish), b in zip(got, expected, strict=True):
            assert logprobs == pytest.approx([lp.logprob for lp in b.logprobs], abs=1e-4)
            assert text == tok.decode(b.tokens, skip_special_tokens=True)
            assert finish == ("stop" if b.eos else "length")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), sum(len(b.tokens) for b in expected))
    # streamed (as vLLM streams beams: every chunk once they are ranked), the same choices and usage
    chunks = list(oserver.oa.completions.create(model=model, prompt=prompt, n=width, max_tokens=steps, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_body={"use_beam_search": True, "length_penalty": penalty}))
    whole = oserver.oa.completions.create(model=model, prompt=prompt, n=width, max_tokens=steps,
                                          extra_body={"use_beam_search": True, "length_penalty": penalty})
    texts, finishes = [""] * width, [None] * width
    for chunk in chunks[:-1]:
        for c in chunk.choices:
            texts[c.index] += c.text
            finishes[c.index] = c.finish_reason or finishes[c.index]
    assert texts == [c.text for c in whole.choices] and finishes == [c.finish_reason for c in whole.choices]
    assert chunks[-1].usage == whole.usage
    chat = dict(model=model, messages=messages, n=2, max_tokens=steps, extra_body={"use_beam_search": True})
    contents = ["", ""]
    for chunk in oserver.oa.chat.completions.create(stream=True, **chat):
        for c in chunk.choices:
            contents[c.index] += c.delta.content or ""
    assert contents == [c.message.content for c in oserver.oa.chat.completions.create(**chat).choices]
    # with width 1, beam search is greedy decoding
    (one,) = oserver.oa.completions.create(model=model, prompt=prompt, max_tokens=steps,
                                           extra_body={"use_beam_search": True}).choices
    assert one.text == oserver.oa.completions.create(model=model, prompt=prompt, max_tokens=steps, temperature=0,
                                                     extra_body={"ignore_eos": True}).choices[0].text


def test_beam_search_ranks_ended_beams_by_the_length_penalty(oserver, tiny_llama):
    """Ten beams over 40 tokens meet EOS often on a random model, so the length penalty decides
    between short ended beams and long ones: each penalty's beams are the PEFT-scored search's."""
    model, prompt = oserver.client.server_info().model, [9, 8, 7, 6]
    found = {}
    for penalty in (0.0, 2.0):
        expected = peft_beams(tiny_llama, None, prompt, 10, 40, penalty)
        r = oserver.oa.completions.create(model=model, prompt=prompt, n=10, max_tokens=40, logprobs=0, extra_body={
            "use_beam_search": True, "length_penalty": penalty, "return_tokens_as_token_ids": True})
        found[penalty] = [[int(t.removeprefix("token_id:")) for t in c.logprobs.tokens] for c in r.choices]
        assert found[penalty] == [list(b.tokens) for b in expected]
        assert [c.finish_reason for c in r.choices] == ["stop" if b.eos else "length" for b in expected]
    assert found[0.0] != found[2.0] and any(len(t) < 40 for t in found[0.0])


def test_bad_requests_get_the_clients_own_exceptions(oserver):
    for kwargs, needle in [
        (dict(n=0), "n"), (dict(n=3, best_of=2), "best_of is 2; it must be at least n (3)"),
        (dict(best_of=2, stream=True), "best_of greater than n is not available with stream: true"),
        (dict(stream_options={"include_usage": True}), "stream_options is only allowed with stream: true"),
        (dict(best_of=11, extra_body={"use_beam_search": True}),
         "best_of is the beam width with use_beam_search: 1 to 10, got 11"),
        (dict(max_tokens=0), "max_tokens must be in [1, "),
        (dict(logprobs=21), "logprobs"), (dict(max_tokens=10**6), "max_tokens must be in [1, 1024], got 1000000"),
        (dict(max_tokens=5, extra_body={"min_tokens": 6}), "min_tokens must be in [0, max_tokens (5)], got 6"),
        (dict(temperature=-1), "temperature"), (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-3), "frequency_penalty"), (dict(logit_bias={"5": 101}), "logit_bias"),
        (dict(logit_bias={"x": 1}), "logit_bias"), (dict(logit_bias={"10000000": 1}), "vocabulary"),
        (dict(logit_bias={str(i): 1 for i in range(301)}), "300"), (dict(seed=2**64), "seed"),
        (dict(extra_body={"top_k": -3}), "top_k"), (dict(extra_body={"min_p": 1.5}), "min_p must be in [0, 1], got 1.5"),
        # vLLM's extensions that are not served are refused when they ask for something, never ignored
        (dict(extra_body={"use_beam_search": True, "top_p": 0.5}), "top_p is not available with use_beam_search"),
        (dict(extra_body={"use_beam_search": True, "min_tokens": 2}), "min_tokens is not available with use_beam_search"),
        (dict(n=11, extra_body={"use_beam_search": True}), "n is the beam width with use_beam_search: 1 to 10, got 11"),
        (dict(extra_body={"length_penalty": 2.0}), "length_penalty ranks beams: it needs use_beam_search"),
        (dict(extra_body={"logits_processors": ["x"]}), "logits_processors"),
        (dict(extra_body={"allowed_token_ids": [5, 384]}), "allowed_token_ids: token 384 is outside the vocabulary"),
        (dict(extra_body={"allowed_token_ids": []}), "allowed_token_ids is empty, which leaves no token to sample"),
        (dict(extra_body={"stop_token_ids": [384], "min_tokens": 1}), "stop_token_ids: token 384 is outside the vocabulary"),
        (dict(extra_body={"bad_words": ["x", " "]}), "bad_words entries must be 1 to 256 characters, not all spaces"),
        (dict(extra_body={"priority": -(1 << 31) - 1}), "priority"),  # an int32, as gRPC's
        # a boolean is not a number (pydantic's lax mode would take true as 1), as OpenAI refuses it
        (dict(max_tokens=True), "max_tokens: Input should be an integer, not a boolean"),
        (dict(temperature=False), "temperature: Input should be a number, not a boolean"),
        (dict(logit_bias={"5": True}), "logit_bias: Input should be a number, not a boolean"),
        (dict(extra_body={"stop_token_ids": [7, True]}), "stop_token_ids: Input should be an integer, not a boolean"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            oserver.oa.completions.create(model="attn-r4", prompt="hi", **kwargs)
        assert needle in e.value.message and e.value.status_code == 400
        # error.param names the body's field (the engine's checks too), as OpenAI's errors do
        named = [k for k in kwargs if k != "extra_body"] + list(kwargs.get("extra_body", {}))
        if len(named) == 1:
            assert e.value.body["param"] == named[0], (kwargs, e.value.body)
    for route, body in [("completions", {"model": "attn-r4", "prompt": [5, True]}),  # token ids, in lists too
                        ("detokenize", {"tokens": [5, False]})]:
        refused = httpx.post(f"{oserver.base_url}/{route}", json=body)
        assert refused.status_code == 400 and "Input should be an integer, not a boolean" in refused.text, refused.text
    # a field of several types is named as the body names it, with the types it takes
    refused = httpx.post(f"{oserver.base_url}/completions", json={"model": "attn-r4", "prompt": ["a", [1, 2]]}).json()
    assert refused["error"]["param"] == "prompt" and \
        "prompt takes str or list[int] or list[str] or list[list[int]]" in refused["error"]["message"], refused
    with pytest.raises(openai.BadRequestError):
        oserver.oa.chat.completions.create(model="attn-r4", messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="a message content part of type 'text' needs its text") as e:
        oserver.oa.chat.completions.create(model="attn-r4", messages=[{"role": "user", "content": [{"type": "text"}]}])
    assert e.value.body["param"] == "messages"
    for role in ("user", "system", "tool"):  # as OpenAI: only an assistant turn may come without content
        with pytest.raises(openai.BadRequestError, match=rf"messages\[1\]\.content is required .*'{role}'") as e:
            oserver.oa.chat.completions.create(model="attn-r4", messages=[{"role": "user", "content": "x"},
                                                                         {"role": role, "tool_call_id": "c1"}])
        assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="--trust-request-chat-template") as e:  # not trusted here
        oserver.oa.chat.completions.create(model="attn-r4", messages=[{"role": "user", "content": "x"}],
                                           extra_body={"chat_template": "{{ messages }}"})
    assert e.value.body["param"] == "chat_template"
    # their values that ask for nothing, as clients send them, are served
    defaults = {"use_beam_search": False, "length_penalty": 1, "bad_words": [], "priority": 0, "prompt_logprobs": None,
                "return_tokens_as_token_ids": False, "metadata": {"k": "v"}}
    assert oserver.oa.completions.create(model="attn-r4", prompt="hi", max_tokens=1, extra_body=defaults).choices
    with pytest.raises(openai.BadRequestError, match=r"top_logprobs must be in \[0, 20\], got 21") as e:
        oserver.oa.chat.completions.create(model="attn-r4", messages=[{"role": "user", "content": "x"}],
                                           logprobs=True, top_logprobs=21)
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.NotFoundError) as e:
        oserver.oa.completions.create(model="no-such-model", prompt="hi")
    assert "no-such-model" in e.value.message
    body = httpx.post(f"{oserver.base_url}/completions", content=b"x" * 300_000,
                      headers={"content-type": "application/json"})
    assert body.status_code == 413 and "--max-http-body-bytes" in body.json()["error"]["message"]
    bad_json = httpx.post(f"{oserver.base_url}/completions", content=b"{", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["param"] is None
    assert bad_json.json()["error"]["message"].startswith("the body is not valid JSON (")
    cut = httpx.post(f"{oserver.base_url}/completions", content=b'{"model": "attn-r4", "prompt": }',
                     headers={"content-type": "application/json"})
    assert cut.status_code == 400 and cut.json()["error"]["message"].endswith(" at character 31)")
    # a lone surrogate escape is valid JSON but not text: a 400 naming its place, on every route
    for route, body, param in [
        ("completions", '{"model": "attn-r4", "prompt": "a \\ud800 b"}', "prompt"),
        ("chat/completions", '{"model": "attn-r4", "messages": [{"role": "user", "content": "\\udfff"}]}',
         "messages.0.content"),
        ("completions", '{"model": "attn-r4", "prompt": "\\ud83d\\ude00", "logit_bias": {"\\ud800": 1}}',
         "logit_bias.\\ud800"),
        ("tokenize", '{"prompt": "\\ud800"}', "prompt"),
    ]:
        refused = httpx.post(f"{oserver.base_url}/{route}", content=body.encode(),
                             headers={"content-type": "application/json"})
        assert refused.status_code == 400, (route, refused.text)
        assert refused.json()["error"]["param"] == param
        assert refused.json()["error"]["message"].startswith(f"{param}: U+D")
        assert "a lone surrogate" in refused.json()["error"]["message"]
    # an empty prompt or conversation, each named in the body's words
    for route, body, message in [("completions", {"model": "attn-r4", "prompt": ""}, "the prompt is empty"),
                                 ("chat/completions", {"model": "attn-r4", "messages": []}, "messages: List should")]:
        refused = httpx.post(f"{oserver.base_url}/{route}", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["message"].startswith(message), refused.text
    # the framework's own refusals come in OpenAI's error shape too
    deep = b'{"model": "attn-r4", "prompt": "hi", "logit_bias": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3001
    too_deep = httpx.post(f"{oserver.base_url}/completions", content=deep, headers={"content-type": "application/json"})
    assert too_deep.status_code == 400 and "nested too deep" in too_deep.json()["error"]["message"]
    unknown = httpx.get(f"{oserver.base_url}/no-such-route")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == 404
    wrong_method = httpx.get(f"{oserver.base_url}/completions")
    assert wrong_method.status_code == 405 and "POST" in wrong_method.headers["allow"]
    assert wrong_method.json()["error"]["message"] == "Method Not Allowed"


def test_an_unset_max_tokens_fits_the_room_a_long_rope_leaves(oserver, tokenizer):
    """Without max_tokens, completions (OpenAI's 16) and chat (--default-max-new-tokens, 16 here)
    generate what --max-model-len (256) leaves after the prompt, as vLLM does, rather than refusing
    the request for a limit the client never set; a max_tokens it sets is refused past the limit."""
    long = [5 + i % 300 for i in range(250)]
    got = oserver.oa.completions.create(model="attn-r4", prompt=long, temperature=0, extra_body={"ignore_eos": True})
    assert (got.usage.completion_tokens, got.choices[0].finish_reason) == (6, "length")
    assert oserver.oa.completions.create(model="attn-r4", prompt=long[:50], temperature=0,
                                         extra_body={"ignore_eos": True}).usage.completion_tokens == 16
    with pytest.raises(openai.BadRequestError, match="exceeds max_model_len 256"):
        oserver.oa.completions.create(model="attn-r4", prompt=long, max_tokens=16)
    def chat_of(words: int) -> list[dict]:
        return [{"role": "user", "content": " fox" * words}]
    words = next(k for k in range(200, 260)  # a chat prompt that leaves fewer than 16 tokens
                 if httpx.post(f"http://127.0.0.1:{oserver.http_port}/tokenize",
                               json={"messages": chat_of(k)}).json()["count"] > 245)
    chat = oserver.oa.chat.completions.create(model="attn-r4", messages=chat_of(words), temperature=0,
                                              extra_body={"ignore_eos": True})
    assert chat.usage.prompt_tokens + chat.usage.completion_tokens == 256 and chat.usage.completion_tokens < 16
    assert chat.choices[0].finish_reason == "length"


OTHER_IDS = [7, 19, 3, 55]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def test_echo_gives_prompt_logprobs_equal_to_peft_in_both_apis(oserver, tiny_llama, tiny_adapters, tokenizer):
    ref = peft_logprobs(tiny_llama, tiny_adapters["attn-r4"], PROMPT_IDS[:1], PROMPT_IDS[1:])
    plain = oserver.oa.completions.create(model="attn-r4", prompt=PROMPT_IDS, logprobs=2, **GREEDY)
    echoed = oserver.oa.completions.create(model="attn-r4", prompt=PROMPT_IDS, logprobs=2, echo=True, **GREEDY)
    prompt_text = tokenizer.decode(PROMPT_IDS)
    choice = echoed.choices[0]
    assert choice.text == prompt_text + plain.choices[0].text
    lps = choice.logprobs
    assert len(lps.tokens) == len(PROMPT_IDS) + 10 and lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
    for p in range(len(PROMPT_IDS) - 1):
        assert abs(lps.token_logprobs[p + 1] - ref[p, PROMPT_IDS[p + 1]].item()) < 1e-4
    assert lps.token_logprobs[len(PROMPT_IDS):] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-4)
    assert lps.text_offset[: len(PROMPT_IDS)] == sorted(lps.text_offset[: len(PROMPT_IDS)])
    assert echoed.usage.completion_tokens == 10
    # gRPC: the ids, the values and the top alternatives
    grpc = oserver.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id="attn-r4", sampling=Sampling(
        max_new_tokens=2, ignore_eos=True, prompt_logprobs=3))
    assert [lp.token_id for lp in grpc.prompt_logprobs] == PROMPT_IDS[1:] and grpc.logprobs == []
    for p, lp in enumerate(grpc.prompt_logprobs):
        assert [t for t, _ in lp.top] == ref[p].topk(3).indices.tolist()
        assert lp.rank == int((ref[p] > ref[p, lp.token_id]).sum()) + 1  # TokenLogprob.rank (field 4)
    assert any(lp.rank > 1 for lp in grpc.prompt_logprobs)
    streamed = list(oserver.client.generate_stream(prompt_token_ids=PROMPT_IDS, adapter_id="attn-r4",
                                                   sampling=Sampling(max_new_tokens=3, ignore_eos=True,
                                                                     prompt_logprobs=0)))
    assert [lp.logprob for lp in streamed[0].prompt_logprobs] == [lp.logprob for lp in grpc.prompt_logprobs]
    assert all(c.prompt_logprobs == [] for c in streamed[1:])


def test_prompt_logprobs_extra_gives_each_prompt_tokens_logprob_rank_and_top(oserver, tiny_llama, tiny_adapters,
                                                                                tokenizer):
    """vLLM's prompt_logprobs k: None for the first prompt token, then a dict keyed by token id
    (the prompt's token first, with its rank in the vocabulary; then the k most likely, ranked
    1..k) of PEFT's log-softmax; per choice in completions (beside an echo with its own k), at the
    top of a chat response; refused with stream: true or past 20."""
    ref = peft_logprobs(tiny_llama, tiny_adapters["attn-r4"], PROMPT_IDS[:1], PROMPT_IDS[1:])

    def check(dicts, k):
        assert len(dicts) == len(PROMPT_IDS) and dicts[0] is None
        for p, entry in enumerate(dicts[1:]):
            token, row = PROMPT_IDS[p + 1], ref[p]
            top = row.topk(k).indices.tolist()
            assert list(entry)[0] == str(token) and set(entry) == {str(token), *map(str, top)}
            assert entry[str(token)]["rank"] == int((row > row[token]).sum()) + 1
            assert entry[str(token)]["decoded_token"] == tokenizer.decode([token])
            for t, item in entry.items():
                assert abs(item["logprob"] - row[int(t)].item()) < 1e-4
            assert [entry[str(t)]["rank"] for t in top] == [r if t != token else entry[str(token)]["rank"]
                                                             for r, t in enumerate(top, 1)]

    got = oserver.oa.completions.create(model="attn-r4", prompt=[PROMPT_IDS, PROMPT_IDS[:4]], n=2, echo=True,
                                        logprobs=1, **{**GREEDY, "max_tokens": 3,
                                                       "extra_body": {"prompt_logprobs": 3, "ignore_eos": True}})
    for choice in got.choices[:2]:
        check(choice.prompt_logprobs, 3)
        assert all(len(top) == 1 for top in choice.logprobs.top_logprobs[1:])  # the echo keeps its own k
    assert [len(c.prompt_logprobs) for c in got.choices[2:]] == [4, 4]
    alone = oserver.oa.completions.create(model="attn-r4", prompt=PROMPT_IDS, **{
        **GREEDY, "extra_body": {"prompt_logprobs": 0, "ignore_eos": True}}).choices[0]
    assert alone.logprobs is None and all(len(d) == 1 for d in alone.prompt_logprobs[1:])
    messages = [{"role": "user", "content": "Tell me about LoRA."}]
    chat = oserver.oa.chat.completions.create(model="attn-r4", messages=messages,
                                              **{**GREEDY, "extra_body": {"prompt_logprobs": 2, "ignore_eos": True}})
    rendered = oserver.client.tokenize(messages=[("user", "Tell me about LoRA.")]).token_ids
    assert [None if d is None else int(list(d)[0]) for d in chat.prompt_logprobs] == [None, *rendered[1:]]
    assert all(2 <= len(d) <= 3 for d in chat.prompt_logprobs[1:])
    for body, needle in (({"prompt_logprobs": 21}, "prompt_logprobs must be in [0, 20], got 21"),
                         ({"prompt_logprobs": -1}, "prompt_logprobs must be in [0, 20], got -1"),
                         ({"prompt_logprobs": 1, "stream": True}, "not available with stream: true")):
        with pytest.raises(openai.BadRequestError) as e:
            oserver.oa.completions.create(model="attn-r4", prompt=PROMPT_IDS, max_tokens=2, extra_body=body)
        assert needle in e.value.message and e.value.body["param"] == "prompt_logprobs"


def test_echo_with_no_new_tokens_scores_a_batch_of_texts_as_eval_harnesses_ask(oserver, tiny_llama, tokenizer):
    """lm-eval-harness's loglikelihood request: several prompts, echo, max_tokens 0, logprobs 1."""
    texts = ["The capital of France is Paris", "LoRA adapters share one base"]
    got = oserver.oa.completions.create(model=oserver.client.server_info().model, prompt=texts, echo=True,
                                        max_tokens=0, logprobs=1, temperature=0)
    for text, choice in zip(texts, got.choices, strict=True):
        ids = tokenizer(text)["input_ids"]
        assert choice.text == text and choice.finish_reason == "length"
        assert len(choice.logprobs.tokens) == len(ids) and choice.logprobs.token_logprobs[0] is None
        ref = peft_logprobs(tiny_llama, None, ids[:1], ids[1:])
        assert max(abs(v - ref[p, ids[p + 1]].item())
                   for p, v in enumerate(choice.logprobs.token_logprobs[1:])) < 1e-4
    assert got.usage.completion_tokens == 0
    assert got.usage.prompt_tokens == sum(len(tokenizer(t)["input_ids"]) for t in texts)
    streamed = list(oserver.oa.completions.create(model=oserver.client.server_info().model, prompt=texts,
                                                  echo=True, max_tokens=0, logprobs=1, temperature=0, stream=True))
    for i, text in enumerate(texts):
        mine = [ch for c in streamed for ch in c.choices if ch.index == i]
        assert "".join(ch.text for ch in mine) == text and mine[-1].finish_reason == "length"
        # the same values to float32 rounding: the two calls' prompts may share a step or not, and a
        # step's row count picks the matmul (torch's GEMV or GEMM, or the few-row kernel)
        assert mine[0].logprobs.token_logprobs[1:] == pytest.approx(got.choices[i].logprobs.token_logprobs[1:],
                                                                    abs=1e-5)
        assert mine[0].logprobs.token_logprobs[0] is None
    # with n: every choice echoes its own prompt, streamed or not
    twice = oserver.oa.completions.create(model=oserver.client.server_info().model, prompt=texts, echo=True,
                                          max_tokens=0, logprobs=1, temperature=0, n=2)
    assert [c.text for c in twice.choices] == [texts[0], texts[0], texts[1], texts[1]]
    assert twice.choices[1].logprobs.token_logprobs == pytest.approx(got.choices[0].logprobs.token_logprobs)
    streamed_n = list(oserver.oa.completions.create(model=oserver.client.server_info().model, prompt=texts[1],
                                                    echo=True, max_tokens=3, temperature=0, n=2, stream=True))
    for i in (0, 1):
        text = "".join(ch.text for c in streamed_n for ch in c.choices if ch.index == i)
        assert text.startswith(texts[1]) and len(text) > len(texts[1])
    # echo without logprobs: the prompt before the completion, nothing else
    plain = oserver.oa.completions.create(model="attn-r4", prompt="hello there", echo=True, **GREEDY)
    assert plain.choices[0].text.startswith("hello there") and plain.choices[0].logprobs is None


def test_logit_bias_and_occurrence_penalties_in_both_apis(oserver):
    forced = oserver.oa.completions.create(model="attn-r4", prompt=PROMPT_IDS, logit_bias={"42": 100}, logprobs=1,
                                           **GREEDY)
    grpc = oserver.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id="attn-r4", sampling=Sampling(
        max_new_tokens=10, ignore_eos=True, logit_bias={42: 100.0}))
    assert list(grpc.token_ids) == [42] * 10 and forced.choices[0].text == grpc.text
    assert max(forced.choices[0].logprobs.token_logprobs) < -0.7  # raw logprobs: the bias is not in them
    # negative penalties reward what was generated: the greedy run repeats itself
    plain = grpc_tokens(oserver, "attn-r4")
    rewarded = grpc_tokens(oserver, "attn-r4", presence_penalty=-2.0, frequency_penalty=-2.0)
    assert len(set(rewarded.token_ids)) < len(set(plain.token_ids))
    http = oserver.oa.completions.create(model="attn-r4", prompt=PROMPT_IDS, presence_penalty=-2.0,
                                         frequency_penalty=-2.0, **GREEDY)
    assert http.choices[0].text == rewarded.text


def test_n_completions_of_a_batch_of_prompts_in_openais_order(oserver):
    """Choice p * n + j is prompt p's j-th completion; usage counts each prompt once."""
    expected = [grpc_tokens(oserver, "attn-r4").text,
                oserver.client.generate(prompt_token_ids=OTHER_IDS, adapter_id="attn-r4",
                                        sampling=Sampling(max_new_tokens=10, ignore_eos=True)).text]
    got = oserver.oa.completions.create(model="attn-r4", prompt=[PROMPT_IDS, OTHER_IDS], n=2, **GREEDY)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert [c.text for c in got.choices] == [expected[0], expected[0], expected[1], expected[1]]
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(PROMPT_IDS) + len(OTHER_IDS), 40)
    # text prompts too, and chat
    texts = oserver.oa.completions.create(model="attn-r4", prompt=["hello there", "a b c"], **GREEDY)
    assert [c.index for c in texts.choices] == [0, 1] and texts.choices[0].text != texts.choices[1].text
    messages = [{"role": "user", "content": "Tell me about LoRA."}]
    chat = oserver.oa.chat.completions.create(model="all-r8", messages=messages, n=3, **GREEDY)
    single = oserver.oa.chat.completions.create(model="all-r8", messages=messages, **GREEDY)
    assert [c.message.content for c in chat.choices] == [single.choices[0].message.content] * 3
    assert chat.usage.prompt_tokens == single.usage.prompt_tokens and chat.usage.completion_tokens == 30


def test_choices_of_one_prompt_prefill_it_once(oserver):
    """The other completions wait for the first to compute the prompt's blocks, then hit them."""
    prompt = [(7 * i + 3) % 300 + 1 for i in range(40)]  # two full blocks of 16, not seen before
    before = oserver.metrics()["loramux_prefix_cache_hit_tokens_total"]
    got = oserver.oa.completions.create(model="attn-r4", prompt=prompt, n=4, **GREEDY)
    hits = oserver.metrics()["loramux_prefix_cache_hit_tokens_total"] - before
    assert hits >= 3 * 32
    single = oserver.client.generate(prompt_token_ids=prompt, adapter_id="attn-r4",
                                     sampling=Sampling(max_new_tokens=10, ignore_eos=True))
    assert [c.text for c in got.choices] == [single.text] * 4


def test_seeded_choices_differ_and_each_reproduces_alone(oserver):
    sampled = dict(model="attn-r4", prompt=PROMPT_IDS, max_tokens=12, temperature=1.0, extra_body={"ignore_eos": True})
    got = oserver.oa.completions.create(n=3, seed=41, **sampled)
    texts = [c.text for c in got.choices]
    assert len(set(texts)) > 1  # twelve tokens drawn at temperature 1: equal only by a miracle
    for j, text in enumerate(texts):  # the j-th choice draws with seed + j
        assert oserver.oa.completions.create(seed=41 + j, **sampled).choices[0].text == text
    unseeded = oserver.oa.completions.create(n=3, **sampled)
    assert len(unseeded.choices) == 3


def test_best_of_returns_the_candidates_with_the_highest_logprob_per_token(oserver):
    """OpenAI's best_of: best_of candidates of each prompt (candidate j draws with seed + j, as
    choice j of n = best_of does), the n with the highest mean token logprob returned, best first;
    usage counts every candidate; logprobs come back only when asked; each prompt's choices carry
    its prompt logprobs. Chat takes it too, and beam search takes it as its width (vLLM's rule)."""
    stops = list(range(40, 80))  # some candidates end early, so the mean and the sum rank apart
    sampled = dict(model="attn-r4", prompt=[PROMPT_IDS, OTHER_IDS], temperature=1.0, seed=3, max_tokens=12,
                   extra_body={"stop_token_ids": stops, "prompt_logprobs": 1})
    every = oserver.oa.completions.create(n=5, logprobs=0, **sampled)
    scored = oserver.oa.completions.create(n=2, best_of=5, logprobs=0, **sampled)
    best = oserver.oa.completions.create(n=2, best_of=5, **sampled)
    sum_differs = False
    for p in range(2):
        candidates = [c.logprobs.token_logprobs for c in every.choices[5 * p: 5 * p + 5]]
        by_mean = sorted(range(5), key=lambda j: -sum(candidates[j]) / len(candidates[j]))[:2]
        sum_differs |= by_mean != sorted(range(5), key=lambda j: -sum(candidates[j]))[:2]
        got = scored.choices[2 * p: 2 * p + 2]
        assert [c.logprobs.token_logprobs for c in got] == [candidates[j] for j in by_mean]
        assert [c.text for c in got] == [every.choices[5 * p + j].text for j in by_mean]
        assert all(c.prompt_logprobs == every.choices[5 * p].prompt_logprobs is not None for c in got)
    assert sum_differs  # the seed is one where ranking by the sum would return other candidates
    assert [c.index for c in best.choices] == [0, 1, 2, 3] and all(c.logprobs is None for c in best.choices)
    assert [c.text for c in best.choices] == [c.text for c in scored.choices]
    assert best.usage == every.usage  # five candidates of each prompt generated
    messages = [{"role": "user", "content": "Tell me about LoRA."}]
    chat = dict(model="all-r8", messages=messages, temperature=1.0, seed=11, max_tokens=8)
    candidates = oserver.oa.chat.completions.create(n=3, logprobs=True, **chat).choices
    means = [sum(t.logprob for t in c.logprobs.content) / len(c.logprobs.content) for c in candidates]
    (one,) = oserver.oa.chat.completions.create(extra_body={"best_of": 3}, **chat).choices
    assert one.message.content == candidates[means.index(max(means))].message.content
    beam = dict(model="attn-r4", prompt=PROMPT_IDS, max_tokens=6, extra_body={"use_beam_search": True})
    four = oserver.oa.completions.create(n=4, **beam)
    two = oserver.oa.completions.create(n=2, best_of=4, **beam)
    assert [c.text for c in two.choices] == [c.text for c in four.choices[:2]] and two.usage == four.usage


def test_a_request_may_name_a_weighted_sum_of_adapters(oserver, tiny_llama, tiny_adapters):
    """combine instead of an adapter (gRPC's GenerateRequest.combine, the HTTP body's combine): the
    sum is served token for token as PEFT's add_weighted_adapter "cat" of the same parts, joining a
    batch of other adapters' requests; it is registered once, as a dynamic adapter named by its
    parts' ids, versions and float32 weights, which the same sum shares whatever the API or the
    order of its parts; it is unregistered for room like any dynamic registration; refusals name
    the problem."""
    parts = [("attn-r4", 0.7), ("all-r8", -0.3)]
    expected = peft_cat_generate(tiny_llama, tiny_adapters, parts, [PROMPT_IDS], 10)[0]
    base = oserver.client.server_info().model
    body = {"ignore_eos": True, "return_tokens_as_token_ids": True,
            "combine": [{"adapter_id": a, "weight": w} for a, w in reversed(parts)]}
    with ThreadPoolExecutor(5) as pool:
        others = {a: pool.submit(grpc_tokens, oserver, a) for a in ("attn-r4", "all-r8", "")}
        time.sleep(0.05)  # the sums join their batch
        via_grpc = pool.submit(oserver.client.generate, prompt_token_ids=PROMPT_IDS, combine=parts,
                               sampling=Sampling(max_new_tokens=10, ignore_eos=True))
        via_http = pool.submit(oserver.oa.completions.create, model=base, prompt=PROMPT_IDS, max_tokens=10,
                               temperature=0, logprobs=0, extra_body=body)
        assert via_grpc.result().token_ids == expected
        assert [int(t.removeprefix("token_id:")) for t in via_http.result().choices[0].logprobs.tokens] == expected
    for adapter, result in others.items():
        assert result.result().token_ids == grpc_tokens(oserver, adapter).token_ids
    (mix,) = [a for a in oserver.client.list_adapters() if "+" in a.adapter_id]
    assert re.fullmatch(r"all-r8@\d+\*-0\.3\+attn-r4@\d+\*0\.7", mix.adapter_id), mix.adapter_id
    assert (mix.rank, mix.path) == (12, "") and [p for p, _ in mix.combine] == ["all-r8", "attn-r4"]
    # while registered, its id names it as a model too
    assert oserver.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id=mix.adapter_id, sampling=Sampling(
        max_new_tokens=10, ignore_eos=True)).token_ids == expected
    # other sums fill the registry: the least recently used goes, not one in use or registered by name
    for i in range(10):
        oserver.client.generate(prompt_token_ids=PROMPT_IDS, combine=[("attn-r4", 0.05 * (i + 1))],
                                sampling=Sampling(max_new_tokens=1))
    listed = {a.adapter_id for a in oserver.client.list_adapters()}
    assert mix.adapter_id not in listed and set(tiny_adapters) <= listed
    for kwargs, status, needle in [
        (dict(adapter_id="attn-r4", combine=parts), grpc.StatusCode.INVALID_ARGUMENT, "must name the base model"),
        (dict(combine=[("nope", 1.0)]), grpc.StatusCode.NOT_FOUND, "nope"),
        (dict(combine=[("attn-r64", 1.0), ("all-r8", 1.0)]), grpc.StatusCode.INVALID_ARGUMENT,
         "the combination's rank is 72 (the sum of its adapters' ranks); --max-lora-rank is 64"),
        (dict(combine=[("attn-r4", 1.0), ("attn-r4", 2.0)]), grpc.StatusCode.INVALID_ARGUMENT, "each adapter once"),
    ]:
        code, details = code_of(oserver.client.generate, prompt_token_ids=PROMPT_IDS, **kwargs)
        assert code == status and needle in details, (kwargs, code, details)
    for model, combine, needle in [
        ("attn-r4", [{"adapter_id": "all-r8", "weight": 1}], "must name the base model"),
        (base, [{"adapter_id": "attn-r4", "weight": 1e39}], "at most 3.403e+38 in magnitude"),
        (base, [], None),  # an empty list asks for nothing: the base model
    ]:
        create = functools.partial(oserver.oa.completions.create, model=model, prompt="hi", max_tokens=1,
                                   extra_body={"combine": combine})
        if needle is None:
            assert create().choices
            continue
        with pytest.raises(openai.BadRequestError) as e:
            create()
        assert needle in e.value.message and e.value.body["param"] == "combine", e.value.body


def test_a_sum_is_held_from_its_registration_to_its_submission(oserver):
    """A request's sum of adapters is held while its long prompt is tokenized: other sums, filling
    the registry meanwhile, make room with other dynamic registrations or are refused
    (RESOURCE_EXHAUSTED), and never unregister it before the request holds it."""
    text = "lorem ipsum dolor sit amet " * 30000  # 810 kB: its tokenizing takes a while
    ask = dict(sampling=Sampling(max_new_tokens=1))
    with ThreadPoolExecutor(10) as pool:
        slow = pool.submit(oserver.client.generate, text, combine=[("attn-r4", 0.123)], truncate_prompt_tokens=-1,
                           **ask)
        time.sleep(0.05)
        others = [pool.submit(code_or_ok, oserver.client.generate, prompt_token_ids=PROMPT_IDS,
                              combine=[("all-r8", 0.01 * (i + 1))], **ask) for i in range(8)]
        assert slow.result().completion_tokens == 1
        assert {f.result() for f in others} <= {"OK", grpc.StatusCode.RESOURCE_EXHAUSTED}


def code_or_ok(call, *args, **kwargs):
    try:
        call(*args, **kwargs)
        return "OK"
    except grpc.RpcError as e:
        return e.code()


def test_streamed_choices_interleave_and_add_up(oserver):
    messages = [{"role": "user", "content": "Tell me about LoRA."}]
    kwargs = dict(model="all-r8", messages=messages, n=2, temperature=1.0, seed=5, max_tokens=10,
                  extra_body={"ignore_eos": True})
    whole = oserver.oa.chat.completions.create(**kwargs)
    chunks = list(oserver.oa.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    by_index = {0: [], 1: []}
    for c in chunks:
        for choice in c.choices:
            by_index[choice.index].append(choice)
    for i in (0, 1):
        assert by_index[i][0].delta.role == "assistant"
        assert "".join(ch.delta.content or "" for ch in by_index[i]) == whole.choices[i].message.content
        assert [ch.finish_reason for ch in by_index[i] if ch.finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    comp = list(oserver.oa.completions.create(model="attn-r4", prompt=[PROMPT_IDS, OTHER_IDS], n=2, stream=True,
                                              **GREEDY))
    assert sorted({ch.index for c in comp for ch in c.choices}) == [0, 1, 2, 3]
    # vLLM's continuous_usage_stats: every chunk carries its choice's usage so far, the last one all of it
    running = list(oserver.oa.chat.completions.create(
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}, **kwargs))
    for i in (0, 1):
        usages = [c.usage for c in running if c.choices and c.choices[0].index == i]
        assert all(u.prompt_tokens == whole.usage.prompt_tokens for u in usages)
        done = [u.completion_tokens for u in usages]
        assert done == sorted(done) and done[0] == 0 and done[-1] == 10, done
        assert all(u.total_tokens == u.prompt_tokens + u.completion_tokens for u in usages)
    assert running[-1].choices == [] and running[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks if c.choices)  # not asked: none
    echo_only = list(oserver.oa.completions.create(model="attn-r4", prompt=PROMPT_IDS, max_tokens=0, echo=True,
                                                   stream=True, stream_options={"continuous_usage_stats": True}))
    assert [c.usage.completion_tokens for c in echo_only if c.choices] == [0, 0]


def test_choices_are_bounded_and_a_refused_prompt_cancels_the_rest(oserver):
    with pytest.raises(openai.BadRequestError) as e:
        oserver.oa.completions.create(model="attn-r4", prompt=[PROMPT_IDS] * 2, n=65, **GREEDY)
    assert "--max-choices-per-request" in e.value.message and "130" in e.value.message and e.value.param == "n"
    with pytest.raises(openai.BadRequestError) as e:
        oserver.oa.completions.create(model="attn-r4", prompt=[PROMPT_IDS] * 2, n=1, best_of=65, **GREEDY)
    assert "(best_of)" in e.value.message and "130" in e.value.message and e.value.param == "best_of"
    # the second prompt is over the length limit: the first's completions, already queued, go
    before = total(wait_idle(oserver), "loramux_generated_tokens_total", adapter="attn-r4")
    with pytest.raises(openai.BadRequestError):
        oserver.oa.completions.create(model="attn-r4", prompt=[PROMPT_IDS, [5] * 300], n=3,
                                      **{**GREEDY, "max_tokens": 200})
    m = wait_idle(oserver)
    assert m["loramux_kv_cache_usage_ratio"] == 0 and m["loramux_adapter_pins"] == 0
    assert total(m, "loramux_generated_tokens_total", adapter="attn-r4") - before < 100  # not 3 x 200
    # a client that leaves a stream of several choices cancels them all
    with httpx.stream("POST", f"{oserver.base_url}/completions", json={
            "model": "attn-r4", "prompt": PROMPT_IDS, "max_tokens": 200, "stream": True, "ignore_eos": True, "n": 3},
            timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    m = wait_idle(oserver)
    assert m["loramux_kv_cache_usage_ratio"] == 0 and m["loramux_adapter_pins"] == 0
    assert total(m, "loramux_generated_tokens_total", adapter="attn-r4") - before < 300  # not 3 x 200 more


def test_nulls_that_openais_schema_allows_mean_the_defaults(oserver):
    body = {"model": "attn-r4", "prompt": PROMPT_IDS, "max_tokens": 4, "temperature": 0, "n": None, "stream": None,
            "presence_penalty": None, "frequency_penalty": None, "echo": None, "logit_bias": None, "seed": None,
            "stop": None, "logprobs": None, "user": None, "top_p": None}
    got = httpx.post(f"{oserver.base_url}/completions", json=body, timeout=30)
    assert got.status_code == 200 and len(got.json()["choices"]) == 1
    chat = {"model": "attn-r4", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": None,
            "stream": None, "presence_penalty": None, "logprobs": None, "top_logprobs": None}
    assert httpx.post(f"{oserver.base_url}/chat/completions", json=chat, timeout=30).status_code == 200


def test_a_body_without_a_model_is_served_by_the_base_model(oserver):
    """vLLM's: no model, or an empty one, is the base model, and the response names it."""
    base = oserver.client.server_info().model
    body = {"prompt": PROMPT_IDS, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    named = httpx.post(f"{oserver.base_url}/completions", json={**body, "model": base}, timeout=30).json()
    for model in ({}, {"model": None}, {"model": ""}):
        got = httpx.post(f"{oserver.base_url}/completions", json={**body, **model}, timeout=30)
        assert got.status_code == 200 and got.json()["model"] == base, (model, got.text)
        assert got.json()["choices"][0]["text"] == named["choices"][0]["text"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for route, payload in (("chat/completions", chat), ("responses", {"input": "hi", "max_output_tokens": 2})):
        got = httpx.post(f"{oserver.base_url}/{route}", json=payload, timeout=30)
        assert got.status_code == 200 and got.json()["model"] == base, (route, got.text)


def test_health_version_and_metrics_on_the_http_port(oserver):
    from loramux.server import __version__

    assert httpx.get(f"http://127.0.0.1:{oserver.http_port}/health").status_code == 200
    assert httpx.get(f"http://127.0.0.1:{oserver.http_port}/version").json() == {"version": __version__}
    text = httpx.get(f"http://127.0.0.1:{oserver.http_port}/metrics").text
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:lora_requests_info", "loramux_requests_total"):
        assert name in text


def test_a_client_disconnect_mid_stream_frees_the_request(oserver):
    with httpx.stream("POST", f"{oserver.base_url}/completions", json={
            "model": "attn-r4", "prompt": PROMPT_IDS, "max_tokens": 200, "stream": True, "ignore_eos": True},
            timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        next(lines)
    m = wait_idle(oserver)  # closed after two events: the request is cancelled, not run to 200 tokens
    assert m["loramux_kv_cache_usage_ratio"] == 0 and m["loramux_adapter_pins"] == 0
    assert total(m, "loramux_generated_tokens_total", adapter="attn-r4") < 10_000


@pytest.mark.parametrize("body", [
    {"prompt": PROMPT_IDS, "max_tokens": 240, "n": 16, "ignore_eos": True},  # twice the server's batch
    {"prompt": PROMPT_IDS, "max_tokens": 240, "n": 10, "use_beam_search": True},
], ids=["completions", "beam-search"])
def test_a_client_that_goes_away_before_a_whole_response_frees_its_requests(oserver, body):
    """A response that is not streamed: the client gives up (times out) long before it could come;
    the server cancels the route and its requests at once, instead of generating them for no one
    (all of them: n x 240 tokens, a beam search's one a beam a step). Half the completions wait
    for room in the batch (--max-batch-size 8), and the client gives up after 0.1 s, well before the
    first half's 240 steps end (about 0.3 s on an AMD Zen 5, where a 0.3 s wait let them finish),
    so under half of the whole is generated."""
    wait_idle(oserver)
    before = oserver.metrics()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{oserver.base_url}/completions", json={"model": "attn-r4", **body}, timeout=0.1)
    # idle for good: a beam search's engine goes idle between its steps too, so idle means no token
    # generated for half a second (a search that goes on would generate all of its tokens)
    deadline, tokens = time.monotonic() + 30, "loramux_generated_tokens_total"
    while True:
        m = wait_idle(oserver)
        time.sleep(0.5)
        if total(oserver.metrics(), tokens) == total(m, tokens):
            break
        assert time.monotonic() < deadline, "the server kept generating"
    assert m["loramux_kv_cache_usage_ratio"] == 0 and m["loramux_adapter_pins"] == 0
    generated = total(m, tokens) - total(before, tokens)
    assert generated < body["n"] * 240 / 2, generated
    # and it did reach the engine (a beam search's finished steps count, or the cancelled ones)
    assert total(m, "loramux_requests_total") > total(before, "loramux_requests_total")


def test_dynamic_adapters_register_on_first_use(oserver, tiny_adapters):
    shutil.copytree(tiny_adapters["attn-r4"], oserver.root / "dyn-first")
    expected = grpc_tokens(oserver, "attn-r4").text
    got = oserver.oa.completions.create(model="dyn-first", prompt=PROMPT_IDS, **GREEDY)
    assert got.choices[0].text == expected
    assert "dyn-first" in {m.id for m in oserver.oa.models.list().data}
    # gRPC callers get the same grant
    shutil.copytree(tiny_adapters["all-r8"], oserver.root / "dyn-grpc")
    assert grpc_tokens(oserver, "dyn-grpc").text == grpc_tokens(oserver, "all-r8").text


def test_concurrent_first_uses_register_once(oserver, tiny_adapters):
    shutil.copytree(tiny_adapters["all-r8"], oserver.root / "dyn-burst")
    before = total(oserver.metrics(), "loramux_dynamic_adapters_total", event="registered")
    results = []

    def one():
        results.append(oserver.oa.completions.create(model="dyn-burst", prompt=PROMPT_IDS, **GREEDY).choices[0].text)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len(set(results)) == 1
    assert total(oserver.metrics(), "loramux_dynamic_adapters_total", event="registered") == before + 1
    assert oserver.log().count("dynamic adapter dyn-burst registered") == 1


def test_dynamic_adapters_cannot_escape_the_root_and_bad_ones_are_named(oserver, tiny_adapters, tmp_path):
    outside = shutil.copytree(tiny_adapters["attn-r4"], tmp_path / "outside")
    (oserver.root / "link-out").symlink_to(outside)
    for model in ("../outside", "link-out", "/etc", "a/../../x"):
        with pytest.raises(openai.PermissionDeniedError):
            oserver.oa.completions.create(model=model, prompt="hi")
    bad = shutil.copytree(tiny_adapters["attn-r4"], oserver.root / "dyn-bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": "sixteen"}))
    with pytest.raises(openai.BadRequestError) as e:
        oserver.oa.completions.create(model="dyn-bad", prompt="hi")
    assert "lora_alpha" in e.value.message
    assert "dyn-bad" not in {m.id for m in oserver.oa.models.list().data}
    wait_idle(oserver)


def test_a_full_registry_makes_room_from_idle_dynamic_registrations(oserver, tiny_adapters):
    names = [f"dyn-room{i}" for i in range(4)]  # more than the registry has room for: 10 in all
    for name in names:
        shutil.copytree(tiny_adapters["attn-r4"], oserver.root / name)
        assert oserver.oa.completions.create(model=name, prompt=PROMPT_IDS, **GREEDY).choices[0].text
    assert total(oserver.metrics(), "loramux_dynamic_adapters_total", event="evicted") >= 1
    assert len(oserver.client.list_adapters()) <= 10


@pytest.fixture(scope="module")
def guarded(tiny_llama, tiny_adapters, tmp_path_factory):
    """Auth on, and a registry already full of start-up adapters: a dynamic first use gets 429."""
    root = tmp_path_factory.mktemp("groot")
    shutil.copytree(tiny_adapters["attn-r4"], root / "extra")
    proc = ServerProcess(
        ["--model", str(tiny_llama), "--auth-token", "user", "--admin-token", "admin", "--adapter-root", str(root),
         "--dynamic-adapters", "--max-registered-adapters", "2",
         "--adapter", f"attn-r4={tiny_adapters['attn-r4']}", "--adapter", f"all-r8={tiny_adapters['all-r8']}"],
        tmp_path_factory.mktemp("glogs") / "server.log",
    )
    proc.wait_ready()
    yield proc
    proc.stop()


def test_auth_and_rate_limit_statuses(guarded):
    no_token = httpx.get(f"{guarded.base_url}/models")
    assert no_token.status_code == 401 and no_token.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):  # the client's own type for the same status
        guarded.openai(token="x", default_headers={"Authorization": ""}).models.list()
    with pytest.raises(openai.PermissionDeniedError):
        guarded.openai(token="wrong").models.list()
    user, admin = guarded.openai(token="user"), guarded.openai(token="admin")
    assert len(user.models.list().data) == 3 and len(admin.models.list().data) == 3
    with pytest.raises(openai.RateLimitError) as e:
        user.completions.create(model="extra", prompt="hi")
    assert "--max-registered-adapters" in e.value.message
    assert httpx.get(f"http://127.0.0.1:{guarded.http_port}/health").status_code == 200  # open, as gRPC health


def test_first_use_makes_room_for_fully_trained_modules(tiny_llama, tmp_path):
    """--max-saved-modules 1 with --dynamic-adapters: the first use of an adapter with a trained
    lm_head unregisters the least recently used dynamic one holding a copy, as a full registry
    would; both serve PEFT's tokens, in turn and again."""
    root = tmp_path / "root"
    paths = {name: build_adapter(tiny_llama, root / name, seed=20 + i, r=4, lora_alpha=8, target_modules=["q_proj"],
                                 modules_to_save=["lm_head"]) for i, name in enumerate(("one", "two"))}
    proc = ServerProcess(["--model", str(tiny_llama), "--adapter-root", str(root), "--dynamic-adapters",
                          "--max-saved-modules", "1"], tmp_path / "server.log")
    try:
        proc.wait_ready()
        expected = {name: peft_generate(tiny_llama, path, [PROMPT_IDS], 10, eos_token_id=None)[0]
                    for name, path in paths.items()}
        for name in ("one", "two", "one"):
            assert proc.openai().completions.create(model=name, prompt=PROMPT_IDS, **GREEDY).choices[0].text
            served = proc.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id=name,
                                          sampling=Sampling(max_new_tokens=10, ignore_eos=True))
            assert served.token_ids == expected[name], name
            assert [a.adapter_id for a in proc.client.list_adapters()] == [name]
        assert total(proc.metrics(), "loramux_dynamic_adapters_total", event="evicted") == 2
        assert proc.metrics()["loramux_saved_modules"] == 1
    finally:
        proc.stop()


def test_registration_unregisters_an_idle_dynamic_adapter_for_room(tiny_llama, tiny_adapters, tmp_path):
    """A full registry of dynamic registrations (a cache the server fills on first use) does not
    refuse an explicit registration: the least recently used idle dynamic one makes room, over gRPC
    and HTTP alike. Explicit registrations are never undone for room, so once they fill the registry
    the next registration and first use get RESOURCE_EXHAUSTED / 429 naming the flag."""
    root = tmp_path / "root"
    for name in ("d1", "d2", "e1", "e2", "e3"):
        shutil.copytree(tiny_adapters["attn-r4"], root / name)
    proc = ServerProcess(["--model", str(tiny_llama), "--adapter-root", str(root), "--dynamic-adapters",
                          "--allow-runtime-adapters", "--max-registered-adapters", "2"], tmp_path / "server.log")
    try:
        proc.wait_ready()
        for name in ("d1", "d2"):
            assert proc.openai().completions.create(model=name, prompt=PROMPT_IDS, **GREEDY).choices[0].text
        proc.client.register_adapter("e1", str(root / "e1"))
        assert sorted(a.adapter_id for a in proc.client.list_adapters()) == ["d2", "e1"]  # d1: least recent
        loaded = httpx.post(f"{proc.base_url}/load_lora_adapter", json={"lora_name": "e2", "lora_path": str(root / "e2")},
                            timeout=30)
        assert loaded.status_code == 200, loaded.text
        assert sorted(a.adapter_id for a in proc.client.list_adapters()) == ["e1", "e2"]
        assert total(proc.metrics(), "loramux_dynamic_adapters_total", event="evicted") == 2
        with pytest.raises(grpc.RpcError) as e:
            proc.client.register_adapter("e3", str(root / "e3"))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-registered-adapters" in e.value.details()
        with pytest.raises(openai.RateLimitError, match="--max-registered-adapters"):
            proc.openai().completions.create(model="d1", prompt=PROMPT_IDS, **GREEDY)
        # a replace needs no room
        assert proc.client.register_adapter("e1", str(root / "e3"), replace=True).adapter_id == "e1"
    finally:
        proc.stop()


def test_models_retrieve_and_stop_token_ids(oserver):
    info = oserver.client.server_info()
    base = info.model
    assert "lm_head" not in info.lora_targets and "q_proj" in info.lora_targets and not info.dora  # flags off
    assert oserver.oa.models.retrieve(base).parent is None and oserver.oa.models.retrieve("attn-r4").parent == base
    with pytest.raises(openai.NotFoundError):
        oserver.oa.models.retrieve("no-such-model")
    ten = grpc_tokens(oserver, "attn-r4").token_ids
    cut = oserver.oa.completions.create(model="attn-r4", prompt=PROMPT_IDS, logprobs=0,
                                        **{**GREEDY, "extra_body": {"ignore_eos": True, "stop_token_ids": [ten[3]]}})
    assert cut.choices[0].finish_reason == "stop" and len(cut.choices[0].logprobs.tokens) == ten.index(ten[3]) + 1
    assert cut.choices[0].stop_reason == ten[3]  # vLLM's: the stop token id; gRPC's oneof says the same
    assert grpc_tokens(oserver, "attn-r4", stop_token_ids=[ten[3]]).stop_reason == ten[3]
    held = oserver.oa.completions.create(model="attn-r4", prompt=PROMPT_IDS, logprobs=0, **{**GREEDY, "extra_body": {
        "ignore_eos": True, "stop_token_ids": [ten[0]], "min_tokens": 4}})
    grpc = grpc_tokens(oserver, "attn-r4", stop_token_ids=[ten[0]], min_new_tokens=4)
    assert len(held.choices[0].logprobs.tokens) == len(grpc.token_ids) >= 4 and ten[0] not in grpc.token_ids[:4]


def _health_on(sock: socket.socket) -> bytes:
    """One keep-alive GET /health on an open connection; the response's head and body."""
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + int(
            re.search(rb"content-length: (\d+)", data, re.I)[1]):
        chunk = sock.recv(4096)
        assert chunk, f"the server closed the connection mid-response: {data!r}"
        data += chunk
    return data


def test_idle_keep_alive_connections_outlive_the_clients_own_timeout(tiny_llama, tmp_path, oserver):
    """A server that closes an idle connection as a client reuses it loses that request (the client sees
    "Server disconnected without sending a response"); so the server waits longer than clients do."""
    short = ServerProcess(["--model", str(tiny_llama), "--http-keep-alive-timeout", "1"], tmp_path / "log")
    try:
        short.wait_ready()
        with socket.create_connection(("127.0.0.1", short.http_port), timeout=10) as a, \
                socket.create_connection(("127.0.0.1", oserver.http_port), timeout=10) as b:
            assert _health_on(a).startswith(b"HTTP/1.1 200") and _health_on(b).startswith(b"HTTP/1.1 200")
            start = time.monotonic()
            assert a.recv(1) == b""  # the flag's 1 s: closed, without a request in flight
            assert 0.8 < time.monotonic() - start < 3
            time.sleep(1.5)
            assert _health_on(b).startswith(b"HTTP/1.1 200")  # the default keeps it well past that
    finally:
        short.stop()


def test_adapters_load_and_unload_through_vllms_routes(tiny_llama, tiny_adapters, tmp_path, oserver):
    """The inference gateway's adapter syncer calls these: the admin token, paths under a root,
    the same statuses as gRPC's RegisterAdapter and UnregisterAdapter; unloading frees memory."""
    root = tmp_path / "root"
    shutil.copytree(tiny_adapters["attn-r4"], root / "syncer-a")
    proc = ServerProcess(["--model", str(tiny_llama), "--auth-token", "user", "--admin-token", "admin",
                          "--adapter-root", str(root)], tmp_path / "log")
    try:
        proc.wait_ready()
        url = f"http://127.0.0.1:{proc.http_port}/v1"
        body = {"lora_name": "syncer-a", "lora_path": str(root / "syncer-a")}

        def post(route, token, json):
            return httpx.post(f"{url}/{route}", json=json, headers={"Authorization": f"Bearer {token}"}, timeout=30)

        assert httpx.post(f"{url}/load_lora_adapter", json=body).status_code == 401
        assert post("load_lora_adapter", "user", body).status_code == 403  # the admin token is needed
        loaded = post("load_lora_adapter", "admin", body)
        assert loaded.status_code == 200 and "syncer-a" in loaded.text
        again = post("load_lora_adapter", "admin", body)  # already there: the route's own field swaps it
        assert again.status_code == 409 and "set load_inplace to swap its weights" in again.json()["error"]["message"]
        outside = post("load_lora_adapter", "admin", {"lora_name": "x", "lora_path": str(tiny_adapters["all-r8"])})
        assert outside.status_code == 403 and "root" in outside.json()["error"]["message"]
        user = proc.openai(token="user")
        assert user.models.retrieve("syncer-a").id == "syncer-a"
        got = user.completions.create(model="syncer-a", prompt=PROMPT_IDS, **GREEDY).choices[0].text
        assert got == oserver.oa.completions.create(model="attn-r4", prompt=PROMPT_IDS, **GREEDY).choices[0].text
        device = 'loramux_adapter_memory_bytes{tier="device"}'
        assert proc.metrics()[device] > 0
        assert post("unload_lora_adapter", "admin", {"lora_name": "syncer-a"}).status_code == 200
        # unloading frees the adapter's memory now (vllm#54839 keeps it until LRU reaches it)
        deadline = time.monotonic() + 10
        while proc.metrics()[device] and time.monotonic() < deadline:
            time.sleep(0.05)
        memory = proc.metrics()
        assert memory[device] == 0 and memory['loramux_adapter_memory_bytes{tier="host"}'] == 0
        assert post("unload_lora_adapter", "admin", {"lora_name": "syncer-a"}).status_code == 404
        with pytest.raises(openai.NotFoundError):
            user.completions.create(model="syncer-a", prompt=PROMPT_IDS, **GREEDY)
    finally:
        proc.stop()
    # without runtime registration (no admin token, no --allow-runtime-adapters) the routes refuse
    refused = httpx.post(f"{oserver.base_url}/load_lora_adapter", json=body, timeout=30)
    assert refused.status_code == 403 and "--allow-runtime-adapters" in refused.json()["error"]["message"]


def test_http_can_be_turned_off_and_is_not_imported_then(tiny_llama, tmp_path):
    import subprocess
    import sys

    code = ("import sys, loramux.server.app, loramux.server.service; "
            "sys.exit(1 if {'fastapi', 'uvicorn', 'starlette'} & set(sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
    proc = ServerProcess(["--model", str(tiny_llama)], tmp_path / "log")
    proc.stop()
    proc = ServerProcess(["--model", str(tiny_llama), "--http-port", "0"], tmp_path / "log2")
    try:
        proc.wait_ready()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{proc.http_port}/health", timeout=2)
        assert proc.client.generate(prompt_token_ids=PROMPT_IDS, sampling=Sampling(max_new_tokens=2)).completion_tokens
    finally:
        proc.stop()


def test_drain_turns_http_health_unavailable(tiny_llama, tmp_path):
    proc = ServerProcess(["--model", str(tiny_llama), "--drain-timeout", "10"], tmp_path / "log")
    try:
        proc.wait_ready()
        oa = proc.openai()
        stream = oa.completions.create(model=proc.client.server_info().model, prompt=PROMPT_IDS, max_tokens=200,
                                       stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        proc.terminate()
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            try:
                status = httpx.get(f"http://127.0.0.1:{proc.http_port}/health", timeout=1).status_code
            except httpx.HTTPError:
                break
            if status == 503:
                break
            time.sleep(0.02)
        assert status == 503
        assert sum(1 for _ in stream) > 0  # the running stream still finishes
        assert proc.proc.wait(30) == 0
    finally:
        proc.stop()


def test_usage_reports_prompt_tokens_served_from_the_prefix_cache(oserver):
    model = oserver.client.server_info().model
    prompt = list(range(100, 140))  # 2 full blocks of 16 and 8 tokens
    first = oserver.oa.completions.create(model=model, prompt=prompt, **GREEDY)
    again = oserver.oa.completions.create(model=model, prompt=prompt, **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 32
    assert again.choices[0].text == first.choices[0].text


def test_spaces_between_special_tokens_leaves_a_fast_tokenizers_text_as_it_is(oserver):
    """vLLM's spaces_between_special_tokens, false as some clients always send it: served, and with a
    fast tokenizer (every model's here, as in vLLM) the text with special tokens kept is the same
    either way: their texts side by side, no space put between them."""
    ask = dict(model="attn-r4", prompt="hi", max_tokens=12, temperature=0)

    def text(spaces: bool) -> str:
        return oserver.oa.completions.create(**ask, extra_body={
            "ignore_eos": True, "skip_special_tokens": False, "allowed_token_ids": [1, 2],
            "spaces_between_special_tokens": spaces}).choices[0].text

    assert text(False) == text(True) and re.fullmatch(r"(<\|im_start\|>|<\|im_end\|>){12}", text(False))
    with pytest.raises(openai.BadRequestError) as e:
        oserver.oa.completions.create(**ask, extra_body={"spaces_between_special_tokens": "maybe"})
    assert e.value.body["param"] == "spaces_between_special_tokens"


def test_a_cache_salt_keeps_prefix_cache_hits_among_requests_with_that_salt(oserver):
    """vLLM's cache_salt in the body of chat, completions and the Responses API: hits only among
    requests with the same salt; an empty one is a 400 naming it."""
    oa, model = oserver.oa, oserver.client.server_info().model
    prompt = list(range(200, 240))  # 2 full blocks of 16 and 8 tokens

    def cached(salt=None) -> int:
        body = {"ignore_eos": True, **({"cache_salt": salt} if salt is not None else {})}
        return oa.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=2, extra_body=body).usage \
            .prompt_tokens_details.cached_tokens

    assert [cached(), cached("a"), cached("a"), cached("b"), cached()] == [0, 0, 32, 0, 32]
    messages = [{"role": "user", "content": "Tell me everything about low-rank adapters, " * 3}]
    chat = [oa.chat.completions.create(model="attn-r4", messages=messages, max_tokens=1,
                                       extra_body={"cache_salt": "c"}).usage.prompt_tokens_details.cached_tokens
            for _ in range(2)]
    assert chat[0] == 0 < chat[1]
    ask = dict(model="attn-r4", input=messages[0]["content"], max_output_tokens=1, extra_body={"cache_salt": "r"})
    responses = [oa.responses.create(**ask).usage.input_tokens_details.cached_tokens for _ in range(2)]
    assert responses[0] == 0 < responses[1]
    with pytest.raises(openai.BadRequestError) as e:
        oa.completions.create(model=model, prompt=prompt, max_tokens=2, extra_body={"cache_salt": ""})
    assert e.value.body["param"] == "cache_salt" and "non-empty" in e.value.message


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0,
                                                                              "maximum": 120}}}


def is_person(text: str) -> bool:
    value = json.loads(text)
    return set(value) == {"name", "age"} and len(value["name"]) <= 6 and 0 <= value["age"] <= 120


def test_structured_outputs_in_both_apis(oserver):
    """OpenAI's response_format (json_schema, json_object) and vLLM's guided_* / structured_outputs
    fields, plain and streamed, give the text gRPC's structured_output gives, and it matches."""
    messages = [{"role": "user", "content": "Who are you?"}]
    chat = oserver.oa.chat.completions.create(
        model="all-r8", messages=messages, temperature=0, max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    text = chat.choices[0].message.content
    assert is_person(text) and chat.choices[0].finish_reason == "stop"
    grpc_text = oserver.client.generate(messages=[("user", "Who are you?")], adapter_id="all-r8",
                                        sampling=Sampling(max_new_tokens=60, json_schema=PERSON)).text
    assert grpc_text == text
    streamed = oserver.oa.chat.completions.create(model="all-r8", messages=messages, temperature=0, max_tokens=60,
                                                  stream=True, extra_body={"guided_json": PERSON})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text
    obj = oserver.oa.chat.completions.create(model="attn-r4", messages=messages, temperature=0, max_tokens=60,
                                             response_format={"type": "json_object"})
    assert is_json_object_or_cut(obj.choices[0].message.content, obj.choices[0].finish_reason)

    email = r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)"
    for body, check in [({"guided_regex": email}, lambda t: re.fullmatch(email, t)),
                        ({"structured_outputs": {"regex": email}}, lambda t: re.fullmatch(email, t)),
                        ({"guided_choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
                        ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
                        ({"guided_grammar": 'start: "(" /[0-9]{1,2}/ ")"'}, lambda t: re.fullmatch(r"\(\d{1,2}\)", t))]:
        got = oserver.oa.completions.create(model="attn-r4", prompt=PROMPT_IDS, temperature=0, max_tokens=40,
                                            extra_body=body)
        assert check(got.choices[0].text) and got.choices[0].finish_reason == "stop", (body, got.choices[0].text)
    got = oserver.oa.completions.create(model="attn-r4", prompt=PROMPT_IDS, temperature=0, max_tokens=40,
                                        extra_body={"response_format": {"type": "json_object"}})
    assert is_json_object_or_cut(got.choices[0].text, got.choices[0].finish_reason)
    wait_idle(oserver)


def is_json_object_or_cut(text: str, finish: str) -> bool:
    """Any JSON object is unbounded: a model may still be inside it at max_tokens."""
    return text.startswith("{") if finish == "length" else isinstance(json.loads(text), dict) and finish == "stop"


def test_bad_structured_outputs_are_named_in_both_apis(oserver):
    for body, needle, param in [
            ({"response_format": {"type": "xml"}}, "response_format type 'xml'", "response_format"),
            ({"response_format": {"type": "json_schema"}}, "json_schema.schema", "response_format"),
            ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
             "objekt", "response_format"),
            ({"guided_json": {"type": "objekt"}}, "objekt", "guided_json"),
            ({"guided_regex": "(ab"}, "unclosed group", "guided_regex"),
            ({"guided_choice": []}, "non-empty list", "guided_choice"),
            ({"guided_grammar": "start: nowhere"}, "nowhere", "guided_grammar"),
            ({"structured_outputs": {"regex": "(ab"}}, "unclosed group", "structured_outputs"),
            ({"structured_outputs": {"xml": "<a/>"}}, "structured_outputs.xml", "structured_outputs"),
            ({"guided_regex": "a", "guided_choice": ["a"]}, "both constrain", "guided_choice")]:
        with pytest.raises(openai.BadRequestError) as e:
            oserver.oa.completions.create(model="attn-r4", prompt="hi", max_tokens=5, extra_body=body)
        assert needle in e.value.message and e.value.param == param, (body, e.value.message, e.value.param)
    code, details = code_of(oserver.client.generate, prompt="hi", sampling=Sampling(max_new_tokens=5, regex="(ab"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unclosed group" in details
    code, details = code_of(oserver.client.generate, prompt="hi",
                            sampling=Sampling(max_new_tokens=5, json_schema={"type": "objekt"}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "objekt" in details
    with pytest.raises(ValueError, match="not regex and choice"):
        Sampling(regex="a", choice=["a"]).to_pb()
    wait_idle(oserver)


def test_structured_choices_stream_and_tools_that_cannot_be_called(oserver):
    """n sampled choices each match their constraint, streamed with usage; tools with tool_choice
    "none" give the same text as without tools; bad tool choices are a 400 naming them."""
    chunks = list(oserver.oa.completions.create(
        model="all-r8", prompt=PROMPT_IDS, n=3, temperature=1.2, seed=5, max_tokens=30, stream=True,
        stream_options={"include_usage": True}, extra_body={"guided_choice": ["red", "green", "blue"]}))
    texts = ["", "", ""]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
    assert all(t in ("red", "green", "blue") for t in texts), texts
    assert chunks[-1].usage.completion_tokens > 0
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    plain = oserver.oa.chat.completions.create(model="attn-r4", messages=[{"role": "user", "content": "hi"}], **GREEDY)
    none = oserver.oa.chat.completions.create(model="attn-r4", messages=[{"role": "user", "content": "hi"}],
                                              tools=tools, tool_choice="none", **GREEDY)
    assert none.choices[0].message.content == plain.choices[0].message.content
    for kwargs, needle in [(dict(tool_choice="required"), "tool_choice needs tools"),
                           (dict(tools=tools, tool_choice={"type": "function", "function": {"name": "g"}}), "'g'"),
                           (dict(tools=tools, tool_choice="required", response_format={"type": "json_object"}),
                            "both constrain")]:
        with pytest.raises(openai.BadRequestError) as e:
            oserver.oa.chat.completions.create(model="attn-r4", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4, **kwargs)
        assert needle in e.value.message, (kwargs, e.value.message)
    wait_idle(oserver)


def test_auto_tool_calls_are_read_out_of_the_text_plain_and_streamed(oserver):
    """--tool-call-parser hermes: tool_choice "auto" (the default with tools) serves the model's
    own <tool_call> blocks as tool_calls, with the text before them as content, finish_reason
    tool_calls; streamed, the content comes first and the calls whole at the end. A regex makes
    the random model write a call; text that makes no call, or a call that does not parse, is
    content, as without tools."""
    messages = [{"role": "user", "content": "Weather in Rome?"}]
    regex = r'Let me check\.<tool_call>\n\{"name": "weather", "arguments": \{"city": "Rome", "days": 2\}\}\n</tool_call>'
    ask = dict(model="all-r8", messages=messages, tools=[WEATHER, TIME], temperature=0, max_tokens=200,
               extra_body={"guided_regex": regex})
    got = oserver.oa.chat.completions.create(**ask)
    message = got.choices[0].message
    assert got.choices[0].finish_reason == "tool_calls" and message.content == "Let me check.", got
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == \
        [("weather", {"city": "Rome", "days": 2})]
    chunks = list(oserver.oa.chat.completions.create(**ask, tool_choice="auto", stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert content == "Let me check." and len(calls) == 1 and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert [(c.index, c.function.name, c.function.arguments) for c in calls[0]] == \
        [(0, c.function.name, c.function.arguments) for c in message.tool_calls]
    plain = oserver.oa.chat.completions.create(model="all-r8", messages=messages, **GREEDY)
    text = oserver.oa.chat.completions.create(model="all-r8", messages=messages, tools=[WEATHER], **GREEDY)
    assert text.choices[0].message.content == plain.choices[0].message.content
    assert text.choices[0].message.tool_calls is None
    broken = oserver.oa.chat.completions.create(**{**ask, "extra_body": {"guided_regex": "<tool_call>\\{oops\\}"}})
    assert broken.choices[0].message.content == "<tool_call>{oops}" and broken.choices[0].message.tool_calls is None
    assert broken.choices[0].finish_reason == "stop"
    wait_idle(oserver)


@pytest.mark.parametrize("parser, regex", [
    ("llama3_json", r'\{"name": "weather", "parameters": \{"city": "Rome", "days": 2\}\}; \{"name": "time", '
                    r'"parameters": \{"zone": "UTC"\}\}'),
    ("pythonic", r'\[weather\(city="Rome", days=2\), time\(zone="UTC"\)\]'),
], ids=["llama3_json", "pythonic"])
def test_whole_answer_tool_call_formats_through_the_server(parser, regex, tiny_llama, tmp_path):
    """Llama's JSON and pythonic calls: the whole answer is the calls, served as tool_calls plain
    and streamed (no content); text that does not start as a call streams as content."""
    proc = ServerProcess(["--model", str(tiny_llama), "--tool-call-parser", parser], tmp_path / "log")
    try:
        proc.wait_ready()
        oa = proc.openai()
        ask = dict(model=proc.client.server_info().model, messages=[{"role": "user", "content": "Weather in Rome?"}],
                   tools=[WEATHER, TIME], temperature=0, max_tokens=200, extra_body={"guided_regex": regex})
        got = oa.chat.completions.create(**ask)
        message = got.choices[0].message
        assert got.choices[0].finish_reason == "tool_calls" and message.content is None, got
        assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == \
            [("weather", {"city": "Rome", "days": 2}), ("time", {"zone": "UTC"})]
        chunks = list(oa.chat.completions.create(**ask, stream=True))
        assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        assert [(c.index, c.function.name, c.function.arguments) for c in calls[0]] == \
            [(k, c.function.name, c.function.arguments) for k, c in enumerate(message.tool_calls)]
        text = {**ask, "extra_body": {"guided_regex": "Sunny in Rome, I think"}}
        streamed = list(oa.chat.completions.create(**text, stream=True))
        deltas = [c.choices[0].delta.content for c in streamed if c.choices and c.choices[0].delta.content]
        assert "".join(deltas) == "Sunny in Rome, I think" and len(deltas) > 1  # streamed as it came
        assert streamed[-1].choices[0].finish_reason == "stop"
    finally:
        proc.stop()


# Mistral's way of writing a conversation's calls and their results (v3, reduced)
MISTRAL_TEMPLATE = (
    "{% for m in messages %}{% if m.tool_calls %}[TOOL_CALLS]{{ m.tool_calls | map(attribute='function') | list "
    "| tojson }}{% elif m.role == 'tool' %}[TOOL_RESULTS]{{ {'call_id': m.tool_call_id, 'content': m.content} "
    "| tojson }}[/TOOL_RESULTS]{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_mistral_tool_calls_follow_its_special_token_through_the_server(tmp_path):
    """--tool-call-parser mistral on a model whose tokenizer has Mistral's [TOOL_CALLS] and [ARGS]
    special tokens: the requests the parser reads keep their text, and the calls after the marker
    come back as tool_calls with 9-character ids, plain and streamed, the text before as content.
    Sent back in the next request's history, the call and its result reach the chat template.
    Requests without tools leave special tokens out unless they ask (skip_special_tokens)."""
    from transformers import AutoTokenizer

    model = build_llama(tmp_path / "model", extra_specials=("[TOOL_CALLS]", "[ARGS]"), chat_template=MISTRAL_TEMPLATE)
    marker, args = AutoTokenizer.from_pretrained(model).convert_tokens_to_ids(["[TOOL_CALLS]", "[ARGS]"])
    grammar = f'start: "Let me check." <[{marker}]> "weather" <[{args}]> "{{\\"city\\": \\"Rome\\", \\"days\\": 2}}"'
    proc = ServerProcess(["--model", str(model), "--tool-call-parser", "mistral"], tmp_path / "log")
    try:
        proc.wait_ready()
        oa = proc.openai()
        plain = dict(model=proc.client.server_info().model, messages=[{"role": "user", "content": "Weather in Rome?"}],
                     temperature=0, max_tokens=100, extra_body={"guided_grammar": grammar})
        ask = {**plain, "tools": [WEATHER]}
        got = oa.chat.completions.create(**ask)
        message = got.choices[0].message
        assert got.choices[0].finish_reason == "tool_calls" and message.content == "Let me check.", got
        assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == \
            [("weather", {"city": "Rome", "days": 2})]
        assert re.fullmatch("[A-Za-z0-9]{9}", message.tool_calls[0].id)  # what Mistral's templates take back
        chunks = list(oa.chat.completions.create(**ask, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Let me check."
        calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        assert [(c.function.name, c.function.arguments) for c in calls[0]] == \
            [(c.function.name, c.function.arguments) for c in message.tool_calls]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        call = message.tool_calls[0]
        history = [*plain["messages"], {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "weather", "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
        follow_up = oa.chat.completions.create(**{**ask, "messages": history})
        tokens = httpx.post(f"http://127.0.0.1:{proc.http_port}/tokenize", json={"messages": history}).json()
        assert follow_up.usage.prompt_tokens == tokens["count"]
        shown = httpx.post(f"http://127.0.0.1:{proc.http_port}/detokenize", json={"tokens": tokens["tokens"]}).json()
        assert '[TOOL_CALLS][{"name": "weather", "arguments": {"city": "Rome", "days": 2}}]' in shown["prompt"]
        assert f'[TOOL_RESULTS]{{"call_id": "{call.id}", "content": "sunny"}}[/TOOL_RESULTS]' in shown["prompt"]
        text = 'Let me check.weather{"city": "Rome", "days": 2}'
        assert oa.chat.completions.create(**plain).choices[0].message.content == text
        kept = {**plain, "extra_body": {"guided_grammar": grammar, "skip_special_tokens": False}}
        assert oa.chat.completions.create(**kept).choices[0].message.content == \
            'Let me check.[TOOL_CALLS]weather[ARGS]{"city": "Rome", "days": 2}'
        completion = oa.completions.create(model=plain["model"], prompt="Weather?", temperature=0, max_tokens=100,
                                           extra_body=kept["extra_body"])
        assert completion.choices[0].text == 'Let me check.[TOOL_CALLS]weather[ARGS]{"city": "Rome", "days": 2}'
    finally:
        proc.stop()


WEATHER = {"type": "function", "function": {"name": "weather", "description": "The weather in a city", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city", "days"],
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
TIME = {"type": "function", "function": {"name": "time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}


def test_forced_tool_calls_plain_and_streamed(oserver):
    """A named function: its arguments match its parameters' schema, finish_reason stop (as OpenAI
    answers a forced call); "required": one or more calls to the tools, finish_reason tool_calls.
    Streamed, each call comes whole in one delta, the same as the plain answer."""
    messages = [{"role": "user", "content": "Weather in Rome?"}]
    named = {"type": "function", "function": {"name": "weather"}}
    for choice, finish in ((named, "stop"), ("required", "tool_calls")):  # both make exactly one call here
        got = oserver.oa.chat.completions.create(model="all-r8", messages=messages, tools=[WEATHER, TIME],
                                                 tool_choice=choice, parallel_tool_calls=False, temperature=0,
                                                 max_tokens=120)
        message = got.choices[0].message
        assert message.content is None and got.choices[0].finish_reason == finish, got
        assert len(message.tool_calls) == 1
        for call in message.tool_calls:
            args = json.loads(call.function.arguments)
            assert call.type == "function" and call.id.startswith("call_")
            if call.function.name == "weather":
                assert set(args) == {"city", "days"} and 1 <= args["days"] <= 7 and len(args["city"]) <= 8
            else:
                assert call.function.name == "time" and args in ({"zone": "UTC"}, {"zone": "CET"})
        chunks = list(oserver.oa.chat.completions.create(model="all-r8", messages=messages, tools=[WEATHER, TIME],
                                                         tool_choice=choice, parallel_tool_calls=False, temperature=0,
                                                         max_tokens=120, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        assert len(deltas) == 1 and chunks[-1].choices[0].finish_reason == finish
        streamed = [(c.function.name, c.function.arguments) for c in deltas[0].tool_calls]
        assert streamed == [(c.function.name, c.function.arguments) for c in message.tool_calls]
        assert [c.index for c in deltas[0].tool_calls] == list(range(len(streamed)))
    # parallel calls (the default): one or more, each to one of the tools, unless max_tokens cuts the list
    many = oserver.oa.chat.completions.create(model="all-r8", messages=messages, tools=[WEATHER, TIME],
                                              tool_choice="required", temperature=0, max_tokens=200)
    if many.choices[0].finish_reason == "length":
        assert many.choices[0].message.content.startswith("[")
    else:
        assert many.choices[0].finish_reason == "tool_calls" and len(many.choices[0].message.tool_calls) >= 1
        assert all(c.function.name in ("weather", "time") for c in many.choices[0].message.tool_calls)
    # cut short by max_tokens: the text so far, finish_reason length
    cut = oserver.oa.chat.completions.create(model="all-r8", messages=messages, tools=[WEATHER], tool_choice=named,
                                             temperature=0, max_tokens=3)
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.tool_calls is None
    assert cut.choices[0].message.content.startswith("{")
    wait_idle(oserver)


def test_echoed_choices_share_their_prompts_logprobs_and_its_blocks(oserver):
    """With echo, logprobs and n: the first completion of each prompt scores it, the others hit its
    blocks, and every choice shows the same prompt logprobs, plain and streamed (where the others'
    chunks wait for the first's)."""
    prompts = [[(11 * i + k) % 300 + 1 for i in range(40)] for k in (5, 9)]  # two full blocks each, unseen
    single = oserver.oa.completions.create(model="all-r8", prompt=prompts[0], echo=True, logprobs=1, max_tokens=3,
                                           temperature=0)
    before = oserver.metrics()["loramux_prefix_cache_hit_tokens_total"]
    got = oserver.oa.completions.create(model="all-r8", prompt=prompts, n=3, echo=True, logprobs=1, max_tokens=3,
                                        temperature=0)
    hits = oserver.metrics()["loramux_prefix_cache_hit_tokens_total"] - before
    assert hits >= 2 * 2 * 32 - 32  # the second prompt's others, and the first's (its blocks seen before)
    head = single.choices[0].logprobs.token_logprobs[:40]
    # equal to float32 rounding: alone or in a batch, a prompt row may take the C++ kernel's tile
    # path or its per-row one (rows split across threads), which sum in different orders
    tol = 1e-4
    for c in got.choices:
        assert c.logprobs.token_logprobs[0] is None and len(c.logprobs.token_logprobs) == 43
    assert all(c.logprobs.token_logprobs[:40] == pytest.approx(head, abs=tol) for c in got.choices[:3])
    assert all(c.logprobs.token_logprobs[:40] == got.choices[3].logprobs.token_logprobs[:40] for c in got.choices[4:])
    chunks = list(oserver.oa.completions.create(model="all-r8", prompt=prompts, n=3, echo=True, logprobs=1,
                                                max_tokens=3, temperature=0, stream=True))
    firsts = {}
    for c in chunks:
        for choice in c.choices:
            firsts.setdefault(choice.index, choice)
    assert sorted(firsts) == list(range(6))
    for i, first in firsts.items():
        assert first.text.startswith(got.choices[i].text[:10]) and first.logprobs.token_logprobs[:40] == \
            pytest.approx(got.choices[i].logprobs.token_logprobs[:40], abs=tol)
    wait_idle(oserver)


def test_chat_extras_continue_a_prefilled_reply_and_reach_the_template(oserver, tokenizer):
    """vLLM's chat extras through the official client: with continue_final_message the model
    continues the assistant's prefilled text, token for token as the same rendering sent as a
    prompt of ids (/tokenize with the same options), which stops right after that text;
    with echo the reply starts with that text; chat_template_kwargs reach the template in chat
    requests and /tokenize alike (one it does not read changes nothing); the mistakes are 400s
    naming the field."""
    root = f"http://127.0.0.1:{oserver.http_port}"

    def tokens(messages, **extras):
        return httpx.post(f"{root}/tokenize", json={"messages": messages, **extras}, timeout=30).json()["tokens"]

    question = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about LoRA."}]
    messages = [*question, {"role": "assistant", "content": "LoRA is"}]
    open_ids = tokens(messages, continue_final_message=True)
    assert tokenizer.decode(open_ids).endswith("<|im_start|>assistant\nLoRA is")
    closed = tokens(messages, add_generation_prompt=False)
    assert closed[: len(open_ids)] == open_ids and tokenizer.decode(closed[len(open_ids):]) == "<|im_end|>\n"
    for adapter in ("all-r8", "attn-r4"):
        got = oserver.oa.chat.completions.create(model=adapter, messages=messages, temperature=0, max_tokens=8,
                                                 extra_body={"continue_final_message": True, "ignore_eos": True})
        expected = oserver.oa.completions.create(model=adapter, prompt=open_ids, **{**GREEDY, "max_tokens": 8})
        assert got.choices[0].message.content == expected.choices[0].text
        assert got.usage.prompt_tokens == len(open_ids) and got.usage.completion_tokens == 8
    # echo (vLLM's chat extra): the reply starts with the assistant text it continues, streamed first
    extra = {"continue_final_message": True, "ignore_eos": True, "echo": True}
    echoed = oserver.oa.chat.completions.create(model="attn-r4", messages=messages, temperature=0, max_tokens=8,
                                                extra_body=extra)
    assert echoed.choices[0].message.content == "LoRA is" + got.choices[0].message.content
    chunks = list(oserver.oa.chat.completions.create(model="attn-r4", messages=messages, temperature=0, max_tokens=8,
                                                     stream=True, extra_body=extra))
    assert chunks[1].choices[0].delta.content == "LoRA is"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == echoed.choices[0].message.content
    user_last = oserver.oa.chat.completions.create(model="attn-r4", messages=question, max_tokens=2,
                                                   extra_body={"echo": True})
    assert not user_last.choices[0].message.content.startswith("Tell me")  # only the assistant's text is echoed

    kwargs = {"preamble": "Hello there", "enable_thinking": False}
    with_preamble = tokens(question, chat_template_kwargs=kwargs)
    assert tokenizer.decode(with_preamble) == "Hello there\n" + tokenizer.decode(tokens(question))
    chat = oserver.oa.chat.completions.create(model="all-r8", messages=question, max_tokens=1,
                                              extra_body={"chat_template_kwargs": kwargs})
    assert chat.usage.prompt_tokens == len(with_preamble)

    for extra, needle, param in (
        ({"continue_final_message": True, "add_generation_prompt": True}, "cannot both be true",
         "continue_final_message"),
        ({"chat_template_kwargs": {"tokenize": False}}, "chat_template_kwargs may not set tokenize",
         "chat_template_kwargs"),
    ):
        with pytest.raises(openai.BadRequestError, match=needle) as e:
            oserver.oa.chat.completions.create(model="all-r8", messages=messages, max_tokens=1, extra_body=extra)
        assert e.value.body["param"] == param
        r = httpx.post(f"{root}/tokenize", json={"messages": messages, **extra}, timeout=30)
        assert r.status_code == 400 and needle in r.json()["error"]["message"]
    r = httpx.post(f"{root}/tokenize", json={"prompt": "x", "continue_final_message": True}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"
    wait_idle(oserver)


def test_truncate_prompt_tokens_in_completions_chat_and_tokenize(oserver, tokenizer):
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens, for a text prompt (echo shows the
    kept part), a prompt of ids and chat messages, as the same request sending those tokens; out of
    range is a 400 naming it."""
    root = f"http://127.0.0.1:{oserver.http_port}"
    text = "LoRA adds a low-rank update B A to a frozen weight W, scaled by alpha over r."
    ids = httpx.post(f"{root}/tokenize", json={"prompt": text}, timeout=30).json()["tokens"]
    cut = httpx.post(f"{root}/tokenize", json={"prompt": text, "truncate_prompt_tokens": 6}, timeout=30).json()
    assert cut["tokens"] == ids[-6:]
    expected = oserver.oa.completions.create(model="attn-r4", prompt=ids[-6:], **GREEDY).choices[0].text
    for prompt in (text, ids):
        got = oserver.oa.completions.create(model="attn-r4", prompt=prompt, **{
            **GREEDY, "extra_body": {**GREEDY["extra_body"], "truncate_prompt_tokens": 6}})
        assert got.choices[0].text == expected and got.usage.prompt_tokens == 6
    echoed = oserver.oa.completions.create(model="attn-r4", prompt=text, echo=True, **{
        **GREEDY, "extra_body": {**GREEDY["extra_body"], "truncate_prompt_tokens": 6}})
    assert echoed.choices[0].text == tokenizer.decode(ids[-6:]) + expected
    messages = [{"role": "user", "content": "Tell me about LoRA."}]
    chat_ids = httpx.post(f"{root}/tokenize", json={"messages": messages}, timeout=30).json()["tokens"]
    chat = oserver.oa.chat.completions.create(model="all-r8", messages=messages, **{
        **GREEDY, "extra_body": {**GREEDY["extra_body"], "truncate_prompt_tokens": 4}})
    assert chat.usage.prompt_tokens == 4
    assert chat.choices[0].message.content == oserver.oa.completions.create(
        model="all-r8", prompt=chat_ids[-4:], **GREEDY).choices[0].text
    with pytest.raises(openai.BadRequestError, match=r"truncate_prompt_tokens must be -1 or in \[1, ") as e:
        oserver.oa.completions.create(model="attn-r4", prompt=text, max_tokens=1,
                                      extra_body={"truncate_prompt_tokens": 0})
    assert e.value.body["param"] == "truncate_prompt_tokens"


def test_tokenize_counts_the_tokens_generation_sees_and_detokenize_inverts_it(oserver, tiny_llama):
    """vLLM's /tokenize and /detokenize (and under /v1): a prompt's count is the usage a completion
    reports, chat messages' the usage a chat request reports (the same template, tools included),
    for the base model or an adapter; the errors name what is wrong."""
    root = f"http://127.0.0.1:{oserver.http_port}"
    text = "LoRA adds a low-rank update B A to a frozen weight W."
    got = httpx.post(f"{root}/tokenize", json={"prompt": text, "return_token_strs": True}, timeout=30).json()
    completion = oserver.oa.completions.create(model="attn-r4", prompt=text, max_tokens=1)
    assert got["count"] == len(got["tokens"]) == completion.usage.prompt_tokens and got["max_model_len"] == 256
    from transformers import AutoTokenizer

    assert got["token_strs"] == AutoTokenizer.from_pretrained(tiny_llama).convert_ids_to_tokens(got["tokens"])
    assert httpx.post(f"{root}/detokenize", json={"tokens": got["tokens"]}).json() == {"prompt": text}

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about LoRA."}]
    chat = httpx.post(f"{oserver.base_url}/tokenize", json={"model": "all-r8", "messages": messages}).json()
    answer = oserver.oa.chat.completions.create(model="all-r8", messages=messages, max_tokens=1)
    assert chat["count"] == answer.usage.prompt_tokens and chat["token_strs"] is None
    bare = httpx.post(f"{root}/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert bare["count"] < chat["count"] and chat["tokens"][: bare["count"]] == bare["tokens"]
    assert httpx.post(f"{root}/tokenize", json={"prompt": ""}).json()["count"] == 0

    def refusal(route, body):
        r = httpx.post(f"{root}/{route}", json=body, timeout=30)
        return r.status_code, r.json()["error"]["message"]

    assert refusal("tokenize", {"model": "no-such-adapter", "prompt": "x"})[0] == 404
    assert refusal("detokenize", {"model": "no-such-adapter", "tokens": [1]})[0] == 404
    assert httpx.post(f"{root}/detokenize", json={"model": "all-r8", "tokens": got["tokens"]}).json() == {"prompt": text}
    status, message = refusal("tokenize", {"prompt": "x", "messages": messages})
    assert status == 400 and "exactly one of prompt and messages" in message
    status, message = refusal("tokenize", {"prompt": "x" * 300_001})
    assert status == 413
    status, message = refusal("detokenize", {"tokens": [1, 100_000]})
    assert status == 400 and "token id 100000 is outside the vocabulary [0, 384)" in message
    status, message = refusal("detokenize", {"tokens": "abc"})
    assert status == 400 and "tokens" in message



def test_responses_api_is_chat_by_another_shape(oserver):
    """POST /v1/responses through the official client: the reply is chat's for the same messages
    (instructions as the system message; an adapter as the model), with the same usage; cut by
    max_output_tokens it is incomplete; streamed, OpenAI's typed events carry the same text and end
    with response.completed, which the client's stream helper reads; text.format constrains the
    output as response_format does in chat; the Conversations API, tools other than functions or
    other input item kinds are refused, naming the field."""
    extra = {"ignore_eos": True}
    chat = oserver.oa.chat.completions.create(
        model="attn-r4", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=8, temperature=0, extra_body=extra)
    got = oserver.oa.responses.create(model="attn-r4", instructions="Be brief.", input="Hi", max_output_tokens=8,
                                      temperature=0, extra_body=extra)
    assert got.output_text == chat.choices[0].message.content and got.object == "response" and got.model == "attn-r4"
    assert (got.usage.input_tokens, got.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert got.status == "incomplete" and got.incomplete_details.reason == "max_output_tokens"
    assert got.output[0].role == "assistant" and got.output[0].content[0].type == "output_text"
    items = oserver.oa.responses.create(
        model="attn-r4", input=[{"role": "developer", "content": "Be brief."},
                                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
        max_output_tokens=8, temperature=0, extra_body=extra)
    assert items.output_text == got.output_text  # developer is the system turn, as in chat
    ids = oserver.client.generate(messages=[("user", "Hi")], adapter_id="attn-r4",
                                  sampling=Sampling(max_new_tokens=8, ignore_eos=True)).token_ids
    ended = oserver.oa.responses.create(model="attn-r4", input="Hi", max_output_tokens=40, temperature=0,
                                        extra_body={"stop_token_ids": [ids[2]], "ignore_eos": True})
    assert ended.status == "completed" and ended.incomplete_details is None
    assert ended.usage.output_tokens == ids.index(ids[2]) + 1
    events = list(oserver.oa.responses.create(model="attn-r4", instructions="Be brief.", input="Hi",
                                              max_output_tokens=8, temperature=0, stream=True, extra_body=extra))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == got.output_text
    assert events[-1].response.output_text == got.output_text and events[-1].response.status == "incomplete"
    with oserver.oa.responses.stream(model="attn-r4", instructions="Be brief.", input="Hi", max_output_tokens=8,
                                     temperature=0, extra_body=extra) as stream:
        assert stream.get_final_response().output_text == got.output_text
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}
    shaped = oserver.oa.responses.create(model="attn-r4", input="Hi", max_output_tokens=30, temperature=0,
                                         text={"format": {"type": "json_schema", "name": "s", "schema": schema}})
    as_chat = oserver.oa.chat.completions.create(model="attn-r4", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=30, temperature=0, response_format={
                                                     "type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert shaped.output_text == as_chat.choices[0].message.content and isinstance(json.loads(shaped.output_text)["a"], int)
    # logprobs: include message.output_text.logprobs, top_logprobs alternatives: chat's, streamed too
    scored = oserver.oa.responses.create(model="attn-r4", instructions="Be brief.", input="Hi", max_output_tokens=8,
                                         temperature=0, include=["message.output_text.logprobs"], top_logprobs=2,
                                         extra_body=extra)
    chat_scored = oserver.oa.chat.completions.create(
        model="attn-r4", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=8, temperature=0, logprobs=True, top_logprobs=2, extra_body=extra).choices[0].logprobs.content
    lps = scored.output[0].content[0].logprobs
    assert [(lp.token, lp.logprob, [t.token for t in lp.top_logprobs]) for lp in lps] == \
        [(c.token, c.logprob, [t.token for t in c.top_logprobs]) for c in chat_scored]
    assert got.output[0].content[0].logprobs == []  # not asked: none
    streamed = list(oserver.oa.responses.create(model="attn-r4", instructions="Be brief.", input="Hi",
                                                max_output_tokens=8, temperature=0, top_logprobs=2, stream=True,
                                                extra_body=extra))
    deltas = [lp.logprob for e in streamed if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert deltas == [lp.logprob for lp in lps]
    assert [lp.logprob for lp in streamed[-1].response.output[0].content[0].logprobs] == deltas
    for kwargs, needle, param in (
        (dict(include=["reasoning.encrypted_content"]), "include 'reasoning.encrypted_content' is not supported",
         "include"),
        (dict(top_logprobs=21), "top_logprobs must be in [0, 20], got 21", "top_logprobs"),
        (dict(conversation="conv_x"), "the Conversations API is not served", "conversation"),
        (dict(tools=[{"type": "web_search"}]), "tools[0] is of type 'web_search'; only function tools", "tools"),
        (dict(tools=[{"type": "function", "name": "f", "parameters": 3}]), "tools.0.function.parameters", "tools"),
        (dict(input=[{"type": "web_search_call", "id": "ws_1"}]),
         "input[0] is of type 'web_search_call'; supported: message, reasoning", "input"),
        (dict(input=[{"type": "reasoning", "summary": [], "content": [{"type": "input_image"}]}]),
         "input[0], a reasoning item, has parts other than reasoning_text", "input"),
        (dict(input=[{"type": "function_call_output", "output": "x"}]), "needs call_id and output", "input"),
        (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
         "content part of type 'input_image'", "input"),
        (dict(input=[{"type": "message", "role": "user"}]), "input[0].content is required", "input"),
        (dict(max_output_tokens=10**7), "max_output_tokens must be in [1, 1024]", "max_output_tokens"),
        (dict(text={"format": {"type": "json_schema", "name": "s"}}), "text.format.schema must be", "text"),
        (dict(text={"format": {"type": "xml"}}), "text.format type 'xml' is not supported", "text"),
        (dict(text={"format": {"type": "json_schema", "name": "s", "schema": {"type": "objekt"}}}), "objekt", "text"),
        (dict(extra_body={"use_beam_search": True}), "use_beam_search is served by chat and completions",
         "use_beam_search"),
        (dict(extra_body={"best_of": 2}), "best_of is not a Responses API field", "best_of"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            oserver.oa.responses.create(**{"model": "attn-r4", "input": "Hi", **kwargs})
        assert needle in e.value.message and e.value.body["param"] == param, e.value.body


def test_responses_api_tools_are_chats_tool_calls(oserver):
    """Function tools in the Responses API: a forced call comes back as a function_call item with
    chat's arguments for the same request, streamed as OpenAI's function-call events; a
    conversation's function_call and function_call_output items render as chat's assistant tool
    calls and tool turns (the same prompt tokens)."""
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
              "additionalProperties": False}
    tool = {"type": "function", "name": "weather", "description": "Weather now", "parameters": params}
    chat = oserver.oa.chat.completions.create(
        model="attn-r4", messages=[{"role": "user", "content": "Weather in Rome?"}], max_tokens=40, temperature=0,
        tools=[{"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}],
        tool_choice={"type": "function", "function": {"name": "weather"}})
    (expected,) = chat.choices[0].message.tool_calls
    forced = dict(model="attn-r4", input="Weather in Rome?", max_output_tokens=40, temperature=0, tools=[tool],
                  tool_choice={"type": "function", "name": "weather"})
    got = oserver.oa.responses.create(**forced)
    (call,) = got.output
    assert (call.type, call.name, call.arguments) == ("function_call", "weather", expected.function.arguments)
    assert isinstance(json.loads(call.arguments)["city"], str) and call.call_id and got.status == "completed"
    events = list(oserver.oa.responses.create(**forced, stream=True))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == call.arguments
    assert [e.type for e in events if e.type.startswith("response.output_text")] == []
    assert events[-1].type == "response.completed" and events[-1].response.output[0].arguments == call.arguments
    # a conversation with a call and its result: chat's prompt for the same history
    history = [{"type": "message", "role": "user", "content": "Weather in Rome?"},
               {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": '{"city": "Rome"}'},
               {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]
    replied = oserver.oa.responses.create(model="attn-r4", input=history, max_output_tokens=4, temperature=0,
                                          tools=[tool], tool_choice="none")
    as_chat = oserver.oa.chat.completions.create(model="attn-r4", max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    assert replied.usage.input_tokens == as_chat.usage.prompt_tokens
    assert replied.output_text == as_chat.choices[0].message.content


def test_responses_are_kept_and_continued_by_previous_response_id(oserver):
    """Kept unless store is false: a request with previous_response_id continues the kept
    conversation (its input, then its output, then the new input; the earlier instructions not
    carried over), computing what chat computes for the same messages, a call and its output
    included, streamed responses too; GET returns a kept response (and its input items, paged) and
    DELETE drops it, its continuations living on; an id not kept is a 404 naming
    previous_response_id."""
    oa, ask = oserver.oa, dict(model="attn-r4", max_output_tokens=6, temperature=0)
    first = oa.responses.create(instructions="Be brief.", input="Hi", **ask)
    second = oa.responses.create(previous_response_id=first.id, input="And then?", **ask)
    third = oa.responses.create(previous_response_id=second.id, instructions="Be kind.", input="Why?", stream=True,
                                **ask)
    third = [e for e in third if e.type == "response.completed"][0].response
    assert (first.store, second.store, second.previous_response_id) == (True, True, first.id)
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first.output_text},
             {"role": "user", "content": "And then?"}]
    for got, messages in ((second, turns), (third, [{"role": "system", "content": "Be kind."}, *turns, {
            "role": "assistant", "content": second.output_text}, {"role": "user", "content": "Why?"}])):
        chat = oa.chat.completions.create(model="attn-r4", messages=messages, max_tokens=6, temperature=0)
        assert (got.output_text, got.usage.input_tokens) == (chat.choices[0].message.content, chat.usage.prompt_tokens)
    assert oa.responses.retrieve(third.id).model_dump() == third.model_dump()
    # what second was given: the conversation it continued and its input, as OpenAI lists them
    given = oa.responses.input_items.list(second.id, order="asc").data
    assert [(i.role, i.content[0].type, i.content[0].text) for i in given] == [
        ("user", "input_text", "Hi"), ("assistant", "output_text", first.output_text),
        ("user", "input_text", "And then?")]
    paged = list(oa.responses.input_items.list(second.id, limit=1))  # newest first, one a page, followed
    assert [i.id for i in paged] == [i.id for i in reversed(given)] and len(set(i.id for i in paged)) == 3
    for bad, needle in ((dict(limit=0), "limit must be in [1, 100], got 0"), (dict(after="x"), "after 'x' is not")):
        with pytest.raises(openai.BadRequestError, match=re.escape(needle)):
            oa.responses.input_items.list(second.id, **bad)
    before = oserver.metrics()
    oa.responses.delete(first.id)
    after = oserver.metrics()
    assert after["loramux_responses_kept"] == before["loramux_responses_kept"] - 1 >= 2
    assert 0 < after["loramux_responses_kept_bytes"] < before["loramux_responses_kept_bytes"] <= 64 << 20
    with pytest.raises(openai.NotFoundError, match="is not stored here"):
        oa.responses.retrieve(first.id)
    assert oa.responses.create(previous_response_id=second.id, input="Why?", **ask).output_text
    # an agent's loop: a forced call, then its output continues the response that made it
    tool = {"type": "function", "name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}
    called = oa.responses.create(input="Weather in Rome?", tools=[tool], tool_choice={"type": "function",
                                                                                       "name": "weather"},
                                 **{**ask, "max_output_tokens": 40})
    (call,) = called.output
    answer = [{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    continued = oa.responses.create(previous_response_id=called.id, input=answer, tools=[tool], tool_choice="none",
                                    **ask)
    whole = oa.responses.create(input=[{"role": "user", "content": "Weather in Rome?"}, {
        "type": "function_call", "call_id": call.call_id, "name": "weather", "arguments": call.arguments}, *answer],
        tools=[tool], tool_choice="none", **ask)
    assert (continued.output_text, continued.usage.input_tokens) == (whole.output_text, whole.usage.input_tokens)
    unkept = oa.responses.create(input="Hi", store=False, **ask)
    assert unkept.store is False
    for missing in (unkept.id, "resp_nope"):
        with pytest.raises(openai.NotFoundError) as e:
            oa.responses.create(previous_response_id=missing, input="Hi", **ask)
        assert "is not stored here" in e.value.message and e.value.body["param"] == "previous_response_id"


def poll(oa, response_id: str, timeout: float = 60.0):
    """A background response, retrieved until it is no longer queued or in progress."""
    deadline = time.monotonic() + timeout
    while (got := oa.responses.retrieve(response_id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, f"{response_id} still {got.status}"
        time.sleep(0.05)
    return got


def test_background_responses_are_polled_cancelled_and_freed(oserver):
    """background: true comes back queued at once and is generated while the client polls: it ends
    with what the same request gives in the foreground (text, usage), and can be continued.
    POST .../cancel stops a long one (cancelled, its engine request freed; cancelling again gives
    it back as it is), DELETE stops and drops another; one in progress cannot be continued yet.
    Refused: not stored, and cancelling a response not made in the background."""
    oa, ask = oserver.oa, dict(model="attn-r4", max_output_tokens=8, temperature=0)
    foreground = oa.responses.create(input="Tell me about LoRA.", **ask)
    queued = oa.responses.create(input="Tell me about LoRA.", background=True, **ask)
    assert queued.background and queued.status == "queued" and queued.output == [] and queued.store
    done = poll(oa, queued.id)
    assert done.status == foreground.status == "incomplete"  # max_output_tokens: as in the foreground
    assert done.background and done.output_text == foreground.output_text
    assert done.usage.output_tokens == foreground.usage.output_tokens == 8
    assert oa.responses.create(previous_response_id=done.id, input="More?", **ask).output_text
    cancelled_before = total(wait_idle(oserver), "loramux_requests_total", status="CANCELLED")
    long = dict(model="attn-r4", input="Go on forever.", max_output_tokens=220, temperature=0, background=True,
                extra_body={"ignore_eos": True})
    for _ in range(5):  # a busy machine may generate all 220 tokens before the cancel; then another try
        slow = oa.responses.create(**long)
        running = oserver.metrics()["loramux_responses_in_progress"]
        try:  # not complete yet
            oa.responses.create(previous_response_id=slow.id, input="And?", **ask)
            refused = None
        except openai.BadRequestError as e:
            refused = e
        cancelled = oa.responses.cancel(slow.id)
        if cancelled.status == "cancelled":
            break
        assert cancelled.status == "incomplete"  # it ended first: cancelling gives it back as it is
    else:
        pytest.fail("no long background response was still being generated when cancelled")
    assert running == 1 and cancelled.output == []
    assert refused.body["param"] == "previous_response_id" and "continue it once it is complete" in refused.message
    assert oa.responses.retrieve(slow.id).status == "cancelled" == oa.responses.cancel(slow.id).status
    assert oserver.metrics()["loramux_responses_in_progress"] == 0
    for _ in range(5):
        before = total(wait_idle(oserver), "loramux_requests_total", status="CANCELLED")
        dropped = oa.responses.create(**long)
        oa.responses.delete(dropped.id)
        with pytest.raises(openai.NotFoundError):
            oa.responses.retrieve(dropped.id)
        if total(wait_idle(oserver), "loramux_requests_total", status="CANCELLED") == before + 1:
            break  # deleted while it was generated (not after it ended)
    else:
        pytest.fail("no long background response was still being generated when deleted")
    # both engine requests were cancelled (not generated to their end), their blocks freed
    assert total(wait_idle(oserver), "loramux_requests_total", status="CANCELLED") == cancelled_before + 2
    with pytest.raises(openai.BadRequestError) as e:
        oa.responses.create(input="Hi", background=True, store=False, **ask)
    assert "must be stored" in e.value.message and e.value.body["param"] == "background"
    with pytest.raises(openai.BadRequestError, match="only a background response can be cancelled"):
        oa.responses.cancel(foreground.id)


def test_a_background_response_streams_and_a_client_resumes_it_from_any_event(oserver):
    """background with stream: true streams the events the foreground stream sends (the created
    response queued); a client that leaves after five events resumes with
    GET /v1/responses/{id}?stream=true&starting_after=4 (``client.responses.retrieve``), and the two
    parts are the whole stream, numbered without a gap; once done, the kept events replay from any
    point. A long one followed while it is generated ends with its cancel. Refused: streaming a
    response not made in the background, starting_after without stream."""
    oa, ask = oserver.oa, dict(model="attn-r4", input="Tell me about LoRA.", max_output_tokens=12, temperature=0)

    def shape(events):
        return [(e.type, getattr(e, "delta", None)) for e in events]

    foreground = list(oa.responses.create(stream=True, **ask))
    stream = oa.responses.create(stream=True, background=True, **ask)
    head = list(itertools.islice(stream, 5))
    stream.close()
    assert head[0].type == "response.created" and head[0].response.status == "queued" and head[0].response.background
    rid = head[0].response.id
    rest = list(oa.responses.retrieve(rid, stream=True, starting_after=4))
    whole = head + rest
    assert [e.sequence_number for e in whole] == list(range(len(whole)))
    # the foreground's events, with response.queued after response.created (queued until generated)
    assert whole[1].type == "response.queued" and whole[1].response.status == "queued"
    assert shape(whole[:1] + whole[2:]) == shape(foreground)
    last = whole[-1].response
    assert last.output_text == foreground[-1].response.output_text and last.status == "incomplete"
    assert poll(oa, rid).output_text == last.output_text
    replay = list(oa.responses.retrieve(rid, stream=True, starting_after=len(whole) - 3))
    assert [e.sequence_number for e in replay] == [len(whole) - 2, len(whole) - 1] and shape(replay) == shape(whole[-2:])
    assert shape(oa.responses.retrieve(rid, stream=True)) == shape(whole)

    long = oa.responses.create(model="attn-r4", input="Go on forever.", max_output_tokens=220, temperature=0,
                               background=True, extra_body={"ignore_eos": True})
    follower = oa.responses.retrieve(long.id, stream=True)
    seen = []
    for event in follower:
        seen.append(event)
        if sum(e.type == "response.output_text.delta" for e in seen) == 3:
            assert oa.responses.cancel(long.id).status == "cancelled"
    assert seen[-1].type == "response.completed" and seen[-1].response.status == "cancelled"
    assert [e.sequence_number for e in seen] == list(range(len(seen)))
    assert len(seen) < 100  # stopped, not generated to its end

    finished = oa.responses.create(model="attn-r4", input="Hi", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        oa.responses.retrieve(finished.id, stream=True)
    assert "only a background response's events can be streamed" in e.value.message and e.value.body["param"] == "stream"
    with pytest.raises(openai.BadRequestError) as e:
        oa.responses.retrieve(rid, starting_after=3)
    assert e.value.body["param"] == "starting_after"


def test_a_clients_request_id_names_the_response_and_its_log_line(oserver):
    """vLLM's request ids: the X-Request-Id header (else the body's request_id, else a new one)
    names the request in the server's log and its response (chatcmpl-<id>, cmpl-<id>,
    resp_<id>, every streamed chunk), and comes back as the X-Request-Id header, on a refusal too.
    An id the log could not hold is a 400 naming the limit."""
    raw = oserver.oa.chat.completions.with_raw_response.create(
        model="attn-r4", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, n=2,
        extra_headers={"X-Request-Id": "trace-42"}, extra_body={"request_id": "ignored-body-id"})
    assert raw.headers["x-request-id"] == "trace-42" and raw.parse().id == "chatcmpl-trace-42"
    chunks = list(oserver.oa.completions.create(model="attn-r4", prompt="Hi", max_tokens=3, stream=True,
                                                extra_body={"request_id": "body-7"}))
    assert chunks and {c.id for c in chunks} == {"cmpl-body-7"}
    plain = oserver.oa.completions.with_raw_response.create(model="attn-r4", prompt="Hi", max_tokens=1)
    assert plain.parse().id == f"cmpl-{plain.headers['x-request-id']}" and len(plain.headers["x-request-id"]) == 32
    response = oserver.oa.responses.create(model="attn-r4", input="Hi", max_output_tokens=2,
                                           extra_headers={"X-Request-Id": "trace-9"})
    assert response.id == "resp_trace-9"
    deadline = time.monotonic() + 10
    while not all(f"request {rid} adapter=attn-r4 status=OK" in oserver.log()
                  for rid in ("trace-42", "body-7", "trace-9")):
        assert time.monotonic() < deadline, oserver.log()[-2000:]
        time.sleep(0.1)
    with pytest.raises(openai.BadRequestError) as e:  # a refusal carries the client's id too
        oserver.oa.completions.create(model="attn-r4", prompt="Hi", max_tokens=10**7,
                                      extra_headers={"X-Request-Id": "trace-refused"})
    assert e.value.response.headers["x-request-id"] == "trace-refused"
    with pytest.raises(openai.BadRequestError) as e:  # one the body's schema refuses before the route sees it
        oserver.oa.completions.create(model="attn-r4", prompt="Hi", max_tokens=1, extra_body={"n": "many"},
                                      extra_headers={"X-Request-Id": "trace-unparsed"})
    assert e.value.response.headers["x-request-id"] == "trace-unparsed" and e.value.body["param"] == "n"
    for rid, needle in (("x" * 129, "request_id is 129 characters; the limit is 128"),
                        ("a\tb", "control or non-printable characters")):
        with pytest.raises(openai.BadRequestError, match=needle):
            oserver.oa.completions.create(model="attn-r4", prompt="Hi", max_tokens=1, extra_headers={"X-Request-Id": rid})


def test_responses_api_parsed_calls_follow_their_text(oserver):
    """tool_choice "auto" through --tool-call-parser hermes in the Responses API: the text before
    the model's <tool_call> block is a message item, the call a function_call item after it; the
    stream opens the message, closes it before the call's events, and ends with the same output."""
    regex = r'Let me check\.<tool_call>\n\{"name": "weather", "arguments": \{"city": "Rome", "days": 2\}\}\n</tool_call>'
    tool = {"type": "function", **WEATHER["function"]}
    ask = dict(model="all-r8", input="Weather in Rome?", tools=[tool], temperature=0, max_output_tokens=200,
               extra_body={"guided_regex": regex})
    got = oserver.oa.responses.create(**ask)
    message, call = got.output
    assert (message.type, message.content[0].text, got.status) == ("message", "Let me check.", "completed")
    assert (call.type, call.name, json.loads(call.arguments)) == ("function_call", "weather", {"city": "Rome", "days": 2})
    events = list(oserver.oa.responses.create(**ask, stream=True))
    kinds = [e.type for e in events]
    assert kinds.index("response.output_text.done") < kinds.index("response.function_call_arguments.done")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Let me check."
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [(e.output_index, e.item.type) for e in added] == [(0, "message"), (1, "function_call")]
    final = events[-1].response
    assert [o.type for o in final.output] == ["message", "function_call"] and final.output[1].arguments == call.arguments
    wait_idle(oserver)


def test_the_load_generator_reads_the_http_stream_as_grpc_reads_its_own(oserver):
    """`loramux bench --api openai` (raw server-sent events): the same request set gives the same
    token counts and statuses through both front-ends; refused requests (token ids outside the
    tiny vocabulary) count under their HTTP status, as gRPC's under theirs."""
    import asyncio

    from loramux.clients.bench import LoadSpec, run_load

    spec = LoadSpec(num_requests=6, concurrency=3, adapters=("", "attn-r4"), prompt_len=(4, 12), output_len=(3, 9),
                    vocab=(5, 300))
    runs = {api: asyncio.run(run_load(target, spec, progress=False, api=api))[0]
            for api, target in (("grpc", oserver.target), ("openai", oserver.base_url))}
    assert [r.status for r in runs["openai"]] == ["OK"] * 6
    for api, records in runs.items():
        assert all(r.ttft is not None and r.total >= r.ttft for r in records), api
    tokens = {api: sorted((r.adapter, r.tokens) for r in records) for api, records in runs.items()}
    assert tokens["openai"] == tokens["grpc"] and all(n > 0 for _, n in tokens["grpc"])
    # HTTP sends a chunk a piece of text (a token ending inside a character comes with the next):
    # the count comes from the usage chunk, not from the chunks
    assert all(len(r.itl) <= r.tokens - 1 for r in runs["openai"])
    refused = LoadSpec(num_requests=3, concurrency=3, vocab=(1000, 2000))
    assert [r.status for r in asyncio.run(run_load(oserver.base_url, refused, progress=False, api="openai"))[0]] \
        == ["HTTP_400"] * 3
    assert [r.status for r in asyncio.run(run_load(oserver.target, refused, progress=False))[0]] \
        == ["INVALID_ARGUMENT"] * 3
