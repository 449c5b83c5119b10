defmodule Mix.Tasks.NxMlx.Info do
  @shortdoc "Prints what nx_mlx runs on: MLX version, libmlx, devices, BLAS, matmul speed"
  @moduledoc """
  Prints `key: value` lines describing the loaded native code:

      nx_mlx: 0.1.0
      mlx: 0.32.4
      variant: cpu
      libmlx: /home/me/.cache/nx_mlx/mlx-0.32.4-cpu-linux-x86_64/mlx/lib/libmlx.so
      devices: cpu
      blas: openblas
      blas_library: /lib/x86_64-linux-gnu/libopenblas.so.0
      matmul_f32_1024_gflops: 231.4

  `blas` names the library that provides `cblas_sgemm` to libmlx (`openblas`, `reference`
  for the wheel's bundled reference BLAS, `accelerate` on macOS). `matmul_f32_1024_gflops`
  is the median of 10 timed, evaluated 1024x1024 f32 matmuls on the CPU device.

  Options: `--no-bench` skips the timing.
  """
  use Mix.Task

  @impl true
  def run(args) do
    Mix.Task.run("app.start")
    {opts, _} = OptionParser.parse!(args, strict: [bench: :boolean])
    info = NxMlx.build_info()

    lines = [
      nx_mlx: Application.spec(:nx_mlx, :vsn),
      mlx: info["mlx"],
      variant: info["variant"],
      libmlx: info["libmlx"],
      devices: info["devices"],
      blas: info["blas"],
      blas_library: info["blas_library"]
    ]

    Enum.each(lines, fn {k, v} -> IO.puts("#{k}: #{v}") end)

    if Keyword.get(opts, :bench, true) do
      IO.puts("matmul_f32_1024_gflops: #{Float.round(NxMlx.Bench.matmul_gflops(1024, 10), 1)}")
    end
  end
end
