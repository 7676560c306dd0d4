"""Every RPC against the real server subprocess, through the Python clients."""

import asyncio
import dataclasses
import json
import shutil
import subprocess
import sys
import time

import grpc
import openai
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from loramux.clients.aio import AsyncLoraMuxClient
from loramux.clients.runs import row_runs
from loramux.clients.types import Sampling

from helpers import build_adapter, peft_generate, peft_logprobs, rewrite_adapter

PROMPT_IDS = [12, 40, 77, 5, 91, 33]
GREEDY = Sampling(max_new_tokens=12, ignore_eos=True)


def code_of(call, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as e:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    return e.value.code(), e.value.details()


def total(metrics, name, **labels):
    """Sum a family's series whose labels include ``labels`` (adapter labels may be "other")."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in metrics.items() if k.startswith(name + "{") and all(w in k for w in want))


def wait_idle(server, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = server.metrics()
        if m["loramux_running_requests"] == 0 and m["loramux_waiting_requests"] == 0:
            return m
        time.sleep(0.05)
    raise AssertionError(f"server not idle: {server.metrics()}")


def test_health_reports_loading_then_serving(server):
    NOT_SERVING, SERVING = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING
    assert server.health_seen == [NOT_SERVING, SERVING]
    assert server.health_status("") == SERVING  # liveness


def test_server_info_and_adapters(server, tiny_adapters):
    info = server.client.server_info()
    assert info.model == "tiny-llama" and info.device == "cpu" and info.dtype == "float32"
    assert (info.max_batch_size, info.max_model_len, info.max_device_adapters) == (8, 256, 4)
    assert info.scheduling == "fair"
    assert info.adapter_pages == 4 * info.max_lora_rank
    assert info.op_backend in ("cpp", "torch") and info.cpu_isa  # auto on a CPU: the C++ kernel when it builds
    assert info.lora_dtype == info.dtype == "float32"  # --lora-dtype auto: the model's
    assert set(info.lora_targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                      "lm_head", "embed_tokens"} and info.dora  # the --enable-* flags
    assert info.registered_adapters == len(tiny_adapters) and info.has_chat_template
    assert info.num_speculative_tokens == 3 and info.prefix_caching
    # --base-linear auto: the row counts the kernel won when timed at start-up (none without it)
    assert list(info.base_kernel_rows) == sorted(set(info.base_kernel_rows)) and \
        set(info.base_kernel_rows) <= set(range(1, 65))
    if info.op_backend == "torch":
        assert info.base_kernel_rows == ()
    # `loramux info` prints them as runs ("4-16,19")
    shown = subprocess.run([sys.executable, "-m", "loramux.server.cli", "info", "--server", server.target],
                           capture_output=True, text=True, timeout=120).stdout
    assert f"base_kernel_rows: {row_runs(info.base_kernel_rows) or 'none'}\n" in shown, shown
    listed = {a.adapter_id: a for a in server.client.list_adapters()}
    assert set(listed) == set(tiny_adapters)
    assert listed["attn-r64"].rank == 64 and set(listed["attn-r4"].target_modules) == {"q_proj", "v_proj"}
    assert listed["pattern-r16"].rank == 16
    assert len({a.content_hash for a in listed.values()}) == len(listed)
    assert all(len(a.content_hash) == 64 for a in listed.values())
    # the KV pool: --kv-cache-tokens unset, so 8 sequences of 256 tokens fit the CPU budget
    assert (info.kv_block_size, info.kv_cache_tokens) == (16, 8 * 256)


def test_a_cache_salt_keeps_prefix_cache_hits_among_requests_with_that_salt(server):
    """vLLM's cache_salt: a salted request neither hits the unsalted blocks nor leaves blocks that
    unsalted or other-salted requests hit; the same salt hits its own, for the same output. A salt
    over 256 characters is INVALID_ARGUMENT naming the limit."""
    prompt = list(range(140, 190))  # 3 full blocks of 16

    def cached(salt: str) -> tuple[int, list[int]]:
        out = server.client.generate(prompt_token_ids=prompt, adapter_id="attn-r4", sampling=GREEDY, cache_salt=salt)
        return out.cached_prompt_tokens, out.token_ids

    plain, tokens = cached("")
    hits = [cached(salt) for salt in ("tenant-a", "tenant-a", "tenant-b", "", "tenant-b")]
    assert [plain, *(n for n, _ in hits)] == [0, 0, 48, 0, 48, 48]
    assert all(out == tokens for _, out in hits)
    code, details = code_of(server.client.generate, prompt_token_ids=prompt, cache_salt="x" * 257)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "cache_salt has 257 characters; the limit is 256" in details


def test_a_repeated_prompt_is_served_from_the_prefix_cache(server):
    prompt = list(range(40, 90))  # 3 full blocks of 16
    before = server.metrics()
    first = server.client.generate(prompt_token_ids=prompt, adapter_id="attn-r4", sampling=GREEDY)
    again = list(server.client.generate_stream(prompt_token_ids=prompt, adapter_id="attn-r4", sampling=GREEDY))
    other = server.client.generate(prompt_token_ids=prompt, adapter_id="all-r8", sampling=GREEDY)
    assert (first.cached_prompt_tokens, again[-1].cached_prompt_tokens, other.cached_prompt_tokens) == (0, 48, 0)
    assert [c.token_id for c in again] == first.token_ids
    after = wait_idle(server)
    assert after["loramux_prefix_cache_hit_tokens_total"] - before["loramux_prefix_cache_hit_tokens_total"] == 48
    assert after["loramux_prefix_cache_queried_tokens_total"] - before["loramux_prefix_cache_queried_tokens_total"] \
        == 3 * len(prompt)
    assert after["loramux_preemptions_total"] == 0 and after["loramux_kv_cache_usage_ratio"] == 0


def test_stream_equals_unary_and_matches_peft(server, tiny_llama, tiny_adapters):
    for adapter in ["", "all-r16-rslora", "pattern-r16"]:
        unary = server.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id=adapter, sampling=GREEDY)
        chunks = list(server.client.generate_stream(prompt_token_ids=PROMPT_IDS, adapter_id=adapter, sampling=GREEDY))
        assert [c.token_id for c in chunks] == unary.token_ids
        assert "".join(c.text for c in chunks) == unary.text
        assert chunks[-1].finish_reason == unary.finish_reason == "length"
        assert all(c.finish_reason is None for c in chunks[:-1])
        assert (unary.prompt_tokens, unary.completion_tokens) == (len(PROMPT_IDS), 12)
        expected = peft_generate(tiny_llama, tiny_adapters.get(adapter), [PROMPT_IDS], 12, eos_token_id=None)[0]
        assert unary.token_ids == expected
        assert unary.timing.total_seconds >= unary.timing.time_to_first_token_seconds > 0


def test_special_tokens_text_is_left_out_unless_asked_for(server, tiny_llama):
    """Special tokens add no text by default; skip_special_tokens false keeps it, streamed and
    unary alike; the EOS that finishes a request adds none either way."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    start = tok.convert_tokens_to_ids("<|im_start|>")
    forced = dict(max_new_tokens=3, logit_bias={start: 100.0}, ignore_eos=True)
    skipped = server.client.generate(prompt_token_ids=PROMPT_IDS, sampling=Sampling(**forced))
    assert skipped.token_ids == [start] * 3 and skipped.text == ""
    keep = Sampling(**forced, skip_special_tokens=False)
    kept = server.client.generate(prompt_token_ids=PROMPT_IDS, sampling=keep)
    assert kept.token_ids == [start] * 3 and kept.text == "<|im_start|>" * 3
    chunks = list(server.client.generate_stream(prompt_token_ids=PROMPT_IDS, sampling=keep))
    assert [c.text for c in chunks] == ["<|im_start|>"] * 3
    ended = server.client.generate(prompt_token_ids=PROMPT_IDS, sampling=Sampling(
        max_new_tokens=3, logit_bias={tok.eos_token_id: 100.0}, skip_special_tokens=False))
    assert ended.token_ids == [tok.eos_token_id] and ended.finish_reason == "eos" and ended.text == ""


def test_an_unset_max_new_tokens_shrinks_to_the_room_a_long_rope_leaves(server):
    """The server's default (16 here) fits in what --max-model-len (256) leaves after the prompt; a
    max_new_tokens the client sets is never shrunk, and over the limit is refused, naming it."""
    long = [5 + i % 300 for i in range(250)]
    r = server.client.generate(prompt_token_ids=long, sampling=Sampling(ignore_eos=True))
    assert (r.completion_tokens, r.finish_reason) == (6, "length")
    r = server.client.generate(prompt_token_ids=long[:100], sampling=Sampling(ignore_eos=True))
    assert r.completion_tokens == 16  # room enough: the default whole
    code, details = code_of(server.client.generate, prompt_token_ids=long,
                            sampling=Sampling(max_new_tokens=16, ignore_eos=True))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "exceeds max_model_len 256" in details
    code, details = code_of(server.client.generate, prompt_token_ids=long + long[:6])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_input_tokens is 255" in details


def test_text_prompt_and_chat_messages(server, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    r = server.client.generate("Once upon a time", sampling=Sampling(max_new_tokens=4))
    assert r.prompt_tokens == len(tok("Once upon a time")["input_ids"])
    msgs = [("system", "Be brief."), ("user", "The quick brown fox")]
    r = server.client.generate(messages=msgs, sampling=Sampling(max_new_tokens=4))
    rendered = tok.apply_chat_template([{"role": a, "content": b} for a, b in msgs], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"]
    assert r.prompt_tokens == len(rendered) > 20


def test_a_priority_is_refused_by_a_server_that_does_not_schedule_by_it(server):
    code, details = code_of(server.client.generate, prompt_token_ids=PROMPT_IDS, priority=-1)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "priority -1 is served only with --scheduling priority; this server schedules by 'fair'" in details
    assert server.client.generate(prompt_token_ids=PROMPT_IDS, sampling=Sampling(max_new_tokens=1),
                                  priority=0).completion_tokens == 1


def test_tokenize_gives_the_prompt_tokens_generate_sees_and_detokenize_their_text(server, tiny_llama):
    """Tokenize: a prompt's ids (and token strings) as Generate counts them, chat messages with and
    without the generation prompt, for the base model or an adapter; Detokenize inverts a prompt;
    bad input is INVALID_ARGUMENT or NOT_FOUND, naming what is wrong. The async client too."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    text = "Once upon a time there was a little server"
    got = server.client.tokenize(text, return_token_strs=True)
    assert len(got.token_ids) == server.client.generate(text, sampling=Sampling(max_new_tokens=1)).prompt_tokens
    assert got.token_strs == tok.convert_ids_to_tokens(got.token_ids) and got.max_model_len == 256
    assert server.client.detokenize(got.token_ids) == text
    msgs = [("system", "Be brief."), ("user", "The quick brown fox")]
    chat = server.client.tokenize(messages=msgs, adapter_id="all-r8")
    assert len(chat.token_ids) == server.client.generate(messages=msgs, adapter_id="all-r8",
                                                         sampling=Sampling(max_new_tokens=1)).prompt_tokens
    assert chat.token_strs == []
    # this tokenizer adds no special tokens of its own: asking for them renders, then tokenizes, the same
    assert server.client.tokenize(messages=msgs, adapter_id="all-r8", add_special_tokens=True).token_ids == \
        chat.token_ids
    bare = server.client.tokenize(messages=msgs, add_generation_prompt=False).token_ids
    assert len(bare) < len(chat.token_ids) and chat.token_ids[: len(bare)] == bare
    assert server.client.tokenize("").token_ids == []
    code, details = code_of(server.client.tokenize, "x", messages=msgs)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "exactly one of prompt and messages" in details
    code, details = code_of(server.client.tokenize, "x", adapter_id="nope")
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
    code, details = code_of(server.client.detokenize, [5, 384])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "token id 384 is outside the vocabulary [0, 384)" in details

    async def via_async():
        async with AsyncLoraMuxClient(server.target) as client:
            return await client.tokenize(text), await client.detokenize(got.token_ids)

    tokens, back = asyncio.run(via_async())
    assert tokens.token_ids == got.token_ids and back == text


def test_chat_options_continue_a_reply_and_reach_the_template(server, tiny_llama):
    """GenerateRequest's and TokenizeRequest's chat options (fields 7-9 and 7-8): with
    continue_final_message Generate continues the last message, token for token as the ids
    Tokenize gives for it; chat_template_kwargs (a JSON object) reach the template; the mistakes
    are INVALID_ARGUMENT, naming the field."""
    from transformers import AutoTokenizer

    from loramux.v1 import loramux_pb2 as pb

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    msgs = [("system", "Be brief."), ("user", "The quick brown fox"), ("assistant", "jumps over")]
    open_ids = server.client.tokenize(messages=msgs, continue_final_message=True).token_ids
    assert tok.decode(open_ids).endswith("<|im_start|>assistant\njumps over")
    for adapter in ("", "all-r8"):
        got = server.client.generate(messages=msgs, continue_final_message=True, adapter_id=adapter, sampling=GREEDY)
        expected = server.client.generate(prompt_token_ids=open_ids, adapter_id=adapter, sampling=GREEDY)
        assert got.token_ids == expected.token_ids and got.prompt_tokens == len(open_ids)
    closed = server.client.tokenize(messages=msgs, add_generation_prompt=False).token_ids
    assert closed[: len(open_ids)] == open_ids and len(closed) > len(open_ids)

    question = msgs[:2]
    said = server.client.tokenize(messages=question, chat_template_kwargs={"preamble": "Hi"}).token_ids
    assert tok.decode(said) == "Hi\n" + tok.decode(server.client.tokenize(messages=question).token_ids)
    assert server.client.generate(messages=question, chat_template_kwargs={"preamble": "Hi"},
                                  sampling=Sampling(max_new_tokens=1)).prompt_tokens == len(said)

    chat = [pb.ChatMessage(role=r, content=c) for r, c in msgs]
    for request, needle in (
        (pb.TokenizeRequest(messages=chat, chat_template_kwargs="{"), "chat_template_kwargs is not JSON"),
        (pb.TokenizeRequest(messages=chat, chat_template_kwargs="[1]"), "must be a JSON object, not list"),
        (pb.TokenizeRequest(messages=chat, chat_template_kwargs='{"messages": []}'),
         "chat_template_kwargs may not set messages"),
        (pb.TokenizeRequest(prompt="x", continue_final_message=True), "continue_final_message goes with messages"),
        (pb.GenerateRequest(messages=chat, continue_final_message=True, add_generation_prompt=True),
         "continue_final_message and add_generation_prompt cannot both be true"),
    ):
        call = server.client.stub.Tokenize if isinstance(request, pb.TokenizeRequest) else server.client.stub.Generate
        code, details = code_of(call, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in details, details


def test_a_requests_own_chat_template_and_documents(server, tiny_llama):
    """GenerateRequest.chat_template and documents (fields 12-13, TokenizeRequest 10-11), on a
    server started with --trust-request-chat-template: the request's template renders the messages
    (with the documents it shows), token for token as Generate with the ids Tokenize gives; bad
    documents or a broken template are INVALID_ARGUMENT naming the field."""
    from loramux.v1 import loramux_pb2 as pb

    own = "{% for d in documents or [] %}[{{ d.title }}] {{ d.text }}\n{% endfor %}" \
          "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}answer:"
    msgs, docs = [("user", "What is the weather?")], [{"title": "Rome", "text": "sunny and warm"}]
    ids = server.client.tokenize(messages=msgs, chat_template=own, documents=docs).token_ids
    assert server.client.detokenize(ids) == "[Rome] sunny and warm\nuser: What is the weather?\nanswer:"
    for adapter in ("", "attn-r4"):
        got = server.client.generate(messages=msgs, chat_template=own, documents=docs, adapter_id=adapter,
                                     sampling=GREEDY)
        assert got.token_ids == server.client.generate(prompt_token_ids=ids, adapter_id=adapter,
                                                       sampling=GREEDY).token_ids
    assert server.client.tokenize(messages=msgs).token_ids != ids  # the model's own template otherwise
    chat = [pb.ChatMessage(role=r, content=c) for r, c in msgs]
    for request, needle in (
        (pb.TokenizeRequest(messages=chat, documents="{"), "documents is not JSON"),
        (pb.TokenizeRequest(messages=chat, documents='[{"title": 3}]'), "objects whose values are strings"),
        (pb.GenerateRequest(messages=chat, chat_template="{% if %}"), "the request's chat template refused"),
        (pb.GenerateRequest(prompt="x", chat_template=own), "chat_template goes with messages"),
    ):
        call = server.client.stub.Tokenize if isinstance(request, pb.TokenizeRequest) else server.client.stub.Generate
        code, details = code_of(call, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in details, details


def test_a_conversations_tool_calls_reach_the_template_through_grpc(server):
    """ChatMessage.name, tool_call_id and tool_calls (fields 3-5; the calls as JSON) reach the chat
    template as OpenAI's chat messages do: an assistant turn's calls (arguments as the JSON value
    they encode) and the tool turn answering one; broken calls are INVALID_ARGUMENT."""
    from loramux.v1 import loramux_pb2 as pb

    template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}{% for c in m.tool_calls or [] %}"
                "[{{ c.id }} {{ c.function.name }} {{ c.function.arguments.city }}]{% endfor %}"
                "{% if m.tool_call_id %}(answers {{ m.tool_call_id }}){% endif %}{{ '\\n' }}{% endfor %}")
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}
    msgs = [("user", "Weather in Rome?"), ("assistant", "", {"tool_calls": [call]}),
            ("tool", "sunny", {"tool_call_id": "call_1"})]
    ids = server.client.tokenize(messages=msgs, chat_template=template).token_ids
    assert server.client.detokenize(ids) == ("user: Weather in Rome?\nassistant: [call_1 weather Rome]\n"
                                             "tool: sunny(answers call_1)\n")
    assert server.client.generate(messages=msgs, chat_template=template,
                                  sampling=Sampling(max_new_tokens=1)).prompt_tokens == len(ids)
    for calls, needle in (("[{", "messages[1].tool_calls is not JSON"), ('[{"type": "function"}]', "function"),
                          ('[{"function": {"name": "f", "arguments": "{"}}]', "arguments is not JSON")):
        request = pb.TokenizeRequest(messages=[pb.ChatMessage(role="user", content="x"),
                                               pb.ChatMessage(role="assistant", tool_calls=calls)])
        code, details = code_of(server.client.stub.Tokenize, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in details, details


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(server):
    """truncate_prompt_tokens (GenerateRequest field 11, TokenizeRequest 9): the prompt's last k
    tokens once rendered, token for token as a request sending those; -1 keeps as many as
    max_input_tokens allows, so a prompt too long for it is served (it is refused without); a k of
    0 or past that limit is INVALID_ARGUMENT naming both."""
    long = [(7 * i) % 380 + 3 for i in range(300)]  # past this server's 255-token input limit
    code, details = code_of(server.client.generate, prompt_token_ids=long, sampling=GREEDY)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_input_tokens is 255" in details
    cut = server.client.generate(prompt_token_ids=long, truncate_prompt_tokens=12, adapter_id="all-r8",
                                 sampling=GREEDY)
    assert cut.prompt_tokens == 12
    assert cut.token_ids == server.client.generate(prompt_token_ids=long[-12:], adapter_id="all-r8",
                                                   sampling=GREEDY).token_ids
    most = server.client.generate(prompt_token_ids=long, truncate_prompt_tokens=-1, sampling=Sampling())
    assert most.prompt_tokens == 255 and most.completion_tokens == 1  # the unset max_new_tokens fits the room left
    text = "Once upon a time there was a little server that batched many adapters together."
    ids = server.client.tokenize(text).token_ids
    assert server.client.tokenize(text, truncate_prompt_tokens=5).token_ids == ids[-5:]
    msgs = [("system", "Be brief."), ("user", "The quick brown fox")]
    chat_ids = server.client.tokenize(messages=msgs).token_ids
    assert server.client.generate(messages=msgs, truncate_prompt_tokens=6, sampling=GREEDY).token_ids == \
        server.client.generate(prompt_token_ids=chat_ids[-6:], sampling=GREEDY).token_ids
    for k in (0, -2, 256):
        code, details = code_of(server.client.generate, text, truncate_prompt_tokens=k, sampling=GREEDY)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, k
        assert f"truncate_prompt_tokens must be -1 or in [1, max_input_tokens (255)], got {k}" in details


def test_allowed_token_ids_restrict_sampling_to_them(server, tiny_llama):
    """SamplingParams.allowed_token_ids (field 20): greedy picks the most likely allowed token, the
    tokens a +100 logit bias on them gives (the tiny model's logits spread far less than 100);
    sampling draws only those, in a batch beside unrestricted rows; with min_new_tokens an allowed
    EOS waits; out of the vocabulary, or with a structured output, is INVALID_ARGUMENT, as a stop
    token id out of it is."""
    allowed = [5, 17, 120, 233, 380]
    for adapter in ("", "all-r8"):
        got = server.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id=adapter,
                                     sampling=Sampling(max_new_tokens=12, ignore_eos=True, allowed_token_ids=allowed))
        biased = server.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id=adapter, sampling=Sampling(
            max_new_tokens=12, ignore_eos=True, logit_bias={t: 100.0 for t in allowed}))
        assert got.token_ids == biased.token_ids and set(got.token_ids) <= set(allowed)
        free = server.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id=adapter, sampling=GREEDY)
        assert not set(free.token_ids) <= set(allowed)  # the restriction changed something

    async def batch():
        async with AsyncLoraMuxClient(server.target) as client:
            return await asyncio.gather(*(client.generate(prompt_token_ids=PROMPT_IDS, sampling=Sampling(
                max_new_tokens=12, ignore_eos=True, temperature=2.0, seed=s,
                allowed_token_ids=allowed if s % 2 else [])) for s in range(8)))
    results = asyncio.run(batch())
    assert all(set(r.token_ids) <= set(allowed) for r in results[1::2])
    assert not all(set(r.token_ids) <= set(allowed) for r in results[::2])
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_llama).eos_token_id
    waited = server.client.generate(prompt_token_ids=PROMPT_IDS, sampling=Sampling(
        max_new_tokens=8, min_new_tokens=4, logit_bias={eos: 100.0}, allowed_token_ids=[eos, 17]))
    assert waited.token_ids == [17] * 4 + [eos] and waited.finish_reason == "eos"  # EOS as soon as it may come
    alone = server.client.generate(prompt_token_ids=PROMPT_IDS, sampling=Sampling(
        max_new_tokens=3, min_new_tokens=2, allowed_token_ids=[eos]))
    assert alone.token_ids == [eos] and alone.finish_reason == "eos"  # a ban that would leave none yields
    for sampling, needle in ((Sampling(allowed_token_ids=[3, 384]), "token 384 is outside the vocabulary [0, 384)"),
                             (Sampling(allowed_token_ids=[3], json_object=True), "cannot be combined"),
                             # ids that would index past the logits while min_new_tokens bans them
                             (Sampling(stop_token_ids=[7, 2**32 - 1], min_new_tokens=1, json_object=True),
                              "stop_token_ids: token 4294967295 is outside the vocabulary [0, 384)")):
        code, details = code_of(server.client.generate, prompt_token_ids=PROMPT_IDS, sampling=sampling)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in details, details


def test_bad_words_ban_inside_an_allowed_list(server, tiny_llama):
    """SamplingParams.bad_words (field 21) folds into allowed_token_ids' mask: of two allowed tokens,
    the one a bad word forbids never comes; too many words is INVALID_ARGUMENT naming the limit."""
    from transformers import AutoTokenizer

    from loramux.server import bad_words

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    words = {t: w for t in range(3, 384) if (w := tokenizer.decode([t])).strip()
             and bad_words.BadWord((), t) in bad_words.tokenize(tokenizer, (w,), 384)}
    first, second = list(words)[:2]
    biased = Sampling(max_new_tokens=6, ignore_eos=True, allowed_token_ids=[first, second],
                      logit_bias={first: 100.0})
    assert server.client.generate(prompt_token_ids=PROMPT_IDS, sampling=biased).token_ids == [first] * 6
    banned = dataclasses.replace(biased, bad_words=[words[first]])
    assert server.client.generate(prompt_token_ids=PROMPT_IDS, sampling=banned).token_ids == [second] * 6
    code, details = code_of(server.client.generate, prompt_token_ids=PROMPT_IDS,
                            sampling=Sampling(bad_words=["x"] * 129))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "bad_words has 129 entries; the limit is 128" in details


def test_concurrent_async_clients_mixing_adapters(server, tiny_adapters):
    async def main():
        async with AsyncLoraMuxClient(server.target) as c:
            names = ["", *tiny_adapters]
            return await asyncio.gather(*(c.generate(prompt_token_ids=PROMPT_IDS, adapter_id=names[i % len(names)],
                                                     sampling=GREEDY) for i in range(12)))
    results = asyncio.run(main())
    solo = {a: server.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id=a, sampling=GREEDY).token_ids
            for a in ["", *tiny_adapters]}
    names = ["", *tiny_adapters]
    for i, r in enumerate(results):
        assert r.token_ids == solo[names[i % len(names)]]


def test_cancel_mid_stream_frees_everything(server):
    """A stream closed after three tokens is counted CANCELLED and leaves nothing held. The tiny
    model can finish all 240 tokens before the close arrives, if this process stalls that long on a
    busy machine: such a try (counted OK) is not a cancellation, and is made again."""
    for _ in range(3):
        before = server.metrics()
        stream = server.client.generate_stream(prompt_token_ids=PROMPT_IDS, adapter_id="all-r8",
                                               sampling=Sampling(max_new_tokens=240, ignore_eos=True))
        for i, _ in enumerate(stream):
            if i == 2:
                break
        stream.close()  # cancels the RPC
        after = wait_idle(server)
        # Idle means the finish is counted and the blocks are free (the engine's exit order).
        cancelled, ok = (total(after, "loramux_requests_total", **labels) - total(before, "loramux_requests_total", **labels)
                         for labels in ({"status": "CANCELLED"}, {"adapter": "all-r8", "status": "OK"}))
        assert (cancelled, ok) in ((1, 0), (0, 1)), (cancelled, ok)
        assert after["loramux_kv_cache_usage_ratio"] == 0
        if cancelled:
            return
    pytest.fail("every try finished before its stream was closed")


def test_deadline_exceeded_stops_the_work(server):
    sampling = Sampling(max_new_tokens=240, ignore_eos=True)
    started = time.monotonic()
    server.client.generate(prompt_token_ids=PROMPT_IDS, sampling=sampling)
    full = time.monotonic() - started  # the deadline is a fraction of this, however fast the machine
    before = server.metrics()
    code, _ = code_of(server.client.generate, prompt_token_ids=PROMPT_IDS, sampling=sampling, timeout=full / 3)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    expected = total(before, "loramux_requests_total", status="DEADLINE_EXCEEDED") + 1
    deadline = time.monotonic() + 10
    while total(server.metrics(), "loramux_requests_total", status="DEADLINE_EXCEEDED") != expected:
        assert time.monotonic() < deadline, "the server never counted the expired request"
        time.sleep(0.05)
    wait_idle(server)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(prompt=""), "empty"),
    (dict(prompt="hi", prompt_token_ids=[1, 2]), "exactly one"),
    (dict(prompt_token_ids=[10**6]), "vocabulary"),
    (dict(messages=[("wizard", "hi")]), "role"),
    (dict(prompt="hi", sampling=Sampling(temperature=float("nan"))), "temperature"),
    (dict(prompt="hi", sampling=Sampling(top_p=1.5)), "top_p"),
    (dict(prompt="hi", sampling=Sampling(min_p=1.01)), "min_p must be in [0, 1]"),
    (dict(prompt="hi", sampling=Sampling(max_new_tokens=300)), "max_new_tokens"),
    (dict(prompt="hi", sampling=Sampling(stop=["x"] * 9)), "limit is 8"),
    (dict(prompt_token_ids=[5] * 250, sampling=Sampling(max_new_tokens=10)), "max_model_len 256"),
])
def test_invalid_argument(server, kwargs, needle):
    code, details = code_of(server.client.generate, **kwargs)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in details


def test_a_request_that_does_not_parse_is_invalid_argument(server):
    """Bytes that are not the RPC's message (bad UTF-8 in a string field, a corrupt wire format) get
    INVALID_ARGUMENT naming the message, where gRPC's own parsing answers UNKNOWN; unary and
    streamed RPCs alike, and the server serves on."""
    from loramux.v1 import loramux_pb2 as pb

    good = pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_new_tokens=2, ignore_eos=True))
    for method, message, streamed in (("Generate", good, False), ("GenerateStream", good, True),
                                      ("Tokenize", pb.TokenizeRequest(prompt="hi"), False)):
        call = (server.channel.unary_stream if streamed else server.channel.unary_unary)(f"/loramux.v1.LoraMux/{method}")
        want, bad_utf8 = type(message).__name__, message.SerializeToString().replace(b"hi", b"h\xff")
        for raw, why in ((bad_utf8, "bad UTF-8"), (b"\xff\xff\xff", "Wire format was corrupt")):
            code, details = code_of(call, raw, timeout=30)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
            assert details.startswith("the request does not parse") and want in details and why in details
    streamed = list(server.channel.unary_stream("/loramux.v1.LoraMux/GenerateStream")(
        good.SerializeToString(), timeout=30))
    assert len(streamed) == 2
    assert server.client.generate(prompt="hi", sampling=Sampling(max_new_tokens=2, ignore_eos=True)).token_ids


def test_not_found(server):
    code, details = code_of(server.client.generate, prompt="hi", adapter_id="nope")
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
    assert code_of(server.client.unregister_adapter, "nope")[0] == grpc.StatusCode.NOT_FOUND


def test_register_replace_unregister(server, tiny_llama, tiny_adapters, adapter_root):
    path = shutil.copytree(tiny_adapters["attn-r4"], adapter_root / "mine")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        code, details = code_of(server.client.register_adapter, "team/mine:v1", str(path), weight=bad)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "weight must be finite and > 0" in details
    a = server.client.register_adapter("team/mine:v1", str(path), preload=True, weight=2.5)
    assert a.rank == 4 and a.tier in ("disk", "host") and a.weight == 2.5
    assert a.content_hash == {x.adapter_id: x for x in server.client.list_adapters()}["attn-r4"].content_hash
    assert code_of(server.client.register_adapter, "team/mine:v1", str(path))[0] == grpc.StatusCode.ALREADY_EXISTS
    first = server.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id="team/mine:v1", sampling=GREEDY)
    assert first.token_ids == server.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id="attn-r4",
                                                     sampling=GREEDY).token_ids
    other = shutil.copytree(tiny_adapters["all-r8"], adapter_root / "mine2")
    assert server.client.register_adapter("team/mine:v1", str(other), replace=True).weight == 1.0  # unset: 1
    swapped = server.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id="team/mine:v1", sampling=GREEDY)
    assert swapped.token_ids == server.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id="all-r8",
                                                       sampling=GREEDY).token_ids
    assert {a.adapter_id: a for a in server.client.list_adapters()}["team/mine:v1"].tier == "device"
    server.client.unregister_adapter("team/mine:v1")
    assert code_of(server.client.generate, prompt="hi", adapter_id="team/mine:v1")[0] == grpc.StatusCode.NOT_FOUND


def test_combinations_register_serve_and_list_through_grpc_and_the_cli(server):
    """A combination of one adapter at weight 1 computes what the adapter does; one of two is an
    adapter of its own (rank 12, listed with its parts, no path), and the CLI registers and lists
    them; refusals name the problem."""
    alone = server.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id="attn-r4", sampling=GREEDY).token_ids
    one = server.client.register_adapter("combo/one", combine=[("attn-r4", 1.0)])
    assert (one.rank, one.combine, one.path) == (4, [("attn-r4", 1.0)], "")
    assert server.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id="combo/one",
                                  sampling=GREEDY).token_ids == alone
    cli = [sys.executable, "-m", "loramux.server.cli"]
    out = subprocess.run([*cli, "adapters", "register", "combo/two", "--combine", "attn-r4=0.5", "all-r8=-0.25",
                          "--server", server.target], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "registered combo/two (rank 12" in out.stdout, out.stdout + out.stderr
    listed = subprocess.run([*cli, "adapters", "list", "--server", server.target], capture_output=True, text=True,
                            timeout=120).stdout
    assert "combo/two\trank=12" in listed and "0.5 x attn-r4 + -0.25 x all-r8" in listed, listed
    two = server.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id="combo/two", sampling=GREEDY).token_ids
    assert len(two) == len(alone) and two != alone
    for kwargs, status, needle in [
        (dict(combine=[("nope", 1.0)]), grpc.StatusCode.NOT_FOUND, "nope"),
        (dict(combine=[("attn-r64", 1.0), ("all-r8", 1.0)]), grpc.StatusCode.INVALID_ARGUMENT, "--max-lora-rank is 64"),
        (dict(combine=[("combo/one", 1.0)]), grpc.StatusCode.INVALID_ARGUMENT, "combination itself"),
        (dict(path="/x", combine=[("attn-r4", 1.0)]), grpc.StatusCode.INVALID_ARGUMENT, "path or combine"),
    ]:
        code, details = code_of(server.client.register_adapter, "combo/bad", **kwargs)
        assert code == status and needle in details, (kwargs, code, details)
    for name in ("combo/one", "combo/two"):
        server.client.unregister_adapter(name)


def test_a_dora_adapter_registers_lists_and_serves_as_peft_does(server, tiny_llama, adapter_root):
    """Registered at run time, listed as DoRA with its own rank, served token for token as PEFT
    serves it, and refused as part of a combination."""
    path = build_adapter(tiny_llama, adapter_root / "dora-qv", seed=9, r=4, lora_alpha=8,
                         target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    info = server.client.register_adapter("dora/qv", str(path))
    assert (info.rank, info.use_dora) == (4, True)
    try:
        listed = subprocess.run([sys.executable, "-m", "loramux.server.cli", "adapters", "list", "--server",
                                 server.target], capture_output=True, text=True, timeout=120).stdout
        assert "dora/qv\trank=4 dora\t" in listed, listed
        got = server.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id="dora/qv", sampling=GREEDY).token_ids
        assert got == peft_generate(tiny_llama, path, [PROMPT_IDS], GREEDY.max_new_tokens, eos_token_id=None)[0]
        code, details = code_of(server.client.register_adapter, "combo/dora", combine=[("dora/qv", 1.0)])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "DoRA adapter, which cannot be combined" in details
    finally:
        server.client.unregister_adapter("dora/qv")


def served_as_peft(server, model, adapter_id, path):
    """Greedy tokens of PROMPT_IDS through ``adapter_id`` as PEFT's with the adapter at ``path``,
    and the prompt's and the tokens' logprobs within 1e-4 of PEFT's: (the result, the logprobs)."""
    got = server.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id=adapter_id, sampling=Sampling(
        max_new_tokens=8, ignore_eos=True, logprobs=1, prompt_logprobs=1))
    assert got.token_ids == peft_generate(model, path, [PROMPT_IDS], 8, eos_token_id=None)[0]
    ref = peft_logprobs(model, path, PROMPT_IDS[:1], PROMPT_IDS[1:] + got.token_ids)
    scored = [*got.prompt_logprobs, *got.logprobs]
    assert [lp.token_id for lp in scored] == PROMPT_IDS[1:] + got.token_ids
    assert max(abs(lp.logprob - ref[p, lp.token_id].item()) for p, lp in enumerate(scored)) < 1e-4
    return got, scored


def test_speculative_drafts_serve_peft_tokens_through_both_apis(server, tiny_llama, tiny_adapters):
    """The fixture's --num-speculative-tokens 3: a prompt that repeats a phrase gives prompt lookup
    n-grams to draft from. The tokens and their logprobs are PEFT's, the HTTP stream carries the
    same text, and the drafts are counted."""
    prompt, path = [12, 40, 77, 5, 91] * 5, tiny_adapters["all-r8"]
    before = wait_idle(server)
    got = server.client.generate(prompt_token_ids=prompt, adapter_id="all-r8", sampling=Sampling(
        max_new_tokens=24, ignore_eos=True, logprobs=1))
    assert got.token_ids == peft_generate(tiny_llama, path, [prompt], 24, eos_token_id=None)[0]
    ref = peft_logprobs(tiny_llama, path, prompt, got.token_ids)
    assert max(abs(lp.logprob - ref[p, lp.token_id].item()) for p, lp in enumerate(got.logprobs)) < 1e-4
    chunks = server.openai().completions.create(model="all-r8", prompt=prompt, stream=True, temperature=0,
                                                max_tokens=24, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks if c.choices) == got.text
    after = wait_idle(server)
    drafts, kept = (after[f"loramux_spec_decode_{k}_tokens_total"] - before[f"loramux_spec_decode_{k}_tokens_total"]
                    for k in ("draft", "accepted"))
    assert drafts > 0 and 0 <= kept <= drafts


def test_lm_head_and_embedding_adapters_serve_tokens_and_logprobs_as_peft_does(server, tiny_llama, adapter_root):
    """LoRA on the output projection and the token embedding (--enable-lm-head-lora,
    --enable-embedding-lora), registered at run time: the tokens, their logprobs and the prompt's
    are PEFT's."""
    path = build_adapter(tiny_llama, adapter_root / "head-q", seed=11, r=4, lora_alpha=8,
                         target_modules=["lm_head", "embed_tokens", "q_proj"])
    info = server.client.register_adapter("head/q", str(path))
    assert set(info.target_modules) == {"lm_head", "embed_tokens", "q_proj"} and info.rank == 4
    try:
        served_as_peft(server, tiny_llama, "head/q", path)
    finally:
        server.client.unregister_adapter("head/q")


def test_fully_trained_modules_serve_tokens_and_logprobs_as_peft_does(server, tiny_llama, adapter_root):
    """An adapter's own token embedding and lm_head (modules_to_save; the fixture's
    --max-saved-modules 2), registered at run time: the tokens, their logprobs and the prompt's
    are PEFT's; a third copy is refused, naming the limit, and unregistering frees them."""
    path = build_adapter(tiny_llama, adapter_root / "saved-q", seed=13, r=4, lora_alpha=8, target_modules=["q_proj"],
                         modules_to_save=["embed_tokens", "lm_head"])
    other = build_adapter(tiny_llama, adapter_root / "saved-head", seed=14, r=4, lora_alpha=8,
                          target_modules=["q_proj"], modules_to_save=["lm_head"])
    assert server.client.server_info().max_saved_modules == 2
    info = server.client.register_adapter("saved/q", str(path))
    assert info.modules_to_save == ["lm_head", "model.embed_tokens"]
    plain = rewrite_adapter(path, adapter_root, "saved-q-plain", {"modules_to_save": None},
                            lambda w: {k: v for k, v in w.items() if "lora_" in k})
    pages = server.client.register_adapter("saved/plain", str(plain)).size_bytes
    server.client.unregister_adapter("saved/plain")
    assert info.size_bytes == pages + 2 * 384 * 64 * 4  # its pages, and its two copies
    try:
        with pytest.raises(grpc.RpcError) as refused:
            server.client.register_adapter("saved/head", str(other))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 of --max-saved-modules 2 are held" in refused.value.details()
        served_as_peft(server, tiny_llama, "saved/q", path)
        m = server.metrics()
        assert m["loramux_saved_modules"] == 2 and m["loramux_saved_module_bytes"] == 2 * 384 * 64 * 4
        listed = subprocess.run([sys.executable, "-m", "loramux.server.cli", "adapters", "list", "--server",
                                 server.target], capture_output=True, text=True, timeout=120).stdout
        assert "saved/q\trank=4 saved=lm_head,model.embed_tokens\t" in listed, listed
    finally:
        server.client.unregister_adapter("saved/q")
    assert server.client.register_adapter("saved/head", str(other)).modules_to_save == ["lm_head"]
    server.client.unregister_adapter("saved/head")


def test_trainable_tokens_serve_tokens_and_logprobs_as_peft_does(server, tiny_llama, adapter_root):
    """PEFT's trainable tokens (served as LoRA on the embedding: the fixture's
    --enable-embedding-lora), registered at run time, with prompt tokens among them."""
    tokens = [PROMPT_IDS[1], PROMPT_IDS[3], 200]
    path = build_adapter(tiny_llama, adapter_root / "tokens-q", seed=12, r=4, lora_alpha=8, target_modules=["q_proj"],
                         trainable_token_indices=tokens)
    info = server.client.register_adapter("tokens/q", str(path))
    assert list(info.trainable_token_ids) == tokens and info.rank == 4
    try:
        got, scored = served_as_peft(server, tiny_llama, "tokens/q", path)
        base = peft_logprobs(tiny_llama, None, PROMPT_IDS[:1], PROMPT_IDS[1:] + got.token_ids)
        assert max(abs(lp.logprob - base[p, lp.token_id].item()) for p, lp in enumerate(scored)) > 1e-2
    finally:
        server.client.unregister_adapter("tokens/q")


def test_cli_generate_takes_a_structured_output_and_a_sum_of_adapters(server):
    cli = [sys.executable, "-m", "loramux.server.cli", "generate", "--server", server.target, "--raw",
           "--max-new-tokens", "20"]
    for flags, check in ((["--choice", "yes", "no"], lambda t: t in ("yes", "no")),
                         (["--regex", "[0-9]{2,4}"], lambda t: t.isdigit() and 2 <= len(t) <= 4),
                         (["--grammar", 'start: "<" /[a-c]{3}/ ">"'], lambda t: len(t) == 5 and t[0] == "<")):
        out = subprocess.run([*cli, "hello", *flags], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and check(out.stdout.strip()), (flags, out.stdout, out.stderr)
    # and a sum of adapters instead of one: what the same sum gives through the client
    out = subprocess.run([*cli, "hello", "--combine", "attn-r4=0.5", "all-r8=-1"], capture_output=True, text=True,
                         timeout=120)
    expected = server.client.generate("hello", combine=[("all-r8", -1.0), ("attn-r4", 0.5)],
                                      sampling=Sampling(max_new_tokens=20)).text
    assert out.returncode == 0 and out.stdout == expected + "\n", (out.stdout, out.stderr)
    assert expected != server.client.generate("hello", sampling=Sampling(max_new_tokens=20)).text


def test_a_predicted_output_is_drafted_from_and_counted(server):
    """OpenAI's Predicted Outputs on this server with speculation on (GenerateRequest.prediction,
    chat's prediction): the reply is the one without it, and usage counts the prediction's drafts
    kept and not; a prediction of another shape is a 400 naming it."""
    ask = dict(messages=[("user", "Repeat after me.")], adapter_id="all-r8",
               sampling=Sampling(max_new_tokens=16, ignore_eos=True))
    plain = server.client.generate(**ask)
    predicted = server.client.generate(**ask, prediction=plain.text)
    assert predicted.token_ids == plain.token_ids and predicted.accepted_prediction_tokens > 0
    assert (plain.accepted_prediction_tokens, plain.rejected_prediction_tokens) == (0, 0)
    oa, chat = server.openai(), dict(model="all-r8", messages=[{"role": "user", "content": "Repeat after me."}],
                                     max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    got = oa.chat.completions.create(**chat, prediction={"type": "content", "content": [
        {"type": "text", "text": plain.text[:5]}, {"type": "text", "text": plain.text[5:]}]})
    assert got.choices[0].message.content == plain.text
    details = got.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 0 and details.rejected_prediction_tokens is not None
    assert oa.chat.completions.create(**chat).usage.completion_tokens_details.accepted_prediction_tokens == 0
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(**chat, prediction={"type": "diff", "content": "x"})
    assert "prediction must be" in e.value.message and e.value.body["param"] == "prediction"


def test_keep_resident_holds_adapters_on_the_device_and_refuses_past_the_room(server, tiny_adapters, adapter_root):
    """A pool of 4 x 64 pages: kept adapters may hold 256 - 64 (room for one of --max-lora-rank)."""
    path = shutil.copytree(tiny_adapters["attn-r64"], adapter_root / "kept64")
    kept = ["kept/a", "kept/b", "kept/c"]
    try:
        for adapter_id in kept:
            assert server.client.register_adapter(adapter_id, str(path), keep_resident=True).keep_resident
        code, details = code_of(server.client.register_adapter, "kept/d", str(path), keep_resident=True)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "192 of the 256 pages" in details, details
        assert "kept/d" not in {a.adapter_id for a in server.client.list_adapters()}  # nothing registered
        assert server.metrics()["loramux_adapters_kept_resident"] == 3
        deadline = time.monotonic() + 20
        while {a.tier for a in server.client.list_adapters() if a.adapter_id in kept} != {"device"}:
            assert time.monotonic() < deadline, "kept adapters never became device-resident"
            time.sleep(0.05)
        # Every other adapter now pages through the 64 pages left; the kept ones stay.
        others = [a for a in tiny_adapters if a != "attn-r64"] + ["attn-r64"]
        for adapter_id in others:
            server.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id=adapter_id, sampling=GREEDY)
        listed = {a.adapter_id: a for a in server.client.list_adapters()}
        assert all(listed[a].tier == "device" and listed[a].keep_resident for a in kept)
        assert sum(listed[a].tier == "device" for a in tiny_adapters) < len(tiny_adapters)  # they were paged
        out = server.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id="kept/a", sampling=GREEDY)
        assert out.token_ids == server.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id="attn-r64",
                                                       sampling=GREEDY).token_ids
    finally:
        for adapter_id in kept:
            server.client.unregister_adapter(adapter_id)
    m = wait_idle(server)
    assert m["loramux_adapters_kept_resident"] == 0 and m["loramux_adapter_pins"] == 0


def test_permission_denied_outside_roots_and_through_symlinks(server, tiny_adapters, adapter_root):
    code, details = code_of(server.client.register_adapter, "x", str(tiny_adapters["attn-r4"]))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "adapter root" in details
    link = adapter_root / "escape"
    link.symlink_to(tiny_adapters["attn-r4"])
    assert code_of(server.client.register_adapter, "x", str(link))[0] == grpc.StatusCode.PERMISSION_DENIED
    missing = code_of(server.client.register_adapter, "x", "/does/not/exist")
    assert missing[0] == grpc.StatusCode.PERMISSION_DENIED and missing[1] == details  # no existence oracle
    assert code_of(server.client.register_adapter, "../x", str(adapter_root))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_failed_precondition_for_unloadable_adapters(server, tiny_adapters, adapter_root):
    dora = shutil.copytree(tiny_adapters["attn-r4"], adapter_root / "dora")
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    code, details = code_of(server.client.register_adapter, "dora", str(dora))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "'use_dora' is true, but module" in details


def test_resource_exhausted_when_the_queue_is_full(server):
    async def main():
        async with AsyncLoraMuxClient(server.target) as c:
            calls = [c.generate(prompt_token_ids=PROMPT_IDS, sampling=Sampling(max_new_tokens=200, ignore_eos=True))
                     for _ in range(30)]
            return await asyncio.gather(*calls, return_exceptions=True)
    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, grpc.RpcError)]
    assert errors and all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors)
    assert "12" in errors[0].details()
    assert sum(not isinstance(r, Exception) for r in results) >= 12
    wait_idle(server)


