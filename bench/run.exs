# The benchmark suite: `mix run bench/run.exs [suite...] [--device cpu|gpu] [--quick]`.
#
# Suites: dispatch, matmul, elementwise, transformer, mlp, fast (default: all), and soak (only when
# named: 100,000 checked mixed ops, 10,000 with --quick, printing RSS and NxMlx.memory() every
# 10,000; its key lines are soak_*, printed last; no references). Runs each on
# NxMlx.Backend, with references measured in the same run: Nx.BinaryBackend at small sizes,
# the raw-MLX Rust bench (native/mlx_raw_bench: the same computations against the MLX binding,
# with no BEAM in the loop; it also times OpenBLAS sgemm), and PyTorch on the same device
# (bench/reference/torch_bench.py; on the CPU with a thread per core) when python3 can
# import torch. Prints a table per suite,
# then `key: value` lines: NxMlx's figures under their case names, the references' as
# `<impl>.<key>`, and `<case>_vs_<impl>` = reference time / NxMlx time (above 1: NxMlx is
# faster); the transformer and mlp lanes also get `_paired` ratios, timed in alternation
# with the raw bench serving the same cases (`mlx_raw_bench --serve`, see bench/README.md). Writes bench/results/<device>/<suite>.csv, a plot per suite (<suite>.png and
# .svg, drawn by bench/support/plot.exs) and keys.txt. See bench/README.md.
#
# Environment: NX_MLX_RAW_BENCH=<path> uses a prebuilt mlx_raw_bench (else it is built with
# cargo); NX_MLX_TORCH_PYTHON=<python> names the Python that has torch (default python3, e.g.
# a virtual environment's bin/python); NX_MLX_TORCH_KEYS=<file> reads the PyTorch keys from a
# file instead of running it.

Code.require_file("support/harness.exs", __DIR__)
Code.require_file("support/suites.exs", __DIR__)
Code.require_file("support/plot.exs", __DIR__)

alias Bench.{Harness, Plot, Suites}

# The fusion lane ("fused" rows) on the CPU builds its kernels with g++ at run time, which
# needs the exit status of its child: the BEAM ignores SIGCHLD unless told otherwise. The
# [:nx_mlx, :compiler, :unfused] events (a part that ran unfused anyway) are counted and
# printed as `fused_unfused_events` with their reasons.
:os.set_signal(:sigchld, :default)
{:ok, unfused} = Agent.start_link(fn -> [] end)

:telemetry.attach(
  "bench-unfused",
  [:nx_mlx, :compiler, :unfused],
  &Bench.Suites.collect_unfused/4,
  unfused
)

all_suites = ~w(dispatch matmul elementwise transformer mlp fast quant decode)
extra_suites = ~w(soak)

{opts, suites, invalid} =
  OptionParser.parse(System.argv(), strict: [device: :string, quick: :boolean])

if invalid != [] or Enum.any?(suites, &(&1 not in (all_suites ++ extra_suites))) do
  IO.puts(
    :stderr,
    "usage: mix run bench/run.exs [#{Enum.join(all_suites ++ extra_suites, "|")}...] " <>
      "[--device cpu|gpu] [--quick]"
  )

  System.halt(2)
end

soak? = "soak" in suites
suites = if suites == [], do: all_suites, else: suites -- ["soak"]
quick? = Keyword.get(opts, :quick, false)

device =
  case Keyword.get(opts, :device, "cpu") do
    "cpu" -> :cpu
    "gpu" -> :gpu
    other -> raise ArgumentError, "--device takes cpu or gpu, got #{inspect(other)}"
  end

unless device in NxMlx.devices() do
  raise ArgumentError,
        "device #{device} is not available in this libmlx (#{inspect(NxMlx.devices())})"
end

backend = {NxMlx.Backend, device: device}
settings = Harness.settings(quick?)
root = Path.expand("..", __DIR__)
results = Path.join([root, "bench", "results", Atom.to_string(device)])
File.mkdir_p!(results)

## The machine

