defmodule NxMlx.CompilerTest.Fns do
  import Nx.Defn

  # An intermediate of 4 * 10^12 bytes, more than any machine's memory limit.
  defn huge_sum(x) do
    x |> Nx.broadcast({100_000, 100_000, 100}) |> Nx.add(1) |> Nx.sum()
  end

  defn huge_loop(x) do
    {_, acc, _} =
      while {i = 0, acc = x, x}, i < 2 do
        {i + 1, acc + huge_sum(x), x}
      end

    acc
  end

  defn fused_chain(x, y) do
    z = Nx.sin(Nx.exp(x * 0.5) + y)

    {z, _} =
      while {z, i = 0}, i < 3 do
        {Nx.tanh(z) * 1.5 + 0.25, i + 1}
      end

    Nx.sum(z, axes: [1])
  end

  # The body hands on a constant as state: it must survive every iteration.
  defn constant_state(x) do
    {_, _, z} =
      while {i = 0, y = x, z = x}, i < 4 do
        {i + 1, Nx.tensor([1.0, 2.0]), z + y}
      end

    z
  end

  defn count_to(x, n) do
    {_, acc, _} =
      while {i = 0, acc = x, n}, i < n do
        {i + 1, acc * 2 + 1, n}
      end

    acc
  end

  defn nested_while(x) do
    {_, out} =
      while {i = 0, out = x}, i < 3 do
        {_, inner} =
          while {j = 0, inner = out}, j < 2 do
            {j + 1, inner + 1}
          end

        {i + 1, inner * 2}
      end

    out
  end

  defn branches(x) do
    cond do
      Nx.sum(x) > 10 -> x * 10
      Nx.sum(x) > 0 -> x - 1
      true -> -x
    end
  end

  defn cond_in_while(x) do
    {_, out} =
      while {i = 0, out = x}, i < 4 do
        out = if Nx.remainder(i, 2) == 0, do: out + 1, else: out * 3
        {i + 1, out}
      end

    out
  end

  defn tuple_cond(x, flag) do
    if flag do
      {x + 1, Nx.sum(x)}
    else
      {x - 1, Nx.product(x)}
    end
  end

  defn hooked(x) do
    y = hook(x * 2, :double)
    y + 1
  end

  defn hook_in_loop(x) do
    {_, out} =
      while {i = 0, out = x}, i < 3 do
        {i + 1, hook(out + 1, :step)}
      end

    out
  end

  defn hook_in_branch(x) do
    if Nx.sum(x) > 0 do
      hook(x * 10, :taken)
    else
      x - 1
    end
  end

  defn(reduce_with_fun(x), do: Nx.reduce(x, 0, fn a, b -> a + b end))

  defn runtime_double(x) do
    Nx.runtime_call(x, x, [], &__MODULE__.double/2) + 1
  end

  def double(t, _opts), do: Nx.multiply(t, 2)

  def pair(t, opts), do: {Nx.add(t, opts[:by]), Nx.sum(t)}

  defn runtime_twice(x) do
    y = Nx.runtime_call(x, x, [], &__MODULE__.double/2)
    {a, s} = Nx.runtime_call({y, Nx.sum(y)}, y * 3, [by: 1], &__MODULE__.pair/2)
    a + s + x
  end

  # Float remainder (C's fmod) has no MLX implementation: it falls back to Nx.BinaryBackend.
  defn host_remainder(x, w) do
    y = Nx.dot(x, w) |> Nx.add(1.5)
    Nx.remainder(y, 4.0) |> Nx.multiply(y) |> Nx.sum(axes: [1])
  end

  defn host_then_loop(x, y) do
    r = Nx.remainder(Nx.exp(x), y)

    {r, _} =
      while {r, i = 0}, i < 3 do
        {r * 2 - 1, i + 1}
      end

    r
  end

  defn host_grad(x, y) do
    grad(x, fn x -> Nx.sum(Nx.remainder(x * x, y)) end)
  end

  defn remainder_in_loop(x) do
    {_, x} =
      while {i = 0, x}, i < 2 do
        {i + 1, Nx.remainder(x * 3, 4.0)}
      end

    x
  end

  defn runtime_in_loop(x) do
    {_, x} =
      while {i = 0, x}, i < 2 do
        {i + 1, Nx.runtime_call(x, x, [], &__MODULE__.double/2)}
      end

    x
  end

  defn(value_and_grad_of(x), do: value_and_grad(x, fn x -> Nx.sum(Nx.sin(x) * Nx.exp(x)) end))

  defn softmax(x) do
    e = Nx.exp(x - Nx.reduce_max(x, axes: [-1], keep_axes: true))
    e / Nx.sum(e, axes: [-1], keep_axes: true)
  end

  # As Axon.Activations.softmax writes it: stop_grad on the max, 1 / sum times the exps.
  defn axon_softmax(x, opts \\ []) do
    opts = keyword!(opts, axes: [-1])
    m = stop_grad(Nx.reduce_max(x, axes: opts[:axes], keep_axes: true))
    e = Nx.exp(x - m)
    1 / Nx.sum(e, axes: opts[:axes], keep_axes: true) * e
  end

  # Exact GELU as the bench writes it, and as Axon.Activations.gelu does.
  defn(gelu(x), do: x * 0.5 * (1 + Nx.erf(x * 0.7071067811865476)))

  defn axon_gelu(x) do
    sqrt2 = Nx.sqrt(Nx.tensor(2, type: Nx.type(x)))
    x |> Nx.divide(sqrt2) |> Nx.erf() |> Nx.add(1) |> Nx.multiply(x) |> Nx.divide(2)
  end

  # Not GELU: the coefficient, the erf's scale or its argument differ.
  defn not_gelu(x, y) do
    {x * 0.6 * (1 + Nx.erf(x * 0.7071067811865476)), x * 0.5 * (1 + Nx.erf(x * 0.7)),
     x * 0.5 * (1 + Nx.erf(y * 0.7071067811865476)), x * 0.5 * (2 + Nx.erf(x / Nx.sqrt(2)))}
  end

  defn(gelu_grad(x), do: grad(x, fn x -> Nx.sum(gelu(x)) end))

  # Layer norm over the last axis as Axon.Layers.layer_norm writes it (mean computed twice,
  # variance as Nx.variance, scale and shift reshaped); layer_norm/3 below is the
  # hand-written form.
  defn axon_layer_norm(x, g, b) do
    shape = affine_shape(x, g)
    g = Nx.reshape(g, shape)
    b = Nx.reshape(b, shape)
    mean = Nx.mean(x, axes: [-1], keep_axes: true)
    var = Nx.variance(x, axes: [-1], keep_axes: true)
    g * Nx.rsqrt(var + 1.0e-6) * (x - mean) + b
  end

  deftransformp affine_shape(x, g) do
    ones = List.duplicate(1, Nx.rank(x) - 1)
    List.to_tuple(ones ++ [Nx.size(g)])
  end

  # Not layer norms: over the first axis, the variance of another tensor, a scale along
  # another axis.
  defn not_layer_norm(x, y, g, b, col) do
    m0 = Nx.mean(x, axes: [0], keep_axes: true)
    v0 = Nx.mean((x - m0) * (x - m0), axes: [0], keep_axes: true)
    m = Nx.mean(x, axes: [-1], keep_axes: true)
    my = Nx.mean(y, axes: [-1], keep_axes: true)
    vy = Nx.mean((y - my) * (y - my), axes: [-1], keep_axes: true)
    v = Nx.mean((x - m) * (x - m), axes: [-1], keep_axes: true)

    {(x - m0) * Nx.rsqrt(v0 + 1.0e-5) * g + b, (x - m) * Nx.rsqrt(vy + 1.0e-5) * g + b,
     (x - m) * Nx.rsqrt(v + 1.0e-5) * col + b}
  end

  defn(layer_norm_grad(x, g, b), do: grad(x, fn x -> Nx.sum(layer_norm(x, g, b) * x) end))

  # Not softmax: the max and the sum run over different axes.
  defn mixed_axes_softmax(x) do
    e = Nx.exp(x - Nx.reduce_max(x, axes: [0], keep_axes: true))
    e / Nx.sum(e, axes: [1], keep_axes: true)
  end

  # The exps are also an output: they are computed once, and the softmax still rewritten.
  defn softmax_and_exps(x) do
    e = Nx.exp(x - Nx.reduce_max(x, axes: [1], keep_axes: true))
    {e / Nx.sum(e, axes: [1], keep_axes: true), e}
  end

  defn(softmax_loss(x), do: Nx.sum(softmax(x) * Nx.iota(Nx.shape(x), type: Nx.type(x))))
  defn(softmax_grad(x), do: grad(x, &softmax_loss/1))

  defn layer_norm(x, g, b) do
    mean = Nx.mean(x, axes: [-1], keep_axes: true)
    xc = x - mean
    var = Nx.mean(xc * xc, axes: [-1], keep_axes: true)
    xc * Nx.rsqrt(var + 1.0e-5) * g + b
  end

  defn encoder_block(x, p) do
    {batch, seq, hidden} = Nx.shape(x)
    heads = 4
    dh = div(hidden, heads)

    split = fn t ->
      t |> Nx.reshape({batch, seq, heads, dh}) |> Nx.transpose(axes: [0, 2, 1, 3])
    end

    q = split.(Nx.dot(x, p.wq) + p.bq)
    k = split.(Nx.dot(x, p.wk) + p.bk)
    v = split.(Nx.dot(x, p.wv) + p.bv)
    scores = Nx.dot(q, [3], [0, 1], k, [3], [0, 1]) / Nx.sqrt(dh)
    attn = Nx.dot(softmax(scores), [3], [0, 1], v, [2], [0, 1])
    attn = attn |> Nx.transpose(axes: [0, 2, 1, 3]) |> Nx.reshape({batch, seq, hidden})
    h = layer_norm(x + Nx.dot(attn, p.wo), p.g1, p.b1)

    ff =
      Nx.dot(h, p.w1) |> Nx.multiply(0.5) |> Nx.multiply(1 + Nx.erf(Nx.dot(h, p.w1) / Nx.sqrt(2)))

    layer_norm(h + Nx.dot(ff, p.w2), p.g2, p.b2)
  end

  # A greedy decode loop: each step attends over the filled part of a KV cache (masked), puts
  # the new key/value in at the step's position and feeds the argmax back.
  defn decode(tokens, cache_k, cache_v, p, opts \\ []) do
    opts = keyword!(opts, steps: 4)
    {_batch, len, _hidden} = Nx.shape(cache_k)

    {tokens, _, _, _, _} =
      while {tokens, cache_k, cache_v, p, i = 0}, i < opts[:steps] do
        last = Nx.slice_along_axis(tokens, i, 1, axis: 1)
        x = Nx.take(p.embed, Nx.squeeze(last, axes: [1])) |> Nx.new_axis(1)
        cache_k = Nx.put_slice(cache_k, [0, i, 0], Nx.dot(x, p.wk))
        cache_v = Nx.put_slice(cache_v, [0, i, 0], Nx.dot(x, p.wv))
        q = Nx.dot(x, p.wq)
        scores = Nx.dot(q, [2], [0], cache_k, [2], [0])
        mask = Nx.iota({1, 1, len}, axis: 2) <= i
        scores = Nx.select(mask, scores, Nx.Constants.neg_infinity())
        h = Nx.dot(softmax(scores), [2], [0], cache_v, [1], [0])
        logits = Nx.dot(h, p.out) |> Nx.squeeze(axes: [1])
        next = Nx.argmax(logits, axis: -1) |> Nx.new_axis(1) |> Nx.as_type(Nx.type(tokens))
        tokens = Nx.put_slice(tokens, [0, i + 1], next)
        {tokens, cache_k, cache_v, p, i + 1}
      end

    tokens
  end

  defn fam_elementwise(a, b) do
    {Nx.exp(a) + b, Nx.sigmoid(a) * Nx.tanh(a), Nx.atan2(a, b + 1), Nx.pow(a, 2), Nx.erf(a),
     Nx.select(a > 0, a, b), Nx.clip(a, -0.5, 0.5), Nx.round(a * 10)}
  end

  defn fam_integer(a, b) do
    {Nx.quotient(a, b), Nx.remainder(a, b), Nx.bitwise_and(a, b), Nx.left_shift(b, 3),
     Nx.right_shift(a, 2), Nx.population_count(a), Nx.count_leading_zeros(b)}
  end

  defn fam_reductions(a) do
    {Nx.sum(a, axes: [1]), Nx.reduce_max(a), Nx.mean(a, axes: [0], keep_axes: true),
     Nx.argmax(a, axis: 1), Nx.argmin(a), Nx.cumulative_sum(a, axis: 1), Nx.sort(a, axis: 1),
     Nx.argsort(a, axis: 0, direction: :desc), Nx.logsumexp(a, axes: [1]), Nx.all(a > -2),
     Nx.product(a, axes: [0])}
  end

  defn fam_shape(a, i) do
    {Nx.transpose(a), Nx.reshape(a, {2, 12}), Nx.slice(a, [1, i], [2, 3]),
     Nx.slice(a, [i, 0], [2, 6], strides: [1, 2]),
     Nx.put_slice(a, [i, i], Nx.tensor([[9.0, 8.0]])), Nx.pad(a, 0.0, [{1, 2, 0}, {0, 1, 1}]),
     Nx.pad(a, 1.5, [{-1, 1, 2}, {1, -2, 0}]), Nx.reverse(a, axes: [1]),
     Nx.concatenate([a, a], axis: 1), Nx.stack([a, a]), Nx.new_axis(a, 0),
     Nx.slice_along_axis(a, i, 1, axis: 1)}
  end

  defn fam_indexing(a, idx, rows) do
    {Nx.gather(a, idx), Nx.take(a, rows),
     Nx.take_along_axis(a, Nx.tensor([[0], [1], [2], [0], [1]]), axis: 1),
     Nx.indexed_add(a, idx, Nx.tensor([1.0, 2.0, 3.0])),
     Nx.indexed_put(a, idx, Nx.tensor([1.0, 2.0, 3.0]))}
  end

  defn fam_dot(a, w, img, k) do
    {Nx.dot(a, w), Nx.dot(a, [2], [0], a, [2], [0]), Nx.conv(img, k, padding: :same),
     Nx.window_max(img, {1, 1, 2, 2}, strides: [1, 1, 2, 2]),
     Nx.window_sum(img, {1, 1, 3, 3}, padding: :same)}
  end

  defn fam_creation(a) do
    {a + Nx.iota({3}), Nx.eye(3) * a, a + Nx.tensor([1.0, 2.0, 3.0]),
     Nx.broadcast(Nx.Constants.pi(), {2, 3}) + a}
  end

  defn fam_blocks(a) do
    {Nx.top_k(a, k: 2), Nx.cumulative_max(a, axis: 1), Nx.logical_not(a > 0),
     Nx.fft(Nx.as_type(a, {:c, 64})), Nx.LinAlg.norm(a), Nx.take(a, Nx.tensor([1, 3]))}
  end

  defn(fam_half(a), do: {Nx.exp(a), Nx.sum(a), Nx.sigmoid(a) * a})

  defn(grad_softmax(x), do: grad(x, fn x -> Nx.sum(softmax(x) * Nx.iota({2, 3})) end))

  defn mlp(x, p) do
    x
    |> Nx.dot(p.w1)
    |> Nx.add(p.b1)
    |> Nx.max(0)
    |> Nx.dot(p.w2)
    |> Nx.add(p.b2)
    |> Nx.max(0)
    |> Nx.dot(p.w3)
    |> Nx.add(p.b3)
    |> Nx.sigmoid()
    |> Nx.dot(p.w4)
    |> Nx.add(p.b4)
  end
