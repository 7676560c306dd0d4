// loramux's CPU kernels, built into the package by `make install` (setup.py): one module per ISA
// variant (portable baseline, AVX2, AVX-512; NEON on aarch64), chosen at run time.
#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <type_traits>
#include <vector>
#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

// Segment rows come in runs of one adapter: TILE of them at a time (float32, the CPU's serving
// dtype) read each A and B value once from cache for all TILE rows, with the sums in registers;
// one row at a time, a prefill step is bound by the loads and the FMA latency, not the arithmetic.
//   v[r, t, k] = x[rows[r]] . a[p[k], used[t], :]           for r < TILE
//   y[rows[r], C_t] += sum_k v[r, t, k] * b[p[k], C_t]
#if defined(__AVX512F__)
constexpr int64_t TILE = 8;  // 32 vector registers: 16 sums for eight rows, each page value loaded once for them
#else
constexpr int64_t TILE = 4;
#endif
constexpr int64_t TILE_ROWS[8] = {0, 1, 2, 3, 4, 5, 6, 7};  // a staged tile's own row indices

// Eight floats in one vector register of any target (GCC vector extension: AVX, two SSE or two
// NEON registers); alignment 4, so loads and stores through it may be unaligned.
typedef float f32x8 __attribute__((vector_size(32), aligned(4)));
typedef uint16_t u16x8 __attribute__((vector_size(16), aligned(2)));
typedef uint32_t u32x8 __attribute__((vector_size(32), aligned(4)));

static inline float sum8(f32x8 v) {  // its lanes, in order
  float s = 0.f;
  for (int l = 0; l < 8; ++l) s += v[l];
  return s;
}

// Page values (--lora-dtype): float32, or float16 / bfloat16 pages under float32 activations, each
// value widened exactly to float32 and every sum kept in float32 (in another order than the
// float32 kernel's where the vector code differs: equal to float32 rounding).
// bfloat16 widens by a shift, which GCC vectorises inside the sums. float16 it does not (one
// scalar vcvtph2ps a value), so float16 rows convert eight lanes at a time by hand (load8: F16C
// in the AVX2 and AVX-512 builds), and a prefill segment widens its adapter's pages once.
static inline float to_f32(float v) { return v; }
static inline float to_f32(_Float16 v) { return static_cast<float>(v); }
static inline float to_f32(c10::BFloat16 v) { return static_cast<float>(v); }
static inline float to_f32(c10::Half v) { return static_cast<float>(v); }
static inline float to_f32(double v) { return static_cast<float>(v); }

// Eight page values as float32 (through a reference: a vector return value would change the
// baseline build's ABI).
static inline void load8(f32x8& out, const _Float16* p) {
#if defined(__F16C__)
  const __m256 w = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  std::memcpy(&out, &w, sizeof out);
#else  // branch-free on the bits, as c10's fp16_ieee_to_fp32_value
  const u32x8 w = __builtin_convertvector(*reinterpret_cast<const u16x8*>(p), u32x8) << 16;
  const u32x8 sign = w & 0x80000000u, two_w = w + w;
  const u32x8 normal_bits = (two_w >> 4) + (0xE0u << 23), subnormal_bits = (two_w >> 17) | (126u << 23);
  f32x8 normal, subnormal;
  std::memcpy(&normal, &normal_bits, sizeof normal);
  std::memcpy(&subnormal, &subnormal_bits, sizeof subnormal);
  normal *= 0x1.0p-112f;
  subnormal -= 0.5f;
  u32x8 n, s;
  std::memcpy(&n, &normal, sizeof n);
  std::memcpy(&s, &subnormal, sizeof s);
  const u32x8 small = (u32x8)(two_w < (1u << 27));  // all ones in the lanes of a subnormal or zero
  const u32x8 r = sign | (small & s) | (~small & n);
  std::memcpy(&out, &r, sizeof out);
#endif
}
static inline void load8(f32x8& out, const c10::BFloat16* p) {
  const u32x8 w = __builtin_convertvector(*reinterpret_cast<const u16x8*>(p), u32x8) << 16;
  std::memcpy(&out, &w, sizeof out);
}

// One vector register's float operations behind one interface, Vec (AVX-512: 16 lanes; AVX2 with
// FMA: 8), for the kernels written once for both: the prefill tile's shrink and decode attention.
#if defined(__AVX512F__)
static inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
// The sum of a register's 16 lanes. The zero-masked shuffles (all lanes kept) stand in for
// _mm512_reduce_add_ps and the plain shuffles, whose _mm512_undefined_ps GCC 12 warns about.
static inline float lane_sum(__m512 v) {
  constexpr __mmask16 all = 0xFFFF;
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(all, v, v, 0x4E));  // swap the 256-bit halves
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(all, v, v, 0xB1));  // swap 128-bit lanes in each half
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(all, v, 0x4E));        // swap 64-bit pairs in each lane
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(all, v, 0xB1));        // swap neighbours
  return _mm512_cvtss_f32(v);
}

// Sixteen registers' sums at once: lane j of the result is the sum of in[j]'s 16 lanes. A transposing
// tree (30 shuffles, 15 adds) in place of sixteen lane_sums (64 and 64).
static inline __m512 sums16(const __m512* in) {
  constexpr __mmask16 all = 0xFFFF;  // zero-masked forms (all lanes kept), as in lane_sum
  auto even_odd = [](__m512 a, __m512 b) {  // 128-bit groups 0, 2 of a and of b, plus groups 1, 3
    return _mm512_add_ps(_mm512_maskz_shuffle_f32x4(all, a, b, 0x88), _mm512_maskz_shuffle_f32x4(all, a, b, 0xDD));
  };
  __m512 t[8], u[4];
  for (int j = 0; j < 8; ++j) {  // each 128-bit group of t[j]: in[2j], in[2j+1], in[2j], in[2j+1], partly summed
    const __m512 a = in[2 * j], b = in[2 * j + 1];
    t[j] = _mm512_add_ps(_mm512_maskz_unpacklo_ps(all, a, b), _mm512_maskz_unpackhi_ps(all, a, b));
  }
  for (int j = 0; j < 4; ++j) {  // each 128-bit group q of u[j]: in[4j] .. in[4j+3], over group q
    const __m512d c = _mm512_castps_pd(t[2 * j]), d = _mm512_castps_pd(t[2 * j + 1]);
    u[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_maskz_unpacklo_pd(0xFF, c, d)),
                         _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(0xFF, c, d)));
  }
  return even_odd(even_odd(u[0], u[1]), even_odd(u[2], u[3]));
}

