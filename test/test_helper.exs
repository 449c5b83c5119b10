# GPU-tagged tests run only where MLX sees a GPU (the CUDA or Metal variant).
exclude = if :gpu in NxMlx.devices(), do: [], else: [:gpu]
ExUnit.start(exclude: exclude)
