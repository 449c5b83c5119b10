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

    # OpenBLAS's idle threads busy-wait 2^28 cycles (about 0.1 s) after each threaded matmul,
    # taking a core from the work between matmuls; the NIF limits that to 2^16 cycles
    # (`config :nx_mlx, blas_idle_spin: n`, 4..30, or `false` to keep OpenBLAS's default; an
    # OPENBLAS_THREAD_TIMEOUT in the environment wins). See NxMlx.Blas.
    spin =
      case Application.get_env(:nx_mlx, :blas_idle_spin, 16) do
        n when is_integer(n) and n in 4..30 -> n
        _ -> 0
      end

    case :erlang.load_nif(path, {nice, [{"MLX_ENABLE_TF32", tf32}], spin}) do
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

  # Ops: one NIF over the op table (native/nx_mlx_nif/src/op.rs). `op(worker, name, args)`
  # builds `name` from `args`, whose array operands are array references.
  def op(_worker, _name, _args), do: nif_error()

  # Programs (see native/nx_mlx_nif/src/program.rs and NxMlx.Compiler)
  def program_new(_code, _n_inputs, _n_regs, _outputs, _fuse), do: nif_error()
  def program_run(_worker, _program, _inputs, _tag), do: nif_error()
  def program_info(_program), do: nif_error()
  def program_fusion(_program), do: nif_error()
  def fusion_available(_device), do: nif_error()

  # The ops by name, each `name(worker, args...)`, as `op/3` calls.
  @ops [
    full: 4,
    unary: 3,
    binary: 4,
    reduce: 5,
    astype: 3,
    reshape: 3,
    transpose: 3,
    reverse: 3,
    layer_norm: 5,
    rms_norm: 4,
    rope: 6,
    attention: 5,
    broadcast_to: 3,
    matmul: 3,
    inv: 2,
    select: 4,
    arange: 5,
    concatenate: 3,
    slice: 5,
    slice_dynamic: 5,
    slice_update: 5,
    slice_update_dynamic: 5,
    pad: 5,
    take: 4,
    take_along_axis: 4,
    put_along_axis: 5,
    topk: 4,
    softmax: 4,
    arg_reduce: 5,
    sort: 4,
    gather: 5,
    scatter: 6,
    as_strided: 5,
    view: 3,
    scan: 5,
    fft: 5,
    fftn: 5,
    linalg: 5,
    decompose: 3,
    conv: 9,
    tensordot: 5,
    quantize: 5,
    dequantize: 6,
    quantized_matmul: 6,
    gather_qmm: 8
  ]

  @doc false
  def ops, do: @ops

  for {name, arity} <- @ops do
    args = Macro.generate_arguments(arity - 1, __MODULE__)

    def unquote(name)(worker, unquote_splicing(args)),
      do: op(worker, unquote(name), unquote(args))
  end
end
