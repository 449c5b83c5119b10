defmodule NxMlx.CommandQueue do
  @moduledoc """
  A command queue: one OS thread (a worker) owning one MLX stream on one device.

      {:ok, queue} = NxMlx.CommandQueue.new(:cpu)

      NxMlx.CommandQueue.with_queue(queue, fn ->
        # every NxMlx call made here, including those made by libraries through
        # NxMlx.Backend, runs on `queue`
        Nx.add(a, b)
      end)

      :ok = NxMlx.CommandQueue.synchronize(queue)

  ## How work runs

  Ops are lazy in MLX. Building an op is cheap and happens in the calling process, naming the
  queue's stream; evaluating it (reading a tensor back, `NxMlx.submit/1`, `synchronize/1`)
  happens on the queue's thread: the NIF posts a job on the worker's bounded channel and
  returns at once, and the caller waits for the reply in `receive`. No scheduler thread waits
  on MLX. A full channel makes the caller back off and retry (back-pressure).

  On Linux, CPU worker threads (and the stream threads MLX starts from them) run at the nice
  value of `config :nx_mlx, worker_nice: 19` (read when the NIF loads), under SCHED_BATCH:
  when the machine is busy, the BEAM's schedulers get the CPU first, which keeps the VM
  responsive, idle cores still go to MLX, and handing an op to the stream thread does not
  make the two threads preempt each other.

  A default queue exists for every available device (`default/1`). A queue lives as long as
  the queue struct or any tensor built on it is referenced; then its thread finishes the jobs
  already queued and stops, and is joined off the schedulers. (MLX itself keeps one idle
  helper thread per stream it ever created, so create queues once, not per request.)

  ## Binding a queue to a process

  `with_queue/2` stores `{ref, device}` under `:nx_mlx_command_queue` in the calling process's
  dictionary for the duration of the function, restoring the previous binding (or deleting
  the key) afterwards, also when the function raises. Nested calls shadow and restore. There
  is deliberately no opt-out: inside the block every `NxMlx.Backend` call routes through the
  bound queue.

  ## Cross-device promotion

  When an op's tensors live on a device other than the bound queue's (say a `:cpu` tensor
  inside a block bound to a `:gpu` queue), the application environment decides:

      config :nx_mlx, cross_device_promotion: false, warn_cross_device: false

    * `cross_device_promotion: false` (default): the op runs on the default queue of the
      tensor's device; the result stays on that device.
    * `cross_device_promotion: true`: the op runs on the bound queue, on its device; the
      result lives there. Inputs are used in place (MLX arrays are shared across devices),
      after being evaluated on their own queue when they are still lazy.
    * `warn_cross_device: true`: logs a `Logger.warning` once per kind of mismatch
      (tensor device, queue device, promoted or not).

  Creation ops (`Nx.tensor/2`, `Nx.iota/2`, …) count the device from their backend options
  as the tensor's device.

  ## Telemetry

  `[:nx_mlx, :queue, :start]` when `new/1` created a queue, `[:nx_mlx, :queue, :stop]` when
  a queue's thread stopped; see `NxMlx.Telemetry`.
  """

  alias NxMlx.{Native, Runtime}

  require Logger

  defstruct [:device, :ref]

  @type t :: %__MODULE__{device: :cpu | :gpu, ref: reference()}

  @key :nx_mlx_command_queue

  @doc """
  Starts a queue on `device`. `{:error, message}` when the device is not available (the
  process lives on: availability is checked before MLX is asked for a stream).
  """
  @spec new(:cpu | :gpu) :: {:ok, t} | {:error, String.t()}
  def new(device) when device in [:cpu, :gpu] do
    reply =
      case Native.new_worker(device) do
        {:async, ref} ->
          receive do
            {^ref, reply} -> reply
          end

        error ->
          error
      end

    case reply do
      {:ok, worker} ->
        queue = %__MODULE__{device: device, ref: worker}

        :telemetry.execute(
          [:nx_mlx, :queue, :start],
          %{system_time: System.system_time()},
          %{queue: queue, id: id(queue), device: device}
        )

        {:ok, queue}

      {:error, {_kind, message}} ->
        {:error, "cannot start a command queue on #{inspect(device)}: #{message}"}
    end
  end

  def new(device), do: {:error, "unknown device #{inspect(device)}, expected :cpu or :gpu"}

  @doc "Like `new/1`, raising `NxMlx.NIFError` on failure."
  @spec new!(:cpu | :gpu) :: t
  def new!(device) do
    case new(device) do
      {:ok, queue} -> queue
      {:error, message} -> raise NxMlx.NIFError, message
    end
  end

  @doc "The default queue of `device` (started when the library loads)."
  @spec default(:cpu | :gpu) :: t
  def default(device \\ NxMlx.default_device()) do
    %__MODULE__{device: device, ref: Runtime.worker(device)}
  end

  @doc "The queue's worker id (unique for the life of the VM)."
  @spec id(t) :: pos_integer()
  def id(%__MODULE__{ref: ref}), do: Native.worker_info(ref).id

  @doc """
  Returns `:ok` once every job queued on `queue` before this call, and the MLX work they
  started, has finished. The caller waits in `receive`.
  """
  @spec synchronize(t) :: :ok
  def synchronize(%__MODULE__{ref: ref} = queue) do
    Runtime.call(:synchronize, [ref], fn ->
      "NxMlx.CommandQueue.synchronize(#{inspect(queue)})"
    end)
  end

  def synchronize(other) do
    raise ArgumentError,
          "NxMlx.CommandQueue.synchronize/1 expects a command queue, got: #{inspect(other)}"
  end

  @doc """
  Runs `fun` with `queue` bound to the calling process (see "Binding a queue to a process").
  """
  @spec with_queue(t, (-> result)) :: result when result: var
  def with_queue(%__MODULE__{ref: ref, device: device}, fun) when is_function(fun, 0) do
    previous = Process.get(@key)
    Process.put(@key, {ref, device})

    try do
      fun.()
    after
      case previous do
        nil -> Process.delete(@key)
        binding -> Process.put(@key, binding)
      end
    end
  end

  def with_queue(queue, fun) do
    raise ArgumentError,
          "NxMlx.CommandQueue.with_queue/2 expects a command queue and a function of arity 0, " <>
            "got: #{inspect(queue)} and #{inspect(fun)}"
  end

  @doc "The `{ref, device}` bound to the calling process, or `nil`."
  @spec current() :: {reference(), :cpu | :gpu} | nil
  def current, do: Process.get(@key)

  @doc false
  # The device an op on tensors of `device` runs on, after the promotion rules.
  def route_device(device) do
    case Process.get(@key) do
      nil ->
        device

      {_ref, ^device} ->
        device

      binding ->
        {exec, _} = route(device, binding, config())
        exec
    end
  end

  @doc false
  # The worker for an op running on `device`: the bound queue when it is on that device,
  # else the device's default queue.
  def worker(device) do
    case Process.get(@key) do
      {ref, ^device} -> ref
      _ -> Runtime.worker(device)
    end
  end

  @doc false
  # The routing rule itself: `{device, :queue | :default}` for a tensor on `device` under
  # `binding`, with `config` holding `:cross_device_promotion` and `:warn_cross_device`.
  def route(device, nil, _config), do: {device, :default}
  def route(device, {_ref, device}, _config), do: {device, :queue}

  def route(device, {_ref, queue_device}, config) do
    promote? = Keyword.get(config, :cross_device_promotion, false)

    if Keyword.get(config, :warn_cross_device, false) do
      warn_once(device, queue_device, promote?)
    end

    if promote?, do: {queue_device, :queue}, else: {device, :default}
  end

  defp config do
    [
      cross_device_promotion: Application.get_env(:nx_mlx, :cross_device_promotion, false),
      warn_cross_device: Application.get_env(:nx_mlx, :warn_cross_device, false)
    ]
  end

  defp warn_once(device, queue_device, promote?) do
    key = {__MODULE__, :warned, device, queue_device, promote?}

    unless :persistent_term.get(key, false) do
      :persistent_term.put(key, true)

      outcome =
        if promote?,
          do: "running it on the bound #{inspect(queue_device)} queue (promotion is on)",
          else: "running it on the default #{inspect(device)} queue (promotion is off)"

      Logger.warning(
        "nx_mlx: an op on #{inspect(device)} tensors inside a #{inspect(queue_device)} " <>
          "command queue: #{outcome}; see NxMlx.CommandQueue, \"Cross-device promotion\""
      )
    end

    :ok
  end

  @doc false
  # Forgets which mismatch warnings were logged (for tests).
  def __reset_warnings__ do
    for {{__MODULE__, :warned, _, _, _} = key, _} <- :persistent_term.get() do
      :persistent_term.erase(key)
    end

    :ok
  end
end

defimpl Inspect, for: NxMlx.CommandQueue do
  def inspect(queue, _opts) do
    "#NxMlx.CommandQueue<#{queue.device}, id: #{NxMlx.CommandQueue.id(queue)}>"
  end
end
