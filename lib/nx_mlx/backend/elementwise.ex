defmodule NxMlx.Backend.Elementwise do
  @moduledoc false
  # NxMlx.Backend's element-wise ops: arithmetic, comparisons, the float functions,
  # complex parts and bit casts.

  import NxMlx.Backend.Core

  alias Nx.Tensor, as: T
  alias NxMlx.Types

  ## Complex parts and bit casts

  for {nx_op, mlx_op} <- [real: :real, imag: :imag, conjugate: :conjugate] do
    def unquote(nx_op)(out, %T{type: {:c, _}} = t) do
      device = op_device([t])
      op = op_fn(device, unquote(nx_op), [t])
      r = op.(:unary, [unquote(mlx_op), ref!(t, device)])
      wrap(out, op.(:astype, [r, Types.to_mlx(out.type)]), device)
    end

    def unquote(nx_op)(out, t), do: NxMlx.Fallback.run(unquote(nx_op), [out, t], op_device([t]))
  end

  def bitcast(%T{type: {_, out_bits} = type} = out, %T{type: {_, in_bits}} = t) do
    if out_bits != in_bits do
      raise ArgumentError,
            "NxMlx.Backend.bitcast: cannot reinterpret #{inspect(t.type)} as #{inspect(type)} " <>
              "(different sizes)"
    end

    device = op_device([t])
    r = call(device, :view, [ref!(t, device), Types.to_mlx(type)], :bitcast, [t])
    wrap(out, r, device)
  end

  ## Element-wise

  # Nx op => MLX op, for ops whose semantics agree for every type: inputs are cast to the
  # output type first.
  @same_type_binary [
    add: :add,
    subtract: :subtract,
    multiply: :multiply,
    min: :minimum,
    max: :maximum
  ]

  # u64 against a signed type merges to s64 in Nx, which cannot hold both: Nx compares the
  # numbers themselves (then wraps the answer into s64).
  defguard u64_with_signed(ta, tb)
           when (ta == {:u, 64} and elem(tb, 0) == :s) or (tb == {:u, 64} and elem(ta, 0) == :s)

  for {nx_op, mlx_op} <- @same_type_binary do
    if nx_op in [:min, :max] do
      def unquote(nx_op)(out, %T{type: ta} = a, %T{type: tb} = b) when u64_with_signed(ta, tb) do
        device = op_device([a, b])
        op = op_fn(device, unquote(nx_op), [a, b])
        pick_a = u64_signed_mask(op, unquote(if nx_op == :max, do: :greater, else: :less), a, b)
        r = op.(:select, [pick_a, ref_as(a, out.type, device), ref_as(b, out.type, device)])
        wrap(out, r, device)
      end
    end

    def unquote(nx_op)(out, a, b), do: binary_op(out, a, b, unquote(nx_op), unquote(mlx_op))
  end

  # Defined only for floating-point outputs; integer semantics differ (fallback).
  @float_binary [divide: :divide, pow: :power, atan2: :arctan2]

  for {nx_op, mlx_op} <- @float_binary do
    def unquote(nx_op)(%T{type: {kind, _}} = out, a, b) when kind in [:f, :bf] do
      binary_op(out, a, b, unquote(nx_op), unquote(mlx_op))
    end

    if nx_op == :divide do
      # As Nx: a complex quotient by zero is NaN+NaNi (MLX's gives infinite parts).
      def divide(%T{type: {:c, 64}} = out, a, b) do
        device = op_device([a, b])
        op = op_fn(device, :divide, [a, b])
        divisor = ref_as(b, out.type, device)
        q = op.(:binary, [:divide, ref_as(a, out.type, device), divisor])
        by_zero = op.(:binary, [:equal, divisor, scalar_ref(0, out.type, device)])
        nan = scalar_ref(Complex.new(:nan, :nan), out.type, device)
        wrap(out, op.(:select, [by_zero, nan, q]), device)
      end
    end

    if nx_op == :pow do
      def pow(%T{type: {kind, _}} = out, a, b) when kind in [:s, :u], do: integer_pow(out, a, b)
    end

    def unquote(nx_op)(out, a, b),
      do: NxMlx.Fallback.run(unquote(nx_op), [out, a, b], op_device([a, b]))
  end

  # Integer powers by square-and-multiply, wrapping as Nx does: one step per bit of the
  # exponent (every bit of the type, unless the exponent is a host tensor whose largest
  # value says fewer). A negative exponent gives an unspecified value (Nx.BinaryBackend
  # raises).
  defp integer_pow(%T{type: {_, bits} = type, shape: shape} = out, a, b) do
    device = op_device([a, b])
    op = op_fn(device, :pow, [a, b])
    dims = Tuple.to_list(shape)
    base = op.(:broadcast_to, [ref_as(a, type, device), dims])
    unsigned = Types.to_mlx({:u, bits})
    exponent = op.(:view, [op.(:broadcast_to, [ref_as(b, type, device), dims]), unsigned])
    one = scalar_ref(1, {:u, bits}, device)
    zero = scalar_ref(0, {:u, bits}, device)
    steps = pow_steps(b, bits)

    {result, _, _} =
      Enum.reduce(1..steps//1, {op.(:full, [dims, 1.0, Types.to_mlx(type)]), base, exponent}, fn
        step, {result, power, e} ->
          odd = op.(:binary, [:not_equal, op.(:binary, [:bitwise_and, e, one]), zero])
          result = op.(:select, [odd, op.(:binary, [:multiply, result, power]), result])

          if step == steps,
            do: {result, power, e},
            else:
              {result, op.(:binary, [:multiply, power, power]),
               op.(:binary, [:right_shift, e, one])}
      end)

    wrap(out, result, device)
  end

  defp pow_steps(%T{data: %NxMlx.Backend{}}, bits), do: bits

  defp pow_steps(%T{} = b, bits) do
    host = Nx.backend_copy(b, Nx.BinaryBackend)
    max = host |> Nx.reduce_max() |> Nx.to_number()
    min = host |> Nx.reduce_min() |> Nx.to_number()

    cond do
      not is_integer(max) or min < 0 -> bits
      max == 0 -> 1
      true -> min(bits, length(Integer.digits(max, 2)))
    end
  end

  @comparisons [
    equal: :equal,
    not_equal: :not_equal,
    greater: :greater,
    less: :less,
    greater_equal: :greater_equal,
    less_equal: :less_equal
  ]

  for {nx_op, mlx_op} <- @comparisons do
    def unquote(nx_op)(out, %T{type: ta} = a, %T{type: tb} = b) when u64_with_signed(ta, tb) do
      device = op_device([a, b])
      op = op_fn(device, unquote(nx_op), [a, b])
      r = u64_signed_mask(op, unquote(mlx_op), a, b)
      wrap(out, op.(:astype, [r, Types.to_mlx(out.type)]), device)
    end

    def unquote(nx_op)(out, a, b) do
      # Compare in the merged input type; Nx returns u8 (MLX returns bool).
      device = op_device([a, b])
      type = compute_type([a, b], Nx.Type.merge(a.type, b.type), device, round_scalars: false)
      ar = ref_as(a, type, device)
      br = ref_as(b, type, device)
      r = call(device, :binary, [unquote(mlx_op), ar, br], unquote(nx_op), [a, b])

      wrap(
        out,
        call(device, :astype, [r, Types.to_mlx(out.type)], unquote(nx_op), [a, b]),
        device
      )
    end
  end

  # `a mlx_op b` (a bool array) for u64 against a signed type, compared as numbers: in u64,
  # then answered by sign where the signed one is negative (so below every u64).
  def u64_signed_mask(op, mlx_op, a, b) do
    device = op_device([a, b])
    {signed, signed_left?} = if a.type == {:u, 64}, do: {b, false}, else: {a, true}
    negative = op.(:binary, [:less, ref!(signed, device), scalar_ref(0, signed.type, device)])
    r = op.(:binary, [mlx_op, ref_as(a, {:u, 64}, device), ref_as(b, {:u, 64}, device)])
    below? = mlx_op in [:less, :less_equal, :not_equal]
    above? = mlx_op in [:greater, :greater_equal, :not_equal]

    if (signed_left? and below?) or (not signed_left? and above?),
      do: op.(:binary, [:logical_or, negative, r]),
      else: op.(:binary, [:logical_and, op.(:unary, [:logical_not, negative]), r])
  end

  def binary_op(out, a, b, nx_op, mlx_op) do
    device = op_device([a, b])
    type = compute_type([a, b], out.type, device)
    ar = ref_as(a, type, device)
    br = ref_as(b, type, device)
    r = call(device, :binary, [mlx_op, ar, br], nx_op, [a, b])
    wrap(out, cast_result(r, type, out.type, device, nx_op, [a, b]), device)
  end

  # The type an element-wise op computes in to give Nx's answer of type `type`.
  # Nx.BinaryBackend reads every input exactly and rounds the exact (or f64) result once;
  # converting the inputs to `type` first would round them too (an s32 past 2^24 in f32, a
  # u16 past 65504 or a bf16 subnormal in f16). So inputs that `type` cannot hold exactly
  # are computed on in f32, or f64 on the CPU device where f32 cannot hold them either
  # (rounding an f32 result of f16 inputs to f16, or an f64 result of f32 ones to f32,
  # gives the correctly rounded answer of +, -, *, /). Scalars of known value (made by
  # `constant/3`, or host scalars) count by their value, so `x * 2` stays in x's type; with
  # `round_scalars: true` (arithmetic, not comparisons) a float scalar inside the normal
  # range of `type` is rounded into it, as EXLA and MLX do (`bf16_x * 0.044715` stays
  # bf16; see "Divergences").
  defp compute_type(inputs, type, device, opts \\ [])

  defp compute_type(inputs, {kind, _} = type, device, opts) when kind in [:f, :bf] do
    round? = Keyword.get(opts, :round_scalars, true)

    cond do
      Enum.all?(inputs, &exact_in?(&1, type, round?)) -> type
      Enum.all?(inputs, &exact_in?(&1, {:f, 32}, round?)) -> {:f, 32}
      device == :cpu -> {:f, 64}
      # No f64 on the GPU: f32 still holds the range of every integer and float input.
      type in [{:f, 16}, {:bf, 16}] -> {:f, 32}
      true -> type
    end
  end

  defp compute_type(_inputs, type, _device, _opts), do: type

  defp cast_result(ref, type, type, _device, _nx_op, _inputs), do: ref

  defp cast_result(ref, _type, out_type, device, nx_op, inputs),
    do: call(device, :astype, [ref, Types.to_mlx(out_type)], nx_op, inputs)

  # Whether every value of `t` is exactly representable in the float type `type` (or,
  # with `round?`, is a float scalar in its normal range).
  defp exact_in?(%T{type: type}, type, _round?), do: true

  defp exact_in?(%T{} = t, type, round?) do
    case known_value(t) do
      nil -> exact_type?(t.type, type)
      value -> exact_value?(value, type) or (round? and normal_float?(value, type))
    end
  end

  defp known_value(%T{data: %NxMlx.Backend{value: value}}), do: value

  defp known_value(%T{shape: {}, data: %Nx.BinaryBackend{}, type: {kind, _}} = t)
       when kind != :c,
       do: Nx.to_number(t)

  defp known_value(_t), do: nil

  # {significand bits, largest exponent, smallest (subnormal) exponent}
  @float_formats %{
    {:f, 16} => {11, 15, -24},
    {:bf, 16} => {8, 127, -133},
    {:f, 32} => {24, 127, -149},
    {:f, 64} => {53, 1023, -1074}
  }

  defp exact_type?({kind, bits}, type) when kind in [:s, :u] do
    {precision, _, _} = Map.fetch!(@float_formats, type)
    if kind == :s, do: bits - 1 <= precision, else: bits <= precision
  end

  defp exact_type?(in_type, type) do
    case {@float_formats[in_type], @float_formats[type]} do
      {{p1, max1, min1}, {p2, max2, min2}} -> p1 <= p2 and max1 <= max2 and min1 >= min2
      _ -> false
    end
  end

  defp exact_value?(value, _type) when value in [:nan, :infinity, :neg_infinity], do: true

  defp exact_value?(value, type) when is_integer(value) do
    {precision, max_exp, _} = Map.fetch!(@float_formats, type)
    magnitude = abs(value)
    odd = if magnitude == 0, do: 0, else: Bitwise.bsr(magnitude, trailing_zeros(magnitude))
    odd < Bitwise.bsl(1, precision) and magnitude < Bitwise.bsl(1, max_exp + 1)
  end

  defp exact_value?(value, type) when is_float(value) do
    t = Nx.BinaryBackend.constant(%T{shape: {}, type: type, names: []}, value, [])
    Nx.to_number(t) == value
  end

  defp exact_value?(_value, _type), do: false

  defp normal_float?(value, type) when is_float(value) do
    {precision, max_exp, min_exp} = Map.fetch!(@float_formats, type)
    magnitude = abs(value)
    smallest_normal = :math.pow(2.0, min_exp + precision - 1)
    largest = (2.0 - :math.pow(2.0, 1 - precision)) * :math.pow(2.0, max_exp)
    magnitude >= smallest_normal and magnitude <= largest
  end

  defp normal_float?(_value, _type), do: false

  defp trailing_zeros(n),
    do: if(Bitwise.band(n, 1) == 1, do: 0, else: 1 + trailing_zeros(Bitwise.bsr(n, 1)))

  @float_unary [
    exp: :exp,
    expm1: :expm1,
    log: :log,
    log1p: :log1p,
    sigmoid: :sigmoid,
    cos: :cos,
    sin: :sin,
    tan: :tan,
    cosh: :cosh,
    sinh: :sinh,
    tanh: :tanh,
    acos: :arccos,
    asin: :arcsin,
    atan: :arctan,
    acosh: :arccosh,
    asinh: :arcsinh,
    atanh: :arctanh,
    sqrt: :sqrt,
    rsqrt: :rsqrt,
    erf: :erf,
    erf_inv: :erfinv
  ]

  # These also run on c64: MLX's complex kernels (C++'s std::complex functions) agree with
  # Nx's to f32 rounding on finite inputs. The inverse trigonometric and hyperbolic ones
  # follow other branch cuts than Nx's (asinh of 0-3i: 1.76-1.57i, Nx -1.76-1.57i; MLX's
  # GPU backends have no complex asinh at all), and expm1, sigmoid and rsqrt have no complex
  # kernel or disagree at zero: they fall back.
  @complex_unary [:exp, :log, :log1p, :cos, :sin, :tan, :cosh, :sinh, :tanh, :sqrt]

  # Every real float type runs natively: where MLX's CPU kernels are float polynomials
  # (exp, sigmoid, erf, erf_inv, sin, cos; about f32 accuracy even on f64), the binding runs
  # kernels of its own on CPU streams (see "Accuracy").
  for {nx_op, mlx_op} <- @float_unary do
    def unquote(nx_op)(%T{type: {kind, _}} = out, t) when kind in [:f, :bf] do
      unary_op(out, t, unquote(nx_op), unquote(mlx_op))
    end

    if nx_op in @complex_unary do
      def unquote(nx_op)(%T{type: {:c, 64}} = out, t),
        do: unary_op(out, t, unquote(nx_op), unquote(mlx_op))
    end

    def unquote(nx_op)(out, t), do: NxMlx.Fallback.run(unquote(nx_op), [out, t], op_device([t]))
  end

  # erfc and cbrt: MLX has neither (and 1 - erf loses erfc's small values); the binding's
  # kernels compute them on CPU streams. On the GPU they fall back.
  for nx_op <- [:erfc, :cbrt] do
    def unquote(nx_op)(%T{type: {kind, _}} = out, t) when kind in [:f, :bf] do
      case op_device([t]) do
        :cpu -> unary_op(out, t, unquote(nx_op), unquote(nx_op))
        device -> NxMlx.Fallback.run(unquote(nx_op), [out, t], device)
      end
    end

    def unquote(nx_op)(out, t), do: NxMlx.Fallback.run(unquote(nx_op), [out, t], op_device([t]))
  end

  def sign(%T{type: {kind, _}} = out, t) when kind in [:f, :bf] do
    # NaN stays NaN (as in XLA and IEEE); MLX's sign gives 0 or -1 for it. -0.0 stays -0.0,
    # as in Nx (MLX's sign gives 0.0).
    device = op_device([t])
    op = op_fn(device, :sign, [t])
    x = ref_as(t, out.type, device)
    zero = op.(:binary, [:equal, x, scalar_ref(0, out.type, device)])
    keep = op.(:binary, [:logical_or, op.(:unary, [:isnan, x]), zero])
    wrap(out, op.(:select, [keep, x, op.(:unary, [:sign, x])]), device)
  end

  def sign(out, %T{type: {kind, _}} = t) when kind in [:s, :u], do: unary_op(out, t, :sign, :sign)

  # z / |z|, and 0 at 0, as EXLA (see "Divergences").
  def sign(%T{type: {:c, 64}} = out, %T{type: {:c, 64}} = t) do
    device = op_device([t])
    op = op_fn(device, :sign, [t])
    z = ref!(t, device)
    magnitude = op.(:unary, [:abs, z])
    zero = op.(:binary, [:equal, magnitude, scalar_ref(0.0, {:f, 32}, device)])
    quotient = op.(:binary, [:divide, z, op.(:astype, [magnitude, Types.to_mlx(out.type)])])
    wrap(out, op.(:select, [zero, scalar_ref(0, out.type, device), quotient]), device)
  end

  def sign(out, t), do: NxMlx.Fallback.run(:sign, [out, t], op_device([t]))

  def negate(out, t), do: unary_op(out, t, :negate, :negative)

  # The magnitude of c64 (MLX's abs gives f32 for it, through hypot).
  def abs(%T{type: {:f, 32}} = out, %T{type: {:c, 64}} = t) do
    device = op_device([t])
    wrap(out, call(device, :unary, [:abs, ref!(t, device)], :abs, [t]), device)
  end

  def abs(out, t), do: unary_op(out, t, :abs, :abs)

  def unary_op(out, t, nx_op, mlx_op) do
    device = op_device([t])
    type = compute_type([t], out.type, device)
    r = call(device, :unary, [mlx_op, ref_as(t, type, device)], nx_op, [t])
    wrap(out, cast_result(r, type, out.type, device, nx_op, [t]), device)
  end
end
