"""A fused CPU BGMV kernel (C++, compiled on first use with torch's cpp_extension).

The torch ops gather each decode row's A pages into a buffer, shrink with ``bmm`` and expand with
``embedding_bag``: three passes and their call overhead, 200+ times a step. This kernel does one
pass per row over the row's pages where the page store keeps them: ``v = A_P x``, then
``y += v B_P``, accumulating in float32. On a 2-core VM it runs a decode step's 210 calls over 32
distinct adapters in about 20 ms against 47 ms for the torch ops. Pages go four at a time, so
the shrink keeps four independent sums and the expand touches its accumulator once per four pages. It needs a C++ compiler; without one, ``load_bgmv`` returns None and the torch ops serve.
``python -m loramux.server.ops.cpu_kernel`` builds it ahead of time (``make install`` does).
"""

from __future__ import annotations

import functools
import logging
import os

log = logging.getLogger(__name__)

SOURCE = r'''
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>

// Per row i, with pages P = pages[i*rank : (i+1)*rank]:
//   v[k] = x[rows[i]] . a[P[k]]             (shrink: reads each A page in place, once)
//   y[rows[i]] += sum_k v[k] * b[P[k]]       (expand: reads each B page in place, once)
// Accumulates in float32; rows are split across torch's intra-op threads.
template <typename T>
static void bgmv_rows(T* y, const T* x, const T* a, const T* b, const int64_t* rows, const int64_t* pages,
                      int64_t n, int64_t rank, int64_t in, int64_t out, int64_t sy, int64_t sx, int64_t sa, int64_t sb) {
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> v(rank), acc(out);
    float* ac = acc.data();
    for (int64_t i = lo; i < hi; ++i) {
      const T* xi = x + rows[i] * sx;
      const int64_t* p = pages + i * rank;
      int64_t k = 0;
      for (; k + 4 <= rank; k += 4) {  // four pages at a time: four independent sums, x read once
        const T *a0 = a + p[k] * sa, *a1 = a + p[k + 1] * sa, *a2 = a + p[k + 2] * sa, *a3 = a + p[k + 3] * sa;
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t j = 0; j < in; ++j) {
          const float xj = static_cast<float>(xi[j]);
          s0 += xj * static_cast<float>(a0[j]);
          s1 += xj * static_cast<float>(a1[j]);
          s2 += xj * static_cast<float>(a2[j]);
          s3 += xj * static_cast<float>(a3[j]);
        }
        v[k] = s0; v[k + 1] = s1; v[k + 2] = s2; v[k + 3] = s3;
      }
      for (; k < rank; ++k) {
        const T* ak = a + p[k] * sa;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < in; ++j) s += static_cast<float>(xi[j]) * static_cast<float>(ak[j]);
        v[k] = s;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      k = 0;
      for (; k + 4 <= rank; k += 4) {  // four pages per pass over the accumulator
        const T *b0 = b + p[k] * sb, *b1 = b + p[k + 1] * sb, *b2 = b + p[k + 2] * sb, *b3 = b + p[k + 3] * sb;
        const float v0 = v[k], v1 = v[k + 1], v2 = v[k + 2], v3 = v[k + 3];
#pragma omp simd
        for (int64_t j = 0; j < out; ++j)
          ac[j] += v0 * static_cast<float>(b0[j]) + v1 * static_cast<float>(b1[j]) + v2 * static_cast<float>(b2[j]) +
                   v3 * static_cast<float>(b3[j]);
      }
      for (; k < rank; ++k) {
        const T* bk = b + p[k] * sb;
        const float vk = v[k];
#pragma omp simd
        for (int64_t j = 0; j < out; ++j) ac[j] += vk * static_cast<float>(bk[j]);
      }
      T* yi = y + rows[i] * sy;
#pragma omp simd
      for (int64_t j = 0; j < out; ++j) yi[j] = static_cast<T>(static_cast<float>(yi[j]) + ac[j]);
    }
  });
}

void bgmv(torch::Tensor y, torch::Tensor x, torch::Tensor a, torch::Tensor b, torch::Tensor rows,
          torch::Tensor pages, int64_t rank) {
  TORCH_CHECK(y.device().is_cpu() && x.scalar_type() == y.scalar_type() && a.scalar_type() == x.scalar_type() &&
              b.scalar_type() == x.scalar_type(), "bgmv: CPU tensors of one dtype");
  TORCH_CHECK(y.stride(1) == 1 && x.stride(1) == 1 && a.stride(1) == 1 && b.stride(1) == 1, "bgmv: unit-stride rows");
  TORCH_CHECK(rows.scalar_type() == at::kLong && pages.scalar_type() == at::kLong && rows.is_contiguous() &&
              pages.is_contiguous() && pages.numel() == rows.numel() * rank, "bgmv: int64 rows [n], pages [n * rank]");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bgmv", [&] {
    bgmv_rows<scalar_t>(y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                        rows.data_ptr<int64_t>(), pages.data_ptr<int64_t>(), rows.size(0), rank, x.size(1), y.size(1),
                        y.stride(0), x.stride(0), a.stride(0), b.stride(0));
  });
}
'''


NO_KERNEL_ENV = "LORAMUX_NO_CPU_KERNEL"  # "1": never build it (GPU hosts, where it would waste minutes)


@functools.cache
def load_bgmv():
    """The compiled ``bgmv(y, x, a_store, b_store, rows, pages, rank)``, or None if it cannot be
    built or ``LORAMUX_NO_CPU_KERNEL=1`` says not to."""
    if os.environ.get(NO_KERNEL_ENV) == "1":
        log.info("%s=1: the C++ BGMV kernel is not built; the torch ops serve", NO_KERNEL_ENV)
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        module = load_inline("loramux_bgmv", cpp_sources=SOURCE, functions=["bgmv"],
                             extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a build error: the torch ops still work
        log.warning("the C++ BGMV kernel could not be built (%s); decode uses the torch ops", exc)
        return None
    return module.bgmv


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print("C++ BGMV kernel:", "ready" if load_bgmv() is not None else "unavailable (torch ops will be used)")
