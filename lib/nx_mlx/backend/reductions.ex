defmodule NxMlx.Backend.Reductions do
  @moduledoc false
  # NxMlx.Backend's reductions, arg-reductions and sorting.

  import NxMlx.Backend.Core

  alias Nx.Tensor, as: T
  alias NxMlx.Types

  ## Arg-reductions and sorting

  def argmax(out, t, opts), do: arg_reduce(out, t, opts, :argmax)

  def argmin(out, t, opts), do: arg_reduce(out, t, opts, :argmin)

  defp arg_reduce(out, %T{type: {kind, _}} = t, opts, nx_op) when kind != :c do
    device = op_device([t])
    op = op_fn(device, nx_op, [t])

    {x, axis, n} =
      case opts[:axis] do
        nil -> {op.(:reshape, [ref!(t, device), [Nx.size(t)]]), 0, Nx.size(t)}
        axis -> {ref!(t, device), axis, axis_size!(t, axis, nx_op)}
      end

    # MLX returns the first index on ties; tie_break: :high searches the reversed axis.
    high? = opts[:tie_break] == :high
    last = scalar_ref(n - 1, out.type, device)
    type = Types.to_mlx(out.type)
    searched = if high?, do: reverse_axis(op, x, axis), else: x
    idx = op.(:astype, [op.(:arg_reduce, [nx_op == :argmax, searched, axis, false]), type])
    idx = if high?, do: op.(:binary, [:subtract, last, idx]), else: idx

    # As Nx: along an axis holding NaN, the answer is the index of the last NaN.
    idx =
      if kind in [:f, :bf] do
        nan = op.(:unary, [:isnan, x])
        reversed = reverse_axis(op, nan, axis)
        from_end = op.(:astype, [op.(:arg_reduce, [true, reversed, axis, false]), type])
        any_nan = op.(:reduce, [:any, nan, [axis], false])
        op.(:select, [any_nan, op.(:binary, [:subtract, last, from_end]), idx])
      else
        idx
      end

    wrap(out, op.(:reshape, [idx, Tuple.to_list(out.shape)]), device)
  end

  defp arg_reduce(out, t, opts, nx_op),
    do: NxMlx.Fallback.run(nx_op, [out, t, opts], op_device([t]))

  def sort(out, %T{type: {kind, _}} = t, opts) when kind != :c do
    device = op_device([t])
    op = op_fn(device, :sort, [t])
    axis = opts[:axis] || 0
    sorted = op.(:sort, [false, ref!(t, device), axis])

    r =
      if opts[:direction] == :desc,
        do: reverse_axis(op, sorted, axis),
        else: sorted

    wrap(out, r, device)
  end

  def sort(out, t, opts), do: NxMlx.Fallback.run(:sort, [out, t, opts], op_device([t]))

  def argsort(out, %T{type: {kind, _}} = t, opts) when kind != :c do
    device = op_device([t])
    op = op_fn(device, :argsort, [t])
    axis = opts[:axis] || 0
    n = axis_size!(t, axis, :argsort)
    r = argsort_ref(op, ref!(t, device), axis, n, opts[:direction], out.type, device)
    wrap(out, r, device)
  end

  def argsort(out, t, opts), do: NxMlx.Fallback.run(:argsort, [out, t, opts], op_device([t]))

  # Stable argsort of `ref` along `axis` (of size `n`), indices of `type`. MLX's sort puts NaN
  # last, as Nx's ascending order does.
  def argsort_ref(op, ref, axis, n, :desc, type, device) do
    # Stable descending order: sort the reversed axis ascending, reverse the result and map
    # the positions back (ties keep their original order, as in Nx).
    reversed = reverse_axis(op, ref, axis)
    idx = op.(:astype, [op.(:sort, [true, reversed, axis]), Types.to_mlx(type)])
    op.(:binary, [:subtract, scalar_ref(n - 1, type, device), reverse_axis(op, idx, axis)])
  end

  def argsort_ref(op, ref, axis, _n, _asc, type, _device),
    do: op.(:astype, [op.(:sort, [true, ref, axis]), Types.to_mlx(type)])

  ## Reductions

  # sum/product accumulate in the output type (Nx widens integers to 64 bits); max/min keep
  # the input type; all/any return bool in MLX and u8 in Nx.
  for {nx_op, mlx_op, mode} <- [
        {:sum, :sum, :cast_input},
        {:product, :prod, :cast_input},
        {:reduce_max, :max, :as_is},
        {:reduce_min, :min, :as_is},
        {:all, :all, :cast_output},
        {:any, :any, :cast_output}
      ] do
    def unquote(nx_op)(out, t, opts),
      do: reduction(out, t, opts, unquote(nx_op), unquote(mlx_op), unquote(mode))
  end

  # MLX's CPU sum adds the elements of a reduction one after the other in the array's type,
  # so its error grows with their number (an f32 sum of 2^25 ones stops at 2^24). On CPU
  # streams the binding sums floats and c64 with a kernel of its own instead, accumulating
  # in double (see NxMlx.Backend, "Accuracy"); the GPU's reductions are trees.

  # MLX's kernels that reduce every axis at once count elements in 32 bits: over 2^31 or more
  # elements they answer nothing (a sum of 0, a max of -inf). Such reductions go axis by
  # axis.
  @mlx_int_limit 2_147_483_647

  defp reduction(out, t, opts, nx_op, mlx_op, mode) do
    device = op_device([t])
    axes = opts[:axes] || Enum.to_list(0..(Nx.rank(t) - 1)//1)
    keep = opts[:keep_axes] == true
    r = if mode == :cast_input, do: ref_as(t, out.type, device), else: ref!(t, device)
    op = op_fn(device, nx_op, [t])
    Enum.each(axes, &axis_size!(t, &1, nx_op))

    r =
      cond do
        Nx.size(t) > @mlx_int_limit and length(axes) > 1 ->
          by_axis(op, r, t.shape, axes, keep, fn ref, _dims, axis ->
            op.(:reduce, [mlx_op, ref, [axis], true])
          end)

        true ->
          op.(:reduce, [mlx_op, r, axes, keep])
      end

    r =
      if mode == :cast_output,
        do: call(device, :astype, [r, Types.to_mlx(out.type)], nx_op, [t]),
        else: r

    wrap(out, r, device)
  end

  # Reduces `axes` of `ref` one at a time with `reduce_axis.(ref, dims, axis)` (which keeps
  # the axis, as size 1), then drops them unless `keep`.
  defp by_axis(op, ref, shape, axes, keep, reduce_axis) do
    {r, _} =
      Enum.reduce(axes, {ref, Tuple.to_list(shape)}, fn axis, {acc, dims} ->
        {reduce_axis.(acc, dims, axis), List.replace_at(dims, axis, 1)}
      end)

    if keep do
      r
    else
      dims = shape |> Tuple.to_list() |> Enum.with_index() |> Enum.reject(&(elem(&1, 1) in axes))
      op.(:reshape, [r, Enum.map(dims, &elem(&1, 0))])
    end
  end
end
