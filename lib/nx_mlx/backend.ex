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
      returns pi. `pow(NaN, 0)` is 1 (IEEE 754, C's `pow`, EXLA); `Nx.BinaryBackend`
      returns NaN. `all` of a complex tensor holding 0+0i is 0; `Nx.BinaryBackend` counts
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
    * Conversions to bf16 round to nearest, ties to even (as MLX, EXLA and PyTorch);
      `Nx.BinaryBackend` truncates. One visible consequence: Nx 0.13.1's
      `Nx.Random.normal(key, type: :bf16)` takes its lower bound from the f16 encoding
      (-0.99951171875), which rounds to -1.0 in bf16, so `erf_inv` of it gives -Inf (401 of
      50,000 values of `Nx.Random.normal(Nx.Random.key(1), shape: {50_000}, type: :bf16)`;
      none on `Nx.BinaryBackend`, where the bound truncates to -0.99609375). Sample bf16
      normals in f32 and convert: `Nx.Random.normal(key, shape: s) |> then(fn {t, k} ->
      {Nx.as_type(t, :bf16), k} end)`.
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
  `erf(1e-7)` = 0, f64 no more accurate than f32) and its `rsqrt` is off by 1.5 ulp, it
  has no `erfc` or `cbrt`, and its `tanh` and `log`, though accurate, run on one thread
  (100 and 72 ms over 16M f32): for these the binding runs kernels of its own on CPU streams,
  which compute in double with the C library, round once, and split large arrays over the
  cores; f32 `exp`, `sigmoid`, `tanh`, `log` and `erf` use vectorised double-precision
  polynomials instead (within 1 ulp, tested over every 97th f32 bit pattern in
  native/mlx-bind/tests/cpu_kernels.rs; erf's coefficients come from scripts/fit-erf).
  f32 sums over the last axis accumulate in double; f32 max/min over trailing axes and the
  compiler's f32 softmax, exact GELU and layer norm run threaded, vectorised kernels with Nx's
  NaN semantics (the GELU within 1 ulp of the exact value, its negative tail included; layer
  norm's mean and variance in double). On the
  GPU (an H200, MLX's CUDA kernels) the same functions measured within
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
  # `quant`: the parts of a quantized tensor (NxMlx.Quantized), whose `ref` is nil.
  defstruct [:ref, :device, :value, :quant]

  @type t :: %__MODULE__{
          ref: reference() | nil,
          device: :cpu | :gpu,
          value: number() | atom() | nil,
          quant: NxMlx.Quantized.t() | nil
        }

  @impl true
  def init(opts) do
    Keyword.validate!(opts, [:device])

    case Keyword.get(opts, :device) do
      nil -> [device: NxMlx.default_device()]
      device when device in [:cpu, :gpu] -> [device: device]
      other -> raise ArgumentError, "NxMlx.Backend: unknown device #{inspect(other)}"
    end
  end

  # The op table: the concern module (NxMlx.Backend.<Concern>) that implements each callback. An op's Nx semantics (the
  # MLX ops it maps to, the fix-ups where MLX differs from Nx, when it falls back) is written
  # once there, as calls of the NIF's ops through NxMlx.Backend.Core. Eagerly those calls build
  # MLX arrays; while NxMlx.Compiler lowers a defn the same calls are recorded into its program
  # (see NxMlx.Compiler.Recorder), so the compiler has no op table of its own. A callback not
  # listed here runs on Nx.BinaryBackend.
  @ops [
    {:Creation,
     [
       backend_copy: 3,
       backend_deallocate: 1,
       backend_transfer: 3,
       constant: 3,
       eye: 2,
       from_binary: 3,
       inspect: 2,
       iota: 3,
       to_binary: 2
     ]},
    {:Shape,
     [
       as_type: 2,
       broadcast: 4,
       concatenate: 3,
       pad: 4,
       put_slice: 4,
       reshape: 2,
       reverse: 3,
       select: 4,
       slice: 5,
       squeeze: 3,
       stack: 3,
       transpose: 3
     ]},
    {:Indexing, [gather: 4, indexed_add: 5, indexed_put: 5]},
    {:Windows,
     [
       window_max: 4,
       window_min: 4,
       window_product: 4,
       window_scatter_max: 6,
       window_scatter_min: 6,
       window_sum: 4
     ]},
    {:Elementwise,
     [
       abs: 2,
       acos: 2,
       acosh: 2,
       add: 3,
       asin: 2,
       asinh: 2,
       atan: 2,
       atan2: 3,
       atanh: 2,
       bitcast: 2,
       cbrt: 2,
       conjugate: 2,
       cos: 2,
       cosh: 2,
       divide: 3,
       equal: 3,
       erf: 2,
       erf_inv: 2,
       erfc: 2,
       exp: 2,
       expm1: 2,
       greater: 3,
       greater_equal: 3,
       imag: 2,
       less: 3,
       less_equal: 3,
       log: 2,
       log1p: 2,
       max: 3,
       min: 3,
       multiply: 3,
       negate: 2,
       not_equal: 3,
       pow: 3,
       real: 2,
       rsqrt: 2,
       sigmoid: 2,
       sign: 2,
       sin: 2,
       sinh: 2,
       sqrt: 2,
       subtract: 3,
       tan: 2,
       tanh: 2
     ]},
    {:Integer,
     [
       bitwise_and: 3,
       bitwise_not: 2,
       bitwise_or: 3,
       bitwise_xor: 3,
       ceil: 2,
       clip: 4,
       count_leading_zeros: 2,
       floor: 2,
       is_infinity: 2,
       is_nan: 2,
       left_shift: 3,
       logical_and: 3,
       logical_or: 3,
       logical_xor: 3,
       population_count: 2,
       quotient: 3,
       remainder: 3,
       right_shift: 3,
       round: 2
     ]},
    {:Reductions,
     [
       all: 3,
       any: 3,
       argmax: 3,
       argmin: 3,
       argsort: 3,
       product: 3,
       reduce_max: 3,
       reduce_min: 3,
       sort: 3,
       sum: 3
     ]},
    {:FFT, [fft: 3, ifft: 3]},
    {:DotConv, [conv: 4, dot: 7]},
    {:LinAlg, [triangular_solve: 4]},
    {:Blocks, [block: 4, to_batched: 3]}
  ]

  for {concern, callbacks} <- @ops, {name, arity} <- callbacks do
    module = Module.concat(__MODULE__, concern)
    args = Macro.generate_arguments(arity, __MODULE__)

    @impl true
    def unquote(name)(unquote_splicing(args)),
      do: unquote(module).unquote(name)(unquote_splicing(args))
  end

  @doc false
  # The op table, for its tests.
  def __ops__, do: @ops

  @impl true
  def from_pointer(_pointer, _type, _shape, _opts, _keyword) do
    raise ArgumentError, "NxMlx.Backend.from_pointer is not supported"
  end

  @impl true
  def to_pointer(_tensor, _opts) do
    raise ArgumentError, "NxMlx.Backend.to_pointer is not supported"
  end

  # Everything else runs on Nx.BinaryBackend (see "Fallbacks" above).
  for {name, arity} <- Nx.Backend.behaviour_info(:callbacks),
      not Module.defines?(__MODULE__, {name, arity}) do
    args = Macro.generate_arguments(arity, __MODULE__)

    @impl true
    def unquote(name)(unquote_splicing(args)) do
      [_out | inputs] = unquote(args)

      NxMlx.Fallback.run(
        unquote(name),
        unquote(args),
        NxMlx.Backend.Core.op_device(List.flatten(inputs))
      )
    end
  end
end
