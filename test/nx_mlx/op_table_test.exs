defmodule NxMlx.OpTableTest do
  # NxMlx.Backend's callbacks are generated from its op table: each names the concern module
  # that implements it. These tests catch a table entry without an implementation and an
  # implementation the table forgot (which would silently run on Nx.BinaryBackend).
  use ExUnit.Case, async: true

  @callbacks Nx.Backend.behaviour_info(:callbacks)

  def forward(_event, _measurements, meta, test), do: send(test, {:fallback, meta.op})

  defp entries do
    for {concern, callbacks} <- NxMlx.Backend.__ops__(), callback <- callbacks do
      module = Module.concat(NxMlx.Backend, concern)
      Code.ensure_loaded!(module)
      {module, callback}
    end
  end

  test "each entry is an Nx.Backend callback its concern module implements, listed once" do
    for {module, {name, arity} = callback} <- entries() do
      assert callback in @callbacks, "#{name}/#{arity} is not an Nx.Backend callback"

      assert function_exported?(module, name, arity),
             "#{inspect(module)} does not implement #{name}/#{arity}"
    end

    listed = Enum.map(entries(), &elem(&1, 1))
    assert listed -- Enum.uniq(listed) == []
  end

  test "no concern module implements a callback the table does not route to it" do
    listed = MapSet.new(entries())

    for module <- entries() |> Enum.map(&elem(&1, 0)) |> Enum.uniq(),
        callback <- module.__info__(:functions),
        callback in @callbacks do
      assert {module, callback} in listed,
             "#{inspect(module)} implements #{inspect(callback)}, which the op table lacks"
    end
  end

  test "NxMlx.Backend implements every callback, the unlisted ones on Nx.BinaryBackend" do
    Code.ensure_loaded!(NxMlx.Backend)

    for {name, arity} <- @callbacks do
      assert function_exported?(NxMlx.Backend, name, arity)
    end

    # reduce/5 is not in the table: it runs on Nx.BinaryBackend, emitting the fallback event.
    refute Enum.any?(entries(), &match?({_, {:reduce, 5}}, &1))
    handler = "op-table-#{System.unique_integer()}"
    :telemetry.attach(handler, [:nx_mlx, :fallback, :stop], &__MODULE__.forward/4, self())

    try do
      t = Nx.tensor([1, 2, 3], backend: NxMlx.Backend)
      sum = Nx.reduce(t, 0, fn a, b -> Nx.add(a, b) end)
      assert Nx.to_number(sum) == 6
      assert_received {:fallback, :reduce}
    after
      :telemetry.detach(handler)
    end
  end
end
