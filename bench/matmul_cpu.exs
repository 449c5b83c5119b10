# f32 matmul on the CPU device: `mix run bench/matmul_cpu.exs`.
# Prints, per size, MLX timed on its worker (eval only) and the eager Nx path
# (Nx.dot + Nx.to_binary through NxMlx.Backend), as GFLOP/s (median of the runs).
mlx = {NxMlx.Backend, device: :cpu}

for n <- [256, 512, 1024] do
  raw = NxMlx.Bench.matmul_gflops(n, 10)

  key = Nx.Random.key(n)
  {a, key} = Nx.Random.uniform(key, shape: {n, n}, type: :f32)
  {b, _} = Nx.Random.uniform(key, shape: {n, n}, type: :f32)
  a = Nx.backend_copy(a, mlx)
  b = Nx.backend_copy(b, mlx)
  run = fn -> Nx.dot(a, b) |> Nx.to_binary() end
  run.()

  times = for _ <- 1..10, do: elem(:timer.tc(run), 0) / 1.0e6
  eager = 2 * n * n * n / NxMlx.Bench.median(times) / 1.0e9

  IO.puts("matmul_f32_#{n}_gflops_worker: #{Float.round(raw, 1)}")
  IO.puts("matmul_f32_#{n}_gflops_eager: #{Float.round(eager, 1)}")
end
