defmodule NxMlx.CommandsTest do
  use ExUnit.Case, async: false

  import Bitwise
  import NxMlx.TestHelpers

  alias NxMlx.{Command, CommandQueue, Native, Pipeline}

  @mlx {NxMlx.Backend, device: :cpu}

  defp mlx(data, opts \\ []), do: Nx.tensor(data, Keyword.put(opts, :backend, @mlx))
  defp info(%Nx.Tensor{data: %NxMlx.Backend{ref: ref}}), do: Native.array_info(ref)
  defp bin(t), do: Nx.backend_copy(t, Nx.BinaryBackend)

  defp long_graph(n \\ 40) do
    a = Nx.iota({512, 512}, type: :f32, backend: @mlx) |> Nx.divide(512 * 512)
    Enum.reduce(1..n, a, fn _, acc -> Nx.dot(acc, a) end)
  end

  # The inverse of an all-zero matrix: MLX's CPU kernel (LAPACK) fails while it runs.
  defp failing_tensor do
    z = Nx.broadcast(Nx.tensor(0.0, type: :f32, backend: @mlx), {4, 4})
    worker = NxMlx.Runtime.worker(:cpu)
    {:ok, ref} = Native.inv(worker, z.data.ref)
    %{z | data: %NxMlx.Backend{ref: ref, device: :cpu}}
  end

  describe "submit / poll / wait" do
    test "a long evaluation is pending or running, then completed" do
      t = long_graph()
      assert info(t).state == :lazy
      {:ok, command} = NxMlx.submit(t)
      assert {:ok, status} = NxMlx.poll(command)
      assert status in [:pending, :running]
      assert :ok = NxMlx.wait(command)
      assert NxMlx.poll(command) == {:ok, :completed}
      assert info(t).state == :evaluated
      # Waiting again answers at once.
      assert :ok = NxMlx.wait(command)
      expected = long_graph(3) |> bin() |> Nx.sum() |> Nx.to_number()
      assert_in_delta Nx.to_number(Nx.sum(long_graph(3))), expected, abs(expected) * 1.0e-4
    end

    test "poll observes :running while MLX computes" do
      t = long_graph(80)
      {:ok, command} = NxMlx.submit(t)

      statuses =
        Stream.repeatedly(fn ->
          {:ok, s} = NxMlx.poll(command)
          s
        end)
        |> Enum.reduce_while([], fn s, acc ->
          if s in [:completed, :failed], do: {:halt, [s | acc]}, else: {:cont, [s | acc]}
        end)

      assert :running in statuses
      assert hd(statuses) == :completed
    end

    test "containers: every tensor is evaluated, other backends are ignored" do
      a = Nx.add(mlx([1.0, 2.0]), 1.0)
      b = Nx.multiply(mlx([3]), 2)
      {:ok, command} = NxMlx.submit(%{a: a, nested: {b, Nx.tensor([1])}})
      assert :ok = NxMlx.wait(command)
      assert info(a).state == :evaluated and info(b).state == :evaluated
      assert %{a: ^a} = command.outputs
    end

    test "a failing evaluation reports :failed with the reason, and its tensor raises" do
      t = failing_tensor()
      {:ok, command} = NxMlx.submit(t)
      assert {:error, message} = NxMlx.wait(command)
      assert message =~ "Inverse"
      assert NxMlx.poll(command) == {:ok, :failed}
      assert info(t).state == :failed
      assert_raise NxMlx.NIFError, ~r/evaluation failed/, fn -> Nx.to_binary(t) end
      assert_raise NxMlx.NIFError, ~r/evaluation failed/, fn -> Nx.add(t, 1.0) end
      # The queue keeps working.
      assert Nx.to_flat_list(Nx.add(mlx([1.0]), 1.0)) == [2.0]
    end

    test "every tensor computed from a failed graph raises; computed ones stay readable" do
      ok = Nx.add(mlx([1.0, 2.0]), 1.0)
      Nx.to_binary(ok)
      z = failing_tensor()
      w = Nx.add(z, z)
      # Built before the failure is known and not part of the failing graph.
      v = Nx.multiply(z, 2.0)
      {:ok, command} = NxMlx.submit({ok, w})
      assert {:error, _} = NxMlx.wait(command)
      assert Nx.to_flat_list(ok) == [2.0, 3.0]
      assert_raise NxMlx.NIFError, ~r/failed/, fn -> Nx.to_binary(z) end
      assert_raise NxMlx.NIFError, ~r/failed/, fn -> Nx.to_binary(v) end
      assert_raise NxMlx.NIFError, ~r/failed/, fn -> Nx.to_binary(w) end
    end

    test "reading a failing tensor directly raises instead of crashing" do
      assert_raise NxMlx.NIFError, ~r/Inverse/, fn -> Nx.to_binary(failing_tensor()) end
    end

    test "command records are freed once dropped" do
      parent = self()
      # Commands of earlier tests are freed once their processes are collected.
      assert eventually(fn -> Native.live_commands() == 0 end)
      before = 0

      pid =
        spawn(fn ->
          {:ok, c} = NxMlx.submit(Nx.add(mlx([1.0]), 1.0))
          :ok = NxMlx.wait(c)
          send(parent, {:live, Native.live_commands()})
        end)

      assert_receive {:live, during}
      assert during >= before + 1
      ref = Process.monitor(pid)
      assert_receive {:DOWN, ^ref, _, _, _}
      assert eventually(fn -> Native.live_commands() <= before end)
    end

    test "[:nx_mlx, :command, :stop] is emitted once, with the duration" do
      forward_telemetry([:nx_mlx, :command, :stop])
      {:ok, command} = NxMlx.submit(long_graph(5))
      :ok = NxMlx.wait(command)
      {:ok, :completed} = NxMlx.poll(command)
      :ok = NxMlx.wait(command)
      assert_receive {:telemetry, _, %{duration: d}, %{status: :completed, command: %Command{}}}
      assert d > 0
      refute_receive {:telemetry, [:nx_mlx, :command, :stop], _, _}, 50
    end
  end

  describe "long eager chains" do
    test "are cut by the worker every 10,000 lazy ops, without a read-back" do
      a = mlx([0.0, 1.0])
      t = Enum.reduce(1..10_050, a, fn _, acc -> Nx.add(acc, 1.0) end)
      # The worker evaluated the chain up to node 10,000 on its own; what is left is short.
      assert Nx.to_flat_list(t) == [10_050.0, 10_051.0]
    end
  end

  describe "pipelines" do
    defmodule Stages do
      import Nx.Defn
      defn(scale(x), do: x * 3 + 1)
    end

    test "stages run in order, defn included, with one submission" do
      pipeline =
        Pipeline.new()
        |> Pipeline.stage(&Nx.add(&1, 1.0))
        |> Pipeline.stage(&Stages.scale/1)
        |> Pipeline.stage(fn x -> {Nx.sum(x), Nx.negate(x)} end)

      input = mlx([1.0, 2.0, 3.0])
      {:ok, [s1, s2, {sum, neg}]} = Pipeline.run(pipeline, input)

      assert Nx.to_flat_list(s1) == [2.0, 3.0, 4.0]
      assert Nx.to_flat_list(s2) == [7.0, 10.0, 13.0]
      assert Nx.to_number(sum) == 30.0
      assert Nx.to_flat_list(neg) == [-7.0, -10.0, -13.0]
      # Everything was evaluated by the one submission, not by the reads above.
      assert info(s1).state == :evaluated
    end

    test "async: true returns a command holding the outputs" do
      pipeline = Pipeline.new([fn x -> Nx.dot(x, x) end, &Nx.sum/1])
      x = Nx.iota({64, 64}, type: :f32, backend: @mlx) |> Nx.divide(4096)
      {:ok, %Command{} = command} = Pipeline.run(pipeline, x, async: true)
      assert :ok = NxMlx.wait(command)
      [dot, sum] = command.outputs
      assert info(dot).state == :evaluated
      expected = x |> bin() |> then(&Nx.dot(&1, &1)) |> Nx.sum() |> Nx.to_number()
      assert_in_delta Nx.to_number(sum), expected, abs(expected) * 1.0e-4
    end

    test "run_with_timing splits encoding and execution" do
      pipeline =
        Pipeline.new([fn x -> Enum.reduce(1..30, x, fn _, acc -> Nx.dot(acc, x) end) end])

      x = long_graph(1)
      Nx.to_binary(x)
      {:ok, [_out], {encode_ns, execute_ns}} = Pipeline.run_with_timing(pipeline, x)
      assert encode_ns > 0 and execute_ns > 0
      # Building 30 lazy matmuls is far cheaper than running them.
      assert encode_ns < execute_ns
    end

    test "a failing stage surfaces as an error" do
      pipeline = Pipeline.new([fn _ -> failing_tensor() end])
      assert {:error, message} = Pipeline.run(pipeline, mlx([1.0]))
      assert message =~ "Inverse"
    end

    test "stages must be one-argument functions" do
      assert_raise ArgumentError, ~r/one-argument function/, fn -> Pipeline.new([& &1, 3]) end
    end
  end

  describe "memory" do
    test "counters, peak reset, cache limit and clearing" do
      NxMlx.reset_peak_memory()
      t = Nx.add(Nx.iota({1_000_000}, type: :f32, backend: @mlx), 1.0)
      Nx.to_binary(t)
      m = NxMlx.memory()
      assert m.active >= 4_000_000
      assert m.peak >= 4_000_000
      assert m.limit > 0

      old = NxMlx.set_cache_limit(0)
      assert is_integer(old)
      assert NxMlx.set_cache_limit(old) == 0

      # The CPU-only build starts with an eighth of the memory limit cached, at least 256 MiB
      # (NxMlx.Application), unless the application's config says otherwise.
      if NxMlx.devices() == [:cpu] and Application.get_env(:nx_mlx, :cache_limit, :auto) == :auto do
        assert old >= max(256 * 1024 * 1024, div(m.limit, 8))
      end

      assert :ok = NxMlx.clear_cache()
      assert NxMlx.memory().cache == 0
    end

    test "the memory limit bounds the largest array, with an ArgumentError" do
      big = Nx.iota({1_000_000}, type: :f32, backend: @mlx)
      old = NxMlx.set_memory_limit(1_000_000)

      try do
        assert NxMlx.set_memory_limit(1_000_000) == 1_000_000

        assert_raise ArgumentError,
                     ~r/add failed for shapes.*more than MLX's memory limit/s,
                     fn ->
                       Nx.add(big, 1.0)
                     end
      after
        NxMlx.set_memory_limit(old)
      end

      # Far beyond any machine: refused up front instead of crashing at evaluation.
      assert_raise ArgumentError, ~r/memory limit/, fn ->
        Nx.broadcast(Nx.tensor(1.0, backend: @mlx), {1 <<< 20, 1 <<< 20}) |> Nx.add(1)
      end
    end
  end

  test "queues created by CommandQueue.new/1 emit [:nx_mlx, :queue, :start]" do
    forward_telemetry([:nx_mlx, :queue, :start])
    q = CommandQueue.new!(:cpu)
    id = CommandQueue.id(q)
    assert_receive {:telemetry, _, %{system_time: _}, %{id: ^id, device: :cpu, queue: ^q}}
  end
end
