defmodule NxMlx.Backend.Creation do
  @moduledoc false
  # NxMlx.Backend's creation ops, read-back and transfers.

  import NxMlx.Backend.Core

  alias Nx.Tensor, as: T
  alias NxMlx.{Runtime, Types}

  ## Creation

  def constant(%T{type: type} = out, number, _opts) when binary_only(type) do
    NxMlx.Fallback.keep_on_binary_backend(:constant, fn ->
      Nx.BinaryBackend.constant(out, number, [])
    end)
  end

  def constant(%T{shape: shape, type: type} = out, number, opts) do
    device = device_of(opts)
    check_device_type!(device, type)

    if exact_float?(number, type) do
      ref =
        call(device, :full, [Tuple.to_list(shape), number / 1, Types.to_mlx(type)], :constant, [
          out
        ])

      with_value(wrap(out, ref, device), number)
    else
      scalar = Nx.BinaryBackend.constant(%{out | shape: {}, names: []}, number, [])
      t = from_binary(%{out | shape: {}, names: []}, Nx.to_binary(scalar), device: device)
      NxMlx.Backend.Shape.broadcast(out, t, shape, [])
    end
  end

  defp with_value(%T{data: %NxMlx.Backend{} = data} = t, number),
    do: %{t | data: %{data | value: number}}

  defp with_value(t, _number), do: t

  # Numbers that survive the trip through a double exactly (MLX's `full` takes a double) and
  # that the type holds: MLX's cast saturates an integer out of range (4294967295 as s32 is
  # -2147483648), where Nx wraps it (-1), so those go through Nx.BinaryBackend's encoding.
  defp exact_float?(n, {kind, bits}) when is_integer(n) and kind in [:s, :u] do
    {min, max} =
      if kind == :s,
        do: {-Bitwise.bsl(1, bits - 1), Bitwise.bsl(1, bits - 1) - 1},
        else: {0, Bitwise.bsl(1, bits) - 1}

    n >= min and n <= max and abs(n) <= 9_007_199_254_740_992
  end

  defp exact_float?(n, {kind, _}) when is_number(n) and kind in [:f, :bf], do: true
  defp exact_float?(_, _), do: false

  def from_binary(%T{type: type} = out, binary, _opts) when binary_only(type) do
    NxMlx.Fallback.keep_on_binary_backend(:from_binary, fn ->
      Nx.BinaryBackend.from_binary(out, binary, [])
    end)
  end

  def from_binary(%T{shape: shape, type: type} = out, binary, opts) do
    device = device_of(opts)
    check_device_type!(device, type)
    dtype = Types.to_mlx(type)
    binary = if is_list(binary), do: IO.iodata_to_binary(binary), else: binary
    ref = call(device, :from_binary, [binary, Tuple.to_list(shape), dtype], :from_binary, [out])
    wrap(out, ref, device)
  end

  ## Read-back and transfers

  # MLX's dimensions are 32-bit.
  @max_dim 2_147_483_647

  def to_binary(%T{} = t, limit) when quantized(t),
    do: to_binary(NxMlx.Backend.Quantized.dequantize(t), limit)

  def to_binary(%T{data: %NxMlx.Backend{ref: ref}, type: {_, bits}} = t, limit) do
    Runtime.before_eval()
    elements = Enum.reduce(t.vectorized_axes, Nx.size(t), fn {_, n}, acc -> n * acc end)

    # `inspect` asks for the first few elements: only those are copied out (reading a
    # 2.5 GB tensor whole to print 50 of them took seconds and a 2.5 GB binary).
    {ref, count} =
      case limit >= 1 and limit < elements and leading_elements(t, limit) do
        false -> {ref, elements}
        leading -> {leading, limit}
      end

    binary = Runtime.call(:to_binary, [ref], fn -> describe(:to_binary, [t]) end)

    if byte_size(binary) * 8 != count * bits do
      raise ArgumentError,
            "NxMlx.Backend.to_binary: the tensor's data (#{byte_size(binary)} bytes) does not " <>
              "fill its shape #{inspect(t.shape)} of #{inspect(t.type)} (was it built from a " <>
              "template that does not match its inputs?)"
    end

    bytes = div(limit * bits, 8)
    if bytes < byte_size(binary), do: binary_part(binary, 0, bytes), else: binary
  end

  # A lazy view of the first `limit` elements of the tensor (in row-major order), or false
  # when there is none to take. The leading block that holds them is sliced first (one row
  # along each axis while the axes after it hold `limit` or more, then enough rows of the
  # next), so that the flat view has fewer than 2 * limit elements (a 50,000 x 50,000
  # tensor has no flat view). False also when the array does not have the tensor's shape (a
  # template that does not match its inputs: the whole read-back then reports it).
  defp leading_elements(%T{data: %NxMlx.Backend{ref: ref, device: device}} = t, limit) do
    dims = Keyword.values(t.vectorized_axes) ++ Tuple.to_list(t.shape)
    # inner: the number of elements after one index of each axis.
    inner = Enum.with_index(dims, fn _, i -> dims |> Enum.drop(i + 1) |> Enum.product() end)
    j = Enum.find_index(inner, &(&1 < limit)) || length(dims) - 1
    step = Enum.at(inner, j)
    rows = div(limit + step - 1, step)

    stops =
      Enum.with_index(dims, fn
        _, i when i < j -> 1
        _, ^j -> rows
        d, _ -> d
      end)

    if rows * step <= @max_dim do
      op = op_fn(device, :to_binary, [t])
      ones = List.duplicate(1, length(dims))
      leading = op.(:slice, [ref, List.duplicate(0, length(dims)), stops, ones])
      op.(:slice, [op.(:reshape, [leading, [rows * step]]), [0], [limit], [1]])
    else
      false
    end
  rescue
    ArgumentError -> false
  end

  def inspect(%T{} = tensor, inspect_opts) do
    limit = inspect_opts.limit
    binary = to_binary(tensor, if(limit == :infinity, do: Nx.size(tensor), else: limit + 1))
    Nx.Backend.inspect(tensor, binary, inspect_opts)
  end

  def backend_copy(%T{} = tensor, backend, opts), do: backend_transfer(tensor, backend, opts)

  def backend_transfer(%T{data: %NxMlx.Backend{device: device}} = tensor, NxMlx.Backend, opts) do
    case device_of(opts) do
      ^device -> tensor
      other -> backend_transfer_in(tensor, other)
    end
  end

  def backend_transfer(%T{} = tensor, Nx.Tensor, _opts), do: tensor

  def backend_transfer(%T{} = tensor, backend, opts) do
    backend.from_binary(tensor, to_binary(tensor, Nx.size(tensor)), opts)
  end

  def backend_deallocate(%T{data: %NxMlx.Backend{}}) do
    # The array is freed when the last reference to it is garbage collected: on its worker,
    # except small computed CPU arrays, which are freed in place.
    :ok
  end

  def iota(%T{shape: shape, type: type} = out, axis, opts) do
    device = device_of(opts)
    check_device_type!(device, type)
    op = op_fn(device, :iota, [out])
    dims = Tuple.to_list(shape)

    r =
      if axis == nil do
        op.(:reshape, [index_range(op, Enum.product(dims)), dims])
      else
        n = axis_size!(out, axis, :iota)
        line = List.duplicate(1, length(dims)) |> List.replace_at(axis, n)
        op.(:broadcast_to, [op.(:reshape, [index_range(op, n), line]), dims])
      end

    wrap(out, op.(:astype, [r, Types.to_mlx(type)]), device)
  end

  def eye(%T{shape: shape, type: type} = out, opts) do
    device = device_of(opts)
    check_device_type!(device, type)
    op = op_fn(device, :eye, [out])
    dims = Tuple.to_list(shape)
    [m, n] = Enum.take(dims, -2)
    rows = op.(:reshape, [index_range(op, m), [m, 1]])
    cols = op.(:reshape, [index_range(op, n), [1, n]])
    diagonal = op.(:binary, [:equal, rows, cols])
    r = op.(:broadcast_to, [op.(:astype, [diagonal, Types.to_mlx(type)]), dims])
    wrap(out, r, device)
  end
end
