defmodule NxMlx.NxLinAlgCompiledDoctestTest do
  # Nx.LinAlg's doctests with NxMlx as the default backend and the default defn compiler:
  # the many Nx.LinAlg functions written in defn run as NxMlx programs. Left out: the same
  # examples as in nx_doctest_test.exs, for the same reason (BLAS rounding of the last
  # printed digit; compared with a tolerance in linalg_tolerance_test.exs).
  use ExUnit.Case, async: false

  import NxMlx.DocTestHelpers

  setup do
    Nx.default_backend({NxMlx.Backend, device: :cpu})
    Nx.Defn.default_options(compiler: NxMlx, device: :cpu)
    :ok
  end

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
