"""The LoraMux servicer: convert -> domain call -> convert. No torch, no business logic."""

from __future__ import annotations

import functools
import hmac
import logging

import grpc

from ..adapters.errors import AdapterPathDenied
from ..v1 import loramux_pb2 as pb
from ..v1 import loramux_pb2_grpc as pb_grpc
from . import __version__
from .errors import EngineUnavailable, RequestDeadlineExceeded, status_name
from .grpc_convert import adapter_to_pb, request_from_pb, response_to_pb, stream_event_to_pb

log = logging.getLogger(__name__)
MAX_DETAILS = 1000  # messages quote client input only clipped; this bounds the rest


async def _abort(context, error: BaseException):
    code = status_name(error)
    if code == "INTERNAL":
        log.error("internal error: %r", error)
    await context.abort(getattr(grpc.StatusCode, code), (str(error) or type(error).__name__)[:MAX_DETAILS])



def unary(method):
    """Map domain exceptions to their status codes (one table: errors.STATUS_BY_ERROR)."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except Exception as e:  # noqa: BLE001 - every error leaves through the one table
            if isinstance(e, grpc.aio.AbortError):
                raise
            await _abort(context, e)

    return wrapper


def streaming(method):
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            async for item in method(self, request, context):
                yield item
        except Exception as e:  # noqa: BLE001
            if isinstance(e, grpc.aio.AbortError):
                raise
            await _abort(context, e)

    return wrapper


class LoraMuxServicer(pb_grpc.LoraMuxServicer):
    def __init__(self, config):
        self.config = config
        self.built = None  # set once the model has loaded
        self.renderer = None
        self.work = None  # server/offload.py: blocking work runs there, never on the event loop
        self.on_rejected = None  # callable(status, adapter_id) for requests the engine never saw

    def attach(self, built, renderer, work) -> None:
        self.built, self.renderer, self.work = built, renderer, work

    def _ready(self):
        if self.built is None:
            raise EngineUnavailable("the model is still loading; retry when health reports SERVING")
        return self.built

    async def _submit(self, request: pb.GenerateRequest, context):
        try:
            built = self._ready()
            prompt = (request.prompt, list(request.prompt_token_ids), [(m.role, m.content) for m in request.messages])
            self.renderer.check(*prompt)  # cheap bounds first, then the tokenizer off the loop
            ids = await self.work.run("tokenizing the prompt", self.renderer.render, *prompt)
            req = request_from_pb(request, ids, self.config.default_max_new_tokens, context.time_remaining())
            return built.engine.submit(req)
        except Exception as e:  # refused before the engine saw it: the metrics still count it
            if self.on_rejected is not None:
                self.on_rejected(status_name(e), request.adapter_id or None)
            raise

    @staticmethod
    def _release(stream, context) -> None:
        """No-op when the request finished; otherwise the RPC was cancelled or timed out."""
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        stream.cancel(RequestDeadlineExceeded("the request's deadline expired") if expired else None)

    @unary
    async def Generate(self, request, context):
        stream = await self._submit(request, context)
        try:
            return response_to_pb([ev async for ev in stream])
        finally:
            self._release(stream, context)

    @streaming
    async def GenerateStream(self, request, context):
        stream = await self._submit(request, context)
        try:
            async for ev in stream:
                yield stream_event_to_pb(ev)
        finally:
            self._release(stream, context)

    def _check_runtime_adapters(self) -> None:
        if not self.config.runtime_adapters_enabled:
            raise AdapterPathDenied(
                "runtime adapter registration is disabled; start the server with --allow-runtime-adapters "
                "or --admin-token"
            )

    def _is_admin(self, context) -> bool:
        """A caller allowed the admin RPCs: it holds the admin token, or there is none and runtime
        registration is on (on loopback, or with --insecure-admin)."""
        c = self.config
        if c.admin_token is None:
            return c.allow_runtime_adapters
        given = dict(context.invocation_metadata() or ()).get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {c.admin_token}".encode())

    @unary
    async def RegisterAdapter(self, request, context):
        self._check_runtime_adapters()
        built = self._ready()
        entry = await self.work.run("registering the adapter", built.registry.register, request.adapter_id,
                                    request.path, request.replace)
        if request.preload:
            built.manager.preload(entry)
        return adapter_to_pb(entry, built.manager.tier(entry.key), show_path=True)

    @unary
    async def UnregisterAdapter(self, request, context):
        self._check_runtime_adapters()
        self._ready().registry.unregister(request.adapter_id)
        return pb.UnregisterAdapterResponse()

    @unary
    async def ListAdapters(self, request, context):
        built = self._ready()
        admin = self._is_admin(context)
        return pb.ListAdaptersResponse(
            adapters=[adapter_to_pb(e, built.manager.tier(e.key), show_path=admin) for e in built.registry.list()]
        )

    @unary
    async def GetServerInfo(self, request, context):
        built, c = self._ready(), self.config
        return pb.ServerInfo(
            version=__version__, model=built.loaded.name, device=str(built.loaded.device),
            dtype=str(built.loaded.dtype).removeprefix("torch."), max_lora_rank=c.max_lora_rank,
            max_device_adapters=c.max_device_adapters, max_host_adapters=c.max_host_adapters,
            max_batch_size=c.max_batch_size, max_model_len=c.max_model_len,
            registered_adapters=len(built.registry), has_chat_template=self.renderer.has_chat_template,
        )
