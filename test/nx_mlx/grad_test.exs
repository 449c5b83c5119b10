defmodule NxMlx.GradTest do
  # Gradients through Nx.Defn's default evaluator on NxMlx tensors, against the same
  # gradients on Nx.BinaryBackend (f32, rtol/atol 1.0e-4), with no op falling back.
  use ExUnit.Case, async: true

  import Nx.Defn

  @mlx {NxMlx.Backend, device: :cpu}
  @tol [rtol: 1.0e-4, atol: 1.0e-4]

  defn(f_exp_sum(x), do: Nx.sum(Nx.exp(x) * 0.1))
  defn(f_log(x), do: Nx.sum(Nx.log(x * x + 1)))
  defn(f_trig(x), do: Nx.sum(Nx.sin(x) * Nx.cos(x)))
  defn(f_tanh(x), do: Nx.sum(Nx.tanh(x) ** 2))
  defn(f_sigmoid(x), do: Nx.mean(Nx.sigmoid(x)))
  defn(f_dot(x), do: Nx.sum(Nx.dot(x, Nx.transpose(x))))
  defn(f_divide(x), do: Nx.sum(x / (Nx.abs(x) + 1)))
  defn(f_pow(x), do: Nx.sum(Nx.pow(x * x + 1, 1.5)))
  defn(f_max(x), do: Nx.reduce_max(x * 3))
  defn(f_slice(x), do: Nx.sum(x[[0..1, 1..2]] * 2))

  defn(f_softmax(x),
    do: Nx.sum(Nx.exp(x) / Nx.sum(Nx.exp(x), axes: [1], keep_axes: true) * Nx.iota({3, 4}))
  )

  defn(f_sqrt_clip(x), do: Nx.sum(Nx.sqrt(Nx.clip(x, 0.1, 2.0) + 1)))
  defn(f_concat(x), do: Nx.sum(Nx.concatenate([x, x * 2], axis: 0) ** 2))

  # Max pooling: its gradient is window_scatter_max.
  defn(f_max_pool(x), do: Nx.sum(Nx.window_max(x, {2, 2}, strides: [1, 2]) * Nx.iota({2, 2})))

  defn(f_conv(x),
    do: Nx.sum(Nx.conv(Nx.reshape(x, {1, 1, 3, 4}), Nx.reshape(x[[0..1, 0..1]], {1, 1, 2, 2})))
  )

  defn(f_take(x), do: Nx.sum(Nx.take(x, Nx.tensor([2, 0, 2]), axis: 0) * Nx.iota({3, 4})))

  @functions [:f_exp_sum, :f_log, :f_trig, :f_tanh, :f_sigmoid, :f_dot, :f_divide, :f_pow] ++
               [:f_max, :f_slice, :f_softmax, :f_sqrt_clip, :f_concat, :f_max_pool, :f_conv] ++
               [:f_take]

  test "value and gradient of #{length(@functions)} functions match Nx.BinaryBackend" do
    x = Nx.tensor([[0.5, -1.2, 2.0, 0.3], [1.5, 0.7, -0.4, 1.1], [-0.9, 0.2, 0.8, -1.6]])

    for name <- @functions do
      fun = fn t -> apply(__MODULE__, name, [t]) end
      # As users run it: NxMlx as the default backend (Nx creates constants with it).
      {value, grad} =
        NxMlx.TestHelpers.assert_native(fn ->
          Nx.with_default_backend(@mlx, fn ->
            Nx.Defn.value_and_grad(Nx.backend_copy(x, @mlx), fun)
          end)
        end)

      {ref_value, ref_grad} = Nx.Defn.value_and_grad(x, fun)

      assert %NxMlx.Backend{} = grad.data, "#{name}: gradient not on NxMlx"

      for {got, expected} <- [{value, ref_value}, {grad, ref_grad}] do
        close = Nx.all_close(Nx.backend_copy(got, Nx.BinaryBackend), expected, @tol)
        assert Nx.to_number(close) == 1, "#{name}\n#{inspect(got)}\n#{inspect(expected)}"
      end
    end
  end
end
