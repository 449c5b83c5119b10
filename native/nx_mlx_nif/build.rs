//! Link settings for the NIF library that cannot come from mlx-bind (link arguments do not
//! propagate to dependents): the run-time search path of libmlx, the OpenBLAS preference, and
//! on macOS the lookup of the `enif_*` symbols in the host VM at load time.

use std::env;

fn main() {
    println!("cargo:rerun-if-env-changed=NX_MLX_VARIANT");
    let lib_dir = env::var("DEP_MLX_LIB_DIR").expect("mlx-bind exports its lib dir");
    let blas = env::var("DEP_MLX_BLAS").unwrap_or_default();
    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();

    // libmlx is found through the absolute path it was provisioned at; LD_LIBRARY_PATH, when
    // set, still wins (RUNPATH), which is how a different libmlx build (e.g. CUDA) is chosen at
    // run time.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    if blas == "openblas" {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-l:libopenblas.so.0,--as-needed");
    }
    if target_os == "macos" {
        println!("cargo:rustc-cdylib-link-arg=-undefined");
        println!("cargo:rustc-cdylib-link-arg=dynamic_lookup");
    }
    let variant = env::var("NX_MLX_VARIANT").unwrap_or_else(|_| "cpu".to_string());
    println!("cargo:rustc-env=NX_MLX_BUILD_VARIANT={variant}");
}
