"""The one domain API that both front-ends call: gRPC (grpc_service.py) and HTTP (http_api.py).

Each front-end only converts its wire format to these calls and back; validation, the error
table, prompt rendering off the event loop, dynamic adapter registration and the metrics of
refused requests live here once. No grpc, no HTTP framework and no torch are imported.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hmac
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..adapters.errors import (
    AdapterExists,
    AdapterNotFound,
    AdapterPathDenied,
    RegistryFull,
    SavedModulesFull,
    clip,
)
from ..adapters.files import inside
from .beam_search import BeamSearchParams, beam_events, beam_search
from .config import ServerConfig
from .errors import EngineUnavailable, RequestInvalid, status_name
from .prompts import Prompt
from .requests import GenerationRequest, RequestOptions, SamplingParams, TokenEvent, TokenLogprob
from .response_store import ResponseStore

if TYPE_CHECKING:  # torch comes with it; the front-ends stay free of it
    from .vocabulary import Vocabulary

log = logging.getLogger(__name__)
PLAIN = RequestOptions()  # the base model, with nothing more asked (frozen: a safe default)


def bearer_refusal(given: str | None, tokens: tuple[str, ...]) -> str | None:
    """The status a call with header ``given`` gets when ``tokens`` are accepted: None (allowed),
    UNAUTHENTICATED (no token) or PERMISSION_DENIED (a wrong one). Every comparison runs, in
    constant time, so the time taken does not say which token came close."""
    if not tokens:
        return None
    if not given:
        return "UNAUTHENTICATED"
    matches = sum(hmac.compare_digest(given.encode(), f"Bearer {t}".encode()) for t in tokens)
    return None if matches else "PERMISSION_DENIED"


def user_tokens(auth_token: str | None, admin_token: str | None) -> tuple[str, ...]:
    """Tokens accepted on the inference and read calls: --auth-token, and the admin token too;
    () when --auth-token is unset (those calls are open)."""
    return tuple(t for t in (auth_token, admin_token) if t is not None) if auth_token else ()


async def _last(stream) -> TokenEvent:
    async for event in stream:
        last = event
    return last


class Service:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.built = None  # set once the model has loaded
        self.work = None  # server/offload.py: blocking work runs there, never on the event loop
        self.on_rejected = None  # callable(status, adapter_id) for requests the engine never saw
        self.on_dynamic = None  # callable(event): "registered", "evicted", "failed"
        self._dynamic: dict[str, asyncio.Future] = {}  # adapter id -> its one registration in progress
        # adapter ids that calls between registration and submission hold (_adapter_held): how many each
        self._claims: collections.Counter[str] = collections.Counter()
        self._claims_lock = threading.Lock()
        self.started_at = 0.0  # time.time() when the model became ready: the models' "created"
        # the Responses API's kept responses (previous_response_id, GET/DELETE /v1/responses/{id})
        self.responses = ResponseStore(config.responses_store_bytes)

    def attach(self, built, work) -> None:
        self.built, self.work = built, work
        self.started_at = time.time()

    def ready(self):
        if self.built is None:
            raise EngineUnavailable("the model is still loading; retry when health reports SERVING")
        return self.built

    @property
    def model_name(self) -> str:
        """The base model's public name: --served-model-name, else the loaded model's."""
        return self.config.served_model_name or self.ready().loaded.name

    # ---- generation ----
    async def generate(self, prompt: Prompt, sampling: SamplingParams, options: RequestOptions = PLAIN):
        """Validate, render the prompt off the loop and submit; returns the engine's RequestStream."""
        (stream,) = await self.generate_choices([prompt], sampling, 1, options)
        return stream

    async def generate_choices(self, prompts: list[Prompt], sampling: SamplingParams, n: int,
                               options: RequestOptions = PLAIN, n_param: str = "n") -> list:
        """``n`` completions of each prompt: their RequestStreams in choice order (prompt p's j-th
        is choice p * n + j). Each prompt is rendered once. A seeded request's j-th completion
        draws with seed + j (modulo 2^64): the choices differ, and each reproduces. If one is
        refused, those already submitted are cancelled and its error raised. The prompt's full KV
        blocks are computed once: the scheduler holds the other completions back until the first
        has committed them, and they hit them (server/scheduler.py). Prompt logprobs, when asked,
        come with the first completion of each prompt only (the caller shares them). ``options``:
        every completion's. ``n_param``: the request field that asked for ``n`` (OpenAI's ``n`` or
        ``best_of``), named by a refusal."""
        self._check_choices(len(prompts), n, options.adapter_id, n_param)
        streams = []
        try:
            with self._counting_refusals(options.adapter_id):
                async with self._adapter_held(options.adapter_id, options.combine) as adapter_id:
                    rendered = [await self._render(prompt, adapter_id, instructions=True) for prompt in prompts]
                    vocab = self.vocabulary(adapter_id)
                    await self._prepare(sampling, vocab)
                    predicted = await self._predicted(options.prediction, vocab)
                    # the other completions of a prompt leave its logprobs to the first (the same
                    # values), so they may hit the blocks it computes
                    later = sampling if sampling.prompt_logprobs is None else replace(sampling, prompt_logprobs=None)
                    for ids, ends in rendered:
                        for j in range(n):
                            seeded = sampling if j == 0 else later if later.seed is None else \
                                replace(later, seed=(later.seed + j) % (1 << 64))
                            streams.append(self._submit(ids, seeded, adapter_id, options, predicted, ends))
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        return streams

    def _check_choices(self, prompts: int, n: int, adapter_id: str | None, n_param: str) -> None:
        if n * prompts > self.config.max_choices_per_request:
            with self._counting_refusals(adapter_id):
                raise RequestInvalid(f"{prompts} prompt(s) with {n} completion(s) each ({n_param}) ask for "
                                     f"{n * prompts}; the limit is {self.config.max_choices_per_request} "
                                     "(--max-choices-per-request)", param=n_param)

    async def beam_search_choices(self, prompts: list[Prompt], sampling: SamplingParams, width: int,
                                  length_penalty: float = 1.0,
                                  options: RequestOptions = PLAIN, n_param: str = "n") -> list[list[TokenEvent]]:
        """vLLM's beam search (server/beam_search.py): the ``width`` best beams of each prompt, best
        first, as the events of choices (prompt p's j-th is choice p * width + j). ``sampling`` gives
        max_new_tokens, ignore_eos, logprobs and skip_special_tokens; the request they make is
        validated whole first. Each step's beams run as one-token requests of their own, so they
        batch with other traffic, and the prefix cache serves what they share. ``options``: every
        step's requests' (a prediction drafts nothing here)."""
        self._check_choices(len(prompts), width, options.adapter_id, n_param)
        options = replace(options, request_id=options.request_id or uuid.uuid4().hex)  # one id for every step
        rid = options.request_id
        async with contextlib.AsyncExitStack() as held:  # its adapter held until every step is submitted
            with self._counting_refusals(options.adapter_id):
                adapter_id = await held.enter_async_context(self._adapter_held(options.adapter_id, options.combine))
                rendered = [(await self._render(prompt, adapter_id))[0] for prompt in prompts]
                engine = self.ready().engine
                whole = [engine.fitted(GenerationRequest(rid, tuple(ids), sampling, adapter_id or None,
                                                         priority=options.priority, cache_salt=options.cache_salt))
                         for ids in rendered]
                for req in whole:
                    engine.validate(req)
            one = SamplingParams(1, ignore_eos=True, logprobs=max(2 * width, sampling.logprobs or 0))

            async def step(seqs) -> list[TokenLogprob]:
                streams = []
                try:
                    for ids in seqs:
                        streams.append(self._submit(list(ids), one, adapter_id, options))
                    return [(await _last(stream)).logprob for stream in streams]
                finally:
                    for stream in streams:
                        stream.cancel()  # a no-op once finished; else the client went away or a step failed

            vocab = self.vocabulary(adapter_id)
            eos = vocab.eos_token_ids
            searches = [asyncio.ensure_future(beam_search(req.prompt_token_ids, BeamSearchParams(
                width, req.sampling.max_new_tokens, length_penalty, sampling.ignore_eos, eos), step)) for req in whole]
            try:
                found = await asyncio.gather(*searches)
            finally:
                for search in searches:
                    search.cancel()
            return [beam_events(beam, req.prompt_token_ids, vocab.tokenizer, rid, sampling.skip_special_tokens, sampling.logprobs,
                                sampling.spaces_between_special_tokens)
                    for req, beams in zip(whole, found, strict=True) for beam in beams]

    # ---- tokenizing (vLLM's /tokenize and /detokenize) ----
    async def tokenize(self, prompt: Prompt, adapter_id: str | None = None) -> list[int]:
        """A prompt's token ids as generation would see them (the same limits and rendering), for
        the base model or an adapter (with its own tokenizer, if it has one). An empty text is
        tokenized too: no tokens, or the tokenizer's special ones."""
        self.ready()
        if prompt.text and prompt.messages:
            raise RequestInvalid("set exactly one of prompt and messages", param="prompt")
        if adapter_id:
            self.check_model(adapter_id)
            await self._ensure_registered(adapter_id)
        renderer = self.vocabulary(adapter_id).renderer
        if prompt.text or prompt.messages:
            renderer.check(prompt)
        return await self.work.run("tokenizing the prompt", renderer.render, prompt)

    def vocabulary(self, adapter_id: str | None = None) -> Vocabulary:
        """The tokenizer and vocabulary requests for ``adapter_id`` are served with (None: the base
        model's; an adapter's own, if it has one)."""
        return self.ready().engine.vocabulary(adapter_id)

    def token_strings(self, token_ids: list[int], adapter_id: str | None = None) -> list[str]:
        """Each id's token as the tokenizer writes it (vLLM's token_strs)."""
        return self.vocabulary(adapter_id).tokenizer.convert_ids_to_tokens(token_ids)

    def detokenize(self, token_ids: list[int], adapter_id: str | None = None) -> str:
        """Token ids -> text (special tokens kept), each id in the vocabulary of the base model or
        the adapter."""
        if adapter_id:
            self.check_model(adapter_id)
        vocab = self.vocabulary(adapter_id)
        bad = next((t for t in token_ids if not 0 <= t < vocab.size), None)
        if bad is not None:
            raise RequestInvalid(f"token id {bad} is outside the vocabulary [0, {vocab.size})", param="tokens")
        return vocab.tokenizer.decode(token_ids)

    def check_model(self, adapter_id: str) -> None:
        """A registered adapter, or with --dynamic-adapters one an adapter root holds (it is not
        registered here): else AdapterNotFound."""
        if adapter_id not in self.ready().registry:
            if not self.config.dynamic_adapters:
                raise AdapterNotFound(f"adapter {clip(adapter_id)} is not registered")
            self._dynamic_path(adapter_id)

    @contextlib.contextmanager
    def _counting_refusals(self, adapter_id: str | None):
        """A request refused before the engine saw it: the metrics still count it."""
        try:
            yield
        except Exception as e:
            if self.on_rejected is not None:
                self.on_rejected(status_name(e), adapter_id or None)
            raise

    async def _render(self, prompt: Prompt, adapter_id: str | None,
                      instructions: bool = False) -> tuple[list[int], tuple[int, ...]]:
        """The adapter's (dynamic) registration, cheap bounds with its renderer (its tokenizer's
        chat template, if it has one of its own), then the tokenizer off the loop: the token ids,
        and with ``instructions`` where a chat's instructions end in them (the request's
        shared_prefix_ends) when the engine caches recurrent states there (else ())."""
        engine = self.ready().engine
        if adapter_id:
            await self._ensure_registered(adapter_id)
        renderer = self.vocabulary(adapter_id).renderer
        renderer.check(prompt)

        def render():
            ids = renderer.render(prompt)
            end = renderer.instructions_end(prompt, ids) if instructions and prompt.messages and engine.caches_states \
                else None
            return ids, () if end is None else (end,)

        return await self.work.run("tokenizing the prompt", render)

    async def _prepare(self, sampling: SamplingParams, vocab: Vocabulary) -> None:
        """A structured output's constraint compiled off the loop; the engine then copies it."""
        if sampling.structured_output is not None:
            await self.work.run("compiling the structured output", vocab.grammars.prepare, sampling.structured_output)

    async def _predicted(self, prediction: str, vocab: Vocabulary) -> tuple[int, ...]:
        """A predicted output's tokens (no special tokens), tokenized off the loop."""
        if not prediction:
            return ()
        size, limit = len(prediction.encode("utf-8", "surrogatepass")), self.config.max_prompt_bytes
        if size > limit:
            raise RequestInvalid(f"prediction is {size} bytes; the limit is {limit} (--max-prompt-bytes)",
                                 param="prediction")
        return tuple(await self.work.run("tokenizing the prediction", functools.partial(
            vocab.tokenizer.encode, prediction, add_special_tokens=False)))

    def _submit(self, ids: list[int], sampling: SamplingParams, adapter_id: str | None, options: RequestOptions,
                prediction: tuple[int, ...] = (), shared_prefix_ends: tuple[int, ...] = ()):
        """``adapter_id``: the one the call resolved (a combination's registration); ``prediction``:
        its tokens."""
        remaining = options.time_remaining
        req = GenerationRequest(
            request_id=options.request_id or uuid.uuid4().hex, prompt_token_ids=tuple(ids), sampling=sampling,
            adapter_id=adapter_id or None, deadline=None if remaining is None else time.monotonic() + remaining,
            priority=options.priority, prediction=prediction, cache_salt=options.cache_salt,
            shared_prefix_ends=shared_prefix_ends,
        )
        return self.ready().engine.submit(req)

    # ---- dynamic adapters (--dynamic-adapters) ----
    async def _ensure_registered(self, adapter_id: str) -> None:
        """With --dynamic-adapters, an unknown id that names ROOT/ID under an --adapter-root is
        registered on first use. Concurrent first requests share one registration."""
        registry = self.built.registry
        if not self.config.dynamic_adapters or adapter_id in registry:
            return
        pending = self._dynamic.get(adapter_id)
        if pending is None:
            pending = asyncio.ensure_future(self.work.run("registering the adapter", self._register_dynamic,
                                                          adapter_id))
            self._dynamic[adapter_id] = pending
            pending.add_done_callback(lambda _: self._dynamic.pop(adapter_id, None))
        await asyncio.shield(pending)

    def _dynamic_path(self, adapter_id: str) -> Path:
        """ROOT/ID under the first adapter root that holds it. An id that leads out of a root
        (``..``, an absolute path, a symlink) is PERMISSION_DENIED, whether or not it exists."""
        for root in self.built.registry.roots:
            candidate = root / adapter_id
            if not inside(Path(os.path.realpath(candidate)), root):
                raise AdapterPathDenied(f"adapter {clip(adapter_id)} leads outside the adapter root")
            if os.path.lexists(candidate):
                return candidate
        raise AdapterNotFound(f"adapter {clip(adapter_id)} is not registered, and no --adapter-root holds it")

    def _register_dynamic(self, adapter_id: str):
        """Worker thread: register ROOT/ID, making room (_with_room)."""
        built = self.built
        try:
            path = self._dynamic_path(adapter_id)
            try:
                entry = self._with_room(functools.partial(built.registry.register, adapter_id, path, dynamic=True),
                                        adapter_id)
            except AdapterExists:  # registered meanwhile (RegisterAdapter): serve that one
                return built.registry.get(adapter_id)
        except Exception:
            self._count("failed")
            raise
        log.info("dynamic adapter %s registered from %s (content hash %s)", adapter_id, path,
                 entry.manifest.content_hash[:16])
        self._count("registered")
        return entry

    def _with_room(self, register, what: str):
        """``register()`` (a first use or RegisterAdapter), making room when the registry is full, or
        when the copies of fully trained modules held are (--max-saved-modules), by unregistering the
        least recently used dynamic registration (of those holding copies) that no request is using
        and no call holds (_adapter_held); none: RESOURCE_EXHAUSTED."""
        built = self.built
        while True:
            try:
                return register()
            except (RegistryFull, SavedModulesFull) as e:
                running, waiting = built.engine.adapter_ids()
                saved = isinstance(e, SavedModulesFull)
                evicted = built.registry.evict_lru_dynamic(running | waiting, self._claimed, saved)
                if evicted is None:
                    held = " holding any" if saved else ""
                    raise type(e)(f"{e}, and no adapter registered on first use{held} is idle to make room") from None
                log.info("dynamic adapter %s unregistered to make room for %s", evicted.adapter_id, what)
                self._count("evicted")

    # ---- the adapter a call's requests run with, held until they are submitted ----
    @contextlib.asynccontextmanager
    async def _adapter_held(self, adapter_id: str | None, combine: Sequence[tuple[str, float]]):
        """Yields the adapter a call's requests run with: ``adapter_id``, or the weighted sum of
        registered adapters ``combine`` [(id, weight)] names, registered on its first use as a
        dynamic combination (Registry.combination_for: ranks side by side, as RegisterAdapter's
        combine). Until the call ends, what it names is claimed: making room for another dynamic
        registration never unregisters it (nor a part) between its registration and the call's
        requests' submission; from then on they hold their entry."""
        claimed: list[str] = []
        holding = True

        def claim(name: str) -> None:  # also from a worker thread, under the registry's lock
            with self._claims_lock:
                if holding:  # not once the call ended (cancelled while a worker registered)
                    self._claims[name] += 1
                    claimed.append(name)

        try:
            if combine:
                if adapter_id:
                    raise RequestInvalid(f"combine names the adapters to sum: the request must name the base "
                                         f"model (as its model, with no adapter), not adapter {clip(adapter_id)}",
                                         param="combine")
                for part, _ in combine:  # with --dynamic-adapters, a part may be registered on first use
                    claim(part)
                    await self._ensure_registered(part)
                adapter_id = (await self.work.run("registering the combination", self._register_combination,
                                                  combine, claim)).adapter_id
            elif adapter_id:
                claim(adapter_id)  # before its dynamic registration (in _render)
            yield adapter_id
        finally:
            with self._claims_lock:
                holding = False
                self._claims.subtract(claimed)
                for name in set(claimed):
                    if self._claims[name] <= 0:
                        del self._claims[name]

    def _claimed(self) -> set[str]:
        """The adapter ids calls hold (_adapter_held); read under the registry's lock as it evicts."""
        with self._claims_lock:
            return set(self._claims)

    def _register_combination(self, parts: Sequence[tuple[str, float]], claim):
        """Worker thread: the registered combination of ``parts``, claimed, making room (_with_room)."""
        try:
            entry, new = self._with_room(functools.partial(self.built.registry.combination_for, parts, claim),
                                         "a combination")
        except ValueError as e:  # a part that cannot be combined, a weight, the rank
            raise RequestInvalid(str(e), param="combine") from None
        if new:
            self._count("registered")
        return entry

    def _count(self, event: str) -> None:
        if self.on_dynamic is not None:
            self.on_dynamic(event)

    # ---- adapter administration ----
    def check_runtime_adapters(self) -> None:
        if not self.config.runtime_adapters_enabled:
            raise AdapterPathDenied(
                "runtime adapter registration is disabled; start the server with --allow-runtime-adapters "
                "or --admin-token"
            )

    async def register_adapter(self, adapter_id: str, path: str, replace: bool = False, preload: bool = False,
                               weight: float = 1.0, keep_resident: bool = False,
                               combine: list[tuple[str, float]] | None = None):
        """Register the adapter at ``path``, or (``combine``, path empty) a weighted combination of
        registered adapters."""
        self.check_runtime_adapters()
        built = self.ready()
        if combine and path:
            raise RequestInvalid("set path or combine, not both")
        how = dict(weight=weight, keep_resident=keep_resident, on_commit=built.manager.on_register)
        if combine:
            register = functools.partial(built.registry.register_combination, adapter_id, combine, replace, **how)
        else:
            register = functools.partial(built.registry.register, adapter_id, path, replace, **how)
        # Dynamic registrations are the server's cache: an idle one makes room for this one
        entry = await self.work.run("registering the adapter", self._with_room, register, adapter_id)
        if preload:
            built.manager.preload(entry)
        return entry

    def unregister_adapter(self, adapter_id: str) -> None:
        self.check_runtime_adapters()
        built = self.ready()
        built.registry.unregister(adapter_id)
        built.manager.on_unregister(adapter_id)

    def adapters(self) -> list[tuple[object, str]]:
        """Every registered adapter with its tier, sorted by id."""
        built = self.ready()
        return [(e, built.manager.tier(e.key)) for e in built.registry.list()]

    def tier(self, entry) -> str:
        return self.ready().manager.tier(entry.key)

    def is_admin(self, authorization: str | None) -> bool:
        """A caller allowed the admin calls: it holds the admin token, or there is none and runtime
        registration is on (on loopback, or with --insecure-admin)."""
        c = self.config
        if c.admin_token is None:
            return c.allow_runtime_adapters
        return hmac.compare_digest((authorization or "").encode(), f"Bearer {c.admin_token}".encode())

    @property
    def healthy(self) -> bool:
        """Readiness: loaded, not draining, engine alive."""
        return self.built is not None and self.built.engine.fatal_error is None and self.built.engine.accepting

