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

}  // namespace nxmlx::simd