struct Vec {  // AVX-512; the zero-masked forms (all lanes kept) as in lane_sum
  using V = __m512;
  static constexpr int L = 16;
  using M = __mmask16;  // the lanes a masked load reads
  static constexpr __mmask16 ALL = 0xFFFF;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static M mask(int64_t n) { return tail_mask(n); }  // the first n <= L lanes
  static V load(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }  // 0 in the others
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V lanes() { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static V first(V v, int64_t m, float other) { return _mm512_mask_blend_ps(mask(m), set1(other), v); }
  static float sum(V v) { return lane_sum(v); }
  static float max(V v) {
    v = _mm512_maskz_max_ps(ALL, v, _mm512_maskz_shuffle_f32x4(ALL, v, v, 0x4E));
    v = _mm512_maskz_max_ps(ALL, v, _mm512_maskz_shuffle_f32x4(ALL, v, v, 0xB1));
    v = _mm512_maskz_max_ps(ALL, v, _mm512_maskz_permute_ps(ALL, v, 0x4E));
    v = _mm512_maskz_max_ps(ALL, v, _mm512_maskz_permute_ps(ALL, v, 0xB1));
    return _mm512_cvtss_f32(v);
  }
  static V sum_each(const V* d) { return sums16(d); }  // lane j: the sum of d[j]'s lanes
  static V round(V x) { return _mm512_maskz_roundscale_ps(ALL, x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V scale2(V y, V n, V x) {  // y * 2^n, 0 where x < -88 (a NaN stays)
    return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, set1(-88.f), _CMP_NLT_UQ), y, n);
  }
};
#define LORAMUX_VEC 1
#elif defined(__AVX2__) && defined(__FMA__)
static inline __m256 sums8(const __m256* d) {  // lane j: the sum of d[j]'s lanes
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(d[0], d[1]), _mm256_hadd_ps(d[2], d[3]));  // halves of d[0..3]
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(d[4], d[5]), _mm256_hadd_ps(d[6], d[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

struct Vec {  // AVX2
  using V = __m256;
  using M = __m256i;
  static constexpr int L = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static M mask(int64_t n) {  // the first n <= L lanes
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V load(const float* p, M m) { return _mm256_maskload_ps(p, m); }  // 0 in the others
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V lanes() { return _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7); }
  static V first(V v, int64_t m, float other) {  // v in the first m lanes, other in the rest
    return _mm256_blendv_ps(set1(other), v, _mm256_castsi256_ps(mask(m)));
  }
  static float sum(V v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }
  static float max(V v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
  }
  static V sum_each(const V* d) { return sums8(d); }  // lane j: the sum of d[j]'s lanes
  static V round(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V scale2(V y, V n, V x) {  // y * 2^n (2^-127 flushes to 0), 0 where x < -88 (a NaN stays)
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(y * _mm256_castsi256_ps(e), _mm256_cmp_ps(x, set1(-88.f), _CMP_NLT_UQ));
  }
};
#define LORAMUX_VEC 1
#endif

#if defined(LORAMUX_VEC)
// The tile's shrink, two pages at a time: v[r, k], v[r, k + 1] for the TILE rows across `in`, the
// 2 x TILE sums in registers (L of them), each x value loaded once for both pages' FMAs, the last
// in % L values by masked loads (an odd rank's last page goes alone), and the sums reduced together
// in one transposing tree (sum_each). On AVX2 about 5% off the op over a layer's calls against the
// generic loop in lora_tile, whose sums GCC reduces one by one (BENCHMARKS.md).
static void shrink_tile(float* v, int64_t step, const float* const xs[TILE], const float* a, const int64_t* p,
                        int64_t rank, int64_t in, int64_t sa_page, int64_t off) {
  using V = Vec::V;
  static_assert(TILE * 2 == Vec::L);
  for (int64_t k = 0; k < rank; k += 2) {
    const int pair = k + 1 < rank ? 2 : 1;
    const float* r[2] = {a + p[k] * sa_page + off, a + p[k + pair - 1] * sa_page + off};
    V acc[TILE][2];
    for (auto& row : acc) for (auto& s : row) s = Vec::zero();
    auto columns = [&](int64_t c, auto load) {  // L columns of `in`
      const V e0 = load(r[0] + c), e1 = load(r[1] + c);
      for (int64_t i = 0; i < TILE; ++i) {
        V z = load(xs[i] + c);
        __asm__("" : "+v"(z));  // one load: GCC would fold it into both FMAs, 18 loads for 16 FMAs
        acc[i][0] = Vec::fma(e0, z, acc[i][0]);
        acc[i][1] = Vec::fma(e1, z, acc[i][1]);
      }
    };
    int64_t c = 0;
    for (; c + Vec::L <= in; c += Vec::L)  // unmasked: masked loads here ran the AVX-512 tile 1.5x slower
      columns(c, [](const float* q) { return Vec::load(q); });
    if (c < in) columns(c, [m = Vec::mask(in - c)](const float* q) { return Vec::load(q, m); });
    alignas(sizeof(V)) float sums[Vec::L];  // v[i, k + w] at sums[2i + w]
    Vec::store(sums, Vec::sum_each(&acc[0][0]));
    for (int64_t i = 0; i < TILE; ++i)
      for (int w = 0; w < pair; ++w) v[i * step + k + w] = sums[2 * i + w];
  }
}
#endif

#if !defined(__AVX512F__)
// The float32 expand of a tile: y[r, c0:c1] += sum_k v_r[k] * b[p[k], c0:c1] for the TILE rows,
// sixteen columns at a time with all TILE x 16 sums in registers across the pages, so the only
// memory traffic is each B value once and each y value once.
static void expand_tile_f32(float* const y[TILE], const float* b, const int64_t* p, int64_t rank, int64_t sb,
                            const float* const v[TILE], int64_t c0, int64_t c1) {
  int64_t c = c0;
  for (; c + 16 <= c1; c += 16) {
    f32x8 a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {};
    for (int64_t k = 0; k < rank; ++k) {
      const float* bk = b + p[k] * sb + c;
      const f32x8 e0 = *reinterpret_cast<const f32x8*>(bk), e1 = *reinterpret_cast<const f32x8*>(bk + 8);
      const float w0 = v[0][k], w1 = v[1][k], w2 = v[2][k], w3 = v[3][k];
      a00 += w0 * e0; a01 += w0 * e1;
      a10 += w1 * e0; a11 += w1 * e1;
      a20 += w2 * e0; a21 += w2 * e1;
      a30 += w3 * e0; a31 += w3 * e1;
    }
    const f32x8 sums[TILE][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
    for (int64_t r = 0; r < TILE; ++r) {
      f32x8* out = reinterpret_cast<f32x8*>(y[r] + c);
      out[0] += sums[r][0];
      out[1] += sums[r][1];
    }
  }
  for (; c < c1; ++c) {
    for (int64_t r = 0; r < TILE; ++r) {
      float d = 0.f;
      for (int64_t k = 0; k < rank; ++k) d += v[r][k] * b[p[k] * sb + c];
      y[r][c] += d;
    }
  }
}
#endif

#if defined(__AVX512F__)
// AVX-512 build, the tile's expand: y[r, c0:c1] += sum_k v_r[k] * b[p[k], c0:c1], 32 columns of the
// TILE rows at a time (16 sums in 16 of the 32 vector registers across the pages, each page value
// loaded once for the TILE rows), then 16, then a masked tail.
template <int V, bool MASKED>
static inline void expand_cols_avx512(float* const y[TILE], const float* b, const int64_t* p, int64_t rank,
                                      int64_t sb, const float* const v[TILE], int64_t c, __mmask16 last) {
  auto load = [last](int j, const float* q) {  // only the last vector of a masked run is masked
    return MASKED && j + 1 == V ? _mm512_maskz_loadu_ps(last, q) : _mm512_loadu_ps(q);
  };
  __m512 acc[TILE][V];
  for (auto& row : acc) for (auto& s : row) s = _mm512_setzero_ps();
  for (int64_t k = 0; k < rank; ++k) {
    const float* bk = b + p[k] * sb + c;
    __m512 e[V];
    for (int j = 0; j < V; ++j) e[j] = load(j, bk + 16 * j);
    for (int64_t i = 0; i < TILE; ++i) {
      const __m512 w = _mm512_set1_ps(v[i][k]);
      for (int j = 0; j < V; ++j) acc[i][j] = _mm512_fmadd_ps(w, e[j], acc[i][j]);
    }
  }
  for (int64_t i = 0; i < TILE; ++i)
    for (int j = 0; j < V; ++j) {
      float* out = y[i] + c + 16 * j;
      if (MASKED && j + 1 == V) _mm512_mask_storeu_ps(out, last, _mm512_add_ps(_mm512_maskz_loadu_ps(last, out), acc[i][j]));
      else _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), acc[i][j]));
    }
}

static void expand_tile_avx512(float* const y[TILE], const float* b, const int64_t* p, int64_t rank, int64_t sb,
                               const float* const v[TILE], int64_t c0, int64_t c1) {
  int64_t c = c0;
  for (; c + 32 <= c1; c += 32) expand_cols_avx512<2, false>(y, b, p, rank, sb, v, c, 0);
  for (; c + 16 <= c1; c += 16) expand_cols_avx512<1, false>(y, b, p, rank, sb, v, c, 0);
  if (c < c1) expand_cols_avx512<1, true>(y, b, p, rank, sb, v, c, tail_mask(c1 - c));
}
#endif

static void lora_tile(float* y, const float* x, const float* a, const float* b, const int64_t* rows, const int64_t* p,
                      int64_t rank, int64_t in, const std::vector<int64_t>& bounds, const std::vector<int64_t>& used,
                      int64_t sy, int64_t sx, int64_t sa_page, int64_t sa_kind, int64_t sb, float* v) {
  const int64_t nu = static_cast<int64_t>(used.size());
  const int64_t step = nu * rank;  // v[r, t, k] at v[r * step + t * rank + k]
  const float* xs[TILE];
  float* ys[TILE];
  for (int64_t i = 0; i < TILE; ++i) {
    xs[i] = x + rows[i] * sx;
    ys[i] = y + rows[i] * sy;
  }
#if defined(LORAMUX_VEC)
  for (int64_t t = 0; t < nu; ++t) shrink_tile(v + t * rank, step, xs, a, p, rank, in, sa_page, used[t] * sa_kind);
#else
  const float *x0 = xs[0], *x1 = xs[1], *x2 = xs[2], *x3 = xs[3];
  // shrink, two pages at a time: eight independent sums (four would wait on the FMA latency)
  for (int64_t t = 0; t < nu; ++t) {
    const int64_t off = used[t] * sa_kind;
    int64_t k = 0;
    for (; k + 2 <= rank; k += 2) {
      const float *r0 = a + p[k] * sa_page + off, *r1 = a + p[k + 1] * sa_page + off;
      float s00 = 0.f, s01 = 0.f, s10 = 0.f, s11 = 0.f, s20 = 0.f, s21 = 0.f, s30 = 0.f, s31 = 0.f;
#pragma omp simd reduction(+ : s00, s01, s10, s11, s20, s21, s30, s31)
      for (int64_t c = 0; c < in; ++c) {
        const float e0 = r0[c], e1 = r1[c], z0 = x0[c], z1 = x1[c], z2 = x2[c], z3 = x3[c];
        s00 += e0 * z0; s01 += e1 * z0;
        s10 += e0 * z1; s11 += e1 * z1;
        s20 += e0 * z2; s21 += e1 * z2;
        s30 += e0 * z3; s31 += e1 * z3;
      }
      float* vt = v + t * rank + k;
      vt[0] = s00; vt[1] = s01;
      vt[step] = s10; vt[step + 1] = s11;
      vt[2 * step] = s20; vt[2 * step + 1] = s21;
      vt[3 * step] = s30; vt[3 * step + 1] = s31;
    }
    for (; k < rank; ++k) {
      const float* r0 = a + p[k] * sa_page + off;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t c = 0; c < in; ++c) {
        const float e = r0[c];
        s0 += e * x0[c];
        s1 += e * x1[c];
        s2 += e * x2[c];
        s3 += e * x3[c];
      }
      float* vt = v + t * rank + k;
      vt[0] = s0; vt[step] = s1; vt[2 * step] = s2; vt[3 * step] = s3;
    }
  }
#endif
  for (int64_t t = 0; t < nu; ++t) {
    const float* vs[TILE];
    for (int64_t i = 0; i < TILE; ++i) vs[i] = v + i * step + t * rank;
#if defined(__AVX512F__)
    expand_tile_avx512(ys, b, p, rank, sb, vs, bounds[used[t]], bounds[used[t] + 1]);
#else
    expand_tile_f32(ys, b, p, rank, sb, vs, bounds[used[t]], bounds[used[t] + 1]);
#endif
  }
}

// One row's shrink over pages k..k+W-1 (W = 1, 4 or 8), every used kind:
//   v[t * rank + k + w] = x . a[p[k + w], used[t], :]
// W independent sums and W reads in flight, x read once for all of them.
template <int W, typename T, typename P>
static inline void shrink_pages(float* v, const T* x, const P* a, const int64_t* p, int64_t k, int64_t rank,
                                int64_t in, const std::vector<int64_t>& used, int64_t sa_page, int64_t sa_kind) {
  static_assert(W == 1 || W == 4 || W == 8);
  for (size_t t = 0; t < used.size(); ++t) {
    const P* r[8];
    for (int w = 0; w < W; ++w) r[w] = a + p[k + w] * sa_page + used[t] * sa_kind;
    if constexpr (std::is_same_v<P, _Float16>) {  // eight lanes at a time: F16C converts, the sums stay float32
      static_assert(std::is_same_v<T, float>);
      f32x8 acc[W] = {};
      int64_t c = 0;
      for (; c + 8 <= in; c += 8) {
        const f32x8 xc = *reinterpret_cast<const f32x8*>(x + c);
        for (int w = 0; w < W; ++w) {
          f32x8 e;
          load8(e, r[w] + c);
          acc[w] += xc * e;
        }
      }
      for (int w = 0; w < W; ++w) {
        float sum = sum8(acc[w]);
        for (int64_t d = c; d < in; ++d) sum += x[d] * to_f32(r[w][d]);
        v[t * rank + k + w] = sum;
      }
      continue;
    }
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f, s4 = 0.f, s5 = 0.f, s6 = 0.f, s7 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
    for (int64_t c = 0; c < in; ++c) {
      const float xc = to_f32(x[c]);
      s0 += xc * to_f32(r[0][c]);
      if constexpr (W > 1) {
        s1 += xc * to_f32(r[1][c]);
        s2 += xc * to_f32(r[2][c]);
        s3 += xc * to_f32(r[3][c]);
      }
      if constexpr (W > 4) {
        s4 += xc * to_f32(r[4][c]);
        s5 += xc * to_f32(r[5][c]);
        s6 += xc * to_f32(r[6][c]);
        s7 += xc * to_f32(r[7][c]);
      }
    }
    const float s[8] = {s0, s1, s2, s3, s4, s5, s6, s7};
    std::copy(s, s + W, v + t * rank + k);
  }
}

// One row's expand over pages k..k+W-1 into float32 accumulators, every used kind's columns C_t:
//   ac[C_t] += sum_w v[t * rank + k + w] * b[p[k + w], C_t]
template <int W, typename P>
static inline void expand_pages(float* ac, const float* v, const P* b, const int64_t* p, int64_t k, int64_t rank,
                                const std::vector<int64_t>& bounds, const std::vector<int64_t>& used, int64_t sb) {
  static_assert(W == 1 || W == 4 || W == 8);
  const P* r[8];
  for (int w = 0; w < W; ++w) r[w] = b + p[k + w] * sb;
  for (size_t t = 0; t < used.size(); ++t) {
    float u[8] = {};
    std::copy(v + t * rank + k, v + t * rank + k + W, u);
    if constexpr (std::is_same_v<P, _Float16>) {  // eight lanes at a time, as in shrink_pages
      int64_t c = bounds[used[t]];
      const int64_t end = bounds[used[t] + 1];
      for (; c + 8 <= end; c += 8) {
        f32x8 d = {};
        for (int w = 0; w < W; ++w) {
          f32x8 e;
          load8(e, r[w] + c);
          d += u[w] * e;
        }
        *reinterpret_cast<f32x8*>(ac + c) += d;
      }
      for (; c < end; ++c)
        for (int w = 0; w < W; ++w) ac[c] += u[w] * to_f32(r[w][c]);
      continue;
    }
#pragma omp simd
    for (int64_t c = bounds[used[t]]; c < bounds[used[t] + 1]; ++c) {
      float d = u[0] * to_f32(r[0][c]);
      if constexpr (W > 1)
        d += u[1] * to_f32(r[1][c]) + u[2] * to_f32(r[2][c]) + u[3] * to_f32(r[3][c]);
      if constexpr (W > 4)
        d += (u[4] * to_f32(r[4][c]) + u[5] * to_f32(r[5][c])) + (u[6] * to_f32(r[6][c]) + u[7] * to_f32(r[7][c]));
      ac[c] += d;
    }
  }
}

// out[0:n] = in[0:n] as float32, eight values at a time.
template <typename P>
static inline void widen(float* out, const P* in, int64_t n) {
  int64_t c = 0;
  if constexpr (std::is_same_v<P, _Float16> || std::is_same_v<P, c10::BFloat16>) {
    for (; c + 8 <= n; c += 8) {
      f32x8 w;
      load8(w, in + c);
      std::memcpy(out + c, &w, sizeof w);
    }
  }
  for (; c < n; ++c) out[c] = to_f32(in[c]);
}

// An adapter's pages p[0..rank) of A (each sa_page values) and of B (the first `width` of each
// row of sb) widened to float32 in `wide`: A's rows first, then B's, at the same strides.
template <typename P>
static void widen_pages(std::vector<float>& wide, const P* a, const P* b, const int64_t* p, int64_t rank,
                        int64_t sa_page, int64_t sb, int64_t width) {
  wide.resize(rank * (sa_page + sb));
  float *wa = wide.data(), *wb = wa + rank * sa_page;
  for (int64_t k = 0; k < rank; ++k) {
    widen(wa + k * sa_page, a + p[k] * sa_page, sa_page);
    widen(wb + k * sb, b + p[k] * sb, width);
  }
}

// DoRA's magnitude on a row whose LoRA delta is in (ops/dora.py), for the used kinds' columns:
//   y[c] = y[c] * g[c] + bias[c] * (1 - g[c]),   g = the adapter's magnitude page of the b store
// (bias: none when null). Applied as each row's outputs are written, in the same pass.
template <typename T, typename P>
static inline void dora_row(T* yi, const P* g, const T* bias, const std::vector<int64_t>& bounds,
                            const std::vector<int64_t>& used) {
  for (int64_t j : used) {
    if (bias) {
#pragma omp simd
      for (int64_t c = bounds[j]; c < bounds[j + 1]; ++c) {
        const float gc = to_f32(g[c]);
        yi[c] = static_cast<T>(to_f32(yi[c]) * gc + to_f32(bias[c]) * (1.f - gc));
      }
    } else {
#pragma omp simd
      for (int64_t c = bounds[j]; c < bounds[j + 1]; ++c) yi[c] = static_cast<T>(to_f32(yi[c]) * to_f32(g[c]));
    }
  }
}

// Decode rows of a rank r below GROUP_PAGES go GROUP_PAGES / r at a time, in lockstep (float32 pages
// and activations, the CPU's serving dtypes; the AVX-512, AVX2 and NEON builds). A row alone keeps
// only a few page streams in flight (one at rank 1; at rank 3, 1 + 1 + 1 one after another), each
// somewhere else in the store, and leaves the reads of its pages little compute to hide under: on a
// Zen 5 the default model's 120 decode LoRA calls inside their base linears cost 2.4-4.4x a flat
// read of their pages at rank 1 and 1.2-1.7x at rank 4, against 0.9-1.4x at rank 16. In a group
// every page of every row is a stream of its own, all shrunk and expanded side by side, as one row
// of rank GROUP_PAGES would be: the op alone took 0.67-0.97x the time at ranks 1 to 15 (AVX-512
// and AVX2 builds), and a decode step's LoRA 0.70x at rank 2, 0.92x at rank 4, 0.98x at rank 8
// (BENCHMARKS.md). Each row's sums stay its own: a row's LoRA is the same bits alone or in any group.
#if defined(__AVX512F__)
constexpr int64_t GROUP_PAGES = 16;  // 32 vector registers: sixteen sums, or sixteen of v's values

// out[j * K + k] = xs[j] . rs[j * K + k][0:in]   for R rows of K page streams each (R * K <= 16)
template <int R, int K>
static inline void shrink_group(float* out, const float* const xs[R], const float* const rs[16], int64_t in) {
  static_assert(R >= 1 && R * K <= 16);
  __m512 acc[16];
  for (int w = 0; w < 16; ++w) acc[w] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= in; c += 16) {
    for (int j = 0; j < R; ++j) {
      const __m512 xv = _mm512_loadu_ps(xs[j] + c);
      for (int k = 0; k < K; ++k)
        acc[j * K + k] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(rs[j * K + k] + c), acc[j * K + k]);
    }
  }
  if (c < in) {
    const __mmask16 m = tail_mask(in - c);
    for (int j = 0; j < R; ++j) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, xs[j] + c);
      for (int k = 0; k < K; ++k)
        acc[j * K + k] = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, rs[j * K + k] + c), acc[j * K + k]);
    }
  }
  _mm512_storeu_ps(out, sums16(acc));
}

// o[j][c0:c1] = sum_k u[j * K + k] * rs[j * K + k][c0:c1]   for R rows of K page streams each
// (ADD: o[j][c0:c1] += that sum). Masked loads only for the last (c1 - c0) % 16 columns: on a Zen 5
// the decode op read its pages 10% slower with every load masked (BENCHMARKS.md).
template <int R, int K, bool ADD, bool MASKED>
static inline void expand_columns(float* const o[R], const __m512* uv, const float* const rs[16], int64_t c,
                                  __mmask16 m) {
  auto load = [m](const float* q) { return MASKED ? _mm512_maskz_loadu_ps(m, q) : _mm512_loadu_ps(q); };
  for (int j = 0; j < R; ++j) {
    __m512 d = _mm512_mul_ps(uv[j * K], load(rs[j * K] + c));
    for (int k = 1; k < K; ++k) d = _mm512_fmadd_ps(uv[j * K + k], load(rs[j * K + k] + c), d);
    if constexpr (ADD) d = _mm512_add_ps(load(o[j] + c), d);
    if constexpr (MASKED)
      _mm512_mask_storeu_ps(o[j] + c, m, d);
    else
      _mm512_storeu_ps(o[j] + c, d);
  }
}

template <int R, int K, bool ADD = false>
static inline void expand_group(float* const o[R], const float* u, const float* const rs[16], int64_t c0, int64_t c1) {
  __m512 uv[16];
  for (int w = 0; w < 16; ++w) uv[w] = _mm512_set1_ps(u[w]);
  int64_t c = c0;
  for (; c + 16 <= c1; c += 16) expand_columns<R, K, ADD, false>(o, uv, rs, c, 0xFFFF);
  if (c < c1) expand_columns<R, K, ADD, true>(o, uv, rs, c, tail_mask(c1 - c));
}
#elif defined(__AVX2__) || defined(__aarch64__)
constexpr int64_t GROUP_PAGES = 8;  // 16 (AVX2) or 32 (NEON, two a vector) registers: eight sums

// shrink_group and expand_group as above, eight streams, in GCC's eight-lane vectors
template <int R, int K>
static inline void shrink_group(float* out, const float* const xs[R], const float* const rs[8], int64_t in) {
  static_assert(R >= 1 && R * K <= 8);
  f32x8 acc[8] = {};
  int64_t c = 0;
  for (; c + 8 <= in; c += 8) {
    for (int j = 0; j < R; ++j) {
      const f32x8 xv = *reinterpret_cast<const f32x8*>(xs[j] + c);
      for (int k = 0; k < K; ++k) acc[j * K + k] += xv * *reinterpret_cast<const f32x8*>(rs[j * K + k] + c);
    }
  }
  for (int w = 0; w < R * K; ++w) {
    float sum = sum8(acc[w]);
    for (int64_t d = c; d < in; ++d) sum += xs[w / K][d] * rs[w][d];
    out[w] = sum;
  }
}

template <int R, int K, bool ADD = false>
static inline void expand_group(float* const o[R], const float* u, const float* const rs[8], int64_t c0, int64_t c1) {
  int64_t c = c0;
  for (; c + 8 <= c1; c += 8) {
    for (int j = 0; j < R; ++j) {
      f32x8 d = u[j * K] * *reinterpret_cast<const f32x8*>(rs[j * K] + c);
      for (int k = 1; k < K; ++k) d += u[j * K + k] * *reinterpret_cast<const f32x8*>(rs[j * K + k] + c);
      if constexpr (ADD) d = *reinterpret_cast<const f32x8*>(o[j] + c) + d;
      *reinterpret_cast<f32x8*>(o[j] + c) = d;
    }
  }
  for (; c < c1; ++c) {
    for (int j = 0; j < R; ++j) {
      float d = u[j * K] * rs[j * K][c];
      for (int k = 1; k < K; ++k) d += u[j * K + k] * rs[j * K + k][c];
      o[j][c] = ADD ? o[j][c] + d : d;
    }
  }
}
#else
constexpr int64_t GROUP_PAGES = 1;  // the portable build: 16 SSE registers hold no eight vector sums
#endif

