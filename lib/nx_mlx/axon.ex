if Code.ensure_loaded?(Axon) do
  defmodule NxMlx.Axon do
    @moduledoc """
    Rewrites an Axon model's layers onto `NxMlx.Fast` (compiled only when Axon is a
    dependency).

        model = NxMlx.Axon.rewrite(model)
        model = NxMlx.Axon.rewrite(model, only: [:layer_norm, :gelu])

    Each rewritten node keeps its name, parameters and options; only the function it runs
    changes, so the model's parameters (and `NxMlx.Quantized.quantize_params/2` on them) stay
    as they are, and the outputs equal the unrewritten model's within the tolerances of
    `NxMlx.Fast`. On other backends the Fast functions run their plain-Nx defaults.

    | kind | Axon node | becomes |
    |---|---|---|
    | `:layer_norm` | `Axon.layer_norm/2` (last axis) | `NxMlx.Fast.layer_norm/4` |
    | `:rms_norm` | `Axon.rms_norm/2` (last axis) | `NxMlx.Fast.rms_norm/3`, the weight plus `:shift` |
    | `:gelu` | the `:gelu` activation | `NxMlx.Fast.gelu/2` (exact) |
    | `:softmax` | the `:softmax` activation | `NxMlx.Fast.softmax/2` |

    A node whose options fall outside what the Fast function computes (a norm over another
    axis) runs Axon's own layer. Attention has no Axon layer to match (Bumblebee composes it
    from its own functions); write it with `NxMlx.Fast.scaled_dot_product_attention/4`.

    Options: `:only` and `:except`, lists of the kinds above.
    """

    @kinds [:layer_norm, :rms_norm, :gelu, :softmax]

    @doc "The model with its matching nodes running `NxMlx.Fast` (see the moduledoc)."
    @spec rewrite(Axon.t(), keyword()) :: Axon.t()
    def rewrite(%Axon{} = model, opts \\ []) do
      opts = Keyword.validate!(opts, only: @kinds, except: [])

      for key <- [:only, :except], kind <- opts[key], kind not in @kinds do
        raise ArgumentError,
              "NxMlx.Axon.rewrite: #{inspect(key)} takes kinds of #{inspect(@kinds)}, got " <>
                inspect(kind)
      end

      kinds = opts[:only] -- opts[:except]

      Axon.map_nodes(model, fn %Axon.Node{op_name: name} = node ->
        if name in kinds, do: %{node | op: op(name)}, else: node
      end)
    end

    defp op(:layer_norm), do: &__MODULE__.layer_norm/4
    defp op(:rms_norm), do: &__MODULE__.rms_norm/3
    defp op(:gelu), do: &__MODULE__.gelu/2
    defp op(:softmax), do: &__MODULE__.softmax/2

    @doc false
    def layer_norm(x, gamma, beta, opts) do
      if last_axis?(x, opts[:channel_index] || -1),
        do: NxMlx.Fast.layer_norm(x, gamma, beta, eps: opts[:epsilon] || 1.0e-5),
        else: Axon.Layers.layer_norm(x, gamma, beta, opts)
    end

    @doc false
    def rms_norm(x, gamma, opts) do
      if last_axis?(x, opts[:channel_index] || -1) do
        weight = Nx.add(gamma, opts[:shift] || 0.0) |> Nx.as_type(gamma.type)
        NxMlx.Fast.rms_norm(x, weight, eps: opts[:epsilon] || 1.0e-6)
      else
        Axon.Layers.rms_norm(x, gamma, opts)
      end
    end

    @doc false
    def gelu(x, _opts), do: NxMlx.Fast.gelu(x)

    @doc false
    def softmax(x, opts) do
      case opts[:axis] || -1 do
        axis when is_integer(axis) -> NxMlx.Fast.softmax(x, axis: axis)
        _axes -> Axon.Activations.softmax(x, Keyword.delete(opts, :mode))
      end
    end

    defp last_axis?(x, axis), do: axis == -1 or axis == Nx.rank(x) - 1
  end
end
