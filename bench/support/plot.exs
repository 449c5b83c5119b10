defmodule Bench.Plot do
  @moduledoc false
  # One chart per suite as a Vega-Lite spec (the grammar Livebook's VegaLite/Kino use),
  # written next to the suite's CSV as `<suite>.vl.json`: bars of the median time per case
  # and implementation on a log scale, with the p10-p90 range as a rule. Rendered to SVG and
  # PNG by vl-convert (PyPI: vl-convert-python; bench/support/render_vl.py) when the Python
  # named by NX_MLX_VL_PYTHON (else NX_MLX_TORCH_PYTHON, else python3) has it; otherwise a
  # line says the spec was written but not drawn.

  @doc """
  Writes `base`.vl.json for `rows` (maps with :case, :impl, :median, :p10, :p90, :unit) and
  renders `base`.svg and `base`.png where it can. Returns what it wrote, as text.
  """
  def write(base, title, rows) do
    spec = spec(title, rows)
    File.write!(base <> ".vl.json", JSON.encode!(spec))
    render(base)
  end

  def spec(title, rows) do
    unit = rows |> hd() |> Map.get(:unit, "ms")

    values =
      for r <- rows do
        %{
          "case" => r.case,
          "impl" => r.impl,
          "median" => r.median,
          "p10" => Map.get(r, :p10, r.median),
          "p90" => Map.get(r, :p90, r.median)
        }
      end

    x = %{
      "field" => "median",
      "type" => "quantitative",
      "scale" => %{"type" => "log", "domainMin" => baseline(rows)},
      "title" => "median #{unit} (log scale)"
    }

    %{
      "$schema" => "https://vega.github.io/schema/vega-lite/v5.json",
      "title" => title,
      "data" => %{"values" => values},
      "width" => 520,
      "encoding" => %{
        "y" => %{"field" => "case", "type" => "nominal", "title" => nil},
        "yOffset" => %{"field" => "impl"},
        "color" => %{"field" => "impl", "type" => "nominal", "title" => "implementation"}
      },
      "layer" => [
        %{
          # Bars on a log scale need a baseline above zero: the decade below the smallest.
          "mark" => %{"type" => "bar"},
          "encoding" => %{
            "x" => x,
            "x2" => %{"datum" => baseline(rows)},
            "tooltip" => [%{"field" => "impl"}, %{"field" => "median"}]
          }
        },
        %{
          "mark" => %{"type" => "rule", "color" => "black"},
          "encoding" => %{
            "x" => Map.put(x, "field", "p10"),
            "x2" => %{"field" => "p90"}
          }
        }
      ]
    }
  end

  defp baseline(rows) do
    smallest = rows |> Enum.map(&Map.get(&1, :p10, &1.median)) |> Enum.min()
    :math.pow(10, Float.floor(:math.log10(smallest)))
  end

  defp render(base) do
    python =
      System.get_env("NX_MLX_VL_PYTHON") || System.get_env("NX_MLX_TORCH_PYTHON") || "python3"

    script = Path.join(__DIR__, "render_vl.py")

    case System.find_executable(python) do
      nil ->
        "#{base}.vl.json (not drawn: #{python} not found)"

      exe ->
        case System.cmd(exe, [script, base <> ".vl.json", base <> ".svg", base <> ".png"],
               stderr_to_stdout: true
             ) do
          {_, 0} ->
            "#{base}.png (and .svg, .vl.json)"

          {_, 3} ->
            "#{base}.vl.json (not drawn: vl-convert-python is not installed for #{python})"

          {out, status} ->
            "#{base}.vl.json (not drawn: the renderer failed (#{status}): #{String.slice(out, -200..-1//1)})"
        end
    end
  end
end
