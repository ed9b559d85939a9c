/* CPU kernels for a decode step: weight-only int8 / int4 matrix products for a few rows, y = x W^T
 * (below), and the attention of one query token per row over a static KV cache (further down).
 *
 * Built at run time by spt_fast/model/cpu_native.py with the system C compiler (-O3 -march=native
 * -fopenmp; linked to the libgomp torch already loaded, so one OpenMP pool serves both).
 *
 * Layouts (tiles of T = 32 output rows; N padded to a multiple of 32 with zero rows):
 *   int8: q[N/32][K][32] int8, one fp32 scale per output row:       w[n][k] = q * scale[n]
 *   int4: q[N/32][K/8][32] uint32 words, nibble i of word (t, b, j) is the weight of row 32 t + j,
 *         column 8 b + i; per group of G columns and row a scale and a low (bf16): w = q * scale + low,
 *         each [N/32][K/G][32] (a tile's scales one contiguous run: laid out [K/G][N], a tile read
 *         them as K/G scattered lines, a third of what an int4 step reads)
 * Each word (int4) or byte (int8) of a tile row belongs to one output lane, so a 16-lane vector of
 * them turns into 16 weights with a shift, a mask and one conversion: no shuffles across lanes.
 * x: [M][K] fp32, y: [M][N] fp32 (N the padded width). K a multiple of 8; G of 8. `threads`: torch's
 * thread count (OpenMP's per-thread default would be every core).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define T 32
/* How far ahead of its reads an int kernel asks for weights (software prefetch). A row or two
 * against int weights does little work per byte, and the hardware prefetcher alone kept one AMD
 * EPYC core at 19-27 GB/s over an out-of-cache 3072x576 int4 matrix; 8 KB ahead, 48-51 GB/s
 * (int8: 35 -> 48-50). The dense kernels gained nothing from it (41-45 GB/s either way). */
#define AHEAD 8192
/* Tokens of one cache row that attend_heads takes in one call (see there). */
#define RUN 4

/* bf16 <-> fp32 (round to nearest even; activations are finite), and element i of an fp32 or a
 * bf16 array (bf) as a float. */
static inline uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
static inline float from_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static inline float ld(const void* p, int64_t i, int bf) {
  return bf ? from_bf16(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}
static inline void st(void* p, int64_t i, float f, int bf) {
  if (bf) ((uint16_t*)p)[i] = to_bf16(f);
  else ((float*)p)[i] = f;
}
#if defined(__AVX512F__)
static inline __m512 load_bf16x16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
#endif

/* ---- int8 ---- */

#if defined(__AVX512F__)
/* MR rows of x against one tile; four partial sums per lane (k mod 4) so that the FMA chains
 * overlap. */
static inline __attribute__((always_inline)) void int8_tile(const float* x, const int8_t* qt, const float* sc,
                                                           float* y, int64_t N, int64_t K, int MR) {
  __m512 acc[2][4][2];
  for (int m = 0; m < MR; m++)
    for (int p = 0; p < 4; p++) acc[m][p][0] = acc[m][p][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 4) {
    for (int p = 0; p < 4; p++) {
      const int8_t* row = qt + (k + p) * T;
      if (!(p & 1)) _mm_prefetch((const char*)row + AHEAD, _MM_HINT_T0); /* 64 bytes: two rows */
      __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)row)));
      __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(row + 16))));
      for (int m = 0; m < MR; m++) {
        __m512 xv = _mm512_set1_ps(x[m * K + k + p]);
        acc[m][p][0] = _mm512_fmadd_ps(xv, w0, acc[m][p][0]);
        acc[m][p][1] = _mm512_fmadd_ps(xv, w1, acc[m][p][1]);
      }
    }
  }
  __m512 s0 = _mm512_loadu_ps(sc), s1 = _mm512_loadu_ps(sc + 16);
  for (int m = 0; m < MR; m++) {
    __m512 a0 = _mm512_add_ps(_mm512_add_ps(acc[m][0][0], acc[m][1][0]), _mm512_add_ps(acc[m][2][0], acc[m][3][0]));
    __m512 a1 = _mm512_add_ps(_mm512_add_ps(acc[m][0][1], acc[m][1][1]), _mm512_add_ps(acc[m][2][1], acc[m][3][1]));
    _mm512_storeu_ps(y + m * N, _mm512_mul_ps(a0, s0));
    _mm512_storeu_ps(y + m * N + 16, _mm512_mul_ps(a1, s1));
  }
}
#else
static inline void int8_tile(const float* x, const int8_t* qt, const float* sc, float* y, int64_t N, int64_t K,
                             int MR) {
  for (int m = 0; m < MR; m++) {
    float acc[T] = {0};
    for (int64_t k = 0; k < K; k++) {
      float xv = x[m * K + k];
      const int8_t* row = qt + k * T;
      for (int j = 0; j < T; j++) acc[j] += xv * (float)row[j];
    }
    for (int j = 0; j < T; j++) y[m * N + j] = acc[j] * sc[j];
  }
}
#endif

/* Tile t of y = x W^T for all M rows, two rows at a time (x rows K apart). */
static void int8_unit(const float* x, const int8_t* q, const float* scale, float* y, int64_t M, int64_t N, int64_t K,
                      int64_t t) {
  const int8_t* qt = q + t * K * T;
  for (int64_t m = 0; m < M; m += 2) {
    if (M - m >= 2)
      int8_tile(x + m * K, qt, scale + t * T, y + m * N + t * T, N, K, 2);
    else
      int8_tile(x + m * K, qt, scale + t * T, y + m * N + t * T, N, K, 1);
  }
}

void spt_int8_mm(const float* x, const int8_t* q, const float* scale, float* y, int64_t M, int64_t N, int64_t K,
                 int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < N / T; t++) int8_unit(x, q, scale, y, M, N, K, t);
}

/* ---- int4 ---- */

#if defined(__AVX512BF16__)
/* With AVX-512 BF16 a nibble pair becomes two bf16 numbers in one 32-bit lane by a shift and one
 * ternary logic op: (word >> 4i) & 0x000F000F | 0x43004300 is (128 + q_i, 128 + q_i+4), exact in
 * bf16. One dot instruction then multiplies both by x (bf16 pairs, xp) and adds them into fp32:
 * about half the instructions per weight of the fp32 path, which is what bounds it. The 128 that
 * rides along is taken off per group with the sum of the same bf16 activations (xb). */
#define INT4_BF16 1
static inline __attribute__((always_inline)) void int4_tile_bf16(const uint32_t* xp, const float* xb,
                                                                const uint32_t* qt, const uint16_t* sc,
                                                                const uint16_t* lo, float* y, int64_t N, int64_t K,
                                                                int64_t G, int MR) {
  const __m512i keep = _mm512_set1_epi32(0x000F000F), magic = _mm512_set1_epi32(0x43004300);
  const __m512 c128 = _mm512_set1_ps(128.f);
  __m512 r[2][2];
  for (int m = 0; m < MR; m++) r[m][0] = r[m][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / G; g++) {
    /* one partial sum per row, lane half and nibble pair: 8 (16) independent dot chains, which
     * the dot instruction's latency needs (with 4, a 3072x576 layer took 41 instead of 35 us) */
    __m512 a[2][4][2];
    for (int m = 0; m < MR; m++)
      for (int i = 0; i < 4; i++) a[m][i][0] = a[m][i][1] = _mm512_setzero_ps();
    for (int64_t b = g * (G / 8); b < (g + 1) * (G / 8); b++) {
      const uint32_t* row = qt + b * T;
      _mm_prefetch((const char*)row + AHEAD, _MM_HINT_T0);
      _mm_prefetch((const char*)row + AHEAD + 64, _MM_HINT_T0);
      __m512i v0 = _mm512_loadu_si512(row), v1 = _mm512_loadu_si512(row + 16);
      for (int i = 0; i < 4; i++) {
        __m512i u0 = i ? _mm512_srli_epi32(v0, 4 * i) : v0, u1 = i ? _mm512_srli_epi32(v1, 4 * i) : v1;
        __m512bh w0 = (__m512bh)_mm512_ternarylogic_epi32(u0, keep, magic, 0xEA);  /* (u & keep) | magic */
        __m512bh w1 = (__m512bh)_mm512_ternarylogic_epi32(u1, keep, magic, 0xEA);
        for (int m = 0; m < MR; m++) {
          __m512bh xv = (__m512bh)_mm512_set1_epi32((int)xp[m * (K / 2) + b * 4 + i]);
          a[m][i][0] = _mm512_dpbf16_ps(a[m][i][0], w0, xv);
          a[m][i][1] = _mm512_dpbf16_ps(a[m][i][1], w1, xv);
        }
      }
    }
    __m512 s0 = load_bf16x16(sc + g * T), s1 = load_bf16x16(sc + g * T + 16);
    __m512 l0 = load_bf16x16(lo + g * T), l1 = load_bf16x16(lo + g * T + 16);
    for (int m = 0; m < MR; m++) {
      __m512 u = _mm512_set1_ps(xb[m * (K / G) + g]), off = _mm512_mul_ps(u, c128);
      __m512 d0 = _mm512_add_ps(_mm512_add_ps(a[m][0][0], a[m][1][0]), _mm512_add_ps(a[m][2][0], a[m][3][0]));
      __m512 d1 = _mm512_add_ps(_mm512_add_ps(a[m][0][1], a[m][1][1]), _mm512_add_ps(a[m][2][1], a[m][3][1]));
      r[m][0] = _mm512_fmadd_ps(u, l0, _mm512_fmadd_ps(_mm512_sub_ps(d0, off), s0, r[m][0]));
      r[m][1] = _mm512_fmadd_ps(u, l1, _mm512_fmadd_ps(_mm512_sub_ps(d1, off), s1, r[m][1]));
    }
  }
  for (int m = 0; m < MR; m++) {
    _mm512_storeu_ps(y + m * N, r[m][0]);
    _mm512_storeu_ps(y + m * N + 16, r[m][1]);
  }
}

#endif

#if defined(__AVX512F__)
/* MR rows of x against one tile. xs: x with column k scaled by 16^-(k mod 8) (see spt_int4_mm),
 * xsum: each group's sum of x. Nibble i is taken in place, (word & 15 << 4i), which converts
 * exactly to q * 16^i; the top nibble is shifted down instead (it would come out negative). */
