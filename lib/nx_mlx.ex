defmodule NxMlx do
  @moduledoc """
  Nx on Apple's MLX, on Linux CPU, NVIDIA GPUs (MLX's CUDA build) and macOS.

      Nx.global_default_backend(NxMlx.Backend)
      # or per tensor, choosing the device:
      Nx.tensor([1.0, 2.0], backend: {NxMlx.Backend, device: :cpu})

  Ops are lazy in MLX: building one is cheap and happens in the calling process; evaluation
  happens on a command queue's worker thread (`NxMlx.CommandQueue`) when a tensor is read back
  (`Nx.to_binary/1`, `inspect/2`, …), submitted (`submit/1`) or synchronized. The caller waits
  for the worker's reply in `receive`, so BEAM schedulers never wait on MLX.

  ## Asynchronous commands

      {:ok, command} = NxMlx.submit(%{a: a, b: b})   # returns at once
      {:ok, :running} = NxMlx.poll(command)          # never blocks
      :ok = NxMlx.wait(command)                      # blocks this process in `receive`

  ## The defn compiler

      Nx.Defn.default_options(compiler: NxMlx)
      Nx.Defn.jit(&MyModule.fun/2, compiler: NxMlx, device: :gpu).(a, b)

  Whole `defn` graphs run as one native call per invocation; see `NxMlx.Compiler` for the
  options and what is lowered.

  ## Memory

  `memory/0`, `reset_peak_memory/0`, `clear_cache/0`, `set_memory_limit/1` and
  `set_cache_limit/1` are thin over MLX's allocator (process-wide, all devices of the build).
  """

  alias NxMlx.{Command, Native, Runtime}

  @behaviour Nx.Defn.Compiler

  @impl Nx.Defn.Compiler
  defdelegate __jit__(key, vars, fun, args_list, opts), to: NxMlx.Compiler

  @impl Nx.Defn.Compiler
  defdelegate __compile__(key, vars, fun, opts), to: NxMlx.Compiler

  @impl Nx.Defn.Compiler
  defdelegate __partitions_options__(opts), to: NxMlx.Compiler

  @impl Nx.Defn.Compiler
  defdelegate __to_backend__(opts), to: NxMlx.Compiler

  @impl Nx.Defn.Compiler
  defdelegate __shard_jit__(key, mesh, vars, fun, args_list, opts), to: NxMlx.Compiler

  # Fits the NIF's usize on every platform it builds for; larger byte counts are clamped.
  @max_bytes Bitwise.bsl(1, 63)

  @doc "The devices this build of libmlx can run on, e.g. `[:cpu]` or `[:cpu, :gpu]`."
  def devices do
    NxMlx.Native.build_info()
    |> Map.fetch!("devices")
    |> String.split(",")
    |> Enum.map(&String.to_existing_atom/1)
  end

  @doc "The device tensors go to when none is given: `:gpu` when available, else `:cpu`."
  def default_device do
    case :persistent_term.get({__MODULE__, :default_device}, nil) do
      nil ->
        device = if :gpu in devices(), do: :gpu, else: :cpu
        :persistent_term.put({__MODULE__, :default_device}, device)
        device

      device ->
        device
    end
  end

  @doc """
  Facts about the loaded native code: MLX version, libmlx path, BLAS in use, variant, devices.
  """
  def build_info do
    NxMlx.Native.build_info()
  end

  @doc """
  The worker (command queue reference) an op on `device` runs on in the calling process: the
  queue bound with `NxMlx.CommandQueue.with_queue/2` when it is on `device`, else the
  device's default queue.
  """
  def resolve_worker(device), do: NxMlx.CommandQueue.worker(device)

  ## Commands

  @doc """
  Starts evaluating every `NxMlx.Backend` tensor in `tensor_or_container` (a tensor, tuple,
  map, list or any `Nx.Container`) with MLX's `async_eval`, one job per command queue, and returns
  at once. Tensors on other backends are ignored.
  """
  @spec submit(Nx.Tensor.t() | Nx.Container.t()) :: {:ok, Command.t()} | {:error, String.t()}
  def submit(tensor_or_container) do
    refs =
      try do
        tensor_or_container |> collect_refs([]) |> Enum.reverse()
      rescue
        Protocol.UndefinedError ->
          raise ArgumentError,
                "NxMlx.submit/1 expects a tensor, a list or an Nx.Container of tensors, got: " <>
                  inspect(tensor_or_container, limit: 5)
      end

    NxMlx.Runtime.before_eval()

    case Native.submit(refs) do
      {:ok, ref} ->
        {:ok, %Command{ref: ref, outputs: tensor_or_container}}

      {:error, {_kind, message}} ->
        {:error, message}
    end
  end

  # Lists (e.g. a pipeline's stage outputs) are walked too, though they are not containers.
  defp collect_refs(list, acc) when is_list(list), do: Enum.reduce(list, acc, &collect_refs/2)

  defp collect_refs(container, acc) do
    Nx.Defn.Composite.reduce(container, acc, fn
      %Nx.Tensor{data: %NxMlx.Backend{quant: %NxMlx.Quantized{} = q}}, acc ->
        [q.packed, q.scales, q.biases]
        |> Enum.reject(&is_nil/1)
        |> Enum.reduce(acc, &collect_refs/2)

      %Nx.Tensor{data: %NxMlx.Backend{ref: ref}}, acc ->
        [ref | acc]

      _, acc ->
        acc
    end)
  end

  @doc """
  The command's state, without blocking: `:pending` (queued, not started), `:running`
  (handed to MLX), `:completed` or `:failed`.
  """
  @spec poll(Command.t()) :: {:ok, :pending | :running | :completed | :failed}
  def poll(%Command{ref: ref} = command) do
    status = Native.poll(ref)
    if status in [:completed, :failed], do: Command.report(command)
    {:ok, status}
  end

  def poll(other),
    do: raise(ArgumentError, "NxMlx.poll/1 expects a command, got: #{inspect(other)}")

  @doc """
  Blocks the calling process (in `receive`, not a scheduler) until the command is done.
  `{:error, message}` when MLX failed to evaluate it; its tensors then raise when read.
  """
  @spec wait(Command.t()) :: :ok | {:error, String.t()}
  def wait(%Command{ref: ref} = command) do
    result =
      case Native.wait(ref) do
        {:ok, :ok} ->
          :ok

        {:async, tag} ->
          receive do
            {^tag, {:ok, :ok}} -> :ok
            {^tag, {:error, {_kind, message}}} -> {:error, message}
          end

        {:error, {_kind, message}} ->
          {:error, message}
      end

    Command.report(command)
    result
  end

  def wait(other),
    do: raise(ArgumentError, "NxMlx.wait/1 expects a command, got: #{inspect(other)}")

  ## Memory

  @doc """
  MLX's allocator counters in bytes: `:active` (held by arrays), `:peak` (highest active
  since start or `reset_peak_memory/0`), `:cache` (freed buffers kept for reuse) and `:limit`
  (the memory limit).
  """
  @spec memory() :: %{
          active: non_neg_integer(),
          peak: non_neg_integer(),
          cache: non_neg_integer(),
          limit: non_neg_integer()
        }
  def memory, do: Native.memory()

  @doc "Resets the peak counter of `memory/0` to zero."
  @spec reset_peak_memory() :: :ok
  def reset_peak_memory, do: Native.reset_peak_memory()

  @doc "Returns MLX's cached buffers to the system. Waits for running CPU work first."
  @spec clear_cache() :: :ok
  def clear_cache do
    Runtime.call(:clear_cache, [Runtime.worker(:cpu)], fn -> "NxMlx.clear_cache()" end)
  end

  @doc """
  Sets the memory limit in bytes and returns the previous one (`memory/0` reports it): nx_mlx
  refuses to build any single array larger than it, with an `ArgumentError` naming the op
  (MLX's CPU allocator does not survive an impossible allocation). The limit is clamped to
  the machine's physical memory (or MLX's default limit, when a GPU has more): an allocation
  the system cannot serve crashes the process. MLX's own limit, which throttles evaluation
  while the live memory is above it, keeps its default: below the live memory, MLX's
  scheduler waited for ever on queues whose work depended on one another.
  """
  @spec set_memory_limit(non_neg_integer()) :: non_neg_integer()
  def set_memory_limit(bytes) when is_integer(bytes) and bytes >= 0,
    do: Native.set_memory_limit(min(bytes, @max_bytes))

  def set_memory_limit(other) do
    raise ArgumentError,
          "NxMlx.set_memory_limit/1 expects a non-negative integer of bytes, got: #{inspect(other)}"
  end

  @doc """
  Sets the size in bytes of MLX's buffer cache (0 disables it) and returns the previous one.
  """
  @spec set_cache_limit(non_neg_integer()) :: non_neg_integer()
  def set_cache_limit(bytes) when is_integer(bytes) and bytes >= 0 do
    Runtime.call(:set_cache_limit, [Runtime.worker(:cpu), min(bytes, @max_bytes)], fn ->
      "NxMlx.set_cache_limit(#{bytes})"
    end)
  end

  def set_cache_limit(other) do
    raise ArgumentError,
          "NxMlx.set_cache_limit/1 expects a non-negative integer of bytes, got: #{inspect(other)}"
  end
end
