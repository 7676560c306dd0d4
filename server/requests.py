"""Domain types of the engine's Python API (no gRPC, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .errors import RequestInvalid, clip

MAX_REQUEST_ID = 128


def validate_request_id(request_id: str) -> None:
    """It goes into logs: bounded, and printable (no control characters, no line breaks)."""
    if len(request_id) > MAX_REQUEST_ID:
        raise RequestInvalid(f"request_id is {len(request_id)} characters; the limit is {MAX_REQUEST_ID}")
    if not request_id.isprintable():
        raise RequestInvalid(f"request_id {clip(request_id)} has control or non-printable characters")


# Below this, a temperature samples as greedy: dividing logits by less overflows float32.
GREEDY_TEMPERATURE = 1e-5


class OutputKind(Enum):
    """What a structured output's ``spec`` is."""

    JSON_SCHEMA = "json_schema"  # a JSON schema (JSON text); ANY_JSON_OBJECT is OpenAI's json_object
    REGEX = "regex"  # the whole output matches it (Rust regex syntax)
    CHOICE = "choice"  # a JSON list of strings: the output is one of them
    GRAMMAR = "grammar"  # a context-free grammar, Lark or GBNF (llama.cpp's)


@dataclass(frozen=True)
class StructuredOutput:
    """The generated text must match ``spec``; decoding masks every token that cannot lead to a
    match, and the request finishes (STOP) once nothing but the end of text can follow."""

    kind: OutputKind
    spec: str
    asked_by: str | None = field(default=None, compare=False)  # the request field that asked for it: errors name it


ANY_JSON_OBJECT = StructuredOutput(OutputKind.JSON_SCHEMA, '{"type": "object"}')  # OpenAI's json_object


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    # the client left max_new_tokens to the server: the engine shrinks it to the room the prompt
    # leaves (context and KV cache), so a long prompt is served rather than refused for a limit it never set
    fit_max_new_tokens: bool = False
    temperature: float = 0.0  # below GREEDY_TEMPERATURE (0 included): greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # keep tokens at least min_p times as likely as the most likely one; 0: off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives to return with each token's logprob; None: no logprobs
    presence_penalty: float = 0.0  # OpenAI's: taken from the logit of each token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: times the number of times each token was generated so far
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    prompt_logprobs: int | None = None  # each prompt token's logprob (after the first) and this many top ones
    min_new_tokens: int = 0  # until this many are generated, EOS (unless ignored) and stop_token_ids cannot be sampled
    structured_output: StructuredOutput | None = None  # None: free text
    skip_special_tokens: bool = True  # False: special tokens' text stays in the output (not a finishing EOS's)
    # vLLM's: a space between special tokens' texts where they stay, which only a slow tokenizer's
    # decode puts there (a fast one, every model's here, writes them side by side either way)
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False  # True: the text ends with the stop string that ended it
    allowed_token_ids: tuple[int, ...] = ()  # only these may be sampled (vLLM's); (): any
    bad_words: tuple[str, ...] = ()  # words the output may not contain, banned by their tokens (vLLM's; bad_words.py)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def adjusts_logits(self) -> bool:
        """Penalties or biases change this request's logits before its token is picked (a
        structured output's mask does too: the sampler sees it as the row's mask)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or bool(self.logit_bias))


class FinishReason(Enum):
    LENGTH = 1
    EOS = 2
    STOP = 3


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    adapter_id: str | None = None  # None: the base model
    deadline: float | None = None  # time.monotonic() after which the request fails
    priority: int = 0  # with --scheduling priority: lower is admitted first, and may preempt higher
    # the output expected, with edits (OpenAI's Predicted Outputs): speculative drafts follow it
    prediction: tuple[int, ...] = ()
    # vLLM's cache_salt: its prefix-cache hits come only from requests with the same salt ("": none)
    cache_salt: str = ""
    # where other prompts are expected to part from this one (the end of a chat's instructions): a
    # model with recurrent layers caches its state at the last full block before each, so a request
    # sharing only that much resumes there (the server's renderer sets it; not a client's field)
    shared_prefix_ends: tuple[int, ...] = ()


@dataclass(frozen=True)
class RequestOptions:
    """What a client's call asks of every completion it makes, beside its prompts and sampling."""

    adapter_id: str | None = None  # None: the base model
    request_id: str | None = None  # every completion's, in the engine and its log lines (None: a random one each)
    priority: int = 0  # with --scheduling priority: lower first, and may preempt higher
    prediction: str = ""  # the output expected, with edits, which speculative drafts follow
    combine: tuple[tuple[str, float], ...] = ()  # instead of adapter_id: that weighted sum of registered adapters
    cache_salt: str = ""  # prefix-cache hits only from requests with the same salt ("": none)
    time_remaining: float | None = None  # seconds to the client's deadline (None: none)


@dataclass(frozen=True)
class Timing:
    queue_seconds: float = 0.0
    adapter_load_seconds: float = 0.0
    time_to_first_token_seconds: float = 0.0
    total_seconds: float = 0.0


MAX_LOGPROBS = 20
MAX_OCCURRENCE_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2], as OpenAI's
MAX_LOGIT_BIAS = 100.0  # a bias lies in [-100, 100], as OpenAI's
MAX_LOGIT_BIAS_TOKENS = 300  # entries of one request's logit_bias
MAX_BAD_WORDS = 128  # entries of one request's bad_words
MAX_BAD_WORD_CHARS = 256  # characters of one of them
MAX_CACHE_SALT_CHARS = 256  # of a request's cache_salt
MAX_STRUCTURED_OUTPUT_CHARS = 65536  # of a structured output's spec (a schema, regex, choice list or grammar)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's raw logprob (log-softmax of the model's logits, before temperature,
    penalties and top-k/top-p), and the most likely alternatives, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob)
    rank: int = 0  # 1 + how many tokens have a higher logprob (1: the most likely); 0: not computed


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token_id: int
    text: str  # text delta; empty while a character or a possible stop string is incomplete
    finish_reason: FinishReason | None = None  # set on the last event only
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timing: Timing | None = None  # last event only
    logprob: TokenLogprob | None = None  # when the request asked for logprobs
    cached_prompt_tokens: int = 0  # last event only: prompt tokens served from the prefix cache
    # first event only, when the request asked: the raw logprob of each prompt token after the first
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    # last event only, with a prediction: its tokens drafted and kept in the output, and drafted and not
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    # last event only: the stop string or stop token id that ended the output (vLLM's stop_reason);
    # None when something else did (EOS, the length, a structured output complete)
    stop_reason: str | int | None = None