// Whether decode rows of this rank go in groups (of GROUP_PAGES / rank rows): below GROUP_PAGES.
static inline bool grouped_rank(int64_t rank) { return rank > 0 && rank < GROUP_PAGES; }

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__aarch64__)
// The shrink and the expand of R = GROUP_PAGES / K decode rows of rank K side by side, every used kind
// t: row j's x row xs[j], its pages ps[j][0..K), its float32 accumulator ac[j]; kind t's sums at
// v[t * vt:] (row j's k-th at j * K + k):
//   shrink: v[t * vt + j * K + k] = xs[j] . a[ps[j][k], used[t], :]
//   expand: ac[j][C_t] = sum_k v[t * vt + j * K + k] * b[ps[j][k], C_t]   (ADD: added to ac[j][C_t])
template <int K>
static inline void shrink_kinds(float* v, int64_t vt, const float* const xs[], const float* a, const int64_t* const ps[],
                                int64_t in, const std::vector<int64_t>& used, int64_t sa_page, int64_t sa_kind) {
  constexpr int S = GROUP_PAGES, R = S / K;  // R * K streams of the S a group may have
  const float* r[S] = {};
  for (size_t t = 0; t < used.size(); ++t) {
    for (int w = 0; w < R * K; ++w) r[w] = a + ps[w / K][w % K] * sa_page + used[t] * sa_kind;
    shrink_group<R, K>(v + t * vt, xs, r, in);
  }
}

template <int K, bool ADD>
static inline void expand_kinds(float* const ac[], const float* v, int64_t vt, const float* b, const int64_t* const ps[],
                                const std::vector<int64_t>& bounds, const std::vector<int64_t>& used, int64_t sb) {
  constexpr int S = GROUP_PAGES, R = S / K;
  const float* r[S] = {};
  for (int w = 0; w < R * K; ++w) r[w] = b + ps[w / K][w % K] * sb;
  for (size_t t = 0; t < used.size(); ++t)
    expand_group<R, K, ADD>(ac, v + t * vt, r, bounds[used[t]], bounds[used[t] + 1]);
}

// R = GROUP_PAGES / K decode rows of rank K, shrunk then expanded (each row's columns written, not
// added to); v: used.size() * GROUP_PAGES floats of scratch.
template <int K>
static void bgmv_group(float* const ac[], float* v, const float* const xs[], const float* a, const float* b,
                       const int64_t* const ps[], int64_t in, const std::vector<int64_t>& bounds,
                       const std::vector<int64_t>& used, int64_t sa_page, int64_t sa_kind, int64_t sb) {
  shrink_kinds<K>(v, GROUP_PAGES, xs, a, ps, in, used, sa_page, sa_kind);
  expand_kinds<K, false>(ac, v, GROUP_PAGES, b, ps, bounds, used, sb);
}

// bgmv_group<rank> for a run-time rank in [1, K]
template <int K>
static void group_of(int64_t rank, float* const ac[], float* v, const float* const xs[], const float* a, const float* b,
                     const int64_t* const ps[], int64_t in, const std::vector<int64_t>& bounds,
                     const std::vector<int64_t>& used, int64_t sa_page, int64_t sa_kind, int64_t sb) {
  if (rank == K) return bgmv_group<K>(ac, v, xs, a, b, ps, in, bounds, used, sa_page, sa_kind, sb);
  if constexpr (K > 1) return group_of<K - 1>(rank, ac, v, xs, a, b, ps, in, bounds, used, sa_page, sa_kind, sb);
}
#endif

// One decode row's LoRA (BGMV) into float32 accumulators: v[t * rank + k] = xi . a[p[k], used[t], :],
// then ac[C_t] = sum_k v[t * rank + k] * b[p[k], C_t] for each used kind's columns C_t.
template <typename T, typename P>
__attribute__((always_inline)) static inline void bgmv_row(float* ac, float* v, const T* xi, const P* a, const P* b,
                                                           const int64_t* p, int64_t rank, int64_t in,
                                                           const std::vector<int64_t>& bounds,
                                                           const std::vector<int64_t>& used, int64_t sa_page,
                                                           int64_t sa_kind, int64_t sb) {
  const int64_t nu = static_cast<int64_t>(used.size());
  // Shrink, pages outermost: a page's rows of every used kind sit side by side in the store, so the
  // reads run through each page once, in order; pages in lockstep keep that many reads in flight. In
  // the AVX-512 build float32 pages go sixteen at a time, as a group row of rank 16 does
  // (shrink_kinds / expand_kinds; 32 vector registers hold the sums): on a Zen 5 the default model's
  // decode op took 0.86-0.96x the time of the same loops written for `omp simd` (BENCHMARKS.md).
  // Other pages, and other builds (the AVX2 build's GCC vectors were no faster there), eight, four
  // or one at a time.
  int64_t k = 0;
#if defined(__AVX512F__)
  constexpr bool wide = std::is_same_v<T, float> && std::is_same_v<P, float>;
  if constexpr (wide)
    for (const int64_t* block = p; k + GROUP_PAGES <= rank; k += GROUP_PAGES, block += GROUP_PAGES)
      shrink_kinds<GROUP_PAGES>(v + k, rank, &xi, a, &block, in, used, sa_page, sa_kind);
#endif
  for (; k + 8 <= rank; k += 8) shrink_pages<8>(v, xi, a, p, k, rank, in, used, sa_page, sa_kind);
  for (; k + 4 <= rank; k += 4) shrink_pages<4>(v, xi, a, p, k, rank, in, used, sa_page, sa_kind);
  for (; k < rank; ++k) shrink_pages<1>(v, xi, a, p, k, rank, in, used, sa_page, sa_kind);
  // Expand, pages outermost too: each page's B row is read once, front to back, into the
  // float32 accumulators of the used kinds' columns.
  for (int64_t t = 0; t < nu; ++t) std::fill(ac + bounds[used[t]], ac + bounds[used[t] + 1], 0.f);
  k = 0;
#if defined(__AVX512F__)
  if constexpr (wide)
    for (const int64_t* block = p; k + GROUP_PAGES <= rank; k += GROUP_PAGES, block += GROUP_PAGES)
      expand_kinds<GROUP_PAGES, true>(&ac, v + k, rank, b, &block, bounds, used, sb);
#endif
  for (; k + 8 <= rank; k += 8) expand_pages<8>(ac, v, b, p, k, rank, bounds, used, sb);
  for (; k + 4 <= rank; k += 4) expand_pages<4>(ac, v, b, p, k, rank, bounds, used, sb);
  for (; k < rank; ++k) expand_pages<1>(ac, v, b, p, k, rank, bounds, used, sb);
}

// `count` decode rows (1 <= count <= GROUP_PAGES / rank) of rank `rank` (grouped_rank) by bgmv_group:
// row j's x row x[rows[j] * sx], pages pages[j * rank:], accumulator ac[j * width:]. A group's
// missing rows repeat its last (their reads come from cache) into `spare`, an accumulator of
// bounds.back() floats.
static void bgmv_rows(float* ac, int64_t width, float* spare, float* v, const float* x, int64_t sx, const int64_t* rows,
                      const int64_t* pages, int64_t count, int64_t rank, const float* a, const float* b, int64_t in,
                      const std::vector<int64_t>& bounds, const std::vector<int64_t>& used, int64_t sa_page,
                      int64_t sa_kind, int64_t sb) {
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__aarch64__)
  float* gac[GROUP_PAGES];
  const float* gx[GROUP_PAGES];
  const int64_t* gp[GROUP_PAGES];
  for (int64_t j = 0; j < GROUP_PAGES / rank; ++j) {
    const int64_t src = std::min(j, count - 1);
    gac[j] = j < count ? ac + j * width : spare;
    gx[j] = x + rows[src] * sx;
    gp[j] = pages + src * rank;
  }
  return group_of<GROUP_PAGES - 1>(rank, gac, v, gx, a, b, gp, in, bounds, used, sa_page, sa_kind, sb);
#endif
  TORCH_CHECK(false, "bgmv_rows: decode rows of rank ", rank, " do not go in groups in this build");
}

// Batched LoRA over the page store for the kinds of one fused linear (q|k|v, gate|up, or one).
// For each position i, with token row r = rows[i] and rank-row pages P = pages of i's adapter, for
// each used kind j (t-th of `used`), with columns C_j = [bounds[j], bounds[j+1]):
//   v[t, k] = x[r] . a[P[k], j, :]                 (shrink: every used kind in one pass over the pages)
//   y[r, C_j] += sum_k v[t, k] * b[P[k], C_j]       (expand: straight into that kind's columns)
//   then, if row r has a DoRA magnitude page M = mags[r]: y[r, C_j] = dora_row(y[r, C_j], b[M, C_j])
// Per-row form (BGMV, ends empty): position i's pages are pages[i*rank : (i+1)*rank]; float32 rows of
// a grouped_rank go GROUP_PAGES / rank at a time (bgmv_rows), others one by one (bgmv_row).
// Segment form (SGMV): positions are grouped by adapter, ends[u] = cumulative positions of adapters
// 0..u, and adapter u's pages are pages[u*rank : (u+1)*rank]; a thread's positions are contiguous, so
// an adapter's pages stay in cache across its rows, which go TILE at a time (lora_tile).
// Accumulates in float32; positions are split across torch's intra-op threads. T: the activations'
// type; P: the pages' (T, or float16 / bfloat16 under float32 activations).
template <typename T, typename P>
static void lora_rows(T* y, const T* x, const P* a, const P* b, const int64_t* rows, const int64_t* pages,
                      const int32_t* ends, int64_t num_ends, int64_t n, int64_t rank, int64_t in,
                      const std::vector<int64_t>& bounds, const std::vector<int64_t>& used, int64_t sy, int64_t sx,
                      int64_t sa_page, int64_t sa_kind, int64_t sb, const int64_t* mags, int64_t num_mags,
                      const T* bias) {
  // a row's DoRA magnitude page (mags[row], -1 or past the end: none), or null
  auto magnitude = [&](int64_t row) -> const P* {
    const int64_t page = row < num_mags ? mags[row] : -1;
    return page < 0 ? nullptr : b + page * sb;
  };
  const int64_t nu = static_cast<int64_t>(used.size()), width = bounds.back();
  // per-row form, float32: rows of a small rank in groups (bgmv_rows)
  constexpr bool floats = std::is_same_v<T, float> && std::is_same_v<P, float>;
  const bool groups = floats && num_ends == 0 && grouped_rank(rank);
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> v(nu * std::max<int64_t>(TILE * rank, groups ? GROUP_PAGES : 0));
    // a row's accumulator, or a group's rows' and its spare (uninitialised: each row's are written first)
    std::unique_ptr<float[]> acc(new float[groups ? (GROUP_PAGES + 1) * width : width]);
    float* ac = acc.get();
    auto add_row = [&](int64_t row, const float* d) {  // y[row] += d in the used kinds' columns, then DoRA
      T* yi = y + row * sy;
      for (int64_t t = 0; t < nu; ++t) {
#pragma omp simd
        for (int64_t c = bounds[used[t]]; c < bounds[used[t] + 1]; ++c) yi[c] = static_cast<T>(to_f32(yi[c]) + d[c]);
      }
      if (const P* g = magnitude(row)) dora_row(yi, g, bias, bounds, used);
    };
    std::vector<float> xw, yw;  // activations other than float32, segment form: a tile's rows in float32
    std::vector<float> wide;  // narrow pages, segment form: adapter wide_u's pages in float32,
    std::vector<int64_t> local;  // at page indices 0 .. rank - 1 (both filled on first use)
    int64_t wide_u = -1;
    int64_t u = 0;  // segment form: the adapter of position lo, then advanced with i
    if (num_ends) u = std::upper_bound(ends, ends + num_ends, static_cast<int32_t>(lo)) - ends;
    for (int64_t i = lo; i < hi; ++i) {
      if (num_ends) while (ends[u] <= i) ++u;
      const int64_t* p = pages + (num_ends ? u : i) * rank;
      if (num_ends && i + TILE <= std::min<int64_t>(hi, ends[u])) {  // TILE rows of one adapter
        const float *ta, *tb;
        const int64_t* tp;
        if constexpr (std::is_same_v<P, float>) {
          ta = a, tb = b, tp = p;
        } else {  // narrow pages: widened once per adapter (its rows re-read them from cache)
          if (wide_u != u) {
            widen_pages(wide, a, b, p, rank, sa_page, sb, width);
            wide_u = u;
            for (int64_t k = static_cast<int64_t>(local.size()); k < rank; ++k) local.push_back(k);
          }
          ta = wide.data(), tb = wide.data() + rank * sa_page, tp = local.data();
        }
        if constexpr (std::is_same_v<T, float>) {
          lora_tile(y, x, ta, tb, rows + i, tp, rank, in, bounds, used, sy, sx, sa_page, sa_kind, sb, v.data());
        } else {  // other activations (a bfloat16 model): the TILE rows of x and y staged in float32
          xw.resize(TILE * in);
          yw.resize(TILE * width);
          for (int64_t r = 0; r < TILE; ++r) {
            widen(xw.data() + r * in, x + rows[i + r] * sx, in);
            for (int64_t j : used) widen(yw.data() + r * width + bounds[j], y + rows[i + r] * sy + bounds[j],
                                         bounds[j + 1] - bounds[j]);
          }
          lora_tile(yw.data(), xw.data(), ta, tb, TILE_ROWS, tp, rank, in, bounds, used, width, in, sa_page, sa_kind,
                    sb, v.data());
          for (int64_t r = 0; r < TILE; ++r) {
            T* yr = y + rows[i + r] * sy;
            for (int64_t j : used) {
#pragma omp simd
              for (int64_t c = bounds[j]; c < bounds[j + 1]; ++c) yr[c] = static_cast<T>(yw[r * width + c]);
            }
          }
        }
        for (int64_t r = i; r < i + TILE; ++r) {
          if (const P* g = magnitude(rows[r])) dora_row(y + rows[r] * sy, g, bias, bounds, used);
        }
        i += TILE - 1;
        continue;
      }
      if constexpr (floats) {
        if (groups) {
          const int64_t count = std::min<int64_t>(GROUP_PAGES / rank, hi - i);
          bgmv_rows(ac, width, ac + GROUP_PAGES * width, v.data(), x, sx, rows + i, p, count, rank, a, b, in, bounds,
                    used, sa_page, sa_kind, sb);
          for (int64_t j = 0; j < count; ++j) add_row(rows[i + j], ac + j * width);
          i += count - 1;
          continue;
        }
      }
      bgmv_row(ac, v.data(), x + rows[i] * sx, a, b, p, rank, in, bounds, used, sa_page, sa_kind, sb);
      add_row(rows[i], ac);
    }
  });
}

