defmodule NxMlx.OracleShapeTest do
  # Creation and structural ops on NxMlx.Backend against Nx.BinaryBackend (exact: they move
  # values without arithmetic), on seeded random inputs.
  use ExUnit.Case, async: true

  import NxMlx.TestHelpers

  @mlx {NxMlx.Backend, device: NxMlx.TestHelpers.oracle_device()}
  @types NxMlx.TestHelpers.device_types([{:f, 32}, {:s, 64}, {:u, 8}, {:bf, 16}, {:f, 64}])

  setup do
    :rand.seed(:exsss, {3, 5, 8})
    :ok
  end

  defp random(shape, type) do
    n = Tuple.product(shape)
    values = for _ <- 1..n, do: :rand.uniform(200) - 50

    Nx.tensor(values, type: {:s, 64}, backend: Nx.BinaryBackend)
    |> Nx.reshape(shape)
    |> Nx.as_type(type)
  end

  defp mlx(t), do: Nx.backend_copy(t, @mlx)

  # `got_fun` must compute its result without falling back (except for `allowed` ops).
  defp assert_same(got_fun, %Nx.Tensor{} = expected, context, allowed \\ []) do
    got = assert_native(got_fun, allowed)
    assert %NxMlx.Backend{} = got.data, "#{context}: not on NxMlx.Backend"

    assert {got.type, got.shape, got.names} == {expected.type, expected.shape, expected.names},
           context

    assert Nx.to_binary(got) == Nx.to_binary(expected),
           "#{context}\n#{inspect(got)}\n#{inspect(expected)}"
  end

  test "iota and eye for every axis and type" do
    for type <- @types,
        shape <- [{5}, {2, 3, 4}, {}],
        axis <- [nil | Enum.to_list(0..(tuple_size(shape) - 1)//1)] do
      assert_same(
        fn -> Nx.iota(shape, type: type, axis: axis, backend: @mlx) end,
        Nx.iota(shape, type: type, axis: axis, backend: Nx.BinaryBackend),
        "iota #{inspect(shape)} #{inspect(type)} axis #{inspect(axis)}"
      )
    end

    for type <- @types, shape <- [{3, 3}, {2, 4}, {2, 3, 5}] do
      assert_same(
        fn -> Nx.eye(shape, type: type, backend: @mlx) end,
        Nx.eye(shape, type: type, backend: Nx.BinaryBackend),
        "eye #{inspect(shape)}"
      )
    end
  end

  test "concatenate and stack with mixed types on every axis" do
    for axis <- 0..2, type <- @types do
      a = random({2, 3, 4}, type)
      b = random({2, 3, 4}, {:s, 32})
      a2 = Nx.slice_along_axis(a, 0, 1, axis: axis)

      assert_same(
        fn -> Nx.concatenate([mlx(a), mlx(b), mlx(a2)], axis: axis) end,
        Nx.concatenate([a, b, a2], axis: axis),
        "concatenate axis #{axis}"
      )

      assert_same(
        fn -> Nx.stack([mlx(a), mlx(b)], axis: axis) end,
        Nx.stack([a, b], axis: axis),
        "stack axis #{axis}"
      )
    end
  end

  test "slice with strides, clamped starts and tensor starts" do
    t = random({6, 7, 5}, {:f, 32})

    for _ <- 1..30 do
      lengths = [Enum.random(1..6), Enum.random(1..7), Enum.random(1..5)]
      starts = Enum.map(lengths, fn _ -> Enum.random(-3..9) end)
      strides = Enum.map(lengths, fn _ -> Enum.random(1..3) end)

      assert_same(
        fn -> Nx.slice(mlx(t), starts, lengths, strides: strides) end,
        Nx.slice(t, starts, lengths, strides: strides),
        "slice #{inspect({starts, lengths, strides})}"
      )
    end

    starts = [Nx.tensor(4), 1, Nx.tensor(-2)]

    assert_same(
      fn -> Nx.slice(mlx(t), starts, [3, 2, 2]) end,
      Nx.slice(t, starts, [3, 2, 2]),
      "tensor starts"
    )
  end

  test "put_slice with clamped starts and type conversion" do
    for _ <- 1..20, type <- [{:f, 32}, {:s, 32}] do
      t = random({5, 6}, type)
      update = random({Enum.random(1..5), Enum.random(1..6)}, {:s, 16})
      starts = [Enum.random(-2..7), Enum.random(-2..7)]

      assert_same(
        fn -> Nx.put_slice(mlx(t), starts, mlx(update)) end,
        Nx.put_slice(t, starts, update),
        "put_slice #{inspect(starts)}"
      )
    end
  end

  test "pad with positive and negative amounts, and interior padding (all native)" do
    t = random({4, 5}, {:f, 32})
    value = Nx.tensor(-7.0)

    for config <- [
          [{1, 2, 0}, {0, 3, 0}],
          [{-1, 2, 0}, {2, -2, 0}],
          [{-2, -1, 0}, {0, 0, 0}],
          [{1, 0, 1}, {0, 1, 2}],
          [{-3, 1, 2}, {2, -4, 1}]
        ] do
      assert_same(
        fn -> Nx.pad(mlx(t), mlx(value), config) end,
        Nx.pad(t, value, config),
        "pad #{inspect(config)}",
        []
      )
    end
  end

  test "pad on random shapes, configurations, pad values and types" do
    # The output type is Nx's (binary_type of the tensor and the pad value: f16 padded with
    # :nan is f32). The reference pads the input converted to it: Nx.BinaryBackend's own pad
    # keeps the input's type (see "Divergences").
    types = device_types([{:u, 8}, {:s, 16}, {:s, 64}, {:f, 16}, {:bf, 16}, {:f, 32}, {:f, 64}])
    values = [:nan, :infinity, -0.0, 1.5, 7, -3, 300, Nx.tensor(5, type: :f16)]

    for _ <- 1..60 do
      shape = List.to_tuple(for _ <- 1..Enum.random(1..3), do: Enum.random(1..4))
      type = Enum.random(types)
      value = Enum.random(values)

      config =
        for d <- Tuple.to_list(shape) do
          {lo, hi} = Enum.random([{Enum.random(0..2), Enum.random(0..2)}, {-1, 1}, {1, -1}])
          interior = Enum.random([0, 0, 0, 1])
          if d + (d - 1) * interior + lo + hi > 0, do: {lo, hi, interior}, else: {0, 0, interior}
        end

      t = random(shape, type)
      out_type = Nx.add(t, value).type
      context = "pad #{inspect(type)} #{inspect(shape)} #{inspect(config)} #{inspect(value)}"

      # Nx.BinaryBackend's pad fails on some mixes of negative and positive amounts.
      case (try do
              {:ok, Nx.pad(Nx.as_type(t, out_type), value, config)}
            rescue
              _ -> :reference_failed
            end) do
        {:ok, expected} ->
          got = Nx.pad(mlx(t), value, config)
          assert {got.type, got.shape} == {expected.type, expected.shape}, context
          assert Nx.to_binary(got) == Nx.to_binary(expected), context

        :reference_failed ->
          :ok
      end
    end
  end

  test "to_binary with a limit reads the leading elements of any layout" do
    for shape <- [{7}, {3, 4}, {2, 3, 4}, {1, 1, 5}, {5, 1, 1}, {2, 1, 3, 2}],
        limit <- [0, 1, 2, 3, 5, 8, 13, 21, 48, 49] do
      t = random(shape, {:s, 32})
      last = elem(shape, tuple_size(shape) - 1)
      broadcast = Nx.broadcast(random({last}, {:s, 32}), shape)

      for x <- [t, Nx.transpose(t), broadcast] do
        got = x |> mlx() |> Nx.to_binary(limit: limit)
        assert got == Nx.to_binary(x, limit: limit), "#{inspect(shape)} limit #{limit}"
      end
    end

    v = Nx.vectorize(random({2, 3, 4}, {:u, 8}), :x)

    for limit <- 0..25 do
      assert Nx.to_binary(mlx(v), limit: limit) == Nx.to_binary(v, limit: limit)
    end
  end

  test "reverse on any set of axes" do
    t = random({3, 4, 2}, {:s, 32})

    for axes <- [[0], [1], [2], [0, 2], [0, 1, 2]] do
      assert_same(
        fn -> Nx.reverse(mlx(t), axes: axes) end,
        Nx.reverse(t, axes: axes),
        "reverse #{inspect(axes)}"
      )
    end
  end

  describe "arg-reductions and sorting" do
    # Values with many ties (and, for floats, NaN and infinities).
    defp with_ties(shape, type) do
      n = Tuple.product(shape)

      values =
        for _ <- 1..n do
          case {elem(type, 0), :rand.uniform(8)} do
            {:f, 1} -> :nan
            {:f, 2} -> Enum.random([:infinity, :neg_infinity])
            _ -> :rand.uniform(4) - 2
          end
        end

      Nx.tensor(values, type: type, backend: Nx.BinaryBackend) |> Nx.reshape(shape)
    end

    test "argmax and argmin with axes, keep_axis and both tie breaks" do
      for type <- NxMlx.TestHelpers.device_types([{:f, 32}, {:s, 32}, {:u, 8}, {:f, 64}]),
          _ <- 1..3 do
        t =
          with_ties(
            {4, 5, 3},
            Nx.Type.normalize!(type)
            |> then(fn {k, s} -> if k == :u, do: {:s, s * 2}, else: {k, s} end)
          )

        for fun <- [:argmax, :argmin],
            axis <- [nil, 0, 1, 2],
            tie <- [:low, :high],
            keep <- [false, true],
            axis != nil or not keep do
          opts =
            [axis: axis, tie_break: tie, keep_axis: keep] |> Enum.reject(&(elem(&1, 1) == nil))

          assert_same(
            fn -> apply(Nx, fun, [mlx(t), opts]) end,
            apply(Nx, fun, [t, opts]),
            "#{fun} #{inspect(t.type)} #{inspect(opts)}"
          )
        end
      end
    end

    test "sort and argsort in both directions, stable on ties, NaN ordered as in Nx" do
      for type <- NxMlx.TestHelpers.device_types([{:f, 32}, {:s, 64}, {:f, 64}, {:s, 8}]),
          _ <- 1..3 do
        t = with_ties({5, 6}, type)

        for axis <- [0, 1], dir <- [:asc, :desc] do
          opts = [axis: axis, direction: dir]

          assert_same(
            fn -> Nx.sort(mlx(t), opts) end,
            Nx.sort(t, opts),
            "sort #{inspect(type)} #{inspect(opts)}"
          )

          assert_same(
            fn -> Nx.argsort(mlx(t), opts ++ [stable: true]) end,
            Nx.argsort(t, opts ++ [stable: true]),
            "argsort #{inspect(type)} #{inspect(opts)}"
          )
        end
      end
    end
  end

  describe "indexing" do
    test "gather on any axes, with batch dimensions and scalar index rows" do
      t = random({4, 5, 3}, {:f, 32})

      for axes <- [[0], [1], [2], [0, 2], [1, 2], [0, 1, 2]], batch <- [{}, {6}, {2, 3}] do
        k = length(axes)

        rows =
          for _ <- 1..max(Tuple.product(batch), 1) do
            Enum.map(axes, fn axis -> :rand.uniform(elem(t.shape, axis)) - 1 end)
          end

        indices =
          Nx.tensor(rows, backend: Nx.BinaryBackend)
          |> Nx.reshape(Tuple.insert_at(batch, tuple_size(batch), k))

        assert_same(
          fn -> Nx.gather(mlx(t), mlx(indices), axes: axes) end,
          Nx.gather(t, indices, axes: axes),
          "gather axes #{inspect(axes)} batch #{inspect(batch)}"
        )
      end
    end

    test "take and take_along_axis (built on gather by Nx)" do
      t = random({5, 4}, {:s, 32})
      idx = Nx.tensor([[4, 0], [1, 1], [3, 2]], backend: Nx.BinaryBackend)

      for axis <- [0, 1] do
        i = if axis == 1, do: Nx.remainder(idx, 4), else: idx

        assert_same(
          fn -> Nx.take(mlx(t), mlx(i), axis: axis) end,
          Nx.take(t, i, axis: axis),
          "take axis #{axis}"
        )
      end

      along = Nx.tensor([[0, 3, 1, 2], [4, 4, 0, 1]], backend: Nx.BinaryBackend)

      assert_same(
        fn -> Nx.take_along_axis(mlx(t), mlx(along), axis: 0) end,
        Nx.take_along_axis(t, along, axis: 0),
        "take_along_axis"
      )
    end

    @tag :no_debug_checks
    test "out-of-bounds gather indices are clamped instead of reading outside the tensor" do
      t = Nx.iota({3, 4}, backend: @mlx)
      got = Nx.gather(t, Nx.tensor([[5, -2], [1, 9]], backend: @mlx), axes: [0, 1])
      assert Nx.to_flat_list(got) == [Nx.to_number(t[2][0]), Nx.to_number(t[1][3])]
    end
  end

  describe "scatter" do
    test "indexed_add and indexed_put on any axes, with duplicate indices" do
      t = random({4, 5, 3}, {:f, 32})

      for axes <- [[0], [1], [0, 2], [0, 1, 2]], fun <- [:indexed_add, :indexed_put] do
        rows =
          for _ <- 1..7, do: Enum.map(axes, fn axis -> :rand.uniform(elem(t.shape, axis)) - 1 end)

        # Duplicates: the last row repeats the first, with the same update for puts. Other
        # repeated rows are dropped for puts: their order is unspecified on the GPU.
        rows = if fun == :indexed_put, do: Enum.uniq(rows), else: rows
        rows = rows ++ [hd(rows)]
        indices = Nx.tensor(rows, backend: Nx.BinaryBackend)

        update_shape =
          List.to_tuple([
            length(rows)
            | for({d, i} <- Enum.with_index(Tuple.to_list(t.shape)), i not in axes, do: d)
          ])

        updates = random(update_shape, {:s, 32})
        # Duplicate puts are deterministic only with equal values.
        updates =
          if fun == :indexed_put,
            do:
              Nx.put_slice(
                updates,
                [length(rows) - 1 | List.duplicate(0, tuple_size(update_shape) - 1)],
                Nx.slice_along_axis(updates, 0, 1, axis: 0)
              ),
            else: updates

        assert_same(
          fn -> apply(Nx, fun, [mlx(t), mlx(indices), mlx(updates), [axes: axes]]) end,
          apply(Nx, fun, [t, indices, updates, [axes: axes]]),
          "#{fun} axes #{inspect(axes)}"
        )
      end
    end

    @tag :no_debug_checks
    test "out-of-bounds rows write nothing (Nx.BinaryBackend raises)" do
      t = Nx.iota({3, 2}, type: :f32, backend: @mlx)
      indices = Nx.tensor([[0], [7], [-1], [2]], backend: @mlx)
      updates = Nx.tensor([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0], [40.0, 40.0]], backend: @mlx)

      assert Nx.to_flat_list(Nx.indexed_add(t, indices, updates)) == [
               10.0,
               11.0,
               2.0,
               3.0,
               44.0,
               45.0
             ]

      assert Nx.to_flat_list(Nx.indexed_put(t, indices, updates)) == [
               10.0,
               10.0,
               2.0,
               3.0,
               40.0,
               40.0
             ]
    end
  end

  describe "window reductions" do
    test "sum, product, max and min with padding, strides and dilations" do
      t = random({5, 6, 4}, {:f, 32})
      ti = random({5, 6, 4}, {:s, 32})

      configs = [
        {{2, 2, 1}, []},
        {{3, 2, 2}, [strides: [2, 1, 2]]},
        {{2, 3, 1}, [padding: :same]},
        {{2, 2, 2}, [padding: [{1, 0}, {0, 2}, {1, 1}], strides: [1, 2, 1]]},
        {{2, 2, 1}, [window_dilations: [2, 3, 1], padding: :valid]}
      ]

      for {dims, opts} <- configs,
          fun <- [:window_sum, :window_max, :window_min, :window_product],
          x <- [t, ti] do
        x = if fun == :window_product, do: Nx.divide(x, 40), else: x

        expected = apply(Nx, fun, [x, dims, opts])
        got = assert_native(fn -> apply(Nx, fun, [mlx(x), dims, opts]) end)
        assert got.shape == expected.shape and got.type == expected.type

        close =
          Nx.all_close(Nx.backend_copy(got, Nx.BinaryBackend), expected,
            rtol: 1.0e-5,
            atol: 1.0e-5
          )

        assert Nx.to_number(close) == 1,
               "#{fun} #{inspect(dims)} #{inspect(opts)}\n#{inspect(got)}\n#{inspect(expected)}"
      end
    end
  end

  describe "window reductions on random inputs" do
    test "every integer and float type, strides, dilations and padding modes" do
      types =
        device_types([
          {:u, 8},
          {:u, 16},
          {:u, 32},
          {:s, 8},
          {:s, 16},
          {:s, 64},
          {:f, 16},
          {:bf, 16},
          {:f, 32},
          {:f, 64}
        ])

      for _ <- 1..150 do
        shape = List.to_tuple(for _ <- 1..Enum.random(1..3), do: Enum.random(1..6))
        dims = Tuple.to_list(shape)
        window = List.to_tuple(for d <- dims, do: Enum.random(1..min(d, 3)))
        dilations = for {d, w} <- Enum.zip(dims, Tuple.to_list(window)), do: dilation(d, w)

        padding =
          Enum.random([:same, :valid, for(_ <- dims, do: {Enum.random(0..2), Enum.random(0..2)})])

        opts = [
          strides: for(_ <- dims, do: Enum.random(1..3)),
          padding: padding,
          window_dilations: dilations
        ]

        type = Enum.random(types)
        fun = Enum.random([:window_sum, :window_product, :window_max, :window_min])
        x = random(shape, type)
        # Products of up to 27 values stay within f16 and bf16.
        x =
          if fun == :window_product and elem(type, 0) in [:f, :bf], do: Nx.divide(x, 64), else: x

        context = "#{fun} #{inspect(type)} #{inspect(shape)} #{inspect(window)} #{inspect(opts)}"

        expected = apply(Nx, fun, [x, window, opts])
        got = assert_native(fn -> apply(Nx, fun, [mlx(x), window, opts]) end)
        assert {got.type, got.shape} == {expected.type, expected.shape}, context

        case expected.type do
          {kind, _} when kind in [:s, :u] ->
            assert Nx.to_binary(got) == Nx.to_binary(expected), context

          {_, bits} ->
            tol = if bits == 16, do: 3.0e-2, else: 1.0e-5
            got_b = Nx.backend_copy(got, Nx.BinaryBackend)
            close = Nx.all_close(got_b, expected, rtol: tol, atol: tol)
            assert Nx.to_number(close) == 1, "#{context}\n#{inspect(got_b)}\n#{inspect(expected)}"
        end
      end
    end
  end

  # A window dilation that keeps the dilated window within the axis.
  defp dilation(dim, window) when window > 1 and dim >= 2 * window - 1, do: Enum.random(1..2)
  defp dilation(_dim, _window), do: 1

  describe "complex parts and bitcast" do
    test "real, imag and conjugate of c64; bitcast keeps the bits" do
      c = Nx.complex(random({3, 2}, {:f, 32}), random({3, 2}, {:f, 32}))

      for fun <- [:real, :imag, :conjugate] do
        assert_same(fn -> apply(Nx, fun, [mlx(c)]) end, apply(Nx, fun, [c]), "#{fun}")
      end

      f = random({4, 3}, {:f, 32})
      assert_same(fn -> Nx.bitcast(mlx(f), :s32) end, Nx.bitcast(f, :s32), "bitcast f32 -> s32")
      i = random({4}, {:s, 16})
      assert_same(fn -> Nx.bitcast(mlx(i), :u16) end, Nx.bitcast(i, :u16), "bitcast s16 -> u16")
    end
  end

  describe "blocks" do
    test "cumulative sum, product, max and min on any axis, both directions" do
      for type <- NxMlx.TestHelpers.device_types([{:f, 32}, {:s, 32}, {:u, 8}, {:f, 64}]),
          fun <- [:cumulative_sum, :cumulative_product, :cumulative_max, :cumulative_min],
          axis <- [0, 1, 2],
          reverse <- [false, true] do
        t = with_ties({3, 4, 2}, if(type == {:u, 8}, do: {:s, 16}, else: type))
        t = if type == {:u, 8}, do: Nx.as_type(Nx.abs(t), :u8), else: t
        # Products of NaN/infinity are compared too; keep the magnitudes small.
        opts = [axis: axis, reverse: reverse]
        expected = apply(Nx, fun, [t, opts])
        got = assert_native(fn -> apply(Nx, fun, [mlx(t), opts]) end)
        assert got.type == expected.type and got.shape == expected.shape

        close =
          Nx.all_close(Nx.backend_copy(got, Nx.BinaryBackend), expected, equal_nan: true)

        assert Nx.to_number(close) == 1,
               "#{fun} #{inspect(type)} #{inspect(opts)}\n#{inspect(got)}\n#{inspect(expected)}"
      end
    end
  end

  test "logical_not runs as a native block" do
    for type <- NxMlx.TestHelpers.device_types([{:f, 32}, {:s, 64}, {:u, 8}]) do
      t = with_ties({4, 3}, if(type == {:u, 8}, do: {:s, 16}, else: type))
      t = if type == {:u, 8}, do: Nx.as_type(Nx.abs(t), :u8), else: t

      assert_same(
        fn -> Nx.logical_not(mlx(t)) end,
        Nx.logical_not(t),
        "logical_not #{inspect(type)}"
      )
    end
  end

  describe "convolution" do
    test "1-d to 3-d, with strides, padding, dilations, groups and layouts" do
      configs = [
        {{2, 3, 9}, {4, 3, 3}, []},
        {{2, 3, 9}, {4, 3, 2}, [strides: [2], padding: [{1, 2}]]},
        {{1, 4, 7, 6}, {6, 2, 3, 2}, [feature_group_size: 2, padding: :same]},
        {{2, 2, 6, 5}, {3, 2, 2, 2},
         [kernel_dilation: [2, 1], input_dilation: [1, 2], strides: [1, 2]]},
        {{1, 2, 4, 4, 3}, {2, 2, 2, 2, 2}, [padding: :valid]},
        {{2, 5, 5, 3}, {4, 3, 3, 3},
         [input_permutation: [0, 3, 1, 2], output_permutation: [0, 3, 1, 2]]}
      ]

      for {{ts, ks, opts}, i} <- Enum.with_index(configs) do
        t = Nx.divide(random(ts, {:f, 32}), 50)
        k = Nx.divide(random(ks, {:f, 32}), 50)
        expected = Nx.conv(t, k, opts)
        # Input dilation falls back on the GPU (MLX's CUDA convolution gets it wrong).
        allowed =
          if NxMlx.TestHelpers.oracle_device() == :gpu and opts[:input_dilation],
            do: [:conv],
            else: []

        got = assert_native(fn -> Nx.conv(mlx(t), mlx(k), opts) end, allowed)
        assert got.shape == expected.shape, "config #{i}"

        close =
          Nx.all_close(Nx.backend_copy(got, Nx.BinaryBackend), expected,
            rtol: 1.0e-4,
            atol: 1.0e-5
          )

        assert Nx.to_number(close) == 1,
               "config #{i} #{inspect(opts)}\n#{inspect(got)}\n#{inspect(expected)}"
      end
    end

    @tag :f64
    test "batch groups and f64 fall back" do
      t = Nx.divide(random({4, 2, 5}, {:f, 64}), 10)
      k = Nx.divide(random({2, 2, 2}, {:f, 64}), 10)
      expected = Nx.conv(t, k, [])
      got = assert_native(fn -> Nx.conv(mlx(t), mlx(k), []) end, [:conv])
      assert Nx.to_number(Nx.all_close(Nx.backend_copy(got, Nx.BinaryBackend), expected)) == 1
    end
  end

  describe "fourier transforms" do
    test "fft and ifft with padding, truncation and eps, on real and complex input" do
      real = Nx.divide(random({3, 6}, {:f, 32}), 10)
      complex = Nx.complex(real, Nx.divide(random({3, 6}, {:f, 32}), 10))

      for t <- [real, complex], fun <- [:fft, :ifft], length <- [6, 4, 9], eps <- [nil, 1.0e-3] do
        opts = Enum.reject([length: length, eps: eps], &(elem(&1, 1) == nil))
        expected = apply(Nx, fun, [t, opts])
        got = assert_native(fn -> apply(Nx, fun, [mlx(t), opts]) end)
        assert got.shape == expected.shape and got.type == expected.type

        close =
          Nx.all_close(Nx.backend_copy(got, Nx.BinaryBackend), expected,
            rtol: 1.0e-4,
            atol: 1.0e-4
          )

        assert Nx.to_number(close) == 1,
               "#{fun} #{inspect(opts)}\n#{inspect(got)}\n#{inspect(expected)}"
      end
    end
  end
end
