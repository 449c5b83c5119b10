defmodule NxMlx.Native do
  @moduledoc false
  # NIF stubs and nothing else. Replies: `{:ok, value}` when the call finished on the spot
  # (building a lazy op, small copies), `{:async, ref}` when a worker will reply with
  # `{ref, {:ok, value} | {:error, {kind, message}}}`, or `{:error, {kind, message}}`.
  # `NxMlx.Runtime` is the one place that turns those into values or exceptions.

  @on_load :load_nif

  def load_nif do
    path = :filename.join(:code.priv_dir(:nx_mlx), ~c"native/libnx_mlx_nif")

    # CPU worker threads lower their OS priority to this nice value (Linux), so that on a
    # small, busy machine the BEAM's schedulers win the CPU; the threads MLX runs kernels on
    # keep the normal priority. See NxMlx.CommandQueue.
    nice = Application.get_env(:nx_mlx, :worker_nice, 19)

    # MLX's CUDA backend computes f32 matmuls and convolutions in TF32 (10-bit mantissa
    # products) unless MLX_ENABLE_TF32=0; Nx means f32. Off unless `config :nx_mlx, tf32:
    # true`; an MLX_ENABLE_TF32 already in the environment wins. The NIF sets it in the C
    # environment before MLX starts.
    tf32 = if Application.get_env(:nx_mlx, :tf32, false), do: "1", else: "0"

    case :erlang.load_nif(path, {nice, [{"MLX_ENABLE_TF32", tf32}]}) do
      :ok ->
        :ok

      {:error, {reason, text}} ->
        IO.warn("nx_mlx: could not load its NIF (#{reason}): #{text}")
        :ok
    end
  end

  defp nif_error, do: :erlang.nif_error(:nx_mlx_nif_not_loaded)

  # Workers (command queues)
  def default_worker(_device), do: nif_error()
  def new_worker(_device), do: nif_error()
  def worker_info(_worker), do: nif_error()
  def current_worker_id(_worker), do: nif_error()
  def synchronize(_worker), do: nif_error()
  def live_workers, do: nif_error()
  def set_event_sink(_pid), do: nif_error()
  def build_info, do: nif_error()
  def matmul_benchmark(_worker, _n, _reps, _dtype), do: nif_error()
  def readback_benchmark(_worker, _reps), do: nif_error()

  # Arrays
  def from_binary(_worker, _binary, _shape, _dtype), do: nif_error()
  def to_binary(_array), do: nif_error()
  def eval(_array), do: nif_error()
  def array_info(_array), do: nif_error()

  # Commands
  def submit(_arrays), do: nif_error()
  def poll(_command), do: nif_error()
  def wait(_command), do: nif_error()
  def command_info(_command), do: nif_error()
  def live_commands, do: nif_error()

  # Memory
  def memory, do: nif_error()
  def reset_peak_memory, do: nif_error()
  def set_memory_limit(_bytes), do: nif_error()
  def set_cache_limit(_worker, _bytes), do: nif_error()
  def clear_cache(_worker), do: nif_error()

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
  def inv(_worker, _a), do: nif_error()
  def select(_worker, _cond, _a, _b), do: nif_error()
  def arange(_worker, _start, _stop, _step, _dtype), do: nif_error()
  def concatenate(_worker, _arrays, _axis), do: nif_error()
  def slice(_worker, _a, _start, _stop, _strides), do: nif_error()
  def slice_update(_worker, _src, _update, _start, _stop), do: nif_error()
  def pad(_worker, _a, _low, _high, _value), do: nif_error()
  def take(_worker, _a, _indices, _axis), do: nif_error()
  def take_along_axis(_worker, _a, _indices, _axis), do: nif_error()
  def put_along_axis(_worker, _a, _indices, _values, _axis), do: nif_error()
  def topk(_worker, _a, _k, _axis), do: nif_error()
  def arg_reduce(_worker, _max, _a, _axis, _keep_dims), do: nif_error()
  def sort(_worker, _indices, _a, _axis), do: nif_error()
  def gather(_worker, _a, _indices, _axes, _slice_sizes), do: nif_error()
  def scatter(_worker, _add, _a, _indices, _updates, _axes), do: nif_error()
  def as_strided(_worker, _a, _shape, _strides, _offset), do: nif_error()
  def view(_worker, _a, _dtype), do: nif_error()
  def scan(_worker, _op, _a, _axis, _reverse), do: nif_error()
  def fft(_worker, _inverse, _a, _n, _axis), do: nif_error()
  def fftn(_worker, _kind, _a, _lengths, _axes), do: nif_error()
  def linalg(_worker, _op, _a, _b, _upper), do: nif_error()
  def decompose(_worker, _op, _a), do: nif_error()

  def conv(
        _worker,
        _input,
        _weight,
        _strides,
        _lo,
        _hi,
        _kernel_dilation,
        _input_dilation,
        _groups
      ),
      do: nif_error()

  def tensordot(_worker, _a, _b, _axes_a, _axes_b), do: nif_error()
end
