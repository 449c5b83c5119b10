defmodule NxMlx.Telemetry do
  @moduledoc """
  Telemetry events emitted by nx_mlx (see `:telemetry.attach/4`).

    * `[:nx_mlx, :queue, :start]`: a command queue was created by `NxMlx.CommandQueue.new/1`.
      Measurements: `%{system_time: integer}`. Metadata: `%{queue: queue, id: id, device:
      device}`.
    * `[:nx_mlx, :queue, :stop]`: a command queue's worker thread stopped (its last reference
      was garbage collected and its queued work finished). Measurements: `%{system_time:
      integer}`. Metadata: `%{id: id, device: device}`.
    * `[:nx_mlx, :command, :stop]`: an asynchronous command (`NxMlx.submit/1`,
      `NxMlx.Pipeline`) was seen finished, by `NxMlx.wait/1` or `NxMlx.poll/1`; emitted once
      per command. Measurements: `%{duration: native_time}` (submission to completion, as
      measured by the native side). Metadata: `%{command: command, status: :completed |
      :failed}`.
    * `[:nx_mlx, :fallback, :start | :stop | :exception]`: a backend callback ran on
      `Nx.BinaryBackend` (see `NxMlx.Backend`, "Fallbacks"). Metadata: `%{op: name}`.

  Queue stop events come from the native side as messages to this module's process, which
  the `:nx_mlx` application starts.
  """

  use GenServer

  @doc false
  def start_link(opts), do: GenServer.start_link(__MODULE__, opts, name: __MODULE__)

  @impl true
  def init(_opts) do
    NxMlx.Native.set_event_sink(self())
    {:ok, nil}
  end

  @impl true
  def handle_info({:nx_mlx_queue_stopped, id, device}, state) do
    :telemetry.execute(
      [:nx_mlx, :queue, :stop],
      %{system_time: System.system_time()},
      %{id: id, device: device}
    )

    {:noreply, state}
  end

  def handle_info(_other, state), do: {:noreply, state}
end
