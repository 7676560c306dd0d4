"""The step loop: schedule -> admit -> runner.step -> sample -> process outputs -> deliver events.

The parts: scheduler.py (pure policy), block_manager.py (KV blocks, prefix cache),
adapter_admission.py (readiness, pins), runner.py with attention_metadata.py (the model step),
output_processor.py (tokens -> text -> stops), sequence.py (a request's state and its stream).

The loop runs on its own thread (torch releases the GIL inside ops); callers on an asyncio loop
get each token through a per-request queue. Every exit path of a sequence goes through
``_finish``, which frees its KV blocks and unpins its adapter, so nothing leaks on cancel or error.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, replace

import torch

from ..adapters.manager import AdapterManager
from . import bad_words
from .adapter_admission import AdapterAdmission
from .block_manager import NO_HIT, BlockManager, block_keys, blocks_for
from .config import ServerConfig
from .detokenizer import IncrementalDetokenizer
from .errors import (
    EngineUnavailable,
    QueueFull,
    RequestCancelled,
    RequestDeadlineExceeded,
    RequestFailed,
    RequestInvalid,
    clip,
    status_name,
)
from .output_processor import Finished, OutputProcessor
from .recurrent_state import StateCache, parting_blocks
from .requests import (
    MAX_BAD_WORD_CHARS,
    MAX_BAD_WORDS,
    MAX_CACHE_SALT_CHARS,
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_TOKENS,
    MAX_LOGPROBS,
    MAX_OCCURRENCE_PENALTY,
    GenerationRequest,
    Timing,
    TokenEvent,
    TokenLogprob,
    validate_request_id,
)
from .runner import ModelRunner, WorkItem
from .sampling import SamplerState, allowed_mask, host_data, sample
from .scheduler import (
    DECODE_WEIGHT,
    PREFILL_WEIGHT,
    Budgets,
    Fairness,
    SeqView,
    adapter_order,
    page_victims,
    pages_held,
    schedule,
)
from .sequence import RequestStream, Sequence
from .speculative import PromptLookupDrafter
from .step_budget import StepBudget
from .structured import Grammar
from .torch_threads import flush_denormals
from .vocabulary import Vocabularies, Vocabulary

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.5
WATERMARK = 0.01  # share of KV blocks admission keeps free for the running sequences' growth
BASE_IDENTITY = b"base"  # no adapter's identity can equal it: theirs are b"lora:" + a sha256


@dataclass(frozen=True)
class StepStats:
    num_seqs: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_adapters: int  # distinct adapters in the step
    seconds: float
    num_draft_tokens: int = 0  # speculative drafts run after decoding rows' tokens (not in num_decode_tokens)


class EngineObserver:
    """Receives engine events on the engine thread; metrics and logs subclass it. Keep it cheap."""

    def step(self, stats: StepStats) -> None:
        pass

    def token(self, seq: Sequence, gap_seconds: float | None) -> None:
        """A token was sampled; ``gap_seconds`` since the token of the sequence's previous step (None:
        its first token, or a kept draft, which comes in the step of the token before it)."""

    def finish(self, seq: Sequence, status: str, error: BaseException | None, timing: Timing) -> None:
        """The sequence left, with a gRPC-style status name ("OK", "CANCELLED", ...) and the same
        timing its response carries."""


class Engine:
    def __init__(self, config: ServerConfig, runner: ModelRunner, tokenizer, adapters: AdapterManager,
                 vocab_size: int, eos_token_ids: set[int]):
        self.config = config
        self.runner = runner
        self.adapters = adapters
        self.admission = AdapterAdmission(adapters)
        kv = runner.kv
        self.blocks = BlockManager(kv.num_blocks, kv.block_size, config.prefix_caching)
        self.states = kv.states  # a recurrent model's per-sequence states; None for others
        # which prompt prefixes the states' cached slots hold, where prefix caching serves a recurrent model
        self.state_cache = StateCache(self.states.cached_slots) \
            if self.states is not None and self.states.cached_slots else None
        # admission leaves this many blocks free for running sequences to grow into (none when idle)
        self.watermark_blocks = max(1, int(WATERMARK * kv.num_blocks)) if kv.num_blocks > 1 else 0
        self.prefix_queried_tokens = 0  # counters read by the metrics collector
        self.prefix_hit_tokens = 0
        self.num_preemptions = 0
        # proposes speculative drafts (anything with ``propose(seq, k) -> list[int]``)
        self.drafter = PromptLookupDrafter(config.prompt_lookup_max, config.prompt_lookup_min)
        self.draft_tokens = 0  # speculative drafts run, and of those kept (read by the metrics collector)
        self.accepted_tokens = 0
        self.service: dict[str | None, float] = {}  # fair scheduling: weighted tokens served per tenant
        self.budgets = Budgets(config.max_batch_size, config.max_tokens_per_step, config.max_adapters_per_step)
        # --target-step-ms: each step's token budget from the measured times of recent steps
        self.step_budget = None if config.target_step_ms is None else \
            StepBudget(config.target_step_ms / 1000, config.max_tokens_per_step)
        self.step_token_budget = config.max_tokens_per_step  # the last step's (read by the metrics collector)
        model = runner.model
        # where a sequence that outgrows RoPE's short context is recomputed by the long frequencies (Phi-3's)
        self.outgrow_rope_at = model.rope_split if model.RECOMPUTE_AT_ROPE_SPLIT else None
        self.by_priority = config.scheduling == "priority"
        self._inbox: deque = deque()  # ("add", seq) | ("cancel", seq, reason); thread-safe appends
        # Taken by submit around its append and by the fatal path when it closes the inbox, so that a
        # request racing a fatal fault is either failed by that path or refused, never left waiting.
        self._inbox_lock = threading.Lock()
        self._closed = False
        self._arriving: dict[Sequence, None] = {}  # adds in the inbox, not yet queued (in order): waiting
        self._wake = threading.Event()
        adapters.notify = self._wake.set  # a finished disk read or device copy wakes the step loop
        self._waiting: list[Sequence] = []
        self._running: list[Sequence] = []
        self._accepted = 0  # queued + running; reserved under _admission_lock
        self._undelivered = 0  # accepted streams whose caller has not yet taken the last event
        self._admission_lock = threading.Lock()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.fatal_error: BaseException | None = None
        self.observers: list[EngineObserver] = []
        self._held: list | None = None  # a step's events, sent once the step is recorded (_step)
        self.output = OutputProcessor(self.observers)
        self.vocabularies = Vocabularies(config, tokenizer, vocab_size, eos_token_ids, torch.get_num_threads(),
                                         held=lambda: [e.manifest.tokenizer or tokenizer for e in adapters.registry.list()
                                                       if e.manifest.tokenizer is not None or e.manifest.vocab_size])
        # Structured outputs' masks are computed during the forward pass where it runs on an
        # accelerator; on a CPU the forward pass uses every core, and they run after it (computed
        # during it, a 2-core VM's steps were slower: BENCHMARKS.md).
        self.overlap_masks = runner.device.type != "cpu"
        self.on_fatal = None  # callable(error), on the engine thread, before in-flight requests fail

    # ---- public API (any thread / asyncio loop) ----
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.adapters.close()

    def stop_accepting(self) -> None:
        self._accepting = False

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def num_in_flight(self) -> int:
        return self._accepted

    @property
    def num_undelivered(self) -> int:
        """Accepted requests whose final event or error the caller has not taken yet: drain waits
        for these, not only for generation to end."""
        return self._undelivered

    def _delivered(self) -> None:
        with self._admission_lock:
            self._undelivered -= 1

    def counts(self) -> tuple[int, int]:
        """(running, waiting); a snapshot for gauges and tests. Waiting counts the requests
        submitted but not yet taken from the inbox, so that (0, 0) means none is on its way."""
        return len(self._running), len(self._waiting) + len(self._arriving)

    def adapter_ids(self) -> tuple[set[str], set[str]]:
        """(adapters of running requests, adapters of waiting requests, those still in the inbox
        included); a snapshot."""
        def ids(seqs):
            return {s.request.adapter_id for s in list(seqs) if s.request.adapter_id}
        with self._inbox_lock:
            arriving = list(self._arriving)
        return ids(self._running), ids(self._waiting) | ids(arriving)

    @property
    def caches_states(self) -> bool:
        """Whether prompts' recurrent states are cached (a hybrid with prefix caching): only then do
        requests' ``shared_prefix_ends`` matter."""
        return self.state_cache is not None

    @property
    def tokenizer(self):
        """The base model's tokenizer."""
        return self.vocabularies.base.tokenizer

    @property
    def vocab_size(self) -> int:
        """The base model's vocabulary size."""
        return self.vocabularies.base.size

    def vocabulary(self, adapter_id: str | None) -> Vocabulary:
        """The vocabulary a request for ``adapter_id`` is served with now (the base model's for an
        id not registered: its request is refused later)."""
        entry = self.adapters.registry.lookup(adapter_id) if adapter_id else None
        return self.vocabularies.of(None if entry is None else entry.manifest)

    def validate(self, req: GenerationRequest, vocab: Vocabulary | None = None) -> None:
        """``vocab``: the request's (default: the one its adapter has now)."""
        c, p = self.config, req.sampling
        vocab = vocab or self.vocabulary(req.adapter_id)
        size = vocab.size
        validate_request_id(req.request_id)
        n = len(req.prompt_token_ids)
        if n == 0:
            raise RequestInvalid("the prompt is empty", param="prompt")
        if len(req.cache_salt) > MAX_CACHE_SALT_CHARS:
            raise RequestInvalid(f"cache_salt has {len(req.cache_salt)} characters; the limit is {MAX_CACHE_SALT_CHARS}",
                                 param="cache_salt")
        if n > c.input_token_limit:  # before any pass over the ids
            raise RequestInvalid(f"the prompt has {n} tokens; max_input_tokens is {c.input_token_limit} "
                                 "(truncate_prompt_tokens keeps a prompt's last tokens)", param="prompt")
        bad = [t for t in req.prompt_token_ids if not 0 <= t < size]
        if bad:
            raise RequestInvalid(f"prompt_token_ids {bad[:5]} are outside the vocabulary [0, {size})",
                                 param="prompt_token_ids")
        if not 0 < p.max_new_tokens <= c.max_new_tokens_limit:
            raise RequestInvalid(f"max_new_tokens must be in [1, {c.max_new_tokens_limit}], got {p.max_new_tokens}",
                                 param="max_new_tokens")
        if n + p.max_new_tokens > c.total_token_limit:
            limit = "max_total_tokens" if c.max_total_tokens else "max_model_len"
            raise RequestInvalid(
                f"prompt ({n} tokens) + max_new_tokens ({p.max_new_tokens}) exceeds {limit} {c.total_token_limit}",
                param="max_new_tokens")
        need = blocks_for(n + p.max_new_tokens, self.blocks.block_size)
        if need > self.blocks.num_blocks:
            raise RequestInvalid(
                f"prompt ({n} tokens) + max_new_tokens ({p.max_new_tokens}) needs {need} KV blocks; the pool holds "
                f"{self.blocks.num_blocks} blocks of {self.blocks.block_size} tokens (--kv-cache-tokens)",
                param="max_new_tokens")
        if req.priority and not self.by_priority:
            raise RequestInvalid(f"priority {req.priority} is served only with --scheduling priority; this server "
                                 f"schedules by {c.scheduling!r} (send 0 or leave it unset)", param="priority")
        if not (0.0 <= p.temperature <= 100.0):  # also false for NaN
            raise RequestInvalid(f"temperature must be in [0, 100], got {p.temperature}", param="temperature")
        if not (0.0 < p.top_p <= 1.0):
            raise RequestInvalid(f"top_p must be in (0, 1], got {p.top_p}", param="top_p")
        if p.seed is not None and not -(1 << 63) <= p.seed < 1 << 64:  # what a generator takes
            raise RequestInvalid("seed must be in [-2^63, 2^64)", param="seed")
        if p.top_k < 0:
            raise RequestInvalid(f"top_k must be >= 0, got {p.top_k}", param="top_k")
        if not (0.0 <= p.min_p <= 1.0):  # also false for NaN
            raise RequestInvalid(f"min_p must be in [0, 1], got {p.min_p}", param="min_p")
        if not (p.repetition_penalty > 0.0 and p.repetition_penalty < float("inf")):
            raise RequestInvalid(f"repetition_penalty must be > 0 and finite, got {p.repetition_penalty}",
                                 param="repetition_penalty")
        if len(p.stop) > c.max_stop_sequences:
            raise RequestInvalid(f"{len(p.stop)} stop strings; the limit is {c.max_stop_sequences}", param="stop")
        for s in p.stop:
            if not 0 < len(s) <= c.max_stop_length:
                raise RequestInvalid(f"stop strings must be 1 to {c.max_stop_length} characters, got {len(s)}",
                                     param="stop")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(p, name) is not None and not 0 <= getattr(p, name) <= MAX_LOGPROBS:
                raise RequestInvalid(f"{name} must be in [0, {MAX_LOGPROBS}], got {getattr(p, name)}", param=name)
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_OCCURRENCE_PENALTY <= getattr(p, name) <= MAX_OCCURRENCE_PENALTY:
                raise RequestInvalid(f"{name} must be in [-{MAX_OCCURRENCE_PENALTY:g}, {MAX_OCCURRENCE_PENALTY:g}], "
                                     f"got {getattr(p, name)}", param=name)
        if len(p.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
            raise RequestInvalid(f"logit_bias has {len(p.logit_bias)} entries; the limit is {MAX_LOGIT_BIAS_TOKENS}",
                                 param="logit_bias")
        for token, bias in p.logit_bias:
            if not 0 <= token < size:
                raise RequestInvalid(f"logit_bias token {token} is outside the vocabulary [0, {size})",
                                     param="logit_bias")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise RequestInvalid(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                                     f"got {bias} for token {token}", param="logit_bias")
        if not 0 <= p.min_new_tokens <= p.max_new_tokens:
            raise RequestInvalid(f"min_new_tokens must be in [0, max_new_tokens ({p.max_new_tokens})], "
                                 f"got {p.min_new_tokens}", param="min_new_tokens")
        if p.allowed_token_ids:
            bad = next((t for t in p.allowed_token_ids if not 0 <= t < size), None)
            if bad is not None:
                raise RequestInvalid(f"allowed_token_ids: token {bad} is outside the vocabulary [0, {size})",
                                     param="allowed_token_ids")
            if len(p.allowed_token_ids) > size:
                raise RequestInvalid(f"allowed_token_ids has {len(p.allowed_token_ids)} entries; the vocabulary has "
                                     f"{size}", param="allowed_token_ids")
            if p.structured_output is not None:
                raise RequestInvalid("allowed_token_ids and a structured output cannot be combined: the structured "
                                     "output already decides which tokens may come", param="allowed_token_ids")
        if len(p.bad_words) > MAX_BAD_WORDS:
            raise RequestInvalid(f"bad_words has {len(p.bad_words)} entries; the limit is {MAX_BAD_WORDS}",
                                 param="bad_words")
        for word in p.bad_words:
            if not word.strip() or len(word) > MAX_BAD_WORD_CHARS:
                raise RequestInvalid(f"bad_words entries must be 1 to {MAX_BAD_WORD_CHARS} characters, not all "
                                     f"spaces; got {clip(word)}", param="bad_words")
        if len(p.stop_token_ids) > c.max_stop_token_ids:
            raise RequestInvalid(f"{len(p.stop_token_ids)} stop_token_ids; the limit is {c.max_stop_token_ids} "
                                 "(--max-stop-token-ids)", param="stop_token_ids")
        # They index the logits while min_new_tokens bans them (vllm#54195: one such id killed the engine).
        bad = next((t for t in p.stop_token_ids if not 0 <= t < size), None)
        if bad is not None:
            raise RequestInvalid(f"stop_token_ids: token {bad} is outside the vocabulary [0, {size})",
                                 param="stop_token_ids")

    def fitted(self, req: GenerationRequest) -> GenerationRequest:
        """A request that left max_new_tokens to the server: its default, shrunk to what the context
        limit and the KV cache leave after the prompt (at least 1: a prompt with no room left is
        then refused by ``validate``, naming the limit)."""
        p = req.sampling
        if not p.fit_max_new_tokens:
            return req
        room = min(self.config.total_token_limit, self.blocks.num_blocks * self.blocks.block_size)
        room -= len(req.prompt_token_ids)
        return replace(req, sampling=replace(p, max_new_tokens=max(1, min(p.max_new_tokens, room)),
                                             fit_max_new_tokens=False))

    def submit(self, req: GenerationRequest) -> RequestStream:
        """Validate and enqueue; call from a running asyncio loop. Raises the domain errors."""
        if not self._accepting or self.fatal_error is not None:
            raise EngineUnavailable("the server is draining or stopped and accepts no new requests")
        req = self.fitted(req)
        vocab = self.vocabulary(req.adapter_id)
        self.validate(req, vocab)
        grammar = self._grammar(req, vocab)
        with self._admission_lock:  # atomic reservation: never more than the bound accepted
            if self._accepted >= self.config.max_queued_requests:
                raise QueueFull(f"the queue is full: {self.config.max_queued_requests} requests in flight")
            self._accepted += 1
        try:  # resolving counts the request as served: only once it holds a place
            entry = self.adapters.resolve(req.adapter_id) if req.adapter_id else None
        except BaseException:
            with self._admission_lock:
                self._accepted -= 1
            raise
        resolved = self.vocabularies.of(None if entry is None else entry.manifest)
        if resolved is not vocab:  # replaced meanwhile by a version of another vocabulary, which it runs on
            try:
                self.validate(req, resolved)
                vocab, grammar = resolved, self._grammar(req, resolved)
            except BaseException:
                with self._admission_lock:
                    self._accepted -= 1
                raise
        adapter = None if entry is None else entry.key
        cold = adapter is not None and self.adapters.tier(adapter) != "device"
        loop = asyncio.get_running_loop()
        sampler = SamplerState.create(req.sampling, self.runner.device)  # its generator where the logits are
        sampler.bad_words = bad_words.tokenize(vocab.tokenizer, req.sampling.bad_words, vocab.size)
        split = self.runner.model.rope_split
        long_rope = split is not None and len(req.prompt_token_ids) > split
        seq = Sequence(
            request=req, adapter=adapter, adapter_entry=entry, identity=self._identity(entry, req.cache_salt, long_rope),
            weight=1.0 if entry is None else entry.weight,
            sampler=sampler,
            detok=IncrementalDetokenizer(vocab.tokenizer, list(req.prompt_token_ids), req.sampling.skip_special_tokens,
                                         req.sampling.spaces_between_special_tokens), vocab=vocab,
            queue=asyncio.Queue(),
            loop=loop, ids=list(req.prompt_token_ids), num_prompt=len(req.prompt_token_ids), arrival=time.monotonic(),
            cold_adapter=cold, grammar=grammar, long_rope=long_rope,
        )
        with self._inbox_lock:
            if self._closed:
                with self._admission_lock:
                    self._accepted -= 1
                raise EngineUnavailable("the engine has stopped and accepts no new requests")
            with self._admission_lock:
                self._undelivered += 1
            self._inbox.append(("add", seq))
            self._arriving[seq] = None
        self._wake.set()
        return RequestStream(self, seq)

    def _grammar(self, req: GenerationRequest, vocab: Vocabulary) -> Grammar | None:
        """The request's structured output's matcher over its vocabulary, if it asks for one: with
        a reasoning parser, of the answer only (unless --structured-output-in-reasoning)."""
        if req.sampling.structured_output is None:
            return None
        gate = None
        if vocab.reasoning is not None and not self.config.structured_output_in_reasoning:
            gate = vocab.reasoning.gate(vocab.reasoning.opening(req.prompt_token_ids))
        return vocab.grammars.matcher(req.sampling.structured_output, gate)

    def _banned(self, seq: Sequence) -> list[int] | None:
        """The tokens this row may not sample now: its stop tokens until min_new_tokens are out, and
        what its bad words forbid after the tokens it has generated."""
        p = seq.sampler.params
        out = [] if seq.num_generated >= p.min_new_tokens else \
            [*(() if p.ignore_eos else seq.vocab.eos_token_ids), *p.stop_token_ids]
        if seq.sampler.bad_words:
            out += bad_words.banned(seq.sampler.bad_words, seq.ids, seq.num_prompt)
        return out or None

    @staticmethod
    def _identity(entry, salt: str = "", long_rope: bool = False) -> bytes:
        """The prefix cache's namespace: the content hash of the weights that compute the KV, never
        the adapter id, so a replaced adapter cannot hit its old KV and equal files share it. LoRA
        on lm_head alone computes the base model's KV, and shares it. A ``salt`` (vLLM's
        cache_salt) makes a namespace of its own within that one, which only the same salt shares."""
        identity = BASE_IDENTITY if entry is None or not entry.manifest.changes_kv else \
            b"lora:" + entry.manifest.content_hash.encode()
        if salt:  # a fixed-length digest after a separator neither namespace contains
            identity += b"|salt:" + hashlib.sha256(salt.encode("utf-8", "surrogatepass")).hexdigest().encode()
        if long_rope:  # turned by RoPE's long frequencies, its K/V differ from a short sequence's (rope_split)
            identity += b"|rope:long"
        return identity

    def cancel(self, seq: Sequence, reason: BaseException | None = None) -> None:
        if not seq.done:
            self._inbox.append(("cancel", seq, reason or RequestCancelled("the request was cancelled")))
            self._wake.set()

    # ---- the step loop (engine thread only) ----
    def run_once(self) -> tuple[bool, bool]:
        """One turn of the step loop on the caller's thread: (a step ran, an adapter is loading).
        The engine thread calls it in a loop; a profiler or a test may call it instead, on an
        engine that was never started."""
        self._drain_inbox()
        self._expire_deadlines()
        fairness = self._fairness()  # one view of the service per turn, for look-ahead and admission
        ready, loading = self._poll_adapters(fairness)
        if self.by_priority and loading:  # else every waiting adapter is ready: none waits for pages
            ready = self._preempt_for_pages(ready)
        return self._step(ready, fairness), loading

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        flush_denormals(self.config.flush_denormals)  # first: this thread's OpenMP team inherits it
        try:
            while not self._stop:
                stepped, loading = self.run_once()
                if not stepped:  # woken by a new request, a cancel, or an adapter read or copy finishing
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()
        except BaseException as e:  # a fault of the engine itself: fail everyone, promptly
            log.exception("fatal engine error")
            self.fatal_error = e
            if self.on_fatal is not None:  # e.g. health turns NOT_SERVING before anyone sees a failure
                try:
                    self.on_fatal(e)
                except Exception:  # noqa: BLE001 - failing the requests below matters more
                    log.exception("on_fatal hook failed")
            with self._inbox_lock:  # from here on submit refuses: nothing lands in a dead inbox
                self._closed = True
                # the inbox's adds, and one the fault caught between the inbox and the queue
                arriving, self._arriving = list(self._arriving), {}
                self._inbox.clear()
            for seq in dict.fromkeys([*self._running, *self._waiting, *arriving]):  # each once
                try:  # one failure here must not leave the others without an answer
                    self._finish(seq, error=RequestFailed(f"engine failure: {e}"))
                except Exception:  # noqa: BLE001
                    log.exception("failing request %s after the fatal error", seq.request.request_id)

    def _drain_inbox(self) -> None:
        while self._inbox:
            item = self._inbox.popleft()
            if item[0] == "add":
                self._join(item[1])
                self._enqueue([item[1]])
                with self._inbox_lock:  # after the enqueue: meanwhile counted twice, never missed
                    del self._arriving[item[1]]
            elif not item[1].done:
                self._finish(item[1], error=item[2])

    def _enqueue(self, seqs: list[Sequence], ahead: bool = False) -> None:
        """Into the waiting queue, which is kept in admission order: arrival, or under priority
        scheduling (priority, arrival). ``ahead``: preempted requests, in their admission order,
        go back before the others (of their priority)."""
        if not self.by_priority:
            if ahead:
                self._waiting[:0] = seqs
            else:
                self._waiting.extend(seqs)
            return
        place = bisect.bisect_left if ahead else bisect.bisect_right
        for seq in reversed(seqs) if ahead else seqs:
            self._waiting.insert(place(self._waiting, seq.priority, key=lambda s: s.priority), seq)

    def _expire_deadlines(self) -> None:
        """Deadlines, and consumers that stopped taking events: a stalled stream is cancelled
        after --stream-stall-timeout, so an unread request cannot hold its batch place forever."""
        now = time.monotonic()
        stall = self.config.stream_stall_timeout
        for seq in [*self._waiting, *self._running]:
            d = seq.request.deadline
            if d is not None and now > d:
                self._finish(seq, error=RequestDeadlineExceeded("the request's deadline expired"))
                continue
            try:
                oldest = seq.undelivered[0]
            except IndexError:
                continue
            if now - oldest > stall:
                log.warning("request %s: the client took no event for %.0f s; cancelling it",
                            seq.request.request_id, stall)
                self._finish(seq, error=RequestCancelled(
                    f"the client read nothing for {stall:g} s (--stream-stall-timeout)"))

    def _join(self, seq: Sequence) -> None:
        """A tenant that had nothing queued or running joins at the least service of the active
        ones, so idle time is not banked (VTC's counter lift)."""
        tenant = seq.tenant
        active = {s.tenant for s in (*self._waiting, *self._running)}
        if tenant in active:
            return
        floor = min((self.service.get(t, 0.0) for t in active), default=None)
        if floor is None:  # nothing active: every counter starts again from 0
            self.service.clear()
            return
        self.service[tenant] = max(self.service.get(tenant, 0.0), floor)

    def _fairness(self) -> Fairness | None:
        if self.config.scheduling != "fair":
            return None
        return Fairness(self.service, {s.tenant: s.weight for s in self._waiting})

    def _poll_adapters(self, fairness: Fairness | None) -> tuple[set, bool]:
        ready, loading, failed = self.admission.poll(adapter_order(self._waiting, fairness))
        for key, error in failed:
            for seq in [s for s in self._waiting if s.adapter == key]:
                self._finish(seq, error=error)
        return ready, loading

    def _preempt_for_pages(self, ready: set) -> set:
        """Priority scheduling: the first waiting request whose adapter is not ready may wait for
        device pages that running requests of a lower priority pin. Preempt those (``page_victims``)
        and keep their adapters out of this step's admission, so that the copy staged at its end
        can evict them. Until it is placed, requests of a lower priority do not pin the adapters it
        would evict either (``pages_held``): while its read lands no pages can be reserved for it,
        and they would take back the pages just freed, to be preempted again. Returns the adapters
        admission may take."""
        ahead = set()
        for i, seq in enumerate(self._waiting):  # in (priority, arrival) order
            if seq.adapter is None or seq.adapter in ready:
                ahead.add(seq.adapter)
                continue
            spare = self.adapters.pages_spare(seq.adapter)
            if spare is None:  # placed, or its pages reserved
                return ready
            if spare >= 0:
                return ready - pages_held(seq.priority, spare, self._waiting[i + 1:],
                                          self.adapters.pool.evictable_pages(), ahead)
            running = [SeqView(s, s.adapter, s.prefill_len, s.num_computed, priority=s.priority)
                       for s in self._running]
            chosen = set(page_victims(seq.priority, -spare, running, self.adapters.pool.pinned_pages(), ahead))
            victims = [s for s in self._running if s in chosen]  # in admission order, as _enqueue wants
            for victim in victims:
                self._preempt(victim)
            self._enqueue(victims, ahead=True)
            return ready - {v.adapter for v in victims}
        return ready

    def _near_head(self, fairness: Fairness | None) -> set[Sequence]:
        """The waiting requests admission may reach this step, which look up their prefix: the first
        max-batch-size in arrival order, or (priority) in (priority, arrival) order; under fair
        scheduling also each tenant's first ones, least-served tenants first, up to four batches'
        worth (admission takes tenants by service, not arrival)."""
        size = self.budgets.max_batch_size
        if fairness is None or len(self._waiting) <= size:  # the queue is in admission order (_enqueue)
            return set(self._waiting[:size])
        heads: dict = {}
        for seq in self._waiting:
            mine = heads.setdefault(seq.tenant, [])
            if len(mine) < size:
                mine.append(seq)
        near = set(self._waiting[:size])
        for tenant in sorted(heads, key=lambda t: fairness.service.get(t, 0.0)):  # stable: first arrival on ties
            if len(near) >= 4 * size:
                break
            near.update(heads[tenant])
        return near

    def _views(self, fairness: Fairness | None) -> tuple[list[SeqView], list[SeqView]]:
        """What the scheduler sees. Waiting requests near the head (of admission's order) look up
        their prefix in the cache; the hit is kept on the sequence, and admission takes exactly that hit."""
        waiting, bs = [], self.blocks.block_size
        near = self._near_head(fairness) if self.blocks.prefix_caching else set()
        for seq in near:
            if seq.prompt_keys is None:
                seq.prompt_keys = block_keys(seq.identity, seq.ids[: seq.prefill_len], bs)
        parting = self._parting(near) if self.state_cache is not None and near else {}
        for seq in self._waiting:
            seq.hit = NO_HIT
            # a request still owed prompt logprobs computes its whole prompt: a hit would skip rows
            wants_rows = seq.sampler.params.prompt_logprobs is not None and \
                len(seq.prompt_logprobs) < seq.num_prompt - 1
            if seq in near:
                if not wants_rows:
                    seq.hit = self.blocks.lookup(seq.prompt_keys)
                if self.state_cache is not None:
                    self._state_hit(seq, parting[seq])
            hit = len(seq.hit.blocks)
            computing = self._computing(seq, hit * bs)
            waiting.append(SeqView(
                seq, seq.adapter, seq.prefill_len, 0, num_cached=seq.hit.cached_tokens(seq.prefill_len, bs),
                hit_blocks=hit, hit_free=seq.hit.num_free, tenant=seq.tenant, priority=seq.priority,
                computing=computing, waits_for=() if wants_rows else computing if self.states is not None
                else computing[:1]))
        if self.state_cache is not None:  # the states near requests resume from stay until admitted
            self.state_cache.kept = frozenset(seq.prompt_keys[len(seq.hit.blocks) - 1] for seq in near if seq.hit.blocks)
        running = [SeqView(seq, seq.adapter, seq.prefill_len, seq.num_computed, len(self.blocks.table(seq)),
                           self.blocks.num_freeable(seq), tenant=seq.tenant, priority=seq.priority,
                           computing=self._computing(seq, seq.num_computed) if seq.num_computed < seq.prefill_len
                           else ())
                   for seq in self._running]
        return waiting, running

    def _computing(self, seq: Sequence, start: int) -> tuple[bytes, ...]:
        """The prefix-cache keys a prefill from ``start`` will make hits of (for a request waiting on
        one to come): its prompt's full blocks' keys, or a recurrent model's keys of the states it caches."""
        keys, bs = seq.prompt_keys or (), self.blocks.block_size
        if self.states is None:
            return tuple(keys[start // bs :])
        return tuple(keys[at // bs - 1] for at in seq.cache_states_at if at > start)

    def _parting(self, near: set[Sequence]) -> dict[Sequence, tuple[int, ...]]:
        """A recurrent model: for each request of ``near`` and each running one still in its
        prefill, the blocks after which another of them parts from its prompt (``parting_blocks``,
        over the blocks before each prompt's last token). A running prefill not yet there caches
        its state there too, so that a request that came after it resumes at their common prefix."""
        bs = self.blocks.block_size
        group = [*near, *(s for s in self._running if s.num_computed < s.prefill_len and s.prompt_keys is not None)]
        parting = dict(zip(group, parting_blocks([s.prompt_keys[: (s.prefill_len - 1) // bs] for s in group]),
                           strict=True))
        for seq in group[len(near):]:
            ahead = {b * bs for b in parting[seq] if b * bs > seq.num_computed} - set(seq.cache_states_at)
            if ahead:
                seq.cache_states_at = tuple(sorted({*seq.cache_states_at, *ahead}))
        return parting

    def _state_hit(self, seq: Sequence, parting: tuple[int, ...]) -> None:
        """A recurrent model resumes a prefix only from a cached state: the hit shrinks to the longest
        matched prefix whose state is cached, ending before the prompt's last token. Its prefill
        then caches its state at the end of a full block (before the prompt's last token):
        - where the matched blocks end: another request shares the prompt that far, the next one
          resumes there;
        - where another request near it in the queue or in its prefill parts from its prompt
          (``parting``: prompts that come together, with a common prefix no state holds yet; that
          request waits for this one's state, as a K/V model's waits for its blocks);
        - at its prompt's last full block: a later turn of a conversation, or the same prompt again;
        - where the request says other prompts part from it (``shared_prefix_ends``: a chat's
          instructions, which later requests share without coming together with it);
        - every --cached-state-interval tokens: a later prompt that parts from it where nothing
          marks resumes at most that far back."""
        keys, bs = seq.prompt_keys, self.blocks.block_size
        last = (seq.prefill_len - 1) // bs  # blocks before the prompt's last token
        matched = min(len(seq.hit.blocks), last)
        usable = next((b for b in range(matched, 0, -1) if keys[b - 1] in self.state_cache), 0)
        if usable < len(seq.hit.blocks):
            seq.hit = self.blocks.lookup(keys[:usable])
        ends = (at // bs for at in seq.request.shared_prefix_ends if at // bs <= last)
        every = self.config.cached_state_interval // bs
        periodic = range(every, last + 1, every) if every else ()
        seq.cache_states_at = tuple(b * bs for b in sorted({matched, last, *parting, *ends, *periodic}) if b > usable)

    def _admit(self, seq: Sequence) -> None:
        self.admission.pin(seq)
        self.blocks.admit(seq, seq.hit, seq.prompt_keys or ())
        cached = seq.hit.cached_tokens(seq.prefill_len, self.blocks.block_size)
        if self.states is not None:  # the cached state its hit ends at, else zeroed: it starts from its first token
            key = seq.prompt_keys[len(seq.hit.blocks) - 1] if seq.hit.blocks else None
            seq.state_slot = self.states.take(None if key is None else self.state_cache.get(key))
        seq.num_computed = cached
        if self.blocks.prefix_caching:
            self.prefix_queried_tokens += seq.prefill_len
            self.prefix_hit_tokens += cached
        if seq.admitted_at is None:  # the first admission; a preempted request keeps its first numbers
            seq.admitted_at = time.monotonic()
            seq.num_cached = min(cached, seq.num_prompt)
        self._waiting.remove(seq)
        self._running.append(seq)

    def _release(self, seq: Sequence) -> None:
        """Give the sequence's blocks back; it is recomputed later from all its tokens so far (its
        full blocks stay cached, evicted after all others, so the recompute usually hits them)."""
        self.blocks.free(seq, resume=True)
        self._free_state(seq)
        self.admission.release(seq)
        self._running.remove(seq)
        seq.num_computed = 0
        seq.prefill_len = len(seq.ids)
        seq.prompt_keys = None
        seq.cache_states_at = ()

    def _state_saves(self, seq: Sequence, n: int) -> tuple[tuple[int, int], ...]:
        """Where a prefill chunk of ``n`` tokens copies its sequence's state into the state cache:
        (tokens into the chunk, cached slot) at each of its ``cache_states_at`` inside the chunk, the
        slot taken now under the key of the block that ends there (the prefix-cache key: tokens and
        weights so far). The op writes it during the step (ops/recurrent.py), and a faulty step ends
        the engine, so no key outlives a state that was never written."""
        start, bs, saves = seq.num_computed, self.blocks.block_size, []
        for at in seq.cache_states_at:
            if start < at <= start + n:  # cache_states_at is set with prompt_keys (_state_hit)
                slot = self.state_cache.put(seq.prompt_keys[at // bs - 1])
                if slot is not None:
                    saves.append((at - start, slot))
        return tuple(saves)

    def _save_decode_states(self, filled: list[tuple[Sequence, int]]) -> None:
        """Decoding sequences whose tokens just filled a block, each with the slot that holds its
        state where that block ends (its own, or a drafting row's state saved on the way), copy it
        into the state cache under that block's key, in place of the one it cached at its last
        block, where the prompts' states leave room (StateCache.put_answer): the next turn of a
        conversation, which repeats the answer, resumes at the answer's last full block (its K/V
        blocks are cached as they fill) rather than at the prompt's."""
        source_of = {}
        for seq, source in filled:
            if (key := self.blocks.last_key(seq)) is None:
                continue
            slot = self.state_cache.put_answer(key, replacing=seq.decode_state_key)
            seq.decode_state_key = key
            if slot is not None:  # a cache smaller than this step's saves gives a slot twice: the last one holds it
                source_of[slot] = source
        if source_of:
            self.states.copy(list(source_of.values()), list(source_of))

    def _drafted_states(self, drafts: dict[Sequence, list[int]]) -> dict[Sequence, list[int]]:
        """A recurrent model's drafting rows: for each, a free state slot per draft (``_drafts``
        counts them), where its step saves its state after each position but the last (the row
        runs as a chunk, from its state; ``_settle_states`` keeps the one after its last kept
        token)."""
        return {seq: [self.states.take(zeroed=False) for _ in draft] for seq, draft in drafts.items()}

    def _settle_states(self, scratch: dict[Sequence, list[int]], starts: dict[Sequence, int]) -> None:
        """After verifying, each unfinished drafting row's state is the one after the tokens it
        kept (its last token and the drafts before the first rejected one): the slot saved there,
        unless it kept every draft. Then the answer's state where its kept tokens filled a block,
        and the saved slots go back."""
        bs, kept, rows, filled = self.blocks.block_size, [], [], []
        for seq, slots in scratch.items():
            if not seq.done:
                fed = seq.num_computed - starts[seq]
                if fed <= len(slots):
                    kept.append(slots[fed - 1])
                    rows.append(seq.state_slot)
                end = seq.num_computed // bs * bs  # the last block its kept tokens filled, if in this step
                if self.state_cache is not None and end > starts[seq]:
                    filled.append((seq, seq.state_slot if end == seq.num_computed else slots[end - starts[seq] - 1]))
        if kept:  # every row's at once, before an answer's state is read from its row
            self.states.copy(kept, rows)
        if filled:
            self._save_decode_states(filled)
        for slots in scratch.values():
            for slot in slots:
                self.states.free(slot)

    def _free_state(self, seq: Sequence) -> None:
        if seq.state_slot is not None:
            self.states.free(seq.state_slot)
            seq.state_slot = None

    def _outgrow_rope(self) -> None:
        """Decoding sequences of a model with RECOMPUTE_AT_ROPE_SPLIT that have outgrown its
        rope_split go back to be recomputed whole by RoPE's long frequencies, first in the queue."""
        split = self.outgrow_rope_at
        grown = [s for s in self._running if not s.long_rope and s.num_computed >= s.prefill_len and len(s.ids) > split]
        for seq in grown:
            self._release(seq)
            seq.long_rope = True
            seq.identity = self._identity(seq.adapter_entry, seq.request.cache_salt, long_rope=True)
            log.info("request %s outgrew RoPE's short context (%d positions): recomputed from %d tokens by the long "
                     "frequencies", seq.request.request_id, split, seq.prefill_len)
        self._enqueue(grown, ahead=True)

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        log.info("request %s preempted, for KV memory, another adapter's fair share or a request of higher "
                 "priority (it will be recomputed from %d tokens)", seq.request.request_id, seq.prefill_len)

    def _step(self, ready: set, fairness: Fairness | None) -> bool:
        """One step; its events are held until the observers have recorded it (StepStats), so
        whoever holds a step's tokens can already see that step."""
        self._held = []
        try:
            return self._run_step(ready, fairness)
        finally:
            held, self._held = self._held, None
            self._send_all(held)

    def _run_step(self, ready: set, fairness: Fairness | None) -> bool:
        """schedule -> admit -> runner.step -> sample -> process outputs."""
        if self.outgrow_rope_at is not None:
            self._outgrow_rope()
        waiting, running = self._views(fairness)
        budgets = self.budgets
        if self.step_budget is not None:
            decodes = sum(not s.in_prefill for s in running)
            budgets = replace(budgets, max_tokens_per_step=self.step_budget.tokens(decodes))
        decision = schedule(waiting, running, budgets, self.blocks.num_free, self.blocks.block_size, ready,
                            self.watermark_blocks, fairness, self.by_priority)
        for seq in decision.preempted:
            self._preempt(seq)
        self._enqueue(decision.preempted, ahead=True)
        for seq in decision.admitted:  # final: ready adapters pin, and the scheduler counted the blocks
            self._admit(seq)
        self.admission.stage(adapter_order(self._waiting, fairness), ready)  # _finish removes finished ones
        work = list(decision.work)
        if not work:
            return False
        self.step_token_budget = budgets.max_tokens_per_step
        for seq, n in work:
            self.blocks.allocate(seq, seq.num_computed + n)
        cutoff = self.config.speculative_disable_by_batch_size
        drafts = self._drafts(work, budgets.max_tokens_per_step) if self.config.num_speculative_tokens and \
            (cutoff is None or len(self._running) < cutoff) else {}
        scratch = self._drafted_states(drafts) if self.states is not None and drafts else {}
        starts = {seq: seq.num_computed for seq in scratch}
        items, decoding = [], []
        for seq, n in work:
            start, draft = seq.num_computed, drafts.get(seq, ())
            decoding.append(start >= seq.prefill_len)
            # a decoding row with drafts feeds its last token and the drafts, with logits at every
            # position (extra rows for all but the last); a recurrent model's as a chunk, which
            # runs its tokens through its state in order and saves it after each but the last
            items.append(WorkItem(
                token_ids=seq.ids[start : start + n] + list(draft), start_pos=start,
                slots=self.blocks.slot_mapping(seq, start, n + len(draft)), blocks=self.blocks.table(seq),
                pages=seq.pages, adapter=seq.adapter, decode=decoding[-1] and seq not in scratch,
                needs_logits=decoding[-1] or start + n == seq.prefill_len, kinds=seq.kinds,
                magnitude_page=seq.magnitude_page, saved_embedding=seq.saved_embedding, saved_head=seq.saved_head,
                prompt_rows=(0, len(draft)) if draft else (0, 0) if decoding[-1] else prompt_rows(seq, start, n),
                long_rope=seq.long_rope, state_slot=seq.state_slot,
                state_saves=tuple(enumerate(scratch[seq], 1)) if seq in scratch else
                self._state_saves(seq, n) if seq.cache_states_at and not decoding[-1] else (),
            ))
        constrained = [seq for (seq, _), it in zip(work, items, strict=True)
                       if it.needs_logits and seq.grammar is not None and seq.grammar.constrains] \
            if self.overlap_masks else []
        # computed during the forward pass, one call per vocabulary
        pending = [grammars.start([s.grammar for s in constrained if s.vocab.grammars is grammars])
                   for grammars in dict.fromkeys(s.vocab.grammars for s in constrained)]
        t0 = time.perf_counter()
        logits, order, extra = self.runner.step(items)
        # with drafts: each sampled row's logits row in its first round (a drafting row's first position)
        rows = list(range(len(order))) if drafts else None
        chains: dict[Sequence, list[int]] = {}  # a drafting row's logits rows after its first round
        prompt_extra, at = [], len(order)
        sampled_at = {i: r for r, i in enumerate(order)} if drafts else {}
        for i, count in extra:
            seq = work[i][0]
            if seq in drafts:  # its rows: the extra ones (the last token, drafts but the last), then its own
                rows[sampled_at[i]] = at
                chains[seq] = [*range(at + 1, at + count), sampled_at[i]]
            else:
                prompt_extra.append((seq, at, count))
            at += count
        if prompt_extra:  # before sampling, which may work on the logits in place
            add_prompt_logprobs(logits, prompt_extra)
        for (seq, n), it in zip(work, items, strict=True):
            drafted = len(it.token_ids) - n
            per_token = DECODE_WEIGHT if seq.num_computed >= seq.prefill_len else PREFILL_WEIGHT
            self.service[seq.tenant] = self.service.get(seq.tenant, 0.0) + per_token * (n + drafted) / seq.weight
            seq.num_computed += n  # a drafting row's drafts count once they are kept
            self.blocks.commit(seq, seq.identity, seq.ids, seq.num_computed)
        if self.state_cache is not None:  # a drafting row's once its drafts are settled
            bs = self.blocks.block_size
            self._save_decode_states([(seq, seq.state_slot) for (seq, _), d in zip(work, decoding, strict=True)
                                      if d and seq not in scratch and seq.num_computed % bs == 0])
        sampled = [work[i][0] for i in order]
        computed = {key: mask for future in pending for key, mask in future.result().items()} if pending else None
        self._sample(sampled, logits[: len(order)] if not chains else logits.index_select(0, host_data(rows, logits.device)),
                     computed)
        if chains:
            self._verify(drafts, chains, logits)
        if scratch:
            self._settle_states(scratch, starts)
        seconds, decode_tokens = time.perf_counter() - t0, sum(decoding)
        prefill_tokens, draft_tokens = sum(n for _, n in work) - decode_tokens, sum(map(len, drafts.values()))
        if self.step_budget is not None:
            self.step_budget.observe(decode_tokens + draft_tokens, prefill_tokens, seconds)
        if self.observers:
            stats = StepStats(
                num_seqs=len(items), num_prefill_tokens=prefill_tokens, num_decode_tokens=decode_tokens,
                num_adapters=len({it.adapter for it in items} - {None}), seconds=seconds,
                num_draft_tokens=draft_tokens,
            )
            for obs in self.observers:
                obs.step(stats)
        return True

    def _drafts(self, work: list[tuple[Sequence, int]], step_tokens: int) -> dict[Sequence, list[int]]:
        """Prompt-lookup drafts (speculative.py) of this step's decoding rows, within what the
        step's token budget leaves and the KV blocks free above the watermark, each no longer
        than its request can still use (the row samples one token whatever happens). Their
        blocks are allocated here; a rejected draft's are given back after the step. A recurrent
        model's drafts also need a free state slot each (``_drafted_states``)."""
        k, bs = self.config.num_speculative_tokens, self.blocks.block_size
        budget = step_tokens - sum(n for _, n in work)
        slots = self.states.num_free if self.states is not None else math.inf
        out: dict[Sequence, list[int]] = {}
        for seq, _ in work:
            want = min(k, budget, slots, seq.sampler.params.max_new_tokens - seq.num_generated - 1)
            if want <= 0 or seq.num_computed < seq.prefill_len:
                continue
            draft = self.drafter.propose(seq, want)
            end = seq.num_computed + 1 + len(draft)
            if blocks_for(end, bs) - len(self.blocks.table(seq)) > self.blocks.num_free - self.watermark_blocks:
                draft = draft[: len(self.blocks.table(seq)) * bs - seq.num_computed - 1]  # what its blocks hold
                end = seq.num_computed + 1 + len(draft)
            if draft:
                self.blocks.allocate(seq, end)
                budget -= len(draft)
                slots -= len(draft)
                out[seq] = draft
                seq.predicted_tokens_drafted += len(draft) * seq.predicted_draft
        self.draft_tokens += sum(map(len, out.values()))
        return out

    def _verify(self, drafts: dict[Sequence, list[int]], chains: dict[Sequence, list[int]],
                logits: torch.Tensor) -> None:
        """Sample the drafting rows' next positions, in rounds: a row takes part in round r while
        its previous token equals draft r - 1 and it has not finished. Then each keeps the KV of
        the drafts it kept, and gives back the blocks of the rest."""
        live = list(chains)
        for r in range(max(map(len, chains.values()))):
            live = [s for s in live if not s.done and r < len(drafts[s]) and s.ids[-1] == drafts[s][r]]
            if not live:
                break
            self.accepted_tokens += len(live)
            for seq in live:  # counted before the sampling that may finish it
                seq.accepted_prediction_tokens += seq.predicted_draft
            self._sample(live, logits[[chains[s][r] for s in live]], None, drafted=True)
            for seq in live:  # draft r's position is computed, and kept
                seq.num_computed += 1
        for seq in chains:
            if not seq.done:
                self.blocks.commit(seq, seq.identity, seq.ids, seq.num_computed)
                self.blocks.trim(seq, seq.num_computed)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, computed_masks, drafted: bool = False) -> None:
        """Sample one token for each row (``logits`` [len(seqs), V], theirs in order), then detokenize,
        check stops, and send or finish each request. ``drafted``: the rows' kept drafts (_verify)."""
        seen = [s.ids if s.sampler.params.repetition_penalty != 1.0 else None for s in seqs]
        generated = [s.ids[s.num_prompt :] if s.sampler.params.presence_penalty or s.sampler.params.frequency_penalty
                     else None for s in seqs]
        banned = [self._banned(s) for s in seqs]
        masks, failed = None, {}
        for grammars in dict.fromkeys(s.vocab.grammars for s in seqs if s.grammar is not None):  # per vocabulary
            theirs, banned, gone = grammars.masks([s.grammar if s.vocab.grammars is grammars else None for s in seqs],
                                                  banned, computed_masks)
            masks = theirs if masks is None else [m if m is not None else t for m, t in zip(masks, theirs, strict=True)]
            failed.update(gone)
        if any(s.sampler.params.allowed_token_ids for s in seqs):  # never with a grammar (validate)
            masks = masks or [None] * len(seqs)
            for i, s in enumerate(seqs):
                if s.sampler.params.allowed_token_ids:
                    try:  # one row's fault fails that row alone, never the step
                        masks[i], banned[i] = allowed_mask(s.sampler, banned[i], s.vocab.size), None
                    except Exception as error:  # noqa: BLE001
                        failed[i] = error
        widths = [s.vocab.size for s in seqs]
        tokens = sample(logits, [s.sampler for s in seqs], seen, generated, banned, masks,
                        None if all(w == logits.shape[1] for w in widths) else widths)
        for i, error in failed.items():
            tokens[i] = error
        logprobs = token_logprobs(logits, seqs, tokens)
        # Everything after the shared forward pass is one request's own: its failure (sampling,
        # detokenizing, stop checks, delivery) fails that request alone, never the engine.
        for seq, outcome in self.output.process(seqs, tokens, logprobs, drafted):
            if isinstance(outcome, TokenEvent):
                self._emit(seq, outcome)
            elif isinstance(outcome, Finished):
                self._finish(seq, last=outcome)
            else:
                self._finish(seq, error=outcome)

    def _timing(self, seq: Sequence) -> Timing:
        now = time.monotonic()
        admitted = seq.admitted_at or now
        return Timing(
            queue_seconds=admitted - seq.arrival,
            adapter_load_seconds=seq.adapter_load_seconds,
            time_to_first_token_seconds=(seq.first_token_at - seq.arrival) if seq.first_token_at else 0.0,
            total_seconds=now - seq.arrival,
        )

    def _finish(self, seq: Sequence, last: Finished | None = None, error: BaseException | None = None) -> None:
        """The one exit path: record the finish with the observers, release KV and pin, leave the
        queues, then send the final event or the error. The order keeps a concurrent scrape
        consistent: once a request no longer counts as running, its finish is counted and its
        blocks are free; and whoever sees the answer can already see its log line."""
        if seq.done:
            return
        seq.done = True
        status = "OK" if error is None else status_name(error)
        timing = self._timing(seq)
        try:
            for obs in self.observers:
                try:  # an observer's fault (metrics, logs) never reaches the request or the engine
                    obs.finish(seq, status, error, timing)
                except Exception:  # noqa: BLE001
                    log.exception("observer %s failed on request %s", type(obs).__name__, seq.request.request_id)
            self.blocks.free(seq)
            self._free_state(seq)
            self.admission.release(seq)
        finally:  # whatever happened above, the caller gets its answer and the place is returned
            if seq in self._running:
                self._running.remove(seq)
            elif seq in self._waiting:
                self._waiting.remove(seq)
            with self._admission_lock:
                self._accepted -= 1
            if error is not None:
                self._emit(seq, error)
            else:
                self._emit(seq, TokenEvent(
                    seq.request.request_id, last.token, last.delta, last.reason, seq.num_prompt, seq.num_generated,
                    timing, last.logprob, seq.num_cached, last.prompt_logprobs, seq.accepted_prediction_tokens,
                    seq.predicted_tokens_drafted - seq.accepted_prediction_tokens, last.stop_reason,
                ))

    def _emit(self, seq: Sequence, item) -> None:
        if self._held is not None:  # in a step: sent after it is recorded
            self._held.append((seq, item))
        else:
            self._send(seq, item)

    @staticmethod
    def _send(seq: Sequence, item) -> None:
        Engine._send_all([(seq, item)])

    @staticmethod
    def _send_all(events: list[tuple[Sequence, object]]) -> None:
        """Hand events to their callers' loops, in order: one wake-up of each loop for all of its
        events (a wake-up writes to the loop's self-pipe, a system call: once per event it was a
        few percent of a decode step at batch 32, more as batches grow)."""
        now, by_loop = time.monotonic(), {}
        for seq, item in events:
            seq.undelivered.append(now)
            by_loop.setdefault(seq.loop, []).append((seq.queue, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def prompt_rows(seq: Sequence, start: int, n: int) -> tuple[int, int]:
    """[a, b) of the chunk ``seq.ids[start : start + n]`` whose logits give prompt logprobs not yet
    taken: position p's logits score prompt token p + 1, so the prompt's last position (which
    samples the first new token) is not one of them."""
    if seq.sampler.params.prompt_logprobs is None:
        return 0, 0
    lo, hi = max(start, len(seq.prompt_logprobs)), min(start + n, seq.num_prompt - 1)
    return (lo - start, hi - start) if hi > lo else (0, 0)


def add_prompt_logprobs(logits: torch.Tensor, rows: list[tuple[Sequence, int, int]]) -> None:
    """Append to each sequence's ``prompt_logprobs`` the next ``count`` positions' raw logprobs of
    the prompt tokens that follow them (and the top alternatives asked for), from ``logits``
    rows [first, first + count), for each (sequence, first, count) of ``rows``."""
    targets, ks, index = [], [], []
    for seq, first, count in rows:
        done = len(seq.prompt_logprobs)
        targets += seq.ids[done + 1 : done + 1 + count]
        ks += [seq.sampler.params.prompt_logprobs] * count
        index += range(first, first + count)
    picked = logits[index[0] : index[-1] + 1] if index == list(range(index[0], index[-1] + 1)) \
        else logits.index_select(0, host_data(index, logits.device))
    scored, at = ranked_logprobs(torch.log_softmax(picked, dim=-1), targets, ks), 0
    for seq, _, count in rows:
        seq.prompt_logprobs += scored[at : at + count]
        at += count


def token_logprobs(logits: torch.Tensor, seqs: list[Sequence], tokens: list) -> list[TokenLogprob | None]:
    """Raw logprobs of the sampled tokens, for the rows whose request asked (no work for the
    others): log_softmax of the model's logits [N, V], before any sampling transform."""
    want = [i for i, s in enumerate(seqs) if s.sampler.params.logprobs is not None and isinstance(tokens[i], int)]
    out: list[TokenLogprob | None] = [None] * len(seqs)
    if want:
        scored = ranked_logprobs(torch.log_softmax(logits[want], dim=-1), [tokens[i] for i in want],
                                 [seqs[i].sampler.params.logprobs for i in want])
        for i, lp in zip(want, scored, strict=True):
            out[i] = lp
    return out


def ranked_logprobs(logp: torch.Tensor, targets: list[int], ks: list[int]) -> list[TokenLogprob]:
    """logp [R, V] (log-softmax rows) -> for each row, its target's logprob, its rank (1 + the
    tokens more likely than it, as vLLM's) and its ks[r] most likely tokens, most likely first: one
    gather, one comparison and one top-k for all rows."""
    chosen = logp.gather(1, host_data(targets, logp.device)[:, None])
    ranks = (logp > chosen).sum(-1).add_(1).tolist()
    k = max(ks)
    top_lp, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    return [TokenLogprob(t, c, tuple(zip(ids[:n], lps[:n], strict=True)), r)
            for t, c, r, ids, lps, n in zip(targets, chosen[:, 0].tolist(), ranks, top_ids.tolist(), top_lp.tolist(), ks,
                                            strict=True)]


class InjectedFatalFault(BaseException):
    """Escapes the per-request guard on purpose: it stands for a fault of the engine itself."""


BUSY_LOOP_S = 60.0


def fault_injector(spec: str):
    """``request:<id>`` fails that request's token handling; ``fatal:<id>`` kills the engine loop
    when that request produces a token; ``fatal-busy:<id>`` does too, once the request's event
    loop is blocked for BUSY_LOOP_S. For reliability tests only (``--inject-fault``)."""
    kind, _, request_id = spec.partition(":")

    def hook(seq: Sequence) -> None:
        if seq.request.request_id == request_id:
            if kind == "fatal-busy":
                blocked = threading.Event()
                seq.loop.call_soon_threadsafe(lambda: (blocked.set(), time.sleep(BUSY_LOOP_S)))
                blocked.wait(10)
            if kind.startswith("fatal"):
                raise InjectedFatalFault(f"injected fatal fault at request {request_id}")
            raise RuntimeError(f"injected fault in request {request_id}")

    return hook


def adapter_fault_injector(spec: str, closing: threading.Event):
    """``hang-read:<adapter id>`` makes that adapter's disk reads hang until the server closes (a
    disk that does not answer); ``copy-fail:<adapter id>`` fails its first device copy. For
    reliability tests only (``--inject-fault``)."""
    kind, _, adapter_id = spec.partition(":")
    failed = []

    def hook(stage: str, key_id: str) -> None:
        if key_id != adapter_id:
            return
        if kind == "hang-read" and stage == "read":
            closing.wait()
        if kind == "copy-fail" and stage == "copy" and not failed:
            failed.append(key_id)
            raise RuntimeError(f"injected device copy failure for adapter {adapter_id}")

    return hook
