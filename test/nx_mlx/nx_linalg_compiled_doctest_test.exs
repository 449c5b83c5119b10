defmodule NxMlx.NxLinAlgCompiledDoctestTest do
  # Nx.LinAlg's doctests with NxMlx as the default backend and the default defn compiler:
  # the many Nx.LinAlg functions written in defn run as NxMlx programs. Left out: the
  # examples whose last printed digit is BLAS's rounding, as in nx_doctest_test.exs.
  use ExUnit.Case, async: false

  import NxMlx.DocTestHelpers

  setup do
    Nx.default_backend({NxMlx.Backend, device: :cpu})
    Nx.Defn.default_options(compiler: NxMlx, device: :cpu)
    :ok
  end

  doctest_examples(Nx.LinAlg, skip_examples: NxMlx.DocTestHelpers.linalg_last_digit_examples())
end
