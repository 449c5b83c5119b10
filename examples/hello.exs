# A first computation on MLX, next to Nx.BinaryBackend: `mix run examples/hello.exs`.
mlx = {NxMlx.Backend, device: :cpu}

t = Nx.tensor([[1.0, 2.0], [3.0, 4.0]], backend: mlx)
result = t |> Nx.dot(t) |> Nx.add(1) |> Nx.sum()
IO.puts("dot(t, t) + 1, summed, on MLX:")
IO.inspect(result)

time = fn fun, reps ->
  fun.()

  {us, _} = :timer.tc(fn -> for _ <- 1..reps, do: fun.() end)
  us / reps / 1000
end

n = 128
key = Nx.Random.key(42)
{a, _} = Nx.Random.uniform(key, shape: {n, n}, type: :f32)

chain = fn x -> x |> Nx.dot(x) |> Nx.tanh() |> Nx.sum() |> Nx.to_number() end
a_mlx = Nx.backend_copy(a, mlx)

mlx_ms = time.(fn -> chain.(a_mlx) end, 50)
# The reference is slow: one timed run, no warm-up.
{bin_us, want} = :timer.tc(fn -> chain.(a) end)
bin_ms = bin_us / 1000
diff = abs(chain.(a_mlx) - want) / abs(want)

IO.puts("""

sum(tanh(dot(a, a))) for a #{n}x#{n} f32 matrix, with read-back:
  NxMlx.Backend (cpu):  #{Float.round(mlx_ms, 3)} ms
  Nx.BinaryBackend:     #{Float.round(bin_ms, 3)} ms
  speed-up:             #{Float.round(bin_ms / mlx_ms, 1)}x
  relative difference:  #{:erlang.float_to_binary(diff, decimals: 8)}
""")