def test_reflection_lists_the_services(server):
    db = ProtoReflectionDescriptorDatabase(server.channel)
    services = set(db.get_services())
    assert {"loramux.v1.LoraMux", "grpc.health.v1.Health"} <= services
    service = DescriptorPool(db).FindServiceByName("loramux.v1.LoraMux")
    assert {m.name for m in service.methods} == {
        "Generate", "GenerateStream", "RegisterAdapter", "UnregisterAdapter", "ListAdapters", "GetServerInfo",
        "Tokenize", "Detokenize"}


def test_metrics_count_requests_tokens_and_affinity(server):
    before = server.metrics()
    for _ in range(3):
        server.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id="attn-r64", sampling=GREEDY)
    after = wait_idle(server)
    ok = total(after, "loramux_requests_total", status="OK") - total(before, "loramux_requests_total", status="OK")
    assert ok == 3
    gen = total(after, "loramux_generated_tokens_total") - total(before, "loramux_generated_tokens_total")
    assert gen == 36
    assert after["loramux_request_duration_seconds_count"] - before["loramux_request_duration_seconds_count"] == 3
    affinity = [k for k in after if k.startswith("vllm:lora_requests_info{")]
    assert affinity and 'max_lora="4"' in affinity[0]


def test_drain_on_sigterm(tiny_llama, tmp_path):
    from server import ServerProcess

    proc = ServerProcess(["--model", str(tiny_llama), "--drain-timeout", "30"], tmp_path / "drain.log")
    try:
        proc.wait_ready()
        long = proc.client.generate_stream(prompt_token_ids=PROMPT_IDS,
                                           sampling=Sampling(max_new_tokens=150, ignore_eos=True))
        first = next(long)
        proc.terminate()
        proc.wait_until(health_pb2.HealthCheckResponse.NOT_SERVING, timeout=10)
        code, details = code_of(proc.client.generate, prompt="hi")
        assert code == grpc.StatusCode.UNAVAILABLE and "draining" in details
        rest = list(long)
        assert len(rest) + 1 == 150 and rest[-1].finish_reason == "length" and first.finish_reason is None
        assert proc.proc.wait(30) == 0
    finally:
        proc.stop()