cpu_model =
  case File.read("/proc/cpuinfo") do
    {:ok, info} ->
      info
      |> String.split("\n")
      |> Enum.find_value("unknown", fn l ->
        if String.starts_with?(l, "model name"),
          do: l |> String.split(":", parts: 2) |> List.last() |> String.trim()
      end)

    _ ->
      :erlang.system_info(:system_architecture) |> to_string()
  end

gpu =
  with nvidia when is_binary(nvidia) <- System.find_executable("nvidia-smi"),
       {out, 0} <-
         System.cmd(nvidia, [
           "--query-gpu=name,driver_version,memory.total",
           "--format=csv,noheader"
         ]) do
    out |> String.split("\n", trim: true) |> hd()
  else
    _ -> "none"
  end

# The TF32 setting NxMlx runs with (see NxMlx.Native), as libmlx sees it.
tf32 = NxMlx.build_info()["mlx_enable_tf32"]

# Whether the BEAM's schedulers busy-wait when idle (the default): on a small machine they
# then compete with MLX's and OpenBLAS's threads during long CPU work (see bench/README.md).
busy_wait =
  :erlang.system_info(:emu_args)
  |> Enum.chunk_every(2, 1, :discard)
  |> Enum.find_value("default", fn
    [~c"-sbwt", value] -> to_string(value)
    _ -> nil
  end)

machine = [
  {"date", Date.utc_today() |> Date.to_iso8601()},
  {"device", device},
  {"cpu", cpu_model},
  {"cpu_cores", System.schedulers_online()},
  {"gpu", gpu},
  {"elixir", System.version()},
  {"otp", System.otp_release()},
  {"nx", Application.spec(:nx, :vsn)},
  {"mlx", NxMlx.build_info()["mlx"]},
  {"mlx_library", NxMlx.build_info()["libmlx"]},
  {"blas", NxMlx.build_info()["blas_library"]},
  {"tf32", tf32 == "1"},
  {"beam_busy_wait", busy_wait}
]

for {k, v} <- machine, do: IO.puts("#{k}: #{v}")

# The soak suite: no references, its key lines last.
run_soak = fn ->
  {ops, every} = if quick?, do: {10_000, 1_000}, else: {100_000, 10_000}
  IO.puts(:stderr, "running soak (#{ops} ops)")
  lines = Bench.Soak.run(backend, device, ops, every)
  File.write!(Path.join(results, "soak_keys.txt"), Enum.join(lines, "\n") <> "\n")

  IO.puts(
    "\n== soak keys (also in #{Path.relative_to(Path.join(results, "soak_keys.txt"), root)})"
  )

  Enum.each(lines, &IO.puts/1)
end

if soak? and suites == [] do
  run_soak.()
  System.halt(0)
end

cpu_or_gpu_name = if device == :gpu, do: gpu |> String.split(",") |> hd(), else: cpu_model

## References run as separate programs

raw_bin =
  System.get_env("NX_MLX_RAW_BENCH") ||
    (fn ->
       path = Path.join(root, "native/target/release/mlx_raw_bench")

       unless File.exists?(path) do
         IO.puts("building native/mlx_raw_bench (cargo build --release)")
         env = [{"MLX_DIR", NxMlx.Build.mlx_dir!()}]

         {_, 0} =
           System.cmd("cargo", ["build", "--release", "-p", "mlx_raw_bench"],
             cd: Path.join(root, "native"),
             env: env,
             into: IO.stream()
           )
       end

       path
     end).()

# The raw bench has no fast suite (its reference is the composed form, run on NxMlx).
raw_suites = suites -- ["fast", "quant", "decode"]

# The raw bench computes with the TF32 setting NxMlx runs with (given no suite it runs all).
{raw_out, raw_status} =
  if raw_suites == [] do
    {"", 0}
  else
    System.cmd(
      raw_bin,
      ["--device", Atom.to_string(device)] ++ if(quick?, do: ["--quick"], else: []) ++ raw_suites,
      stderr_to_stdout: true,
      env: [{"MLX_ENABLE_TF32", tf32}]
    )
  end

