defmodule NxMlx.AxonTest do
  # Axon models on NxMlx against Nx.BinaryBackend: an MLP's forward eagerly, under
  # `compiler: NxMlx` and with its dense kernels quantized (against the same model with the
  # dequantized kernels), and a few steps of an Axon training loop, whose parameters must
  # match BinaryBackend's. Skipped when Axon is not in the build.
  use ExUnit.Case, async: false

  @moduletag :axon

  @device NxMlx.TestHelpers.oracle_device()
  @mlx {NxMlx.Backend, device: @device}

  defp model do
    Axon.input("x", shape: {nil, 64})
    |> Axon.dense(128, activation: :relu, name: "hidden")
    |> Axon.dense(64, activation: :gelu, name: "middle")
    |> Axon.dense(8, activation: :softmax, name: "head")
  end

  defp init(model) do
    {init_fn, _predict_fn} = Axon.build(model)

    Nx.with_default_backend(Nx.BinaryBackend, fn ->
      init_fn.(Nx.template({4, 64}, :f32), Axon.ModelState.empty())
    end)
  end

  defp input(rows) do
    Nx.iota({rows, 64}, type: :f32, backend: Nx.BinaryBackend)
    |> Nx.multiply(0.37)
    |> Nx.sin()
  end

  defp on(%Axon.ModelState{} = state, backend),
    do: %{state | data: Nx.Defn.Composite.traverse(state.data, &Nx.backend_copy(&1, backend))}

  defp close?(a, b, tol) do
    a = Nx.backend_copy(a, Nx.BinaryBackend)
    b = Nx.backend_copy(b, Nx.BinaryBackend)
    Nx.to_number(Nx.all_close(a, b, atol: tol, rtol: tol)) == 1
  end

  test "an MLP predicts as on Nx.BinaryBackend, eagerly and compiled" do
    model = model()
    params = init(model)
    x = input(4)
    want = Axon.predict(model, params, x)

    mlx_params = on(params, @mlx)
    mlx_x = Nx.backend_copy(x, @mlx)
    eager = Axon.predict(model, mlx_params, mlx_x)
    compiled = Axon.predict(model, mlx_params, mlx_x, compiler: NxMlx, device: @device)

    assert close?(eager, want, 1.0e-5)
    assert close?(compiled, want, 1.0e-5)
  end

  test "quantized dense kernels: the fused matmul equals the dequantized model" do
    model = model()
    params = on(init(model), @mlx)
    q = NxMlx.Quantized.quantize_params(params, bits: 8, group_size: 32, min_size: 4096)

    assert NxMlx.Quantized.quantized?(q.data["hidden"]["kernel"])
    assert NxMlx.Quantized.quantized?(q.data["middle"]["kernel"])
    refute NxMlx.Quantized.quantized?(q.data["head"]["kernel"])

    deq = %{
      q
      | data:
          Map.new(q.data, fn {layer, ps} ->
            {layer, Map.new(ps, fn {k, v} -> {k, NxMlx.Quantized.dequantize(v)} end)}
          end)
    }

    x = Nx.backend_copy(input(3), @mlx)
    got = Axon.predict(model, q, x, compiler: NxMlx, device: @device)
    want = Axon.predict(model, deq, x, compiler: NxMlx, device: @device)
    assert close?(got, want, 1.0e-4)
    # and 8 bits stay near the float model
    assert close?(got, Axon.predict(model, params, x), 2.0e-2)
  end

  test "a training loop updates the parameters as on Nx.BinaryBackend" do
    model = model()
    params = init(model)
    labels = Nx.eye(8, backend: Nx.BinaryBackend) |> Nx.tile([1, 1]) |> Nx.slice([0, 0], [4, 8])
    data = List.duplicate({%{"x" => input(4)}, labels}, 3)

    run = fn backend, state, opts ->
      Nx.with_default_backend(backend, fn ->
        data =
          Enum.map(data, fn {x, y} ->
            {%{"x" => Nx.backend_copy(x["x"], backend)}, Nx.backend_copy(y, backend)}
          end)

        model
        |> Axon.Loop.trainer(
          :categorical_cross_entropy,
          Polaris.Optimizers.sgd(learning_rate: 0.5),
          log: 0
        )
        |> Axon.Loop.run(data, state, [epochs: 2] ++ opts)
      end)
    end

    want = run.(Nx.BinaryBackend, params, [])
    got = run.(@mlx, on(params, @mlx), compiler: NxMlx, device: @device)

    for layer <- ["hidden", "middle", "head"], p <- ["kernel", "bias"] do
      assert close?(got.data[layer][p], want.data[layer][p], 1.0e-4),
             "#{layer}.#{p} differs after training"
    end

    # The parameters moved.
    refute close?(want.data["head"]["kernel"], params.data["head"]["kernel"], 1.0e-6)
  end

  describe "NxMlx.Axon.rewrite/2" do
    defp transformerish do
      x = Axon.input("x", shape: {nil, 16, 64})
      h = Axon.layer_norm(x, name: "ln", epsilon: 1.0e-6)
      h = Axon.dense(h, 128, name: "up") |> Axon.activation(:gelu, name: "act")
      h = Axon.dense(h, 64, name: "down") |> Axon.rms_norm(name: "rms", shift: 1.0)
      Axon.add(x, h) |> Axon.dense(10, name: "logits") |> Axon.activation(:softmax, name: "sm")
    end

    defp params_of(model) do
      {init_fn, _} = Axon.build(model)

      Nx.with_default_backend(Nx.BinaryBackend, fn ->
        init_fn.(Nx.template({2, 16, 64}, :f32), Axon.ModelState.empty())
      end)
    end

    defp ops(model) do
      # A node's name is a function of its op and the op counts (the given name for those
      # named here).
      model.nodes |> Map.values() |> Map.new(&{&1.name.(&1.op_name, %{}), &1.op})
    end

    test "rewritten nodes run NxMlx.Fast and the outputs equal the unrewritten model's" do
      model = transformerish()
      params = params_of(model)
      rewritten = NxMlx.Axon.rewrite(model)

      # Names, parameters and the graph are kept; only the ops change.
      assert Map.keys(ops(rewritten)) == Map.keys(ops(model))
      assert is_function(ops(rewritten)["ln"], 4) and ops(model)["ln"] == :layer_norm
      assert is_function(ops(rewritten)["act"], 2)
      assert is_function(ops(rewritten)["rms"], 3)
      assert is_function(ops(rewritten)["sm"], 2)
      assert ops(rewritten)["up"] == ops(model)["up"]

      x =
        Nx.iota({2, 16, 64}, type: :f32, backend: Nx.BinaryBackend)
        |> Nx.multiply(0.01)
        |> Nx.sin()

      want = Axon.predict(model, params, x)
      mlx_params = on(params, @mlx)
      mlx_x = Nx.backend_copy(x, @mlx)

      for opts <- [[], [compiler: NxMlx, device: @device]] do
        got = Axon.predict(rewritten, mlx_params, mlx_x, opts)
        assert close?(got, want, 1.0e-5)
      end

      # On Nx.BinaryBackend the Fast blocks run their defaults: the same outputs.
      assert close?(Axon.predict(rewritten, params, x), want, 1.0e-5)
    end

    test "only, except, and kinds it does not know" do
      model = transformerish()
      only = NxMlx.Axon.rewrite(model, only: [:gelu])
      assert is_function(ops(only)["act"], 2)
      assert ops(only)["ln"] == :layer_norm

      except = NxMlx.Axon.rewrite(model, except: [:softmax, :rms_norm])
      assert ops(except)["sm"] == :softmax
      assert ops(except)["rms"] == :rms_norm
      assert is_function(ops(except)["ln"], 4)

      assert_raise ArgumentError, ~r/kinds of/, fn ->
        NxMlx.Axon.rewrite(model, only: [:attention])
      end
    end
  end
end
