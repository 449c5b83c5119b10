defmodule NxMlx.OracleElementwiseTest do
  # Element-wise ops on NxMlx.Backend against Nx.BinaryBackend, on seeded random inputs with
  # the values that break naive implementations (NaN, infinities, ties at .5, signed zeros,
  # integer extremes), across types and broadcasting shapes.
  #
  # Tolerance: integers and predicates exactly; floats with equal NaNs and
  # f32 rtol 1.0e-6 (atol 1.0e-6) for arithmetic, 2.0e-6 for transcendental functions,
  # f16/bf16 rtol 1.0e-2; f64 rtol 1.0e-12.
  use ExUnit.Case, async: true

  @mlx {NxMlx.Backend, device: NxMlx.TestHelpers.oracle_device()}
  # Nx 0.13 has no zero-sized dimensions.
  @shapes [{{3, 4}, {3, 4}}, {{3, 4}, {4}}, {{2, 1, 3}, {4, 1}}, {{}, {5}}, {{5}, {}}]
  @int_types [{:s, 8}, {:s, 16}, {:s, 32}, {:s, 64}, {:u, 8}, {:u, 16}, {:u, 32}, {:u, 64}]
  @float_types NxMlx.TestHelpers.device_types([{:f, 32}, {:f, 16}, {:bf, 16}, {:f, 64}])

  setup do
    :rand.seed(:exsss, {7, 11, 13})
    :ok
  end

  # Random values of `type` for `shape`, as a BinaryBackend tensor.
  defp random(shape, type, opts \\ []) do
    values = for _ <- 1..Tuple.product(shape), do: value(type, opts)
    Nx.tensor(values, type: type, backend: Nx.BinaryBackend) |> Nx.reshape(shape)
  end

  defp value({kind, size}, opts) when kind in [:s, :u] do
    {min, max} =
      if kind == :s,
        do: {-Bitwise.bsl(1, size - 1), Bitwise.bsl(1, size - 1) - 1},
        else: {0, Bitwise.bsl(1, size) - 1}

    v =
      case :rand.uniform(6) do
        1 -> min
        2 -> max
        3 -> 0
        _ -> Enum.random(max(min, -100)..min(max, 100))
      end

    cond do
      opts[:nonzero] && v == 0 -> 1
      opts[:range] -> Enum.random(opts[:range])
      true -> v
    end
  end

  # Floats: ties at .5, signed zeros and, unless `finite: true`, NaN and the infinities.
  # `positive: true` keeps them above zero; `nonzero: true` avoids zeros.
  defp value(_type, opts) do
    specials =
      if opts[:finite],
        do: [0.0, -0.0, 0.5, -0.5, 2.5, -2.5],
        else: [:nan, :infinity, :neg_infinity, 0.0, -0.0, 0.5, -2.5]

    v =
      case :rand.uniform(4) do
        1 -> Enum.random(specials)
        _ -> Float.round((:rand.uniform() - 0.5) * 20, Enum.random(0..3))
      end

    cond do
      opts[:positive] == true and is_float(v) -> abs(v) + 0.25
      opts[:nonzero] == true and v == 0 -> 1.5
      true -> v
    end
  end

  defp mlx(t), do: Nx.backend_copy(t, @mlx)

  defp assert_same(%Nx.Tensor{} = got, %Nx.Tensor{} = expected, rtol, context) do
    assert %NxMlx.Backend{} = got.data, "#{context}: result not on NxMlx.Backend"
    assert got.type == expected.type and got.shape == expected.shape, context
    got = Nx.backend_copy(got, Nx.BinaryBackend)

    case expected.type do
      {kind, _} when kind in [:s, :u] ->
        assert Nx.to_binary(got) == Nx.to_binary(expected),
               "#{context}\n#{inspect(got)}\n#{inspect(expected)}"

      _ ->
        close = Nx.all_close(got, expected, rtol: rtol, atol: rtol, equal_nan: true)
        assert Nx.to_number(close) == 1, "#{context}\n#{inspect(got)}\n#{inspect(expected)}"
    end
  end

  defp rtol({:f, 64}, _), do: 1.0e-12
  defp rtol({k, 16}, _) when k in [:f, :bf], do: 1.0e-2
  defp rtol(_, :transcendental), do: 2.0e-6
  defp rtol(_, _), do: 1.0e-6

  describe "binary ops" do
    test "arithmetic, min/max and comparisons on every type, with broadcasting" do
      for type <- @int_types ++ @float_types,
          {sa, sb} <- @shapes,
          op <- [
            :add,
            :subtract,
            :multiply,
            :min,
            :max,
            :equal,
            :not_equal,
            :less,
            :greater_equal
          ] do
        a = random(sa, type)
        b = random(sb, type)
        expected = apply(Nx, op, [a, b])
        got = apply(Nx, op, [mlx(a), mlx(b)])

        assert_same(
          got,
          expected,
          rtol(type, :arith),
          "#{op} #{inspect(type)} #{inspect(sa)} #{inspect(sb)}"
        )
      end
    end

    test "integer division, remainder, bitwise ops and shifts" do
      for type <- @int_types, {sa, sb} <- @shapes do
        a = random(sa, type)
        b = random(sb, type, nonzero: true)
        {_, size} = type
        shift = random(sb, type, range: 0..(size + 3))

        for {op, rhs} <- [
              quotient: b,
              remainder: b,
              bitwise_and: b,
              bitwise_or: b,
              bitwise_xor: b,
              left_shift: shift,
              right_shift: shift
            ] do
          expected = apply(Nx, op, [a, rhs])
          got = apply(Nx, op, [mlx(a), mlx(rhs)])
          assert_same(got, expected, 0, "#{op} #{inspect(type)} #{inspect(sa)} #{inspect(sb)}")
        end
      end
    end

    test "mixed integer types, u64 against signed types included" do
      # Nx computes on the numbers and wraps the answer into the merged type (s64 for u64
      # with a signed type, which holds neither range whole).
      for _ <- 1..60 do
        ta = Enum.random(@int_types)
        tb = Enum.random([{:u, 64}, {:s, 8}, {:s, 64} | @int_types])
        {sa, sb} = Enum.random(@shapes)
        a = random(sa, ta)
        b = random(sb, tb)
        divisor = random(sb, tb, nonzero: true)
        shift = random(sb, tb, range: 0..70)
        context = "#{inspect(ta)} #{inspect(tb)} #{inspect(sa)} #{inspect(sb)}"

        for {op, rhs} <- [
              max: b,
              min: b,
              greater: b,
              less_equal: b,
              equal: b,
              quotient: divisor,
              remainder: divisor,
              right_shift: shift,
              left_shift: shift,
              add: b,
              multiply: b
            ] do
          assert_same(
            apply(Nx, op, [mlx(a), mlx(rhs)]),
            apply(Nx, op, [a, rhs]),
            0,
            "#{op} #{context}"
          )
        end

        [lo, hi] =
          Enum.sort([random({}, tb), random({}, tb)], &(Nx.to_number(&1) <= Nx.to_number(&2)))

        assert_same(Nx.clip(mlx(a), mlx(lo), mlx(hi)), Nx.clip(a, lo, hi), 0, "clip #{context}")
      end
    end

    test "logical ops treat every non-zero value, NaN included, as true" do
      for type <- NxMlx.TestHelpers.device_types([{:s, 32}, {:u, 8}, {:f, 32}, {:f, 64}]),
          {sa, sb} <- @shapes,
          op <- [:logical_and, :logical_or, :logical_xor] do
        a = random(sa, type)
        b = random(sb, type)

        assert_same(
          apply(Nx, op, [mlx(a), mlx(b)]),
          apply(Nx, op, [a, b]),
          0,
          "#{op} #{inspect(type)}"
        )
      end
    end

    test "float division, power and atan2" do
      # Inside Nx.BinaryBackend's domain: no division by zero, no complex powers.
      for type <- @float_types, {sa, sb} <- @shapes, op <- [:divide, :pow, :atan2] do
        a = random(sa, type, finite: true, positive: op == :pow)
        b = random(sb, type, finite: true, nonzero: true)
        expected = apply(Nx, op, [a, b])
        got = apply(Nx, op, [mlx(a), mlx(b)])

        assert_same(
          got,
          expected,
          rtol(type, :transcendental),
          "#{op} #{inspect(type)} #{inspect(sa)} #{inspect(sb)}"
        )
      end
    end
  end

  describe "unary ops" do
    test "rounding, predicates and sign-like functions" do
      for type <- @float_types ++ @int_types,
          shape <- [{3, 5}, {}],
          op <- [:ceil, :floor, :round, :is_nan, :is_infinity, :abs, :negate, :sign] do
        # Nx.BinaryBackend cannot round NaN or the infinities, and gives sign(NaN) = 1.0
        # (NxMlx gives NaN, tested below).
        t = random(shape, type, finite: op in [:ceil, :floor, :round, :sign])

        assert_same(
          apply(Nx, op, [mlx(t)]),
          apply(Nx, op, [t]),
          rtol(type, :arith),
          "#{op} #{inspect(type)} #{inspect(shape)}"
        )
      end
    end

    test "sign keeps NaN and the sign of infinities" do
      t = Nx.tensor([:nan, :infinity, :neg_infinity, -0.0, 3.0], backend: @mlx)
      assert Nx.to_flat_list(Nx.sign(t)) == [:nan, 1.0, -1.0, 0.0, 1.0]
    end

    test "sign of every float type, signed zeros, subnormals and specials included" do
      # Nx.BinaryBackend answers 1.0 for NaN and -Inf (see "Divergences"); elsewhere the bits
      # must agree (sign(-0.0) is -0.0).
      fixed = [-0.0, 0.0, :nan, :infinity, :neg_infinity, 1.0e-7, -6.0e-8, 1.0e-40, -1.0e-39]

      for type <- @float_types do
        t =
          Nx.concatenate([
            Nx.flatten(random({4, 5}, type)),
            Nx.tensor(fixed, type: type, backend: Nx.BinaryBackend)
          ])

        got = Nx.sign(mlx(t)) |> Nx.backend_copy(Nx.BinaryBackend)
        want = Nx.sign(t)
        assert got.type == want.type

        [Nx.to_flat_list(t), Nx.to_flat_list(got), Nx.to_flat_list(want)]
        |> Enum.zip_with(fn [x, g, w] ->
          case x do
            :nan -> assert g == :nan
            :neg_infinity -> assert g == -1.0
            _ -> assert g === w, "sign(#{inspect(x)}) in #{inspect(type)} is #{inspect(g)}"
          end
        end)
      end
    end

    test "bitwise_not on integers" do
      for type <- @int_types do
        t = random({4, 3}, type)
        assert_same(Nx.bitwise_not(mlx(t)), Nx.bitwise_not(t), 0, "bitwise_not #{inspect(type)}")
      end
    end

    test "population_count and count_leading_zeros (composed from bit operations)" do
      for type <- @int_types do
        {kind, size} = type
        # Random values plus the edges: zero, one, all bits set, only the top bit set.
        edges =
          if kind == :s,
            do: [0, 1, -1, -Bitwise.bsl(1, size - 1)],
            else: [0, 1, Bitwise.bsl(1, size) - 1, Bitwise.bsl(1, size - 1)]

        t =
          Nx.concatenate([
            Nx.flatten(random({5, 4}, type)),
            Nx.tensor(edges, type: type, backend: Nx.BinaryBackend)
          ])

        for op <- [:population_count, :count_leading_zeros] do
          got = NxMlx.TestHelpers.assert_native(fn -> apply(Nx, op, [mlx(t)]) end)
          assert_same(got, apply(Nx, op, [t]), 0, "#{op} #{inspect(type)}")
        end
      end
    end

    test "transcendental functions" do
      for type <- @float_types, op <- [:exp, :log, :sqrt, :tanh, :sigmoid, :sin, :atan, :erf] do
        # Real results only (Nx.BinaryBackend turns log/sqrt of negatives into complex).
        t = random({4, 6}, type, finite: true, positive: op in [:log, :sqrt])

        assert_same(
          apply(Nx, op, [mlx(t)]),
          apply(Nx, op, [t]),
          rtol(type, :transcendental),
          "#{op} #{inspect(type)}"
        )
      end
    end
  end

  describe "complex (c64)" do
    # Random finite values, zeros among them. Tolerance: rtol/atol 2.0e-6 through all_close
    # (per element against its magnitude).
    defp random_c64(shape) do
      re = random(shape, {:f, 32}, finite: true)
      im = random(shape, {:f, 32}, finite: true)
      zero = Nx.equal(Nx.iota(shape, backend: Nx.BinaryBackend) |> Nx.remainder(5), 0)

      Nx.select(
        zero,
        Nx.tensor(Complex.new(0.0, 0.0), backend: Nx.BinaryBackend),
        Nx.complex(re, im)
      )
    end

    test "arithmetic, division and comparisons with broadcasting" do
      for {sa, sb} <- @shapes, op <- [:add, :subtract, :multiply, :divide, :equal, :not_equal] do
        a = random_c64(sa)
        # Non-zero divisors.
        b = Nx.add(random_c64(sb), Nx.tensor(Complex.new(0.0, 0.25), backend: Nx.BinaryBackend))
        got = NxMlx.TestHelpers.assert_native(fn -> apply(Nx, op, [mlx(a), mlx(b)]) end)
        assert_same(got, apply(Nx, op, [a, b]), 2.0e-6, "#{op} c64 #{inspect({sa, sb})}")
      end
    end

    test "division by zero gives NaN+NaNi, as in Nx" do
      a =
        Nx.tensor([Complex.new(1, 0), Complex.new(0, 1), Complex.new(2, -3)],
          backend: Nx.BinaryBackend
        )

      for b <- [
            Nx.tensor(Complex.new(0, 0), backend: Nx.BinaryBackend),
            Nx.tensor(0.0, backend: Nx.BinaryBackend)
          ] do
        got = NxMlx.TestHelpers.assert_native(fn -> Nx.divide(mlx(a), mlx(b)) end)
        assert Nx.to_binary(got) == Nx.to_binary(Nx.divide(a, b))
        assert Enum.all?(Nx.to_flat_list(got), &match?(%Complex{re: :nan, im: :nan}, &1))
      end
    end

    test "negate, abs, sign, conjugate, real, imag and the functions MLX agrees with Nx on" do
      z = random_c64({6, 5})

      for op <-
            [:negate, :abs, :conjugate, :real, :imag] ++
              [:exp, :log, :log1p, :cos, :sin, :tan, :cosh, :sinh, :tanh, :sqrt] do
        # log of 0 is -Inf+0i on both; all_close compares infinities for equality.
        got = NxMlx.TestHelpers.assert_native(fn -> apply(Nx, op, [mlx(z)]) end)
        assert_same(got, apply(Nx, op, [z]), 2.0e-6, "#{op} c64")
      end

      # sign is z / |z| (0 at 0), as in EXLA: Nx 0.13.1's Nx.BinaryBackend answers 1 for
      # every complex number.
      magnitude = Nx.abs(z)
      zero = Nx.equal(magnitude, 0)
      expected = Nx.select(zero, 0, Nx.divide(z, Nx.select(zero, 1, magnitude)))
      got = NxMlx.TestHelpers.assert_native(fn -> Nx.sign(mlx(z)) end)
      assert_same(got, expected, 2.0e-6, "sign c64")
    end

    test "functions whose branch cuts differ from Nx's fall back" do
      z = mlx(random_c64({4}))

      for op <- [:acos, :asin, :atan, :acosh, :asinh, :atanh, :rsqrt, :expm1, :sigmoid] do
        assert {_, [^op]} = NxMlx.TestHelpers.with_fallbacks(fn -> apply(Nx, op, [z]) end)
      end
    end
  end

  describe "ternary ops and conversions" do
    test "clip, with NaN clipped to the minimum as in Nx" do
      for type <- NxMlx.TestHelpers.device_types([{:f, 32}, {:f, 64}, {:s, 32}, {:u, 8}]),
          shape <- [{3, 4}, {}] do
        t = random(shape, type)
        lo = Nx.tensor(1, type: type, backend: Nx.BinaryBackend)
        hi = Nx.tensor(50, type: type, backend: Nx.BinaryBackend)

        assert_same(
          Nx.clip(mlx(t), mlx(lo), mlx(hi)),
          Nx.clip(t, lo, hi),
          0,
          "clip #{inspect(type)}"
        )
      end
    end

    test "select broadcasts its predicate and branches" do
      for type <- NxMlx.TestHelpers.device_types([{:f, 32}, {:s, 64}, {:u, 16}]) do
        pred = random({3, 4}, {:u, 8}, range: 0..1)
        a = random({4}, type)
        b = random({}, type)

        assert_same(
          Nx.select(mlx(pred), mlx(a), mlx(b)),
          Nx.select(pred, a, b),
          0,
          "select #{inspect(type)}"
        )
      end
    end

    test "as_type between every pair of types" do
      for from <- @float_types ++ @int_types, to <- @float_types ++ @int_types do
        t = random({4, 4}, from, finite: false)
        # Out-of-range finite floats are undefined in C; Nx wraps them. Keep floats in range.
        t =
          if elem(from, 0) in [:f, :bf] and elem(to, 0) in [:s, :u],
            do: Nx.clip(t, 0, 100),
            else: t

        assert_same(
          Nx.as_type(mlx(t), to),
          Nx.as_type(t, to),
          rtol(to, :arith),
          "#{inspect(from)} -> #{inspect(to)}"
        )
      end
    end

    test "as_type maps non-finite floats to 0 and the integer extremes" do
      t = Nx.tensor([:nan, :infinity, :neg_infinity, 1.5], backend: Nx.BinaryBackend)

      for to <- @int_types do
        assert_same(Nx.as_type(mlx(t), to), Nx.as_type(t, to), 0, "non-finite -> #{inspect(to)}")
      end
    end
  end
end