if raw_status != 0, do: raise("mlx_raw_bench failed (#{raw_status}):\n#{raw_out}")
raw_keys = Harness.parse_keys(raw_out)

# The raw bench again, serving the transformer and mlp cases for paired measurement.
settings =
  case Enum.filter(suites, &(&1 in ~w(transformer mlp))) do
    [] ->
      settings

    paired_suites ->
      port = Harness.open_paired(raw_bin, device, paired_suites, [{"MLX_ENABLE_TF32", tf32}])
      if port == nil, do: IO.puts(:stderr, "mlx_raw_bench --serve did not start: no paired keys")
      %{settings | paired: port}
  end

torch_keys =
  cond do
    # The quant suite compares weight formats on NxMlx: no PyTorch reference.
    suites -- ["quant"] == [] ->
      %{}

    path = System.get_env("NX_MLX_TORCH_KEYS") ->
      Harness.parse_keys(File.read!(path))

    python = System.find_executable(System.get_env("NX_MLX_TORCH_PYTHON", "python3")) ->
      script = Path.join(root, "bench/reference/torch_bench.py")
      torch_device = if device == :gpu, do: "cuda", else: "cpu"
      torch_suites = suites -- ["quant"]

      args =
        [script, "--device", torch_device] ++
          if(quick?, do: ["--quick"], else: []) ++ torch_suites

      case System.cmd(python, args, stderr_to_stdout: true) do
        {out, 0} ->
          Harness.parse_keys(out)

        {out, status} ->
          IO.puts("PyTorch reference not run (#{status}): #{String.slice(out, -300..-1//1)}")
          %{}
      end

    true ->
      %{}
  end

## The suites, on NxMlx and Nx.BinaryBackend

suite_of = fn
  "matmul_" <> _ -> "matmul"
  "transformer_" <> _ -> "transformer"
  "encoder12_" <> _ -> "transformer"
  "mlp4_" <> _ -> "mlp"
  "rms_norm_" <> _ -> "fast"
  "layer_norm_" <> _ -> "fast"
  "rope_" <> _ -> "fast"
  "sdpa_" <> _ -> "fast"
  "qmm_" <> _ -> "quant"
  "decode_" <> _ -> "decode"
  "softmax_" <> rest -> if String.contains?(rest, "x"), do: "fast", else: "elementwise"
  name when name in ~w(dispatch readback jit_call jit_lookup replay_op while_iter) -> "dispatch"
  name -> if String.match?(name, ~r/^(add|exp|sum|softmax|gelu)_/), do: "elementwise", else: nil
end

# Rows of a reference from its keys: `<prefix><case>_ms` (and _ms_p10/_ms_p90), or for
# dispatch `<prefix>dispatch_us` / `<prefix>readback_us`.
reference_rows = fn keys, prefix, impl, ours ->
  works = Map.new(for r <- ours, r[:work], do: {r.case, r.work})

  for {key, value} <- keys,
      is_number(value),
      String.starts_with?(key, prefix),
      name = String.replace_prefix(key, prefix, ""),
      case_name =
        (String.ends_with?(name, "_us") && String.replace_suffix(name, "_us", "")) ||
          (String.ends_with?(name, "_ms") && String.replace_suffix(name, "_ms", "")),
      is_binary(case_name),
      suite = suite_of.(case_name),
      suite != nil do
    unit = if String.ends_with?(name, "_us"), do: "us", else: "ms"
    p10 = keys["#{prefix}#{case_name}_ms_p10"] || value
    p90 = keys["#{prefix}#{case_name}_ms_p90"] || value

    base = %{
      suite: suite,
      case: case_name,
      impl: impl,
      median: value,
      p10: p10,
      p90: p90,
      unit: unit
    }

    case works[case_name] do
      {:flops, f} -> Map.merge(base, %{rate: f / (value / 1.0e3) / 1.0e9, rate_unit: "GFLOP/s"})
      {:bytes, b} -> Map.merge(base, %{rate: b / (value / 1.0e3) / 1.0e9, rate_unit: "GB/s"})
      nil -> base
    end
  end
