defmodule NxMlx.TestHelpers do
  @moduledoc false

  @doc "Polls `fun` (after a garbage collection) until it returns true, for at most `ms` ms."
  def eventually(fun, ms \\ 5_000) do
    poll_until(fun, System.monotonic_time(:millisecond) + ms)
  end

  defp poll_until(fun, deadline) do
    :erlang.garbage_collect()

    cond do
      fun.() ->
        true

      System.monotonic_time(:millisecond) > deadline ->
        false

      true ->
        Process.sleep(10)
        poll_until(fun, deadline)
    end
  end

  @doc """
  Forwards telemetry `event` to the calling process as `{:telemetry, event, measurements,
  metadata}` until the test ends.
  """
  def forward_telemetry(event) do
    id = "#{inspect(event)}-#{inspect(make_ref())}"
    :ok = :telemetry.attach(id, event, &__MODULE__.forward/4, self())
    ExUnit.Callbacks.on_exit(fn -> :telemetry.detach(id) end)
  end

  @doc false
  def forward(event, measurements, metadata, pid) do
    send(pid, {:telemetry, event, measurements, metadata})
  end
end

# GPU-tagged tests run only where MLX sees a GPU (the CUDA or Metal variant).
exclude = if :gpu in NxMlx.devices(), do: [], else: [:gpu]
ExUnit.start(exclude: exclude)
