defmodule NxMlx.DebugChecksTest do
  # Run by scripts/test in a build with the debug checks compiled in
  # (NX_MLX_DEBUG_CHECKS=1 mix test --only debug_checks).
  use ExUnit.Case, async: true

  @moduletag :debug_checks

  @mlx {NxMlx.Backend, device: :cpu}

  test "debug_bounds_check: out-of-bounds gather and scatter indices raise, naming the op" do
    t = Nx.iota({3, 4}, type: :f32, backend: @mlx)

    assert_raise ArgumentError, ~r/NxMlx.Backend.gather: an index is out of bounds/, fn ->
      Nx.gather(t, Nx.tensor([[1, 1], [3, 0]], backend: @mlx))
    end

    assert_raise ArgumentError, ~r/NxMlx.Backend.indexed_add: an index is out of bounds/, fn ->
      Nx.indexed_add(t, Nx.tensor([[0, -1]], backend: @mlx), Nx.tensor([1.0], backend: @mlx))
    end

    assert_raise ArgumentError, ~r/NxMlx.Backend.take: an index is out of bounds/, fn ->
      Nx.take(t, Nx.tensor([0, 9], backend: @mlx), axis: 1)
    end

    assert_raise ArgumentError,
                 ~r/NxMlx.Backend.take_along_axis: an index is out of bounds/,
                 fn ->
                   Nx.take_along_axis(t, Nx.tensor([[0], [-1], [2]], backend: @mlx), axis: 1)
                 end

    # A narrow index type is checked against the axis, not against its own range.
    assert Nx.to_flat_list(Nx.take(Nx.iota({300}, backend: @mlx), Nx.tensor([255], type: :u8))) ==
             [255]

    # In-bounds calls still work.
    assert Nx.to_flat_list(Nx.gather(t, Nx.tensor([[2, 3]], backend: @mlx))) == [11.0]
  end

  test "debug_detect_nan_inf: NaN or infinity from finite inputs raises, naming the op" do
    x = Nx.tensor([1.0, 0.0, -1.0], backend: @mlx)

    assert_raise ArgumentError, ~r/NxMlx.Backend.log produced NaN or infinity/, fn ->
      Nx.log(x)
    end

    assert_raise ArgumentError, ~r/NxMlx.Backend.divide produced NaN or infinity/, fn ->
      Nx.divide(x, Nx.tensor(0.0, backend: @mlx))
    end

    # Non-finite inputs may give non-finite results; finite results are fine.
    inf = Nx.tensor([:infinity, 1.0], backend: @mlx)
    assert Nx.to_flat_list(Nx.add(inf, 1.0)) == [:infinity, 2.0]
    assert Nx.to_flat_list(Nx.exp(Nx.tensor([0.0], backend: @mlx))) == [1.0]
  end
end