#define NIBBLE(i, w0, w1)                                                                              \
  if (i < 7) {                                                                                         \
    __m512i m_ = _mm512_set1_epi32(0xF << (4 * i));                                                    \
    w0 = _mm512_cvtepi32_ps(_mm512_and_si512(v0, m_));                                                 \
    w1 = _mm512_cvtepi32_ps(_mm512_and_si512(v1, m_));                                                 \
  } else {                                                                                             \
    w0 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v0, 28));                                                \
    w1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v1, 28));                                                \
  }
static inline __attribute__((always_inline)) void int4_tile(const float* xs, const float* xsum, const uint32_t* qt,
                                                           const uint16_t* sc, const uint16_t* lo, float* y, int64_t N,
                                                           int64_t K, int64_t G, int MR) {
  __m512 r00 = _mm512_setzero_ps(), r01 = r00, r10 = r00, r11 = r00;
  for (int64_t g = 0; g < K / G; g++) {
    /* two partial sums per row and lane (even / odd nibbles): independent FMA chains */
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;  /* row 0: even lo/hi, odd lo/hi */
    __m512 a10 = a00, a11 = a00, a12 = a00, a13 = a00;                  /* row 1 */
    for (int64_t b = g * (G / 8); b < (g + 1) * (G / 8); b++) {
      const uint32_t* row = qt + b * T;
      _mm_prefetch((const char*)row + AHEAD, _MM_HINT_T0);
      _mm_prefetch((const char*)row + AHEAD + 64, _MM_HINT_T0);
      __m512i v0 = _mm512_loadu_si512(row), v1 = _mm512_loadu_si512(row + 16);
      const float* x0 = xs + b * 8;
      const float* x1 = xs + K + b * 8;
#define STEP(i)                                                                                        \
  {                                                                                                    \
    __m512 w0, w1;                                                                                     \
    NIBBLE(i, w0, w1)                                                                                  \
    __m512 p0 = _mm512_set1_ps(x0[i]);                                                                 \
    if (i & 1) { a02 = _mm512_fmadd_ps(p0, w0, a02); a03 = _mm512_fmadd_ps(p0, w1, a03); }             \
    else { a00 = _mm512_fmadd_ps(p0, w0, a00); a01 = _mm512_fmadd_ps(p0, w1, a01); }                   \
    if (MR > 1) {                                                                                      \
      __m512 p1 = _mm512_set1_ps(x1[i]);                                                               \
      if (i & 1) { a12 = _mm512_fmadd_ps(p1, w0, a12); a13 = _mm512_fmadd_ps(p1, w1, a13); }           \
      else { a10 = _mm512_fmadd_ps(p1, w0, a10); a11 = _mm512_fmadd_ps(p1, w1, a11); }                 \
    }                                                                                                  \
  }
      STEP(0) STEP(1) STEP(2) STEP(3) STEP(4) STEP(5) STEP(6) STEP(7)
#undef STEP
    }
    __m512 s0 = load_bf16x16(sc + g * T), s1 = load_bf16x16(sc + g * T + 16);
    __m512 l0 = load_bf16x16(lo + g * T), l1 = load_bf16x16(lo + g * T + 16);
    __m512 u0 = _mm512_set1_ps(xsum[g]);
    r00 = _mm512_fmadd_ps(u0, l0, _mm512_fmadd_ps(_mm512_add_ps(a00, a02), s0, r00));
    r01 = _mm512_fmadd_ps(u0, l1, _mm512_fmadd_ps(_mm512_add_ps(a01, a03), s1, r01));
    if (MR > 1) {
      __m512 u1 = _mm512_set1_ps(xsum[K / G + g]);
      r10 = _mm512_fmadd_ps(u1, l0, _mm512_fmadd_ps(_mm512_add_ps(a10, a12), s0, r10));
      r11 = _mm512_fmadd_ps(u1, l1, _mm512_fmadd_ps(_mm512_add_ps(a11, a13), s1, r11));
    }
  }
  _mm512_storeu_ps(y, r00);
  _mm512_storeu_ps(y + 16, r01);
  if (MR > 1) {
    _mm512_storeu_ps(y + N, r10);
    _mm512_storeu_ps(y + N + 16, r11);
  }
}
#undef NIBBLE
#else
static inline void int4_tile(const float* xs, const float* xsum, const uint32_t* qt, const uint16_t* sc,
                             const uint16_t* lo, float* y, int64_t N, int64_t K, int64_t G, int MR) {
  for (int m = 0; m < MR; m++) {
    float res[T] = {0};
    for (int64_t g = 0; g < K / G; g++) {
      float part[T] = {0};
      for (int64_t b = g * G / 8; b < (g + 1) * G / 8; b++) {
        const uint32_t* row = qt + b * T;
        for (int i = 0; i < 8; i++) {
          float xv = xs[m * K + b * 8 + i];
          uint32_t keep = i < 7 ? 15u << (4 * i) : 0u;
          for (int j = 0; j < T; j++)
            part[j] += xv * (i < 7 ? (float)(int32_t)(row[j] & keep) : (float)(row[j] >> 28));
        }
      }
      for (int j = 0; j < T; j++) res[j] += part[j] * from_bf16(sc[g * T + j]) + xsum[m * (K / G) + g] * from_bf16(lo[g * T + j]);
    }
    for (int j = 0; j < T; j++) y[m * N + j] = res[j];
  }
}
#endif

/* Row b of x (fp32 or bf16, bf) in the form the int4 tiles take, into row b of pre and sums:
 * with AVX-512 BF16, bf16 pairs (x[8j+i], x[8j+i+4]), K / 2 words a row, and each group's sum of
 * those bf16 values; else x scaled per column for the in-place nibbles, K floats a row, and each
 * group's sum of x. sums: K / G a row. */
static void int4_input_row(const void* x, int bf, int64_t K, int64_t G, float* pre, float* sums, int64_t b) {
  float* xsum = sums + b * (K / G);
#if defined(INT4_BF16) && defined(__AVX512VL__)
  /* 8 columns at a time: round to bf16 (nearest even, as to_bf16 for normal numbers; the
   * instruction flushes values below ~1e-38 to zero), pair column i with i + 4 */
  uint32_t* xp = (uint32_t*)pre + b * (K / 2);
  for (int64_t g = 0; g < K / G; g++) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = g * (G / 8); j < (g + 1) * (G / 8); j++) {
      __m128i h = bf ? _mm_loadu_si128((const __m128i*)((const uint16_t*)x + 8 * j))
                     : (__m128i)_mm256_cvtneps_pbh(_mm256_loadu_ps((const float*)x + 8 * j));
      _mm_storeu_si128((__m128i*)(xp + 4 * j), _mm_unpacklo_epi16(h, _mm_srli_si128(h, 8)));
      acc = _mm256_add_ps(acc, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    }
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    xsum[g] = _mm_cvtss_f32(_mm_add_ss(s4, _mm_movehdup_ps(s4)));
  }
#elif defined(INT4_BF16)
  uint32_t* xp = (uint32_t*)pre + b * (K / 2);
  for (int64_t g = 0; g < K / G; g++) xsum[g] = 0.f;
  for (int64_t j = 0; j < K / 8; j++)
    for (int i = 0; i < 4; i++) {
      uint16_t lo16 = to_bf16(ld(x, 8 * j + i, bf)), hi16 = to_bf16(ld(x, 8 * j + i + 4, bf));
      xp[4 * j + i] = (uint32_t)lo16 | ((uint32_t)hi16 << 16);
      xsum[(8 * j) / G] += from_bf16(lo16) + from_bf16(hi16);
    }
#else
  float* xs = pre + b * K;
  for (int64_t k = 0; k < K; k++) xs[k] = ld(x, k, bf) * (k % 8 == 7 ? 1.f : 1.f / (float)(1u << (4 * (k % 8))));
  for (int64_t g = 0; g < K / G; g++) {
    float sum = 0.f;
    for (int64_t k = g * G; k < (g + 1) * G; k++) sum += ld(x, k, bf);
    xsum[g] = sum;
  }
#endif
}

/* Tile t of y = x W^T for all M rows (prepared by int4_input_row), two rows at a time. */
static void int4_unit(const float* pre, const float* sums, const uint32_t* q, const uint16_t* scale,
                      const uint16_t* low, float* y, int64_t M, int64_t N, int64_t K, int64_t G, int64_t t) {
  const uint32_t* qt = q + t * (K / 8) * T;
  const uint16_t *sc = scale + t * (K / G) * T, *lo = low + t * (K / G) * T;
  for (int64_t m = 0; m < M; m += 2) {
    int mr = M - m >= 2 ? 2 : 1;
    const float* xs = sums + m * (K / G);
    float* out = y + m * N + t * T;
#ifdef INT4_BF16
    const uint32_t* xp = (const uint32_t*)pre + m * (K / 2);
    if (mr == 2) int4_tile_bf16(xp, xs, qt, sc, lo, out, N, K, G, 2);
    else int4_tile_bf16(xp, xs, qt, sc, lo, out, N, K, G, 1);
#else
    if (mr == 2) int4_tile(pre + m * K, xs, qt, sc, lo, out, N, K, G, 2);
    else int4_tile(pre + m * K, xs, qt, sc, lo, out, N, K, G, 1);
#endif
  }
}

/* Returns nonzero when its scratch could not be allocated (nothing written then). */
int spt_int4_mm(const float* x, const uint32_t* q, const uint16_t* scale, const uint16_t* low, float* y, int64_t M,
                int64_t N, int64_t K, int64_t G, int threads) {
  /* Once per call: the rows in the tiles' form. */
  float* pre = (float*)malloc(sizeof(float) * (M * K + M * (K / G)));
  if (!pre) return 1;
  float* sums = pre + M * K;
  for (int64_t m = 0; m < M; m++) int4_input_row(x + m * K, 0, K, G, pre, sums, m);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < N / T; t++) int4_unit(pre, sums, q, scale, low, y, M, N, K, G, t);
  free(pre);
  return 0;
}

/* ---- greedy choice: the index of each row's largest value ----
 * x [rows][n] fp32 (rows `stride` floats apart) -> out [rows]: the first index of the row's maximum,
 * or of its first NaN where it has one (what torch.argmax returns). One pass: each lane keeps its
 * largest value and where it first saw it; the row's answer is the smallest such index among the
 * lanes holding the maximum. PyTorch's took 30 us for one row of the embedded model's 49,152 logits
 * and 240-300 us for 16 (AMD EPYC). */
