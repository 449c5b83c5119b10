defmodule NxMlx.Command do
  @moduledoc """
  An asynchronous evaluation started by `NxMlx.submit/1` or `NxMlx.Pipeline.run/3` with
  `async: true`. `outputs` holds what was submitted (the tensors are readable once
  `NxMlx.wait/1` returned `:ok`).

  The native record behind `ref` keeps the arrays only until MLX finished them, and is freed
  when the struct is garbage collected.
  """

  defstruct [:ref, :outputs]

  @type t :: %__MODULE__{ref: reference(), outputs: term()}

  @doc false
  # Emits [:nx_mlx, :command, :stop] the first time a finished command is observed.
  def report(%__MODULE__{ref: ref} = command) do
    case NxMlx.Native.command_info(ref) do
      %{first_report: true, status: status, duration_ns: ns} ->
        :telemetry.execute(
          [:nx_mlx, :command, :stop],
          %{duration: System.convert_time_unit(ns, :nanosecond, :native)},
          %{command: command, status: status}
        )

      _ ->
        :ok
    end
  end
end

defimpl Inspect, for: NxMlx.Command do
  def inspect(%{ref: ref}, _opts) do
    "#NxMlx.Command<#{NxMlx.Native.poll(ref)}>"
  end
end
