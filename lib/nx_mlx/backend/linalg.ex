defmodule NxMlx.Backend.LinAlg do
  @moduledoc false
  # NxMlx.Backend's linear algebra: LAPACK through MLX on CPU streams.

  import NxMlx.Backend.Core

  alias Nx.Tensor, as: T
  alias NxMlx.{Runtime, Types}

  ## Linear algebra: LAPACK through MLX, which runs it on CPU streams only (GPU tensors are
  ## copied to the CPU device and the results back).

  def triangular_solve(%T{type: {k, _}} = out, %T{type: {ka, _}} = a, %T{type: {kb, _}} = b, opts)
      when k in [:f, :bf] and ka != :c and kb != :c do
    rank = tuple_size(a.shape)
    vector? = tuple_size(b.shape) == rank - 1
    # :conjugate is :none on real matrices. X op(A) = B is solved as op(A)^T X^T = B^T.
    transpose_a? = opts[:transform_a] == :transpose != not opts[:left_side]
    upper = if transpose_a?, do: opts[:lower], else: not opts[:lower]

    [x] =
      linalg(:triangular_solve, [out], [a, b], {:f, 64}, fn [a_ref, b_ref], op ->
        swap = &op.(:transpose, [&1, swap_last_two(rank)])
        a_ref = if transpose_a?, do: swap.(a_ref), else: a_ref

        if vector? do
          b_ref = op.(:reshape, [b_ref, Tuple.to_list(b.shape) ++ [1]])
          x = op.(:linalg, [:solve_triangular, a_ref, b_ref, upper])
          [op.(:reshape, [x, Tuple.to_list(out.shape)])]
        else
          b_ref = if opts[:left_side], do: b_ref, else: swap.(b_ref)
          x = op.(:linalg, [:solve_triangular, a_ref, b_ref, upper])
          [if(opts[:left_side], do: x, else: swap.(x))]
        end
      end)

    x
  end

  def triangular_solve(out, a, b, opts),
    do: NxMlx.Fallback.run(:triangular_solve, [out, a, b, opts], op_device([a, b]))

  defp swap_last_two(rank),
    do: Enum.to_list(0..(rank - 3)//1) ++ [rank - 1, rank - 2]

  # MLX's LAPACK takes real f32 and f64; QR in :complete mode of a tall matrix (MLX has the
  # reduced one only) and complex inputs take the default function.
  def linalg_native?(struct, output, args) do
    outputs = if is_tuple(output), do: Tuple.to_list(output), else: [output]

    Enum.all?(args, fn %T{type: {k, _}} -> k != :c end) and
      Enum.all?(outputs, fn %T{type: {k, _}} -> k != :c end) and
      case struct do
        %Nx.Block.LinAlg.QR{} ->
          {%T{shape: q}, _} = output
          [m, n] = Enum.take(Tuple.to_list(hd(args).shape), -2)
          elem(q, tuple_size(q) - 1) == min(m, n)

        _ ->
          true
      end
  end

  def linalg_block(%Nx.Block.LinAlg.Cholesky{}, out, [t]) do
    [l] =
      linalg(:cholesky, [out], [t], fn [a], op -> [op.(:linalg, [:cholesky, a, a, false])] end)

    l
  end

  def linalg_block(%Nx.Block.LinAlg.Determinant{}, out, [t]) do
    [d] = linalg(:determinant, [out], [t], fn [a], op -> [op.(:linalg, [:det, a, a, false])] end)
    d
  end

  def linalg_block(%Nx.Block.LinAlg.Solve{}, out, [a, b]) do
    vector? = tuple_size(b.shape) < tuple_size(a.shape)

    [x] =
      linalg(:solve, [out], [a, b], fn [a_ref, b_ref], op ->
        b_ref = if vector?, do: op.(:reshape, [b_ref, Tuple.to_list(b.shape) ++ [1]]), else: b_ref
        x = op.(:linalg, [:solve, a_ref, b_ref, false])
        [op.(:reshape, [x, Tuple.to_list(out.shape)])]
      end)

    x
  end

  def linalg_block(%Nx.Block.LinAlg.QR{}, {_, _} = out, [t]) do
    List.to_tuple(
      linalg(:qr, Tuple.to_list(out), [t], fn [a], op -> op.(:decompose, [:qr, a]) end)
    )
  end

  def linalg_block(%Nx.Block.LinAlg.Eigh{}, {_, _} = out, [t]) do
    # MLX orders eigenvalues ascending; Nx descending.
    rank = tuple_size(t.shape)

    linalg(:eigh, Tuple.to_list(out), [t], fn [a], op ->
      [w, v] = op.(:decompose, [:eigh, a])
      [reverse_axis(op, w, rank - 2), reverse_axis(op, v, rank - 1)]
    end)
    |> List.to_tuple()
  end

  def linalg_block(%Nx.Block.LinAlg.SVD{}, {%T{shape: u_shape}, _, %T{shape: vt_shape}} = out, [
        t
      ]) do
    linalg(:svd, Tuple.to_list(out), [t], fn [a], op ->
      [u, s, vt] = op.(:decompose, [:svd, a])
      [leading(op, u, u_shape), s, leading(op, vt, vt_shape)]
    end)
    |> List.to_tuple()
  end

  def linalg_block(%Nx.Block.LinAlg.LU{}, {%T{shape: p_shape}, _, _} = out, [t]) do
    rank = tuple_size(p_shape)
    n = elem(p_shape, rank - 1)

    linalg(:lu, Tuple.to_list(out), [t], fn [a], op ->
      [pivots, l, u] = op.(:decompose, [:lu, a])
      # Row r of a is row pivots[r] of l u, so a = p l u with p[r][i] = (pivots[r] == i).
      cols = op.(:reshape, [op.(:arange, [0.0, n / 1, 1.0, :u32]), [1, n]])
      batch = Enum.take(Tuple.to_list(p_shape), rank - 2)
      rows = op.(:reshape, [pivots, batch ++ [n, 1]])
      [op.(:binary, [:equal, rows, cols]), l, u]
    end)
    |> List.to_tuple()
  end

  # The leading block of `ref` with the shape of `shape` (full to reduced SVD factors).
  defp leading(op, ref, shape) do
    dims = Tuple.to_list(shape)
    op.(:slice, [ref, List.duplicate(0, length(dims)), dims, List.duplicate(1, length(dims))])
  end

  # Runs `fun.(refs, op)` on the CPU device, with `inputs` converted to the type LAPACK takes
  # (f64 for f64 outputs, else f32), and returns `outputs` holding its results (converted to
  # their types) on the inputs' device. Solutions are evaluated here, so that a singular
  # matrix raises the ArgumentError Nx raises.
  defp linalg(nx_op, outputs, inputs, fun) do
    type = if Enum.any?(outputs, &(&1.type == {:f, 64})), do: {:f, 64}, else: {:f, 32}
    linalg(nx_op, outputs, inputs, type, fun)
  end

  defp linalg(nx_op, outputs, inputs, type, fun) do
    device = op_device(inputs)
    op = op_fn(:cpu, nx_op, inputs)

    refs =
      Enum.map(inputs, fn
        %T{data: %NxMlx.Backend{device: :gpu}} = t ->
          ref_as(backend_transfer_in(t, :cpu), type, :cpu)

        t ->
          ref_as(t, type, :cpu)
      end)

    outputs
    |> Enum.zip_with(fun.(refs, op), fn out, r ->
      r = op.(:astype, [r, Types.to_mlx(out.type)])
      {out, r}
    end)
    |> tap(fn results ->
      # Eagerly a singular system is reported here; in a compiled program (registers) it
      # fails when the program runs.
      if nx_op in [:solve, :triangular_solve] and
           not Enum.any?(results, &match?({_, {:reg, _}}, &1)),
         do: evaluate_linalg!(nx_op, inputs, Enum.map(results, &elem(&1, 1)))
    end)
    |> Enum.map(fn {out, r} ->
      t = wrap(out, r, :cpu)
      if device == :gpu, do: backend_transfer_in(t, :gpu), else: t
    end)
  end

  defp evaluate_linalg!(nx_op, inputs, refs) do
    Enum.each(refs, &Runtime.call(:eval, [&1], fn -> describe(nx_op, inputs) end))
  rescue
    NxMlx.NIFError ->
      # Nx's message; MLX fails only on an exactly singular triangular factor here.
      reraise ArgumentError, "can't solve for singular matrix", __STACKTRACE__
  end
end
