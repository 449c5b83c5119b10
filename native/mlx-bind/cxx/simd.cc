#include "mlx-bind/cxx/simd.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

// Built with -fno-trapping-math (see build.rs): without it GCC does not turn the clamps
// below into vector selects and leaves every loop scalar.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define NXMLX_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NXMLX_CLONES
#endif

namespace nxmlx::simd {

namespace {

// exp(x) for x in [-110, 110] (or NaN): x = k ln2 + r with |r| <= ln2 / 2 (k rounded by
// the 1.5 * 2^52 shifter, ln 2 split in two so that k ln2 is exact to 2^-60), exp(r) by
// its Taylor polynomial of degree 8 (relative error below 2.1e-10), times 2^k built from
// k's bits. f32's ulp is at least 6e-8 relative: the result rounds to within 0.51 ulp.
inline double exp_reduced(double x) {
  constexpr double log2e = 1.4426950408889634;
  constexpr double ln2_hi = 0.6931471805599453;
  constexpr double ln2_lo = 2.3190468138462996e-17;
  constexpr double shifter = 6755399441055744.0;
  double t = x * log2e + shifter;
  double k = t - shifter;
  double r = (x - k * ln2_hi) - k * ln2_lo;
  double p = 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  int64_t bits_k = std::bit_cast<int64_t>(t) - std::bit_cast<int64_t>(shifter);
  return p * std::bit_cast<double>((bits_k + 1023) << 52);
}

// Below -110 exp rounds to 0 in f32, above 90 to +inf; std::max/min keep NaN (the
// comparisons are false).
inline double clamp_exp_arg(double x) { return std::min(std::max(x, -110.0), 110.0); }

}  // namespace

NXMLX_CLONES
void exp_f32(const float* src, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    dst[i] = static_cast<float>(exp_reduced(clamp_exp_arg(src[i])));
  }
}

NXMLX_CLONES
void sigmoid_f32(const float* src, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    // exp(-x) is in [2^-159, 2^159]: 1 + e neither overflows nor loses the result's bits.
    double e = exp_reduced(clamp_exp_arg(-static_cast<double>(src[i])));
    dst[i] = static_cast<float>(1.0 / (1.0 + e));
  }
}

namespace {

// erf(x) for |x| < 1 as x * P(x^2); for 1 <= |x| < 4 as 1 - exp(-x^2) * R(t),
// t = (|x| - 2.5) / 1.5, R approximating erfc(x) exp(x^2); beyond 4, erf rounds to +-1 in
// f32. P (degree 8) and R (degree 12) are weighted least-squares fits, on Chebyshev nodes,
// of the relative error against double erf/erfc (scripts/fit-erf, which prints them and
// their errors): P within 1e-12 relative, R within 6e-9; both far below f32's 6e-8
// relative ulp.
inline double erf_small(double x) {
  double s = x * x;
  double p = 1.0610376165912715e-06;
  p = p * s - 1.3918544682994418e-05;
  p = p * s + 0.00011958224486681596;
  p = p * s - 0.0008542797056324621;
  p = p * s + 0.005223792118772106;
  p = p * s - 0.026866135876843077;
  p = p * s + 0.11283791350609554;
  p = p * s - 0.37612638892485284;
  p = p * s + 1.1283791670951466;
  return x * p;
}

// R(t) ~ erfc(a) exp(a^2) for 1 <= a < 4 (within 6e-9 relative).
inline double erfc_scaled_mid(double a) {
  double t = (a - 2.5) * (1.0 / 1.5);
  double r = 1.2445859931087742e-05;
  r = r * t - 3.6655595029327243e-05;
  r = r * t + 5.9020090484774113e-05;
  r = r * t - 0.00014469252807219275;
  r = r * t + 0.00040998954722215234;
  r = r * t - 0.0010163827113734549;
  r = r * t + 0.0024040043988560788;
  r = r * t - 0.005567649596294322;
  r = r * t + 0.012489175771541919;
  r = r * t - 0.02700566987588321;
  r = r * t + 0.05611051653600735;
  r = r * t - 0.11152100738965265;
  r = r * t + 0.21080636368931868;
  return r;
}

inline double erf_mid(double ax) {
  // ax < 4 where this is used: ax^2 < 16, well inside exp_reduced's range.
  return 1.0 - exp_reduced(-std::min(ax * ax, 16.0)) * erfc_scaled_mid(ax);
}

}  // namespace

