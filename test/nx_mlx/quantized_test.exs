defmodule NxMlx.QuantizedTest do
  # NxMlx.Quantized on the test device: the fused dot against the dot of the dequantized
  # values for every mode and bit width offered, in f32, f16 and bf16, eagerly, jitted with
  # `compiler: NxMlx` and through Nx.Defn.Evaluator; that the fused path is the one taken;
  # affine quantization error bounds; GGML blocks (exact in f32); experts through gather_qmm;
  # parameter maps; transfers; errors, also from the NIF called directly.
  #
  # Tolerance of the fused dot against the dequantized dot: per element, 4 roundings of the
  # type over the sum of |x| * |w| (the two sum the same products in different orders).
  use ExUnit.Case, async: true

  alias NxMlx.{Native, Quantized, Runtime}

  doctest NxMlx.Quantized

  @device NxMlx.TestHelpers.oracle_device()
  @mlx {NxMlx.Backend, device: @device}
  @eps %{{:f, 32} => 1.2e-7, {:f, 16} => 9.8e-4, {:bf, 16} => 7.9e-3}

  @layouts [
    {:affine, 2, 32},
    {:affine, 3, 64},
    {:affine, 4, 32},
    {:affine, 4, 64},
    {:affine, 4, 128},
    {:affine, 5, 32},
    {:affine, 6, 64},
    {:affine, 8, 32},
    {:affine, 8, 128},
    {:mxfp4, 4, 32},
    {:mxfp8, 8, 32},
    {:nvfp4, 4, 16}
  ]

  setup do
    :rand.seed(:exsss, {3, 1, 4})
    :ok
  end

  defp random(shape, type \\ {:f, 32}) do
    n = Tuple.product(shape)
    values = for _ <- 1..n, do: :rand.uniform() * 2 - 1

    Nx.tensor(values, type: {:f, 32}, backend: @mlx)
    |> Nx.reshape(shape)
    |> Nx.as_type(type)
  end

  defp quantize(w, {mode, bits, group}),
    do: Quantized.quantize(w, mode: mode, bits: bits, group_size: group)

  defp f32(t), do: t |> Nx.as_type(:f32) |> Nx.backend_transfer(Nx.BinaryBackend)

  # |got - want| <= 4 * eps * (|x| . |w|) + a tiny absolute floor, element-wise.
  defp assert_dot_close(got, want, x, w, type) do
    bound =
      Nx.dot(Nx.abs(f32(x)), [-1], Nx.abs(f32(w)), [0])
      |> Nx.multiply(4 * @eps[type])
      |> Nx.add(1.0e-6)

    diff = Nx.abs(Nx.subtract(f32(got), f32(want)))
    worst = diff |> Nx.subtract(bound) |> Nx.reduce_max() |> Nx.to_number()
    assert worst <= 0, "fused dot off by #{Nx.to_number(Nx.reduce_max(diff))} past the bound"
  end

  defp ops_of(fun, args) do
    ref = make_ref()
    me = self()
    id = {__MODULE__, ref}

    :telemetry.attach(id, [:nx_mlx, :compiler, :compile], &__MODULE__.report_ops/4, {me, ref})

    try do
      result = apply(Nx.Defn.jit(fun, compiler: NxMlx, device: @device), args)
      assert_receive {^ref, ops}
      {result, ops}
    after
      :telemetry.detach(id)
    end
  end

  def report_ops(_event, _measurements, meta, {pid, ref}), do: send(pid, {ref, meta.ops})

  describe "quantized dot" do
    for type <- [{:f, 32}, {:f, 16}, {:bf, 16}], layout <- @layouts do
      @tag type: type, layout: layout
      test "#{inspect(layout)} in #{inspect(type)} equals the dot of the dequantized values",
           %{type: type, layout: layout} do
        w = random({256, 48}, type)
        x = random({3, 256}, type)
        q = quantize(w, layout)
        dq = Quantized.dequantize(q)

        assert Quantized.quantized?(q)
        assert {q.shape, q.type} == {{256, 48}, type}
        assert {dq.shape, dq.type} == {{256, 48}, type}
        refute Quantized.quantized?(dq)

        want = Nx.dot(x, dq)
        got = Nx.dot(x, q)
        assert {got.shape, got.type} == {{3, 48}, type}
        assert_dot_close(got, want, x, dq, type)

        {jitted, ops} = ops_of(&Nx.dot/2, [x, q])
        assert_dot_close(jitted, want, x, dq, type)
        # One quantized_matmul, nothing dequantized.
        assert ops == 1

        evaluated = Nx.Defn.jit(&Nx.dot/2).(x, q)
        assert_dot_close(evaluated, want, x, dq, type)
      end
    end

    # On the CPU our kernel serves up to 8 rows of x and the dequantized weights with a BLAS
    # matmul past that; a contracted size that is not a whole chunk of words (64 values for
    # 4 bits, 128 for 2) has a tail.
    for {bits, group} <- [{2, 32}, {4, 32}, {8, 32}, {4, 64}] do
      @tag bits: bits, group: group
      test "#{bits} bits, group #{group}: 1, 8 and 20 rows, 96 and 224 values", %{
        bits: bits,
        group: group
      } do
        for k <- [96, 224], rem(k, group) == 0, m <- [1, 8, 20] do
          w = random({k, 40})
          x = random({m, k})
          q = quantize(w, {:affine, bits, group})
          dq = Quantized.dequantize(q)
          assert_dot_close(Nx.dot(x, q), Nx.dot(x, dq), x, dq, {:f, 32})
          x16 = Nx.as_type(x, :bf16)
          assert_dot_close(Nx.dot(x16, q), Nx.dot(x16, dq), x16, dq, {:bf, 16})
        end
      end
    end

    test "the dequantized dot takes three ops where the fused one takes one" do
      w = random({128, 32})
      {_, ops} = ops_of(&Nx.dot/2, [random({2, 128}), w])
      {_, q_ops} = ops_of(&Nx.dot/2, [random({2, 128}), quantize(w, {:affine, 4, 64})])

      {_, dq_ops} =
        ops_of(fn x, w -> Nx.dot(x, Nx.multiply(w, 2.0)) end, [
          random({2, 128}),
          quantize(w, {:affine, 4, 64})
        ])

      assert ops == 1 and q_ops == 1
      assert dq_ops >= 3
    end

    test "every form of the dot is right: left operand, other axes, ranks, batches, types" do
      w = random({128, 32})
      q = quantize(w, {:affine, 8, 32})
      dq = Quantized.dequantize(q)
      x3 = random({2, 3, 128})
      xt = random({128, 5})
      y = random({32, 4})
      x16 = Nx.as_type(random({2, 128}), :f16)
      b = random({2, 128, 3})

      forms = [
        # x {2, 3, 128} . q
        fn w -> Nx.dot(x3, [2], w, [0]) end,
        # contracted along x's first axis
        fn w -> Nx.dot(xt, [0], w, [0]) end,
        # the quantized operand on the left
        fn w -> Nx.dot(w, [0], xt, [0]) end,
        # contracted along the other axis: dequantized
        fn w -> Nx.dot(w, [1], y, [0]) end,
        # an integer and an f16 operand
        fn w -> Nx.dot(Nx.iota({2, 128}, type: :s32), w) end,
        fn w -> Nx.dot(x16, w) end,
        # batched: dequantized
        fn w -> Nx.dot(Nx.stack([w, w]), [1], [0], b, [1], [0]) end,
        # both quantized
        fn w -> Nx.dot(w, [0], w, [0]) end
      ]

      for f <- forms do
        want = f.(dq)
        got = f.(q)
        assert {got.shape, got.type} == {want.shape, want.type}
        assert Nx.to_number(Nx.all_close(f32(got), f32(want), atol: 1.0e-3, rtol: 1.0e-3)) == 1
      end
    end

    test "a quantized parameter used by other ops, or returned, reads its values" do
      q = quantize(random({64, 32}), {:affine, 4, 32})
      dq = Quantized.dequantize(q)
      x = random({2, 64})

      fun = fn x, w -> {Nx.dot(x, w), Nx.sum(w, axes: [0]), w, Nx.transpose(w)} end
      {a, b, c, d} = Nx.Defn.jit(fun, compiler: NxMlx, device: @device).(x, q)
      {a2, b2, c2, d2} = fun.(x, dq)

      for {got, want} <- [{a, a2}, {b, b2}, {c, c2}, {d, d2}] do
        refute Quantized.quantized?(got)
        assert Nx.to_number(Nx.all_close(f32(got), f32(want), atol: 1.0e-4)) == 1
      end

      # The same program serves another quantized weight of the same layout, and a plain one.
      q2 = quantize(random({64, 32}), {:affine, 4, 32})
      jit = Nx.Defn.jit(&Nx.dot/2, compiler: NxMlx, device: @device)

      assert_dot_close(
        jit.(x, q2),
        Nx.dot(x, Quantized.dequantize(q2)),
        x,
        Quantized.dequantize(q2),
        {:f, 32}
      )

      assert_dot_close(jit.(x, dq), Nx.dot(x, dq), x, dq, {:f, 32})
      assert_dot_close(jit.(x, q), Nx.dot(x, dq), x, dq, {:f, 32})
    end

    test "Nx.Defn.compile/3 and a stack of layers" do
      w1 = quantize(random({128, 64}), {:affine, 4, 64})
      w2 = quantize(random({64, 32}), {:affine, 8, 64})
      x = random({4, 128})
      fun = fn x, w1, w2 -> x |> Nx.dot(w1) |> Nx.max(0) |> Nx.dot(w2) end
      want = fun.(x, Quantized.dequantize(w1), Quantized.dequantize(w2))

      compiled = Nx.Defn.compile(fun, [x, w1, w2], compiler: NxMlx, device: @device)
      got = compiled.(x, w1, w2)
      assert Nx.to_number(Nx.all_close(f32(got), f32(want), atol: 1.0e-3, rtol: 1.0e-3)) == 1
    end
  end

  describe "quantize/2" do
    test "affine error stays within one step of each group's range" do
      w = random({128, 64})

      for {_, bits, group} = layout <- Enum.filter(@layouts, &(elem(&1, 0) == :affine)) do
        dq = w |> quantize(layout) |> Quantized.dequantize()
        # Groups along axis 0: columns of `group` rows.
        groups = fn t -> t |> Nx.transpose() |> Nx.reshape({:auto, group}) end
        g = groups.(w)
        step = Nx.subtract(Nx.reduce_max(g, axes: [1]), Nx.reduce_min(g, axes: [1]))
        step = Nx.divide(step, 2 ** bits - 1)
        err = Nx.reduce_max(Nx.abs(Nx.subtract(groups.(dq), g)), axes: [1])
        assert Nx.to_number(Nx.all(Nx.less_equal(err, Nx.add(step, 1.0e-6)))) == 1
        # and not wildly better than half a step: the values are really quantized
        assert Nx.to_number(Nx.reduce_max(Nx.subtract(err, Nx.multiply(step, 0.25)))) > 0
      end
    end

    test "any axis and rank, and the layout it reports" do
      w = random({2, 32, 64})
      q = Quantized.quantize(w, axis: 2, group_size: 32, bits: 8)

      assert %{mode: :affine, bits: 8, group_size: 32, axis: 2, bytes: bytes} =
               Quantized.layout(q)

      # 8 bits per value plus an f32 scale and bias per 32 values.
      assert bytes == 2 * 32 * 64 + 2 * (2 * 32 * 2) * 4
      dq = Quantized.dequantize(q)
      assert Nx.to_number(Nx.all_close(f32(dq), f32(w), atol: 1.0e-2)) == 1
    end

    test "inspect, transfers and copies read the values; a device copy stays quantized" do
      q = quantize(random({64, 8}), {:affine, 4, 32})
      dq = Quantized.dequantize(q)
      assert inspect(q) =~ "f32[64][8]"
      assert Nx.to_binary(q) == Nx.to_binary(dq)
      assert Nx.backend_transfer(q, Nx.BinaryBackend) == Nx.backend_transfer(dq, Nx.BinaryBackend)
      assert Nx.backend_copy(q, Nx.BinaryBackend) |> Nx.to_binary() == Nx.to_binary(dq)
      other = if @device == :cpu, do: :cpu, else: :cpu
      moved = Nx.backend_transfer(q, {NxMlx.Backend, device: other})
      assert Quantized.quantized?(moved)
      assert Nx.to_binary(moved) == Nx.to_binary(dq)
      assert {:ok, command} = NxMlx.submit(q)
      assert :ok = NxMlx.wait(command)
    end

    test "refuses what it cannot quantize, naming the op and shapes" do
      f = random({64, 32})

      for {t, opts, message} <- [
            {Nx.iota({64, 32}, backend: @mlx), [],
             ~r/f32, f16 or bf16 tensors, got \{:s, 32\} of shape \{64, 32\}/},
            {random({64}), [], ~r/rank 2 or more, got shape \{64\}/},
            {f, [axis: 2], ~r/axis 2 is out of range/},
            {random({48, 32}), [],
             ~r/axis 0 of shape \{48, 32\} is not a multiple of the group size 64/},
            {f, [mode: :int4], ~r/:mode is one of/},
            {f, [bits: 7], ~r/bits in/},
            {f, [mode: :mxfp4, group_size: 64], ~r/group sizes in \[32\]/},
            {quantize(f, {:affine, 4, 32}), [], ~r/quantized already/}
          ] do
        assert_raise ArgumentError, message, fn -> Quantized.quantize(t, opts) end
      end

      assert_raise ArgumentError, ~r/not quantized/, fn -> Quantized.layout(f) end
      assert Quantized.dequantize(f) == f
    end
  end

  describe "quantize_params/2" do
    test "quantizes the kernels chosen by name, size and path" do
      params = %{
        "encoder" => %{
          "dense_0" => %{"kernel" => random({256, 64}), "bias" => random({64})},
          "dense_1" => %{"kernel" => random({64, 128})},
          "small" => %{"kernel" => random({32, 32})},
          "odd" => %{"kernel" => random({100, 64})}
        },
        "head" => %{"kernel" => random({128, 64}), "scale" => 2}
      }

      q = Quantized.quantize_params(params, bits: 8, group_size: 64, min_size: 2048)
      assert Quantized.quantized?(q["encoder"]["dense_0"]["kernel"])
      assert Quantized.quantized?(q["encoder"]["dense_1"]["kernel"])
      assert Quantized.quantized?(q["head"]["kernel"])
      refute Quantized.quantized?(q["encoder"]["dense_0"]["bias"])
      # under min_size; axis 0 not a multiple of 64
      refute Quantized.quantized?(q["encoder"]["small"]["kernel"])
      refute Quantized.quantized?(q["encoder"]["odd"]["kernel"])
      assert q["head"]["scale"] == 2
      assert Quantized.layout(q["head"]["kernel"]).bits == 8

      only =
        Quantized.quantize_params(params, only: ["encoder"], except: [~r/dense_1$/], min_size: 1)

      assert Quantized.quantized?(only["encoder"]["dense_0"]["kernel"])
      refute Quantized.quantized?(only["encoder"]["dense_1"]["kernel"])
      refute Quantized.quantized?(only["head"]["kernel"])

      x = random({2, 256})
      dense = fn p, x -> Nx.dot(x, p["encoder"]["dense_0"]["kernel"]) end
      kernel = Quantized.dequantize(q["encoder"]["dense_0"]["kernel"])
      assert_dot_close(dense.(q, x), Nx.dot(x, kernel), x, kernel, {:f, 32})
    end
  end

  describe "from_ggml/4" do
    # GGML's blocks, written here from their definition: Q4_0 (f16 d, then 16 bytes, value j
    # in the low nibble of byte j and value j + 16 in its high nibble; d * (q - 8)) and Q8_0
    # (f16 d, 32 signed bytes; d * q).
    defp ggml_blocks(format, rows, k) do
      for _ <- 1..div(rows * k, 32) do
        d = (:rand.uniform() - 0.5) * 0.2
        <<d16::float-little-16>> = <<d::float-little-16>>

        qs =
          if format == :q4_0,
            do: for(_ <- 1..32, do: :rand.uniform(16) - 1),
            else: for(_ <- 1..32, do: :rand.uniform(256) - 129)

        {d16, qs}
      end
    end

    defp encode(:q4_0, blocks) do
      for {d, qs} <- blocks, into: <<>> do
        {lo, hi} = Enum.split(qs, 16)

        <<d::float-little-16,
          for({a, b} <- Enum.zip(lo, hi), into: <<>>, do: <<a + 16 * b>>)::binary>>
      end
    end

    defp encode(:q8_0, blocks) do
      for {d, qs} <- blocks, into: <<>> do
        <<d::float-little-16, for(q <- qs, into: <<>>, do: <<q::signed-8>>)::binary>>
      end
    end

    defp values(:q4_0, blocks), do: for({d, qs} <- blocks, q <- qs, do: d * (q - 8))
    defp values(:q8_0, blocks), do: for({d, qs} <- blocks, q <- qs, do: d * q)

    for format <- [:q4_0, :q8_0] do
      @tag format: format
      test "#{format} loads exactly and dots fused", %{format: format} do
        {rows, k} = {6, 96}
        blocks = ggml_blocks(format, rows, k)
        data = encode(format, blocks)
        want = Nx.tensor(values(format, blocks), type: :f32) |> Nx.reshape({rows, k})

        w = Quantized.from_ggml(data, format, {rows, k}, type: :f32, device: @device)
        assert %{bits: bits, group_size: 32, mode: :affine} = Quantized.layout(w)
        assert bits == if(format == :q4_0, do: 4, else: 8)
        assert w.shape == {rows, k}
        # Exact (Nx.equal: GGML's d * 0 may be -0.0 where MLX's d * 8 - 8d is 0.0).
        assert Nx.to_number(Nx.all(Nx.equal(f32(w), want))) == 1

        kernel =
          Quantized.from_ggml(data, format, {rows, k}, axis: 0, type: :f32, device: @device)

        assert kernel.shape == {k, rows}
        assert Nx.to_number(Nx.all(Nx.equal(f32(kernel), Nx.transpose(want)))) == 1

        x = random({2, k})
        {got, ops} = ops_of(&Nx.dot/2, [x, kernel])
        assert ops == 1
        assert_dot_close(got, Nx.dot(f32(x), Nx.transpose(want)), x, Nx.transpose(want), {:f, 32})
        {got_t, _} = ops_of(fn x, w -> Nx.dot(x, [1], w, [1]) end, [x, w])

        assert_dot_close(
          got_t,
          Nx.dot(f32(x), Nx.transpose(want)),
          x,
          Nx.transpose(want),
          {:f, 32}
        )

        # f16 (the default): the same scales; dequantizing rounds scale * q (q up to 255)
        # and the sum with the bias in f16: within two roundings of |d| * 256 (d < 0.1).
        half = Quantized.from_ggml(data, format, {rows, k}, device: @device)
        assert half.type == {:f, 16}

        assert Nx.to_number(Nx.all_close(f32(half), want, atol: 0.1 * 256 * 2 * 4.9e-4, rtol: 0)) ==
                 1
      end
    end

    test "refuses data that is not whole blocks of the shape" do
      data = encode(:q4_0, ggml_blocks(:q4_0, 2, 64))

      assert_raise ArgumentError, ~r/takes 72 bytes, got 71/, fn ->
        Quantized.from_ggml(binary_part(data, 0, 71), :q4_0, {2, 64})
      end

      assert_raise ArgumentError, ~r/not whole blocks/, fn ->
        Quantized.from_ggml(data, :q4_0, {4, 16})
      end

      assert_raise ArgumentError, ~r/:q4_0 or :q8_0/, fn ->
        Quantized.from_ggml(data, :q2_k, {2, 64})
      end

      assert_raise ArgumentError, ~r/:type/, fn ->
        Quantized.from_ggml(data, :q4_0, {2, 64}, type: :s8)
      end
    end
  end

  describe "expert_dot/3" do
    test "gather_qmm equals the default function, eagerly and jitted, indices clamped" do
      experts = random({4, 64, 24})
      q = Quantized.quantize(experts, bits: 4, group_size: 32)
      dq = Quantized.dequantize(q)
      x = random({2, 3, 64})
      idx = Nx.tensor([[0, 3, 1], [2, 2, 7]], backend: @mlx)

      want =
        Quantized.expert_dot(
          Nx.backend_copy(x, Nx.BinaryBackend),
          Nx.backend_copy(dq, Nx.BinaryBackend),
          Nx.backend_copy(idx, Nx.BinaryBackend)
        )

      assert want.shape == {2, 3, 24}
      # Row 5 used expert 3 (7 clamped).
      last = Nx.dot(f32(x)[1][2], f32(dq)[3])
      assert Nx.to_number(Nx.all_close(want[1][2], last, atol: 1.0e-4)) == 1

      eager = Quantized.expert_dot(x, q, idx)
      {jitted, ops} = ops_of(&Quantized.expert_dot/3, [x, q, idx])
      assert ops <= 4

      for got <- [eager, jitted] do
        assert got.shape == {2, 3, 24}
        assert Nx.to_number(Nx.all_close(f32(got), want, atol: 1.0e-4, rtol: 1.0e-4)) == 1
      end

      # Plain experts on NxMlx run the default.
      assert Nx.to_number(Nx.all_close(f32(Quantized.expert_dot(x, dq, idx)), want, atol: 1.0e-4)) ==
               1
    end

    test "refuses shapes that do not fit" do
      assert_raise ArgumentError, ~r/expert_dot: expects/, fn ->
        Quantized.expert_dot(random({2, 64}), random({4, 32, 8}), Nx.tensor([0, 1]))
      end

      assert_raise ArgumentError, ~r/expert_dot: expects/, fn ->
        Quantized.expert_dot(random({2, 64}), random({4, 64, 8}), Nx.tensor([0.0, 1.0]))
      end
    end
  end

  describe "the NIF called directly" do
    defp worker, do: Runtime.worker(@device)

    test "refuses layouts, part counts and shapes it cannot take" do
      w = random({64, 64}).data.ref
      x = random({2, 64}).data.ref
      i = Nx.iota({64, 64}, backend: @mlx).data.ref

      # quantize runs on the worker (several outputs): through Runtime.call, which raises.
      quantize = fn args -> Runtime.call(:quantize, [worker() | args], fn -> "quantize" end) end

      for {g, b, m} <- [
            {64, 7, :affine},
            {64, 1, :affine},
            {48, 4, :affine},
            {0, 4, :affine},
            {64, 4, :int4},
            {64, :four, :affine}
          ] do
        assert_raise ArgumentError, fn -> quantize.([w, m, g, b]) end
      end

      assert_raise ArgumentError, fn -> quantize.([i, :affine, 64, 4]) end
      assert_raise ArgumentError, fn -> quantize.([random({64}).data.ref, :affine, 64, 4]) end
      assert_raise ArgumentError, fn -> quantize.([random({64, 48}).data.ref, :affine, 64, 4]) end
      assert [p, s, b] = quantize.([w, :affine, 64, 4])

      assert {:error, {:argument, _}} = Native.dequantize(worker(), [p, s], :affine, 64, 4, :f32)

      assert {:error, {:argument, _}} =
               Native.dequantize(worker(), [w, s, b], :affine, 64, 4, :f32)

      assert {:error, {:argument, _}} =
               Native.dequantize(worker(), [p, s, b], :affine, 64, 4, :s32)

      assert {:ok, _} = Native.dequantize(worker(), [p, s, b], :affine, 64, 4, :f32)

      assert {:error, {:argument, _}} =
               Native.quantized_matmul(worker(), [x, p, s], :affine, 64, 4, true)

      assert {:error, {:argument, _}} =
               Native.quantized_matmul(
                 worker(),
                 [random({2, 32}).data.ref, p, s, b],
                 :affine,
                 64,
                 4,
                 true
               )

      assert {:error, {:argument, _}} =
               Native.quantized_matmul(worker(), [i, p, s, b], :affine, 64, 4, true)

      assert {:error, {:argument, _}} =
               Native.quantized_matmul(worker(), [x, p, s, b], :affine, 32, 4, true)

      # An empty x (no rows): MLX's kernels would divide by zero (SIGFPE) on 3 bits.
      empty = Runtime.call(:full, [worker(), [0, 64], 0.5, :f32], fn -> "full" end)
      [p3b, s3b, b3b] = quantize.([w, :affine, 32, 3])

      assert {:error, {:argument, _}} =
               Native.quantized_matmul(worker(), [empty, p3b, s3b, b3b], :affine, 32, 3, false)

      assert {:error, {:argument, _}} =
               Native.quantized_matmul(worker(), [empty, p, s, b], :affine, 64, 4, true)

      assert {:ok, y} = Native.quantized_matmul(worker(), [x, p, s, b], :affine, 64, 4, true)
      assert is_binary(Runtime.call(:to_binary, [y], fn -> "to_binary" end))

      idx = Nx.tensor([5, -3], type: :s32, backend: @mlx).data.ref
      x3 = random({2, 1, 64}).data.ref
      w3 = random({2, 64, 64}).data.ref
      [p3, s3, b3] = quantize.([w3, :affine, 64, 4])
      fidx = Nx.tensor([0.0, 1.0], backend: @mlx).data.ref

      assert {:error, {:argument, _}} =
               Native.gather_qmm(
                 worker(),
                 [x3, p3, s3, b3, fidx],
                 :affine,
                 64,
                 4,
                 true,
                 false,
                 true
               )

      assert {:error, {:argument, _}} =
               Native.gather_qmm(worker(), [x3, p3, s3, b3], :affine, 64, 4, true, false, true)

      # Out-of-range indices are clamped: no read outside the experts.
      assert {:ok, y3} =
               Native.gather_qmm(
                 worker(),
                 [x3, p3, s3, b3, idx],
                 :affine,
                 64,
                 4,
                 true,
                 false,
                 true
               )

      assert is_binary(Runtime.call(:to_binary, [y3], fn -> "to_binary" end))
    end
  end
end
