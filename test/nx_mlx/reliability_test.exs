defmodule NxMlx.ReliabilityTest do
  # Inputs that once crashed the VM or answered wrong without a word. Each case gives Nx's
  # answer or an ArgumentError naming the call. (A crash fails the whole run.)
  use ExUnit.Case, async: false

  import Bitwise

  alias NxMlx.{Native, Runtime}

  @b {NxMlx.Backend, device: :cpu}

  defp t(data, opts \\ []), do: Nx.tensor(data, Keyword.put(opts, :backend, @b))
  defp worker, do: Runtime.worker(:cpu)
  defp read(ref), do: Runtime.call(:to_binary, [ref], fn -> "read" end)

  describe "integer division that traps in hardware" do
    test "the type's minimum divided by -1 wraps, as Nx does" do
      for type <- [{:s, 32}, {:s, 64}] do
        {:s, bits} = type
        min = -(1 <<< (bits - 1))
        a = t([min, 7, -7], type: type)
        assert Nx.to_list(Nx.remainder(a, -1)) == [0, 0, 0]
        assert Nx.to_list(Nx.quotient(a, -1)) == [min, -7, 7]
        # broadcast divisor tensor
        assert Nx.to_list(Nx.quotient(a, t([-1], type: type))) == [min, -7, 7]
      end
    end

    test "the binding's floor_divide and remainder survive any divisor" do
      a = t([-9_223_372_036_854_775_808, 5], type: :s64).data.ref
      b = t([-1, 0], type: :s64).data.ref

      for op <- [:floor_divide, :remainder] do
        r = Runtime.call(:binary, [worker(), op, a, b], fn -> "#{op}" end)
        assert byte_size(read(r)) == 16
      end
    end
  end

  describe "direct calls with hostile arguments" do
    test "a stride of 0 is refused by the callback and by the NIF" do
      x = t([1, 2, 3, 4])

      assert_raise ArgumentError, ~r/NxMlx.Backend.slice/, fn ->
        NxMlx.Backend.slice(Nx.template({4}, :s32), x, [0], [4], [0])
      end

      assert {:error, {:argument, message}} = Native.slice(worker(), x.data.ref, [0], [4], [0])
      assert message =~ "stride of 0"
    end

    test "reverse, gelu, layer_norm and single-row matmuls refuse what they cannot take" do
      x = t([1, 2, 3, 4])
      f = Nx.tensor([[1.0, 2.0]], backend: @b)

      for axis <- [1, -2, 2_147_483_648] do
        result = Native.reverse(worker(), x.data.ref, axis)
        assert match?({:error, _}, result), "reverse axis #{axis}: #{inspect(result)}"
      end

      assert {:error, {:argument, _}} = Native.reverse(worker(), x.data.ref, :last)
      assert {:error, {:argument, _}} = Native.reverse(worker(), :not_an_array, 0)
      assert {:error, {:argument, message}} = Native.unary(worker(), :gelu, x.data.ref)
      assert message =~ "gelu"

      # layer_norm: scale and shift of another size, an integer input, a negative or
      # non-float eps.
      v2 = Nx.tensor([1.0, 2.0], backend: @b).data.ref
      v3 = Nx.tensor([1.0, 2.0, 3.0], backend: @b).data.ref
      assert {:error, {:argument, _}} = Native.layer_norm(worker(), f.data.ref, v3, v3, 1.0e-5)
      assert {:error, {:argument, _}} = Native.layer_norm(worker(), x.data.ref, v2, v2, 1.0e-5)
      assert {:error, {:argument, _}} = Native.layer_norm(worker(), f.data.ref, v2, v2, -1.0)
      assert {:error, {:argument, _}} = Native.layer_norm(worker(), f.data.ref, v2, v2, :eps)
      {:ok, n} = Native.layer_norm(worker(), f.data.ref, v2, v2, 0.0)
      # [1, 2]: mean 1.5, deviation 0.5, so [-1, 1] * [1, 2] + [1, 2].
      assert read(n) == <<0.0::float-32-native, 4.0::float-32-native>>

      # [1, 2] x [3, 2]: the shapes do not chain (MLX's own message), nothing read out of
      # bounds.
      w = Nx.iota({3, 2}, type: :f32, backend: @b)
      assert {:error, {:argument, _}} = Native.matmul(worker(), f.data.ref, w.data.ref)
      {:ok, y} = Native.matmul(worker(), f.data.ref, Nx.transpose(w).data.ref)

      # [1, 2] . [[0, 1], [2, 3], [4, 5]] row by row, through sgemv on the transposed view.
      assert read(y) == for(v <- [2.0, 8.0, 14.0], into: <<>>, do: <<v::float-32-native>>)
    end

    test "rms_norm, rope and attention called directly refuse what they cannot take" do
      f = Nx.iota({2, 3, 4, 8}, type: :f32, backend: @b)
      i = Nx.iota({2, 3, 4, 8}, type: :s32, backend: @b)
      w8 = Nx.iota({8}, type: :f32, backend: @b).data.ref
      w5 = Nx.iota({5}, type: :f32, backend: @b).data.ref
      zero = Nx.tensor(0, backend: @b).data.ref
      half = Nx.tensor(0.5, backend: @b).data.ref

      # rms_norm: a weight of another size, an integer input, a negative or non-float eps.
      assert {:error, {:argument, _}} = Native.rms_norm(worker(), f.data.ref, w5, 1.0e-5)
      assert {:error, {:argument, _}} = Native.rms_norm(worker(), i.data.ref, w8, 1.0e-5)
      assert {:error, {:argument, _}} = Native.rms_norm(worker(), f.data.ref, w8, -1.0)
      assert {:error, {:argument, _}} = Native.rms_norm(worker(), f.data.ref, w8, :eps)
      assert {:ok, _} = Native.rms_norm(worker(), f.data.ref, w8, 1.0e-5)

      # rope: odd, zero or too many dims, a float offset, offsets of the wrong count,
      # frequencies of the wrong size, too few inputs, a rank-2 input.
      for dims <- [3, 0, 10, -2] do
        assert {:error, {:argument, _}} =
                 Native.rope(worker(), [f.data.ref, zero], dims, false, 1.0e4, 1.0)
      end

      assert {:error, {:argument, _}} =
               Native.rope(worker(), [f.data.ref, half], 8, false, 1.0e4, 1.0)

      three = Nx.tensor([1, 2, 3], backend: @b).data.ref

      assert {:error, {:argument, _}} =
               Native.rope(worker(), [f.data.ref, three], 8, false, 1.0e4, 1.0)

      assert {:error, {:argument, _}} =
               Native.rope(worker(), [f.data.ref, zero, w8], 8, false, 1.0e4, 1.0)

      assert {:error, {:argument, _}} = Native.rope(worker(), [f.data.ref], 8, false, 1.0e4, 1.0)
      flat = Nx.iota({4, 8}, type: :f32, backend: @b).data.ref
      assert {:error, {:argument, _}} = Native.rope(worker(), [flat, zero], 8, false, 1.0e4, 1.0)
      assert {:ok, _} = Native.rope(worker(), [f.data.ref, zero], 8, true, 1.0e4, 1.0)

      # attention: a mask mode out of range or without its array, heads that do not divide,
      # mismatched head dims, rank-3 inputs.
      q = f.data.ref
      assert {:error, {:argument, _}} = Native.attention(worker(), [q, q, q], 1.0, 3, false)
      assert {:error, {:argument, _}} = Native.attention(worker(), [q, q, q], 1.0, 2, false)
      assert {:error, {:argument, _}} = Native.attention(worker(), [q, q, q], 1.0, 0, true)
      k2 = Nx.iota({2, 2, 4, 8}, type: :f32, backend: @b).data.ref
      assert {:error, {:argument, _}} = Native.attention(worker(), [q, k2, k2], 1.0, 0, false)
      k4 = Nx.iota({2, 3, 4, 4}, type: :f32, backend: @b).data.ref
      assert {:error, {:argument, _}} = Native.attention(worker(), [q, k4, k4], 1.0, 0, false)
      r3 = Nx.iota({3, 4, 8}, type: :f32, backend: @b).data.ref
      assert {:error, {:argument, _}} = Native.attention(worker(), [r3, r3, r3], 1.0, 1, false)
      assert {:ok, _} = Native.attention(worker(), [q, q, q], 1.0, 1, false)
    end

    test "conv with feature groups below 1 raises" do
      x = Nx.iota({1, 2, 4}, type: :f32, backend: @b)
      k = Nx.iota({2, 2, 2}, type: :f32, backend: @b)

      opts = [
        strides: [1],
        padding: [{0, 0}],
        input_dilation: [1],
        kernel_dilation: [1],
        feature_group_size: 0,
        batch_group_size: 1,
        input_permutation: [0, 1, 2],
        kernel_permutation: [0, 1, 2],
        output_permutation: [0, 1, 2]
      ]

      assert_raise ArgumentError, ~r/groups must be at least 1/, fn ->
        NxMlx.Backend.conv(Nx.template({1, 2, 3}, :f32), x, k, opts)
      end
    end

    test "index arrays out of range never read or write outside the array" do
      x = t([1, 2, 3, 4])
      far = t([100_000, -7]).data.ref

      {:ok, taken} = Native.take(worker(), x.data.ref, far, 0)
      assert read(taken) == <<4::32-native, 1::32-native>>

      {:ok, gathered} = Native.gather(worker(), x.data.ref, [far], [0], [1])
      assert read(gathered) == <<4::32-native, 1::32-native>>

      {:ok, along} = Native.take_along_axis(worker(), x.data.ref, far, 0)
      assert byte_size(read(along)) == 8

      values = t([9, 9]).data.ref
      {:ok, put} = Native.put_along_axis(worker(), x.data.ref, far, values, 0)
      assert byte_size(read(put)) == 16

      updates = t([[5], [6]]).data.ref
      {:ok, scattered} = Native.scatter(worker(), true, x.data.ref, [far], updates, [0])
      assert byte_size(read(scattered)) == 16

      assert {:error, {:argument, _}} = Native.take(worker(), x.data.ref, far, 3)
      assert {:error, {:argument, _}} = Native.topk(worker(), x.data.ref, 0, 0)
    end

    test "undecodable NIF terms raise an ArgumentError naming the call" do
      forged = %NxMlx.CommandQueue{ref: make_ref(), device: :cpu}

      assert_raise ArgumentError, ~r/invalid argument to NxMlx.Native/, fn ->
        NxMlx.CommandQueue.with_queue(forged, fn -> Nx.add(t([1, 2]), 1) end)
      end
    end

    test "templates that do not fit their input raise" do
      x = t([[1, 2], [3, 4]])

      assert_raise ArgumentError, ~r/NxMlx.Backend.as_type/, fn ->
        NxMlx.Backend.as_type(Nx.template({3}, :f32), x)
      end

      assert_raise ArgumentError, ~r/NxMlx.Backend.slice/, fn ->
        NxMlx.Backend.slice(Nx.template({5, 5}, :s32), x, [0, 0], [1, 1], [1, 1])
      end

      assert_raise ArgumentError, ~r/NxMlx.Backend.pad/, fn ->
        NxMlx.Backend.pad(Nx.template({2, 2}, :s32), x, t(0), [{1, 1, 0}, {0, 0, 0}])
      end
    end

    test "padding that removes more than the tensor raises" do
      assert_raise ArgumentError, ~r/NxMlx.Backend.pad.*\{-3, 2\}/, fn ->
        Nx.pad(t([[1, 2], [3, 4]]), 0, [{-5, 0, 0}, {0, 0, 0}])
      end
    end

    test "from_binary takes iodata" do
      out = NxMlx.Backend.from_binary(Nx.template({4}, :u8), [<<1, 2>>, [<<3>>, 4]], device: :cpu)
      assert Nx.to_list(out) == [1, 2, 3, 4]
    end
  end

  describe "the runtime API refuses junk with ArgumentError" do
    test "memory and cache limits" do
      assert_raise ArgumentError, ~r/set_memory_limit/, fn -> NxMlx.set_memory_limit(-1) end
      assert_raise ArgumentError, ~r/set_cache_limit/, fn -> NxMlx.set_cache_limit(-5) end
      assert_raise ArgumentError, ~r/set_memory_limit/, fn -> NxMlx.set_memory_limit(:x) end
    end

    test "queues and commands" do
      assert_raise ArgumentError, ~r/with_queue/, fn ->
        NxMlx.CommandQueue.with_queue(:junk, fn -> 1 end)
      end

      assert_raise ArgumentError, ~r/synchronize/, fn -> NxMlx.CommandQueue.synchronize(:junk) end
      assert_raise ArgumentError, ~r/submit/, fn -> NxMlx.submit(:junk) end
      assert_raise ArgumentError, ~r/poll/, fn -> NxMlx.poll(:junk) end
      assert_raise ArgumentError, ~r/wait/, fn -> NxMlx.wait(:junk) end
    end

    test "the memory limit is clamped to the machine, so huge ops are refused" do
      previous = NxMlx.set_memory_limit(1 <<< 40)

      try do
        limit = NxMlx.memory().limit
        assert limit < 1 <<< 40

        assert_raise ArgumentError, ~r/memory limit/, fn ->
          Nx.broadcast(t(1.0), {100_000, 100_000}) |> Nx.add(1.0) |> Nx.sum() |> Nx.to_number()
        end
      after
        NxMlx.set_memory_limit(previous)
      end
    end
  end

  describe "answers that were wrong" do
    test "reductions over 2^31 elements or more" do
      big = Nx.broadcast(t(41, type: :u8), {46_341, 46_341})
      assert Nx.to_number(Nx.reduce_max(big)) == 41
      assert Nx.to_number(Nx.reduce_min(big)) == 41
      assert Nx.to_number(Nx.any(big)) == 1
      assert Nx.to_number(Nx.all(big)) == 1
    end

    @tag timeout: 120_000
    test "the u8 sum of a 46,341 x 46,341 broadcast" do
      big = Nx.broadcast(t(1, type: :u8), {46_341, 46_341})
      assert Nx.to_number(Nx.sum(big)) == 46_341 * 46_341
    end

    test "f32 sums of 2^25 ones are exact" do
      ones = Nx.broadcast(t(1.0), {33_554_432})
      assert Nx.to_number(Nx.sum(ones)) == 33_554_432.0
      assert Nx.to_number(Nx.sum(Nx.add(ones, 0.0))) == 33_554_432.0
      # along one axis, kept
      assert Nx.to_list(Nx.sum(Nx.reshape(ones, {2, 16_777_216}), axes: [1], keep_axes: true)) ==
               [[16_777_216.0], [16_777_216.0]]
    end

    @tag timeout: 120_000
    test "the f32 sum of 10^8 uniform values is within 1e-6 of the exact sum" do
      # MLX's own f32 sum is 4e-5 off at 16M values; the reference is the f64 sum. The values
      # are frac(i * golden ratio), equidistributed in [0, 1), made in f64 and rounded.
      i = Nx.iota({100_000_000}, type: :f64, backend: @b)
      y = Nx.multiply(i, 0.6180339887498949)
      x = Nx.subtract(y, Nx.floor(y)) |> Nx.as_type(:f32)
      exact = Nx.to_number(Nx.sum(Nx.as_type(x, :f64)))
      assert abs(Nx.to_number(Nx.sum(x)) - exact) / exact <= 1.0e-6
    end

    test "blocked sums agree with Nx.BinaryBackend on several axes" do
      x = Nx.iota({3000, 7, 5}, type: :f32, backend: @b) |> Nx.divide(1000)
      ref = Nx.backend_copy(x, Nx.BinaryBackend)

      for axes <- [[0], [0, 2], [1, 0], nil], keep <- [true, false] do
        opts = [axes: axes, keep_axes: keep]
        got = Nx.sum(x, opts) |> Nx.backend_copy(Nx.BinaryBackend)
        want = Nx.sum(ref, opts)
        assert got.shape == want.shape
        assert Nx.to_number(Nx.all_close(got, want, rtol: 1.0e-6)) == 1
      end
    end

    test "f16 and bf16 cumulative max and min keep NaN" do
      for type <- [:f16, :bf16], fun <- [&Nx.cumulative_max/1, &Nx.cumulative_min/1] do
        got = fun.(t([1.0, :nan, 3.0], type: type)) |> Nx.to_list()
        assert [1.0, :nan, :nan] == got
      end
    end

    test "u64 against a signed type compares the numbers" do
      u = t([18_446_744_073_709_551_615, 0, 5], type: :u64)
      s = t([-1, -1, 5], type: :s64)
      assert Nx.to_list(Nx.greater(u, s)) == [1, 1, 0]
      assert Nx.to_list(Nx.less(s, u)) == [1, 1, 0]
      assert Nx.to_list(Nx.equal(u, s)) == [0, 0, 1]
      assert Nx.to_list(Nx.greater_equal(s, u)) == [0, 0, 1]
      assert Nx.to_list(Nx.greater(u, -1)) == [1, 1, 1]
    end

    test "window sums and products of 8- and 16-bit integers keep their type" do
      # MLX sums and multiplies them in 32 bits: the result had twice the bytes of its shape.
      opts = [strides: [2], padding: :same]
      assert Nx.to_list(Nx.window_product(t([-3, 3, 2], type: :s16), {1}, opts)) == [-3, 2]
      x = Nx.iota({3, 7}, type: :u16, backend: @b)
      got = Nx.window_sum(x, {2, 3}, strides: [2, 3], padding: :same)
      assert got.type == {:u, 16}
      assert Nx.to_list(got) == [[16, 39, 36], [29, 51, 39]]
      # wrapping, as Nx does
      assert Nx.to_list(Nx.window_sum(t([200, 100, 7], type: :u8), {2})) == [44, 107]
      assert Nx.to_list(Nx.window_product(t([-128, 2], type: :s8), {2})) == [0]
    end

    test "window reductions with a dilated last axis read the right elements" do
      # A window dilation makes the view's windows overlap with a stride > 1: MLX's reduction
      # then took a plan that read other rows (row 1 gave max 2 instead of 4).
      x = Nx.iota({6, 3}, type: :u32, backend: @b)
      opts = [strides: [2, 1], padding: :same, window_dilations: [1, 2]]
      assert Nx.to_list(Nx.window_max(x, {1, 2}, opts)) == [[1, 2, 1], [7, 8, 7], [13, 14, 13]]
      y = Nx.iota({3, 5}, type: :f32, backend: @b)
      sums = Nx.window_sum(y, {1, 2}, window_dilations: [1, 2])
      assert Nx.to_list(sums) == [[2.0, 4.0, 6.0], [12.0, 14.0, 16.0], [22.0, 24.0, 26.0]]
    end

    test "sign of -0.0 is -0.0, as in Nx" do
      for type <- [:f16, :bf16, :f32, :f64] do
        got = Nx.sign(t([-0.0, 0.0, -2.0], type: type))
        want = Nx.sign(Nx.tensor([-0.0, 0.0, -2.0], type: type, backend: Nx.BinaryBackend))
        assert Nx.to_binary(got) == Nx.to_binary(want), inspect(type)
      end
    end

    test "u64 against a signed type: min, max, clip, quotient, remainder and right_shift" do
      # Nx works on the numbers (s64 result, wrapping); converting the u64 side to s64 first
      # made 2^64 - 1 into -1.
      big = 18_446_744_073_709_551_615
      u = t([big, 7, 9_223_372_036_854_775_808], type: :u64)
      s = t([-1, 2, 3], type: :s16)
      assert Nx.to_list(Nx.max(u, s)) == [-1, 7, -9_223_372_036_854_775_808]
      assert Nx.to_list(Nx.min(u, s)) == [-1, 2, 3]
      assert Nx.to_list(Nx.max(s, u)) == [-1, 7, -9_223_372_036_854_775_808]
      assert Nx.to_list(Nx.clip(u, 18, 37)) == [37, 18, 37]
      assert Nx.to_list(Nx.quotient(u, s)) == [1, 3, 3_074_457_345_618_258_602]
      assert Nx.to_list(Nx.remainder(u, s)) == [0, 1, 2]
      assert Nx.to_list(Nx.quotient(t([-7, 7, 1], type: :s8), u)) == [0, 1, 0]
      assert Nx.to_list(Nx.remainder(t([-7, 7, 1], type: :s8), u)) == [-7, 0, 1]
      assert Nx.to_list(Nx.right_shift(u, t([11, 1, 63], type: :s8))) == [(1 <<< 53) - 1, 3, 1]
      assert Nx.to_list(Nx.right_shift(t([-8, 8, 1], type: :s8), u)) == [-1, 0, 0]
    end

    test "interior padding to a wider type gives that type" do
      # Nx.pad(f16, :nan) is f32; Nx.BinaryBackend's pad (the fallback) builds its result in
      # the input's type.
      got = Nx.pad(t([1.0, 2.0], type: :f16), :nan, [{1, 1, 1}])
      assert got.type == {:f, 32}
      assert Nx.to_list(got) == [:nan, 1.0, :nan, 2.0, :nan]
      assert Nx.to_list(Nx.pad(t([1, 2], type: :u8), 300, [{0, 0, 1}])) == [1, 300, 2]
    end

    test "inspect copies out only the elements it prints" do
      big = Nx.broadcast(t(3, type: :u8), {8_000, 8_000})
      NxMlx.reset_peak_memory()
      assert inspect(big) =~ "[3, 3, 3"
      # Reading it whole first materialised the 64 MB broadcast (and a 64 MB binary).
      assert NxMlx.memory().peak < 1_000_000

      assert Nx.to_binary(Nx.broadcast(t(7, type: :u8), {50_000, 50_000}), limit: 3) ==
               <<7, 7, 7>>
    end

    test "c64 to integers maps NaN to 0 and the infinities to the extremes" do
      z =
        t(
          [Complex.new(:nan, 0), Complex.new(:infinity, 0), Complex.new(:neg_infinity, 0), 3.7],
          type: :c64
        )

      assert Nx.to_list(Nx.as_type(z, :s32)) == [0, 2_147_483_647, -2_147_483_648, 3]
      assert Nx.to_list(Nx.as_type(z, :s64)) == [0, (1 <<< 63) - 1, -(1 <<< 63), 3]
    end

    test "linear algebra blocks run on MLX tensors whatever the default backend" do
      Nx.default_backend(Nx.BinaryBackend)
      a = t([[4.0, 1.0], [1.0, 3.0]])
      {_u, s, _vt} = Nx.LinAlg.svd(a)
      assert_in_delta Nx.to_number(s[0]), 4.618, 1.0e-3
      {values, _} = Nx.LinAlg.eigh(a)
      assert_in_delta Nx.to_number(values[0]), 4.618, 1.0e-3
      assert Nx.LinAlg.matrix_rank(a) |> Nx.to_number() == 2
      assert Nx.LinAlg.pinv(a).shape == {2, 2}
      batched = Nx.reshape(a, {1, 2, 2})
      assert elem(Nx.LinAlg.svd(batched), 1).shape == {1, 2}
    end
  end

  describe "mixed types are read exactly" do
    # Nx.BinaryBackend reads each input exactly and rounds the result once; converting the
    # inputs to the result type first rounds them too.
    defp both(fun, inputs) do
      {fun.(Enum.map(inputs, &t(elem(&1, 0), type: elem(&1, 1)))) |> Nx.to_list(),
       fun.(
         Enum.map(inputs, &Nx.tensor(elem(&1, 0), type: elem(&1, 1), backend: Nx.BinaryBackend))
       )
       |> Nx.to_list()}
    end

    test "integers past the float result's precision or range" do
      {got, want} = both(fn [x] -> Nx.cos(x) end, [{[2_147_483_647, 16_777_217], :s32}])
      assert got == want
      # u16 65535 is inf in f16: 65535 - 65504 is 31 in Nx, inf - 65504 was inf.
      {got, want} =
        both(fn [u, h] -> Nx.subtract(u, h) end, [
          {[65_535, 65_535], :u16},
          {[65_504.0, -65_504.0], :f16}
        ])

      assert got == [31.0, :infinity] and got == want

      {got, want} =
        both(fn [f, i] -> Nx.add(f, i) end, [{[1.0, 0.0], :f32}, {[16_777_217, 16_777_217], :s32}])

      assert got == want and got == [16_777_218.0, 16_777_216.0]
    end

    test "a bf16 subnormal with f16 is not flushed to zero" do
      # atan2(tiny, -0.0) is pi/2 in Nx; the bf16 value became 0 in f16, and atan2(0, -0.0)
      # is pi.
      {got, want} =
        both(fn [y, x] -> Nx.atan2(y, x) end, [{[9.183549615799121e-41], :bf16}, {[-0.0], :f16}])

      assert got == want
    end

    test "comparisons of mixed types" do
      {got, want} =
        both(fn [a, b] -> Nx.less(a, b) end, [
          {[16_777_217, 3], :s32},
          {[16_777_216.0, 3.0], :f32}
        ])

      assert got == want and got == [0, 0]

      {got, want} =
        both(fn [a, b] -> Nx.greater(a, b) end, [{[16_777_217], :s32}, {[16_777_216.0], :f32}])

      assert got == want and got == [1]
    end

    test "float scalars of known value keep the tensor's type" do
      x = t([1.5, 2.25], type: :bf16)
      r = Nx.multiply(x, 0.044715)
      assert r.type == {:bf, 16}
      assert Nx.to_list(r) == Nx.to_list(Nx.multiply(Nx.backend_copy(x), 0.044715))
      # An integer scalar the type holds exactly is no reason to widen (see compute_type).
      assert Nx.to_list(Nx.multiply(t([3.0], type: :f16), 2)) == [6.0]
    end
  end

  describe "floats past an integer type's range wrap the exact integer, as Nx" do
    test "every integer type, f32 and f64" do
      values = [1.0e19, -1.0e19, 3.0e38, -9.3e18, 9.3e18, 1.0e20, -1.5, 2.0 ** 63, -(2.0 ** 63)]
      values = values ++ [300.7, -300.7, 70_000.2, 123.7, 18_446_744_073_709_551_615.0]

      for float <- [:f32, :f64], int <- [:s8, :u8, :s16, :u16, :s32, :u32, :s64, :u64] do
        got = t(values, type: float) |> Nx.as_type(int) |> Nx.to_list()
        want = Nx.tensor(values, type: float, backend: Nx.BinaryBackend) |> Nx.as_type(int)
        assert got == Nx.to_list(want), "#{float} -> #{int}"
      end
    end
  end

  describe "clear_cache" do
    test "frees arrays released while the worker was idle" do
      x = Nx.iota({4_000_000}, type: :f32, backend: @b) |> Nx.add(1.0)
      Nx.to_binary(x, limit: 1)
      x = nil
      _ = x
      :erlang.garbage_collect()
      Process.sleep(20)
      NxMlx.clear_cache()
      assert NxMlx.memory().cache < 1_000_000
    end
  end

  describe "integer pow runs on MLX" do
    test "matches Nx, wrapping, with host and device exponents" do
      NxMlx.TestHelpers.assert_native(fn ->
        for type <- [:u8, :s8, :s32, :s64] do
          a = Nx.tensor([2, 3, -2, 0, 1], type: type) |> Nx.abs()
          e = Nx.tensor([0, 1, 5, 7, 62], type: type) |> Nx.abs()
          want = Nx.pow(a, e)

          assert Nx.pow(Nx.backend_copy(a, @b), Nx.backend_copy(e, @b)) |> Nx.to_list() ==
                   Nx.to_list(want)

          assert Nx.pow(Nx.backend_copy(a, @b), e) |> Nx.to_list() == Nx.to_list(want)
        end
      end)
    end

    test "a huge exponent takes microseconds, not minutes" do
      {us, r} = :timer.tc(fn -> Nx.pow(t([3, -1, 1], type: :s64), 10_000_000) |> Nx.to_list() end)
      assert r == Enum.map([3, -1, 1], &wrapping_pow(&1, 10_000_000))
      assert us < 5_000_000
    end
  end

  # base^exponent in s64 arithmetic (Nx.BinaryBackend builds the whole integer first).
  defp wrapping_pow(base, exponent) do
    mask = (1 <<< 64) - 1

    mod_pow(base &&& mask, exponent, 1, mask)
    |> then(&if(&1 >= 1 <<< 63, do: &1 - (1 <<< 64), else: &1))
  end

  defp mod_pow(_base, 0, acc, _mask), do: acc

  defp mod_pow(base, e, acc, mask) do
    acc = if (e &&& 1) == 1, do: acc * base &&& mask, else: acc
    mod_pow(base * base &&& mask, e >>> 1, acc, mask)
  end

  describe "on the GPU" do
    @describetag :gpu
    @g {NxMlx.Backend, device: :gpu}

    test "padding a scalar by nothing returns the scalar (MLX's GPU pad gave the pad value)" do
      for type <- [:u8, :s64, :f32, :bf16] do
        x = Nx.tensor(21, type: type, backend: @g)
        assert Nx.to_number(Nx.pad(x, 36, [])) == 21
      end
    end

    test "64-bit integer scatters run (MLX's GPU scatter has no int64 kernel)" do
      for type <- [:s64, :u64] do
        t = Nx.tensor([19, 5, 7], type: type, backend: @g)
        i = Nx.tensor([[0], [2]], backend: @g)
        u = Nx.tensor([4, 1], type: type, backend: @g)
        assert Nx.to_list(Nx.indexed_put(t, i, u)) == [4, 5, 1]
        assert Nx.to_list(Nx.indexed_add(t, i, u)) == [23, 5, 8]
      end
    end

    test "complex scatters run (MLX's GPU scatter has no complex64 kernel)" do
      t = Nx.tensor([1.0, 2.0, 3.0], type: :bf16, backend: @g)
      i = Nx.tensor([[0], [2]], backend: @g)
      u = Nx.tensor([Complex.new(1, 1), Complex.new(0, -1)], type: :c64, backend: @g)

      assert Nx.to_list(Nx.indexed_put(t, i, u)) == [
               Complex.new(1, 1),
               Complex.new(2, 0),
               Complex.new(0, -1)
             ]

      assert Nx.to_list(Nx.indexed_add(t, i, u)) == [
               Complex.new(2, 1),
               Complex.new(2, 0),
               Complex.new(3, -1)
             ]
    end

    test "an f16 result of a huge s64 is computed in f32 (no f64 on the GPU)" do
      # 9.2e18 is inf in f16: -inf / inf was NaN; Nx's -inf / 9.2e18 is -inf.
      x = Nx.tensor([:neg_infinity, 3.0], type: :f16, backend: @g)
      y = Nx.tensor([9_223_372_036_854_775_806, 2], type: :s64, backend: @g)
      assert Nx.to_list(Nx.divide(x, y)) == [:neg_infinity, 1.5]
    end
  end
end
