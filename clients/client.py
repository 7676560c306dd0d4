"""Synchronous client: ``LoraMuxClient("127.0.0.1:50051").generate("Hello")``."""

from __future__ import annotations

from collections.abc import Iterator

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


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str):
        self._metadata = (("authorization", f"Bearer {token}"),)

    def _details(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self._metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


def _with_token(channel, token: str):
    return grpc.intercept_channel(channel, _TokenInterceptor(token))


class LoraMuxClient:
    def __init__(self, target: str = "127.0.0.1:50051", channel: grpc.Channel | None = None,
                 token: str | None = None, tls: Tls | None = None):
        """``token`` is sent as ``authorization: Bearer <token>``; ``tls`` makes the channel secure."""
        if channel is None:
            warn_if_token_in_plaintext(target, token, tls)
            channel = grpc.secure_channel(target, tls.credentials()) if tls else grpc.insecure_channel(target)
        self.channel = channel
        self.stub = pb_grpc.LoraMuxStub(_with_token(self.channel, token) if token else self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def generate(self, prompt=None, *, timeout: float | None = None, **kwargs) -> Generation:
        """kwargs: adapter_id, prompt_token_ids, messages [(role, content)], sampling, request_id,
        add_special_tokens, priority, combine [(adapter id, weight)], prediction (the output
        expected), cache_salt; with messages, add_generation_prompt, continue_final_message, chat_template_kwargs
        (a dict), chat_template, documents (a list of dicts)."""
        return Generation.from_pb(self.stub.Generate(generate_request(prompt, **kwargs), timeout=timeout))

    def generate_stream(self, prompt=None, *, timeout: float | None = None, **kwargs) -> Iterator[StreamChunk]:
        """Yields a chunk per token. Closing the iterator (or breaking out of it) cancels the request."""
        call = self.stub.GenerateStream(generate_request(prompt, **kwargs), timeout=timeout)
        try:
            for msg in call:
                yield StreamChunk.from_pb(msg)
        finally:
            call.cancel()

    def register_adapter(self, adapter_id: str, path: str = "", replace: bool = False, preload: bool = False,
                         weight: float | None = None, keep_resident: bool = False,
                         combine: list[tuple[str, float]] | None = None, *, timeout: float | None = None) -> Adapter:
        return Adapter.from_pb(self.stub.RegisterAdapter(
            register_request(adapter_id, path, replace, preload, weight, keep_resident, combine),
            timeout=timeout))

    def unregister_adapter(self, adapter_id: str, *, timeout: float | None = None) -> None:
        self.stub.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id=adapter_id), timeout=timeout)

    def list_adapters(self, *, timeout: float | None = None) -> list[Adapter]:
        return [Adapter.from_pb(a) for a in self.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=timeout).adapters]

    def tokenize(self, prompt=None, *, timeout: float | None = None, **kwargs) -> Tokens:
        """kwargs: adapter_id, messages [(role, content)], add_special_tokens, add_generation_prompt,
        continue_final_message, chat_template_kwargs (a dict), chat_template, documents, return_token_strs."""
        return Tokens.from_pb(self.stub.Tokenize(tokenize_request(prompt, **kwargs), timeout=timeout))

    def detokenize(self, token_ids: list[int], *, adapter_id: str = "", timeout: float | None = None) -> str:
        """adapter_id: decode with its tokenizer (its own, if it has one); empty: the base model's."""
        request = pb.DetokenizeRequest(token_ids=token_ids, adapter_id=adapter_id)
        return self.stub.Detokenize(request, timeout=timeout).text

    def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        return ServerInfo.from_pb(self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=timeout))
