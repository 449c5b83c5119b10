defmodule NxMlx.NxDoctestTest do
  # Nx's own doctests, with NxMlx.Backend (CPU device) as the default backend. Callbacks
  # without an MLX implementation run on Nx.BinaryBackend (see NxMlx.Backend, "Fallbacks").
  use ExUnit.Case, async: false

  import NxMlx.DocTestHelpers

  setup do
    Nx.default_backend({NxMlx.Backend, device: :cpu})
    :ok
  end

  # Left out: f64 examples whose printed digits are Nx.BinaryBackend's own rounding. Its f64
  # erf_inv is accurate to about 4e-8 relative (erf_inv(0.1) = 0.08885599049425769 to f64 precision,
  # as NxMlx gives); log1p(2.0) is 1 ulp from Nx's log(3.0) in the C library's log1p. Both
  # are measured in ulp in test/nx_mlx/accuracy_test.exs.
  doctest_examples(Nx,
    skip_examples: [
      "Nx.erf_inv/1 (453)",
      "Nx.erf_inv/1 (476)",
      "Nx.log1p/1 (480)"
    ]
  )

  # Left out: these examples print f32 results whose last digit differs, because MLX's
  # matmul goes through BLAS, which rounds differently from Nx.BinaryBackend (which sums in
  # f64) and differently again on other CPUs (least_squares 106 and 108 pass on some
  # machines only); for lu/1 (79) MLX prints the exact 4.0 and 1.0. The same examples are
  # compared with a tolerance in test/nx_mlx/linalg_tolerance_test.exs.
  doctest_examples(Nx.LinAlg,
    skip_examples: [
      "Nx.LinAlg.cholesky/1 (5)",
      "Nx.LinAlg.pinv/2 (67)",
      "Nx.LinAlg.lu/1 (79)",
      "Nx.LinAlg.matrix_power/2 (87)",
      "Nx.LinAlg.least_squares/3 (106)",
      "Nx.LinAlg.least_squares/3 (107)",
      "Nx.LinAlg.least_squares/3 (108)"
    ]
  )
end