NXMLX_CLONES
void erf_f32(const float* src, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    double x = static_cast<double>(src[i]);
    double ax = std::fabs(x);
    // Both branches are computed and one is selected, so that the loop vectorises; NaN
    // fails both comparisons and reaches the mid branch, whose arithmetic keeps it.
    double mid = ax >= 4.0 ? 1.0 : erf_mid(ax);
    double y = ax < 1.0 ? erf_small(x) : std::copysign(mid, x);
    dst[i] = static_cast<float>(y);
  }
}

NXMLX_CLONES
void tanh_f32(const float* src, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    double x = static_cast<double>(src[i]);
    double a = std::fabs(x);
    // Below 1/16, the series to x^9 (next term under 4e-12 relative); above, 1 - 2 / (e^2a
    // + 1) with e^2a within 2.1e-10 (cancellation and the exponential's error stay below
    // 4e-9 relative); from 9 on tanh rounds to 1 in f32, so a is clamped at 20. Both
    // computed and one selected; NaN passes through the clamp and the arithmetic.
    double s = x * x;
    // x times the rest, so that tanh(-0) = -0.
    double series =
        x * (1.0 + s * (-1.0 / 3.0 + s * (2.0 / 15.0 + s * (-17.0 / 315.0 + s * (62.0 / 2835.0)))));
    double e = exp_reduced(2.0 * std::min(a, 20.0));
    double t = std::copysign(1.0 - 2.0 / (e + 1.0), x);
    dst[i] = static_cast<float>(a < 0.0625 ? series : t);
  }
}

NXMLX_CLONES
void log_f32(const float* src, float* dst, size_t n) {
  constexpr double ln2 = 0.6931471805599453;
  for (size_t i = 0; i < n; ++i) {
    double x = static_cast<double>(src[i]);
    // x = m 2^k with m in [sqrt(1/2), sqrt(2)) (f32 subnormals are normal doubles), and
    // log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172, by its series to s^17
    // (next term under 2e-14 relative).
    int64_t bits = std::bit_cast<int64_t>(x);
    int64_t k = ((bits >> 52) & 0x7ff) - 1023;
    double m = std::bit_cast<double>((bits & 0x000fffffffffffffLL) | 0x3ff0000000000000LL);
    bool high = m > 1.4142135623730951;
    m = high ? m * 0.5 : m;
    k = high ? k + 1 : k;
    double q = (m - 1.0) / (m + 1.0);
    double s = q * q;
    double p = 1.0 / 17.0;
    p = p * s + 1.0 / 15.0;
    p = p * s + 1.0 / 13.0;
    p = p * s + 1.0 / 11.0;
    p = p * s + 1.0 / 9.0;
    p = p * s + 1.0 / 7.0;
    p = p * s + 1.0 / 5.0;
    p = p * s + 1.0 / 3.0;
    p = p * s + 1.0;
    double y = static_cast<double>(k) * ln2 + 2.0 * q * p;
    // C's special values: log(+-0) = -inf, log(x < 0) = NaN, log(+inf) = +inf, NaN stays.
    y = x == 0.0 ? -std::numeric_limits<double>::infinity() : y;
    y = x < 0.0 ? std::numeric_limits<double>::quiet_NaN() : y;
    y = x == std::numeric_limits<double>::infinity() || x != x ? x : y;
    dst[i] = static_cast<float>(y);
  }
}

NXMLX_CLONES
void gelu_f32(const float* src, float* dst, size_t n) {
  constexpr double sqrt1_2 = 0.70710678118654752440;
  // x below -4 sqrt(2): erfc(|z|) below 1.5e-8, which R (fitted up to |z| = 4) does not
  // cover; those take the C library's erfc, in a second pass over each block (rare in
  // activations, and the main loop stays branch-free).
  constexpr float far_below = -5.65685424949238f;
  constexpr size_t block = 256;
  for (size_t at = 0; at < n; at += block) {
    size_t m = std::min(block, n - at);
    for (size_t i = at; i < at + m; ++i) {
      double x = static_cast<double>(src[i]);
      double z = x * sqrt1_2;
      double a = std::fabs(z);
      // 1 + erf(z): near 0 from erf's series; below -1 as erfc(|z|), which keeps its
      // relative precision where 1 + erf(z) would cancel; above 1 as 2 - erfc(z) (from
      // z = 4 on erfc(4) stands in for erfc(z), off by under 1e-8 of the result). Both
      // branches are computed and one selected, so that the loop vectorises; NaN fails
      // the comparisons and reaches 2 - erfc(NaN).
      double b = std::min(std::max(a, 1.0), 4.0);
      double tail = exp_reduced(-b * b) * erfc_scaled_mid(b);
      double q = a < 1.0 ? 1.0 + erf_small(z) : (z < 0.0 ? tail : 2.0 - tail);
      dst[i] = static_cast<float>(0.5 * x * q);
    }
    for (size_t i = at; i < at + m; ++i) {
      if (src[i] < far_below) {
        double x = static_cast<double>(src[i]);
        dst[i] = static_cast<float>(0.5 * x * std::erfc(-x * sqrt1_2));
      }
    }
  }
}

