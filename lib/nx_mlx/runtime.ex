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

  @doc """
  Calls `Native.fun(args)` and returns its value, waiting for the worker's reply when the call
  was queued. `describe` is a zero-arity function returning the text that names the op, shapes
  and types, used only on failure.
  """
  def call(fun, args, describe) do
    case apply(Native, fun, args) do
      {:ok, value} ->
        value

      {:async, ref} ->
        await(ref, describe)

      {:error, {:foreign, arrays}} ->
        # Inputs built on another worker's stream and not evaluated yet: MLX evaluates a
        # stream only on its own thread, so evaluate them there first, then build again.
        Enum.each(arrays, &call(:eval, [&1], describe))
        call(fun, args, describe)

      {:error, {:busy, _}} ->
        # The worker's queue is full: back off briefly so it can drain, then retry.
        Process.sleep(1)
        call(fun, args, describe)

      {:error, reason} ->
        raise_error(reason, describe)
    end
  end

  @doc "Waits for the reply tagged `ref`."
  def await(ref, describe) do
    receive do
      {^ref, {:ok, value}} -> value
      {^ref, {:error, reason}} -> raise_error(reason, describe)
    end
  end

  defp raise_error({:argument, message}, describe) do
    raise ArgumentError, "#{describe.()}: #{message}"
  end

  defp raise_error({_kind, message}, describe) do
    raise NxMlx.NIFError, "#{describe.()}: #{message}"
  end
end