// y: [T, bounds[-1]], x: [T, in], a: [P, m, in], b: [P, bounds[-1]]; rows [n] int64; pages int64
// ([n * rank] per row, or [U * rank] per adapter with ends [U] int32); used: kind indices in [0, m).
// mags: int64, the DoRA magnitude page of each row of y (-1: none; rows past its end: none), empty
// for no DoRA; bias: [bounds[-1]] of y's dtype, or empty.
void lora(torch::Tensor y, torch::Tensor x, torch::Tensor a, torch::Tensor b, torch::Tensor rows, torch::Tensor pages,
          torch::Tensor ends, int64_t rank, std::vector<int64_t> bounds, std::vector<int64_t> used, torch::Tensor mags,
          torch::Tensor bias) {
  const bool narrow_pages = x.scalar_type() == at::kFloat &&
                            (a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16);
  TORCH_CHECK(y.device().is_cpu() && x.scalar_type() == y.scalar_type() && b.scalar_type() == a.scalar_type() &&
              (a.scalar_type() == x.scalar_type() || narrow_pages),
              "lora: CPU tensors of one dtype, or float16 / bfloat16 pages under float32 activations");
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && a.dim() == 3 && b.dim() == 2, "lora: y, x, b 2-D and a [P, m, in]");
  TORCH_CHECK(y.stride(1) == 1 && x.stride(1) == 1 && a.stride(2) == 1 && b.stride(1) == 1, "lora: unit-stride rows");
  TORCH_CHECK(a.size(2) == x.size(1) && static_cast<int64_t>(bounds.size()) == a.size(1) + 1 &&
              bounds.back() <= y.size(1) && bounds.back() <= b.size(1), "lora: shapes disagree with bounds");
  for (int64_t j : used) TORCH_CHECK(j >= 0 && j < a.size(1), "lora: used kind out of range");
  const int64_t n = rows.numel(), num_ends = ends.numel();
  TORCH_CHECK(rows.scalar_type() == at::kLong && pages.scalar_type() == at::kLong && rows.is_contiguous() &&
              pages.is_contiguous(), "lora: int64 rows and pages");
  TORCH_CHECK(num_ends == 0 ? pages.numel() == n * rank
                            : (ends.scalar_type() == at::kInt && ends.is_contiguous() && pages.numel() == num_ends * rank &&
                               ends[num_ends - 1].item<int32_t>() == n),
              "lora: pages [n * rank] per row, or [U * rank] with int32 ends [U] ending at n");
  const int64_t num_mags = mags.numel();
  TORCH_CHECK(num_mags == 0 || (mags.scalar_type() == at::kLong && mags.is_contiguous()), "lora: int64 mags");
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == y.scalar_type() && bias.is_contiguous() &&
                                    bias.numel() >= bounds.back()), "lora: bias [bounds[-1]] of y's dtype");
  if (n == 0 || used.empty()) return;
  auto run = [&](auto* y_, auto* x_, auto* a_, auto* b_) {
    using Y = std::remove_pointer_t<decltype(y_)>;
    lora_rows(y_, x_, a_, b_, rows.data_ptr<int64_t>(), pages.data_ptr<int64_t>(),
              num_ends ? ends.data_ptr<int32_t>() : nullptr, num_ends, n, rank, x.size(1), bounds, used, y.stride(0),
              x.stride(0), a.stride(0), a.stride(1), b.stride(0), num_mags ? mags.data_ptr<int64_t>() : nullptr,
              num_mags, bias.numel() ? reinterpret_cast<const Y*>(bias.data_ptr()) : nullptr);
  };
  if (narrow_pages && a.scalar_type() == at::kHalf) {  // as GCC's _Float16, which F16C converts
    run(y.data_ptr<float>(), x.data_ptr<float>(), reinterpret_cast<const _Float16*>(a.data_ptr<at::Half>()),
        reinterpret_cast<const _Float16*>(b.data_ptr<at::Half>()));
  } else if (narrow_pages) {
    run(y.data_ptr<float>(), x.data_ptr<float>(), a.data_ptr<at::BFloat16>(), b.data_ptr<at::BFloat16>());
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora", [&] {
      run(y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>());
    });
  }
}

// Decode attention over block-paged KV, for each row i (position p = lengths[i] - 1) and head h:
//   s_j = c(scale * q[i,h] . k[j]) + slope_h * j  for j in [max(0, p - window + 1), p]  (window 0: from 0;
//                                                   a chunk C, Llama 4's: from floor(p / C) * C)
//   out[i,h] = sum_j e^(s_j) v[j] / (sum_j e^(s_j) + e^(sink_h)),   key j at block tables[i, j / bs], offset j % bs
// c(s) = cap * tanh(s / cap) with a soft cap (Gemma 2's; the scalar path), else s; sink_h only with sinks.
// k, v: [NB, bs, KV, hd]; q, out: [D, H, hd]. Float32 softmax and sums.
// A task is a row and `gh` query heads that share one KV head (gh divides H / KV; all of them unless
// that leaves too few tasks for the threads): each key and value row is read once for the task's
// heads. Key rows sit KV * hd apart and blocks anywhere, which the hardware prefetchers do not
// follow: a decode step's KV comes from DRAM, latency-bound, so the rows PREFETCH keys ahead are
// prefetched (keys into L1, values into L2 for the second pass): 1.5x faster at 500 positions.
constexpr int64_t PREFETCH = 16;

// LOCALITY: 3 into L1, 2 into L2 (a compile-time constant, as __builtin_prefetch needs)
template <int LOCALITY, typename T>
static inline void prefetch_row(const T* row, int64_t hd) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < hd * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(p + b, 0, LOCALITY);
}

// The vector path of decode attention (float32, head dim 64 or 128): L keys at a time (L = 16 on
// AVX-512, 8 on AVX2). A head's scores of L keys are L dot products, each in a register, summed
// across lanes together (sum_each: about 3 shuffles and adds a key, where one at a time costs 8);
// their exp runs in one register (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-5
// polynomial in r, times 2^n; within a few ulp of std::exp, and 0 below -88: e^x underflows there,
// and the keys past a row's end come as -inf); the values' sums stay in registers. About a fifth of
// the scalar loop's instructions.
#if defined(LORAMUX_VEC)
static inline Vec::V exp_vec(Vec::V x) {
  using V = Vec::V;
  const V n = Vec::round(x * 1.44269504088896341f);  // x <= 0: n >= -128 above -88
  V r = Vec::fma(n, Vec::set1(-0.693359375f), x);
  r = Vec::fma(n, Vec::set1(2.12194440e-4f), r);
  V y = Vec::set1(1.9875691500e-4f);
  y = Vec::fma(y, r, Vec::set1(1.3981999507e-3f));
  y = Vec::fma(y, r, Vec::set1(8.3334519073e-3f));
  y = Vec::fma(y, r, Vec::set1(4.1665795894e-2f));
  y = Vec::fma(y, r, Vec::set1(1.6666665459e-1f));
  y = Vec::fma(y, r, Vec::set1(5.0000001201e-1f));
  y = Vec::fma(y, r * r, r + 1.f);
  return Vec::scale2(y, n, x);
}

// One task of paged_rows (below): row i's heads h0 .. h0 + gh - 1 over keys [lo, len), key lo + t at off[t].
// Heads inside, L keys outside: each group of L key (value) rows is read from memory once and again
// from cache for the other heads, whatever the rows' stride (with KV * hd a multiple of 4 KiB, one
// KV head's rows all fall in a few of L1's and L2's sets, and a whole row of keys read once per head
// missed the cache: 2x slower at 1024 positions). s: gh * (len - lo + L) floats; acc: gh * hd.
template <int HDL>  // the head dim in vectors
static void decode_heads(float* out, const float* q, const float* k, const float* v, const int64_t* off,
                         const float* slopes, const float* sinks, int64_t h0, int64_t gh, int64_t lo, int64_t len,
                         float scale, float* s, float* acc) {
  using V = Vec::V;
  constexpr int L = Vec::L;
  constexpr int64_t hd = L * HDL;
  constexpr int SLICE = HDL < 8 ? HDL : 8;  // value sums kept in registers, SLICE vectors at a time
  const int64_t n = len - lo, stride = n + L;  // s[g * stride + t]: head g's score, then weight, of key lo + t
  float mx[64], total[64];  // gh <= 64
  std::fill(mx, mx + gh, -INFINITY);
  for (int64_t c = 0; c < n; c += L) {  // scores
    const int64_t m = std::min<int64_t>(L, n - c);
    for (int64_t t = c + PREFETCH; t < std::min(n, c + PREFETCH + L); ++t) {
      prefetch_row<3>(k + off[t], hd);
      prefetch_row<2>(v + off[t], hd);
    }
    const V j = Vec::lanes() + static_cast<float>(lo + c);
    for (int64_t g = 0; g < gh; ++g) {
      const float* qg = q + (h0 + g) * hd;
      V qv[HDL], d[L];
      for (int u = 0; u < HDL; ++u) qv[u] = Vec::load(qg + L * u);
      for (int t = 0; t < L; ++t) {
        if (t < m) {
          const float* kr = k + off[c + t];
          V a = qv[0] * Vec::load(kr);
          for (int u = 1; u < HDL; ++u) a = Vec::fma(qv[u], Vec::load(kr + L * u), a);
          d[t] = a;
        } else {
          d[t] = V{};
        }
      }
      const V slope = Vec::set1(slopes ? slopes[h0 + g] : 0.f);
      const V sj = Vec::first(Vec::fma(Vec::sum_each(d), Vec::set1(scale), slope * j), m, -INFINITY);
      Vec::store(s + g * stride + c, sj);
      mx[g] = std::max(mx[g], Vec::max(sj));
    }
  }
  for (int64_t g = 0; g < gh; ++g) {  // unnormalised weights
    if (sinks) mx[g] = std::max(mx[g], sinks[h0 + g]);
    const V top = Vec::set1(mx[g]);
    V sum{};
    for (int64_t c = 0; c < n; c += L) {
      const V w = exp_vec(Vec::load(s + g * stride + c) - top);
      Vec::store(s + g * stride + c, w);
      sum += w;
    }
    total[g] = Vec::sum(sum) + (sinks ? std::exp(sinks[h0 + g] - mx[g]) : 0.f);
  }
  std::fill(acc, acc + gh * hd, 0.f);
  for (int64_t c = 0; c < n; c += L) {  // values
    const int64_t m = std::min<int64_t>(L, n - c);
    for (int64_t t = c + PREFETCH; t < std::min(n, c + PREFETCH + L); ++t) prefetch_row<3>(v + off[t], hd);
    for (int64_t g = 0; g < gh; ++g) {
      for (int u0 = 0; u0 < HDL; u0 += SLICE) {
        V a[SLICE];
        float* ag = acc + g * hd + L * u0;
        for (int u = 0; u < SLICE; ++u) a[u] = Vec::load(ag + L * u);
        for (int64_t t = 0; t < m; ++t) {
          const float* vr = v + off[c + t] + L * u0;
          const V w = Vec::set1(s[g * stride + c + t]);
          for (int u = 0; u < SLICE; ++u) a[u] = Vec::fma(w, Vec::load(vr + L * u), a[u]);
        }
        for (int u = 0; u < SLICE; ++u) Vec::store(ag + L * u, a[u]);
      }
    }
  }
  for (int64_t g = 0; g < gh; ++g) {
    const V inv = Vec::set1(1.f / total[g]);
    for (int u = 0; u < HDL; ++u) Vec::store(out + (h0 + g) * hd + L * u, Vec::load(acc + g * hd + L * u) * inv);
  }
}
#endif

template <typename T>
static void paged_rows(T* out, const T* q, const T* k, const T* v, const int64_t* tables, const int64_t* lengths,
                       const float* slopes, const float* sinks, int64_t D, int64_t H, int64_t KV, int64_t hd,
                       int64_t bs, int64_t mb, float scale, int64_t window, int64_t chunk, int64_t max_len,
                       float cap) {
  const int64_t token_stride = KV * hd, block_stride = bs * KV * hd;
  int64_t gh = H / KV;  // heads a task: fewer when the tasks would not keep every thread busy
  while (gh > 1 && D * (H / gh) < 4 * at::get_num_threads()) {
    int64_t smaller = gh - 1;
    while ((H / KV) % smaller) --smaller;
    gh = smaller;
  }
  at::parallel_for(0, D * (H / gh), 1, [&](int64_t lo_task, int64_t hi_task) {
    std::vector<float> s(gh * (max_len + 16)), qf(gh * hd), acc(gh * hd), wide(hd), mx(gh), sum(gh);
    std::vector<int64_t> offsets(max_len);  // of each key's row (and value's) in k (v): no division per key
    for (int64_t task = lo_task; task < hi_task; ++task) {
      const int64_t i = task / (H / gh), h0 = (task % (H / gh)) * gh, kvh = h0 / (H / KV);
      const int64_t len = lengths[i];
      int64_t lo = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      if (chunk > 0) lo = std::max(lo, (len - 1) / chunk * chunk);
      const int64_t n = len - lo;
      for (int64_t j = lo, b = lo / bs, t = lo % bs; j < len; ++j) {
        offsets[j - lo] = tables[i * mb + b] * block_stride + t * token_stride + kvh * hd;
        if (++t == bs) t = 0, ++b;
      }
      const int64_t* off = offsets.data();  // off[t]: key lo + t
      for (int64_t t = 0; t < std::min(n, PREFETCH); ++t) {
        prefetch_row<3>(k + off[t], hd);
        prefetch_row<2>(v + off[t], hd);
      }
#if defined(LORAMUX_VEC)
      if constexpr (std::is_same_v<T, float>) {
        if ((hd == 64 || hd == 128) && gh <= 64 && cap == 0.f) {  // soft-capped scores: the scalar path
          (hd == 64 ? decode_heads<64 / Vec::L> : decode_heads<128 / Vec::L>)(
              out + i * H * hd, q + i * H * hd, k, v, off, slopes, sinks, h0, gh, lo, len, scale, s.data(),
              acc.data());
          continue;
        }
      }
#endif
      for (int64_t g = 0; g < gh; ++g)
        for (int64_t d = 0; d < hd; ++d) qf[g * hd + d] = static_cast<float>(q[(i * H + h0 + g) * hd + d]);
      std::fill(mx.begin(), mx.end(), -INFINITY);
      for (int64_t t = 0; t < n; ++t) {  // scores of keys lo + t
        if (t + PREFETCH < n) {
          prefetch_row<3>(k + off[t + PREFETCH], hd);
          prefetch_row<2>(v + off[t + PREFETCH], hd);
        }
        const T* kj = k + off[t];
        const float* kw;
        if constexpr (std::is_same_v<T, float>) {
          kw = kj;
        } else {  // widened once for the task's heads
          for (int64_t d = 0; d < hd; ++d) wide[d] = static_cast<float>(kj[d]);
          kw = wide.data();
        }
        for (int64_t g = 0; g < gh; ++g) {
          const float* qg = qf.data() + g * hd;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < hd; ++d) dot += qg[d] * kw[d];
          float sj = scale * dot;
          if (cap > 0.f) sj = cap * std::tanh(sj / cap);  // Gemma 2's soft cap, before any ALiBi bias
          sj += (slopes ? slopes[h0 + g] : 0.f) * static_cast<float>(lo + t);
          s[g * max_len + t] = sj;
          mx[g] = std::max(mx[g], sj);
        }
      }
      for (int64_t g = 0; g < gh; ++g) {  // softmax weights, unnormalised (a sink: one more logit, no value)
        float* sg = s.data() + g * max_len;
        if (sinks) mx[g] = std::max(mx[g], sinks[h0 + g]);
        float total = sinks ? std::exp(sinks[h0 + g] - mx[g]) : 0.f;
        for (int64_t t = 0; t < n; ++t) {
          sg[t] = std::exp(sg[t] - mx[g]);
          total += sg[t];
        }
        sum[g] = total;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < n; ++t) {  // values
        if (t + PREFETCH < n) prefetch_row<3>(v + off[t + PREFETCH], hd);
        const T* vj = v + off[t];
        const float* vw;
        if constexpr (std::is_same_v<T, float>) {
          vw = vj;
        } else {
          for (int64_t d = 0; d < hd; ++d) wide[d] = static_cast<float>(vj[d]);
          vw = wide.data();
        }
        for (int64_t g = 0; g < gh; ++g) {
          const float w = s[g * max_len + t];
          float* ac = acc.data() + g * hd;
#pragma omp simd
          for (int64_t d = 0; d < hd; ++d) ac[d] += w * vw[d];
        }
      }
      for (int64_t g = 0; g < gh; ++g) {
        T* oi = out + (i * H + h0 + g) * hd;
        const float inv = 1.f / sum[g];
        for (int64_t d = 0; d < hd; ++d) oi[d] = static_cast<T>(acc[g * hd + d] * inv);
      }
    }
  });
}

