defmodule NxMlx.Backend.Quantized do
  @moduledoc false
  # Quantized weights (NxMlx.Quantized): making them, reading their values, and the ops that
  # use them without dequantizing (the dot through quantized_matmul, the experts' matmul
  # through gather_qmm). Written once against NxMlx.Backend.Core's calls, so eager ops and
  # the compiler's lowering (where parts are registers) are the same code.
  #
  # A quantized tensor keeps the shape and type of the weight; its NxMlx.Backend data has no
  # array of its own (`ref: nil`) and `quant: %NxMlx.Quantized{}` holding the parts as
  # tensors of the weight with its quantized axis moved last.

  import NxMlx.Backend.Core

  alias Nx.Tensor, as: T
  alias NxMlx.{Quantized, Types}

  ## Making and reading

  def quantize(%T{data: %NxMlx.Backend{quant: %Quantized{}}} = t, _mode, _bits, _group, _axis) do
    raise ArgumentError,
          "NxMlx.Quantized.quantize: the #{inspect(t.type)} tensor of shape " <>
            "#{inspect(t.shape)} is quantized already"
  end

  def quantize(%T{data: %Nx.Defn.Expr{}} = t, _mode, _bits, _group, _axis) do
    raise ArgumentError,
          "NxMlx.Quantized.quantize: quantizes tensors, not defn expressions (quantize the " <>
            "weights before passing them in); got one of shape #{inspect(t.shape)}"
  end

  def quantize(%T{shape: shape, type: type} = t, mode, bits, group_size, axis) do
    rank = tuple_size(shape)
    axis = if is_integer(axis) and axis < 0, do: axis + rank, else: axis

    cond do
      type not in [{:f, 32}, {:f, 16}, {:bf, 16}] ->
        raise ArgumentError,
              "NxMlx.Quantized.quantize: quantizes f32, f16 or bf16 tensors, got " <>
                "#{inspect(type)} of shape #{inspect(shape)}"

      rank < 2 ->
        raise ArgumentError,
              "NxMlx.Quantized.quantize: quantizes tensors of rank 2 or more, got shape " <>
                inspect(shape)

      not (is_integer(axis) and axis >= 0 and axis < rank) ->
        raise ArgumentError,
              "NxMlx.Quantized.quantize: axis #{inspect(axis)} is out of range for shape " <>
                inspect(shape)

      rem(elem(shape, axis), group_size) != 0 ->
        raise ArgumentError,
              "NxMlx.Quantized.quantize: the size of axis #{axis} of shape #{inspect(shape)} " <>
                "is not a multiple of the group size #{group_size}"

      true ->
        device = op_device([t])
        op = op_fn(device, :quantize, [t])
        perm = stored_perm(rank, axis)
        w = transposed(op, ref!(t, device), perm)
        parts = op.(:quantize, [w, mode, group_size, bits])
        q = layout_parts(parts, stored_shape(shape, perm), type, mode, bits, group_size, device)
        %{t | data: %NxMlx.Backend{ref: nil, device: device, quant: %{q | axis: axis}}}
    end
  end

  # The parts of a quantization of an array of `stored` shape (quantized along its last
  # axis) as tensors.
  defp layout_parts(refs, stored, type, mode, bits, group_size, device) do
    last = tuple_size(stored) - 1
    n = elem(stored, last)
    packed = part(put_elem(stored, last, div(n * bits, 32)), {:u, 32})
    scales = part(put_elem(stored, last, div(n, group_size)), scales_type(mode, type))

    {packed_ref, scales_ref, biases_ref} =
      case refs do
        [p, s, b] -> {p, s, b}
        [p, s] -> {p, s, nil}
      end

    %Quantized{
      mode: mode,
      bits: bits,
      group_size: group_size,
      axis: last,
      packed: wrap(packed, packed_ref, device),
      scales: wrap(scales, scales_ref, device),
      biases: biases_ref && wrap(%{scales | type: type}, biases_ref, device)
    }
  end

  defp part(shape, type),
    do: %T{shape: shape, type: type, names: List.duplicate(nil, tuple_size(shape))}

  defp scales_type(:affine, type), do: type
  defp scales_type(_mode, _type), do: {:u, 8}

  # The logical axes with `axis` moved last, and the stored shape.
  defp stored_perm(rank, axis), do: (Enum.to_list(0..(rank - 1)) -- [axis]) ++ [axis]
  defp stored_shape(shape, perm), do: List.to_tuple(Enum.map(perm, &elem(shape, &1)))

  defp inverse_perm(perm),
    do: perm |> Enum.with_index() |> Enum.sort() |> Enum.map(fn {_, i} -> i end)

  defp transposed(op, ref, perm) do
    if perm == Enum.to_list(0..(length(perm) - 1)), do: ref, else: op.(:transpose, [ref, perm])
  end

  # The arrays of the parts: [packed, scales] and the biases in affine mode; `type` converts
  # scales and biases of affine weights (the matmul takes them in x's type).
  defp part_refs(%Quantized{} = q, device, type \\ nil) do
    [q.packed | Enum.reject([q.scales, q.biases], &is_nil/1)]
    |> Enum.with_index()
    |> Enum.map(fn
      {p, 0} -> ref!(p, device)
      {p, _} when q.mode == :affine and type != nil -> ref_as(p, type, device)
      {p, _} -> ref!(p, device)
    end)
  end

  # The dequantized array of a quantized tensor, in its logical layout.
  def dequantized_ref(%T{data: %NxMlx.Backend{quant: %Quantized{} = q}} = t, device) do
    op = op_fn(device, :dequantize, [t])
    parts = part_refs(q, device)
    w = op.(:dequantize, [parts, q.mode, q.group_size, q.bits, Types.to_mlx(t.type)])
    transposed(op, w, inverse_perm(stored_perm(tuple_size(t.shape), q.axis)))
  end

  def dequantize(%T{data: %NxMlx.Backend{device: device}} = t) do
    wrap(%{t | data: nil}, dequantized_ref(t, device), device)
  end

  # The parts moved to `device` (a quantized tensor stays quantized).
  def transfer(%T{data: %NxMlx.Backend{quant: %Quantized{} = q} = data} = t, device) do
    move = fn
      nil -> nil
      p -> Nx.backend_transfer(p, {NxMlx.Backend, device: device})
    end

    q = %{q | packed: move.(q.packed), scales: move.(q.scales), biases: move.(q.biases)}
    %{t | data: %{data | device: device, quant: q}}
  end

  ## The fused dot

  # `Nx.dot` with a quantized operand: quantized_matmul when the quantized operand has rank 2,
  # is contracted along its quantized axis alone and nothing is batched, and the result is a
  # real float type MLX computes on the device; nil otherwise (the caller dots the
  # dequantized values).
  def dot(%T{type: {kind, bits}} = out, left, c1, b1, right, c2, b2)
      when kind in [:f, :bf] and bits <= 32 and b1 == [] and b2 == [] do
    cond do
      fused?(right, c2) and length(c1) == 1 -> qmm(out, left, hd(c1), right, :right)
      fused?(left, c1) and length(c2) == 1 -> qmm(out, right, hd(c2), left, :left)
      true -> nil
    end
  end

  def dot(_out, _left, _c1, _b1, _right, _c2, _b2), do: nil

  defp fused?(%T{shape: {_, _}, data: %NxMlx.Backend{quant: %Quantized{axis: axis}}}, [axis]),
    do: true

  defp fused?(_t, _axes), do: false

  # x · w with x contracted along `cx`: x's other axes, then w's free one (`side` :left puts
  # w's first, as Nx orders a dot whose quantized operand is the left one).
  defp qmm(%T{type: type} = out, x, cx, %T{data: %NxMlx.Backend{quant: q}} = w, side) do
    device = op_device([x, w])
    op = op_fn(device, :dot, [x, w])
    rank = tuple_size(x.shape)
    xr = transposed(op, ref_as(x, type, device), (Enum.to_list(0..(rank - 1)) -- [cx]) ++ [cx])
    parts = part_refs(q, device, if(type != w.type, do: type))
    y = op.(:quantized_matmul, [[xr | parts], q.mode, q.group_size, q.bits, true])

    y =
      case side do
        :right -> y
        :left -> transposed(op, y, [rank - 1 | Enum.to_list(0..(rank - 2)//1)])
      end

    wrap(out, y, device)
  end

  ## Experts (NxMlx.Quantized.expert_dot/3)

  # x {..., k} by experts {e, k, n} quantized along k, one row each: gather_qmm with x as
  # {rows, 1, k} and the rows' experts as rhs indices.
  def expert_dot(%T{type: type} = out, x, %T{data: %NxMlx.Backend{quant: q}} = w, indices)
      when elem(type, 0) in [:f, :bf] and elem(type, 1) <= 32 do
    if q.axis == 1 do
      device = op_device([x, w, indices])
      op = op_fn(device, :expert_dot, [x, w, indices])
      {_e, k, _n} = w.shape
      rows = div(Nx.size(x), k)
      xr = op.(:reshape, [ref_as(x, type, device), [rows, 1, k]])
      idx = op.(:reshape, [ref!(indices, device), [rows]])
      parts = part_refs(q, device, if(type != w.type, do: type))

      y =
        op.(:gather_qmm, [[xr | parts] ++ [idx], q.mode, q.group_size, q.bits, true, false, true])

      wrap(out, op.(:reshape, [y, Tuple.to_list(out.shape)]), device)
    end
  end

  def expert_dot(_out, _x, _w, _indices), do: nil

  ## GGML blocks

  # Q4_0 (18-byte blocks: f16 d, 16 bytes holding values j and j + 16 in the low and high
  # nibbles of byte j) and Q8_0 (34-byte blocks: f16 d, 32 signed bytes) re-packed into MLX's
  # affine layout (values in order, 8 nibbles or 4 bytes to a little-endian u32), on the
  # device, with Nx ops.
  def from_ggml(data, format, {rows, k}, opts) do
    {block_bytes, bits, offset} = if format == :q4_0, do: {18, 4, 8}, else: {34, 8, 128}
    blocks = div(rows * k, 32)
    type = Nx.Type.normalize!(opts[:type])

    cond do
      rem(k, 32) != 0 ->
        raise ArgumentError,
              "NxMlx.Quantized.from_ggml: rows of #{k} values are not whole blocks of 32"

      byte_size(data) != blocks * block_bytes ->
        raise ArgumentError,
              "NxMlx.Quantized.from_ggml: #{inspect(format)} data for shape #{inspect({rows, k})} " <>
                "takes #{blocks * block_bytes} bytes, got #{byte_size(data)}"

      type not in [{:f, 16}, {:f, 32}, {:bf, 16}] ->
        raise ArgumentError,
              "NxMlx.Quantized.from_ggml: :type is :f16, :f32 or :bf16, got #{inspect(type)}"

      opts[:axis] not in [-1, 0, 1] ->
        raise ArgumentError,
              "NxMlx.Quantized.from_ggml: :axis is -1 or 0, got #{inspect(opts[:axis])}"

      true ->
        device = device_of(opts)
        backend = {NxMlx.Backend, device: device}

        Nx.with_default_backend(backend, fn ->
          raw = data |> Nx.from_binary(:u8, backend: backend) |> Nx.reshape({blocks, block_bytes})
          d16 = Nx.add(raw[[.., 0]], Nx.multiply(Nx.as_type(raw[[.., 1]], :u16), 256))
          d = d16 |> Nx.as_type(:u16) |> Nx.bitcast(:f16) |> Nx.as_type(type)
          qs = raw[[.., 2..(block_bytes - 1)]]

          values =
            if format == :q4_0 do
              Nx.concatenate([Nx.bitwise_and(qs, 15), Nx.right_shift(qs, 4)], axis: 1)
            else
              qs |> Nx.bitcast(:s8) |> Nx.as_type(:s16) |> Nx.add(offset) |> Nx.as_type(:u8)
            end

          packed = pack(values, bits, rows, k)
          scales = Nx.reshape(d, {rows, div(k, 32)})
          biases = Nx.multiply(scales, -offset)
          refs = [packed.data.ref, scales.data.ref, biases.data.ref]
          q = layout_parts(refs, {rows, k}, type, :affine, bits, 32, device)
          shape = if opts[:axis] == 0, do: {k, rows}, else: {rows, k}
          axis = if opts[:axis] == 0, do: 0, else: 1
          t = %T{shape: shape, type: type, names: [nil, nil]}
          %{t | data: %NxMlx.Backend{ref: nil, device: device, quant: %{q | axis: axis}}}
        end)
    end
  end

  # Values (u8, in order) into little-endian u32 words: 8 nibbles or 4 bytes each.
  defp pack(values, bits, rows, k) do
    per_word = div(32, bits)
    words = values |> Nx.reshape({div(rows * k, per_word), per_word}) |> Nx.as_type(:u32)
    shifts = Nx.multiply(Nx.iota({1, per_word}, type: :u32), bits)

    words
    |> Nx.left_shift(shifts)
    |> Nx.sum(axes: [1])
    |> Nx.as_type(:u32)
    |> Nx.reshape({rows, div(k * bits, 32)})
  end
end
