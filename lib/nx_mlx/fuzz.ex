defmodule NxMlx.Fuzz do
  @moduledoc false
  # The runner of `mix nx_mlx.fuzz` (see Mix.Tasks.NxMlx.Fuzz): cases from NxMlx.Fuzz.Gen
  # run in child VMs (OTP's :peer) through NxMlx.Fuzz.Exec, so that a VM crash is counted,
  # not fatal. A child runs up to `batch` cases, then is replaced; a child that dies counts a
  # crash for the case it was running, one that does not answer within `timeout` ms counts a
  # hang (it is killed); either way the next case runs in a new child.

  alias NxMlx.Fuzz.{Exec, Gen}

  @classes [:ok, :expected_error, :divergence, :disagreement, :other_exception, :crash, :hang]
  @failures [:disagreement, :other_exception, :crash, :hang]

  @defaults [
    calls: 1000,
    seed: 1,
    first: 0,
    device: :cpu,
    lane: :eager,
    batch: 250,
    timeout: 30_000,
    memory_limit: 4 * 1024 * 1024 * 1024,
    progress: nil,
    jobs: 1
  ]

  @doc """
  Runs cases `first .. first + calls - 1` of `seed` (or the indices in `:only`), returns
  %{results: [%{spec, class, detail, us}], elapsed_s}. Options: see @defaults; `:progress`
  is an IO device for progress lines (nil: none).
  """
  def run(opts) do
    opts = Keyword.merge(@defaults, opts)
    indices = opts[:only] || Enum.to_list(opts[:first]..(opts[:first] + opts[:calls] - 1)//1)
    t0 = System.monotonic_time()
    results = run_sharded(indices, opts)
    %{results: results, elapsed_s: seconds_since(t0)}
  end

  # `jobs` shards (every jobs-th case), each in its own child VMs at the same time; the
  # results come back in case order. Cases are pure functions of (seed, index), so the
  # report is the same whatever `jobs` is (a hang's timeout may differ on a busy machine).
  defp run_sharded(indices, opts) do
    jobs = max(opts[:jobs], 1)
    specs = fn ids -> Stream.map(ids, &Gen.case(opts[:seed], &1, opts[:device])) end

    if jobs == 1 do
      run_specs(specs.(indices), Keyword.put(opts, :total, length(indices)))
    else
      indices
      |> Enum.with_index()
      |> Enum.group_by(fn {_, i} -> rem(i, jobs) end, fn {id, _} -> id end)
      |> Map.values()
      |> Task.async_stream(
        fn ids ->
          Enum.zip(ids, run_specs(specs.(ids), Keyword.put(opts, :total, length(ids))))
        end,
        timeout: :infinity,
        max_concurrency: jobs
      )
      |> Enum.flat_map(fn {:ok, pairs} -> pairs end)
      |> Enum.sort_by(&elem(&1, 0))
      |> Enum.map(&elem(&1, 1))
    end
  end

  @doc "Runs the given cases (an enumerable of specs) in child VMs: [%{spec, class, detail, us}]."
  def run_specs(specs, opts) do
    opts = Keyword.merge(@defaults, opts)
    env = [nx_mlx: Application.get_all_env(:nx_mlx)]
    t0 = System.monotonic_time()

    {results, child} =
      specs
      |> Stream.with_index(1)
      |> Enum.map_reduce(nil, fn {spec, n}, child ->
        child = child || start_child(env, opts[:memory_limit])
        {result, child} = run_one(child, spec, opts)
        child = if child && child.count >= opts[:batch], do: stop_child(child), else: child
        progress(opts[:progress], n, opts[:total], t0)
        {result, child}
      end)

    if child, do: stop_child(child)
    results
  end

  defp seconds_since(t0),
    do: System.convert_time_unit(System.monotonic_time() - t0, :native, :microsecond) / 1.0e6

  defp progress(nil, _, _, _), do: :ok

  defp progress(io, n, total, t0) do
    if rem(n, 250) == 0 or n === total do
      rate = n / max(seconds_since(t0), 1.0e-6)
      IO.puts(io, "fuzz: #{n}/#{total} (#{Float.round(rate, 1)} calls/s)")
    end
  end

  ## Child VMs

  defp start_child(env, memory_limit) do
    paths = Enum.flat_map(:code.get_path(), &[~c"-pa", &1])

    {:ok, peer, _node} =
      :peer.start(%{connection: :standard_io, args: paths, wait_boot: 120_000})

    ospid = :peer.call(peer, Exec, :boot, [env, memory_limit], 120_000)
    %{peer: peer, ospid: ospid, count: 0}
  end

  defp stop_child(%{peer: peer}) do
    try do
      :peer.stop(peer)
    catch
      _, _ -> :ok
    end

    nil
  end

  defp kill_child(%{ospid: ospid} = child) do
    System.cmd("kill", ["-9", ospid], stderr_to_stdout: true)
    stop_child(child)
  end

  defp run_one(child, spec, opts) do
    t0 = System.monotonic_time()

    {class, detail, child} =
      try do
        {class, detail} =
          :peer.call(child.peer, Exec, :run, [spec, opts[:device], opts[:lane]], opts[:timeout])

        {class, detail, %{child | count: child.count + 1}}
      catch
        :exit, {:timeout, _} ->
          kill_child(child)
          {:hang, "no answer within #{opts[:timeout]} ms (child VM killed)", nil}

        :exit, reason ->
          stop_child(child)
          {:crash, "the child VM died (#{crash_reason(reason)})", nil}
      end

    us = System.convert_time_unit(System.monotonic_time() - t0, :native, :microsecond)
    {%{spec: spec, class: class, detail: detail, us: us}, child}
  end

  defp crash_reason({reason, {:gen_server, :call, _}}), do: inspect(reason)
  defp crash_reason(reason), do: inspect(reason, limit: 5)

  ## Report

  @doc "Counts per family and class: %{family => %{class => n}}."
  def tally(results) do
    Enum.reduce(results, %{}, fn %{spec: %{family: f}, class: c}, acc ->
      Map.update(acc, f, %{c => 1}, &Map.update(&1, c, 1, fn n -> n + 1 end))
    end)
  end

  @doc "Totals per class over all results."
  def totals(results) do
    counts = Enum.frequencies_by(results, & &1.class)
    Map.new(@classes, &{&1, Map.get(counts, &1, 0)})
  end

  @doc "The report: the table by family, failing cases, divergences, then the key lines."
  def report(%{results: results, elapsed_s: elapsed}, opts) do
    opts = Keyword.merge(@defaults, opts)
    tally = tally(results)
    totals = totals(results)

    header =
      "nx_mlx fuzz: seed #{opts[:seed]}, #{length(results)} calls, device #{opts[:device]}, " <>
        "lane #{opts[:lane]}, " <>
        "#{Float.round(elapsed, 1)} s"

    cols = ["calls", "ok", "expected", "documented", "disagree", "other_exc", "crash", "hang"]

    row = fn name, counts ->
      n = counts |> Map.values() |> Enum.sum()
      cells = [n | Enum.map(@classes, &Map.get(counts, &1, 0))]
      String.pad_trailing(to_string(name), 13) <> Enum.map_join(cells, "", &pad(&1, 11))
    end

    table =
      [String.pad_trailing("family", 13) <> Enum.map_join(cols, "", &pad(&1, 11))] ++
        for(f <- Gen.families(), Map.has_key?(tally, f), do: row.(f, tally[f])) ++
        [row.("total", totals)]

    failing = Enum.filter(results, &(&1.class in @failures))

    failures =
      if failing == [] do
        ["no failing cases"]
      else
        ["failing cases (first #{min(20, length(failing))} of #{length(failing)}):"] ++
          Enum.flat_map(Enum.take(failing, 20), fn r ->
            [
              "  [#{r.class}] seed=#{r.spec.seed} index=#{r.spec.index} " <>
                "#{r.spec.family}/#{r.spec.op}: #{r.detail}",
              "    repro: mix nx_mlx.fuzz --seed #{r.spec.seed} --only #{r.spec.index}" <>
                device_flag(opts[:device]),
              "    " <> render(r.spec, opts[:device], 24)
            ]
          end)
      end

    divergences =
      results
      |> Enum.filter(&(&1.class == :divergence))
      # A case explained by several divergences together ("a+b") counts for each.
      |> Enum.flat_map(&String.split(&1.detail, "+"))
      |> Enum.frequencies()

    div_lines =
      if divergences == %{},
        do: [],
        else:
          ["documented divergences seen:"] ++
            for(
              {id, reason} <- Exec.divergences(),
              n = divergences[Atom.to_string(id)],
              do: "  #{id}: #{n} (#{reason})"
            )

    rate = length(results) / max(elapsed, 1.0e-6)

    keys = [
      "calls_per_s: #{Float.round(rate, 1)}",
      "ok: #{totals.ok}",
      "expected_errors: #{totals.expected_error}",
      "documented_divergences: #{totals.divergence}",
      "calls: #{length(results)}",
      "crashes: #{totals.crash}",
      "hangs: #{totals.hang}",
      "other_exceptions: #{totals.other_exception}",
      "disagreements: #{totals.disagreement}"
    ]

    Enum.join(
      [header, ""] ++ table ++ [""] ++ failures ++ [""] ++ div_lines ++ [""] ++ keys,
      "\n"
    )
  end

  defp device_flag(:cpu), do: ""
  defp device_flag(device), do: " --device #{device}"

  defp pad(v, n), do: String.pad_leading(to_string(v), n)

  @doc "One case, in full: its call as Elixir code and its outcome (for --only)."
  def describe(%{spec: spec, class: class, detail: detail}, device) do
    "[#{class}] seed=#{spec.seed} index=#{spec.index} #{spec.family}/#{spec.op}: #{detail}\n  " <>
      render(spec, device, :infinity)
  end

  ## Rendering a case as Elixir code

  @doc "The call of `spec` as one line of Elixir (tensors of more than `limit` values cut)."
  def render(%{kind: :scenario, call: {name, params}}, device, _limit),
    do: "NxMlx.Fuzz.Exec.scenario(#{inspect(name)}, #{inspect(params)}, #{inspect(device)})"

  def render(%{call: {mod, fun, args}}, device, limit) do
    "#{inspect(mod)}.#{fun}(#{Enum.map_join(args, ", ", &arg(&1, device, limit))})"
  end

  defp arg({:"$t", type, shape, values}, device, limit),
    do: tensor_code(type, shape, values, "{NxMlx.Backend, device: #{inspect(device)}}", limit)

  defp arg({:"$bt", type, shape, values}, _device, limit),
    do: tensor_code(type, shape, values, "Nx.BinaryBackend", limit)

  defp arg({:"$ref", type, shape, values}, device, limit),
    do: "#{arg({:"$t", type, shape, values}, device, limit)}.data.ref"

  defp arg({:"$tmpl", shape, type}, _device, _limit),
    do: "Nx.template(#{inspect(shape)}, #{inspect(type)})"

  defp arg(:"$worker", device, _limit), do: "NxMlx.Runtime.worker(#{inspect(device)})"
  defp arg(:"$forged", _device, _limit), do: "make_ref()"
  defp arg({:complex, re, im}, _device, _limit), do: "Complex.new(#{inspect(re)}, #{inspect(im)})"

  defp arg(list, device, limit) when is_list(list) do
    if list != [] and Enum.all?(list, &match?({k, _} when is_atom(k), &1)) do
      "[" <> Enum.map_join(list, ", ", fn {k, v} -> "#{k}: #{arg(v, device, limit)}" end) <> "]"
    else
      "[" <> Enum.map_join(list, ", ", &arg(&1, device, limit)) <> "]"
    end
  end

  defp arg(other, _device, _limit), do: inspect(other)

  defp tensor_code(type, shape, values, backend, limit) do
    n = length(values)

    data =
      if limit != :infinity and n > limit,
        do: "<#{n} values: see --only>",
        else: "[" <> Enum.map_join(values, ", ", &value_code/1) <> "]"

    base = "Nx.tensor(#{data}, type: #{inspect(type)}, backend: #{backend})"
    if tuple_size(shape) == 1 and n > 0, do: base, else: "Nx.reshape(#{base}, #{inspect(shape)})"
  end

  defp value_code({:complex, re, im}), do: "Complex.new(#{inspect(re)}, #{inspect(im)})"
  defp value_code(v), do: inspect(v)
end
