# Nx's own defn test files, run with NxMlx as the compiler (see CONTRIBUTING.md, "Conformance
# with Nx's test files"). They are read from the local Nx checkout at test time, when it has
# its `test/` folder, with NxMlx.ConformanceCompiler put where a file names the Evaluator (or
# relies on it as the default); nothing of them is part of this repository. Each exclusion
# below carries its reason.
nx_dir = Mix.Project.deps_paths()[:nx]
nx_test = nx_dir && Path.join(nx_dir, "test")

files = ~w(
  nx/defn_test.exs
  nx/defn/grad_test.exs
  nx/defn/evaluator_test.exs
  nx/defn/composite_test.exs
  nx/defn/runtime_call_evaluator_test.exs
  nx/serving_test.exs
)

# {file, test name} => reason
excluded = %{}

if nx_test && Enum.all?(files, &File.exists?(Path.join(nx_test, &1))) do
  for support <- ~w(helpers.ex container.ex backends.ex nx_case.ex) do
    path = Path.join([nx_test, "support", support])
    if File.exists?(path), do: Code.require_file(path)
  end

  NxMlx.ConformanceCompiler.count_fallbacks()

  ExUnit.after_suite(fn _ ->
    case NxMlx.ConformanceCompiler.fallbacks() do
      [] -> :ok
      ops -> IO.puts("\nnx conformance: functions run through the Evaluator, by op: #{inspect(ops)}")
    end
  end)

  for file <- files do
    path = Path.join(nx_test, file)

    source =
      path
      |> File.read!()
      |> String.replace("Nx.Defn.Evaluator", "NxMlx.ConformanceCompiler")
      |> String.replace(~r/alias Nx\.Defn\.\{([^}]*)\bEvaluator\b([^}]*)\}/, "alias Nx.Defn.{\\1\\2}\n  alias NxMlx.ConformanceCompiler, as: Evaluator")
      |> String.replace(~r/alias Nx\.Defn\.\{([^}]*), \}/, "alias Nx.Defn.{\\1}")
      |> String.replace(
        ~r/^(  use ExUnit\.Case.*)$/m,
        "\\1\n  @moduletag :nx_conformance\n  setup do\n    Nx.Defn.default_options(compiler: NxMlx.ConformanceCompiler)\n    :ok\n  end\n",
        global: false
      )
      |> then(fn source ->
        Enum.reduce(excluded, source, fn
          {{^file, name}, reason}, source ->
            String.replace(source, "  test #{inspect(name)}", "  @tag skip: #{inspect(reason)}\n  test #{inspect(name)}")

          _, source ->
            source
        end)
      end)

    Code.compile_string(source, path)
  end
else
  IO.puts("nx conformance: NOT run (the Nx checkout has no test/ folder: #{inspect(nx_test)})")
end
