defmodule NxMlx.NIFError do
  @moduledoc """
  Raised when MLX fails at run time (a device or evaluation failure, a stopped worker), as
  opposed to invalid input, which raises `ArgumentError`.
  """
  defexception [:message]
end
