//! Link settings mlx-bind cannot pass on (link arguments do not propagate to dependents): the
//! run-time search path of libmlx and the OpenBLAS preference, as for the NIF.

use std::env;

fn main() {
    let lib_dir = env::var("DEP_MLX_LIB_DIR").expect("mlx-bind exports its lib dir");
    // LD_LIBRARY_PATH still wins over this RUNPATH: that is how the CUDA libmlx is chosen.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    if env::var("DEP_MLX_BLAS").unwrap_or_default() == "openblas" {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-l:libopenblas.so.0,--as-needed");
    }
}