end

# A reference's own keys, without those of its `<prefix>.` variants (openblas., compiled.,
# sdpa.).
unprefixed = fn keys -> Map.reject(keys, fn {key, _} -> String.contains?(key, ".") end) end

all_rows =
  for suite <- suites do
    IO.puts(:stderr, "running #{suite}")

    ours =
      case suite do
        "dispatch" -> Suites.dispatch(settings, backend, quick?)
        "matmul" -> Suites.matmul(settings, backend, device)
        "elementwise" -> Suites.elementwise(settings, backend, device)
        "transformer" -> Suites.transformer(settings, backend, device)
        "mlp" -> Suites.mlp(settings, backend, device)
        "fast" -> Suites.fast(settings, backend, device)
        "quant" -> Suites.quant(settings, backend, device)
        "decode" -> Suites.decode(settings, backend, device)
      end

    refs =
      [
        reference_rows.(unprefixed.(raw_keys), "", "raw_mlx", ours),
        reference_rows.(raw_keys, "openblas.", "openblas", ours),
        reference_rows.(raw_keys, "compiled.", "raw_mlx_compiled", ours),
        reference_rows.(unprefixed.(torch_keys), "", "pytorch", ours),
        reference_rows.(torch_keys, "sdpa.", "pytorch_sdpa", ours)
      ]
      |> List.flatten()
      |> Enum.filter(&(&1.suite == suite))

    rows = Enum.sort_by(ours ++ refs, &{&1.case, &1.impl != "nx_mlx", &1.impl})
    Harness.print_table(suite, rows)
    Harness.write_csv(Path.join(results, "#{suite}.csv"), rows)

    chart =
      Plot.write(Path.join(results, suite), "#{suite} on #{device} (#{cpu_or_gpu_name})", rows)

    IO.puts("chart: #{Path.relative_to(chart, root)}")
    rows
  end
  |> List.flatten()

## Key lines, last

ours = for r <- all_rows, r.impl == "nx_mlx", into: %{}, do: {r.case, r}

key_lines =
  Enum.flat_map(all_rows, fn r ->
    suffix = if r.unit == "us", do: "_us", else: "_ms"
    prefix = if r.impl == "nx_mlx", do: "", else: "#{r.impl}."

    rate =
      case r[:rate_unit] do
        "GFLOP/s" -> ["#{prefix}#{r.case}_gflops: #{Harness.fmt(r.rate)}"]
        "GB/s" -> ["#{prefix}#{r.case}_gbps: #{Harness.fmt(r.rate)}"]
        _ -> []
      end

    ratio =
      case {r.impl, ours[r.case]} do
        {impl, _} when impl in ["nx_mlx", "defn", "fused", "fast"] ->
          []

        # The compiler's fixed costs have key lines of their own (below).
        _ when r.case in ["jit_call", "jit_lookup", "replay_op", "while_iter"] ->
          []

        {_, nil} ->
          []

        {impl, o} ->
          ["#{r.case}_vs_#{impl}: #{:erlang.float_to_binary(r.median / o.median, decimals: 3)}"]
      end

    ["#{prefix}#{r.case}#{suffix}: #{Harness.fmt(r.median)}"] ++ rate ++ ratio
  end)

# The compiler's lanes: `<case>_<lane>_vs_<reference>` (reference time over the lane's
# time: 1.0 is parity, higher is faster) for the defn lane (against raw MLX's same graph,
# PyTorch and PyTorch with scaled_dot_product_attention) and the fused lane (against raw MLX
# under mx::compile, PyTorch, and the defn lane); `jit_call_vs_eager` and
# `while_iter_vs_raw_mlx` are time ratios where lower is better (a jitted add with its
# read-back over the eager add with its read-back; our while loop's time per iteration over
# the binding's); `replay_op_overhead_us` is what replay adds per op to MLX's own cost of the
# same chain.
by_impl = fn impl, c -> Enum.find(all_rows, &(&1.impl == impl and &1.case == c)) end

