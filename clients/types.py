"""Plain dataclasses returned by the clients (no protobuf objects leak out)."""

from __future__ import annotations

import ipaddress
import json
import warnings
from dataclasses import dataclass, field

from ..v1 import loramux_pb2 as pb

FINISH_NAMES = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_EOS: "eos", pb.FINISH_REASON_STOP: "stop"}
TIER_NAMES = {pb.ADAPTER_TIER_DISK: "disk", pb.ADAPTER_TIER_HOST: "host", pb.ADAPTER_TIER_DEVICE: "device"}


@dataclass(frozen=True)
class Timing:
    queue_seconds: float
    adapter_load_seconds: float
    time_to_first_token_seconds: float
    total_seconds: float

    @classmethod
    def from_pb(cls, t: pb.Timing) -> Timing:
        return cls(t.queue_seconds, t.adapter_load_seconds, t.time_to_first_token_seconds, t.total_seconds)


@dataclass(frozen=True)
class Logprob:
    """A token's raw logprob, its top alternatives [(token_id, logprob)], and its rank among the
    vocabulary (1: the most likely)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    rank: int = 0

    @classmethod
    def from_pb(cls, lp: pb.TokenLogprob) -> Logprob:
        return cls(lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top], lp.rank)


def stop_reason_of(r: pb.GenerateResponse | pb.GenerateStreamResponse) -> str | int | None:
    """The stop string or stop token id that ended a response, or None."""
    which = r.WhichOneof("stop_reason")
    return None if which is None else getattr(r, which)


@dataclass(frozen=True)
class Generation:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "length" | "eos" | "stop"
    prompt_tokens: int
    completion_tokens: int
    timing: Timing
    logprobs: list[Logprob] = field(default_factory=list)  # when Sampling.logprobs was set
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt_logprobs: list[Logprob] = field(default_factory=list)  # prompt tokens 2, 3, ...: Sampling.prompt_logprobs
    accepted_prediction_tokens: int = 0  # with a prediction: its tokens drafted and kept, and not
    rejected_prediction_tokens: int = 0
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (finish_reason "stop")

    @classmethod
    def from_pb(cls, r: pb.GenerateResponse) -> Generation:
        return cls(r.request_id, r.text, list(r.token_ids), FINISH_NAMES.get(r.finish_reason),
                   r.usage.prompt_tokens, r.usage.completion_tokens, Timing.from_pb(r.timing),
                   [Logprob.from_pb(lp) for lp in r.logprobs], r.usage.cached_prompt_tokens,
                   [Logprob.from_pb(lp) for lp in r.prompt_logprobs], r.usage.accepted_prediction_tokens,
                   r.usage.rejected_prediction_tokens, stop_reason_of(r))


@dataclass(frozen=True)
class StreamChunk:
    request_id: str
    token_id: int
    text: str
    finish_reason: str | None = None  # last chunk only
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timing: Timing | None = None
    logprob: Logprob | None = None  # when Sampling.logprobs was set
    cached_prompt_tokens: int = 0  # last chunk only
    prompt_logprobs: list[Logprob] = field(default_factory=list)  # first chunk only, when asked
    stop_reason: str | int | None = None  # last chunk only: as Generation's

    @classmethod
    def from_pb(cls, r: pb.GenerateStreamResponse) -> StreamChunk:
        last = r.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        return cls(r.request_id, r.token_id, r.text, FINISH_NAMES.get(r.finish_reason),
                   r.usage.prompt_tokens, r.usage.completion_tokens, Timing.from_pb(r.timing) if last else None,
                   Logprob.from_pb(r.logprob) if r.HasField("logprob") else None, r.usage.cached_prompt_tokens,
                   [Logprob.from_pb(lp) for lp in r.prompt_logprobs], stop_reason_of(r))


@dataclass(frozen=True)
class Adapter:
    adapter_id: str
    path: str
    rank: int
    lora_alpha: float
    target_modules: list[str]
    size_bytes: int
    tier: str
    requests_served: int
    content_hash: str = ""  # the weights' identity: equal files, equal hash
    weight: float = 1.0  # fair-scheduling share
    keep_resident: bool = False  # kept in device memory, never evicted
    combine: list[tuple[str, float]] = field(default_factory=list)  # a combination: its (adapter id, weight)
    use_dora: bool = False  # a DoRA adapter
    trainable_token_ids: list[int] = field(default_factory=list)  # tokens whose embedding rows it replaces
    modules_to_save: list[str] = field(default_factory=list)  # modules it replaces with fully trained copies
    vocab_size: int = 0  # its resized vocabulary's size (added tokens); 0: the base model's
    own_tokenizer: bool = False  # served with the tokenizer saved beside it

    @classmethod
    def from_pb(cls, a: pb.AdapterInfo) -> Adapter:
        return cls(a.adapter_id, a.path, a.rank, a.lora_alpha, list(a.target_modules), a.size_bytes,
                   TIER_NAMES.get(a.tier, "unknown"), a.requests_served, a.content_hash, a.weight, a.keep_resident,
                   [(c.adapter_id, c.weight) for c in a.combine], a.use_dora, list(a.trainable_token_ids),
                   list(a.modules_to_save), a.vocab_size, a.own_tokenizer)


@dataclass(frozen=True)
class ServerInfo:
    version: str
    model: str
    device: str
    dtype: str
    max_lora_rank: int
    max_device_adapters: int
    max_host_adapters: int
    max_batch_size: int
    max_model_len: int
    registered_adapters: int
    has_chat_template: bool
    kv_block_size: int = 0
    kv_cache_tokens: int = 0
    adapter_pages: int = 0  # device adapter pool: an adapter of rank r takes r pages
    op_backend: str = ""  # LoRA ops in use: torch, cpp or triton
    cpu_isa: str = ""  # the host CPU's vector ISA, e.g. AVX2, AVX512
    lora_dtype: str = ""  # adapter pages' dtype (--lora-dtype), e.g. float32, bfloat16
    lora_targets: tuple[str, ...] = ()  # module kinds an adapter may target; lm_head with --enable-lm-head-lora
    dora: bool = False  # DoRA adapters are served (--enable-dora)
    num_speculative_tokens: int = 0  # prompt-lookup drafts a decoding request may run per step (0: off)
    base_kernel_rows: tuple[int, ...] = ()  # row counts whose base projections run on the C++ kernel (--base-linear)
    scheduling: str = ""  # admission order (--scheduling): fair, fifo or priority
    quantization: str = ""  # the decoder projections' weights (--quantization): none or int8
    max_saved_modules: int = 0  # fully trained embeddings and lm_heads held at once (--max-saved-modules)
    prefix_caching: bool = False  # prompts' cached blocks are reused (not with --no-prefix-caching)

    @classmethod
    def from_pb(cls, s: pb.ServerInfo) -> ServerInfo:
        return cls(**{**{f: getattr(s, f) for f in cls.__dataclass_fields__}, "lora_targets": tuple(s.lora_targets),
                      "base_kernel_rows": tuple(s.base_kernel_rows)})


@dataclass(frozen=True)
class Tokens:
    """A prompt's token ids as Generate would see them (Tokenize)."""

    token_ids: list[int]
    token_strs: list[str]  # with return_token_strs
    max_model_len: int

    @classmethod
    def from_pb(cls, m: pb.TokenizeResponse) -> Tokens:
        return cls(list(m.token_ids), list(m.token_strs), m.max_model_len)