void paged_decode(torch::Tensor out, torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor tables,
                  torch::Tensor lengths, double scale, int64_t window, torch::Tensor slopes, double softcap,
                  torch::Tensor sinks, int64_t chunk) {
  TORCH_CHECK(q.device().is_cpu() && q.is_contiguous() && out.is_contiguous() && k.is_contiguous() &&
              v.is_contiguous() && k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
              out.scalar_type() == q.scalar_type(), "paged_decode: contiguous CPU tensors of one dtype");
  TORCH_CHECK(tables.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong && tables.is_contiguous() &&
              lengths.is_contiguous() && tables.dim() == 2 && tables.size(0) == q.size(0),
              "paged_decode: int64 tables [D, MB] and lengths [D]");
  TORCH_CHECK(slopes.numel() == 0 || (slopes.scalar_type() == at::kFloat && slopes.numel() == q.size(1)),
              "paged_decode: float32 slopes [H] or empty");
  TORCH_CHECK(softcap >= 0.0, "paged_decode: softcap >= 0 (0: none)");
  TORCH_CHECK(sinks.numel() == 0 || (sinks.scalar_type() == at::kFloat && sinks.numel() == q.size(1) &&
              sinks.is_contiguous()), "paged_decode: float32 sinks [H] or empty");
  const int64_t D = q.size(0);
  if (D == 0) return;
  const int64_t max_len = lengths.max().item<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "paged_decode", [&] {
    paged_rows<scalar_t>(out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                         v.data_ptr<scalar_t>(), tables.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(),
                         slopes.numel() ? slopes.data_ptr<float>() : nullptr,
                         sinks.numel() ? sinks.data_ptr<float>() : nullptr, D, q.size(1), k.size(2), q.size(2),
                         k.size(1), tables.size(1), static_cast<float>(scale), window, chunk, max_len,
                         static_cast<float>(softcap));
  });
}

// dst[0:n] = src[0:n] in D, rounded once (to nearest, ties to even). Returns the sum of v - v
// over the values written (as float32): 0 if every one is finite, NaN otherwise. float16 and
// bfloat16 go eight lanes at a time (F16C; integer ops GCC vectorises), as c10's scalar
// conversions made a float16 load slower than torch's ops, with the same results.
template <typename D, typename W>
static inline float store(D* dst, const W* src, int64_t n) {
  float chk = 0.f;
#pragma omp simd reduction(+ : chk)
  for (int64_t c = 0; c < n; ++c) {
    const D v = static_cast<D>(src[c]);
    dst[c] = v;
    chk += static_cast<float>(v) - static_cast<float>(v);
  }
  return chk;
}
static inline float store(c10::Half* dst, const float* src, int64_t n) {
  float chk = 0.f;
  int64_t c = 0;
#if defined(__F16C__)
  __m256 acc = _mm256_setzero_ps();
  for (; c + 8 <= n; c += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + c), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c), h);
    const __m256 back = _mm256_cvtph_ps(h);
    acc = _mm256_add_ps(acc, _mm256_sub_ps(back, back));
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, acc);
  for (float l : lanes) chk += l;
#endif
  for (; c < n; ++c) {
    const c10::Half v = static_cast<c10::Half>(src[c]);
    dst[c] = v;
    chk += static_cast<float>(v) - static_cast<float>(v);
  }
  return chk;
}
static inline float store(c10::BFloat16* dst, const float* src, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  float chk = 0.f;
#pragma omp simd reduction(+ : chk)
  for (int64_t c = 0; c < n; ++c) {
    uint32_t u;
    std::memcpy(&u, src + c, sizeof u);
    const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;  // c10 writes every NaN as 0x7FC0
    const uint16_t v = nan ? uint16_t(0x7FC0) : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    d[c] = v;
    const uint32_t w = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &w, sizeof f);
    chk += f - f;
  }
  return chk;
}

// An adapter's rows into its pages, for each pair i: dst[i][index[k], :] = src[i][k, :], with dst [P, w]
// of any row stride (a kind's slice of a fused page store) and src [r, w] contiguous, of one dtype:
// the device pool's fill on the host, one call for every store instead of two torch ops each.
// dst[0:n] = src[0:n], the 64-byte lines of dst written with non-temporal stores where the ISA has
// them: the pages are not read again before the next step, and a plain store first reads each
// line it fills (a page copy then moves three bytes of memory per byte; here two, and 2.2x faster
// on the Intel VM with AVX-512, 1.5x with SSE2 alone). Call stream_fence() before publishing.
static inline void stream_copy(char* dst, const char* src, int64_t n) {
#if defined(__SSE2__)
  const int64_t head = std::min<int64_t>(n, -reinterpret_cast<intptr_t>(dst) & 63);
  std::memcpy(dst, src, head);
  int64_t c = head;
  for (; c + 64 <= n; c += 64) {
#if defined(__AVX512F__)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + c), _mm512_loadu_si512(src + c));
#else
    for (int q = 0; q < 64; q += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + c + q), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c + q)));
#endif
  }
  std::memcpy(dst + c, src + c, n - c);
#else
  std::memcpy(dst, src, n);
#endif
}

// Non-temporal stores are weakly ordered: make them visible before the pages are published.
static inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

void copy_rows(std::vector<torch::Tensor> dst, std::vector<torch::Tensor> src, torch::Tensor index) {
  TORCH_CHECK(dst.size() == src.size(), "copy_rows: one source per destination");
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == at::kLong && index.is_contiguous() && index.dim() == 1,
              "copy_rows: int64 page indices");
  const int64_t r = index.numel();
  const int64_t* ix = index.data_ptr<int64_t>();
  for (size_t i = 0; i < dst.size(); ++i) {
    TORCH_CHECK(dst[i].device().is_cpu() && src[i].device().is_cpu() && dst[i].dim() == 2 && src[i].dim() == 2 &&
                dst[i].scalar_type() == src[i].scalar_type() && dst[i].stride(1) == 1 && src[i].is_contiguous() &&
                src[i].size(0) == r && src[i].size(1) == dst[i].size(1),
                "copy_rows: dst [P, w] with unit column stride, src [len(index), w] contiguous, one dtype");
    for (int64_t k = 0; k < r; ++k)
      TORCH_CHECK(ix[k] >= 0 && ix[k] < dst[i].size(0), "copy_rows: page index out of range");
  }
  for (size_t i = 0; i < dst.size(); ++i) {
    const int64_t elt = dst[i].element_size(), row = dst[i].size(1) * elt, sd = dst[i].stride(0) * elt;
    char* d = static_cast<char*>(dst[i].data_ptr());
    const char* s = static_cast<const char*>(src[i].data_ptr());
    for (int64_t k = 0; k < r; ++k) stream_copy(d + ix[k] * sd, s + k * row, row);
  }
  stream_fence();
}

// The type module_rows computes a page value in before it is stored as D: float32, float64 for
// float64 pages.
template <typename D>
using Wide = std::conditional_t<std::is_same_v<D, double>, double, float>;

// Sum of float(v) - float(v) over v in p[0:n]: 0 if every value is finite, NaN otherwise (store's check).
template <typename D>
static inline float finite_check(const D* p, int64_t n) {
  float chk = 0.f;
#pragma omp simd reduction(+ : chk)
  for (int64_t c = 0; c < n; ++c) chk += static_cast<float>(p[c]) - static_cast<float>(p[c]);
  return chk;
}

// One module of an adapter into page rows, cast to D: for k < R, row ix[k] of the A store gets A[k]
// and that of the B store (s * B).T[k] = float(B[:, k]) * s, rounded to D once (the torch path's
// arithmetic: cast B to float32, then scale), rows k >= r zero. A row already in D (S == D) is
// written straight from the file's bytes after its check; another goes through `tmp` in blocks of
// BLOCK, in W = Wide<D>, into `row`. B is first transposed and scaled into `wide` ([r, out] in W),
// tb output columns at a time, so that a tb x r block of B (8192 values, up to rank 512) stays in
// L1 while its columns are read; read down one column for each page row, B came from L2. (128
// columns were the fastest of 16 to 256 at ranks 8 to 64 in a standalone copy; in the op,
// 0.97-1.02x the time of 32.) Together the two convert a q/v adapter in under half the time, in
// every build (BENCHMARKS.md). Rows are written out with stream_copy (Stream: pages not read again
// before the next step) or memcpy (a flat buffer copied or stored next). Returns false if a written
// value is not finite (NaN or Inf in the file, or an overflow): store() and finite_check() return a
// sum that is 0 only if every value they saw is finite.
template <bool Stream, typename D, typename S>
static bool module_rows(char* da, int64_t sa, char* db, int64_t sb, const S* a, const S* b, int64_t r,
                        const int64_t* ix, int64_t R, int64_t in, int64_t out, float s, std::vector<D>& row,
                        std::vector<Wide<D>>& wide) {
  constexpr int64_t BLOCK = 64;
  const int64_t tb = std::clamp<int64_t>(8192 / std::max<int64_t>(r, 1), 16, 128);
  using W = Wide<D>;
  W tmp[BLOCK];
  float chk = 0.f;
  const auto put = [&](char* dst, const void* src, int64_t n) {
    if constexpr (Stream) stream_copy(dst, static_cast<const char*>(src), n * sizeof(D));
    else std::memcpy(dst, src, n * sizeof(D));
  };
  // n values to dst: already in D, checked and written from where they are; else cast into `row` first
  const auto emit = [&](char* dst, const auto* src, int64_t n) {
    if constexpr (std::is_same_v<std::remove_cv_t<std::remove_pointer_t<decltype(src)>>, D>) {
      chk += finite_check(src, n);
      put(dst, src, n);
    } else {
      chk += store(row.data(), src, n);
      put(dst, row.data(), n);
    }
  };
  row.assign(std::max(in, out), static_cast<D>(0.f));
  for (int64_t k = 0; k < r; ++k) {
    if constexpr (std::is_same_v<S, D>) {  // D(W(v)) == v: the file's row as it is
      emit(da + ix[k] * sa, a + k * in, in);
      continue;
    }
    for (int64_t c0 = 0; c0 < in; c0 += BLOCK) {
      const int64_t n = std::min(BLOCK, in - c0);
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) tmp[c] = static_cast<W>(a[k * in + c0 + c]);
      chk += store(row.data() + c0, tmp, n);
    }
    put(da + ix[k] * sa, row.data(), in);
  }
  wide.resize(r * out);
  W* t = wide.data();
  for (int64_t o0 = 0; o0 < out; o0 += tb) {
    const int64_t n = std::min(tb, out - o0);
    for (int64_t k = 0; k < r; ++k) {
#pragma omp simd
      for (int64_t o = 0; o < n; ++o) t[k * out + o0 + o] = static_cast<W>(static_cast<float>(b[(o0 + o) * r + k]) * s);
    }
  }
  for (int64_t k = 0; k < r; ++k) emit(db + ix[k] * sb, t + k * out, out);
  std::fill(row.begin(), row.end(), static_cast<D>(0.f));
  for (int64_t k = r; k < R; ++k) {
    put(da + ix[k] * sa, row.data(), in);
    put(db + ix[k] * sb, row.data(), out);
  }
  return chk == 0.f;
}

// An adapter's modules into one flat buffer (float32, float16 or bfloat16) in the serving layout
// (adapters/loader.py, LoRAWeights.over): module i at offsets[i], A [rank, in_i] then (s * B).T
// [rank, out_i], from a[i] [r_i, in_i] and b[i] [out_i, r_i] (float32, float64, float16 or
// bfloat16, contiguous) with scaling scales[i], padded to `rank` rows: one call instead of a few
// small torch ops per module. Returns whether every value written is finite.
bool convert_adapter(torch::Tensor flat, std::vector<torch::Tensor> a, std::vector<torch::Tensor> b,
                     std::vector<int64_t> offsets, std::vector<double> scales, int64_t rank) {
  TORCH_CHECK(flat.device().is_cpu() && flat.is_contiguous() && flat.dim() == 1, "convert_adapter: a flat CPU buffer");
  TORCH_CHECK(a.size() == b.size() && a.size() == offsets.size() && a.size() == scales.size(),
              "convert_adapter: one A, B, offset and scaling per module");
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].device().is_cpu() && b[i].device().is_cpu() && a[i].is_contiguous() && b[i].is_contiguous() &&
                a[i].dim() == 2 && b[i].dim() == 2 && b[i].scalar_type() == a[i].scalar_type(),
                "convert_adapter: contiguous 2-D CPU A and B of one dtype");
    const int64_t r = a[i].size(0), in = a[i].size(1), out = b[i].size(0);
    TORCH_CHECK(b[i].size(1) == r && r <= rank && offsets[i] >= 0 && offsets[i] + rank * (in + out) <= flat.numel(),
                "convert_adapter: A [r, in] and B [out, r] with r <= rank, inside the buffer");
  }
  std::vector<int64_t> ix(rank);  // the flat layout's rows are in order
  for (int64_t k = 0; k < rank; ++k) ix[k] = k;
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat.scalar_type(), "convert_adapter", [&] {
    using D = scalar_t;
    std::vector<D> row;
    std::vector<Wide<D>> wide;
    for (size_t i = 0; i < a.size(); ++i) {
      const int64_t in = a[i].size(1), out = b[i].size(0);
      char* da = reinterpret_cast<char*>(flat.data_ptr<D>() + offsets[i]);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a[i].scalar_type(), "convert_adapter_src", [&] {
        finite &= module_rows<false, D, scalar_t>(da, in * sizeof(D), da + rank * in * sizeof(D), out * sizeof(D),
                                                  a[i].data_ptr<scalar_t>(), b[i].data_ptr<scalar_t>(), a[i].size(0),
                                                  ix.data(), rank, in, out, static_cast<float>(scales[i]), row,
                                                  wide);
      });
    }
  });
  return finite;
}

// An adapter's modules straight into its pages of a host pool (adapters/device_pool.py), in place of
// convert_adapter into a flat buffer and copy_rows from it: module i's A [r_i, in_i] and B [out_i, r_i]
// (float32, float64, float16 or bfloat16, contiguous) with scaling scales[i] into the A store dst_a[i]
// [P, in_i] and the B store dst_b[i] [P, out_i] (any row stride, unit column stride; float32, float16
// or bfloat16), page rows index [R], zero beyond r_i. Returns whether every value written is finite.
bool convert_to_pages(std::vector<torch::Tensor> dst_a, std::vector<torch::Tensor> dst_b, std::vector<torch::Tensor> a,
                      std::vector<torch::Tensor> b, std::vector<double> scales, torch::Tensor index) {
  TORCH_CHECK(dst_a.size() == a.size() && dst_b.size() == a.size() && b.size() == a.size() &&
              scales.size() == a.size(), "convert_to_pages: two stores, an A, a B and a scaling per module");
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == at::kLong && index.is_contiguous() && index.dim() == 1,
              "convert_to_pages: int64 page indices");
  const int64_t R = index.numel();
  const int64_t* ix = index.data_ptr<int64_t>();
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].device().is_cpu() && b[i].device().is_cpu() && a[i].is_contiguous() && b[i].is_contiguous() &&
                a[i].dim() == 2 && b[i].dim() == 2 && b[i].scalar_type() == a[i].scalar_type(),
                "convert_to_pages: contiguous 2-D CPU A and B of one dtype");
    const int64_t r = a[i].size(0), in = a[i].size(1), out = b[i].size(0);
    for (const auto& d : {dst_a[i], dst_b[i]})
      TORCH_CHECK(d.device().is_cpu() && d.dim() == 2 && d.stride(1) == 1 && d.scalar_type() == dst_a[0].scalar_type(),
                  "convert_to_pages: 2-D CPU stores of one dtype with unit column stride");
    TORCH_CHECK(b[i].size(1) == r && r <= R && dst_a[i].size(1) == in && dst_b[i].size(1) == out,
                "convert_to_pages: A [r, in] and B [out, r] with r <= len(index), stores [P, in] and [P, out]");
    for (int64_t k = 0; k < R; ++k)
      TORCH_CHECK(ix[k] >= 0 && ix[k] < dst_a[i].size(0) && ix[k] < dst_b[i].size(0),
                  "convert_to_pages: page index out of range");
  }
  if (a.empty()) return true;
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst_a[0].scalar_type(), "convert_to_pages", [&] {
    using D = scalar_t;
    std::vector<D> row;
    std::vector<Wide<D>> wide;
    for (size_t i = 0; i < a.size(); ++i) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a[i].scalar_type(), "convert_to_pages_src", [&] {
        finite &= module_rows<true, D, scalar_t>(
            static_cast<char*>(dst_a[i].data_ptr()), dst_a[i].stride(0) * sizeof(D),
            static_cast<char*>(dst_b[i].data_ptr()), dst_b[i].stride(0) * sizeof(D), a[i].data_ptr<scalar_t>(),
            b[i].data_ptr<scalar_t>(), a[i].size(0), ix, R, a[i].size(1), b[i].size(0), static_cast<float>(scales[i]),
            row, wide);
      });
    }
  });
  stream_fence();
  return finite;
}

