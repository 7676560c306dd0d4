"""asyncio client, the same calls as :class:`LoraMuxClient` as coroutines and async iterators."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from ..v1 import loramux_pb2 as pb
from ..v1 import loramux_pb2_grpc as pb_grpc
from .types import (
    Adapter,
    Generation,
    ServerInfo,
    StreamChunk,
    Tls,
    Tokens,
    generate_request,
    register_request,
    tokenize_request,
    warn_if_token_in_plaintext,
)


class _TokenInterceptor(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str):
        self._metadata = (("authorization", f"Bearer {token}"),)

    def _details(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self._metadata)

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class AsyncLoraMuxClient:
    def __init__(self, target: str = "127.0.0.1:50051", channel: grpc.aio.Channel | None = None,
                 token: str | None = None, tls: Tls | None = None):
        """``token`` is sent as ``authorization: Bearer <token>``; ``tls`` makes the channel secure."""
        if channel is None:
            warn_if_token_in_plaintext(target, token, tls)
            interceptors = [_TokenInterceptor(token)] if token else None
            channel = (grpc.aio.secure_channel(target, tls.credentials(), interceptors=interceptors) if tls
                       else grpc.aio.insecure_channel(target, interceptors=interceptors))
        self.channel = channel
        self.stub = pb_grpc.LoraMuxStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def generate(self, prompt=None, *, timeout: float | None = None, **kwargs) -> Generation:
        return Generation.from_pb(await self.stub.Generate(generate_request(prompt, **kwargs), timeout=timeout))

    async def generate_stream(self, prompt=None, *, timeout: float | None = None, **kwargs) -> AsyncIterator[StreamChunk]:
        call = self.stub.GenerateStream(generate_request(prompt, **kwargs), timeout=timeout)
        try:
            async for msg in call:
                yield StreamChunk.from_pb(msg)
        finally:
            call.cancel()

    async def register_adapter(self, adapter_id: str, path: str = "", replace: bool = False, preload: bool = False,
                               weight: float | None = None, keep_resident: bool = False,
                               combine: list[tuple[str, float]] | None = None, *,
                               timeout: float | None = None) -> Adapter:
        return Adapter.from_pb(await self.stub.RegisterAdapter(
            register_request(adapter_id, path, replace, preload, weight, keep_resident, combine),
            timeout=timeout))

    async def unregister_adapter(self, adapter_id: str, *, timeout: float | None = None) -> None:
        await self.stub.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id=adapter_id), timeout=timeout)

    async def list_adapters(self, *, timeout: float | None = None) -> list[Adapter]:
        return [Adapter.from_pb(a) for a in (await self.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=timeout)).adapters]

    async def tokenize(self, prompt=None, *, timeout: float | None = None, **kwargs) -> Tokens:
        """kwargs: adapter_id, messages [(role, content)], add_special_tokens, add_generation_prompt,
        continue_final_message, chat_template_kwargs (a dict), chat_template, documents, return_token_strs."""
        return Tokens.from_pb(await self.stub.Tokenize(tokenize_request(prompt, **kwargs), timeout=timeout))

    async def detokenize(self, token_ids: list[int], *, adapter_id: str = "", timeout: float | None = None) -> str:
        """adapter_id: decode with its tokenizer (its own, if it has one); empty: the base model's."""
        request = pb.DetokenizeRequest(token_ids=token_ids, adapter_id=adapter_id)
        return (await self.stub.Detokenize(request, timeout=timeout)).text

    async def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        return ServerInfo.from_pb(await self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=timeout))
