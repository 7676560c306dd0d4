"""The C++ decode LoRA op of an older revision against the working tree's, side by side in one process.

On a shared VM the memory's speed moves by more than a kernel change between runs of a minute, so
builds compared in separate processes one after another tell little. This builds the kernel source
of REV (from git) and the working tree's with the same flags (the installed variant's, from setup.py;
the installed build itself is not compared: its setuptools flags differ, and an A/A run against it
read 0.3 ms a decode step apart), loads both, and alternates them: the op alone (``lora``: calls of
32 decode rows over 32 distinct adapters' pages, q|k|v-shaped like the default model's, each page's
A and B one row of memory as the server keeps them, about 596 MiB a pass, and a flat read of as many
bytes), then with ``--engine`` the default model's decode steps (``--engine-model small``:
bench-decode's small Llama's), the old and the new op swapped step by step (``linear_lora`` and
``lora`` both), the median over adjacent pairs of full decode steps.

    python bench/kernel_ab.py --rev REV [--ranks 16,4] [--rounds 9] [--trials 4] [--engine] [--engine-rounds 6]
                              [--engine-model default|small]
"""

from __future__ import annotations

import argparse
import ast
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from loramux.adapters import huge_pages  # noqa: E402
from loramux.adapters.device_pool import page_stores  # noqa: E402
from loramux.adapters.synthetic import ALL_PROJ  # noqa: E402
from loramux.server.builder import build_engine  # noqa: E402
from loramux.server.config import ServerConfig  # noqa: E402
from loramux.server.engine import EngineObserver  # noqa: E402
from loramux.server.model_loader import load_model  # noqa: E402
from loramux.server.models import lora_layout  # noqa: E402
from loramux.server.ops import cpu_kernel  # noqa: E402
from loramux.server.ops.torch_ops import TorchLoRA  # noqa: E402
from loramux.server.torch_threads import in_passing_thread  # noqa: E402

from common import cpu_name, random_prompts, run_batch, write_adapter  # noqa: E402
from engine_decode import build_small_llama  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SOURCE = "server/ops/csrc/cpu_kernels.cpp"
IN, BOUNDS = 576, [0, 576, 768, 960]  # the default model's q|k|v: in 576, q 576, k 192, v 192 columns


