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
      blas_version: 0.3.29
      blas_core: Cooperlake
      blas_coretype_override: none
      blas_idle_spin: 16
      cpu_vector_isa: avx512
      matmul_f32_1024_gflops: 195.2

  `blas` names the library that provides `cblas_sgemm` to libmlx (`openblas`, `reference`
  for the wheel's bundled reference BLAS, `accelerate` on macOS). `blas_version` and
  `blas_core` are OpenBLAS's version and the kernel set it chose for this CPU (`none` for
  other libraries), `blas_coretype_override` the `OPENBLAS_CORETYPE` forcing it, if any;
  when that set is generic, or AVX2 on an AVX-512 CPU, a warning says how to change it (see
  `NxMlx.Blas`). `blas_idle_spin` is the exponent of OpenBLAS's idle busy-wait after a
  threaded call (2^n cycles; nx_mlx sets 16 unless configured, see `NxMlx.Blas`).
  `matmul_f32_1024_gflops` is the median of 10 timed,
  evaluated 1024x1024 f32 matmuls on the CPU device.

  Options: `--no-bench` skips the timing.
  """
  use Mix.Task

  @impl true
  def run(args) do
    Mix.Task.run("app.start")
    {opts, _} = OptionParser.parse!(args, strict: [bench: :boolean])
    info = NxMlx.build_info()
    blas = NxMlx.Blas.info()

    lines = [
      nx_mlx: Application.spec(:nx_mlx, :vsn),
      mlx: info["mlx"],
      variant: info["variant"],
      libmlx: info["libmlx"],
      devices: info["devices"],
      blas: info["blas"],
      blas_library: info["blas_library"],
      blas_version: blas.version || "none",
      blas_core: blas.core || "none",
      blas_coretype_override: blas.coretype_override || "none",
      blas_idle_spin: blas.idle_spin || "none",
      cpu_vector_isa: blas.cpu
    ]

    Enum.each(lines, fn {k, v} -> IO.puts("#{k}: #{v}") end)
    if blas.warning, do: Mix.shell().error("warning: " <> blas.warning)

    if Keyword.get(opts, :bench, true) do
      IO.puts("matmul_f32_1024_gflops: #{Float.round(NxMlx.Bench.matmul_gflops(1024, 10), 1)}")
    end
  end
end
