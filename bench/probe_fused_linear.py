"""Probe (AVX-512 CPUs only): can a decode step's LoRA reads hide under the base matmuls?

Issue #18's floor is one streaming read of a step's distinct adapter bytes; the LoRA path costs
about 1.5x that on the Intel VM, in series with the base model's linears. This probe asks whether
a linear that does both in one kernel does better: the base weights packed as [N/48, K, 48] for an
8 x 48 AVX-512 tile (no transpose at run time), and the LoRA of every row (its own adapter's rank
rows, scattered over a page store as the engine's are) either

- in series: shrink v[m, r] = x[m] . A[pa[m, r]], then the base tiles, then the expand
  y[m, :] += sum_r v[m, r] * B[pb[m, r], :]  ("serial"), or
- fused: the shrink interleaved with the first half of each thread's tiles (its A rows
  software-prefetched into L2 during them), the expand folded into the second half's tile
  epilogues, whose B rows are prefetched during the tile (``--rate`` cache lines a k-step)
  ("fused"), or
- with every page line the thread reads prefetched during its base tiles and read after them
  ("prefetched, then LoRA").

Shapes are the default model's four fused linears a layer (q|k|v, o, gate|up, down) times 30
layers, batch 32, 32 distinct rank-16 adapters on all seven projections (596 MiB of pages a step,
as `make bench-decode`'s default model); the floor is a sum over as many bytes. Every variant is
checked against torch first. Two threads (the 2-core VM's), in the kernel and in torch.
Prints medians of --rounds passes over all 120 calls.

    python bench/probe_fused_linear.py [--rate 1] [--rounds 9]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_name  # noqa: E402

SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>
#include <vector>

static inline float dot(const float* a, const float* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = s0;
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c + 16), _mm512_loadu_ps(b + c + 16), s1);
  }
  for (; c + 16 <= n; c += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c), s0);
  float s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  for (; c < n; ++c) s += a[c] * b[c];
  return s;
}

// Software prefetch into L2 at `rate` lines a k-step, through a list of line addresses.
struct Prefetch {
  std::vector<const char*> lines;
  size_t next = 0;
  double rate = 0, credit = 0;
  inline void step() {
    credit += rate;
    while (credit >= 1 && next < lines.size()) { _mm_prefetch(lines[next++], _MM_HINT_T1); credit -= 1; }
  }
};

// y[0:8, n0:n0+48] = x[0:8] . W block (+ sum_r v[i, r] * B[pb[i, r], n0:n0+48] when B is given).
static inline void tile(const float* x, int64_t K, const float* wp, float* y, int64_t N, int64_t n0, Prefetch* pf,
                        const float* v, int64_t Rv, const float* B, const int64_t* pb, int64_t Rb) {
  __m512 acc[8][3];
  for (auto& row : acc) for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w0 = _mm512_loadu_ps(wp + k * 48), w1 = _mm512_loadu_ps(wp + k * 48 + 16),
                 w2 = _mm512_loadu_ps(wp + k * 48 + 32);
    if (pf) pf->step();
    for (int i = 0; i < 8; ++i) {
      const __m512 xb = _mm512_set1_ps(x[i * K + k]);
      acc[i][0] = _mm512_fmadd_ps(xb, w0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(xb, w1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(xb, w2, acc[i][2]);
    }
  }
  if (B) for (int i = 0; i < 8; ++i) for (int64_t r = 0; r < Rb; ++r) {
    const float* b = B + pb[i * Rb + r] * N + n0;
    const __m512 vb = _mm512_set1_ps(v[i * Rv + r]);
    for (int j = 0; j < 3; ++j) acc[i][j] = _mm512_fmadd_ps(vb, _mm512_loadu_ps(b + 16 * j), acc[i][j]);
  }
  for (int i = 0; i < 8; ++i) for (int j = 0; j < 3; ++j) _mm512_storeu_ps(y + i * N + n0 + 16 * j, acc[i][j]);
}

// y[m, n0:n0+48] += sum_r v[m, r] * B[pb[m, r], n0:n0+48] for rows m0..m1.
static void expand(int64_t m0, int64_t m1, float* y, int64_t N, int64_t n0, const float* v, int64_t Rv,
                   const float* B, const int64_t* pb, int64_t Rb) {
  for (int64_t m = m0; m < m1; ++m) {
    float* d = y + m * N + n0;
    __m512 a[3] = {_mm512_loadu_ps(d), _mm512_loadu_ps(d + 16), _mm512_loadu_ps(d + 32)};
    for (int64_t r = 0; r < Rb; ++r) {
      const float* b = B + pb[m * Rb + r] * N + n0;
      const __m512 vb = _mm512_set1_ps(v[m * Rv + r]);
      for (int j = 0; j < 3; ++j) a[j] = _mm512_fmadd_ps(vb, _mm512_loadu_ps(b + 16 * j), a[j]);
    }
    for (int j = 0; j < 3; ++j) _mm512_storeu_ps(d + 16 * j, a[j]);
  }
}

torch::Tensor pack(torch::Tensor W) {  // [N, K] -> [N/48, K, 48]
  return W.view({W.size(0) / 48, 48, W.size(1)}).transpose(1, 2).contiguous();
}

// mode 0: base only; 1: shrink, base, expand in series; 2: fused; 3: pages prefetched during the base, read after. M a multiple of 8, N of 48.
torch::Tensor run(torch::Tensor X, torch::Tensor Wp, torch::Tensor A, torch::Tensor pa, torch::Tensor B,
                  torch::Tensor pb, int64_t mode, double rate) {
  const int64_t M = X.size(0), K = X.size(1), NB = Wp.size(0), N = NB * 48, Ra = pa.size(1), Rb = pb.size(1);
  auto Y = torch::empty({M, N}, X.options());
  auto V = torch::empty({M, Ra}, X.options());
  const float *x = X.data_ptr<float>(), *w = Wp.data_ptr<float>(), *a = A.data_ptr<float>(), *b = B.data_ptr<float>();
  const int64_t *ap = pa.data_ptr<int64_t>(), *bp = pb.data_ptr<int64_t>();
  float *y = Y.data_ptr<float>(), *v = V.data_ptr<float>();
  const int64_t tiles = M / 8;
#pragma omp parallel num_threads(2)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t b0 = NB * t / nt, b1 = NB * (t + 1) / nt, bm = mode == 2 ? b0 + (b1 - b0) / 2 : b1;
    const int64_t r0 = M * t / nt, units = (M * (t + 1) / nt - r0) * Ra, unit_lines = (K * 4 + 63) / 64;
    auto shrink = [&](int64_t u) {
      const int64_t m = r0 + u / Ra, r = u % Ra;
      v[m * Ra + r] = dot(x + m * K, a + ap[m * Ra + r] * K, K);
    };
    auto base_tiles = [&](int64_t lo, int64_t hi, Prefetch* pf, int64_t* done) {
      for (int64_t nb = lo; nb < hi; ++nb) for (int64_t mt = 0; mt < tiles; ++mt) {
        tile(x + mt * 8 * K, K, w + nb * K * 48, y + mt * 8 * N, N, nb * 48, pf, nullptr, 0, nullptr, nullptr, 0);
        if (done) for (; *done < units && (*done + 1) * unit_lines <= (int64_t)pf->next; ++*done) shrink(*done);
      }
    };
    if (mode == 0) {
      base_tiles(b0, b1, nullptr, nullptr);
    } else if (mode == 1) {
      for (int64_t u = 0; u < units; ++u) shrink(u);
#pragma omp barrier
      base_tiles(b0, b1, nullptr, nullptr);
      for (int64_t nb = b0; nb < b1; ++nb) expand(0, M, y, N, nb * 48, v, Ra, b, bp, Rb);
    } else if (mode == 3) {  // every page line this thread reads prefetched during its tiles, then read
      Prefetch lines;
      for (int64_t u = 0; u < units; ++u) {
        const char* p = reinterpret_cast<const char*>(a + ap[(r0 + u / Ra) * Ra + u % Ra] * K);
        for (int64_t l = 0; l < unit_lines; ++l) lines.lines.push_back(p + l * 64);
      }
      for (int64_t nb = b0; nb < b1; ++nb) for (int64_t m = 0; m < M; ++m) for (int64_t r = 0; r < Rb; ++r)
        for (int l = 0; l < 3; ++l) lines.lines.push_back(reinterpret_cast<const char*>(b + bp[m * Rb + r] * N + nb * 48) + l * 64);
      const int64_t steps = (b1 - b0) * tiles * K;
      lines.rate = steps ? std::min(rate, double(lines.lines.size()) / steps + 0.01) : 0;
      base_tiles(b0, b1, &lines, nullptr);
      for (int64_t u = 0; u < units; ++u) shrink(u);
#pragma omp barrier
      for (int64_t nb = b0; nb < b1; ++nb) expand(0, M, y, N, nb * 48, v, Ra, b, bp, Rb);
    } else {
      Prefetch pa_lines;  // this thread's A rows, in shrink order
      for (int64_t u = 0; u < units; ++u) {
        const char* p = reinterpret_cast<const char*>(a + ap[(r0 + u / Ra) * Ra + u % Ra] * K);
        for (int64_t l = 0; l < unit_lines; ++l) pa_lines.lines.push_back(p + l * 64);
      }
      const int64_t steps1 = (bm - b0) * tiles * K;
      pa_lines.rate = steps1 ? std::min(rate, double(pa_lines.lines.size()) / steps1 + 0.01) : 0;
      int64_t done = 0;
      base_tiles(b0, bm, &pa_lines, &done);
      for (; done < units; ++done) shrink(done);
#pragma omp barrier
      Prefetch pb_lines;  // B rows of this thread's columns, in use order
      auto add = [&](int64_t nb, int64_t m0, int64_t m1) {
        for (int64_t m = m0; m < m1; ++m) for (int64_t r = 0; r < Rb; ++r) {
          const char* p = reinterpret_cast<const char*>(b + bp[m * Rb + r] * N + nb * 48);
          for (int l = 0; l < 3; ++l) pb_lines.lines.push_back(p + l * 64);
        }
      };
      for (int64_t nb = bm; nb < b1; ++nb) for (int64_t mt = 0; mt < tiles; ++mt) add(nb, mt * 8, mt * 8 + 8);
      for (int64_t nb = b0; nb < bm; ++nb) add(nb, 0, M);
      const int64_t steps2 = (b1 - bm) * tiles * K;
      pb_lines.rate = steps2 ? std::min(rate, double(pb_lines.lines.size()) / steps2 + 0.01) : 0;
      for (int64_t nb = bm; nb < b1; ++nb) for (int64_t mt = 0; mt < tiles; ++mt)
        tile(x + mt * 8 * K, K, w + nb * K * 48, y + mt * 8 * N, N, nb * 48, &pb_lines, v + mt * 8 * Ra, Ra, b,
             bp + mt * 8 * Rb, Rb);
      for (int64_t nb = b0; nb < bm; ++nb) expand(0, M, y, N, nb * 48, v, Ra, b, bp, Rb);
    }
  }
  return Y;
}
"""

