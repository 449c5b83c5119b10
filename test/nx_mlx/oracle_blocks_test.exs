defmodule NxMlx.OracleBlocksTest do
  # The block/4 kernels and to_batched on NxMlx.Backend against Nx.BinaryBackend, on seeded
  # random inputs. Tolerance: transforms rtol/atol 1.0e-4 (f32 FFTs of up to 16 points sum
  # that many rounded terms), phase 1.0e-6; all_close, top_k, take, take_along_axis and to_batched exact.
  #
  # Transforms are checked against DFT matrices applied with Nx.dot on Nx.BinaryBackend: Nx
  # 0.13.1's Nx.BinaryBackend.fft is wrong along a non-last axis of a rank-3 tensor (e.g.
  # fft(axis: 0) of a {2, 3, 5} tensor does not give t[0] + t[1] in row 0).
  use ExUnit.Case, async: true

  import NxMlx.TestHelpers

  @mlx {NxMlx.Backend, device: NxMlx.TestHelpers.oracle_device()}

  setup do
    :rand.seed(:exsss, {13, 21, 34})
    :ok
  end

  defp random(shape, type \\ {:f, 32}) do
    n = Tuple.product(shape)
    values = for _ <- 1..n, do: :rand.uniform() * 4 - 2

    Nx.tensor(values, type: {:f, 32}, backend: Nx.BinaryBackend)
    |> Nx.reshape(shape)
    |> Nx.as_type(type)
  end

  defp random_complex(shape) do
    Nx.complex(random(shape), random(shape))
  end

  defp mlx(t), do: Nx.backend_copy(t, @mlx)

  # The DFT (or inverse DFT, scaled by 1/n) of `t` along `axis` with `n` points, zero-padding
  # or truncating: a dot product with the DFT matrix, on Nx.BinaryBackend.
  defp dft(t, axis, n, inverse? \\ false) do
    t = Nx.as_type(t, {:c, 64})
    size = elem(t.shape, axis)

    t =
      if size >= n,
        do: Nx.slice_along_axis(t, 0, n, axis: axis),
        else:
          Nx.pad(
            t,
            0,
            Enum.map(0..(Nx.rank(t) - 1), &if(&1 == axis, do: {0, n - size, 0}, else: {0, 0, 0}))
          )

    k = Nx.iota({n, 1}, backend: Nx.BinaryBackend)
    j = Nx.iota({1, n}, backend: Nx.BinaryBackend)
    sign = if inverse?, do: 1, else: -1
    angle = Nx.multiply(Nx.multiply(k, j), sign * 2 * :math.pi() / n)
    w = Nx.complex(Nx.cos(angle), Nx.sin(angle))
    w = if inverse?, do: Nx.divide(w, n), else: w
    r = Nx.dot(w, [1], t, [axis])
    # The transformed axis came out first: move it back.
    perm = Enum.to_list(1..(Nx.rank(t) - 1)//1) |> List.insert_at(axis, 0)
    Nx.transpose(r, axes: perm)
  end

  defp assert_close(got_fun, expected, context, tol) do
    got = assert_native(got_fun)
    assert %NxMlx.Backend{} = got.data, context
    assert {got.type, got.shape} == {expected.type, expected.shape}, context
    got_b = Nx.backend_copy(got, Nx.BinaryBackend)

    assert Nx.to_number(Nx.all_close(got_b, expected, rtol: tol, atol: tol)) == 1,
           "#{context}\n#{inspect(got_b)}\n#{inspect(expected)}"
  end

  test "fft2 and ifft2 over any two axes, padding and truncating" do
    for shape <- [{4, 4}, {2, 3, 5}, {3, 8, 2}],
        axes <- [[0, 1], [1, 2], [0, 2], [-2, -1]],
        Enum.all?(axes, &(&1 < tuple_size(shape))),
        lengths <- [nil, [4, 4], [2, 6]],
        fun <- [:fft2, :ifft2] do
      t = random_complex(shape)
      opts = [axes: axes] ++ if(lengths, do: [lengths: lengths], else: [])
      [a1, a2] = Enum.map(axes, &if(&1 < 0, do: &1 + tuple_size(shape), else: &1))
      [l1, l2] = lengths || [elem(shape, a1), elem(shape, a2)]
      expected = t |> dft(a2, l2, fun == :ifft2) |> dft(a1, l1, fun == :ifft2)

      assert_close(
        fn -> apply(Nx, fun, [mlx(t), opts]) end,
        expected,
        "#{fun} #{inspect(shape)} #{inspect(opts)}",
        1.0e-4
      )
    end
  end

  test "rfft and irfft of even and odd lengths, on every axis" do
    for shape <- [{8}, {3, 7}, {2, 6, 3}],
        axis <- Enum.to_list(0..(tuple_size(shape) - 1)),
        length <- [nil, 5, 8] do
      t = random(shape)
      n = length || elem(shape, axis)
      opts = [axis: axis] ++ if(length, do: [length: length], else: [])
      expected = t |> dft(axis, n) |> Nx.slice_along_axis(0, div(n, 2) + 1, axis: axis)
      assert_close(fn -> Nx.rfft(mlx(t), opts) end, expected, "rfft #{inspect(opts)}", 1.0e-4)

      # irfft inverts rfft for any signal length.
      spectrum = Nx.rfft(mlx(t), axis: axis)
      back = assert_native(fn -> Nx.irfft(spectrum, axis: axis, length: elem(shape, axis)) end)
      assert_close(fn -> back end, t, "irfft round trip #{inspect(shape)} axis #{axis}", 1.0e-4)

      # Against Nx.BinaryBackend on the last axis (where its fft is right), default and
      # explicit lengths.
      if axis == tuple_size(shape) - 1 do
        spectrum = Nx.rfft(t, axis: axis)

        for irfft_opts <- [[length: n]] do
          assert_close(
            fn -> Nx.irfft(mlx(spectrum), irfft_opts) end,
            Nx.irfft(spectrum, irfft_opts),
            "irfft #{inspect(shape)} #{inspect(irfft_opts)}",
            1.0e-4
          )
        end
      end
    end
  end

  test "rfft of integer and f16 inputs" do
    for type <- [{:s, 32}, {:f, 16}] do
      t = Nx.as_type(Nx.multiply(random({6}), 10), type)
      expected = t |> dft(0, 6) |> Nx.slice_along_axis(0, 4, axis: 0)
      assert_close(fn -> Nx.rfft(mlx(t)) end, expected, "rfft #{inspect(type)}", 1.0e-2)
    end
  end

  test "phase of complex values, including zeros and axes" do
    t = random_complex({3, 5})

    special =
      Nx.tensor([
        Complex.new(0, 0),
        Complex.new(-1, 0),
        Complex.new(0, -2),
        Complex.new(-1, -0.0)
      ])

    for x <- [t, special] do
      assert_close(fn -> Nx.phase(mlx(x)) end, Nx.phase(x), "phase #{inspect(x.shape)}", 1.0e-6)
    end
  end

  test "all_close with infinities, NaN, tolerances and mixed types" do
    nan = :nan
    inf = :infinity
    neg = :neg_infinity

    cases = [
      {[1.0, 2.0, 3.0], [1.0, 2.0, 3.000001], []},
      {[1.0, 2.0, 3.0], [1.0, 2.0, 3.1], []},
      {[1.0, 2.0, 3.0], [1.0, 2.0, 3.1], [atol: 0.2]},
      {[1.0, inf, 3.0], [1.0, inf, 3.0], []},
      {[1.0, inf, 3.0], [1.0, neg, 3.0], []},
      {[1.0, 2.0, 3.0], [1.0, inf, 3.0], [rtol: 1.0e10]},
      {[1.0, nan, 3.0], [1.0, nan, 3.0], []},
      {[1.0, nan, 3.0], [1.0, nan, 3.0], [equal_nan: true]},
      {[1.0, nan, 3.0], [1.0, 2.0, 3.0], [equal_nan: true]}
    ]

    for {a, b, opts} <- cases, type <- [{:f, 32}, {:bf, 16}] do
      ta = Nx.tensor(a, type: type, backend: Nx.BinaryBackend)
      tb = Nx.tensor(b, type: {:f, 32}, backend: Nx.BinaryBackend)
      expected = Nx.all_close(ta, tb, opts)
      got = assert_native(fn -> Nx.all_close(mlx(ta), mlx(tb), opts) end)
      assert %NxMlx.Backend{} = got.data

      assert Nx.to_binary(got) == Nx.to_binary(expected),
             "all_close #{inspect(a)} #{inspect(b)} #{inspect(opts)}"
    end

    # Broadcasting, and an integer tensor against a float one.
    ints = Nx.tensor([[1, 2], [3, 4]], backend: Nx.BinaryBackend)
    floats = Nx.tensor([[1.0, 2.0000001]], backend: Nx.BinaryBackend)

    assert Nx.to_binary(assert_native(fn -> Nx.all_close(mlx(ints), mlx(floats)) end)) ==
             Nx.to_binary(Nx.all_close(ints, floats))
  end

  # Calls the kernel straight, with a default function that must not run.
  defp kernel(struct, out, args) do
    ran = fn -> flunk("#{inspect(struct)} ran its default function") end

    no_default =
      case args do
        [_] -> fn _struct, _a -> ran.() end
        [_, _] -> fn _struct, _a, _b -> ran.() end
      end

    NxMlx.Backend.block(struct, out, args, no_default)
  end

  # Nx clamps out-of-bounds indices (Nx.BinaryBackend raises): the reference is computed
  # with the indices clamped beforehand.
  defp clamped(indices, dim), do: Nx.clip(Nx.as_type(indices, {:s, 64}), 0, dim - 1)

  defp random_indices(shape, low, high, type) do
    n = Tuple.product(shape)
    values = for _ <- 1..n, do: low + :rand.uniform(high - low + 1) - 1

    Nx.tensor(values, type: {:s, 64}, backend: Nx.BinaryBackend)
    |> Nx.reshape(shape)
    |> Nx.as_type(type)
  end

  test "take: dedicated kernel, any axis, index shapes and types, out-of-bounds indices clamped" do
    cases = [
      {{4, 9}, 1, {4, 3}},
      {{4, 9}, 0, {6}},
      {{2, 3, 5}, 1, {2, 2}},
      {{2, 3, 5}, 2, {}},
      {{7}, 0, {3, 2, 2}}
    ]

    for {shape, axis, idx_shape} <- cases,
        type <- device_types([{:f, 32}, {:s, 32}, {:bf, 16}, {:u, 8}, {:f, 64}]),
        idx_type <- [{:s, 32}, {:s, 8}, {:u, 8}, {:u, 32}, {:s, 64}, {:u, 64}] do
      t = Nx.as_type(Nx.multiply(random(shape), 50), type)
      dim = elem(shape, axis)
      low = if elem(idx_type, 0) == :u, do: 0, else: -3
      indices = random_indices(idx_shape, low, dim + 3, idx_type)
      expected = Nx.take(t, clamped(indices, dim), axis: axis)

      got = assert_native(fn -> Nx.take(mlx(t), mlx(indices), axis: axis) end)
      assert got.shape == expected.shape and got.type == expected.type

      assert Nx.to_binary(got) == Nx.to_binary(expected),
             "take #{inspect({shape, axis, idx_shape, type, idx_type})}"

      out = %{t | shape: expected.shape, names: expected.names}
      got = kernel(%Nx.Block.Take{axis: axis}, out, [mlx(t), mlx(indices)])
      assert Nx.to_binary(got) == Nx.to_binary(expected)
    end

    # Complex values, names kept by the kernel as Nx names the result.
    t = Nx.reshape(random_complex({3, 4}), {3, 4}, names: [:rows, :cols])
    indices = Nx.tensor([[3, 0], [1, 1]], backend: Nx.BinaryBackend)
    got = assert_native(fn -> Nx.take(mlx(t), mlx(indices), axis: :cols) end)
    expected = Nx.take(t, indices, axis: :cols)
    assert got.names == expected.names and Nx.to_binary(got) == Nx.to_binary(expected)
  end

  test "take_along_axis: dedicated kernel, any axis and index type, out-of-bounds clamped" do
    cases = [{{4, 9}, 1, {4, 5}}, {{4, 9}, 0, {6, 9}}, {{2, 3, 5}, 1, {2, 4, 5}}, {{6}, 0, {6}}]

    for {shape, axis, idx_shape} <- cases,
        type <- device_types([{:f, 32}, {:s, 64}, {:f, 16}, {:f, 64}]),
        idx_type <- [{:s, 32}, {:u, 8}, {:s, 16}, {:u, 64}] do
      t = Nx.as_type(Nx.multiply(random(shape), 50), type)
      dim = elem(shape, axis)
      low = if elem(idx_type, 0) == :u, do: 0, else: -2
      indices = random_indices(idx_shape, low, dim + 2, idx_type)
      expected = Nx.take_along_axis(t, clamped(indices, dim), axis: axis)

      got = assert_native(fn -> Nx.take_along_axis(mlx(t), mlx(indices), axis: axis) end)
      assert got.shape == expected.shape and got.type == expected.type

      assert Nx.to_binary(got) == Nx.to_binary(expected),
             "take_along_axis #{inspect({shape, axis, idx_shape, type, idx_type})}"

      got =
        kernel(%Nx.Block.TakeAlongAxis{axis: axis}, %{t | shape: idx_shape}, [
          mlx(t),
          mlx(indices)
        ])

      assert Nx.to_binary(got) == Nx.to_binary(expected)
    end

    # Vectorized tensors take the same kernel after Nx devectorizes them.
    t = Nx.vectorize(random({2, 3, 4}), :v)
    indices = Nx.tensor([[2, 0], [1, 3], [0, 0]], backend: Nx.BinaryBackend)
    got = assert_native(fn -> Nx.take_along_axis(mlx(t), mlx(indices), axis: 1) end)
    expected = Nx.take_along_axis(t, indices, axis: 1)
    assert got.vectorized_axes == expected.vectorized_axes
    assert Nx.to_binary(got) == Nx.to_binary(expected)
  end

  test "indices of a narrow type reach every position of a longer axis" do
    t = Nx.iota({300}, backend: Nx.BinaryBackend)
    indices = Nx.tensor([200, 5, 255, 0], type: {:u, 8}, backend: Nx.BinaryBackend)
    expected = Nx.to_binary(Nx.take(t, indices))
    assert Nx.to_binary(Nx.take(mlx(t), mlx(indices))) == expected
    assert Nx.to_binary(Nx.gather(mlx(t), mlx(Nx.new_axis(indices, 1)))) == expected

    signed = Nx.tensor([[120], [-5]], type: {:s, 8}, backend: Nx.BinaryBackend)
    expected = Nx.to_binary(Nx.gather(t, Nx.tensor([[120], [0]], backend: Nx.BinaryBackend)))
    assert Nx.to_binary(Nx.gather(mlx(t), mlx(signed))) == expected

    zeros = Nx.broadcast(Nx.tensor(0, backend: Nx.BinaryBackend), {300})
    updates = Nx.tensor([1, 2, 3, 4], backend: Nx.BinaryBackend)
    put = Nx.indexed_put(mlx(zeros), mlx(Nx.new_axis(indices, 1)), mlx(updates))

    assert Nx.to_binary(put) ==
             Nx.to_binary(Nx.indexed_put(zeros, Nx.new_axis(indices, 1), updates))
  end

  test "out-of-bounds scatter rows with a narrow signed index type write nothing" do
    # The spare slot they are routed to (the axis size) does not fit in s8 or s16.
    cases = [
      {{300}, [[-1], [3]], {:s, 8}},
      {{128}, [[-1], [3]], {:s, 8}},
      {{200, 200}, [[-1, 5], [3, 4]], {:s, 8}},
      {{40_000}, [[-1], [3]], {:s, 16}}
    ]

    for {shape, rows, type} <- cases, fun <- [:indexed_put, :indexed_add] do
      t = Nx.broadcast(Nx.tensor(0, backend: Nx.BinaryBackend), shape)
      indices = Nx.tensor(rows, type: type, backend: Nx.BinaryBackend)
      updates = Nx.tensor([5, 7], backend: Nx.BinaryBackend)
      got = apply(Nx, fun, [mlx(t), mlx(indices), mlx(updates)])
      # Nx.BinaryBackend raises on the out-of-bounds row: the reference leaves it out.
      expected = apply(Nx, fun, [t, indices[1..1], updates[1..1]])
      assert Nx.to_binary(got) == Nx.to_binary(expected), "#{fun} #{inspect({shape, type})}"
    end
  end

  test "top_k: dedicated kernel, ties in index order, NaN first, any k, types and ranks" do
    specials = [:nan, :infinity, :neg_infinity, 0.0, -0.0]

    for shape <- [{9}, {4, 9}, {2, 3, 6}],
        type <- device_types([{:f, 32}, {:s, 32}, {:bf, 16}, {:u, 8}, {:f, 64}, {:s, 64}]),
        k <- [1, 3, elem(shape, tuple_size(shape) - 1)] do
      # Few distinct values, so that rows hold ties; floats get NaN and infinities too.
      base = Nx.round(Nx.multiply(random(shape), 2))

      t =
        if elem(type, 0) in [:f, :bf] do
          flat = Nx.to_flat_list(base)
          n = length(flat)

          flat =
            Enum.reduce(0..2, flat, fn j, acc ->
              List.replace_at(acc, rem(j * 7 + 1, n), Enum.at(specials, rem(j + k, 5)))
            end)

          Nx.tensor(flat, type: type, backend: Nx.BinaryBackend) |> Nx.reshape(shape)
        else
          Nx.as_type(Nx.add(base, 2), type)
        end

      {ev, ei} = Nx.top_k(t, k: k)
      {v, i} = assert_native(fn -> Nx.top_k(mlx(t), k: k) end)
      assert v.type == ev.type and i.type == ei.type and v.shape == ev.shape
      ctx = inspect({shape, type, k})
      assert Nx.to_binary(v) == Nx.to_binary(ev), "top_k values #{ctx}"
      assert Nx.to_binary(i) == Nx.to_binary(ei), "top_k indices #{ctx}"

      {kv, ki} = kernel(%Nx.Block.TopK{k: k}, {ev, ei}, [mlx(t)])
      assert Nx.to_binary(kv) == Nx.to_binary(ev) and Nx.to_binary(ki) == Nx.to_binary(ei)
    end

    # Vectorized and named inputs.
    t = Nx.vectorize(Nx.reshape(random({2, 5}), {2, 5}, names: [nil, :x]), :v)
    {ev, ei} = Nx.top_k(t, k: 2)
    {v, i} = assert_native(fn -> Nx.top_k(mlx(t), k: 2) end)
    assert v.vectorized_axes == ev.vectorized_axes and v.names == ev.names
    assert Nx.to_binary(v) == Nx.to_binary(ev) and Nx.to_binary(i) == Nx.to_binary(ei)
  end

  test "top_k on long rows (partitioned on the CPU): ties across the k-th place, NaN, signed zeros" do
    # Rows of few distinct values so that the k-th largest is tied with entries on both sides
    # of the cut; specials sprinkled in; one row all equal, one all NaN and one where -0.0 and
    # 0.0 tie right below the largest value (floats).
    for type <-
          device_types([{:f, 32}, {:bf, 16}, {:f, 16}, {:f, 64}, {:s, 64}, {:u, 8}, {:u, 64}]),
        k <- [1, 2, 7, 40] do
      {rows, n} = {5, 300}

      flat =
        for r <- 0..(rows - 1), j <- 0..(n - 1) do
          case {r, elem(type, 0)} do
            {3, _} ->
              1

            {4, kind} when kind in [:f, :bf] ->
              :nan

            {2, kind} when kind in [:f, :bf] ->
              if j == 7, do: 3.0, else: Enum.at([-0.0, 0.0, -1.0], rem(j * 5, 3))

            {_, kind} when kind in [:f, :bf] ->
              Enum.at(
                [:nan, :infinity, :neg_infinity, -0.0, 0.0, 2.5, -2.5, 1.0],
                rem(j * j + r, 8)
              )

            {_, :u} ->
              rem(j * 7 + r, 5) + if(type == {:u, 64}, do: 18_446_744_073_709_551_000, else: 250)

            _ ->
              rem(j * 7 + r, 5) - 2 - if(j == 11, do: 9_000_000_000_000, else: 0)
          end
        end

      t = flat |> Nx.tensor(type: type, backend: Nx.BinaryBackend) |> Nx.reshape({rows, n})
      {ev, ei} = Nx.top_k(t, k: k)
      {v, i} = assert_native(fn -> Nx.top_k(mlx(t), k: k) end)
      ctx = inspect({type, k})
      assert Nx.to_binary(i) == Nx.to_binary(ei), "top_k indices #{ctx}"
      assert Nx.to_binary(v) == Nx.to_binary(ev), "top_k values #{ctx}"
    end
  end

  test "window_scatter_max/min: last extreme of each window, padding, strides, overlaps" do
    cases = [
      {{4, 6}, {2, 3}, [strides: [2, 3]]},
      {{4, 6}, {2, 2}, [strides: [1, 1]]},
      {{5, 5}, {3, 3}, [strides: [2, 2], padding: :same]},
      {{2, 5, 4}, {1, 2, 2}, [strides: [1, 1, 2], padding: [{0, 0}, {1, 1}, {0, 1}]]},
      {{6}, {3}, [strides: [1], padding: [{2, 2}]]}
    ]

    for {shape, window, opts} <- cases,
        type <- device_types([{:f, 32}, {:s, 32}, {:bf, 16}, {:f, 64}]),
        fun <- [:window_scatter_max, :window_scatter_min] do
      # Few distinct values, so that windows hold ties.
      t = Nx.as_type(Nx.round(Nx.multiply(random(shape), 2)), type)
      out_shape = Nx.window_sum(t, window, opts).shape
      source = Nx.as_type(Nx.add(Nx.iota(out_shape, backend: Nx.BinaryBackend), 1), type)
      init = Nx.tensor(0.5, backend: Nx.BinaryBackend) |> Nx.as_type(type)
      expected = apply(Nx, fun, [t, source, init, window, opts])

      got =
        assert_native(fn -> apply(Nx, fun, [mlx(t), mlx(source), mlx(init), window, opts]) end)

      assert %NxMlx.Backend{} = got.data
      assert {got.type, got.shape} == {expected.type, expected.shape}

      assert Nx.to_binary(got) == Nx.to_binary(expected),
             "#{fun} #{inspect(shape)} #{inspect(type)} #{inspect(opts)}\n" <>
               "#{inspect(got)}\n#{inspect(expected)}"
    end
  end

  test "to_batched with every leftover policy" do
    t = Nx.iota({7, 3}, backend: Nx.BinaryBackend)

    for batch <- [1, 2, 3, 7], leftover <- [:repeat, :discard] do
      got =
        assert_native(fn -> Enum.to_list(Nx.to_batched(mlx(t), batch, leftover: leftover)) end)

      expected = Enum.to_list(Nx.to_batched(t, batch, leftover: leftover))
      assert length(got) == length(expected)

      for {g, e} <- Enum.zip(got, expected) do
        assert %NxMlx.Backend{} = g.data

        assert g.shape == e.shape and Nx.to_binary(g) == Nx.to_binary(e),
               "batch #{batch} #{leftover}: #{inspect(g)} vs #{inspect(e)}"
      end
    end
  end
end