static int64_t argmax_row(const float* p, int64_t n) {
  int64_t i = 0, at = 0;
  float top = -INFINITY;
  int nan = 0;
#if defined(__AVX512F__)
  if (n >= 16) {
    __m512 vm = _mm512_set1_ps(-INFINITY);
    __m512i vi = _mm512_setzero_si512(), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    for (; i + 16 <= n; i += 16) {
      __m512 v = _mm512_loadu_ps(p + i);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0;
      __mmask16 up = _mm512_cmp_ps_mask(v, vm, _CMP_GT_OQ); /* strictly: a lane keeps its first */
      vm = _mm512_mask_mov_ps(vm, up, v);
      vi = _mm512_mask_mov_epi32(vi, up, idx);
      idx = _mm512_add_epi32(idx, step);
    }
    top = _mm512_reduce_max_ps(vm);
    __mmask16 best = _mm512_cmp_ps_mask(vm, _mm512_set1_ps(top), _CMP_EQ_OQ);
    at = _mm512_mask_reduce_min_epi32(best, vi);
  }
#endif
  for (; i < n; i++) { /* (later indices: only a larger value moves the answer) */
    nan |= p[i] != p[i];
    if (p[i] > top) top = p[i], at = i;
  }
  if (nan)
    for (i = 0; i < n; i++)
      if (p[i] != p[i]) return i;
  return at;
}

void spt_argmax_rows(const float* x, int64_t rows, int64_t n, int64_t stride, int64_t* out, int threads) {
#pragma omp parallel for schedule(static) if (rows >= 4) num_threads(threads)
  for (int64_t r = 0; r < rows; r++) out[r] = argmax_row(x + r * stride, n);
}

/* ---- decode attention: one query token per row ----
 * q [B][H][D], caches k/v [B][Hkv][S][D] (slots past a row's position are never read), out [B][H][D];
 * row b attends to slots 0..pos[b] (query head h reads K/V head h / (H / Hkv)). fp32 math,
 * q/k/v/out all fp32 or all bf16. Measured on the AMD EPYC (9/3 heads of 64, 256 slots): the fused
 * SDPA kernel, small batched matmuls and inductor's loops took 23-300 us a layer for one row and
 * 0.2-2 ms for 16 rows; this, 16 and 98 us (bf16). */

#if defined(__AVX512F__)
static inline __m512 load16(const void* p, int bf) {
  if (bf) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  return _mm512_loadu_ps((const float*)p);
}
/* exp(x) for x <= 0 (scores minus their maximum): 2^n * p(r), r in [-ln2/2, ln2/2], a degree-6
 * polynomial (relative error ~2e-7); below -87 it is 0. */
static inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3f);
  __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mov_ps(~tiny, _mm512_mul_ps(p, _mm512_castsi512_ps(e)));
}

/* Ask for slot s + SLOTS_AHEAD of both K and V while slot s's keys are scored: a task's slots
 * start at a new place in the cache (another row or head), where the hardware prefetcher starts
 * cold, and the cache pages are 4 KiB ones. Measured in the whole step on the AMD EPYC, 16 rows
 * of bf16 against 137 slots: the attention phase took 106-130 us a layer without it, 62-98 with
 * 8-32 slots ahead (16-32 best); V is read right after the scores, so it is asked for then too. */
#define SLOTS_AHEAD 16
static inline void ask_slot(const char* k, const char* v, int64_t s, int64_t row_bytes) {
  for (int64_t o = 0; o < row_bytes; o += 64) {
    _mm_prefetch(k + (s + SLOTS_AHEAD) * row_bytes + o, _MM_HINT_T0);
    _mm_prefetch(v + (s + SLOTS_AHEAD) * row_bytes + o, _MM_HINT_T0);
  }
}

/* One query head over n slots, D = 16 C with C <= 8: q (pre-scaled) and the output stay in
 * registers; scores four slots at a time (four independent FMA chains and reductions: one at a
 * time was bound by their latency, ~60 cycles a slot). */
static void attend_head(const char* q, const char* k, const char* v, char* out, int64_t n, int64_t D, float scale,
                        int bf, float* sc) {
  int64_t es = bf ? 2 : 4, C = D / 16;
  __m512 qv[8], o[8];
  for (int c = 0; c < 8; c++) {
    qv[c] = c < C ? _mm512_mul_ps(load16(q + c * 16 * es, bf), _mm512_set1_ps(scale)) : _mm512_setzero_ps();
    o[c] = _mm512_setzero_ps();
  }
  int64_t s = 0;
  for (; s + 4 <= n; s += 4) {
    const char* k0 = k + s * D * es;
    for (int64_t j = 0; j < 4; j++) ask_slot(k, v, s + j, D * es);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int c = 0; c < 8; c++) {
      if (c >= C) break;
      a0 = _mm512_fmadd_ps(qv[c], load16(k0 + (c * 16) * es, bf), a0);
      a1 = _mm512_fmadd_ps(qv[c], load16(k0 + (D + c * 16) * es, bf), a1);
      a2 = _mm512_fmadd_ps(qv[c], load16(k0 + (2 * D + c * 16) * es, bf), a2);
      a3 = _mm512_fmadd_ps(qv[c], load16(k0 + (3 * D + c * 16) * es, bf), a3);
    }
    sc[s] = _mm512_reduce_add_ps(a0);
    sc[s + 1] = _mm512_reduce_add_ps(a1);
    sc[s + 2] = _mm512_reduce_add_ps(a2);
    sc[s + 3] = _mm512_reduce_add_ps(a3);
  }
  for (; s < n; s++) {
    __m512 a = _mm512_setzero_ps();
    for (int c = 0; c < 8; c++) {
      if (c >= C) break;
      a = _mm512_fmadd_ps(qv[c], load16(k + (s * D + c * 16) * es, bf), a);
    }
    sc[s] = _mm512_reduce_add_ps(a);
  }
  float top = sc[0], sum;
  for (s = 1; s < n; s++) top = sc[s] > top ? sc[s] : top;
  __m512 vs = _mm512_setzero_ps(), vt = _mm512_set1_ps(top);
  for (s = 0; s + 16 <= n; s += 16) {
    __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + s), vt));
    _mm512_storeu_ps(sc + s, e);
    vs = _mm512_add_ps(vs, e);
  }
  sum = _mm512_reduce_add_ps(vs);
  for (; s < n; s++) {
    sc[s] = expf(sc[s] - top);
    sum += sc[s];
  }
  for (s = 0; s < n; s++) {
    __m512 p = _mm512_set1_ps(sc[s]);
    const char* vs_ = v + s * D * es;
    for (int c = 0; c < 8; c++) {
      if (c >= C) break;
      o[c] = _mm512_fmadd_ps(p, load16(vs_ + c * 16 * es, bf), o[c]);
    }
  }
  __m512 inv = _mm512_set1_ps(1.f / sum);
  for (int c = 0; c < C; c++) {
    __m512 r = _mm512_mul_ps(o[c], inv);
    if (bf) {
      float tmp[16];
      _mm512_storeu_ps(tmp, r);
      for (int j = 0; j < 16; j++) ((uint16_t*)out)[c * 16 + j] = to_bf16(tmp[j]);
    } else {
      _mm512_storeu_ps((float*)out + c * 16, r);
    }
  }
}
#endif

#if defined(__AVX512F__)
static inline __m512 round16(__m512 v, int bf) {  /* what storing in the model's dtype keeps */
  if (!bf) return v;
  __m512i u = _mm512_castps_si512(v);
  __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
  return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
}
static inline void store16(void* p, __m512 v, int bf) {  /* bf16: round to nearest even */
  if (bf)
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(round16(v, 1)), 16)));
  else
    _mm512_storeu_ps((float*)p, v);
}

/* v[j] summed over its 16 lanes, for 16 vectors at once: lane j of the result. Pairs of vectors are
 * interleaved and added (32-bit, then 64-bit halves), then the 128-bit quarters transposed and
 * added: 45 operations where 16 separate reductions take ~130. */
static inline __m512 sum16x16(__m512* v) {
  __m512 w[8], x[4];
  for (int i = 0; i < 8; i++)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; i++) {
    __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
    x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  __m512 z01 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 z23 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z01, z23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(z01, z23, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* The g query heads of up to RUN tokens of one row that share a K/V head (g C <= 16, D = 16 C),
 * each token i over its own ns[i] slots: each slot's keys and values are loaded (and widened from
 * bf16) once for all the tokens and heads, and the scores of 16 slots are reduced together
 * (sum16x16). A prefill's or joint pass's tokens of one row come RUN at a time; a decode step's one
 * each. Every token's numbers are the same however many share its call (its sums run in the same
 * order; lanes past its own slots are never read), so a token attends alike alone, decoded,
 * prefilled or in a joint pass. q: token i's g heads one after another from q + i qstride (as out,
 * from out + i qstride); sc: RUN g (max ns + 16) floats. Measured in a 16-row joint pass (896
 * tokens after 100-400 cached ones, bf16): a layer's attention took 5.2 ms one token a call, 3.3-4.0
 * ms four (eight: 3.3-3.6, so four, which keeps the scratch in L1). */
