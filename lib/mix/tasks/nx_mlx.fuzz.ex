defmodule Mix.Tasks.NxMlx.Fuzz do
  @shortdoc "Runs random valid and invalid calls of the whole API in child VMs"
  @moduledoc """
  Generates random valid and invalid calls across the API (every Nx op family on
  `NxMlx.Backend` tensors, direct backend callbacks, `NxMlx.Native` functions with hostile
  arguments, command queues, commands, pipelines and the memory API), runs each in a child
  VM and classifies it:

    * `ok`: the result agrees with the same call on `Nx.BinaryBackend` (within the tolerance
      of its type, see `NxMlx.Fuzz.Exec`);
    * `expected`: an `ArgumentError` naming the op, or the very exception Nx's front end
      raised on `Nx.BinaryBackend` (direct backend and NIF calls: any error return or raise);
    * `documented`: a difference the `NxMlx.Backend` moduledoc documents (the table of
      divergences in `NxMlx.Fuzz.Exec`);
    * `disagree`: values (or raising) differ from `Nx.BinaryBackend`;
    * `other_exc`: any other exception;
    * `crash`: the child VM died; `hang`: no answer within the timeout (the child is killed).

      mix nx_mlx.fuzz --calls 1000 --seed 7
      mix nx_mlx.fuzz --calls 200 --seed 7 --device gpu
      mix nx_mlx.fuzz --seed 7 --only 17,42      # reruns cases and prints them in full

  Options: `--calls N` (default 1000, 200 with `--quick`), `--seed S` (default 1),
  `--first I` (first case index, default 0), `--only I,J` (just these indices),
  `--device cpu|gpu`, `--lane eager|jit` (`jit`: the NxMlx side of each Nx call runs as a
  function jitted with `compiler: NxMlx`, its tensor arguments the function's parameters;
  default `eager`), `--batch N` (cases per child VM, default 250), `--timeout MS` (per
  case, default 30000), `--memory-limit BYTES` (`NxMlx.set_memory_limit/1` in the child,
  default 4 GiB), `--jobs N` (N child VMs at a time, each running every N-th case; default
  1: the report does not depend on it), `--no-compile` and `--no-deps-check` (as for
  `mix run`: run a build made elsewhere), `--strict` (exit non-zero when a crash, hang, other
  exception or disagreement was seen; otherwise the exit status is 0: the output is a
  report).

  Every case is a pure function of (seed, index). The output ends with `key: value` lines,
  the last five `calls`, `crashes`, `hangs`, `other_exceptions` and `disagreements`.
  """
  use Mix.Task

  @switches [
    calls: :integer,
    seed: :integer,
    first: :integer,
    only: :string,
    device: :string,
    lane: :string,
    quick: :boolean,
    batch: :integer,
    timeout: :integer,
    memory_limit: :integer,
    jobs: :integer,
    strict: :boolean,
    no_compile: :boolean,
    no_deps_check: :boolean
  ]

  @impl true
  def run(args) do
    {opts, _} = OptionParser.parse!(args, strict: @switches)
    unless opts[:no_compile], do: Mix.Task.run("compile")
    Mix.Task.run("loadpaths", if(opts[:no_deps_check], do: ["--no-deps-check"], else: []))
    Application.load(:nx_mlx)

    device =
      case Keyword.get(opts, :device, "cpu") do
        "cpu" -> :cpu
        "gpu" -> :gpu
        other -> Mix.raise("--device takes cpu or gpu, got #{inspect(other)}")
      end

    lane =
      case Keyword.get(opts, :lane, "eager") do
        "eager" -> :eager
        "jit" -> :jit
        other -> Mix.raise("--lane takes eager or jit, got #{inspect(other)}")
      end

    only =
      case opts[:only] do
        nil -> nil
        list -> list |> String.split(",", trim: true) |> Enum.map(&String.to_integer/1)
      end

    calls = opts[:calls] || if(opts[:quick], do: 200, else: 1000)

    run_opts =
      [
        calls: calls,
        device: device,
        lane: lane,
        only: only,
        progress: if(only, do: nil, else: :stderr)
      ] ++
        Keyword.take(opts, [:seed, :first, :batch, :timeout, :memory_limit, :jobs])

    outcome = NxMlx.Fuzz.run(run_opts)

    if only do
      Enum.each(outcome.results, &IO.puts(NxMlx.Fuzz.describe(&1, device)))
      IO.puts("")
    end

    IO.puts(NxMlx.Fuzz.report(outcome, run_opts))

    totals = NxMlx.Fuzz.totals(outcome.results)
    bad = totals.crash + totals.hang + totals.other_exception + totals.disagreement

    if opts[:strict] && bad > 0 do
      Mix.raise("nx_mlx.fuzz: #{bad} failing cases (--strict)")
    end
  end
end
