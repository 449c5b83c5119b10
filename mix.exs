Code.require_file("mix/nx_mlx_build.ex", __DIR__)
Code.require_file("mix/local_deps.ex", __DIR__)

defmodule NxMlx.MixProject do
  use Mix.Project

  @version "0.1.0"
  @source_url "https://github.com/nx-mlx/nx_mlx"

  def project do
    [
      app: :nx_mlx,
      version: @version,
      elixir: "~> 1.17",
      start_permanent: Mix.env() == :prod,
      compilers: [:nx_mlx_native] ++ Mix.compilers(),
      elixirc_paths: elixirc_paths(Mix.env()),
      deps: deps(),
      package: package(),
      description: "An Nx backend running on Apple's MLX: Linux CPU, NVIDIA GPUs and macOS",
      source_url: @source_url,
      docs: [main: "readme", extras: ["README.md", "CHANGELOG.md", "CONTRIBUTING.md"]]
    ]
  end

  def application do
    [
      extra_applications: [:logger],
      mod: {NxMlx.Application, []},
      env: [fallback: :silent]
    ]
  end

  defp elixirc_paths(:test), do: ["lib", "test/support"]
  defp elixirc_paths(_), do: ["lib"]

  defp deps do
    case NxMlx.LocalDeps.resolve() do
      {:local, paths} ->
        NxMlx.LocalDeps.deps(paths)

      {:hex, _missing} ->
        [
          {:nx, "~> 0.13"},
          {:telemetry, "~> 1.0"},
          {:axon, "~> 0.8", optional: true}
        ]
    end
  end

  defp package do
    [
      licenses: ["Apache-2.0"],
      links: %{"GitHub" => @source_url},
      files:
        ~w(lib mix native/Cargo.toml native/Cargo.lock native/mlx-bind native/nx_mlx_nif) ++
          ~w(mix.exs README.md CHANGELOG.md CONTRIBUTING.md LICENSE .formatter.exs),
      exclude_patterns: [~r{native/target}]
    ]
  end
end
