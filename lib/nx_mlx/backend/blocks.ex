defmodule NxMlx.Backend.Blocks do
  @moduledoc false
  # NxMlx.Backend.block/4: MLX's native kernels for the Nx.Block structs it serves, the
  # default function for the rest.

  import NxMlx.Backend.Core
  import NxMlx.Backend.Indexing, only: [clamp_index: 5]
  import NxMlx.Backend.Reductions, only: [argsort_ref: 7]
  import NxMlx.Backend.FFT, only: [fourier_block: 6]
  import NxMlx.Backend.LinAlg, only: [linalg_block: 3, linalg_native?: 3]

  alias Nx.Tensor, as: T
  alias NxMlx.Types

  @debug_bounds_check Application.compile_env(:nx_mlx, :debug_bounds_check, false)

  ## Block

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

  @doc false
  # exp(t - max) / sum(exp(t - max)) over `axes` (normalized) as one softmax op: MLX's fused
  # kernel over the last axis (f16/bf16 accumulated in f32 and rounded once), or on the CPU,
  # for f32 over the trailing axes, ours (threaded, exp and sum in double). The compiler's
  # rewrite of the composed form (NxMlx.Compiler.Patterns) emits it.
  def softmax(%T{type: type} = out, %T{type: type} = t, axes) when is_list(axes) do
    device = op_device([t])
    op = op_fn(device, :softmax, [t])
    wrap(out, op.(:softmax, [ref!(t, device), axes, true]), device)
  end

  @doc false
  # Whether the one softmax op beats the five composed ones on `device` (the compiler's
  # rewrite asks): on the GPU MLX's fused kernel (0.089 against 0.263 ms over 8x12x512x512
  # bf16 on an H200); on the CPU our kernel for f32 over the trailing axes (native/mlx-bind
  # kernels.cc: 16M f32 in 4096-wide rows, 2 vCPUs: see bench/RESULTS.md), not MLX's CPU
  # softmax, about 3x slower than the composed form.
  def softmax_faster?(:gpu, _t, _axes), do: true

  def softmax_faster?(:cpu, %T{type: {:f, 32}, shape: shape}, axes) do
    rank = tuple_size(shape)
    Enum.sort(axes) == Enum.to_list((rank - length(axes))..(rank - 1)//1)
  end

  def softmax_faster?(_device, _t, _axes), do: false

  @doc false
  # x / 2 * (1 + erf(x / sqrt(2))) (exact GELU) as one op: on the CPU our kernel (f32
  # vectorised, the other float types in double; 1 + erf through erfc in the negative tail,
  # so more accurate than the composed form there), elsewhere MLX's composed ops. The
  # compiler's rewrite of the composed form (NxMlx.Compiler.Patterns) emits it.
  def gelu(%T{type: type} = out, %T{type: type} = t) do
    device = op_device([t])
    op = op_fn(device, :gelu, [t])
    wrap(out, op.(:unary, [:gelu, ref!(t, device)]), device)
  end

  @doc false
  # Whether the one GELU op beats the composed ones (the compiler's rewrite asks): on the CPU
  # for f32, where it is one vectorised pass (16M f32 on 2 vCPUs: see bench/RESULTS.md);
  # elsewhere it is the same composed ops (the GPU's fusion lane fuses either).
  def gelu_faster?(:cpu, %T{type: {:f, 32}}), do: true
  def gelu_faster?(_device, _t), do: false

  @doc false
  # (x - mean) / sqrt(var + eps) * g + b over x's last axis as one op: on the CPU for f32 our
  # kernel (one pass per row, mean and variance in double), elsewhere MLX's fast layer_norm.
  # `g` and `b` hold the last axis's k values (shape {k} or {1, ..., k}). The compiler's
  # rewrite of the composed form (NxMlx.Compiler.Patterns) emits it.
  def layer_norm(%T{type: type} = out, %T{type: type, shape: shape} = x, g, b, eps) do
    device = op_device([x, g, b])
    op = op_fn(device, :layer_norm, [x, g, b])
    k = elem(shape, tuple_size(shape) - 1)

    vector = fn
      %T{shape: {^k}} = t -> ref!(t, device)
      t -> op.(:reshape, [ref!(t, device), [k]])
    end

    wrap(out, op.(:layer_norm, [ref!(x, device), vector.(g), vector.(b), eps / 1]), device)
  end

  @doc false
  # Whether the one layer-norm op beats the composed ones (the compiler's rewrite asks): on
  # the CPU for f32 (a 128x768 block's norm: see bench/RESULTS.md).
  def layer_norm_faster?(:cpu, %T{type: {:f, 32}}), do: true
  def layer_norm_faster?(_device, _t), do: false

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

  # NxMlx.Fast: MLX's fused kernels where they compute what the default function does, for
  # inputs of one float type (f32, f16, bf16: MLX's norm kernels compute in f32, so f64 runs
  # the default); the rest (log-softmax, tanh GELU, SwiGLU, softcap) have no MLX kernel and
  # run their default function (fused by the compiler's fusion lane on the GPU).
  def block(%NxMlx.Fast.RMSNorm{eps: eps} = s, out, [x | rest] = args, fun) do
    if fast_float?(out, args) and fast_native?(op_device(args), :rms_norm, x.type) do
      device = op_device(args)
      op = op_fn(device, :rms_norm, args)
      w = fast_vector(rest, 1.0, x, device, op)
      wrap(out, op.(:rms_norm, [ref!(x, device), w, eps]), device)
    else
      default_block(s, args, fun)
    end
  end

  def block(%NxMlx.Fast.LayerNorm{eps: eps} = s, out, [x | rest] = args, fun) do
    if fast_float?(out, args) do
      device = op_device(args)
      op = op_fn(device, :layer_norm, args)
      {w, b} = if s.weight?, do: {Enum.take(rest, 1), Enum.drop(rest, 1)}, else: {[], rest}
      g = fast_vector(w, 1.0, x, device, op)
      b = fast_vector(b, 0.0, x, device, op)
      wrap(out, op.(:layer_norm, [ref!(x, device), g, b, eps]), device)
    else
      default_block(s, args, fun)
    end
  end

  def block(
        %NxMlx.Fast.Softmax{axis: axis, log?: false},
        %T{type: type} = out,
        [%T{type: type} = x],
        _fun
      )
      when elem(type, 0) in [:f, :bf] do
    softmax(out, x, [axis])
  end

  def block(
        %NxMlx.Fast.Gelu{approximate: :none} = s,
        %T{type: type} = out,
        [%T{type: type} = x],
        fun
      ) do
    if gelu_faster?(op_device([x]), x), do: gelu(out, x), else: default_block(s, [x], fun)
  end

  def block(%NxMlx.Fast.Rope{} = s, out, [x | rest] = args, fun) do
    if fast_float?(out, [x]) and fast_native?(op_device(args), :rope, x.type) do
      device = op_device(args)
      op = op_fn(device, :rope, args)

      {offset, freqs} =
        case {s.offset, rest} do
          {:tensor, [o | f]} -> {ref_as(o, {:s, 32}, device), f}
          {n, f} -> {op.(:full, [[], n / 1, Types.to_mlx({:s, 32})]), f}
        end

      freqs = Enum.map(freqs, &ref!(&1, device))
      base = s.base

      wrap(
        out,
        op.(:rope, [[ref!(x, device), offset | freqs], s.dims, s.traditional, base, s.scale]),
        device
      )
    else
      default_block(s, args, fun)
    end
  end

  def block(%NxMlx.Fast.Attention{} = s, %T{type: type} = out, [q, k, v | rest] = args, fun) do
    if fast_float?(out, [q, k, v]) and fast_native?(op_device(args), :attention, q.type) do
      device = op_device(args)
      op = op_fn(device, :attention, args)
      {mask, sinks} = if s.mask, do: {Enum.take(rest, 1), Enum.drop(rest, 1)}, else: {[], rest}

      mask =
        case {s.mask, mask} do
          {:boolean, [m]} -> [op.(:astype, [ref!(m, device), :bool])]
          {:additive, [m]} -> [ref_as(m, type, device)]
          _ -> []
        end

      sinks = Enum.map(sinks, &ref_as(&1, type, device))

      mode =
        cond do
          s.causal -> 1
          s.mask -> 2
          true -> 0
        end

      refs = [ref!(q, device), ref!(k, device), ref!(v, device)] ++ mask ++ sinks
      wrap(out, op.(:attention, [refs, s.scale, mode, s.sinks?]), device)
    else
      default_block(s, args, fun)
    end
  end

  def block(%NxMlx.Quantized.ExpertDot{} = s, out, [x, w, idx] = args, fun) when quantized(w) do
    NxMlx.Backend.Quantized.expert_dot(out, x, w, idx) || default_block(s, args, fun)
  end

  def block(struct, _output, args, fun), do: default_block(struct, args, fun)

  # A block's default function creates tensors (constants, iotas, eyes) on the process's
  # default backend: run it with this backend, on the inputs' device, as the default, so
  # that those tensors meet the inputs here instead of on Nx.BinaryBackend.
  defp default_block(struct, args, fun) do
    device = op_device(List.flatten(Enum.map(args, &block_tensors/1)))

    Nx.with_default_backend({NxMlx.Backend, device: device}, fn -> apply(fun, [struct | args]) end)
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

  # Whether NxMlx.Fast's op runs its native kernel on `device`. MLX's CPU backend composes
  # rms_norm, rope and attention from its own ops (its fused kernels are GPU kernels), and
  # the compiler's program of the default function ran faster on 2 vCPUs (attention
  # 1x12x128x64 f32 causal: 1.37 ms against 5.15 for MLX's composition, which loops sgemm
  # per head and runs MLX's CPU softmax; rms_norm 0.13 against 0.19 ms; rope 0.41 against
  # 0.45): there the compiler lowers the default function. Eagerly the default would run
  # op by op (attention: 35 ms), so eager calls keep MLX's op. f32 RMS norm on the CPU is
  # our one-pass kernel, native in both lanes.
  defp fast_native?(:cpu, :rms_norm, {:f, 32}), do: true

  defp fast_native?(:cpu, op, _type) when op in [:rms_norm, :rope, :attention],
    do: not NxMlx.Compiler.Recorder.active?()

  defp fast_native?(_device, _op, _type), do: true

  # NxMlx.Fast's native kernels: every tensor (and the output) of one f32, f16 or bf16 type.
  defp fast_float?(%T{type: type}, tensors) do
    type in [{:f, 32}, {:f, 16}, {:bf, 16}] and Enum.all?(tensors, &(&1.type == type))
  end

  # The given vector's ref, or one of the last axis's size filled with `value`.
  defp fast_vector([%T{} = t], _value, _x, device, _op), do: ref!(t, device)

  defp fast_vector([], value, %T{shape: shape, type: type}, _device, op) do
    op.(:full, [[elem(shape, tuple_size(shape) - 1)], value, Types.to_mlx(type)])
  end
end
