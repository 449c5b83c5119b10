defmodule NxMlx.Backend.Indexing do
  @moduledoc false
  # NxMlx.Backend's gather and scatter, with Nx's clamping of indices.

  import NxMlx.Backend.Core

  alias Nx.Tensor, as: T
  alias NxMlx.Types

  @debug_bounds_check Application.compile_env(:nx_mlx, :debug_bounds_check, false)

  ## Indexing

  def gather(out, %T{shape: shape} = t, %T{} = indices, opts) do
    axes = opts[:axes]
    device = op_device([t, indices])
    op = op_fn(device, :gather, [t, indices])
    {per_axis, _in_bounds} = index_columns(op, :gather, indices, axes, shape, device)

    sizes =
      shape |> Tuple.to_list() |> Enum.with_index(fn dim, i -> if i in axes, do: 1, else: dim end)

    r = op.(:gather, [ref!(t, device), per_axis, axes, sizes])
    wrap(out, op.(:reshape, [r, Tuple.to_list(out.shape)]), device)
  end

  def indexed_add(out, t, indices, updates, opts),
    do: indexed(out, t, indices, updates, opts, :indexed_add)

  def indexed_put(out, t, indices, updates, opts),
    do: indexed(out, t, indices, updates, opts, :indexed_put)

  # MLX's GPU scatter has no kernels for 64-bit integers or complex64 ("[scatter] GPU
  # scatter does not yet support int64"): those fall back there.
  def gpu_scatter_unsupported?(device, {kind, 64}) when kind in [:s, :u, :c], do: device == :gpu
  def gpu_scatter_unsupported?(_device, _type), do: false

  defp indexed(out, t, indices, updates, opts, nx_op) do
    device = op_device([t, indices, updates])

    if gpu_scatter_unsupported?(device, out.type),
      do: NxMlx.Fallback.run(nx_op, [out, t, indices, updates, opts], device),
      else: indexed(out, t, indices, updates, opts, nx_op, device)
  end

  defp indexed(
         %T{type: type} = out,
         %T{shape: shape} = t,
         %T{} = indices,
         %T{} = updates,
         opts,
         nx_op,
         device
       ) do
    axes = opts[:axes]
    op = op_fn(device, nx_op, [t, indices, updates])
    {per_axis, in_bounds} = index_columns(op, nx_op, indices, axes, shape, device)
    batch = indices.shape |> Tuple.delete_at(tuple_size(indices.shape) - 1) |> Tuple.to_list()

    slice =
      shape |> Tuple.to_list() |> Enum.with_index(fn dim, i -> if i in axes, do: 1, else: dim end)

    values = op.(:reshape, [ref_as(updates, type, device), batch ++ slice])

    # Out-of-bounds rows (Nx.BinaryBackend raises) must not write, and MLX does not check
    # indices: they are sent to a spare slot past the end of each indexed axis, which is cut
    # off afterwards. The routed indices are s32 (s64 for axes past its range): the spare
    # slot's position may not fit the index type (300 in s8 wraps into the tensor).
    dims = Tuple.to_list(shape)
    spare = Enum.with_index(dims, fn _, i -> if i in axes, do: 1, else: 0 end)
    zeros = List.duplicate(0, length(dims))
    padded = op.(:pad, [ref_as(t, type, device), zeros, spare, scalar_ref(0, type, device)])

    routed =
      Enum.zip_with(per_axis, axes, fn column, axis ->
        dim = elem(shape, axis)
        wide = if dim < 2_147_483_647, do: {:s, 32}, else: {:s, 64}
        column = op.(:astype, [column, Types.to_mlx(wide)])
        op.(:select, [in_bounds, column, scalar_ref(dim, wide, device)])
      end)

    r = op.(:scatter, [nx_op == :indexed_add, padded, routed, values, axes])
    r = op.(:slice, [r, zeros, dims, List.duplicate(1, length(dims))])
    wrap(out, r, device)
  end

  # One index array per indexed axis (the batch shape of `indices`), clamped into bounds:
  # MLX does not check indices, and an out-of-bounds access could take the VM down. Also
  # returns a bool array telling which rows were fully in bounds.
  defp index_columns(op, nx_op, %T{shape: idx_shape} = indices, axes, shape, device) do
    rank = tuple_size(idx_shape)
    batch = idx_shape |> Tuple.delete_at(rank - 1) |> Tuple.to_list()
    idx = ref!(indices, device)
    ones = List.duplicate(1, rank - 1)

    axes
    |> Enum.with_index()
    |> Enum.map_reduce(nil, fn {axis, j}, in_bounds ->
      column =
        op.(:slice, [idx, List.duplicate(0, rank - 1) ++ [j], batch ++ [j + 1], ones ++ [1]])

      column = op.(:reshape, [column, batch])
      {clamped, ok} = clamp_index(op, column, indices.type, elem(shape, axis), device)
      {clamped, if(in_bounds, do: op.(:binary, [:logical_and, in_bounds, ok]), else: ok)}
    end)
    |> tap(fn {_, in_bounds} ->
      if @debug_bounds_check, do: check_bounds!(op, in_bounds, rank - 1, nx_op, indices, shape)
    end)
  end

  # `index` (an array of integer `type`) clamped into [0, dim - 1], as Nx clamps, and a bool
  # array telling where it was in bounds. The upper bound is kept within `type`'s range: a
  # narrow index type (u8 indices into an axis of 300) cannot exceed it, while the bound
  # converted to that type would wrap and clamp valid indices.
  def clamp_index(op, index, {kind, bits} = type, dim, device) do
    type_max = if kind == :u, do: Bitwise.bsl(1, bits) - 1, else: Bitwise.bsl(1, bits - 1) - 1
    zero = scalar_ref(0, type, device)
    high = scalar_ref(max(min(dim - 1, type_max), 0), type, device)
    clamped = op.(:binary, [:minimum, op.(:binary, [:maximum, index, zero]), high])
    {clamped, op.(:binary, [:equal, clamped, index])}
  end
end
