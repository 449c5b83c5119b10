defmodule NxMlx.Build do
  @moduledoc false
  # Build-time helpers loaded by mix.exs (they must exist before the project compiles):
  # provisioning libmlx from the pinned PyPI wheels, and building the Rust NIF with cargo.

  @mlx_version "0.32.4"

  # Pinned wheels: {variant, os, arch} => {file name, sha256}. Source: PyPI's simple index
  # for mlx-cpu, mlx-cuda-13 and mlx-metal 0.32.4.
  @wheels %{
    {"cpu", "linux", "x86_64"} =>
      {"mlx_cpu-0.32.4-py3-none-manylinux_2_35_x86_64.whl",
       "0e0a24fa2ce8b6b94d2e6a90604e8813aa8e29fcb918bb2aa01cfb6d133d8cee",
       "a4/0f/1f3e0d30ccae2f7e9cd270633f8fd79d470248c07be3d501cebf9271783f"},
    {"cpu", "linux", "aarch64"} =>
      {"mlx_cpu-0.32.4-py3-none-manylinux_2_35_aarch64.whl",
       "1289e85e64af1fd16380bf331438bfe4afe875d27afc3e0bcf35f427c488fadd",
       "06/05/d4098fa8941a29f070b8addcf93dad7ead8447e1c6dda29fba87ff844731"},
    {"cuda", "linux", "x86_64"} =>
      {"mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl",
       "94cb48fba73e5ee39467e51c35c51c691123359ca17bafd1a24cf92ad6732bee",
       "04/71/6aa03c097939a45ac7bafc5deec3c6429d5272af5a817228bff35ad73f35"},
    {"cuda", "linux", "aarch64"} =>
      {"mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_aarch64.whl",
       "cf8a67b49cebff85cd98b1d118c09f6c8ee966b899a914c50cc74d614b25616e",
       "01/3f/69bda81076a5c41c549a641f50ec6b2cee5541aec77b9d3df1c7a5d1ff13"},
    {"metal", "darwin", "arm64"} =>
      {"mlx_metal-0.32.4-py3-none-macosx_14_0_arm64.whl",
       "8019b2db622599267d66cc168b2f0dbf5af929790a6c3b3913e00eabc42a7947",
       "77/24/7e5b7ed5d28abacab4577c7a8dd1fca6e9058504f5f95ae4333c09420e2e"}
  }

  @base_url "https://files.pythonhosted.org/packages/"

  def mlx_version, do: @mlx_version

  @doc "The variant to build: NX_MLX_VARIANT (cpu | cuda | metal | auto, default auto)."
  def variant(env \\ System.get_env()) do
    case Map.get(env, "NX_MLX_VARIANT", "auto") do
      v when v in ["cpu", "cuda", "metal"] ->
        v

      v when v in ["auto", ""] ->
        if os() == "darwin", do: "metal", else: "cpu"

      other ->
        Mix.raise("NX_MLX_VARIANT must be cpu, cuda, metal or auto, got: #{inspect(other)}")
    end
  end

  def os do
    case :os.type() do
      {:unix, :darwin} -> "darwin"
      {:unix, :linux} -> "linux"
      {_, other} -> Atom.to_string(other)
    end
  end

  def arch do
    arch = :erlang.system_info(:system_architecture) |> List.to_string()

    cond do
      String.starts_with?(arch, "x86_64") -> "x86_64"
      String.starts_with?(arch, "aarch64") -> "aarch64"
      String.starts_with?(arch, "arm") and os() == "darwin" -> "arm64"
      true -> arch |> String.split("-") |> hd()
    end
  end

  @doc "The pinned wheel for a platform: `{:ok, {file, sha256, url}}` or `:error`."
  def wheel(variant, os \\ os(), arch \\ arch()) do
    case Map.fetch(@wheels, {variant, os, arch}) do
      {:ok, {file, sha, path}} -> {:ok, {file, sha, @base_url <> path <> "/" <> file}}
      :error -> :error
    end
  end

  def cache_root(env \\ System.get_env()) do
    base =
      Map.get(env, "NX_MLX_CACHE_DIR") ||
        Path.join(Map.get(env, "XDG_CACHE_HOME") || Path.expand("~/.cache"), "nx_mlx")

    Path.expand(base)
  end

  @doc """
  The MLX folder (with `include/` and `lib/`) to build against: `MLX_DIR` when set (checked),
  else the provisioned wheel for the variant, downloaded on first use.
  """
  def mlx_dir!(env \\ System.get_env()) do
    case Map.get(env, "MLX_DIR") do
      dir when is_binary(dir) and dir != "" ->
        check_mlx_dir!(Path.expand(dir), "MLX_DIR")

      _ ->
        provision!(variant(env), cache_root(env))
    end
  end

  def check_mlx_dir!(dir, what) do
    header = Path.join(dir, "include/mlx/mlx.h")
    libs = Path.wildcard(Path.join(dir, "lib/libmlx.{so,dylib}"))

    cond do
      not File.regular?(header) -> Mix.raise("#{what}=#{dir} has no include/mlx/mlx.h")
      libs == [] -> Mix.raise("#{what}=#{dir} has no lib/libmlx.so or lib/libmlx.dylib")
      true -> dir
    end
  end

  @doc "Downloads (once), verifies and extracts the wheel of `variant` under `cache`."
  def provision!(variant, cache) do
    {file, sha, url} =
      case wheel(variant) do
        {:ok, w} ->
          w

        :error ->
          Mix.raise(
            "no pinned MLX #{@mlx_version} wheel for variant #{variant} on #{os()}/#{arch()}; " <>
              "set MLX_DIR to a folder with include/ and lib/libmlx"
          )
      end

    dest = Path.join(cache, "mlx-#{@mlx_version}-#{variant}-#{os()}-#{arch()}")
    mlx_dir = Path.join(dest, "mlx")

    if File.exists?(Path.join(dest, ".complete")) do
      mlx_dir
    else
      wheel_path = Path.join([cache, "wheels", file])

      unless File.regular?(wheel_path) and sha256(wheel_path) == sha do
        download!(url, wheel_path)
      end

      install_wheel!(wheel_path, sha, dest)
      mlx_dir
    end
  end

  @doc """
  Verifies `wheel_path` against `sha` and extracts MLX's headers and libraries into `dest`.
  Raises, extracting nothing, when the checksum differs.
  """
  def install_wheel!(wheel_path, sha, dest) do
    actual = sha256(wheel_path)

    if actual != sha do
      File.rm(wheel_path)

      Mix.raise(
        "checksum mismatch for #{Path.basename(wheel_path)}: expected sha256 #{sha}, " <>
          "got #{actual}. The file was removed; run the build again to download it anew."
      )
    end

    File.rm_rf!(dest)
    File.mkdir_p!(dest)

    {:ok, files} =
      :zip.extract(String.to_charlist(wheel_path),
        cwd: String.to_charlist(dest),
        file_filter: fn entry ->
          name = entry |> elem(1) |> List.to_string()
          wanted?(name)
        end
      )

    if files == [] do
      Mix.raise("#{Path.basename(wheel_path)} holds no MLX library")
    end

    check_mlx_dir!(Path.join(dest, "mlx"), "the extracted wheel")
    File.write!(Path.join(dest, ".complete"), sha)
    Path.join(dest, "mlx")
  end

  defp wanted?(name) do
    String.starts_with?(name, "mlx/include/") or String.starts_with?(name, "mlx/lib/") or
      (String.contains?(name, ".libs/") and not String.contains?(name, "dist-info"))
  end

  def sha256(path) do
    Mix.ensure_application!(:crypto)

    path
    |> File.stream!(2_097_152)
    |> Enum.reduce(:crypto.hash_init(:sha256), &:crypto.hash_update(&2, &1))
    |> :crypto.hash_final()
    |> Base.encode16(case: :lower)
  end

  @doc "Downloads `url` to `path` with a progress line; a clear error when offline."
  def download!(url, path) do
    File.mkdir_p!(Path.dirname(path))
    tmp = path <> ".part"
    Mix.shell().info("nx_mlx: downloading #{url}")

    # Mix prunes code paths to the project's applications; these come with Erlang/OTP.
    for app <- [:crypto, :asn1, :public_key, :ssl, :inets] do
      Mix.ensure_application!(app)
      {:ok, _} = Application.ensure_all_started(app)
    end

    ssl = [
      verify: :verify_peer,
      cacerts: :public_key.cacerts_get(),
      depth: 4,
      customize_hostname_check: [match_fun: :public_key.pkix_verify_hostname_match_fun(:https)]
    ]

    request = {String.to_charlist(url), []}

    case :httpc.request(:get, request, [ssl: ssl, timeout: 600_000, connect_timeout: 15_000],
           sync: false,
           stream: :self
         ) do
      {:ok, id} ->
        File.open!(tmp, [:write, :binary], fn io -> receive_body(id, io, url, 0, nil) end)
        File.rename!(tmp, path)

      {:error, reason} ->
        offline!(url, reason)
    end
  end

  defp receive_body(id, io, url, got, total) do
    receive do
      {:http, {^id, :stream_start, headers}} ->
        total =
          case List.keyfind(headers, ~c"content-length", 0) do
            {_, len} -> List.to_integer(len)
            nil -> nil
          end

        receive_body(id, io, url, got, total)

      {:http, {^id, :stream, chunk}} ->
        IO.binwrite(io, chunk)
        new = got + byte_size(chunk)
        progress(got, new, total)
        receive_body(id, io, url, new, total)

      {:http, {^id, :stream_end, _}} ->
        :ok

      {:http, {^id, {{_, status, _}, _, _}}} ->
        Mix.raise("nx_mlx: downloading #{url} failed with HTTP status #{status}")

      {:http, {^id, {:error, reason}}} ->
        offline!(url, reason)
    after
      120_000 -> offline!(url, :timeout)
    end
  end

  # One line per 10% (or per 10 MiB when the size is unknown).
  defp progress(old, new, nil) do
    if div(old, 10_485_760) != div(new, 10_485_760),
      do: IO.write(:stderr, "  #{div(new, 1_048_576)} MiB\n")
  end

  defp progress(old, new, total) do
    step = fn n -> div(n * 10, max(total, 1)) end

    if step.(old) != step.(new),
      do: IO.write(:stderr, "  #{step.(new) * 10}% of #{div(total, 1_048_576)} MiB\n")
  end

  defp offline!(url, reason) do
    Mix.raise("""
    nx_mlx: could not download libmlx (#{inspect(reason)}) from
      #{url}
    Either make that host reachable, place the wheel (same file name) in
      #{Path.join(cache_root(), "wheels")}
    or set MLX_DIR to a folder with MLX #{@mlx_version}'s include/ and lib/libmlx.
    """)
  end

  ## The Rust NIF

  @native_sources ~w(native/Cargo.toml native/Cargo.lock native/*/Cargo.toml native/*/build.rs native/*/src/**/*.rs native/*/cxx/*)

  @doc "Builds the NIF with cargo (release) unless nothing changed; installs it into `priv`."
  def compile_native!(opts \\ []) do
    root = Keyword.get(opts, :root, File.cwd!())
    app_priv = Path.join(Mix.Project.app_path(), "priv/native")
    env = System.get_env()
    mlx_dir = mlx_dir!(env)
    variant = variant(env)
    blas = Map.get(env, "NX_MLX_BLAS", "auto")
    target_dir = Map.get(env, "NX_MLX_CARGO_TARGET_DIR") || Path.join(root, "native/target")
    ext = if os() == "darwin", do: "dylib", else: "so"
    built = Path.join([target_dir, "release", "libnx_mlx_nif.#{ext}"])
    installed = Path.join(app_priv, "libnx_mlx_nif.so")
    stamp_file = Path.join(Mix.Project.app_path(), ".nx_mlx_native.stamp")
    stamp = stamp(root, [mlx_dir, variant, blas, target_dir])

    if File.regular?(installed) and File.read(stamp_file) == {:ok, stamp} and
         not Keyword.get(opts, :force, false) do
      :noop
    else
      Mix.shell().info("nx_mlx: building the NIF (cargo, release) against #{mlx_dir}")

      cargo_env = [
        {"MLX_DIR", mlx_dir},
        {"NX_MLX_VARIANT", variant},
        {"NX_MLX_BLAS", blas},
        {"CARGO_TARGET_DIR", target_dir}
      ]

      {_, status} =
        System.cmd("cargo", ["build", "--release", "-p", "nx_mlx_nif"],
          cd: Path.join(root, "native"),
          env: cargo_env,
          into: IO.stream(:stdio, :line),
          stderr_to_stdout: true
        )

      if status != 0, do: Mix.raise("nx_mlx: cargo build failed (exit #{status})")
      File.mkdir_p!(app_priv)
      File.rm(installed)
      File.cp!(built, installed)
      File.write!(stamp_file, stamp)
      :ok
    end
  end

  defp stamp(root, extra) do
    files =
      @native_sources
      |> Enum.flat_map(&Path.wildcard(Path.join(root, &1)))
      |> Enum.sort()

    contents = Enum.map(files, fn f -> [f, File.read!(f)] end)
    :erlang.md5(:erlang.term_to_binary([contents | extra])) |> Base.encode16(case: :lower)
  end
end

defmodule Mix.Tasks.Compile.NxMlxNative do
  @moduledoc false
  # Builds the Rust NIF with cargo and installs it into priv/native (see NxMlx.Build).
  use Mix.Task.Compiler

  @impl true
  def run(args) do
    case NxMlx.Build.compile_native!(force: "--force" in args) do
      :noop -> {:noop, []}
      :ok -> {:ok, []}
    end
  end

  @impl true
  def clean do
    File.rm_rf(Path.join(Mix.Project.app_path(), "priv/native"))
    :ok
  end
end

defmodule Mix.Tasks.NxMlx.MlxDir do
  @shortdoc "Provisions libmlx (if needed) and prints its folder"
  @moduledoc """
  Provisions libmlx for the selected variant (see `NX_MLX_VARIANT`, `MLX_DIR`) and prints the
  folder holding `include/` and `lib/`, e.g. to run cargo directly:

      MLX_DIR=$(mix nx_mlx.mlx_dir) cargo test --manifest-path native/Cargo.toml
  """
  use Mix.Task

  @impl true
  def run(_args) do
    IO.puts(NxMlx.Build.mlx_dir!())
  end
end
