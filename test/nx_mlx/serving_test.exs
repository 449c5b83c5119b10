defmodule NxMlx.ServingTest do
  # Nx.Serving with `compiler: NxMlx` on the test device: a small model (an MLP whose first
  # layer has 4-bit weights, captured once and shared by every partition) served with
  # batching and two partitions to 32 concurrent callers, each answer equal to the direct
  # jitted call on the same rows; streaming hooks; and a distributed serving on a second node
  # (a `:peer` of this VM running NxMlx), called from this one.
  use ExUnit.Case, async: false

  @device NxMlx.TestHelpers.oracle_device()
  @mlx {NxMlx.Backend, device: @device}

  defmodule Model do
    import Nx.Defn

    defn(mlp(x, w1, w2), do: x |> Nx.dot(w1) |> Nx.max(0) |> Nx.dot(w2) |> Nx.tanh())

    defn hooked(x) do
      x |> Nx.multiply(2) |> hook(:doubled) |> Nx.add(1)
    end
  end

  defp weights do
    key = Nx.Random.key(7)
    {w1, key} = Nx.Random.uniform(key, -0.2, 0.2, shape: {64, 32})
    {w2, _key} = Nx.Random.uniform(key, -0.2, 0.2, shape: {32, 8})
    w1 = Nx.backend_copy(w1, @mlx)
    {NxMlx.Quantized.quantize(w1, bits: 4, group_size: 32), Nx.backend_copy(w2, @mlx)}
  end

  defp unique_name, do: :"nx_mlx_serving_#{System.unique_integer([:positive])}"

  test "32 concurrent callers of a batched, partitioned serving get the direct call's answers" do
    {w1, w2} = weights()
    opts = [compiler: NxMlx, device: @device, max_concurrency: 2]

    # The weights are arguments of the jitted function (tensors captured by a defn closure
    # are refused by Nx), made once and shared by the partitions.
    serving =
      Nx.Serving.new(
        fn defn_opts ->
          mlp = Nx.Defn.jit(&Model.mlp/3, defn_opts)
          fn batch -> mlp.(batch, w1, w2) end
        end,
        opts
      )
      |> Nx.Serving.process_options(batch_size: 8)

    name = unique_name()

    start_supervised!(
      {Nx.Serving, serving: serving, name: name, batch_timeout: 5, partitions: true}
    )

    direct = Nx.Defn.jit(&Model.mlp/3, compiler: NxMlx, device: @device)

    results =
      1..32
      |> Task.async_stream(
        fn i ->
          # Requests of one size that divides the batch size are never split across two
          # batches: Nx.Serving (0.13.1, and main) joins the pieces of a split request in the
          # order they arrive, and with two partitions two batches can finish out of order
          # (rows 1..3 with batch size 8 came back with their rows swapped about once in 300).
          rows = 2
          x = Nx.iota({rows, 64}, type: :f32, backend: @mlx) |> Nx.add(i) |> Nx.sin()
          got = Nx.Serving.batched_run(name, Nx.Batch.stack(Enum.map(0..(rows - 1), &x[&1])))
          {got, direct.(x, w1, w2)}
        end,
        max_concurrency: 32,
        timeout: 60_000
      )
      |> Enum.map(fn {:ok, r} -> r end)

    assert length(results) == 32

    for {got, want} <- results do
      assert got.shape == want.shape
      assert Nx.to_number(Nx.all_close(got, want, atol: 1.0e-5)) == 1
    end
  end

  test "streaming hooks reach the caller, then the batch" do
    serving =
      Nx.Serving.jit(&Model.hooked/1, compiler: NxMlx, device: @device)
      |> Nx.Serving.streaming(hooks: [:doubled])

    name = unique_name()
    start_supervised!({Nx.Serving, serving: serving, name: name, batch_timeout: 5})

    x = Nx.tensor([[1.0, 2.0, 3.0]], backend: @mlx)
    events = Enum.to_list(Nx.Serving.batched_run(name, Nx.Batch.concatenate([x])))

    assert [{:doubled, doubled}, {:batch, out, _meta}] = events
    assert Nx.to_flat_list(doubled) == [2.0, 4.0, 6.0]
    assert Nx.to_flat_list(out) == [3.0, 5.0, 7.0]
  end

  @tag :distributed
  test "a distributed serving on a peer node running NxMlx answers this node" do
    unless Node.alive?() do
      System.cmd("epmd", ["-daemon"])
      name = :"nx_mlx_test_#{System.unique_integer([:positive])}"

      with {:error, reason} <- Node.start(name, :shortnames) do
        flunk("Erlang distribution did not start on this machine: #{inspect(reason)}")
      end
    end

    paths = Enum.flat_map(:code.get_path(), &[~c"-pa", &1])

    {:ok, peer, node} =
      :peer.start_link(%{
        name: :"nx_mlx_peer_#{System.unique_integer([:positive])}",
        args: [~c"-setcookie", Atom.to_charlist(Node.get_cookie()) | paths]
      })

    try do
      {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:nx_mlx])
      name = unique_name()

      # Test modules live in this VM's memory only: the peer gets one of its own that starts
      # the serving and keeps it, from source.
      source = """
      defmodule NxMlx.ServingTest.Remote do
        def start(name, device) do
          parent = self()

          spawn(fn ->
            # Replies leave this node on Nx.BinaryBackend: an NxMlx tensor holds a reference
            # to an array of this VM.
            serving =
              Nx.Serving.jit(&Nx.exp/1, compiler: NxMlx, device: device)
              |> Nx.Serving.distributed_postprocessing(&Nx.backend_transfer(&1, Nx.BinaryBackend))

            {:ok, _} = Nx.Serving.start_link(serving: serving, name: name, batch_timeout: 5)
            send(parent, :started)
            Process.sleep(:infinity)
          end)

          receive do
            :started -> :ok
          after
            30_000 -> :timeout
          end
        end
      end
      """

      :erpc.call(node, Code, :compile_string, [source])
      assert :ok = :erpc.call(node, NxMlx.ServingTest.Remote, :start, [name, @device])

      # This node has no serving of that name: the call goes to the peer's.
      x = Nx.tensor([[0.0, 1.0, 2.0]], backend: Nx.BinaryBackend)

      out =
        wait_distributed(fn ->
          Nx.Serving.batched_run({:distributed, name}, Nx.Batch.stack([x[0]]))
        end)

      assert Nx.to_number(Nx.all_close(out, Nx.exp(x), atol: 1.0e-6)) == 1
      assert :erpc.call(node, NxMlx, :default_device, []) in [:cpu, :gpu]

      # An NxMlx tensor of the peer, read here: an ArgumentError that says what to do.
      remote = :erpc.call(node, Nx, :iota, [{3}, [backend: NxMlx.Backend]])

      assert_raise ArgumentError, ~r/MLX array of node .* copy tensors to Nx.BinaryBackend/, fn ->
        Nx.add(remote, 1)
      end
    after
      :peer.stop(peer)
    end
  end

  # The peer's process group reaches this node a moment after the serving starts.
  defp wait_distributed(fun, tries \\ 50) do
    fun.()
  catch
    :exit, _ when tries > 0 ->
      Process.sleep(100)
      wait_distributed(fun, tries - 1)
  end
end