// A base linear of a few rows (a small batch's decode step, a drafting row's positions):
//   y[m, o] = bias[o] + x[m, :] . w[o, :]     x: [M, I], w: [O, I], y: [M, O], M <= FEW_ROWS
// Each thread streams its share of w's rows once, two at a time, against all M rows of x (in
// cache), with the next 2 KiB of each prefetched; the server times it against torch at start-up
// and sends it the rows where it is faster (ops/linear.py; BENCHMARKS.md). Its 2 x M sums live in
// registers: past 6 rows they no longer fit beside the loads (16 rows spilled in every build), and
// the tiles below are faster.
constexpr int FEW_ROWS = 6;
constexpr int64_t AHEAD_BYTES = 2048;  // prefetched ahead in each weight row

// The base linears' vectors: the build's widest. The AVX-512 build's 16 lanes issue half the FMAs
// of 8-lane (AVX) ones for the same sums: on an Intel Xeon with two 512-bit FMA ports the default
// model's decode linears took 0.75-0.9x the time at 8 to 64 rows (BENCHMARKS.md); an AMD Zen 4,
// which splits a 512-bit FMA in two, ran both widths alike.
#if defined(__AVX512F__)
typedef float f32xw __attribute__((vector_size(64), aligned(4)));
#else
typedef f32x8 f32xw;
#endif
constexpr int64_t WL = sizeof(f32xw) / sizeof(float);  // its lanes

// Base weights (--quantization): float32, or int8 rows with one float32 scale each, widened value
// by value to q * s (the same float32 product as the dequantized weight's) before the sums.
typedef int8_t i8x8 __attribute__((vector_size(8), aligned(1)));

static inline f32x8 wload8(const float* p, float) { return *reinterpret_cast<const f32x8*>(p); }
static inline f32x8 wload8(const int8_t* p, float s) {
#if defined(__AVX2__)  // GCC widens the generic conversion one lane at a time
  const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<f32x8>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))) * s;
#elif defined(__SSE2__)  // no pmovsxbd: each byte to the top of a 32-bit lane, shifted down with its sign
  const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i b = _mm_unpacklo_epi8(q, q);
  const __m128 lo = _mm_cvtepi32_ps(_mm_srai_epi32(_mm_unpacklo_epi16(b, b), 24));
  const __m128 hi = _mm_cvtepi32_ps(_mm_srai_epi32(_mm_unpackhi_epi16(b, b), 24));
  f32x8 v;
  std::memcpy(&v, &lo, 16);
  std::memcpy(reinterpret_cast<char*>(&v) + 16, &hi, 16);
  return v * s;
#else
  return __builtin_convertvector(*reinterpret_cast<const i8x8*>(p), f32x8) * s;
#endif
}
// WL weights as float32
static inline f32xw wload(const float* p, float) { return *reinterpret_cast<const f32xw*>(p); }
static inline f32xw wload(const int8_t* p, float s) {
#if defined(__AVX512F__)
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<f32xw>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q))) * s;
#else
  return wload8(p, s);
#endif
}
// The sum of a vector's lanes, as a tree: halves added, then their halves. Each sum of a tile or
// a row pair ends here, and in lane order the 16-lane build's 15 dependent adds and extracts took
// about a tenth of a 32-row decode linear on an AMD Zen 5 (BENCHMARKS.md). few_rows and
// many_rows both reduce through it, so a row's output does not depend on how many rows share the
// call (their tails, through madd, too).
static inline float lanes_sum(f32xw v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#elif defined(__AVX__)
  const __m256 w = reinterpret_cast<__m256>(v);
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(w), _mm256_extractf128_ps(w, 1));  // lanes j + (j + 4)
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));  // h0 + h2, h1 + h3
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
#else
  return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
#endif
}
// a * b + c in one rounding where the build has FMA. The paths' tails (inputs past the last full
// vector) go through it: GCC contracts a plain a * b + c in one path and not in another.
static inline float madd(float a, float b, float c) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}
static inline float wval(const float* p, float) { return *p; }
static inline float wval(const int8_t* p, float s) { return static_cast<float>(*p) * s; }

template <int M, typename W>
static void few_rows(float* y, const float* x, const W* w, const float* scale, const float* bias, int64_t O, int64_t I,
                     int64_t sy, int64_t sx, int64_t sw) {
  constexpr int64_t LINE = 64 / sizeof(W), AHEAD = AHEAD_BYTES / sizeof(W);  // values a cache line, ahead
  const int64_t IW = I / WL * WL;
  at::parallel_for(0, (O + 1) / 2, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t o0 = 2 * p, o1 = std::min(o0 + 1, O - 1);  // an odd O's last pair computes its row twice
      const W* w0 = w + o0 * sw;
      const W* w1 = w + o1 * sw;
      const float s0w = scale != nullptr ? scale[o0] : 1.f, s1w = scale != nullptr ? scale[o1] : 1.f;
      f32xw acc0[M], acc1[M];
      for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = f32xw{};
      for (int64_t i = 0; i < IW; i += WL) {
        if (i % LINE == 0) {  // one prefetch a cache line
          __builtin_prefetch(w0 + i + AHEAD, 0, 3);
          __builtin_prefetch(w1 + i + AHEAD, 0, 3);
        }
        const f32xw a = wload(w0 + i, s0w);
        const f32xw b = wload(w1 + i, s1w);
        for (int m = 0; m < M; ++m) {
          const f32xw xv = *reinterpret_cast<const f32xw*>(x + m * sx + i);
          acc0[m] += a * xv;
          acc1[m] += b * xv;
        }
      }
      for (int m = 0; m < M; ++m) {
        float s0 = lanes_sum(acc0[m]), s1 = lanes_sum(acc1[m]);
        for (int64_t i = IW; i < I; ++i) {
          s0 = madd(wval(w0 + i, s0w), x[m * sx + i], s0);
          s1 = madd(wval(w1 + i, s1w), x[m * sx + i], s1);
        }
        if (bias != nullptr) {
          s0 += bias[o0];
          s1 += bias[o1];
        }
        y[m * sy + o0] = s0;
        y[m * sy + o1] = s1;
      }
    }
  });
}

// More rows (M > FEW_ROWS: a batch's decode step, drafting rows, prefill steps): tiles of TILE_O
// weight rows by TILE_M rows of x, their sums in registers across `I`, so each weight row is read
// from memory once (then from L1 for the block's other x rows) and each x value once a tile.
// TILE_O x TILE_M = 6 x 4 in the AVX-512 build (32 vector registers), 3 x 4 elsewhere (16). On an
// AMD EPYC (Zen 4) this ran the default model's 16- to 64-row decode linears in 0.6-0.9x torch's
// time; on an Intel Xeon it beats few_rows from 7 rows in the AVX2 and AVX-512 builds; on an AMD
// Zen 5 it ran a 512-token prefill step's linears in 0.57x the time of torch's GEMM (BENCHMARKS.md).
// The first x tile's pass prefetches each weight row ahead, as few_rows does. int8 rows are
// widened once a block, into a float32 copy in L1/L2 that the x tiles then read.
#if defined(__AVX512F__)
constexpr int TILE_O = 6;
#else
constexpr int TILE_O = 3;
#endif
constexpr int TILE_M = 4;

// Weight rows blk * TILE_O .. + TILE_O - 1 against all M rows of x, TILE_M x rows at a time.
// widened: TILE_O * I floats of scratch for int8 weights (unused for float32).
template <typename W>
__attribute__((always_inline)) static inline void tile_block(float* y, const float* x, const W* w, const float* scale,
                                                             const float* bias, float* widened, int64_t blk, int64_t M,
                                                             int64_t O, int64_t I, int64_t sy, int64_t sx, int64_t sw) {
  constexpr bool wide = std::is_same_v<W, float>;
  const int64_t I8 = I / 8 * 8, IW = I / WL * WL;
  const int64_t o0 = blk * TILE_O;
  const float* wr[TILE_O];  // past O: the last row again (computed, not written)
  for (int a = 0; a < TILE_O; ++a) {
    const int64_t o = std::min(o0 + a, O - 1);
    if constexpr (wide) {
      wr[a] = w + o * sw;
    } else {
      float* out = widened + a * I;
      for (int64_t i = 0; i < I8; i += 8) *reinterpret_cast<f32x8*>(out + i) = wload8(w + o * sw + i, scale[o]);
      for (int64_t i = I8; i < I; ++i) out[i] = wval(w + o * sw + i, scale[o]);
      wr[a] = out;
    }
  }
  for (int64_t m0 = 0; m0 < M; m0 += TILE_M) {
    const int64_t nm = std::min<int64_t>(TILE_M, M - m0);
    const float* xr[TILE_M];  // past M: the last row again
    for (int b = 0; b < TILE_M; ++b) xr[b] = x + (m0 + std::min<int64_t>(b, nm - 1)) * sx;
    // GCC keeps these sums in registers only while the code around them stays lean: a probe that
    // added a prefetch cursor's state beside them got the sums kept in memory, 2x slower.
    f32xw acc[TILE_O][TILE_M];
    for (int a = 0; a < TILE_O; ++a)
      for (int b = 0; b < TILE_M; ++b) acc[a][b] = f32xw{};
    for (int64_t i = 0; i < IW; i += WL) {
      if (wide && m0 == 0 && (i & 15) == 0)  // one prefetch a cache line
        for (int a = 0; a < TILE_O; ++a) __builtin_prefetch(wr[a] + i + AHEAD_BYTES / 4, 0, 3);
      f32xw wv[TILE_O];
      for (int a = 0; a < TILE_O; ++a) wv[a] = *reinterpret_cast<const f32xw*>(wr[a] + i);
      for (int b = 0; b < TILE_M; ++b) {
        const f32xw xv = *reinterpret_cast<const f32xw*>(xr[b] + i);
        for (int a = 0; a < TILE_O; ++a) acc[a][b] += wv[a] * xv;
      }
    }
    for (int a = 0; a < TILE_O && o0 + a < O; ++a) {
      for (int b = 0; b < nm; ++b) {
        float s = lanes_sum(acc[a][b]);
        for (int64_t i = IW; i < I; ++i) s = madd(wr[a][i], xr[b][i], s);
        y[(m0 + b) * sy + o0 + a] = bias != nullptr ? s + bias[o0 + a] : s;
      }
    }
  }
}

template <typename W>
static void many_rows(float* y, const float* x, const W* w, const float* scale, const float* bias, int64_t M, int64_t O,
                      int64_t I, int64_t sy, int64_t sx, int64_t sw) {
  at::parallel_for(0, (O + TILE_O - 1) / TILE_O, 4, [&](int64_t lo, int64_t hi) {
    std::vector<float> widened(std::is_same_v<W, float> ? 0 : TILE_O * I);
    for (int64_t blk = lo; blk < hi; ++blk) tile_block(y, x, w, scale, bias, widened.data(), blk, M, O, I, sy, sx, sw);
  });
}

// many_rows reads all of its x again for each block of TILE_O weight rows, from L2 while x fits
// there. A long prefill step's x does not (8192 rows of 576 floats: 18 MiB), so few_rows_linear
// gives many_rows x in chunks of about X_CHUNK_BYTES (at least 64 rows, whole tiles), each chunk
// re-reading the weights instead. On an AMD Zen 5 (1 MiB L2 a core) the default model's
// projections then took 0.56-0.66x torch's time at 512 to 8192 rows, where x whole took 0.61x at
// 512 rows, 0.98x at 4096 and 1.36x at 8192 (BENCHMARKS.md). Rows are independent: same bits.
constexpr int64_t X_CHUNK_BYTES = 512 * 1024;
static inline int64_t x_chunk_rows(int64_t I) {
  return std::max<int64_t>(64, X_CHUNK_BYTES / std::max<int64_t>(1, I * sizeof(float)) / TILE_M * TILE_M);
}

// few_rows<M> for a run-time M in [1, K]
template <int K, typename W>
static void few_rows_of(int64_t M, float* y, const float* x, const W* w, const float* scale, const float* bias,
                        int64_t O, int64_t I, int64_t sy, int64_t sx, int64_t sw) {
  if (M == K) {
    few_rows<K>(y, x, w, scale, bias, O, I, sy, sx, sw);
  } else if constexpr (K > 1) {
    few_rows_of<K - 1>(M, y, x, w, scale, bias, O, I, sy, sx, sw);
  }
}

// x: [M, I] float32 with M >= 1, w: [O, I] float32, or int8 with scale [O] float32
// (w = q * scale[:, None]); bias: [O] or empty -> y [M, O]
torch::Tensor few_rows_linear(torch::Tensor x, torch::Tensor w, torch::Tensor bias, torch::Tensor scale) {
  const bool q8 = w.scalar_type() == at::kChar;
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && (q8 || w.scalar_type() == at::kFloat),
              "few_rows_linear: x float32 and w float32 or int8, CPU tensors");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.stride(1) == 1 && w.stride(1) == 1,
              "few_rows_linear: x [M, I] and w [O, I] with unit-stride rows");
  const int64_t M = x.size(0), O = w.size(0), I = w.size(1);
  TORCH_CHECK(M >= 1, "few_rows_linear: at least 1 row, got ", M);
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == O),
              "few_rows_linear: bias [O] float32, or empty");
  TORCH_CHECK(q8 ? scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == O
                 : scale.numel() == 0,
              "few_rows_linear: scale [O] float32 with int8 w, empty with float32 w");
  auto y = torch::empty({M, O}, x.options());
  if (O == 0) return y;
  const float* b = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const float* s = q8 ? scale.data_ptr<float>() : nullptr;
  auto run = [&](const auto* wp) {
    for (int64_t r0 = 0, chunk = x_chunk_rows(I); r0 < M; r0 += chunk) {  // one chunk unless M is long
      const int64_t m = std::min(chunk, M - r0);
      float* yc = y.data_ptr<float>() + r0 * y.stride(0);
      const float* xc = x.data_ptr<float>() + r0 * x.stride(0);
      if (m > FEW_ROWS) {
        many_rows(yc, xc, wp, s, b, m, O, I, y.stride(0), x.stride(0), w.stride(0));
      } else {  // few rows, or a long x's last chunk of a few: the same bits either way
        few_rows_of<FEW_ROWS>(m, yc, xc, wp, s, b, O, I, y.stride(0), x.stride(0), w.stride(0));
      }
    }
  };
  if (q8) {
    run(w.data_ptr<int8_t>());
  } else {
    run(w.data_ptr<float>());
  }
  return y;
}

// linear_lora's decode rows: row i (x row rows[i], pages pages[starts[i]:starts[i + 1]]) into its
// accumulator delta[i * width:], in the used kinds' columns. Alike rows of a small rank go in groups
// (bgmv_rows), others alone; the threads take groups from a shared counter, each as it comes free of
// the base's tiles. Out of line: state and code beside the tiles in the threads' lambda made GCC keep
// the tiles' sums on the stack (2x slower; the comment at tile_block's sums).
class DecodeRows {
 public:
  DecodeRows(float* delta, int64_t width, const float* x, const float* a, const float* b, const int64_t* rows,
             const int64_t* starts, const int64_t* pages, int64_t n, int64_t in, int64_t sx, int64_t sa_page,
             int64_t sa_kind, int64_t sb, const std::vector<int64_t>& bounds, const std::vector<int64_t>& used)
      : delta_(delta), x_(x), a_(a), b_(b), rows_(rows), starts_(starts), pages_(pages), width_(width), in_(in), sx_(sx),
        sa_page_(sa_page), sa_kind_(sa_kind), sb_(sb), bounds_(bounds), used_(used) {
    for (int64_t i = 0; i < n;) {
      const int64_t rank = starts[i + 1] - starts[i];
      int64_t j = i + 1;
      if (grouped_rank(rank))
        while (j < n && j - i < GROUP_PAGES / rank && starts[j + 1] - starts[j] == rank) ++j;
      firsts_.push_back(i);
      max_rank_ = std::max(max_rank_, rank);
      i = j;
    }
    firsts_.push_back(n);
  }

