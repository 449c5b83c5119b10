defmodule NxMlx.Fallback do
  @moduledoc false
  # Runs a backend callback on Nx.BinaryBackend: NxMlx tensors among the arguments are copied
  # out, the result is copied back onto the device. Emits
  # [:nx_mlx, :fallback, :start | :stop | :exception] with %{op: name}; the :fallback setting
  # (:silent | :warn | :raise) decides whether it warns (once per op) or refuses.

  require Logger

  alias Nx.Tensor, as: T

  def run(op, [out | args], device) do
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

    :telemetry.span([:nx_mlx, :fallback], %{op: op}, fn ->
      result = apply(Nx.BinaryBackend, op, [out | Enum.map(args, &to_binary_backend/1)])
      {from_binary_backend(result, device), %{op: op}}
    end)
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
