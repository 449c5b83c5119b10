defmodule NxMlx.FastTest do
  # NxMlx.Fast's blocks on NxMlx.Backend (eager and `compiler: NxMlx`) against their default
  # functions on Nx.BinaryBackend, on seeded random inputs, in f32, f16 and bf16; gradients
  # against the default function's; argument errors.
  #
  # Tolerances (absolute and relative, on values of magnitude about 1): f32 1.0e-5, f16
  # 4.0e-3, bf16 3.0e-2 (two roundings of the type: both sides compute the statistics in f32
  # and round once, but not always at the same step); attention in f16/bf16 2x those (the
  # scores and weights are rounded to the type before the second product).
  use ExUnit.Case, async: true

  import NxMlx.TestHelpers

  alias NxMlx.Fast

  doctest NxMlx.Fast

  @mlx {NxMlx.Backend, device: NxMlx.TestHelpers.oracle_device()}
  @tol %{{:f, 32} => 1.0e-5, {:f, 16} => 4.0e-3, {:bf, 16} => 3.0e-2}

  setup do
    :rand.seed(:exsss, {5, 8, 13})
    :ok
  end

  defp random(shape, type \\ {:f, 32}, scale \\ 2.0) do
    n = Tuple.product(shape)
    values = for _ <- 1..n, do: (:rand.uniform() * 2 - 1) * scale

    Nx.tensor(values, type: {:f, 32}, backend: Nx.BinaryBackend)
    |> Nx.reshape(shape)
    |> Nx.as_type(type)
  end

  defp mlx(t), do: Nx.backend_copy(t, @mlx)

  defp binary(t), do: Nx.backend_transfer(t, Nx.BinaryBackend)

  # fun on Nx.BinaryBackend (the default function) against NxMlx eagerly and jitted.
  defp check(name, fun, args, tol) do
    want = apply(fun, args)
    inputs = Enum.map(args, fn %Nx.Tensor{} = t -> mlx(t) end)
    eager = apply(fun, inputs) |> binary()
    jit = Nx.Defn.jit(fun, compiler: NxMlx, device: oracle_device(), on_unsupported: :raise)
    jitted = apply(jit, inputs) |> binary()

    for {lane, got} <- [eager: eager, jit: jitted] do
      assert got.shape == want.shape, "#{name} (#{lane}): shape #{inspect(got.shape)}"
      assert got.type == want.type, "#{name} (#{lane}): type #{inspect(got.type)}"

      close =
        Nx.all_close(Nx.as_type(got, :f32), Nx.as_type(want, :f32), atol: tol, rtol: tol)
        |> Nx.to_number()

      assert close == 1,
             "#{name} (#{lane}) differs from the default function by " <>
               "#{Nx.to_number(Nx.reduce_max(Nx.abs(Nx.subtract(Nx.as_type(got, :f32), Nx.as_type(want, :f32)))))}"
    end
  end

  for type <- [{:f, 32}, {:f, 16}, {:bf, 16}] do
    @type_ type

    describe "#{inspect(type)}" do
      test "norms" do
        t = @type_
        tol = @tol[t]
        x = random({2, 3, 7, 12}, t)
        w = random({12}, t)
        b = random({12}, t)
        check("rms_norm", &Fast.rms_norm(&1, &2, eps: 1.0e-6), [x, w], tol)
        check("rms_norm without weight", &Fast.rms_norm(&1, nil), [x], tol)
        check("layer_norm", &Fast.layer_norm(&1, &2, &3), [x, w, b], tol)
        check("layer_norm without bias", &Fast.layer_norm(&1, &2, nil, eps: 1.0e-3), [x, w], tol)
        check("layer_norm without weight", &Fast.layer_norm(&1, nil, &2), [x, b], tol)
        check("layer_norm alone", &Fast.layer_norm(&1), [random({5, 1}, t)], tol)
        check("rms_norm of one row", &Fast.rms_norm(&1, &2), [random({1, 12}, t), w], tol)
      end

      test "softmax, log_softmax and activations" do
        t = @type_
        tol = @tol[t]
        x = random({3, 5, 17}, t, 6.0)
        check("softmax", &Fast.softmax(&1), [x], tol)
        check("softmax axis 1", &Fast.softmax(&1, axis: 1), [x], tol)
        check("softmax axis 0", &Fast.softmax(&1, axis: -3), [x], tol)
        check("log_softmax", &Fast.log_softmax(&1, axis: 1), [x], tol * 4)
        check("gelu", &Fast.gelu(&1), [x], tol)
        check("gelu tanh", &Fast.gelu(&1, approximate: :tanh), [x], tol)
        check("swiglu", &Fast.swiglu(&1, &2), [x, random({3, 5, 17}, t)], tol)
        check("softcap", &Fast.softcap(&1, 2.5), [x], tol)
      end

      test "rope" do
        t = @type_
        tol = @tol[t]
        x = random({2, 3, 9, 16}, t)
        check("rope", &Fast.rope(&1), [x], tol)
        check("rope traditional", &Fast.rope(&1, traditional: true), [x], tol)
        check("rope partial", &Fast.rope(&1, dims: 6, base: 500.0, scale: 0.5), [x], tol)
        check("rope partial traditional", &Fast.rope(&1, dims: 4, traditional: true), [x], tol)
        check("rope integer offset", &Fast.rope(&1, offset: 37), [x], tol)
        check("rope rank 3", &Fast.rope(&1), [random({2, 9, 16}, t)], tol)
        check("rope one position", &Fast.rope(&1, offset: 5), [random({2, 3, 1, 16}, t)], tol)

        # Tensor offsets: one for all, one per batch entry; precomputed periods.
        check("rope scalar offset", &Fast.rope(&1, offset: &2), [x, Nx.tensor(11)], tol)
        check("rope offsets", &Fast.rope(&1, offset: &2), [x, Nx.tensor([3, 250])], tol)

        freqs = Nx.tensor([1.0, 2.0, 7.0, 30.0, 100.0, 1.0e3, 1.0e4, 5.0e4])
        check("rope freqs", &Fast.rope(&1, freqs: &2), [x, freqs], tol)
      end

      test "scaled dot-product attention" do
        t = @type_
        tol = @tol[t] * 2
        q = random({2, 6, 5, 8}, t)
        k = random({2, 2, 7, 8}, t)
        v = random({2, 2, 7, 3}, t)
        sdpa = &Fast.scaled_dot_product_attention/4
        check("sdpa grouped", &sdpa.(&1, &2, &3, []), [q, k, v], tol)
        check("sdpa causal", &sdpa.(&1, &2, &3, causal: true, scale: 0.7), [q, k, v], tol)

        bool = Nx.greater(random({2, 1, 5, 7}), -0.5)
        check("sdpa boolean mask", &sdpa.(&1, &2, &3, mask: &4), [q, k, v, bool], tol)

        # A row masked everywhere attends uniformly (the type's lowest finite score).
        none =
          Nx.broadcast(Nx.tensor(0, type: :u8), {5, 7})
          |> Nx.put_slice([1, 0], Nx.broadcast(Nx.tensor(1, type: :u8), {4, 7}))

        check("sdpa row masked everywhere", &sdpa.(&1, &2, &3, mask: &4), [q, k, v, none], tol)

        additive = random({5, 7}, t)
        check("sdpa additive mask", &sdpa.(&1, &2, &3, mask: &4), [q, k, v, additive], tol)
        check("sdpa sinks", &sdpa.(&1, &2, &3, sinks: &4), [q, k, v, random({6}, t)], tol)

        check(
          "sdpa causal with sinks",
          &sdpa.(&1, &2, &3, causal: true, sinks: &4),
          [q, k, v, random({6}, t)],
          tol
        )

        # One query over a longer cache (a decode step), one head per key/value head.
        q1 = random({1, 4, 1, 16}, t)
        k1 = random({1, 4, 33, 16}, t)
        v1 = random({1, 4, 33, 16}, t)
        check("sdpa decode step", &sdpa.(&1, &2, &3, causal: true), [q1, k1, v1], tol)
      end
    end
  end

  test "the native kernels serve f32, f16 and bf16 (the default function is not called)" do
    x = mlx(random({4, 8}))
    w = mlx(random({8}))
    raising = fn _struct, _x, _w -> raise "the default function ran" end
    out = Nx.template({4, 8}, {:f, 32})

    for struct <- [%Fast.RMSNorm{eps: 1.0e-5}, %Fast.LayerNorm{eps: 1.0e-5, bias?: false}] do
      assert %Nx.Tensor{} = Nx.block(struct, [x, w], out, raising)
    end

    q = mlx(random({1, 2, 3, 8}))
    attention = %Fast.Attention{scale: 0.5}

    assert %Nx.Tensor{shape: {1, 2, 3, 8}} =
             Nx.block(attention, [q, q, q], Nx.template({1, 2, 3, 8}, {:f, 32}), fn _, _, _, _ ->
               raise "the default function ran"
             end)

    # f64 (CPU) runs the default: MLX's norm kernels compute in f32.
    if oracle_device() == :cpu do
      x64 = Nx.as_type(x, :f64)
      w64 = Nx.as_type(w, :f64)

      assert_raise RuntimeError, "the default function ran", fn ->
        Nx.block(%Fast.RMSNorm{eps: 1.0e-5}, [x64, w64], Nx.template({4, 8}, {:f, 64}), raising)
      end

      want = Fast.rms_norm(binary(x64), binary(w64))

      assert Nx.all_close(binary(Fast.rms_norm(x64, w64)), want, atol: 1.0e-12) |> Nx.to_number() ==
               1
    end
  end

  test "gradients equal the default function's" do
    x = random({2, 3, 5, 8})
    w = random({8})
    q = random({1, 4, 5, 8})
    k = random({1, 2, 6, 8})
    v = random({1, 2, 6, 8})
    cot = random({2, 3, 5, 8})

    cases = [
      {"rms_norm", fn x, w -> Nx.sum(Nx.multiply(Fast.rms_norm(x, w), cot)) end, [x, w]},
      {"layer_norm", fn x, w -> Nx.sum(Nx.multiply(Fast.layer_norm(x, w, w), cot)) end, [x, w]},
      {"softmax", fn x, w -> Nx.sum(Nx.multiply(Fast.softmax(Nx.multiply(x, w)), cot)) end,
       [x, w]},
      {"rope", fn x, w -> Nx.sum(Nx.multiply(Fast.rope(Nx.multiply(x, w), offset: 3), cot)) end,
       [x, w]},
      {"attention",
       fn q, k -> Nx.sum(Fast.scaled_dot_product_attention(q, k, v, causal: true)) end, [q, k]}
    ]

    for {name, f, [a, b]} <- cases do
      grad = fn a, b -> Nx.Defn.grad({a, b}, fn {a, b} -> f.(a, b) end) end
      {wa, wb} = grad.(a, b)
      {ga, gb} = Nx.Defn.jit(grad, compiler: NxMlx, device: oracle_device()).(mlx(a), mlx(b))

      for {got, want, which} <- [{ga, wa, 1}, {gb, wb, 2}] do
        assert Nx.all_close(binary(got), want, atol: 1.0e-4, rtol: 1.0e-4) |> Nx.to_number() == 1,
               "#{name}: gradient #{which}"
      end
    end
  end

  test "integer and f64 inputs, NaN and infinities agree with the default function" do
    ints = fn shape -> Nx.iota(shape, type: :s32) |> Nx.remainder(7) |> Nx.subtract(3) end
    check("rope of integers", &Fast.rope(&1), [ints.({1, 2, 3, 8})], 1.0e-5)
    check("rms_norm of integers", &Fast.rms_norm(&1, &2), [ints.({3, 8}), random({8})], 1.0e-5)
    check("gelu of integers", &Fast.gelu(&1), [ints.({5})], 1.0e-5)
    q = ints.({1, 2, 3, 8})

    check(
      "attention of integers",
      &Fast.scaled_dot_product_attention(&1, &2, &3),
      [q, q, q],
      1.0e-5
    )

    # Causal with more queries than keys: the first rows see no key and attend uniformly.
    check(
      "causal, more queries than keys",
      &Fast.scaled_dot_product_attention(&1, &2, &3, causal: true),
      [random({1, 2, 5, 8}), random({1, 2, 3, 8}), random({1, 2, 3, 8})],
      1.0e-5
    )

    if oracle_device() == :cpu do
      x = random({2, 3, 4, 8}, {:f, 64})
      check("rope f64", &Fast.rope(&1, offset: 9), [x], 1.0e-12)
      # A scale f32 represents exactly: eagerly Nx rounds a number operand to f32, under defn
      # it stays exact.
      check(
        "attention f64",
        &Fast.scaled_dot_product_attention(&1, &2, &3, scale: 0.25),
        [x, x, x],
        1.0e-12
      )
    end

    special = Nx.tensor([[1.0, :nan, 2.0], [:infinity, 1.0, 0.0], [:neg_infinity, 1.0, 2.0]])

    for {name, f} <- [
          softmax: &Fast.softmax/1,
          rms_norm: &Fast.rms_norm(&1, nil),
          layer_norm: &Fast.layer_norm/1
        ] do
      want = f.(special)
      got = f.(mlx(special)) |> binary()

      assert Nx.all_close(got, want, equal_nan: true) |> Nx.to_number() == 1,
             "#{name}: #{inspect(got)}"
    end
  end

  test "cached_attention: a prompt then steps over a cache equal causal attention over the whole sequence" do
    {heads, kv_heads, d, capacity} = {4, 2, 8, 9}
    seq = 6
    q = random({1, heads, seq, d})
    k = random({1, kv_heads, seq, d})
    v = random({1, kv_heads, seq, d})
    full = Fast.scaled_dot_product_attention(q, k, v, causal: true)
    empty = Nx.broadcast(0.0, {1, kv_heads, capacity, d})
    step = fn q, k, v, kc, vc, p -> Fast.cached_attention(q, k, v, kc, vc, p) end
    jitted = Nx.Defn.jit(step, compiler: NxMlx, device: oracle_device())

    for {lane, run, wrap} <- [
          binary: {step, & &1},
          eager: {step, &mlx/1},
          jit: {jitted, &mlx/1}
        ] do
      # A prompt of 4 at position 0, then one entry at a time (a tensor position).
      slice = fn t, from, n -> Nx.slice_along_axis(t, from, n, axis: 2) |> wrap.() end

      {out, kc, vc} =
        run.(slice.(q, 0, 4), slice.(k, 0, 4), slice.(v, 0, 4), wrap.(empty), wrap.(empty), 0)

      outs = [out]

      {outs, _, _} =
        Enum.reduce(4..(seq - 1), {outs, kc, vc}, fn p, {outs, kc, vc} ->
          pos = wrap.(Nx.tensor(p))
          {o, kc, vc} = run.(slice.(q, p, 1), slice.(k, p, 1), slice.(v, p, 1), kc, vc, pos)
          {outs ++ [o], kc, vc}
        end)

      got = outs |> Enum.map(&binary/1) |> Nx.concatenate(axis: 2)

      assert Nx.all_close(got, full, atol: 1.0e-5, rtol: 1.0e-5) |> Nx.to_number() == 1,
             "#{lane}: #{Nx.to_number(Nx.reduce_max(Nx.abs(Nx.subtract(got, full))))}"
    end

    assert_raise ArgumentError, ~r/do not fit a cache of 9/, fn ->
      Fast.cached_attention(
        random({1, 4, 10, 8}),
        random({1, 2, 10, 8}),
        random({1, 2, 10, 8}),
        empty,
        empty,
        0
      )
    end

    assert_raise ArgumentError, ~r/do not hold entries/, fn ->
      Fast.cached_attention(q, k, v, Nx.broadcast(0.0, {1, 2, 9, 4}), empty, 0)
    end

    assert_raise ArgumentError, ~r/position is a non-negative integer/, fn ->
      Fast.cached_attention(q, k, v, empty, empty, -1)
    end
  end

  test "bad arguments raise ArgumentError naming the function" do
    x = mlx(random({2, 3, 8}))

    assert_raise ArgumentError, ~r/rms_norm: weight must have shape \{8\}/, fn ->
      Fast.rms_norm(x, mlx(random({7})))
    end

    assert_raise ArgumentError, ~r/softmax: axis 3 is out of range/, fn ->
      Fast.softmax(x, axis: 3)
    end

    assert_raise ArgumentError, ~r/gelu: :approximate/, fn -> Fast.gelu(x, approximate: :fast) end

    assert_raise ArgumentError, ~r/softcap: the cap is a positive number/, fn ->
      Fast.softcap(x, 0)
    end

    assert_raise ArgumentError, ~r/swiglu: gate and up/, fn ->
      Fast.swiglu(x, mlx(random({2, 8})))
    end

    assert_raise ArgumentError, ~r/rope: :dims must be a positive even/, fn ->
      Fast.rope(x, dims: 5)
    end

    assert_raise ArgumentError, ~r/rope: x must have at least 3 axes/, fn ->
      Fast.rope(mlx(random({3, 8})))
    end

    assert_raise ArgumentError, ~r/rope: :offset/, fn ->
      Fast.rope(x, offset: Nx.tensor([1, 2, 3]))

      assert_raise ArgumentError, ~r/rope: :offset is a 32-bit/, fn ->
        Fast.rope(x, offset: 2 ** 31)
      end
    end

    assert_raise ArgumentError, ~r/rope: :freqs must have shape \{4\}/, fn ->
      Fast.rope(x, freqs: Nx.tensor([1.0]))
    end

    q = mlx(random({1, 3, 4, 8}))
    k = mlx(random({1, 2, 4, 8}))
    sdpa = &Fast.scaled_dot_product_attention/4

    assert_raise ArgumentError, ~r/multiple of the key\/value heads/, fn -> sdpa.(q, k, k, []) end

    assert_raise ArgumentError, ~r/q and k must have one head_dim/, fn ->
      sdpa.(q, mlx(random({1, 3, 4, 4})), mlx(random({1, 3, 4, 4})), [])
    end

    assert_raise ArgumentError, ~r/exclude each other/, fn ->
      sdpa.(q, q, q, causal: true, mask: mlx(random({4, 4})))
    end

    assert_raise ArgumentError, ~r/does not broadcast/, fn ->
      sdpa.(q, q, q, mask: mlx(random({3, 4})))
    end

    assert_raise ArgumentError, ~r/:sinks must have shape \{3\}/, fn ->
      sdpa.(q, q, q, sinks: mlx(random({2})))
    end
  end
end
