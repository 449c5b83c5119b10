defmodule NxMlx.Types do
  @moduledoc false
  # Nx types <-> MLX dtypes (as the NIF's atoms).

  @table [
    {{:u, 8}, :u8},
    {{:u, 16}, :u16},
    {{:u, 32}, :u32},
    {{:u, 64}, :u64},
    {{:s, 8}, :s8},
    {{:s, 16}, :s16},
    {{:s, 32}, :s32},
    {{:s, 64}, :s64},
    {{:f, 16}, :f16},
    {{:bf, 16}, :bf16},
    {{:f, 32}, :f32},
    {{:f, 64}, :f64},
    {{:c, 64}, :c64}
  ]

  for {nx, mlx} <- @table do
    def to_mlx(unquote(nx)), do: unquote(mlx)
    def to_nx(unquote(mlx)), do: unquote(nx)
    def mlx?(unquote(nx)), do: true
  end

  @doc "Whether MLX has a dtype for the Nx type."
  def mlx?(_type), do: false

  def to_mlx(type) do
    raise ArgumentError,
          "NxMlx.Backend does not support type #{inspect(type)}; supported: " <>
            Enum.map_join(@table, ", ", &inspect(elem(&1, 0)))
  end
end
