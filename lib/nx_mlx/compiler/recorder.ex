defmodule NxMlx.Compiler.Recorder do
  @moduledoc false
  # The second builder of the op table. `NxMlx.Backend`'s concern modules
  # (lib/nx_mlx/backend/) write each op's Nx semantics once, as calls of NIF ops on MLX
  # arrays (`NxMlx.Runtime.call/3`). Eagerly those calls build
  # arrays; while the compiler lowers an expression, this recorder is active in the calling
  # process and a call whose operands include a register (`{:reg, n}`, a value the program
  # computes) is appended to the program instead, returning fresh registers. Calls on arrays
  # only (constants, folded at lowering time) still run eagerly, and their arrays become the
  # program's captured constants. A fallback to Nx.BinaryBackend at the top level becomes a
  # host step (`fallback/4`); anything else that would need a value on the host (a
  # read-back, a fallback inside a loop or branch) raises `NotLowerable`, naming the op.

  defmodule NotLowerable do
    @moduledoc false
    defexception [:op, :message]
  end

  alias Nx.Defn.Composite

  @key :nx_mlx_recorder
  @ops Map.new(NxMlx.Native.ops(), fn {name, _} -> {name, true} end)

  def active?, do: Process.get(@key) != nil

  @doc """
  Starts recording a program whose first `n_inputs` registers are its inputs. `policy` is
  the compiler's `:on_unsupported` (`:evaluate` lets a callback that falls back to
  Nx.BinaryBackend run on the host between native parts, see `fallback/4`).
  """
  def start(n_inputs, policy \\ :evaluate) do
    Process.put(@key, %{
      policy: policy,
      next: n_inputs,
      blocks: [[]],
      consts: %{},
      const_code: [],
      force: false,
      hooks: []
    })

    :ok
  end

  @doc "Stops recording: `{constant_code, code, n_regs, hooks}`, code and hooks in order."
  def stop do
    %{blocks: [code], const_code: consts, next: n, hooks: hooks} = Process.delete(@key)
    {Enum.reverse(consts), Enum.reverse(code), n, Enum.reverse(hooks)}
  end

  @doc "Whether recording is inside a loop or branch."
  def nested?, do: match?(%{blocks: [_, _ | _]}, Process.get(@key))

  @doc """
  Records a call to the host on `regs` (top level only), returning `n` registers for its
  results; `host` is what the caller needs to run it.
  """
  def host(regs, n, host) do
    %{hooks: hooks} = state = Process.get(@key)
    id = length(hooks)
    Process.put(@key, %{state | hooks: [host | hooks]})
    outs = Enum.map(1..n//1, fn _ -> new_reg() end)
    emit({:host, id, regs, outs})
    outs
  end

  @doc "Records a hook instruction on `regs`; `hook` is what the caller needs to run it."
  def hook(regs, hook) do
    %{hooks: hooks} = state = Process.get(@key)
    id = length(hooks)
    Process.put(@key, %{state | hooks: [hook | hooks]})
    emit({:hook, id, regs})
  end

  def abort, do: Process.delete(@key)

  def new_reg do
    %{next: n} = state = Process.get(@key)
    Process.put(@key, %{state | next: n + 1})
    n
  end

  def push_block do
    state = Process.get(@key)
    Process.put(@key, %{state | blocks: [[] | state.blocks]})
    :ok
  end

  def pop_block do
    %{blocks: [code | rest]} = state = Process.get(@key)
    Process.put(@key, %{state | blocks: rest})
    Enum.reverse(code)
  end

  def emit(instr) do
    %{blocks: [code | rest]} = state = Process.get(@key)
    Process.put(@key, %{state | blocks: [[instr | code] | rest]})
    :ok
  end

  @doc "Runs `fun` with every op recorded, even on constants (creation ops: see the compiler)."
  def forced(fun) do
    state = Process.get(@key)
    Process.put(@key, %{state | force: true})

    try do
      fun.()
    after
      Process.put(@key, %{Process.get(@key) | force: false})
    end
  end

  @doc """
  The register holding `ref`: `ref` itself when it is one, else the register of the
  captured constant array (one per array).
  """
  def reg_of({:reg, r}), do: r

  def reg_of(ref) when is_reference(ref) do
    %{consts: consts} = state = Process.get(@key)

    case consts do
      %{^ref => r} ->
        r

      %{} ->
        r = state.next

        Process.put(@key, %{
          state
          | next: r + 1,
            consts: Map.put(consts, ref, r),
            const_code: [{:const, r, ref} | state.const_code]
        })

        r
    end
  end

  @doc """
  Called by `NxMlx.Runtime.call/3` while recording: `{:recorded, value}` when the call was
  appended to the program, `:eager` when it should run now.
  """
  def call(fun, args, describe) when is_map_key(@ops, fun) do
    [_worker | args] = args

    if Process.get(@key).force or has_reg?(args) do
      {:recorded, record(fun, args, describe)}
    else
      :eager
    end
  end

  def call(fun, args, describe) do
    if has_reg?(args) do
      raise NotLowerable,
        op: fun,
        message: "#{describe.()}: it needs a value on the host (#{fun})"
    end

    :eager
  end

  @doc """
  Called by NxMlx.Fallback while recording `op` (a callback with no MLX implementation for
  these operands, run on Nx.BinaryBackend): `:eager` when it reads constants only (it runs
  now, folded), else `{:recorded, value}`: at the top level of the function, and unless the
  policy is `:raise`, the call becomes a host step `{:fallback, op, out, args}` between two
  native parts (its operands are copied out, the callback runs on Nx.BinaryBackend, its
  results are copied back); inside a loop or branch, or under `:raise`, the function cannot
  be lowered (`NotLowerable`).
  """
  def fallback(op, out, args, device) do
    in_regs = for {:reg, r} <- List.flatten(Enum.map(args, &tensors/1)), do: r

    cond do
      in_regs == [] ->
        :eager

      nested?() or Process.get(@key).policy == :raise ->
        raise NotLowerable, op: op, message: fallback_message(op)

      true ->
        outs = host(in_regs, length(Composite.flatten_list([out])), {:fallback, op, out, args})

        {value, []} =
          Composite.traverse(out, outs, fn t, [r | rest] ->
            {%{t | data: %NxMlx.Backend{ref: {:reg, r}, device: device}}, rest}
          end)

        {:recorded, value}
    end
  end

  @doc "Why `op` cannot run natively: it runs on Nx.BinaryBackend."
  def fallback_message(op),
    do: "NxMlx.Backend.#{op} runs on Nx.BinaryBackend (no MLX implementation here)"

  @doc """
  The operands of a recorded host fallback with its registers' values put in: `args` with
  each register tensor, in order, given the next of `arrays`.
  """
  def fill_registers(args, arrays, device) do
    {args, []} = fill(args, arrays, device)
    args
  end

  defp fill(%Nx.Tensor{data: %NxMlx.Backend{ref: {:reg, _}} = data} = t, [a | rest], device),
    do: {%{t | data: %{data | ref: a, device: device}}, rest}

  defp fill(list, arrays, device) when is_list(list),
    do: Enum.map_reduce(list, arrays, &fill(&1, &2, device))

  defp fill(tuple, arrays, device) when is_tuple(tuple) do
    {list, rest} = fill(Tuple.to_list(tuple), arrays, device)
    {List.to_tuple(list), rest}
  end

  defp fill(other, arrays, _device), do: {other, arrays}

  @doc "The arrays of a host fallback's result, in the order of its registers."
  def result_arrays(result) do
    for %Nx.Tensor{data: %NxMlx.Backend{ref: ref}} <- Composite.flatten_list([result]), do: ref
  end

  defp tensors(%Nx.Tensor{data: %NxMlx.Backend{ref: ref}}), do: [ref]
  defp tensors(list) when is_list(list), do: Enum.map(list, &tensors/1)
  defp tensors(tuple) when is_tuple(tuple), do: tuple |> Tuple.to_list() |> Enum.map(&tensors/1)
  defp tensors(_), do: []

  defp record(fun, args, describe) do
    args = Enum.map(args, &operand/1)
    n = outputs(fun, args)
    outs = Enum.map(1..n, fn _ -> new_reg() end)
    emit({:op, outs, fun, args, describe.()})

    case outs do
      [r] -> {:reg, r}
      many -> Enum.map(many, &{:reg, &1})
    end
  end

  # Operands are tagged ({:r, n}) until the program is encoded (NxMlx.Compiler numbers
  # each segment's registers then).
  defp operand({:reg, r}), do: {:r, r}
  defp operand(ref) when is_reference(ref), do: {:r, reg_of(ref)}
  defp operand(list) when is_list(list), do: Enum.map(list, &operand/1)
  defp operand(other), do: other

  defp outputs(:decompose, [kind | _]) when kind in [:qr, :eigh], do: 2
  defp outputs(:decompose, [kind | _]) when kind in [:svd, :lu], do: 3
  defp outputs(_fun, _args), do: 1

  defp has_reg?([{:reg, _} | _]), do: true
  defp has_reg?([list | rest]) when is_list(list), do: has_reg?(list) or has_reg?(rest)
  defp has_reg?([_ | rest]), do: has_reg?(rest)
  defp has_reg?([]), do: false
end