# (N, K, A rank rows a position: kinds x rank) of the default model's fused linears; B: 16 rows.
SHAPES = [(960, 576, 48), (576, 576, 16), (3072, 576, 32), (576, 1536, 16)]
RANK, ROWS, LAYERS = 16, 32, 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=1.0, help="most prefetched cache lines a k-step (fused)")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    if "avx512f" not in Path("/proc/cpuinfo").read_text():
        print("this probe needs an AVX-512 CPU; skipped")
        return
    ext = load_inline("probe_fused_linear", cpp_sources=SOURCE, functions=["pack", "run"],
                      extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    torch.set_num_threads(2)
    rng = random.Random(0)
    calls = []
    for _ in range(LAYERS):
        for n, k, ra in SHAPES:
            w = torch.randn(n, k) * 0.05
            a, b = torch.randn(ROWS * ra, k) * 0.05, torch.randn(ROWS * RANK, n) * 0.05
            pa, pb = list(range(ROWS * ra)), list(range(ROWS * RANK))
            rng.shuffle(pa)
            rng.shuffle(pb)
            calls.append((w, ext.pack(w), a, torch.tensor(pa).view(ROWS, ra), b, torch.tensor(pb).view(ROWS, RANK)))
    xs = {k: torch.randn(ROWS, k) for k in {k for _, k, _ in SHAPES}}
    for w, wp, a, pa, b, pb in calls[:4]:
        x = xs[w.shape[1]]
        v = torch.einsum("mk,mrk->mr", x, a[pa])
        ref = x @ w.T + torch.einsum("mr,mrn->mn", v[:, :RANK], b[pb])
        for mode in (1, 2, 3):
            torch.testing.assert_close(ext.run(x, wp, a, pa, b, pb, mode, args.rate), ref, rtol=1e-4, atol=1e-4)
    page_bytes = sum((pa.numel() * a.shape[1] + pb.numel() * b.shape[1]) * 4 for _, _, a, pa, b, pb in calls)
    stream = torch.randn(page_bytes // 4)
    def packed(mode: int):
        return lambda: [ext.run(xs[w.shape[1]], wp, a, pa, b, pb, mode, args.rate) for w, wp, a, pa, b, pb in calls]

    variants = {
        "torch linear, base": lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for w, *_ in calls],
        "packed, base": packed(0),
        "packed + LoRA in series": packed(1),
        "packed + LoRA fused": packed(2),
        "packed, pages prefetched, then LoRA": packed(3),
        "floor (one read of the pages)": lambda: stream.sum(),
    }
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    ms = {name: statistics.median(v[1:] or v) * 1e3 for name, v in times.items()}
    print(f"{cpu_name()}; {page_bytes / 2**20:.0f} MiB of pages a step, {len(calls)} calls")
    for name, v in ms.items():
        print(f"  {name:36s} {v:7.1f} ms")
    floor, base = ms["floor (one read of the pages)"], ms["packed, base"]
    for name in ("packed + LoRA in series", "packed + LoRA fused", "packed, pages prefetched, then LoRA"):
        print(f"  {name}: overhead {ms[name] - base:.1f} ms = {(ms[name] - base) / floor:.2f}x the floor")
    print(f"  packed / torch base: {base / ms['torch linear, base']:.2f}")


if __name__ == "__main__":
    main()