static void attend_heads(const char* q, int64_t qstride, const char* k, const char* v, char* out, const int64_t* ns,
                         int64_t nq, int64_t g, int64_t D, float scale, int bf, float* sc) {
  int64_t es = bf ? 2 : 4, C = D / 16, n = 0;
  for (int64_t i = 0; i < nq; i++) n = ns[i] > n ? ns[i] : n;
  int64_t nb = (n + 15) / 16 * 16;
  __m512 qv[RUN][16];
  for (int64_t i = 0; i < nq; i++)
    for (int64_t h = 0; h < g; h++)
      for (int64_t c = 0; c < C; c++)
        qv[i][h * C + c] = _mm512_mul_ps(load16(q + i * qstride + (h * D + c * 16) * es, bf), _mm512_set1_ps(scale));
  for (int64_t s0 = 0; s0 < n; s0 += 16) {
    int64_t m = n - s0 < 16 ? n - s0 : 16;
    __m512 part[RUN][4][16];
    for (int64_t j = 0; j < 16; j++) {
      if (j >= m) {
        for (int64_t i = 0; i < nq; i++)
          for (int64_t h = 0; h < g; h++) part[i][h][j] = _mm512_setzero_ps();
        continue;
      }
      const char* ks = k + (s0 + j) * D * es;
      ask_slot(k, v, s0 + j, D * es);
      __m512 kc[8];
      for (int64_t c = 0; c < C; c++) kc[c] = load16(ks + c * 16 * es, bf);
      for (int64_t i = 0; i < nq; i++)
        for (int64_t h = 0; h < g; h++) {
          __m512 a = _mm512_mul_ps(qv[i][h * C], kc[0]);
          for (int64_t c = 1; c < C; c++) a = _mm512_fmadd_ps(qv[i][h * C + c], kc[c], a);
          part[i][h][j] = a;
        }
    }
    for (int64_t i = 0; i < nq; i++)
      for (int64_t h = 0; h < g; h++) _mm512_storeu_ps(sc + (i * g + h) * nb + s0, sum16x16(part[i][h]));
  }
  float inv[RUN][4];
  for (int64_t i = 0; i < nq; i++)
    for (int64_t h = 0; h < g; h++) {  /* softmax over the token's slots 0..ns[i]-1 (the rest: not read) */
      float* row = sc + (i * g + h) * nb;
      int64_t ni = ns[i], s = 0;
      __m512 vm = _mm512_set1_ps(-INFINITY);
      for (; s + 16 <= ni; s += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(row + s));
      float top = _mm512_reduce_max_ps(vm);
      for (; s < ni; s++) top = row[s] > top ? row[s] : top;
      __m512 vs = _mm512_setzero_ps(), vt = _mm512_set1_ps(top);
      for (s = 0; s + 16 <= ni; s += 16) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row + s), vt));
        _mm512_storeu_ps(row + s, e);
        vs = _mm512_add_ps(vs, e);
      }
      float sum = _mm512_reduce_add_ps(vs);
      for (; s < ni; s++) {
        row[s] = expf(row[s] - top);
        sum += row[s];
      }
      inv[i][h] = 1.f / sum;
    }
  __m512 o[RUN][16];
  for (int64_t i = 0; i < nq; i++)
    for (int64_t c = 0; c < g * C; c++) o[i][c] = _mm512_setzero_ps();
  for (int64_t s = 0; s < n; s++) {
    const char* vs_ = v + s * D * es;
    __m512 vc[8];
    for (int64_t c = 0; c < C; c++) vc[c] = load16(vs_ + c * 16 * es, bf);
    for (int64_t i = 0; i < nq; i++) {
      if (s >= ns[i]) continue;
      for (int64_t h = 0; h < g; h++) {
        __m512 p = _mm512_set1_ps(sc[(i * g + h) * nb + s]);
        for (int64_t c = 0; c < C; c++) o[i][h * C + c] = _mm512_fmadd_ps(p, vc[c], o[i][h * C + c]);
      }
    }
  }
  for (int64_t i = 0; i < nq; i++)
    for (int64_t h = 0; h < g; h++)
      for (int64_t c = 0; c < C; c++)
        store16(out + i * qstride + (h * D + c * 16) * es, _mm512_mul_ps(o[i][h * C + c], _mm512_set1_ps(inv[i][h])), bf);
}
#endif

static void attend_group(const char* q, const char* k, const char* v, char* out, int64_t n, int64_t g, int64_t D,
                         float scale, int bf, float* sc /* [g][n] */, float* acc /* [g][D] */) {
  int64_t es = bf ? 2 : 4;
  for (int64_t s = 0; s < n; s++) {
    const char* ks = k + s * D * es;
    for (int64_t h = 0; h < g; h++) {
      const char* qh = q + h * D * es;
      float dot = 0.f;
#if defined(__AVX512F__)
      if (D % 16 == 0) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) a = _mm512_fmadd_ps(load16(qh + d * es, bf), load16(ks + d * es, bf), a);
        dot = _mm512_reduce_add_ps(a);
      } else
#endif
        for (int64_t d = 0; d < D; d++) dot += ld(qh, d, bf) * ld(ks, d, bf);
      sc[h * n + s] = dot * scale;
    }
  }
  for (int64_t h = 0; h < g; h++) {
    float* row = sc + h * n;
    float top = row[0], sum = 0.f;
    for (int64_t s = 1; s < n; s++) top = row[s] > top ? row[s] : top;
    int64_t s = 0;
#if defined(__AVX512F__)
    __m512 vs = _mm512_setzero_ps(), vt = _mm512_set1_ps(top);
    for (; s + 16 <= n; s += 16) {
      __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row + s), vt));
      _mm512_storeu_ps(row + s, e);
      vs = _mm512_add_ps(vs, e);
    }
    sum = _mm512_reduce_add_ps(vs);
#endif
    for (; s < n; s++) {
      row[s] = expf(row[s] - top);
      sum += row[s];
    }
    for (int64_t d = 0; d < D; d++) acc[h * D + d] = 0.f;
    float inv = 1.f / sum;
    for (s = 0; s < n; s++) row[s] *= inv;
  }
  for (int64_t s = 0; s < n; s++) {
    const char* vsrc = v + s * D * es;
#if defined(__AVX512F__)
    if (D % 16 == 0) {
      for (int64_t d = 0; d < D; d += 16) {
        __m512 vv = load16(vsrc + d * es, bf);
        for (int64_t h = 0; h < g; h++) {
          float* a = acc + h * D + d;
          _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(sc[h * n + s]), vv, _mm512_loadu_ps(a)));
        }
      }
      continue;
    }
#endif
    for (int64_t h = 0; h < g; h++)
      for (int64_t d = 0; d < D; d++) acc[h * D + d] += sc[h * n + s] * ld(vsrc, d, bf);
  }
  for (int64_t h = 0; h < g; h++)
    for (int64_t d = 0; d < D; d++) st(out, h * D + d, acc[h * D + d], bf);
}

/* Returns nonzero when a thread's scratch could not be allocated (its tasks are not written). */
int spt_decode_attention(const void* q, const void* k, const void* v, const int64_t* pos, void* out, int64_t B,
                         int64_t H, int64_t Hkv, int64_t S, int64_t D, float scale, int bf, int threads) {
  int64_t g = H / Hkv, es = bf ? 2 : 4;
#if defined(__AVX512F__)
  int fast = D % 16 == 0 && D <= 128;
#else
  int fast = 0;
#endif
  /* A task is one query head (fast path: its K/V head's slots come from the cache hierarchy again
   * for the next), else a row's K/V head with its g query heads, or one query head when that
   * leaves too few tasks to spread over the threads (one row: 3 on 2 threads). */
  int64_t per = fast || B * Hkv < 4 * threads ? 1 : g;
  int64_t tasks = B * H / per;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    float* sc = (float*)malloc(sizeof(float) * (per * S + per * D));
    if (!sc) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; task++) {
      int64_t b = task / (H / per), h0 = (task % (H / per)) * per;  /* first query head of the task */
      int64_t kvh = h0 / g, n = pos[b] + 1;
      if (n > S) n = S;
      if (n < 1) n = 1;
      const char* qh = (const char*)q + (b * H + h0) * D * es;
      const char* kh = (const char*)k + (b * Hkv + kvh) * S * D * es;
      const char* vh = (const char*)v + (b * Hkv + kvh) * S * D * es;
      char* oh = (char*)out + (b * H + h0) * D * es;
      if (!sc) continue;
#if defined(__AVX512F__)
      if (fast) {
        attend_head(qh, kh, vh, oh, n, D, scale, bf, sc);
        continue;
      }
#endif
      attend_group(qh, kh, vh, oh, n, per, D, scale, bf, sc, sc + per * S);
    }
    free(sc);
  }
  return failed;
}

/* ---- dense fp32 / bf16 products for a few rows: y = x W^T ----
 * What a batched decode step (2-32 rows) spends most of its time in. oneDNN's kernels for so few
 * rows ran at about half of this CPU's multiply-add rate (fp32 111 of ~200 GFLOPS, bf16 180 of
 * ~400 at 16 rows on the AMD EPYC); a block of 8 rows x 48 outputs keeps 24 sums in registers, so
 * each weight vector loaded feeds 8 multiply-adds.
 * Layouts: groups of W = 48 output rows (the last group 16 or 32), one after another; in a group
 * of w rows (V = 16 output rows per vector, N a multiple of 16):
 *   fp32: [K][w]          the group's w outputs for each input column
 *   bf16: [K/2][w][2]     pairs of input columns per output row, as the bf16 dot takes them
 * so that each thread streams one contiguous run of memory (with one vector per K-long stream, a
 * stream every 18 KB, one row read at 18 GB/s of the ~34 this machine reads).
 * x [M][K] and y [M][N] in the weights' dtype; sums in fp32, a bf16 y rounded once (nearest even). */
#define V 16
#define DMR 8 /* rows per block */
#define DNB 3 /* vectors per block */

#if defined(__AVX512F__)
/* MR rows x NB vectors; P partial sums over k mod P keep enough independent chains when MR x NB
 * is small (one row: 3 vectors would leave the adds waiting on each other). */
static inline __attribute__((always_inline)) void dense_f32_block(const float* x, const float* w, float* y,
                                                                 int64_t K, int64_t N, int MR, int NB, int P) {
  __m512 acc[DMR][DNB][4];
  for (int m = 0; m < MR; m++)
    for (int j = 0; j < NB; j++)
      for (int p = 0; p < P; p++) acc[m][j][p] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += P) {
    for (int p = 0; p < P; p++) {
      __m512 wv[DNB];
      for (int j = 0; j < NB; j++) wv[j] = _mm512_loadu_ps(w + (k + p) * NB * V + j * V);
      for (int m = 0; m < MR; m++) {
        __m512 xv = _mm512_set1_ps(x[m * K + k + p]);
        for (int j = 0; j < NB; j++) acc[m][j][p] = _mm512_fmadd_ps(xv, wv[j], acc[m][j][p]);
      }
    }
  }
  for (int m = 0; m < MR; m++)
    for (int j = 0; j < NB; j++) {
      __m512 a = acc[m][j][0];
      for (int p = 1; p < P; p++) a = _mm512_add_ps(a, acc[m][j][p]);
      _mm512_storeu_ps(y + m * N + j * V, a);
    }
}
#else
static inline void dense_f32_block(const float* x, const float* w, float* y, int64_t K, int64_t N, int MR, int NB,
                                   int P) {
  for (int m = 0; m < MR; m++)
    for (int j = 0; j < NB; j++)
      for (int c = 0; c < V; c++) {
        float a = 0.f;
        for (int64_t k = 0; k < K; k++) a += x[m * K + k] * w[k * NB * V + j * V + c];
        y[m * N + j * V + c] = a;
      }
}
#endif

