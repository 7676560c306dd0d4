"""The step loop: schedule -> runner.step -> sample -> deliver token events.

The loop runs on its own thread (torch releases the GIL inside ops); callers on an asyncio loop
get each token through a per-request queue. Every exit path of a sequence goes through
``_finish``, which frees its KV slot and unpins its adapter, so nothing leaks on cancel or error.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..adapters.device_pool import AdapterKey
from ..adapters.manager import AdapterManager, Readiness
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
from .requests import (
    MAX_LOGPROBS,
    FinishReason,
    GenerationRequest,
    Timing,
    TokenEvent,
    TokenLogprob,
    validate_request_id,
)
from .runner import ModelRunner, WorkItem
from .sampling import SamplerState, sample
from .scheduler import Budgets, SeqView, schedule

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.5
LOADING_POLL_S = 0.002


@dataclass(frozen=True)
class StepStats:
    num_seqs: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_adapters: int  # distinct adapters in the step
    seconds: float


class EngineObserver:
    """Receives engine events on the engine thread; metrics and logs subclass it. Keep it cheap."""

    def step(self, stats: StepStats) -> None:
        pass

    def token(self, seq: Sequence, gap_seconds: float | None) -> None:
        """A token was sampled; ``gap_seconds`` since the sequence's previous token (None: first)."""

    def finish(self, seq: Sequence, status: str, error: BaseException | None, timing: Timing) -> None:
        """The sequence left, with a gRPC-style status name ("OK", "CANCELLED", ...) and the same
        timing its response carries."""


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    adapter: AdapterKey | None
    sampler: SamplerState
    detok: IncrementalDetokenizer
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    ids: list[int]
    num_prompt: int
    arrival: float
    num_computed: int = 0
    slot: int | None = None
    pages: torch.Tensor | None = None
    kinds: frozenset[str] = frozenset()  # module kinds the adapter targets
    pinned: bool = False
    text: str = ""  # all generated text so far (stop strings cut it)
    emitted: int = 0  # chars of ``text`` already sent
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    adapter_load_seconds: float = 0.0
    cold_adapter: bool = False  # the adapter was not device-resident when the request arrived
    # time.monotonic() of each event sent and not yet taken by the consumer, oldest first: the engine
    # thread appends, the consumer's loop pops (deque ends are thread-safe)
    undelivered: deque = field(default_factory=deque)
    done: bool = False
    cancel_reason: BaseException | None = field(default=None)

    @property
    def num_generated(self) -> int:
        return len(self.ids) - self.num_prompt

    def view(self) -> SeqView:
        return SeqView(self, self.adapter, self.num_prompt, self.num_computed)


class RequestStream:
    """Async iterator of a request's TokenEvents. Closing it early cancels the request."""

    def __init__(self, engine: Engine, seq: Sequence):
        self._engine = engine
        self._seq = seq
        self.request_id = seq.request.request_id
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


