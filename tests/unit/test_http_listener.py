"""The HTTP API's listening socket: every connection it accepts has Nagle's algorithm off, so a
response's body does not wait for the client's delayed ACK of its headers (40 ms on Linux, on
every reused keep-alive connection)."""

import asyncio
import socket
from pathlib import Path

import pytest

from loramux.server.app import http_listener


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_accepted_connections_have_nagle_off(host):
    try:
        listener = http_listener(host, 0)
    except OSError:
        pytest.skip(f"no {host} on this host")

    async def accepted_nodelay() -> int:
        seen = asyncio.get_running_loop().create_future()

        def on_connect(reader, writer):
            sock = writer.get_extra_info("socket")
            seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=listener)  # as uvicorn serves it
        async with server:
            _, writer = await asyncio.open_connection(host, listener.getsockname()[1])
            try:
                return await asyncio.wait_for(seen, 10)
            finally:
                writer.close()

    assert asyncio.run(accepted_nodelay()) != 0


def test_a_taken_port_is_refused_and_the_socket_closed():
    fds = Path("/proc/self/fd")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        before = len(list(fds.iterdir()))
        try:
            http_listener("127.0.0.1", taken.getsockname()[1])
        except OSError:  # counted while the error, and the frame it holds, is alive
            assert len(list(fds.iterdir())) == before
        else:
            pytest.fail("a taken port was bound")
