defmodule NxMlx.Blas do
  @moduledoc """
  The BLAS libmlx calls on the CPU device, and whether it runs kernels made for this CPU.

  On Linux libmlx binds to the OpenBLAS found first (see the README). OpenBLAS picks a kernel
  set at load time from the CPU it recognises; one too old to know a CPU runs its generic
  x86-64 kernels (`Prescott`), 4-5x slower on AVX2 and AVX-512 machines (measured on an
  Intel Xeon of family 6, model 207: 1024x1024 f32 matmul at 34-43 GFLOP/s with Debian 12's
  OpenBLAS 0.3.21, 188-198 with Debian 13's 0.3.29). `info/0` says which kernels run and
  warns when they are generic, or AVX2 ones on an AVX-512 CPU; `OPENBLAS_CORETYPE` (e.g.
  `SkylakeX`, `Haswell`) or a current OpenBLAS fixes it.

  OpenBLAS's idle worker threads busy-wait, without yielding the core, for 2^28 TSC cycles
  (about 0.1 s) after each threaded call. On a machine with few cores that takes a core from
  everything that runs between two matmuls: on 2 vCPUs an attention block's element-wise
  ops and softmax ran 2x slower while OpenBLAS spun, and a 1x128x768 encoder block 10-25%
  slower. When the NIF loads it limits that spin to 2^16 cycles (tens of microseconds)
  unless `OPENBLAS_THREAD_TIMEOUT` is set; `config :nx_mlx, blas_idle_spin: n` (4..30)
  chooses another exponent and `false` keeps OpenBLAS's default. `info/0`'s `:idle_spin`
  says which is in effect.
  """

  # OpenBLAS's x86-64 kernel sets (openblas_get_corename) by the widest vectors they use.
  @avx2_cores ~w(haswell zen excavator)
  @avx512_cores ~w(skylakex cooperlake sapphirerapids)

  @doc """
  A map: `:library` (`"openblas"`, `"reference"`, `"accelerate"`, `"none"`), `:path`,
  `:version` (OpenBLAS's, or `nil`), `:core` (the kernel set OpenBLAS runs, or `nil`),
  `:coretype_override` (`OPENBLAS_CORETYPE` when set), `:cpu` (`:avx512`, `:avx2` or
  `:other`, from `/proc/cpuinfo`; `:other` elsewhere) and `:warning` (a sentence when the
  kernels are narrower than the CPU's vectors, else `nil`), `:idle_spin` (the exponent of
  OpenBLAS's idle busy-wait in effect, 2^n cycles, 28 being its default; `nil` for other
  libraries).
  """
  def info do
    build = NxMlx.build_info()
    core = blank_to_nil(build["blas_core"])
    cpu = cpu_vector_isa()
    override = blank_to_nil(System.get_env("OPENBLAS_CORETYPE") || "")

    %{
      library: build["blas"],
      path: build["blas_library"],
      version: version(build["blas_config"]),
      core: core,
      coretype_override: override,
      cpu: cpu,
      warning: warning(core, cpu, override),
      idle_spin: idle_spin(build["blas_idle_spin"])
    }
  end

  # openblas_thread_timeout(): 0 when OpenBLAS runs its built-in default, 2^28 cycles.
  defp idle_spin("0"), do: 28
  defp idle_spin(nil), do: nil

  defp idle_spin(text) do
    case Integer.parse(text) do
      {n, ""} when n > 0 -> n
      _ -> nil
    end
  end

  @doc false
  def version(config) do
    case Regex.run(~r/OpenBLAS\s+([0-9][^\s]*)/, config || "") do
      [_, v] -> v
      _ -> nil
    end
  end

  @doc false
  def warning(nil, _cpu, _override), do: nil
  def warning(_core, :other, _override), do: nil

  def warning(core, cpu, override) do
    width = kernel_width(String.downcase(core))
    {isa, hint} = if cpu == :avx512, do: {"AVX-512", "SkylakeX"}, else: {"AVX2", "Haswell"}

    cause =
      if override,
        do: "OPENBLAS_CORETYPE=#{override} is set: unset it, or set OPENBLAS_CORETYPE=#{hint}",
        else:
          "set OPENBLAS_CORETYPE=#{hint} before starting the VM, or install OpenBLAS " <>
            "0.3.26 or later (scripts/install-system-deps does on Debian 12)"

    cond do
      width == :generic ->
        "OpenBLAS runs its generic #{core} kernels on this #{isa} CPU, so matmuls run " <>
          "several times below the machine: " <> cause

      width == :avx2 and cpu == :avx512 ->
        "OpenBLAS runs its AVX2 #{core} kernels on this AVX-512 CPU (measured 1.8x " <>
          "slower than its AVX-512 kernels on an AMD EPYC of family 26): " <> cause

      true ->
        nil
    end
  end

  defp kernel_width(core) when core in @avx512_cores, do: :avx512
  defp kernel_width(core) when core in @avx2_cores, do: :avx2
  defp kernel_width(_core), do: :generic

  defp cpu_vector_isa do
    case File.read("/proc/cpuinfo") do
      {:ok, text} ->
        flags =
          case Regex.run(~r/^flags\s*:\s*(.*)$/m, text) do
            [_, line] -> String.split(line)
            _ -> []
          end

        cond do
          "avx512f" in flags -> :avx512
          "avx2" in flags -> :avx2
          true -> :other
        end

      _ ->
        :other
    end
  end

  defp blank_to_nil(""), do: nil
  defp blank_to_nil(s), do: s
end