class Engine:
    def __init__(self, config: ServerConfig, runner: ModelRunner, tokenizer, adapters: AdapterManager,
                 vocab_size: int, eos_token_ids: set[int]):
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.budgets = Budgets(config.max_batch_size, config.max_tokens_per_step, config.adapters_per_step)
        self._inbox: deque = deque()  # ("add", seq) | ("cancel", seq, reason); thread-safe appends
        # Taken by submit around its append and by the fatal path when it closes the inbox, so that a
        # request racing a fatal fault is either failed by that path or refused, never left waiting.
        self._inbox_lock = threading.Lock()
        self._closed = False
        self._wake = threading.Event()
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
        self.fault_hook = None  # tests only: callable(seq) run before each token is handled
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
        """(running, waiting); a snapshot for gauges and tests."""
        return len(self._running), len(self._waiting)

    def adapter_ids(self) -> tuple[set[str], set[str]]:
        """(adapters of running requests, adapters of waiting requests); a snapshot."""
        def ids(seqs):
            return {s.request.adapter_id for s in list(seqs) if s.request.adapter_id}
        return ids(self._running), ids(self._waiting)

    def validate(self, req: GenerationRequest) -> None:
        c, p = self.config, req.sampling
        validate_request_id(req.request_id)
        n = len(req.prompt_token_ids)
        if n == 0:
            raise RequestInvalid("the prompt is empty")
        if n > c.input_token_limit:  # before any pass over the ids
            raise RequestInvalid(f"the prompt has {n} tokens; max_input_tokens is {c.input_token_limit}")
        bad = [t for t in req.prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestInvalid(f"prompt_token_ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if not 0 < p.max_new_tokens <= c.max_new_tokens_limit:
            raise RequestInvalid(f"max_new_tokens must be in [1, {c.max_new_tokens_limit}], got {p.max_new_tokens}")
        if n + p.max_new_tokens > c.total_token_limit:
            limit = "max_total_tokens" if c.max_total_tokens else "max_model_len"
            raise RequestInvalid(
                f"prompt ({n} tokens) + max_new_tokens ({p.max_new_tokens}) exceeds {limit} {c.total_token_limit}"
            )
        if not (0.0 <= p.temperature <= 100.0):  # also false for NaN
            raise RequestInvalid(f"temperature must be in [0, 100], got {p.temperature}")
        if not (0.0 < p.top_p <= 1.0):
            raise RequestInvalid(f"top_p must be in (0, 1], got {p.top_p}")
        if p.top_k < 0:
            raise RequestInvalid(f"top_k must be >= 0, got {p.top_k}")
        if not (p.repetition_penalty > 0.0 and p.repetition_penalty < float("inf")):
            raise RequestInvalid(f"repetition_penalty must be > 0 and finite, got {p.repetition_penalty}")
        if len(p.stop) > c.max_stop_sequences:
            raise RequestInvalid(f"{len(p.stop)} stop strings; the limit is {c.max_stop_sequences}")
        for s in p.stop:
            if not 0 < len(s) <= c.max_stop_length:
                raise RequestInvalid(f"stop strings must be 1 to {c.max_stop_length} characters, got {len(s)}")
        if p.logprobs is not None and not 0 <= p.logprobs <= MAX_LOGPROBS:
            raise RequestInvalid(f"logprobs must be in [0, {MAX_LOGPROBS}], got {p.logprobs}")
        if len(p.stop_token_ids) > c.max_stop_token_ids:
            raise RequestInvalid(f"{len(p.stop_token_ids)} stop_token_ids; the limit is {c.max_stop_token_ids} "
                                 "(--max-stop-token-ids)")

    def submit(self, req: GenerationRequest) -> RequestStream:
        """Validate and enqueue; call from a running asyncio loop. Raises the domain errors."""
        if not self._accepting or self.fatal_error is not None:
            raise EngineUnavailable("the server is draining or stopped and accepts no new requests")
        self.validate(req)
        with self._admission_lock:  # atomic reservation: never more than the bound accepted
            if self._accepted >= self.config.max_queued_requests:
                raise QueueFull(f"the queue is full: {self.config.max_queued_requests} requests in flight")
            self._accepted += 1
        try:  # resolving counts the request as served: only once it holds a place
            adapter = self.adapters.resolve(req.adapter_id) if req.adapter_id else None
        except BaseException:
            with self._admission_lock:
                self._accepted -= 1
            raise
        cold = adapter is not None and self.adapters.tier(adapter) != "device"
        loop = asyncio.get_running_loop()
        seq = Sequence(
            request=req, adapter=adapter, sampler=SamplerState.create(req.sampling, "cpu"),
            detok=IncrementalDetokenizer(self.tokenizer, list(req.prompt_token_ids)), queue=asyncio.Queue(),
            loop=loop, ids=list(req.prompt_token_ids), num_prompt=len(req.prompt_token_ids), arrival=time.monotonic(),
            cold_adapter=cold,
        )
        with self._inbox_lock:
            if self._closed:
                with self._admission_lock:
                    self._accepted -= 1
                raise EngineUnavailable("the engine has stopped and accepts no new requests")
            with self._admission_lock:
                self._undelivered += 1
            self._inbox.append(("add", seq))
        self._wake.set()
        return RequestStream(self, seq)

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
        ready, loading = self._poll_adapters()
        return self._step(ready), loading

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while not self._stop:
                stepped, loading = self.run_once()
                if not stepped:
                    self._wake.wait(LOADING_POLL_S if loading else IDLE_WAIT_S)
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
                queued = [item[1] for item in self._inbox if item[0] == "add"]
                self._inbox.clear()
            for seq in [*self._running, *self._waiting, *queued]:
                try:  # one failure here must not leave the others without an answer
                    self._finish(seq, error=RequestFailed(f"engine failure: {e}"))
                except Exception:  # noqa: BLE001
                    log.exception("failing request %s after the fatal error", seq.request.request_id)

    def _drain_inbox(self) -> None:
        while self._inbox:
            item = self._inbox.popleft()
            if item[0] == "add":
                self._waiting.append(item[1])
            elif not item[1].done:
                self._finish(item[1], error=item[2])

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

    def _poll_adapters(self) -> tuple[set, bool]:
        """Readiness of the waiting requests' adapters. Only the first few distinct adapters in
        queue order are prefetched, so a long queue of cold adapters cannot thrash the host cache."""
        ready, loading = set(), False
        self.adapters.expire_reads()
        keys = list(dict.fromkeys(s.adapter for s in self._waiting if s.adapter is not None))
        prefetch_depth = max(1, self.adapters.host.capacity // 2)
        for i, key in enumerate(keys):
            state = self.adapters.readiness(key, prefetch=i < prefetch_depth)
            if state is Readiness.READY:
                ready.add(key)
            elif state is Readiness.LOADING:
                loading = True
            else:
                error = self.adapters.failure(key)
                self.adapters.forget_failure(key)
                for seq in [s for s in self._waiting if s.adapter == key]:
                    self._finish(seq, error=error)
        return ready, loading

    def _admit(self, seq: Sequence) -> bool:
        if seq.adapter is not None:
            seq.pages = self.adapters.acquire(seq.adapter)
            if seq.pages is None:
                return False  # every page pinned (or a copy in flight): wait for the next step
            if seq.cold_adapter:  # how long this request waited for its adapter to load
                seq.adapter_load_seconds = max(0.0, self.adapters.resident_since(seq.adapter) - seq.arrival)
            seq.kinds = self.adapters.pool.kinds_of(seq.adapter)
            seq.pinned = True
        seq.slot = self.runner.kv.allocate()
        seq.admitted_at = time.monotonic()
        self._waiting.remove(seq)
        self._running.append(seq)
        return True

    def _step(self, ready: set) -> bool:
        decision = schedule(
            [s.view() for s in self._waiting], [s.view() for s in self._running],
            self.budgets, self.runner.kv.num_free_slots, ready,
        )
        blocked = {seq for seq in decision.admitted if not self._admit(seq)}
        work = [(seq, n) for seq, n in decision.work if seq not in blocked]
        if not work:
            return False
        items = []
        for seq, n in work:
            decode = seq.num_computed >= seq.num_prompt
            start = seq.num_computed
            items.append(WorkItem(
                slot=seq.slot, token_ids=seq.ids[start : start + n], start_pos=start, pages=seq.pages,
                adapter=seq.adapter, decode=decode, needs_logits=decode or start + n == seq.num_prompt,
                kinds=seq.kinds,
            ))
        t0 = time.perf_counter()
        logits, order = self.runner.step(items)
        for seq, n in work:
            seq.num_computed += n
            self.runner.kv.set_length(seq.slot, seq.num_computed)
        sampled = [work[i][0] for i in order]
        seen = [s.ids if s.sampler.params.repetition_penalty != 1.0 else None for s in sampled]
        tokens = sample(logits, [s.sampler for s in sampled], seen)
        logprobs = token_logprobs(logits, sampled, tokens)
        # Everything after the shared forward pass is one request's own: its failure (sampling,
        # detokenizing, stop checks, delivery) fails that request alone, never the engine.
        for seq, token, logprob in zip(sampled, tokens, logprobs, strict=True):
            try:
                if isinstance(token, Exception):
                    raise token
                if self.fault_hook is not None:
                    self.fault_hook(seq)
                self._on_token(seq, token, logprob)
            except Exception as e:  # noqa: BLE001
                log.exception("request %s failed", seq.request.request_id)
                self._finish(seq, error=RequestFailed(
                    f"internal error in request {clip(seq.request.request_id)}: {clip(str(e), 200)}"))
        if self.observers:
            decode_tokens = sum(1 for it in items if it.decode)
            stats = StepStats(
                num_seqs=len(items), num_prefill_tokens=sum(n for _, n in work) - decode_tokens,
                num_decode_tokens=decode_tokens, num_adapters=len({it.adapter for it in items} - {None}),
                seconds=time.perf_counter() - t0,
            )
            for obs in self.observers:
                obs.step(stats)
        return True

    def _on_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        now = time.monotonic()
        gap = None if seq.last_token_at is None else now - seq.last_token_at
        seq.first_token_at = seq.first_token_at or now
        seq.last_token_at = now
        for obs in self.observers:
            obs.token(seq, gap)
        seq.ids.append(token)
        p = seq.sampler.params
        finish = None
        if token in p.stop_token_ids:
            finish = FinishReason.STOP
        elif token in self.eos_token_ids and not p.ignore_eos:
            finish = FinishReason.EOS
        elif seq.num_generated >= p.max_new_tokens:
            finish = FinishReason.LENGTH
        seq.text += seq.detok.add(token) if finish is None else seq.detok.add(token) + seq.detok.flush()
        if p.stop:
            scan_from = max(0, seq.emitted - max(map(len, p.stop)))
            hits = [i for i in (seq.text.find(s, scan_from) for s in p.stop) if i >= 0]
            if hits:
                seq.text = seq.text[: min(hits)]
                finish = FinishReason.STOP
        end = len(seq.text) if finish is not None else len(seq.text) - _stop_holdback(seq.text, p.stop)
        delta = seq.text[seq.emitted : end] if end > seq.emitted else ""
        seq.emitted = max(seq.emitted, end)
        if finish is None:
            self._emit(seq, TokenEvent(seq.request.request_id, token, delta, logprob=logprob))
        else:
            self._finish(seq, last=(token, delta, finish, logprob))

    def _timing(self, seq: Sequence) -> Timing:
        now = time.monotonic()
        admitted = seq.admitted_at or now
        return Timing(
            queue_seconds=admitted - seq.arrival,
            adapter_load_seconds=seq.adapter_load_seconds,
            time_to_first_token_seconds=(seq.first_token_at - seq.arrival) if seq.first_token_at else 0.0,
            total_seconds=now - seq.arrival,
        )

    def _finish(self, seq: Sequence, last=None, error: BaseException | None = None) -> None:
        """The one exit path: release slot and pin, send the final event or the error."""
        if seq.done:
            return
        seq.done = True
        try:
            if seq in self._running:
                self._running.remove(seq)
            elif seq in self._waiting:
                self._waiting.remove(seq)
            if seq.slot is not None:
                self.runner.kv.free(seq.slot)
                seq.slot = None
            if seq.pinned:
                self.adapters.release(seq.adapter)
                seq.pinned = False
        finally:  # whatever happened above, the caller gets its answer and the place is returned
            with self._admission_lock:
                self._accepted -= 1
            timing = self._timing(seq)
            if error is not None:
                self._emit(seq, error)
            else:
                token, delta, reason, logprob = last
                self._emit(seq, TokenEvent(
                    seq.request.request_id, token, delta, reason, seq.num_prompt, seq.num_generated, timing,
                    logprob,
                ))
        status = "OK" if error is None else status_name(error)
        for obs in self.observers:
            try:  # an observer's fault (metrics, logs) never reaches the request or the engine
                obs.finish(seq, status, error, timing)
            except Exception:  # noqa: BLE001
                log.exception("observer %s failed on request %s", type(obs).__name__, seq.request.request_id)

    @staticmethod
    def _emit(seq: Sequence, item) -> None:
        seq.undelivered.append(time.monotonic())
        try:
            seq.loop.call_soon_threadsafe(seq.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening
            pass


def token_logprobs(logits: torch.Tensor, seqs: list[Sequence], tokens: list) -> list[TokenLogprob | None]:
    """Raw logprobs of the sampled tokens, for the rows whose request asked (no work for the
    others): log_softmax of the model's logits [N, V], before any sampling transform."""
    want = [i for i, s in enumerate(seqs) if s.sampler.params.logprobs is not None and isinstance(tokens[i], int)]
    out: list[TokenLogprob | None] = [None] * len(seqs)
    if not want:
        return out
    logp = torch.log_softmax(logits[want], dim=-1)  # [W, V]
    chosen = logp.gather(1, torch.tensor([[tokens[i]] for i in want], device=logp.device))[:, 0].tolist()
    k = max(seqs[i].sampler.params.logprobs for i in want)
    top_lp, top_ids = (logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long()))
    top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    for j, i in enumerate(want):
        n = seqs[i].sampler.params.logprobs
        out[i] = TokenLogprob(tokens[i], chosen[j], tuple(zip(top_ids[j][:n], top_lp[j][:n], strict=True)))
    return out


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


def _stop_holdback(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
