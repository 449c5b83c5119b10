defmodule NxMlx.Quantized do
  @moduledoc """
  Quantized weights: tensors whose values are stored in 2 to 8 bits per element, with a scale
  (and, in affine mode, a bias) per group of consecutive values along one axis, and that
  `Nx.dot/4` (and so Axon's dense layers) multiplies with MLX's fused `quantized_matmul`,
  eagerly and inside `defn` (`compiler: NxMlx` and `Nx.Defn.Evaluator` alike). The weights
  are never dequantized on that path.

      w = Nx.iota({256, 128}, type: :f32, backend: NxMlx.Backend) |> Nx.divide(1000)
      q = NxMlx.Quantized.quantize(w, bits: 4, group_size: 64)
      x = Nx.iota({2, 256}, type: :f32, backend: NxMlx.Backend) |> Nx.divide(100)
      Nx.dot(x, q)           # x · w through quantized_matmul
      NxMlx.Quantized.dequantize(q)

  A quantized tensor is an ordinary `Nx.Tensor` of `NxMlx.Backend` with the shape and type of
  the weight it stands for; only its data differs (`quantized?/1` tells). It is quantized
  along `:axis` (default `-2`: the contracted axis of a dense kernel `{in, out}`, or of a
  stack of experts `{experts, in, out}`). `Nx.dot` takes the fused path when the quantized
  operand has rank 2 and is contracted along that axis alone, with no batch axes; every other
  op (and such a dot in any other form) reads the dequantized values, so results stay right
  everywhere and fast where it matters.

  ## Modes

  | `:mode` | `:bits` | `:group_size` | stored per group |
  |---|---|---|---|
  | `:affine` (default) | 2, 3, 4 (default), 5, 6, 8 | 32, 64 (default), 128 | a scale and a bias in the weight's type |
  | `:mxfp4` | 4 | 32 | an 8-bit power-of-two scale (OCP microscaling, e2m1 values) |
  | `:mxfp8` | 8 | 32 | an 8-bit power-of-two scale (e4m3 values) |
  | `:nvfp4` | 4 | 16 | an e4m3 scale (e2m1 values) |

  Weights are f32, f16 or bf16. Affine values are `scale * q + bias` with `q` unsigned;
  the quantized matmul equals the dot with `dequantize/1` to the type's rounding (see the
  tests for the tolerances). A mode the device's MLX build cannot run raises
  `ArgumentError` naming the op.

  ## Where it runs

  On the GPU, MLX's quantized kernels. On the CPU device MLX's quantized matmul is a scalar
  loop (1 x 2048 times a 4-bit 2048 x 2048 weight: 5.9 ms with f32 activations, 55 ms with
  bf16, against 0.77 ms for the f32 matrix-vector product, 2 vCPUs), so affine 2-, 4- and
  8-bit weights with group sizes 32, 64 and 128 run in our own vectorised, threaded kernel
  in f32 (1.0-1.6 ms there; 1 x 4096 times 4096 x 4096: 1.9-2.8 ms against 3.2-4.3 ms for f32
  weights) up to 8 rows of activations, and as the dequantized weight times a BLAS matmul
  past that; other CPU layouts (3, 5, 6 bits and the float modes) run MLX's loop.

  ## More

    * `quantize_params/2` quantizes the dense kernels of a parameter map (or an
      `Axon.ModelState`) in one call, by size and name.
    * `from_ggml/4` loads GGML's Q4_0 and Q8_0 blocks as affine weights with group size 32
      without dequantizing: both formats map onto MLX's layout exactly.
    * `expert_dot/3` is a mixture-of-experts matmul (each row multiplied by the expert its
      index picks) over quantized experts, through MLX's `gather_qmm`.
  """

  alias Nx.Tensor, as: T

  @enforce_keys [:mode, :bits, :group_size, :axis, :packed, :scales]
  defstruct [:mode, :bits, :group_size, :axis, :packed, :scales, :biases]

  @typedoc """
  The quantized data of a tensor (the `:quant` field of its `NxMlx.Backend` data):
  `packed` (u32), `scales` and, in affine mode, `biases` hold the weight with `axis` moved
  last, grouped along it.
  """
  @type t :: %__MODULE__{
          mode: :affine | :mxfp4 | :mxfp8 | :nvfp4,
          bits: pos_integer(),
          group_size: pos_integer(),
          axis: non_neg_integer(),
          packed: Nx.Tensor.t(),
          scales: Nx.Tensor.t(),
          biases: Nx.Tensor.t() | nil
        }

  defmodule ExpertDot do
    @moduledoc false
    defstruct []
  end

  @doc """
  Quantizes a float tensor of rank 2 or more along `:axis`.

  Options: `:mode` (`:affine`), `:bits` (4 in affine mode, else the mode's), `:group_size`
  (64 in affine mode, else the mode's), `:axis` (`-2`). The axis's size must be a multiple
  of the group size.

      iex> w = Nx.iota({64, 4}, type: :f32, backend: NxMlx.Backend) |> Nx.divide(64)
      iex> q = NxMlx.Quantized.quantize(w, bits: 8, group_size: 32)
      iex> NxMlx.Quantized.quantized?(q)
      true
      iex> {q.shape, q.type}
      {{64, 4}, {:f, 32}}
      iex> Nx.all_close(NxMlx.Quantized.dequantize(q), w, atol: 1.0e-2) |> Nx.to_number()
      1
  """
  @spec quantize(Nx.Tensor.t(), keyword()) :: Nx.Tensor.t()
  def quantize(%T{} = tensor, opts \\ []) do
    opts = Keyword.validate!(opts, [:mode, :bits, :group_size, axis: -2])
    {mode, bits, group_size} = layout!(opts)
    NxMlx.Backend.Quantized.quantize(tensor, mode, bits, group_size, opts[:axis])
  end

  @doc "Whether `tensor` holds quantized data."
  @spec quantized?(Nx.Tensor.t()) :: boolean()
  def quantized?(%T{data: %NxMlx.Backend{quant: %__MODULE__{}}}), do: true
  def quantized?(%T{}), do: false

  @doc """
  The layout of a quantized tensor: `%{mode:, bits:, group_size:, axis:, bytes:}` (`bytes`:
  what its data takes, scales and biases included).
  """
  @spec layout(Nx.Tensor.t()) :: map()
  def layout(%T{data: %NxMlx.Backend{quant: %__MODULE__{} = q}}) do
    bytes =
      [q.packed, q.scales, q.biases]
      |> Enum.reject(&is_nil/1)
      |> Enum.map(&Nx.byte_size/1)
      |> Enum.sum()

    %{mode: q.mode, bits: q.bits, group_size: q.group_size, axis: q.axis, bytes: bytes}
  end

  def layout(%T{} = t) do
    raise ArgumentError,
          "NxMlx.Quantized.layout: the #{inspect(t.type)} tensor of shape #{inspect(t.shape)} " <>
            "is not quantized"
  end

  @doc """
  The values of a quantized tensor, as an ordinary tensor of its type (a tensor that is not
  quantized is returned as it is).
  """
  @spec dequantize(Nx.Tensor.t()) :: Nx.Tensor.t()
  def dequantize(%T{data: %NxMlx.Backend{quant: %__MODULE__{}}} = t),
    do: NxMlx.Backend.Quantized.dequantize(t)

  def dequantize(%T{} = t), do: t

  @doc """
  Quantizes the dense kernels of a parameter map: a map of layer names to maps of parameter
  names to tensors (Axon's and Bumblebee's), nested maps too, or an `Axon.ModelState`.

  A tensor is quantized when its name (the last key) is in `:names` (`["kernel"]`), it is a
  float tensor of rank 2 whose `:axis` is a multiple of the group size, it has at least
  `:min_size` elements (4096), and its layer's path (the keys joined by `"."`, e.g.
  `"encoder.blocks.0.ffn.intermediate"`) matches `:only` (when given) and not `:except`:
  lists of strings (a prefix of the path) or regexes. The other options are `quantize/2`'s.
  """
  @spec quantize_params(map(), keyword()) :: map()
  def quantize_params(params, opts \\ []) do
    opts =
      Keyword.validate!(opts, [
        :mode,
        :bits,
        :group_size,
        :only,
        axis: -2,
        names: ["kernel"],
        min_size: 4096,
        except: []
      ])

    {mode, bits, group_size} = layout!(opts)
    q_opts = [mode: mode, bits: bits, group_size: group_size, axis: opts[:axis]]

    case params do
      %{__struct__: Axon.ModelState, data: data} = state ->
        %{state | data: walk(data, [], opts, q_opts)}

      %{} ->
        walk(params, [], opts, q_opts)
    end
  end

  defp walk(%T{} = t, [name | path], opts, q_opts) do
    if quantizable?(t, name, Enum.reverse(path), opts, q_opts[:group_size]),
      do: quantize(t, q_opts),
      else: t
  end

  defp walk(%{__struct__: _} = other, _path, _opts, _q_opts), do: other

  defp walk(%{} = map, path, opts, q_opts),
    do: Map.new(map, fn {k, v} -> {k, walk(v, [to_string(k) | path], opts, q_opts)} end)

  defp walk(other, _path, _opts, _q_opts), do: other

  defp quantizable?(%T{type: {kind, bits}, shape: shape} = t, name, path, opts, group_size) do
    layer = Enum.join(path, ".")

    tuple_size(shape) == 2 and kind in [:f, :bf] and bits <= 32 and name in opts[:names] and
      not quantized?(t) and Nx.size(t) >= opts[:min_size] and
      rem(elem(shape, normalize_axis(opts[:axis], 2)), group_size) == 0 and
      (opts[:only] == nil or matches?(layer, opts[:only])) and not matches?(layer, opts[:except])
  end

  defp normalize_axis(axis, rank) when axis < 0, do: axis + rank
  defp normalize_axis(axis, _rank), do: axis

  defp matches?(layer, patterns) do
    Enum.any?(List.wrap(patterns), fn
      %Regex{} = r ->
        Regex.match?(r, layer)

      prefix when is_binary(prefix) ->
        layer == prefix or String.starts_with?(layer, prefix <> ".")
    end)
  end

  @doc """
  Loads a matrix stored in one of GGML's block formats as an affine quantized tensor with
  group size 32, without dequantizing: `:q4_0` (per 32 values, an f16 scale `d` and 4-bit
  `q`, value `d * (q - 8)`) maps to 4 bits with scale `d` and bias `-8d`; `:q8_0` (an f16 `d`
  and signed 8-bit `q`) maps to 8 bits with scale `d` and bias `-128d`, `q + 128` stored.

  `data` holds `rows * k / 32` blocks, each row of `k` values contiguous (GGML's `ne[0]` is
  `k`: a linear layer's weight `{out, in}` has `k = in`). The result has shape `{rows, k}`
  quantized along its last axis (`Nx.dot(x, [1], w, [1])` is the fused `x · wᵀ`), or, with
  `axis: 0`, shape `{k, rows}` (a dense kernel `{in, out}`, for `Nx.dot(x, w)`).

  Options: `:axis` (`-1` or `0`), `:type` (the weight's type: `:f16`, the scales' own, by
  default; `:f32` is exact too, `:bf16` rounds the scales), `:device`. The values equal GGML's
  exactly in f16 unless `8d` (Q4_0) or `128d` (Q8_0) overflows f16; use `type: :f32` then.
  """
  @spec from_ggml(binary(), :q4_0 | :q8_0, {pos_integer(), pos_integer()}, keyword()) ::
          Nx.Tensor.t()
  def from_ggml(data, format, shape, opts \\ [])

  def from_ggml(data, format, {rows, k} = shape, opts)
      when is_binary(data) and format in [:q4_0, :q8_0] and is_integer(rows) and rows > 0 and
             is_integer(k) and k > 0 do
    opts = Keyword.validate!(opts, [:device, axis: -1, type: :f16])
    NxMlx.Backend.Quantized.from_ggml(data, format, shape, opts)
  end

  def from_ggml(data, format, shape, _opts) do
    raise ArgumentError,
          "NxMlx.Quantized.from_ggml: expects a binary, :q4_0 or :q8_0 and a shape {rows, k}, " <>
            "got #{inspect(byte_size_or(data))} bytes, #{inspect(format)} and #{inspect(shape)}"
  end

  defp byte_size_or(data) when is_binary(data), do: byte_size(data)
  defp byte_size_or(other), do: other

  @doc """
  A mixture-of-experts matmul: row `i` of `x` (`{..., k}`) times the expert
  `experts[indices[i]]` (`experts`: `{e, k, n}`), giving `{..., n}`. `indices` has `x`'s
  shape without its last axis; out-of-range indices are clamped into `0..e-1`.

  On `NxMlx.Backend` with quantized experts (`quantize/2` with the default axis) it runs as
  one MLX `gather_qmm`; otherwise, and on other backends, as its default function (a take of
  the experts, then a batched dot). An `Nx.block/4`, so usable inside `defn`.
  """
  @spec expert_dot(Nx.Tensor.t(), Nx.Tensor.t(), Nx.Tensor.t()) :: Nx.Tensor.t()
  def expert_dot(x, experts, indices) do
    {x, experts, indices} = {Nx.to_tensor(x), Nx.to_tensor(experts), Nx.to_tensor(indices)}

    with {e, k, n} <- experts.shape,
         true <- tuple_size(x.shape) >= 1,
         ^k <- elem(x.shape, tuple_size(x.shape) - 1),
         true <- indices.shape == Tuple.delete_at(x.shape, tuple_size(x.shape) - 1),
         {kind, _} when kind in [:s, :u] <- indices.type,
         true <- e > 0 do
      out_shape = put_elem(x.shape, tuple_size(x.shape) - 1, n)
      type = Nx.Type.merge(x.type, experts.type)
      out = Nx.template(out_shape, Nx.Type.to_floating(type))
      Nx.block(%ExpertDot{}, [x, experts, indices], out, &expert_dot_default/4)
    else
      _ ->
        raise ArgumentError,
              "NxMlx.Quantized.expert_dot: expects x {..., k}, experts {e, k, n} and integer " <>
                "indices of x's shape without its last axis, got shapes #{inspect(x.shape)}, " <>
                "#{inspect(experts.shape)} and #{inspect(indices.shape)} of types " <>
                "#{inspect(x.type)}, #{inspect(experts.type)} and #{inspect(indices.type)}"
    end
  end

  @doc false
  # Plain Nx: gather each row's expert, then one batched dot over the rows.
  def expert_dot_default(%ExpertDot{}, x, experts, indices) do
    {e, k, n} = experts.shape
    out_shape = put_elem(x.shape, tuple_size(x.shape) - 1, n)
    type = Nx.Type.to_floating(Nx.Type.merge(x.type, experts.type))
    idx = indices |> Nx.reshape({:auto}) |> Nx.clip(0, e - 1)
    rows = Nx.size(idx)
    w = Nx.take(experts, idx, axis: 0)
    xr = Nx.reshape(x, {rows, 1, k})

    Nx.dot(Nx.as_type(xr, type), [2], [0], Nx.as_type(w, type), [1], [0])
    |> Nx.reshape(out_shape)
  end

  @modes %{
    affine: {[2, 3, 4, 5, 6, 8], [32, 64, 128], 4, 64},
    mxfp4: {[4], [32], 4, 32},
    mxfp8: {[8], [32], 8, 32},
    nvfp4: {[4], [16], 4, 16}
  }

  defp layout!(opts) do
    mode = opts[:mode] || :affine

    case @modes do
      %{^mode => {all_bits, groups, bits0, group0}} ->
        bits = opts[:bits] || bits0
        group_size = opts[:group_size] || group0

        unless bits in all_bits and group_size in groups do
          raise ArgumentError,
                "NxMlx.Quantized: mode #{inspect(mode)} takes bits in " <>
                  "#{inspect(all_bits, charlists: :as_lists)} and group sizes in " <>
                  "#{inspect(groups, charlists: :as_lists)}, got bits: #{inspect(bits)}, " <>
                  "group_size: #{inspect(group_size)}"
        end

        {mode, bits, group_size}

      _ ->
        raise ArgumentError,
              "NxMlx.Quantized: :mode is one of #{inspect(Map.keys(@modes))}, got #{inspect(mode)}"
    end
  end
end