#if defined(__AVX512BF16__)
#define DENSE_BF16 1
static inline __attribute__((always_inline)) void dense_bf16_block(const uint16_t* x, const uint16_t* w, uint16_t* y,
                                                                  int64_t K, int64_t N, int MR, int NB, int P) {
  __m512 acc[DMR][DNB][4];
  for (int m = 0; m < MR; m++)
    for (int j = 0; j < NB; j++)
      for (int p = 0; p < P; p++) acc[m][j][p] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 2 * P) {
    for (int p = 0; p < P; p++) {
      __m512bh wv[DNB];
      for (int j = 0; j < NB; j++) wv[j] = (__m512bh)_mm512_loadu_si512(w + (k + 2 * p) * NB * V + 2 * j * V);
      for (int m = 0; m < MR; m++) {
        uint32_t pair;
        memcpy(&pair, x + m * K + k + 2 * p, 4);
        __m512bh xv = (__m512bh)_mm512_set1_epi32((int)pair);
        for (int j = 0; j < NB; j++) acc[m][j][p] = _mm512_dpbf16_ps(acc[m][j][p], wv[j], xv);
      }
    }
  }
  for (int m = 0; m < MR; m++)
    for (int j = 0; j < NB; j++) {
      __m512 a = acc[m][j][0];
      for (int p = 1; p < P; p++) a = _mm512_add_ps(a, acc[m][j][p]);
      _mm256_storeu_si256((__m256i*)(y + m * N + j * V), (__m256i)_mm512_cvtneps_pbh(a));
    }
}
#else
static inline void dense_bf16_block(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t K, int64_t N, int MR,
                                    int NB, int P) {
  for (int m = 0; m < MR; m++)
    for (int j = 0; j < NB; j++)
      for (int c = 0; c < V; c++) {
        float a = 0.f;
        for (int64_t k = 0; k < K; k++)
          a += ld(x + m * K, k, 1) * ld(w, (k & ~1) * NB * V + 2 * j * V + 2 * c + (k & 1), 1);
        st(y, m * N + j * V + c, a, 1);
      }
}
#endif

/* The block shape as compile-time constants (each case its own unrolled copy). Every block sums
 * over k in one chain (P = 1) whatever its rows and vectors: a row's result never depends on which
 * other rows share its block (how many rows a call has, where the row sits among them), so a
 * token's numbers are the same alone, in a decode batch, in a prefill or in the server's joint
 * pass. (A row alone has only its 3 vectors' chains then; its step is bound by reading the
 * weights, not by them.) */
#define DENSE_CASES(F, X, W, Y, K, N, MR, NB)        \
  switch ((MR) * 4 + (NB)) {                         \
    case 1 * 4 + 1: F(X, W, Y, K, N, 1, 1, 1); break; \
    case 1 * 4 + 2: F(X, W, Y, K, N, 1, 2, 1); break; \
    case 1 * 4 + 3: F(X, W, Y, K, N, 1, 3, 1); break; \
    case 2 * 4 + 1: F(X, W, Y, K, N, 2, 1, 1); break; \
    case 2 * 4 + 2: F(X, W, Y, K, N, 2, 2, 1); break; \
    case 2 * 4 + 3: F(X, W, Y, K, N, 2, 3, 1); break; \
    case 3 * 4 + 1: F(X, W, Y, K, N, 3, 1, 1); break; \
    case 3 * 4 + 2: F(X, W, Y, K, N, 3, 2, 1); break; \
    case 3 * 4 + 3: F(X, W, Y, K, N, 3, 3, 1); break; \
    case 4 * 4 + 1: F(X, W, Y, K, N, 4, 1, 1); break; \
    case 4 * 4 + 2: F(X, W, Y, K, N, 4, 2, 1); break; \
    case 4 * 4 + 3: F(X, W, Y, K, N, 4, 3, 1); break; \
    case 5 * 4 + 1: F(X, W, Y, K, N, 5, 1, 1); break; \
    case 5 * 4 + 2: F(X, W, Y, K, N, 5, 2, 1); break; \
    case 5 * 4 + 3: F(X, W, Y, K, N, 5, 3, 1); break; \
    case 6 * 4 + 1: F(X, W, Y, K, N, 6, 1, 1); break; \
    case 6 * 4 + 2: F(X, W, Y, K, N, 6, 2, 1); break; \
    case 6 * 4 + 3: F(X, W, Y, K, N, 6, 3, 1); break; \
    case 7 * 4 + 1: F(X, W, Y, K, N, 7, 1, 1); break; \
    case 7 * 4 + 2: F(X, W, Y, K, N, 7, 2, 1); break; \
    case 7 * 4 + 3: F(X, W, Y, K, N, 7, 3, 1); break; \
    case 8 * 4 + 1: F(X, W, Y, K, N, 8, 1, 1); break; \
    case 8 * 4 + 2: F(X, W, Y, K, N, 8, 2, 1); break; \
    default: F(X, W, Y, K, N, 8, 3, 1); break;        \
  }

/* K a multiple of 8 (bf16 with P = 4 steps 8 columns at a time; fp32 4). One task per group of
 * DNB vectors, all rows: the group's weights come from memory once and from cache for the rest. */
int64_t spt_dense_group(void) { return DNB * V; }

/* Outputs v0 V .. (v0 + nb) V of y = x W^T for all M rows, DMR rows at a time; wg: that group's
 * weights in the layout above. */
static void dense_rows(const void* x, const void* wg, void* y, int64_t M, int64_t N, int64_t K, int bf, int64_t v0,
                       int nb) {
  for (int64_t m = 0; m < M; m += DMR) {
    int mr = (int)(M - m < DMR ? M - m : DMR);
    if (bf) {
      const uint16_t* xb = (const uint16_t*)x + m * K;
      uint16_t* yb = (uint16_t*)y + m * N + v0 * V;
      DENSE_CASES(dense_bf16_block, xb, (const uint16_t*)wg, yb, K, N, mr, nb)
    } else {
      const float* xf = (const float*)x + m * K;
      float* yf = (float*)y + m * N + v0 * V;
      DENSE_CASES(dense_f32_block, xf, (const float*)wg, yf, K, N, mr, nb)
    }
  }
}

static inline int group_vectors(int64_t N, int64_t g) {
  int64_t left = N / V - g * DNB;
  return (int)(left < DNB ? left : DNB);
}

/* Group g (DNB vectors) of y = x W^T for all M rows (w packed). */
static void dense_unit(const void* x, const void* w, void* y, int64_t M, int64_t N, int64_t K, int bf, int64_t g) {
  int64_t v0 = g * DNB;
  dense_rows(x, (const char*)w + v0 * K * V * (bf ? 2 : 4), y, M, N, K, bf, v0, group_vectors(N, g));
}

void spt_dense_mm(const void* x, const void* w, void* y, int64_t M, int64_t N, int64_t K, int bf, int threads) {
  int64_t groups = (N / V + DNB - 1) / DNB;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t g = 0; g < groups; g++) dense_unit(x, w, y, M, N, K, bf, g);
}

/* The same product with W as stored, unpacked: row-major [N][K], or with `trans` its transpose
 * stored row-major [K][N] (a backward's dx = dy W). For many rows (a training step's passes),
 * where a packed copy would double the weights' memory: each task packs its group into a
 * scratch of its own (48 x K values against M x 48 x K multiply-adds), then runs every row
 * against it. N a multiple of V. */
static inline char* thread_scratch(void* work, int64_t bytes) {
  int me = 0;
#ifdef _OPENMP
  me = omp_get_thread_num();
#endif
  return (char*)work + me * bytes;
}

/* work: `threads` scratches of DNB V K values (the caller's memory: nothing here can fail). */
void spt_dense_mm_rowmajor(const void* x, const void* w, void* y, int64_t M, int64_t N, int64_t K, int bf,
                           int trans, void* work, int threads) {
  int64_t groups = (N / V + DNB - 1) / DNB;
#pragma omp parallel num_threads(threads)
  {
    void* scratch = thread_scratch(work, DNB * V * K * (bf ? 2 : 4));
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
      int nb = group_vectors(N, g);
      int64_t width = (int64_t)nb * V, r0 = g * DNB * V;
      /* element (r, k) of the group's rows: at r K + k, or (trans) at k N + r; the loop runs along
       * the stored rows so that the reads stream */
      if (bf) {  /* [K/2][width][2] */
        const uint16_t* src = (const uint16_t*)w;
        uint16_t* dst = (uint16_t*)scratch;
        if (trans)
          for (int64_t k = 0; k < K; k++)
            for (int64_t r = 0; r < width; r++) dst[(k / 2) * width * 2 + 2 * r + (k & 1)] = src[k * N + r0 + r];
        else
          for (int64_t r = 0; r < width; r++)
            for (int64_t k = 0; k < K; k++) dst[(k / 2) * width * 2 + 2 * r + (k & 1)] = src[(r0 + r) * K + k];
      } else {  /* [K][width] */
        const float* src = (const float*)w;
        float* dst = (float*)scratch;
        if (trans)
          for (int64_t k = 0; k < K; k++) memcpy(dst + k * width, src + k * N + r0, sizeof(float) * width);
        else
          for (int64_t r = 0; r < width; r++)
            for (int64_t k = 0; k < K; k++) dst[k * width + r] = src[(r0 + r) * K + k];
      }
      dense_rows(x, scratch, y, M, N, K, bf, g * DNB, nb);
    }
  }
}

/* ---- int8 / int4 weights for many rows (a prefill): y = x W^T in x's dtype ----
 * Such products are bound by multiply-adds, not by reading the weights: each task dequantizes one
 * tile (32 output rows) into a scratch in the dense kernel's group layout, then runs every row
 * against it with that kernel (the dense kernel's rate and sums; nothing of the model's size is
 * made). Weights as the int kernels use them: int8 w = q scale[n]; int4 w = q scale + low per
 * group, computed in fp32 and, for bf16 rows, rounded to bf16 once. N the padded width. */
#if defined(__AVX512F__)
/* two fp32 vectors (columns k, k + 1 of 16 rows) -> 16 words holding their bf16 pairs */
static inline __m512i bf16_pairs(__m512 a, __m512 b) {
  const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF), top = _mm512_set1_epi32((int)0xFFFF0000u);
  __m512i ua = _mm512_castps_si512(a), ub = _mm512_castps_si512(b);
  ua = _mm512_add_epi32(ua, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(ua, 16), one)));
  ub = _mm512_add_epi32(ub, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(ub, 16), one)));
  return _mm512_or_si512(_mm512_srli_epi32(ua, 16), _mm512_and_si512(ub, top));
}
#endif

/* Column k of the tile (32 fp32 values, c[0..31]) into the scratch. */
static inline void put_column(void* scratch, int64_t k, const float* c, int bf) {
  if (!bf) {
    memcpy((float*)scratch + k * T, c, sizeof(float) * T);
    return;
  }
  uint16_t* d = (uint16_t*)scratch + (k / 2) * T * 2 + (k & 1);
  for (int j = 0; j < T; j++) d[2 * j] = to_bf16(c[j]);
}

