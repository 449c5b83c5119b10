defmodule NxMlx.Backend do
  @moduledoc """
  An `Nx.Backend` that runs on MLX.

      Nx.global_default_backend(NxMlx.Backend)
      Nx.global_default_backend({NxMlx.Backend, device: :cpu})

  Options: `device: :cpu | :gpu` (default: `NxMlx.default_device/0`).

  Ops are lazy: each callback builds an MLX graph node in the calling process (about a
  microsecond of native work) on the stream of the command queue that serves it: the queue
  bound with `NxMlx.CommandQueue.with_queue/2` when its device matches, else the device's
  default queue (see `NxMlx.CommandQueue` for the cross-device rules). Reading a tensor back
  evaluates it on that queue's thread.

  ## What runs on MLX

    * Creation and transfer: `constant`, `from_binary`, `iota`, `eye`, `to_binary`,
      `inspect`, `backend_copy`/`transfer`, `as_type` (floats to integers truncate and wrap the
      exact integer into the type, map NaN to 0 and the infinities to the type's extremes,
      as Nx does), `bitcast`.
    * Shape: `reshape`, `squeeze`, `transpose`, `broadcast`, `concatenate`, `stack`, `slice`
      (starts clamped as in Nx; tensor starts stay on the device), `put_slice`, `pad`,
      `reverse`.
    * Indexing: `gather`, `indexed_add`, `indexed_put`, and `Nx.take`/`take_along_axis`
      (see "Blocks"). Out-of-bounds indices never read or write outside the tensor: gather and
      the take blocks clamp them and out-of-bounds scatter rows write nothing
      (`Nx.BinaryBackend` raises). Indices of any integer type reach every position (u8
      indices into an axis of 300 elements are not clamped at 255). With duplicate
      indices `indexed_put` keeps the last row on the CPU device, any one of them on the GPU.
    * Element-wise: `add`, `subtract`, `multiply`, `min`, `max`, the comparisons, `divide`,
      `pow` (integers too, by square and multiply), `atan2` (floats), `quotient`,
      `remainder`, `bitwise_and`/`or`/`xor`, `left_shift`, `right_shift` (integers, with Nx's
      truncation, sign and width rules), `logical_and`/`or`/`xor`, `select`, `clip`, `abs`,
      `negate`, `sign`, `ceil`, `floor`, `round` (half away from zero), `is_nan`,
      `is_infinity`, `bitwise_not`, `population_count` and `count_leading_zeros` (composed
      from shifts, masks and adds), `real`, `imag`, `conjugate`, and the floating-point unary
      functions on every real float type, f64 included (`erfc` and `cbrt` on the CPU device;
      see "Accuracy"). Integer ops of u64 with a signed type (an s64 result) work on the
      numbers, as Nx does: the comparisons, `min`, `max`, `clip`, `quotient`, `remainder` and
      `right_shift` do not see 2^64 - 1 as -1 (the others wrap alike either way). On c64: the
      arithmetic, `divide`, the comparisons, `negate`, `abs`, `sign`, `exp`, `log`, `log1p`,
      `sqrt`, `sin`, `cos`, `tan`, `sinh`, `cosh` and `tanh`.
    * Reductions and scans: `sum`, `product`, `reduce_max`, `reduce_min`, `all`, `any`,
      `argmax`/`argmin` (both tie breaks; an axis holding NaN answers its last NaN, as in
      Nx), `sort`/`argsort` (stable in both directions; NaN last ascending, first
      descending), `window_sum`/`product`/`max`/`min`, cumulative ops (see "Blocks").
    * `dot` (batched too; MLX's matmul for floating-point and c64 types, multiply-and-sum for
      integers, wrapping as Nx does), `conv` (f16, bf16, f32; any layout,
      strides, padding, dilations and feature groups), `fft`/`ifft`.
    * `triangular_solve` (every option; computed in f64 on the CPU device, see "Linear
      algebra"), `to_batched` (slices of the input, both leftover policies).

  ## Divergences from Nx.BinaryBackend

    * `sign(NaN)` is NaN (as in EXLA); `Nx.BinaryBackend` returns 1.0. `sign(-Inf)` is -1.0
      (as in EXLA); `Nx.BinaryBackend` returns 1.0 (it compares the atom `:neg_infinity` with
      0 in Erlang's term order). The sign of a complex number is `z / |z|` (0 at 0, as in
      EXLA); `Nx.BinaryBackend` returns 1 for every one.
    * `pad` whose output type is wider than its input's (`Nx.pad(f16_tensor, :nan, ...)` is
      f32, a u8 tensor padded with 300 is u16) returns that output type, which Nx's front
      end declares, with the input's values converted to it (as EXLA); `Nx.BinaryBackend`
      builds its result in the input's type and copies the pad value's bytes into it as if
      they had that type (padding an f16 tensor with :nan writes 0.0 and NaN for each padded
      position, and the data no longer fits the shape).
    * Complex functions of non-finite inputs, and complex results that overflow, follow
      C++'s `std::complex` (e.g. `exp` of `Inf+0i` is `Inf+0i`, `tanh` of it `1+0i`) where
      `Nx.BinaryBackend` often gives NaN parts; finite inputs agree to f32 rounding.
    * `log`, `log1p` and `sqrt` of a complex number on the negative real axis whose
      imaginary part is -0.0 answer the lower side of the branch cut (C99 Annex G, as
      C++'s `std::complex`: `log(-1-0i)` is `-pi i`); Nx's `Complex` ignores the zero's
      sign and answers `+pi i`.
    * Integer `quotient`/`remainder` by zero give an unspecified value instead of raising,
      and shifting by a negative amount or an integer `pow` with a negative exponent gives an
      unspecified value instead of raising. The type's minimum divided by -1 wraps (quotient
      the minimum, remainder 0), as in Nx.
    * Float and c64 sums on the CPU device accumulate in double and are rounded once (over
      several axes too), as `Nx.BinaryBackend` does; the last bit may still differ from
      it where the two add in different orders. The error does not grow with the number of
      elements (10^8 f32 values within 5.4e-9 of the exact sum).
    * `atan2(y, -Inf)` is -pi for negative `y` (IEEE 754, as EXLA); `Nx.BinaryBackend`
      returns pi. `all` of a complex tensor holding 0+0i is 0; `Nx.BinaryBackend` counts
      every complex number as true.
    * Element-wise ops read their inputs exactly, as `Nx.BinaryBackend` does: inputs the
      result type cannot hold (an s32 past 2^24 for an f32 result, a u16 past 65504 or a
      bf16 subnormal for an f16 one) are computed on in f32, or in f64 on the CPU device,
      and the result is rounded once. On the GPU device (no f64) inputs that f32 cannot
      hold either are converted to the result type first, as EXLA does: `sin`, `cos` and
      `tan` of integers past 2^24 differ there. A float scalar of known value (a number in
      `x * 0.044715`) inside the result type's normal range is rounded into that type
      first, as EXLA and MLX do, so `bf16_x * 0.044715` stays a bf16 multiply; the result
      may differ from Nx's in the last bit. Comparisons round nothing.
    * Index arrays given to the NIF directly are clamped into their axis: no value reads or
      writes outside an array.
    * Float results may differ in the last bits (BLAS matmul, MLX's kernels); see the tests.
    * `fft`/`ifft` along a non-last axis of a tensor of rank 3 or more give the DFT; Nx
      0.13.1's `Nx.BinaryBackend` gives something else there (e.g. row 0 of `fft(axis: 0)` of
      a `{2, 3, 5}` tensor is not `t[0] + t[1]`).

  ## Blocks

  `block/4` runs native kernels for:

    * `Nx.Block.CumulativeSum`, `CumulativeProduct`, `CumulativeMax`, `CumulativeMin` (MLX's
      scans, any axis and direction) and `Nx.Block.LogicalNot`;
    * `Nx.Block.FFT2`, `IFFT2`, `RFFT`, `IRFFT` (one n-dimensional MLX transform; c64 and
      f32 results), `Nx.Block.Phase` (c64), `Nx.Block.AllClose` (a floating-point input);
    * `Nx.Block.Take` and `Nx.Block.TakeAlongAxis` (one MLX `take`/`take_along_axis`, indices
      clamped into the axis), `Nx.Block.TopK` (Nx's order: NaN first, ties in index order;
      on the CPU device with k at most half the axis, a linear-time partition finds the k-th
      largest value and only the k entries chosen are sorted, 7x faster than a full sort for
      k = 50 of 32,000; otherwise a stable descending argsort; complex inputs keep the
      default function);
    * the `Nx.Block.LinAlg` blocks with `config :nx_mlx, linalg: :lapack` (see "Linear
      algebra").

  Every other block runs its default function, which is made of the callbacks above and so
  runs on MLX too: `Nx.LinAlg.*` in the default `linalg: :nx` mode, all_close of two integer
  tensors. Unknown blocks run their default function.

  ## Linear algebra

  MLX's linear algebra is LAPACK on the CPU (MLX has no GPU kernels for it): tensors on the
  `:gpu` device are copied to the CPU device and the results back.

    * `triangular_solve` always runs there, in f64 whatever the tensor type (so its f32
      results are those of `Nx.BinaryBackend`, which solves in Elixir floats), and raises
      Nx's `ArgumentError` on a zero diagonal (it waits for its result to know).
    * `Nx.LinAlg.cholesky`, `solve`, `qr`, `eigh`, `svd`, `lu` and `determinant` are blocks.
      By default (`config :nx_mlx, linalg: :nx`) they run Nx's own algorithms, on MLX ops: the
      answers are Nx's, to the last printed digit. With `linalg: :lapack` they run LAPACK
      through MLX, faster on large matrices, with valid but not identical answers: the last
      digits of f32 results, the signs of QR, SVD and eigenvector columns, the basis of a
      repeated eigenvalue's eigenspace and LU's pivots (partial pivoting) may differ from
      Nx's. f16/bf16 inputs are computed in f32; QR's `:complete` mode of a tall matrix and
      complex inputs keep the default function. MLX's f64 `det`, `solve` and `eigh` were
      measured within about 5.0e-8 relative of the exact value, not at f64 precision.

  ## Accuracy

  On the CPU device every real floating-point unary function (`exp`, `expm1`, `log`,
  `log1p`, `sigmoid`, the trigonometric and hyperbolic functions and their inverses, `sqrt`,
  `rsqrt`, `erf`, `erfc`, `erf_inv`, `cbrt`) is within 1 ulp of the exact value on f16, bf16
  and f32, and within 2 ulp of a double-precision reference on f64, over each function's
  whole domain (test/nx_mlx/accuracy_test.exs measures every f16 and bf16 value and sampled
  f32/f64 ones; special values follow C's Annex F). MLX's own CPU kernels for `exp`,
  `sigmoid`, `erf`, `erf_inv`, `sin` and `cos` are float polynomials (exp 62 ulp near 88,
  `erf(1e-7)` = 0, f64 no more accurate than f32) and its `rsqrt` is off by 1.5 ulp, and it
  has no `erfc` or `cbrt`: for these the binding runs kernels of its own on CPU streams,
  which compute in double with the C library, round once, and split large arrays over the
  cores. On the GPU (an H200, MLX's CUDA kernels) the same functions measured within
  2.6 ulp on f32 and 1 ulp on f16/bf16 (`tan` 2.6, `atanh` 2.3, the others under 2), except
  that f32 `sigmoid` below -87.3 gives 0 where the exact value is below f32's smallest
  normal number; f16 and bf16 `sigmoid` are computed in f32 there (MLX's own overflows in
  f16 from |x| = 11.1: `sigmoid(-11.1)` gave 0, not 1.5e-5). `erfc` and `cbrt` fall back on
  the GPU.

  ## Fallbacks

  These run on `Nx.BinaryBackend`: `cbrt` and `erfc` on the GPU device (MLX has neither,
  and `1 - erf` loses erfc's small values), `reduce` and `window_reduce` (they take Elixir
  functions), and, within native callbacks, integer `dot` with more than 16,777,216 products
  (MLX has no integer matmul; smaller ones multiply and sum natively), float `remainder` (C's
  fmod), complex inputs of `pow`, `expm1`, `sigmoid`, `rsqrt`, `erf`, `erf_inv` and the
  inverse trigonometric and hyperbolic functions (no complex kernel in MLX, a different
  answer at zero, or branch cuts other than Nx's), negative
  window padding (window reductions and scatters), `conv` with batch groups, negative
  padding, f64, or input dilation on the GPU, and `indexed_add`/`indexed_put`/
  `window_scatter_max`/`min` of 64-bit integers and c64 on the GPU (MLX's GPU scatter has
  no such kernels). The inputs are copied off the device and the
  result is copied back. Each such call emits `[:nx_mlx, :fallback, :start | :stop |
  :exception]` telemetry with `%{op: name}`, and `config :nx_mlx, fallback: :silent | :warn |
  :raise` (default `:silent`) makes it silent, log a warning once per op, or raise.

  ## Debug settings

  Compiled in only when on (`Application.compile_env`; no cost otherwise):

      config :nx_mlx, debug_bounds_check: true, debug_detect_nan_inf: true

    * `debug_bounds_check`: `gather`, `indexed_add`, `indexed_put`, `Nx.take` and
      `Nx.take_along_axis` read their index rows back and raise `ArgumentError` naming the op
      when one is out of bounds, instead of clamping or skipping it.
    * `debug_detect_nan_inf`: after each floating-point callback, raises `ArgumentError`
      naming the op when the result holds NaN or an infinity while its inputs were finite.
      Every op then waits for its result: for debugging only.

  ## Types

  u8–u64, s8–s64, f16, bf16, f32, f64 (CPU device only in MLX) and c64. Tensors of the types
  MLX has no dtype for (8-bit floats, 2- and 4-bit integers) are created on `Nx.BinaryBackend`
  and stay there (a fallback with the same telemetry and settings); an op that mixes one with
  an MLX tensor raises `ArgumentError` (convert it with `Nx.as_type/2`). complex128 raises
  `ArgumentError`.
  """

  @behaviour Nx.Backend

  # `value`: the number every element holds, when the tensor was made by `constant/3` (so
  # mixed-type element-wise ops know whether a scalar operand converts exactly).
  defstruct [:ref, :device, :value]

  alias Nx.Tensor, as: T
  alias NxMlx.{CommandQueue, Runtime, Types}

  @type t :: %__MODULE__{ref: reference(), device: :cpu | :gpu, value: number() | atom() | nil}

  @debug_bounds_check Application.compile_env(:nx_mlx, :debug_bounds_check, false)
  @debug_detect_nan_inf Application.compile_env(:nx_mlx, :debug_detect_nan_inf, false)
  @debug_key :nx_mlx_debug_last_op

  # Nx types MLX has no dtype for, whose tensors are created on (and stay on)
  # Nx.BinaryBackend: 8-bit floats and 2- and 4-bit integers. (complex128 raises instead.)
  @binary_only Map.new(
                 [{:f, 8}, {:f8_e4m3fn, 8}, {:s, 2}, {:s, 4}, {:u, 2}, {:u, 4}],
                 &{&1, true}
               )

  ## Options and devices

  @impl true
  def init(opts) do
    Keyword.validate!(opts, [:device])

    case Keyword.get(opts, :device) do
      nil -> [device: NxMlx.default_device()]
      device when device in [:cpu, :gpu] -> [device: device]
      other -> raise ArgumentError, "NxMlx.Backend: unknown device #{inspect(other)}"
    end
  end

  # The device a creation op runs on: the one in its options, after the command queue's
  # promotion rules (see NxMlx.CommandQueue).
  defp device_of(opts) do
    CommandQueue.route_device(Keyword.get(opts, :device) || NxMlx.default_device())
  end

  # The device an op on these tensors runs on: the first NxMlx tensor's, after the command
  # queue's promotion rules.
  defp op_device(tensors) do
    device =
      Enum.find_value(tensors, fn
        %T{data: %__MODULE__{device: d}} -> d
        _ -> nil
      end) || NxMlx.default_device()

    CommandQueue.route_device(device)
  end

  ## Plumbing: calling the NIF with errors that name the op, shapes and types

  # The size of `axis` of `t`, or an ArgumentError naming `op`.
  defp axis_size!(%T{shape: shape}, axis, _op)
       when is_integer(axis) and axis >= 0 and axis < tuple_size(shape),
       do: elem(shape, axis)

  defp axis_size!(%T{shape: shape}, axis, op) do
    raise ArgumentError,
          "NxMlx.Backend.#{op}: axis #{inspect(axis)} is out of range for shape #{inspect(shape)}"
  end

  # `op.(fun, args)` calls the NIF like `call/5`, for the many steps of one callback.
  defp op_fn(device, op, tensors), do: fn fun, args -> call(device, fun, args, op, tensors) end

  # Runs `fun` on the worker for `device`: the bound command queue when it is on `device`,
  # else the device's default queue.
  defp call(device, fun, args, op, tensors) do
    if @debug_detect_nan_inf, do: Process.put(@debug_key, {op, tensors})
    Runtime.call(fun, [CommandQueue.worker(device) | args], fn -> describe(op, tensors) end)
  end

  ## Debug checks (compiled in only when their setting is on; see "Debug settings")

  # debug_detect_nan_inf: the result of the callback that is finishing holds NaN or an
  # infinity while its inputs were finite.
  defp check_finite!(%T{type: {kind, _}} = out, ref, device) when kind in [:f, :bf, :c] do
    case Process.delete(@debug_key) do
      {op, inputs} when inputs != [] ->
        if Enum.any?(inputs, &has_data?/1) and non_finite?(ref, tuple_size(out.shape), device) and
             not Enum.any?(inputs, &input_non_finite?(&1, device)) do
          raise ArgumentError,
                "NxMlx.Backend.#{op} produced NaN or infinity from finite inputs " <>
                  "(shapes #{Enum.map_join(inputs, ", ", &inspect(&1.shape))}, " <>
                  "result #{inspect(out.shape)}; config :nx_mlx, debug_detect_nan_inf: true)"
        end

      _ ->
        :ok
    end
  end

  defp check_finite!(_out, _ref, _device), do: Process.delete(@debug_key)

  # Templates (the output of creation ops) hold no data.
  defp has_data?(%T{data: nil}), do: false
  defp has_data?(%T{data: %Nx.TemplateBackend{}}), do: false
  defp has_data?(%T{}), do: true

  defp input_non_finite?(%T{data: nil}, _device), do: false
  defp input_non_finite?(%T{data: %Nx.TemplateBackend{}}, _device), do: false

  defp input_non_finite?(%T{data: %__MODULE__{ref: ref}, type: {kind, _}} = t, device)
       when kind in [:f, :bf, :c],
       do: non_finite?(ref, tuple_size(t.shape), device)

  defp input_non_finite?(%T{type: {kind, _}} = t, _device) when kind in [:f, :bf, :c] do
    t = Nx.backend_copy(t, Nx.BinaryBackend)
    Nx.to_number(Nx.any(Nx.logical_or(Nx.is_nan(t), Nx.is_infinity(t)))) == 1
  end

  defp input_non_finite?(_t, _device), do: false

  defp non_finite?(ref, rank, device) do
    d = fn fun, args -> Runtime.call(fun, [Runtime.worker(device) | args], fn -> "debug" end) end
    bad = d.(:binary, [:logical_or, d.(:unary, [:isnan, ref]), d.(:unary, [:isinf, ref])])
    any = d.(:reduce, [:any, bad, Enum.to_list(0..(rank - 1)//1), false])
    Runtime.call(:to_binary, [any], fn -> "debug" end) == <<1>>
  end

  # debug_bounds_check: every index row of a gather or scatter is inside the tensor.
  # `in_bounds` (of rank `rank`) has the batch shape of `indices` (all of it for the take
  # blocks, whose indices carry no trailing index dimension).
  defp check_bounds!(op, in_bounds, rank, nx_op, indices, shape) do
    all = op.(:reduce, [:all, in_bounds, Enum.to_list(0..(rank - 1)//1), false])

    if Runtime.call(:to_binary, [all], fn -> "NxMlx.Backend.#{nx_op}" end) != <<1>> do
      raise ArgumentError,
            "NxMlx.Backend.#{nx_op}: an index is out of bounds for shape #{inspect(shape)} " <>
              "(indices of shape #{inspect(indices.shape)}; config :nx_mlx, " <>
              "debug_bounds_check: true)"
    end
  end

  defp describe(op, tensors) do
    shapes = Enum.map_join(tensors, ", ", &inspect(&1.shape))
    types = Enum.map_join(tensors, ", ", &inspect(&1.type))
    "NxMlx.Backend.#{op} failed for shapes #{shapes} and types #{types}"
  end

  defp wrap(%T{} = out, ref, device) do
    if @debug_detect_nan_inf, do: check_finite!(out, ref, device)
    count_allocation(out)
    %{out | data: %__MODULE__{ref: ref, device: device}}
  end

  # Counted so that dead tensors are collected promptly (see NxMlx.Runtime).
  defp count_allocation(%T{type: {_, bits}, shape: shape}),
    do: Runtime.count_result(div(Tuple.product(shape) * bits, 8))

  # The MLX array of `t`. Arrays of another queue or device are used in place: the NIF has
  # them evaluated on their own queue first when they are still lazy. Tensors of other
  # backends are copied in.
  defp ref!(%T{data: %__MODULE__{ref: ref}}, _device), do: ref

  defp ref!(%T{} = t, device) do
    case backend_transfer_in(t, device) do
      %T{data: %__MODULE__{ref: ref}} ->
        ref

      %T{type: type} ->
        raise ArgumentError,
              "NxMlx.Backend: a #{inspect(type)} tensor cannot take part in an MLX op (MLX " <>
                "has no such type); convert it with Nx.as_type/2 first"
    end
  end

  defp backend_transfer_in(%T{data: %__MODULE__{}} = t, device) do
    from_binary(t, to_binary(t, Nx.size(t)), device: device)
  end

  defp backend_transfer_in(%T{} = t, device) do
    from_binary(t, Nx.to_binary(t), device: device)
  end

  # The array of `t` converted to `type` (no-op when it already has it).
  defp ref_as(%T{type: type} = t, type, device), do: ref!(t, device)

  defp ref_as(%T{} = t, type, device) do
    call(device, :astype, [ref!(t, device), Types.to_mlx(type)], :as_type, [t])
  end

  defp check_device_type!(device, type) do
    if device == :gpu and type == {:f, 64} do
      raise ArgumentError,
            "NxMlx.Backend: MLX has no float64 on the GPU; use {:f, 32} or the :cpu device"
    end

    if type == {:c, 128} do
      raise ArgumentError, "NxMlx.Backend: MLX has no complex128; use {:c, 64}"
    end
  end

  ## Creation

  @impl true
  def constant(%T{type: type} = out, number, _opts) when is_map_key(@binary_only, type) do
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
      broadcast(out, t, shape, [])
    end
  end

  defp with_value(%T{data: %__MODULE__{} = data} = t, number),
    do: %{t | data: %{data | value: number}}

  defp with_value(t, _number), do: t

  # Numbers that survive the trip through a double exactly (MLX's `full` takes a double).
  defp exact_float?(n, {kind, _}) when is_integer(n) and kind in [:s, :u],
    do: abs(n) <= 9_007_199_254_740_992

  defp exact_float?(n, {kind, _}) when is_number(n) and kind in [:f, :bf], do: true
  defp exact_float?(_, _), do: false

  @impl true
  def from_binary(%T{type: type} = out, binary, _opts) when is_map_key(@binary_only, type) do
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

  @impl true
  def to_binary(%T{data: %__MODULE__{ref: ref}, type: {_, bits}} = t, limit) do
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
  defp leading_elements(%T{data: %__MODULE__{ref: ref, device: device}} = t, limit) do
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

  @impl true
  def inspect(%T{} = tensor, inspect_opts) do
    limit = inspect_opts.limit
    binary = to_binary(tensor, if(limit == :infinity, do: Nx.size(tensor), else: limit + 1))
    Nx.Backend.inspect(tensor, binary, inspect_opts)
  end

  @impl true
  def backend_copy(%T{} = tensor, backend, opts), do: backend_transfer(tensor, backend, opts)

  @impl true
  def backend_transfer(%T{data: %__MODULE__{device: device}} = tensor, __MODULE__, opts) do
    case device_of(opts) do
      ^device -> tensor
      other -> backend_transfer_in(tensor, other)
    end
  end

  def backend_transfer(%T{} = tensor, Nx.Tensor, _opts), do: tensor

  def backend_transfer(%T{} = tensor, backend, opts) do
    backend.from_binary(tensor, to_binary(tensor, Nx.size(tensor)), opts)
  end

  @impl true
  def backend_deallocate(%T{data: %__MODULE__{}}) do
    # The array is freed when the last reference to it is garbage collected: on its worker,
    # except small computed CPU arrays, which are freed in place.
    :ok
  end

  @impl true
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

  @impl true
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

  # 0..n-1 as integers (exact; converted to the output type afterwards).
  defp index_range(op, n) do
    op.(:arange, [0.0, n / 1, 1.0, if(n < 2_147_483_647, do: :s32, else: :s64)])
  end

  ## Shape
  ## Shape

  @impl true
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

  # Direct callers of a callback may pass an output template that does not fit its input:
  # MLX would compute a result of another shape than the tensor claims.
  defp check_template!(nx_op, %T{shape: shape}, expected) do
    if shape != expected do
      raise ArgumentError,
            "NxMlx.Backend.#{nx_op}: the output shape #{inspect(shape)} does not match the " <>
              "expected #{inspect(expected)}"
    end
  end

  # A scalar array holding `number` exactly, as `type`.
  defp scalar_ref(number, type, device) do
    scalar = Nx.BinaryBackend.constant(%T{shape: {}, type: type, names: []}, number, [])
    call(device, :from_binary, [Nx.to_binary(scalar), [], Types.to_mlx(type)], :constant, [])
  end

  @impl true
  def select(%T{type: type} = out, %T{} = pred, %T{} = on_true, %T{} = on_false) do
    device = op_device([pred, on_true, on_false])
    tensors = [pred, on_true, on_false]
    p = call(device, :astype, [ref!(pred, device), :bool], :select, tensors)
    a = ref_as(on_true, type, device)
    b = ref_as(on_false, type, device)
    wrap(out, call(device, :select, [p, a, b], :select, tensors), device)
  end

  @impl true
  def reshape(%T{shape: shape} = out, %T{} = t) do
    device = op_device([t])

    wrap(
      out,
      call(device, :reshape, [ref!(t, device), Tuple.to_list(shape)], :reshape, [t]),
      device
    )
  end

  @impl true
  def squeeze(out, t, _axes), do: reshape(out, t)

  @impl true
  def transpose(out, %T{} = t, axes) do
    device = op_device([t])
    wrap(out, call(device, :transpose, [ref!(t, device), axes], :transpose, [t]), device)
  end

  @impl true
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

  @impl true
  def concatenate(%T{type: type} = out, tensors, axis) do
    device = op_device(tensors)
    refs = Enum.map(tensors, &ref_as(&1, type, device))
    wrap(out, call(device, :concatenate, [refs, axis], :concatenate, tensors), device)
  end

  @impl true
  def stack(%T{type: type} = out, tensors, axis) do
    device = op_device(tensors)

    refs =
      Enum.map(tensors, fn t ->
        shape = t.shape |> Tuple.insert_at(axis, 1) |> Tuple.to_list()
        call(device, :reshape, [ref_as(t, type, device), shape], :stack, tensors)
      end)

    wrap(out, call(device, :concatenate, [refs, axis], :stack, tensors), device)
  end

  @impl true
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

  @impl true
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

  @impl true
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

  @impl true
  def reverse(out, %T{} = t, axes) do
    device = op_device([t])
    op = op_fn(device, :reverse, [t])

    r =
      Enum.reduce(axes, ref!(t, device), fn axis, acc ->
        reverse_axis(op, acc, axis, axis_size!(t, axis, :reverse))
      end)

    wrap(out, r, device)
  end

  ## Indexing

  @impl true
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

  @impl true
  def indexed_add(out, t, indices, updates, opts),
    do: indexed(out, t, indices, updates, opts, :indexed_add)

  @impl true
  def indexed_put(out, t, indices, updates, opts),
    do: indexed(out, t, indices, updates, opts, :indexed_put)

  # MLX's GPU scatter has no kernels for 64-bit integers or complex64 ("[scatter] GPU
  # scatter does not yet support int64"): those fall back there.
  defp gpu_scatter_unsupported?(device, {kind, 64}) when kind in [:s, :u, :c], do: device == :gpu
  defp gpu_scatter_unsupported?(_device, _type), do: false

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
  defp clamp_index(op, index, {kind, bits} = type, dim, device) do
    type_max = if kind == :u, do: Bitwise.bsl(1, bits) - 1, else: Bitwise.bsl(1, bits - 1) - 1
    zero = scalar_ref(0, type, device)
    high = scalar_ref(max(min(dim - 1, type_max), 0), type, device)
    clamped = op.(:binary, [:minimum, op.(:binary, [:maximum, index, zero]), high])
    {clamped, op.(:binary, [:equal, clamped, index])}
  end

  ## Window reductions

  # Pad with the reduction's identity (as Nx does), take a strided view whose trailing axes
  # walk each window, and reduce over them.
  for {nx_op, mlx_op, pad} <- [
        {:window_sum, :sum, :zero},
        {:window_product, :prod, :one},
        {:window_max, :max, :min_value},
        {:window_min, :min, :max_value}
      ] do
    @impl true
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
    @impl true
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
    picked_reversed = op.(:arg_reduce, [max?, reverse_axis(op, flat, rank, size), rank, false])
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

  ## Complex parts and bit casts

  for {nx_op, mlx_op} <- [real: :real, imag: :imag, conjugate: :conjugate] do
    @impl true
    def unquote(nx_op)(out, %T{type: {:c, _}} = t) do
      device = op_device([t])
      op = op_fn(device, unquote(nx_op), [t])
      r = op.(:unary, [unquote(mlx_op), ref!(t, device)])
      wrap(out, op.(:astype, [r, Types.to_mlx(out.type)]), device)
    end

    def unquote(nx_op)(out, t), do: NxMlx.Fallback.run(unquote(nx_op), [out, t], op_device([t]))
  end

  @impl true
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

  ## Arg-reductions and sorting

  @impl true
  def argmax(out, t, opts), do: arg_reduce(out, t, opts, :argmax)

  @impl true
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
    searched = if high?, do: reverse_axis(op, x, axis, n), else: x
    idx = op.(:astype, [op.(:arg_reduce, [nx_op == :argmax, searched, axis, false]), type])
    idx = if high?, do: op.(:binary, [:subtract, last, idx]), else: idx

    # As Nx: along an axis holding NaN, the answer is the index of the last NaN.
    idx =
      if kind in [:f, :bf] do
        nan = op.(:unary, [:isnan, x])
        reversed = reverse_axis(op, nan, axis, n)
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

  @impl true
  def sort(out, %T{type: {kind, _}} = t, opts) when kind != :c do
    device = op_device([t])
    op = op_fn(device, :sort, [t])
    axis = opts[:axis] || 0
    sorted = op.(:sort, [false, ref!(t, device), axis])

    r =
      if opts[:direction] == :desc,
        do: reverse_axis(op, sorted, axis, axis_size!(t, axis, :sort)),
        else: sorted

    wrap(out, r, device)
  end

  def sort(out, t, opts), do: NxMlx.Fallback.run(:sort, [out, t, opts], op_device([t]))

  @impl true
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
  defp argsort_ref(op, ref, axis, n, :desc, type, device) do
    # Stable descending order: sort the reversed axis ascending, reverse the result and map
    # the positions back (ties keep their original order, as in Nx).
    reversed = reverse_axis(op, ref, axis, n)
    idx = op.(:astype, [op.(:sort, [true, reversed, axis]), Types.to_mlx(type)])
    op.(:binary, [:subtract, scalar_ref(n - 1, type, device), reverse_axis(op, idx, axis, n)])
  end

  defp argsort_ref(op, ref, axis, _n, _asc, type, _device),
    do: op.(:astype, [op.(:sort, [true, ref, axis]), Types.to_mlx(type)])

  defp reverse_axis(op, ref, axis, n) do
    op.(:take, [ref, op.(:arange, [(n - 1) / 1, -1.0, -1.0, :s32]), axis])
  end

  ## Fourier transforms

  @impl true
  def fft(out, t, opts), do: fourier(out, t, opts, :fft)

  @impl true
  def ifft(out, t, opts), do: fourier(out, t, opts, :ifft)

  defp fourier(%T{type: {:c, 64}} = out, %T{} = t, opts, nx_op) do
    device = op_device([t])
    op = op_fn(device, nx_op, [t])
    x = ref_as(t, {:c, 64}, device)
    r = op.(:fft, [nx_op == :ifft, x, opts[:length], opts[:axis]])

    r = clean_small(op, r, opts[:eps], true, device)

    wrap(out, r, device)
  end

  defp fourier(out, t, opts, nx_op), do: NxMlx.Fallback.run(nx_op, [out, t, opts], op_device([t]))

  # As Nx: values (real and imaginary parts of complex ones) within eps of zero become zero.
  defp clean_small(_op, r, nil, _complex?, _device), do: r

  defp clean_small(op, r, eps, complex?, device) do
    zero = scalar_ref(0, {:f, 32}, device)
    tolerance = scalar_ref(eps, {:f, 32}, device)

    clean = fn part ->
      small = op.(:binary, [:less_equal, op.(:unary, [:abs, part]), tolerance])
      op.(:select, [small, zero, part])
    end

    if complex? do
      re = clean.(op.(:unary, [:real, r]))
      im = clean.(op.(:unary, [:imag, r]))
      i = scalar_ref(Complex.new(0.0, 1.0), {:c, 64}, device)
      op.(:binary, [:add, op.(:astype, [re, :c64]), op.(:binary, [:multiply, im, i])])
    else
      clean.(r)
    end
  end

  # The FFT2/IFFT2/RFFT/IRFFT blocks: one n-dimensional MLX transform.
  defp fourier_block(kind, %T{} = out, %T{} = t, lengths, axes, eps) do
    device = op_device([t])
    op = op_fn(device, kind, [t])
    x = ref_as(t, if(kind == :rfft, do: {:f, 32}, else: {:c, 64}), device)
    r = op.(:fftn, [kind, x, lengths, axes])
    wrap(out, clean_small(op, r, eps, kind != :irfft, device), device)
  end

  ## Convolution

  @impl true
  def conv(%T{type: {kind, size}} = out, %T{} = t, %T{} = k, opts)
      when kind in [:f, :bf] and size <= 32 do
    # MLX's GPU convolution gives wrong results with input dilation (seen on CUDA).
    gpu_dilation? = op_device([t, k]) == :gpu and Enum.any?(opts[:input_dilation], &(&1 != 1))

    if opts[:batch_group_size] != 1 or gpu_dilation? or
         Enum.any?(opts[:padding], fn {lo, hi} -> lo < 0 or hi < 0 end) do
      NxMlx.Fallback.run(:conv, [out, t, k, opts], op_device([t, k]))
    else
      native_conv(out, t, k, opts)
    end
  end

  def conv(out, t, k, opts), do: NxMlx.Fallback.run(:conv, [out, t, k, opts], op_device([t, k]))

  # Nx's layout is {batch, channels, spatial...} for the input, {filters, channels / groups,
  # spatial...} for the kernel and {batch, filters, spatial...} for the output, each reached
  # through its permutation option; MLX's is channels last.
  defp native_conv(%T{type: type} = out, t, k, opts) do
    device = op_device([t, k])
    op = op_fn(device, :conv, [t, k])
    rank = tuple_size(t.shape)
    spatial = Enum.to_list(2..(rank - 1)//1)
    to_channels_last = [0 | spatial] ++ [1]

    x = op.(:transpose, [ref_as(t, type, device), opts[:input_permutation]])
    w = op.(:transpose, [ref_as(k, type, device), opts[:kernel_permutation]])
    x = op.(:transpose, [x, to_channels_last])
    w = op.(:transpose, [w, to_channels_last])

    r =
      op.(:conv, [
        x,
        w,
        opts[:strides],
        Enum.map(opts[:padding], &elem(&1, 0)),
        Enum.map(opts[:padding], &elem(&1, 1)),
        opts[:kernel_dilation],
        opts[:input_dilation],
        opts[:feature_group_size]
      ])

    # Back to {batch, filters, spatial...}, then to the requested output layout.
    r = op.(:transpose, [r, [0, rank - 1 | Enum.to_list(1..(rank - 2)//1)]])

    inverse =
      opts[:output_permutation] |> Enum.with_index() |> Enum.sort() |> Enum.map(&elem(&1, 1))

    wrap(out, op.(:transpose, [r, inverse]), device)
  end

  ## dot

  @impl true
  def dot(%T{type: {kind, _}} = out, left, c1, b1, right, c2, b2) when kind in [:f, :bf, :c] do
    device = op_device([left, right])
    l = ref_as(left, out.type, device)
    r = ref_as(right, out.type, device)

    ref =
      if b1 == [] do
        call(device, :tensordot, [l, r, c1, c2], :dot, [left, right])
      else
        batched_dot(device, out, {l, left, c1, b1}, {r, right, c2, b2})
      end

    wrap(out, ref, device)
  end

  # Integers: MLX's matmul has no integer kernels, so multiply with broadcasting and sum
  # over the contracted axis (wrapping as Nx does), up to @int_dot_elements products (the
  # size of the intermediate array); larger integer dots fall back.
  @int_dot_elements 16_777_216
  def dot(%T{type: {kind, _}} = out, left, c1, b1, right, c2, b2) when kind in [:s, :u] do
    {b, m, k, n} = dot_sizes(left, c1, b1, right, c2, b2)

    if b * m * k * n <= @int_dot_elements do
      device = op_device([left, right])
      op = op_fn(device, :dot, [left, right])

      {l, r} =
        dot_operands(
          op,
          {ref_as(left, out.type, device), left, c1, b1},
          {ref_as(right, out.type, device), right, c2, b2}
        )

      l = op.(:reshape, [l, [b, m, k, 1]])
      r = op.(:reshape, [r, [b, 1, k, n]])
      # MLX sums narrow integers in a wider type: back to the output type (wrapping).
      p = op.(:reduce, [:sum, op.(:binary, [:multiply, l, r]), [2], false])
      p = op.(:astype, [p, Types.to_mlx(out.type)])
      wrap(out, op.(:reshape, [p, Tuple.to_list(out.shape)]), device)
    else
      NxMlx.Fallback.run(:dot, [out, left, c1, b1, right, c2, b2], op_device([left, right]))
    end
  end

  def dot(out, left, c1, b1, right, c2, b2) do
    NxMlx.Fallback.run(:dot, [out, left, c1, b1, right, c2, b2], op_device([left, right]))
  end

  defp dot_sizes(left, c1, b1, right, c2, b2) do
    size = fn t, axes -> Enum.reduce(axes, 1, &(elem(t.shape, &1) * &2)) end
    free1 = axes_except(left, c1 ++ b1)
    free2 = axes_except(right, c2 ++ b2)
    {size.(left, b1), size.(left, free1), size.(left, c1), size.(right, free2)}
  end

  # Batched dot as one matmul: left -> [batch..., free..., contract...] reshaped to
  # [B, M, K]; right -> [batch..., contract..., free...] reshaped to [B, K, N]. Nx orders the
  # output as batch, then left's free axes, then right's.
  defp batched_dot(device, out, left_operand, right_operand) do
    op = op_fn(device, :dot, [elem(left_operand, 1), elem(right_operand, 1)])
    {l, r} = dot_operands(op, left_operand, right_operand)
    p = op.(:matmul, [l, r])
    op.(:reshape, [p, Tuple.to_list(out.shape)])
  end

  # The operands as [batch..., M, K] and [batch..., K, N] arrays. The batch axes are kept
  # apart (MLX's matmul takes any number of them): merging them would force a copy of an
  # operand that is a transposed view, such as attention's heads.
  defp dot_operands(op, {l, left, c1, b1}, {r, right, c2, b2}) do
    free1 = axes_except(left, c1 ++ b1)
    free2 = axes_except(right, c2 ++ b2)
    {_b, m, k, n} = dot_sizes(left, c1, b1, right, c2, b2)
    batch = Enum.map(b1, &elem(left.shape, &1))
    l = op.(:reshape, [transposed(op, l, b1 ++ free1 ++ c1), batch ++ [m, k]])
    r = op.(:reshape, [transposed(op, r, b2 ++ c2 ++ free2), batch ++ [k, n]])
    {l, r}
  end

  defp transposed(op, ref, perm) do
    if perm == Enum.to_list(0..(length(perm) - 1)//1), do: ref, else: op.(:transpose, [ref, perm])
  end

  defp axes_except(t, axes), do: Enum.reject(0..(Nx.rank(t) - 1)//1, &(&1 in axes))

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
  defguardp u64_with_signed(ta, tb)
            when (ta == {:u, 64} and elem(tb, 0) == :s) or (tb == {:u, 64} and elem(ta, 0) == :s)

  for {nx_op, mlx_op} <- @same_type_binary do
    @impl true
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
    @impl true
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

  defp pow_steps(%T{data: %__MODULE__{}}, bits), do: bits

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
    @impl true
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
  defp u64_signed_mask(op, mlx_op, a, b) do
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

  defp binary_op(out, a, b, nx_op, mlx_op) do
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

  defp known_value(%T{data: %__MODULE__{value: value}}), do: value

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
    @impl true
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
    @impl true
    def unquote(nx_op)(%T{type: {kind, _}} = out, t) when kind in [:f, :bf] do
      case op_device([t]) do
        :cpu -> unary_op(out, t, unquote(nx_op), unquote(nx_op))
        device -> NxMlx.Fallback.run(unquote(nx_op), [out, t], device)
      end
    end

    def unquote(nx_op)(out, t), do: NxMlx.Fallback.run(unquote(nx_op), [out, t], op_device([t]))
  end

  @impl true
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

  @impl true
  def negate(out, t), do: unary_op(out, t, :negate, :negative)

  @impl true
  # The magnitude of c64 (MLX's abs gives f32 for it, through hypot).
  def abs(%T{type: {:f, 32}} = out, %T{type: {:c, 64}} = t) do
    device = op_device([t])
    wrap(out, call(device, :unary, [:abs, ref!(t, device)], :abs, [t]), device)
  end

  def abs(out, t), do: unary_op(out, t, :abs, :abs)

  defp unary_op(out, t, nx_op, mlx_op) do
    device = op_device([t])
    type = compute_type([t], out.type, device)
    r = call(device, :unary, [mlx_op, ref_as(t, type, device)], nx_op, [t])
    wrap(out, cast_result(r, type, out.type, device, nx_op, [t]), device)
  end

  ## Element-wise: integer, bitwise and logical semantics of Nx

  # Bitwise ops act on integers only (Nx's front end guarantees it).
  for {nx_op, mlx_op} <- [
        bitwise_and: :bitwise_and,
        bitwise_or: :bitwise_or,
        bitwise_xor: :bitwise_xor
      ] do
    @impl true
    def unquote(nx_op)(%T{type: {kind, _}} = out, a, b) when kind in [:s, :u],
      do: binary_op(out, a, b, unquote(nx_op), unquote(mlx_op))

    def unquote(nx_op)(out, a, b),
      do: NxMlx.Fallback.run(unquote(nx_op), [out, a, b], op_device([a, b]))
  end

  @impl true
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

  @impl true
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

  @impl true
  def left_shift(%T{type: {kind, size}} = out, a, b) when kind in [:s, :u] do
    # Shifting by the type's width or more gives 0 in Nx; MLX masks the count.
    {device, op, ar, br} = binary_inputs(out, a, b, :left_shift)
    too_far = shift_too_far(op, b, size, device)
    shifted = op.(:binary, [:left_shift, ar, br])
    wrap(out, op.(:select, [too_far, op.(:binary, [:subtract, br, br]), shifted]), device)
  end

  def left_shift(out, a, b), do: NxMlx.Fallback.run(:left_shift, [out, a, b], op_device([a, b]))

  @impl true
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
    @impl true
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

  @impl true
  def bitwise_not(%T{type: {kind, _}} = out, t) when kind in [:s, :u],
    do: unary_op(out, t, :bitwise_not, :bitwise_invert)

  def bitwise_not(out, t), do: NxMlx.Fallback.run(:bitwise_not, [out, t], op_device([t]))

  # MLX has no bit-count primitives: both are composed from shifts, masks and adds on the
  # unsigned view of the input (so signed inputs count their two's complement bits).
  @impl true
  def population_count(%T{type: {kind, _}} = out, t) when kind in [:s, :u],
    do: bit_count(out, t, :population_count)

  def population_count(out, t),
    do: NxMlx.Fallback.run(:population_count, [out, t], op_device([t]))

  @impl true
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
    @impl true
    def unquote(nx_op)(out, %T{type: {kind, _}} = t) when kind in [:f, :bf, :s, :u] do
      device = op_device([t])
      op = op_fn(device, unquote(nx_op), [t])
      r = op.(:unary, [unquote(mlx_op), ref!(t, device)])
      wrap(out, op.(:astype, [r, Types.to_mlx(out.type)]), device)
    end

    def unquote(nx_op)(out, t), do: NxMlx.Fallback.run(unquote(nx_op), [out, t], op_device([t]))
  end

  for {nx_op, mlx_op} <- [ceil: :ceil, floor: :floor] do
    @impl true
    def unquote(nx_op)(%T{type: {kind, _}} = out, t) when kind in [:f, :bf],
      do: unary_op(out, t, unquote(nx_op), unquote(mlx_op))

    def unquote(nx_op)(out, t), do: NxMlx.Fallback.run(unquote(nx_op), [out, t], op_device([t]))
  end

  @impl true
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

  @impl true
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
    @impl true
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

  ## Block

  # Native kernels  ## Block

  # Native kernels for the Nx.Block structs MLX serves; every other block runs its default
  # function (made of backend callbacks).
  @linalg_blocks Map.new(
                   [
                     Nx.Block.LinAlg.Cholesky,
                     Nx.Block.LinAlg.Solve,
                     Nx.Block.LinAlg.QR,
                     Nx.Block.LinAlg.Eigh,
                     Nx.Block.LinAlg.SVD,
                     Nx.Block.LinAlg.LU,
                     Nx.Block.LinAlg.Determinant
                   ],
                   &{&1, true}
                 )

  # Nx.top_k partitions (instead of sorting the whole axis) on the CPU device when
  # k * ratio <= the axis size. Measured on 64 rows of 32,000 f32 on 2 cores: 7x faster than
  # sorting for k = 50, 1.6x for k = 16,000, and no slower for k = 32,000.
  @top_k_partition_ratio 2

  @scans %{
    Nx.Block.CumulativeSum => :sum,
    Nx.Block.CumulativeProduct => :prod,
    Nx.Block.CumulativeMax => :max,
    Nx.Block.CumulativeMin => :min
  }

  @impl true
  def block(%mod{axis: axis, reverse: reverse}, %T{type: {kind, _}} = out, [t], _fun)
      when is_map_key(@scans, mod) and kind != :c do
    device = op_device([t])
    op = op_fn(device, :block, [t])
    scan = Map.fetch!(@scans, mod)
    # MLX's max/min scans of f16/bf16 drop NaN (they answer 0.0 past it); f32 keeps it.
    type = if scan in [:max, :min] and half_float?(out.type), do: {:f, 32}, else: out.type
    r = op.(:scan, [scan, ref_as(t, type, device), axis, reverse])
    wrap(out, op.(:astype, [r, Types.to_mlx(out.type)]), device)
  end

  def block(%Nx.Block.LogicalNot{}, out, [%T{type: {kind, _}} = t], _fun) when kind != :c do
    device = op_device([t])
    op = op_fn(device, :logical_not, [t])
    r = op.(:unary, [:logical_not, op.(:astype, [ref!(t, device), :bool])])
    wrap(out, op.(:astype, [r, Types.to_mlx(out.type)]), device)
  end

  def block(%Nx.Block.Phase{}, %T{type: {:f, 32}} = out, [%T{type: {:c, 64}} = t], _fun) do
    device = op_device([t])
    op = op_fn(device, :phase, [t])
    z = ref!(t, device)
    wrap(out, op.(:binary, [:arctan2, op.(:unary, [:imag, z]), op.(:unary, [:real, z])]), device)
  end

  def block(%Nx.Block.AllClose{} = o, out, [%T{type: {ka, _}} = a, %T{type: {kb, _}} = b], _fun)
      when ka in [:f, :bf] or kb in [:f, :bf] do
    all_close(out, a, b, o)
  end

  def block(%mod{eps: eps, lengths: lengths, axes: axes}, %T{type: {:c, 64}} = out, [t], _fun)
      when mod in [Nx.Block.FFT2, Nx.Block.IFFT2] do
    kind = if mod == Nx.Block.FFT2, do: :fft, else: :ifft
    fourier_block(kind, out, t, lengths, axes, eps)
  end

  def block(%Nx.Block.RFFT{} = s, %T{type: {:c, 64}} = out, [%T{type: {k, _}} = t], _fun)
      when k != :c do
    fourier_block(:rfft, out, t, [s.length], [s.axis], s.eps)
  end

  def block(%Nx.Block.IRFFT{} = s, %T{type: {:f, 32}} = out, [%T{type: {:c, 64}} = t], _fun) do
    fourier_block(:irfft, out, t, [s.length], [s.axis], s.eps)
  end

  def block(%Nx.Block.Take{axis: axis}, out, [t, %T{type: {ik, _}} = indices], _fun)
      when ik in [:s, :u] do
    take_block(:take, out, t, indices, axis)
  end

  def block(%Nx.Block.TakeAlongAxis{axis: axis}, out, [t, %T{type: {ik, _}} = indices], _fun)
      when ik in [:s, :u] do
    take_block(:take_along_axis, out, t, indices, axis)
  end

  def block(%Nx.Block.TopK{k: k}, {values, indices}, [%T{type: {kind, _}} = t], _fun)
      when kind != :c do
    top_k(values, indices, t, k)
  end

  def block(%mod{} = struct, output, args, fun) when is_map_key(@linalg_blocks, mod) do
    if Application.get_env(:nx_mlx, :linalg, :nx) == :lapack and
         linalg_native?(struct, output, args),
       do: linalg_block(struct, output, args),
       else: default_block(struct, args, fun)
  end

  def block(struct, _output, args, fun), do: default_block(struct, args, fun)

  # A block's default function creates tensors (constants, iotas, eyes) on the process's
  # default backend: run it with this backend, on the inputs' device, as the default, so
  # that those tensors meet the inputs here instead of on Nx.BinaryBackend.
  defp default_block(struct, args, fun) do
    device = op_device(List.flatten(Enum.map(args, &block_tensors/1)))
    Nx.with_default_backend({__MODULE__, device: device}, fn -> apply(fun, [struct | args]) end)
  end

  defp block_tensors(%T{} = t), do: [t]

  defp block_tensors(tuple) when is_tuple(tuple),
    do: Enum.flat_map(Tuple.to_list(tuple), &block_tensors/1)

  defp block_tensors(list) when is_list(list), do: Enum.flat_map(list, &block_tensors/1)
  defp block_tensors(_), do: []

  # Nx.take / Nx.take_along_axis: one MLX take (take_along_axis), indices clamped into the
  # axis as Nx's gather clamps them (checked instead with debug_bounds_check).
  defp take_block(nx_op, out, %T{shape: shape} = t, %T{} = indices, axis) do
    device = op_device([t, indices])
    op = op_fn(device, nx_op, [t, indices])
    dim = axis_size!(t, axis, nx_op)
    {idx, ok} = clamp_index(op, ref!(indices, device), indices.type, dim, device)

    if @debug_bounds_check,
      do: check_bounds!(op, ok, tuple_size(indices.shape), nx_op, indices, shape)

    wrap(out, op.(nx_op, [ref_as(t, out.type, device), idx, axis]), device)
  end

  # Nx.top_k along the last axis: Nx's answer is the first k of a stable descending argsort
  # (NaN first, ties in index order), values taken along the axis with them. On the CPU
  # device, when k is at most half the axis, a partition finds the k-th largest value in
  # linear time and only the k chosen entries are sorted; MLX's GPU partition is a full sort,
  # so the GPU device always sorts.
  defp top_k(values, indices, %T{shape: shape} = t, k) do
    device = op_device([t])
    op = op_fn(device, :top_k, [t])
    axis = tuple_size(shape) - 1
    n = elem(shape, axis)
    ref = ref_as(t, values.type, device)

    idx =
      if device == :cpu and k * @top_k_partition_ratio <= n do
        top_k_partitioned(op, ref, t.type, shape, k, device)
      else
        dims = Tuple.to_list(shape)
        idx = argsort_ref(op, ref, axis, n, :desc, {:s, 32}, device)
        op.(:slice, [idx, zeros(dims), List.replace_at(dims, axis, k), ones(dims)])
      end

    idx = op.(:astype, [idx, Types.to_mlx(indices.type)])
    {wrap(values, op.(:take_along_axis, [ref, idx, axis]), device), wrap(indices, idx, device)}
  end

  # The positions (s32) of Nx's top k along the last axis, through a partition: with t the
  # k-th largest value, every entry above t is taken and then the entries equal to t in index
  # order until there are k; those k positions, kept in index order, are sorted stably.
  defp top_k_partitioned(op, ref, type, shape, k, device) do
    dims = Tuple.to_list(shape)
    axis = length(dims) - 1
    key = order_key(op, ref, type, device)
    kth = op.(:reduce, [:min, op.(:topk, [key, k, axis]), [axis], true])
    above = op.(:binary, [:greater, key, kth])
    at = op.(:binary, [:equal, key, kth])

    s32 = Types.to_mlx({:s, 32})
    count = fn mask -> op.(:scan, [:sum, op.(:astype, [mask, s32]), axis, false]) end
    above_count = op.(:reduce, [:sum, op.(:astype, [above, s32]), [axis], true])
    wanted = op.(:binary, [:subtract, scalar_ref(k, {:s, 32}, device), above_count])
    tied = op.(:binary, [:logical_and, at, op.(:binary, [:less_equal, count.(at), wanted])])
    chosen = op.(:binary, [:logical_or, above, tied])

    # Each chosen position goes to its slot (its rank among the chosen); the others to a
    # spare slot k, cut off afterwards.
    slot = op.(:binary, [:subtract, count.(chosen), scalar_ref(1, {:s, 32}, device)])
    slot = op.(:select, [chosen, slot, scalar_ref(k, {:s, 32}, device)])
    line = List.duplicate(1, axis) ++ [elem(shape, axis)]

    positions =
      op.(:broadcast_to, [op.(:reshape, [index_range(op, elem(shape, axis)), line]), dims])

    spare_dims = List.replace_at(dims, axis, k + 1)
    empty = op.(:full, [spare_dims, 0.0, s32])
    chosen_positions = op.(:put_along_axis, [empty, slot, positions, axis])

    chosen_positions =
      op.(:slice, [chosen_positions, zeros(dims), List.replace_at(dims, axis, k), ones(dims)])

    order =
      argsort_ref(
        op,
        op.(:take_along_axis, [key, chosen_positions, axis]),
        axis,
        k,
        :desc,
        {:s, 32},
        device
      )

    op.(:take_along_axis, [chosen_positions, order, axis])
  end

  # An integer array ordered as Nx orders `ref`'s values: integers as they are; floats through
  # their bits (sign-magnitude turned into two's complement order), -0.0 equal to 0.0 and
  # every NaN above infinity.
  defp order_key(_op, ref, {kind, _}, _device) when kind in [:s, :u], do: ref

  defp order_key(op, ref, {_, bits}, device) do
    {float, int} = if bits == 64, do: {{:f, 64}, {:s, 64}}, else: {{:f, 32}, {:s, 32}}
    max = Bitwise.bsl(1, elem(int, 1) - 1) - 1
    x = op.(:astype, [ref, Types.to_mlx(float)])
    zero = scalar_ref(0.0, float, device)
    x = op.(:select, [op.(:binary, [:equal, x, zero]), zero, x])
    b = op.(:view, [x, Types.to_mlx(int)])
    max_ref = scalar_ref(max, int, device)
    negative = op.(:binary, [:less, b, scalar_ref(0, int, device)])
    key = op.(:select, [negative, op.(:binary, [:bitwise_xor, b, max_ref]), b])
    op.(:select, [op.(:unary, [:isnan, x]), max_ref, key])
  end

  # Nx.all_close with a floating-point input, as Nx computes it: |a - b| <= atol + rtol * |b|
  # where both are finite, equality where either is infinite, and NaN equal to NaN only with
  # :equal_nan. (Integer inputs take the default function: Nx's integer arithmetic wraps.)
  defp all_close(out, a, b, %Nx.Block.AllClose{rtol: rtol, atol: atol, equal_nan: equal_nan}) do
    device = op_device([a, b])
    op = op_fn(device, :all_close, [a, b])
    type = Nx.Type.merge(a.type, b.type)
    x = ref_as(a, type, device)
    y = ref_as(b, type, device)
    bin = fn name, l, r -> op.(:binary, [name, l, r]) end
    un = fn name, v -> op.(:unary, [name, v]) end

    tolerance =
      bin.(
        :add,
        scalar_ref(atol, type, device),
        bin.(:multiply, scalar_ref(rtol, type, device), un.(:abs, y))
      )

    finite = bin.(:less_equal, un.(:abs, bin.(:subtract, x, y)), tolerance)
    either_inf = bin.(:logical_or, un.(:isinf, x), un.(:isinf, y))
    close = op.(:select, [either_inf, bin.(:equal, x, y), finite])

    close =
      if equal_nan,
        do: bin.(:logical_or, close, bin.(:logical_and, un.(:isnan, x), un.(:isnan, y))),
        else: close

    axes = Enum.to_list(0..(tuple_size(close_shape(a, b)) - 1)//1)
    r = op.(:reduce, [:all, close, axes, false])
    wrap(out, op.(:astype, [r, Types.to_mlx(out.type)]), device)
  end

  defp close_shape(%T{shape: a, names: na}, %T{shape: b, names: nb}),
    do: Nx.Shape.binary_broadcast(a, na, b, nb) |> elem(0)

  @impl true
  def to_batched(%T{shape: batch_shape} = out, %T{shape: shape} = t, opts) do
    device = op_device([t])
    op = op_fn(device, :to_batched, [t])
    ref = ref!(t, device)
    batch = elem(batch_shape, 0)
    size = elem(shape, 0)
    full = div(size, batch)
    last = if rem(size, batch) != 0 and opts[:leftover] == :repeat, do: full, else: full - 1
    dims = Tuple.to_list(shape)

    rows = fn from, to ->
      op.(:slice, [ref, [from | tl(zeros(dims))], [to | tl(dims)], ones(dims)])
    end

    Stream.map(0..last//1, fn
      ^full ->
        # The leftover rows, completed with the first ones (leftover: :repeat).
        tail = rows.(full * batch, size)
        wrap(out, op.(:concatenate, [[tail, rows.(0, batch - (size - full * batch))], 0]), device)

      i ->
        wrap(out, rows.(i * batch, (i + 1) * batch), device)
    end)
  end

  defp half_float?(type), do: type in [{:f, 16}, {:bf, 16}]

  defp zeros(dims), do: List.duplicate(0, length(dims))
  defp ones(dims), do: List.duplicate(1, length(dims))

  ## Linear algebra: LAPACK through MLX, which runs it on CPU streams only (GPU tensors are
  ## copied to the CPU device and the results back).

  @impl true
  def triangular_solve(%T{type: {k, _}} = out, %T{type: {ka, _}} = a, %T{type: {kb, _}} = b, opts)
      when k in [:f, :bf] and ka != :c and kb != :c do
    rank = tuple_size(a.shape)
    vector? = tuple_size(b.shape) == rank - 1
    # :conjugate is :none on real matrices. X op(A) = B is solved as op(A)^T X^T = B^T.
    transpose_a? = opts[:transform_a] == :transpose != not opts[:left_side]
    upper = if transpose_a?, do: opts[:lower], else: not opts[:lower]

    [x] =
      linalg(:triangular_solve, [out], [a, b], {:f, 64}, fn [a_ref, b_ref], op ->
        swap = &op.(:transpose, [&1, swap_last_two(rank)])
        a_ref = if transpose_a?, do: swap.(a_ref), else: a_ref

        if vector? do
          b_ref = op.(:reshape, [b_ref, Tuple.to_list(b.shape) ++ [1]])
          x = op.(:linalg, [:solve_triangular, a_ref, b_ref, upper])
          [op.(:reshape, [x, Tuple.to_list(out.shape)])]
        else
          b_ref = if opts[:left_side], do: b_ref, else: swap.(b_ref)
          x = op.(:linalg, [:solve_triangular, a_ref, b_ref, upper])
          [if(opts[:left_side], do: x, else: swap.(x))]
        end
      end)

    x
  end

  def triangular_solve(out, a, b, opts),
    do: NxMlx.Fallback.run(:triangular_solve, [out, a, b, opts], op_device([a, b]))

  defp swap_last_two(rank),
    do: Enum.to_list(0..(rank - 3)//1) ++ [rank - 1, rank - 2]

  # MLX's LAPACK takes real f32 and f64; QR in :complete mode of a tall matrix (MLX has the
  # reduced one only) and complex inputs take the default function.
  defp linalg_native?(struct, output, args) do
    outputs = if is_tuple(output), do: Tuple.to_list(output), else: [output]

    Enum.all?(args, fn %T{type: {k, _}} -> k != :c end) and
      Enum.all?(outputs, fn %T{type: {k, _}} -> k != :c end) and
      case struct do
        %Nx.Block.LinAlg.QR{} ->
          {%T{shape: q}, _} = output
          [m, n] = Enum.take(Tuple.to_list(hd(args).shape), -2)
          elem(q, tuple_size(q) - 1) == min(m, n)

        _ ->
          true
      end
  end

  defp linalg_block(%Nx.Block.LinAlg.Cholesky{}, out, [t]) do
    [l] =
      linalg(:cholesky, [out], [t], fn [a], op -> [op.(:linalg, [:cholesky, a, a, false])] end)

    l
  end

  defp linalg_block(%Nx.Block.LinAlg.Determinant{}, out, [t]) do
    [d] = linalg(:determinant, [out], [t], fn [a], op -> [op.(:linalg, [:det, a, a, false])] end)
    d
  end

  defp linalg_block(%Nx.Block.LinAlg.Solve{}, out, [a, b]) do
    vector? = tuple_size(b.shape) < tuple_size(a.shape)

    [x] =
      linalg(:solve, [out], [a, b], fn [a_ref, b_ref], op ->
        b_ref = if vector?, do: op.(:reshape, [b_ref, Tuple.to_list(b.shape) ++ [1]]), else: b_ref
        x = op.(:linalg, [:solve, a_ref, b_ref, false])
        [op.(:reshape, [x, Tuple.to_list(out.shape)])]
      end)

    x
  end

  defp linalg_block(%Nx.Block.LinAlg.QR{}, {_, _} = out, [t]) do
    List.to_tuple(
      linalg(:qr, Tuple.to_list(out), [t], fn [a], op -> op.(:decompose, [:qr, a]) end)
    )
  end

  defp linalg_block(%Nx.Block.LinAlg.Eigh{}, {_, _} = out, [t]) do
    # MLX orders eigenvalues ascending; Nx descending.
    rank = tuple_size(t.shape)
    n = elem(t.shape, rank - 1)

    linalg(:eigh, Tuple.to_list(out), [t], fn [a], op ->
      [w, v] = op.(:decompose, [:eigh, a])
      [reverse_axis(op, w, rank - 2, n), reverse_axis(op, v, rank - 1, n)]
    end)
    |> List.to_tuple()
  end

  defp linalg_block(%Nx.Block.LinAlg.SVD{}, {%T{shape: u_shape}, _, %T{shape: vt_shape}} = out, [
         t
       ]) do
    linalg(:svd, Tuple.to_list(out), [t], fn [a], op ->
      [u, s, vt] = op.(:decompose, [:svd, a])
      [leading(op, u, u_shape), s, leading(op, vt, vt_shape)]
    end)
    |> List.to_tuple()
  end

  defp linalg_block(%Nx.Block.LinAlg.LU{}, {%T{shape: p_shape}, _, _} = out, [t]) do
    rank = tuple_size(p_shape)
    n = elem(p_shape, rank - 1)

    linalg(:lu, Tuple.to_list(out), [t], fn [a], op ->
      [pivots, l, u] = op.(:decompose, [:lu, a])
      # Row r of a is row pivots[r] of l u, so a = p l u with p[r][i] = (pivots[r] == i).
      cols = op.(:reshape, [op.(:arange, [0.0, n / 1, 1.0, :u32]), [1, n]])
      batch = Enum.take(Tuple.to_list(p_shape), rank - 2)
      rows = op.(:reshape, [pivots, batch ++ [n, 1]])
      [op.(:binary, [:equal, rows, cols]), l, u]
    end)
    |> List.to_tuple()
  end

  # The leading block of `ref` with the shape of `shape` (full to reduced SVD factors).
  defp leading(op, ref, shape) do
    dims = Tuple.to_list(shape)
    op.(:slice, [ref, List.duplicate(0, length(dims)), dims, List.duplicate(1, length(dims))])
  end

  # Runs `fun.(refs, op)` on the CPU device, with `inputs` converted to the type LAPACK takes
  # (f64 for f64 outputs, else f32), and returns `outputs` holding its results (converted to
  # their types) on the inputs' device. Solutions are evaluated here, so that a singular
  # matrix raises the ArgumentError Nx raises.
  defp linalg(nx_op, outputs, inputs, fun) do
    type = if Enum.any?(outputs, &(&1.type == {:f, 64})), do: {:f, 64}, else: {:f, 32}
    linalg(nx_op, outputs, inputs, type, fun)
  end

  defp linalg(nx_op, outputs, inputs, type, fun) do
    device = op_device(inputs)
    op = op_fn(:cpu, nx_op, inputs)

    refs =
      Enum.map(inputs, fn
        %T{data: %__MODULE__{device: :gpu}} = t ->
          ref_as(backend_transfer_in(t, :cpu), type, :cpu)

        t ->
          ref_as(t, type, :cpu)
      end)

    outputs
    |> Enum.zip_with(fun.(refs, op), fn out, r ->
      r = op.(:astype, [r, Types.to_mlx(out.type)])
      {out, r}
    end)
    |> tap(fn results ->
      # Eagerly a singular system is reported here; in a compiled program (registers) it
      # fails when the program runs.
      if nx_op in [:solve, :triangular_solve] and
           not Enum.any?(results, &match?({_, {:reg, _}}, &1)),
         do: evaluate_linalg!(nx_op, inputs, Enum.map(results, &elem(&1, 1)))
    end)
    |> Enum.map(fn {out, r} ->
      t = wrap(out, r, :cpu)
      if device == :gpu, do: backend_transfer_in(t, :gpu), else: t
    end)
  end

  defp evaluate_linalg!(nx_op, inputs, refs) do
    Enum.each(refs, &Runtime.call(:eval, [&1], fn -> describe(nx_op, inputs) end))
  rescue
    NxMlx.NIFError ->
      # Nx's message; MLX fails only on an exactly singular triangular factor here.
      reraise ArgumentError, "can't solve for singular matrix", __STACKTRACE__
  end

  ## Everything else runs on Nx.BinaryBackend (see "Fallbacks" above).

  @impl true
  def from_pointer(_pointer, _type, _shape, _opts, _keyword) do
    raise ArgumentError, "NxMlx.Backend.from_pointer is not supported"
  end

  @impl true
  def to_pointer(_tensor, _opts) do
    raise ArgumentError, "NxMlx.Backend.to_pointer is not supported"
  end

  for {name, arity} <- Nx.Backend.behaviour_info(:callbacks),
      not Module.defines?(__MODULE__, {name, arity}) do
    args = Macro.generate_arguments(arity, __MODULE__)

    @impl true
    def unquote(name)(unquote_splicing(args)) do
      [_out | inputs] = unquote(args)
      NxMlx.Fallback.run(unquote(name), unquote(args), op_device(List.flatten(inputs)))
    end
  end
end
