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

  # Left out: the examples whose last printed digit is BLAS's rounding (see
  # NxMlx.DocTestHelpers.linalg_last_digit_examples/0).
  doctest_examples(Nx.LinAlg, skip_examples: NxMlx.DocTestHelpers.linalg_last_digit_examples())
end
