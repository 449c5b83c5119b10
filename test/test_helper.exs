defmodule NxMlx.TestHelpers do
  @moduledoc false

  @doc """
  The device the oracle tests run on: `NX_MLX_TEST_DEVICE` (`cpu` by default, `gpu` to run
  them on a GPU build).
  """
  def oracle_device do
    if System.get_env("NX_MLX_TEST_DEVICE") == "gpu", do: :gpu, else: :cpu
  end

  @doc "The types of `list` the oracle device has (MLX has no f64 on the GPU)."
  def device_types(list) do
    if oracle_device() == :gpu, do: List.delete(list, {:f, 64}), else: list
  end

  @doc "Polls `fun` (after a garbage collection) until it returns true, for at most `ms` ms."
  def eventually(fun, ms \\ 5_000) do
    poll_until(fun, System.monotonic_time(:millisecond) + ms)
  end

  defp poll_until(fun, deadline) do
    :erlang.garbage_collect()

    cond do
      fun.() ->
        true

      System.monotonic_time(:millisecond) > deadline ->
        false

      true ->
        Process.sleep(10)
        poll_until(fun, deadline)
    end
  end

  @doc """
  Forwards telemetry `event` to the calling process as `{:telemetry, event, measurements,
  metadata}` until the test ends.
  """
  def forward_telemetry(event) do
    id = "#{inspect(event)}-#{inspect(make_ref())}"
    :ok = :telemetry.attach(id, event, &__MODULE__.forward/4, self())
    ExUnit.Callbacks.on_exit(fn -> :telemetry.detach(id) end)
  end

  @doc false
  def forward(event, measurements, metadata, {:own, pid}) do
    if self() == pid, do: send(pid, {:telemetry, event, measurements, metadata})
  end

  def forward(event, measurements, metadata, pid) do
    send(pid, {:telemetry, event, measurements, metadata})
  end

  @doc """
  Fails if `fun`, run in the calling process, falls back to Nx.BinaryBackend for an op
  other than those in `allowed`.
  """
  def assert_native(fun, allowed \\ []) do
    {result, ops} = with_fallbacks(fun)
    unexpected = Enum.uniq(ops) -- allowed

    if unexpected != [],
      do: raise(ExUnit.AssertionError, "fell back for #{inspect(unexpected)}")

    result
  end

  @doc "Runs `fun` in the calling process: `{result, ops that fell back, in order}`."
  def with_fallbacks(fun) do
    id = "native-#{inspect(make_ref())}"

    :ok =
      :telemetry.attach(id, [:nx_mlx, :fallback, :start], &__MODULE__.forward/4, {:own, self()})

    try do
      result = fun.()
      {result, Enum.reverse(collect_fallbacks([]))}
    after
      :telemetry.detach(id)
    end
  end

  defp collect_fallbacks(acc) do
    receive do
      {:telemetry, [:nx_mlx, :fallback, :start], _, %{op: op}} -> collect_fallbacks([op | acc])
    after
      0 -> acc
    end
  end
end

defmodule NxMlx.DocTestHelpers do
  @moduledoc false

  @doc """
  Nx.LinAlg examples left out wherever its doctests run on NxMlx: they print f32 results
  whose last digit differs, because MLX's matmul goes through BLAS, which rounds differently
  from Nx.BinaryBackend (which sums in f64) and differently again on other CPUs
  (least_squares 106 and 108 pass on some machines only); for lu/1 (79) MLX prints the exact
  4.0 and 1.0. The same examples are compared with a tolerance in
  test/nx_mlx/linalg_tolerance_test.exs.
  """
  def linalg_last_digit_examples do
    [
      "Nx.LinAlg.cholesky/1 (5)",
      "Nx.LinAlg.pinv/2 (67)",
      "Nx.LinAlg.lu/1 (79)",
      "Nx.LinAlg.matrix_power/2 (87)",
      "Nx.LinAlg.least_squares/3 (106)",
      "Nx.LinAlg.least_squares/3 (107)",
      "Nx.LinAlg.least_squares/3 (108)"
    ]
  end

  @doc """
  Like `ExUnit.DocTest.doctest/2`, but can leave out single examples: `skip_examples` lists
  their test names (e.g. `"Nx.LinAlg.lu/1 (79)"`); `doctest/2` itself can only leave out
  whole functions. Built on the same internals as `doctest/2`.
  """
  defmacro doctest_examples(mod, opts) do
    quote bind_quoted: [mod: mod, opts: opts] do
      {skip, doctest_opts} = Keyword.pop(opts, :skip_examples, [])
      file = ExUnit.DocTest.__file__(mod)
      tests = ExUnit.DocTest.__doctests__(mod, doctest_opts)
      names = Enum.map(tests, &elem(&1, 0))

      case skip -- names do
        [] -> :ok
        unknown -> raise ArgumentError, "no such doctests: #{inspect(unknown)}"
      end

      for {name, test, tags} <- tests, name not in skip do
        @file file
        doc =
          ExUnit.Case.register_test(__MODULE__, file, tags[:doctest_line], :doctest, name, tags)

        def unquote(doc)(_), do: unquote(test)
      end
    end
  end
end

# GPU-tagged tests run only where MLX sees a GPU (the CUDA or Metal variant).
exclude = if :gpu in NxMlx.devices(), do: [], else: [:gpu]
# Tests of the debug checks run only in a build that has them compiled in, and tests of the
# behaviour without them only in a build that has not.
exclude =
  if Application.get_env(:nx_mlx, :debug_bounds_check),
    do: [:no_debug_checks | exclude],
    else: [:debug_checks | exclude]

# f64 exists only on the CPU device: leave its tests out when the oracles run on the GPU.
exclude = if NxMlx.TestHelpers.oracle_device() == :gpu, do: [:f64 | exclude], else: exclude
# Axon is an optional test dependency (a local checkout or Hex; CONTRIBUTING.md).
exclude =
  if Code.ensure_loaded?(Axon) do
    exclude
  else
    IO.puts("Axon not available: the tests tagged :axon are skipped (see CONTRIBUTING.md)")
    [:axon | exclude]
  end

ExUnit.start(exclude: exclude)
