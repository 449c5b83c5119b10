defmodule NxMlx.Compiler do
  @moduledoc """
  The `defn` compiler: `compiler: NxMlx` (the callbacks live on `NxMlx`, which delegates here).

      Nx.Defn.default_options(compiler: NxMlx)
      fun = Nx.Defn.jit(&MyModel.predict/2, compiler: NxMlx, device: :gpu)

  A function is traced once per input template (types, shapes, names, vectorized axes) and
  options. Its expression is lowered into a flat program over numbered registers: every
  backend op through the same code as `NxMlx.Backend` (each op's Nx semantics, fix-ups and
  native-or-not decisions are written once, and recorded here instead of run), `while` loops
  and `cond` branches as native control flow, blocks (`Nx.block/4`) as their native kernels
  where the backend has them and their lowered default expression otherwise, constants
  folded (small constants are made once, at compile time, so their casts fold too). The NIF
  validates the program once; each call replays it on the command queue's worker in one
  native call (a small straight-line program that fusion would not change, up to 64 ops with
  no loop, branch or hook, is replayed in the calling process instead, as eager ops are
  built, saving a round trip to the worker) and returns its outputs with their evaluation
  started, not waited for: reading
  them (or `NxMlx.wait/1` on `NxMlx.submit/1`) waits, and a failure MLX reports only at
  completion is raised there. The next jitted call on the same worker waits for the previous
  one to finish before dispatching its own work, so a loop that never reads its results
  keeps at most one call computing while the next is built; an idle worker waits for its
  last call and lets it go (its outputs' memory goes with their last reference).

  ## Options

    * `:device` - `:cpu` or `:gpu` (default: `NxMlx.default_device/0`). Inputs on another
      device or backend are copied there.
    * `:command_queue` - an `NxMlx.CommandQueue` to run on (default: the queue bound with
      `NxMlx.CommandQueue.with_queue/2`, else the device's default queue).
    * `:hooks` - a map of named hooks overriding those in the expression, as for
      `Nx.Defn.Evaluator`.
    * `:on_unsupported` - what to do with what cannot be lowered natively: `:evaluate`
      (default) or `:raise`, which raises an `ArgumentError` naming the op (for tests and
      CI: the function then runs natively or not at all). Under `:evaluate`, a callback that
      falls back to `Nx.BinaryBackend` (float `remainder`, integer `conv`, ...) at the top
      level of the function becomes a host step between two native parts: only that op
      runs on the host (measured on the CPU: a 4-layer MLP ending in a float remainder ran
      in 0.8-1.1 ms this way against 1.4-1.5 ms through the Evaluator). Such a callback
      inside a `while` or `cond`, a value needed on the host there, or `Nx.runtime_call/4`
      inside one, make the whole function run through `Nx.Defn.Evaluator` on NxMlx tensors.
      Both emit a `[:nx_mlx, :compiler, :fallback]` telemetry event with
      `%{op: op, reason: text, mode: :host_op | :evaluator}` when the function is compiled.
    * `:fuse` - the fusion lane (default `true` on the GPU, `false` on the CPU, chosen from
      bench/RESULTS.md: on an H200 fusion made the transformer block 1.1-2.0x and exact GELU
      4.1-4.6x faster than replay in two runs; on a 2-vCPU machine it won on GELU (1.23x)
      and lost on softmax (0.83x) and a batch-128 MLP (0.81x)): straight-line parts of the
      program (the whole function, a loop's body, a branch) run through `mx::compile`,
      which traces each once per worker and fuses element-wise chains into generated
      kernels (NVRTC on CUDA, `g++` at run time on the CPU). Where MLX cannot fuse (no `g++` on PATH, or SIGCHLD
      ignored, as the BEAM leaves it: call `:os.set_signal(:sigchld, :default)` to allow it;
      `MLX_DISABLE_COMPILE` set; a part that cannot be traced; a fused evaluation that fails
      where the unfused one succeeds) the program runs unfused and a
      `[:nx_mlx, :compiler, :unfused]` event says why, once.
    * `:rewrites` - whether composed forms computed as one op are lowered to it: `true`,
      `false`, or unset (the default) for each form where its one op is the faster:
      softmax written as `exp(x - max) / sum` over the same axes (by hand or as
      `Axon.Activations.softmax` writes it) becomes one softmax op. On the GPU that is MLX's
      fused kernel, which accumulates f16/bf16 in f32 (on an H200 0.089 ms over
      8×12×512×512 bf16 against 0.263 ms for the five composed ops); on the CPU, for f32
      over trailing axes, our threaded kernel (16M f32 in rows of 4096 on 2 vCPUs: 12.4 ms
      against 21.1 ms composed); other CPU cases stay composed (MLX's CPU softmax is about
      3× slower than the composed form). The exact GELU, `x * 0.5 * (1 + erf(x / sqrt(2)))`
      in any order and association (as by hand or as `Axon.Activations.gelu` writes it),
      becomes one op: on the CPU, for f32 by default, one vectorised pass in double
      (16M f32 on 2 vCPUs: 18 ms against 33 ms composed), within 1 ulp of the exact value,
      also in the negative tail where the composed f32 form cancels to 0 (from x = -5.6 on);
      elsewhere, under `rewrites: true`, the same composed ops. Layer norm over the last
      axis, `(x - mean) * rsqrt(var + eps) * g + b` (by hand, or as `Axon.Layers.layer_norm`
      writes it with `Nx.variance` and reshaped scale and shift), becomes one op: on the CPU,
      for f32 by default, one pass per row with the mean and variance in double (8×128×768
      f32 on 2 vCPUs: 1.0 ms against 1.6 ms composed by hand and 5.7 ms as Axon composes
      it); elsewhere, under `rewrites: true`, MLX's `fast::layer_norm`.
    * `:max_concurrency` - the number of `Nx.Serving` partitions (default 1); each partition
      gets a command queue of its own (the same one every time for partition i of a device).

  Quantized arguments (`NxMlx.Quantized`) are lowered with their layout, which joins the cache
  key: their parts become program inputs, a dot along the quantized axis becomes one
  quantized matmul and any other use reads the dequantized values (so does a quantized
  argument of a function made with `Nx.Defn.compile/3`, whose arguments are not known when
  it is compiled).

  Options Nx and its libraries pass and this compiler does not use are accepted and ignored:
  `:batch_keys`, `:cache` and anything Axon forwards.

  ## What runs on the host, and what through the Evaluator

  Hooks run natively anywhere (inside loops per iteration, inside branches when taken): the
  worker sends the hooked value to the calling process when the program reaches it, and the
  callback runs there while the program goes on (a callback may use NxMlx itself).

  At the top level of a function, `Nx.runtime_call/4` and a callback that falls back to
  Nx.BinaryBackend in `NxMlx.Backend` (see its moduledoc; e.g. float `remainder`, integer
  `conv`, `triangular_solve`, integer `pow` with a non-constant exponent) split the
  program: the native part before them runs, the callback runs in the calling process on
  its values, and the rest runs on its result. Functions with one of them inside a `while`
  or a `cond` branch, or with `reduce`/`window_reduce` given a function of their own, run
  whole through `Nx.Defn.Evaluator` (on NxMlx tensors, op by op). A singular system in a
  compiled `solve`/`triangular_solve` fails when the program runs (`NxMlx.NIFError`), where
  the eager call raises Nx's `ArgumentError`.

  ## Telemetry

    * `[:nx_mlx, :compiler, :compile]` - `%{duration: native_time}`, metadata `%{hit: bool,
      ops: count}`: one per `jit` call that needed a lookup (`hit: true`) or a compilation.
    * `[:nx_mlx, :compiler, :fallback]` - `%{}`, metadata `%{op: op, reason: text, mode:
      :host_op | :evaluator}` (only that op on the host, or the whole function through the
      Evaluator): see `:on_unsupported`.
    * `[:nx_mlx, :compiler, :unfused]` - `%{fused_blocks: n}`, metadata `%{device: d, reason:
      text}`: see `:fuse`.
  """

  alias Nx.Defn.{Composite, Expr, Tree}
  alias Nx.Tensor, as: T
  alias NxMlx.Compiler.{Cache, Recorder}
  alias NxMlx.Compiler.Recorder.NotLowerable
  alias NxMlx.{CommandQueue, Runtime}

  @known_opts [
    :device,
    :command_queue,
    :hooks,
    :on_unsupported,
    :max_concurrency,
    :fuse,
    :rewrites
  ]

  ## Nx.Defn.Compiler callbacks (through NxMlx)

  @doc false
  def __jit__(key, vars, fun, args_list, opts) do
    # Quantized inputs (NxMlx.Quantized) are lowered with their layout: the arguments are read
    # here (each function once) so that the layout joins the cache key.
    lists =
      Enum.map(args_list, fn args ->
        args = Enum.map(args, &read_arg/1)
        {args, quants(args)}
      end)

    case Enum.uniq_by(lists, fn {_, quants} -> layout_key(quants) end) do
      [{_, quants}] ->
        jit(key, vars, fun, Enum.map(lists, &elem(&1, 0)), quants, opts)

      _ ->
        Enum.flat_map(lists, fn {args, quants} -> jit(key, vars, fun, [args], quants, opts) end)
    end
  end

  defp read_arg(fun) do
    tensor = fun.()
    fn -> tensor end
  end

  # The quantized layouts of the arguments (nil for the others), or nil for none.
  defp quants(args) do
    quants =
      Enum.map(args, fn f ->
        case f.() do
          %T{data: %NxMlx.Backend{quant: %NxMlx.Quantized{} = q}} -> q
          _ -> nil
        end
      end)

    if Enum.all?(quants, &is_nil/1), do: nil, else: quants
  end

  # What of the layouts decides the program (the parts' shapes follow from it).
  defp layout_key(nil), do: nil

  defp layout_key(quants),
    do: Enum.map(quants, &(&1 && {&1.mode, &1.bits, &1.group_size, &1.axis}))

  defp jit(key, vars, fun, args_list, quants, opts) do
    start = System.monotonic_time()
    cache_key = {key, templates(vars), cache_opts(opts), layout_key(quants)}

    {compiled, hit} =
      case Cache.get(cache_key) do
        {:ok, :evaluator} ->
          {evaluator(vars, fun, opts, device(opts)), true}

        {:ok, compiled} ->
          {compiled, true}

        :error ->
          compiled = compile(vars, fun, opts, quants)
          # An Evaluator closure holds the whole expression, a DAG that ETS would copy as a
          # tree: only the decision is cached.
          Cache.put(
            cache_key,
            key,
            if(compiled.kind == :evaluator, do: :evaluator, else: compiled)
          )

          {compiled, false}
      end

    :telemetry.execute(
      [:nx_mlx, :compiler, :compile],
      %{duration: System.monotonic_time() - start},
      %{hit: hit, ops: compiled.ops}
    )

    run(compiled, args_list, opts)
  end

  @doc false
  def __compile__(_key, vars, fun, opts) do
    # Nothing is known of the arguments yet: quantized ones are read dequantized.
    compiled = compile(vars, fun, opts, nil)
    fn args_list -> run(compiled, args_list, opts) end
  end

  # One command queue per partition (a worker thread and MLX stream each), so that
  # Nx.Serving's partitions run their batches concurrently. Partition i of a device always
  # gets the same queue: MLX never stops a stream's thread, so queues are made once per VM.
  @doc false
  def __partitions_options__(opts) do
    n = Keyword.get(opts, :max_concurrency, 1)

    if not (is_integer(n) and n >= 1) do
      raise ArgumentError, "NxMlx: :max_concurrency must be a positive integer, got #{inspect(n)}"
    end

    case Keyword.get(opts, :command_queue) do
      nil ->
        device = device(opts)
        for i <- 0..(n - 1), do: Keyword.put(opts, :command_queue, partition_queue(device, i))

      _queue ->
        List.duplicate(opts, n)
    end
  end

  @doc false
  # The partition queues made so far (they live as long as the VM).
  def __partition_queues__ do
    for {{__MODULE__, :partition_queue, _, _}, queue} <- :persistent_term.get(), do: queue
  end

  defp partition_queue(device, i) do
    key = {__MODULE__, :partition_queue, device, i}

    case :persistent_term.get(key, nil) do
      nil ->
        :global.trans({key, self()}, fn ->
          case :persistent_term.get(key, nil) do
            nil ->
              queue = CommandQueue.new!(device)
              :persistent_term.put(key, queue)
              queue

            queue ->
              queue
          end
        end)

      queue ->
        queue
    end
  end

  @doc false
  def __to_backend__(opts) do
    {NxMlx.Backend, device: device(opts)}
  end

  @doc false
  def __shard_jit__(_key, _mesh, _vars, _fun, _args_list, _opts) do
    raise ArgumentError, "NxMlx: sharding (Nx.Defn.shard_jit) is not supported"
  end

  defp device(opts) do
    case Keyword.get(opts, :command_queue) do
      %CommandQueue{device: device} ->
        device

      nil ->
        case Keyword.get(opts, :device) do
          nil -> CommandQueue.route_device(NxMlx.default_device())
          d when d in [:cpu, :gpu] -> d
          other -> raise ArgumentError, "NxMlx: unknown device #{inspect(other)}"
        end

      other ->
        raise ArgumentError,
              "NxMlx: :command_queue must be an NxMlx.CommandQueue, got #{inspect(other)}"
    end
  end

  defp worker(opts, device) do
    case Keyword.get(opts, :command_queue) do
      %CommandQueue{ref: ref} -> ref
      nil -> CommandQueue.worker(device)
    end
  end

  # What the compiled program depends on besides the function and the templates.
  defp cache_opts(opts) do
    {device(opts), Keyword.get(opts, :on_unsupported, :evaluate), Keyword.get(opts, :fuse),
     Keyword.get(opts, :rewrites)}
  end

  # The fusion lane's switch (`:fuse`) and the rewrites of composed forms onto one MLX op
  # (`:rewrites`, NxMlx.Compiler.Patterns): the option when given, else on for the GPU and
  # off for the CPU (see the moduledoc).
  defp fuse?(opts), do: device_switch(opts, :fuse, device(opts) == :gpu)
  # Unset: each composed form is rewritten where its one op is the faster (:auto).
  defp rewrites?(opts), do: device_switch(opts, :rewrites, :auto)

  defp device_switch(opts, key, default) do
    case Keyword.get(opts, key) do
      nil ->
        default

      value when is_boolean(value) ->
        value

      other ->
        raise ArgumentError, "NxMlx: #{inspect(key)} must be a boolean, got #{inspect(other)}"
    end
  end

  # The input templates, in their containers (a tuple of one tensor is not a tensor). Walked
  # directly (this runs on every call; Nx.Container's traversal costs about 5x as much),
  # through the protocol only for structs other than tensors.
  defp templates(vars), do: Enum.map(vars, &template_key/1)

  defp template_key(%T{type: type, shape: shape, names: names, vectorized_axes: axes}),
    do: {:tensor, type, shape, names, axes}

  defp template_key(tuple) when is_tuple(tuple),
    do: tuple |> Tuple.to_list() |> Enum.map(&template_key/1) |> List.to_tuple()

  defp template_key(%_{} = container), do: Composite.traverse(container, &template_key/1)
  defp template_key(map) when is_map(map), do: :maps.map(fn _k, v -> template_key(v) end, map)
  defp template_key(other), do: other

  ## Compilation

  defp compile(vars, fun, opts, quants) do
    device = device(opts)
    policy = Keyword.get(opts, :on_unsupported, :evaluate)

    if policy not in [:evaluate, :raise] do
      raise ArgumentError,
            "NxMlx: :on_unsupported must be :evaluate or :raise, got #{inspect(policy)}"
    end

    {expr, output} =
      vars
      |> fun.()
      |> Composite.traverse([], &{Nx.devectorize(&1), [Nx.to_template(&1) | &2]})

    output = Enum.reverse(output)
    params = Composite.flatten_list(vars)

    fuse = fuse?(opts)
    rewrites = rewrites?(opts)

    try do
      lower(
        expr,
        {params, quants},
        {Composite.traverse(expr, &Nx.to_template/1), output},
        device,
        {fuse, rewrites},
        policy
      )
    rescue
      e in NotLowerable ->
        if policy == :raise do
          raise ArgumentError,
                "NxMlx compiler: the function cannot be lowered whole: #{e.message} " <>
                  "(on_unsupported: :raise)"
        end

        :telemetry.execute([:nx_mlx, :compiler, :fallback], %{}, %{
          op: e.op,
          reason: e.message,
          mode: :evaluator
        })

        evaluator(vars, fun, opts, device)
    end
  end

  defp evaluator(vars, fun, opts, device) do
    opts = Keyword.drop(opts, @known_opts -- [:hooks, :max_concurrency])
    compiled = Nx.Defn.Evaluator.__compile__(nil, vars, fun, opts)

    run = fn params ->
      Nx.with_default_backend({NxMlx.Backend, device: device}, fn ->
        params = Enum.map(params, fn p -> on_device(p, device) end)
        [result] = compiled.([params])
        result
      end)
    end

    %{kind: :evaluator, run: run, ops: 0}
  end

  defp on_device_now(%T{data: %NxMlx.Backend{device: device}} = t, device), do: t
  defp on_device_now(t, device), do: Nx.backend_transfer(t, {NxMlx.Backend, device: device})

  defp on_device(fun, device) do
    tensor = fun.()

    case tensor do
      %T{data: %NxMlx.Backend{}} -> fn -> tensor end
      %T{} -> fn -> Nx.backend_transfer(tensor, {NxMlx.Backend, device: device}) end
    end
  end

  # Lowers the whole expression into a program. Registers 0..n-1 are the parameters.
  defp lower(expr, {params, quants}, output, device, {fuse, rewrites}, policy) do
    quants = quants || List.duplicate(nil, length(params))
    n_params = length(params)
    # A quantized parameter's register holds its packed values; its scales and biases get
    # registers after the parameters', in order.
    parts = for %NxMlx.Quantized{} = q <- quants, p <- [q.scales, q.biases], p != nil, do: p
    n_inputs = n_params + length(parts)
    Recorder.start(n_inputs, policy)

    try do
      {param_values, _} =
        params
        |> Enum.zip(quants)
        |> Enum.with_index()
        |> Enum.map_reduce(n_params, fn
          {{%T{} = p, nil}, i}, next ->
            {reg_tensor(Nx.devectorize(p), i, device), next}

          {{%T{} = p, %NxMlx.Quantized{} = q}, i}, next ->
            {biases, after_biases} =
              if q.biases,
                do: {reg_tensor(q.biases, next + 1, device), next + 2},
                else: {nil, next + 1}

            q = %{
              q
              | packed: reg_tensor(q.packed, i, device),
                scales: reg_tensor(q.scales, next, device),
                biases: biases
            }

            {%{p | data: %NxMlx.Backend{ref: nil, device: device, quant: q}}, after_biases}
        end)

      param_values = List.to_tuple(param_values)

      scope = %{
        memo: %{},
        params: param_values,
        device: device,
        ids: Tree.scope_ids(expr),
        rewrites: rewrites
      }

      {result, _scope} = Composite.traverse(expr, scope, &lower_node/2)
      outputs = Enum.map(Composite.flatten_list([result]), &reg!/1)
      {const_code, code, _n_regs, hooks} = Recorder.stop()

      # Lowered: the ops that run on the host between native parts say so.
      for {:fallback, op, _out, _args} <- hooks do
        :telemetry.execute([:nx_mlx, :compiler, :fallback], %{}, %{
          op: op,
          reason:
            Recorder.fallback_message(op) <> ": that op runs on the host between native parts",
          mode: :host_op
        })
      end

      Enum.each(const_code, fn {:const, _r, ref} ->
        Runtime.call(:eval, [ref], fn -> "NxMlx compiler: constant" end)
      end)

      steps = segments(const_code, code, outputs, fuse)

      %{
        kind: :program,
        quantized: parts != [] or Enum.any?(quants),
        steps: steps,
        inputs: Enum.to_list(0..(n_inputs - 1)//1),
        outputs: outputs,
        device: device,
        fuse: fuse,
        output: output,
        hooks: List.to_tuple(hooks),
        ops: Enum.sum(for {:native, p, _, _} <- steps, do: elem(NxMlx.Native.program_info(p), 2))
      }
    after
      Recorder.abort()
    end
  end

  ## Programs: the recorded code, split at host calls, each part numbered on its own

  # `[{:native, program, input_registers, output_registers} | {:host, id, in, out}]` in
  # order. Registers are global while recording; each native part gets its inputs first.
  defp segments(const_code, code, outputs, fuse) do
    consts = Map.new(const_code, fn {:const, r, _} = c -> {r, c} end)

    # A result that is a constant no instruction reads is made by a part of its own.
    code =
      case Enum.filter(outputs, &Map.has_key?(consts, &1)) -- Enum.to_list(block_reads(code)) do
        [] -> code
        loose -> code ++ [{:host_free_consts, loose}]
      end

    parts =
      code
      |> Enum.chunk_while(
        [],
        fn
          {:host, _, _, _} = h, acc -> {:cont, Enum.reverse(acc), [h]}
          instr, [{:host, _, _, _} = h] -> {:cont, [h], [instr]}
          instr, acc -> {:cont, [instr | acc]}
        end,
        fn acc -> {:cont, Enum.reverse(acc), []} end
      )
      |> Enum.reject(&(&1 == []))

    # What each later part (and the result) reads, to know what a part must hand on.
    later_reads =
      parts
      |> Enum.reverse()
      |> Enum.scan(MapSet.new(outputs), fn part, acc -> MapSet.union(acc, block_reads(part)) end)
      |> Enum.reverse()
      |> Enum.drop(1)
      |> Kernel.++([MapSet.new(outputs)])

    Enum.zip_with(parts, later_reads, fn
      [{:host, id, ins, outs}], _ ->
        {:host, id, ins, outs}

      part, needed_later ->
        written = block_writes(part)
        used_consts = for r <- block_reads(part), Map.has_key?(consts, r), do: r

        inputs =
          MapSet.difference(block_reads(part), MapSet.union(written, MapSet.new(used_consts)))

        inputs = Enum.sort(inputs)
        outs = needed_later |> MapSet.intersection(written) |> Enum.sort()
        # Results that are inputs or constants of this part pass through it.
        passed =
          needed_later |> MapSet.intersection(MapSet.new(inputs ++ used_consts)) |> Enum.sort()

        outs = outs ++ passed
        locals = Enum.sort(MapSet.union(written, MapSet.new(used_consts)))
        numbers = Map.new(Enum.with_index(inputs ++ (locals -- inputs)))

        body =
          Enum.map(used_consts, &Map.fetch!(consts, &1)) ++
            Enum.reject(part, &match?({:host_free_consts, _}, &1))

        code = Enum.map(body, &encode(&1, numbers))

        program =
          Runtime.call(
            :program_new,
            [
              code,
              length(inputs),
              map_size(numbers),
              Enum.map(outs, &Map.fetch!(numbers, &1)),
              fuse
            ],
            fn -> "NxMlx compiler" end
          )

        {:native, program, inputs, outs}
    end)
  end

  defp block_reads(code), do: Enum.reduce(code, MapSet.new(), &MapSet.union(reads(&1), &2))
  defp block_writes(code), do: Enum.reduce(code, MapSet.new(), &MapSet.union(writes(&1), &2))

  defp reads({:op, _outs, _fun, args, _label}), do: MapSet.new(arg_regs(args, []))
  defp reads({:const, _, _}), do: MapSet.new()
  defp reads({:hook, _, regs}), do: MapSet.new(regs)
  defp reads({:host_free_consts, regs}), do: MapSet.new(regs)
  defp reads({:host, _, ins, _}), do: MapSet.new(ins)

  defp reads({:while, init, _state, cond, pred, body, next}),
    do:
      MapSet.new([pred | init ++ next])
      |> MapSet.union(block_reads(cond))
      |> MapSet.union(block_reads(body))

  defp reads({:cond, clauses, last, last_results, _outs}) do
    Enum.reduce(clauses, MapSet.union(block_reads(last), MapSet.new(last_results)), fn
      {pred_code, pred, code, results}, acc ->
        acc
        |> MapSet.union(block_reads(pred_code))
        |> MapSet.union(block_reads(code))
        |> MapSet.union(MapSet.new([pred | results]))
    end)
  end

  defp writes({:op, outs, _, _, _}), do: MapSet.new(outs)
  defp writes({:const, r, _}), do: MapSet.new([r])
  defp writes({:hook, _, _}), do: MapSet.new()
  defp writes({:host_free_consts, _}), do: MapSet.new()
  defp writes({:host, _, _, outs}), do: MapSet.new(outs)

  defp writes({:while, _init, state, cond, _pred, body, _next}),
    do: MapSet.new(state) |> MapSet.union(block_writes(cond)) |> MapSet.union(block_writes(body))

  defp writes({:cond, clauses, last, _last_results, outs}) do
    Enum.reduce(clauses, MapSet.union(block_writes(last), MapSet.new(outs)), fn
      {pred_code, _, code, _}, acc ->
        acc |> MapSet.union(block_writes(pred_code)) |> MapSet.union(block_writes(code))
    end)
  end

  defp arg_regs({:r, r}, acc), do: [r | acc]
  defp arg_regs(list, acc) when is_list(list), do: Enum.reduce(list, acc, &arg_regs/2)
  defp arg_regs(_, acc), do: acc

  # The instruction with its registers renumbered (and operands untagged) for the NIF.
  defp encode({:op, outs, fun, args, label}, n),
    do: {:op, num(outs, n), fun, Enum.map(args, &encode_arg(&1, n)), label}

  defp encode({:const, r, ref}, n), do: {:const, Map.fetch!(n, r), ref}
  defp encode({:hook, id, regs}, n), do: {:hook, id, num(regs, n)}

  defp encode({:while, init, state, cond, pred, body, next}, n) do
    {:while, num(init, n), num(state, n), Enum.map(cond, &encode(&1, n)), Map.fetch!(n, pred),
     Enum.map(body, &encode(&1, n)), num(next, n)}
  end

  defp encode({:cond, clauses, last, last_results, outs}, n) do
    clauses =
      Enum.map(clauses, fn {pred_code, pred, code, results} ->
        {Enum.map(pred_code, &encode(&1, n)), Map.fetch!(n, pred), Enum.map(code, &encode(&1, n)),
         num(results, n)}
      end)

    {:cond, clauses, Enum.map(last, &encode(&1, n)), num(last_results, n), num(outs, n)}
  end

  defp encode_arg({:r, r}, n), do: Map.fetch!(n, r)
  defp encode_arg(list, n) when is_list(list), do: Enum.map(list, &encode_arg(&1, n))
  defp encode_arg(other, _n), do: other

  defp num(regs, n), do: Enum.map(regs, &Map.fetch!(n, &1))

  defp reg_tensor(%T{} = template, r, device),
    do: %{template | data: %NxMlx.Backend{ref: {:reg, r}, device: device}}

  # A quantized result (a parameter returned as it is) leaves dequantized.
  defp reg!(%T{data: %NxMlx.Backend{quant: %NxMlx.Quantized{}, device: d}} = t),
    do: Recorder.reg_of(NxMlx.Backend.Core.ref!(t, d))

  defp reg!(%T{data: %NxMlx.Backend{ref: ref}}), do: Recorder.reg_of(ref)

  defp reg!(%T{} = t) do
    raise NotLowerable, op: :output, message: "a result on #{inspect(t.data.__struct__)}"
  end

  ## Lowering of expression nodes

  defp lower_node(%T{data: %Expr{id: id, op: op, args: args}} = t, scope) do
    case scope.memo do
      %{^id => value} ->
        {value, scope}

      %{} ->
        # A value of a type MLX lacks (8-bit floats, 2- and 4-bit integers, complex128):
        # eagerly it lives on Nx.BinaryBackend (or is refused), so the function does too.
        if not match?({:tuple, _}, t.type) and not NxMlx.Types.mlx?(t.type) do
          raise NotLowerable,
            op: op,
            message: "a #{inspect(t.type)} value (MLX has no such type)"
        end

        {value, scope} = lower_rewritten(t, scope) || lower_op(op, args, t, scope)
        {value, %{scope | memo: Map.put(scope.memo, id, value)}}
    end
  end

  # A composed form MLX has one op for (NxMlx.Compiler.Patterns), under `:rewrites`; nil
  # otherwise.
  defp lower_rewritten(t, %{rewrites: rewrites} = scope) when rewrites != false do
    case NxMlx.Compiler.Patterns.match(t) do
      {:softmax, x, axes} ->
        if rewrites == true or NxMlx.Backend.Blocks.softmax_faster?(scope.device, x, axes) do
          {x, scope} = lower_node(x, scope)
          {NxMlx.Backend.Blocks.softmax(t, x, axes), scope}
        end

      {:gelu, x} ->
        if rewrites == true or NxMlx.Backend.Blocks.gelu_faster?(scope.device, x) do
          {x, scope} = lower_node(x, scope)
          {NxMlx.Backend.Blocks.gelu(t, x), scope}
        end

      {:layer_norm, x, g, b, eps} ->
        if rewrites == true or NxMlx.Backend.Blocks.layer_norm_faster?(scope.device, x) do
          {x, scope} = lower_node(x, scope)
          {g, scope} = lower_node(g, scope)
          {b, scope} = lower_node(b, scope)
          {NxMlx.Backend.Blocks.layer_norm(t, x, g, b, eps), scope}
        end

      nil ->
        nil
    end
  end

  defp lower_rewritten(_t, _scope), do: nil

  defp lower_op(:parameter, [i], _t, scope), do: {elem(scope.params, i), scope}

  defp lower_op(:tensor, [tensor], _t, scope) do
    tensor = Nx.devectorize(tensor)

    value =
      case tensor do
        %T{data: %NxMlx.Backend{}} -> tensor
        %T{} -> Nx.backend_copy(tensor, {NxMlx.Backend, device: scope.device})
      end

    {value, scope}
  end

  # A small constant (the scalars of `x * 2`) is made once, at compile time, and captured, so
  # that ops on constants only (its casts) fold too and no run, loop iteration or branch
  # fills it again; a larger one is made by the program (a captured one would hold its
  # memory for the program's life).
  @captured_constant_elements 256

  defp lower_op(:constant, [number], t, scope) do
    make = fn -> NxMlx.Backend.constant(t, number, device: scope.device) end

    if Nx.size(t) <= @captured_constant_elements,
      do: {make.(), scope},
      else: {Recorder.forced(make), scope}
  end

  defp lower_op(:metadata, [expr, _meta], _t, scope),
    do: Composite.traverse(expr, scope, &lower_node/2)

  defp lower_op(:elem, [tuple, i], _t, scope) do
    {tuple, scope} = Composite.traverse(tuple, scope, &lower_node/2)
    {elem(tuple, i), scope}
  end

  defp lower_op(:fun, [_args, _expr, mfa], _t, _scope) do
    raise NotLowerable,
      op: :fun,
      message: "a function argument (#{inspect(mfa)}) is called on the host"
  end

  defp lower_op(:while, [initial, arg, condition, body], _t, scope) do
    {initial, scope} = Composite.traverse(initial, scope, &lower_node/2)
    init_regs = Enum.map(Composite.flatten_list([initial]), &reg!/1)

    arg_templates =
      Enum.map(Composite.flatten_list([arg]), fn t -> Nx.devectorize(t) |> Nx.to_template() end)

    state_regs = Enum.map(arg_templates, fn _ -> Recorder.new_reg() end)

    state_values =
      Enum.zip_with(arg_templates, state_regs, &reg_tensor(&1, &2, scope.device))
      |> List.to_tuple()

    inner = %{scope | memo: %{}, params: state_values, ids: Tree.scope_ids({condition, body})}

    Recorder.push_block()
    {pred, _} = lower_node(condition, inner)
    pred_reg = reg!(truth(pred))
    cond_code = Recorder.pop_block()

    Recorder.push_block()
    {next, _} = Composite.traverse(body, inner, &lower_node/2)
    next_regs = Enum.map(Composite.flatten_list([next]), &reg!/1)
    body_code = Recorder.pop_block()

    Recorder.emit({:while, init_regs, state_regs, cond_code, pred_reg, body_code, next_regs})

    {result, []} =
      Composite.traverse(arg, Tuple.to_list(state_values), fn _, [v | rest] -> {v, rest} end)

    {result, scope}
  end

  defp lower_op(:cond, [clauses, last], _t, scope) do
    # What the branches read from this scope (nodes also used outside the cond, or in
    # several conds) is computed here first, once: a hook among them must not run per
    # branch, nor an expensive node twice.
    {_, found} =
      Enum.reduce([last | Enum.flat_map(clauses, &Tuple.to_list/1)], {%{}, []}, fn expr, acc ->
        Composite.reduce(expr, acc, &parent_node(&1, scope.ids, &2))
      end)

    {_, scope} = Enum.map_reduce(Enum.reverse(found), scope, &lower_node/2)

    lowered =
      Enum.map(clauses, fn {pred, body} ->
        Recorder.push_block()
        {pred, _} = lower_node(pred, %{scope | ids: Tree.scope_ids(pred, scope.ids)})
        pred_reg = reg!(truth(pred))
        pred_code = Recorder.pop_block()
        {code, results, _} = lower_branch(body, scope)
        {pred_code, pred_reg, code, results}
      end)

    {last_code, last_results, template} = lower_branch(last, scope)
    outs = Enum.map(last_results, fn _ -> Recorder.new_reg() end)
    Recorder.emit({:cond, lowered, last_code, last_results, outs})

    {result, []} =
      Composite.traverse(template, outs, fn %T{} = t, [r | rest] ->
        {reg_tensor(Nx.to_template(t), r, scope.device), rest}
      end)

    {result, scope}
  end

  defp lower_op(:block, [struct, in_args, expr, callback], t, scope) do
    {in_values, scope} =
      Enum.map_reduce(in_args, scope, fn
        %T{} = arg, scope -> lower_node(arg, scope)
        other, scope -> {other, scope}
      end)

    out =
      case t do
        %{type: {:tuple, _}} -> expr
        _ -> t
      end

    {sentinel, ref} = default_sentinel(callback)

    try do
      {NxMlx.Backend.block(struct, out, in_values, sentinel), scope}
    catch
      :throw, {:nx_mlx_default_block, ^ref} ->
        {params, _opts} = Enum.split_while(in_values, &(not is_list(&1)))
        inner = %{scope | memo: %{}, params: List.to_tuple(params), ids: Tree.scope_ids(expr)}
        {value, _inner} = Composite.traverse(expr, inner, &lower_node/2)
        {value, scope}
    end
  end

  # The worker sends the hooked value when the program reaches it (in loops, per iteration;
  # in branches, only when taken); the caller runs the callback (see run_one/4).
  defp lower_op(:hook, [tensor_expr, spec, template, _ref], _t, scope) do
    {value, scope} = Composite.traverse(tensor_expr, scope, &lower_node/2)

    {spec, hooked, scope} =
      case spec do
        {:token_hook, hooked_expr, inner_spec} ->
          {hooked, scope} = Composite.traverse(hooked_expr, scope, &lower_node/2)
          {inner_spec, hooked, scope}

        spec ->
          {spec, value, scope}
      end

    regs = Enum.map(Composite.flatten_list([hooked]), &reg!/1)
    Recorder.hook(regs, {spec, Composite.traverse(hooked, &Nx.to_template/1)})

    result =
      case template do
        %T{} -> value
        _ -> value |> List.wrap() |> Composite.flatten_list() |> List.to_tuple()
      end

    {result, scope}
  end

  # The program stops there: the part before it runs, the callback runs in the caller's
  # process on its results, and the part after it runs on the callback's result.
  defp lower_op(:runtime_call, [expr, fun, out_template, opts], _t, scope) do
    if Recorder.nested?() do
      raise NotLowerable,
        op: :runtime_call,
        message: "Nx.runtime_call/4 inside a while loop or a cond branch runs on the host"
    end

    {value, scope} = Composite.traverse(expr, scope, &lower_node/2)
    in_regs = Enum.map(Composite.flatten_list([value]), &reg!/1)
    leaves = Composite.flatten_list([out_template])
    in_template = Composite.traverse(value, &Nx.to_template/1)

    outs =
      Recorder.host(
        in_regs,
        length(leaves),
        {:runtime_call, fun, opts, in_template, out_template}
      )

    results = Enum.zip_with(leaves, outs, &reg_tensor(Nx.to_template(&1), &2, scope.device))

    case out_template do
      %T{} -> {hd(results), scope}
      _ -> {List.to_tuple(results), scope}
    end
  end

  defp lower_op(op, _args, t, scope) do
    {args, scope} = Nx.Defn.Tree.apply_args(t, scope, &lower_node/2)
    {apply_backend(op, args, t, scope.device), scope}
  end

  @creation_ops [:eye, :iota, :from_binary]
  @list_ops [:concatenate, :stack]

  defp apply_backend(op, args, t, device) do
    cond do
      op in @creation_ops ->
        Recorder.forced(fn -> apply(NxMlx.Backend, op, [t | args] ++ [[device: device]]) end)

      op in @list_ops ->
        apply(NxMlx.Backend, op, [t | args])

      match?({:tuple, _}, t.type) ->
        apply(NxMlx.Backend, op, args)

      true ->
        apply(NxMlx.Backend, op, [t | args])
    end
  end

  # The nodes of a cond's branch that belong to the enclosing scope (`ids`), in the order
  # met, without going into them.
  defp parent_node(%T{data: %Expr{id: id, op: op}} = t, ids, {seen, found} = acc) do
    cond do
      is_map_key(seen, id) or op == :constant ->
        acc

      is_map_key(ids, id) ->
        {Map.put(seen, id, true), [t | found]}

      true ->
        {_, acc} =
          Tree.apply_args(t, :scope, {Map.put(seen, id, true), found}, fn arg, acc ->
            {arg, parent_node(arg, ids, acc)}
          end)

        acc
    end
  end

  # A branch (of a cond) in a block of its own: `{code, result_registers, template}`.
  defp lower_branch(body, scope) do
    scope = %{scope | ids: Tree.scope_ids(body, scope.ids)}
    Recorder.push_block()
    {value, _} = Composite.traverse(body, scope, &lower_node/2)
    results = Enum.map(Composite.flatten_list([value]), &reg!/1)
    {Recorder.pop_block(), results, value}
  end

  # Predicates are tested as u8 scalars on the native side.
  defp truth(%T{type: {:u, 8}, shape: {}} = pred), do: pred

  defp truth(%T{} = pred) do
    Nx.not_equal(pred, 0) |> Nx.reshape({})
  end

  # A function that stands for a block's default implementation: when NxMlx.Backend.block
  # has no native kernel for the block, it calls it, and the compiler lowers the block's
  # traced default expression instead. `{fun, ref}`; the function throws ref.
  defp default_sentinel(callback) do
    {:arity, arity} = Function.info(callback, :arity)
    sentinel_of_arity(arity)
  end

  for arity <- 0..12 do
    args = Enum.map(1..arity//1, fn i -> Macro.var(:"_arg#{i}", __MODULE__) end)

    defp sentinel_of_arity(unquote(arity)) do
      ref = make_ref()
      {fn unquote_splicing(args) -> throw({:nx_mlx_default_block, ref}) end, ref}
    end
  end

  defp sentinel_of_arity(arity) do
    raise NotLowerable, op: :block, message: "a block function of arity #{arity}"
  end

  ## Running

  defp run(%{kind: :evaluator, run: run}, args_list, _opts) do
    Enum.map(args_list, run)
  end

  defp run(%{kind: :program} = compiled, args_list, opts) do
    worker = worker(opts, compiled.device)
    Enum.map(args_list, &run_one(compiled, &1, worker, opts))
  end

  defp run_one(compiled, params, worker, opts) do
    %{device: device, output: {structure, output}} = compiled

    {inputs, parts} =
      Enum.map_reduce(params, [], fn fun, parts ->
        case Nx.devectorize(fun.()) do
          %T{data: %NxMlx.Backend{quant: %NxMlx.Quantized{}}} = t when compiled.quantized ->
            %T{data: %NxMlx.Backend{quant: q}} = on_device_now(t, device)
            extra = for p <- [q.scales, q.biases], p != nil, do: p.data.ref
            {q.packed.data.ref, [extra | parts]}

          %T{data: %NxMlx.Backend{quant: %NxMlx.Quantized{}}} = t ->
            {on_device_now(NxMlx.Quantized.dequantize(t), device).data.ref, parts}

          %T{data: %NxMlx.Backend{quant: nil, ref: ref}} ->
            {ref, parts}

          %T{} = t ->
            {Nx.backend_transfer(t, {NxMlx.Backend, device: device}).data.ref, parts}
        end
      end)

    inputs = inputs ++ List.flatten(Enum.reverse(parts))

    Runtime.before_eval()
    hooks = {compiled.hooks, Keyword.get(opts, :hooks, %{}), device}
    env = Map.new(Enum.zip(compiled.inputs, inputs))

    env =
      Enum.reduce(compiled.steps, env, fn
        {:native, program, ins, outs}, env ->
          arrays = program_run(worker, program, Enum.map(ins, &Map.fetch!(env, &1)), hooks)
          if compiled.fuse, do: report_unfused(program, device)
          Map.merge(env, Map.new(Enum.zip(outs, arrays)))

        {:host, id, ins, outs}, env ->
          arrays =
            host_call(elem(compiled.hooks, id), Enum.map(ins, &Map.fetch!(env, &1)), device)

          Map.merge(env, Map.new(Enum.zip(outs, arrays)))
      end)

    arrays = Enum.map(compiled.outputs, &Map.fetch!(env, &1))

    {result, {[], []}} =
      Composite.traverse(structure, {output, arrays}, fn _, {[template | ts], [ref | rest]} ->
        {_, bits} = template.type
        Runtime.count_result(div(Nx.size(template) * bits, 8))
        {%{template | data: %NxMlx.Backend{ref: ref, device: device}}, {ts, rest}}
      end)

    result
  end

  # A fused program tells once why a part of it runs unfused (see NxMlx.Native.program_fusion).
  defp report_unfused(program, device) do
    case NxMlx.Native.program_fusion(program) do
      {_fused, nil} ->
        :ok

      {fused, reason} ->
        :telemetry.execute([:nx_mlx, :compiler, :unfused], %{fused_blocks: fused}, %{
          device: device,
          reason: reason
        })
    end
  end

  # A callback that falls back to Nx.BinaryBackend, on the values computed so far.
  defp host_call({:fallback, op, out, args}, arrays, device) do
    args = Recorder.fill_registers(args, arrays, device)
    Recorder.result_arrays(NxMlx.Fallback.run(op, [out | args], device))
  end

  # Nx.runtime_call/4's callback, in the caller's process, on the values computed so far.
  defp host_call({:runtime_call, fun, opts, in_template, out_template}, arrays, device) do
    {value, []} =
      Composite.traverse(in_template, arrays, fn %T{} = t, [array | more] ->
        {%{t | data: %NxMlx.Backend{ref: array, device: device}}, more}
      end)

    result = fun.(value, opts)

    if not Nx.compatible?(out_template, result) do
      raise "expected the runtime_call function to match the given output template"
    end

    for %T{} = t <- Composite.flatten_list([result]) do
      case t do
        %T{data: %NxMlx.Backend{device: ^device, ref: ref}} -> ref
        %T{} -> Nx.backend_transfer(t, {NxMlx.Backend, device: device}).data.ref
      end
    end
  end

  defp program_run(worker, program, inputs, hooks) do
    tag = System.unique_integer([:positive])

    Runtime.call(
      :program_run,
      [worker, program, inputs, tag],
      fn -> "NxMlx compiled function" end,
      &await_program(&1, tag, hooks, &2)
    )
  end

  # Hook messages come before the program's reply; each callback runs here, in the caller's
  # process, while the worker goes on.
  defp await_program(ref, tag, {specs, overrides, device} = hooks, describe) do
    receive do
      {:nx_mlx_hook, ^tag, id, arrays} ->
        {spec, template} = elem(specs, id)

        {value, []} =
          Composite.traverse(template, arrays, fn %T{} = t, [array | more] ->
            {%{t | data: %NxMlx.Backend{ref: array, device: device}}, more}
          end)

        case resolve_hook(spec, overrides) do
          nil -> :ok
          fun -> fun.(value)
        end

        await_program(ref, tag, hooks, describe)

      {^ref, reply} ->
        Runtime.reply_value(reply, describe)
    end
  end

  defp resolve_hook({:fn, fun}, _hooks), do: fun
  defp resolve_hook({:named, name, callback}, hooks), do: hooks[name] || callback
end
