# Eager-op cost on a 16-element f32 tensor on the CPU device: `mix run bench/dispatch.exs`
# (`NX_MLX_BENCH_DEVICE=gpu` measures the GPU device instead).
#
#   dispatch_us: one Nx.add through NxMlx.Backend, dispatch only: a chain of lazy adds is
#                built and the time is divided by its length (evaluation excluded).
#   readback_us: one Nx.add followed by Nx.to_binary (evaluation on the worker, reply,
#                copy), timed one at a time.
#
# Both are medians over several rounds. References from the same run are printed first: the
# same measurements on Nx.BinaryBackend, and MLX's own cost measured on the worker thread with
# no BEAM in the loop (building the add; evaluating it and copying it out). The last two lines
# are the results.
defmodule DispatchBench do
  @chain 2_000
  @rounds 15
  @readbacks 2_000

  def run(backend) do
    a = Nx.iota({16}, type: :f32, backend: backend)
    b = Nx.tensor(1.0, type: :f32, backend: backend) |> Nx.broadcast({16})
    # Warm up both paths.
    chain(a, b, 200) |> Nx.to_binary()
    for _ <- 1..200, do: Nx.add(a, b) |> Nx.to_binary()

    dispatch =
      for _ <- 1..@rounds do
        {us, out} = :timer.tc(fn -> chain(a, b, @chain) end)
        # Evaluate outside the timed region, so that every round starts from a clean graph.
        check!(out, a, @chain)
        us / @chain
      end

    readback =
      for _ <- 1..@readbacks do
        {us, _} = :timer.tc(fn -> Nx.add(a, b) |> Nx.to_binary() end)
        us
      end

    {NxMlx.Bench.median(dispatch), NxMlx.Bench.median(readback)}
  end

  defp chain(a, b, n), do: Enum.reduce(1..n, a, fn _, acc -> Nx.add(acc, b) end)

  defp check!(out, a, n) do
    expected = Nx.add(Nx.backend_copy(a, Nx.BinaryBackend), n)
    got = Nx.backend_copy(out, Nx.BinaryBackend)

    unless Nx.to_number(Nx.all_close(got, expected)) == 1 do
      raise "wrong result after a chain of #{n} adds"
    end
  end
end

device =
  case System.get_env("NX_MLX_BENCH_DEVICE", "cpu") do
    "gpu" -> :gpu
    _ -> :cpu
  end

{bin_dispatch, bin_readback} = DispatchBench.run(Nx.BinaryBackend)
{dispatch, readback} = DispatchBench.run({NxMlx.Backend, device: device})

{raw_build, raw_readback} =
  NxMlx.Runtime.call(:readback_benchmark, [NxMlx.Runtime.worker(device), 5_000], fn ->
    "readback_benchmark"
  end)

cores = System.schedulers_online()

IO.puts(
  "machine: #{:erlang.system_info(:system_architecture)}, #{cores} schedulers, device #{device}"
)

IO.puts("reference_binary_backend_dispatch_us: #{Float.round(bin_dispatch, 2)}")
IO.puts("reference_binary_backend_readback_us: #{Float.round(bin_readback / 1, 2)}")
IO.puts("reference_raw_mlx_build_us: #{Float.round(raw_build, 2)}")
IO.puts("reference_raw_mlx_eval_copy_us: #{Float.round(raw_readback, 2)}")
IO.puts("dispatch_us: #{Float.round(dispatch, 2)}")
IO.puts("readback_us: #{Float.round(readback / 1, 2)}")
