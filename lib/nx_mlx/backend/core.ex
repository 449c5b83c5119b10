defmodule NxMlx.Backend.Core do
  @moduledoc false
  # The plumbing every concern of NxMlx.Backend shares: the device an op runs on, calling the
  # NIF with errors that name the op, shapes and types, wrapping results, reading operands
  # (with conversions) and the debug checks.

  alias Nx.Tensor, as: T
  alias NxMlx.{CommandQueue, Runtime, Types}

  # Nx types MLX has no dtype for, whose tensors are created on (and stay on)
  # Nx.BinaryBackend: 8-bit floats and 2- and 4-bit integers. (complex128 raises instead.)
  defguard binary_only(type)
           when type in [{:f, 8}, {:f8_e4m3fn, 8}, {:s, 2}, {:s, 4}, {:u, 2}, {:u, 4}]

  # A tensor holding quantized data (NxMlx.Quantized).
  defguard quantized(t)
           when is_struct(t, T) and is_struct(t.data, NxMlx.Backend) and
                  is_struct(t.data.quant, NxMlx.Quantized)

  @debug_detect_nan_inf Application.compile_env(:nx_mlx, :debug_detect_nan_inf, false)
  @debug_key :nx_mlx_debug_last_op

  # The device a creation op runs on: the one in its options, after the command queue's
  # promotion rules (see NxMlx.CommandQueue).
  def device_of(opts) do
    CommandQueue.route_device(Keyword.get(opts, :device) || NxMlx.default_device())
  end

  # The device an op on these tensors runs on: the first NxMlx tensor's, after the command
  # queue's promotion rules.
  def op_device(tensors) do
    device =
      Enum.find_value(tensors, fn
        %T{data: %NxMlx.Backend{device: d}} -> d
        _ -> nil
      end) || NxMlx.default_device()

    CommandQueue.route_device(device)
  end

  ## Plumbing: calling the NIF with errors that name the op, shapes and types

  # The size of `axis` of `t`, or an ArgumentError naming `op`.
  def axis_size!(%T{shape: shape}, axis, _op)
      when is_integer(axis) and axis >= 0 and axis < tuple_size(shape),
      do: elem(shape, axis)

  def axis_size!(%T{shape: shape}, axis, op) do
    raise ArgumentError,
          "NxMlx.Backend.#{op}: axis #{inspect(axis)} is out of range for shape #{inspect(shape)}"
  end

  # `op.(fun, args)` calls the NIF like `call/5`, for the many steps of one callback.
  def op_fn(device, op, tensors), do: fn fun, args -> call(device, fun, args, op, tensors) end

  # Runs `fun` on the worker for `device`: the bound command queue when it is on `device`,
  # else the device's default queue.
  def call(device, fun, args, op, tensors) do
    if @debug_detect_nan_inf, do: Process.put(@debug_key, {op, tensors})
    Runtime.call(fun, [CommandQueue.worker(device) | args], fn -> describe(op, tensors) end)
  end

  ## Debug checks (compiled in only when their setting is on; see "Debug settings")

  # debug_detect_nan_inf: the result of the callback that is finishing holds NaN or an
  # infinity while its inputs were finite.
  def check_finite!(%T{type: {kind, _}} = out, ref, device) when kind in [:f, :bf, :c] do
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

  def check_finite!(_out, _ref, _device), do: Process.delete(@debug_key)

  # Templates (the output of creation ops) hold no data.
  def has_data?(%T{data: nil}), do: false
  def has_data?(%T{data: %Nx.TemplateBackend{}}), do: false
  def has_data?(%T{}), do: true

  def input_non_finite?(%T{data: nil}, _device), do: false
  def input_non_finite?(%T{data: %Nx.TemplateBackend{}}, _device), do: false

  def input_non_finite?(%T{data: %NxMlx.Backend{ref: ref}, type: {kind, _}} = t, device)
      when kind in [:f, :bf, :c],
      do: non_finite?(ref, tuple_size(t.shape), device)

  def input_non_finite?(%T{type: {kind, _}} = t, _device) when kind in [:f, :bf, :c] do
    t = Nx.backend_copy(t, Nx.BinaryBackend)
    Nx.to_number(Nx.any(Nx.logical_or(Nx.is_nan(t), Nx.is_infinity(t)))) == 1
  end

  def input_non_finite?(_t, _device), do: false

  def non_finite?(ref, rank, device) do
    d = fn fun, args -> Runtime.call(fun, [Runtime.worker(device) | args], fn -> "debug" end) end
    bad = d.(:binary, [:logical_or, d.(:unary, [:isnan, ref]), d.(:unary, [:isinf, ref])])
    any = d.(:reduce, [:any, bad, Enum.to_list(0..(rank - 1)//1), false])
    Runtime.call(:to_binary, [any], fn -> "debug" end) == <<1>>
  end

  # debug_bounds_check: every index row of a gather or scatter is inside the tensor.
  # `in_bounds` (of rank `rank`) has the batch shape of `indices` (all of it for the take
  # blocks, whose indices carry no trailing index dimension).
  def check_bounds!(op, in_bounds, rank, nx_op, indices, shape) do
    all = op.(:reduce, [:all, in_bounds, Enum.to_list(0..(rank - 1)//1), false])

    if Runtime.call(:to_binary, [all], fn -> "NxMlx.Backend.#{nx_op}" end) != <<1>> do
      raise ArgumentError,
            "NxMlx.Backend.#{nx_op}: an index is out of bounds for shape #{inspect(shape)} " <>
              "(indices of shape #{inspect(indices.shape)}; config :nx_mlx, " <>
              "debug_bounds_check: true)"
    end
  end

  def describe(op, tensors) do
    shapes = Enum.map_join(tensors, ", ", &inspect(&1.shape))
    types = Enum.map_join(tensors, ", ", &inspect(&1.type))
    "NxMlx.Backend.#{op} failed for shapes #{shapes} and types #{types}"
  end

  def wrap(%T{} = out, ref, device) do
    if @debug_detect_nan_inf, do: check_finite!(out, ref, device)
    count_allocation(out)
    %{out | data: %NxMlx.Backend{ref: ref, device: device}}
  end

  # Counted so that dead tensors are collected promptly (see NxMlx.Runtime).
  def count_allocation(%T{type: {_, bits}, shape: shape}),
    do: Runtime.count_result(div(Tuple.product(shape) * bits, 8))

  # The MLX array of `t`. Arrays of another queue or device are used in place: the NIF has
  # them evaluated on their own queue first when they are still lazy. Tensors of other
  # backends are copied in.
  # A tensor received from another node holds a reference to an array of that node's VM.
  def ref!(%T{data: %NxMlx.Backend{ref: ref}} = t, _device)
      when is_reference(ref) and node(ref) != node() do
    raise ArgumentError,
          "NxMlx.Backend: the #{inspect(t.type)} tensor of shape #{inspect(t.shape)} holds an " <>
            "MLX array of node #{inspect(node(ref))}, which this node cannot read: copy " <>
            "tensors to Nx.BinaryBackend before sending them to another node (for Nx.Serving: " <>
            "distributed_postprocessing and batched_run's distributed_preprocessing)"
  end

  def ref!(%T{data: %NxMlx.Backend{quant: nil, ref: ref}}, _device), do: ref

  # A quantized tensor's values (see NxMlx.Backend.Quantized).
  def ref!(%T{data: %NxMlx.Backend{quant: %NxMlx.Quantized{}, device: d}} = t, _device),
    do: NxMlx.Backend.Quantized.dequantized_ref(t, d)

  def ref!(%T{} = t, device) do
    case backend_transfer_in(t, device) do
      %T{data: %NxMlx.Backend{ref: ref}} ->
        ref

      %T{type: type} ->
        raise ArgumentError,
              "NxMlx.Backend: a #{inspect(type)} tensor cannot take part in an MLX op (MLX " <>
                "has no such type); convert it with Nx.as_type/2 first"
    end
  end

  def backend_transfer_in(%T{data: %NxMlx.Backend{quant: %NxMlx.Quantized{}}} = t, device),
    do: NxMlx.Backend.Quantized.transfer(t, device)

  def backend_transfer_in(%T{data: %NxMlx.Backend{}} = t, device) do
    NxMlx.Backend.Creation.from_binary(t, NxMlx.Backend.Creation.to_binary(t, Nx.size(t)),
      device: device
    )
  end

  def backend_transfer_in(%T{} = t, device) do
    NxMlx.Backend.Creation.from_binary(t, Nx.to_binary(t), device: device)
  end

  # The array of `t` converted to `type` (no-op when it already has it).
  def ref_as(%T{type: type} = t, type, device), do: ref!(t, device)

  def ref_as(%T{} = t, type, device) do
    call(device, :astype, [ref!(t, device), Types.to_mlx(type)], :as_type, [t])
  end

  def check_device_type!(device, type) do
    if device == :gpu and type == {:f, 64} do
      raise ArgumentError,
            "NxMlx.Backend: MLX has no float64 on the GPU; use {:f, 32} or the :cpu device"
    end

    if type == {:c, 128} do
      raise ArgumentError, "NxMlx.Backend: MLX has no complex128; use {:c, 64}"
    end
  end

  # 0..n-1 as integers (exact; converted to the output type afterwards).
  def index_range(op, n) do
    op.(:arange, [0.0, n / 1, 1.0, if(n < 2_147_483_647, do: :s32, else: :s64)])
  end

  # Direct callers of a callback may pass an output template that does not fit its input:
  # MLX would compute a result of another shape than the tensor claims.
  def check_template!(nx_op, %T{shape: shape}, expected) do
    if shape != expected do
      raise ArgumentError,
            "NxMlx.Backend.#{nx_op}: the output shape #{inspect(shape)} does not match the " <>
              "expected #{inspect(expected)}"
    end
  end

  # A scalar array holding `number` exactly, as `type`.
  def scalar_ref(number, type, device) do
    scalar = Nx.BinaryBackend.constant(%T{shape: {}, type: type, names: []}, number, [])
    call(device, :from_binary, [Nx.to_binary(scalar), [], Types.to_mlx(type)], :constant, [])
  end

  def reverse_axis(op, ref, axis), do: op.(:reverse, [ref, axis])
end
