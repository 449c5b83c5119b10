defmodule NxMlx.Pipeline do
  @moduledoc """
  An ordered list of stages run as one submission with one synchronisation point.

  Each stage is a one-argument function over tensors (or containers of tensors), `defn`
  functions included; the first stage receives the pipeline's input, every later stage the
  previous stage's output. Running a pipeline calls the stages in order, which only builds
  MLX's lazy graph (ops on `NxMlx.Backend` are lazy), then evaluates every stage's outputs in
  one `NxMlx.submit/1` and waits once.

      pipeline =
        NxMlx.Pipeline.new()
        |> NxMlx.Pipeline.stage(&Nx.multiply(&1, 2))
        |> NxMlx.Pipeline.stage(&MyModel.predict/1)

      {:ok, [doubled, predicted]} = NxMlx.Pipeline.run(pipeline, input)
      {:ok, command} = NxMlx.Pipeline.run(pipeline, input, async: true)
      {:ok, outputs, {encode_ns, execute_ns}} = NxMlx.Pipeline.run_with_timing(pipeline, input)

  Timing: `encode_ns` is the time spent calling the stages (building the graph: MLX's
  equivalent of encoding commands), `execute_ns` the time from submission until the caller
  saw completion.

  A stage that uses an op without an MLX implementation (see `NxMlx.Backend`, "Fallbacks")
  still works, but reads its inputs back in the middle of the pipeline.
  """

  alias NxMlx.Command

  defstruct stages: []

  @type stage :: (term() -> term())
  @type t :: %__MODULE__{stages: [stage]}

  @doc "A pipeline of `stages` (one-argument functions)."
  @spec new([stage]) :: t
  def new(stages \\ []) do
    Enum.each(stages, &check_stage!/1)
    %__MODULE__{stages: stages}
  end

  @doc "Appends a stage."
  @spec stage(t, stage) :: t
  def stage(%__MODULE__{stages: stages} = pipeline, fun) do
    check_stage!(fun)
    %{pipeline | stages: stages ++ [fun]}
  end

  defp check_stage!(fun) when is_function(fun, 1), do: :ok

  defp check_stage!(other) do
    raise ArgumentError,
          "NxMlx.Pipeline: a stage must be a one-argument function, got: #{inspect(other)}"
  end

  @doc """
  Runs the stages on `input` and returns every stage's output, in order:
  `{:ok, outputs}`, or `{:error, message}` when MLX failed to evaluate them.

  With `async: true`, returns `{:ok, command}` as soon as the graph is submitted;
  `command.outputs` holds the stage outputs, readable after `NxMlx.wait/1`.
  """
  @spec run(t, term(), keyword()) :: {:ok, [term()]} | {:ok, Command.t()} | {:error, String.t()}
  def run(%__MODULE__{} = pipeline, input, opts \\ []) do
    opts = Keyword.validate!(opts, async: false)
    outputs = encode(pipeline, input)

    with {:ok, command} <- NxMlx.submit(outputs) do
      if opts[:async] do
        {:ok, command}
      else
        with :ok <- NxMlx.wait(command), do: {:ok, outputs}
      end
    end
  end

  @doc """
  Like `run/3` (synchronous), also returning `{encode_ns, execute_ns}`.
  """
  @spec run_with_timing(t, term()) ::
          {:ok, [term()], {non_neg_integer(), non_neg_integer()}} | {:error, String.t()}
  def run_with_timing(%__MODULE__{} = pipeline, input) do
    t0 = System.monotonic_time()
    outputs = encode(pipeline, input)
    t1 = System.monotonic_time()

    result =
      with {:ok, command} <- NxMlx.submit(outputs),
           :ok <- NxMlx.wait(command),
           do: :ok

    t2 = System.monotonic_time()

    case result do
      :ok -> {:ok, outputs, {to_ns(t1 - t0), to_ns(t2 - t1)}}
      error -> error
    end
  end

  defp to_ns(native), do: System.convert_time_unit(native, :native, :nanosecond)

  defp encode(%__MODULE__{stages: stages}, input) do
    {outputs, _} =
      Enum.map_reduce(stages, input, fn stage, acc ->
        out = stage.(acc)
        {out, out}
      end)

    outputs
  end
end
