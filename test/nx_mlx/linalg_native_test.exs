defmodule NxMlx.LinAlgNativeTest do
  # The LAPACK path of the Nx.Block.LinAlg blocks (`config :nx_mlx, linalg: :lapack`) and the
  # native triangular_solve. Decompositions are not unique (signs, pivots, bases of repeated
  # eigenvalues), so they are checked by reconstruction and structure, and the unique parts
  # (eigenvalues, singular values, solutions, determinants) against Nx.BinaryBackend.
  # Tolerance: rtol/atol 1.0e-4 for f32 (LAPACK and Nx's own algorithms round differently on
  # well-conditioned 4x4..6x6 inputs); 1.0e-6 for f64: MLX's f64 det, solve and eigh were
  # measured within about 5.0e-8 relative of the exact values, not f64 precision.
  use ExUnit.Case, async: false

  import NxMlx.TestHelpers

  setup do
    previous = Application.get_env(:nx_mlx, :linalg)
    Application.put_env(:nx_mlx, :linalg, :lapack)

    on_exit(fn ->
      if previous,
        do: Application.put_env(:nx_mlx, :linalg, previous),
        else: Application.delete_env(:nx_mlx, :linalg)
    end)

    :ok
  end

  defp backend, do: {NxMlx.Backend, device: oracle_device()}
  defp tol({:f, 64}), do: [rtol: 1.0e-6, atol: 1.0e-6]
  defp tol(_), do: [rtol: 1.0e-4, atol: 1.0e-4]

  defp types, do: device_types([{:f, 32}, {:f, 64}])

  # A seeded random tensor of `shape` on Nx.BinaryBackend.
  defp random(shape, type, seed) do
    key = Nx.Random.key(seed) |> Nx.backend_transfer(Nx.BinaryBackend)
    {t, _} = Nx.Random.uniform(key, -1.0, 1.0, shape: List.to_tuple(shape), type: type)
    t
  end

  # Symmetric positive definite, well conditioned: m m^T + n I.
  defp spd(batch, n, type, seed) do
    m = random(batch ++ [n, n], type, seed)
    rank = length(batch) + 2
    mt = Nx.transpose(m, axes: Enum.to_list(0..(rank - 3)//1) ++ [rank - 1, rank - 2])

    Nx.add(
      Nx.dot(
        m,
        [rank - 1],
        Enum.to_list(0..(rank - 3)//1),
        mt,
        [rank - 2],
        Enum.to_list(0..(rank - 3)//1)
      ),
      Nx.multiply(Nx.eye(n, type: type), n)
    )
  end

  defp mlx(t), do: Nx.backend_transfer(t, backend())
  defp bin(t), do: Nx.backend_copy(t, Nx.BinaryBackend)

  defp assert_close(got, expected, type) do
    got = bin(got)

    assert Nx.to_number(Nx.all_close(got, bin(expected), tol(type))) == 1,
           "#{inspect(got)}\nis not close to\n#{inspect(expected)}"
  end

  defp batched_mm(a, b) do
    a = bin(a)
    rank = Nx.rank(a)
    batch = Enum.to_list(0..(rank - 3)//1)
    Nx.dot(a, [rank - 1], batch, bin(b), [rank - 2], batch)
  end

  defp transpose_last(t) do
    rank = Nx.rank(t)
    Nx.transpose(bin(t), axes: Enum.to_list(0..(rank - 3)//1) ++ [rank - 1, rank - 2])
  end

  test "cholesky: lower factor of the input, equal to Nx's" do
    for type <- types(), batch <- [[], [3]] do
      a = spd(batch, 5, type, 1)
      l = assert_native(fn -> Nx.LinAlg.cholesky(mlx(a)) end)
      assert %NxMlx.Backend{} = l.data
      assert l.type == type
      assert_close(l, Nx.LinAlg.cholesky(a), type)
      assert_close(batched_mm(l, transpose_last(l)), a, type)
    end
  end

  test "solve and determinant equal Nx's, with vector and matrix right-hand sides" do
    for type <- types() do
      a = spd([2], 4, type, 2)
      b_vec = random([2, 4], type, 3)
      b_mat = random([2, 4, 3], type, 4)

      assert_close(
        assert_native(fn -> Nx.LinAlg.solve(mlx(a), mlx(b_vec)) end),
        Nx.LinAlg.solve(a, b_vec),
        type
      )

      assert_close(
        assert_native(fn -> Nx.LinAlg.solve(mlx(a), mlx(b_mat)) end),
        Nx.LinAlg.solve(a, b_mat),
        type
      )

      for n <- [2, 3, 5] do
        m = random([2, n, n], type, n)
        d = assert_native(fn -> Nx.LinAlg.determinant(mlx(m)) end)
        assert_close(d, Nx.LinAlg.determinant(m), type)
      end
    end
  end

  test "qr: orthonormal q, upper triangular r, q r = a" do
    for type <- types(),
        shape <- [[4, 4], [6, 3], [2, 5, 3], [3, 5]],
        mode <- [:reduced, :complete] do
      a = random(shape, type, 5)
      {q, r} = Nx.LinAlg.qr(mlx(a), mode: mode)
      {eq, er} = Nx.LinAlg.qr(a, mode: mode)
      assert {q.shape, r.shape, q.type} == {eq.shape, er.shape, eq.type}
      assert_close(batched_mm(q, r), a, type)

      assert_close(
        Nx.triu(
          bin(r)
          |> Nx.reshape({:auto, elem(r.shape, Nx.rank(r) - 2), elem(r.shape, Nx.rank(r) - 1)})
        )
        |> Nx.reshape(r.shape),
        r,
        type
      )
    end
  end

  test "eigh: Nx's eigenvalue order, a v = v diag(w)" do
    for type <- types(), batch <- [[], [2]] do
      a = spd(batch, 5, type, 6)
      {w, v} = assert_native(fn -> Nx.LinAlg.eigh(mlx(a)) end)
      {ew, _} = Nx.LinAlg.eigh(a)
      assert_close(w, ew, type)
      assert_close(batched_mm(a, v), Nx.multiply(bin(v), Nx.new_axis(bin(w), -2)), type)
    end
  end

  test "svd: Nx's singular values, u s vt = a, both matrix modes" do
    for type <- types(), shape <- [[4, 4], [5, 3], [3, 5], [2, 4, 3]], full <- [true, false] do
      a = random(shape, type, 7)
      {u, s, vt} = assert_native(fn -> Nx.LinAlg.svd(mlx(a), full_matrices?: full) end)
      {eu, es, evt} = Nx.LinAlg.svd(a, full_matrices?: full)
      assert {u.shape, s.shape, vt.shape} == {eu.shape, es.shape, evt.shape}
      assert_close(s, es, type)
      [m, n] = Enum.take(shape, -2)
      k = min(m, n)
      rank = length(shape)
      uk = Nx.slice_along_axis(bin(u), 0, k, axis: rank - 1)
      vtk = Nx.slice_along_axis(bin(vt), 0, k, axis: rank - 2)
      assert_close(batched_mm(Nx.multiply(uk, Nx.new_axis(bin(s), -2)), vtk), a, type)
    end
  end

  test "lu: permutation p, unit lower l, upper u, p l u = a" do
    for type <- types(), batch <- [[], [2]] do
      a = random(batch ++ [5, 5], type, 8)
      {p, l, u} = assert_native(fn -> Nx.LinAlg.lu(mlx(a)) end)
      assert p.type == type
      pb = bin(p)
      assert Nx.to_flat_list(Nx.sum(pb, axes: [-1])) |> Enum.all?(&(&1 == 1))
      assert Nx.to_flat_list(Nx.sum(pb, axes: [-2])) |> Enum.all?(&(&1 == 1))

      assert_close(
        Nx.take_diagonal(bin(l) |> Nx.reshape({:auto, 5, 5})),
        Nx.broadcast(Nx.tensor(1.0, type: type), {div(Nx.size(l), 25), 5}),
        type
      )

      assert_close(batched_mm(pb, batched_mm(l, u)), a, type)
    end
  end

  test "integer inputs are computed in f32; the default (Nx's algorithms) is :nx" do
    a = Nx.tensor([[4, 2], [2, 5]])
    l = Nx.LinAlg.cholesky(mlx(a))
    assert l.type == {:f, 32}
    assert_close(l, Nx.LinAlg.cholesky(a), {:f, 32})

    Application.put_env(:nx_mlx, :linalg, :nx)
    {q, r} = Nx.LinAlg.qr(mlx(Nx.tensor([[-3, 2, 1], [0, 1, 1], [0, 0, -1]])))
    {eq, er} = Nx.LinAlg.qr(Nx.tensor([[-3, 2, 1], [0, 1, 1], [0, 0, -1]]))
    assert Nx.to_binary(q) == Nx.to_binary(eq) and Nx.to_binary(r) == Nx.to_binary(er)
  end

  describe "triangular_solve (native in every mode, computed in f64)" do
    test "matches Nx.BinaryBackend for every option combination" do
      for type <- types(),
          lower <- [true, false],
          left <- [true, false],
          transform <- [:none, :transpose],
          b_shape <- [:vector, :matrix, :batched] do
        n = 4
        base = Nx.add(random([3, n, n], type, 9), Nx.multiply(Nx.eye(n, type: type), 3))
        a = if b_shape == :batched, do: base, else: base[0]

        b =
          case {b_shape, left} do
            {:vector, _} -> random([n], type, 10)
            {:matrix, true} -> random([n, 2], type, 10)
            {:matrix, false} -> random([2, n], type, 10)
            {:batched, true} -> random([3, n, 2], type, 10)
            {:batched, false} -> random([3, 2, n], type, 10)
          end

        opts = [lower: lower, left_side: left, transform_a: transform]
        got = assert_native(fn -> Nx.LinAlg.triangular_solve(mlx(a), mlx(b), opts) end)
        assert_close(got, Nx.LinAlg.triangular_solve(a, b, opts), type)
      end
    end

    test "a zero on the diagonal raises Nx's ArgumentError" do
      a = mlx(Nx.tensor([[1.0, 0.0], [5.0, 0.0]]))

      assert_raise ArgumentError, "can't solve for singular matrix", fn ->
        Nx.LinAlg.triangular_solve(a, mlx(Nx.tensor([1.0, 2.0])))
      end
    end
  end
end
