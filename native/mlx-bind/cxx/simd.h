// Vectorised loops over plain float buffers, behind the CPU kernels in kernels.cc (no MLX
// here). Each is compiled once per x86-64 level (v4: AVX-512, v3: AVX2, baseline) and the
// best one the CPU runs is chosen when the library loads; elsewhere the compiler's baseline
// vectorisation applies.
//
// exp and sigmoid compute in double (range reduction by ln 2, a degree-8 polynomial, exact
// scaling by 2^k) and round once to float: within 0.6 ulp of the exact value, every float
// checked (see native/mlx-bind/tests), NaN in gives NaN out, exp(+inf) = +inf,
// exp(-inf) = 0, overflow to +inf and gradual underflow as C's expf.
#pragma once

#include <cstddef>
#include <cstdint>

namespace nxmlx::simd {

// dst[i] = exp(src[i]), 0 <= i < n. dst may be src.
void exp_f32(const float* src, float* dst, size_t n);

// dst[i] = 1 / (1 + exp(-src[i])), 0 <= i < n. dst may be src.
void sigmoid_f32(const float* src, float* dst, size_t n);

// dst[i] = tanh(src[i]) and dst[i] = log(src[i]), 0 <= i < n, in double and rounded once
// (within 1 ulp of the exact value); C's special values. dst may be src.
void tanh_f32(const float* src, float* dst, size_t n);
void log_f32(const float* src, float* dst, size_t n);

// dst[i] = erf(src[i]), 0 <= i < n, in double and rounded once (within 0.51 ulp of the
// exact value); erf(-0) = -0, erf(+-inf) = +-1, NaN gives NaN. dst may be src.
void erf_f32(const float* src, float* dst, size_t n);

// dst[i] = src[i] / 2 * (1 + erf(src[i] / sqrt(2))) (exact GELU), in double and rounded
// once: 1 + erf is computed as erfc(-x / sqrt(2)) for x < -sqrt(2), so that the negative
// tail keeps its relative precision (within 1 ulp of the exact value). NaN gives NaN,
// +inf gives +inf, -inf gives NaN (-inf * 0, as the composed form). dst may be src.
void gelu_f32(const float* src, float* dst, size_t n);

// The sum of src[0..n), accumulated in double.
double sum_f32(const float* src, size_t n);

// dst[i] = exp(src[i] - shift) (the difference taken in double), 0 <= i < n; returns the
// sum of the exponentials before their rounding to float. dst may be src.
double exp_shifted_f32(const float* src, float* dst, size_t n, double shift);

// dst[i] = dst[i] * factor, in double, rounded once.
void scale_f32(float* dst, size_t n, double factor);

// The mean and the population variance of src[0..n), n >= 1, in double (two passes).
void moments_f32(const float* src, size_t n, double* mean, double* variance);

// dst[i] = (src[i] - mean) * scale * g[i] + b[i], in double and rounded once. dst may be src.
void normalize_affine_f32(const float* src, float* dst, size_t n, double mean, double scale,
                          const float* g, const float* b);

// The sum of the squares of src[0..n), accumulated in double.
double sum_squares_f32(const float* src, size_t n);

// dst[i] = src[i] * scale * g[i], in double and rounded once. dst may be src.
void normalize_scale_f32(const float* src, float* dst, size_t n, double scale, const float* g);

// The largest (smallest) of src[0..n), n >= 1; NaN if any is NaN.
float max_f32(const float* src, size_t n);
float min_f32(const float* src, size_t n);

// Affine quantized rows (MLX's layout: `bits` in {2, 4, 8}, values in order, little-endian
// within each uint32 word; a scale and a bias per `group` values, group a multiple of 32).
// A word chunk is kQuantLanes consecutive words of one row; `qmm_permute_f32` reorders a row
// of x so that value t of word `lane` of each chunk meets its x at [t * kQuantLanes + lane]
// (a k not a multiple of the chunk keeps its tail in order).
constexpr size_t kQuantLanes = 8;

void qmm_permute_f32(const float* x, float* xp, size_t k, int bits);

// y[mi * ldy + r] = sum_c x[mi, c] * (scale[r, c / group] * q[r, c] + bias[r, c / group]) for
// the `rows` rows of w (words_per_row = k * bits / 32) and the m rows of x, given permuted
// (xp, m x k) and the sums of x over each group (xsum, m x k / group). m <= 16. Accumulated
// in float: products of a chunk, then the chunks, then the lanes.
void qmm_rows_f32(const float* xp, const float* xsum, size_t m, size_t k, const uint32_t* w,
                  const float* scales, const float* biases, size_t rows, size_t group, int bits,
                  float* y, size_t ldy);

// The values of `rows` quantized rows of k values each, as float rows (dst: rows x k).
void dequantize_rows_f32(const uint32_t* w, const float* scales, const float* biases, size_t rows,
                         size_t k, size_t group, int bits, float* dst);

}  // namespace nxmlx::simd
