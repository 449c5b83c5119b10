//! MLX's allocator counters and limits (process-wide). Reading counters and setting the
//! memory limit are immediate; clearing the cache and setting the cache limit wait for every
//! CPU stream inside MLX, so they run on a worker and reply by message.

use rustler::{Encoder, Env, ResourceArc, Term};

use crate::resources::WorkerRes;
use crate::submit::submit;

mod atoms {
    rustler::atoms! { ok, active, peak, cache, limit }
}

/// `memory()`: `%{active, peak, cache, limit}` in bytes.
#[rustler::nif]
fn memory(env: Env) -> Term {
    let map = rustler::types::map::map_new(env);
    let pairs: [(Term, Term); 4] = [
        (
            atoms::active().encode(env),
            mlx_bind::memory::active().encode(env),
        ),
        (
            atoms::peak().encode(env),
            mlx_bind::memory::peak().encode(env),
        ),
        (
            atoms::cache().encode(env),
            mlx_bind::memory::cache().encode(env),
        ),
        (
            atoms::limit().encode(env),
            mlx_bind::memory::limit().encode(env),
        ),
    ];
    pairs
        .into_iter()
        .fold(map, |m, (k, v)| m.map_put(k, v).unwrap_or(m))
}

#[rustler::nif]
fn reset_peak_memory() -> rustler::Atom {
    mlx_bind::memory::reset_peak();
    atoms::ok()
}

/// `set_memory_limit(bytes)`: the previous limit.
#[rustler::nif]
fn set_memory_limit(bytes: usize) -> usize {
    mlx_bind::memory::set_limit(bytes)
}

/// `set_cache_limit(worker, bytes)`: `{:async, ref}`; replies with the previous limit.
#[rustler::nif]
fn set_cache_limit(env: Env, w: ResourceArc<WorkerRes>, bytes: usize) -> Term {
    submit(env, &w.0, move |env, _ctx| {
        Ok(mlx_bind::memory::set_cache_limit(bytes)?.encode(env))
    })
}

/// `clear_cache(worker)`: `{:async, ref}`; replies `:ok` once MLX's buffer cache is freed.
#[rustler::nif]
fn clear_cache(env: Env, w: ResourceArc<WorkerRes>) -> Term {
    submit(env, &w.0, |env, _ctx| {
        mlx_bind::memory::clear_cache()?;
        Ok(atoms::ok().encode(env))
    })
}
