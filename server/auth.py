"""Bearer-token checks for the LoraMux RPCs. Health and reflection stay open.

- ``--auth-token``: every LoraMux RPC needs ``authorization: Bearer <token>``.
- ``--admin-token``: RegisterAdapter and UnregisterAdapter need it instead.
A missing token gets UNAUTHENTICATED and a wrong one PERMISSION_DENIED; the comparison is
constant-time.
"""

from __future__ import annotations

import hmac

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
ADMIN_METHODS = frozenset({"/loramux.v1.LoraMux/RegisterAdapter", "/loramux.v1.LoraMux/UnregisterAdapter"})


def _deny(handler, code: grpc.StatusCode, message: str):
    async def abort_unary(request, context):
        await context.abort(code, message)

    async def abort_stream(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort_unary, **kwargs)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth_token: str | None, admin_token: str | None):
        self.auth_token = auth_token
        self.admin_token = admin_token

    def required_token(self, method: str) -> str | None:
        if method.startswith(OPEN_PREFIXES):
            return None
        if method in ADMIN_METHODS and self.admin_token:
            return self.admin_token
        return self.auth_token

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        token = self.required_token(details.method)
        if token is None or handler is None:
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization")
        if given is None:
            return _deny(handler, grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return _deny(handler, grpc.StatusCode.PERMISSION_DENIED, "the bearer token is not valid for this RPC")
        return handler
