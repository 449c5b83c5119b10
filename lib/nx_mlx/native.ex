defmodule NxMlx.Native do
  @moduledoc false
  # NIF stubs and nothing else. Calls that touch MLX return `{:ok, ref}` and reply later with
  # `{ref, {:ok, value} | {:error, {kind, message}}}`; see `NxMlx.Runtime` for the one place
  # that turns those into values or exceptions.

  @on_load :load_nif

  def load_nif do
    path = :filename.join(:code.priv_dir(:nx_mlx), ~c"native/libnx_mlx_nif")

    case :erlang.load_nif(path, 0) do
      :ok ->
        :ok

      {:error, {reason, text}} ->
        IO.warn("nx_mlx: could not load its NIF (#{reason}): #{text}")
        :ok
    end
  end

  defp nif_error, do: :erlang.nif_error(:nx_mlx_nif_not_loaded)

  # Runtime
  def default_worker(_device), do: nif_error()
  def new_worker(_device), do: nif_error()
  def worker_info(_worker), do: nif_error()
  def current_worker_id(_worker), do: nif_error()
  def live_workers, do: nif_error()
  def build_info, do: nif_error()
  def matmul_benchmark(_worker, _n, _reps, _dtype), do: nif_error()

  # Arrays
  def from_binary(_worker, _binary, _shape, _dtype), do: nif_error()
  def to_binary(_worker, _array), do: nif_error()

  # Ops
  def full(_worker, _shape, _value, _dtype), do: nif_error()
  def unary(_worker, _op, _a), do: nif_error()
  def binary(_worker, _op, _a, _b), do: nif_error()
  def reduce(_worker, _op, _a, _axes, _keep_dims), do: nif_error()
  def astype(_worker, _a, _dtype), do: nif_error()
  def reshape(_worker, _a, _shape), do: nif_error()
  def transpose(_worker, _a, _axes), do: nif_error()
  def broadcast_to(_worker, _a, _shape), do: nif_error()
  def matmul(_worker, _a, _b), do: nif_error()
  def tensordot(_worker, _a, _b, _axes_a, _axes_b), do: nif_error()
end
