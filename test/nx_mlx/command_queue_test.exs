defmodule NxMlx.CommandQueueTest do
  use ExUnit.Case, async: false

  import ExUnit.CaptureLog
  import NxMlx.TestHelpers

  alias NxMlx.{CommandQueue, Native}

  @mlx {NxMlx.Backend, device: :cpu}
  @key :nx_mlx_command_queue

  defp mlx(data, opts \\ []), do: Nx.tensor(data, Keyword.put(opts, :backend, @mlx))
  defp info(%Nx.Tensor{data: %NxMlx.Backend{ref: ref}}), do: Native.array_info(ref)

  # A graph that takes tens of milliseconds on the CPU: 40 chained 512x512 matmuls.
  defp long_graph do
    a = Nx.iota({512, 512}, type: :f32, backend: @mlx) |> Nx.divide(512 * 512)
    Enum.reduce(1..40, a, fn _, acc -> Nx.dot(acc, a) end)
  end

  describe "new/1" do
    test "starts a queue with its own worker thread" do
      {:ok, q} = CommandQueue.new(:cpu)
      assert %CommandQueue{device: :cpu} = q
      assert is_reference(q.ref)
      default = CommandQueue.default(:cpu)
      assert CommandQueue.id(q) != CommandQueue.id(default)

      # The worker thread reports its own id from inside a job.
      assert NxMlx.Runtime.call(:current_worker_id, [q.ref], fn -> "" end) ==
               CommandQueue.id(q)

      assert CommandQueue.new!(:cpu).device == :cpu
    end

    test "an unknown device is an error, not a crash" do
      assert {:error, message} = CommandQueue.new(:tpu)
      assert message =~ "unknown device"
      assert_raise NxMlx.NIFError, ~r/unknown device/, fn -> CommandQueue.new!(:tpu) end
    end

    test "a queue for an unavailable GPU is an error and the VM lives on" do
      if :gpu in NxMlx.devices() do
        assert {:ok, _} = CommandQueue.new(:gpu)
      else
        assert {:error, message} = CommandQueue.new(:gpu)
        assert message =~ "not available"
        assert_raise NxMlx.NIFError, fn -> CommandQueue.new!(:gpu) end
        # Still alive and working.
        assert Nx.to_number(Nx.sum(mlx([1.0, 2.0]))) == 3.0
      end
    end
  end

  describe "with_queue/2" do
    test "binds {ref, device} for the block and deletes the key afterwards" do
      q = CommandQueue.new!(:cpu)
      assert Process.get(@key) == nil

      result =
        CommandQueue.with_queue(q, fn ->
          assert Process.get(@key) == {q.ref, :cpu}
          assert CommandQueue.current() == {q.ref, :cpu}
          :done
        end)

      assert result == :done
      assert Process.get(@key) == nil
      refute Map.has_key?(Map.new(Process.get()), @key)
    end

    test "nested bindings shadow and restore, also after an exception" do
      q1 = CommandQueue.new!(:cpu)
      q2 = CommandQueue.new!(:cpu)

      CommandQueue.with_queue(q1, fn ->
        CommandQueue.with_queue(q2, fn -> assert Process.get(@key) == {q2.ref, :cpu} end)
        assert Process.get(@key) == {q1.ref, :cpu}

        assert_raise RuntimeError, "boom", fn ->
          CommandQueue.with_queue(q2, fn -> raise "boom" end)
        end

        assert Process.get(@key) == {q1.ref, :cpu}

        catch_throw(CommandQueue.with_queue(q2, fn -> throw(:out) end))
        assert Process.get(@key) == {q1.ref, :cpu}
      end)

      assert Process.get(@key) == nil
    end

    test "ops inside the block are built and evaluated on the bound queue's thread" do
      q = CommandQueue.new!(:cpu)
      default_id = CommandQueue.id(CommandQueue.default(:cpu))
      a = mlx([1.0, 2.0, 3.0])

      inside =
        CommandQueue.with_queue(q, fn ->
          t = Nx.multiply(Nx.add(a, 1.0), 2.0)
          assert Nx.to_flat_list(t) == [4.0, 6.0, 8.0]
          t
        end)

      assert %{worker_id: wid, evaluated_on: eid, state: :evaluated} = info(inside)
      assert wid == CommandQueue.id(q)
      # The evaluation ran on that queue's OS thread (recorded by the thread itself).
      assert eid == CommandQueue.id(q)

      outside = Nx.add(a, 1.0)
      Nx.to_binary(outside)
      assert %{worker_id: ^default_id, evaluated_on: ^default_id} = info(outside)
    end

    test "calls made by library code through the backend route there too" do
      q = CommandQueue.new!(:cpu)
      x = mlx([1.0, 2.0, 3.0, 4.0])

      fun =
        Nx.Defn.jit(fn x -> Nx.sum(Nx.multiply(Nx.exp(x), 2)) end, compiler: Nx.Defn.Evaluator)

      out = CommandQueue.with_queue(q, fn -> fun.(x) end)
      expected = x |> Nx.backend_copy(Nx.BinaryBackend) |> Nx.exp() |> Nx.multiply(2) |> Nx.sum()
      assert_in_delta Nx.to_number(out), Nx.to_number(expected), 1.0e-3
      assert info(out).worker_id == CommandQueue.id(q)
      assert info(out).evaluated_on == CommandQueue.id(q)
    end

    test "inputs still lazy on another queue are evaluated there first" do
      q1 = CommandQueue.new!(:cpu)
      q2 = CommandQueue.new!(:cpu)
      a = CommandQueue.with_queue(q1, fn -> Nx.add(mlx([1.0, 2.0]), 1.0) end)
      assert info(a).state == :lazy
      b = CommandQueue.with_queue(q2, fn -> Nx.multiply(a, 10.0) end)
      assert info(a).state == :evaluated
      assert info(a).evaluated_on == CommandQueue.id(q1)
      assert Nx.to_flat_list(b) == [20.0, 30.0]
      assert info(b).evaluated_on == CommandQueue.id(q2)
    end
  end

  describe "cross-device promotion" do
    setup do
      CommandQueue.__reset_warnings__()
      on_exit(&CommandQueue.__reset_warnings__/0)
      %{binding: {make_ref(), :gpu}}
    end

    # This machine may have only a CPU, so these tests drive the routing rule with a
    # binding to a :gpu queue; the GPU-tagged test below runs it for real.
    test "off (default): the tensor's default queue runs it, silently", %{binding: b} do
      log =
        capture_log(fn ->
          assert CommandQueue.route(:cpu, b, cross_device_promotion: false) == {:cpu, :default}
        end)

      assert log == ""
    end

    test "on: the bound queue runs it, on its device", %{binding: b} do
      assert CommandQueue.route(:cpu, b, cross_device_promotion: true) == {:gpu, :queue}
    end

    test "warn_cross_device logs once per kind of mismatch", %{binding: b} do
      off = [cross_device_promotion: false, warn_cross_device: true]
      on = [cross_device_promotion: true, warn_cross_device: true]

      log1 = capture_log(fn -> CommandQueue.route(:cpu, b, off) end)
      assert log1 =~ "an op on :cpu tensors inside a :gpu command queue"
      assert log1 =~ "promotion is off"
      assert capture_log(fn -> CommandQueue.route(:cpu, b, off) end) == ""

      log2 = capture_log(fn -> CommandQueue.route(:cpu, b, on) end)
      assert log2 =~ "promotion is on"
      assert capture_log(fn -> CommandQueue.route(:cpu, b, on) end) == ""
    end

    test "matching devices and no binding never warn" do
      all = [cross_device_promotion: true, warn_cross_device: true]

      log =
        capture_log(fn ->
          assert CommandQueue.route(:cpu, {make_ref(), :cpu}, all) == {:cpu, :queue}
          assert CommandQueue.route(:cpu, nil, all) == {:cpu, :default}
        end)

      assert log == ""
    end

    test "the backend reads the configuration (same device: no promotion involved)" do
      q = CommandQueue.new!(:cpu)
      Application.put_env(:nx_mlx, :warn_cross_device, true)
      on_exit(fn -> Application.delete_env(:nx_mlx, :warn_cross_device) end)

      log =
        capture_log(fn ->
          t = CommandQueue.with_queue(q, fn -> Nx.add(mlx([1.0]), 1.0) end)
          assert info(t).worker_id == CommandQueue.id(q)
        end)

      assert log == ""
    end

    @tag :gpu
    test "a :cpu tensor inside a :gpu queue follows the configuration" do
      q = CommandQueue.new!(:gpu)
      a = mlx([1.0, 2.0])

      t = CommandQueue.with_queue(q, fn -> Nx.add(a, 1.0) end)
      assert t.data.device == :cpu
      assert info(t).worker_id == CommandQueue.id(CommandQueue.default(:cpu))

      Application.put_env(:nx_mlx, :cross_device_promotion, true)
      Application.put_env(:nx_mlx, :warn_cross_device, true)

      on_exit(fn ->
        Application.delete_env(:nx_mlx, :cross_device_promotion)
        Application.delete_env(:nx_mlx, :warn_cross_device)
      end)

      log =
        capture_log(fn ->
          t = CommandQueue.with_queue(q, fn -> Nx.add(a, 1.0) end)
          assert t.data.device == :gpu
          assert info(t).worker_id == CommandQueue.id(q)
          assert Nx.to_flat_list(t) == [2.0, 3.0]
        end)

      assert log =~ "promotion is on"
    end
  end

  describe "synchronize/1" do
    test "returns only after the work queued before it has finished" do
      q = CommandQueue.new!(:cpu)
      t = CommandQueue.with_queue(q, &long_graph/0)
      {:ok, command} = NxMlx.submit(t)
      assert :ok = CommandQueue.synchronize(q)
      # No waiting here: the command must already be done.
      assert NxMlx.poll(command) == {:ok, :completed}
      assert info(t).state == :evaluated
    end
  end

  describe "dropping a queue" do
    test "stops and joins its thread once the last reference is gone" do
      parent = self()
      forward_telemetry([:nx_mlx, :queue, :stop])
      # Queues of earlier tests are gone once their processes are collected: only the
      # default queues (one per device) and the compiler's partition queues stay.
      defaults = length(NxMlx.devices()) + length(NxMlx.Compiler.__partition_queues__())
      assert eventually(fn -> Native.live_workers() == defaults end)
      live_before = defaults

      {pid, mref} =
        spawn_monitor(fn ->
          q = CommandQueue.new!(:cpu)
          t = CommandQueue.with_queue(q, fn -> Nx.add(mlx([1.0]), 1.0) end)
          send(parent, {:queue, CommandQueue.id(q), Native.live_workers(), Nx.to_flat_list(t)})
        end)

      assert_receive {:queue, id, live_during, [2.0]}, 5_000
      assert live_during == live_before + 1
      assert_receive {:DOWN, ^mref, :process, ^pid, :normal}
      assert_receive {:telemetry, [:nx_mlx, :queue, :stop], _, %{id: ^id, device: :cpu}}, 5_000
      assert eventually(fn -> Native.live_workers() == live_before end)
    end
  end
end
