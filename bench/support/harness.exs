defmodule Bench.Harness do
  @moduledoc false
  # Timing, tables, key lines, CSV and plots for bench/run.exs (plain Elixir).
  #
  # A measurement: `warmup` untimed runs, then timed runs (at least `min_reps`, at most
  # `max_reps`, or until `budget_s` has passed); the median and the 10th and 90th percentiles,
  # in milliseconds. mlx_raw_bench and bench/reference/torch_bench.py use the same method.

  #
  # Paired measurement (`measure_paired/4`): NxMlx and mlx_raw_bench's same case (the raw
  # bench in `--serve` mode, `paired` below) timed in alternating blocks, so that both see the
  # same machine: on a small shared machine the speed drifts by tens of percent within
  # seconds, which separate runs turn into ratios that mean little. Each block waits
  # `pair_gap_ms` first: OpenBLAS's threads spin for about 0.1 s after a matmul, so one side's
  # idle threads would otherwise take a core from the other side's next runs (measured on
  # 2 vCPUs with back-to-back alternation: a 4-layer MLP took 28 ms here and 34 in the raw
  # bench, against 17 and 17 timed separately).

  defstruct warmup: 3,
            min_reps: 5,
            max_reps: 20,
            budget_s: 3.0,
            paired: nil,
            pair_blocks: 6,
            pair_block_ms: 60,
            pair_gap_ms: 150

  def settings(quick?) do
    if quick?,
      do: %__MODULE__{warmup: 1, min_reps: 3, max_reps: 5, budget_s: 0.5, pair_blocks: 3},
      else: %__MODULE__{}
  end

  @doc """
  Times `fun` (which must leave its work finished) per the settings. Each case starts clean:
  the process's dead tensors of earlier cases are collected and freed first, as a program
  doing only this work would have none.
  """
  def measure(%__MODULE__{} = s, fun) do
    settle()
    for _ <- 1..s.warmup//1, do: fun.()
    start = System.monotonic_time()
    times = timed(s, fun, start, [])
    summary(times)
  end

  defp timed(s, fun, start, acc) do
    elapsed_s =
      System.convert_time_unit(System.monotonic_time() - start, :native, :microsecond) / 1.0e6

    n = length(acc)

    if n >= s.min_reps and (n >= s.max_reps or elapsed_s >= s.budget_s) do
      acc
    else
      t0 = System.monotonic_time()
      fun.()
      ms = System.convert_time_unit(System.monotonic_time() - t0, :native, :nanosecond) / 1.0e6
      timed(s, fun, start, [ms | acc])
    end
  end

  @doc """
  Starts mlx_raw_bench in `--serve` mode with the cases of `suites` set up: the port, or nil
  when it fails to start.
  """
  def open_paired(raw_bin, device, suites, env) do
    port =
      Port.open({:spawn_executable, raw_bin}, [
        :binary,
        :exit_status,
        {:line, 4096},
        args: ["--device", Atom.to_string(device), "--serve" | suites],
        env: for({k, v} <- env, do: {String.to_charlist(k), String.to_charlist(v)})
      ])

    receive do
      {^port, {:data, {:eol, "ready"}}} -> port
      {^port, {:exit_status, _}} -> nil
    after
      600_000 -> nil
    end
  end

  # One run of the raw bench's case `key`, in milliseconds (timed by the raw bench).
  defp raw_run(port, key) do
    Port.command(port, key <> "\n")

    receive do
      {^port, {:data, {:eol, "error: " <> message}}} ->
        raise "mlx_raw_bench --serve: #{message}"

      {^port, {:data, {:eol, ms}}} ->
        String.to_float(ms)

      {^port, {:exit_status, status}} ->
        raise "mlx_raw_bench --serve exited (#{status})"
    end
  end

  @doc """
  Times `fun` and the raw bench's case `key` in alternating blocks (see the module's head):
  warm-up runs of both, then `pair_blocks` pairs of blocks (which side runs first
  alternates); a block waits `pair_gap_ms`, then runs its side at least 3 times and for at
  least `pair_block_ms`. Returns `{ours, raw, ratio}`: summaries of our block medians, the
  raw block medians and the per-pair ratios raw / ours (above 1: NxMlx is faster).
  """
  def measure_paired(%__MODULE__{} = s, fun, port, key) do
    settle()

    for _ <- 1..s.warmup//1 do
      fun.()
      raw_run(port, key)
    end

    ours = fn ->
      t0 = System.monotonic_time()
      fun.()
      System.convert_time_unit(System.monotonic_time() - t0, :native, :nanosecond) / 1.0e6
    end

    raw = fn -> raw_run(port, key) end

    pairs =
      for n <- 1..s.pair_blocks do
        if rem(n, 2) == 0 do
          o = block(s, ours)
          {o, block(s, raw)}
        else
          r = block(s, raw)
          {block(s, ours), r}
        end
      end

    {summary(Enum.map(pairs, &elem(&1, 0))), summary(Enum.map(pairs, &elem(&1, 1))),
     summary(Enum.map(pairs, fn {o, r} -> r / o end))}
  end

  # The median of one block's runs of `run` (each returning its milliseconds).
  defp block(s, run) do
    Process.sleep(s.pair_gap_ms)
    start = System.monotonic_time(:millisecond)

    Stream.repeatedly(run)
    |> Enum.reduce_while([], fn ms, acc ->
      acc = [ms | acc]

      if length(acc) >= 3 and System.monotonic_time(:millisecond) - start >= s.pair_block_ms,
        do: {:halt, acc},
        else: {:cont, acc}
    end)
    |> summary()
    |> Map.fetch!(:median)
  end

  @doc "Collects this process and waits until the workers have freed what it released."
  def settle do
    :erlang.garbage_collect()

    for device <- NxMlx.devices() do
      NxMlx.CommandQueue.synchronize(NxMlx.CommandQueue.default(device))
    end

    :ok
  end

  def summary(times) do
    sorted = Enum.sort(times)
    at = fn q -> Enum.at(sorted, round((length(sorted) - 1) * q)) end
    %{median: at.(0.5), p10: at.(0.1), p90: at.(0.9)}
  end

  @doc "Parses `key: value` lines into a map of numbers (non-numeric values kept as strings)."
  def parse_keys(output) do
    for line <- String.split(output, "\n"),
        [key, value] <- [String.split(line, ": ", parts: 2)],
        key != "",
        into: %{} do
      case Float.parse(String.trim(value)) do
        {number, ""} -> {String.trim(key), number}
        _ -> {String.trim(key), String.trim(value)}
      end
    end
  end

  ## Output

  @doc """
  Prints a suite's table. `rows`: maps with :case, :impl, :median, :p10, :p90 (ms or, for
  dispatch, µs: :unit says), and optional :rate and :rate_unit.
  """
  def print_table(suite, rows) do
    IO.puts("\n== #{suite}")

    header = ["case", "impl", "median", "p10-p90", "rate", "ours vs this"]
    ours = Map.new(for r <- rows, r.impl == "nx_mlx", do: {r.case, r.median})

    lines =
      for r <- rows do
        unit = Map.get(r, :unit, "ms")

        ratio =
          if r.impl != "nx_mlx" and ours[r.case],
            do: fmt(r.median / ours[r.case]) <> "x",
            else: ""

        [
          r.case,
          r.impl,
          "#{fmt(r.median)} #{unit}",
          "#{fmt(r.p10)}-#{fmt(r.p90)}",
          if(r[:rate], do: "#{fmt(r.rate)} #{r.rate_unit}", else: ""),
          ratio
        ]
      end

    widths =
      Enum.reduce([header | lines], List.duplicate(0, length(header)), fn row, acc ->
        Enum.zip_with(row, acc, &max(String.length(&1), &2))
      end)

    for row <- [header | lines] do
      row |> Enum.zip_with(widths, &String.pad_trailing(&1, &2)) |> Enum.join("  ") |> IO.puts()
    end
  end

  def fmt(x) when is_float(x) and x >= 100, do: :erlang.float_to_binary(x, decimals: 1)
  def fmt(x) when is_float(x) and x >= 1, do: :erlang.float_to_binary(x, decimals: 2)
  def fmt(x) when is_float(x), do: :erlang.float_to_binary(x, decimals: 4)
  def fmt(x) when is_integer(x), do: fmt(x / 1)

  @doc "Markdown tables of every suite (for bench/RESULTS.md), after the machine lines."
  def write_markdown(path, machine, suites) do
    head = Enum.map_join(machine, "\n", fn {k, v} -> "- #{k}: #{v}" end)

    tables =
      for {suite, rows} <- suites do
        ours = Map.new(for r <- rows, r.impl == "nx_mlx", do: {r.case, r.median})

        lines =
          for r <- rows do
            unit = Map.get(r, :unit, "ms")
            rate = if r[:rate], do: "#{fmt(r.rate)} #{r.rate_unit}", else: ""

            vs =
              if r.impl != "nx_mlx" and ours[r.case],
                do: :erlang.float_to_binary(r.median / ours[r.case], decimals: 2),
                else: ""

            "| #{r.case} | #{r.impl} | #{fmt(r.median)} #{unit} | #{fmt(r.p10)}-#{fmt(r.p90)} | #{rate} | #{vs} |"
          end

        """
        ### #{suite}

        | case | impl | median | p10-p90 | rate | NxMlx vs this |
        |---|---|---|---|---|---|
        #{Enum.join(lines, "\n")}
        """
      end

    File.write!(path, head <> "\n\n" <> Enum.join(tables, "\n"))
  end

  def write_csv(path, rows) do
    header = "case,impl,median,p10,p90,unit,rate,rate_unit\n"

    body =
      for r <- rows do
        [
          r.case,
          r.impl,
          r.median,
          r.p10,
          r.p90,
          Map.get(r, :unit, "ms"),
          r[:rate] || "",
          r[:rate_unit] || ""
        ]
        |> Enum.map_join(",", &to_string/1)
      end

    File.write!(path, header <> Enum.join(body, "\n") <> "\n")
  end
end
