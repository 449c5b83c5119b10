//! The nx_mlx NIF (`NxMlx.Native`): BEAM resources, worker threads and term conversion over the
//! `mlx-bind` crate. It knows nothing of Nx: Elixir maps Nx semantics onto these calls.
//!
//! Calls that touch MLX are asynchronous: they queue a job on a worker thread and return
//! `{:ok, ref}`; the reply arrives as a message `{ref, {:ok, value} | {:error, {kind, msg}}}`.

mod arrays;
mod convert;
pub mod error;
mod ops;
mod resources;
mod runtime;
mod submit;
pub mod worker;

rustler::init!("Elixir.NxMlx.Native");
