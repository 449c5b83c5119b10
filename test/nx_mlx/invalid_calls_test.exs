defmodule NxMlx.InvalidCallsTest do
  # Calls that Nx's front end would normally refuse, made straight to the backend: MLX's
  # checks turn into ArgumentErrors that name the op, and the VM lives on.
  use ExUnit.Case, async: true

  import Bitwise

  alias NxMlx.Backend

  @mlx {NxMlx.Backend, device: :cpu}

  defp t(shape, type \\ :f32), do: Nx.iota(shape, type: type, backend: @mlx)

  test "shape mismatches" do
    assert_raise ArgumentError, ~r/NxMlx.Backend.reshape/, fn ->
      Backend.reshape(Nx.template({7}, :f32), t({2, 3}))
    end

    assert_raise ArgumentError, ~r/NxMlx.Backend.add failed for shapes \{2, 3\}, \{4\}/, fn ->
      Backend.add(Nx.template({2, 3}, :f32), t({2, 3}), t({4}))
    end

    assert_raise ArgumentError, ~r/NxMlx.Backend.concatenate/, fn ->
      Backend.concatenate(Nx.template({4, 3}, :f32), [t({2, 3}), t({2, 2})], 0)
    end

    assert_raise ArgumentError, ~r/NxMlx.Backend.dot/, fn ->
      Backend.dot(Nx.template({2, 2}, :f32), t({2, 3}), [1], [], t({2, 2}), [0], [])
    end
  end

  test "bad axes" do
    assert_raise ArgumentError, ~r/NxMlx.Backend.transpose/, fn ->
      Backend.transpose(Nx.template({3, 2}, :f32), t({2, 3}), [0, 5])
    end

    assert_raise ArgumentError, ~r/NxMlx.Backend.sum/, fn ->
      Backend.sum(Nx.template({}, :f32), t({2, 3}), axes: [4])
    end

    assert_raise ArgumentError, ~r/NxMlx.Backend.argsort/, fn ->
      Backend.argsort(Nx.template({2, 3}, :s64), t({2, 3}), axis: 3)
    end
  end

  test "bad sizes, types and slices" do
    assert_raise ArgumentError, ~r/from_binary.*does not match/, fn ->
      Backend.from_binary(Nx.template({4}, :f32), <<0, 0, 0>>, device: :cpu)
    end

    assert_raise ArgumentError, ~r/complex128/, fn ->
      Nx.tensor([1, 2], type: :c128, backend: @mlx)
    end

    assert_raise ArgumentError, ~r/NxMlx.Backend.bitcast/, fn ->
      Backend.bitcast(Nx.template({2}, :s64), t({2}, :f32))
    end

    assert_raise ArgumentError, ~r/NxMlx.Backend.as_type|too many elements|memory limit/, fn ->
      Backend.constant(Nx.template({1 <<< 40, 1 <<< 20}, :f32), 1.0, device: :cpu)
    end

    # Types MLX lacks stay on Nx.BinaryBackend; meeting an MLX tensor in an op they get a
    # clear error, not a MatchError.
    s4 = Nx.tensor([1, 3], type: :s4, backend: @mlx)

    assert_raise ArgumentError, ~r/a \{:s, 4\} tensor cannot take part in an MLX op/, fn ->
      Nx.take(t({5}), s4)
    end

    assert_raise ArgumentError, ~r/a \{:f, 8\} tensor cannot take part/, fn ->
      Nx.take(Nx.tensor([1.0, 2.0], type: :f8, backend: @mlx), Nx.tensor([1], backend: @mlx))
    end
  end

  test "after all of that the VM and the default queue still work" do
    assert Nx.to_flat_list(Nx.add(t({3}), 1)) == [1.0, 2.0, 3.0]
  end
end
