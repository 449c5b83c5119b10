defmodule NxMlx.Runtime do
  @moduledoc false
  # The one place that talks to the NIF's asynchronous calls: it picks the worker for a
  # device, and turns `{:ok, ref}` + the worker's reply message into a value, or raises.
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
  Calls `Native.fun(args)` and waits for the worker's reply. `describe` is a zero-arity
  function returning the text that names the op, shapes and types, used only on failure.
  """
  def call(fun, args, describe) do
    case apply(Native, fun, args) do
      {:ok, ref} when is_reference(ref) ->
        receive do
          {^ref, {:ok, value}} -> value
          {^ref, {:error, reason}} -> raise_error(reason, describe)
        end

      {:error, {:busy, _}} ->
        # The worker's queue is full: back off briefly so it can drain, then retry.
        Process.sleep(1)
        call(fun, args, describe)

      {:error, reason} ->
        raise_error(reason, describe)
    end
  end

  defp raise_error({:argument, message}, describe) do
    raise ArgumentError, "#{describe.()}: #{message}"
  end

  defp raise_error({_kind, message}, describe) do
    raise NxMlx.NIFError, "#{describe.()}: #{message}"
  end
end
