import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# No per-example deadline: CI machines' speed varies, and a slow example is not a failure here
# (timing targets live in the benchmarks).
settings.register_profile("loramux", deadline=None)
settings.load_profile("loramux")

if not torch.cuda.is_available():  # Triton kernels run in its interpreter; read when they are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

from helpers import ADAPTER_VARIANTS, build_adapter, build_llama  # noqa: E402


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
