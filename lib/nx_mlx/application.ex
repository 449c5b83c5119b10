defmodule NxMlx.Application do
  @moduledoc false
  use Application

  require Logger

  @impl true
  def start(_type, _args) do
    warn_about_reference_blas()
    Supervisor.start_link([NxMlx.Telemetry], strategy: :one_for_one, name: NxMlx.Supervisor)
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
