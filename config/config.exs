import Config

# How NxMlx.Backend treats callbacks without an MLX implementation: :silent | :warn | :raise.
config :nx_mlx, fallback: :silent

# Debug checks in NxMlx.Backend, compiled in only when on (see its moduledoc, "Debug
# settings"). NX_MLX_DEBUG_CHECKS=1 turns both on for this project's own builds.
debug = System.get_env("NX_MLX_DEBUG_CHECKS") == "1"
config :nx_mlx, debug_bounds_check: debug, debug_detect_nan_inf: debug