def variant_flags(variant: str) -> list[str]:
    """setup.py's compiler flags for ``variant`` (read from its VARIANTS literal, not imported:
    importing setup.py would run setup())."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "VARIANTS" for t in node.targets):
            for flags in ast.literal_eval(node.value).values():
                if variant in flags:
                    return flags[variant]
    raise SystemExit(f"setup.py has no variant {variant!r}")


def build(tag: str, rev: str | None, variant: str, tmp: Path):
    """The kernel source of ``rev`` (None: the working tree's), built as a module of its own."""
    from torch.utils.cpp_extension import load

    if rev is None:
        source = (REPO / SOURCE).read_text()
    else:
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{SOURCE}"], check=True,
                                capture_output=True, text=True).stdout
    (tmp / tag).mkdir()
    path = tmp / tag / "cpu_kernels.cpp"
    path.write_text(source)
    flags = ["-O3", "-g0", "-fopenmp", *variant_flags(variant)]
    return load(f"{tag}_cpu_{variant}", [str(path)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                build_directory=str(tmp / tag), verbose=False)


def op_rounds(old, new, rank: int, rounds: int, trials: int) -> None:
    """The op alone: each trial, ``rounds`` rounds of (flat read, old, new), medians printed."""
    width = BOUNDS[-1]
    adapters = 596 * 2**20 // 4 // (rank * (3 * IN + width))
    pages = adapters * rank
    (a, b), = page_stores([((pages, 3, IN), (pages, width))], torch.float32, "cpu", interleave=True)  # as served
    a.normal_(), b.normal_()
    flat = huge_pages.zeros((pages * (3 * IN + width),), torch.float32, "cpu").fill_(1.0)
    order = torch.randperm(adapters)[: adapters // 32 * 32]
    calls = (order[:, None] * rank + torch.arange(rank)).view(-1, 32 * rank)  # each adapter's pages consecutive
    x, rows = torch.randn(32, IN), torch.arange(32)
    none_i, none_l, none_f = torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.long), torch.empty(0)
    ys = {}

    def run(kernels, tag) -> float:
        y = torch.zeros(32, width)
        t = time.perf_counter()
        for call in calls:
            kernels.lora(y, x, a, b, rows, call.contiguous(), none_i, rank, BOUNDS, [0, 1, 2], none_l, none_f)
        ys[tag] = y
        return time.perf_counter() - t

    def read() -> float:
        t = time.perf_counter()
        flat.sum()
        return time.perf_counter() - t

    for _ in range(trials):
        times = {"flat": [], "old": [], "new": []}
        for _ in range(rounds):
            times["flat"].append(read())
            times["old"].append(run(old, "old"))
            times["new"].append(run(new, "new"))
        m = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        diff = (ys["old"] - ys["new"]).abs().max().item()
        print(f"  rank {rank}: flat read {m['flat']:6.2f} ms; old {m['old']:6.2f} ms ({m['old'] / m['flat']:.2f}x), "
              f"new {m['new']:6.2f} ms ({m['new'] / m['flat']:.2f}x); new/old {m['new'] / m['old']:.3f}; "
              f"largest difference {diff:.2e}", flush=True)


class Alternate(EngineObserver):
    """Swaps the runner's op between the two ``ops`` after every step, which of them goes first
    swapped each pair of steps (an A/A run with one order favoured the second by 0.1 ms a step);
    records full decode steps in order."""

    def __init__(self, runner, ops: dict, full_batch: int):
        self.runner, self.ops, self.names, self.full_batch = runner, ops, list(ops), full_batch
        self.steps: list[tuple[str | None, float]] = []
        runner.apply_lora = ops[self.op_of(0)]

    def op_of(self, i: int) -> str:
        """Step i's op: pairs (0, 1), (2, 3), ... in the orders (a, b), (b, a), (a, b), ..."""
        return self.names[(i // 2 + i) % 2]

    def step(self, stats) -> None:
        name = self.op_of(len(self.steps))
        full = stats.num_prefill_tokens == 0 and stats.num_decode_tokens == self.full_batch
        self.steps.append((name if full else None, stats.seconds))
        self.runner.apply_lora = self.ops[self.op_of(len(self.steps))]

    def paired(self) -> list[float]:
        """new - old over adjacent full decode steps."""
        s = self.steps
        return [(a[1] - b[1]) if a[0] == "new" else (b[1] - a[1])
                for a, b in zip(s[:-1:2], s[1::2], strict=True) if a[0] and b[0] and a[0] != b[0]]


@in_passing_thread
def engine_pairs(old, new, rank: int, rounds: int, tmp: Path, model: str | None = None) -> None:
    n = 32
    config = ServerConfig(model=model, max_batch_size=n, max_tokens_per_step=512, max_model_len=120, default_max_new_tokens=64,
                          max_lora_rank=rank, max_device_adapters=n, max_host_adapters=n, metrics_port=0,
                          prefix_caching=False)
    loaded = load_model(config)
    layout = lora_layout(loaded.hf_model.config)
    adapters = tuple((f"a{i}", str(write_adapter(tmp / f"r{rank}-a{i}", layout, rank, seed=i, targets=ALL_PROJ)))
                     for i in range(n))
    built = build_engine(ServerConfig(**{**config.__dict__, "adapters": adapters}), loaded)
    engine, runner = built.engine, built.engine.runner
    served = runner.apply_lora
    if served.name != "cpp":
        raise SystemExit("the engine's LoRA ops are not the C++ kernel's")
    ops = {}
    for name, kernels in (("new", new), ("old", old)):  # both as the server builds its own
        ops[name] = TorchLoRA(kernels.lora)
        if served.base_linear_rows:
            ops[name].use_base_linear(kernels.linear_lora, served.base_linear_rows)
    engine.start()
    try:
        prompts, ids = random_prompts(loaded.hf_model.config.vocab_size, n, 16), [a for a, _ in adapters]
        run_batch(engine, prompts, ids, 2)  # every adapter resident
        alternate = Alternate(runner, ops, n)
        engine.observers.append(alternate)
        try:
            for _ in range(rounds):
                run_batch(engine, prompts, ids, 64)
        finally:
            engine.observers.remove(alternate)
            runner.apply_lora = served
    finally:
        engine.stop()
    d = alternate.paired()
    print(f"  rank {rank}, {loaded.name}'s decode steps, 32 rows of 32 adapters: new - old {statistics.median(d) * 1e3:+.3f} "
          f"ms by the median of {len(d)} adjacent pairs ({sum(x < 0 for x in d)} faster)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="the older revision (git) whose kernel source is compared")
    ap.add_argument("--ranks", default="16,4")
    ap.add_argument("--rounds", type=int, default=9, help="rounds of the op alone per trial")
    ap.add_argument("--trials", type=int, default=4, help="trials per rank (the memory's speed moves between them)")
    ap.add_argument("--engine", action="store_true", help="also alternate the two ops step by step in the engine")
    ap.add_argument("--engine-rounds", type=int, default=6)
    ap.add_argument("--engine-model", choices=["default", "small"], default="default",
                    help="the engine's model: the default one, or bench-decode's small Llama (built on the fly)")
    args = ap.parse_args()
    installed = cpu_kernel.load_kernels()
    if installed is None:
        raise SystemExit("no C++ kernel is installed (the engine's ops need it)")
    variant = installed.variant
    print(f"CPU: {cpu_name()}; variant {variant}; {args.rev} against the working tree", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        old, new = build("old", args.rev, variant, Path(tmp)), build("new", None, variant, Path(tmp))
        model = build_small_llama(Path(tmp)) if args.engine and args.engine_model == "small" else None
        for rank in (int(r) for r in args.ranks.split(",")):
            op_rounds(old, new, rank, args.rounds, args.trials)
            if args.engine:
                engine_pairs(old, new, rank, args.engine_rounds, Path(tmp), model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