  // Rows until none are left (on each thread).
  __attribute__((noinline)) void run() {
    const int64_t num_groups = static_cast<int64_t>(firsts_.size()) - 1;
    std::vector<float> v(used_.size() * std::max(max_rank_, GROUP_PAGES)), spare(width_);
    for (int64_t g; (g = next_.fetch_add(1)) < num_groups;) {
      const int64_t i = firsts_[g], count = firsts_[g + 1] - i, rank = starts_[i + 1] - starts_[i];
      if (!grouped_rank(rank)) {
        bgmv_row(delta_ + i * width_, v.data(), x_ + rows_[i] * sx_, a_, b_, pages_ + starts_[i], rank, in_, bounds_,
                 used_, sa_page_, sa_kind_, sb_);
        continue;
      }
      // the group's rows share their rank: row i + j's pages start j * rank after row i's
      bgmv_rows(delta_ + i * width_, width_, spare.data(), v.data(), x_, sx_, rows_ + i, pages_ + starts_[i], count,
                rank, a_, b_, in_, bounds_, used_, sa_page_, sa_kind_, sb_);
    }
  }

 private:
  float* delta_;
  const float *x_, *a_, *b_;
  const int64_t *rows_, *starts_, *pages_;
  int64_t width_, in_, sx_, sa_page_, sa_kind_, sb_, max_rank_ = 0;
  const std::vector<int64_t>&bounds_, &used_;
  std::vector<int64_t> firsts_;  // group g: rows [firsts_[g], firsts_[g + 1])
  std::atomic<int64_t> next_{0};
};

// A base linear and its decode rows' LoRA (lora's BGMV form, float32, any mix of ranks) in one call:
//   y = few_rows_linear(x, w, bias);  then for each position i, y[rows[i], C_t] += the LoRA of i
// (its pages pages[starts[i] : starts[i + 1]]), as lora adds it: the same bits as those calls.
// The base tiles are bound by the arithmetic, the LoRA rows by memory (each reads its adapter's
// pages once), so they go side by side: thread 0 starts on the LoRA rows while the others take
// blocks of weight rows from the front, then takes blocks from the back (each thread's weights stay
// one stream); a thread out of blocks takes the LoRA rows left. Blocks are claimed a share of what
// is left at a time (guided), so that few claims cross between the cores. One core's reads reach
// most of the memory's bandwidth when it is loaded, less when it is idle: on a 2-core Zen 5 the
// default model's decode linears and LoRA took 0.92-0.95x the time of the two calls in slow-memory
// hours, the same in fast ones (BENCHMARKS.md). Few rows (few_rows' path) or a long x (chunks): the
// linear first, then every thread on the LoRA rows. a: [P, m, in], b: [P, bounds[-1]], rows [n]
// int64, starts [n + 1] int64 (ascending from 0), pages [starts[n]] int64.
torch::Tensor linear_lora(torch::Tensor x, torch::Tensor w, torch::Tensor bias, torch::Tensor a, torch::Tensor b,
                          torch::Tensor rows, torch::Tensor starts, torch::Tensor pages, std::vector<int64_t> bounds,
                          std::vector<int64_t> used) {
  const int64_t M = x.size(0), O = w.size(0), I = w.size(1), n = rows.numel();
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && w.dim() == 2 &&
              x.size(1) == I && x.stride(1) == 1 && w.stride(1) == 1 &&
              (bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == O)),
              "linear_lora: x [M, I] and w [O, I] float32 with unit-stride rows, bias [O] float32 or empty");
  TORCH_CHECK(w.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat,
              "linear_lora: float32 weights and pages");
  TORCH_CHECK(a.dim() == 3 && b.dim() == 2 && a.size(2) == I && a.stride(2) == 1 && b.stride(1) == 1 &&
              static_cast<int64_t>(bounds.size()) == a.size(1) + 1 && bounds.back() <= O && bounds.back() <= b.size(1),
              "linear_lora: a [P, m, in] and b [P, out] with unit-stride rows, bounds within y and b");
  for (int64_t j : used) TORCH_CHECK(j >= 0 && j < a.size(1), "linear_lora: used kind out of range");
  TORCH_CHECK(rows.scalar_type() == at::kLong && starts.scalar_type() == at::kLong && pages.scalar_type() == at::kLong &&
              rows.is_contiguous() && starts.is_contiguous() && pages.is_contiguous() && starts.numel() == n + 1,
              "linear_lora: int64 rows [n], starts [n + 1] and pages");
  const int64_t *rp = rows.data_ptr<int64_t>(), *sp = starts.data_ptr<int64_t>(), *pp = pages.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(sp[i] <= sp[i + 1] && rp[i] >= 0 && rp[i] < M, "linear_lora: starts ascending, rows within x");
  TORCH_CHECK(sp[0] == 0 && sp[n] == pages.numel(), "linear_lora: starts from 0 to the number of pages");
  const bool side_by_side = M > FEW_ROWS && M <= x_chunk_rows(I) && n > 0 && !used.empty();
  auto y = side_by_side ? torch::empty({M, O}, x.options()) : few_rows_linear(x, w, bias, torch::empty({0}, x.options()));
  if (n == 0 || used.empty()) return y;
  const int64_t width = bounds.back(), nblk = side_by_side ? (O + TILE_O - 1) / TILE_O : 0;
  const int64_t T = at::get_num_threads();
  std::unique_ptr<float[]> delta(new float[n * width]);  // row i's LoRA in its used columns
  DecodeRows lora_rows{delta.get(), width, x.data_ptr<float>(), a.data_ptr<float>(), b.data_ptr<float>(), rp, sp, pp, n,
                       I, x.stride(0), a.stride(0), a.stride(1), b.stride(0), bounds, used};
  std::atomic<uint64_t> span{static_cast<uint64_t>(nblk)};  // blocks [front, back) unclaimed: front << 32 | back
  float* yp = y.data_ptr<float>();
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  const float* bias_p = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const int64_t sx = x.stride(0), sw = w.stride(0);
  at::parallel_for(0, T, 1, [&](int64_t lo, int64_t) {
    auto blocks = [&](bool back) {
      uint64_t cur = span.load();
      for (;;) {
        const int64_t f = static_cast<int64_t>(cur >> 32), e = static_cast<int64_t>(cur & 0xffffffffu);
        if (f >= e) return;
        const int64_t k = std::max<int64_t>(1, (e - f) / (2 * T));
        const uint64_t claimed = back ? (uint64_t(f) << 32) | uint64_t(e - k) : (uint64_t(f + k) << 32) | uint64_t(e);
        if (!span.compare_exchange_weak(cur, claimed)) continue;  // cur reloaded
        for (int64_t blk = back ? e - k : f; blk < (back ? e : f + k); ++blk)
          tile_block(yp, xp, wp, nullptr, bias_p, nullptr, blk, M, O, I, O, sx, sw);
        cur = span.load();
      }
    };
    if (lo == 0) lora_rows.run();
    blocks(lo == 0);
    lora_rows.run();
  });
  for (int64_t i = 0; i < n; ++i) {  // every block and row done: add each row's LoRA, as lora does
    float* yi = yp + rp[i] * O;
    const float* di = delta.get() + i * width;
    for (int64_t j : used) {
#pragma omp simd
      for (int64_t c = bounds[j]; c < bounds[j + 1]; ++c) yi[c] = yi[c] + di[c];
    }
  }
  return y;
}

// Each tensor contiguous float32 on the CPU, else an error naming `op`.
static void check_float32(std::initializer_list<const torch::Tensor*> tensors, const char* op) {
  for (const auto* t : tensors)
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == at::kFloat, op,
                ": contiguous float32 CPU tensors");
}

// The decode rows' state slots: int64 [rows], distinct (each row's state is written in place, by
// one task), within the bank's num_slots.
static const int64_t* state_slots(const torch::Tensor& slots, int64_t rows, int64_t num_slots, const char* op) {
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == rows, op,
              ": int64 slots, one a row");
  const int64_t* slot = slots.data_ptr<int64_t>();
  std::vector<char> seen(num_slots, 0);
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(slot[r] >= 0 && slot[r] < num_slots && !seen[slot[r]], op, ": slots distinct and in range");
    seen[slot[r]] = 1;
  }
  return slot;
}

// One token of one head through the gated delta rule: its state S [dk, dv] (float32) updated in
// place and o = q S written to o [dv]; u [dv] is scratch.
static inline void delta_token(float* s, const float* qi, const float* ki, const float* vi, float decay, float b,
                               float* o, float* u, int64_t dk, int64_t dv) {
  std::fill(u, u + dv, 0.f);
  for (int64_t i = 0; i < dk; ++i) {
    float* si = s + i * dv;
    const float ki_ = ki[i];
#pragma omp simd
    for (int64_t j = 0; j < dv; ++j) {
      si[j] *= decay;
      u[j] += ki_ * si[j];
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < dv; ++j) {
    u[j] = (vi[j] - u[j]) * b;  // delta
    o[j] = 0.f;
  }
  for (int64_t i = 0; i < dk; ++i) {
    float* si = s + i * dv;
    const float ki_ = ki[i], qi_ = qi[i];
#pragma omp simd
    for (int64_t j = 0; j < dv; ++j) {
      si[j] += ki_ * u[j];
      o[j] += qi_ * si[j];
    }
  }
}

// One decode token of D sequences through the gated delta rule (ops/gated_delta.py), each
// sequence's state read and written where it lies: row d's heads at state[slots[d]] [H, dk, dv]
// (float32), any slots, no gather or scatter. Per (row, head), in the reference's order:
//   S <- exp(g) S;  u = k S;  delta = beta (v - u);  S <- S + k^T delta;  o = q S
// in two passes over S (the first decays it and reads k S, the second writes and reads q S),
// where the torch ops take five over [D, H, dk, dv] and three temporaries of its size.
// The gated delta rule's checks common to its step and its chunk: contiguous float32 CPU tensors,
// q, k [rows, H, dk], v, out [rows, H, dv], g, beta [rows, H], and a state of `state_dims` dims
// ending in [H, dk, dv] (the step's [slots, ...], the chunk's one sequence's).
static void check_delta(const torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k,
                        const torch::Tensor& v, const torch::Tensor& g, const torch::Tensor& beta,
                        const torch::Tensor& state, int64_t state_dims, const char* op) {
  check_float32({&out, &q, &k, &v, &g, &beta, &state}, op);
  const int64_t rows = q.size(0), H = q.size(1);
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.dim() == 3 && v.size(0) == rows && v.size(1) == H &&
              out.sizes() == v.sizes() && g.numel() == rows * H && beta.numel() == rows * H &&
              state.dim() == state_dims && state.size(-3) == H && state.size(-2) == q.size(2) &&
              state.size(-1) == v.size(2), op, ": q, k [rows, H, dk], v, out [rows, H, dv], g, beta [rows, H], state ",
              state_dims == 4 ? "[slots, H, dk, dv]" : "[H, dk, dv]");
}

void gated_delta_step(torch::Tensor out, torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor g,
                      torch::Tensor beta, torch::Tensor state, torch::Tensor slots) {
  check_delta(out, q, k, v, g, beta, state, 4, "gated_delta_step");
  const int64_t D = q.size(0), H = q.size(1), dk = q.size(2), dv = v.size(2);
  const int64_t* slot = state_slots(slots, D, state.size(0), "gated_delta_step");
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>(),
              *gp = g.data_ptr<float>(), *bp = beta.data_ptr<float>();
  float *sp = state.data_ptr<float>(), *op = out.data_ptr<float>();
  at::parallel_for(0, D * H, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, dk * dv)), [&](int64_t lo, int64_t hi) {
    std::vector<float> u(dv);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t d = task / H, h = task % H;
      delta_token(sp + (slot[d] * H + h) * dk * dv, qp + task * dk, kp + task * dk, vp + task * dv,
                  std::exp(gp[task]), bp[task], op + task * dv, u.data(), dk, dv);
    }
  });
}

// One sequence's L tokens (a prefill chunk) through the gated delta rule from its state [H, dk, dv]
// (float32), updated in place to the state after the last token: the step's recurrence token after
// token. Heads are independent, so each thread takes a range of them through every token, a head's
// state staying in its cache (blocks of a head's columns, each evolving on its own, were slower:
// fewer independent sums a row); the torch ops' chunked form pays a padded chunk of matrices (UT
// transform, two triangular solves) whatever its length.
void gated_delta_chunk(torch::Tensor out, torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor g,
                       torch::Tensor beta, torch::Tensor state) {
  check_delta(out, q, k, v, g, beta, state, 3, "gated_delta_chunk");
  const int64_t L = q.size(0), H = q.size(1), dk = q.size(2), dv = v.size(2);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>(),
              *gp = g.data_ptr<float>(), *bp = beta.data_ptr<float>();
  float *sp = state.data_ptr<float>(), *op = out.data_ptr<float>();
  at::parallel_for(0, H, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> u(dv);
    for (int64_t h = lo; h < hi; ++h)
      for (int64_t t = 0; t < L; ++t) {
        const int64_t row = t * H + h;
        delta_token(sp + h * dk * dv, qp + row * dk, kp + row * dk, vp + row * dv, std::exp(gp[row]), bp[row],
                    op + row * dv, u.data(), dk, dv);
      }
  });
}

// One decode input of R sequences through a depthwise causal convolution (ops/short_conv.py), each
// sequence's state (its last K - 1 inputs) read and shifted where it lies, at state[slots[r]]
// [C, K - 1]: y[r, c] = bias[c] + sum_{j < K - 1} w[c, j] state[c, j] + w[c, K - 1] u[r, c],
// summed in float32 (float64 for float64) and rounded once; the torch ops gather the states, concatenate, convolve and
// scatter back.
template <typename T>
static void conv_rows(T* y, const T* u, T* state, const int64_t* slot, const T* w, const T* bias, int64_t R,
                      int64_t C, int64_t K) {
  using A = at::opmath_type<T>;
  const int64_t W = K - 1;
  at::parallel_for(0, R, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      T* s = state + slot[r] * C * W;
      for (int64_t c = 0; c < C; ++c) {
        T* sc = s + c * W;
        const T* wc = w + c * K;
        A acc = bias ? static_cast<A>(bias[c]) : A(0);
        for (int64_t j = 0; j < W; ++j) acc += static_cast<A>(wc[j]) * static_cast<A>(sc[j]);
        acc += static_cast<A>(wc[W]) * static_cast<A>(u[r * C + c]);
        for (int64_t j = 0; j + 1 < W; ++j) sc[j] = sc[j + 1];
        if (W > 0) sc[W - 1] = u[r * C + c];
        y[r * C + c] = static_cast<T>(acc);
      }
    }
  });
}

// The short convolution's checks common to its step and its chunk: y, u [rows, C] and the weight
// [C, 1, K] (K >= 1) contiguous CPU tensors of one dtype with the state; the bias [C] or empty.
// The state's shape is each caller's. Returns K.
static int64_t check_conv(const torch::Tensor& y, const torch::Tensor& u, const torch::Tensor& state,
                          const torch::Tensor& weight, const torch::Tensor& bias, const char* op) {
  for (const auto* t : {&y, &u, &state, &weight})
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == u.scalar_type(), op,
                ": contiguous CPU tensors of one dtype");
  const int64_t C = u.size(1), K = weight.size(-1);
  TORCH_CHECK(y.sizes() == u.sizes() && weight.numel() == C * K && K >= 1, op, ": u, y [rows, C], weight [C, 1, K]");
  TORCH_CHECK(bias.numel() == 0 || (bias.numel() == C && bias.is_contiguous() && bias.scalar_type() == u.scalar_type()),
              op, ": bias [C] or empty");
  return K;
}