namespace {

// The sum of sixteen running sums, folded pairwise (the same order in every caller).
inline double fold_lanes(double (&acc)[16]) {
  for (size_t width = 8; width > 0; width /= 2) {
    for (size_t j = 0; j < width; ++j) {
      acc[j] += acc[j + width];
    }
  }
  return acc[0];
}

}  // namespace

NXMLX_CLONES
double sum_f32(const float* src, size_t n) {
  // Sixteen running sums the compiler keeps in vector registers.
  constexpr size_t lanes = 16;
  double acc[lanes] = {};
  size_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    for (size_t j = 0; j < lanes; ++j) {
      acc[j] += static_cast<double>(src[i + j]);
    }
  }
  double tail = 0.0;
  for (; i < n; ++i) {
    tail += static_cast<double>(src[i]);
  }
  return fold_lanes(acc) + tail;
}

namespace {

// The sum of src[0..n) of doubles, in sixteen running sums (as sum_f32).
inline double sum_f64(const double* src, size_t n) {
  constexpr size_t lanes = 16;
  double acc[lanes] = {};
  size_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    for (size_t j = 0; j < lanes; ++j) {
      acc[j] += src[i + j];
    }
  }
  double tail = 0.0;
  for (; i < n; ++i) {
    tail += src[i];
  }
  return fold_lanes(acc) + tail;
}

}  // namespace

NXMLX_CLONES
double exp_shifted_f32(const float* src, float* dst, size_t n, double shift) {
  // In blocks: the exponentials in double go through a buffer that stays in L1, so that
  // each of the two loops has a form the compiler vectorises.
  constexpr size_t block = 256;
  double e[block];
  double total = 0.0;
  for (size_t at = 0; at < n; at += block) {
    size_t m = std::min(block, n - at);
    for (size_t i = 0; i < m; ++i) {
      e[i] = exp_reduced(clamp_exp_arg(static_cast<double>(src[at + i]) - shift));
      dst[at + i] = static_cast<float>(e[i]);
    }
    total += sum_f64(e, m);
  }
  return total;
}

NXMLX_CLONES
void moments_f32(const float* src, size_t n, double* mean, double* variance) {
  double m = sum_f32(src, n) / static_cast<double>(n);
  constexpr size_t lanes = 16;
  double acc[lanes] = {};
  size_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    for (size_t j = 0; j < lanes; ++j) {
      double d = static_cast<double>(src[i + j]) - m;
      acc[j] += d * d;
    }
  }
  double tail = 0.0;
  for (; i < n; ++i) {
    double d = static_cast<double>(src[i]) - m;
    tail += d * d;
  }
  *mean = m;
  *variance = (fold_lanes(acc) + tail) / static_cast<double>(n);
}

NXMLX_CLONES
void normalize_affine_f32(const float* src, float* dst, size_t n, double mean, double scale,
                          const float* g, const float* b) {
  for (size_t i = 0; i < n; ++i) {
    double y = (static_cast<double>(src[i]) - mean) * scale * static_cast<double>(g[i]) +
               static_cast<double>(b[i]);
    dst[i] = static_cast<float>(y);
  }
}

NXMLX_CLONES
double sum_squares_f32(const float* src, size_t n) {
  constexpr size_t lanes = 16;
  double acc[lanes] = {};
  size_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    for (size_t j = 0; j < lanes; ++j) {
      double v = static_cast<double>(src[i + j]);
      acc[j] += v * v;
    }
  }
  double tail = 0.0;
  for (; i < n; ++i) {
    double v = static_cast<double>(src[i]);
    tail += v * v;
  }
  return fold_lanes(acc) + tail;
}

NXMLX_CLONES
void normalize_scale_f32(const float* src, float* dst, size_t n, double scale, const float* g) {
  for (size_t i = 0; i < n; ++i) {
    dst[i] = static_cast<float>(static_cast<double>(src[i]) * scale * static_cast<double>(g[i]));
  }
}

