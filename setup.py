"""Builds loramux's C++ CPU kernels (server/ops/csrc/cpu_kernels.cpp) into the package at install
time, once per ISA variant: a portable x86-64 baseline, AVX2 and AVX-512 (on aarch64, one NEON
build). ``server/ops/cpu_kernel.py`` picks the widest variant the CPU runs, at run time.

Needs torch importable while building: ``make install`` installs torch first, then this package
with ``--no-build-isolation``. ``LORAMUX_NO_CPU_KERNEL=1`` builds none (GPU hosts). A variant that
fails to compile is skipped with a warning: the torch ops serve where no variant loads.
"""

import os
import platform
import sys

from setuptools import setup

SOURCE = "server/ops/csrc/cpu_kernels.cpp"
VARIANTS = {  # machine -> variant -> compiler flags; names match cpu_kernel.VARIANTS
    "x86_64": {"baseline": ["-march=x86-64", "-mtune=generic"], "avx2": ["-march=x86-64-v3"],
               "avx512": ["-march=x86-64-v4", "-mprefer-vector-width=512"]},
    "aarch64": {"neon": ["-march=armv8-a"]},
}


def cpu_extensions():
    if os.environ.get("LORAMUX_NO_CPU_KERNEL") == "1":
        print("LORAMUX_NO_CPU_KERNEL=1: the C++ CPU kernels are not built", file=sys.stderr)
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("torch is not importable in this build (install it first, then build with "
              "--no-build-isolation): the C++ CPU kernels are not built", file=sys.stderr)
        return [], {}

    class TolerantBuild(BuildExtension):
        """One variant that does not compile (an old compiler, no compiler) skips that variant only."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - the torch ops still serve
                print(f"warning: {ext.name} was not built ({exc}); the torch ops serve without it", file=sys.stderr)

    machine = platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")
    variants = VARIANTS.get(machine, {"baseline": []})
    extensions = [CppExtension(f"loramux.server.ops._cpu_{name}", [SOURCE],
                               # -g0 and a stripped link: Python's default CFLAGS carry -g, 11 MB a variant
                               extra_compile_args=["-O3", "-g0", "-fopenmp", *flags], extra_link_args=["-fopenmp", "-s"])
                  for name, flags in variants.items()]
    return extensions, {"build_ext": TolerantBuild.with_options(use_ninja=True)}


ext_modules, cmdclass = cpu_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
