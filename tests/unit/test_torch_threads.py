"""One-off torch work runs in a thread that ends, and the adapter I/O thread runs torch serially, so
the engine thread keeps the only OpenMP team, one thread smaller while adapter I/O runs."""

import os
import threading

import pytest
import torch

from loramux.server.torch_threads import (
    IOCoreShare,
    flush_denormals,
    in_passing_thread,
    openmp_library,
    serial_openmp,
)

from helpers import SUBNORMAL_ELEMENTS, subnormals_made


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


@pytest.mark.parametrize("on", [True, False])
def test_flushing_subnormals_holds_in_the_thread_and_the_team_it_makes_after(on):
    seen = []

    def worker():
        seen.append((flush_denormals(on), subnormals_made()))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    (took, left), = seen
    if on and not took:
        pytest.skip("this CPU cannot flush subnormals")
    assert took == on and left == (0 if on else SUBNORMAL_ELEMENTS)


class RecordingOpenMP:
    def __init__(self):
        self.calls = []

    def omp_set_num_threads(self, n):
        self.calls.append(n)


def test_io_core_share_gives_a_thread_per_running_io_job_and_takes_it_back():
    lib = RecordingOpenMP()
    share = IOCoreShare(3, lib)
    share.check()
    assert lib.calls == []  # nothing running: the team stays whole, and nothing is called
    with share.io_job():
        share.check()
        share.check()  # resized once per change, not per check
        assert lib.calls == [2]
        with share.io_job():
            share.check()
            assert lib.calls == [2, 1]
            with share.io_job():
                share.check()  # never below one thread
                assert lib.calls == [2, 1]
    share.check()
    assert lib.calls == [2, 1, 3]
    with pytest.raises(RuntimeError), share.io_job():
        raise RuntimeError("a failed job ends its share too")
    share.check()
    assert lib.calls == [2, 1, 3]


def test_a_released_io_job_gives_its_core_back_once():
    lib = RecordingOpenMP()
    share = IOCoreShare(2, lib)
    with share.io_job() as hung, share.io_job():
        share.check()
        hung.release()  # abandoned after the read timeout: blocked, not computing
        hung.release()
        share.check()
        assert lib.calls == [1]  # two jobs, one released: one thread given, not two
    share.check()
    assert lib.calls == [1, 2]


@pytest.mark.skipif(openmp_library() is None, reason="torch does not use libgomp here")
@pytest.mark.parametrize("threads, cores, shared", [(1, 1, False), (1, 4, False), (4, 4, True), (4, 8, False),
                                                    (8, 4, True)])
def test_io_core_share_only_where_the_team_has_every_core(monkeypatch, threads, cores, shared):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert (IOCoreShare.for_this_process() is not None) == shared


@pytest.mark.skipif(openmp_library() is None, reason="torch does not use libgomp here")
def test_io_core_share_resizes_only_the_checking_thread():
    before = torch.get_num_threads()
    # Once set process-wide, torch sets it again in each thread on first use: the share must go after.
    torch.set_num_threads(before)
    share = IOCoreShare(2, openmp_library())
    seen = []

    def engine():
        with share.io_job():
            share.check()
            seen.append(torch.get_num_threads())
        share.check()
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=engine)
    thread.start()
    thread.join()
    assert seen == [1, 2]
    assert torch.get_num_threads() == before
