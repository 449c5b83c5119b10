// CPU kernels of our own, run as MLX primitives on the stream's thread.
//
// MLX's CPU backend computes exp, sigmoid, erf, erfinv, sin and cos of every float type with
// float polynomials (exp 62 ulp near 88, erf(1e-7) = 0, f64 no better than f32), and rsqrt
// to 1.5 ulp, and has no erfc or cbrt; these
// compute in double with the C library and round once, so f16, bf16 and f32 results are
// within 1 ulp of the exact value and f64 ones within a few, and split large arrays over
// the machine's cores.
#pragma once

#include "mlx/mlx.h"

namespace nxmlx::kernels {

enum class AccurateFn { Exp, Sigmoid, Erf, ErfInv, Sin, Cos, Rsqrt, Erfc, Cbrt };

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

}  // namespace nxmlx::kernels
