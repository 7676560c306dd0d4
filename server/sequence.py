"""One request inside the engine (``Sequence``) and the caller's view of it (``RequestStream``)."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

import torch

from ..adapters.device_pool import AdapterKey
from .block_manager import NO_HIT, PrefixHit
from .detokenizer import IncrementalDetokenizer
from .requests import GenerationRequest, TokenEvent
from .sampling import SamplerState
from .speculative import PredictionLookup, PromptLookup
from .structured import Grammar
from .vocabulary import Vocabulary


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    adapter: AdapterKey | None
    adapter_entry: object | None  # its RegisteredAdapter: held, so the version stays readable while it waits
    identity: bytes  # what computes this sequence's KV: the prefix cache's namespace for it
    weight: float  # its adapter's fair-scheduling weight, fixed at arrival (1 for the base model)
    sampler: SamplerState
    detok: IncrementalDetokenizer
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    ids: list[int]
    num_prompt: int
    arrival: float
    num_computed: int = 0  # tokens whose KV is in the cache
    prefill_len: int = 0  # tokens to prefill before decoding: the prompt, or after a preemption all ids
    num_cached: int = 0  # prompt tokens served from the prefix cache
    pages: torch.Tensor | None = None
    magnitude_page: int | None = None  # DoRA's page of per-output scales
    kinds: frozenset[str] = frozenset()  # module kinds the adapter targets
    pinned: bool = False
    # generated text not yet sent, after as much sent text as a stop string can reach back into (stop
    # strings cut it)
    text: str = ""
    emitted: int = 0  # chars of ``text`` already sent
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    adapter_load_seconds: float = 0.0
    cold_adapter: bool = False  # the adapter was not device-resident when the request arrived
    num_preemptions: int = 0
    long_rope: bool = False  # all its positions take RoPE's long frequencies (ServingModel.rope_split)
    state_slot: int | None = None  # a recurrent model's: its state's slot while running (recurrent_state.py)
    prompt_keys: list[bytes] | None = None  # prefix-cache keys of ids[:prefill_len]'s full blocks
    hit: PrefixHit = NO_HIT  # this step's prefix-cache hit, while waiting
    # a recurrent model's: prompt positions (block boundaries) where its state is cached (recurrent_state.py)
    cache_states_at: tuple[int, ...] = ()
    decode_state_key: bytes | None = None  # the key of the state its decode steps cached last (_save_decode_states)
    prompt_logprobs: list = field(default_factory=list)  # TokenLogprob of prompt tokens 1, 2, ... so far
    grammar: Grammar | None = None  # a structured output's matcher
    lookup: PromptLookup | None = None  # its n-gram index, for speculative drafts (made on first use)
    prediction: PredictionLookup | None = None  # its request's predicted output, followed (made on first use)
    predicted_draft: bool = False  # its last drafts came from the prediction
    predicted_tokens_drafted: int = 0  # drafts from the prediction, and those of them kept in the output
    accepted_prediction_tokens: int = 0
    # time.monotonic() of each event sent and not yet taken by the consumer, oldest first: the engine
    # thread appends, the consumer's loop pops (deque ends are thread-safe)
    undelivered: deque = field(default_factory=deque)
    done: bool = False
    cancel_reason: BaseException | None = field(default=None)
    vocab: Vocabulary = None  # its Vocabulary (server/vocabulary.py): the tokenizer and size it is served with
    saved_embedding: torch.Tensor | None = field(default=None, init=False)
    saved_head: torch.Tensor | None = field(default=None, init=False)

    def __post_init__(self):
        self.prefill_len = self.prefill_len or self.num_prompt
        # the adapter's fully trained token embedding and lm_head (modules_to_save), if it has them
        manifest = None if self.adapter_entry is None else self.adapter_entry.manifest
        self.saved_embedding = None if manifest is None else manifest.saved_weight(head=False)
        self.saved_head = None if manifest is None else manifest.saved_weight(head=True)

    @property
    def tenant(self) -> str | None:
        """Whose fair share it draws on: its adapter id, or None for the base model."""
        return self.request.adapter_id or None

    @property
    def priority(self) -> int:
        """Under --scheduling priority: lower goes first."""
        return self.request.priority

    @property
    def num_generated(self) -> int:
        return len(self.ids) - self.num_prompt


class RequestStream:
    """Async iterator of a request's TokenEvents. Closing it early cancels the request."""

    def __init__(self, engine, seq: Sequence):
        self._engine = engine
        self._seq = seq
        self.request_id = seq.request.request_id
        self.prompt_token_ids = seq.request.prompt_token_ids
        self._ended = False  # set by the final event or the error, never by engine-thread state
        self._settled = False  # the engine no longer counts this stream as undelivered

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenEvent:
        if self._ended:
            raise StopAsyncIteration
        item = await self._seq.queue.get()
        if self._seq.undelivered:
            self._seq.undelivered.popleft()
        if isinstance(item, BaseException):
            self._end()
            raise item
        if item.finish_reason is not None:
            self._end()
        return item

    def _end(self) -> None:
        self._ended = True
        self._settle()

    def _settle(self) -> None:
        if not self._settled:
            self._settled = True
            self._engine._delivered()

    def cancel(self, reason: BaseException | None = None) -> None:
        """Stop the request if it still runs. The caller wants nothing more from it, so drain
        no longer waits for its delivery."""
        self._engine.cancel(self._seq, reason)
        self._settle()