NXMLX_CLONES
void scale_f32(float* dst, size_t n, double factor) {
  for (size_t i = 0; i < n; ++i) {
    dst[i] = static_cast<float>(static_cast<double>(dst[i]) * factor);
  }
}

namespace {

// a if b does not beat it, else b; a NaN, once in, stays (NaN compares false).
template <bool Max>
inline float pick(float a, float b) {
  bool beats = Max ? b > a : b < a;
  return (beats | (b != b)) ? b : a;
}

template <bool Max>
float extremum_scalar(const float* src, size_t n) {
  float best = src[0];
  for (size_t i = 1; i < n; ++i) {
    best = pick<Max>(best, src[i]);
  }
  return best;
}

#if defined(__x86_64__) && defined(__GNUC__)
// GCC leaves a select-and-compare reduction scalar in every form we tried (loops, generic
// vectors under target_clones), so these two are written with intrinsics. maxps/minps
// return their second operand when either is NaN: NaN is tracked on the side.
template <bool Max>
__attribute__((target("avx512f"))) float extremum_avx512(const float* src, size_t n) {
  if (n < 64) {
    return extremum_scalar<Max>(src, n);
  }
  // Four accumulators: one would wait on the previous max every step.
  __m512 acc[4];
  // NaN inputs are copied into `nan` (zero elsewhere).
  __m512 nan[4];
  for (int u = 0; u < 4; ++u) {
    acc[u] = _mm512_loadu_ps(src + 16 * u);
    nan[u] = _mm512_setzero_ps();
  }
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    for (int u = 0; u < 4; ++u) {
      __m512 x = _mm512_loadu_ps(src + i + 16 * u);
      acc[u] = Max ? _mm512_max_ps(acc[u], x) : _mm512_min_ps(acc[u], x);
      nan[u] = _mm512_mask_mov_ps(nan[u], _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
    }
  }
  __m512 any = _mm512_add_ps(_mm512_add_ps(nan[0], nan[1]), _mm512_add_ps(nan[2], nan[3]));
  if (_mm512_cmp_ps_mask(any, any, _CMP_UNORD_Q)) {
    return std::numeric_limits<float>::quiet_NaN();
  }
  float lanes[16];
  float best = src[0];
  for (int u = 0; u < 4; ++u) {
    _mm512_storeu_ps(lanes, acc[u]);
    best = pick<Max>(best, extremum_scalar<Max>(lanes, 16));
  }
  return n > i ? pick<Max>(best, extremum_scalar<Max>(src + i, n - i)) : best;
}

template <bool Max>
__attribute__((target("avx2"))) float extremum_avx2(const float* src, size_t n) {
  if (n < 32) {
    return extremum_scalar<Max>(src, n);
  }
  __m256 acc[4];
  __m256 nan[4];
  for (int u = 0; u < 4; ++u) {
    acc[u] = _mm256_loadu_ps(src + 8 * u);
    nan[u] = _mm256_setzero_ps();
  }
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int u = 0; u < 4; ++u) {
      __m256 x = _mm256_loadu_ps(src + i + 8 * u);
      acc[u] = Max ? _mm256_max_ps(acc[u], x) : _mm256_min_ps(acc[u], x);
      nan[u] = _mm256_or_ps(nan[u], _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    }
  }
  __m256 any = _mm256_or_ps(_mm256_or_ps(nan[0], nan[1]), _mm256_or_ps(nan[2], nan[3]));
  if (_mm256_movemask_ps(any)) {
    return std::numeric_limits<float>::quiet_NaN();
  }
  float lanes[8];
  float best = src[0];
  for (int u = 0; u < 4; ++u) {
    _mm256_storeu_ps(lanes, acc[u]);
    best = pick<Max>(best, extremum_scalar<Max>(lanes, 8));
  }
  return n > i ? pick<Max>(best, extremum_scalar<Max>(src + i, n - i)) : best;
}

template <bool Max>
float extremum(const float* src, size_t n) {
  static const int level =
      __builtin_cpu_supports("avx512f") ? 2 : (__builtin_cpu_supports("avx2") ? 1 : 0);
  switch (level) {
    case 2: return extremum_avx512<Max>(src, n);
    case 1: return extremum_avx2<Max>(src, n);
    default: return extremum_scalar<Max>(src, n);
  }
}
#else
template <bool Max>
float extremum(const float* src, size_t n) {
  return extremum_scalar<Max>(src, n);
}
#endif

}  // namespace

float max_f32(const float* src, size_t n) { return extremum<true>(src, n); }

