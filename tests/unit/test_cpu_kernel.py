"""The packaged C++ CPU kernel: built per ISA variant at install, the widest this CPU runs loaded."""

import ast
import os
import platform
from pathlib import Path

import pytest
import torch

from loramux.server.ops import cpu_kernel
from loramux.server.ops.cpu_kernel import NO_KERNEL_ENV, VARIANTS, load_kernels, variants_for

ROOT = Path(__file__).resolve().parents[2]


def test_variants_are_chosen_by_what_the_cpu_runs():
    assert variants_for("x86_64", "AVX512") == ["avx512", "avx2", "baseline"]
    assert variants_for("x86_64", "AVX2") == ["avx2", "baseline"]
    assert variants_for("AMD64", "DEFAULT") == ["baseline"]
    assert variants_for("aarch64", "DEFAULT") == variants_for("arm64", "SVE256") == ["neon"]
    assert variants_for("riscv64", "DEFAULT") == ["baseline"]


def test_setup_builds_the_variants_the_loader_looks_for():
    tree = ast.parse((ROOT / "setup.py").read_text())
    built = next(ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and node.targets[0].id == "VARIANTS")
    assert {m: set(v) for m, v in built.items()} == {m: {name for name, _ in v} for m, v in VARIANTS.items()}


@pytest.mark.skipif(os.environ.get(NO_KERNEL_ENV) == "1", reason=f"{NO_KERNEL_ENV}=1: no kernel is built")
def test_install_built_every_variant_of_this_machine_into_the_package_and_the_widest_loads():
    folder = Path(cpu_kernel.__file__).parent
    machine = platform.machine().lower()
    for name, _ in VARIANTS.get(machine, (("baseline", None),)):
        assert list(folder.glob(f"_cpu_{name}.*")), f"`make install` did not build the {name} variant into {folder}"
    assert load_kernels().variant == variants_for(machine, torch.backends.cpu.get_cpu_capability())[0]
