//! Workers, build information and self-measurement.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use mlx_bind::{DeviceKind, Dtype};
use once_cell::sync::Lazy;
use rustler::env::OwnedEnv;
use rustler::{Encoder, Env, LocalPid, ResourceArc, Term};

use crate::convert;
use crate::error::NifError;
use crate::resources::WorkerRes;
use crate::submit::{pending, reply, submit};
use crate::worker;

mod atoms {
    rustler::atoms! { ok, nx_mlx_queue_stopped }
}

/// `default_worker(device)`: the process-wide worker of `device` (started when the library
/// loads, for every available device).
#[rustler::nif]
fn default_worker<'a>(env: Env<'a>, device: Term<'a>) -> Term<'a> {
    let result = convert::device(device)
        .and_then(worker::default_worker)
        .map(|w| ResourceArc::new(WorkerRes(w)).encode(env));
    reply(env, result)
}

/// `new_worker(device)`: `{:async, ref}`; a fresh worker thread creates its own stream on
/// `device` and replies `{ref, {:ok, worker}}`. `{:error, {:argument, _}}` at once when the
/// device is not available.
#[rustler::nif]
fn new_worker<'a>(env: Env<'a>, device: Term<'a>) -> Term<'a> {
    let device = match convert::device(device) {
        Ok(d) => d,
        Err(e) => return e.encode(env),
    };
    let mut owned = OwnedEnv::new();
    let r = env.make_ref();
    let saved = owned.save(r);
    let pid = env.pid();
    let spawned = worker::Worker::spawn(
        device,
        Box::new(move |result| {
            let _ = owned.send_and_clear(&pid, |env| {
                let r = saved.load(env);
                match result {
                    Ok(w) => (r, (atoms::ok(), ResourceArc::new(WorkerRes(w)))).encode(env),
                    Err(e) => (r, e).encode(env),
                }
            });
        }),
    );
    match spawned {
        Ok(()) => pending(env, r.encode(env)),
        Err(e) => e.encode(env),
    }
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

/// `synchronize(worker)`: replies `:ok` once everything queued on the worker before it, and
/// everything MLX has queued on its stream, has finished.
#[rustler::nif]
fn synchronize(env: Env, w: ResourceArc<WorkerRes>) -> Term {
    submit(env, &w.0, |env, ctx| {
        ctx.stream.synchronize()?;
        Ok(atoms::ok().encode(env))
    })
}

/// `live_workers()`: worker threads started and not yet joined.
#[rustler::nif]
fn live_workers() -> usize {
    worker::live_threads()
}

static EVENT_SINK: Lazy<Mutex<Option<LocalPid>>> = Lazy::new(|| Mutex::new(None));

/// `set_event_sink(pid)`: the process told `{:nx_mlx_queue_stopped, id, device}` when a worker
/// thread stops.
#[rustler::nif]
fn set_event_sink(pid: LocalPid) -> rustler::Atom {
    if let Ok(mut g) = EVENT_SINK.lock() {
        *g = Some(pid);
    }
    atoms::ok()
}

fn notify_worker_stopped(id: u64, device: DeviceKind) {
    let pid = match EVENT_SINK.lock() {
        Ok(g) => *g,
        Err(_) => None,
    };
    if let Some(pid) = pid {
        let mut owned = OwnedEnv::new();
        let _ = owned.send_and_clear(&pid, |env| {
            (
                atoms::nx_mlx_queue_stopped(),
                id,
                convert::encode_atom(env, device.name()),
            )
                .encode(env)
        });
    }
}

/// Called when the library loads: default workers for every available device, and the
/// lifecycle hook.
pub fn on_load() {
    worker::set_on_exit(notify_worker_stopped);
    worker::start_defaults();
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
        ("blas_config".to_string(), mlx_bind::blas_config()),
        ("blas_core".to_string(), mlx_bind::blas_core()),
        (
            "blas_idle_spin".to_string(),
            mlx_bind::blas_idle_spin().to_string(),
        ),
        (
            "variant".to_string(),
            env!("NX_MLX_BUILD_VARIANT").to_string(),
        ),
        ("devices".to_string(), devices.join(",")),
        // As libmlx reads it (the C environment, which the BEAM's os:getenv does not show).
        (
            "mlx_enable_tf32".to_string(),
            std::env::var("MLX_ENABLE_TF32").unwrap_or_default(),
        ),
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
        let s = &ctx.stream;
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

/// `readback_benchmark(worker, reps)`: on the worker itself, with no BEAM in the loop, the
/// median microseconds of building a 16-element f32 add and of evaluating it and copying it
/// out (MLX's own cost of what `bench/dispatch.exs` measures): `{build_us, readback_us}`.
#[rustler::nif]
fn readback_benchmark(env: Env, w: ResourceArc<WorkerRes>, reps: usize) -> Term {
    if reps == 0 || reps > 1_000_000 {
        return NifError::Argument(format!("readback_benchmark: reps={reps} out of range"))
            .encode(env);
    }
    submit(env, &w.0, move |env, ctx| {
        let s = &ctx.stream;
        let a = mlx_bind::full(&[16], 1.0, Dtype::F32, s)?;
        a.eval()?;
        let mut out = vec![0u8; 64];
        let mut build = Vec::with_capacity(reps);
        let mut readback = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t0 = Instant::now();
            let b = mlx_bind::binary(mlx_bind::BinaryOp::Add, &a, &a, s)?;
            let t1 = Instant::now();
            b.eval_spin(worker::EVAL_SPIN_US)?;
            b.copy_to(s, &mut out)?;
            let t2 = Instant::now();
            build.push((t1 - t0).as_secs_f64() * 1e6);
            readback.push((t2 - t1).as_secs_f64() * 1e6);
        }
        Ok((median(build), median(readback)).encode(env))
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
