defmodule NxMlx.Backend.Shape do
  @moduledoc false
  # NxMlx.Backend's shape ops: casts, reshapes, broadcasts, joining, slicing and padding.

  import NxMlx.Backend.Core

  alias Nx.Tensor, as: T
  alias NxMlx.Types

  # A cast to a type MLX lacks: on Nx.BinaryBackend, where tensors of that type live.
  def as_type(%T{type: type} = out, %T{} = t) when binary_only(type) do
    check_template!(:as_type, out, t.shape)

    NxMlx.Fallback.keep_on_binary_backend(:as_type, fn ->
      Nx.BinaryBackend.as_type(out, Nx.backend_copy(t, Nx.BinaryBackend))
    end)
  end

  def as_type(%T{type: {out_kind, _} = type} = out, %T{type: {in_kind, _}} = t)
      when in_kind in [:f, :bf, :c] and out_kind in [:s, :u] do
    check_template!(:as_type, out, t.shape)
    device = op_device([t])
    op = op_fn(device, :as_type, [t])
    x = ref!(t, device)
    # A complex number converts through its real part, as a float does.
    {x, float} =
      if in_kind == :c, do: {op.(:unary, [:real, x]), {:f, 32}}, else: {x, t.type}

    wrap(out, float_to_integer(op, x, float, type, device), device)
  end

  def as_type(%T{type: type} = out, %T{} = t) do
    check_template!(:as_type, out, t.shape)
    device = op_device([t])
    check_device_type!(device, type)
    wrap(out, ref_as(t, type, device), device)
  end

  # The float array `x` (of `float` type) as integers of `type`. Nx maps NaN to 0 and the
  # infinities to the type's extremes; MLX's cast leaves them undefined.
  defp float_to_integer(op, x, float, type, device) do
    inf = op.(:unary, [:isinf, x])
    positive = op.(:binary, [:greater, x, scalar_ref(0, float, device)])
    pos_inf = op.(:binary, [:logical_and, inf, positive])
    neg_inf = op.(:binary, [:logical_and, inf, op.(:unary, [:logical_not, positive])])
    min = Nx.to_number(Nx.Constants.min_finite(type, backend: Nx.BinaryBackend))
    max = Nx.to_number(Nx.Constants.max_finite(type, backend: Nx.BinaryBackend))

    fixes = [
      {op.(:unary, [:isnan, x]), scalar_ref(0, type, device)},
      {pos_inf, scalar_ref(max, type, device)},
      {neg_inf, scalar_ref(min, type, device)}
    ]

    # Nx truncates, then wraps into the type (-1.3 as u8 is 255). MLX's cast of an
    # out-of-range float is left to the device (the CPU wraps, CUDA saturates), so narrow
    # types go through s64 (wrapped exactly), whose conversion to them wraps everywhere.
    cast =
      case type do
        {_, 64} -> float_to_64_bit(op, x, float, type, device)
        _ -> op.(:astype, [float_to_64_bit(op, x, float, {:s, 64}, device), Types.to_mlx(type)])
      end

    Enum.reduce(fixes, cast, fn {mask, value}, acc -> op.(:select, [mask, value, acc]) end)
  end

  # Nx wraps the truncated number modulo 2^64 (2^70 as s64 is 0, -1.0 as u64 is 2^64 - 1).
  # Below 2^63 in magnitude MLX's cast to s64 is exact (u64 wraps from there); from 2^63 on,
  # |x| mod 2^64 is exact in floating point and fits u64, and is negated there for negative
  # x. The infinities and NaN are fixed by the caller.
  defp float_to_64_bit(op, x, float, type, device) do
    {x, float} =
      if float in [{:f, 16}, {:bf, 16}], do: {op.(:astype, [x, :f32]), {:f, 32}}, else: {x, float}

    magnitude = op.(:unary, [:abs, x])
    big = op.(:binary, [:greater_equal, magnitude, scalar_ref(2.0 ** 63, float, device)])
    small = op.(:astype, [op.(:astype, [x, :s64]), Types.to_mlx(type)])
    r = op.(:binary, [:remainder, magnitude, scalar_ref(2.0 ** 64, float, device)])
    r = op.(:astype, [r, :u64])
    negative = op.(:binary, [:less, x, scalar_ref(0, float, device)])
    r = op.(:select, [negative, op.(:binary, [:subtract, scalar_ref(0, {:u, 64}, device), r]), r])
    op.(:select, [big, op.(:astype, [r, Types.to_mlx(type)]), small])
  end

  def select(%T{type: type} = out, %T{} = pred, %T{} = on_true, %T{} = on_false) do
    device = op_device([pred, on_true, on_false])
    tensors = [pred, on_true, on_false]
    p = call(device, :astype, [ref!(pred, device), :bool], :select, tensors)
    a = ref_as(on_true, type, device)
    b = ref_as(on_false, type, device)
    wrap(out, call(device, :select, [p, a, b], :select, tensors), device)
  end

  def reshape(%T{shape: shape} = out, %T{} = t) do
    device = op_device([t])

    wrap(
      out,
      call(device, :reshape, [ref!(t, device), Tuple.to_list(shape)], :reshape, [t]),
      device
    )
  end

  def squeeze(out, t, _axes), do: reshape(out, t)

  def transpose(out, %T{} = t, axes) do
    device = op_device([t])
    wrap(out, call(device, :transpose, [ref!(t, device), axes], :transpose, [t]), device)
  end

  def broadcast(%T{shape: shape} = out, %T{} = t, shape, axes) do
    device = op_device([t])
    # Place t's dimensions at `axes` (size 1 elsewhere), then broadcast.
    rank = tuple_size(shape)
    dims = List.duplicate(1, rank)

    dims =
      t.shape
      |> Tuple.to_list()
      |> Enum.zip(axes)
      |> Enum.reduce(dims, fn {d, axis}, acc -> List.replace_at(acc, axis, d) end)

    ref = ref!(t, device)

    # MLX's broadcast_to aligns trailing dimensions (NumPy rules): when `axes` are the
    # trailing ones no reshape is needed, which saves a graph node.
    trailing = Enum.to_list((rank - tuple_size(t.shape))..(rank - 1)//1)

    ref =
      if axes == trailing,
        do: ref,
        else: call(device, :reshape, [ref, dims], :broadcast, [t])

    wrap(out, call(device, :broadcast_to, [ref, Tuple.to_list(shape)], :broadcast, [t]), device)
  end

  ## Joining, slicing, padding

  def concatenate(%T{type: type} = out, tensors, axis) do
    device = op_device(tensors)
    refs = Enum.map(tensors, &ref_as(&1, type, device))
    wrap(out, call(device, :concatenate, [refs, axis], :concatenate, tensors), device)
  end

  def stack(%T{type: type} = out, tensors, axis) do
    device = op_device(tensors)

    refs =
      Enum.map(tensors, fn t ->
        shape = t.shape |> Tuple.insert_at(axis, 1) |> Tuple.to_list()
        call(device, :reshape, [ref_as(t, type, device), shape], :stack, tensors)
      end)

    wrap(out, call(device, :concatenate, [refs, axis], :stack, tensors), device)
  end

  def slice(out, %T{shape: shape} = t, start_indices, lengths, strides) do
    check_slice!(shape, start_indices, lengths, strides)

    expected =
      Enum.zip_with(lengths, strides, fn len, stride -> div(len + stride - 1, stride) end)
      |> List.to_tuple()

    check_template!(:slice, out, expected)
    device = op_device([t])
    op = op_fn(device, :slice, [t])
    src = ref!(t, device)

    r =
      if Enum.all?(start_indices, &is_integer/1) do
        start = static_start(shape, start_indices, lengths)
        op.(:slice, [src, start, Enum.zip_with(start, lengths, &(&1 + &2)), strides])
      else
        # Tensor starts stay on the device: MLX slices at an array of starts.
        starts = dynamic_start(op, device, shape, start_indices, lengths)
        block = op.(:slice_dynamic, [src, starts, axes_of(shape), lengths])

        if Enum.all?(strides, &(&1 == 1)),
          do: block,
          else: op.(:slice, [block, Enum.map(lengths, fn _ -> 0 end), lengths, strides])
      end

    wrap(out, r, device)
  end

  defp check_slice!(shape, starts, lengths, strides) do
    rank = tuple_size(shape)
    dims = Tuple.to_list(shape)

    valid? =
      is_list(starts) and is_list(lengths) and is_list(strides) and length(starts) == rank and
        length(lengths) == rank and length(strides) == rank and
        Enum.all?(starts, &(is_integer(&1) or match?(%T{}, &1))) and
        Enum.all?(Enum.zip(lengths, dims), fn {len, dim} ->
          is_integer(len) and len >= 1 and len <= dim
        end) and Enum.all?(strides, &(is_integer(&1) and &1 >= 1))

    unless valid? do
      raise ArgumentError,
            "NxMlx.Backend.slice: invalid slice of shape #{inspect(shape)}: starts " <>
              "#{inspect(starts)}, lengths #{inspect(lengths)}, strides #{inspect(strides)} " <>
              "(one of each per axis; lengths in 1..size, strides of at least 1)"
    end
  end

  def put_slice(%T{type: type} = out, %T{shape: shape} = t, start_indices, %T{} = slice) do
    check_template!(:put_slice, out, shape)

    if tuple_size(slice.shape) != tuple_size(shape) or length(start_indices) != tuple_size(shape) or
         Enum.any?(Enum.zip(Tuple.to_list(slice.shape), Tuple.to_list(shape)), fn {s, d} ->
           s > d
         end) do
      raise ArgumentError,
            "NxMlx.Backend.put_slice: a slice of shape #{inspect(slice.shape)} at " <>
              "#{inspect(start_indices)} does not fit a tensor of shape #{inspect(shape)}"
    end

    device = op_device([t, slice])
    lengths = Tuple.to_list(slice.shape)
    op = op_fn(device, :put_slice, [t, slice])
    {src, update} = {ref_as(t, type, device), ref_as(slice, type, device)}

    r =
      if Enum.all?(start_indices, &is_integer/1) do
        start = static_start(shape, start_indices, lengths)
        op.(:slice_update, [src, update, start, Enum.zip_with(start, lengths, &(&1 + &2))])
      else
        starts = dynamic_start(op, device, shape, start_indices, lengths)
        op.(:slice_update_dynamic, [src, update, starts, axes_of(shape)])
      end

    wrap(out, r, device)
  end

  # Nx clamps each start so that the slice fits.
  defp static_start(shape, start_indices, lengths) do
    [Tuple.to_list(shape), start_indices, lengths]
    |> Enum.zip_with(fn [dim, start, len] -> start |> max(0) |> min(dim - len) end)
  end

  defp axes_of(shape), do: Enum.to_list(0..(tuple_size(shape) - 1)//1)

  # The clamped starts as an s32 array of one entry per axis, computed on the device from
  # integers and scalar tensors (MLX's slice at an array of starts clamps nothing).
  defp dynamic_start(op, device, shape, start_indices, lengths) do
    [Tuple.to_list(shape), start_indices, lengths]
    |> Enum.zip_with(fn
      [dim, i, len] when is_integer(i) ->
        i = i |> max(0) |> min(dim - len)
        scalar_ref(i, {:s, 32}, device)

      [dim, %T{type: {kind, _} = type, shape: {}} = i, len] when kind in [:s, :u] ->
        # Clamp in a type that holds both the index and the bound, then narrow.
        {wide, r} =
          if type == {:u, 64},
            do: {type, ref!(i, device)},
            else: {{:s, 64}, ref_as(i, {:s, 64}, device)}

        r = op.(:binary, [:maximum, r, scalar_ref(0, wide, device)])
        r = op.(:binary, [:minimum, r, scalar_ref(dim - len, wide, device)])
        op.(:astype, [r, :s32])

      [_dim, i, _len] ->
        raise ArgumentError,
              "NxMlx.Backend.slice: a start index must be an integer or an integer scalar " <>
                "tensor, got: #{inspect(i)}"
    end)
    |> Enum.map(&op.(:reshape, [&1, [1]]))
    |> then(&op.(:concatenate, [&1, 0]))
  end

  def pad(%T{type: type} = out, %T{} = t, %T{} = pad_value, config) do
    check_pad!(out, t, config)

    device = op_device([t, pad_value])
    op = op_fn(device, :pad, [t, pad_value])
    value = ref_as(pad_value, type, device)
    {dilated, dims} = interior_pad(op, ref_as(t, type, device), t.shape, config, value)
    low = Enum.map(config, fn {lo, _, _} -> max(lo, 0) end)
    high = Enum.map(config, fn {_, hi, _} -> max(hi, 0) end)
    padded = op.(:pad, [dilated, low, high, value])

    # Negative amounts remove elements: slice them off the padded array.
    r =
      if Enum.all?(config, fn {lo, hi, _} -> lo >= 0 and hi >= 0 end) do
        padded
      else
        {start, stop} =
          Enum.zip_with(dims, config, fn dim, {lo, hi, _} ->
            start = max(-lo, 0)
            {start, max(lo, 0) + dim + max(hi, 0) - max(-hi, 0)}
          end)
          |> Enum.unzip()

        op.(:slice, [padded, start, stop, List.duplicate(1, length(dims))])
      end

    wrap(out, r, device)
  end

  # Interior padding, one axis at a time: an axis of n elements gets a new axis of 1 after
  # it, padded with `interior` values at its end, then both are merged and the trailing
  # padding cut: n + (n - 1) * interior elements. Returns the array and its dimensions.
  defp interior_pad(op, ref, shape, config, value) do
    config
    |> Enum.with_index()
    |> Enum.reduce({ref, Tuple.to_list(shape)}, fn
      {{_, _, interior}, k}, {ref, dims} when interior > 0 ->
        n = Enum.at(dims, k)

        if n > 1 do
          {before, [^n | rest]} = Enum.split(dims, k)
          expanded = op.(:reshape, [ref, before ++ [n, 1] ++ rest])
          zeros = Enum.map(before ++ [n, 1] ++ rest, fn _ -> 0 end)
          high = List.replace_at(zeros, k + 1, interior)
          spread = op.(:pad, [expanded, zeros, high, value])
          merged = op.(:reshape, [spread, before ++ [n * (1 + interior)] ++ rest])
          len = n + (n - 1) * interior
          new_dims = before ++ [len] ++ rest
          stop = new_dims

          r =
            op.(:slice, [
              merged,
              Enum.map(new_dims, fn _ -> 0 end),
              stop,
              Enum.map(new_dims, fn _ -> 1 end)
            ])

          {r, new_dims}
        else
          {ref, dims}
        end

      _, acc ->
        acc
    end)
  end

  defp check_pad!(out, %T{shape: shape}, config) do
    valid? =
      is_list(config) and length(config) == tuple_size(shape) and
        Enum.all?(
          config,
          &match?(
            {lo, hi, i}
            when is_integer(lo) and is_integer(hi) and
                   is_integer(i) and i >= 0,
            &1
          )
        )

    unless valid? do
      raise ArgumentError,
            "NxMlx.Backend.pad: invalid padding config #{inspect(config)} for shape " <>
              "#{inspect(shape)} (one {low, high, interior} per axis, interior >= 0)"
    end

    expected =
      Enum.zip_with(Tuple.to_list(shape), config, fn dim, {lo, hi, interior} ->
        dim + lo + hi + max(dim - 1, 0) * interior
      end)

    if Enum.any?(expected, &(&1 < 0)) do
      raise ArgumentError,
            "NxMlx.Backend.pad: padding #{inspect(config)} removes more than the whole of " <>
              "shape #{inspect(shape)} (it would give #{inspect(List.to_tuple(expected))})"
    end

    check_template!(:pad, out, List.to_tuple(expected))
  end

  def reverse(out, %T{} = t, axes) do
    device = op_device([t])
    op = op_fn(device, :reverse, [t])

    r =
      Enum.reduce(axes, ref!(t, device), fn axis, acc ->
        axis_size!(t, axis, :reverse)
        reverse_axis(op, acc, axis)
      end)

    wrap(out, r, device)
  end
end
