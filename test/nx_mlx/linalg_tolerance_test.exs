defmodule NxMlx.LinAlgToleranceTest do
  # The Nx.LinAlg doctest examples left out of nx_doctest_test.exs (their printed f32 results
  # differ in the last digit), run on NxMlx.Backend and on Nx.BinaryBackend and compared with
  # a tolerance: rtol 1.0e-5 and atol 1.0e-5 for f32 (a few ulps on these magnitudes).
  use ExUnit.Case, async: true

  @mlx {NxMlx.Backend, device: :cpu}
  @tol [rtol: 1.0e-5, atol: 1.0e-5]

  # Runs `fun` with each backend as the default and compares every tensor of the results.
  defp same_on_both(fun) do
    got = Nx.with_default_backend(@mlx, fun)
    expected = Nx.with_default_backend(Nx.BinaryBackend, fun)
    got_list = flatten(got)
    expected_list = flatten(expected)
    assert length(got_list) == length(expected_list)

    for {g, e} <- Enum.zip(got_list, expected_list) do
      assert %NxMlx.Backend{} = g.data
      assert g.shape == e.shape and g.type == e.type

      assert Nx.to_number(Nx.all_close(Nx.backend_copy(g, Nx.BinaryBackend), e, @tol)) == 1,
             "#{inspect(g)}\nis not close to\n#{inspect(e)}"
    end
  end

  defp flatten(t) when is_tuple(t), do: t |> Tuple.to_list() |> Enum.flat_map(&flatten/1)
  defp flatten(%Nx.Tensor{} = t), do: [t]

  test "cholesky/1 (example 5)" do
    same_on_both(fn ->
      Nx.LinAlg.cholesky(
        Nx.tensor([
          [6.0, 3.0, 4.0, 8.0],
          [3.0, 6.0, 5.0, 1.0],
          [4.0, 5.0, 10.0, 7.0],
          [8.0, 1.0, 7.0, 25.0]
        ])
      )
    end)
  end

  test "pinv/2 (example 67)" do
    same_on_both(fn -> Nx.LinAlg.pinv(Nx.tensor([[1, 1], [3, 4]])) end)
  end

  test "lu/1 (example 79)" do
    same_on_both(fn ->
      t = Nx.tensor([[[9, 8, 7], [6, 5, 4], [3, 2, 1]], [[-1, 0, -1], [1, 0, 1], [1, 1, 1]]])
      {p, l, u} = Nx.LinAlg.lu(t)
      {p, l, u, p |> Nx.dot([2], [0], l, [1], [0]) |> Nx.dot([2], [0], u, [1], [0])}
    end)
  end

  test "matrix_power/2 (example 87)" do
    same_on_both(fn -> Nx.LinAlg.matrix_power(Nx.iota({2, 2, 2}), -3) end)
  end

  test "least_squares/3 (examples 106 and 108)" do
    same_on_both(fn ->
      Nx.LinAlg.least_squares(Nx.tensor([[1, 2, 3], [4, 5, 6]]), Nx.tensor([1, 2]))
    end)

    same_on_both(fn ->
      Nx.LinAlg.least_squares(Nx.tensor([[1, 2], [2, 3]]), Nx.tensor([1, 2]))
    end)
  end

  test "least_squares/3 (example 107)" do
    same_on_both(fn ->
      Nx.LinAlg.least_squares(
        Nx.tensor([[0, 1], [1, 1], [2, 1], [3, 1]]),
        Nx.tensor([-1, 0.2, 0.9, 2.1])
      )
    end)
  end
end
