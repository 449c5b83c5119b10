import Config

# How NxMlx.Backend treats callbacks without an MLX implementation: :silent | :warn | :raise.
config :nx_mlx, fallback: :silent
