defmodule NxMlx.Fast do
  @moduledoc """
  Fused transformer kernels as `Nx.block/4`s: each function emits a block holding its static
  options in a struct and a default function written in plain Nx, so every backend and
  compiler computes the same thing (`Nx.BinaryBackend`, EXLA and `Nx.Defn.Evaluator` run
  the default), while `NxMlx.Backend` runs MLX's kernel eagerly and `compiler: NxMlx` lowers
  the block to the same kernel. Use them inside or outside `defn`:

      x = NxMlx.Fast.rms_norm(x, weight, eps: 1.0e-6)
      out = NxMlx.Fast.scaled_dot_product_attention(q, k, v, causal: true)

  | function | on NxMlx |
  |---|---|
  | `rms_norm/3` | `mlx::fast::rms_norm` |
  | `layer_norm/4` | our CPU kernel for f32 (one pass per row, statistics in double), `mlx::fast::layer_norm` elsewhere |
  | `softmax/2` | MLX's softmax (f16/bf16 accumulated in f32); on the CPU for f32, our threaded kernel |
  | `rope/2` | `mlx::fast::rope` |
  | `scaled_dot_product_attention/4` | `mlx::fast::scaled_dot_product_attention` (cuDNN or MLX's fused kernel on the GPU where they apply) |
  | `gelu/2` (exact) | our CPU kernel (one pass in double) on the CPU, the default elsewhere |
  | `cached_attention/7` | a KV-cache step: two `Nx.put_slice/3` and `scaled_dot_product_attention/4` with the filled part as mask |
  | `log_softmax/2`, `gelu/2` (`approximate: :tanh`), `swiglu/2`, `softcap/2` | the default function: MLX has no kernel for them; the compiler's fusion lane fuses the element-wise chain on the GPU |

  MLX's CPU backend composes most of `fast` from ordinary ops (its fused kernels are GPU
  kernels). On the CPU device `compiler: NxMlx` therefore lowers `rms_norm`, `rope` and
  `scaled_dot_product_attention` to their default functions, which ran faster as part of a
  program on 2 vCPUs (attention 1x12x128x64 f32: 1.37 ms against 5.15 ms for MLX's CPU
  composition); eager calls keep MLX's op (the default op by op took 35 ms). See the `fast`
  suite of `bench/run.exs` and bench/RESULTS.md.

  Types: inputs of one float type (f32, f16, bf16; f64 on the CPU device for the norms and
  softmax). Half-precision inputs are normalised (norms, softmax, log-softmax, GELU) in f32
  and rounded once, as MLX's kernels do; the default functions do the same, so the two agree
  to the type's rounding. Integer inputs are computed as f32. Gradients (`Nx.Defn.grad/2`)
  differentiate the default function. Vectorized tensors are refused with an
  `ArgumentError` (`Nx.devectorize/2` them first).

  ## Tolerances

  Each function equals its default on `Nx.BinaryBackend` (test/nx_mlx/fast_test.exs, on the
  CPU and GPU devices, eager and jitted, gradients included) within, absolute and relative
  on values of magnitude about 1: f32 1.0e-5, f16 4.0e-3, bf16 3.0e-2 (two roundings of the
  type), and twice those for attention in f16 and bf16 (the scores and weights are rounded
  to the type before the second product).
  """

  import Nx.Defn.Kernel, only: [keyword!: 2]

  defmodule RMSNorm do
    @moduledoc false
    defstruct eps: 1.0e-5, weight?: true
  end

  defmodule LayerNorm do
    @moduledoc false
    defstruct eps: 1.0e-5, weight?: true, bias?: true
  end

  defmodule Softmax do
    @moduledoc false
    defstruct axis: -1, log?: false
  end

  defmodule Gelu do
    @moduledoc false
    defstruct approximate: :none
  end

  defmodule Swiglu do
    @moduledoc false
    defstruct []
  end

  defmodule Softcap do
    @moduledoc false
    defstruct cap: 1.0
  end

  defmodule Rope do
    @moduledoc false
    defstruct dims: nil, traditional: false, base: 10_000.0, scale: 1.0, offset: 0, freqs?: false
  end

  defmodule Attention do
    @moduledoc false
    defstruct scale: 1.0, causal: false, mask: nil, sinks?: false
  end

  @half [{:f, 16}, {:bf, 16}]

  ## Norms

  @doc """
  RMS norm over the last axis: `x / sqrt(mean(x^2) + eps) * weight`.

  `weight` has the last axis's size (`nil`: no scaling). Options: `:eps` (default 1.0e-5).

      iex> x = Nx.tensor([[3.0, 4.0]], backend: NxMlx.Backend)
      iex> NxMlx.Fast.rms_norm(x, Nx.tensor([1.0, 2.0]), eps: 0.0)
      ...> |> Nx.to_flat_list() |> Enum.map(&Float.round(&1, 4))
      [0.8485, 2.2627]
  """
  def rms_norm(x, weight, opts \\ []) do
    opts = keyword!(opts, eps: 1.0e-5)
    x = Nx.to_tensor(x)
    k = last_dim!(x, "rms_norm")
    args = [x | List.wrap(weight && vector!(weight, k, "rms_norm", "weight"))]
    struct = %RMSNorm{eps: opts[:eps] / 1, weight?: weight != nil}
    fun = if weight, do: &rms_norm_default/3, else: &rms_norm_default(&1, &2, nil)
    block(struct, args, float_template(args), fun)
  end

  @doc false
  def rms_norm_default(%RMSNorm{eps: eps} = s, x, w) do
    out = Nx.Type.to_floating(merge_types([x | List.wrap(w)]))
    y = upcast(x)

    y =
      Nx.multiply(
        y,
        Nx.rsqrt(Nx.add(Nx.mean(Nx.multiply(y, y), axes: [-1], keep_axes: true), eps))
      )

    y = Nx.as_type(y, out)
    if s.weight?, do: Nx.multiply(y, w), else: y
  end

  @doc """
  Layer norm over the last axis: `(x - mean) / sqrt(var + eps) * weight + bias`.

  `weight` and `bias` have the last axis's size; either may be `nil` (no scaling, no shift).
  Options: `:eps` (default 1.0e-5).
  """
  def layer_norm(x, weight \\ nil, bias \\ nil, opts \\ []) do
    opts = keyword!(opts, eps: 1.0e-5)
    x = Nx.to_tensor(x)
    k = last_dim!(x, "layer_norm")

    args =
      [x] ++
        List.wrap(weight && vector!(weight, k, "layer_norm", "weight")) ++
        List.wrap(bias && vector!(bias, k, "layer_norm", "bias"))

    struct = %LayerNorm{eps: opts[:eps] / 1, weight?: weight != nil, bias?: bias != nil}
    block(struct, args, float_template(args), layer_norm_fun(struct))
  end

  defp layer_norm_fun(%LayerNorm{weight?: w?, bias?: b?}) do
    case {w?, b?} do
      {true, true} -> &layer_norm_default(&1, &2, &3, &4)
      {true, false} -> &layer_norm_default(&1, &2, &3, nil)
      {false, true} -> &layer_norm_default(&1, &2, nil, &3)
      {false, false} -> &layer_norm_default(&1, &2, nil, nil)
    end
  end

  @doc false
  def layer_norm_default(%LayerNorm{eps: eps}, x, w, b) do
    out = Nx.Type.to_floating(merge_types([x | Enum.reject([w, b], &is_nil/1)]))
    y = upcast(x)
    mean = Nx.mean(y, axes: [-1], keep_axes: true)
    centered = Nx.subtract(y, mean)
    var = Nx.mean(Nx.multiply(centered, centered), axes: [-1], keep_axes: true)
    y = Nx.as_type(Nx.multiply(centered, Nx.rsqrt(Nx.add(var, eps))), out)
    y = if w, do: Nx.multiply(y, w), else: y
    if b, do: Nx.add(y, b), else: y
  end

  ## Softmax and activations

  @doc """
  Softmax along `:axis` (default -1): `exp(x - max) / sum(exp(x - max))`.

      iex> NxMlx.Fast.softmax(Nx.tensor([[0.0, 0.0], [0.0, 1000.0]], backend: NxMlx.Backend))
      ...> |> Nx.to_list()
      [[0.5, 0.5], [0.0, 1.0]]
  """
  def softmax(x, opts \\ []) do
    opts = keyword!(opts, axis: -1)
    x = Nx.to_tensor(x)
    struct = %Softmax{axis: axis!(x, opts[:axis], "softmax"), log?: false}
    block(struct, [x], float_template([x]), &softmax_default/2)
  end

  @doc """
  Log-softmax along `:axis` (default -1): `x - max - log(sum(exp(x - max)))`.
  """
  def log_softmax(x, opts \\ []) do
    opts = keyword!(opts, axis: -1)
    x = Nx.to_tensor(x)
    struct = %Softmax{axis: axis!(x, opts[:axis], "log_softmax"), log?: true}
    block(struct, [x], float_template([x]), &softmax_default/2)
  end

  @doc false
  def softmax_default(%Softmax{axis: axis, log?: log?}, x) do
    out = Nx.Type.to_floating(x.type)
    y = upcast(x)
    shifted = Nx.subtract(y, Nx.reduce_max(y, axes: [axis], keep_axes: true))

    result =
      if log? do
        Nx.subtract(shifted, Nx.log(Nx.sum(Nx.exp(shifted), axes: [axis], keep_axes: true)))
      else
        e = Nx.exp(shifted)
        Nx.divide(e, Nx.sum(e, axes: [axis], keep_axes: true))
      end

    Nx.as_type(result, out)
  end

  @doc """
  GELU: `approximate: :none` (the default) is `x / 2 * (1 + erf(x / sqrt(2)))`, `:tanh` is
  `x / 2 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3)))`.
  """
  def gelu(x, opts \\ []) do
    opts = keyword!(opts, approximate: :none)

    unless opts[:approximate] in [:none, :tanh] do
      raise ArgumentError,
            "NxMlx.Fast.gelu: :approximate is :none or :tanh, got #{inspect(opts[:approximate])}"
    end

    x = Nx.to_tensor(x)
    block(%Gelu{approximate: opts[:approximate]}, [x], float_template([x]), &gelu_default/2)
  end

  @doc false
  def gelu_default(%Gelu{approximate: approximate}, x) do
    out = Nx.Type.to_floating(x.type)
    y = upcast(x)

    inner =
      case approximate do
        :none ->
          Nx.erf(Nx.multiply(y, 1 / :math.sqrt(2)))

        :tanh ->
          cube = Nx.multiply(Nx.multiply(y, y), y)
          Nx.tanh(Nx.multiply(Nx.add(y, Nx.multiply(cube, 0.044715)), :math.sqrt(2 / :math.pi())))
      end

    Nx.as_type(Nx.multiply(Nx.multiply(y, 0.5), Nx.add(inner, 1)), out)
  end

  @doc """
  SwiGLU's gating: `silu(gate) * up`, `silu(g) = g * sigmoid(g)`, for tensors of one shape.
  """
  def swiglu(gate, up) do
    gate = Nx.to_tensor(gate)
    up = Nx.to_tensor(up)

    if gate.shape != up.shape do
      raise ArgumentError,
            "NxMlx.Fast.swiglu: gate and up must have one shape, got #{inspect(gate.shape)} " <>
              "and #{inspect(up.shape)}"
    end

    block(%Swiglu{}, [gate, up], float_template([gate, up]), &swiglu_default/3)
  end

  @doc false
  def swiglu_default(%Swiglu{}, gate, up) do
    Nx.multiply(Nx.multiply(gate, Nx.sigmoid(gate)), up)
  end

  @doc """
  Soft capping of logits: `cap * tanh(x / cap)`, `cap` a positive number.
  """
  def softcap(x, cap) when is_number(cap) and cap > 0 do
    x = Nx.to_tensor(x)
    block(%Softcap{cap: cap / 1}, [x], float_template([x]), &softcap_default/2)
  end

  def softcap(_x, cap) do
    raise ArgumentError, "NxMlx.Fast.softcap: the cap is a positive number, got #{inspect(cap)}"
  end

  @doc false
  def softcap_default(%Softcap{cap: cap}, x) do
    Nx.multiply(Nx.tanh(Nx.divide(x, cap)), cap)
  end

  ## Rotary embeddings

  @doc """
  Rotary position embeddings over the last axis of `x` (`{batch, heads, seq, head_dim}` or
  any rank of at least 3, positions along the second-to-last axis).

  Options:

    * `:dims` - how many leading features of the last axis rotate (even; default all); the
      rest pass through unchanged.
    * `:traditional` - `true` rotates consecutive pairs `(x[2i], x[2i + 1])`; `false` (the
      default, GPT-NeoX and Llama's layout) rotates `x[i]` with `x[i + dims / 2]`.
    * `:base` - the frequencies are `base^(-2i / dims)` (default 10000.0).
    * `:freqs` - precomputed periods instead of `:base` (a tensor of `dims / 2` values; the
      angle of pair `i` at position `p` is `p / freqs[i]`).
    * `:scale` - positions are multiplied by it (default 1.0). Positions and angles are f32,
      as in MLX's kernel: past about 10^5 the angles keep only the precision f32 gives them,
      and implementations agree only to that.
    * `:offset` - the position of the first row: an integer, a scalar integer tensor or one
      offset per batch entry (a `{batch}` integer tensor) (default 0).

  Position 0 is not rotated; a rotation keeps each pair's length:

      iex> x = Nx.broadcast(Nx.tensor(1.0, backend: NxMlx.Backend), {1, 1, 2, 4})
      iex> y = NxMlx.Fast.rope(x)
      iex> y[[0, 0, 0]] |> Nx.to_flat_list()
      [1.0, 1.0, 1.0, 1.0]
      iex> pairs = Nx.add(Nx.pow(y[[0, 0, 1, 0..1]], 2), Nx.pow(y[[0, 0, 1, 2..3]], 2))
      iex> pairs |> Nx.to_flat_list() |> Enum.map(&Float.round(&1, 4))
      [2.0, 2.0]
  """
  def rope(x, opts \\ []) do
    opts =
      keyword!(opts,
        dims: nil,
        traditional: false,
        base: 10_000.0,
        freqs: nil,
        scale: 1.0,
        offset: 0
      )

    x = Nx.to_tensor(x)
    # Integer inputs rotate as f32 (the result is a float tensor).
    x = if Nx.Type.integer?(x.type), do: Nx.as_type(x, :f32), else: x

    if tuple_size(x.shape) < 3 do
      raise ArgumentError,
            "NxMlx.Fast.rope: x must have at least 3 axes ({batch, heads, seq, head_dim}), got " <>
              inspect(x.shape)
    end

    d = last_dim!(x, "rope")
    dims = opts[:dims] || d

    unless is_integer(dims) and dims > 0 and rem(dims, 2) == 0 and dims <= d do
      raise ArgumentError,
            "NxMlx.Fast.rope: :dims must be a positive even integer at most #{d}, got #{inspect(dims)}"
    end

    {offset, offset_arg} =
      case opts[:offset] do
        n when is_integer(n) and n >= -2_147_483_648 and n <= 2_147_483_647 ->
          {n, []}

        %Nx.Tensor{type: {kind, _}, shape: shape} = t
        when kind in [:s, :u] and (shape == {} or shape == {elem(x.shape, 0)}) ->
          {:tensor, [t]}

        other ->
          raise ArgumentError,
                "NxMlx.Fast.rope: :offset is a 32-bit integer or an integer tensor of shape {} or " <>
                  "{#{elem(x.shape, 0)}}, got #{inspect(other)}"
      end

    freqs_arg =
      case opts[:freqs] do
        nil ->
          []

        %Nx.Tensor{shape: {n}} = f when n == div(dims, 2) ->
          [f]

        other ->
          raise ArgumentError,
                "NxMlx.Fast.rope: :freqs must have shape {#{div(dims, 2)}}, got #{inspect(other)}"
      end

    struct = %Rope{
      dims: dims,
      traditional: opts[:traditional] == true,
      base: opts[:base] / 1,
      scale: opts[:scale] / 1,
      offset: offset,
      freqs?: freqs_arg != []
    }

    args = [x] ++ offset_arg ++ freqs_arg
    block(struct, args, float_template([x]), rope_fun(struct))
  end

  defp rope_fun(%Rope{offset: offset, freqs?: freqs?}) do
    case {offset == :tensor, freqs?} do
      {false, false} -> &rope_default(&1, &2, nil, nil)
      {true, false} -> &rope_default(&1, &2, &3, nil)
      {false, true} -> &rope_default(&1, &2, nil, &3)
      {true, true} -> &rope_default(&1, &2, &3, &4)
    end
  end

  @doc false
  def rope_default(%Rope{} = s, x, offset, freqs) do
    rank = tuple_size(x.shape)
    seq = elem(x.shape, rank - 2)
    d = elem(x.shape, rank - 1)
    half = div(s.dims, 2)

    inv_freqs =
      if freqs do
        Nx.divide(1.0, Nx.as_type(freqs, :f32))
      else
        Nx.exp(Nx.multiply(Nx.iota({half}, type: :f32), -:math.log(s.base) / half))
      end

    # Positions: [seq], or [batch, 1, ..., seq] for one offset per batch entry.
    positions =
      case offset do
        nil ->
          Nx.add(Nx.iota({seq}, type: :f32), s.offset)

        %Nx.Tensor{shape: {}} ->
          Nx.add(Nx.iota({seq}, type: :f32), Nx.as_type(offset, :f32))

        %Nx.Tensor{shape: {b}} ->
          lead = List.duplicate(1, rank - 2)
          iota = Nx.iota(List.to_tuple(lead ++ [seq]), axis: rank - 2, type: :f32)
          Nx.add(iota, Nx.reshape(Nx.as_type(offset, :f32), List.to_tuple([b | tl(lead)] ++ [1])))
      end

    theta = Nx.multiply(Nx.new_axis(Nx.multiply(positions, s.scale), -1), inv_freqs)
    cos = Nx.as_type(Nx.cos(theta), x.type)
    sin = Nx.as_type(Nx.sin(theta), x.type)
    rotated = Nx.slice_along_axis(x, 0, s.dims, axis: rank - 1)

    {x1, x2} =
      if s.traditional do
        # Lengths count source elements: dims values from 0 and dims - 1 from 1, every
        # other one.
        {Nx.slice_along_axis(rotated, 0, s.dims, axis: rank - 1, strides: 2),
         Nx.slice_along_axis(rotated, 1, s.dims - 1, axis: rank - 1, strides: 2)}
      else
        {Nx.slice_along_axis(rotated, 0, half, axis: rank - 1),
         Nx.slice_along_axis(rotated, half, half, axis: rank - 1)}
      end

    o1 = Nx.subtract(Nx.multiply(x1, cos), Nx.multiply(x2, sin))
    o2 = Nx.add(Nx.multiply(x1, sin), Nx.multiply(x2, cos))

    out =
      if s.traditional do
        pairs = Nx.stack([o1, o2], axis: rank)
        Nx.reshape(pairs, put_elem(o1.shape, rank - 1, s.dims))
      else
        Nx.concatenate([o1, o2], axis: rank - 1)
      end

    if s.dims < d do
      Nx.concatenate([out, Nx.slice_along_axis(x, s.dims, d - s.dims, axis: rank - 1)],
        axis: rank - 1
      )
    else
      out
    end
  end

  ## Attention

  @doc """
  Scaled dot-product attention: `softmax(q k^T * scale + mask) v` per head.

  `q` is `{batch, heads, q_seq, head_dim}`, `k` `{batch, kv_heads, kv_seq, head_dim}` and `v`
  `{batch, kv_heads, kv_seq, v_dim}`, `heads` a multiple of `kv_heads` (grouped-query
  attention: query head `h` attends with key/value head `div(h, heads / kv_heads)`).

  Options:

    * `:scale` - multiplies the scores (default `1 / sqrt(head_dim)`).
    * `:causal` - query row `i` sees keys `0..i + kv_seq - q_seq` (aligned to the end, as
      a decode step over a cache) (default `false`).
    * `:mask` - a tensor broadcastable to `{batch, heads, q_seq, kv_seq}`: boolean (`u8`:
      nonzero keeps a score; a masked score becomes the type's lowest finite value, so a row
      masked everywhere attends uniformly) or additive (a float tensor added to the scores).
      Not with `:causal`.
    * `:sinks` - attention sinks, one logit per query head (`{heads}`): each joins its
      row's softmax as an extra key with no value, taking its share of the weight.

  With equal keys every query attends uniformly, so the result is the mean of the values;
  causally, row `i` averages the first `i + 1` of them:

      iex> q = Nx.broadcast(Nx.tensor(0.5, backend: NxMlx.Backend), {1, 2, 3, 4})
      iex> v = Nx.iota({1, 1, 3, 4}, backend: NxMlx.Backend) |> Nx.as_type(:f32)
      iex> k = Nx.broadcast(Nx.tensor(1.0, backend: NxMlx.Backend), {1, 1, 3, 4})
      iex> out = NxMlx.Fast.scaled_dot_product_attention(q, k, v, causal: true)
      iex> out.shape
      {1, 2, 3, 4}
      iex> out[[0, 1, .., 0]] |> Nx.to_flat_list() |> Enum.map(&Float.round(&1, 4))
      [0.0, 2.0, 4.0]
  """
  def scaled_dot_product_attention(q, k, v, opts \\ []) do
    opts = keyword!(opts, scale: nil, causal: false, mask: nil, sinks: nil)
    [q, k, v] = Enum.map([q, k, v], &Nx.to_tensor/1)
    check_attention!(q, k, v)
    {_, heads, q_seq, head_dim} = q.shape
    kv_seq = elem(k.shape, 2)

    if opts[:causal] && opts[:mask] != nil do
      raise ArgumentError,
            "NxMlx.Fast.scaled_dot_product_attention: :mask and :causal exclude each other"
    end

    {mask_kind, mask_arg} =
      case opts[:mask] do
        nil ->
          {nil, []}

        mask ->
          mask = Nx.to_tensor(mask)
          full = {elem(q.shape, 0), heads, q_seq, kv_seq}

          unless broadcastable?(mask.shape, full) do
            raise ArgumentError,
                  "NxMlx.Fast.scaled_dot_product_attention: the mask's shape #{inspect(mask.shape)} " <>
                    "does not broadcast to #{inspect(full)}"
          end

          case mask.type do
            {:u, 8} ->
              {:boolean, [mask]}

            {kind, _} when kind in [:f, :bf] ->
              {:additive, [mask]}

            other ->
              raise ArgumentError,
                    "NxMlx.Fast.scaled_dot_product_attention: the mask is u8 (boolean) or float (additive), got #{inspect(other)}"
          end
      end

    sinks_arg =
      case opts[:sinks] do
        nil ->
          []

        %Nx.Tensor{shape: {^heads}} = t ->
          [t]

        other ->
          raise ArgumentError,
                "NxMlx.Fast.scaled_dot_product_attention: :sinks must have shape {#{heads}}, got #{inspect(other)}"
      end

    struct = %Attention{
      scale: (opts[:scale] || 1 / :math.sqrt(head_dim)) / 1,
      causal: opts[:causal] == true,
      mask: mask_kind,
      sinks?: sinks_arg != []
    }

    out_type = Nx.Type.to_floating(merge_types([q, k, v]))
    out = Nx.template({elem(q.shape, 0), heads, q_seq, elem(v.shape, 3)}, out_type)
    args = [q, k, v] ++ mask_arg ++ sinks_arg
    block(struct, args, out, attention_fun(struct))
  end

  defp attention_fun(%Attention{mask: mask, sinks?: sinks?}) do
    case {mask != nil, sinks?} do
      {false, false} -> &attention_default(&1, &2, &3, &4, nil, nil)
      {true, false} -> &attention_default(&1, &2, &3, &4, &5, nil)
      {false, true} -> &attention_default(&1, &2, &3, &4, nil, &5)
      {true, true} -> &attention_default(&1, &2, &3, &4, &5, &6)
    end
  end

  @doc false
  def attention_default(%Attention{} = s, q, k, v, mask, sinks) do
    type = Nx.Type.to_floating(merge_types([q, k, v]))
    {b, heads, q_seq, _} = q.shape
    {_, kv_heads, kv_seq, _} = k.shape
    repeat = div(heads, kv_heads)

    spread = fn t ->
      if repeat == 1 do
        t
      else
        {_, _, n, dim} = t.shape

        t
        |> Nx.new_axis(2)
        |> Nx.broadcast({b, kv_heads, repeat, n, dim})
        |> Nx.reshape({b, heads, n, dim})
      end
    end

    [q, k, v] = Enum.map([q, k, v], &Nx.as_type(&1, type))
    k = spread.(k)
    v = spread.(v)
    scores = Nx.dot(Nx.multiply(q, s.scale), [3], [0, 1], k, [3], [0, 1])

    scores =
      cond do
        s.causal ->
          rows = Nx.iota({q_seq, 1}) |> Nx.add(kv_seq - q_seq)
          cols = Nx.iota({1, kv_seq})
          keep = Nx.broadcast(Nx.greater_equal(rows, cols), scores.shape)
          Nx.select(keep, scores, Nx.Constants.min_finite(type))

        s.mask == :boolean ->
          Nx.select(Nx.broadcast(mask, scores.shape), scores, Nx.Constants.min_finite(type))

        s.mask == :additive ->
          Nx.add(scores, Nx.as_type(mask, type))

        true ->
          scores
      end

    scores =
      if sinks do
        column =
          sinks
          |> Nx.as_type(type)
          |> Nx.reshape({1, heads, 1, 1})
          |> Nx.broadcast({b, heads, q_seq, 1})

        Nx.concatenate([column, scores], axis: 3)
      else
        scores
      end

    weights = softmax_default(%Softmax{axis: 3}, scores)
    weights = if sinks, do: Nx.slice_along_axis(weights, 1, kv_seq, axis: 3), else: weights
    Nx.dot(weights, [3], [0, 1], v, [2], [0, 1])
  end

  defp check_attention!(q, k, v) do
    name = "NxMlx.Fast.scaled_dot_product_attention"

    for {t, label} <- [{q, "q"}, {k, "k"}, {v, "v"}] do
      unless tuple_size(t.shape) == 4 do
        raise ArgumentError,
              "#{name}: #{label} must be {batch, heads, seq, dim}, got #{inspect(t.shape)}"
      end
    end

    {b, heads, _, dq} = q.shape
    {bk, kv_heads, sk, dk} = k.shape
    {bv, hv, sv, _} = v.shape

    cond do
      bk != b or bv != b ->
        raise ArgumentError,
              "#{name}: q, k and v must have one batch size, got #{inspect({q.shape, k.shape, v.shape})}"

      dk != dq ->
        raise ArgumentError,
              "#{name}: q and k must have one head_dim, got #{inspect(q.shape)} and #{inspect(k.shape)}"

      hv != kv_heads or sv != sk ->
        raise ArgumentError,
              "#{name}: k and v must have the same heads and sequence, got #{inspect(k.shape)} and #{inspect(v.shape)}"

      kv_heads == 0 or rem(heads, kv_heads) != 0 ->
        raise ArgumentError,
              "#{name}: the query heads (#{heads}) must be a multiple of the key/value heads (#{kv_heads})"

      true ->
        :ok
    end
  end

  @doc """
  One step of attention over a key/value cache: writes `k` and `v` (`{batch, kv_heads, n,
  head_dim}`, the step's new entries) into `k_cache` and `v_cache` (`{batch, kv_heads,
  capacity, head_dim}`) at `position` (an integer or a scalar integer tensor: how many
  entries the caches held before), then attends from `q` (`{batch, heads, n, head_dim}`)
  over the filled part, causally: query `i` sees cache entries `0..position + i`. Returns
  `{out, k_cache, v_cache}`.

  Shapes stay static (`defn` and the compiler cache one program for every step): the
  unfilled part of the cache is masked, not sliced away, and the caches are written with
  `Nx.put_slice/3` at a dynamic start (a graph op on NxMlx: no read-back of `position`).
  MLX writes a slice in place only into an array nothing else holds; the caller holds the
  caches it passes, so each step copies them (a `capacity x head_dim` copy per head; measured
  in bench/RESULTS.md).

  Options: `:scale` (default `1 / sqrt(head_dim)`), `:sinks` (see
  `scaled_dot_product_attention/4`).
  """
  def cached_attention(q, k, v, k_cache, v_cache, position, opts \\ []) do
    opts = keyword!(opts, scale: nil, sinks: nil)
    [q, k, v, k_cache, v_cache] = Enum.map([q, k, v, k_cache, v_cache], &Nx.to_tensor/1)
    name = "NxMlx.Fast.cached_attention"

    for {t, label} <- [{k, "k"}, {v, "v"}, {k_cache, "k_cache"}, {v_cache, "v_cache"}] do
      unless tuple_size(t.shape) == 4 do
        raise ArgumentError,
              "#{name}: #{label} must be {batch, kv_heads, seq, dim}, got #{inspect(t.shape)}"
      end
    end

    {b, hkv, n, dk} = k.shape
    {cb, chkv, capacity, cdk} = k_cache.shape

    cond do
      {cb, chkv, cdk} != {b, hkv, dk} or elem(v_cache.shape, 0) != b or
        elem(v_cache.shape, 1) != hkv or elem(v_cache.shape, 2) != capacity or
        elem(v.shape, 3) != elem(v_cache.shape, 3) or elem(v.shape, 2) != n ->
        raise ArgumentError,
              "#{name}: the caches #{inspect(k_cache.shape)}, #{inspect(v_cache.shape)} do not " <>
                "hold entries of k #{inspect(k.shape)} and v #{inspect(v.shape)}"

      n > capacity ->
        raise ArgumentError, "#{name}: #{n} new entries do not fit a cache of #{capacity}"

      true ->
        :ok
    end

    position =
      case position do
        p when is_integer(p) and p >= 0 ->
          Nx.tensor(p, type: :s32)

        %Nx.Tensor{shape: {}, type: {kind, _}} = p when kind in [:s, :u] ->
          p

        other ->
          raise ArgumentError,
                "#{name}: position is a non-negative integer or a scalar integer tensor, got #{inspect(other)}"
      end

    # Nx.put_slice clamps the start so that the slice fits: a full cache takes the last
    # entries' place, as its callers must avoid.
    start = [0, 0, position, 0]
    k_cache = Nx.put_slice(k_cache, start, Nx.as_type(k, k_cache.type))
    v_cache = Nx.put_slice(v_cache, start, Nx.as_type(v, v_cache.type))

    rows = Nx.add(Nx.iota({n, 1}, type: :s32), Nx.as_type(position, :s32))
    mask = Nx.less_equal(Nx.iota({1, capacity}, type: :s32), rows)

    out =
      scaled_dot_product_attention(q, k_cache, v_cache,
        mask: mask,
        scale: opts[:scale],
        sinks: opts[:sinks]
      )

    {out, k_cache, v_cache}
  end

  ## Helpers

  # Nx.block/4 with every input of one kind: inside defn, a tensor captured from outside
  # (a constant of the trace) becomes an expression like the traced inputs.
  defp block(struct, args, out, fun) do
    if Enum.any?(args, &(&1.vectorized_axes != [])) do
      raise ArgumentError,
            "NxMlx.Fast: #{inspect(struct.__struct__)} takes no vectorized tensors; " <>
              "Nx.devectorize/2 them first"
    end

    args =
      if Enum.any?(args, &match?(%Nx.Tensor{data: %Nx.Defn.Expr{}}, &1)),
        do: Enum.map(args, &Nx.Defn.Expr.tensor/1),
        else: args

    Nx.block(struct, args, out, fun)
  end

  defp broadcastable?(shape, full) do
    s = Tuple.to_list(shape)
    f = Tuple.to_list(full)

    length(s) <= length(f) and
      Enum.zip(Enum.reverse(s), Enum.reverse(f)) |> Enum.all?(fn {a, b} -> a == b or a == 1 end)
  end

  defp upcast(%Nx.Tensor{type: type} = t) when type in @half, do: Nx.as_type(t, :f32)
  defp upcast(%Nx.Tensor{type: {kind, _}} = t) when kind in [:s, :u], do: Nx.as_type(t, :f32)
  defp upcast(t), do: t

  defp merge_types(tensors), do: tensors |> Enum.map(& &1.type) |> Enum.reduce(&Nx.Type.merge/2)

  defp float_template([x | _] = args) do
    Nx.template(x.shape, Nx.Type.to_floating(merge_types(args)), names: x.names)
  end

  defp last_dim!(%Nx.Tensor{shape: shape}, name) do
    if tuple_size(shape) == 0 do
      raise ArgumentError, "NxMlx.Fast.#{name}: x must have at least one axis, got a scalar"
    end

    elem(shape, tuple_size(shape) - 1)
  end

  defp vector!(t, k, name, label) do
    t = Nx.to_tensor(t)

    unless t.shape == {k} do
      raise ArgumentError,
            "NxMlx.Fast.#{name}: #{label} must have shape {#{k}}, got #{inspect(t.shape)}"
    end

    t
  end

  defp axis!(%Nx.Tensor{shape: shape}, axis, name) when is_integer(axis) do
    rank = tuple_size(shape)

    cond do
      rank == 0 ->
        raise ArgumentError, "NxMlx.Fast.#{name}: x must have at least one axis, got a scalar"

      axis >= 0 and axis < rank ->
        axis

      axis < 0 and axis >= -rank ->
        rank + axis

      true ->
        raise ArgumentError,
              "NxMlx.Fast.#{name}: axis #{axis} is out of range for shape #{inspect(shape)}"
    end
  end

  defp axis!(_x, axis, name),
    do: raise(ArgumentError, "NxMlx.Fast.#{name}: :axis is an integer, got #{inspect(axis)}")
end
