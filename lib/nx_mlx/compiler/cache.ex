defmodule NxMlx.Compiler.Cache do
  @moduledoc false
  # The compile cache: compiled programs keyed by {function, input templates, options}, in a
  # public ETS table owned by this (supervised) process. Bounded: past @max entries the
  # oldest is evicted (its program is freed when the last caller drops it). A function
  # compiled for more than @recompile_warning distinct templates gets one warning, as a sign
  # of shapes that change with every call.

  use GenServer
  require Logger

  @table __MODULE__
  @max 512
  @recompile_warning 64

  def start_link(_), do: GenServer.start_link(__MODULE__, [], name: __MODULE__)

  # Only the value is copied out (the key, with every input template, stays in the table).
  def get(key) do
    {:ok, :ets.lookup_element(@table, key, 3)}
  rescue
    ArgumentError -> :error
  end

  def put(key, fun_key, compiled) do
    stamp = System.unique_integer([:monotonic])
    :ets.insert(@table, {key, stamp, compiled})
    count = :ets.update_counter(@table, {:variants, fun_key}, 1, {{:variants, fun_key}, 0})

    if count == @recompile_warning do
      Logger.warning(
        "NxMlx compiler: a function was compiled for #{count} different input templates; " <>
          "inputs whose shapes change on every call recompile every time (pad them to a few " <>
          "fixed sizes)"
      )
    end

    if :ets.info(@table, :size) > @max, do: GenServer.cast(__MODULE__, :evict)
    :ok
  rescue
    ArgumentError -> :ok
  end

  @impl true
  def init(_) do
    :ets.new(@table, [:named_table, :public, :set, read_concurrency: true])
    {:ok, nil}
  end

  @impl true
  def handle_cast(:evict, state) do
    entries =
      :ets.select(@table, [{{:"$1", :"$2", :_}, [{:is_integer, :"$2"}], [{{:"$2", :"$1"}}]}])

    if length(entries) > @max do
      entries
      |> Enum.sort()
      |> Enum.take(length(entries) - @max)
      |> Enum.each(fn {_stamp, key} -> :ets.delete(@table, key) end)
    end

    {:noreply, state}
  end
end