static void int8_tile_dense(const int8_t* qt, const float* sc, void* scratch, int64_t K, int bf) {
#if defined(__AVX512F__)
  __m512 s0 = _mm512_loadu_ps(sc), s1 = _mm512_loadu_ps(sc + 16);
  for (int64_t k = 0; k < K; k += 2) {
    const int8_t* r = qt + k * T;
    __m512 a0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)r))), s0);
    __m512 a1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(r + 16)))), s1);
    __m512 b0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(r + T)))), s0);
    __m512 b1 =
        _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(r + T + 16)))), s1);
    if (bf) {
      __m512i* d = (__m512i*)((uint16_t*)scratch + (k / 2) * T * 2);
      _mm512_storeu_si512(d, bf16_pairs(a0, b0));
      _mm512_storeu_si512(d + 1, bf16_pairs(a1, b1));
    } else {
      float* d = (float*)scratch + k * T;
      _mm512_storeu_ps(d, a0);
      _mm512_storeu_ps(d + 16, a1);
      _mm512_storeu_ps(d + T, b0);
      _mm512_storeu_ps(d + T + 16, b1);
    }
  }
#else
  float c[T];
  for (int64_t k = 0; k < K; k++) {
    for (int j = 0; j < T; j++) c[j] = (float)qt[k * T + j] * sc[j];
    put_column(scratch, k, c, bf);
  }
#endif
}

static void int4_tile_dense(const uint32_t* qt, const uint16_t* sc, const uint16_t* lo, void* scratch, int64_t K,
                            int64_t G, int bf) {
#if defined(__AVX512F__)
  const __m512i nib = _mm512_set1_epi32(15);
  for (int64_t b = 0; b < K / 8; b++) {
    int64_t g = (8 * b) / G;
    __m512 s0 = load_bf16x16(sc + g * T), s1 = load_bf16x16(sc + g * T + 16);
    __m512 l0 = load_bf16x16(lo + g * T), l1 = load_bf16x16(lo + g * T + 16);
    __m512i v0 = _mm512_loadu_si512(qt + b * T), v1 = _mm512_loadu_si512(qt + b * T + 16);
    __m512 c[8][2];
    for (int i = 0; i < 8; i++) {
      c[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v0, 4 * i), nib)), s0, l0);
      c[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v1, 4 * i), nib)), s1, l1);
    }
    for (int i = 0; i < 8; i += 2) {
      int64_t k = 8 * b + i;
      if (bf) {
        __m512i* d = (__m512i*)((uint16_t*)scratch + (k / 2) * T * 2);
        _mm512_storeu_si512(d, bf16_pairs(c[i][0], c[i + 1][0]));
        _mm512_storeu_si512(d + 1, bf16_pairs(c[i][1], c[i + 1][1]));
      } else {
        float* d = (float*)scratch + k * T;
        _mm512_storeu_ps(d, c[i][0]);
        _mm512_storeu_ps(d + 16, c[i][1]);
        _mm512_storeu_ps(d + T, c[i + 1][0]);
        _mm512_storeu_ps(d + T + 16, c[i + 1][1]);
      }
    }
  }
#else
  float c[T];
  for (int64_t k = 0; k < K; k++) {
    int64_t b = k / 8, g = k / G;
    for (int j = 0; j < T; j++)
      c[j] = (float)((qt[b * T + j] >> (4 * (k % 8))) & 15) * from_bf16(sc[g * T + j]) + from_bf16(lo[g * T + j]);
    put_column(scratch, k, c, bf);
  }
#endif
}

/* Tile t (32 outputs) of y = x W^T for all M rows: dequantized into scratch (T K values), then the
 * dense kernel. bits 8: q int8 tiles, scale fp32 [N]; bits 4: q int4 words, scale and low bf16 per
 * tile and group. */
static void quant_tile_rows(const void* x, const void* q, const void* scale, const uint16_t* low, void* y, int64_t M,
                            int64_t N, int64_t K, int64_t G, int bits, int bf, void* scratch, int64_t t) {
  if (bits == 8)
    int8_tile_dense((const int8_t*)q + t * K * T, (const float*)scale + t * T, scratch, K, bf);
  else
    int4_tile_dense((const uint32_t*)q + t * (K / 8) * T, (const uint16_t*)scale + t * (K / G) * T,
                    low + t * (K / G) * T, scratch, K, G, bf);
  dense_rows(x, scratch, y, M, N, K, bf, t * (T / V), T / V);
}

/* work: `threads` scratches of T K values. */
void spt_quant_prefill(const void* x, const void* q, const void* scale, const uint16_t* low, void* y, int64_t M,
                       int64_t N, int64_t K, int64_t G, int bits, int bf, void* work, int threads) {
#pragma omp parallel num_threads(threads)
  {
    void* scratch = thread_scratch(work, T * K * (bf ? 2 : 4));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < N / T; t++) quant_tile_rows(x, q, scale, low, y, M, N, K, G, bits, bf, scratch, t);
  }
}

/* Which dtypes the vector paths serve (bit 0 fp32, bit 1 bf16); the others are scalar (slow). */
int spt_dense_vector(void) {
  int bits = 0;
#if defined(__AVX512F__)
  bits |= 1;
#endif
#ifdef DENSE_BF16
  bits |= 2;
#endif
  return bits;
}

/* ---- causal attention of a prefill: query t of a row sees keys 0..t ----
 * q [B][H][T][D], k/v [B][Hkv][T][D] (fp32 or bf16), out [B][H][T][D] like q; fp32 sums, fp32
 * softmax. A task is one query head and a block of QB queries, held transposed (a vector of the
 * block's queries per head dimension), so that one key costs D multiply-adds of 16 lanes: PyTorch's
 * flash kernel took ~0.5 ms a layer for the embedded model's 136-token prefill in bf16. */
#define QB 16
#define KU 8 /* keys at a time: independent chains of multiply-adds */

static void causal_block(const char* q, const char* k, const char* v, char* out, int64_t t0, int64_t nq,
                         int64_t D, float scale, int bf, float* qt /* [D][QB] */, float* sc /* [n][QB] */,
                         float* kv /* [2][n][D] fp32 */) {
  int64_t n = t0 + nq, es = bf ? 2 : 4;
  const float *kf = (const float*)k, *vf = (const float*)v;
  if (bf) { /* the keys and values this block reads, once in fp32 */
    for (int64_t i = 0; i < n * D; i++) {
      kv[i] = ld(k, i, 1);
      kv[n * D + i] = ld(v, i, 1);
    }
    kf = kv;
    vf = kv + n * D;
  }
  for (int64_t d = 0; d < D; d++)
    for (int64_t i = 0; i < QB; i++) qt[d * QB + i] = i < nq ? ld(q + (t0 + i) * D * es, d, bf) * scale : 0.f;
#if defined(__AVX512F__)
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  int64_t j = 0;
  for (; j + KU <= n; j += KU) {
    __m512 a[KU];
    for (int u = 0; u < KU; u++) a[u] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d++) {
      __m512 qd = _mm512_loadu_ps(qt + d * QB);
      for (int u = 0; u < KU; u++) a[u] = _mm512_fmadd_ps(qd, _mm512_set1_ps(kf[(j + u) * D + d]), a[u]);
    }
    for (int u = 0; u < KU; u++) _mm512_storeu_ps(sc + (j + u) * QB, a[u]);
  }
  for (; j < n; j++) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d++) a = _mm512_fmadd_ps(_mm512_loadu_ps(qt + d * QB), _mm512_set1_ps(kf[j * D + d]), a);
    _mm512_storeu_ps(sc + j * QB, a);
  }
  /* key j > t0 + i is in query i's future */
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  for (j = t0 > 0 ? t0 : 0; j < n; j++) {
    __mmask16 future = _mm512_cmp_epi32_mask(lane, _mm512_set1_epi32((int)(j - t0)), _MM_CMPINT_LT);
    _mm512_storeu_ps(sc + j * QB, _mm512_mask_mov_ps(_mm512_loadu_ps(sc + j * QB), future, ninf));
  }
  __m512 top = ninf, sum = _mm512_setzero_ps();
  for (j = 0; j < n; j++) top = _mm512_max_ps(top, _mm512_loadu_ps(sc + j * QB));
  for (j = 0; j < n; j++) {
    __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + j * QB), top));
    _mm512_storeu_ps(sc + j * QB, e);
    sum = _mm512_add_ps(sum, e);
  }
  __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), sum);
  float o[16 * QB];
  for (int64_t c = 0; c < D; c += 16) {
    __m512 acc[16];
    for (int dd = 0; dd < 16; dd++) acc[dd] = _mm512_setzero_ps();
    for (j = 0; j < n; j++) {
      __m512 p = _mm512_loadu_ps(sc + j * QB);
      const float* vj = vf + j * D + c;
      for (int dd = 0; dd < 16; dd++) acc[dd] = _mm512_fmadd_ps(p, _mm512_set1_ps(vj[dd]), acc[dd]);
    }
    for (int dd = 0; dd < 16; dd++) _mm512_storeu_ps(o + dd * QB, _mm512_mul_ps(acc[dd], inv));
    for (int64_t i = 0; i < nq; i++)
      for (int dd = 0; dd < 16; dd++) st(out + (t0 + i) * D * es, c + dd, o[dd * QB + i], bf);
  }
#else
  for (int64_t i = 0; i < nq; i++) {
    int64_t m = t0 + i + 1;
    float top = -INFINITY, sum = 0.f;
    for (int64_t jj = 0; jj < m; jj++) {
      float dot = 0.f;
      for (int64_t d = 0; d < D; d++) dot += qt[d * QB + i] * kf[jj * D + d];
      sc[jj * QB + i] = dot;
      top = dot > top ? dot : top;
    }
    for (int64_t jj = 0; jj < m; jj++) {
      sc[jj * QB + i] = expf(sc[jj * QB + i] - top);
      sum += sc[jj * QB + i];
    }
    for (int64_t d = 0; d < D; d++) {
      float acc = 0.f;
      for (int64_t jj = 0; jj < m; jj++) acc += sc[jj * QB + i] * vf[jj * D + d];
      st(out + (t0 + i) * D * es, d, acc / sum, bf);
    }
  }
#endif
}

