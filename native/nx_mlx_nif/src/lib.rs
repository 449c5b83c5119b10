//! The nx_mlx NIF (`NxMlx.Native`): BEAM resources, worker threads, command records and term
//! conversion over the `mlx-bind` crate. It knows nothing of Nx: Elixir maps Nx semantics onto
//! these calls.
//!
//! Reply conventions: `{:ok, value}` when a call finished on the spot (building a lazy op,
//! small copies), `{:async, ref}` when it queued a job on a worker (the reply then arrives as a
//! message `{ref, {:ok, value} | {:error, {kind, msg}}}`), `{:error, {kind, msg}}` otherwise.

mod arrays;
mod build;
pub mod command;
mod commands;
mod convert;
pub mod error;
mod memory;
mod op;
mod ops;
mod program;
mod resources;
mod runtime;
mod submit;
pub mod worker;

/// `load_info` is `{nice, env}`: the nice value for CPU worker threads (`config :nx_mlx,
/// worker_nice: n`) and environment variables for libmlx to read (e.g. `MLX_ENABLE_TF32`),
/// set here in the C environment before any MLX work starts (`os:putenv` does not reach a
/// library's `getenv`).
fn load(_env: rustler::Env, info: rustler::Term) -> bool {
    if let Ok((nice, vars, spin)) = info.decode::<(i32, Vec<(String, String)>, i32)>() {
        worker::set_nice(nice);
        for (key, value) in vars {
            if std::env::var_os(&key).is_none() {
                std::env::set_var(key, value);
            }
        }
        // Before any work: it restarts OpenBLAS's thread server (0: keep its default).
        if spin > 0 {
            mlx_bind::blas_limit_idle_spin(spin);
        }
    }
    runtime::on_load();
    true
}

rustler::init!("Elixir.NxMlx.Native", load = load);
