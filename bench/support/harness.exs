defmodule Bench.Harness do
  @moduledoc false
  # Timing, tables, key lines, CSV and plots for bench/run.exs (plain Elixir).
  #
  # A measurement: `warmup` untimed runs, then timed runs (at least `min_reps`, at most
  # `max_reps`, or until `budget_s` has passed); the median and the 10th and 90th percentiles,
  # in milliseconds. mlx_raw_bench and bench/reference/torch_bench.py use the same method.

  defstruct warmup: 3, min_reps: 5, max_reps: 20, budget_s: 3.0

  def settings(quick?) do
    if quick?,
      do: %__MODULE__{warmup: 1, min_reps: 3, max_reps: 5, budget_s: 0.5},
      else: %__MODULE__{}
  end

  @doc "Times `fun` (which must leave its work finished) per the settings."
  def measure(%__MODULE__{} = s, fun) do
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

  ## Plots: an SVG bar chart per suite (median time per case, one bar per implementation,
  ## log scale), turned into PNG by ImageMagick's `convert` when it is installed.

  @colors %{
    "nx_mlx" => "#1f77b4",
    "raw_mlx" => "#ff7f0e",
    "openblas" => "#2ca02c",
    "pytorch" => "#d62728",
    "binary" => "#7f7f7f"
  }

  def plot(svg_path, title, rows) do
    cases = rows |> Enum.map(& &1.case) |> Enum.uniq()
    impls = rows |> Enum.map(& &1.impl) |> Enum.uniq()
    values = Enum.map(rows, & &1.median)
    {lo, hi} = {:math.log10(Enum.min(values)), :math.log10(Enum.max(values))}
    {lo, hi} = {Float.floor(lo), Float.ceil(hi + 0.01)}
    {left, top, plot_h} = {70, 40, 300}
    group_w = max(length(impls) * 18 + 20, 60)
    width = left + length(cases) * group_w + 160
    height = top + plot_h + 140
    y = fn v -> top + plot_h - (:math.log10(v) - lo) / (hi - lo) * plot_h end
    unit = rows |> hd() |> Map.get(:unit, "ms")

    grid =
      for p <- round(lo)..round(hi) do
        yy = y.(:math.pow(10, p))

        ~s|<line x1="#{left}" y1="#{yy}" x2="#{width - 150}" y2="#{yy}" stroke="#ddd"/>| <>
          ~s|<text x="#{left - 6}" y="#{yy + 4}" text-anchor="end" font-size="11">1e#{p}</text>|
      end

    bars =
      for {c, ci} <- Enum.with_index(cases),
          {impl, ii} <- Enum.with_index(impls),
          r = Enum.find(rows, &(&1.case == c and &1.impl == impl)),
          r != nil do
        x = left + ci * group_w + 10 + ii * 18
        yy = y.(r.median)

        ~s|<rect x="#{x}" y="#{yy}" width="16" height="#{top + plot_h - yy}" fill="#{@colors[impl] || "#9467bd"}"/>|
      end

    labels =
      for {c, ci} <- Enum.with_index(cases) do
        x = left + ci * group_w + group_w / 2

        ~s|<text transform="translate(#{x},#{top + plot_h + 12}) rotate(40)" font-size="11">#{c}</text>|
      end

    legend =
      for {impl, i} <- Enum.with_index(impls) do
        yy = top + 10 + i * 18

        ~s|<rect x="#{width - 140}" y="#{yy}" width="12" height="12" fill="#{@colors[impl] || "#9467bd"}"/>| <>
          ~s|<text x="#{width - 122}" y="#{yy + 10}" font-size="12">#{impl}</text>|
      end

    svg = """
    <svg xmlns="http://www.w3.org/2000/svg" width="#{width}" height="#{height}">
    <rect width="100%" height="100%" fill="white"/>
    <text x="#{left}" y="22" font-size="15" font-family="sans-serif">#{title} (median #{unit}, log scale; lower is faster)</text>
    #{Enum.join(grid, "\n")}
    #{Enum.join(bars, "\n")}
    #{Enum.join(labels, "\n")}
    #{Enum.join(legend, "\n")}
    </svg>
    """

    File.write!(svg_path, svg)
    png_path = Path.rootname(svg_path) <> ".png"

    case System.find_executable("convert") do
      nil ->
        {:svg_only, svg_path}

      convert ->
        case System.cmd(convert, [svg_path, png_path], stderr_to_stdout: true) do
          {_, 0} -> {:png, png_path}
          {out, _} -> {:svg_only, "#{svg_path} (convert failed: #{String.trim(out)})"}
        end
    end
  end
end
