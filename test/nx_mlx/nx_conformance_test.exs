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

# {file, line of the test} => reason
float_exact = "asserts exact float equality; NxMlx's result differs in the last bit"

hook_eq =
  "compares an unnamed hook's value (an NxMlx tensor) with == to an Nx.BinaryBackend tensor"

peers = "needs the peer nodes Nx's own test_helper.exs starts"

excluded = %{
  {"nx/defn_test.exs", 2327} =>
    "Evaluator-specific: its creation ops run on Nx.default_backend(); NxMlx creates them on its device",
  {"nx/defn/evaluator_test.exs", 70} => float_exact <> " (QR factor 1.0954455 vs 1.0954454)",
  {"nx/defn/evaluator_test.exs", 291} =>
    "its Container struct derives Nx.Container, which needs unconsolidated protocols",
  {"nx/defn/evaluator_test.exs", 333} => hook_eq,
  {"nx/defn/evaluator_test.exs", 356} => hook_eq,
  {"nx/defn/evaluator_test.exs", 368} => hook_eq,
  {"nx/defn/evaluator_test.exs", 455} => hook_eq,
  {"nx/defn/grad_test.exs", 2009} => "complex128 inputs: MLX has no complex128",
  {"nx/defn/grad_test.exs", 3949} => float_exact <> " (26.220474 vs 26.220476)",
  {"nx/serving_test.exs", 1276} => peers,
  {"nx/serving_test.exs", 1318} => peers,
  {"nx/serving_test.exs", 1346} => peers,
  {"nx/serving_test.exs", 1404} => peers
}

if nx_test && Enum.all?(files, &File.exists?(Path.join(nx_test, &1))) do
  # Their container structs derive Nx protocols that are already consolidated here (the
  # one test that needs them is excluded): the compiler's warnings about it are dropped.
  for support <- ~w(helpers.ex container.ex backends.ex nx_case.ex) do
    path = Path.join([nx_test, "support", support])

    if File.exists?(path),
      do: ExUnit.CaptureIO.capture_io(:stderr, fn -> Code.require_file(path) end)
  end

  NxMlx.ConformanceCompiler.count_fallbacks()

  ExUnit.after_suite(fn _ ->
    IO.puts(
      "\nnx conformance: jitted functions run through the Evaluator (could not be lowered), " <>
        "by op: #{inspect(NxMlx.ConformanceCompiler.fallbacks(:evaluator))}; lowered with " <>
        "one op on the host, by op: #{inspect(NxMlx.ConformanceCompiler.fallbacks(:host_op))}"
    )
  end)

  for file <- files do
    path = Path.join(nx_test, file)

    source =
      path
      |> File.read!()
      |> String.replace("Nx.Defn.Evaluator", "NxMlx.ConformanceCompiler")
      |> String.replace(
        ~r/alias Nx\.Defn\.\{([^}]*)\bEvaluator\b([^}]*)\}/,
        "alias Nx.Defn.{\\1\\2}\n  alias NxMlx.ConformanceCompiler, as: Evaluator"
      )
      |> String.replace(~r/alias Nx\.Defn\.\{([^}]*), \}/, "alias Nx.Defn.{\\1}")
      # On the `use` line itself, so that line numbers (which some tests assert) stay.
      |> String.replace(
        ~r/^(  use ExUnit\.Case.*)$/m,
        "\\1; @moduletag :nx_conformance; setup do: Nx.Defn.default_options(compiler: NxMlx.ConformanceCompiler) && :ok",
        global: false
      )
      # Nx.Serving merges the default options (and so the compiler set above) into those its
      # servings receive, which serving_test.exs asserts.
      |> String.replace(
        ~r/(\{:init, .*batch_keys: \[:default\])/,
        "\\1, compiler: NxMlx.ConformanceCompiler"
      )
      # MLX has no complex128: the gradient tests that loop over [{:f, 64}, {:c, 128}] keep f64.
      |> String.replace("@types [{:f, 64}, {:c, 128}]", "@types [{:f, 64}]")
      |> then(fn source ->
        # Excluded tests get a skip tag on their own line (no line moves).
        lines = String.split(source, "\n")

        excluded
        |> Enum.filter(&match?({{^file, _}, _}, &1))
        |> Enum.reduce(lines, fn {{_, line}, reason}, lines ->
          List.update_at(lines, line - 1, &"@tag skip: #{inspect(reason)}; #{&1}")
        end)
        |> Enum.join("\n")
      end)

    # Compiled under the path relative to the checkout, as Nx's own runs see it (some tests
    # assert messages that carry it).
    Code.compile_string(source, Path.join("test", file))
  end
else
  IO.puts("nx conformance: NOT run (the Nx checkout has no test/ folder: #{inspect(nx_test)})")
end
