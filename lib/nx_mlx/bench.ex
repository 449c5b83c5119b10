defmodule NxMlx.Bench do
  @moduledoc """
  Self-measurement helpers used by `mix nx_mlx.info` and the benchmarks.
  """

  @doc """
  The median GFLOP/s of `reps` evaluated `n`x`n` matmuls of `type` on `device`, timed on the
  worker thread around MLX's evaluation (after two warm-up runs).
  """
  def matmul_gflops(n, reps, type \\ {:f, 32}, device \\ :cpu) do
    worker = NxMlx.Runtime.worker(device)
    dtype = NxMlx.Types.to_mlx(type)

    times =
      NxMlx.Runtime.call(:matmul_benchmark, [worker, n, reps, dtype], fn ->
        "NxMlx.Bench.matmul_gflops(#{n})"
      end)

    2 * n * n * n / median(times) / 1.0e9
  end

  @doc "The median of a non-empty list of numbers."
  def median(list) do
    sorted = Enum.sort(list)
    len = length(sorted)
    mid = div(len, 2)

    if rem(len, 2) == 1,
      do: Enum.at(sorted, mid),
      else: (Enum.at(sorted, mid - 1) + Enum.at(sorted, mid)) / 2
  end
end
