"""The OpenAI-compatible HTTP API: FastAPI on uvicorn, in the gRPC server's process and event loop.

As thin as the gRPC servicer: each route converts JSON to Service calls (server/service.py) and
back. Errors leave through the one status table (errors.HTTP_STATUS) in OpenAI's error shape, so
the official clients raise their own exception types. Imported only when --http-port is set.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from . import __version__
from .best_of import best_of
from .errors import HTTP_ERROR_TYPE, HTTP_STATUS, RequestInvalid, clip, status_name
from .openai_responses import EventLog, ResponseBuilder, ResponsesRequest
from .openai_schema import (
    ChatCompletionRequest,
    ChunkMaker,
    CompletionRequest,
    DetokenizeRequest,
    Echo,
    LoadAdapterRequest,
    TokenizeRequest,
    TokenText,
    UnloadAdapterRequest,
    add_prompt_logprobs,
    chat_response,
    completion_response,
    first_error,
    model_card,
    not_unicode,
    split_reasoning,
    usage,
)
from .requests import TokenEvent, validate_request_id
from .response_store import UNFINISHED
from .service import Service, bearer_refusal, user_tokens
from .tool_parsers import tool_call_parser

log = logging.getLogger(__name__)
MIN_LOGPROB = -9999.0  # JSON has no -Infinity: a token of probability 0 reports this, as vLLM does


class BodyTooLarge(Exception):
    pass


def errors_as_responses(route=None, *, names: dict[str, str] | None = None):
    """Every domain error leaves a route through the one table (errors.HTTP_STATUS); ``names``: the
    body's names of the engine's fields (OPENAI_NAMES)."""
    if route is None:
        return functools.partial(errors_as_responses, names=names)

    @functools.wraps(route)
    async def wrapper(*args, **kwargs):
        try:
            return await route(*args, **kwargs)
        except BodyTooLarge:
            raise  # BodyLimit answers 413
        except Exception as e:  # noqa: BLE001
            return _with_request_id(error_response(*_error_of(e, names or OPENAI_NAMES)), kwargs.get("request"))

    return wrapper


def cancelled_on_disconnect(route):
    """A generating route whose client goes away is cancelled, and its engine requests with it (as
    vLLM's with_cancellation): a response that is not streamed would otherwise be generated to its
    end for no one. A streamed one is returned at once, and its stream watches the connection."""
    @functools.wraps(route)
    async def wrapper(*args, **kwargs):
        handler = asyncio.ensure_future(route(*args, **kwargs))
        gone = asyncio.ensure_future(_disconnected(kwargs["request"]))
        try:
            await asyncio.wait((handler, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            handler.cancel()  # a no-op once it has returned
            await asyncio.gather(handler, return_exceptions=True)  # its requests are cancelled first
        return Response(status_code=499) if handler.cancelled() else handler.result()  # 499: nobody reads it

    return wrapper


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body was read before the route ran)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": HTTP_ERROR_TYPE.get(status, "error"), "param": param,
                      "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(status, message, param))


# the engine's field names (gRPC's) that the OpenAI body spells otherwise, in its errors' text and param
OPENAI_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "prompt_token_ids": "prompt"}
RESPONSES_NAMES = {**OPENAI_NAMES, "max_new_tokens": "max_output_tokens", "prompt_token_ids": "input",
                   "response_format": "text"}  # text.format, served as chat's response_format


def _error_of(e: BaseException, names: dict[str, str] = OPENAI_NAMES) -> tuple[int, str, str | None]:
    name = status_name(e)
    if name == "INTERNAL":
        log.error("internal error: %r", e)
    message = re.sub(rf"\b({'|'.join(names)})\b", lambda m: names[m.group(1)], (str(e) or type(e).__name__)[:1000])
    param = getattr(e, "param", None)
    return HTTP_STATUS[name], message, names.get(param, param)


def _json(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, default=str)


REQUEST_ID = "X-Request-Id"  # vLLM's header: the client's id for its request, echoed on the response


def _valid_request_id(request: Request | None) -> str | None:
    """The request's X-Request-Id, if it has one that request_id_of would take."""
    rid = request.headers.get(REQUEST_ID) if request is not None else None
    try:
        validate_request_id(rid or "")
    except RequestInvalid:
        return None
    return rid or None


def _with_request_id(response: Response, request: Request | None) -> Response:
    """A refusal carries the client's valid X-Request-Id: a client tracing its requests sees those too."""
    rid = _valid_request_id(request)
    if rid is not None:
        response.headers[REQUEST_ID] = rid
    return response


def request_id_of(request: Request, body) -> str:
    """The id a generating request goes by in the engine's logs and in its response: the client's
    X-Request-Id header, else the body's request_id (vLLM's order), else a new random one."""
    rid = request.headers.get(REQUEST_ID) or body.request_id or uuid.uuid4().hex
    validate_request_id(rid)
    return rid


def _sse_event(event: dict) -> str:
    """A Responses API stream event: named by its type, as OpenAI sends them."""
    return f"event: {event['type']}\ndata: {_json(event)}\n\n"


def _sse_response(events, request_id: str | None = None) -> StreamingResponse:
    """Responses API events as server-sent events."""
    async def sse():
        async for event in events:
            yield _sse_event(event)

    headers = {"Cache-Control": "no-cache", **({REQUEST_ID: request_id} if request_id else {})}
    return StreamingResponse(sse(), media_type="text/event-stream", headers=headers)


def error_event(built: ResponseBuilder, error: Exception) -> dict:
    """A failure once the stream has begun, as its last event."""
    status, message, param = _error_of(error, RESPONSES_NAMES)
    return built.event("error", code=str(status), message=message, param=param)


def _clamp_logprobs(obj):
    """Replace -inf (and NaN) logprobs with MIN_LOGPROB, anywhere in a response."""
    if isinstance(obj, dict):
        return {k: _clamp_logprobs(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clamp_logprobs(v) for v in obj]
    if isinstance(obj, float) and not (obj >= MIN_LOGPROB):
        return MIN_LOGPROB
    return obj


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is refused with 413 before it is
    parsed, whether the client declares its length or streams it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except BodyTooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send):
        response = error_response(413, f"the request body is over {self.limit} bytes (--max-http-body-bytes)")
        await response(scope, receive, send)


def build_app(service: Service, metrics_text: Callable[[], tuple[bytes, str]]):
    config = service.config
    tool_parser = tool_call_parser(config.tool_call_parser)
    app = FastAPI(title="loramux", docs_url=None, redoc_url=None, openapi_url=None)
    tokens = user_tokens(config.auth_token, config.admin_token)
    kept = service.responses  # the Responses API's kept responses
    background: dict[str, tuple[asyncio.Task, EventLog]] = {}  # background responses being generated, by id

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        where, message = first_error(exc.errors())
        return _with_request_id(error_response(400, message, where or None), request)

    def check_bearer(request: Request, accepted: tuple[str, ...]) -> None:
        refusal = bearer_refusal(request.headers.get("authorization"), accepted)
        if refusal == "UNAUTHENTICATED":
            raise _HttpError(401, "missing 'Authorization: Bearer <token>' header")
        if refusal == "PERMISSION_DENIED":
            raise _HttpError(403, "the bearer token is not valid")

    async def authorized(request: Request) -> None:
        """The same bearer tokens as gRPC: --auth-token, and the admin token on every route."""
        check_bearer(request, tokens)

    async def admin(request: Request) -> None:
        """As gRPC's RegisterAdapter: the admin token when there is one, else the user tokens."""
        check_bearer(request, (config.admin_token,) if config.admin_token else tokens)

    async def unicode_body(request: Request) -> None:
        """A body's strings are Unicode text: a lone surrogate escape is a 400 naming its place,
        not an error wherever the string goes next (the tokenizer, a UTF-8 encoder)."""
        if not await request.body():
            return
        try:
            found = not_unicode(await request.json())  # FastAPI's own parse, cached on the request
        except ValueError:
            return  # not JSON: the body's own validation refuses it
        if found:
            place, char = found
            raise RequestValidationError([{"type": "unicode", "loc": ("body", *place), "input": None,
                                           "msg": f"U+{ord(char):04X} (a lone surrogate) is not Unicode text"}])

    caller, administrator = [Depends(authorized), Depends(unicode_body)], [Depends(admin), Depends(unicode_body)]

    @app.exception_handler(_HttpError)
    async def http_error(request, exc: _HttpError):
        return error_response(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def framework_error(request, exc: HTTPException):
        """The framework's own refusals in OpenAI's shape too: an unknown route, a method not
        allowed, a body its JSON parser gives up on (nested past its depth limit)."""
        message = "the body could not be parsed as JSON (nested too deep?)" if exc.status_code == 400 else \
            str(exc.detail)
        response = error_response(exc.status_code, message)
        response.headers.update(exc.headers or {})
        return response

    @app.get("/health")
    async def health():
        if service.healthy:
            return JSONResponse({"status": "ok"})
        return error_response(503, "not ready: the model is loading, or the server is draining or stopped")

    @app.get("/version")  # vLLM's route; open, as /health
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics():
        body, content_type = metrics_text()
        return Response(body, media_type=content_type)

    def card(model_id: str, parent: str | None) -> dict:
        return model_card(model_id, parent, int(service.started_at), config.total_token_limit)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    @errors_as_responses
    async def models():
        base = service.model_name
        return {"object": "list", "data": [card(base, None)] +
                [card(entry.adapter_id, base) for entry, _ in service.adapters()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorized)])
    @errors_as_responses
    async def model(model_id: str):
        base = service.model_name
        if model_id == base:
            return card(base, None)
        if model_id in service.ready().registry:
            return card(model_id, base)
        return error_response(404, f"the model {model_id[:128]!r} does not exist", "model")

    # vLLM's adapter routes, which the inference gateway's adapter syncer calls; the same rules as
    # gRPC's RegisterAdapter and UnregisterAdapter (runtime registration on, paths under a root)
    @app.post("/v1/load_lora_adapter", dependencies=administrator)
    @errors_as_responses(names={**OPENAI_NAMES, "replace": "load_inplace"})
    async def load_lora_adapter(body: LoadAdapterRequest):
        await service.register_adapter(body.lora_name, body.lora_path, replace=body.load_inplace)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=administrator)
    @errors_as_responses
    async def unload_lora_adapter(body: UnloadAdapterRequest):
        service.unregister_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    def adapter_of(model: str | None) -> str | None:
        """The adapter a body's model names; None for the base model (its name, or unset)."""
        return None if not model or model == service.model_name else model

    def named(body):
        """The body, its model named: unset or empty is the base model, whose name the response
        then carries (as vLLM's)."""
        body.model = body.model or service.model_name
        return body

    @app.post("/v1/completions", dependencies=caller)
    @cancelled_on_disconnect
    @errors_as_responses
    async def completions(body: CompletionRequest, request: Request):
        prompts, sampling = named(body).to_domain()
        return await respond(prompts, sampling, body, "completion", request_id_of(request, body))

    @app.post("/v1/chat/completions", dependencies=caller)
    @cancelled_on_disconnect
    @errors_as_responses
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        prompts, sampling = named(body).serving(tool_parser).to_domain(config.default_max_new_tokens)
        return await respond(prompts, sampling, body, "chat", request_id_of(request, body))

    @app.post("/v1/responses", dependencies=caller)
    @cancelled_on_disconnect
    @errors_as_responses(names=RESPONSES_NAMES)
    async def responses(body: ResponsesRequest, request: Request):
        """OpenAI's Responses API, as the chat request it amounts to (server/openai_responses.py)."""
        rid, body = request_id_of(request, body), named(body)
        history = ()
        if body.previous_response_id is not None:
            previous = kept.get(body.previous_response_id, "previous_response_id")
            if previous.response["status"] in UNFINISHED:
                raise RequestInvalid(f"response {clip(body.previous_response_id)} is {previous.response['status']}: "
                                     "continue it once it is complete", param="previous_response_id")
            history = previous.conversation
        body.check_background(kept.enabled)
        chat = body.as_chat(history).serving(tool_parser)
        prompts, sampling = chat.to_domain(config.default_max_new_tokens)
        (stream,) = await service.generate_choices(prompts, kept_markers(sampling), 1,
                                                   body.options(adapter_of(body.model), rid))
        tools, text_of = chat.tool_calls(), TokenText(service.vocabulary(adapter_of(body.model)).tokenizer)
        keep = kept.enabled and body.store is not False
        starts = opening(body, stream)
        built = ResponseBuilder(body.model, body.echoed(keep), tools, rid, text_of if body.logprobs else None, starts)
        clamp = _clamp_logprobs if body.logprobs else (lambda obj: obj)

        def finished(events) -> dict:
            return clamp(built.response(events))

        def done(events) -> dict:  # the whole response, kept unless it asked not to be
            response = finished(events)
            if keep:
                response["store"] = kept.put(response, *body.conversation(history, response))
            return response

        async def events_of(finish, tokens: list, queued: bool = False):
            """The stream's events (``tokens`` collects the engine's); ``finish`` builds the last
            response; ``queued``: a background response's, in progress from its first token."""
            chunks = ChunkMaker("chat", body.model, text_of, tools=tools, opening=starts)
            for event in built.opening(queued):
                yield event
            async for ev in stream:
                if queued and not tokens:
                    for event in built.started():
                        yield event
                tokens.append(ev)
                for chunk in chunks.events(ev):
                    for event in built.from_chunk(chunk):
                        yield clamp(event)
            for event in built.closing(tokens, finish):
                yield clamp(event)

        if body.background:
            log = in_background(stream, built, events_of(finished, [], queued=True),
                                body.conversation(history, built.response(None)))
            if body.stream:  # the client reads the log: leaving stops its reading, not the response
                return _sse_response(log.follow(), rid)
            return JSONResponse(built.response(None, "queued"), headers={REQUEST_ID: rid})
        if not body.stream:
            try:
                return JSONResponse(done(await collect(stream)), headers={REQUEST_ID: rid})
            finally:
                stream.cancel()  # a no-op once finished; else the client went away

        async def sse():
            try:
                async for event in events_of(done, []):
                    yield event
            except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes in the stream
                yield error_event(built, e)
            finally:
                stream.cancel()

        return _sse_response(sse(), rid)

    def in_background(stream, built: ResponseBuilder, events, conversation: tuple[list[dict], int]) -> EventLog:
        """Keep the response queued and generate it in a task of its own, which keeps it in
        progress (from its first token: its response.in_progress event), then done (or failed, or
        cancelled by POST .../cancel), with ``events`` (its stream's) in an ``EventLog`` that is
        kept with it; returns the log."""
        log = EventLog()
        kept.put(built.response(None, "queued"), *conversation)

        async def generate():
            response = None
            try:
                async for event in events:
                    log.append(event)
                    if event["type"] == "response.in_progress":
                        response = event["response"]
                        kept.put(response, *conversation)
                response = log.events[-1]["response"]  # response.completed's
            except asyncio.CancelledError:
                response = built.response(None, "cancelled")
                log.append(built.event("response.completed", response=response))  # whatever the status
            except Exception as e:  # noqa: BLE001 - the poller reads the failure in the response
                error = error_event(built, e)
                log.append(error)
                response = {**built.response(None, "failed"), "error": {"code": error["code"], "message": error["message"]}}
            finally:
                stream.cancel()  # a no-op once finished
                if response is not None and not kept.put(response, *conversation, events=log.events):
                    kept.put(response, *conversation)  # too large with its events: the response alone
                log.close()
                background.pop(built.id, None)

        background[built.id] = (asyncio.ensure_future(generate()), log)
        return log

    async def stop_background(response_id: str) -> None:
        task, _ = background.get(response_id, (None, None))
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    @app.post("/v1/responses/{response_id}/cancel", dependencies=caller)
    @errors_as_responses(names=RESPONSES_NAMES)
    async def cancel_response(response_id: str):
        """OpenAI's cancel of a background response (``client.responses.cancel``); one already
        finished comes back as it is."""
        if not kept.get(response_id).response.get("background"):
            raise RequestInvalid(f"response {clip(response_id)} was not created in the background: only a "
                                 "background response can be cancelled", param="response_id")
        await stop_background(response_id)
        return kept.get(response_id).response

    @app.get("/v1/responses/{response_id}", dependencies=[Depends(authorized)])
    @errors_as_responses(names=RESPONSES_NAMES)
    async def kept_response(response_id: str, stream: bool = False, starting_after: int | None = None):
        """A kept response (``client.responses.retrieve``); with ``stream``, a background one's stream
        events after ``starting_after``, following those still to come (``include_obfuscation`` is
        ignored, as unknown query parameters are: no obfuscation is added)."""
        stored = kept.get(response_id)
        if not stream:
            if starting_after is not None:
                raise RequestInvalid("starting_after is read only with stream=true", param="starting_after")
            return stored.response
        _, live = background.get(response_id, (None, None))
        if live is None and stored.events is None:
            why = "was not created in the background" if not stored.response.get("background") else \
                "was kept without its events (too large for --responses-store-bytes with them)"
            raise RequestInvalid(f"response {clip(response_id)} {why}: only a background response's events can be "
                                 "streamed", param="stream")
        log = live if live is not None else EventLog(stored.events, closed=True)
        return _sse_response(log.follow(-1 if starting_after is None else starting_after))

    @app.get("/v1/responses/{response_id}/input_items", dependencies=[Depends(authorized)])
    @errors_as_responses(names=RESPONSES_NAMES)
    async def input_items(response_id: str, order: Literal["asc", "desc"] = "desc", limit: int = 20,
                          after: str | None = None):
        """A kept response's input items, OpenAI's list (``client.responses.input_items.list``)."""
        if not 1 <= limit <= 100:
            raise RequestInvalid(f"limit must be in [1, 100], got {limit}", param="limit")
        items = kept.get(response_id).input_items()
        items = items if order == "asc" else items[::-1]
        if after is not None:
            at = next((i for i, item in enumerate(items) if item["id"] == after), None)
            if at is None:
                raise RequestInvalid(f"after {after[:64]!r} is not one of the response's input items", param="after")
            items = items[at + 1:]
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}

    @app.delete("/v1/responses/{response_id}", dependencies=caller)
    @errors_as_responses(names=RESPONSES_NAMES)
    async def delete_response(response_id: str):
        await stop_background(response_id)
        kept.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    # vLLM's tokenizer routes (a client counting a prompt's tokens against max_model_len), at its
    # paths and under /v1 as well
    @app.post("/tokenize", dependencies=caller)
    @app.post("/v1/tokenize", dependencies=caller, include_in_schema=False)
    @errors_as_responses
    async def tokenize(body: TokenizeRequest):
        adapter_id = adapter_of(body.model)
        ids = await service.tokenize(body.to_domain(), adapter_id)
        strs = service.token_strings(ids, adapter_id) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": config.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize", dependencies=caller)
    @app.post("/v1/detokenize", dependencies=caller, include_in_schema=False)
    @errors_as_responses
    async def detokenize(body: DetokenizeRequest):
        return {"prompt": service.detokenize(body.tokens, adapter_of(body.model))}

    def kept_markers(sampling):
        """Chat's sampling, keeping special tokens' text where the reasoning markers are ones."""
        reasoning = service.vocabulary().reasoning
        return replace(sampling, skip_special_tokens=False) if reasoning is not None and reasoning.special else sampling

    def opening(body, stream) -> str | None:
        """Where a chat output starts (reasoning.py), with a reasoning parser its vocabulary has."""
        parser = service.vocabulary(adapter_of(body.model)).reasoning
        return None if parser is None else parser.opening(stream.prompt_token_ids)

    def token_text(body) -> TokenText:
        """The tokens' texts of a request's choices, in its adapter's vocabulary (once the call has
        registered a dynamic adapter)."""
        return TokenText(service.vocabulary(adapter_of(body.model)).tokenizer, body.return_tokens_as_token_ids)

    async def respond(prompts, sampling, body, kind: str, rid: str):
        tools = body.tool_calls() if kind == "chat" else None
        clamp = _clamp_logprobs if sampling.logprobs is not None or sampling.prompt_logprobs is not None \
            else (lambda obj: obj)
        n, k = body.n, body.candidates  # k > n: best_of, never streamed (GenerationBody.check_supported)
        k_param = "best_of" if k > n else "n"
        if body.use_beam_search:  # no echo, no tools (GenerationBody._check_beam_search)
            beams = await service.beam_search_choices(prompts, sampling, k, body.length_penalty,
                                                      body.options(adapter_of(body.model), rid), k_param)
            text_of = token_text(body)
            choices = [b for i, b in enumerate(beams) if i % k < n]  # each prompt's n best, best first
            if body.stream:  # beams are ranked at the end: their chunks all come then, as vLLM sends them
                chunks = ChunkMaker(kind, body.model, text_of, len(choices), n=n, request_id=rid,
                                    prompt_tokens=[c[-1].prompt_tokens for c in choices] if body.continuous_usage
                                    else None)
                return event_stream(chunks, replayed(choices), [], body, clamp, rid)
            response = chat_response(body.model, choices, n, text_of, request_id=rid) \
                if kind == "chat" else completion_response(body.model, choices, n, text_of, None, rid)
            response["usage"] = usage([b[-1] for b in beams], k)
            return JSONResponse(clamp(response), headers={REQUEST_ID: rid})
        if kind == "chat":
            sampling = kept_markers(sampling)
        # best_of ranks candidates by their tokens' logprobs: computed when the client did not ask
        run = replace(sampling, logprobs=0) if k > n and sampling.logprobs is None else sampling
        streams = await service.generate_choices(prompts, run, k, body.options(
            adapter_of(body.model), rid, body.predicted() if kind == "chat" else ""), k_param)
        text_of = token_text(body)
        starts = opening(body, streams[0]) if kind == "chat" else None  # one prompt: n choices of it
        tokenizer = text_of.tokenizer
        echoes = None
        if kind == "completion" and body.echo:  # each choice's prompt: as sent, or its (kept) tokens decoded
            def shown(prompt, stream) -> str:  # the text as sent, unless truncation cut it
                return prompt.text if prompt.text and prompt.truncate_prompt_tokens is None else \
                    tokenizer.decode(stream.prompt_token_ids)
            echoes = [Echo(shown(prompts[i // k], s), s.prompt_token_ids, body.echo_only, body.logprobs)
                      for i, s in enumerate(streams)]
        if not body.stream:
            try:
                candidates = await asyncio.gather(*(collect(s) for s in streams))
            finally:
                for s in streams:
                    s.cancel()  # a no-op once finished; else the client went away or another choice failed
            keep, choices = kept_best(candidates, n, k, sampling.logprobs is None)
            echoes = echoes and [echoes[i] for i in keep]
            response = chat_response(body.model, choices, n, text_of, tools, body.echoed(), rid, starts,
                                     body.include_reasoning) \
                if kind == "chat" else completion_response(body.model, choices, n, text_of, echoes, rid)
            if k > n:  # every candidate's tokens were generated
                response["usage"] = usage([c[-1] for c in candidates], k, None if starts is None else sum(
                    split_reasoning(c, starts).tokens for c in candidates))
            if body.prompt_logprobs is not None:
                add_prompt_logprobs(response, choices, [streams[i].prompt_token_ids for i in keep], n,
                                    body.prompt_logprobs, text_of)
            return JSONResponse(clamp(response), headers={REQUEST_ID: rid})
        chunks = ChunkMaker(kind, body.model, text_of, len(streams), echoes, tools, body.n,
                            body.echoed() if kind == "chat" else "",
                            [len(s.prompt_token_ids) for s in streams] if body.continuous_usage else None, rid, starts,
                            kind != "chat" or body.include_reasoning)
        return event_stream(chunks, merged(streams), streams, body, clamp, rid)

    return BodyLimit(app, config.max_http_body_bytes)


def event_stream(chunks: ChunkMaker, source, streams: list, body, clamp, rid: str) -> StreamingResponse:
    """Server-sent events of ``source``'s (choice index, event) pairs in OpenAI's chunks, the usage
    when asked, then [DONE]; ``streams``: the engine requests to cancel when it ends early."""
    async def sse():
        lasts = [None] * chunks.choices
        try:
            for first in chunks.first():
                yield f"data: {_json(first)}\n\n"
            async for i, ev in source:
                for chunk in chunks.events(ev, i):
                    yield f"data: {_json(clamp(chunk))}\n\n"
                lasts[i] = ev
            if body.include_usage:
                yield f"data: {_json(chunks.usage(lasts, body.n))}\n\n"
        except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes in the stream
            yield f"data: {_json(error_body(*_error_of(e)))}\n\n"
        finally:
            for s in streams:
                s.cancel()  # the client went away (Starlette cancels this generator) or we are done
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                             REQUEST_ID: rid})


def kept_best(candidates: list[list[TokenEvent]], n: int, k: int, drop_logprobs: bool):
    """(indices, events) of the choices a response returns: all of them, or with best_of (k > n)
    each prompt's n best of its k candidates (server/best_of.py). The prompt's logprobs, which come
    with its first candidate, go to its first choice; ``drop_logprobs``: they were computed only
    to rank the candidates."""
    if k == n:
        return range(len(candidates)), candidates
    keep, choices = best_of(candidates, n, k), []
    for j, i in enumerate(keep):
        events = [replace(e, logprob=None) for e in candidates[i]] if drop_logprobs else candidates[i]
        if j % n == 0:  # the prompt's first choice
            events = [replace(events[0], prompt_logprobs=candidates[i - i % k][0].prompt_logprobs), *events[1:]]
        choices.append(events)
    return keep, choices


async def replayed(choices: list[list]):
    """(choice index, event) of events already known, choice by choice."""
    for i, events in enumerate(choices):
        for ev in events:
            yield i, ev


async def collect(stream) -> list:
    return [ev async for ev in stream]


async def merged(streams):
    """(index, event) from every stream as its events come; the first error raised ends it. One
    stream is read directly (the usual case: no task, no queue)."""
    if len(streams) == 1:
        async for ev in streams[0]:
            yield 0, ev
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for ev in stream:
                queue.put_nowait((i, ev))
            queue.put_nowait((i, None))  # this stream is done
        except Exception as e:  # noqa: BLE001 - handed to the reader
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    live = len(streams)
    try:
        while live:
            i, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


class _HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message
