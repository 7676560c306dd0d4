"""A request that does not parse as its message is INVALID_ARGUMENT.

gRPC's Python server parses a request before any handler runs, and answers a parse error (bad
UTF-8 in a string field, a corrupt wire format) UNKNOWN, "Unexpected DecodeError", with a traceback
in the server's log. This interceptor hands the handler the raw bytes and parses them itself, so the
client hears what it did wrong and the log stays quiet.
"""

from __future__ import annotations

import inspect

import grpc
from google.protobuf.message import DecodeError


class ParseInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler  # client streams (reflection) keep gRPC's own parsing
        behaviour = handler.unary_stream if handler.response_streaming else handler.unary_unary
        if not (inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)):
            return handler  # a sync handler runs in gRPC's executor, as gRPC calls it
        parse = handler.request_deserializer

        async def parsed(raw: bytes, context):
            try:
                return parse(raw)
            except DecodeError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request does not parse ({e})")

        kwargs = dict(request_deserializer=None, response_serializer=handler.response_serializer)
        if not handler.response_streaming:
            async def unary(raw, context):
                return await behaviour(await parsed(raw, context), context)
            return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
        if inspect.isasyncgenfunction(behaviour):
            async def stream(raw, context):
                async for response in behaviour(await parsed(raw, context), context):
                    yield response
        else:  # a handler that writes its responses with context.write (grpc's health Watch)
            async def stream(raw, context):
                return await behaviour(await parsed(raw, context), context)
        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
