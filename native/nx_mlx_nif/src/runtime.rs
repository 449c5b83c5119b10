//! Workers, build information and self-measurement.

use std::collections::HashMap;
use std::time::Instant;

use mlx_bind::{DeviceKind, Dtype};
use rustler::{Encoder, Env, ResourceArc, Term};

use crate::convert;
use crate::error::NifError;
use crate::resources::WorkerRes;
use crate::submit::{reply, submit};
use crate::worker;

/// `default_worker(device)`: the process-wide worker of `device` (started on first use).
#[rustler::nif]
fn default_worker<'a>(env: Env<'a>, device: Term<'a>) -> Term<'a> {
    let result = convert::device(device)
        .and_then(worker::default_worker)
        .map(|w| ResourceArc::new(WorkerRes(w)).encode(env));
    reply(env, result)
}

/// `new_worker(device)`: a fresh worker thread with its own stream on `device`.
#[rustler::nif]
fn new_worker<'a>(env: Env<'a>, device: Term<'a>) -> Term<'a> {
    let result = convert::device(device)
        .and_then(worker::Worker::spawn)
        .map(|w| ResourceArc::new(WorkerRes(w)).encode(env));
    reply(env, result)
}

/// `worker_info(worker)`: `%{id: integer, device: atom}`.
#[rustler::nif]
fn worker_info<'a>(env: Env<'a>, w: ResourceArc<WorkerRes>) -> Term<'a> {
    let mut map = rustler::types::map::map_new(env);
    map = map
        .map_put(convert::encode_atom(env, "id"), w.0.id().encode(env))
        .unwrap_or(map);
    map = map
        .map_put(
            convert::encode_atom(env, "device"),
            convert::encode_atom(env, w.0.device().name()),
        )
        .unwrap_or(map);
    map
}

/// `current_worker_id(worker)`: replies with the id of the worker thread that ran the job, as
/// seen from that thread (tests use it to check where work runs).
#[rustler::nif]
fn current_worker_id(env: Env, w: ResourceArc<WorkerRes>) -> Term {
    submit(env, &w.0, |env, _ctx| {
        Ok(worker::current_worker_id().encode(env))
    })
}

/// `live_workers()`: the number of worker threads running now.
#[rustler::nif]
fn live_workers() -> usize {
    worker::live_threads()
}

/// `build_info()`: facts about the loaded native code, as a map of strings.
#[rustler::nif]
fn build_info() -> HashMap<String, String> {
    let mut devices = vec!["cpu"];
    if mlx_bind::is_available(DeviceKind::Gpu) {
        devices.push("gpu");
    }
    let blas_path = mlx_bind::blas_library_path();
    let blas = if blas_path.contains("openblas") {
        "openblas"
    } else if blas_path.is_empty() {
        if cfg!(target_os = "macos") {
            "accelerate"
        } else {
            "none"
        }
    } else {
        "reference"
    };
    HashMap::from([
        ("mlx".to_string(), mlx_bind::version()),
        ("libmlx".to_string(), mlx_bind::library_path()),
        (
            "linked_lib_dir".to_string(),
            mlx_bind::LINKED_LIB_DIR.to_string(),
        ),
        ("linked_blas".to_string(), mlx_bind::LINKED_BLAS.to_string()),
        ("blas".to_string(), blas.to_string()),
        ("blas_library".to_string(), blas_path),
        (
            "variant".to_string(),
            env!("NX_MLX_BUILD_VARIANT").to_string(),
        ),
        ("devices".to_string(), devices.join(",")),
        (
            "nif_version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
    ])
}

/// `matmul_benchmark(worker, n, reps, dtype)`: times `reps` evaluated `n x n` matmuls on the
/// worker (after two warm-up runs) and replies with the seconds of each.
#[rustler::nif]
fn matmul_benchmark<'a>(
    env: Env<'a>,
    w: ResourceArc<WorkerRes>,
    n: i64,
    reps: usize,
    dtype: Term<'a>,
) -> Term<'a> {
    let dtype: Dtype = match convert::dtype(dtype) {
        Ok(d) => d,
        Err(e) => return e.encode(env),
    };
    if !(1..=16384).contains(&n) || reps == 0 || reps > 1000 {
        return NifError::Argument(format!("matmul_benchmark: n={n} reps={reps} out of range"))
            .encode(env);
    }
    submit(env, &w.0, move |env, ctx| {
        let s = ctx.stream()?;
        let a = mlx_bind::random_uniform(&[n, n], dtype, 1, s)?;
        let b = mlx_bind::random_uniform(&[n, n], dtype, 2, s)?;
        a.eval()?;
        b.eval()?;
        let mut times = Vec::with_capacity(reps);
        for i in 0..reps + 2 {
            let t0 = Instant::now();
            let c = mlx_bind::matmul(&a, &b, s)?;
            c.eval()?;
            if i >= 2 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        Ok(times.encode(env))
    })
}
