defmodule NxMlx do
  @moduledoc """
  Nx on Apple's MLX, on Linux CPU, NVIDIA GPUs (MLX's CUDA build) and macOS.

      Nx.global_default_backend(NxMlx.Backend)
      # or per tensor, choosing the device:
      Nx.tensor([1.0, 2.0], backend: {NxMlx.Backend, device: :cpu})

  Every MLX call runs on a worker OS thread that owns an MLX stream; the calling process waits
  for the reply in `receive`, so BEAM schedulers never wait on MLX. Ops are lazy in MLX: they
  are evaluated when a tensor is read back (`Nx.to_binary/1`, `inspect/2`, …).
  """

  @doc "The devices this build of libmlx can run on, e.g. `[:cpu]` or `[:cpu, :gpu]`."
  def devices do
    NxMlx.Native.build_info()
    |> Map.fetch!("devices")
    |> String.split(",")
    |> Enum.map(&String.to_existing_atom/1)
  end

  @doc "The device tensors go to when none is given: `:gpu` when available, else `:cpu`."
  def default_device do
    case :persistent_term.get({__MODULE__, :default_device}, nil) do
      nil ->
        device = if :gpu in devices(), do: :gpu, else: :cpu
        :persistent_term.put({__MODULE__, :default_device}, device)
        device

      device ->
        device
    end
  end

  @doc """
  Facts about the loaded native code: MLX version, libmlx path, BLAS in use, variant, devices.
  """
  def build_info do
    NxMlx.Native.build_info()
  end
end
