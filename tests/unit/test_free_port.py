"""free_port: the ports tests and benchmarks start servers on; pytest-xdist workers never share one."""

import socket
from pathlib import Path

from loramux.clients.bench import LOW_PORT, free_port


def test_each_worker_takes_only_its_own_residue_of_ports(monkeypatch):
    for workers in (2, 3):  # 2: Linux gives bind(0) ports of one parity, so they must be drawn
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(workers))
        for worker in range(workers):
            monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{worker}")
            ports = [free_port() for _ in range(20)]
            assert all(p % workers == worker and p >= LOW_PORT for p in ports), ports
    with socket.socket() as s:  # and it is free: a server can bind it
        s.bind(("127.0.0.1", free_port()))


def test_outside_xdist_ports_of_every_residue_come_below_the_ephemeral_range(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    ports = [free_port() for _ in range(40)]
    assert {p % 2 for p in ports} == {0, 1}  # drawn, not bind(0)'s (one parity on Linux)
    range_file = Path("/proc/sys/net/ipv4/ip_local_port_range")
    ephemeral = int(range_file.read_text().split()[0]) if range_file.exists() else 0
    top = ephemeral if ephemeral >= 2 * LOW_PORT else 65536  # where the range is not known or too low
    assert all(LOW_PORT <= p < top for p in ports), ports


def test_one_servers_ports_are_distinct(monkeypatch):
    """A server's listeners need ports of their own: free_ports draws again when a draw repeats."""
    from loramux.clients import bench

    draws = iter([20001, 20001, 20002, 20001, 20003])
    monkeypatch.setattr(bench, "free_port", lambda: next(draws))
    assert bench.free_ports(3) == [20001, 20002, 20003]