@dataclass(frozen=True)
class Tls:
    """TLS for the channel: the server's CA, and a client certificate for mutual TLS."""

    ca_cert: bytes | None = None  # PEM; None: the system roots
    client_cert: bytes | None = None  # PEM, with client_key, for mutual TLS
    client_key: bytes | None = None

    def credentials(self):
        import grpc

        return grpc.ssl_channel_credentials(self.ca_cert, self.client_key, self.client_cert)


@dataclass(frozen=True)
class Sampling:
    """Client-side sampling options; None leaves the server's default."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None  # in [0, 1]: only tokens at least min_p times as likely as the top one
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives with each token's raw logprob (0 to 20)
    presence_penalty: float | None = None  # OpenAI's, in [-2, 2]
    frequency_penalty: float | None = None  # OpenAI's, in [-2, 2]
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    prompt_logprobs: int | None = None  # each prompt token's raw logprob (after the first), with this many top ones
    min_new_tokens: int | None = None  # no EOS or stop token before this many tokens
    skip_special_tokens: bool | None = None  # False: special tokens' text is kept; None: the server's (left out)
    spaces_between_special_tokens: bool | None = None  # vLLM's; None: the server's (true)
    include_stop_str_in_output: bool = False  # the stop string that ends the text stays in it
    allowed_token_ids: list[int] = field(default_factory=list)  # only these may be sampled; empty: any
    bad_words: list[str] = field(default_factory=list)  # words the output may not contain (by their tokens)
    # structured output, at most one: the text matches a JSON schema (a dict or JSON text), is any
    # JSON object, matches a regex, is one of the choices, or follows a grammar (Lark or GBNF)
    json_schema: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def to_pb(self) -> pb.SamplingParams:
        special = ("stop", "stop_token_ids", "logit_bias", "allowed_token_ids", "bad_words", *STRUCTURED)
        fields = {k: v for k, v in self.__dict__.items() if v is not None and k not in special}
        return pb.SamplingParams(stop=self.stop, stop_token_ids=self.stop_token_ids, logit_bias=self.logit_bias,
                                 allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words,
                                 structured_output=self.structured_output(), **fields)

    def structured_output(self) -> pb.StructuredOutput | None:
        asked = [k for k in STRUCTURED if getattr(self, k) not in (None, False)]
        if len(asked) > 1:
            raise ValueError(f"ask for one structured output, not {' and '.join(asked)}")
        if not asked:
            return None
        value = getattr(self, asked[0])
        if asked[0] == "json_schema" and not isinstance(value, str):
            value = json.dumps(value)
        elif asked[0] == "choice":
            value = pb.ChoiceList(choices=value)
        return pb.StructuredOutput(**{asked[0]: value})


STRUCTURED = ("json_schema", "json_object", "regex", "choice", "grammar")


def register_request(adapter_id: str, path: str = "", replace: bool = False, preload: bool = False,
                     weight: float | None = None, keep_resident: bool = False,
                     combine: list[tuple[str, float]] | None = None) -> pb.RegisterAdapterRequest:
    """A PEFT directory at ``path``, or (``combine``: [(adapter id, weight)]) a weighted
    combination of registered adapters."""
    return pb.RegisterAdapterRequest(
        adapter_id=adapter_id, path=path, replace=replace, preload=preload, weight=weight, keep_resident=keep_resident,
        combine=[pb.WeightedAdapter(adapter_id=a, weight=w) for a, w in combine or ()])


def chat_message(role: str, content: str, fields: dict | None = None) -> pb.ChatMessage:
    fields = fields or {}
    calls = fields.get("tool_calls")
    return pb.ChatMessage(role=role, content=content, name=fields.get("name") or "",
                          tool_call_id=fields.get("tool_call_id") or "", tool_calls=json.dumps(calls) if calls else "",
                          reasoning_content=fields.get("reasoning_content") or "")


def chat_fields(messages=None, add_generation_prompt: bool | None = None, continue_final_message: bool = False,
                chat_template_kwargs: dict | None = None, chat_template: str = "",
                documents: list[dict] | None = None) -> dict:
    """The chat fields GenerateRequest and TokenizeRequest share: messages [(role, content)] or
    (role, content, {"name", "tool_call_id", "tool_calls": [OpenAI's calls], "reasoning_content"})
    for a conversation with tool calls or a reasoning model's thinking, and how the chat template renders them (``chat_template``: the request's own,
    on a server that trusts them; ``documents``: [{"title": ..., "text": ...}] for a template that
    shows them)."""
    return dict(messages=[chat_message(*m) for m in (messages or [])],
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                chat_template_kwargs=json.dumps(chat_template_kwargs) if chat_template_kwargs else "",
                chat_template=chat_template, documents=json.dumps(documents) if documents else "")


def generate_request(prompt=None, *, adapter_id: str = "", prompt_token_ids=None, sampling: Sampling | None = None,
                     request_id: str = "", add_special_tokens: bool | None = None,
                     truncate_prompt_tokens: int | None = None, priority: int = 0,
                     combine: list[tuple[str, float]] | None = None, prediction: str = "", cache_salt: str = "",
                     **chat) -> pb.GenerateRequest:
    """``chat``: chat_fields' arguments. ``priority``: lower first, on a server run with
    --scheduling priority (others accept only 0). ``combine`` [(adapter id, weight)]: run with the
    weighted sum of those registered adapters instead of ``adapter_id``. ``prediction``: the
    output expected, with edits, which speculative drafts follow. ``cache_salt``: prefix-cache
    hits only from requests with the same salt."""
    return pb.GenerateRequest(
        request_id=request_id, adapter_id=adapter_id or "", prompt=prompt or "",
        prompt_token_ids=prompt_token_ids or [], sampling=(sampling or Sampling()).to_pb(),
        add_special_tokens=add_special_tokens, truncate_prompt_tokens=truncate_prompt_tokens, priority=priority,
        combine=[pb.WeightedAdapter(adapter_id=a, weight=w) for a, w in combine or ()], prediction=prediction,
        cache_salt=cache_salt, **chat_fields(**chat))


def tokenize_request(prompt=None, *, adapter_id: str = "", add_special_tokens: bool | None = None,
                     return_token_strs: bool = False, truncate_prompt_tokens: int | None = None,
                     **chat) -> pb.TokenizeRequest:
    """``chat``: chat_fields' arguments."""
    return pb.TokenizeRequest(adapter_id=adapter_id or "", prompt=prompt or "", add_special_tokens=add_special_tokens,
                              return_token_strs=return_token_strs, truncate_prompt_tokens=truncate_prompt_tokens,
                              **chat_fields(**chat))


class PlaintextTokenWarning(UserWarning):
    """A bearer token would cross the network unencrypted."""


def warn_if_token_in_plaintext(target: str, token: str | None, tls: Tls | None) -> None:
    """Tokens sent without TLS to anything but a loopback address can be read on the way."""
    if token is None or tls is not None:
        return
    addr = target.rpartition("///")[2]  # "dns:///host:port" -> "host:port"
    if addr.startswith("["):  # "[::1]:port"
        host = addr[1 : addr.find("]")]
    else:
        host = addr.rsplit(":", 1)[0] if addr.count(":") == 1 else addr
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        warnings.warn(f"sending a bearer token to {target} without TLS: anyone on the path can read it; "
                      "pass tls=Tls(...)", PlaintextTokenWarning, stacklevel=3)
