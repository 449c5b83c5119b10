defmodule NxMlx.Backend.DotConv do
  @moduledoc false
  # NxMlx.Backend's dot and convolution.

  import NxMlx.Backend.Core

  alias Nx.Tensor, as: T
  alias NxMlx.Types

  ## Convolution

  def conv(%T{type: {kind, size}} = out, %T{} = t, %T{} = k, opts)
      when kind in [:f, :bf] and size <= 32 do
    # MLX's GPU convolution gives wrong results with input dilation (seen on CUDA).
    gpu_dilation? = op_device([t, k]) == :gpu and Enum.any?(opts[:input_dilation], &(&1 != 1))

    if opts[:batch_group_size] != 1 or gpu_dilation? or
         Enum.any?(opts[:padding], fn {lo, hi} -> lo < 0 or hi < 0 end) do
      NxMlx.Fallback.run(:conv, [out, t, k, opts], op_device([t, k]))
    else
      native_conv(out, t, k, opts)
    end
  end

  def conv(out, t, k, opts), do: NxMlx.Fallback.run(:conv, [out, t, k, opts], op_device([t, k]))

  # Nx's layout is {batch, channels, spatial...} for the input, {filters, channels / groups,
  # spatial...} for the kernel and {batch, filters, spatial...} for the output, each reached
  # through its permutation option; MLX's is channels last.
  defp native_conv(%T{type: type} = out, t, k, opts) do
    device = op_device([t, k])
    op = op_fn(device, :conv, [t, k])
    rank = tuple_size(t.shape)
    spatial = Enum.to_list(2..(rank - 1)//1)
    to_channels_last = [0 | spatial] ++ [1]

    x = op.(:transpose, [ref_as(t, type, device), opts[:input_permutation]])
    w = op.(:transpose, [ref_as(k, type, device), opts[:kernel_permutation]])
    x = op.(:transpose, [x, to_channels_last])
    w = op.(:transpose, [w, to_channels_last])

    r =
      op.(:conv, [
        x,
        w,
        opts[:strides],
        Enum.map(opts[:padding], &elem(&1, 0)),
        Enum.map(opts[:padding], &elem(&1, 1)),
        opts[:kernel_dilation],
        opts[:input_dilation],
        opts[:feature_group_size]
      ])

    # Back to {batch, filters, spatial...}, then to the requested output layout.
    r = op.(:transpose, [r, [0, rank - 1 | Enum.to_list(1..(rank - 2)//1)]])

    inverse =
      opts[:output_permutation] |> Enum.with_index() |> Enum.sort() |> Enum.map(&elem(&1, 1))

    wrap(out, op.(:transpose, [r, inverse]), device)
  end

  ## dot

  # A quantized operand: MLX's quantized matmul where it applies, else its values.
  def dot(out, left, c1, b1, right, c2, b2) when quantized(left) or quantized(right) do
    NxMlx.Backend.Quantized.dot(out, left, c1, b1, right, c2, b2) ||
      dot(out, dequantized(left), c1, b1, dequantized(right), c2, b2)
  end

  def dot(%T{type: {kind, _}} = out, left, c1, b1, right, c2, b2) when kind in [:f, :bf, :c] do
    device = op_device([left, right])
    l = ref_as(left, out.type, device)
    r = ref_as(right, out.type, device)

    ref =
      if b1 == [] do
        call(device, :tensordot, [l, r, c1, c2], :dot, [left, right])
      else
        batched_dot(device, out, {l, left, c1, b1}, {r, right, c2, b2})
      end

    wrap(out, ref, device)
  end

  # Integers: MLX's matmul has no integer kernels, so multiply with broadcasting and sum
  # over the contracted axis (wrapping as Nx does), up to @int_dot_elements products (the
  # size of the intermediate array); larger integer dots fall back.
  @int_dot_elements 16_777_216
  def dot(%T{type: {kind, _}} = out, left, c1, b1, right, c2, b2) when kind in [:s, :u] do
    {b, m, k, n} = dot_sizes(left, c1, b1, right, c2, b2)

    if b * m * k * n <= @int_dot_elements do
      device = op_device([left, right])
      op = op_fn(device, :dot, [left, right])

      {l, r} =
        dot_operands(
          op,
          {ref_as(left, out.type, device), left, c1, b1},
          {ref_as(right, out.type, device), right, c2, b2}
        )

      l = op.(:reshape, [l, [b, m, k, 1]])
      r = op.(:reshape, [r, [b, 1, k, n]])
      # MLX sums narrow integers in a wider type: back to the output type (wrapping).
      p = op.(:reduce, [:sum, op.(:binary, [:multiply, l, r]), [2], false])
      p = op.(:astype, [p, Types.to_mlx(out.type)])
      wrap(out, op.(:reshape, [p, Tuple.to_list(out.shape)]), device)
    else
      NxMlx.Fallback.run(:dot, [out, left, c1, b1, right, c2, b2], op_device([left, right]))
    end
  end

  def dot(out, left, c1, b1, right, c2, b2) do
    NxMlx.Fallback.run(:dot, [out, left, c1, b1, right, c2, b2], op_device([left, right]))
  end

  defp dequantized(t) when quantized(t), do: NxMlx.Backend.Quantized.dequantize(t)
  defp dequantized(t), do: t

  defp dot_sizes(left, c1, b1, right, c2, b2) do
    size = fn t, axes -> Enum.reduce(axes, 1, &(elem(t.shape, &1) * &2)) end
    free1 = axes_except(left, c1 ++ b1)
    free2 = axes_except(right, c2 ++ b2)
    {size.(left, b1), size.(left, free1), size.(left, c1), size.(right, free2)}
  end

  # Batched dot as one matmul: left -> [batch..., free..., contract...] reshaped to
  # [B, M, K]; right -> [batch..., contract..., free...] reshaped to [B, K, N]. Nx orders the
  # output as batch, then left's free axes, then right's.
  defp batched_dot(device, out, left_operand, right_operand) do
    op = op_fn(device, :dot, [elem(left_operand, 1), elem(right_operand, 1)])
    {l, r} = dot_operands(op, left_operand, right_operand)
    p = op.(:matmul, [l, r])
    op.(:reshape, [p, Tuple.to_list(out.shape)])
  end

  # The operands as [batch..., M, K] and [batch..., K, N] arrays. The batch axes are kept
  # apart (MLX's matmul takes any number of them): merging them would force a copy of an
  # operand that is a transposed view, such as attention's heads.
  defp dot_operands(op, {l, left, c1, b1}, {r, right, c2, b2}) do
    free1 = axes_except(left, c1 ++ b1)
    free2 = axes_except(right, c2 ++ b2)
    {_b, m, k, n} = dot_sizes(left, c1, b1, right, c2, b2)
    batch = Enum.map(b1, &elem(left.shape, &1))
    l = op.(:reshape, [transposed(op, l, b1 ++ free1 ++ c1), batch ++ [m, k]])
    r = op.(:reshape, [transposed(op, r, b2 ++ c2 ++ free2), batch ++ [k, n]])
    {l, r}
  end

  defp transposed(op, ref, perm) do
    if perm == Enum.to_list(0..(length(perm) - 1)//1), do: ref, else: op.(:transpose, [ref, perm])
  end

  defp axes_except(t, axes), do: Enum.reject(0..(Nx.rank(t) - 1)//1, &(&1 in axes))
end
