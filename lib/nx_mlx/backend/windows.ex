defmodule NxMlx.Backend.Windows do
  @moduledoc false
  # NxMlx.Backend's window reductions and window scatters.

  import NxMlx.Backend.Core
  import NxMlx.Backend.Indexing, only: [gpu_scatter_unsupported?: 2]

  alias Nx.Tensor, as: T
  alias NxMlx.Types

  ## Window reductions

  # Pad with the reduction's identity (as Nx does), take a strided view whose trailing axes
  # walk each window, and reduce over them.
  for {nx_op, mlx_op, pad} <- [
        {:window_sum, :sum, :zero},
        {:window_product, :prod, :one},
        {:window_max, :max, :min_value},
        {:window_min, :min, :max_value}
      ] do
    def unquote(nx_op)(%T{type: {kind, _}} = out, t, window_dims, opts) when kind != :c do
      window_reduction(out, t, window_dims, opts, unquote(nx_op), unquote(mlx_op), unquote(pad))
    end

    def unquote(nx_op)(out, t, window_dims, opts),
      do: NxMlx.Fallback.run(unquote(nx_op), [out, t, window_dims, opts], op_device([t]))
  end

  defp window_reduction(%T{type: type} = out, t, window_dims, opts, nx_op, mlx_op, pad) do
    padding = opts[:padding]
    strides = opts[:strides]
    dilations = opts[:window_dilations]

    if Enum.any?(padding, fn {lo, hi} -> lo < 0 or hi < 0 end) do
      NxMlx.Fallback.run(nx_op, [out, t, window_dims, opts], op_device([t]))
    else
      device = op_device([t])
      op = op_fn(device, nx_op, [t])
      rank = tuple_size(t.shape)
      low = Enum.map(padding, &elem(&1, 0))
      high = Enum.map(padding, &elem(&1, 1))

      identity =
        case pad do
          :zero -> scalar_ref(0, type, device)
          :one -> scalar_ref(1, type, device)
          :min_value -> binary_scalar_ref(Nx.Type.min_binary(type), type, device)
          :max_value -> binary_scalar_ref(Nx.Type.max_binary(type), type, device)
        end

      padded = op.(:pad, [ref_as(t, type, device), low, high, identity])

      padded_dims =
        [Tuple.to_list(t.shape), low, high] |> Enum.zip_with(fn [d, l, h] -> d + l + h end)

      element_strides = element_strides(padded_dims)

      out_dims = Tuple.to_list(out.shape)
      windows = Tuple.to_list(window_dims)
      view_shape = out_dims ++ windows

      view_strides =
        Enum.zip_with(strides, element_strides, &(&1 * &2)) ++
          Enum.zip_with(dilations, element_strides, &(&1 * &2))

      view = op.(:as_strided, [padded, view_shape, view_strides, 0])

      # MLX's reductions assume that no two elements of their input share memory: on a view
      # whose windows overlap, the plan it picks for a reduced axis of stride > 1 (a window
      # dilation) reads the wrong elements. Flattening the view copies it exactly when its
      # windows cannot be walked with one stride (overlap or gaps); then each window is a
      # row.
      size = Enum.product(view_shape)
      flat = op.(:reshape, [op.(:reshape, [view, [size]]), out_dims ++ [Enum.product(windows)]])
      r = op.(:reduce, [mlx_op, flat, [rank], false])

      # MLX sums and multiplies 8- and 16-bit integers in 32 bits; Nx keeps the input type,
      # wrapping: back to it (the low bits are the same).
      wrap(out, op.(:astype, [r, Types.to_mlx(type)]), device)
    end
  end

  # Row-major element strides of `dims`.
  defp element_strides(dims) do
    dims |> Enum.reverse() |> Enum.scan(1, &(&1 * &2)) |> Enum.reverse() |> tl() |> Kernel.++([1])
  end

  for {nx_op, max?} <- [window_scatter_max: true, window_scatter_min: false] do
    def unquote(nx_op)(
          %T{type: {kind, _}} = out,
          %T{type: {t_kind, _}} = t,
          %T{} = source,
          %T{} = init,
          window_dims,
          opts
        )
        when kind != :c and t_kind != :c do
      if Enum.any?(opts[:padding], fn {lo, hi} -> lo < 0 or hi < 0 end) or
           gpu_scatter_unsupported?(op_device([t, source]), out.type) do
        NxMlx.Fallback.run(
          unquote(nx_op),
          [out, t, source, init, window_dims, opts],
          op_device([t, source])
        )
      else
        window_scatter(out, t, source, init, window_dims, opts, unquote(nx_op), unquote(max?))
      end
    end
  end

  # Nx's select-and-scatter: each window of `t` (padded with `init`) picks the last position
  # of its max (min), which receives the window's `source` value; positions add what they
  # receive to `init`, and picks that land in the padding are dropped.
  defp window_scatter(%T{type: type} = out, t, source, init, window_dims, opts, nx_op, max?) do
    device = op_device([t, source, init])
    op = op_fn(device, nx_op, [t, source])
    rank = tuple_size(t.shape)
    dims = Tuple.to_list(t.shape)
    low = Enum.map(opts[:padding], &elem(&1, 0))
    high = Enum.map(opts[:padding], &elem(&1, 1))
    padded = op.(:pad, [ref!(t, device), low, high, ref_as(init, t.type, device)])
    padded_dims = [dims, low, high] |> Enum.zip_with(fn [d, l, h] -> d + l + h end)
    es = element_strides(padded_dims)
    positions = Tuple.to_list(source.shape)
    windows = Tuple.to_list(window_dims)
    size = Enum.product(windows)

    view_strides = Enum.zip_with(opts[:strides], es, &(&1 * &2)) ++ es
    view = op.(:as_strided, [padded, positions ++ windows, view_strides, 0])
    flat = op.(:reshape, [view, positions ++ [size]])

    # The last position of the max (min): MLX's arg-reduce picks the first, so reverse.
    picked_reversed = op.(:arg_reduce, [max?, reverse_axis(op, flat, rank), rank, false])
    index_type = {:s, 32}
    int = &scalar_ref(&1, index_type, device)
    bin = fn name, l, r -> op.(:binary, [name, l, r]) end
    picked = bin.(:subtract, int.(size - 1), op.(:astype, [picked_reversed, :s32]))
    inner = element_strides(windows)

    {coords, in_bounds} =
      [dims, windows, inner, opts[:strides], low, Enum.to_list(0..(rank - 1)//1)]
      |> Enum.zip_with(fn [dim, window, inner, stride, lo, axis] ->
        offset = bin.(:remainder, bin.(:floor_divide, picked, int.(inner)), int.(window))
        line = List.duplicate(1, rank) |> List.replace_at(axis, Enum.at(positions, axis))
        anchor = op.(:reshape, [index_range(op, Enum.at(positions, axis)), line])
        anchor = bin.(:multiply, op.(:astype, [anchor, :s32]), int.(stride))
        coord = bin.(:subtract, bin.(:add, anchor, offset), int.(lo))

        ok =
          bin.(:logical_and, bin.(:greater_equal, coord, int.(0)), bin.(:less, coord, int.(dim)))

        clamped = bin.(:minimum, bin.(:maximum, coord, int.(0)), int.(dim - 1))
        {op.(:broadcast_to, [clamped, positions]), ok}
      end)
      |> Enum.unzip()

    in_bounds = Enum.reduce(in_bounds, &bin.(:logical_and, &1, &2))
    values = op.(:select, [in_bounds, ref_as(source, type, device), scalar_ref(0, type, device)])
    values = op.(:reshape, [values, positions ++ List.duplicate(1, rank)])
    zeros = op.(:full, [dims, 0.0, Types.to_mlx(type)])
    scattered = op.(:scatter, [true, zeros, coords, values, Enum.to_list(0..(rank - 1)//1)])
    wrap(out, bin.(:add, scattered, ref_as(init, type, device)), device)
  end

  # A scalar array from the bytes of one element of `type`.
  defp binary_scalar_ref(binary, type, device) do
    call(device, :from_binary, [binary, [], Types.to_mlx(type)], :constant, [])
  end
end
