defmodule NxMlx.LocalDeps do
  @moduledoc false
  # Offline builds from local source checkouts of nx, complex and telemetry.
  #
  # Users get Nx and telemetry from Hex. Where Hex is unreachable, a developer points the
  # build at local checkouts instead (CONTRIBUTING.md):
  #
  #   NX_MLX_DEPS_DIR       folder holding nx/ (the package folder with mix.exs), complex/,
  #                         telemetry/; default ~/.local/share/nx_mlx/deps
  #   NX_MLX_NX_PATH, NX_MLX_COMPLEX_PATH, NX_MLX_TELEMETRY_PATH   one checkout each
  #   NX_MLX_DEPS=hex|local force a mode (default: local when all three checkouts exist)
  #
  # Optional: axon/ and polaris/ in the same folder (or NX_MLX_AXON_PATH,
  # NX_MLX_POLARIS_PATH) add Axon to the build (NxMlx.Axon); without them its tests are skipped.

  @names [:nx, :complex, :telemetry]
  @optional [:axon, :polaris]

  def default_dir, do: Path.expand("~/.local/share/nx_mlx/deps")

  @doc "`{:local, %{nx: path, ...}}` or `{:hex, missing}` with the missing checkouts."
  def resolve(env \\ System.get_env()) do
    paths = checkout_paths(@names, env)

    missing = for {name, path} <- paths, not File.regular?(Path.join(path, "mix.exs")), do: name

    case {Map.get(env, "NX_MLX_DEPS"), missing} do
      {"hex", _} -> {:hex, missing}
      {_, []} -> {:local, paths}
      {"local", _} -> Mix.raise(missing_message(paths, missing))
      _ -> {:hex, missing}
    end
  end

  def missing_message(paths, missing) do
    lines = for name <- missing, do: "  #{name}: no mix.exs at #{paths[name]}"

    """
    nx_mlx: local dependency checkouts are missing:
    #{Enum.join(lines, "\n")}
    Set NX_MLX_DEPS_DIR (a folder with nx/, complex/ and telemetry/) or NX_MLX_<NAME>_PATH,
    or use Hex (NX_MLX_DEPS=hex). See CONTRIBUTING.md.
    """
  end

  @doc "Deps for mix.exs in local mode: path deps that override the Hex requirements of Nx."
  def deps(paths) do
    Mix.SCM.append(NxMlx.LocalDeps.SCM)

    [
      {:nx, path: paths.nx, override: true},
      {:complex, path: paths.complex, override: true},
      {:telemetry, path: paths.telemetry, override: true}
    ] ++ optional_deps()
  end

  @doc "The optional checkouts found (all of `#{inspect(@optional)}` or none)."
  def optional_paths(env \\ System.get_env()) do
    paths = checkout_paths(@optional, env)

    if Enum.all?(paths, fn {_, path} -> File.regular?(Path.join(path, "mix.exs")) end),
      do: paths,
      else: %{}
  end

  # Where each checkout is looked for: NX_MLX_<NAME>_PATH, else <NX_MLX_DEPS_DIR>/<name>.
  defp checkout_paths(names, env) do
    dir = Map.get(env, "NX_MLX_DEPS_DIR") || default_dir()

    Map.new(names, fn name ->
      var = "NX_MLX_#{name |> Atom.to_string() |> String.upcase()}_PATH"
      {name, Path.expand(Map.get(env, var) || Path.join(dir, Atom.to_string(name)))}
    end)
  end

  defp optional_deps do
    for {name, path} <- Enum.sort(optional_paths()),
        do: {name, path: path, override: true, optional: true}
  end

  defmodule SCM do
    @moduledoc false
    # Without Hex installed, Mix cannot even read a dependency's Hex requirements (such as
    # Nx's `{:complex, "~> 0.7"}`). In local mode every such requirement is overridden by a
    # path dependency above, so this SCM only has to accept them; it never fetches anything.
    @behaviour Mix.SCM

    @impl true
    def fetchable?, do: false
    @impl true
    def format(_opts), do: "local checkout (offline build)"
    @impl true
    def format_lock(_opts), do: nil
    @impl true
    def accepts_options(_app, opts) do
      if Enum.any?([:path, :git, :github], &Keyword.has_key?(opts, &1)), do: nil, else: opts
    end

    @impl true
    def checked_out?(_opts), do: false
    @impl true
    def lock_status(_opts), do: :ok
    @impl true
    def equal?(_a, _b), do: true
    @impl true
    def managers(_opts), do: []
    @impl true
    def checkout(opts) do
      Mix.raise(
        "nx_mlx offline build: #{inspect(opts[:dest] && Path.basename(opts[:dest]))} is needed " <>
          "but has no local checkout; add it as a path dependency or use Hex (NX_MLX_DEPS=hex)"
      )
    end

    @impl true
    def update(opts), do: checkout(opts)
  end
end

defmodule Mix.Tasks.NxMlx.Deps do
  @shortdoc "Says where Nx comes from (local checkouts or Hex) and what is missing"
  @moduledoc """
  Prints `mode: local` or `mode: hex`, then, in Hex mode, the local checkouts that were not
  found. Used by `scripts/setup` and `scripts/test`; see CONTRIBUTING.md.
  """
  use Mix.Task

  @impl true
  def run(_args) do
    case NxMlx.LocalDeps.resolve() do
      {:local, paths} ->
        IO.puts("mode: local")
        for {name, path} <- paths, do: IO.puts("#{name}: #{path}")

        case NxMlx.LocalDeps.optional_paths() do
          empty when map_size(empty) == 0 -> IO.puts("axon: not found (its tests are skipped)")
          optional -> for {name, path} <- optional, do: IO.puts("#{name}: #{path}")
        end

      {:hex, missing} ->
        IO.puts("mode: hex")
        IO.puts("local_checkouts_missing: #{Enum.join(missing, ",")}")

        IO.puts(
          "local_dir: #{System.get_env("NX_MLX_DEPS_DIR") || NxMlx.LocalDeps.default_dir()}"
        )
    end
  end
end
