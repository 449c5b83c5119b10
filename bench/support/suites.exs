defmodule Bench.Defn do
  @moduledoc false
  # The while loop of the dispatch suite (mlx_raw_bench runs the same loop on the binding).
  import Nx.Defn

  @iterations 1000
  def iterations, do: @iterations

  defn loop(x) do
    {_, x} =
      while {i = 0, x}, i < @iterations do
        {i + 1, x * 1.0001 + 1}
      end

    x
  end
end

defmodule Bench.Suites do
  @moduledoc false
  # The computations of bench/run.exs on NxMlx.Backend (eager: each Nx call builds its MLX
  # node at once, and a run ends when its result is evaluated) and, at small sizes, on
  # Nx.BinaryBackend. mlx_raw_bench (native/mlx_raw_bench) and bench/reference/torch_bench.py
  # compute the same cases under the same names; bench/README.md defines them.

  alias Bench.Harness

  # Every case: %{suite, case, impl, median, p10, p90, unit, rate, rate_unit} rows, plus the
  # work per run (:flops or :bytes) for rates of the references.

  ## Inputs: deterministic values made on the target backend (no host copy of large inputs).

  def uniform(shape, type, seed, scale, backend) do
    Nx.iota(shape, type: :f32, backend: backend)
    |> Nx.multiply(0.7548776662)
    |> Nx.add(seed)
    |> Nx.sin()
    |> Nx.multiply(scale)
    |> Nx.as_type(type)
    |> sync()
  end

  @doc "Waits until `t` (a tensor or container) is computed; read-back-free on NxMlx."
  def sync(%Nx.Tensor{data: %NxMlx.Backend{}} = t) do
    {:ok, command} = NxMlx.submit(t)
    :ok = NxMlx.wait(command)
    t
  end

  def sync(t), do: t

  defp row(suite, name, impl, timing, work \\ nil) do
    base = Map.merge(%{suite: suite, case: name, impl: impl, unit: "ms"}, timing)

    case work do
      {:flops, f} ->
        Map.merge(base, %{
          rate: f / (timing.median / 1.0e3) / 1.0e9,
          rate_unit: "GFLOP/s",
          work: work
        })

      {:bytes, b} ->
        Map.merge(base, %{
          rate: b / (timing.median / 1.0e3) / 1.0e9,
          rate_unit: "GB/s",
          work: work
        })

      nil ->
        base
    end
  end

  defp type_name({:f, 32}), do: "f32"
  defp type_name({:f, 16}), do: "f16"
  defp type_name({:bf, 16}), do: "bf16"

  ## dispatch: one add on a 16-element f32 tensor (µs)

  @chain 2_000
  @rounds 15
  @readbacks 2_000

  def dispatch(_settings, backend, quick?) do
    readbacks = if quick?, do: 200, else: @readbacks

    eager =
      for {impl, b} <- [{"nx_mlx", backend}, {"binary", Nx.BinaryBackend}] do
        {dispatch, readback} = dispatch_times(b, readbacks)

        [
          Map.merge(%{suite: "dispatch", case: "dispatch", impl: impl, unit: "us"}, dispatch),
          Map.merge(%{suite: "dispatch", case: "readback", impl: impl, unit: "us"}, readback)
        ]
      end

    List.flatten(eager) ++ jit_times(backend, readbacks)
  end

  # The compiler's fixed costs on the same 16-element add: a jitted call with its read-back
  # (inputs on the device; the default options), the cost per op of a replayed graph (a
  # jitted chain of @replay_chain adds against one add, per extra add, unfused: mlx_raw_bench
  # times the same chain built on the binding) and a while loop's cost per iteration.
  @replay_chain 200

  defp jit_times({NxMlx.Backend, opts} = backend, readbacks) do
    device = opts[:device]
    a = Nx.iota({16}, type: :f32, backend: backend)
    b = Nx.tensor(1.0, type: :f32, backend: backend) |> Nx.broadcast({16})
    add = Nx.Defn.jit(&Nx.add/2, compiler: NxMlx, device: device)
    unfused = [compiler: NxMlx, device: device, fuse: false]
    long = Nx.Defn.jit(&chain(&1, &2, @replay_chain), unfused)
    one = Nx.Defn.jit(&Nx.add/2, unfused)
    check_chain!(long.(a, b), a, @replay_chain)
    Harness.settle()
    times = fn n, f -> for _ <- 1..n, do: elem(:timer.tc(fn -> Nx.to_binary(f.()) end), 0) / 1 end
    times.(200, fn -> add.(a, b) end)
    {call, lookups} = compile_events(fn -> times.(readbacks, fn -> add.(a, b) end) end)
    lookup = for {true, d} <- lookups, do: d
    chain_t = times.(div(readbacks, 4), fn -> long.(a, b) end)
    one_t = times.(div(readbacks, 4), fn -> one.(a, b) end)

    per_op =
      (Harness.summary(chain_t).median - Harness.summary(one_t).median) / (@replay_chain - 1)

    loop = Nx.Defn.jit(&Bench.Defn.loop/1, compiler: NxMlx, device: device)
    x = Nx.broadcast(Nx.tensor(1.0, type: :f32, backend: backend), {16})
    loop.(x) |> Nx.to_binary()

    iters =
      for _ <- 1..5,
          do: elem(:timer.tc(fn -> Nx.to_binary(loop.(x)) end), 0) / Bench.Defn.iterations()

    [
      Map.merge(
        %{suite: "dispatch", case: "jit_call", impl: "nx_mlx", unit: "us"},
        Harness.summary(call)
      ),
      %{
        suite: "dispatch",
        case: "replay_op",
        impl: "nx_mlx",
        unit: "us",
        median: per_op,
        p10: per_op,
        p90: per_op
      },
      Map.merge(
        %{suite: "dispatch", case: "while_iter", impl: "nx_mlx", unit: "us"},
        Harness.summary(iters)
      ),
      Map.merge(
        %{suite: "dispatch", case: "jit_lookup", impl: "nx_mlx", unit: "us"},
        Harness.summary(Enum.map(lookup, &(&1 * 1.0e3)))
      )
    ]
  end

  @doc """
  Runs `fun`, collecting the compiler's `[:nx_mlx, :compiler, :compile]` events of this
  process: `{fun's result, [{hit?, milliseconds}]}` (a hit's duration is the cache lookup,
  a miss's the trace, lowering and program creation).
  """
  def compile_events(fun) do
    me = self()
    id = {:bench_compile, make_ref()}
    :telemetry.attach(id, [:nx_mlx, :compiler, :compile], &__MODULE__.forward_compile/4, me)

    try do
      result = fun.()
      {result, collect_compile([])}
    after
      :telemetry.detach(id)
    end
  end

  @doc false
  # bench/run.exs's handler of [:nx_mlx, :compiler, :unfused]: the reasons, in an Agent.
  def collect_unfused(_event, _measurements, %{reason: reason}, agent),
    do: Agent.update(agent, &[reason | &1])

  @doc false
  def forward_compile(_, %{duration: d}, %{hit: hit}, pid) do
    if self() == pid,
      do: send(pid, {:bench_compile, hit, System.convert_time_unit(d, :native, :nanosecond)})
  end

  defp collect_compile(acc) do
    receive do
      {:bench_compile, hit, ns} -> collect_compile([{hit, ns / 1.0e6} | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end

  defp dispatch_times(backend, readbacks) do
    a = Nx.iota({16}, type: :f32, backend: backend)
    b = Nx.tensor(1.0, type: :f32, backend: backend) |> Nx.broadcast({16})
    chain(a, b, 200) |> Nx.to_binary()
    Harness.settle()
    for _ <- 1..200, do: Nx.add(a, b) |> Nx.to_binary()

    # Read-back first, before the chains below leave thousands of arrays to free.
    readback =
      for _ <- 1..readbacks do
        {us, _} = :timer.tc(fn -> Nx.add(a, b) |> Nx.to_binary() end)
        us / 1
      end

    # Dispatch: a chain of lazy adds, per add; evaluated outside the timed region.
    dispatch =
      for _ <- 1..@rounds do
        {us, out} = :timer.tc(fn -> chain(a, b, @chain) end)
        check_chain!(out, a, @chain)
        us / @chain
      end

    {Harness.summary(dispatch), Harness.summary(readback)}
  end

  defp chain(a, b, n), do: Enum.reduce(1..n, a, fn _, acc -> Nx.add(acc, b) end)

  defp check_chain!(out, a, n) do
    expected = Nx.add(Nx.backend_copy(a, Nx.BinaryBackend), n)

    unless Nx.to_number(Nx.all_close(Nx.backend_copy(out, Nx.BinaryBackend), expected)) == 1 do
      raise "dispatch: wrong result after a chain of #{n} adds"
    end
  end

  # The compiler's lanes of a case: `fun` jitted with `compiler: NxMlx` and lowered whole
  # (`on_unsupported: :raise`), as "defn" (replayed op by op) and "fused" (`fuse: true`, under
  # mx::compile), on the same inputs as the eager row.
  # With the raw bench serving (settings.paired), the transformer and mlp lanes are also timed
  # in alternation with raw MLX's same case: the row's `:paired` (see Harness.measure_paired).
  defp compiled_rows(settings, suite, name, device, fun, args, work \\ nil) do
    for {impl, fuse} <- [{"defn", false}, {"fused", true}] do
      f = Nx.Defn.jit(fun, compiler: NxMlx, device: device, on_unsupported: :raise, fuse: fuse)
      run = fn -> sync(apply(f, args)) end
      r = row(suite, name, impl, Harness.measure(settings, run), work)

      # The raw bench serves the transformer and mlp cases, not the 12-block encoder.
      if settings.paired && suite in ["transformer", "mlp"] &&
           not String.starts_with?(name, "encoder12") do
        {key, ref} =
          if fuse, do: {"compiled." <> name, "raw_mlx_compiled"}, else: {name, "raw_mlx"}

        {ours, raw, ratio} = Harness.measure_paired(settings, run, settings.paired, key)
        Map.put(r, :paired, %{ref: ref, ours: ours.median, raw: raw.median, ratio: ratio.median})
      else
        r
      end
    end
  end

  ## matmul: n x n by n x n

  def matmul(settings, backend, device) do
    cases =
      case device do
        :cpu ->
          for n <- [256, 512, 1024, 2048], do: {{:f, 32}, n}

        :gpu ->
          for t <- [{:bf, 16}, {:f, 16}, {:f, 32}], n <- [1024, 2048, 4096, 8192], do: {t, n}
      end

    ours =
      for {type, n} <- cases do
        a = uniform({n, n}, type, 1, 1.0, backend)
        b = uniform({n, n}, type, 2, 1.0, backend)
        t = Harness.measure(settings, fn -> sync(Nx.dot(a, b)) end)
        name = "matmul_#{type_name(type)}_#{n}"
        work = {:flops, 2 * n * n * n}

        [
          row("matmul", name, "nx_mlx", t, work)
          | compiled_rows(settings, "matmul", name, device, &Nx.dot/2, [a, b], work)
        ]
      end
      |> List.flatten()

    # Nx.BinaryBackend at small sizes, with NxMlx at the same sizes.
    small =
      for n <- [64, 128], {impl, b} <- [{"nx_mlx", backend}, {"binary", Nx.BinaryBackend}] do
        x = uniform({n, n}, {:f, 32}, 1, 1.0, b)
        y = uniform({n, n}, {:f, 32}, 2, 1.0, b)

        t =
          Harness.measure(%{settings | max_reps: min(settings.max_reps, 5)}, fn ->
            sync(Nx.dot(x, y))
          end)

        row("matmul", "matmul_f32_#{n}", impl, t, {:flops, 2 * n * n * n})
      end

    ours ++ small
  end

  ## elementwise: add, exp, sum, softmax and exact GELU (a chain of 5 element-wise ops) on
  ## large f32 tensors (GB/s counts the bytes each op must read and write: add 3x, exp 2x,
  ## sum 1x, softmax and gelu 2x the tensor's size)

  def elementwise(settings, backend, device) do
    {n, label} = if device == :cpu, do: {16 * 1_048_576, "16m"}, else: {64 * 1_048_576, "64m"}

    large = elementwise_cases(settings, backend, "nx_mlx", n, label, device)

    small =
      for {impl, b} <- [{"nx_mlx", backend}, {"binary", Nx.BinaryBackend}] do
        elementwise_cases(
          %{settings | max_reps: min(settings.max_reps, 5)},
          b,
          impl,
          65_536,
          "64k",
          nil
        )
      end

    large ++ List.flatten(small)
  end

  # `device` nil: the eager row only.
  defp elementwise_cases(settings, backend, impl, n, label, device) do
    a = uniform({n}, {:f, 32}, 3, 1.0, backend)
    b = uniform({n}, {:f, 32}, 4, 1.0, backend)
    rows = Nx.reshape(a, {div(n, 4096), 4096})

    for {name, k, fun, args} <- [
          {"add", 3, &Nx.add/2, [a, b]},
          {"exp", 2, &Nx.exp/1, [a]},
          {"sum", 1, &Nx.sum/1, [a]},
          {"softmax", 2, &softmax/1, [rows]},
          {"gelu", 2, &gelu/1, [a]}
        ] do
      t = Harness.measure(settings, fn -> sync(apply(fun, args)) end)
      case_name = "#{name}_f32_#{label}"
      work = {:bytes, k * n * 4}
      eager = row("elementwise", case_name, impl, t, work)

      if device,
        do: [eager | compiled_rows(settings, "elementwise", case_name, device, fun, args, work)],
        else: [eager]
    end
    |> List.flatten()
  end

  @doc "Exact GELU, x * 0.5 * (1 + erf(x / sqrt(2))): five element-wise ops."
  def gelu(x) do
    x |> Nx.multiply(0.5) |> Nx.multiply(Nx.add(Nx.erf(Nx.multiply(x, 0.7071067811865476)), 1))
  end

  def softmax(x) do
    m = Nx.reduce_max(x, axes: [-1], keep_axes: true)
    e = Nx.exp(Nx.subtract(x, m))
    Nx.divide(e, Nx.sum(e, axes: [-1], keep_axes: true))
  end

  ## fast: NxMlx.Fast's kernels (impl nx_mlx) against their default functions compiled on
  ## NxMlx (impl composed) and PyTorch's fused equivalents

  @doc """
  The fast suite's cases as `{name, fun, default, args}`: `fun` the NxMlx.Fast call, `default`
  the same computation as its plain-Nx default function (the composed ops).
  """
  def fast_cases(backend, device) do
    {type, batch, seq} = if device == :gpu, do: {{:bf, 16}, 8, 512}, else: {{:f, 32}, 1, 128}
    {hidden, heads} = {768, 12}
    t = type_name(type)
    x = uniform({batch, seq, hidden}, type, 70, 1.0, backend)
    w = uniform({hidden}, type, 71, 1.0, backend)
    b = uniform({hidden}, type, 72, 1.0, backend)
    hd = div(hidden, heads)
    q = uniform({batch, heads, seq, hd}, type, 73, 1.0, backend)
    k = uniform({batch, heads, seq, hd}, type, 74, 1.0, backend)
    v = uniform({batch, heads, seq, hd}, type, 75, 1.0, backend)
    scores = uniform({batch, heads, seq, seq}, type, 76, 4.0, backend)
    rows = "#{batch}x#{seq}x#{hidden}_#{t}"
    per_head = "#{batch}x#{heads}x#{seq}x#{hd}_#{t}"
    sm = "#{batch}x#{heads}x#{seq}x#{seq}_#{t}"
    alias NxMlx.Fast

    [
      {"rms_norm_#{rows}", &Fast.rms_norm(&1, &2),
       &Fast.rms_norm_default(%Fast.RMSNorm{}, &1, &2), [x, w]},
      {"layer_norm_#{rows}", &Fast.layer_norm(&1, &2, &3),
       &Fast.layer_norm_default(%Fast.LayerNorm{}, &1, &2, &3), [x, w, b]},
      {"softmax_#{sm}", &Fast.softmax(&1), &Fast.softmax_default(%Fast.Softmax{axis: 3}, &1),
       [scores]},
      {"rope_#{per_head}", &Fast.rope(&1), &Fast.rope_default(%Fast.Rope{dims: hd}, &1, nil, nil),
       [q]},
      {"sdpa_causal_#{per_head}", &Fast.scaled_dot_product_attention(&1, &2, &3, causal: true),
       &Fast.attention_default(
         %Fast.Attention{scale: 1 / :math.sqrt(hd), causal: true},
         &1,
         &2,
         &3,
         nil,
         nil
       ), [q, k, v]}
    ]
  end

  # nx_mlx: the NxMlx.Fast call, eagerly (one op); defn: the call jitted (`compiler:
  # NxMlx`, which lowers it to MLX's kernel or, where that is slower, its default function);
  # composed: its default function as one
  # jitted program (`compiler: NxMlx` with the fusion lane's default for the device and no
  # rewrites, so the composed ops stay composed).
  def fast(settings, backend, device) do
    for {name, fun, default, args} <- fast_cases(backend, device) do
      composed = Nx.Defn.jit(default, compiler: NxMlx, device: device, rewrites: false)
      jitted = Nx.Defn.jit(fun, compiler: NxMlx, device: device)
      t = Harness.measure(settings, fn -> sync(apply(composed, args)) end)

      [
        row("fast", name, "nx_mlx", Harness.measure(settings, fn -> sync(apply(fun, args)) end)),
        row("fast", name, "defn", Harness.measure(settings, fn -> sync(apply(jitted, args)) end)),
        row("fast", name, "composed", t)
      ]
    end
    |> List.flatten()
  end

  ## quant: decode-shape matmul chains, bf16 weights against quantized ones

  # A chain of n matmuls x · W1 · W2 ... (x {1, d}, each W {d, d}) in one jitted call, so the
  # GPU is kept busy and each matmul costs what reading its weights costs: bf16 against
  # 4- and 8-bit affine weights (group size 64) and mxfp4 where the device runs it. Also one
  # matmul alone (a call's latency) and the first call of the 4-bit chain (compiling MLX's
  # kernels: NVRTC on CUDA).
  def quant(settings, backend, device) do
    {n, d} = if device == :gpu, do: {32, 4096}, else: {8, 2048}
    x = uniform({1, d}, {:bf, 16}, 1, 1.0, backend)
    ws = for i <- 1..n, do: uniform({d, d}, {:bf, 16}, i + 1, 1.0 / :math.sqrt(d), backend)
    chain = fn x, ws -> Enum.reduce(Tuple.to_list(ws), x, &Nx.dot(&2, &1)) end
    one = fn x, w -> Nx.dot(x, w) end

    layouts = [
      {"bf16", nil},
      {"q4", [bits: 4, group_size: 64]},
      {"q8", [bits: 8, group_size: 64]},
      {"mxfp4", [mode: :mxfp4]}
    ]

    for {impl, opts} <- layouts do
      try do
        weights = if opts, do: Enum.map(ws, &NxMlx.Quantized.quantize(&1, opts)), else: ws
        weights = List.to_tuple(Enum.map(weights, &sync_quantized/1))
        f = Nx.Defn.jit(chain, compiler: NxMlx, device: device, on_unsupported: :raise)
        g = Nx.Defn.jit(one, compiler: NxMlx, device: device, on_unsupported: :raise)
        t0 = System.monotonic_time()
        sync(f.(x, weights))

        first =
          System.convert_time_unit(System.monotonic_time() - t0, :native, :microsecond) / 1.0e3

        first = %{median: first, p10: first, p90: first}

        [
          row(
            "quant",
            "qmm_chain#{n}_1x#{d}x#{d}",
            impl,
            Harness.measure(settings, fn -> sync(f.(x, weights)) end)
          ),
          row(
            "quant",
            "qmm_1x#{d}x#{d}",
            impl,
            Harness.measure(settings, fn -> sync(g.(x, elem(weights, 0))) end)
          ),
          row("quant", "qmm_chain#{n}_first_call", impl, first)
        ]
      rescue
        e in ArgumentError ->
          IO.puts(:stderr, "quant: #{impl} not run on #{device}: #{Exception.message(e)}")
          []
      end
    end
    |> List.flatten()
  end

  defp sync_quantized(%Nx.Tensor{data: %NxMlx.Backend{quant: %NxMlx.Quantized{} = q}} = t) do
    Enum.each([q.packed, q.scales, q.biases], fn p -> p && sync(p) end)
    t
  end

  defp sync_quantized(t), do: sync(t)

  ## transformer: one pre-LN encoder block (12 heads, hidden 768, MLP 3072, exact GELU)

  @hidden 768
  @heads 12
  @ff 3072

  ## decode: a GPT-2-small-shaped decoder generating greedily with a KV cache

  @vocab 50_257
  @layers 12

  # 12 pre-LN layers (hidden 768, 12 heads, MLP 3072, tanh GELU), learned positions, a
  # 50,257-token head; random weights. The prompt (128 tokens) runs as one prefill call, then
  # each of the 128 new tokens as one jitted step (NxMlx.Fast's layer norm and cached
  # attention; the caches hold 256 entries and stay on the device, as does each token).
  # Timed: prefill and the 128 steps, ending when the last token is computed. bf16 on the GPU,
  # f32 on the CPU, and with 4-bit affine weights (group size 64: every kernel and the head).
  @prompt 128
  @new_tokens 128

  @doc "The tokens each decode case generates."
  def decode_tokens, do: @new_tokens

  def decode(settings, backend, device) do
    {prompt, new} = {@prompt, @new_tokens}
    type = if device == :gpu, do: {:bf, 16}, else: {:f, 32}
    params = gpt2_params(type, backend)
    tokens = Nx.remainder(Nx.iota({1, prompt}, type: :s32, backend: backend), @vocab)
    capacity = prompt + new

    variants = [
      {"decode_gpt2s_#{type_name(type)}", params},
      {"decode_gpt2s_q4", gpt2_quantized(params, bits: 4, group_size: 64)}
    ]

    for {name, p} <- variants do
      caches = gpt2_caches(type, capacity, backend)

      prefill =
        Nx.Defn.jit(&gpt2_forward/4, compiler: NxMlx, device: device, on_unsupported: :raise)

      step = Nx.Defn.jit(&gpt2_forward/4, compiler: NxMlx, device: device, on_unsupported: :raise)

      generate = fn ->
        {token, caches} = prefill.(tokens, Nx.tensor(0, type: :s32, backend: backend), caches, p)

        {token, _caches} =
          Enum.reduce(0..(new - 2)//1, {token, caches}, fn i, {token, caches} ->
            step.(token, Nx.tensor(prompt + i, type: :s32, backend: backend), caches, p)
          end)

        sync(token)
      end

      t = Harness.measure(settings, generate)
      row("decode", name, "nx_mlx", t)
    end
  end

  # One forward over `tokens` {1, n} at `position`: the caches updated and the greedy next
  # token {1, 1}.
  @doc false
  def gpt2_forward(tokens, position, caches, p) do
    n = elem(tokens.shape, 1)
    positions = Nx.add(Nx.iota({n}, type: :s32), position)
    x = Nx.add(Nx.take(p.wte, tokens), Nx.take(p.wpe, positions) |> Nx.new_axis(0))

    {x, caches} =
      Enum.zip(Tuple.to_list(p.layers), Tuple.to_list(caches))
      |> Enum.map_reduce(x, fn {l, {kc, vc}}, x ->
        {x, kc, vc} = gpt2_layer(x, l, kc, vc, position)
        {{kc, vc}, x}
      end)
      |> then(fn {caches, x} -> {x, List.to_tuple(caches)} end)

    last = x[[.., -1, ..]]
    h = NxMlx.Fast.layer_norm(last, p.lnf_g, p.lnf_b, eps: 1.0e-5)
    logits = Nx.dot(h, p.head)
    {Nx.argmax(logits, axis: -1, keep_axis: true) |> Nx.as_type(:s32), caches}
  end

  defp gpt2_layer(x, l, kc, vc, position) do
    {b, n, _} = x.shape
    hd = div(@hidden, @heads)
    h = NxMlx.Fast.layer_norm(x, l.ln1_g, l.ln1_b, eps: 1.0e-5)
    qkv = Nx.add(Nx.dot(h, l.qkv_w), l.qkv_b)
    heads = fn t -> t |> Nx.reshape({b, n, @heads, hd}) |> Nx.transpose(axes: [0, 2, 1, 3]) end
    q = heads.(qkv[[.., .., 0..(@hidden - 1)]])
    k = heads.(qkv[[.., .., @hidden..(2 * @hidden - 1)]])
    v = heads.(qkv[[.., .., (2 * @hidden)..(3 * @hidden - 1)]])
    {a, kc, vc} = NxMlx.Fast.cached_attention(q, k, v, kc, vc, position)
    a = a |> Nx.transpose(axes: [0, 2, 1, 3]) |> Nx.reshape({b, n, @hidden})
    x = Nx.add(x, Nx.add(Nx.dot(a, l.proj_w), l.proj_b))
    h = NxMlx.Fast.layer_norm(x, l.ln2_g, l.ln2_b, eps: 1.0e-5)
    f = NxMlx.Fast.gelu(Nx.add(Nx.dot(h, l.fc_w), l.fc_b), approximate: :tanh)
    {Nx.add(x, Nx.add(Nx.dot(f, l.out_w), l.out_b)), kc, vc}
  end

  @doc false
  def gpt2_params(type, backend) do
    w = fn shape, seed -> uniform(shape, type, seed, 0.02, backend) end
    ones = fn seed -> Nx.add(w.({@hidden}, seed), 1.0) |> Nx.as_type(type) end

    layers =
      for i <- 0..(@layers - 1) do
        s = 100 + 20 * i

        %{
          ln1_g: ones.(s),
          ln1_b: w.({@hidden}, s + 1),
          qkv_w: w.({@hidden, 3 * @hidden}, s + 2),
          qkv_b: w.({3 * @hidden}, s + 3),
          proj_w: w.({@hidden, @hidden}, s + 4),
          proj_b: w.({@hidden}, s + 5),
          ln2_g: ones.(s + 6),
          ln2_b: w.({@hidden}, s + 7),
          fc_w: w.({@hidden, @ff}, s + 8),
          fc_b: w.({@ff}, s + 9),
          out_w: w.({@ff, @hidden}, s + 10),
          out_b: w.({@hidden}, s + 11)
        }
      end

    wte = w.({@vocab, @hidden}, 90)

    %{
      wte: wte,
      wpe: w.({1024, @hidden}, 91),
      lnf_g: ones.(92),
      lnf_b: w.({@hidden}, 93),
      head: sync(Nx.transpose(wte)),
      layers: List.to_tuple(layers)
    }
  end

  # Every kernel and the head quantized; embeddings, norms and biases as they are.
  @doc false
  def gpt2_quantized(p, opts) do
    q = fn t -> t |> NxMlx.Quantized.quantize(opts) |> sync_quantized() end
    kernels = [:qkv_w, :proj_w, :fc_w, :out_w]

    layers =
      p.layers
      |> Tuple.to_list()
      |> Enum.map(fn l -> Enum.reduce(kernels, l, &Map.update!(&2, &1, q)) end)

    %{p | head: q.(p.head), layers: List.to_tuple(layers)}
  end

  @doc false
  def gpt2_caches(type, capacity, backend) do
    zeros = fn ->
      Nx.broadcast(
        Nx.tensor(0, type: type, backend: backend),
        {1, @heads, capacity, div(@hidden, @heads)}
      )
    end

    List.to_tuple(for _ <- 1..@layers, do: {sync(zeros.()), sync(zeros.())})
  end

  def transformer(settings, backend, device) do
    cases =
      case device do
        :cpu -> [{{:f, 32}, 1, 128}]
        :gpu -> [{{:f, 32}, 1, 128}, {{:bf, 16}, 1, 128}, {{:f, 32}, 8, 512}, {{:bf, 16}, 8, 512}]
      end

    for {type, batch, seq} <- cases do
      p = block_params(type, backend)
      x = uniform({batch, seq, @hidden}, type, 30, 1.0, backend)
      name = "transformer_#{batch}x#{seq}x#{@hidden}_#{type_name(type)}"
      t = Harness.measure(settings, fn -> sync(block(x, p)) end)

      [
        row("transformer", name, "nx_mlx", t),
        fast_row(settings, name, device, [x, p])
        | compiled_rows(settings, "transformer", name, device, &block/2, [x, p])
      ]
    end
    |> Kernel.++([encoder_compile(backend, device)])
    |> Kernel.++(if device == :cpu, do: encoder12_rows(settings, backend, device), else: [])
    |> List.flatten()
  end

  # The block with NxMlx.Fast's layer norm, attention and GELU, jitted with the device's
  # default lanes (impl "fast").
  defp fast_row(settings, name, device, args) do
    f = Nx.Defn.jit(&block_fast/2, compiler: NxMlx, device: device, on_unsupported: :raise)
    row("transformer", name, "fast", Harness.measure(settings, fn -> sync(apply(f, args)) end))
  end

  @doc "The encoder block of `block/2` written with NxMlx.Fast."
  def block_fast(x, p) do
    block(x, p, %{
      norm: &NxMlx.Fast.layer_norm/3,
      attention: &NxMlx.Fast.scaled_dot_product_attention/3,
      gelu: &NxMlx.Fast.gelu/1
    })
  end

  # A BERT-base-shaped forward on the CPU: the block 12 times (one set of weights), seq 128.
  defp encoder12_rows(settings, backend, device) do
    p = block_params({:f, 32}, backend)
    x = uniform({1, 128, @hidden}, {:f, 32}, 30, 1.0, backend)
    name = "encoder12_1x128x768_f32"
    t = Harness.measure(settings, fn -> sync(encoder12(x, p)) end)

    [
      row("transformer", name, "nx_mlx", t)
      | compiled_rows(settings, "transformer", name, device, &encoder12/2, [x, p])
    ]
  end

  # The first call's compile (trace, lowering, program creation) of a 12-layer encoder
  # (the block 12 times, one set of weights) at 1x128 f32.
  defp encoder_compile(backend, device) do
    p = block_params({:f, 32}, backend)
    x = uniform({1, 128, @hidden}, {:f, 32}, 30, 1.0, backend)
    f = Nx.Defn.jit(&encoder12/2, compiler: NxMlx, device: device, on_unsupported: :raise)
    {_, events} = compile_events(fn -> sync(f.(x, p)) end)
    [ms] = for {false, ms} <- events, do: ms
    only = %{median: ms, p10: ms, p90: ms}

    Map.merge(
      %{suite: "transformer", case: "encoder12_compile", impl: "nx_mlx", unit: "ms"},
      only
    )
  end

  def encoder12(x, p), do: Enum.reduce(1..12, x, fn _, h -> block(h, p) end)

  @doc false
  def block_params(type, backend) do
    w = fn shape, seed -> uniform(shape, type, seed, 0.02, backend) end

    %{
      wq: w.({@hidden, @hidden}, 10),
      bq: w.({@hidden}, 11),
      wk: w.({@hidden, @hidden}, 12),
      bk: w.({@hidden}, 13),
      wv: w.({@hidden, @hidden}, 14),
      bv: w.({@hidden}, 15),
      wo: w.({@hidden, @hidden}, 16),
      bo: w.({@hidden}, 17),
      w1: w.({@hidden, @ff}, 18),
      b1: w.({@ff}, 19),
      w2: w.({@ff, @hidden}, 20),
      b2: w.({@hidden}, 21),
      g1: w.({@hidden}, 22),
      beta1: w.({@hidden}, 23),
      g2: w.({@hidden}, 24),
      beta2: w.({@hidden}, 25)
    }
  end

  defp layer_norm(x, g, b) do
    mean = Nx.mean(x, axes: [-1], keep_axes: true)
    xc = Nx.subtract(x, mean)
    var = Nx.mean(Nx.multiply(xc, xc), axes: [-1], keep_axes: true)
    xc |> Nx.multiply(Nx.rsqrt(Nx.add(var, 1.0e-5))) |> Nx.multiply(g) |> Nx.add(b)
  end

  defp linear(x, w, b), do: Nx.add(Nx.dot(x, [-1], w, [0]), b)

  def block(x, p) do
    attention = fn q, k, v ->
      scale = 1 / :math.sqrt(elem(q.shape, 3))
      scores = Nx.dot(q, [3], [0, 1], k, [3], [0, 1]) |> Nx.multiply(scale)
      Nx.dot(softmax(scores), [3], [0, 1], v, [2], [0, 1])
    end

    block(x, p, %{norm: &layer_norm/3, attention: attention, gelu: &gelu/1})
  end

  # The block with its layer norms, attention and GELU given (composed or NxMlx.Fast).
  defp block(x, p, ops) do
    {batch, seq, _} = x.shape
    hd = div(@hidden, @heads)
    h = ops.norm.(x, p.g1, p.beta1)

    heads = fn t ->
      t |> Nx.reshape({batch, seq, @heads, hd}) |> Nx.transpose(axes: [0, 2, 1, 3])
    end

    q = heads.(linear(h, p.wq, p.bq))
    k = heads.(linear(h, p.wk, p.bk))
    v = heads.(linear(h, p.wv, p.bv))
    ctx = ops.attention.(q, k, v)
    ctx = ctx |> Nx.transpose(axes: [0, 2, 1, 3]) |> Nx.reshape({batch, seq, @hidden})
    x1 = Nx.add(x, linear(ctx, p.wo, p.bo))
    f = linear(ops.norm.(x1, p.g2, p.beta2), p.w1, p.b1)

    Nx.add(x1, linear(ops.gelu.(f), p.w2, p.b2))
  end

  ## mlp: 4 linear layers, ReLU between them

  def mlp(settings, backend, device) do
    cases =
      [
        {"mlp4_b8_small", {:f, 32}, 8, [64, 128, 128, 128, 10]},
        {"mlp4_b128", {:f, 32}, 128, [784, 2048, 2048, 2048, 10]}
      ] ++
        if device == :gpu,
          do: [{"mlp4_b128", {:bf, 16}, 128, [784, 2048, 2048, 2048, 10]}],
          else: []

    ours =
      for {name, type, batch, widths} <- cases do
        mlp_case(settings, backend, "nx_mlx", name, type, batch, widths, device)
      end

    binary =
      mlp_case(
        settings,
        Nx.BinaryBackend,
        "binary",
        "mlp4_b8_small",
        {:f, 32},
        8,
        [64, 128, 128, 128, 10],
        nil
      )

    List.flatten(ours ++ binary)
  end

  # `device` nil: the eager row only.
  defp mlp_case(settings, backend, impl, name, type, batch, widths, device) do
    layers =
      widths
      |> Enum.chunk_every(2, 1, :discard)
      |> Enum.with_index(fn [i, o], n ->
        {uniform({i, o}, type, 40 + n, 0.05, backend), uniform({o}, type, 50 + n, 0.05, backend)}
      end)

    x = uniform({batch, hd(widths)}, type, 60, 1.0, backend)
    case_name = "#{name}_#{type_name(type)}"

    eager =
      row(
        "mlp",
        case_name,
        impl,
        Harness.measure(settings, fn -> sync(mlp_forward(x, layers)) end)
      )

    if device,
      do: [
        eager
        | compiled_rows(settings, "mlp", case_name, device, &mlp_forward/2, [
            x,
            List.to_tuple(layers)
          ])
      ],
      else: [eager]
  end

  defp mlp_forward(x, layers) when is_tuple(layers), do: mlp_forward(x, Tuple.to_list(layers))

  defp mlp_forward(x, layers) do
    last = length(layers) - 1

    layers
    |> Enum.with_index()
    |> Enum.reduce(x, fn {{w, b}, i}, h ->
      h = Nx.add(Nx.dot(h, w), b)
      if i < last, do: Nx.max(h, 0), else: h
    end)
  end
end

defmodule Bench.Soak do
  @moduledoc false
  # The soak suite of bench/run.exs (not in the default list): `ops` mixed ops on
  # NxMlx.Backend, each result checked, printing RSS (VmRSS of /proc/self/status) and
  # NxMlx.memory() every `every` ops; then `soak_rss_growth_pct` (RSS at the end against RSS
  # after a warm-up of `every` / 10 ops) and `soak_active_bytes_delta` (MLX's active bytes at
  # the end minus after the warm-up, each after garbage collection and a queue sync).

  alias NxMlx.CommandQueue

  def run(backend, device, ops, every) do
    queues = for _ <- 1..2, do: CommandQueue.new!(device)
    Enum.each(1..div(every, 10), &op(&1, backend, queues))
    {rss0, active0} = settled(device)
    IO.puts("soak: start rss_kb #{rss0} active #{active0}")
    t0 = System.monotonic_time(:millisecond)

    for k <- 1..ops do
      op(k, backend, queues)

      if rem(k, every) == 0 do
        m = NxMlx.memory()

        IO.puts(
          "soak: ops #{k} rss_kb #{rss_kb()} active #{m.active} peak #{m.peak} " <>
            "cache #{m.cache} (#{System.monotonic_time(:millisecond) - t0} ms)"
        )
      end
    end

    elapsed = System.monotonic_time(:millisecond) - t0
    {rss1, active1} = settled(device)
    growth = (rss1 - rss0) / rss0 * 100

    [
      "soak_ops: #{ops}",
      "soak_ops_per_s: #{round(ops / max(elapsed, 1) * 1000)}",
      "soak_rss_start_kb: #{rss0}",
      "soak_rss_end_kb: #{rss1}",
      "soak_rss_growth_pct: #{:erlang.float_to_binary(growth, decimals: 2)}",
      "soak_active_bytes_delta: #{active1 - active0}"
    ]
  end

  defp settled(device) do
    :erlang.garbage_collect()
    CommandQueue.synchronize(CommandQueue.default(device))
    {rss_kb(), NxMlx.memory().active}
  end

  def rss_kb do
    "/proc/self/status"
    |> File.read!()
    |> String.split("\n")
    |> Enum.find_value(fn
      "VmRSS:" <> rest -> rest |> String.trim() |> String.split() |> hd() |> String.to_integer()
      _ -> nil
    end)
  end

  # One checked op: creation, element-wise work, reductions, shapes, matmul, sorting, a
  # command, an op on a command queue, and an error that must raise.
  defp op(k, backend, queues) do
    ok =
      case rem(k, 10) do
        0 ->
          t = Nx.iota({64}, type: :f32, backend: backend) |> Nx.add(k)
          Nx.to_number(Nx.sum(t)) == 64 * k + 2016

        1 ->
          Nx.to_flat_list(Nx.multiply(Nx.tensor([k, k + 1], type: :s32, backend: backend), 2)) ==
            [2 * k, 2 * k + 2]

        2 ->
          t = Nx.iota({32, 32}, type: :f32, backend: backend) |> Nx.divide(1024)

          Nx.shape(Nx.dot(t, Nx.transpose(t))) == {32, 32} and
            byte_size(Nx.to_binary(Nx.dot(t, t))) == 4096

        3 ->
          t = Nx.iota({4, 8}, backend: backend) |> Nx.slice([1, 2], [2, 3]) |> Nx.reshape({6})
          Nx.to_flat_list(t) == [10, 11, 12, 18, 19, 20]

        4 ->
          {:ok, c} = NxMlx.submit(Nx.exp(Nx.iota({1024}, type: :f32, backend: backend)))
          NxMlx.wait(c) == :ok

        5 ->
          try do
            Nx.add(Nx.iota({2, 3}, backend: backend), Nx.tensor([1, 2], backend: backend))
            false
          rescue
            ArgumentError -> true
          end

        6 ->
          t = Nx.iota({1000}, type: :f32, backend: backend) |> Nx.sort(direction: :desc)
          Nx.to_number(t[0]) == 999.0

        7 ->
          t = Nx.iota({256, 256}, type: :f32, backend: backend) |> Nx.multiply(0.5)
          Nx.to_number(Nx.reduce_max(t)) == 65_535 * 0.5

        8 ->
          queue = Enum.at(queues, rem(div(k, 10), length(queues)))

          CommandQueue.with_queue(queue, fn ->
            Nx.to_flat_list(Nx.subtract(Nx.tensor([k], backend: backend), 1)) == [k - 1]
          end)

        9 ->
          t = Nx.tensor([3.0, 1.0, 2.0], backend: backend)

          Nx.to_flat_list(Nx.argsort(t)) == [1, 2, 0] and
            Nx.to_flat_list(Nx.cumulative_sum(t)) == [3.0, 4.0, 6.0]
      end

    unless ok, do: raise("soak: op #{k} (kind #{rem(k, 10)}) gave a wrong result")
  end
end
