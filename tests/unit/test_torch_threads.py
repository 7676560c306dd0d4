"""One-off torch work runs in a thread that ends, so the engine thread keeps the only OpenMP team."""

import threading

import pytest

from loramux.server.torch_threads import in_passing_thread


def test_runs_in_a_thread_that_has_ended_and_returns_its_result():
    seen = []

    @in_passing_thread
    def work(a, b=0):
        seen.append(threading.current_thread())
        return a + b

    assert work(2, b=3) == 5
    (thread,) = seen
    assert thread is not threading.current_thread()
    assert not thread.is_alive()
    assert thread.name == f"{threading.current_thread().name}/work"


def test_exceptions_reach_the_caller():
    @in_passing_thread
    def fails():
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        fails()


def test_model_loading_building_and_adapter_io_are_wrapped():
    from loramux.adapters.manager import AdapterManager
    from loramux.server.builder import build_engine
    from loramux.server.model_loader import load_model

    for fn in (load_model, build_engine, AdapterManager._read_into_host, AdapterManager._fill):
        assert fn.__wrapped__ is not None, fn
