"""Synchronous client: ``LoraMuxClient("127.0.0.1:50051").generate("Hello")``."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from ..v1 import loramux_pb2 as pb
from ..v1 import loramux_pb2_grpc as pb_grpc
from .types import Adapter, Generation, ServerInfo, StreamChunk, generate_request


class LoraMuxClient:
    def __init__(self, target: str = "127.0.0.1:50051", channel: grpc.Channel | None = None):
        self.channel = channel or grpc.insecure_channel(target)
        self.stub = pb_grpc.LoraMuxStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def generate(self, prompt=None, *, timeout: float | None = None, **kwargs) -> Generation:
        """kwargs: adapter_id, prompt_token_ids, messages [(role, content)], sampling, request_id."""
        return Generation.from_pb(self.stub.Generate(generate_request(prompt, **kwargs), timeout=timeout))

    def generate_stream(self, prompt=None, *, timeout: float | None = None, **kwargs) -> Iterator[StreamChunk]:
        """Yields a chunk per token. Closing the iterator (or breaking out of it) cancels the request."""
        call = self.stub.GenerateStream(generate_request(prompt, **kwargs), timeout=timeout)
        try:
            for msg in call:
                yield StreamChunk.from_pb(msg)
        finally:
            call.cancel()

    def register_adapter(self, adapter_id: str, path: str, replace: bool = False, preload: bool = False) -> Adapter:
        return Adapter.from_pb(self.stub.RegisterAdapter(
            pb.RegisterAdapterRequest(adapter_id=adapter_id, path=path, replace=replace, preload=preload)))

    def unregister_adapter(self, adapter_id: str) -> None:
        self.stub.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id=adapter_id))

    def list_adapters(self) -> list[Adapter]:
        return [Adapter.from_pb(a) for a in self.stub.ListAdapters(pb.ListAdaptersRequest()).adapters]

    def server_info(self) -> ServerInfo:
        return ServerInfo.from_pb(self.stub.GetServerInfo(pb.GetServerInfoRequest()))
