//! MLX's allocator counters and limits (process-wide). Reading counters and setting the
//! memory limit are immediate; clearing the cache and setting the cache limit wait for every
//! CPU stream inside MLX, so they run on a worker and reply by message.

use std::sync::atomic::{AtomicUsize, Ordering};

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
        (atoms::limit().encode(env), limit().encode(env)),
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

/// nx_mlx's memory limit; `usize::MAX` until set (MLX's own limit is used then).
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

/// The memory limit no single array may exceed (see `build::check_size`); clamped to
/// `mlx_bind::memory::max_limit` when set.
pub fn limit() -> usize {
    match LIMIT.load(Ordering::Relaxed) {
        usize::MAX => mlx_bind::memory::limit(),
        n => n,
    }
}

/// `set_memory_limit(bytes)`: the previous limit.
///
/// MLX's own limit is left as it is. MLX's evaluation, while the live memory is above that
/// limit, waits in a loop until every scheduled task (of every stream) has finished; with a
/// limit below what is alive, workers whose graphs wait on one another's streams spun in that
/// loop for ever (seen in the fault tests, with a 2 MB limit).
#[rustler::nif]
fn set_memory_limit(bytes: usize) -> usize {
    let previous = limit();
    LIMIT.store(bytes.min(mlx_bind::memory::max_limit()), Ordering::Relaxed);
    previous
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
