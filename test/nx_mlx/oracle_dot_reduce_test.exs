defmodule NxMlx.OracleDotReduceTest do
  # dot and the reductions on NxMlx.Backend against Nx.BinaryBackend, on seeded random inputs.
  # Tolerance per type: integers exact (wrap-around included); f32 rtol/atol 1.0e-5; f16 and
  # bf16 2.0e-2 (sums of up to 12 products rounded to 8 or 11 bits); f64 1.0e-12; c64 1.0e-5
  # (through all_close, per element against its magnitude).
  use ExUnit.Case, async: true

  import NxMlx.TestHelpers

  @mlx {NxMlx.Backend, device: NxMlx.TestHelpers.oracle_device()}

  setup do
    :rand.seed(:exsss, {8, 13, 21})
    :ok
  end

  defp random(shape, type) do
    n = Tuple.product(shape)

    values =
      case type do
        {:u, _} -> for _ <- 1..n//1, do: :rand.uniform(256) - 1
        {:s, _} -> for _ <- 1..n//1, do: :rand.uniform(256) - 128
        _ -> for _ <- 1..n//1, do: :rand.uniform() * 4 - 2
      end

    source_type = if elem(type, 0) in [:s, :u], do: {:s, 64}, else: {:f, 64}

    t =
      Nx.tensor(values, type: source_type, backend: Nx.BinaryBackend)
      |> Nx.reshape(shape)

    if type == {:c, 64},
      do: Nx.complex(Nx.as_type(t, {:f, 32}), random(shape, {:f, 32})),
      else: Nx.as_type(t, type)
  end

  defp mlx(t), do: Nx.backend_copy(t, @mlx)

  defp tol({:f, 64}), do: 1.0e-12
  defp tol({:f, 32}), do: 1.0e-5
  defp tol({:c, 64}), do: 1.0e-5
  defp tol(_), do: 2.0e-2

  defp assert_same(got_fun, expected, context) do
    got = assert_native(got_fun)
    assert %NxMlx.Backend{} = got.data, context
    assert {got.type, got.shape} == {expected.type, expected.shape}, context
    got_b = Nx.backend_copy(got, Nx.BinaryBackend)

    case expected.type do
      {kind, _} when kind in [:s, :u] ->
        assert Nx.to_binary(got_b) == Nx.to_binary(expected),
               "#{context}\n#{inspect(got_b)}\n#{inspect(expected)}"

      type ->
        t = tol(type)

        assert Nx.to_number(Nx.all_close(got_b, expected, rtol: t, atol: t, equal_nan: true)) ==
                 1,
               "#{context}\n#{inspect(got_b)}\n#{inspect(expected)}"
    end
  end

  describe "dot" do
    test "matrix, vector, multi-axis and batched contractions on every type" do
      types =
        device_types([
          {:f, 32},
          {:f, 16},
          {:bf, 16},
          {:f, 64},
          {:c, 64},
          {:s, 8},
          {:u, 8},
          {:s, 32},
          {:s, 64}
        ])

      cases = [
        # {left shape, contract, batch, right shape, contract, batch}
        {{3, 4}, [1], [], {4, 5}, [0], []},
        {{4}, [0], [], {4}, [0], []},
        {{3, 4}, [1], [], {4}, [0], []},
        {{2, 3, 4}, [1, 2], [], {3, 4, 2}, [0, 1], []},
        {{2, 3, 4}, [2], [0], {2, 4, 5}, [1], [0]},
        {{2, 2, 3, 4}, [3], [0, 1], {2, 2, 4, 5}, [2], [0, 1]}
      ]

      for type <- types, {ls, c1, b1, rs, c2, b2} <- cases do
        l = random(ls, type)
        r = random(rs, type)

        assert_same(
          fn -> Nx.dot(mlx(l), c1, b1, mlx(r), c2, b2) end,
          Nx.dot(l, c1, b1, r, c2, b2),
          "dot #{inspect(type)} #{inspect(ls)} #{inspect(c1)} #{inspect(b1)} x #{inspect(rs)}"
        )
      end
    end

    test "integer products wrap around as in Nx, and mixed types promote" do
      big = Nx.tensor([[100, 120], [-128, 127]], type: {:s, 8}, backend: Nx.BinaryBackend)
      assert_same(fn -> Nx.dot(mlx(big), mlx(big)) end, Nx.dot(big, big), "s8 overflow")

      ints = random({3, 4}, {:s, 32})
      floats = random({4, 2}, {:f, 32})
      assert_same(fn -> Nx.dot(mlx(ints), mlx(floats)) end, Nx.dot(ints, floats), "s32 x f32")
    end
  end

  describe "reductions" do
    test "sum, product, reduce_max, reduce_min, all, any over any axes on every type" do
      types =
        device_types([{:f, 32}, {:bf, 16}, {:f, 64}, {:s, 8}, {:u, 8}, {:s, 32}, {:u, 64}])

      for type <- types,
          shape <- [{}, {5}, {2, 3, 4}, {3, 1, 2}],
          axes <- [nil, [0], [-1], [0, 2]],
          Enum.all?(axes || [], &(&1 < tuple_size(shape) and &1 >= -tuple_size(shape))),
          keep <- [false, true],
          fun <- [:sum, :product, :reduce_max, :reduce_min, :all, :any] do
        t = random(shape, type)
        t = if fun == :product, do: Nx.clip(t, -2, 2) |> Nx.as_type(type), else: t
        opts = if axes, do: [axes: axes, keep_axes: keep], else: [keep_axes: keep]

        assert_same(
          fn -> apply(Nx, fun, [mlx(t), opts]) end,
          apply(Nx, fun, [t, opts]),
          "#{fun} #{inspect(type)} #{inspect(shape)} #{inspect(opts)}"
        )
      end
    end

    test "NaN propagates through float reductions; names survive" do
      t =
        Nx.tensor([[1.0, :nan, 3.0], [4.0, 5.0, 6.0]],
          names: [:rows, :cols],
          backend: Nx.BinaryBackend
        )

      for fun <- [:sum, :product, :reduce_max, :reduce_min] do
        got = assert_native(fn -> apply(Nx, fun, [mlx(t), [axes: [:cols]]]) end)
        expected = apply(Nx, fun, [t, [axes: [:cols]]])
        assert got.names == expected.names
        assert inspect(Nx.backend_copy(got, Nx.BinaryBackend)) == inspect(expected), "#{fun}"
      end
    end
  end
end
