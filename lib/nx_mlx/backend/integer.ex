defmodule NxMlx.Backend.Integer do
  @moduledoc false
  # NxMlx.Backend's integer, bitwise and logical ops, with Nx's semantics where MLX's differ.

  import NxMlx.Backend.Core

  import NxMlx.Backend.Elementwise,
    only: [binary_op: 5, unary_op: 4, u64_signed_mask: 4, u64_with_signed: 2]

  alias Nx.Tensor, as: T
  alias NxMlx.Types

  ## Element-wise: integer, bitwise and logical semantics of Nx

  # Bitwise ops act on integers only (Nx's front end guarantees it).
  for {nx_op, mlx_op} <- [
        bitwise_and: :bitwise_and,
        bitwise_or: :bitwise_or,
        bitwise_xor: :bitwise_xor
      ] do
    def unquote(nx_op)(%T{type: {kind, _}} = out, a, b) when kind in [:s, :u],
      do: binary_op(out, a, b, unquote(nx_op), unquote(mlx_op))

    def unquote(nx_op)(out, a, b),
      do: NxMlx.Fallback.run(unquote(nx_op), [out, a, b], op_device([a, b]))
  end

  def quotient(out, %T{type: ta} = a, %T{type: tb} = b) when u64_with_signed(ta, tb),
    do: u64_signed_division(out, a, b, :quotient)

  def quotient(%T{type: {kind, _}} = out, a, b) when kind in [:s, :u] do
    # Nx truncates toward zero; MLX's floor_divide floors. Add one where the division was
    # inexact and the signs differ.
    {device, op, ar, br} = binary_inputs(out, a, b, :quotient)
    floor = op.(:binary, [:floor_divide, ar, br])
    adjust = inexact_with_other_sign(op, ar, br, op.(:binary, [:remainder, ar, br]), ar, br)
    wrap(out, op.(:binary, [:add, floor, op.(:astype, [adjust, Types.to_mlx(out.type)])]), device)
  end

  def quotient(out, a, b), do: NxMlx.Fallback.run(:quotient, [out, a, b], op_device([a, b]))

  def remainder(out, %T{type: ta} = a, %T{type: tb} = b) when u64_with_signed(ta, tb),
    do: u64_signed_division(out, a, b, :remainder)

  def remainder(%T{type: {kind, _}} = out, a, b) when kind in [:s, :u] do
    # Nx's remainder has the sign of the dividend (C's %); MLX's has the divisor's (Python's).
    {device, op, ar, br} = binary_inputs(out, a, b, :remainder)
    r = op.(:binary, [:remainder, ar, br])
    adjust = inexact_with_other_sign(op, ar, br, r, r, ar)
    wrap(out, op.(:select, [adjust, op.(:binary, [:subtract, r, br]), r]), device)
  end

  # Float remainder is C's fmod in Nx; MLX has only the Python-style one, and converting it
  # loses precision.
  def remainder(out, a, b), do: NxMlx.Fallback.run(:remainder, [out, a, b], op_device([a, b]))

  # u64 against a signed type: Nx divides the numbers themselves, then wraps the answer
  # into s64 (converting both to s64 first would turn large u64 values negative). The
  # magnitudes are divided in u64; the quotient takes the sign of a * b, the remainder the
  # dividend's.
  defp u64_signed_division(out, a, b, nx_op) do
    device = op_device([a, b])
    op = op_fn(device, nx_op, [a, b])
    {a_negative, a_magnitude} = sign_magnitude(op, a, device)
    {b_negative, b_magnitude} = sign_magnitude(op, b, device)

    {mlx_op, negative} =
      if nx_op == :quotient,
        do: {:floor_divide, op.(:binary, [:not_equal, a_negative, b_negative])},
        else: {:remainder, a_negative}

    m = op.(:binary, [mlx_op, a_magnitude, b_magnitude])
    zero = scalar_ref(0, {:u, 64}, device)
    r = op.(:select, [negative, op.(:binary, [:subtract, zero, m]), m])
    wrap(out, op.(:astype, [r, Types.to_mlx(out.type)]), device)
  end

  # Whether the integer tensor `t` is negative, and its magnitude as u64 (exact, 2^63 for
  # the s64 minimum).
  defp sign_magnitude(op, %T{type: type} = t, device) do
    negative = op.(:binary, [:less, ref!(t, device), scalar_ref(0, type, device)])
    x = ref_as(t, {:u, 64}, device)
    negated = op.(:binary, [:subtract, scalar_ref(0, {:u, 64}, device), x])
    {negative, op.(:select, [negative, negated, x])}
  end

  # r != 0 and sign(x) != sign(y), as bool.
  defp inexact_with_other_sign(op, _ar, br, r, x, y) do
    zero = op.(:binary, [:subtract, br, br])
    nonzero = op.(:binary, [:not_equal, r, zero])

    other_sign =
      op.(:binary, [:not_equal, op.(:binary, [:less, x, zero]), op.(:binary, [:less, y, zero])])

    op.(:binary, [:logical_and, nonzero, other_sign])
  end

  def left_shift(%T{type: {kind, size}} = out, a, b) when kind in [:s, :u] do
    # Shifting by the type's width or more gives 0 in Nx; MLX masks the count.
    {device, op, ar, br} = binary_inputs(out, a, b, :left_shift)
    too_far = shift_too_far(op, b, size, device)
    shifted = op.(:binary, [:left_shift, ar, br])
    wrap(out, op.(:select, [too_far, op.(:binary, [:subtract, br, br]), shifted]), device)
  end

  def left_shift(out, a, b), do: NxMlx.Fallback.run(:left_shift, [out, a, b], op_device([a, b]))

  def right_shift(%T{type: {kind, size}} = out, a, b) when kind in [:s, :u] do
    # Shifting by the width or more gives the sign fill (0 or -1; 0 when unsigned) in Nx;
    # MLX masks the count.
    {device, op, ar, br} = binary_inputs(out, a, b, :right_shift)
    too_far = shift_too_far(op, b, size, device)

    if a.type == {:u, 64} and kind == :s do
      # A u64 value shifted by a signed count (an s64 result): Nx shifts the number, which
      # is not negative, so the shift is logical: in u64, then wrapped into s64.
      x = ref!(a, device)
      shifted = op.(:binary, [:right_shift, x, ref_as(b, {:u, 64}, device)])
      r = op.(:select, [too_far, scalar_ref(0, {:u, 64}, device), shifted])
      wrap(out, op.(:astype, [r, Types.to_mlx(out.type)]), device)
    else
      fill =
        if kind == :s,
          do: op.(:binary, [:right_shift, ar, scalar_ref(size - 1, out.type, device)]),
          else: op.(:binary, [:subtract, br, br])

      shifted = op.(:binary, [:right_shift, ar, br])
      wrap(out, op.(:select, [too_far, fill, shifted]), device)
    end
  end

  def right_shift(out, a, b), do: NxMlx.Fallback.run(:right_shift, [out, a, b], op_device([a, b]))

  # Whether the count `b` is the width `size` or more, compared in b's own type: a u64
  # count of 2^63 converted to s64 would be negative.
  defp shift_too_far(op, %T{type: type} = b, size, device),
    do: op.(:binary, [:greater_equal, ref!(b, device), scalar_ref(size, type, device)])

  for {nx_op, mlx_op} <- [
        logical_and: :logical_and,
        logical_or: :logical_or,
        logical_xor: :not_equal
      ] do
    # Nx: any non-zero value (NaN included) is true; the result is u8.
    def unquote(nx_op)(out, %T{type: {ka, _}} = a, %T{type: {kb, _}} = b)
        when ka != :c and kb != :c do
      device = op_device([a, b])
      op = op_fn(device, unquote(nx_op), [a, b])
      ab = op.(:astype, [ref!(a, device), :bool])
      bb = op.(:astype, [ref!(b, device), :bool])
      r = op.(:binary, [unquote(mlx_op), ab, bb])
      wrap(out, op.(:astype, [r, Types.to_mlx(out.type)]), device)
    end

    def unquote(nx_op)(out, a, b),
      do: NxMlx.Fallback.run(unquote(nx_op), [out, a, b], op_device([a, b]))
  end

  # Both inputs converted to the output type; `op` calls the NIF with errors naming `nx_op`.
  defp binary_inputs(out, a, b, nx_op) do
    device = op_device([a, b])
    op = op_fn(device, nx_op, [a, b])
    {device, op, ref_as(a, out.type, device), ref_as(b, out.type, device)}
  end

  def bitwise_not(%T{type: {kind, _}} = out, t) when kind in [:s, :u],
    do: unary_op(out, t, :bitwise_not, :bitwise_invert)

  def bitwise_not(out, t), do: NxMlx.Fallback.run(:bitwise_not, [out, t], op_device([t]))

  # MLX has no bit-count primitives: both are composed from shifts, masks and adds on the
  # unsigned view of the input (so signed inputs count their two's complement bits).
  def population_count(%T{type: {kind, _}} = out, t) when kind in [:s, :u],
    do: bit_count(out, t, :population_count)

  def population_count(out, t),
    do: NxMlx.Fallback.run(:population_count, [out, t], op_device([t]))

  def count_leading_zeros(%T{type: {kind, _}} = out, t) when kind in [:s, :u],
    do: bit_count(out, t, :count_leading_zeros)

  def count_leading_zeros(out, t),
    do: NxMlx.Fallback.run(:count_leading_zeros, [out, t], op_device([t]))

  defp bit_count(%T{type: {_, bits} = type} = out, t, nx_op) do
    device = op_device([t])
    op = op_fn(device, nx_op, [t])
    unsigned = {:u, bits}
    c = fn value -> scalar_ref(value, unsigned, device) end
    x = op.(:view, [ref_as(t, type, device), Types.to_mlx(unsigned)])

    r =
      case nx_op do
        :population_count ->
          popcount(op, x, bits, c)

        :count_leading_zeros ->
          # Every bit below the highest set one set too: the leading zeros are what is left.
          shifts = Stream.iterate(1, &(&1 * 2)) |> Enum.take_while(&(&1 < bits))

          filled =
            Enum.reduce(shifts, x, fn shift, acc ->
              op.(:binary, [:bitwise_or, acc, op.(:binary, [:right_shift, acc, c.(shift)])])
            end)

          op.(:binary, [:subtract, c.(bits), popcount(op, filled, bits, c)])
      end

    wrap(out, op.(:view, [r, Types.to_mlx(type)]), device)
  end

  # The set bits of each element of the unsigned array `x`: counts per 2, 4 and 8 bits, then
  # the bytes summed by a multiplication whose top byte collects them (it wraps, as unsigned
  # arithmetic does).
  defp popcount(op, x, bits, c) do
    # `byte` repeated over the width.
    pattern = fn byte ->
      Enum.reduce(1..div(bits, 8), 0, fn _, acc -> Bitwise.bsl(acc, 8) + byte end)
    end

    masked_shift = fn v, shift, mask ->
      op.(:binary, [:bitwise_and, op.(:binary, [:right_shift, v, c.(shift)]), c.(mask)])
    end

    x = op.(:binary, [:subtract, x, masked_shift.(x, 1, pattern.(0x55))])
    m2 = pattern.(0x33)
    x = op.(:binary, [:add, op.(:binary, [:bitwise_and, x, c.(m2)]), masked_shift.(x, 2, m2)])
    x = op.(:binary, [:add, x, op.(:binary, [:right_shift, x, c.(4)])])
    x = op.(:binary, [:bitwise_and, x, c.(pattern.(0x0F))])

    if bits == 8,
      do: x,
      else:
        op.(:binary, [
          :right_shift,
          op.(:binary, [:multiply, x, c.(pattern.(0x01))]),
          c.(bits - 8)
        ])
  end

  for {nx_op, mlx_op} <- [is_nan: :isnan, is_infinity: :isinf] do
    def unquote(nx_op)(out, %T{type: {kind, _}} = t) when kind in [:f, :bf, :s, :u] do
      device = op_device([t])
      op = op_fn(device, unquote(nx_op), [t])
      r = op.(:unary, [unquote(mlx_op), ref!(t, device)])
      wrap(out, op.(:astype, [r, Types.to_mlx(out.type)]), device)
    end

    def unquote(nx_op)(out, t), do: NxMlx.Fallback.run(unquote(nx_op), [out, t], op_device([t]))
  end

  for {nx_op, mlx_op} <- [ceil: :ceil, floor: :floor] do
    def unquote(nx_op)(%T{type: {kind, _}} = out, t) when kind in [:f, :bf],
      do: unary_op(out, t, unquote(nx_op), unquote(mlx_op))

    def unquote(nx_op)(out, t), do: NxMlx.Fallback.run(unquote(nx_op), [out, t], op_device([t]))
  end

  def round(%T{type: {kind, _}} = out, t) when kind in [:f, :bf] do
    # Nx rounds half away from zero; MLX's round goes to even. Truncate, then step away
    # from zero where the dropped fraction is at least one half (exact in floating point).
    device = op_device([t])
    op = op_fn(device, :round, [t])
    x = ref_as(t, out.type, device)
    zero = scalar_ref(0, out.type, device)
    negative = op.(:binary, [:less, x, zero])
    trunc = op.(:select, [negative, op.(:unary, [:ceil, x]), op.(:unary, [:floor, x])])
    frac = op.(:unary, [:abs, op.(:binary, [:subtract, x, trunc])])
    away = op.(:binary, [:greater_equal, frac, scalar_ref(0.5, out.type, device)])
    stepped = op.(:binary, [:add, trunc, op.(:unary, [:sign, x])])
    wrap(out, op.(:select, [away, stepped, trunc]), device)
  end

  def round(out, t), do: NxMlx.Fallback.run(:round, [out, t], op_device([t]))

  def clip(%T{type: {kind, _}} = out, t, min, max) when kind in [:s, :u] do
    types = [t.type, min.type, max.type]

    if {:u, 64} in types and Enum.any?(types, &match?({:s, _}, &1)) do
      # u64 with a signed type (an s64 result): Nx compares the numbers themselves, so the
      # choices are made on the inputs and only the chosen value is converted.
      device = op_device([t, min, max])
      op = op_fn(device, :clip, [t, min, max])
      less = fn a, b -> compare_numbers(op, :less, a, b, device) end
      [x, lo, hi] = Enum.map([t, min, max], &ref_as(&1, out.type, device))
      above_min = op.(:select, [less.(t, max), x, hi])
      at_min = op.(:select, [less.(min, max), lo, hi])
      wrap(out, op.(:select, [less.(min, t), above_min, at_min]), device)
    else
      clip_in(out, t, min, max)
    end
  end

  def clip(%T{type: {kind, _}} = out, t, min, max) when kind != :c, do: clip_in(out, t, min, max)

  def clip(out, t, min, max), do: NxMlx.Fallback.run(:clip, [out, t, min, max], op_device([t]))

  # Clipping in the output type.
  defp clip_in(out, t, min, max) do
    # As Nx: x > min ? x : min, then < max ? : max (so NaN becomes min).
    device = op_device([t, min, max])
    op = op_fn(device, :clip, [t, min, max])
    x = ref_as(t, out.type, device)
    lo = ref_as(min, out.type, device)
    hi = ref_as(max, out.type, device)
    low_clipped = op.(:select, [op.(:binary, [:greater, x, lo]), x, lo])
    wrap(out, op.(:select, [op.(:binary, [:less, low_clipped, hi]), low_clipped, hi]), device)
  end

  # `a mlx_op b` (bool) for two integer tensors, as numbers.
  defp compare_numbers(op, mlx_op, %T{type: ta} = a, %T{type: tb} = b, _device)
       when u64_with_signed(ta, tb),
       do: u64_signed_mask(op, mlx_op, a, b)

  defp compare_numbers(op, mlx_op, a, b, device) do
    type = Nx.Type.merge(a.type, b.type)
    op.(:binary, [mlx_op, ref_as(a, type, device), ref_as(b, type, device)])
  end
end
