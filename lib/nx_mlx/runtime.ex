defmodule NxMlx.Runtime do
  @moduledoc false
  # The one place that talks to the NIF: it picks workers, and turns the NIF's replies
  # (`{:ok, value}`, `{:async, ref}` + the worker's message, `{:error, reason}`) into values
  # or exceptions.
  #
  # The caller waits in `receive`, so no scheduler thread ever blocks on MLX.

  alias NxMlx.Native

  @doc "The default worker of `device` (cached in `:persistent_term`)."
  def worker(device) do
    key = {__MODULE__, :worker, device}

    case :persistent_term.get(key, nil) do
      nil ->
        case Native.default_worker(device) do
          {:ok, w} ->
            :persistent_term.put(key, w)
            w

          {:error, {_kind, message}} ->
            raise ArgumentError, "nx_mlx: cannot use device #{inspect(device)}: #{message}"
        end

      w ->
        w
    end
  end

  ## Freeing dead tensors promptly
  #
  # MLX memory is freed when the BEAM collects the tensors that hold it, but an array handle
  # is a few words on the process heap, so a process can hold many dead tensors before its
  # heap fills up. Two costs follow. Dead evaluated results keep their buffers, so MLX takes
  # fresh memory from the system for the next ones (page faults) instead of reusing its cache
  # (32 MiB by default on the CPU). And intermediates of a computation that are still
  # referenced when it is evaluated (e.g. the steps of a softmax, dead but not collected) must
  # be kept whole, so MLX cannot free them early or compute in place in their buffers.
  # So a process that created at least @collect_before_eval bytes of results (in tensors of
  # 64 KiB or more) since its last collection is collected before it asks for an evaluation,
  # and every @collect_bytes of results in any case. A collection of a small heap costs
  # microseconds. Measured on the CPU device (2-core machine): a 4M-element f32 add went from
  # 9-11 ms to 1.6-1.9 ms per op (MLX alone: 1.3-1.5 ms).

  @collect_key :nx_mlx_result_bytes
  @collect_before_eval 1024 * 1024
  @collect_bytes 64 * 1024 * 1024

  @doc "Counts a result of `bytes` created by the calling process."
  def count_result(bytes) when bytes < 65_536, do: :ok

  def count_result(bytes) do
    total = (Process.get(@collect_key) || 0) + bytes

    if total >= @collect_bytes do
      collect()
    else
      Process.put(@collect_key, total)
      :ok
    end
  end

  @doc "Collects the calling process before an evaluation when it created enough results."
  def before_eval do
    if (Process.get(@collect_key) || 0) >= @collect_before_eval, do: collect()
    :ok
  end

  defp collect do
    Process.put(@collect_key, 0)
    :erlang.garbage_collect()
    :ok
  end

  @doc """
  Calls `Native.fun(args)` and returns its value, waiting for the worker's reply when the call
  was queued. `describe` is a zero-arity function returning the text that names the op, shapes
  and types, used only on failure. `await` waits for a queued call's reply (`await/2` unless
  the call also sends other messages first).
  """
  def call(fun, args, describe, await \\ &await/2) do
    if Process.get(:nx_mlx_recorder) do
      case NxMlx.Compiler.Recorder.call(fun, args, describe) do
        {:recorded, value} -> value
        :eager -> eager(fun, args, describe, await)
      end
    else
      eager(fun, args, describe, await)
    end
  end

  defp eager(fun, args, describe, await) do
    case native(fun, args, describe) do
      {:ok, value} ->
        value

      {:async, ref} ->
        await.(ref, describe)

      {:error, {:foreign, arrays}} ->
        # Inputs built on another worker's stream and not evaluated yet: MLX evaluates a
        # stream only on its own thread, so evaluate them there first, then build again.
        Enum.each(arrays, fn a -> eager(:eval, [a], describe, &await/2) end)
        eager(fun, args, describe, await)

      {:error, {:busy, _}} ->
        # The worker's queue is full: back off briefly so it can drain, then retry.
        Process.sleep(1)
        eager(fun, args, describe, await)

      {:error, reason} ->
        raise_error(reason, describe)
    end
  end

  # A NIF given a term it cannot decode (a forged or stale reference, a float where an
  # integer belongs) raises a bare `ArgumentError` ("argument error"): say which call it was.
  defp native(fun, args, describe) do
    apply(Native, fun, args)
  rescue
    e in ArgumentError ->
      if e.message == "argument error" do
        reraise ArgumentError,
                "#{describe.()}: invalid argument to NxMlx.Native.#{fun}/#{length(args)} " <>
                  "(#{Enum.map_join(args, ", ", &inspect(&1, limit: 3))})",
                __STACKTRACE__
      else
        reraise e, __STACKTRACE__
      end
  end

  @doc "Waits for the reply tagged `ref`."
  def await(ref, describe) do
    receive do
      {^ref, reply} -> reply_value(reply, describe)
    end
  end

  @doc "The value of a worker's reply, or the exception it stands for."
  def reply_value({:ok, value}, _describe), do: value
  def reply_value({:error, reason}, describe), do: raise_error(reason, describe)

  defp raise_error({:argument, message}, describe) do
    raise ArgumentError, "#{describe.()}: #{message}"
  end

  defp raise_error({_kind, message}, describe) do
    raise NxMlx.NIFError, "#{describe.()}: #{message}"
  end
end