def test_an_int8_server_serves_peft_over_the_dequantized_weights(tiny_llama, tiny_adapters, tmp_path):
    """--quantization int8 through the real entry points: GetServerInfo and `loramux info` name it,
    and gRPC and the OpenAI API give PEFT's greedy tokens over the model with its projections
    dequantized (helpers.int8_copy), for the base model and an adapter; an unknown scheme is a
    start-up error naming the choices."""
    from helpers import int8_copy
    from server import ServerProcess

    proc = ServerProcess(["--model", str(tiny_llama), "--quantization", "int8", "--adapter",
                          f"all-r8={tiny_adapters['all-r8']}", "--max-model-len", "128",
                          "--default-max-new-tokens", "16"], tmp_path / "int8.log")
    try:
        proc.wait_ready()
        info = proc.client.server_info()
        assert info.quantization == "int8" and info.dtype == "float32"
        shown = subprocess.run([sys.executable, "-m", "loramux.server.cli", "info", "--server", proc.target],
                               capture_output=True, text=True, timeout=120).stdout
        assert "quantization: int8\n" in shown, shown
        assert "decoder projections quantized to int8" in proc.log()
        copy = int8_copy(tiny_llama, tmp_path / "int8-copy")
        oa = proc.openai()
        for adapter in ("", "all-r8"):
            expected = peft_generate(copy, tiny_adapters.get(adapter), [PROMPT_IDS], 12, eos_token_id=None)[0]
            assert proc.client.generate(prompt_token_ids=PROMPT_IDS, adapter_id=adapter,
                                        sampling=GREEDY).token_ids == expected
            got = oa.completions.create(model=adapter or info.model, prompt=PROMPT_IDS, max_tokens=12, temperature=0,
                                        logprobs=1, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
            assert [int(t.removeprefix("token_id:")) for t in got.choices[0].logprobs.tokens] == expected
        unquantized = peft_generate(tiny_llama, tiny_adapters["all-r8"], [PROMPT_IDS], 12, eos_token_id=None)[0]
        assert unquantized != peft_generate(copy, tiny_adapters["all-r8"], [PROMPT_IDS], 12, eos_token_id=None)[0], \
            "int8 weights change nothing here: this test could not tell them from float32"
    finally:
        proc.stop()
    refused = subprocess.run([sys.executable, "-m", "loramux.server.cli", "serve", "--model", str(tiny_llama),
                              "--quantization", "int4"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "'none', 'int8'" in refused.stderr, refused.stderr