void short_conv_step(torch::Tensor y, torch::Tensor u, torch::Tensor state, torch::Tensor slots, torch::Tensor weight,
                     torch::Tensor bias) {
  const int64_t R = u.size(0), C = u.size(1), K = check_conv(y, u, state, weight, bias, "short_conv_step");
  TORCH_CHECK(state.dim() == 3 && state.size(1) == C && state.size(2) == K - 1,
              "short_conv_step: state [slots, C, K - 1]");
  const int64_t* slot = state_slots(slots, R, state.size(0), "short_conv_step");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "short_conv_step", [&] {
    conv_rows<scalar_t>(y.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), state.data_ptr<scalar_t>(), slot,
                        weight.data_ptr<scalar_t>(), bias.numel() ? bias.data_ptr<scalar_t>() : nullptr, R, C, K);
  });
}

// One sequence's L inputs u [L, C] (a prefill chunk) through the depthwise causal convolution from
// its state [C, K - 1] (its last K - 1 inputs, where it lies), updated in place to the chunk's last
// K - 1 inputs: y[t, c] = bias[c] + sum_{j < K} w[c, j] in[t - (K - 1) + j, c], where in[i < 0] is
// the state's, summed in float32 (float64 for float64) and rounded once. Each thread takes a range
// of channels through every token, the weights transposed to [K, C] so that a token's channels run
// in unit stride; the torch ops concatenate the state and the chunk and convolve a copy.
template <typename T>
static void conv_chunk(T* y, const T* u, T* state, const T* w, const T* bias, int64_t L, int64_t C, int64_t K) {
  using A = at::opmath_type<T>;
  const int64_t W = K - 1;
  std::vector<A> wt(K * C);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < K; ++j) wt[j * C + c] = static_cast<A>(w[c * K + j]);
  at::parallel_for(0, C, 256, [&](int64_t lo, int64_t hi) {
    std::vector<A> acc(hi - lo);
    for (int64_t t = 0; t < L; ++t) {
      for (int64_t c = lo; c < hi; ++c) acc[c - lo] = bias ? static_cast<A>(bias[c]) : A(0);
      for (int64_t j = 0; j < K; ++j) {
        const int64_t i = t - W + j;  // the input's position in the chunk (< 0: the state's)
        const A* wj = wt.data() + j * C;
        if (i >= 0) {
          const T* ui = u + i * C;
#pragma omp simd
          for (int64_t c = lo; c < hi; ++c) acc[c - lo] += wj[c] * static_cast<A>(ui[c]);
        } else {
          for (int64_t c = lo; c < hi; ++c) acc[c - lo] += wj[c] * static_cast<A>(state[c * W + W + i]);
        }
      }
      for (int64_t c = lo; c < hi; ++c) y[t * C + c] = static_cast<T>(acc[c - lo]);
    }
    for (int64_t c = lo; c < hi; ++c) {  // the last W inputs: the state's last W - L, then the chunk's
      T* sc = state + c * W;
      const int64_t kept = std::max<int64_t>(0, W - L);
      for (int64_t j = 0; j < kept; ++j) sc[j] = sc[j + L];
      for (int64_t j = kept; j < W; ++j) sc[j] = u[(L - W + j) * C + c];
    }
  });
}

void short_conv_chunk(torch::Tensor y, torch::Tensor u, torch::Tensor state, torch::Tensor weight, torch::Tensor bias) {
  const int64_t L = u.size(0), C = u.size(1), K = check_conv(y, u, state, weight, bias, "short_conv_chunk");
  TORCH_CHECK(state.dim() == 2 && state.size(0) == C && state.size(1) == K - 1, "short_conv_chunk: state [C, K - 1]");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "short_conv_chunk", [&] {
    conv_chunk<scalar_t>(y.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), state.data_ptr<scalar_t>(),
                         weight.data_ptr<scalar_t>(), bias.numel() ? bias.data_ptr<scalar_t>() : nullptr, L, C, K);
  });
}

// One token of one head through Mamba-2's state space: its state S [P, N] (float32) updated in
// place, S[p, :] <- decay S[p, :] + (dt x_p) b, and y_p = S[p, :] . c + d x_p written to y [P].
static inline void ssd_token(float* s, const float* xi, const float* b, const float* c, float step, float decay,
                             float d, float* y, int64_t P, int64_t N) {
  for (int64_t p = 0; p < P; ++p) {
    float* sr = s + p * N;
    const float w = step * xi[p];
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t n = 0; n < N; ++n) {
      sr[n] = decay * sr[n] + w * b[n];
      acc += sr[n] * c[n];
    }
    y[p] = acc + d * xi[p];
  }
}

// One decode token of R sequences through Mamba-2's selective state space (ops/ssd.py), each
// sequence's state read and written where it lies, at state[slots[r]] [H, P, N] (float32). Per
// (row, head h of group g = h / (H / G)), with a = exp(dt A_h):
//   S[p, :] <- a S[p, :] + (dt x_p) B_g;   y_p = S[p, :] . C_g + D_h x_p
// in one pass over S, where the torch ops take three over [R, H, P, N] and two temporaries.
// Mamba-2's checks common to its step and its chunk: contiguous float32 CPU tensors, x, y
// [rows, H, P], dt [rows, H], A, D [H], B, C [rows, G, N] (G dividing H), and a state of
// `state_dims` dims ending in [H, P, N] (the step's [slots, ...], the chunk's one sequence's).
static void check_ssd(const torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& dt, const torch::Tensor& A,
                      const torch::Tensor& B, const torch::Tensor& C, const torch::Tensor& D,
                      const torch::Tensor& state, int64_t state_dims, const char* op) {
  check_float32({&y, &x, &dt, &A, &B, &C, &D, &state}, op);
  const int64_t rows = x.size(0), H = x.size(1), G = B.size(1);
  TORCH_CHECK(x.dim() == 3 && y.sizes() == x.sizes() && dt.numel() == rows * H && A.numel() == H && D.numel() == H &&
              B.dim() == 3 && B.size(0) == rows && C.sizes() == B.sizes() && G > 0 && H % G == 0 &&
              state.dim() == state_dims && state.size(-3) == H && state.size(-2) == x.size(2) &&
              state.size(-1) == B.size(2), op, ": x, y [rows, H, P], dt [rows, H], A, D [H], B, C [rows, G, N], state ",
              state_dims == 4 ? "[slots, H, P, N]" : "[H, P, N]");
}

void ssd_step(torch::Tensor y, torch::Tensor x, torch::Tensor dt, torch::Tensor A, torch::Tensor B, torch::Tensor C,
              torch::Tensor D, torch::Tensor state, torch::Tensor slots) {
  check_ssd(y, x, dt, A, B, C, D, state, 4, "ssd_step");
  const int64_t R = x.size(0), H = x.size(1), P = x.size(2), G = B.size(1), N = B.size(2);
  const int64_t* slot = state_slots(slots, R, state.size(0), "ssd_step");
  const float *xp = x.data_ptr<float>(), *dtp = dt.data_ptr<float>(), *ap = A.data_ptr<float>(),
              *bp = B.data_ptr<float>(), *cp = C.data_ptr<float>(), *dp = D.data_ptr<float>();
  float *sp = state.data_ptr<float>(), *yp = y.data_ptr<float>();
  at::parallel_for(0, R * H, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, P * N)), [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t r = task / H, h = task % H, g = h / (H / G);
      const float step = dtp[task];
      ssd_token(sp + (slot[r] * H + h) * P * N, xp + task * P, bp + (r * G + g) * N, cp + (r * G + g) * N, step,
                std::exp(step * ap[h]), dp[h], yp + task * P, P, N);
    }
  });
}

// One sequence's L tokens (a prefill chunk) through Mamba-2's state space from its state [H, P, N]
// (float32), updated in place to the state after the last token: the step's recurrence token after
// token, each thread taking a range of heads through every token with their states in its cache.
void ssd_chunk(torch::Tensor y, torch::Tensor x, torch::Tensor dt, torch::Tensor A, torch::Tensor B, torch::Tensor C,
               torch::Tensor D, torch::Tensor state) {
  check_ssd(y, x, dt, A, B, C, D, state, 3, "ssd_chunk");
  const int64_t L = x.size(0), H = x.size(1), P = x.size(2), G = B.size(1), N = B.size(2);
  const float *xp = x.data_ptr<float>(), *dtp = dt.data_ptr<float>(), *ap = A.data_ptr<float>(),
              *bp = B.data_ptr<float>(), *cp = C.data_ptr<float>(), *dp = D.data_ptr<float>();
  float *sp = state.data_ptr<float>(), *yp = y.data_ptr<float>();
  at::parallel_for(0, H, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t h = lo; h < hi; ++h) {
      const int64_t g = h / (H / G);
      for (int64_t t = 0; t < L; ++t) {
        const int64_t row = t * H + h;
        const float step = dtp[row];
        ssd_token(sp + h * P * N, xp + row * P, bp + (t * G + g) * N, cp + (t * G + g) * N, step,
                  std::exp(step * ap[h]), dp[h], yp + row * P, P, N);
      }
    }
  });
}

// One token of one channel c through Mamba's selective scan: its state row h [N] updated in place,
// h <- exp(step a) * h + w b (step = dt_c, w = dt_c x_c, a = A[c, :], b = B_t), returning h . cc.
static inline float selective_scan_token(float* h, const float* a, const float* b, const float* cc, float step,
                                         float w, int64_t N) {
  float acc = 0.f;
  int64_t n = 0;
#if defined(LORAMUX_VEC)  // the decays through the attention kernel's exp (step * A <= 0), L at a time
  Vec::V sums = Vec::zero();
  for (; n + Vec::L <= N; n += Vec::L) {
    const Vec::V hn = Vec::fma(exp_vec(Vec::set1(step) * Vec::load(a + n)), Vec::load(h + n),
                               Vec::set1(w) * Vec::load(b + n));
    Vec::store(h + n, hn);
    sums = Vec::fma(hn, Vec::load(cc + n), sums);
  }
  acc = Vec::sum(sums);
#endif
  for (; n < N; ++n) {
    h[n] = std::exp(step * a[n]) * h[n] + w * b[n];
    acc += h[n] * cc[n];
  }
  return acc;
}

// One decode token of R sequences through Mamba's selective scan (ops/selective_scan.py), each
// sequence's state read and written where it lies, at state[slots[r]] [Dc, N] (float32). Per
// (row, channel c): h[c, :] <- exp(dt_c A[c, :]) * h[c, :] + (dt_c x_c) B;  y_c = h[c, :] . C + D_c x_c
// in one pass over the state, where the torch ops take three and two temporaries of its size.
void selective_scan_step(torch::Tensor y, torch::Tensor x, torch::Tensor dt, torch::Tensor A, torch::Tensor B,
                         torch::Tensor C, torch::Tensor D, torch::Tensor state, torch::Tensor slots) {
  check_float32({&y, &x, &dt, &A, &B, &C, &D, &state}, "selective_scan_step");
  const int64_t R = x.size(0), Dc = x.size(1), N = A.size(1);
  TORCH_CHECK(y.sizes() == x.sizes() && dt.sizes() == x.sizes() && A.size(0) == Dc && D.numel() == Dc &&
              B.size(0) == R && B.size(1) == N && C.sizes() == B.sizes() && state.dim() == 3 &&
              state.size(1) == Dc && state.size(2) == N,
              "selective_scan_step: x, dt, y [R, D], A [D, N], B, C [R, N], D [D], state [slots, D, N]");
  const int64_t* slot = state_slots(slots, R, state.size(0), "selective_scan_step");
  const float *xp = x.data_ptr<float>(), *dtp = dt.data_ptr<float>(), *ap = A.data_ptr<float>(),
              *bp = B.data_ptr<float>(), *cp = C.data_ptr<float>(), *dp = D.data_ptr<float>();
  float *sp = state.data_ptr<float>(), *yp = y.data_ptr<float>();
  at::parallel_for(0, R * Dc, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, N)), [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t r = task / Dc, c = task % Dc;
      const float step = dtp[task];
      yp[task] = selective_scan_token(sp + (slot[r] * Dc + c) * N, ap + c * N, bp + r * N, cp + r * N, step,
                                      step * xp[task], N) + dp[c] * xp[task];
    }
  });
}

// One sequence's L tokens (a prefill chunk) through Mamba's selective scan from its state [Dc, N]
// (float32), updated in place to the state after the last token: the recurrence of
// selective_scan_step token after token. Channels are independent, so each thread takes a range of
// them through every token, their state rows staying in its cache; B_t and C_t are shared.
void selective_scan_chunk(torch::Tensor y, torch::Tensor x, torch::Tensor dt, torch::Tensor A, torch::Tensor B,
                          torch::Tensor C, torch::Tensor D, torch::Tensor state) {
  check_float32({&y, &x, &dt, &A, &B, &C, &D, &state}, "selective_scan_chunk");
  const int64_t L = x.size(0), Dc = x.size(1), N = A.size(1);
  TORCH_CHECK(y.sizes() == x.sizes() && dt.sizes() == x.sizes() && A.size(0) == Dc && D.numel() == Dc &&
              B.size(0) == L && B.size(1) == N && C.sizes() == B.sizes() && state.dim() == 2 &&
              state.size(0) == Dc && state.size(1) == N,
              "selective_scan_chunk: x, dt, y [L, D], A [D, N], B, C [L, N], D [D], state [D, N]");
  const float *xp = x.data_ptr<float>(), *dtp = dt.data_ptr<float>(), *ap = A.data_ptr<float>(),
              *bp = B.data_ptr<float>(), *cp = C.data_ptr<float>(), *dp = D.data_ptr<float>();
  float *sp = state.data_ptr<float>(), *yp = y.data_ptr<float>();
  at::parallel_for(0, Dc, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, N * L)), [&](int64_t lo, int64_t hi) {
    for (int64_t t = 0; t < L; ++t) {
      const float *b = bp + t * N, *cc = cp + t * N;
      for (int64_t c = lo; c < hi; ++c) {
        const int64_t i = t * Dc + c;
        const float step = dtp[i];
        yp[i] = selective_scan_token(sp + c * N, ap + c * N, b, cc, step, step * xp[i], N) + dp[c] * xp[i];
      }
    }
  });
}

// Each releases the GIL while it runs, as torch's own ops do: the engine thread's kernels let the
// adapter I/O thread's Python run, and a conversion on the I/O thread does not stall the engine.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("lora", &lora, "batched LoRA over the page store (BGMV rows or SGMV segments), fused kinds", release());
  m.def("paged_decode", &paged_decode, "decode attention over block-paged KV", release());
  m.def("convert_adapter", &convert_adapter, "an adapter's A and scaled B.T into the serving layout, checked finite",
        release());
  m.def("copy_rows", &copy_rows, "an adapter's rows into its pages of every store", release());
  m.def("convert_to_pages", &convert_to_pages,
        "an adapter's A and scaled B.T straight into its pages of every store, checked finite", release());
  m.def("gated_delta_step", &gated_delta_step,
        "one decode token of many sequences through the gated delta rule, states updated in their slots", release());
  m.def("short_conv_step", &short_conv_step,
        "one decode input of many sequences through a depthwise causal convolution, states shifted in their slots",
        release());
  m.def("gated_delta_chunk", &gated_delta_chunk,
        "one sequence's tokens through the gated delta rule from its state, updated in place", release());
  m.def("short_conv_chunk", &short_conv_chunk,
        "one sequence's inputs through a depthwise causal convolution from its state, updated in place", release());
  m.def("ssd_step", &ssd_step,
        "one decode token of many sequences through Mamba-2's state space, states updated in their slots", release());
  m.def("ssd_chunk", &ssd_chunk,
        "one sequence's tokens through Mamba-2's state space from its state, updated in place", release());
  m.def("selective_scan_step", &selective_scan_step,
        "one decode token of many sequences through Mamba's selective scan, states updated in their slots", release());
  m.def("selective_scan_chunk", &selective_scan_chunk,
        "one sequence's tokens through Mamba's selective scan from its state, updated in place", release());
  m.def("linear_lora", &linear_lora,
        "a base linear with its decode rows' LoRA added, the tiles and the rows side by side (float32)", release());
  m.def("few_rows_linear", &few_rows_linear,
        "a base linear of any number of rows (float32 or int8 weights), weights streamed once", release());
}
