defmodule NxMlx.Compiler.Patterns do
  @moduledoc false
  # Rewrites of composed Nx expressions onto one MLX op, applied while lowering (see
  # NxMlx.Compiler's `:rewrites` option). Each match is exact: the same nodes (by id), the
  # same axes, no type change; anything else lowers op by op as written.
  #
  # softmax: exp(x - max(x)) / sum(exp(x - max(x))) over the same axes, with the max kept as
  # size-1 axes, possibly under stop_grad or other metadata; written as a division (as by
  # hand) or as the product of the exponentials with 1 / sum (Axon.Activations.softmax).
  # On an H200, MLX's softmax over 8x12x512x512 bf16 took 0.089 ms against 0.263 for the
  # composed five ops; on the CPU MLX's softmax is about 3x slower than the composed form.
  #
  # gelu (exact): x * c * (1 + erf(x * k)) with c = 1/2 and k = 1/sqrt(2), the factors in any
  # order and association, each constant a product or quotient of constants (x / sqrt(2),
  # / 2, * 0.5: as by hand or as Axon.Activations.gelu writes it), equal to 1/2 and 1/sqrt(2)
  # within the rounding of the tensor's type.
  #
  # layer_norm: (x - mean(x)) * rsqrt(var(x) + eps) * g + b over the last axis, the three
  # factors in any order and association, the mean as Nx.mean writes it (sum kept / n),
  # the variance as the mean of (x - mean)^2 (a product of the difference with itself, or
  # its power 2, with the mean computed once or twice: as by hand or as Axon.Layers
  # layer_norm writes it), g and b of the last axis's size (possibly reshaped to size-1
  # leading axes).

  alias Nx.Defn.Expr
  alias Nx.Tensor, as: T

  @doc """
  `{:softmax, x, axes}` when `t` computes softmax(x) over `axes`, `{:gelu, x}` when it
  computes the exact GELU of x, `{:layer_norm, x, g, b, eps}` when it is x's layer norm
  over its last axis, else nil.
  """
  def match(%T{data: %Expr{op: op}} = t) when op in [:divide, :multiply],
    do: softmax_match(t) || gelu(t)

  def match(%T{data: %Expr{op: :add, args: [p, q]}} = t),
    do: layer_norm(t, p, q) || layer_norm(t, q, p)

  def match(_t), do: nil

  defp softmax_match(%T{data: %Expr{op: :divide, args: [e, s]}} = t), do: softmax(t, e, s)

  defp softmax_match(%T{data: %Expr{op: :multiply, args: [a, b]}} = t) do
    case {reciprocal(a), reciprocal(b)} do
      {%T{} = s, _} -> softmax(t, b, s)
      {_, %T{} = s} -> softmax(t, a, s)
      _ -> nil
    end
  end

  # `s` when `t` is 1 / s.
  defp reciprocal(%T{data: %Expr{op: :divide, args: [one, s]}}) do
    if constant?(unwrap(one), 1), do: s
  end

  defp reciprocal(_), do: nil

  defp constant?(%T{data: %Expr{op: :constant, args: [value]}}, value), do: true
  defp constant?(%T{data: %Expr{op: :constant, args: [v]}}, value) when v == value, do: true
  defp constant?(_, _), do: false

  defp softmax(%T{type: {kind, _} = type, shape: shape}, e, s) when kind in [:f, :bf] do
    with %T{data: %Expr{op: :sum, args: [e2, opts]}} <- unwrap(s),
         true <- same?(e, e2),
         {:ok, axes} <- kept_axes(opts),
         %T{data: %Expr{op: :exp, args: [d]}} <- unwrap(e),
         %T{data: %Expr{op: :subtract, args: [x, m]}} <- d,
         %T{data: %Expr{op: :reduce_max, args: [x2, max_opts]}} <- unwrap(m),
         true <- same?(x, x2),
         {:ok, ^axes} <- kept_axes(max_opts),
         %T{type: ^type, shape: ^shape, vectorized_axes: []} <- x,
         true <- axes != [] do
      {:softmax, x, axes}
    else
      _ -> nil
    end
  end

  defp softmax(_t, _e, _s), do: nil

  defp gelu(%T{type: {kind, _} = type, shape: shape, vectorized_axes: []} = t)
       when kind in [:f, :bf] do
    with {c, [a, b]} <- factors(t),
         true <- close?(c, 0.5, type),
         {x, y} <- erf_term(a, b) || erf_term(b, a),
         {k, [x2]} <- factors(y),
         true <- same?(x, x2),
         true <- close?(k, :math.sqrt(0.5), type),
         %T{type: ^type, shape: ^shape, vectorized_axes: []} <- unwrap(x),
         %T{type: ^type, shape: ^shape} <- unwrap(b),
         %T{type: ^type, shape: ^shape} <- unwrap(a) do
      {:gelu, unwrap(x)}
    else
      _ -> nil
    end
  end

  defp gelu(_t), do: nil

  # {x, y} when `s` is 1 + erf(y) (either order), with `x` the other factor.
  defp erf_term(x, s) do
    with %T{data: %Expr{op: :add, args: [p, q]}} <- unwrap(s),
         %T{data: %Expr{op: :erf, args: [y]}} <- erf_of(p, q) || erf_of(q, p) do
      {x, y}
    else
      _ -> nil
    end
  end

  defp erf_of(one, e) do
    if constant?(unwrap(one), 1), do: unwrap(e)
  end

  defp layer_norm(%T{type: {kind, _} = type, shape: shape, vectorized_axes: []}, prod, bias)
       when kind in [:f, :bf] and tuple_size(shape) >= 1 do
    k = elem(shape, tuple_size(shape) - 1)
    last = tuple_size(shape) - 1

    with {c, [_, _, _] = fs} when c == 1 <- factors(prod),
         {x, rest} <- centered(fs, last),
         %T{type: ^type, shape: ^shape, vectorized_axes: []} <- x,
         {eps, [g]} <- inverse_deviation(rest, x, last),
         %T{} = g <- affine_vector(g, type, k),
         %T{} = b <- affine_vector(bias, type, k) do
      {:layer_norm, x, g, b, eps}
    else
      _ -> nil
    end
  end

  defp layer_norm(_t, _prod, _bias), do: nil

  # {x, the other factors} when one factor is x - mean(x) over `axis`.
  defp centered(factors, axis) do
    Enum.find_value(factors, fn f ->
      with %T{data: %Expr{op: :subtract, args: [x, m]}} <- unwrap(f),
           {x2, ^axis} <- mean_of(m),
           true <- same?(x, x2) do
        {unwrap(x), List.delete(factors, f)}
      else
        _ -> nil
      end
    end)
  end

  # {eps, the other factors} when one factor is rsqrt(var(x) + eps) over `axis`.
  defp inverse_deviation(factors, x, axis) do
    Enum.find_value(factors, fn f ->
      with %T{data: %Expr{op: :rsqrt, args: [s]}} <- unwrap(f),
           %T{data: %Expr{op: :add, args: [p, q]}} <- unwrap(s),
           {eps, v} when is_number(eps) and eps >= 0 <- number_and(p, q) || number_and(q, p),
           {d, ^axis} <- mean_of(v),
           %T{data: %Expr{op: :subtract, args: [x2, m]}} <- squared(d),
           true <- same?(x, x2),
           {x3, ^axis} <- mean_of(m),
           true <- same?(x, x3) do
        {eps, List.delete(factors, f)}
      else
        _ -> nil
      end
    end)
  end

  defp number_and(n, t) do
    case number(n) do
      nil -> nil
      value -> {value, t}
    end
  end

  # `d` when `t` is d * d or d ** 2.
  defp squared(t) do
    case unwrap(t) do
      %T{data: %Expr{op: :multiply, args: [a, b]}} -> if same?(a, b), do: unwrap(a)
      %T{data: %Expr{op: :pow, args: [a, two]}} -> if number(two) == 2, do: unwrap(a)
      _ -> nil
    end
  end

  # {x, axis} when `t` is Nx.mean(x, axes: [axis], keep_axes: true): sum kept / size.
  defp mean_of(t) do
    with %T{data: %Expr{op: :divide, args: [s, n]}} <- unwrap(t),
         %T{data: %Expr{op: :sum, args: [x, opts]}} <- unwrap(s),
         {:ok, [axis]} <- kept_axes(opts),
         %T{shape: shape} <- x,
         true <- number(n) == elem(shape, axis) do
      {x, axis}
    else
      _ -> nil
    end
  end

  # `t` when it holds k values of `type` along its last axis only (shape {k}, or {1, ..., k});
  # the vector itself when `t` reshapes one.
  defp affine_vector(t, type, k) do
    case unwrap(t) do
      %T{data: %Expr{op: :reshape, args: [%T{type: ^type, shape: {^k}} = v]}} ->
        v

      %T{type: ^type, shape: shape, vectorized_axes: []} = v when tuple_size(shape) >= 1 ->
        dims = Tuple.to_list(shape)
        if List.last(dims) == k and Enum.all?(Enum.drop(dims, -1), &(&1 == 1)), do: v

      _ ->
        nil
    end
  end

  # {coefficient, factors}: `t` as the product of a number and of the non-constant factors
  # of its multiply chain (division by a constant is multiplication by its reciprocal), read
  # to a depth of @factor_depth (deeper nodes count as one factor), so that matching every
  # node of a long product chain stays linear in its length.
  @factor_depth 6

  defp factors(t, depth \\ @factor_depth)

  defp factors(t, 0), do: {1.0, [unwrap(t)]}

  defp factors(t, depth) do
    case unwrap(t) do
      %T{data: %Expr{op: :multiply, args: [a, b]}} ->
        {ca, fa} = factors(a, depth - 1)
        {cb, fb} = factors(b, depth - 1)
        {ca * cb, fa ++ fb}

      %T{data: %Expr{op: :divide, args: [a, b]}} = u ->
        case number(b) do
          d when is_number(d) and d != 0 ->
            {ca, fa} = factors(a, depth - 1)
            {ca / d, fa}

          _ ->
            {1.0, [u]}
        end

      u ->
        case number(u) do
          n when is_number(n) -> {n, []}
          nil -> {1.0, [u]}
        end
    end
  end

  # The value of a constant (or a scalar tensor literal), else nil.
  defp number(t) do
    case unwrap(t) do
      %T{data: %Expr{op: :constant, args: [n]}} when is_number(n) ->
        n

      %T{shape: {}, data: %Expr{op: :tensor, args: [%T{shape: {}} = literal]}} ->
        case Nx.to_number(literal) do
          n when is_number(n) -> n
          _ -> nil
        end

      _ ->
        nil
    end
  end

  # Within the rounding of a constant of `type` (the composed form's constants are rounded
  # to it: Axon's sqrt(2) in bf16 is 1.4140625).
  defp close?(value, target, type) do
    tolerance =
      case type do
        {:f, 64} -> 1.0e-12
        {:f, 32} -> 1.0e-6
        {:f, 16} -> 2.0e-3
        _ -> 8.0e-3
      end

    abs(value - target) <= tolerance * abs(target)
  end

  defp kept_axes(opts) do
    case {opts[:axes], opts[:keep_axes]} do
      {axes, true} when is_list(axes) -> {:ok, Enum.sort(axes)}
      _ -> :error
    end
  end

  defp same?(%T{} = a, %T{} = b), do: id(unwrap(a)) == id(unwrap(b))

  defp id(%T{data: %Expr{id: id}}), do: id
  defp id(_), do: make_ref()

  # Through metadata (stop_grad, Axon's cached logits, hooks' names).
  defp unwrap(%T{data: %Expr{op: :metadata, args: [expr, _meta]}}), do: unwrap(expr)
  defp unwrap(t), do: t
end
