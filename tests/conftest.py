import dataclasses
import os
import sys
from pathlib import Path

import pytest

# Under pytest-xdist (`make test`) two workers and the servers they start share the cores. libgomp's
# default lets an idle process's OpenMP threads spin for work, taking cores from the busy ones (the
# suite's CPU time rose by half); passive waiting is read when torch loads, so it is set first.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# A process that a fatal signal ends (a crash in native code, an abort during teardown) prints
# every thread's Python stack: the servers and benchmark scripts the tests start inherit it.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from loramux.server.torch_threads import usable_cores  # noqa: E402

# No per-example deadline: CI machines' speed varies, and a slow example is not a failure here
# (timing targets live in the benchmarks).
settings.register_profile("loramux", deadline=None)
settings.load_profile("loramux")

if not torch.cuda.is_available():  # Triton kernels run in its interpreter; read when they are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from triton.runtime import interpreter as _triton_interpreter
    except ImportError:
        _triton_interpreter = None
    # The interpreter checks every int32 add, sub and mul for overflow, as a GPU build does only in
    # debug mode: a third of its time in the kernel tests, for offsets these tests' tensors, far
    # below 2**31 elements, cannot reach.
    if getattr(_triton_interpreter, "interpreter_builder", None) is not None:
        _builder = _triton_interpreter.interpreter_builder
        _builder.options = dataclasses.replace(_builder.options, sanitize_overflow=False)

# Each xdist worker's torch gets its share of the cores, not all of them: two workers' teams of two
# threads on a 2-core VM wait on each other for cores (four engine test files: 267-277 s against
# 289-294 s wall, half the system time). The servers the tests start are processes of their own,
# with the default. Tests about the engine's team take the whole of it again (``openmp_team``).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(max(1, usable_cores() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

sys.path.insert(0, str(Path(__file__).parent))

from helpers import ADAPTER_VARIANTS, build_adapter, build_llama  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _small_kv_pools_on_cuda():
    """On a GPU host an engine's default KV pool takes CUDA_KV_FRACTION (80%) of the device memory
    still free, so test processes sharing the GPU (xdist workers) would starve each other: each
    takes 5% here, gigabytes, where the tests' tiny models need megabytes."""
    if not torch.cuda.is_available():
        yield
        return
    from loramux.server import builder

    kept, builder.CUDA_KV_FRACTION = builder.CUDA_KV_FRACTION, 0.05
    yield
    builder.CUDA_KV_FRACTION = kept


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_adapters(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: build_adapter(tiny_llama, root / name, seed=i + 1, **kwargs)
        for i, (name, kwargs) in enumerate(ADAPTER_VARIANTS.items())
    }


@pytest.fixture
def openmp_team():
    """torch's intra-op threads at a thread per usable core, as a server runs, for the test: those
    that check the engine's OpenMP team (its size, what its threads do) would pass trivially with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(usable_cores())
    yield
    torch.set_num_threads(before)
