defmodule NxMlx.Fuzz.Exec do
  @moduledoc false
  # Runs one case of `mix nx_mlx.fuzz` (made by NxMlx.Fuzz.Gen) inside a child VM and
  # classifies it: {class, detail}, class one of :ok, :expected_error, :divergence,
  # :disagreement, :other_exception (crashes and hangs are seen by the parent).
  #
  # Calls of kind :nx run twice, with their tensors on NxMlx and on Nx.BinaryBackend:
  #
  #   * both return: the results must have the same shapes and types and agree within the
  #     tolerance of their type (below); values that differ where a documented divergence
  #     explains them count as :divergence;
  #   * both raise: NxMlx must raise the very exception Nx.BinaryBackend raised (same module
  #     and message: Nx's front end raised it), or an ArgumentError naming the op;
  #   * only Nx.BinaryBackend raises: a documented divergence or a :disagreement;
  #   * only NxMlx raises: :other_exception (it refused a call Nx computes).

  import Bitwise, only: [<<<: 2]

  alias NxMlx.{CommandQueue, Native, Pipeline}

  ## Tolerances
  #
  # Integers and non-float results: exact. NaN equals NaN, infinities equal infinities of the
  # same sign, -0.0 equals 0.0. Floats: |mlx - nx| <= atol + rtol * |nx| per element, with
  #
  #   * element-wise ops: rtol of the type below, atol = rtol (values near zero, e.g.
  #     sin(pi), are compared absolutely);
  #   * accumulating ops (reductions, scans, windows, fft: accum 1; dot and conv: accum 2):
  #     the accumulating rtol, and atol = rtol * max|input|^accum * elements of the largest
  #     input (the summation order differs: MLX's kernels vs Nx's left fold);
  #   * linear algebra (Nx's algorithms on MLX ops vs on Nx.BinaryBackend, many steps):
  #     the linalg rtol, atol = rtol.
  #
  # Nx.BinaryBackend computes f16/bf16 ops in double precision and rounds once; MLX rounds
  # each kernel's f16/bf16 result and may accumulate in the narrow type, hence the looser
  # 16-bit tolerances (about 4 ulp element-wise).
  @rtol %{
    {:f, 64} => 1.0e-12,
    {:f, 32} => 1.0e-5,
    {:f, 16} => 4.0e-3,
    {:bf, 16} => 3.2e-2,
    {:c, 64} => 1.0e-5
  }
  @accum_rtol %{
    {:f, 64} => 1.0e-10,
    {:f, 32} => 1.0e-4,
    {:f, 16} => 2.0e-2,
    {:bf, 16} => 8.0e-2,
    {:c, 64} => 1.0e-4
  }
  @linalg_rtol %{{:f, 64} => 1.0e-7, {:f, 32} => 2.0e-3, {:f, 16} => 5.0e-2, {:bf, 16} => 0.1}

  @doc "The tolerance table, for the report."
  def tolerances, do: %{elementwise: @rtol, accumulating: @accum_rtol, linalg: @linalg_rtol}

  ## Documented divergences (the NxMlx.Backend moduledoc lists them)

  @divergences [
    sign_nan: "sign(NaN) is NaN, as in EXLA; Nx.BinaryBackend returns 1.0",
    sign_neg_infinity:
      "sign(-Inf) is -1.0, as in EXLA; Nx.BinaryBackend returns 1.0 (it compares the atom " <>
        ":neg_infinity with 0 in Erlang's term order)",
    pad_output_type:
      "pad whose output type is wider than its input (an f16 tensor padded with :nan, a u8 " <>
        "one with 300) returns Nx's output type, as EXLA; Nx.BinaryBackend keeps the input's " <>
        "type and misreads the pad value's bytes",
    sign_complex: "the sign of a complex number is z/|z|, as in EXLA; Nx.BinaryBackend returns 1",
    complex_nonfinite:
      "complex functions of non-finite inputs, and complex results that overflow, follow " <>
        "C++'s std::complex; Nx.BinaryBackend often gives NaN parts",
    complex_signed_zero:
      "log, log1p and sqrt of a complex number on the negative real axis with a -0.0 " <>
        "imaginary part answer the lower side of the branch cut (C99 Annex G, C++'s " <>
        "std::complex: log(-1-0i) = -pi i); Nx's Complex ignores the zero's sign (+pi i)",
    int_div_zero:
      "integer quotient/remainder by zero give an unspecified value instead of raising",
    negative_shift: "shifting by a negative amount gives an unspecified value instead of raising",
    oob_index:
      "out-of-bounds gather/take/scatter indices are clamped (reads) or skipped (writes); Nx.BinaryBackend raises",
    fft_non_last_axis:
      "fft/ifft along a non-last axis of rank >= 3 give the DFT; Nx 0.13.1's Nx.BinaryBackend gives something else",
    indexed_put_duplicates_gpu:
      "with duplicate indices indexed_put keeps any one of the rows on the GPU (the last on the CPU)",
    # The reference's own limits (not NxMlx divergences): where Nx.BinaryBackend cannot
    # answer, NxMlx's IEEE 754 answer is accepted; every other position is still compared.
    reference_raised:
      "Nx.BinaryBackend itself fails (Erlang's :math outside its domain, e.g. asin(34.0), " <>
        "sqrt(-1.0), exp(1000.0), floor(Inf), 0/0; a MatchError inside it); element-wise " <>
        "ops are compared at the positions it can compute, other ops are not checked",
    pow_nan_zero: "pow(NaN, 0) is 1, as IEEE 754, C's pow and EXLA; Nx.BinaryBackend returns NaN",
    atan2_neg_infinity:
      "atan2(y, -Inf) is -pi for negative y, as IEEE 754 and EXLA; Nx.BinaryBackend returns pi",
    complex_all_zero:
      "all of a complex tensor holding 0+0i is 0; Nx.BinaryBackend's all counts every " <>
        "complex number as true",
    int_input_rounded:
      "on the GPU device (no f64), float functions of integers that f32 cannot hold convert " <>
        "them to the output float type first, as EXLA; Nx.BinaryBackend computes on the " <>
        "exact integer, so sin, cos and tan of integers past 2^24 differ",
    reference_inf_limit:
      "Nx.BinaryBackend answers NaN for some functions of +-Inf (tanh, sigmoid, erf, ...); " <>
        "NxMlx answers the IEEE 754 limit (tanh(Inf) = 1)"
  ]

  @doc "The documented divergences: [{id, reason}]."
  def divergences, do: @divergences

  ## Child VM setup

  @doc """
  Called in a fresh child VM: sets the parent's application environment, starts nx_mlx,
  sets the memory limit to `memory_limit` (no array larger is built: a fuzz run must not
  take the machine's memory) and returns the child's OS pid.
  """
  def boot(env, memory_limit) do
    for {app, pairs} <- env, {k, v} <- pairs, do: Application.put_env(app, k, v)
    {:ok, _} = Application.ensure_all_started(:nx_mlx)
    Logger.configure(level: :error)
    if memory_limit, do: NxMlx.set_memory_limit(memory_limit)
    List.to_string(:os.getpid())
  end

  @doc """
  Runs `spec` on `device`: {class, detail}. With `lane` :jit, the NxMlx side of a call of
  kind :nx runs jitted with `compiler: NxMlx` (see `call_lane/4`).
  """
  def run(spec, device, lane \\ :eager) do
    Process.put(:nx_mlx_fuzz_device, device)
    Process.put(:nx_mlx_fuzz_lane, lane)

    try do
      case spec.kind do
        :nx -> run_nx(spec, device)
        :backend -> run_direct(spec, device)
        :native -> run_native(spec, device)
        :scenario -> run_scenario(spec, device)
      end
    catch
      kind, reason ->
        {:other_exception,
         "fuzz executor: " <> Exception.format_banner(kind, reason, __STACKTRACE__)}
    end
  end

  ## Kind :nx

  defp run_nx(spec, device) do
    {mod, fun, args} = spec.call
    lane = Process.get(:nx_mlx_fuzz_lane, :eager)

    mlx =
      attempt(fn ->
        call_lane(mod, fun, materialize(args, backend(device)), lane) |> to_host()
      end)

    bin =
      attempt(fn ->
        call_lane(mod, fun, materialize(args, Nx.BinaryBackend), reference(lane))
        |> to_host()
      end)

    ctx = %{spec: spec, args: args, device: device, mlx: mlx, bin: bin}

    case {mlx, bin} do
      {{:ok, m}, {:ok, b}} ->
        case compare(m, b, spec, args) do
          :ok -> {:ok, ""}
          {:diff, detail} -> explain_or(ctx, {:values, m, b}, {:disagreement, detail})
        end

      {{:raised, e, _}, {:raised, be, _}} ->
        cond do
          e.__struct__ == be.__struct__ and Exception.message(e) == Exception.message(be) ->
            {:expected_error, short(e)}

          names_op?(e, spec) ->
            {:expected_error, short(e)}

          true ->
            {:other_exception, "NxMlx raised #{short(e)}; Nx.BinaryBackend raised #{short(be)}"}
        end

      {{:raised, e, st}, {:ok, b}} ->
        if documented_refusal?(e, spec, b),
          do: {:expected_error, short(e)},
          else:
            {:other_exception,
             "NxMlx raised #{short(e)} where Nx.BinaryBackend computed a result#{where(st)}"}

      {{:ok, _}, {:raised, be, _}} ->
        explain_or(
          ctx,
          :bin_raised,
          {:disagreement, "Nx.BinaryBackend raised #{short(be)}; NxMlx returned a result"}
        )
    end
  end

  # The compiler lane: the call as a function jitted with `compiler: NxMlx` (the reference:
  # with Nx.Defn.Evaluator), its tensor arguments (top level, and inside lists) the
  # function's parameters, the rest constants of the trace.
  # The reference of the jit lane is the same function jitted by Nx.Defn.Evaluator on
  # Nx.BinaryBackend: Nx's front end treats a number inside defn (a constant of the merged
  # type) differently from an eager call (a tensor of the default type, then cast).
  defp reference(:eager), do: :eager
  defp reference(:jit), do: :evaluator

  defp call_lane(mod, fun, args, :eager), do: apply(mod, fun, args)

  defp call_lane(mod, fun, args, lane) do
    {shape, tensors} = lift(args, [])
    params = tensors |> Enum.reverse() |> List.to_tuple()

    compiler = if lane == :jit, do: [compiler: NxMlx], else: [compiler: Nx.Defn.Evaluator]
    jitted = Nx.Defn.jit(fn params -> apply(mod, fun, lower(shape, params)) end, compiler)

    jitted.(params)
  end

  defp lift(%Nx.Tensor{} = t, acc), do: {{:"$param", length(acc)}, [t | acc]}

  defp lift(list, acc) when is_list(list), do: Enum.map_reduce(list, acc, &lift/2)

  defp lift(other, acc), do: {other, acc}

  defp lower({:"$param", i}, params), do: elem(params, i)
  defp lower(list, params) when is_list(list), do: Enum.map(list, &lower(&1, params))
  defp lower(other, _params), do: other

  # The moduledoc's "Types": complex128 raises ArgumentError, and a tensor of a type MLX
  # lacks (kept on Nx.BinaryBackend) raises ArgumentError when it meets an MLX tensor.
  defp documented_refusal?(%ArgumentError{message: msg}, spec, results) do
    String.contains?(msg, "NxMlx.Backend") and
      (spec.family == :types or Enum.any?(results, &match?(%Nx.Tensor{type: {:c, 128}}, &1)) or
         String.contains?(msg, "does not support type {:c, 128}"))
  end

  defp documented_refusal?(_, _, _), do: false

  defp names_op?(%ArgumentError{message: msg}, spec) do
    String.contains?(msg, "NxMlx.Backend") or String.contains?(msg, Atom.to_string(spec.op))
  end

  defp names_op?(_, _), do: false

  defp where([{mod, fun, arity, _} | _]),
    do: " (at #{inspect(mod)}.#{fun}/#{if is_list(arity), do: length(arity), else: arity})"

  defp where(_), do: ""

  defp short(e) do
    msg = Exception.message(e) |> String.replace("\n", " ")
    msg = if String.length(msg) > 200, do: String.slice(msg, 0, 200) <> "...", else: msg
    "#{inspect(e.__struct__)}: #{msg}"
  end

  defp attempt(fun) do
    {:ok, fun.()}
  rescue
    e -> {:raised, e, __STACKTRACE__}
  end

  defp backend(device), do: {NxMlx.Backend, device: device}

  # Results are copied to Nx.BinaryBackend (which evaluates NxMlx's), containers flattened.
  # Reading the values back inside the attempt: a broken result raises there.
  defp to_host(%Nx.Tensor{} = t) do
    t = Nx.backend_copy(t, Nx.BinaryBackend)
    _ = Nx.to_flat_list(t)
    [t]
  end

  defp to_host(tuple) when is_tuple(tuple), do: tuple |> Tuple.to_list() |> to_host()
  defp to_host(list) when is_list(list), do: Enum.flat_map(list, &to_host/1)
  defp to_host(other), do: [other]

  ## Materializing placeholders

  @doc false
  def materialize({:"$t", type, shape, values}, backend), do: tensor(type, shape, values, backend)

  def materialize({:"$bt", type, shape, values}, _backend),
    do: tensor(type, shape, values, Nx.BinaryBackend)

  def materialize({:"$tmpl", shape, type}, _backend), do: Nx.template(shape, type)

  def materialize({:"$ref", type, shape, values}, backend) do
    %Nx.Tensor{data: %NxMlx.Backend{ref: ref}} = tensor(type, shape, values, backend)
    ref
  end

  def materialize(:"$worker", _backend), do: NxMlx.Runtime.worker(device())
  def materialize(:"$forged", _backend), do: make_ref()

  def materialize({:complex, re, im}, _backend), do: Complex.new(num(re), num(im))
  def materialize(list, backend) when is_list(list), do: Enum.map(list, &materialize(&1, backend))

  def materialize({k, v}, backend) when is_atom(k) and is_list(v),
    do: {k, materialize(v, backend)}

  def materialize(other, _backend), do: other

  defp device, do: Process.get(:nx_mlx_fuzz_device, :cpu)

  defp num(v) when is_number(v), do: v
  defp num(v) when v in [:nan, :infinity, :neg_infinity], do: v

  @doc false
  def tensor(type, shape, values, backend) do
    binary =
      case values do
        [] ->
          <<>>

        _ ->
          values
          |> Enum.map(fn
            {:complex, re, im} -> Complex.new(num(re), num(im))
            v -> v
          end)
          |> Nx.tensor(type: type, backend: Nx.BinaryBackend)
          |> Nx.to_binary()
      end

    flat = Nx.from_binary(binary, type, backend: backend)
    if flat.shape == shape, do: flat, else: Nx.reshape(flat, shape)
  end

  @doc false
  # Cholesky and eigh need a symmetric matrix: `a + a^T` of a diagonally dominant `a`.
  def symmetric_then(op, a) do
    rank = Nx.rank(a)
    perm = Enum.to_list(0..(rank - 3)//1) ++ [rank - 1, rank - 2]
    s = Nx.add(a, Nx.transpose(a, axes: perm))
    apply(Nx.LinAlg, op, [s])
  end

  ## Comparing results

  defp compare(m, b, _spec, _args) when length(m) != length(b),
    do: {:diff, "#{length(m)} results vs #{length(b)}"}

  defp compare(m, b, spec, args) do
    scale = input_scale(args, spec.accum)

    Enum.zip(m, b)
    |> Enum.with_index()
    |> Enum.reduce_while(:ok, fn {{x, y}, i}, :ok ->
      case compare_one(x, y, spec, scale, nil) do
        :ok -> {:cont, :ok}
        {:diff, d} -> {:halt, {:diff, "result #{i}: #{d}"}}
      end
    end)
  end

  # `mask`: nil, or a flat list of booleans; true marks a position a divergence explains.
  defp compare_one(%Nx.Tensor{} = x, %Nx.Tensor{} = y, spec, scale, mask) do
    cond do
      x.shape != y.shape ->
        {:diff, "shape #{inspect(x.shape)} vs Nx #{inspect(y.shape)}"}

      x.type != y.type ->
        {:diff, "type #{inspect(x.type)} vs Nx #{inspect(y.type)}"}

      true ->
        {rtol, atol} = tolerance(spec, y.type, scale)
        xs = Nx.to_flat_list(x)
        ys = Nx.to_flat_list(y)
        mask = mask || List.duplicate(false, length(xs))

        bad =
          [xs, ys, mask, 0..(length(xs) - 1)//1]
          |> Enum.zip_with(fn [a, b, masked, i] ->
            if masked or close?(a, b, rtol, atol), do: nil, else: {i, a, b}
          end)
          |> Enum.reject(&is_nil/1)

        case bad do
          [] ->
            :ok

          [{i, a, b} | _] ->
            {:diff,
             "#{length(bad)} of #{length(xs)} values differ (#{inspect(y.type)}, rtol #{rtol}); " <>
               "first at #{i}: NxMlx #{fmt(a)}, Nx #{fmt(b)}"}
        end
    end
  end

  defp compare_one(x, y, _spec, _scale, _mask) do
    if x == y, do: :ok, else: {:diff, "#{inspect(x)} vs Nx #{inspect(y)}"}
  end

  defp fmt(%Complex{re: re, im: im}), do: "#{fmt(re)}+#{fmt(im)}i"
  defp fmt(v), do: inspect(v)

  defp tolerance(_spec, {k, _}, _scale) when k in [:s, :u], do: {0, 0}

  defp tolerance(%{accum: :linalg}, type, _scale) do
    r = Map.get(@linalg_rtol, type, 1.0e-3)
    {r, r}
  end

  # The reference's own accuracy: Nx.BinaryBackend's f64 erf_inv is accurate to about 4e-8
  # relative (NxMlx's to f64 precision: test/nx_mlx/accuracy_test.exs).
  defp tolerance(%{op: :erf_inv}, {:f, 64}, _scale), do: {1.0e-7, 1.0e-7}

  defp tolerance(%{accum: 0}, type, _scale) do
    r = Map.get(@rtol, type, 1.0e-5)
    {r, r}
  end

  defp tolerance(_spec, type, scale) do
    r = Map.get(@accum_rtol, type, 1.0e-4)
    {r, r * max(scale, 1.0)}
  end

  # max|input|^accum * the size of the largest input, over the finite values of the inputs.
  defp input_scale(args, accum) when is_integer(accum) and accum > 0 do
    tensors = placeholders(args)
    n = tensors |> Enum.map(&length(elem(&1, 3))) |> Enum.max(fn -> 1 end)

    maxabs =
      tensors
      |> Enum.flat_map(&elem(&1, 3))
      |> Enum.flat_map(fn
        {:complex, re, im} -> [re, im]
        v -> [v]
      end)
      |> Enum.filter(&is_number/1)
      |> Enum.map(&abs/1)
      |> Enum.max(fn -> 1.0 end)

    # Beyond 1e300 (inputs near the top of f64) the bound no longer constrains anything, and
    # computing it would overflow.
    log_scale = accum * :math.log10(max(maxabs, 1.0)) + :math.log10(max(n, 1))
    if log_scale > 300, do: 1.0e300, else: :math.pow(max(maxabs, 1.0), accum) * max(n, 1)
  end

  defp input_scale(_args, _accum), do: 1.0

  defp placeholders({tag, _, _, _} = t) when tag in [:"$t", :"$bt"], do: [t]
  defp placeholders(list) when is_list(list), do: Enum.flat_map(list, &placeholders/1)
  defp placeholders({k, v}) when is_atom(k) and is_list(v), do: placeholders(v)
  defp placeholders(_), do: []

  defp close?(a, b, _rtol, _atol) when a == b, do: true
  defp close?(:nan, :nan, _, _), do: true
  defp close?(a, b, _, _) when is_atom(a) or is_atom(b), do: false

  defp close?(%Complex{} = a, %Complex{} = b, rtol, atol),
    do: close?(a.re, b.re, rtol, atol) and close?(a.im, b.im, rtol, atol)

  defp close?(a, b, rtol, atol) when is_number(a) and is_number(b),
    do: abs(a - b) <= atol + rtol * abs(b)

  defp close?(_, _, _, _), do: false

  ## Explaining differences by the documented divergences

  # One divergence explains the case alone (`:all`, or the positions it masks), or several
  # do together (a tensor holding both a non-finite value and a signed zero on a branch
  # cut): their masks are joined, and the detail names each ("a+b").
  defp explain_or(ctx, what, otherwise) do
    found =
      for {id, _reason} <- @divergences, mask = safe_explain(id, ctx), mask != nil, do: {id, mask}

    alone =
      Enum.find(found, fn {_id, mask} -> mask == :all or safe_agree?(ctx, what, mask) end)

    masks = for {id, mask} <- found, is_list(mask), do: {id, mask}

    cond do
      alone != nil ->
        {:divergence, "#{elem(alone, 0)}"}

      length(masks) > 1 and safe_agree?(ctx, what, join_masks(Enum.map(masks, &elem(&1, 1)))) ->
        {:divergence, Enum.map_join(masks, "+", &"#{elem(&1, 0)}")}

      true ->
        otherwise
    end
  end

  # An explanation that cannot handle the case (shapes it was not written for) does not
  # explain it.
  defp safe_explain(id, ctx) do
    explain(id, ctx)
  rescue
    _ -> nil
  end

  defp safe_agree?(ctx, what, mask) do
    masked_agree?(ctx, what, mask)
  rescue
    _ -> false
  end

  defp join_masks(masks), do: Enum.zip_with(masks, fn bits -> Enum.any?(bits) end)

  # Where Nx.BinaryBackend raised, only element-wise ops can be compared (position by
  # position); other ops are not explained by a mask.
  defp masked_agree?(ctx, :bin_raised, mask) when is_list(mask) do
    {:ok, [m]} = ctx.mlx
    elementwise?(ctx) and compare_one(m, per_element_tensor(ctx, m), ctx.spec, 1.0, mask) == :ok
  end

  defp masked_agree?(_ctx, :bin_raised, _mask), do: false

  defp masked_agree?(ctx, {:values, [m], [b]}, mask) when is_list(mask) do
    compare_one(m, b, ctx.spec, input_scale(ctx.args, ctx.spec.accum), mask) == :ok
  end

  defp masked_agree?(_, _, _), do: false

  defp input(ctx, i), do: ctx.args |> Enum.at(i) |> materialize(Nx.BinaryBackend)

  defp result_shape(%{bin: {:ok, [%Nx.Tensor{shape: s} | _]}}), do: s
  defp result_shape(%{mlx: {:ok, [%Nx.Tensor{shape: s} | _]}}), do: s

  # Positions where either answer has a non-finite part (only NxMlx's when Nx.BinaryBackend
  # raised).
  defp complex_result_mask(ctx) do
    bad = fn t ->
      t = Nx.backend_copy(t, Nx.BinaryBackend)
      Nx.logical_not(Nx.logical_and(finite(Nx.real(t)), finite(Nx.imag(t))))
    end

    case {ctx.mlx, ctx.bin} do
      {{:ok, [%Nx.Tensor{type: {:c, _}} = m]}, {:ok, [%Nx.Tensor{type: {:c, _}} = b]}}
      when m.shape == b.shape ->
        flat_mask(Nx.logical_or(bad.(m), bad.(b)), m.shape)

      {{:ok, [%Nx.Tensor{type: {:c, _}} = m]}, {:raised, _, _}} ->
        flat_mask(bad.(m), m.shape)

      _ ->
        nil
    end
  end

  defp flat_mask(t, shape) do
    t |> Nx.broadcast(shape) |> Nx.to_flat_list() |> Enum.map(&(&1 == 1))
  end

  defp float_input?({:"$t", {k, _}, _, _}) when k in [:f, :bf], do: true
  defp float_input?(_), do: false

  defp explain(:sign_nan, %{spec: %{op: :sign}, args: [a]} = ctx) do
    if float_input?(a), do: flat_mask(Nx.is_nan(input(ctx, 0)), result_shape(ctx))
  end

  # NaN positions are masked too (sign_nan), so that a tensor holding both is explained.
  defp explain(:sign_neg_infinity, %{spec: %{op: :sign}, args: [a]} = ctx) do
    if float_input?(a) do
      x = input(ctx, 0)
      flat_mask(Nx.logical_or(Nx.is_nan(x), Nx.equal(x, :neg_infinity)), result_shape(ctx))
    end
  end

  # Explained when NxMlx's result is Nx.BinaryBackend's pad of the input converted to the
  # output type first (its pad is right when the two types agree).
  defp explain(:pad_output_type, %{spec: %{op: :pad}, args: [a, value, config]} = ctx) do
    with {:ok, [m]} <- ctx.mlx,
         {:"$t", type, _, _} when type != m.type <- a,
         {:ok, expected} <-
           attempt(fn ->
             x = Nx.as_type(input(ctx, 0), m.type)
             Nx.pad(x, materialize(value, Nx.BinaryBackend), config)
           end),
         :ok <- compare_one(m, expected, ctx.spec, 1.0, nil) do
      :all
    else
      _ -> nil
    end
  end

  defp explain(:sign_complex, %{spec: %{op: :sign}, args: [{_, {:c, _}, _, _}]}), do: :all

  # A unary op of a complex tensor: its non-finite inputs, and the positions where either
  # answer is non-finite (std::complex's infinities and overflow against Nx's Complex);
  # any other op with a complex result: the latter only. Finite ones are compared.
  defp explain(:complex_nonfinite, ctx) do
    inputs =
      with %{spec: %{kind: :nx}, args: [{_, {:c, _}, _, _}]} <- ctx,
           {:ok, [%Nx.Tensor{shape: shape}]} <- ctx.mlx do
        x = input(ctx, 0)
        flat_mask(Nx.logical_not(Nx.logical_and(finite(Nx.real(x)), finite(Nx.imag(x)))), shape)
      else
        _ -> nil
      end

    case Enum.reject([inputs, complex_result_mask(ctx)], &is_nil/1) do
      [] -> nil
      masks -> join_masks(masks)
    end
  end

  # log, log1p and sqrt of a complex number on the negative real axis with a -0.0
  # imaginary part: MLX (C++'s std::complex, C99 Annex G) answers the lower side of the
  # branch cut (-pi i for log), Nx's Complex the upper one.
  defp explain(:complex_signed_zero, %{spec: %{op: op}, args: [{_, {:c, _}, _, _}]} = ctx)
       when op in [:log, :log1p, :sqrt] do
    with {:ok, [%Nx.Tensor{shape: shape}]} <- ctx.mlx do
      im = ctx |> input(0) |> Nx.imag() |> Nx.as_type(:f32) |> Nx.bitcast(:u32)
      mask = flat_mask(Nx.equal(im, Nx.tensor(0x80000000, type: :u32)), shape)
      if Enum.any?(mask), do: mask
    else
      _ -> nil
    end
  end

  defp explain(:int_div_zero, %{spec: %{op: op}, args: [_, b]} = ctx)
       when op in [:quotient, :remainder] do
    zero = Nx.equal(materialize(b, Nx.BinaryBackend), 0)

    cond do
      Nx.to_number(Nx.any(zero)) == 0 -> nil
      match?({:raised, %ArithmeticError{}, _}, ctx.bin) -> :all
      match?({:ok, _}, ctx.bin) -> flat_mask(zero, result_shape(ctx))
      true -> nil
    end
  end

  defp explain(:negative_shift, %{spec: %{op: op}, args: [_, b]} = ctx)
       when op in [:left_shift, :right_shift] do
    neg = Nx.less(materialize(b, Nx.BinaryBackend), 0)

    cond do
      Nx.to_number(Nx.any(neg)) == 0 -> nil
      match?({:raised, _, _}, ctx.bin) -> :all
      true -> flat_mask(neg, result_shape(ctx))
    end
  end

  defp explain(:oob_index, %{spec: %{op: op}, bin: {:raised, %ArgumentError{} = e, _}})
       when op in [:gather, :take, :take_along_axis, :indexed_add, :indexed_put] do
    if Exception.message(e) =~ ~r/out of bound|index/i, do: :all
  end

  defp explain(:fft_non_last_axis, %{spec: %{op: op}, args: [{_, _, shape, _}, opts]})
       when op in [:fft, :ifft] and tuple_size(shape) >= 3 do
    rank = tuple_size(shape)
    axis = Keyword.get(opts, :axis, rank - 1)
    if axis not in [rank - 1, -1], do: :all
  end

  defp explain(:indexed_put_duplicates_gpu, %{spec: %{op: :indexed_put}, device: :gpu}),
    do: :all

  defp explain(:reference_raised, %{bin: {:raised, e, stack}} = ctx) do
    cond do
      not inside_binary_backend?(stack) -> nil
      elementwise?(ctx) -> per_element_mask(ctx)
      match?(%ArgumentError{}, e) and not erlang_badarg?(e) -> nil
      true -> :all
    end
  end

  defp explain(:reference_inf_limit, %{spec: %{family: :unary, op: op}, args: [a]} = ctx)
       when op in [:tanh, :sigmoid, :erf, :erfc, :atan, :exp, :expm1] do
    with {:ok, [m]} <- ctx.mlx, {:ok, [_]} <- ctx.bin, true <- float_input?(a) do
      xs = Nx.to_flat_list(input(ctx, 0))
      ms = Nx.to_flat_list(m)

      Enum.zip_with(xs, ms, fn x, v ->
        x in [:infinity, :neg_infinity] and inf_limit(op, x) == v
      end)
    else
      _ -> nil
    end
  end

  defp explain(:atan2_neg_infinity, %{spec: %{op: :atan2}, args: [_, _]} = ctx) do
    with {:ok, [m]} <- ctx.mlx, {:ok, [b]} <- ctx.bin do
      y = ctx |> input(0) |> Nx.broadcast(m.shape) |> Nx.to_flat_list()
      x = ctx |> input(1) |> Nx.broadcast(m.shape) |> Nx.to_flat_list()
      ms = Nx.to_flat_list(m)
      bs = Nx.to_flat_list(b)

      [y, x, ms, bs]
      |> Enum.zip_with(fn [yv, xv, mv, bv] ->
        xv == :neg_infinity and is_number(yv) and (yv < 0 or mv < 0) and is_number(mv) and
          is_number(bv) and mv == -bv
      end)
    else
      _ -> nil
    end
  end

  defp explain(:complex_all_zero, %{spec: %{op: :all}, args: [{_, {:c, _}, _, _} | _]} = ctx) do
    zero = Nx.equal(input(ctx, 0), 0)
    if Nx.to_number(Nx.any(zero)) == 1, do: :all
  end

  defp explain(
         :int_input_rounded,
         %{spec: %{family: :unary, op: op}, args: [a], device: :gpu} = ctx
       )
       when op in [:sin, :cos, :tan] do
    with {_, {kind, _}, _, _} when kind in [:s, :u] <- a, {:ok, _} <- ctx.bin do
      x = input(ctx, 0)
      far = Nx.greater(Nx.abs(Nx.as_type(x, :f64)), 16_777_216)
      flat_mask(far, result_shape(ctx))
    else
      _ -> nil
    end
  end

  defp explain(:pow_nan_zero, %{spec: %{op: :pow}, args: [a, _]} = ctx) do
    with true <- float_input?(a), {:ok, [m]} <- ctx.mlx do
      x = ctx |> input(0) |> Nx.broadcast(m.shape) |> Nx.to_flat_list()
      y = ctx |> input(1) |> Nx.broadcast(m.shape) |> Nx.to_flat_list()

      Enum.zip_with([x, y, Nx.to_flat_list(m)], fn [xv, yv, mv] ->
        xv == :nan and yv == 0 and mv == 1.0
      end)
    else
      _ -> nil
    end
  end

  defp explain(_id, _ctx), do: nil

  defp inf_limit(:tanh, :infinity), do: 1.0
  defp inf_limit(:tanh, :neg_infinity), do: -1.0
  defp inf_limit(:sigmoid, :infinity), do: 1.0
  defp inf_limit(:sigmoid, :neg_infinity), do: 0.0
  defp inf_limit(:erf, :infinity), do: 1.0
  defp inf_limit(:erf, :neg_infinity), do: -1.0
  defp inf_limit(:erfc, :infinity), do: 0.0
  defp inf_limit(:erfc, :neg_infinity), do: 2.0
  defp inf_limit(:atan, :infinity), do: :math.pi() / 2
  defp inf_limit(:atan, :neg_infinity), do: -:math.pi() / 2
  defp inf_limit(:exp, :infinity), do: :infinity
  defp inf_limit(:exp, :neg_infinity), do: 0.0
  defp inf_limit(:expm1, :infinity), do: :infinity
  defp inf_limit(:expm1, :neg_infinity), do: -1.0

  defp inside_binary_backend?(stack) do
    Enum.any?(stack, fn {mod, _, _, _} ->
      String.starts_with?(Atom.to_string(mod), "Elixir.Nx.BinaryBackend")
    end)
  end

  defp erlang_badarg?(%ArgumentError{message: msg}),
    do: String.starts_with?(msg, "errors were found at the given arguments")

  ## Element-wise ops computed one element at a time on Nx.BinaryBackend (where the whole
  ## op raised there): positions it cannot compute are masked, the others compared.

  @elementwise_families [:unary, :binary, :bitwise, :compare, :pow]

  defp elementwise?(%{spec: %{family: f, call: {Nx, _, args}}, mlx: {:ok, [%Nx.Tensor{}]}})
       when f in @elementwise_families,
       do: Enum.all?(args, &(match?({:"$t", _, _, _}, &1) or is_number(&1)))

  defp elementwise?(_), do: false

  defp per_element(%{spec: %{call: {Nx, fun, args}}}, %Nx.Tensor{shape: shape}) do
    columns =
      Enum.map(args, fn
        n when is_number(n) ->
          {:number, n}

        {:"$t", type, _, _} = a ->
          {:tensor, type,
           a |> materialize(Nx.BinaryBackend) |> Nx.broadcast(shape) |> Nx.to_flat_list()}
      end)

    n = Enum.reduce(Tuple.to_list(shape), 1, &(&1 * &2))

    for i <- 0..(n - 1)//1 do
      scalars =
        Enum.map(columns, fn
          {:number, v} ->
            v

          {:tensor, type, list} ->
            Nx.tensor(Enum.at(list, i), type: type, backend: Nx.BinaryBackend)
        end)

      case attempt(fn -> apply(Nx, fun, scalars) |> Nx.to_number() end) do
        {:ok, v} -> {:ok, v}
        {:raised, _, _} -> :raised
      end
    end
  end

  defp per_element_mask(ctx) do
    {:ok, [m]} = ctx.mlx
    mask = Enum.map(per_element(ctx, m), &(&1 == :raised))
    mask
  end

  # The per-element reference as a tensor (masked positions hold NxMlx's own value).
  defp per_element_tensor(ctx, m) do
    values =
      Enum.zip_with(per_element(ctx, m), Nx.to_flat_list(m), fn
        {:ok, v}, _ -> v
        :raised, own -> own
      end)

    case values do
      [] -> m
      _ -> values |> Nx.tensor(type: m.type, backend: Nx.BinaryBackend) |> Nx.reshape(m.shape)
    end
  end

  defp finite(t), do: Nx.logical_not(Nx.logical_or(Nx.is_nan(t), Nx.is_infinity(t)))

  ## Kinds :backend and :native: they must return or raise

  defp run_direct(spec, device) do
    {mod, fun, args} = spec.call

    case attempt(fn -> apply(mod, fun, materialize(args, backend(device))) |> to_host() end) do
      {:ok, _} -> {:ok, "returned"}
      {:raised, e, _} -> {:expected_error, short(e)}
    end
  end

  defp run_native(spec, device) do
    {mod, fun, args} = spec.call
    args = materialize(args, backend(device))

    case attempt(fn -> apply(mod, fun, args) end) do
      {:raised, e, _} -> {:expected_error, short(e)}
      {:ok, {:error, reason}} -> {:expected_error, "{:error, #{inspect(reason, limit: 5)}}"}
      {:ok, reply} -> force(reply)
    end
  end

  # A value the NIF built is evaluated (and read back when it is an array), so that a
  # failure at evaluation time shows.
  defp force({:async, tag}) do
    receive do
      {^tag, {:error, reason}} -> {:expected_error, "{:error, #{inspect(reason, limit: 5)}}"}
      {^tag, {:ok, value}} -> force({:ok, value})
    end
  end

  defp force({:ok, ref}) when is_reference(ref) do
    case attempt(fn -> NxMlx.Runtime.call(:to_binary, [ref], fn -> "fuzz read-back" end) end) do
      {:ok, _} ->
        {:ok, "array"}

      {:raised, %ArgumentError{message: "argument error" <> _}, _} ->
        # Not an array (a command or a worker): wait for it when it is a command.
        case attempt(fn -> Native.wait(ref) end) do
          {:ok, {:async, _} = reply} -> force(reply)
          _ -> {:ok, "reference"}
        end

      {:raised, e, _} ->
        {:expected_error, "at evaluation: " <> short(e)}
    end
  end

  defp force(other), do: {:ok, inspect(other, limit: 5)}

  ## Kind :scenario: the runtime API and huge shapes

  @huge 46_341

  defp run_scenario(%{call: {name, params}}, device) do
    limit = NxMlx.memory().limit
    cache = NxMlx.set_cache_limit(0)
    NxMlx.set_cache_limit(cache)

    try do
      scenario(name, params, device)
    rescue
      e -> {:other_exception, short(e) <> where(__STACKTRACE__)}
    after
      NxMlx.set_memory_limit(limit)
      NxMlx.set_cache_limit(cache)
    end
  end

  defp huge(v, device) do
    Nx.broadcast(Nx.tensor(v, type: :u8, backend: backend(device)), {@huge, @huge})
  end

  defp check(value, expected, what) do
    if value == expected,
      do: {:ok, what},
      else: {:disagreement, "#{what}: got #{inspect(value)}, expected #{inspect(expected)}"}
  end

  # :ok when `fun` raised or returned {:error, _}; the value otherwise.
  defp rejected?(fun) do
    case attempt(fun) do
      {:raised, _, _} -> true
      {:ok, {:error, _}} -> true
      {:ok, _} -> false
    end
  end

  defp refused_or(fun, otherwise) do
    case attempt(fun) do
      {:raised, %ArgumentError{} = e, _} -> {:expected_error, short(e)}
      {:raised, e, _} -> {:other_exception, short(e)}
      {:ok, value} -> otherwise.(value)
    end
  end

  @doc false
  def scenario(:broadcast_sum_u8, %{value: v}, device) do
    refused_or(fn -> huge(v, device) |> Nx.sum() |> Nx.to_number() end, fn got ->
      check(got, v * @huge * @huge, "sum of broadcast #{@huge}x#{@huge} u8 of #{v}")
    end)
  end

  def scenario(:broadcast_max, %{value: v}, device) do
    refused_or(fn -> huge(v, device) |> Nx.reduce_max() |> Nx.to_number() end, fn got ->
      check(got, v, "reduce_max of broadcast #{@huge}x#{@huge} u8 of #{v}")
    end)
  end

  def scenario(:broadcast_all, %{value: v}, device) do
    refused_or(fn -> huge(v, device) |> Nx.any() |> Nx.to_number() end, fn got ->
      check(got, 1, "any of broadcast #{@huge}x#{@huge} u8 of #{v}")
    end)
  end

  def scenario(:broadcast_slice, %{value: v}, device) do
    refused_or(
      fn -> huge(v, device) |> Nx.slice([@huge - 1, 46_000], [1, 3]) |> Nx.to_flat_list() end,
      fn got -> check(got, [v, v, v], "slice of broadcast #{@huge}x#{@huge}") end
    )
  end

  def scenario(:iota_huge, _params, device) do
    refused_or(
      fn -> Nx.iota({1 <<< 40}, type: :u8, backend: backend(device)) |> Nx.to_binary() end,
      fn _ -> {:disagreement, "an iota of 2^40 bytes was built (the memory limit is lower)"} end
    )
  end

  def scenario(:queue_new_junk, %{junk: junk}, device) do
    cond do
      not rejected?(fn -> CommandQueue.new(junk) end) ->
        {:disagreement, "CommandQueue.new(#{inspect(junk)}) was accepted"}

      not match?({:ok, %CommandQueue{}}, CommandQueue.new(device)) ->
        {:disagreement, "CommandQueue.new(#{inspect(device)}) failed after a bad call"}

      true ->
        {:expected_error, "new(#{inspect(junk)}) rejected"}
    end
  end

  def scenario(:with_queue_compute, %{n: n}, device) do
    q = CommandQueue.new!(device)

    {list, wid} =
      CommandQueue.with_queue(q, fn ->
        t = Nx.iota({n}, type: :s32, backend: backend(device)) |> Nx.multiply(3) |> Nx.add(1)
        {Nx.to_flat_list(t), Native.array_info(t.data.ref).worker_id}
      end)

    cond do
      list != Enum.map(0..(n - 1), &(&1 * 3 + 1)) -> {:disagreement, "wrong values in queue"}
      wid != CommandQueue.id(q) -> {:disagreement, "ran on worker #{wid}, not the bound queue"}
      true -> {:ok, "with_queue"}
    end
  end

  def scenario(:with_queue_junk, %{junk: junk}, _device) do
    q = CommandQueue.default(:cpu)

    if rejected?(fn -> CommandQueue.with_queue(junk, fn -> 1 end) end) and
         rejected?(fn -> CommandQueue.with_queue(q, junk) end) and CommandQueue.current() == nil,
       do: {:expected_error, "with_queue(junk) rejected"},
       else: {:disagreement, "with_queue accepted #{inspect(junk)} or left a binding"}
  end

  def scenario(:synchronize_junk, %{junk: junk}, device) do
    forged = %CommandQueue{device: :cpu, ref: make_ref()}

    cond do
      not rejected?(fn -> CommandQueue.synchronize(forged) end) ->
        {:disagreement, "synchronize of a forged queue returned"}

      not rejected?(fn -> CommandQueue.synchronize(junk) end) ->
        {:disagreement, "synchronize(#{inspect(junk)}) returned"}

      CommandQueue.synchronize(CommandQueue.default(device)) != :ok ->
        {:disagreement, "synchronize of the default queue failed"}

      true ->
        {:expected_error, "synchronize(junk) rejected"}
    end
  end

  def scenario(:submit_wait, %{n: n}, device) do
    a = Nx.iota({n}, type: :f32, backend: backend(device)) |> Nx.multiply(0.5)
    b = Nx.sum(a)
    {:ok, command} = NxMlx.submit({a, %{b: b}})
    :ok = NxMlx.wait(command)
    {:ok, status} = NxMlx.poll(command)
    expected = Enum.sum(Enum.map(0..(n - 1), &(&1 * 0.5)))

    cond do
      status != :completed -> {:disagreement, "poll after wait: #{status}"}
      Nx.to_number(b) != expected -> {:disagreement, "sum #{Nx.to_number(b)} vs #{expected}"}
      true -> {:ok, "submit/wait"}
    end
  end

  def scenario(:submit_junk, %{junk: junk}, _device) do
    case attempt(fn -> NxMlx.submit(junk) end) do
      {:ok, {:ok, command}} ->
        check(NxMlx.wait(command), :ok, "submit(#{inspect(junk)}) then wait")

      _ ->
        {:expected_error, "submit(#{inspect(junk)}) rejected"}
    end
  end

  def scenario(:forged_command, _params, _device) do
    forged = %NxMlx.Command{ref: make_ref(), outputs: nil}

    if rejected?(fn -> NxMlx.poll(forged) end) and rejected?(fn -> NxMlx.wait(forged) end),
      do: {:expected_error, "forged command rejected"},
      else: {:disagreement, "poll/wait accepted a forged command"}
  end

  def scenario(:pipeline_run, %{n: n}, device) do
    pipeline = Pipeline.new([&Nx.exp/1, &Nx.sum/1, &Nx.negate/1])
    x = Nx.iota({n}, type: :f32, backend: backend(device)) |> Nx.divide(n)
    {:ok, [e, s, neg]} = Pipeline.run(pipeline, x)
    xb = Nx.backend_copy(x, Nx.BinaryBackend)
    expected = xb |> Nx.exp() |> Nx.sum() |> Nx.to_number()

    cond do
      Nx.to_number(Nx.all_close(Nx.backend_copy(e, Nx.BinaryBackend), Nx.exp(xb))) != 1 ->
        {:disagreement, "pipeline stage 1 differs"}

      abs(Nx.to_number(s) - expected) > 1.0e-4 * abs(expected) ->
        {:disagreement, "pipeline sum #{Nx.to_number(s)} vs #{expected}"}

      Nx.to_number(neg) != -Nx.to_number(s) ->
        {:disagreement, "pipeline stage 3 differs"}

      true ->
        {:ok, "pipeline"}
    end
  end

  def scenario(:pipeline_junk, %{junk: junk}, device) do
    x = Nx.tensor([1.0], backend: backend(device))

    if rejected?(fn -> Pipeline.new([junk]) end) and
         rejected?(fn -> Pipeline.run(Pipeline.new([&Nx.exp/1]), x, async: true, junk: 1) end) and
         rejected?(fn -> Pipeline.stage(Pipeline.new(), junk) end),
       do: {:expected_error, "pipeline junk rejected"},
       else: {:disagreement, "a pipeline accepted #{inspect(junk)}"}
  end

  def scenario(:memory_limit_junk, %{junk: junk}, _device) do
    if rejected?(fn -> NxMlx.set_memory_limit(junk) end),
      do: {:expected_error, "set_memory_limit(#{inspect(junk)}) rejected"},
      else: {:ok, "set_memory_limit(#{inspect(junk)}) accepted"}
  end

  def scenario(:memory_limit_small, %{n: n}, device) do
    NxMlx.set_memory_limit(1_000)
    big = fn -> Nx.iota({10_000 + n}, type: :f32, backend: backend(device)) |> Nx.add(1.0) end

    case attempt(fn -> big.() |> Nx.to_binary() end) do
      {:raised, %ArgumentError{} = e, _} ->
        if Exception.message(e) =~ "memory limit",
          do: {:expected_error, short(e)},
          else: {:other_exception, short(e)}

      {:raised, e, _} ->
        {:other_exception, short(e)}

      {:ok, _} ->
        {:disagreement, "an array above the 1,000-byte memory limit was built"}
    end
  end

  def scenario(:cache_limit_junk, %{junk: junk}, _device) do
    if rejected?(fn -> NxMlx.set_cache_limit(junk) end),
      do: {:expected_error, "set_cache_limit(#{inspect(junk)}) rejected"},
      else: {:ok, "set_cache_limit(#{inspect(junk)}) accepted"}
  end

  def scenario(:memory_and_clear, %{n: n}, device) do
    t = Nx.iota({n * 1000}, type: :f32, backend: backend(device)) |> Nx.add(1.0)
    Nx.to_binary(t)
    m = NxMlx.memory()

    cond do
      not match?(%{active: _, peak: _, cache: _, limit: _}, m) -> {:disagreement, inspect(m)}
      NxMlx.clear_cache() != :ok -> {:disagreement, "clear_cache did not return :ok"}
      NxMlx.memory().cache != 0 -> {:disagreement, "cache not empty after clear_cache"}
      true -> {:ok, "memory"}
    end
  end
end
