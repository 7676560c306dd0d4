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


@pytest.mark.skipif(os.environ.get(NO_KERNEL_ENV) == "1", reason=f"{NO_KERNEL_ENV}=1: no kernel is built")
@pytest.mark.parametrize("variant", variants_for(platform.machine(), torch.backends.cpu.get_cpu_capability()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_variant_this_cpu_runs_matches_the_reference(variant, dtype):
    """Not only the widest: a CPU without AVX2 loads the baseline build, whose vector code differs.
    Segments of 4+ rows take the tiled path (float32), shorter ones and decode rows the per-row one."""
    import importlib

    from loramux.server.ops import plan_segments, plan_tokens
    from loramux.server.ops.reference import bgmv_reference, sgmv_reference

    lora = importlib.import_module(f"loramux.server.ops._cpu_{variant}").lora
    gen = torch.Generator().manual_seed(5)
    rank, in_f = 15, 37  # 8 + 4 + 3 pages a decode pass; rank and widths off every vector and tile multiple
    bounds = (0, 40, 56, 79)  # q | k | v of 40, 16 and 23 columns
    a = (torch.randn(4 * rank, 3, in_f, generator=gen) / in_f**0.5).to(dtype)
    b = (torch.randn(4 * rank, 79, generator=gen) / 4).to(dtype)
    pages = [torch.randperm(4 * rank, generator=gen)[:rank] for _ in range(3)]
    seg_starts, seg_pages = [0, 9, 10, 10, 17], [pages[0], pages[1], None, pages[2]]
    cases = [(plan_segments(seg_starts, seg_pages), lambda ref, j, cols: sgmv_reference(
        ref, x.float(), a[:, j].float(), b[:, cols].float(), seg_starts, seg_pages))]
    token_adapter = [0, 2, -1, 1, 0, 2, 2]
    cases.append((plan_tokens(token_adapter, pages), lambda ref, j, cols: bgmv_reference(
        ref, x.float(), a[:, j].float(), b[:, cols].float(), token_adapter, pages)))
    for plan, reference in cases:
        g = plan.groups[0]
        n = 17 if g.group_ends is not None else len(token_adapter)
        x = torch.randn(n, in_f, generator=gen).to(dtype)
        y = torch.randn(n, 79, generator=gen).to(dtype)
        ref = y.float().clone()
        for j in (0, 2):  # q and v, not k: k's columns stay as they were
            cols = slice(bounds[j], bounds[j + 1])
            out = ref[:, cols].clone()
            reference(out, j, cols)
            ref[:, cols] = out
        ends = g.group_ends if g.group_ends is not None else torch.empty(0, dtype=torch.int32)
        lora(y, x, a, b, g.rows, g.pages, ends, rank, list(bounds), [0, 2])
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        assert (y.float() - ref).abs().max() <= tol * ref.abs().max().clamp(min=1)
