"""free_port: the ports tests and benchmarks start servers on; pytest-xdist workers never share one."""

import socket

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


def test_outside_xdist_any_free_port_will_do(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert 0 < free_port() < 65536
