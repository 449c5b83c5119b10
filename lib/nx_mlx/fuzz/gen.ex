defmodule NxMlx.Fuzz.Gen do
  @moduledoc false
  # The case generator of `mix nx_mlx.fuzz`: `case(seed, index, device)` is a pure function
  # of its arguments (it seeds its own random state), so every case can be made again from
  # (seed, index). A case is plain data (no functions, no tensors), sent to a child VM that
  # runs it (NxMlx.Fuzz.Exec).
  #
  # A case: %{seed, index, family, op, kind, call, accum, names}
  #
  #   * kind :nx — `call` is {module, function, args}, run with its tensors on NxMlx and
  #     again on Nx.BinaryBackend, and the two outcomes compared;
  #   * kind :backend / :native — direct calls of NxMlx.Backend callbacks and of
  #     NxMlx.Native functions with hostile arguments: they must return or raise;
  #   * kind :scenario — {name, params}: a scripted check of the runtime API or of huge
  #     shapes (NxMlx.Fuzz.Exec.scenario/3).
  #
  # Placeholders in args, made real in the child:
  #   {:"$t", type, shape, values}   a tensor on the backend under test (NxMlx, or
  #                                  Nx.BinaryBackend for the reference run)
  #   {:"$bt", type, shape, values}  a tensor that is always on Nx.BinaryBackend
  #   {:"$tmpl", shape, type}        Nx.template/2
  #   {:"$ref", type, shape, values} the MLX array of an NxMlx tensor (for NxMlx.Native)
  #   :"$worker"                     the default worker of the device
  #   :"$forged"                     a reference that is no NIF resource
  #
  # `accum` is the accumulation order of the op for the float tolerances: 0 element-wise, 1
  # sums (reductions, scans, windows, fft), 2 sums of products (dot, conv), :linalg.

  import Bitwise, only: [<<<: 2]

  alias NxMlx.Backend, as: B

  @families [
    unary: 14,
    binary: 12,
    bitwise: 7,
    compare: 5,
    cast: 6,
    reduce: 8,
    cumulative: 4,
    sort: 5,
    shape: 8,
    slice: 6,
    pad: 4,
    index: 8,
    window: 4,
    conv: 3,
    dot: 4,
    fft: 3,
    linalg: 3,
    pow: 3,
    clip_select: 3,
    types: 3,
    mixed: 3,
    huge: 1,
    backend: 4,
    native: 6,
    runtime: 3
  ]

  @doc "The families, in report order."
  def families, do: Keyword.keys(@families)

  @int_types [{:u, 8}, {:u, 16}, {:u, 32}, {:u, 64}, {:s, 8}, {:s, 16}, {:s, 32}, {:s, 64}]
  @float_types [{:f, 16}, {:bf, 16}, {:f, 32}, {:f, 64}]

  @doc "The case at `index` of the run seeded with `seed`, for tensors on `device`."
  def case(seed, index, device) do
    # Hashed: the seed tuple of :rand's algorithms mixes its integers linearly, so nearby
    # (seed, index) pairs would share streams.
    h = fn k -> :erlang.phash2({seed, index, k}, 1 <<< 32) end
    :rand.seed(:exsss, {h.(1), h.(2), h.(3)})
    Process.put(:nx_mlx_fuzz_device, device)
    family = weighted(@families)
    {op, kind, call, accum} = gen(family)

    %{
      seed: seed,
      index: index,
      family: family,
      op: op,
      kind: kind,
      call: call,
      accum: accum
    }
  end

  ## Random helpers (process-dictionary state, seeded above)

  defp int(a, b), do: a + :rand.uniform(b - a + 1) - 1
  defp chance(p), do: :rand.uniform() < p
  defp pick(list), do: Enum.at(list, :rand.uniform(length(list)) - 1)

  defp weighted(pairs) do
    total = pairs |> Enum.map(&elem(&1, 1)) |> Enum.sum()
    pick_weighted(pairs, :rand.uniform(total))
  end

  defp pick_weighted([{k, w} | rest], n), do: if(n <= w, do: k, else: pick_weighted(rest, n - w))

  defp device, do: Process.get(:nx_mlx_fuzz_device, :cpu)

  defp float_types do
    if device() == :gpu, do: List.delete(@float_types, {:f, 64}), else: @float_types
  end

  defp any_type do
    cond do
      chance(0.45) -> pick(@int_types)
      chance(0.85) -> pick(float_types())
      true -> {:c, 64}
    end
  end

  defp real_type, do: if(chance(0.5), do: pick(@int_types), else: pick(float_types()))

  ## Shapes and data

  defp dim do
    cond do
      chance(0.03) -> 0
      chance(0.25) -> 1
      true -> int(2, 5)
    end
  end

  defp shape(min_rank \\ 0, max_rank \\ 4) do
    rank = int(min_rank, max_rank)

    if rank == 1 and chance(0.05),
      do: {pick([257, 1000, 4097])},
      else: List.to_tuple(for _ <- 1..rank//1, do: dim())
  end

  defp nonempty_shape(min_rank, max_rank) do
    rank = int(min_rank, max_rank)
    List.to_tuple(for _ <- 1..rank//1, do: if(chance(0.2), do: 1, else: int(2, 5)))
  end

  defp size(shape), do: shape |> Tuple.to_list() |> Enum.product()

  defp limits({:u, bits}), do: {0, (1 <<< bits) - 1}
  defp limits({:s, bits}), do: {-(1 <<< (bits - 1)), (1 <<< (bits - 1)) - 1}

  defp big({:f, 16}), do: 6.0e4
  defp big({:f, 64}), do: 1.0e300
  defp big(_), do: 3.0e38

  # One value of `type`; `range` :any (extremes and non-finite values included), :small
  # (moderate finite values: products, linear algebra) or {lo, hi} for integers.
  defp value({k, _} = type, range) when k in [:u, :s] do
    {lo, hi} = limits(type)

    case range do
      {a, b} ->
        int(max(a, lo), min(b, hi))

      :small ->
        int(max(-3, lo), min(3, hi))

      :any ->
        if chance(0.08),
          do: pick([lo, hi, lo + 1, hi - 1, 0]),
          else: int(max(-20, lo), min(40, hi))
    end
  end

  defp value({:c, _}, range), do: {:complex, value({:f, 32}, range), value({:f, 32}, range)}

  defp value(_type, :small), do: Float.round(:rand.uniform() * 4 - 2, 3)

  defp value(type, _range) do
    cond do
      chance(0.03) -> :nan
      chance(0.02) -> :infinity
      chance(0.02) -> :neg_infinity
      chance(0.03) -> -0.0
      chance(0.03) -> 0.0
      chance(0.02) -> pick([big(type), -big(type)])
      chance(0.01) -> pick([1.0e-40, -1.0e-42, 1.0e-7])
      chance(0.1) -> int(-5, 5) * 1.0
      true -> Float.round(:rand.uniform() * 20 - 10, 4)
    end
  end

  defp values(type, shape, range \\ :any), do: for(_ <- 1..size(shape)//1, do: value(type, range))

  defp t(type, shape, range \\ :any), do: {:"$t", type, shape, values(type, shape, range)}
  defp bt(type, shape), do: {:"$bt", type, shape, values(type, shape)}
  defp tmpl(shape, type), do: {:"$tmpl", shape, type}

  # An axis of a rank-`rank` tensor, sometimes negative; invalid ones when asked.
  defp axis(0, _), do: 0
  defp axis(rank, true), do: pick([rank, rank + 2, -rank - 1])
  defp axis(rank, false), do: if(chance(0.2), do: -int(1, rank), else: int(0, rank - 1))

  defp axes(rank) do
    all = Enum.to_list(0..(rank - 1)//1)
    Enum.filter(all, fn _ -> chance(0.5) end)
  end

  defp invalid?, do: chance(0.15)

  ## Families

  @unary [
    :exp,
    :expm1,
    :log,
    :log1p,
    :sigmoid,
    :sin,
    :cos,
    :tan,
    :asin,
    :acos,
    :atan,
    :sinh,
    :cosh,
    :tanh,
    :asinh,
    :acosh,
    :atanh,
    :sqrt,
    :rsqrt,
    :cbrt,
    :erf,
    :erfc,
    :erf_inv,
    :abs,
    :negate,
    :sign,
    :ceil,
    :floor,
    :round,
    :is_nan,
    :is_infinity,
    :real,
    :imag,
    :conjugate,
    :logical_not,
    :phase
  ]

  defp gen(:unary) do
    op = pick(@unary)
    {op, :nx, {Nx, op, [t(any_type(), shape())]}, 0}
  end

  @binary [
    :add,
    :subtract,
    :multiply,
    :divide,
    :atan2,
    :min,
    :max,
    :quotient,
    :remainder,
    :logical_and,
    :logical_or,
    :logical_xor
  ]

  defp gen(:binary) do
    op = pick(@binary)
    {sa, sb} = broadcast_pair(invalid?())
    {op, :nx, {Nx, op, [operand(any_type(), sa), operand(any_type(), sb)]}, 0}
  end

  @bitwise [
    :bitwise_and,
    :bitwise_or,
    :bitwise_xor,
    :left_shift,
    :right_shift,
    :bitwise_not,
    :population_count,
    :count_leading_zeros
  ]

  defp gen(:bitwise) do
    op = pick(@bitwise)
    # Floats are refused by Nx's front end; kept as the invalid share.
    type = fn -> if invalid?(), do: pick(float_types()), else: pick(@int_types) end

    if op in [:bitwise_not, :population_count, :count_leading_zeros] do
      {op, :nx, {Nx, op, [t(type.(), shape())]}, 0}
    else
      {sa, sb} = broadcast_pair(false)
      tb = type.()
      {_, bits} = tb

      # Shift amounts: mostly within the width, sometimes at or past it, or negative.
      b =
        if op in [:left_shift, :right_shift] and match?({k, _} when k in [:u, :s], tb),
          do: {:"$t", tb, sb, for(_ <- 1..size(sb)//1, do: shift_amount(tb, bits))},
          else: operand(tb, sb)

      {op, :nx, {Nx, op, [operand(type.(), sa), b]}, 0}
    end
  end

  @compare [:equal, :not_equal, :greater, :less, :greater_equal, :less_equal]

  defp gen(:compare) do
    op = pick(@compare)
    {sa, sb} = broadcast_pair(invalid?())
    {op, :nx, {Nx, op, [operand(any_type(), sa), operand(any_type(), sb)]}, 0}
  end

  defp gen(:cast) do
    from = any_type()
    s = shape()

    if chance(0.7) do
      {:as_type, :nx, {Nx, :as_type, [t(from, s), any_type()]}, 0}
    else
      {_, bits} = from

      to =
        if invalid?() do
          pick(@int_types ++ float_types())
        else
          pick(Enum.filter(@int_types ++ float_types() ++ [{:c, 64}], &(elem(&1, 1) == bits)))
        end

      {:bitcast, :nx, {Nx, :bitcast, [t(from, s), to]}, 0}
    end
  end

  defp gen(:reduce) do
    op = pick([:sum, :product, :reduce_max, :reduce_min, :all, :any, :argmax, :argmin, :mean])
    s = shape()
    rank = tuple_size(s)
    range = if op == :product, do: :small, else: :any

    type =
      if op in [:argmax, :argmin, :reduce_max, :reduce_min], do: real_type(), else: any_type()

    x = t(type, s, range)

    opts =
      if op in [:argmax, :argmin] do
        [keep_axis: chance(0.3), tie_break: pick([:low, :high])] ++
          if(chance(0.7) and rank > 0, do: [axis: axis(rank, invalid?())], else: [])
      else
        ax = axes(rank)
        ax = if invalid?(), do: ax ++ [rank + int(0, 2)], else: ax
        [keep_axes: chance(0.3)] ++ if(chance(0.8), do: [axes: ax], else: [])
      end

    {op, :nx, {Nx, op, [x, opts]}, 1}
  end

  defp gen(:cumulative) do
    op = pick([:cumulative_sum, :cumulative_product, :cumulative_max, :cumulative_min])
    s = shape(1, 3)
    range = if op == :cumulative_product, do: :small, else: :any
    type = if op in [:cumulative_max, :cumulative_min], do: real_type(), else: any_type()
    opts = [axis: axis(tuple_size(s), invalid?()), reverse: chance(0.5)]
    {op, :nx, {Nx, op, [t(type, s, range), opts]}, 1}
  end

  defp gen(:sort) do
    op = pick([:sort, :argsort, :top_k])
    s = shape(1, 3)
    rank = tuple_size(s)

    case op do
      :top_k ->
        n = elem(s, rank - 1)
        k = if invalid?(), do: pick([0, n + 1, -1]), else: int(1, max(n, 1))
        {op, :nx, {Nx, :top_k, [t(real_type(), s), [k: k]]}, 0}

      _ ->
        opts = [axis: axis(rank, invalid?()), direction: pick([:asc, :desc])]
        # Ties are ordered only by a stable argsort.
        opts = if op == :argsort, do: [stable: true] ++ opts, else: opts
        {op, :nx, {Nx, op, [t(real_type(), s), opts]}, 0}
    end
  end

  defp gen(:shape) do
    s = shape()
    rank = tuple_size(s)
    type = any_type()
    x = t(type, s)

    case pick([:reshape, :transpose, :broadcast, :squeeze, :concatenate, :stack, :reverse]) do
      :reshape ->
        target =
          if invalid?(), do: append(s, 2), else: s |> Tuple.to_list() |> regroup()

        {:reshape, :nx, {Nx, :reshape, [x, target]}, 0}

      :transpose ->
        perm = Enum.shuffle(Enum.to_list(0..(rank - 1)//1))
        perm = if invalid?() and rank > 0, do: [rank | tl(perm)], else: perm
        {:transpose, :nx, {Nx, :transpose, [x, [axes: perm]]}, 0}

      :broadcast ->
        target =
          if invalid?() and rank > 0,
            do: s |> Tuple.to_list() |> Enum.map(&(&1 + 1)) |> List.to_tuple(),
            else: broadcast_target(s)

        {:broadcast, :nx, {Nx, :broadcast, [x, target]}, 0}

      :squeeze ->
        ones = for {1, i} <- Enum.with_index(Tuple.to_list(s)), do: i
        ax = if invalid?() and rank > 0, do: [int(0, rank - 1)], else: Enum.take_random(ones, 2)
        {:squeeze, :nx, {Nx, :squeeze, [x, [axes: ax]]}, 0}

      :concatenate ->
        ax = if rank == 0, do: 0, else: int(0, rank - 1)
        n = int(1, 3)

        parts =
          for _ <- 1..n do
            ps =
              if rank == 0,
                do: s,
                else: put_elem(s, ax, if(invalid?(), do: int(1, 3), else: int(0, 3)))

            ps = if invalid?() and rank > 1, do: put_elem(ps, rem(ax + 1, rank), 7), else: ps
            t(pick([type, type, any_type()]), ps)
          end

        {:concatenate, :nx, {Nx, :concatenate, [parts, [axis: ax]]}, 0}

      :stack ->
        parts = for _ <- 1..int(1, 3), do: t(type, if(invalid?(), do: shape(), else: s))
        {:stack, :nx, {Nx, :stack, [parts, [axis: int(0, rank)]]}, 0}

      :reverse ->
        {:reverse, :nx, {Nx, :reverse, [x, [axes: axes(rank)]]}, 0}
    end
  end

  defp gen(:slice) do
    s = shape(1, 4)
    rank = tuple_size(s)
    dims = Tuple.to_list(s)
    x = t(any_type(), s)

    if chance(0.65) do
      lengths =
        Enum.map(dims, fn d -> if invalid?(), do: d + 1, else: int(min(1, d), max(d, 0)) end)

      starts =
        Enum.map(dims, fn d ->
          start = if chance(0.2), do: pick([-3, d + 5, 1 <<< 40]), else: int(0, max(d - 1, 0))

          if chance(0.3),
            do: {:"$t", pick([{:s, 32}, {:s, 64}, {:u, 8}, {:s, 8}]), {}, [clamp_to(start, 100)]},
            else: start
        end)

      strides = Enum.map(dims, fn _ -> if invalid?(), do: pick([0, -1]), else: int(1, 3) end)
      {:slice, :nx, {Nx, :slice, [x, starts, lengths, [strides: strides]]}, 0}
    else
      upd_shape = s |> Tuple.to_list() |> Enum.map(&int(min(1, &1), &1)) |> List.to_tuple()
      upd_shape = if invalid?(), do: append(upd_shape, 1), else: upd_shape
      starts = Enum.map(dims, fn d -> if chance(0.2), do: pick([-2, d + 3]), else: int(0, d) end)

      starts =
        if rank > 0 and chance(0.2), do: [{:"$t", {:s, 32}, {}, [1]} | tl(starts)], else: starts

      {:put_slice, :nx, {Nx, :put_slice, [x, starts, t(any_type(), upd_shape)]}, 0}
    end
  end

  defp gen(:pad) do
    s = shape(0, 3)
    type = real_type()

    config =
      Enum.map(Tuple.to_list(s), fn d ->
        lo = int(-2, 3)
        hi = int(-2, 3)
        interior = if chance(0.3), do: int(1, 2), else: 0
        interior = if invalid?(), do: -1, else: interior
        # Keep the padded size non-negative unless this is an invalid case.
        padded = d + max(d - 1, 0) * interior + lo + hi

        if padded < 0 and not invalid?(), do: {0, 0, interior}, else: {lo, hi, interior}
      end)

    config = if invalid?(), do: [{0, 0, 0} | config], else: config
    {:pad, :nx, {Nx, :pad, [t(type, s), value(type, :any) |> scalar_number(), config]}, 0}
  end

  defp gen(:index) do
    op = pick([:gather, :take, :take_along_axis, :indexed_add, :indexed_put])
    s = nonempty_shape(1, 3)
    rank = tuple_size(s)
    type = any_type()
    x = t(type, s)
    itype = pick([{:s, 32}, {:s, 64}, {:u, 8}, {:s, 8}, {:u, 32}, {:s, 16}])
    idx = fn n, bound -> for _ <- 1..n//1, do: index_value(bound, itype) end

    case op do
      :take ->
        ax = int(0, rank - 1)
        is = shape(0, 2)
        ax_opt = if invalid?(), do: rank + 1, else: ax
        ids = {:"$t", itype, is, idx.(max(size(is), 0), elem(s, ax)) |> Enum.take(size(is))}
        {op, :nx, {Nx, :take, [x, ids, [axis: ax_opt]]}, 0}

      :take_along_axis ->
        ax = int(0, rank - 1)
        is = put_elem(s, ax, int(1, 4))
        ids = {:"$t", itype, is, idx.(size(is), elem(s, ax))}
        {op, :nx, {Nx, :take_along_axis, [x, ids, [axis: ax]]}, 0}

      _ ->
        # Index rows over `ax` (a subset of the axes, in order).
        ax = Enum.filter(0..(rank - 1), fn _ -> chance(0.6) end)
        ax = if ax == [], do: [0], else: ax
        n = int(1, 4)
        rows = for _ <- 1..n, a <- ax, do: index_value(elem(s, a), itype)
        rows = if invalid?(), do: rows ++ [0], else: rows
        ids = {:"$t", itype, {n, length(ax)}, Enum.take(rows, n * length(ax))}

        ids =
          if length(rows) > n * length(ax),
            do: {:"$t", itype, {n + 1}, Enum.take(rows, n + 1)},
            else: ids

        opts =
          if chance(0.3) and ax == Enum.to_list(0..(length(ax) - 1)), do: [], else: [axes: ax]

        if op == :gather do
          {op, :nx, {Nx, :gather, [x, ids, opts]}, 0}
        else
          rest = for {d, i} <- Enum.with_index(Tuple.to_list(s)), i not in ax, do: d
          upd = t(pick([type, any_type()]), List.to_tuple([n | rest]))
          {op, :nx, {Nx, op, [x, ids, upd, opts]}, 1}
        end
    end
  end

  defp gen(:window) do
    op = pick([:window_sum, :window_product, :window_max, :window_min, :window_mean])
    s = nonempty_shape(1, 3)
    dims = Tuple.to_list(s)
    win = Enum.map(dims, &int(1, min(&1, 3)))
    win = if invalid?(), do: [9 | tl(win)], else: win

    padding =
      case int(0, 3) do
        0 -> :valid
        1 -> :same
        _ -> Enum.map(dims, fn _ -> {int(-1, 2), int(-1, 2)} end)
      end

    opts = [
      strides: Enum.map(dims, fn _ -> int(1, 2) end),
      padding: padding,
      window_dilations: Enum.map(dims, fn _ -> if chance(0.2), do: 2, else: 1 end)
    ]

    range = if op == :window_product, do: :small, else: :any

    type =
      if op in [:window_max, :window_min],
        do: real_type(),
        else: pick(@int_types ++ float_types())

    {op, :nx, {Nx, op, [t(type, s, range), List.to_tuple(win), opts]}, 1}
  end

  defp gen(:conv) do
    spatial = int(1, 2)
    groups = pick([1, 1, 2])
    cin = groups * int(1, 2)
    cout = groups * int(1, 2)
    batch = int(1, 2)
    sizes = for _ <- 1..spatial, do: int(3, 6)
    ks = Enum.map(sizes, &int(1, min(&1, 3)))
    type = pick(float_types() ++ [pick(@int_types)])
    input = t(type, List.to_tuple([batch, cin | sizes]), :small)
    cin_k = if invalid?(), do: cin + 1, else: div(cin, groups)
    kernel = t(type, List.to_tuple([cout, cin_k | ks]), :small)

    padding =
      case int(0, 2) do
        0 -> :valid
        1 -> :same
        2 -> Enum.map(ks, fn _ -> {int(-1, 2), int(0, 2)} end)
      end

    opts =
      [
        strides: Enum.map(sizes, fn _ -> int(1, 2) end),
        padding: padding,
        kernel_dilation: Enum.map(sizes, fn _ -> if chance(0.2), do: 2, else: 1 end),
        input_dilation: Enum.map(sizes, fn _ -> if chance(0.15), do: 2, else: 1 end),
        feature_group_size: groups
      ] ++ if(chance(0.1) and groups == 1, do: [batch_group_size: batch], else: [])

    {:conv, :nx, {Nx, :conv, [input, kernel, opts]}, 2}
  end

  defp gen(:dot) do
    type = any_type()
    type2 = if chance(0.7), do: type, else: any_type()
    batch = if chance(0.4), do: [int(1, 3)], else: []
    m = int(1, 4)
    k = if chance(0.05), do: 300, else: int(1, 5)
    n = int(1, 4)
    k2 = if invalid?(), do: k + 1, else: k
    a = t(type, List.to_tuple(batch ++ [m, k]), :small)
    b = t(type2, List.to_tuple(batch ++ [k2, n]), :small)
    nb = length(batch)

    if chance(0.3) and batch == [] do
      {:dot, :nx, {Nx, :dot, [a, b]}, 2}
    else
      bax = if nb == 1, do: [0], else: []
      {:dot, :nx, {Nx, :dot, [a, [nb + 1], bax, b, [nb], bax]}, 2}
    end
  end

  defp gen(:fft) do
    op = pick([:fft, :ifft, :fft2, :ifft2])
    min_rank = if op in [:fft2, :ifft2], do: 2, else: 1
    s = nonempty_shape(min_rank, 3)
    rank = tuple_size(s)
    type = pick([{:c, 64}, {:f, 32}, pick(@int_types)])

    opts =
      if op in [:fft, :ifft] do
        len = if chance(0.3), do: [length: pick([int(1, 8), :power_of_two])], else: []
        len = if invalid?(), do: [length: 0], else: len
        len ++ if(chance(0.5), do: [axis: axis(rank, false)], else: [])
      else
        if chance(0.3), do: [lengths: [int(1, 5), int(1, 5)]], else: []
      end

    {op, :nx, {Nx, op, [t(type, s, :small), opts]}, 1}
  end

  defp gen(:linalg) do
    type = pick(device_linalg_types())
    n = int(1, 4)
    batch = if chance(0.3), do: [int(1, 2)], else: []
    square = List.to_tuple(batch ++ [n, n])
    # Diagonally dominant: well-conditioned, so f32 answers agree with Nx's closely.
    dominant = fn shape ->
      {rows, cols} = {elem(shape, tuple_size(shape) - 2), elem(shape, tuple_size(shape) - 1)}

      vals =
        for idx <- 0..(size(shape) - 1)//1 do
          if rem(idx, cols) == rem(div(idx, cols), rows),
            do: 5.0 + :rand.uniform(),
            else: Float.round(:rand.uniform() - 0.5, 3)
        end

      {:"$t", type, shape, vals}
    end

    case pick([
           :qr,
           :cholesky,
           :solve,
           :triangular_solve,
           :determinant,
           :lu,
           :eigh,
           :svd,
           :invert
         ]) do
      op when op in [:cholesky, :eigh] ->
        # A symmetric positive-definite matrix: built from a dominant one as A + A^T.
        {op, :nx, {NxMlx.Fuzz.Exec, :symmetric_then, [op, dominant.(square)]}, :linalg}

      :solve ->
        b = t(type, List.to_tuple(batch ++ [n]), :small)
        b = if invalid?(), do: t(type, {n + 1}, :small), else: b
        {:solve, :nx, {Nx.LinAlg, :solve, [dominant.(square), b]}, :linalg}

      :triangular_solve ->
        b = t(type, {n, int(1, 3)}, :small)
        opts = [lower: chance(0.5), left_side: true, transform_a: pick([:none, :transpose])]

        {:triangular_solve, :nx, {Nx.LinAlg, :triangular_solve, [dominant.({n, n}), b, opts]},
         :linalg}

      :invert ->
        {:invert, :nx, {Nx.LinAlg, :invert, [dominant.({n, n})]}, :linalg}

      op ->
        x = if op == :qr and chance(0.3), do: dominant.({n + 1, n}), else: dominant.(square)
        x = if invalid?(), do: t(type, {n}), else: x
        {op, :nx, {Nx.LinAlg, op, [x]}, :linalg}
    end
  end

  defp gen(:pow) do
    base_type = real_type()
    s = shape(0, 2)

    exponent =
      case int(0, 2) do
        0 -> int(-3, 6)
        1 -> {:"$t", pick(@int_types), s, for(_ <- 1..size(s)//1, do: int(0, 5))}
        2 -> {:"$t", {:s, 32}, s, for(_ <- 1..size(s)//1, do: int(-2, 70))}
      end

    base = {:"$t", base_type, s, values(base_type, s, if(chance(0.7), do: :small, else: :any))}
    {:pow, :nx, {Nx, :pow, [base, exponent]}, 0}
  end

  defp gen(:clip_select) do
    type = real_type()
    s = shape(0, 3)

    if chance(0.5) do
      lo = value(type, :any) |> scalar_number()
      hi = value(type, :any) |> scalar_number()
      {:clip, :nx, {Nx, :clip, [t(type, s), lo, hi]}, 0}
    else
      {sp, sa} = broadcast_pair(invalid?())
      pred = {:"$t", {:u, 8}, sp, for(_ <- 1..size(sp)//1, do: int(0, 2))}
      {:select, :nx, {Nx, :select, [pred, t(any_type(), sa), t(any_type(), sa)]}, 0}
    end
  end

  defp gen(:types) do
    type = pick([{:f, 8}, {:f8_e4m3fn, 8}, {:s, 4}, {:u, 4}, {:s, 2}, {:c, 128}])
    s = shape(0, 2)
    vals = for _ <- 1..size(s)//1, do: narrow_value(type)
    x = {:"$t", type, s, vals}

    case int(0, 3) do
      0 -> {:add, :nx, {Nx, :add, [x, x]}, 0}
      1 -> {:sum, :nx, {Nx, :sum, [x]}, 1}
      2 -> {:add, :nx, {Nx, :add, [x, t({:f, 32}, s)]}, 0}
      3 -> {:as_type, :nx, {Nx, :as_type, [x, {:f, 32}]}, 0}
    end
  end

  defp gen(:mixed) do
    op = pick([:add, :multiply, :dot, :concatenate, :select, :take])
    s = nonempty_shape(1, 2)
    type = real_type()

    call =
      case op do
        :dot ->
          {Nx, :dot, [t(type, s, :small), bt(type, append(Tuple.delete_at(s, 0), 2))]}

        :concatenate ->
          {Nx, :concatenate, [[bt(type, s), t(type, s)]]}

        :select ->
          {Nx, :select, [bt({:u, 8}, s), t(type, s), bt(type, s)]}

        :take ->
          {Nx, :take, [bt(type, s), {:"$t", {:s, 32}, {2}, [0, 0]}]}

        _ ->
          if chance(0.5),
            do: {Nx, op, [t(type, s), bt(any_type(), s)]},
            else: {Nx, op, [bt(any_type(), s), t(type, s)]}
      end

    {op, :nx, call, if(op == :dot, do: 2, else: 0)}
  end

  defp gen(:huge) do
    scenario =
      pick([:broadcast_sum_u8, :broadcast_max, :broadcast_slice, :iota_huge, :broadcast_all])

    {scenario, :scenario, {scenario, %{value: int(1, 255)}}, 0}
  end

  defp gen(:backend) do
    s = nonempty_shape(1, 3)
    rank = tuple_size(s)
    type = pick([{:f, 32}, {:s, 32}, {:u, 8}])
    x = t(type, s)
    dims = Tuple.to_list(s)
    bad_shape = s |> Tuple.to_list() |> Enum.map(&(&1 + int(0, 3))) |> List.to_tuple()

    case pick([
           :slice,
           :reshape,
           :add,
           :transpose,
           :sum,
           :concatenate,
           :pad,
           :gather,
           :put_slice,
           :squeeze,
           :reverse,
           :iota,
           :as_type,
           :from_binary,
           :dot,
           :argsort
         ]) do
      :slice ->
        strides = Enum.map(dims, fn _ -> pick([0, -1, 1, 2, 1 <<< 40]) end)
        lengths = Enum.map(dims, fn d -> pick([d, d + 2, 0, -1]) end)
        starts = Enum.map(dims, fn d -> pick([0, -1, d, 1 <<< 62]) end)

        {:slice, :backend,
         {B, :slice, [tmpl(pick([s, bad_shape]), type), x, starts, lengths, strides]}, 0}

      :reshape ->
        {:reshape, :backend, {B, :reshape, [tmpl(append(s, 3), type), x]}, 0}

      :add ->
        {:add, :backend, {B, :add, [tmpl(s, type), x, t(type, bad_shape)]}, 0}

      :transpose ->
        {:transpose, :backend, {B, :transpose, [tmpl(s, type), x, [0, rank + 3]]}, 0}

      :sum ->
        {:sum, :backend, {B, :sum, [tmpl({}, type), x, [axes: [rank + 1], keep_axes: false]]}, 0}

      :concatenate ->
        {:concatenate, :backend,
         {B, :concatenate, [tmpl(s, type), [x, t(type, bad_shape)], pick([0, rank + 2])]}, 0}

      :pad ->
        cfg = Enum.map(dims, fn _ -> {int(-9, 2), int(-9, 2), pick([0, 0, -1])} end)
        {:pad, :backend, {B, :pad, [tmpl(bad_shape, type), x, {:"$t", type, {}, [0]}, cfg]}, 0}

      :gather ->
        ids = {:"$t", {:s, 32}, {2, 1}, [100_000, -100_000]}

        {:gather, :backend,
         {B, :gather, [tmpl({2}, type), x, ids, [axes: [pick([0, rank + 1])]]]}, 0}

      :put_slice ->
        {:put_slice, :backend,
         {B, :put_slice,
          [tmpl(s, type), x, Enum.map(dims, fn _ -> pick([100, -100]) end), t(type, bad_shape)]},
         0}

      :squeeze ->
        {:squeeze, :backend, {B, :squeeze, [tmpl(s, type), x, [0, rank + 4]]}, 0}

      :reverse ->
        {:reverse, :backend, {B, :reverse, [tmpl(s, type), x, [rank + 1]]}, 0}

      :iota ->
        {:iota, :backend, {B, :iota, [tmpl(s, type), rank + 3, [device: device()]]}, 0}

      :as_type ->
        {:as_type, :backend,
         {B, :as_type, [tmpl(bad_shape, pick([{:c, 128}, {:f, 8}, {:s, 64}])), x]}, 0}

      :from_binary ->
        {:from_binary, :backend,
         {B, :from_binary, [tmpl(bad_shape, type), <<1, 2, 3>>, [device: device()]]}, 0}

      :dot ->
        {:dot, :backend,
         {B, :dot, [tmpl({2, 2}, type), x, [rank + 1], [], t(type, bad_shape), [0], []]}, 0}

      :argsort ->
        {:argsort, :backend,
         {B, :argsort, [tmpl(s, {:s, 32}), x, [axis: rank + 2, direction: :asc]]}, 0}
    end
  end

  defp gen(:native) do
    r = fn -> {:"$ref", {:f, 32}, {4}, [1.0, 2.0, 3.0, 4.0]} end
    m = fn -> {:"$ref", {:f, 32}, {2, 2}, [1.0, 2.0, 3.0, 4.0]} end
    ir = fn v -> {:"$ref", {:s, 32}, {length(v)}, v} end
    w = :"$worker"
    junk = fn -> pick([:"$forged", :junk, -1, 1 <<< 70, "bin", [], {1, 2}, 3.5]) end
    size = fn -> pick([-1, 0, 1 <<< 62, 1 <<< 31, -(1 <<< 40)]) end
    bad_index = fn -> pick([100_000, -100_000, 4, -5, 1 <<< 31, 1 <<< 40]) end

    {fun, args} =
      case int(0, 33) do
        0 ->
          {:slice, [w, r.(), [0], [4], [0]]}

        1 ->
          {:slice, [w, r.(), [pick([-3, 5, 0])], [pick([9, -1, 2])], [pick([1, -1, 2])]]}

        2 ->
          {:take, [w, r.(), ir.([bad_index.()]), 0]}

        3 ->
          {:take, [w, r.(), ir.([0]), pick([5, -7, 1 <<< 40])]}

        4 ->
          {:reshape, [w, r.(), [size.(), size.()]]}

        5 ->
          {:broadcast_to, [w, r.(), [size.()]]}

        6 ->
          {:full, [w, [size.()], 1.0, pick([:float32, :bogus, :int8])]}

        7 ->
          {:from_binary, [w, <<1, 2, 3>>, [pick([4, -1, 1 <<< 40])], :float32]}

        8 ->
          {:unary, [w, pick([:not_an_op, :exp]), junk.()]}

        9 ->
          {:binary, [w, :add, :"$forged", r.()]}

        10 ->
          {:binary, [junk.(), :add, r.(), r.()]}

        11 ->
          {:reduce, [w, :sum, r.(), [pick([9, -9, 1 <<< 40])], false]}

        12 ->
          {:transpose, [w, m.(), pick([[0, 0], [5, 0], [-1, 0], [0]])]}

        13 ->
          {:concatenate, [w, pick([[], [r.(), m.()]]), pick([0, 3, -4])]}

        14 ->
          {:pad, [w, r.(), [pick([-5, 1 <<< 40])], [2], 0.0]}

        15 ->
          {:gather, [w, r.(), [ir.([bad_index.()])], [pick([0, 3])], [pick([9, 1, 0, -1])]]}

        16 ->
          {:scatter, [w, pick([true, false]), r.(), [ir.([bad_index.()])], m.(), [0]]}

        17 ->
          {:as_strided,
           [
             w,
             r.(),
             [pick([100, 1_000_000_000, -1])],
             [pick([1, 1 <<< 30, -1])],
             pick([0, 1 <<< 40, -1])
           ]}

        18 ->
          {:view, [w, {:"$ref", {:u, 8}, {3}, [1, 2, 3]}, pick([:int64, :float32, :bogus])]}

        19 ->
          {:scan, [w, pick([:sum, :max, :bogus]), r.(), pick([7, -9, 0]), false]}

        20 ->
          {:fft, [w, false, r.(), pick([0, -1, 1 <<< 40]), 0]}

        21 ->
          {:topk, [w, r.(), pick([0, 100, -1]), 0]}

        22 ->
          {:sort, [w, pick([true, false]), r.(), pick([5, -5])]}

        23 ->
          {:arange, [w, 0.0, 10.0, pick([0.0, -1.0, 1.0e-300]), :float32]}

        24 ->
          {:matmul, [w, m.(), r.()]}

        25 ->
          {:to_binary, [junk.()]}

        26 ->
          {:eval, [junk.()]}

        27 ->
          {:submit, [pick([[:"$forged"], :junk, [r.(), 5]])]}

        28 ->
          {:poll, [junk.()]}

        29 ->
          {:linalg, [w, pick([:junk, :solve, :inv]), m.(), r.(), true]}

        30 ->
          {:decompose, [w, pick([:svd, :qr, :junk, :eigh]), r.()]}

        31 ->
          {:tensordot, [w, m.(), m.(), [0], [pick([5, -3])]]}

        32 ->
          {:slice_update, [w, r.(), m.(), [pick([3, -1])], [pick([9, 0])]]}

        33 ->
          {pick([:put_along_axis, :take_along_axis, :arg_reduce]),
           native_axis_args(w, r, ir, bad_index)}
      end

    {fun, :native, {NxMlx.Native, fun, args}, 0}
  end

  defp gen(:runtime) do
    scenario =
      pick([
        :queue_new_junk,
        :with_queue_compute,
        :with_queue_junk,
        :synchronize_junk,
        :submit_wait,
        :submit_junk,
        :forged_command,
        :pipeline_run,
        :pipeline_junk,
        :memory_limit_junk,
        :memory_limit_small,
        :cache_limit_junk,
        :memory_and_clear
      ])

    {scenario, :scenario,
     {scenario, %{n: int(1, 64), junk: pick([-1, :atom, 1 <<< 70, "x", 0.5, nil])}}, 0}
  end

  defp native_axis_args(w, r, ir, bad_index) do
    case int(0, 2) do
      0 -> [w, r.(), ir.([bad_index.()]), r.(), pick([0, 3])]
      1 -> [w, r.(), ir.([bad_index.()]), pick([0, -3, 9])]
      2 -> [w, pick([true, false]), r.(), pick([0, 5, -9]), false]
    end
  end

  ## Helpers of the families

  # Two shapes that broadcast together (or, when `invalid`, that do not).
  defp broadcast_pair(invalid) do
    s = shape()

    cond do
      invalid and tuple_size(s) > 0 ->
        {s, append(Tuple.delete_at(s, 0), elem(s, 0) + 1) |> Tuple.insert_at(0, 2) |> pad_dims(s)}

      chance(0.3) ->
        {s, {}}

      chance(0.3) ->
        {s,
         s
         |> Tuple.to_list()
         |> Enum.map(fn d -> if chance(0.4), do: 1, else: d end)
         |> List.to_tuple()}

      true ->
        {s, s}
    end
  end

  # Makes an invalid pair differ in a non-1 dimension.
  defp pad_dims(t, s) do
    if tuple_size(t) == tuple_size(s) + 1 and Enum.all?(Tuple.to_list(s), &(&1 <= 1)),
      do: append(s, 3) |> Tuple.insert_at(0, 3),
      else: t
  end

  defp operand(type, shape) do
    if shape == {} and chance(0.3),
      do: scalar_number(value(real_of(type), :any)),
      else: t(type, shape)
  end

  defp real_of({:c, _}), do: {:f, 32}
  defp real_of(t), do: t

  # A number usable as an Nx scalar argument (atoms of non-finite values are fine for Nx).
  defp scalar_number({:complex, re, im}), do: {:complex, re, im}
  defp scalar_number(v), do: v

  defp shift_amount({:s, _}, bits) do
    cond do
      chance(0.1) -> -int(1, 3)
      chance(0.1) -> pick([bits, bits + 1, bits - 1])
      true -> int(0, bits - 1)
    end
  end

  defp shift_amount({:u, _}, bits) do
    if chance(0.1), do: pick([bits, bits + 1, bits - 1]), else: int(0, bits - 1)
  end

  defp index_value(bound, {kind, bits}) do
    {lo, hi} =
      if kind == :u,
        do: {0, (1 <<< bits) - 1},
        else: {-(1 <<< (bits - 1)), (1 <<< (bits - 1)) - 1}

    v =
      cond do
        chance(0.08) -> pick([bound, bound + 1, -1, -bound, 300, 100_000])
        true -> int(0, bound - 1)
      end

    v |> max(lo) |> min(hi)
  end

  defp append(t, x), do: Tuple.insert_at(t, tuple_size(t), x)

  defp clamp_to(v, m), do: v |> max(-m) |> min(m)

  defp narrow_value({:c, 128}), do: {:complex, Float.round(:rand.uniform(), 2), 1.0}
  defp narrow_value({:s, 4}), do: int(-8, 7)
  defp narrow_value({:u, 4}), do: int(0, 15)
  defp narrow_value({:s, 2}), do: int(-2, 1)
  defp narrow_value(_), do: pick([0.5, 1.0, -2.0, 0.25])

  defp device_linalg_types, do: if(device() == :gpu, do: [{:f, 32}], else: [{:f, 32}, {:f, 64}])

  # A reshape target of the same size: dims regrouped (products of neighbours) or split.
  defp regroup(dims) do
    case dims do
      [a, b | rest] when a * b <= 64 ->
        if(chance(0.5), do: [a * b | rest], else: dims) |> List.to_tuple()

      [a | rest] when a in [4, 6] ->
        List.to_tuple([2, div(a, 2) | rest])

      _ ->
        dims |> Enum.reverse() |> List.to_tuple()
    end
  end

  defp broadcast_target(s) do
    extra = for _ <- 1..int(0, 2)//1, do: int(1, 3)

    dims =
      Tuple.to_list(s) |> Enum.map(fn d -> if d == 1 and chance(0.5), do: int(2, 4), else: d end)

    List.to_tuple(extra ++ dims)
  end
end
