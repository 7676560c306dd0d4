"""The LoraMux servicer: convert -> domain call -> convert. No torch, no business logic."""

from __future__ import annotations

import functools
import logging

import grpc

from ..v1 import loramux_pb2 as pb
from ..v1 import loramux_pb2_grpc as pb_grpc
from . import __version__
from .errors import RequestDeadlineExceeded, status_name
from .grpc_convert import adapter_to_pb, prompt_from_pb, response_to_pb, sampling_from_pb, stream_event_to_pb
from .requests import RequestOptions
from .service import Service

log = logging.getLogger(__name__)
MAX_DETAILS = 1000  # messages quote client input only clipped; this bounds the rest
# gRPC ends a call whose deadline passed by itself (the handler is cancelled, and _release frees the
# request); the engine's copy of the deadline is a backstop just after it, so the servicer does not
# race gRPC to answer a call it is ending (grpc logs that race as an ExecuteBatchError)
DEADLINE_GRACE_S = 0.2


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
    """convert -> Service call -> convert (server/service.py holds the domain logic)."""

    def __init__(self, service: Service):
        self.service = service

    async def _submit(self, request: pb.GenerateRequest, context):
        remaining = context.time_remaining()
        return await self.service.generate(
            prompt_from_pb(request), sampling_from_pb(request.sampling, self.service.config.default_max_new_tokens),
            RequestOptions(request.adapter_id or None, request.request_id or None, request.priority, request.prediction,
                           tuple((part.adapter_id, part.weight) for part in request.combine), request.cache_salt,
                           None if remaining is None else remaining + DEADLINE_GRACE_S))

    @staticmethod
    def _release(stream, context) -> None:
        """No-op when the request finished; otherwise the RPC was cancelled or timed out. The
        client's deadline runs from when it sent the call, our copy from when the call arrived, so
        the client's own expiry reaches us as a cancel up to the call's transit early: a cancel
        within DEADLINE_GRACE_S of our deadline is that expiry."""
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= DEADLINE_GRACE_S
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

    @unary
    async def RegisterAdapter(self, request, context):
        weight = request.weight if request.HasField("weight") else 1.0
        combine = [(part.adapter_id, part.weight) for part in request.combine]
        entry = await self.service.register_adapter(request.adapter_id, request.path, request.replace, request.preload,
                                                    weight, request.keep_resident, combine)
        return adapter_to_pb(entry, self.service.tier(entry), show_path=True)

    @unary
    async def UnregisterAdapter(self, request, context):
        self.service.unregister_adapter(request.adapter_id)
        return pb.UnregisterAdapterResponse()

    @unary
    async def ListAdapters(self, request, context):
        admin = self.service.is_admin(dict(context.invocation_metadata() or ()).get("authorization"))
        return pb.ListAdaptersResponse(
            adapters=[adapter_to_pb(e, tier, show_path=admin) for e, tier in self.service.adapters()])

    @unary
    async def Tokenize(self, request, context):
        ids = await self.service.tokenize(prompt_from_pb(request), request.adapter_id or None)
        strs = self.service.token_strings(ids, request.adapter_id or None) if request.return_token_strs else []
        return pb.TokenizeResponse(token_ids=ids, token_strs=strs, max_model_len=self.service.config.max_model_len)

    @unary
    async def Detokenize(self, request, context):
        return pb.DetokenizeResponse(text=self.service.detokenize(list(request.token_ids), request.adapter_id or None))

    @unary
    async def GetServerInfo(self, request, context):
        service, c = self.service, self.service.config
        built = service.ready()
        return pb.ServerInfo(
            version=__version__, model=service.model_name, device=str(built.loaded.device),
            dtype=str(built.loaded.dtype).removeprefix("torch."), max_lora_rank=c.max_lora_rank,
            max_device_adapters=c.max_device_adapters, max_host_adapters=c.max_host_adapters,
            max_batch_size=c.max_batch_size, max_model_len=c.max_model_len,
            registered_adapters=len(built.registry), has_chat_template=service.vocabulary().renderer.has_chat_template,
            kv_block_size=built.engine.blocks.block_size,
            kv_cache_tokens=built.engine.blocks.num_blocks * built.engine.blocks.block_size,
            adapter_pages=built.manager.pool.num_pages, op_backend=built.op_backend, cpu_isa=built.cpu_isa,
            lora_dtype=str(built.manager.dtype).removeprefix("torch."), lora_targets=built.registry.layout.kinds,
            dora=built.registry.layout.dora_base is not None, num_speculative_tokens=c.num_speculative_tokens,
            base_kernel_rows=sorted(built.kernel_rows), scheduling=c.scheduling,
            quantization=built.quantization, max_saved_modules=c.max_saved_modules,
            prefix_caching=built.engine.blocks.prefix_caching,
        )