float min_f32(const float* src, size_t n) { return extremum<false>(src, n); }

namespace {

// Value t of the word: its bits [t * bits, (t + 1) * bits).
inline float quant_value(uint32_t word, int t, int bits) {
  return static_cast<float>((word >> (t * bits)) & ((1u << bits) - 1u));
}

}  // namespace

void qmm_permute_f32(const float* x, float* xp, size_t k, int bits) {
  const size_t per = 32 / static_cast<size_t>(bits);
  const size_t chunk = kQuantLanes * per;
  size_t c = 0;
  for (; c + chunk <= k; c += chunk) {
    for (size_t lane = 0; lane < kQuantLanes; ++lane) {
      // Value t < per - 1 is read in place, as q * 2^(t * bits) (masked, not shifted): its x
      // is scaled by 2^(-t * bits), exactly, so that the product is x * q.
      for (size_t t = 0; t < per; ++t) {
        const float scale = t + 1 < per ? std::ldexp(1.0f, -static_cast<int>(t) * bits) : 1.0f;
        xp[c + t * kQuantLanes + lane] = x[c + lane * per + t] * scale;
      }
    }
  }
  for (; c < k; ++c) xp[c] = x[c];
}

// 16 lanes of float and uint32 (GCC's vector extensions: one AVX-512 register, two AVX2
// ones or four SSE ones, as the clone compiles them).
typedef float v16f __attribute__((vector_size(4 * kQuantLanes)));
typedef uint32_t v16u __attribute__((vector_size(4 * kQuantLanes)));

// The helpers below pass vectors by value; they are always inlined, so no call ever uses the
// ABI GCC warns about (the baseline clone has no AVX).
#pragma GCC diagnostic ignored "-Wpsabi"

// Value t of each lane's word as a float: q * 2^(t * bits) for t < per - 1 (a mask, no
// shift: the permuted x carries the 2^(-t * bits)), q itself for the last (a shift; masking
// would reach the sign bit of the conversion).
template <int Bits>
[[gnu::always_inline]] inline v16f lane_values(const v16u& word, size_t t) {
  constexpr size_t per = 32 / Bits;
  constexpr uint32_t mask = (1u << Bits) - 1u;
  if (t + 1 < per) {
    return __builtin_convertvector(word & (mask << static_cast<uint32_t>(t * Bits)), v16f);
  }
  return __builtin_convertvector(word >> static_cast<uint32_t>(t * Bits), v16f);
}

