defmodule NxMlx.NotebooksTest do
  # Every Elixir cell of every notebook in notebooks/, in order, in one binding per notebook,
  # with the setup cell (Mix.install) left out: the project's own deps stand in for it. A
  # cell that raises fails the test, naming the notebook and the cell. Cells run as code
  # evaluated here, so a notebook's modules are defined once per run.
  use ExUnit.Case, async: false

  import ExUnit.CaptureIO, only: [with_io: 1]

  @notebooks Path.wildcard(Path.expand("../../notebooks/*.livemd", __DIR__))

  defp cells(path) do
    ~r/```elixir\n(.*?)```/s
    |> Regex.scan(File.read!(path), capture: :all_but_first)
    |> Enum.map(fn [code] -> code end)
    |> Enum.reject(&String.contains?(&1, "Mix.install"))
  end

  test "the notebooks exist" do
    names = Enum.map(@notebooks, &Path.basename/1)
    assert "getting_started.livemd" in names
    assert "compiler_and_fast.livemd" in names
  end

  for path <- @notebooks do
    @tag notebook: path, timeout: 300_000
    test "notebooks/#{Path.basename(path)} runs top to bottom", %{notebook: path} do
      previous = Nx.default_backend()

      try do
        path
        |> cells()
        |> Enum.with_index(1)
        |> Enum.reduce([], fn {code, i}, binding ->
          try do
            {value, binding} =
              with_io(fn -> Code.eval_string(code, binding, file: path) end) |> elem(0)

            # A cell that compares two results (Nx.all_close) ends with its verdict.
            if String.contains?(code, "Nx.all_close") do
              assert value == 1, "#{Path.basename(path)}, cell #{i}: the results differ"
            end

            binding
          rescue
            e in ExUnit.AssertionError ->
              reraise e, __STACKTRACE__

            e ->
              flunk("#{Path.basename(path)}, cell #{i} raised: #{Exception.format(:error, e)}")
          end
        end)
      after
        Nx.global_default_backend(previous)
      end
    end
  end
end