/* Returns nonzero when a thread's scratch could not be allocated (its tasks are not written). */
int spt_causal_attention(const void* q, const void* k, const void* v, void* out, int64_t B, int64_t H,
                         int64_t Hkv, int64_t S, int64_t D, float scale, int bf, int threads) {
  int64_t g = H / Hkv, es = bf ? 2 : 4, blocks = (S + QB - 1) / QB;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    float* buf = (float*)malloc(sizeof(float) * (D * QB + S * QB + 2 * S * D));
    if (!buf) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < B * H * blocks; task++) {
      /* the longest blocks (last positions) first, so the short ones fill in at the end */
      int64_t blk = blocks - 1 - task / (B * H), bh = task % (B * H), b = bh / H, h = bh % H;
      if (!buf) continue;
      int64_t t0 = blk * QB, nq = S - t0 < QB ? S - t0 : QB;
      const char* qh = (const char*)q + (b * H + h) * S * D * es;
      const char* kh = (const char*)k + (b * Hkv + h / g) * S * D * es;
      const char* vh = (const char*)v + (b * Hkv + h / g) * S * D * es;
      char* oh = (char*)out + (b * H + h) * S * D * es;
      causal_block(qh, kh, vh, oh, t0, nq, D, scale, bf, buf, buf + D * QB, buf + D * QB + S * QB);
    }
    free(buf);
  }
  return failed;
}

/* The tile width the Python side packs for; whether int4 rounds the activations to bf16. */
int64_t spt_quant_tile(void) { return T; }
int spt_int4_bf16(void) {
#ifdef INT4_BF16
  return 1;
#else
  return 0;
#endif
}

/* ---- a whole decode step's layers in one call: one token per row ----
 * A decode step is ~10 operators a layer (norms, projections, rotary, cache writes, attention,
 * residual adds); one row through the embedded model's 30 layers made ~300 calls, and each call's
 * own cost (the dispatcher, an OpenMP fork, a small allocation, ~15-30 us) added up to more than
 * the weights' reading in the int4 step (7.3 ms a step for 2.4 ms of bytes). Here one OpenMP
 * region runs every layer: each phase splits its work over the threads and ends at a barrier.
 * The numbers follow the PyTorch layers' (spt_fast/model/llama.py): the activations are rounded
 * to the model's dtype where those layers round them (norm, projection outputs, rotary, SiLU,
 * products and residual sums), and the kernels are the ones above; fp32 sums may differ in their
 * last bit (another order, and the compiler may fuse a multiply with an add).
 * Projections: kind 0 dense (packed by pack_dense, the model's dtype), 1 int8 tiles, 2 int4 tiles;
 * n: the width the kernel writes (int tiles: padded to T). */

typedef struct {
  int64_t kind, n, k, group;
  const void* w;
  const void* scale; /* int8: fp32 per row; int4: bf16 per group */
  const void* low;
} spt_proj;

typedef struct {
  const void* attn_norm;
  const void* ffn_norm;
  spt_proj qkv, o, gate_up, down;
  void* k_cache; /* [rows][Hkv][S][D], the model's dtype */
  void* v_cache;
} spt_layer;

typedef struct {
  int64_t B, dim, H, Hkv, D, F, S, row_stride; /* row_stride: elements from one cache row to the next */
  float eps, scale;
  int bf, threads;
  const float* cos; /* [positions][D] */
  const float* sin; /* first half negated (llama.py's _build_rope) */
  const void* final_norm;
  int tiles; /* int projections: dequantize each tile and run the dense kernel (many rows: a prefill) */
  spt_proj head; /* the LM head, run where logits is set */
  float* logits; /* [B][vocab] fp32, or NULL: the call ends at the final norm */
  int64_t vocab;
} spt_shape;

/* A thread's attention scratch: the scores of a task's query heads (attend_heads: up to RUN tokens
 * of up to 4 heads, each padded to 16 slots; attend_head / attend_group: one) and attend_group's
 * sums. */
static int64_t scratch_floats(const spt_shape* s) { return RUN * 4 * (s->S + 16) + s->D; }

/* Scratch, laid out from one base (base NULL: only the size). */
typedef struct {
  char *h, *xn, *y, *q, *att, *act, *tile;
  float *yf, *pre, *sums, *sc;
  int64_t* blk; /* where each run of up to RUN tokens of one cache row starts (attention) */
} spt_work;

static int64_t lay_work(const spt_shape* s, int64_t nmax, int64_t kmax, char* base, spt_work* w) {
  int64_t es = s->bf ? 2 : 4, at = 0;
#define TAKE(field, type, count)                                         \
  {                                                                       \
    if (base) w->field = (type)(base + at);                               \
    at += ((int64_t)(count) * (int64_t)sizeof(*w->field) + 63) / 64 * 64; \
  }
  TAKE(h, char*, s->B * s->dim * es)
  TAKE(xn, char*, s->B * kmax * es)
  TAKE(y, char*, s->B * nmax * es)
  TAKE(q, char*, s->B * s->H * s->D * es)
  TAKE(att, char*, s->B * s->H * s->D * es)
  TAKE(act, char*, s->B * s->F * es)
  TAKE(yf, float*, s->tiles ? 0 : s->B * nmax) /* (the int kernels' scratch: none with tiles) */
  TAKE(pre, float*, s->tiles ? 0 : s->B * kmax)
  TAKE(sums, float*, s->tiles ? 0 : s->B * (kmax / 8 + 1))
  TAKE(sc, float*, s->threads * scratch_floats(s))
  TAKE(blk, int64_t*, s->B + 1)
  TAKE(tile, char*, s->tiles ? s->threads * T * kmax * es : 0)
#undef TAKE
  return at;
}

static inline float rnd(float f, int bf) {  /* what storing in the model's dtype keeps */
  return bf ? from_bf16(to_bf16(f)) : f;
}

/* Row b of a projection's input (x, the model's dtype) in the form its int kernel takes, into
 * pre / sums at the row distances the int units expect (int8: x in fp32, K floats a row). */
static void prepare_row(const spt_proj* p, const char* x, float* pre, float* sums, int64_t b, int bf) {
  if (p->kind == 1)
    for (int64_t k = 0; k < p->k; k++) pre[b * p->k + k] = ld(x, k, bf);
  else if (p->kind == 2)
    int4_input_row(x, bf, p->k, p->group, pre, sums, b);
}

static int64_t proj_units(const spt_proj* p) {
  if (p->kind) return p->n / T;
  int64_t vecs = p->n / V;
  return (vecs + DNB - 1) / DNB;
}

/* Unit u (an int tile, or a dense group) of y = x W^T for all B rows: x the model's dtype [B][K]
 * (dense, or int with tiles) or prepared rows (pre, sums), y the model's dtype [B][n]; yf: fp32
 * scratch [B][n] for the int kernels; tile: this thread's scratch of T K values (tiles). */
static void proj_unit(const spt_proj* p, int64_t u, int64_t B, const char* x, const float* pre, const float* sums,
                      char* y, float* yf, int bf, char* tile) {
  int64_t N = p->n, K = p->k, es = bf ? 2 : 4;
  if (p->kind == 0) {
    dense_unit(x, p->w, y, B, N, K, bf, u);
    return;
  }
  if (tile) { /* many rows: as spt_quant_prefill runs a tile */
    quant_tile_rows(x, p->w, p->scale, (const uint16_t*)p->low, y, B, N, K, p->group, p->kind == 1 ? 8 : 4, bf, tile, u);
    return;
  }
  if (p->kind == 1)
    int8_unit(pre, (const int8_t*)p->w, (const float*)p->scale, yf, B, N, K, u);
  else
    int4_unit(pre, sums, (const uint32_t*)p->w, (const uint16_t*)p->scale, (const uint16_t*)p->low, yf, B, N, K,
              p->group, u);
  for (int64_t m = 0; m < B; m++)
    for (int64_t j = u * T; j < (u + 1) * T; j++) st(y + (m * N + j) * es, 0, yf[m * N + j], bf);
}


/* out = weight * rmsnorm(x) over one row of `dim`, as llama.py's RMSNorm rounds it. */
static void norm_row(const char* x, const void* w, char* out, int64_t dim, float eps, int bf) {
  int64_t es = bf ? 2 : 4, i = 0;
  (void)es; /* (the vector paths only) */
  float ss = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= dim; i += 16) {
    __m512 v = load16(x + i * es, bf);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  ss = _mm512_reduce_add_ps(acc);
#endif
  for (; i < dim; i++) {
    float v = ld(x, i, bf);
    ss += v * v;
  }
  float r = 1.f / sqrtf(ss / (float)dim + eps);
  i = 0;
#if defined(__AVX512F__)
  __m512 vr = _mm512_set1_ps(r);
  for (; i + 16 <= dim; i += 16)
    store16(out + i * es, _mm512_mul_ps(load16((const char*)w + i * es, bf), round16(_mm512_mul_ps(load16(x + i * es, bf), vr), bf)), bf);
#endif
  for (; i < dim; i++) st(out, i, ld(w, i, bf) * rnd(ld(x, i, bf) * r, bf), bf);
}

/* out = a + b over n elements (the model's dtype, rounded once). */
static void add_row(const char* a, const char* b, char* out, int64_t n, int bf) {
  int64_t es = bf ? 2 : 4, i = 0;
  (void)es; /* (the vector paths only) */
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) store16(out + i * es, _mm512_add_ps(load16(a + i * es, bf), load16(b + i * es, bf)), bf);
#endif
  for (; i < n; i++) st(out, i, ld(a, i, bf) + ld(b, i, bf), bf);
}

/* x[i] cos[i] + x[(i + D/2) % D] sin[i] for one head (llama.py's _apply_rotary), into out. */
static void rotate(const char* x, const float* cs, const float* sn, char* out, int64_t D, int bf) {
#if defined(__AVX512F__)
  if (D % 32 == 0) { /* a prefill rotates every token's heads: 16 lanes at a time */
    int64_t es = bf ? 2 : 4;
    for (int64_t i = 0; i < D; i += 16) {
      __m512 a = _mm512_mul_ps(load16(x + i * es, bf), _mm512_loadu_ps(cs + i));
      __m512 b = _mm512_mul_ps(load16(x + ((i + D / 2) % D) * es, bf), _mm512_loadu_ps(sn + i));
      store16(out + i * es, _mm512_add_ps(a, b), bf);
    }
    return;
  }
#endif
  for (int64_t i = 0; i < D; i++) {
    float a = ld(x, i, bf) * cs[i], b = ld(x, (i + D / 2) % D, bf) * sn[i];
    st(out, i, a + b, bf);
  }
}

