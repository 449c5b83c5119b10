defmodule NxMlx.Application do
  @moduledoc false
  use Application

  require Logger

  @impl true
  def start(_type, _args) do
    warn_about_reference_blas()
    set_cache_limit()

    Supervisor.start_link([NxMlx.Telemetry, NxMlx.Compiler.Cache],
      strategy: :one_for_one,
      name: NxMlx.Supervisor
    )
  end

  # MLX caches freed buffers for reuse up to a limit, 32 MiB by default in the CPU-only build:
  # too small once tensors reach tens of MiB. A freed buffer that does not fit goes back to the
  # system and the next op of that size page-faults fresh memory: measured on a 4M-element f32
  # add after larger work had filled the cache, 11 ms per op instead of 2, and with a 256 MiB
  # cache an exp over 32M f32 (128 MiB buffers) took 56 ms instead of 11. So the CPU-only
  # build raises it to an eighth of MLX's memory limit (itself most of the machine's memory),
  # at least @cpu_cache_limit, and never lowers it; `config :nx_mlx, cache_limit:` takes a
  # byte count, or :mlx_default to keep MLX's. GPU builds keep MLX's default.
  @cpu_cache_limit 256 * 1024 * 1024

  defp set_cache_limit do
    case Application.get_env(:nx_mlx, :cache_limit, :auto) do
      :mlx_default ->
        :ok

      bytes when is_integer(bytes) and bytes >= 0 ->
        NxMlx.set_cache_limit(bytes)

      :auto ->
        if NxMlx.devices() == [:cpu] do
          target = max(@cpu_cache_limit, div(NxMlx.memory().limit, 8))
          previous = NxMlx.set_cache_limit(target)
          if previous > target, do: NxMlx.set_cache_limit(previous)
        end
    end
  rescue
    # The NIF did not load; NxMlx.Native already warned about that.
    _ -> :ok
  end

  # The mlx-cpu wheel's bundled reference BLAS is ~30x slower for matmul than OpenBLAS.
  defp warn_about_reference_blas do
    if NxMlx.Native.build_info()["blas"] == "reference" do
      Logger.warning(
        "nx_mlx: libmlx uses its bundled reference BLAS (slow matmul); install " <>
          "libopenblas0-pthread and rebuild nx_mlx (see the README, Platforms and variants)"
      )
    end
  rescue
    # The NIF did not load; NxMlx.Native already warned about that.
    _ -> :ok
  end
end
