defmodule NxMlx.ConformanceCompiler do
  @moduledoc false
  # `compiler: NxMlx`, for running Nx's own defn test files (test/nx_mlx/nx_conformance_test.exs):
  # every call is compiled and run by NxMlx; the results are then copied to Nx.BinaryBackend,
  # because those files compare results with `==` against Nx.BinaryBackend tensors. Each
  # function NxMlx could not lower whole is counted, by op and by what ran on the host (see
  # `fallbacks/0`).

  @behaviour Nx.Defn.Compiler

  # Named hooks given in the options (as Nx.Serving's streaming passes them) receive their
  # values on Nx.BinaryBackend too.
  @impl true
  def __jit__(key, vars, fun, args_list, opts) do
    key |> NxMlx.__jit__(vars, fun, args_list, wrap_hooks(opts)) |> Enum.map(&to_binary_backend/1)
  end

  @impl true
  def __compile__(key, vars, fun, opts) do
    compiled = NxMlx.__compile__(key, vars, fun, wrap_hooks(opts))
    fn args_list -> args_list |> compiled.() |> Enum.map(&to_binary_backend/1) end
  end

  @impl true
  def __partitions_options__(opts), do: NxMlx.__partitions_options__(opts)

  @impl true
  def __to_backend__(_opts), do: {Nx.BinaryBackend, []}

  # NX_MLX_CONFORMANCE_OPTS adds compiler options to every call (e.g. "rewrites: true, fuse:
  # true" runs the CPU conformance through the GPU's defaults).
  defp extra_opts do
    case System.get_env("NX_MLX_CONFORMANCE_OPTS") do
      nil -> []
      text -> elem(Code.eval_string("[" <> text <> "]"), 0)
    end
  end

  defp wrap_hooks(opts) do
    opts = Keyword.merge(opts, extra_opts())

    case Keyword.get(opts, :hooks) do
      hooks when is_map(hooks) and map_size(hooks) > 0 ->
        wrapped = Map.new(hooks, fn {name, f} -> {name, fn v -> f.(to_binary_backend(v)) end} end)
        Keyword.put(opts, :hooks, wrapped)

      _ ->
        opts
    end
  end

  defp to_binary_backend(result) do
    Nx.Defn.Composite.traverse(result, fn
      %Nx.Tensor{data: %NxMlx.Backend{}} = t -> Nx.backend_transfer(t, Nx.BinaryBackend)
      other -> other
    end)
  end

  @doc "Starts counting fallbacks (to the Evaluator, or of one op to the host) by op."
  def count_fallbacks do
    # The table outlives the process that loads the test files.
    parent = self()

    spawn(fn ->
      :ets.new(__MODULE__, [:named_table, :public, :set])
      send(parent, :table_ready)
      Process.sleep(:infinity)
    end)

    receive do
      :table_ready -> :ok
    end

    :telemetry.attach(
      __MODULE__,
      [:nx_mlx, :compiler, :fallback],
      &__MODULE__.handle_fallback/4,
      nil
    )
  end

  @doc false
  def handle_fallback(_event, _measurements, %{op: op, mode: mode}, _config) do
    :ets.update_counter(__MODULE__, {mode, op}, 1, {{mode, op}, 0})
  end

  @doc "`[{op, count}]` of the fallbacks of `mode` (`:evaluator` or `:host_op`)."
  def fallbacks(mode) do
    for({{^mode, op}, n} <- :ets.tab2list(__MODULE__), do: {op, n})
    |> Enum.sort_by(&(-elem(&1, 1)))
  rescue
    ArgumentError -> []
  end
end
