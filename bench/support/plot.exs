defmodule Bench.Plot do
  @moduledoc false
  # One chart per suite, drawn in plain Elixir (no plotting package is reachable here, and the
  # GPU machine has none): horizontal bars of the median time per case and implementation on
  # a log scale, written both as SVG and as PNG (our own encoder: zlib and CRC-32 come with
  # Erlang; text uses the 5x7 bitmap font below).

  @colors %{
    "nx_mlx" => {31, 119, 180},
    "raw_mlx" => {255, 127, 14},
    "openblas" => {44, 160, 44},
    "pytorch" => {214, 39, 40},
    "binary" => {127, 127, 127}
  }

  @bar 11
  @left 230
  @plot_w 520

  @doc "Writes `base`.svg and `base`.png for `rows` (maps with :case, :impl, :median, :unit)."
  def write(base, title, rows) do
    {width, height, prims} = layout(title, rows)
    File.write!(base <> ".svg", svg(width, height, prims))
    File.write!(base <> ".png", png(width, height, prims))
    base <> ".png"
  end

  defp layout(title, rows) do
    cases = rows |> Enum.map(& &1.case) |> Enum.uniq()
    impls = rows |> Enum.map(& &1.impl) |> Enum.uniq()
    unit = rows |> hd() |> Map.get(:unit, "ms")
    values = Enum.map(rows, & &1.median)
    lo = Float.floor(:math.log10(Enum.min(values)))
    hi = Float.ceil(:math.log10(Enum.max(values)) + 0.01)
    x = fn v -> @left + (:math.log10(v) - lo) / (hi - lo) * @plot_w end
    top = 50
    group_h = length(impls) * (@bar + 2) + 10
    height = top + length(cases) * group_h + 40
    width = @left + @plot_w + 150
    bottom = top + length(cases) * group_h

    ticks =
      for p <- round(lo)..round(hi) do
        xx = round(x.(:math.pow(10, p)))

        [
          {:rect, xx, top - 4, 1, bottom - top + 4, {220, 220, 220}},
          {:text, xx - 12, bottom + 8, tick(p), {60, 60, 60}}
        ]
      end

    bars =
      for {c, ci} <- Enum.with_index(cases) do
        y0 = top + ci * group_h

        label = {:text, 8, y0 + 2, c, {0, 0, 0}}

        bars =
          for {impl, ii} <- Enum.with_index(impls),
              r = Enum.find(rows, &(&1.case == c and &1.impl == impl)),
              r != nil do
            y = y0 + ii * (@bar + 2)
            w = max(round(x.(r.median)) - @left, 1)

            [
              {:rect, @left, y, w, @bar, @colors[impl] || {148, 103, 189}},
              {:text, @left + w + 4, y + 2, number(r.median), {0, 0, 0}}
            ]
          end

        [label | bars]
      end

    legend =
      for {impl, i} <- Enum.with_index(impls) do
        lx = @left + @plot_w + 40

        [
          {:rect, lx, top + i * 16, 10, 10, @colors[impl] || {148, 103, 189}},
          {:text, lx + 14, top + i * 16 + 2, impl, {0, 0, 0}}
        ]
      end

    header = [
      {:text, 8, 10, title, {0, 0, 0}},
      {:text, 8, 26, "median #{unit} per run, log scale, shorter is faster", {90, 90, 90}},
      {:rect, @left, top - 4, 1, bottom - top + 4, {0, 0, 0}}
    ]

    {width, height, List.flatten([header, ticks, bars, legend])}
  end

  defp tick(p) when p >= 0, do: "1e#{p}"
  defp tick(p), do: "1e-#{-p}"

  defp number(v) when v >= 100, do: :erlang.float_to_binary(v / 1, decimals: 0)
  defp number(v) when v >= 1, do: :erlang.float_to_binary(v / 1, decimals: 2)
  defp number(v), do: :erlang.float_to_binary(v / 1, decimals: 4)

  ## SVG

  defp svg(width, height, prims) do
    body =
      Enum.map(prims, fn
        {:rect, x, y, w, h, c} ->
          ~s|<rect x="#{x}" y="#{y}" width="#{w}" height="#{h}" fill="#{hex(c)}"/>|

        {:text, x, y, s, c} ->
          ~s|<text x="#{x}" y="#{y + 8}" font-family="monospace" font-size="11" fill="#{hex(c)}">#{escape(s)}</text>|
      end)

    """
    <svg xmlns="http://www.w3.org/2000/svg" width="#{width}" height="#{height}">
    <rect width="100%" height="100%" fill="white"/>
    #{Enum.join(body, "\n")}
    </svg>
    """
  end

  defp hex({r, g, b}), do: "#" <> Base.encode16(<<r, g, b>>)
  defp escape(s), do: s |> String.replace("&", "&amp;") |> String.replace("<", "&lt;")

  ## PNG: text becomes 1-pixel runs from the font; every primitive becomes rectangles, which
  ## are painted row by row, later ones on top.

  defp png(width, height, prims) do
    rects =
      Enum.flat_map(prims, fn
        {:rect, x, y, w, h, c} -> [{round(x), round(y), round(w), round(h), c}]
        {:text, x, y, s, c} -> text_rects(round(x), round(y), s, c)
      end)

    by_row =
      rects
      |> Enum.with_index()
      |> Enum.flat_map(fn {{x, y, w, h, c}, i} ->
        for yy <- max(y, 0)..min(y + h - 1, height - 1)//1,
            do: {yy, {i, max(x, 0), min(x + w, width), c}}
      end)
      |> Enum.group_by(&elem(&1, 0), &elem(&1, 1))

    white = :binary.copy(<<255, 255, 255>>, width)

    scanlines =
      for y <- 0..(height - 1) do
        row =
          by_row
          |> Map.get(y, [])
          |> Enum.sort()
          |> Enum.reduce(white, fn {_, x0, x1, {r, g, b}}, row ->
            if x1 <= x0 do
              row
            else
              <<before::binary-size(x0 * 3), _::binary-size((x1 - x0) * 3), rest::binary>> = row
              [before, :binary.copy(<<r, g, b>>, x1 - x0), rest] |> IO.iodata_to_binary()
            end
          end)

        [0, row]
      end

    data = :zlib.compress(IO.iodata_to_binary(scanlines))

    IO.iodata_to_binary([
      <<137, 80, 78, 71, 13, 10, 26, 10>>,
      chunk("IHDR", <<width::32, height::32, 8, 2, 0, 0, 0>>),
      chunk("IDAT", data),
      chunk("IEND", <<>>)
    ])
  end

  defp chunk(type, data) do
    <<byte_size(data)::32, type::binary, data::binary, :erlang.crc32(type <> data)::32>>
  end

  defp text_rects(x, y, s, color) do
    s
    |> String.downcase()
    |> String.to_charlist()
    |> Enum.with_index()
    |> Enum.flat_map(fn {ch, i} ->
      rows = Map.get(font(), ch, Map.fetch!(font(), ??))

      for {bits, ry} <- Enum.with_index(rows),
          cx <- 0..4,
          Bitwise.band(bits, Bitwise.bsl(1, 4 - cx)) != 0 do
        {x + i * 6 + cx, y + ry, 1, 1, color}
      end
    end)
  end

  # A 5x7 font: each glyph is 7 rows of 5 bits, most significant bit on the left.
  @font %{
    ?\s => [0, 0, 0, 0, 0, 0, 0],
    ?0 => [14, 17, 19, 21, 25, 17, 14],
    ?1 => [4, 12, 4, 4, 4, 4, 14],
    ?2 => [14, 17, 1, 2, 4, 8, 31],
    ?3 => [31, 2, 4, 2, 1, 17, 14],
    ?4 => [2, 6, 10, 18, 31, 2, 2],
    ?5 => [31, 16, 30, 1, 1, 17, 14],
    ?6 => [6, 8, 16, 30, 17, 17, 14],
    ?7 => [31, 1, 2, 4, 8, 8, 8],
    ?8 => [14, 17, 17, 14, 17, 17, 14],
    ?9 => [14, 17, 17, 15, 1, 2, 12],
    ?a => [0, 0, 14, 1, 15, 17, 15],
    ?b => [16, 16, 22, 25, 17, 17, 30],
    ?c => [0, 0, 14, 16, 16, 17, 14],
    ?d => [1, 1, 13, 19, 17, 17, 15],
    ?e => [0, 0, 14, 17, 31, 16, 14],
    ?f => [6, 9, 8, 28, 8, 8, 8],
    ?g => [0, 15, 17, 17, 15, 1, 14],
    ?h => [16, 16, 22, 25, 17, 17, 17],
    ?i => [4, 0, 12, 4, 4, 4, 14],
    ?j => [2, 0, 6, 2, 2, 18, 12],
    ?k => [16, 16, 18, 20, 24, 20, 18],
    ?l => [12, 4, 4, 4, 4, 4, 14],
    ?m => [0, 0, 26, 21, 21, 17, 17],
    ?n => [0, 0, 22, 25, 17, 17, 17],
    ?o => [0, 0, 14, 17, 17, 17, 14],
    ?p => [0, 0, 30, 17, 30, 16, 16],
    ?q => [0, 0, 13, 19, 15, 1, 1],
    ?r => [0, 0, 22, 25, 16, 16, 16],
    ?s => [0, 0, 14, 16, 14, 1, 30],
    ?t => [8, 8, 28, 8, 8, 9, 6],
    ?u => [0, 0, 17, 17, 17, 19, 13],
    ?v => [0, 0, 17, 17, 17, 10, 4],
    ?w => [0, 0, 17, 17, 21, 21, 10],
    ?x => [0, 0, 17, 10, 4, 10, 17],
    ?y => [0, 0, 17, 17, 15, 1, 14],
    ?z => [0, 0, 31, 2, 4, 8, 31],
    ?_ => [0, 0, 0, 0, 0, 0, 31],
    ?. => [0, 0, 0, 0, 0, 12, 12],
    ?, => [0, 0, 0, 0, 12, 4, 8],
    ?- => [0, 0, 0, 31, 0, 0, 0],
    ?+ => [0, 4, 4, 31, 4, 4, 0],
    ?: => [0, 12, 12, 0, 12, 12, 0],
    ?/ => [0, 1, 2, 4, 8, 16, 0],
    ?( => [2, 4, 8, 8, 8, 4, 2],
    ?) => [8, 4, 2, 2, 2, 4, 8],
    ?? => [14, 17, 1, 2, 4, 0, 4]
  }

  defp font, do: @font
end