lane_refs = [
  {"defn", ["raw_mlx", "pytorch", "pytorch_sdpa"]},
  {"fast", ["pytorch", "pytorch_sdpa", "defn"]},
  {"fused", ["raw_mlx_compiled", "pytorch", "pytorch_sdpa", "defn"]},
  {"q4", ["bf16"]},
  {"q8", ["bf16"]},
  {"mxfp4", ["bf16"]}
]

defn_lines =
  (for {lane, refs} <- lane_refs,
       %{impl: ^lane, case: c} = d <- all_rows,
       impl <- refs,
       ref = by_impl.(impl, c),
       ref != nil do
     "#{c}_#{lane}_vs_#{impl}: #{:erlang.float_to_binary(ref.median / d.median, decimals: 3)}"
   end ++
     Enum.flat_map(
       [
         {"jit_call", "nx_mlx", "readback", "jit_call_vs_eager"},
         {"while_iter", "raw_mlx", "while_iter", "while_iter_vs_raw_mlx"}
       ],
       fn {ours_case, ref_impl, ref_case, key} ->
         case {by_impl.("nx_mlx", ours_case), by_impl.(ref_impl, ref_case)} do
           {%{median: o}, %{median: r}} when r > 0 ->
             ["#{key}: #{:erlang.float_to_binary(o / r, decimals: 3)}"]

           _ ->
             []
         end
       end
     ) ++
     case {by_impl.("nx_mlx", "replay_op"), by_impl.("raw_mlx", "replay_op")} do
       {%{median: o}, %{median: r}} -> ["replay_op_overhead_us: #{Harness.fmt(o - r)}"]
       _ -> []
     end ++
     for %{impl: lane, case: c, paired: p} <- all_rows do
       base = "#{c}_#{lane}_vs_#{p.ref}_paired"

       [
         "#{base}: #{:erlang.float_to_binary(p.ratio, decimals: 3)}",
         "#{base}_ms: #{Harness.fmt(p.ours)} vs #{Harness.fmt(p.raw)}"
       ]
     end)
  |> List.flatten()

unfused_lines =
  case Agent.get(unfused, & &1) do
    [] ->
      ["fused_unfused_events: 0"]

    reasons ->
      ["fused_unfused_events: #{length(reasons)} (#{reasons |> Enum.uniq() |> Enum.join("; ")})"]
  end

# decode: tokens per second (the new tokens over prefill and generation), and the 4-bit
# model's speed against the bf16 one (their times' ratio: higher is faster).
decode_lines =
  for %{suite: "decode", case: c, impl: impl, median: ms} <- all_rows do
    prefix = if impl == "nx_mlx", do: "", else: "#{impl}."
    "#{prefix}#{c}_tokens_per_s: #{Harness.fmt(Suites.decode_tokens() / (ms / 1.0e3))}"
  end ++
    for base <- ["bf16", "f32"],
        %{median: q} <- [by_impl.("nx_mlx", "decode_gpt2s_q4")],
        %{median: b} <- [by_impl.("nx_mlx", "decode_gpt2s_#{base}")] do
      "decode_gpt2s_q4_vs_#{base}: #{:erlang.float_to_binary(b / q, decimals: 3)}"
    end

key_lines = key_lines ++ defn_lines ++ decode_lines ++ unfused_lines

suites_rows = for s <- suites, do: {s, Enum.filter(all_rows, &(&1.suite == s))}
Harness.write_markdown(Path.join(results, "tables.md"), machine, suites_rows)
machine_lines = for {k, v} <- machine, do: "#{k}: #{v}"
File.write!(Path.join(results, "keys.txt"), Enum.join(machine_lines ++ key_lines, "\n") <> "\n")
IO.puts("\n== keys (also in #{Path.relative_to(Path.join(results, "keys.txt"), root)})")
Enum.each(key_lines, &IO.puts/1)

if soak?, do: run_soak.()
