"""One-off torch work runs in a thread that ends, and the adapter I/O thread runs torch serially, so
the engine thread keeps the only OpenMP team."""

import threading

import pytest
import torch

from loramux.server.torch_threads import in_passing_thread, openmp_library, serial_openmp


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


def test_model_loading_and_building_run_in_passing_threads():
    from loramux.server.builder import build_engine
    from loramux.server.model_loader import load_model

    for fn in (load_model, build_engine):
        assert fn.__wrapped__ is not None, fn


@pytest.mark.skipif(openmp_library() is None, reason="torch does not use libgomp here")
def test_serial_openmp_changes_only_the_calling_thread():
    before = torch.get_num_threads()
    seen = []

    def worker():
        serial_openmp()
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [1]
    assert torch.get_num_threads() == before
