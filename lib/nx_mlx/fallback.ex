defmodule NxMlx.Fallback do
  @moduledoc false
  # Runs a backend callback on Nx.BinaryBackend: NxMlx tensors among the arguments are copied
  # out, the result is copied back onto the device. Emits
  # [:nx_mlx, :fallback, :start | :stop | :exception] with %{op: name}; the :fallback setting
  # (:silent | :warn | :raise) decides whether it warns (once per op) or refuses.

  require Logger

  alias Nx.Tensor, as: T

  def run(op, [out | args], device) do
    recorded =
      if Process.get(:nx_mlx_recorder),
        do: NxMlx.Compiler.Recorder.fallback(op, out, args, device),
        else: :eager

    case recorded do
      {:recorded, value} -> value
      :eager -> run_here(op, out, args, device)
    end
  end

  defp run_here(op, out, args, device) do
    check_allowed!(op)

    :telemetry.span([:nx_mlx, :fallback], %{op: op}, fn ->
      # Tensors the op creates itself (e.g. inside the function given to reduce/5 or
      # window_reduce/6) must be BinaryBackend tensors too.
      result =
        Nx.with_default_backend(Nx.BinaryBackend, fn ->
          apply(Nx.BinaryBackend, op, [out | Enum.map(args, &to_binary_backend/1)])
        end)

      {from_binary_backend(result, device), %{op: op}}
    end)
  end

  @doc """
  Creates a tensor of a type MLX has no dtype for (8-bit floats, 2- and 4-bit integers) on
  Nx.BinaryBackend, where it stays: `fun` builds it. Same telemetry and settings as `run/3`.
  """
  def keep_on_binary_backend(op, fun) do
    check_allowed!(op)

    :telemetry.span([:nx_mlx, :fallback], %{op: op}, fn ->
      {Nx.with_default_backend(Nx.BinaryBackend, fun), %{op: op}}
    end)
  end

  defp check_allowed!(op) do
    case Application.get_env(:nx_mlx, :fallback, :silent) do
      :raise ->
        raise ArgumentError,
              "NxMlx.Backend.#{op} has no MLX implementation and config :nx_mlx, " <>
                "fallback: :raise forbids running it on Nx.BinaryBackend"

      :warn ->
        warn_once(op)

      _ ->
        :ok
    end
  end

  defp warn_once(op) do
    key = {__MODULE__, :warned, op}

    unless :persistent_term.get(key, false) do
      :persistent_term.put(key, true)
      Logger.warning("NxMlx.Backend.#{op} runs on Nx.BinaryBackend (no MLX implementation)")
    end
  end

  defp to_binary_backend(%T{data: %NxMlx.Backend{}} = t), do: Nx.backend_copy(t, Nx.BinaryBackend)
  defp to_binary_backend(list) when is_list(list), do: Enum.map(list, &to_binary_backend/1)

  defp to_binary_backend(tuple) when is_tuple(tuple),
    do: tuple |> Tuple.to_list() |> Enum.map(&to_binary_backend/1) |> List.to_tuple()

  defp to_binary_backend(other), do: other

  def from_binary_backend(%T{data: %Nx.BinaryBackend{}} = t, device),
    do: Nx.backend_transfer(t, {NxMlx.Backend, device: device})

  def from_binary_backend(list, device) when is_list(list),
    do: Enum.map(list, &from_binary_backend(&1, device))

  def from_binary_backend(tuple, device) when is_tuple(tuple),
    do: tuple |> Tuple.to_list() |> Enum.map(&from_binary_backend(&1, device)) |> List.to_tuple()

  def from_binary_backend(other, _device), do: other
end
