// CPU kernels of our own, run as MLX primitives on the stream's thread.
//
// Gelu is the exact GELU, x / 2 * (1 + erf(x / sqrt(2))), as one kernel (the compiler's
// rewrite of the composed form; MLX has no such op).
//
// MLX's CPU backend computes exp, sigmoid, erf, erfinv, sin and cos of every float type with
// float polynomials (exp 62 ulp near 88, erf(1e-7) = 0, f64 no better than f32), and rsqrt
// to 1.5 ulp, has no erfc or cbrt, and runs tanh and log on one thread; these compute in
// double (f32 through the vectorised loops of simd.h, the other types with the C library)
// and round once, so f16, bf16 and f32 results are within 1 ulp of the exact value and f64
// ones within a few, and split large arrays over the machine's cores.
#pragma once

#include "mlx/mlx.h"

namespace nxmlx::kernels {

enum class AccurateFn { Exp, Sigmoid, Erf, ErfInv, Sin, Cos, Rsqrt, Erfc, Cbrt, Gelu, Tanh, Log };

// True when `accurate_unary` runs `fn` on `dtype` on the stream's device (CPU streams and
// real floating-point types).
bool has_accurate_unary(const mlx::core::Stream& stream, mlx::core::Dtype dtype);

// fn(a) as an MLX array whose primitive computes in double on the CPU; a is made
// contiguous first.
mlx::core::array accurate_unary(AccurateFn fn, const mlx::core::array& a,
                                const mlx::core::Stream& stream);

// True when `accurate_sum` runs on `dtype` on the stream's device (CPU streams; real float
// types and complex64).
bool has_accurate_sum(const mlx::core::Stream& stream, mlx::core::Dtype dtype);

// The sum of `a` along `axis` (0 <= axis < ndim), kept as size 1, accumulated in double
// (complex<double> for complex64) and rounded once. MLX's CPU sum adds in the array's type,
// one element after the other (f32 sums of 2^25 ones stop at 2^24; 4e-5 relative error on
// 16M uniform values).
mlx::core::array accurate_sum(const mlx::core::array& a, int axis, const mlx::core::Stream& stream);

// True when `fast_extremum` runs on `dtype` on the stream's device (CPU streams, float32).
bool has_fast_extremum(const mlx::core::Stream& stream, mlx::core::Dtype dtype);

// The max (`max`) or min of each row of the matrix `a` (at least one column), as
// [rows, 1]; NaN for a row holding one. Vectorised and split over the machine's cores
// (MLX's CPU max/min run on one thread: 12.5 ms for 16M floats, these 3-5 ms).
mlx::core::array fast_extremum(bool max, const mlx::core::array& a,
                               const mlx::core::Stream& stream);

// Softmax along the rows of the float32 matrix `a` (at least one column): per row the max,
// exp(x - max) and its sum in double, and the scaling, while the row is in cache; rows (or
// the pieces of a few long rows) split over the machine's cores.
mlx::core::array fast_softmax(const mlx::core::array& a, const mlx::core::Stream& stream);

// Layer norm along the rows of the float32 matrix x [r, k] with scale g [k] and shift b [k]:
// (x - mean) / sqrt(variance + eps) * g + b, mean and variance in double (CPU streams).
mlx::core::array fast_layer_norm(const mlx::core::array& x, const mlx::core::array& g,
                                 const mlx::core::array& b, double eps,
                                 const mlx::core::Stream& stream);

// RMS norm along the rows of the float32 matrix x [r, k] with scale g [k]:
// x / sqrt(mean(x^2) + eps) * g, the mean square in double (CPU streams).
mlx::core::array fast_rms_norm(const mlx::core::array& x, const mlx::core::array& g,
                               double eps, const mlx::core::Stream& stream);

// True when `matvec` runs on `dtype` on the stream's device (CPU streams, float32, and a
// BLAS with cblas_sgemv loaded).
bool has_matvec(const mlx::core::Stream& stream, mlx::core::Dtype dtype);

// m [r, c] times v [c], as [r], through the BLAS's sgemv; m may be any strided view (a
// transpose reads in place).
mlx::core::array matvec(const mlx::core::array& m, const mlx::core::array& v,
                        const mlx::core::Stream& stream);

// True when `batched_matmul` runs on `dtype` on the stream's device (CPU streams, float32,
// and a BLAS with cblas_sgemm_batch loaded).
bool has_batched_matmul(const mlx::core::Stream& stream, mlx::core::Dtype dtype);

// a [..., m, k] times b [..., k, n] with equal batch axes (non-empty), as [..., m, n],
// through one cblas_sgemm_batch call; operands may be any strided views.
mlx::core::array batched_matmul(const mlx::core::array& a, const mlx::core::array& b,
                                const mlx::core::Stream& stream);

// True when `quantized_matmul` and `dequantize` run on the stream's device for this layout
// (CPU streams; affine 2, 4 or 8 bits; group sizes that are multiples of 32).
bool has_quantized_cpu(const mlx::core::Stream& stream, int bits, int group);

// x [m, k] (float32) times the transpose of the affine quantized w [n, k * bits / 32] with
// float32 scales and biases [n, k / group], as [m, n] float32: vectorised, rows of w split
// over the cores, accumulated in float.
mlx::core::array quantized_matmul(const mlx::core::array& x, const mlx::core::array& w,
                                  const mlx::core::array& scales, const mlx::core::array& biases,
                                  int bits, int group, const mlx::core::Stream& stream);

// The float32 values [n, k] of w, as `quantized_matmul` reads them.
mlx::core::array dequantize(const mlx::core::array& w, const mlx::core::array& scales,
                            const mlx::core::array& biases, int bits, int group,
                            const mlx::core::Stream& stream);

}  // namespace nxmlx::kernels