end

defmodule NxMlx.CompilerTest do
  use ExUnit.Case, async: false

  import NxMlx.TestHelpers
  alias NxMlx.CompilerTest.Fns

  @device NxMlx.TestHelpers.oracle_device()

  defp mlx(t), do: Nx.backend_copy(t, {NxMlx.Backend, device: @device})
  defp bin(t), do: Nx.backend_copy(t, Nx.BinaryBackend)

  defp jit(fun, opts \\ []),
    do: Nx.Defn.jit(fun, [compiler: NxMlx, device: @device, on_unsupported: :raise] ++ opts)

  defp random(shape, type \\ {:f, 32}, seed \\ 1) do
    Nx.with_default_backend(Nx.BinaryBackend, fn ->
      {t, _} = Nx.Random.uniform(Nx.Random.key(seed), -1.0, 1.0, shape: shape, type: type)
      t
    end)
  end

  # The function jitted on NxMlx (lowered whole: on_unsupported: :raise) against the
  # Evaluator on Nx.BinaryBackend.
  defp assert_lowered(fun, args, opts \\ []) do
    expected = apply(Nx.Defn.jit(fun, compiler: Nx.Defn.Evaluator), Enum.map(args, &bin_arg/1))
    actual = apply(jit(fun), Enum.map(args, &mlx_arg/1))
    assert_same(actual, expected, opts)
    actual
  end

  defp bin_arg(%Nx.Tensor{} = t), do: bin(t)
  defp bin_arg(other), do: Nx.Defn.Composite.traverse(other, &bin/1)
  defp mlx_arg(%Nx.Tensor{} = t), do: mlx(t)
  defp mlx_arg(other), do: Nx.Defn.Composite.traverse(other, &mlx/1)

  defp assert_same(actual, expected, opts) do
    a = Nx.Defn.Composite.flatten_list([actual])
    e = Nx.Defn.Composite.flatten_list([expected])
    assert length(a) == length(e)

    for {a, e} <- Enum.zip(a, e) do
      assert %NxMlx.Backend{} = a.data
      assert a.shape == e.shape and a.type == e.type

      assert Nx.to_number(
               Nx.all_close(bin(a), e,
                 atol: opts[:atol] || 1.0e-5,
                 rtol: opts[:rtol] || 1.0e-5,
                 equal_nan: true
               )
             ) == 1,
             "expected #{inspect(e)}, got #{inspect(a)}"
    end
  end

  describe "op families lower whole and agree with the Evaluator" do
    test "element-wise, mixed types and broadcasting" do
      a = random({3, 4})
      b = Nx.iota({4}, type: {:s, 32})

      assert_lowered(&Fns.fam_elementwise/2, [a, b])
    end

    test "integer and bitwise semantics" do
      a = Nx.tensor([-7, 9, 13, -2_147_483_648], type: {:s, 32})
      b = Nx.tensor([2, -4, 5, -1], type: {:s, 32})

      assert_lowered(&Fns.fam_integer/2, [a, b])
    end

    test "reductions, arg-reductions, cumulative ops and sorting" do
      a = random({4, 5})

      assert_lowered(&Fns.fam_reductions/1, [a])
    end

    test "shape, slicing and padding (static and tensor starts)" do
      a = random({4, 6})
      i = Nx.tensor(3)

      assert_lowered(&Fns.fam_shape/2, [a, i])
    end

    test "indexing: gather, take, indexed_add and indexed_put" do
      a = random({5, 3})
      idx = Nx.tensor([[0, 1], [4, 2], [2, 0]])
      rows = Nx.tensor([4, 0, 2])

      assert_lowered(&Fns.fam_indexing/3, [a, idx, rows])
    end

    test "dot, conv and window reductions" do
      a = random({2, 3, 4})
      w = random({4, 5}, {:f, 32}, 2)
      img = random({1, 2, 6, 6}, {:f, 32}, 3)
      k = random({3, 2, 3, 3}, {:f, 32}, 4)

      assert_lowered(&Fns.fam_dot/4, [a, w, img, k], atol: 1.0e-4)
    end

    test "creation ops and constants" do
      assert_lowered(&Fns.fam_creation/1, [random({3})])
    end

    test "blocks: native kernels and lowered default functions" do
      a = random({4, 4})

      assert_lowered(&Fns.fam_blocks/1, [a], atol: 1.0e-4)
    end

    test "f16 and bf16 math" do
      for type <- [{:f, 16}, {:bf, 16}] do
        a = random({8}, type)

        assert_lowered(&Fns.fam_half/1, [a],
          atol: 1.0e-2,
          rtol: 1.0e-2
        )
      end
    end

    test "gradients" do
      assert_lowered(&Fns.value_and_grad_of/1, [random({6})], atol: 1.0e-5)

      assert_lowered(&Fns.grad_softmax/1, [
        random({2, 3})
      ])
    end

    test "vectorized inputs" do
      x = Nx.iota({3, 4}, type: {:f, 32}) |> Nx.vectorize(:rows)
      expected = Nx.Defn.jit(&Fns.softmax/1, compiler: Nx.Defn.Evaluator).(bin(x))
      actual = jit(&Fns.softmax/1).(mlx(x))
      assert actual.vectorized_axes == [rows: 3]
      assert_same(Nx.devectorize(actual), Nx.devectorize(expected), [])
    end
  end

  describe "control flow runs natively" do
    test "a while body may hand on a constant as state" do
      out = jit(&Fns.constant_state/1).(mlx(Nx.tensor([10.0, 20.0])))
      assert Nx.to_flat_list(out) == [23.0, 46.0]
    end

    test "while" do
      assert_lowered(&Fns.count_to/2, [Nx.tensor([1.0, 2.0]), Nx.tensor(5)])
      assert_lowered(&Fns.count_to/2, [Nx.tensor([1.0, 2.0]), Nx.tensor(0)])
      assert_lowered(&Fns.nested_while/1, [Nx.tensor([1, 2, 3])])
    end

    test "cond takes each branch" do
      for x <- [[5, 6], [1, 2], [-3, -4]] do
        assert_lowered(&Fns.branches/1, [Nx.tensor(x)])
      end

      assert_lowered(&Fns.cond_in_while/1, [Nx.tensor([1.0, 2.0])])
      assert_lowered(&Fns.tuple_cond/2, [Nx.tensor([1.0, 3.0]), Nx.tensor(1, type: {:u, 8})])
      assert_lowered(&Fns.tuple_cond/2, [Nx.tensor([1.0, 3.0]), Nx.tensor(0, type: {:u, 8})])
    end
  end

  describe "models lower fully (on_unsupported: :raise)" do
    test "an encoder block" do
      hidden = 32
      w = fn shape, seed -> Nx.multiply(random(shape, {:f, 32}, seed), 0.2) end

      p = %{
        wq: w.({hidden, hidden}, 1),
        bq: w.({hidden}, 2),
        wk: w.({hidden, hidden}, 3),
        bk: w.({hidden}, 4),
        wv: w.({hidden, hidden}, 5),
        bv: w.({hidden}, 6),
        wo: w.({hidden, hidden}, 7),
        g1: w.({hidden}, 8),
        b1: w.({hidden}, 9),
        w1: w.({hidden, 64}, 10),
        w2: w.({64, hidden}, 11),
        g2: w.({hidden}, 12),
        b2: w.({hidden}, 13)
      }

      assert_lowered(&Fns.encoder_block/2, [random({2, 8, hidden}), p], atol: 1.0e-4)
    end

    test "a decoder with a KV cache in a while loop" do
      hidden = 16
      w = fn shape, seed -> random(shape, {:f, 32}, seed) end

      p = %{
        embed: w.({10, hidden}, 1),
        wq: w.({hidden, hidden}, 2),
        wk: w.({hidden, hidden}, 3),
        wv: w.({hidden, hidden}, 4),
        out: w.({hidden, 10}, 5)
      }

      tokens = Nx.tensor([[3, 0, 0, 0, 0]])
      cache = Nx.broadcast(0.0, {1, 8, hidden})
      out = assert_lowered(&Fns.decode/4, [tokens, cache, cache, p])
      assert Nx.to_flat_list(out) |> hd() == 3
    end

    test "a 4-layer MLP" do
      w = fn shape, seed -> Nx.multiply(random(shape, {:f, 32}, seed), 0.3) end

      p = %{
        w1: w.({16, 32}, 1),
        b1: w.({32}, 2),
        w2: w.({32, 32}, 3),
        b2: w.({32}, 4),
        w3: w.({32, 32}, 5),
        b3: w.({32}, 6),
        w4: w.({32, 4}, 7),
        b4: w.({4}, 8)
      }

      assert_lowered(&Fns.mlp/2, [random({8, 16}), p], atol: 1.0e-4)
    end
  end

  describe "hooks" do
    test "a hook receives its value; a named hook can be overridden at jit time" do
      me = self()
      x = mlx(Nx.tensor([1, 2, 3]))

      f =
        Nx.Defn.jit(&Fns.hooked/1,
          compiler: NxMlx,
          on_unsupported: :raise,
          hooks: %{double: &send(me, {:hook, &1})}
        )

      assert Nx.to_flat_list(f.(x)) == [3, 5, 7]
      assert_receive {:hook, value}
      assert Nx.to_flat_list(value) == [2, 4, 6]
    end

    test "a hook inside a loop runs natively, once per iteration, in order" do
      me = self()

      f =
        Nx.Defn.jit(&Fns.hook_in_loop/1,
          compiler: NxMlx,
          on_unsupported: :raise,
          hooks: %{step: &send(me, {:step, &1})}
        )

      assert Nx.to_flat_list(f.(mlx(Nx.tensor([1])))) == [4]

      for expected <- [2, 3, 4] do
        assert_received {:step, t}
        assert %NxMlx.Backend{} = t.data
        assert Nx.to_flat_list(t) == [expected]
      end

      refute_received {:step, _}
    end

    test "a hook in a branch runs only when the branch is taken" do
      me = self()
      f = jit(&Fns.hook_in_branch/1, hooks: %{taken: &send(me, {:taken, &1})})
      assert Nx.to_flat_list(f.(mlx(Nx.tensor([5])))) == [50]
      assert_received {:taken, t}
      assert Nx.to_flat_list(t) == [50]
      assert Nx.to_flat_list(f.(mlx(Nx.tensor([-5])))) == [-6]
      refute_received {:taken, _}
    end

    test "a hook callback may use NxMlx itself" do
      me = self()
      hook = fn t -> send(me, {:sum, Nx.to_number(Nx.sum(Nx.multiply(t, 2)))}) end
      f = Nx.Defn.jit(&Fns.hook_in_loop/1, compiler: NxMlx, hooks: %{step: hook})
      assert Nx.to_flat_list(f.(mlx(Nx.tensor([1])))) == [4]
      for s <- [4, 6, 8], do: assert_received({:sum, ^s})
    end
  end

  describe "runtime calls" do
    test "at the top level the program stops for the callback and goes on with its result" do
      x = Nx.tensor([1, 2, 3])
      assert Nx.to_flat_list(jit(&Fns.runtime_double/1).(mlx(x))) == [3, 5, 7]
      # y = 2x = [2, 4, 6]; a = 3y + 1 = [7, 13, 19]; s = sum(3y) = 36; a + s + x
      assert_lowered(&Fns.runtime_twice/1, [x])
      assert Nx.to_flat_list(jit(&Fns.runtime_twice/1).(mlx(x))) == [44, 51, 58]
    end
  end

  describe "what cannot be lowered" do
    test "an op with no MLX implementation runs on the host between two native parts" do
      forward_telemetry([:nx_mlx, :compiler, :fallback])
      forward_telemetry([:nx_mlx, :compiler, :compile])
      x = random({3, 4})
      w = random({4, 5}, {:f, 32}, 2)
      out = Nx.Defn.jit(&Fns.host_remainder/2, compiler: NxMlx).(mlx(x), mlx(w))
      assert %NxMlx.Backend{} = out.data
      assert_same(out, Fns.host_remainder(x, w), atol: 1.0e-4)

      assert_receive {:telemetry, [:nx_mlx, :compiler, :fallback], _,
                      %{op: :remainder, mode: :host_op}}

      # Lowered (a program of native ops around the host step), not evaluated.
      assert_receive {:telemetry, [:nx_mlx, :compiler, :compile], _, %{hit: false, ops: ops}}
                     when ops > 0

      # Inside a loop the host step cannot split the program: the Evaluator runs it all.
      y = Nx.tensor([1.5, 2.5, -3.0])
      looped = Nx.Defn.jit(&Fns.remainder_in_loop/1, compiler: NxMlx).(mlx(y))
      assert_same(looped, Fns.remainder_in_loop(y), atol: 1.0e-5)

      assert_receive {:telemetry, [:nx_mlx, :compiler, :fallback], _,
                      %{op: :remainder, mode: :evaluator}}

      assert_receive {:telemetry, [:nx_mlx, :compiler, :compile], _, %{hit: false, ops: 0}}

      assert_raise ArgumentError, ~r/cannot be lowered whole.*remainder/, fn ->
        jit(&Fns.host_remainder/2).(mlx(x), mlx(w))
      end
    end

    test "host steps keep later loops, gradients and vectorized inputs right" do
      x = random({2, 3})
      y = Nx.tensor([0.7, 1.1, 2.0])
      run = fn f, args -> apply(Nx.Defn.jit(f, compiler: NxMlx), Enum.map(args, &mlx/1)) end
      assert_same(run.(&Fns.host_then_loop/2, [x, y]), Fns.host_then_loop(x, y), atol: 1.0e-4)
      assert_same(run.(&Fns.host_grad/2, [x, y]), Fns.host_grad(x, y), atol: 1.0e-4)

      xv = Nx.vectorize(x, :rows)
      out = Nx.Defn.jit(&Fns.host_then_loop/2, compiler: NxMlx).(mlx(xv), mlx(y))
      assert out.vectorized_axes == [rows: 2]
      expected = Fns.host_then_loop(xv, y)
      assert_same(Nx.devectorize(out), Nx.devectorize(expected), atol: 1.0e-4)
    end

    test "runs through the Evaluator with a telemetry event, or raises when asked" do
      forward_telemetry([:nx_mlx, :compiler, :fallback])
      x = mlx(Nx.tensor([1, 2, 3]))
      f = Nx.Defn.jit(&Fns.reduce_with_fun/1, compiler: NxMlx)
      assert Nx.to_number(f.(x)) == 6

      assert_receive {:telemetry, [:nx_mlx, :compiler, :fallback], _,
                      %{op: :fun, mode: :evaluator}}

      assert Nx.to_flat_list(Nx.Defn.jit(&Fns.runtime_in_loop/1, compiler: NxMlx).(x)) == [
               4,
               8,
               12
             ]

      assert_receive {:telemetry, [:nx_mlx, :compiler, :fallback], _, %{op: :runtime_call}}

      assert_raise ArgumentError, ~r/cannot be lowered whole.*function argument/, fn ->
        jit(&Fns.reduce_with_fun/1).(x)
      end
    end
  end

  describe "the compile cache" do
    test "a second call with the same templates is a hit; new shapes compile again" do
      forward_telemetry([:nx_mlx, :compiler, :compile])
      f = jit(&Fns.softmax/1)
      f.(mlx(Nx.iota({2, 3}, type: {:f, 32})))
      assert_receive {:telemetry, _, %{duration: _}, %{hit: false, ops: ops}} when ops > 0
      f.(mlx(Nx.iota({2, 3}, type: {:f, 32})))
      assert_receive {:telemetry, _, _, %{hit: true}}
      f.(mlx(Nx.iota({3, 3}, type: {:f, 32})))
      assert_receive {:telemetry, _, _, %{hit: false}}
    end

    test "Nx.Defn.compile/3 compiles once and runs without a lookup" do
      forward_telemetry([:nx_mlx, :compiler, :compile])
      f = Nx.Defn.compile(&Fns.softmax/1, [Nx.template({2, 2}, {:f, 32})], compiler: NxMlx)
      out = f.(mlx(Nx.tensor([[1.0, 2.0], [3.0, 4.0]])))
      assert_in_delta Nx.to_number(out[0][1]), 0.7310586, 1.0e-6
      refute_receive {:telemetry, [:nx_mlx, :compiler, :compile], _, _}
    end

    test "inputs on other backends are copied onto the device" do
      out = jit(&Fns.softmax/1).(Nx.tensor([[0.0, 0.0]], backend: Nx.BinaryBackend))
      assert %NxMlx.Backend{} = out.data
      assert Nx.to_flat_list(out) == [0.5, 0.5]
    end
  end

  describe "a call's outputs come back dispatched" do
    test "the call returns before waiting; reading waits and gives the value" do
      f = jit(fn x -> x |> Nx.multiply(2) |> Nx.add(1) end)
      out = f.(mlx(Nx.iota({4}, type: {:f, 32})))
      assert %{state: :lazy} = NxMlx.Native.array_info(out.data.ref)
      assert Nx.to_flat_list(out) == [1.0, 3.0, 5.0, 7.0]
      assert %{state: :evaluated} = NxMlx.Native.array_info(out.data.ref)
    end

    test "a dropped output's memory is freed: an idle worker lets go of its last run" do
      settled = fn ->
        :erlang.garbage_collect()
        NxMlx.CommandQueue.synchronize(NxMlx.CommandQueue.default(@device))
        NxMlx.memory().active
      end

      x = mlx(Nx.iota({1_000_000}, type: {:f, 32}))
      baseline = settled.()
      # 4 MB computed and dropped unread.
      _ = jit(fn x -> Nx.multiply(x, 2) end).(x)

      assert eventually(fn -> settled.() < baseline + 1_000_000 end),
             "active #{NxMlx.memory().active} bytes, #{baseline} before"

      # x stays alive (and so counted) throughout.
      assert Nx.to_number(x[-1]) == 999_999.0
    end

    test "calls fed their own unread outputs compute in order, and can be submitted" do
      step = fn x -> Nx.add(Nx.multiply(x, 1.5), 1) end
      f = jit(step)
      out = Enum.reduce(1..200, mlx(Nx.tensor([0.0, 1.0])), fn _, x -> f.(x) end)
      {:ok, command} = NxMlx.submit(out)
      assert :ok = NxMlx.wait(command)
      expected = Enum.reduce(1..200, Nx.tensor([0.0, 1.0]), fn _, x -> step.(x) end)
      assert_in_delta Nx.to_number(Nx.sum(Nx.divide(bin(out), expected))), 2.0, 1.0e-4
    end
  end

  describe "compiler options" do
    test "__to_backend__ and __partitions_options__" do
      assert NxMlx.__to_backend__(device: :cpu) == {NxMlx.Backend, device: :cpu}
      parts = NxMlx.__partitions_options__(max_concurrency: 3, device: @device)
      queues = Enum.map(parts, & &1[:command_queue])
      assert length(Enum.uniq(queues)) == 3
      assert Enum.all?(queues, &match?(%NxMlx.CommandQueue{device: @device}, &1))
      # Partition i keeps its queue.
      assert Enum.map(
               NxMlx.__partitions_options__(max_concurrency: 3, device: @device),
               & &1[:command_queue]
             ) == queues
    end

    test "options Nx.Serving, Axon and Bumblebee pass are accepted" do
      f = jit(&Fns.softmax/1, batch_keys: [:default], cache: "x", some_axon_option: true)
      assert Nx.shape(f.(mlx(Nx.iota({1, 2}, type: {:f, 32})))) == {1, 2}
    end

    test "bad options are refused" do
      assert_raise ArgumentError, ~r/on_unsupported/, fn ->
        Nx.Defn.jit(&Fns.softmax/1, compiler: NxMlx, on_unsupported: :maybe).(mlx(Nx.iota({2})))
      end

      assert_raise ArgumentError, ~r/unknown device/, fn ->
        Nx.Defn.jit(&Fns.softmax/1, compiler: NxMlx, device: :tpu).(mlx(Nx.iota({2})))
      end
    end

    test "Nx.Serving with partitions runs batches through the compiler" do
      serving =
        Nx.Serving.jit(&Fns.softmax/1, compiler: NxMlx, device: @device, max_concurrency: 2)
        |> Nx.Serving.process_options(batch_size: 2)

      name = :"nx_mlx_serving_#{System.unique_integer([:positive])}"

      start_supervised!(
        {Nx.Serving, serving: serving, name: name, batch_timeout: 10, partitions: true}
      )

      batch = Nx.Batch.stack([Nx.tensor([0.0, 0.0]), Nx.tensor([1.0, 1.0])])
      out = Nx.Serving.batched_run(name, batch)
      assert Nx.to_flat_list(out) == [0.5, 0.5, 0.5, 0.5]
    end

    test "a command queue runs the program" do
      q = NxMlx.CommandQueue.new!(@device)
      out = jit(&Fns.softmax/1, command_queue: q).(mlx(Nx.tensor([[0.0, 0.0]])))
      assert Nx.to_flat_list(out) == [0.5, 0.5]
    end
  end

  describe "types MLX lacks" do
    test "a function on them runs through the Evaluator, as eager ops run on Nx.BinaryBackend" do
      forward_telemetry([:nx_mlx, :compiler, :fallback])
      s4 = Nx.tensor([-7, 5, -2, 3], type: {:s, 4}, backend: NxMlx.Backend)
      out = Nx.Defn.jit(&Nx.add/2, compiler: NxMlx, device: @device).(s4, s4)
      assert out.type == {:s, 4}
      assert Nx.to_flat_list(out) == Nx.to_flat_list(Nx.add(bin(s4), bin(s4)))
      assert_receive {:telemetry, _, _, %{mode: :evaluator, reason: reason}}
      assert reason =~ "{:s, 4}"

      # A cast to one inside the function.
      x = mlx(Nx.tensor([0.5, -2.0, 448.0]))
      f8 = Nx.Defn.jit(&Nx.as_type(&1, {:f, 8}), compiler: NxMlx, device: @device).(x)
      assert f8.type == {:f, 8}
      assert Nx.to_flat_list(f8) == Nx.to_flat_list(Nx.as_type(bin(x), {:f, 8}))

      assert_raise ArgumentError, ~r/MLX has no such type/, fn ->
        jit(&Nx.add/2).(s4, s4)
      end
    end
  end

  describe "intermediates larger than the memory limit" do
    test "are refused like eager ops, in straight code, fused or not, and in loops" do
      x = mlx(Nx.tensor([1.0]))
      assert_raise ArgumentError, ~r/memory limit/, fn -> Fns.huge_sum(x) end

      for f <- [&Fns.huge_sum/1, &Fns.huge_loop/1], fuse <- [false, true] do
        assert_raise ArgumentError, ~r/memory limit/, fn ->
          Nx.to_number(Nx.sum(jit(f, fuse: fuse).(x)))
        end
      end
    end
  end

  describe "programs given hostile input by direct NIF calls" do
    test "are refused with errors, never a crash" do
      w = NxMlx.Runtime.worker(@device)
      a = mlx(Nx.tensor([1.0])).data.ref

      for {code, n_in, n_regs, outs} <- [
            {[{:op, [5], :binary, [:add, 0, 0], "x"}], 1, 2, [1]},
            {[{:op, [1], :binary, [:add, 0, 7], "x"}], 1, 2, [1]},
            {[{:op, [1], :nope, [], "x"}], 1, 2, [1]},
            {[{:op, [1, 2], :unary, [:exp, 0], "x"}], 1, 3, [1]},
            {[{:while, [0], [1], [], 0, [], []}], 1, 2, [1]},
            {[:junk], 1, 2, [0]},
            {:junk, 1, 2, [0]},
            {[], 3, 2, [0]},
            {[], 0, Bitwise.bsl(1, 40), [0]}
          ] do
        assert {:error, {:argument, _}} =
                 NxMlx.Native.program_new(code, n_in, n_regs, outs, false)
      end

      # A small straight-line program is replayed on the calling thread: its error comes back
      # at once. One the fusion lane runs is replayed on the worker: its error is the reply.
      {:ok, p} = NxMlx.Native.program_new([{:op, [2], :unary, [:exp, 1], "x"}], 1, 3, [2], false)
      assert {:error, {:argument, _}} = NxMlx.Native.program_run(w, p, [], 1)
      assert {:error, {:argument, message}} = NxMlx.Native.program_run(w, p, [a], 1)
      assert message =~ "read before it is set"

      two = [{:op, [2], :unary, [:exp, 1], "x"}, {:op, [3], :unary, [:exp, 2], "x"}]
      {:ok, p} = NxMlx.Native.program_new(two, 1, 4, [3], true)
      assert {:async, ref} = NxMlx.Native.program_run(w, p, [a], 1)
      assert_receive {^ref, {:error, {:argument, message}}}
      assert message =~ "read before it is set"
      assert_raise ArgumentError, fn -> NxMlx.Native.program_run(w, :junk, [a], 1) end

      assert {:error, {:argument, _}} =
               NxMlx.Native.program_new([{:hook, -1, [0]}], 1, 1, [0], false)
    end
  end

  describe "rewrites (rewrites: true)" do
    setup do
      forward_telemetry([:nx_mlx, :compiler, :compile])
    end

    # The result and the program's op count (from the compile event).
    defp rewritten(fun, args, opts) do
      out = apply(jit(fun, [fuse: false] ++ opts), args)
      assert_receive {:telemetry, [:nx_mlx, :compiler, :compile], _, %{hit: false, ops: ops}}
      {out, ops}
    end

    test "softmax written by hand or as Axon writes it becomes one op, with the same values" do
      x =
        Nx.tensor(
          [
            [1.0, 2.0, 3.0, -1.0],
            [0.0, :neg_infinity, 1.0, 2.0],
            [:neg_infinity, :neg_infinity, :neg_infinity, :neg_infinity],
            [:nan, 1.0, 2.0, 3.0],
            [:infinity, 1.0, 2.0, 3.0],
            [88.0, 89.0, -1.0e30, 0.0]
          ],
          backend: Nx.BinaryBackend
        )

      for fun <- [&Fns.softmax/1, &Fns.axon_softmax/1],
          input <- [x, random({3, 5, 33}, {:f, 32}, 7)] do
        expected = apply(Nx.Defn.jit(fun, compiler: Nx.Defn.Evaluator), [input])
        {out, ops} = rewritten(fun, [mlx(input)], rewrites: true)
        {plain, plain_ops} = rewritten(fun, [mlx(input)], rewrites: false)
        assert ops == 1 and plain_ops > 1
        assert_same(out, expected, atol: 1.0e-6)
        assert_same(plain, expected, atol: 1.0e-6)
      end
    end

    test "over other axes and in half precision" do
      x = random({4, 6, 10}, {:f, 32}, 3)
      f = &Fns.axon_softmax(&1, axes: [0, 2])
      {out, 1} = rewritten(f, [mlx(x)], rewrites: true)
      assert_same(out, Fns.axon_softmax(x, axes: [0, 2]), atol: 1.0e-6)

      for type <- [{:bf, 16}, {:f, 16}] do
        xh = Nx.as_type(Nx.multiply(x, 8), type)
        {out, 1} = rewritten(&Fns.softmax/1, [mlx(xh)], rewrites: true)
        # Accumulated in f32 and rounded once: within the type's rounding of the f32 result.
        expected = Fns.softmax(Nx.as_type(xh, {:f, 32}))
        assert out.type == type
        assert_same(Nx.as_type(out, {:f, 32}), expected, atol: 1.0e-2, rtol: 1.0e-2)
      end
    end

    test "what only looks like softmax is left as written" do
      x = random({5, 7}, {:f, 32}, 4)
      {out, ops} = rewritten(&Fns.mixed_axes_softmax/1, [mlx(x)], rewrites: true)
      assert ops > 1
      assert_same(out, Fns.mixed_axes_softmax(x), atol: 1.0e-6)

      {{p, e}, _ops} = rewritten(&Fns.softmax_and_exps/1, [mlx(x)], rewrites: true)
      {p0, e0} = Fns.softmax_and_exps(x)
      assert_same(p, p0, atol: 1.0e-6)
      assert_same(e, e0, atol: 1.0e-6)
    end

    test "gradients through a rewritten softmax equal the composed one's" do
      x = random({3, 9}, {:f, 32}, 5)
      {g, _ops} = rewritten(&Fns.softmax_grad/1, [mlx(x)], rewrites: true)
      assert_same(g, Fns.softmax_grad(x), atol: 1.0e-5)
    end

    test "unset, softmax is rewritten where the one op is the faster" do
      x = random({4, 6, 10}, {:f, 32}, 3)
      trailing = &Fns.axon_softmax(&1, axes: [1, 2])
      leading = &Fns.axon_softmax(&1, axes: [0, 2])
      xh = Nx.as_type(x, {:bf, 16})
      rewritten? = fn fun, input -> elem(rewritten(fun, [mlx(input)], []), 1) == 1 end

      # The GPU's fused softmax for every type and axis; on the CPU our kernel's case only
      # (f32 over trailing axes), not MLX's CPU softmax.
      gpu = NxMlx.TestHelpers.oracle_device() == :gpu
      assert {out, 1} = rewritten(trailing, [mlx(x)], [])
      assert_same(out, trailing.(x), atol: 1.0e-6)
      assert rewritten?.(leading, x) == gpu
      assert rewritten?.(&Fns.softmax/1, xh) == gpu
    end

    test "one long row, split over the cores, with NaN and infinities" do
      x = random({1, 140_001}, {:f, 32}, 9) |> Nx.multiply(30)
      f = jit(&Fns.softmax/1, fuse: false, rewrites: true)

      for special <- [nil, :nan, :infinity, :neg_infinity] do
        x = if special, do: Nx.put_slice(x, [0, 100_000], Nx.tensor([[special]])), else: x
        out = f.(mlx(x))
        assert_same(out, Fns.softmax(x), atol: 1.0e-7)

        if special in [nil, :neg_infinity] do
          assert abs(Nx.to_number(Nx.sum(out)) - 1.0) < 1.0e-5
        end
      end

      assert_receive {:telemetry, [:nx_mlx, :compiler, :compile], _, %{hit: false, ops: 1}}
    end

    test "exact GELU, by hand or as Axon writes it, becomes one op" do
      x =
        Nx.tensor(
          [-3.0, -1.5, -1.0, -0.25, -0.0, 0.0, 0.3, 1.0, 1.41, 2.0, 5.0, 7.0, :nan, :infinity],
          backend: Nx.BinaryBackend
        )

      for fun <- [&Fns.gelu/1, &Fns.axon_gelu/1],
          input <- [x, Nx.multiply(random({3, 5, 33}, {:f, 32}, 7), 4)] do
        # Nx's f64 composed result: the kernel computes in double and rounds once.
        expected = fun.(Nx.as_type(input, {:f, 64})) |> Nx.as_type({:f, 32})
        {out, ops} = rewritten(fun, [mlx(input)], rewrites: true)
        {plain, plain_ops} = rewritten(fun, [mlx(input)], rewrites: false)
        assert ops == 1 and plain_ops > 1
        assert_same(out, expected, atol: 1.0e-6, rtol: 1.0e-6)
        assert_same(plain, expected, atol: 1.0e-6)
      end
    end

    test "GELU's negative tail keeps its precision, where the composed f32 form cancels" do
      x = Nx.tensor([-5.0, -6.0, -8.0, -10.0, -14.0] ++ Enum.map(0..200, &(-12.0 + &1 * 0.1)))
      xs = Nx.to_flat_list(x)
      out = rewritten(&Fns.gelu/1, [mlx(x)], rewrites: true)

      # x / 2 * erfc(-x / sqrt(2)) of each f32 x, from the C library, in double, rounded to
      # f32: our CPU kernel's precision (on the GPU the op is the composed form).
      for {x, got} <- Enum.zip(xs, Nx.to_flat_list(elem(out, 0))), @device == :cpu do
        want = 0.5 * x * :math.erfc(-x / :math.sqrt(2))
        want = Nx.to_number(Nx.tensor(want, type: :f32))
        assert abs(got - want) <= 1.2e-7 * abs(want) + 1.0e-45, "gelu(#{x}): #{got} vs #{want}"
      end

      specials = Nx.tensor([:nan, :infinity, :neg_infinity, -0.0], type: :f32)
      {out, 1} = rewritten(&Fns.gelu/1, [mlx(specials)], rewrites: true)
      # -inf * erfc(inf) = -inf * 0, as in the composed form.
      assert Nx.to_flat_list(out) == [:nan, :infinity, :nan, -0.0]
      # The composed form in f32: 1 + erf(x / sqrt(2)) is 0 from x = -5.6 on.
      assert Nx.to_flat_list(Fns.gelu(Nx.tensor([-8.0, -10.0]))) == [-0.0, -0.0]
    end

    test "what only looks like GELU is left as written, in other types too" do
      x = random({4, 7}, {:f, 32}, 5)
      y = random({4, 7}, {:f, 32}, 6)
      {outs, ops} = rewritten(&Fns.not_gelu/2, [mlx(x), mlx(y)], rewrites: true)
      assert ops > 4

      for {got, want} <- Enum.zip(Tuple.to_list(outs), Tuple.to_list(Fns.not_gelu(x, y))) do
        assert_same(got, want, atol: 1.0e-6)
      end

      # MLX has no f64 on the GPU.
      for type <- [{:bf, 16}, {:f, 16}] ++ if(@device == :cpu, do: [{:f, 64}], else: []) do
        xt = Nx.as_type(Nx.multiply(x, 3), type)
        {out, 1} = rewritten(&Fns.axon_gelu/1, [mlx(xt)], rewrites: true)
        assert out.type == type
        expected = Fns.gelu(Nx.as_type(xt, {:f, 64}))

        if type == {:f, 64} do
          assert_same(out, expected, atol: 1.0e-12, rtol: 1.0e-12)
        else
          expected = Nx.as_type(expected, {:f, 32})
          assert_same(Nx.as_type(out, {:f, 32}), expected, atol: 1.0e-2, rtol: 1.0e-2)
        end
      end
    end

    test "gradients through a rewritten GELU equal the composed one's" do
      x = random({3, 9}, {:f, 32}, 5) |> Nx.multiply(3)
      {g, _ops} = rewritten(&Fns.gelu_grad/1, [mlx(x)], rewrites: true)
      assert_same(g, Fns.gelu_grad(x), atol: 1.0e-5)
    end

    test "unset, GELU is rewritten on the CPU for f32" do
      x = random({4, 6, 10}, {:f, 32}, 3)
      cpu = @device == :cpu
      assert elem(rewritten(&Fns.gelu/1, [mlx(x)], []), 1) == 1 == cpu
      assert elem(rewritten(&Fns.gelu/1, [mlx(Nx.as_type(x, {:f, 16}))], []), 1) > 1
    end

    test "layer norm over the last axis, by hand or as Axon writes it, becomes one op" do
      for {shape, seed} <- [{{2, 3, 16}, 1}, {{5, 768}, 2}, {{1, 1}, 3}] do
        k = elem(shape, tuple_size(shape) - 1)
        x = Nx.multiply(random(shape, {:f, 32}, seed), 5) |> Nx.add(3)
        g = random({k}, {:f, 32}, seed + 10)
        b = random({k}, {:f, 32}, seed + 20)

        for fun <- [&Fns.layer_norm/3, &Fns.axon_layer_norm/3] do
          f64 = &Nx.as_type(&1, {:f, 64})
          expected = fun.(f64.(x), f64.(g), f64.(b)) |> Nx.as_type({:f, 32})
          {out, ops} = rewritten(fun, [mlx(x), mlx(g), mlx(b)], rewrites: true)
          {plain, plain_ops} = rewritten(fun, [mlx(x), mlx(g), mlx(b)], rewrites: false)
          # One op (k = 1 is left composed: Nx folds a mean over one element).
          assert ops == 1 or k == 1, "#{inspect(shape)}: #{ops} ops, #{plain_ops} composed"
          assert plain_ops > 3

          assert_same(out, expected, atol: 1.0e-5, rtol: 1.0e-5)
          assert_same(plain, expected, atol: 1.0e-4, rtol: 1.0e-4)
        end
      end
    end

    test "layer norm rows with NaN or infinities are NaN, as composed" do
      x = Nx.tensor([[1.0, :nan, 3.0], [1.0, 2.0, :infinity], [2.0, 2.0, 2.0]])
      g = Nx.tensor([1.0, 2.0, 3.0])
      b = Nx.tensor([0.5, 0.5, 0.5])
      {out, _} = rewritten(&Fns.layer_norm/3, [mlx(x), mlx(g), mlx(b)], rewrites: true)
      [r0, r1, r2] = Nx.to_list(out)
      assert Enum.all?(r0 ++ r1, &(&1 == :nan))
      # A constant row: zero variance, (x - mean) = 0, so b.
      assert r2 == [0.5, 0.5, 0.5]
    end

    test "what only looks like layer norm is left as written" do
      x = random({4, 6}, {:f, 32}, 5)
      y = random({4, 6}, {:f, 32}, 6)
      g = random({6}, {:f, 32}, 7)
      b = random({6}, {:f, 32}, 8)
      col = random({4, 1}, {:f, 32}, 9)
      args = [x, y, g, b, col]
      {outs, ops} = rewritten(&Fns.not_layer_norm/5, Enum.map(args, &mlx/1), rewrites: true)
      assert ops > 10

      for {got, want} <-
            Enum.zip(Tuple.to_list(outs), Tuple.to_list(apply(Fns, :not_layer_norm, args))) do
        assert_same(got, want, atol: 1.0e-5)
      end
    end

    test "gradients through a rewritten layer norm equal the composed one's" do
      x = random({3, 9}, {:f, 32}, 5) |> Nx.multiply(3)
      g = random({9}, {:f, 32}, 6)
      b = random({9}, {:f, 32}, 7)

      {grad, _ops} =
        rewritten(&Fns.layer_norm_grad/3, [mlx(x), mlx(g), mlx(b)], rewrites: true)

      assert_same(grad, Fns.layer_norm_grad(x, g, b), atol: 1.0e-4)
    end

    test "unset, layer norm is rewritten on the CPU for f32" do
      x = random({4, 6, 10}, {:f, 32}, 3)
      g = random({10}, {:f, 32}, 4)
      b = random({10}, {:f, 32}, 5)
      ops = fn args -> elem(rewritten(&Fns.layer_norm/3, Enum.map(args, &mlx/1), []), 1) end
      assert ops.([x, g, b]) == 1 == (@device == :cpu)
      assert ops.(Enum.map([x, g, b], &Nx.as_type(&1, {:f, 16}))) > 3
    end

    test "the option is checked" do
      assert_raise ArgumentError, ~r/:rewrites must be a boolean/, fn ->
        jit(&Fns.softmax/1, rewrites: :yes).(mlx(random({2, 3})))
      end
    end
  end

  describe "fusion lane (fuse: true)" do
    test "fused programs give the unfused results, in straight code, loops and branches" do
      f = &NxMlx.CompilerTest.Fns.fused_chain/2
      x = Nx.iota({3, 50}, type: :f32, backend: NxMlx.Backend) |> Nx.divide(50)
      y = Nx.add(x, 1)
      fused = Nx.Defn.jit(f, compiler: NxMlx, fuse: true).(x, y)
      plain = Nx.Defn.jit(f, compiler: NxMlx, fuse: false).(x, y)
      assert Nx.to_number(Nx.all_close(fused, plain, atol: 1.0e-5)) == 1
      refute Nx.to_number(Nx.all_close(fused, Nx.add(plain, 1))) == 1
    end

    test "without a usable compiler the program runs unfused and says why" do
      me = self()
      id = {:unfused, System.unique_integer()}

      :telemetry.attach(id, [:nx_mlx, :compiler, :unfused], &__MODULE__.forward/4, me)

      try do
        fused? = NxMlx.Native.fusion_available(:cpu)
        f = fn x -> x |> Nx.multiply(3) |> Nx.exp() |> Nx.add(1) end
        x = Nx.tensor([0.5, 1.0, 2.0], backend: NxMlx.Backend)
        out = Nx.Defn.jit(f, compiler: NxMlx, fuse: true, device: :cpu).(x)
        assert Nx.to_list(out) == Nx.to_list(f.(x))

        case fused? do
          {:ok, false} ->
            assert_receive {:unfused, %{reason: reason}}
            assert reason =~ "does not fuse"

          {:ok, true} ->
            refute_receive {:unfused, _}, 100
        end
      after
        :telemetry.detach(id)
      end
    end

    test ":fuse must be a boolean" do
      assert_raise ArgumentError, ~r/:fuse must be a boolean/, fn ->
        Nx.Defn.jit(&Nx.add(&1, 1), compiler: NxMlx, fuse: :sometimes).(Nx.tensor(1))
      end
    end
  end

  def forward(_event, _measurements, metadata, pid), do: send(pid, {:unfused, metadata})
end
