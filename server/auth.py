"""Bearer-token checks for the LoraMux RPCs. Health and reflection stay open.

- ``--auth-token``: every LoraMux RPC needs ``authorization: Bearer <token>``.
- ``--admin-token``: RegisterAdapter and UnregisterAdapter need it instead; it is accepted on
  every other RPC too.
A missing token gets UNAUTHENTICATED and a wrong one PERMISSION_DENIED; the comparison is
constant-time.
"""

from __future__ import annotations

import grpc

from .service import bearer_refusal, user_tokens

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
        self.admin_token = admin_token
        self.user_tokens = user_tokens(auth_token, admin_token)

    def accepted_tokens(self, method: str) -> tuple[str, ...]:
        """The tokens this RPC accepts; () when it is open. The admin token is accepted on every
        RPC: an operator never needs two tokens."""
        if method.startswith(OPEN_PREFIXES):
            return ()
        if method in ADMIN_METHODS and self.admin_token:
            return (self.admin_token,)
        return self.user_tokens

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization")
        refusal = bearer_refusal(given, self.accepted_tokens(details.method))
        if refusal == "UNAUTHENTICATED":
            return _deny(handler, grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata")
        if refusal == "PERMISSION_DENIED":
            return _deny(handler, grpc.StatusCode.PERMISSION_DENIED, "the bearer token is not valid for this RPC")
        return handler
