defmodule NxMlx.BackendTest do
  use ExUnit.Case, async: true

  @mlx {NxMlx.Backend, device: :cpu}

  defp mlx(data, opts \\ []), do: Nx.tensor(data, Keyword.put(opts, :backend, @mlx))
  defp ref(data, opts \\ []), do: Nx.tensor(data, Keyword.put(opts, :backend, Nx.BinaryBackend))

  describe "semantics matched to Nx" do
    test "an integer constant out of its type's range wraps as in Nx (defn makes such ones)" do
      for {type, n} <- [{{:s, 32}, 4_294_967_295}, {{:u, 8}, 300}, {{:s, 8}, -129}] do
        out = %Nx.Tensor{shape: {2}, type: type, names: [nil]}
        ours = NxMlx.Backend.constant(out, n, [])
        assert Nx.to_flat_list(ours) == Nx.to_flat_list(Nx.BinaryBackend.constant(out, n, []))
      end

      # And casts to a type MLX lacks run on Nx.BinaryBackend, where such tensors live.
      x = Nx.tensor([0.5, -2.0, 448.0], backend: NxMlx.Backend)
      assert Nx.as_type(x, {:f, 8}) |> Nx.to_flat_list() == [0.5, -2.0, 448.0]
    end

    test "as_type from float to integer maps NaN to 0 and the infinities to the extremes" do
      t = mlx([:infinity, :nan, :neg_infinity, 3.7, -2.5])

      for type <- [:u8, :s8, :s32, :u32, :s64] do
        expected = Nx.as_type(Nx.backend_copy(t, Nx.BinaryBackend), type)
        assert Nx.to_flat_list(Nx.as_type(t, type)) == Nx.to_flat_list(expected), "#{type}"
      end
    end

    test "select broadcasts and casts like Nx" do
      pred = mlx([[1, 0, 1], [0, 1, 0]], type: :u8)
      a = mlx([1.5, 2.5, 3.5])
      b = mlx(7, type: :s32)
      got = Nx.select(pred, a, b)
      assert %NxMlx.Backend{} = got.data

      expected =
        Nx.select(
          ref([[1, 0, 1], [0, 1, 0]], type: :u8),
          ref([1.5, 2.5, 3.5]),
          ref(7, type: :s32)
        )

      assert got.type == expected.type and got.shape == expected.shape
      assert Nx.to_flat_list(got) == Nx.to_flat_list(expected)
    end

    test "reductions accept keep_axes: nil" do
      t = mlx([[1.0, 2.0], [3.0, 4.0]])

      assert Nx.to_flat_list(
               NxMlx.Backend.sum(Nx.template({2}, :f32), t, axes: [1], keep_axes: nil)
             ) ==
               [3.0, 7.0]
    end
  end

  describe "the first end-to-end computation" do
    test "dot |> add |> sum gives Nx's answer" do
      t = mlx([[1.0, 2.0], [3.0, 4.0]])
      r = t |> Nx.dot(t) |> Nx.add(1) |> Nx.sum()
      assert %NxMlx.Backend{device: :cpu} = r.data

      b = ref([[1.0, 2.0], [3.0, 4.0]])
      expected = b |> Nx.dot(b) |> Nx.add(1) |> Nx.sum()
      assert Nx.to_binary(r) == Nx.to_binary(expected)
      assert Nx.to_number(r) == 58.0
    end

    test "inspect prints like the reference backend" do
      t = mlx([[1.0, 2.0], [3.0, 4.0]])
      r = Nx.dot(t, t)
      b = ref([[1.0, 2.0], [3.0, 4.0]])
      assert inspect(r) == inspect(Nx.dot(b, b))

      assert inspect(mlx([1, 2, 3], type: :s64, names: [:x])) ==
               inspect(ref([1, 2, 3], type: :s64, names: [:x]))

      assert inspect(Nx.iota({100}, backend: @mlx)) == inspect(Nx.iota({100}))
    end

    test "to_binary honours a limit" do
      t = mlx([1, 2, 3, 4], type: :s32)
      assert Nx.to_binary(t, limit: 2) == <<1::32-native, 2::32-native>>
    end

    test "work runs on a worker thread, not on the calling scheduler" do
      worker = NxMlx.Runtime.worker(:cpu)
      %{id: id, device: :cpu} = NxMlx.Native.worker_info(worker)
      assert id > 0

      seen =
        NxMlx.Runtime.call(:current_worker_id, [worker], fn -> "current_worker_id" end)

      assert seen == id
    end
  end

  describe "native ops match Nx.BinaryBackend" do
    test "element-wise with broadcasting and type promotion" do
      a = [[1, -2, 3], [4, 5, -6]]
      b = [0.5, -1.5, 2.0]

      for op <- [:add, :subtract, :multiply, :divide, :min, :max] do
        got = apply(Nx, op, [mlx(a), mlx(b)])
        want = apply(Nx, op, [ref(a), ref(b)])
        assert got.type == want.type, "#{op}"
        assert Nx.to_binary(got) == Nx.to_binary(want), "#{op}"
      end
    end

    test "comparisons return u8" do
      for op <- [:equal, :not_equal, :less, :less_equal, :greater, :greater_equal] do
        got = apply(Nx, op, [mlx([1, 2, 3]), mlx([3, 2, 1])])
        want = apply(Nx, op, [ref([1, 2, 3]), ref([3, 2, 1])])
        assert got.type == {:u, 8}
        assert Nx.to_binary(got) == Nx.to_binary(want), "#{op}"
      end
    end

    test "unary float functions within tolerance" do
      x = [0.1, 0.5, 0.9]

      for op <- [:exp, :log, :sin, :cos, :tanh, :sqrt, :sigmoid, :erf, :atan] do
        got = apply(Nx, op, [mlx(x)])
        want = apply(Nx, op, [ref(x)])

        assert Nx.all_close(Nx.backend_copy(got, Nx.BinaryBackend), want, atol: 1.0e-6)
               |> Nx.to_number() == 1,
               "#{op}"
      end
    end

    test "abs, negate and sign, including complex and unsigned inputs" do
      for {data, type} <- [{[1, 2, 255], :u8}, {[-128, 5], :s8}, {[-1.5, 0.0], :f16}] do
        for op <- [:abs, :negate, :sign] do
          got = apply(Nx, op, [mlx(data, type: type)])
          want = apply(Nx, op, [ref(data, type: type)])
          assert Nx.to_binary(got) == Nx.to_binary(want), "#{op} #{type}"
        end
      end

      c = [Complex.new(3, 4), Complex.new(-1, 0)]
      got = Nx.abs(mlx(c))
      assert got.type == {:f, 32}
      assert Nx.to_list(got) == [5.0, 1.0]
    end

    test "reductions with axes and keep_axes" do
      data = [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]

      for op <- [:sum, :product, :reduce_max, :reduce_min, :all, :any],
          opts <- [[], [axes: [0]], [axes: [1, 2]], [axes: [-1], keep_axes: true]] do
        got = apply(Nx, op, [mlx(data), opts])
        want = apply(Nx, op, [ref(data), opts])
        assert got.shape == want.shape and got.type == want.type, "#{op} #{inspect(opts)}"
        assert Nx.to_binary(got) == Nx.to_binary(want), "#{op} #{inspect(opts)}"
      end
    end

    test "batched dot, transpose, reshape, broadcast" do
      l = Nx.iota({2, 3, 4}, type: :f32)
      r = Nx.iota({2, 4, 5}, type: :f32)
      want = Nx.dot(l, [2], [0], r, [1], [0])
      got = Nx.dot(Nx.backend_copy(l, @mlx), [2], [0], Nx.backend_copy(r, @mlx), [1], [0])
      assert got.shape == {2, 3, 5}
      assert Nx.to_binary(got) == Nx.to_binary(want)

      t = Nx.iota({2, 3}, backend: @mlx)
      assert Nx.to_binary(Nx.transpose(t)) == Nx.to_binary(Nx.transpose(Nx.iota({2, 3})))
      assert Nx.to_binary(Nx.reshape(t, {3, 2})) == Nx.to_binary(Nx.iota({3, 2}))

      assert Nx.to_binary(Nx.broadcast(mlx([1, 2, 3]), {2, 3})) ==
               Nx.to_binary(Nx.broadcast(ref([1, 2, 3]), {2, 3}))

      assert Nx.to_binary(Nx.broadcast(mlx([1, 2]), {2, 3}, axes: [0])) ==
               Nx.to_binary(Nx.broadcast(ref([1, 2]), {2, 3}, axes: [0]))
    end

    test "constants and types round-trip" do
      for type <- [:u8, :u16, :u32, :u64, :s8, :s16, :s32, :s64, :f16, :bf16, :f32, :f64] do
        got = Nx.broadcast(Nx.tensor(7, type: type, backend: @mlx), {3})
        assert got.type == Nx.Type.normalize!(type)
        assert Nx.to_binary(got) == Nx.to_binary(Nx.broadcast(Nx.tensor(7, type: type), {3}))
      end

      big = 2 ** 62 + 1
      assert Nx.to_number(Nx.tensor(big, type: :s64, backend: @mlx)) == big
    end

    test "transfers between backends" do
      t = mlx([1.5, 2.5])
      b = Nx.backend_transfer(t, Nx.BinaryBackend)
      assert %Nx.BinaryBackend{} = b.data
      assert Nx.to_binary(b) == Nx.to_binary(ref([1.5, 2.5]))
      assert Nx.to_binary(Nx.backend_copy(b, @mlx)) == Nx.to_binary(b)
    end
  end

  describe "errors" do
    test "a shape mismatch inside the backend raises ArgumentError naming op and shapes" do
      a = mlx([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
      b = mlx([1.0, 2.0, 3.0, 4.0])
      out = Nx.template({2, 3}, :f32)

      error = assert_raise ArgumentError, fn -> NxMlx.Backend.add(out, a, b) end
      assert error.message =~ "add"
      assert error.message =~ "{2, 3}"
      assert error.message =~ "{4}"

      # The VM and the worker live on.
      assert Nx.to_number(Nx.sum(mlx([1, 2, 3]))) == 6
    end

    test "unsupported types raise ArgumentError" do
      assert_raise ArgumentError, ~r/complex128/, fn ->
        Nx.tensor([1, 2], type: :c128, backend: @mlx)
      end
    end

    test "types MLX lacks are created on Nx.BinaryBackend, visibly" do
      ref = make_ref()
      me = self()
      id = "fallback-f8-#{inspect(ref)}"

      :telemetry.attach(id, [:nx_mlx, :fallback, :stop], &NxMlx.TestHelpers.forward/4, me)
      on_exit(fn -> :telemetry.detach(id) end)

      t = Nx.tensor([1.0, 2.0], type: :f8, backend: @mlx)
      assert %Nx.BinaryBackend{} = t.data
      assert Nx.to_flat_list(t) == [1.0, 2.0]
      assert_receive {:telemetry, [:nx_mlx, :fallback, :stop], _, %{op: :from_binary}}

      u = Nx.tensor([1, 2, 3], type: :u2, backend: @mlx)
      assert %Nx.BinaryBackend{} = u.data
      assert Nx.to_flat_list(u) == [1, 2, 3]
    end

    test "a wrong binary size is an ArgumentError, not a crash" do
      out = Nx.template({4}, :f32)

      assert_raise ArgumentError, ~r/from_binary.*does not match/, fn ->
        NxMlx.Backend.from_binary(out, <<0, 0, 0>>, device: :cpu)
      end
    end
  end
end

defmodule NxMlx.FallbackTest do
  # Not async: it changes the :fallback setting that every test's fallbacks read.
  use ExUnit.Case, async: false

  @mlx {NxMlx.Backend, device: :cpu}

  defp mlx(data), do: Nx.tensor(data, backend: @mlx)

  def forward(event, _measurements, meta, {parent, ref}), do: send(parent, {ref, event, meta.op})

  describe "fallbacks" do
    setup do
      previous = Application.get_env(:nx_mlx, :fallback)
      on_exit(fn -> Application.put_env(:nx_mlx, :fallback, previous) end)
    end

    # Every fallback path: {op reported, input type, computation, input}. Each runs the
    # computation with its input on NxMlx.Backend and compares with the same on
    # Nx.BinaryBackend.
    defp paths do
      [
        # No complex kernel in MLX.
        {:sigmoid, {:c, 64}, &Nx.sigmoid/1, [Complex.new(0.5, 1), Complex.new(-2, 0.25)]},
        {:expm1, {:c, 64}, &Nx.expm1/1, [Complex.new(0.5, 1), Complex.new(-2, 0.25)]},
        {:reduce, {:s, 32}, &Nx.reduce(&1, 0, fn x, acc -> Nx.add(x, acc) end), [3, 9, 2]},
        {:window_reduce, {:s, 32}, &Nx.window_reduce(&1, 0, {2}, fn x, acc -> Nx.max(x, acc) end),
         [3, 9, 2, 5]},
        # More integer products than the native multiply-and-sum takes.
        {:dot, {:s, 8},
         &Nx.sum(Nx.dot(Nx.broadcast(&1, {260, 260}), Nx.broadcast(&1, {260, 260}))), [1]},
        {:rsqrt, {:c, 64}, &Nx.rsqrt/1, [Complex.new(4, 1), Complex.new(-2, 0.25)]},
        {:remainder, {:f, 32}, &Nx.remainder(&1, 0.75), [5.5, -5.5]},
        # Nx's branch cuts, which MLX's complex acos does not follow.
        {:acos, {:c, 64}, &Nx.acos/1, [Complex.new(1, 2), Complex.new(0.25, -1)]},
        {:conv, {:f, 64}, &Nx.conv(Nx.reshape(&1, {1, 1, 3}), Nx.reshape(&1, {1, 1, 3})),
         [1.0, 2.0, 3.0]}
      ]
    end

    for op <- ~w(sigmoid expm1 reduce window_reduce dot rsqrt remainder acos conv)a do
      test "#{op} runs on Nx.BinaryBackend with telemetry; :raise refuses it" do
        {op, type, fun, data} = List.keyfind(paths(), unquote(op), 0)
        ref = make_ref()
        id = "fallback-#{inspect(ref)}"

        :telemetry.attach_many(
          id,
          [[:nx_mlx, :fallback, :start], [:nx_mlx, :fallback, :stop]],
          &__MODULE__.forward/4,
          {self(), ref}
        )

        try do
          input = Nx.tensor(data, type: type, backend: @mlx)
          r = fun.(input)
          expected = fun.(Nx.backend_copy(input, Nx.BinaryBackend))
          assert %NxMlx.Backend{} = r.data
          assert r.type == expected.type and r.shape == expected.shape
          assert Nx.to_binary(r) == Nx.to_binary(expected)
          assert_received {^ref, [:nx_mlx, :fallback, :start], ^op}
          assert_received {^ref, [:nx_mlx, :fallback, :stop], ^op}
        after
          :telemetry.detach(id)
        end

        Application.put_env(:nx_mlx, :fallback, :raise)
        input = Nx.tensor(data, type: type, backend: @mlx)

        assert_raise ArgumentError, ~r/NxMlx.Backend.#{op} has no MLX implementation/, fn ->
          fun.(input)
        end
      end
    end

    test "types MLX lacks stay on Nx.BinaryBackend, with the same telemetry and settings" do
      forward = fn -> NxMlx.TestHelpers.forward_telemetry([:nx_mlx, :fallback, :stop]) end
      forward.()
      t = Nx.tensor([1, -2, 3], type: {:s, 4}, backend: @mlx)
      assert %Nx.BinaryBackend{} = t.data
      assert Nx.to_flat_list(Nx.add(t, 1)) == [2, -1, 4]
      assert_received {:telemetry, [:nx_mlx, :fallback, :stop], _, %{op: :from_binary}}

      Application.put_env(:nx_mlx, :fallback, :raise)

      assert_raise ArgumentError, ~r/from_binary has no MLX implementation/, fn ->
        Nx.tensor([1, 2], type: {:f, 8}, backend: @mlx)
      end
    end

    test ":exception telemetry when the fallback raises" do
      NxMlx.TestHelpers.forward_telemetry([:nx_mlx, :fallback, :exception])

      assert_raise RuntimeError, "boom", fn ->
        Nx.reduce(mlx([1, 2]), 0, fn _, _ -> raise "boom" end)
      end

      assert_received {:telemetry, [:nx_mlx, :fallback, :exception], _, %{op: :reduce}}
    end

    test ":warn logs once per op" do
      Application.put_env(:nx_mlx, :fallback, :warn)
      :persistent_term.erase({NxMlx.Fallback, :warned, :remainder})

      log =
        ExUnit.CaptureLog.capture_log(fn ->
          Nx.remainder(mlx([8.5]), 2.0)
          Nx.remainder(mlx([27.5]), 2.0)
        end)

      assert length(Regex.scan(~r/NxMlx.Backend.remainder runs on Nx.BinaryBackend/, log)) == 1
    end

    test ":raise refuses" do
      Application.put_env(:nx_mlx, :fallback, :raise)

      assert_raise ArgumentError, ~r/reduce has no MLX implementation/, fn ->
        Nx.reduce(mlx([3, 9, 2]), 0, fn x, acc -> Nx.add(x, acc) end)
      end
    end
  end
end
