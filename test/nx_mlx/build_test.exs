defmodule NxMlx.BuildTest do
  # Provisioning and device/variant detection. NxMlx.Build is loaded by mix.exs.
  use ExUnit.Case, async: true

  alias NxMlx.Build

  @moduletag :tmp_dir

  describe "variant" do
    test "auto picks cpu on Linux and metal on macOS; explicit values win" do
      auto = Build.variant(%{})
      assert auto == if(Build.os() == "darwin", do: "metal", else: "cpu")
      assert Build.variant(%{"NX_MLX_VARIANT" => "cuda"}) == "cuda"
      assert Build.variant(%{"NX_MLX_VARIANT" => "cpu"}) == "cpu"

      assert_raise Mix.Error, ~r/must be cpu, cuda, metal or auto/, fn ->
        Build.variant(%{"NX_MLX_VARIANT" => "rocm"})
      end
    end

    test "each variant has a pinned wheel with a sha256" do
      for {variant, os, arch} <- [
            {"cpu", "linux", "x86_64"},
            {"cuda", "linux", "x86_64"},
            {"metal", "darwin", "arm64"}
          ] do
        assert {:ok, {file, sha, url}} = Build.wheel(variant, os, arch)
        assert file =~ "0.32.4"
        assert sha =~ ~r/^[0-9a-f]{64}$/
        assert String.ends_with?(url, file)
      end

      assert Build.wheel("metal", "linux", "x86_64") == :error
    end
  end

  describe "provisioning" do
    test "a wheel with the wrong sha256 is refused and removed", %{tmp_dir: dir} do
      wheel = Path.join(dir, "fake.whl")
      {:ok, _} = :zip.create(String.to_charlist(wheel), [{~c"mlx/lib/libmlx.so", "not a lib"}])
      dest = Path.join(dir, "out")

      assert_raise Mix.Error, ~r/checksum mismatch/, fn ->
        Build.install_wheel!(wheel, String.duplicate("0", 64), dest)
      end

      refute File.exists?(wheel)
      refute File.exists?(dest)
    end

    test "a wheel with the right sha256 is extracted", %{tmp_dir: dir} do
      wheel = Path.join(dir, "ok.whl")

      {:ok, _} =
        :zip.create(String.to_charlist(wheel), [
          {~c"mlx/include/mlx/mlx.h", "// header"},
          {~c"mlx/lib/libmlx.so", "lib"},
          {~c"mlx_cpu.libs/libblas-x.so.3", "blas"},
          {~c"mlx_cpu-0.32.4.dist-info/RECORD", "record"}
        ])

      dest = Path.join(dir, "out")
      mlx_dir = Build.install_wheel!(wheel, Build.sha256(wheel), dest)
      assert File.regular?(Path.join(mlx_dir, "include/mlx/mlx.h"))
      assert File.regular?(Path.join(dest, "mlx_cpu.libs/libblas-x.so.3"))
      refute File.exists?(Path.join(dest, "mlx_cpu-0.32.4.dist-info"))
    end

    test "an unreachable download fails with a clear message", %{tmp_dir: dir} do
      path = Path.join(dir, "wheels/mlx.whl")

      error =
        assert_raise Mix.Error, fn -> Build.download!("http://127.0.0.1:9/mlx.whl", path) end

      assert error.message =~ "could not download libmlx"
      assert error.message =~ "MLX_DIR"
      refute File.exists?(path)
    end

    test "MLX_DIR is honoured and checked", %{tmp_dir: dir} do
      File.mkdir_p!(Path.join(dir, "include/mlx"))
      File.write!(Path.join(dir, "include/mlx/mlx.h"), "")
      File.mkdir_p!(Path.join(dir, "lib"))

      assert_raise Mix.Error, ~r/no lib\/libmlx/, fn -> Build.mlx_dir!(%{"MLX_DIR" => dir}) end

      File.write!(Path.join(dir, "lib/libmlx.so"), "")
      assert Build.mlx_dir!(%{"MLX_DIR" => dir}) == dir

      assert_raise Mix.Error, ~r/no include\/mlx\/mlx.h/, fn ->
        Build.mlx_dir!(%{"MLX_DIR" => Path.join(dir, "lib")})
      end
    end

    test "the NIF is linked against the provisioned libmlx" do
      info = NxMlx.build_info()
      assert info["mlx"] == Build.mlx_version()
      assert File.regular?(info["libmlx"])
      assert info["variant"] in ["cpu", "cuda", "metal"]
    end
  end

  describe "devices" do
    test "the CPU is always there; the GPU only in a GPU build" do
      devices = NxMlx.devices()
      assert :cpu in devices

      if NxMlx.build_info()["variant"] == "cpu" do
        assert devices == [:cpu]
        assert NxMlx.default_device() == :cpu
      end
    end

    test "a worker for an unavailable GPU is an error and the VM lives on" do
      unless :gpu in NxMlx.devices() do
        assert {:error, {:argument, message}} = NxMlx.Native.new_worker(:gpu)
        assert message =~ "not available"

        assert_raise ArgumentError, ~r/not available/, fn ->
          Nx.tensor([1.0], backend: {NxMlx.Backend, device: :gpu})
        end
      end

      assert Nx.to_number(Nx.sum(Nx.tensor([1, 2], backend: {NxMlx.Backend, device: :cpu}))) == 3
    end

    test "libmlx sees MLX_ENABLE_TF32 off unless the environment or config :tf32 says on" do
      expected =
        System.get_env("MLX_ENABLE_TF32") ||
          if(Application.get_env(:nx_mlx, :tf32, false), do: "1", else: "0")

      assert NxMlx.build_info()["mlx_enable_tf32"] == expected
    end

    @tag :gpu
    test "tensors compute on the GPU" do
      t = Nx.tensor([[1.0, 2.0], [3.0, 4.0]], backend: {NxMlx.Backend, device: :gpu})
      assert Nx.to_number(t |> Nx.dot(t) |> Nx.add(1) |> Nx.sum()) == 58.0
    end
  end

  describe "loading" do
    @tag timeout: 120_000
    test "the NIF loads with LD_LIBRARY_PATH and LD_PRELOAD unset" do
      script = ~s|IO.puts(Nx.to_number(Nx.sum(Nx.tensor([1.0, 2.0], backend: NxMlx.Backend))))|

      {out, status} =
        System.cmd("mix", ["run", "--no-compile", "-e", script],
          env: [{"LD_LIBRARY_PATH", nil}, {"LD_PRELOAD", nil}, {"MIX_ENV", "test"}],
          stderr_to_stdout: true
        )

      assert status == 0, out
      assert out =~ "3.0"
      assert NxMlx.build_info()["blas"] in ["openblas", "reference", "accelerate"]
    end
  end

  describe "BLAS" do
    test "OpenBLAS's version and kernel set are reported" do
      info = NxMlx.Blas.info()

      if info.library == "openblas" do
        assert info.version =~ ~r/^0\.\d+\.\d+/
        assert is_binary(info.core) and info.core != ""
      else
        assert info.core == nil and info.version == nil
      end
    end

    test "the kernel set OpenBLAS was told to use is the one it reports" do
      if NxMlx.Blas.info().library == "openblas" do
        {out, 0} =
          System.cmd("mix", ["nx_mlx.info", "--no-bench"],
            env: [{"OPENBLAS_CORETYPE", "Prescott"}, {"MIX_ENV", "test"}],
            stderr_to_stdout: true
          )

        assert out =~ "blas_core: Prescott"
        assert out =~ "blas_coretype_override: Prescott"

        if NxMlx.Blas.info().cpu != :other do
          assert out =~ "warning: OpenBLAS runs its generic Prescott kernels"
        end
      end
    end

    test "OpenBLAS's idle busy-wait is limited at load unless OPENBLAS_THREAD_TIMEOUT is set" do
      if NxMlx.Blas.info().library == "openblas" do
        if System.get_env("OPENBLAS_THREAD_TIMEOUT") == nil do
          assert NxMlx.Blas.info().idle_spin == 16
        end

        {out, 0} =
          System.cmd("mix", ["nx_mlx.info", "--no-bench"],
            env: [{"OPENBLAS_THREAD_TIMEOUT", "21"}, {"MIX_ENV", "test"}],
            stderr_to_stdout: true
          )

        assert out =~ "blas_idle_spin: 21"

        # Matmuls still thread after the restart of OpenBLAS's thread server.
        # a[i, j] = j / 512, so every entry of a . ones is (0 + ... + 511) / 512 = 255.5.
        a = Nx.iota({512, 512}, axis: 1, type: :f32, backend: NxMlx.Backend) |> Nx.divide(512)
        got = Nx.dot(a, Nx.broadcast(Nx.tensor(1.0, backend: NxMlx.Backend), {512, 512}))
        assert Nx.to_flat_list(got) |> Enum.uniq() == [255.5]
      else
        assert NxMlx.Blas.info().idle_spin == nil
      end
    end

    test "warnings: generic kernels on vector CPUs, AVX2 kernels on AVX-512 CPUs" do
      assert NxMlx.Blas.warning("Prescott", :avx2, nil) =~ "OPENBLAS_CORETYPE=Haswell"
      assert NxMlx.Blas.warning("Prescott", :avx512, nil) =~ "OPENBLAS_CORETYPE=SkylakeX"
      assert NxMlx.Blas.warning("Sandybridge", :avx2, nil) =~ "generic Sandybridge"

      assert NxMlx.Blas.warning("Haswell", :avx512, "Haswell") =~
               "OPENBLAS_CORETYPE=Haswell is set"

      assert NxMlx.Blas.warning("Haswell", :avx2, nil) == nil
      assert NxMlx.Blas.warning("Cooperlake", :avx512, nil) == nil
      assert NxMlx.Blas.warning("SkylakeX", :avx512, "SkylakeX") == nil
      assert NxMlx.Blas.warning("Prescott", :other, nil) == nil
      assert NxMlx.Blas.warning(nil, :avx512, nil) == nil
    end

    test "the version is read from OpenBLAS's configuration string" do
      assert NxMlx.Blas.version("OpenBLAS 0.3.29  DYNAMIC_ARCH NO_AFFINITY Cooperlake") ==
               "0.3.29"

      assert NxMlx.Blas.version("OpenBLAS 0.3.21.dev DYNAMIC_ARCH") == "0.3.21.dev"
      assert NxMlx.Blas.version("") == nil
      assert NxMlx.Blas.version(nil) == nil
    end
  end
end