static inline float silu(float g) { return g / (1.f + expf(-g)); }

/* out[i] = silu(gate[i]) * up[i] over [i0, i1), each product of the model's dtype rounded as
 * PyTorch's F.silu(gate) * up rounds it. */
static void silu_mul(const char* gate, const char* up, char* out, int64_t i0, int64_t i1, int bf) {
  int64_t es = bf ? 2 : 4, i = i0;
  (void)es; /* (the vector paths only) */
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= i1; i += 16) {
    __m512 g = load16(gate + i * es, bf);
    __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));  /* exp(-|g|) <= 1 */
    __m512 inv = _mm512_div_ps(one, _mm512_add_ps(one, e));
    __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
    __m512 sig = _mm512_mask_mul_ps(inv, neg, inv, e);  /* sigmoid(g): 1/(1+e) or e/(1+e) */
    __m512 sl = round16(_mm512_mul_ps(g, sig), bf);
    store16(out + i * es, _mm512_mul_ps(sl, load16(up + i * es, bf)), bf);
  }
#endif
  for (; i < i1; i++) st(out, i, rnd(silu(ld(gate, i, bf)), bf) * ld(up, i, bf), bf);
}

/* out[0..n) = x[0..n) (the model's dtype) as fp32 */
static void widen(const char* x, float* out, int64_t n, int bf) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, load16(x + i * (bf ? 2 : 4), bf));
#endif
  for (; i < n; i++) out[i] = ld(x, i, bf);
}

/* x [B][dim] (the model's dtype): each token's embedding in, its last hidden state (after the
 * final norm) out. pos [B]: each token's position; crow [B]: its cache row (NULL: token b is row
 * b). Its K/V go to that slot of that row, and it attends to slots 0..pos of the row, after every
 * token of the call has written its K/V: several tokens of one row are a prefill (or the new part
 * of a row after a cached prefix), each seeing the earlier ones. work: lay_work's size in bytes.
 * With s->logits set, the call goes on through the LM head (s->head) into logits [B][vocab]. */
int64_t spt_decode_work_bytes(const spt_shape* s, int64_t nmax, int64_t kmax) {
  return lay_work(s, nmax, kmax, NULL, NULL);
}

void spt_decode_layers(const spt_layer* L, int64_t nl, const spt_shape* s, void* x_, const int64_t* pos,
                       const int64_t* crow, int64_t nmax, int64_t kmax, void* work) {
  spt_work w;
  lay_work(s, nmax, kmax, (char*)work, &w);
  const int bf = s->bf;
  const int64_t B = s->B, dim = s->dim, H = s->H, Hkv = s->Hkv, D = s->D, F = s->F, es = bf ? 2 : 4;
  const int64_t g = H / Hkv;
  char* x = (char*)x_;
#if defined(__AVX512F__)
  const int fast = D % 16 == 0 && D <= 128;
  const int grouped = fast && g <= 4 && g * (D / 16) <= 16;
#else
  const int grouped = 0;
#endif
  /* runs of up to RUN tokens of one cache row, in the order the tokens come */
  int64_t nblk = 0;
  for (int64_t b = 0; b < B;) {
    int64_t e = b + 1;
    while (crow && e < B && e - b < RUN && crow[e] == crow[b]) e++;
    w.blk[nblk++] = b;
    b = e;
  }
  w.blk[nblk] = B;
#pragma omp parallel num_threads(s->threads)
  {
    int me = 0;
#ifdef _OPENMP
    me = omp_get_thread_num();
#endif
    float* sc = w.sc + me * scratch_floats(s);
    char* tl = s->tiles ? w.tile + me * T * kmax * es : NULL;
    const int tiles = s->tiles;
    for (int64_t l = 0; l < nl; l++) {
      const spt_layer* ly = L + l;
      const spt_proj *qkv = &ly->qkv, *o = &ly->o, *gu = &ly->gate_up, *dn = &ly->down;
      /* 1: the attention norm (and the int kernels' form of it) */
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; b++) {
        norm_row(x + b * dim * es, ly->attn_norm, w.xn + b * dim * es, dim, s->eps, bf);
        if (!tiles) prepare_row(qkv, w.xn + b * dim * es, w.pre, w.sums, b, bf);
      }
      /* 2: q, k, v */
#pragma omp for schedule(static)
      for (int64_t u = 0; u < proj_units(qkv); u++) proj_unit(qkv, u, B, w.xn, w.pre, w.sums, w.y, w.yf, bf, tl);
      /* 3: rotary; k and v into the cache at each row's position */
#pragma omp for schedule(static)
      for (int64_t t = 0; t < B * (H + Hkv); t++) {
        int64_t b = t / (H + Hkv), h = t % (H + Hkv), p = pos[b], r = crow ? crow[b] : b;
        const char* row = w.y + b * qkv->n * es;
        const float *cs = s->cos + p * D, *sn = s->sin + p * D;
        if (h < H) {
          rotate(row + h * D * es, cs, sn, w.q + (b * H + h) * D * es, D, bf);
        } else {
          int64_t kh = h - H;
          char* kc = (char*)ly->k_cache + ((r * s->row_stride) + (kh * s->S + p) * D) * es;
          char* vc = (char*)ly->v_cache + ((r * s->row_stride) + (kh * s->S + p) * D) * es;
          rotate(row + (H * D + kh * D) * es, cs, sn, kc, D, bf);
          memcpy(vc, row + (H * D + Hkv * D + kh * D) * es, D * es);
        }
      }
      /* 4: attention. Where attend_heads serves, a task is one K/V head of a run of up to RUN
       * tokens of one cache row (blk: a decode step's rows are runs of one) with their g query
       * heads each; else one token's query head. Handed out as threads come free: the tasks of a
       * prefill or joint pass differ in size (runs, slots). */
      int64_t tasks = grouped ? nblk * Hkv : B * H;
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < tasks; t++) {
        int64_t b, h, nq = 1;
        if (grouped) {
          b = w.blk[t / Hkv], h = (t % Hkv) * g, nq = w.blk[t / Hkv + 1] - b;
        } else {
          b = t / H, h = t % H;
        }
        int64_t r = crow ? crow[b] : b;
        const char* kh = (const char*)ly->k_cache + (r * s->row_stride + (h / g) * s->S * D) * es;
        const char* vh = (const char*)ly->v_cache + (r * s->row_stride + (h / g) * s->S * D) * es;
        const char* qh = w.q + (b * H + h) * D * es;
        char* oh = w.att + (b * H + h) * D * es;
        int64_t ns[RUN];
        for (int64_t i = 0; i < nq; i++) ns[i] = pos[b + i] + 1 < s->S ? pos[b + i] + 1 : s->S;
#if defined(__AVX512F__)
        if (grouped) {
          attend_heads(qh, H * D * es, kh, vh, oh, ns, nq, g, D, s->scale, bf, sc);
          continue;
        }
        if (fast) {
          attend_head(qh, kh, vh, oh, ns[0], D, s->scale, bf, sc);
          continue;
        }
#endif
        attend_group(qh, kh, vh, oh, ns[0], 1, D, s->scale, bf, sc, sc + s->S);
      }
      if (o->kind && !tiles) {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) prepare_row(o, w.att + b * H * D * es, w.pre, w.sums, b, bf);
      }
      /* 5: the output projection */
#pragma omp for schedule(static)
      for (int64_t u = 0; u < proj_units(o); u++) proj_unit(o, u, B, w.att, w.pre, w.sums, w.y, w.yf, bf, tl);
      /* 6: the residual, the feed-forward norm */
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; b++) {
        char *xb = x + b * dim * es, *hb = w.h + b * dim * es;
        add_row(xb, w.y + b * o->n * es, hb, dim, bf);
        norm_row(hb, ly->ffn_norm, w.xn + b * dim * es, dim, s->eps, bf);
        if (!tiles) prepare_row(gu, w.xn + b * dim * es, w.pre, w.sums, b, bf);
      }
      /* 7: gate and up */
#pragma omp for schedule(static)
      for (int64_t u = 0; u < proj_units(gu); u++) proj_unit(gu, u, B, w.xn, w.pre, w.sums, w.y, w.yf, bf, tl);
      /* 8: silu(gate) * up, in chunks of 64 */
#pragma omp for schedule(static)
      for (int64_t t = 0; t < B * ((F + 63) / 64); t++) {
        int64_t b = t / ((F + 63) / 64), i0 = (t % ((F + 63) / 64)) * 64, i1 = i0 + 64 < F ? i0 + 64 : F;
        const char* row = w.y + b * gu->n * es;
        char* a = w.act + b * F * es;
        silu_mul(row, row + F * es, a, i0, i1, bf);
      }
      if (dn->kind && !tiles) {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) prepare_row(dn, w.act + b * F * es, w.pre, w.sums, b, bf);
      }
      /* 9: down */
#pragma omp for schedule(static)
      for (int64_t u = 0; u < proj_units(dn); u++) proj_unit(dn, u, B, w.act, w.pre, w.sums, w.y, w.yf, bf, tl);
      /* 10: the residual */
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; b++) {
        char* xb = x + b * dim * es;
        add_row(w.h + b * dim * es, w.y + b * dn->n * es, xb, dim, bf);
      }
    }
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; b++) {
      norm_row(x + b * dim * es, s->final_norm, w.h + b * dim * es, dim, s->eps, bf);
      memcpy(x + b * dim * es, w.h + b * dim * es, dim * es);
      if (s->logits && s->head.kind && !tiles) prepare_row(&s->head, x + b * dim * es, w.pre, w.sums, b, bf);
    }
    /* 11: the LM head, inside the same parallel region (as a call of its own it cost a second
     * region, an operator and a conversion: the int4 and int8 one-row steps ran 3% (0.08 ms)
     * faster without them, AMD EPYC). Its units round into the model's dtype as the separate head
     * does; each unit then widens its own columns to fp32. */
    if (s->logits) {
      const spt_proj* hp = &s->head;
#pragma omp for schedule(static)
      for (int64_t u = 0; u < proj_units(hp); u++) {
        proj_unit(hp, u, B, x, w.pre, w.sums, w.y, w.yf, bf, tl);
        int64_t c0 = hp->kind ? u * T : u * DNB * V;
        int64_t c1 = hp->kind ? c0 + T : c0 + group_vectors(hp->n, u) * V;
        if (c1 > s->vocab) c1 = s->vocab;
        for (int64_t b = 0; b < B; b++) widen(w.y + (b * hp->n + c0) * es, s->logits + b * s->vocab + c0, c1 - c0, bf);
      }
    }
  }
}
