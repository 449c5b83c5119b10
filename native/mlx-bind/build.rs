//! Compiles the C++ shim against MLX's headers and links libmlx.
//!
//! Inputs (environment):
//! - `MLX_DIR`: a folder with `include/mlx/mlx.h` and `lib/libmlx.{so,dylib}` (required; `mix
//!   compile` provisions one and sets it, see CONTRIBUTING.md).
//! - `NX_MLX_BLAS`: `openblas`, `reference` or `auto` (default). On Linux, `openblas` puts
//!   `libopenblas.so.0` ahead of libmlx's bundled reference BLAS in the load order, so that
//!   OpenBLAS resolves the BLAS/LAPACK symbols libmlx uses.
//!
//! Outputs for dependents (`links = "mlx"`): `DEP_MLX_LIB_DIR`, `DEP_MLX_BLAS`.

use std::env;
use std::path::{Path, PathBuf};

fn main() {
    for var in ["MLX_DIR", "NX_MLX_BLAS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    for file in [
        "src/ffi.rs",
        "cxx/shim.h",
        "cxx/shim.cc",
        "cxx/kernels.h",
        "cxx/kernels.cc",
        "cxx/simd.h",
        "cxx/simd.cc",
    ] {
        println!("cargo:rerun-if-changed={file}");
    }

    let mlx_dir = match env::var_os("MLX_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => panic!(
            "MLX_DIR is not set. Build through `mix compile` (which provisions libmlx), or run \
             `mix nx_mlx.mlx_dir` and export MLX_DIR=<its output> before calling cargo."
        ),
    };
    let include = mlx_dir.join("include");
    let lib = mlx_dir.join("lib");
    if !include.join("mlx/mlx.h").is_file() {
        panic!("MLX_DIR={} has no include/mlx/mlx.h", mlx_dir.display());
    }

    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let blas = choose_blas(&target_os);

    // The vectorised loops: their clamps become vector selects only when comparisons may
    // not trap (we never read the floating-point exception flags).
    cc::Build::new()
        .cpp(true)
        .file("cxx/simd.cc")
        .include(env::var("CARGO_MANIFEST_DIR").unwrap() + "/..")
        .std("c++20")
        .flag_if_supported("-fno-trapping-math")
        // GCC 12's own AVX-512 headers trip it (_mm512_undefined_ps).
        .flag_if_supported("-Wno-maybe-uninitialized")
        .compile("mlx_bind_simd");

    cxx_build::bridge("src/ffi.rs")
        .file("cxx/shim.cc")
        .file("cxx/kernels.cc")
        .include(&include)
        .std("c++20")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .compile("mlx_bind_shim");

    if blas == "openblas" {
        // Not "as needed": nothing in our code calls OpenBLAS, yet it must be loaded (and be
        // found before libmlx's reference BLAS) for libmlx's BLAS/LAPACK references to bind to it.
        // Link arguments do not reach dependents: the NIF crate's build script adds the same
        // argument from DEP_MLX_BLAS.
        println!("cargo:rustc-link-arg={OPENBLAS_LINK_ARG}");
    }
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=mlx");
    if target_os == "linux" {
        println!("cargo:rustc-link-lib=dylib=dl");
    }
    // Our own test binaries find libmlx without LD_LIBRARY_PATH; dependents add their own rpath
    // from DEP_MLX_LIB_DIR (link args do not propagate).
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:lib_dir={}", lib.display());
    println!("cargo:blas={blas}");
    println!("cargo:rustc-env=MLX_BIND_BLAS={blas}");
    println!("cargo:rustc-env=MLX_BIND_LIB_DIR={}", lib.display());
}

/// Loads OpenBLAS although no symbol of ours references it (`--no-as-needed`).
const OPENBLAS_LINK_ARG: &str = "-Wl,--no-as-needed,-l:libopenblas.so.0,--as-needed";

fn choose_blas(target_os: &str) -> String {
    let requested = env::var("NX_MLX_BLAS").unwrap_or_else(|_| "auto".to_string());
    if target_os != "linux" {
        // macOS links Accelerate inside libmlx; nothing to choose.
        return "system".to_string();
    }
    match requested.as_str() {
        "reference" => "reference".to_string(),
        "openblas" => "openblas".to_string(),
        "auto" => {
            if openblas_available() {
                "openblas".to_string()
            } else {
                println!(
                    "cargo:warning=libopenblas.so.0 not found: libmlx will use its bundled \
                     reference BLAS (about 30x slower matmul). Install libopenblas0-pthread."
                );
                "reference".to_string()
            }
        }
        other => panic!("NX_MLX_BLAS must be openblas, reference or auto, got {other:?}"),
    }
}

fn openblas_available() -> bool {
    let dirs = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
    ];
    dirs.iter()
        .any(|d| Path::new(d).join("libopenblas.so.0").exists())
}