template <int Bits>
[[gnu::always_inline]] inline void qmm_rows(const float* xp, const float* xsum, size_t m, size_t k,
                                            const uint32_t* w, const float* scales,
                                            const float* biases, size_t rows, size_t group,
                                            float* y, size_t ldy) {
  constexpr size_t per = 32 / Bits;
  constexpr size_t chunk = kQuantLanes * per;
  const size_t words = k / per;
  const size_t groups = k / group;
  const size_t full = k / chunk * chunk;
  // A chunk lies inside one group, or starts a group and spans several (powers of two).
  const bool one_group = chunk <= group;
  size_t lane_group[kQuantLanes];
  for (size_t lane = 0; lane < kQuantLanes; ++lane) {
    lane_group[lane] = one_group ? 0 : lane * per / group;
  }
  // The scales of a chunk's lanes: its groups' scales, each repeated over its lanes.
  auto chunk_scales = [&](const float* sg, v16f& sc) __attribute__((always_inline)) {
    for (size_t lane = 0; lane < kQuantLanes; ++lane) sc[lane] = sg[lane_group[lane]];
  };
  v16f vals[per];
  v16f tot[16];
  if (m == 1) {
    // One row of x (a decode step): unpack and multiply in registers.
    for (size_t r = 0; r < rows; ++r) {
      const uint32_t* wr = w + r * words;
      const float* sr = scales + r * groups;
      v16f t1{};
      for (size_t c = 0; c < full; c += chunk) {
        v16u word;
        std::memcpy(&word, wr + c / per, sizeof(word));
        // Two accumulators: a chain of per dependent multiply-adds would wait on each one.
        v16f even{}, odd{};
        for (size_t t = 0; t < per; t += 2) {
          v16f xv, xw;
          std::memcpy(&xv, xp + c + t * kQuantLanes, sizeof(xv));
          std::memcpy(&xw, xp + c + (t + 1) * kQuantLanes, sizeof(xw));
          even += xv * lane_values<Bits>(word, t);
          odd += xw * lane_values<Bits>(word, t + 1);
        }
        const v16f partial = even + odd;
        if (one_group) {
          t1 += partial * sr[c / group];
        } else {
          v16f sc;
          chunk_scales(sr + c / group, sc);
          t1 += partial * sc;
        }
      }
      float acc = 0.0f;
      for (size_t lane = 0; lane < kQuantLanes; ++lane) acc += t1[lane];
      for (size_t c = full; c < k; ++c) {
        acc += xp[c] * sr[c / group] * quant_value(wr[c / per], static_cast<int>(c % per), Bits);
      }
      const float* br = biases + r * groups;
      for (size_t g = 0; g < groups; ++g) acc += br[g] * xsum[g];
      y[r] = acc;
    }
    return;
  }
  for (size_t r = 0; r < rows; ++r) {
    const uint32_t* wr = w + r * words;
    const float* sr = scales + r * groups;
    const float* br = biases + r * groups;
    for (size_t mi = 0; mi < m; ++mi) tot[mi] = v16f{};
    for (size_t c = 0; c < full; c += chunk) {
      v16u word;
      std::memcpy(&word, wr + c / per, sizeof(word));
      for (size_t t = 0; t < per; ++t) vals[t] = lane_values<Bits>(word, t);
      v16f sc = v16f{} + sr[c / group];
      if (!one_group) chunk_scales(sr + c / group, sc);
      for (size_t mi = 0; mi < m; ++mi) {
        const float* xc = xp + mi * k + c;
        v16f partial{};
        for (size_t t = 0; t < per; ++t) {
          v16f xv;
          std::memcpy(&xv, xc + t * kQuantLanes, sizeof(xv));
          partial += xv * vals[t];
        }
        tot[mi] += partial * sc;
      }
    }
    for (size_t mi = 0; mi < m; ++mi) {
      float acc = 0.0f;
      for (size_t lane = 0; lane < kQuantLanes; ++lane) acc += tot[mi][lane];
      // The tail (in order) and the biases.
      const float* xt = xp + mi * k;
      for (size_t c = full; c < k; ++c) {
        acc += xt[c] * sr[c / group] * quant_value(wr[c / per], static_cast<int>(c % per), Bits);
      }
      const float* xs = xsum + mi * groups;
      for (size_t g = 0; g < groups; ++g) acc += br[g] * xs[g];
      y[mi * ldy + r] = acc;
    }
  }
}

NXMLX_CLONES
void qmm_rows_f32(const float* xp, const float* xsum, size_t m, size_t k, const uint32_t* w,
                  const float* scales, const float* biases, size_t rows, size_t group, int bits,
                  float* y, size_t ldy) {
  switch (bits) {
    case 2: return qmm_rows<2>(xp, xsum, m, k, w, scales, biases, rows, group, y, ldy);
    case 4: return qmm_rows<4>(xp, xsum, m, k, w, scales, biases, rows, group, y, ldy);
    default: return qmm_rows<8>(xp, xsum, m, k, w, scales, biases, rows, group, y, ldy);
  }
}

template <int Bits>
[[gnu::always_inline]] inline void dequantize_rows(const uint32_t* w, const float* scales,
                                                   const float* biases, size_t rows, size_t k,
                                                   size_t group, float* dst) {
  constexpr size_t per = 32 / Bits;
  constexpr uint32_t mask = (1u << Bits) - 1u;
  const size_t groups = k / group;
  const size_t words = group / per;
  for (size_t r = 0; r < rows; ++r) {
    for (size_t g = 0; g < groups; ++g) {
      const float s = scales[r * groups + g];
      const float b = biases[r * groups + g];
      const uint32_t* wg = w + (r * groups + g) * words;
      float* o = dst + r * k + g * group;
      for (size_t i = 0; i < words; ++i) {
        const uint32_t word = wg[i];
        for (size_t t = 0; t < per; ++t) {
          o[i * per + t] = s * static_cast<float>((word >> (t * Bits)) & mask) + b;
        }
      }
    }
  }
}

NXMLX_CLONES
void dequantize_rows_f32(const uint32_t* w, const float* scales, const float* biases, size_t rows,
                         size_t k, size_t group, int bits, float* dst) {
  switch (bits) {
    case 2: return dequantize_rows<2>(w, scales, biases, rows, k, group, dst);
    case 4: return dequantize_rows<4>(w, scales, biases, rows, k, group, dst);
    default: return dequantize_rows<8>(w, scales, biases, rows, k, group, dst);
  }
}

}  // namespace nxmlx::simd
