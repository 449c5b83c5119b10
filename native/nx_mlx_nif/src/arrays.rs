//! Creating arrays from BEAM data, reading them back, evaluating them.
//!
//! Small copies (up to `INLINE_BYTES`) of CPU arrays happen right in the NIF call, which is
//! cheaper than a round trip to the worker; larger ones, GPU arrays and every evaluation run on
//! the array's worker.

use mlx_bind::{Array, DeviceKind};
use rustler::{Binary, Encoder, Env, OwnedBinary, ResourceArc, Term};

use crate::build::{check_size, eval_here};
use crate::convert;
use crate::error::NifError;
use crate::resources::{ArrayRes, WorkerRes};
use crate::submit::{pending, reply, submit, Submission};

/// Copies up to this size run on the calling thread (a few microseconds at most).
pub const INLINE_BYTES: usize = 64 * 1024;

mod atoms {
    rustler::atoms! { ok, worker_id, evaluated_on, state, device }
}

/// `from_binary(worker, binary, shape, dtype)`: an array holding a copy of `binary`.
#[rustler::nif]
fn from_binary<'a>(
    env: Env<'a>,
    worker: ResourceArc<WorkerRes>,
    data: Binary<'a>,
    shape: Vec<i64>,
    dtype: Term<'a>,
) -> Term<'a> {
    let dtype = match convert::dtype(dtype) {
        Ok(d) => d,
        Err(e) => return e.encode(env),
    };
    let w = worker.0.clone();
    if data.len() <= INLINE_BYTES && w.device() == DeviceKind::Cpu {
        let result = Array::from_bytes(data.as_slice(), &shape, dtype)
            .map_err(NifError::from)
            .map(|a| ArrayRes::ready(a, w).encode(env));
        return reply(env, result);
    }
    let (submission, r) = Submission::new(env);
    let saved = submission.save(data.to_term(env));
    let posted = submission.post(&worker.0, move |env, _ctx| {
        let bin: Binary = saved
            .load(env)
            .decode()
            .map_err(|_| NifError::Runtime("lost the input binary".into()))?;
        let a = Array::from_bytes(bin.as_slice(), &shape, dtype)?;
        check_size(&a)?;
        Ok(ArrayRes::ready(a, w).encode(env))
    });
    match posted {
        Ok(()) => pending(env, r),
        Err(e) => e.encode(env),
    }
}

/// `to_binary(array)`: the array's bytes, row-major: `{:ok, binary}` at once when the array is
/// computed, small and on the CPU; otherwise `{:async, ref}` and the worker evaluates it and
/// replies.
#[rustler::nif]
fn to_binary(env: Env, a: ResourceArc<ArrayRes>) -> Term {
    if let Err(e) = a.check() {
        return e.encode(env);
    }
    let nbytes = a.array().nbytes();
    if a.is_evaluated() && a.device() == DeviceKind::Cpu && nbytes <= INLINE_BYTES {
        if let Some(mut bin) = OwnedBinary::new(nbytes) {
            match a.array().try_copy_to(bin.as_mut_slice()) {
                Ok(true) => return (atoms::ok(), bin.release(env)).encode(env),
                Ok(false) => {}
                Err(e) => return NifError::from(e).encode(env),
            }
        }
    }
    let worker = a.worker().clone();
    submit(env, &worker, move |env, ctx| {
        eval_here(&a, ctx.worker_id)?;
        let array = a.array();
        let mut bin = OwnedBinary::new(array.nbytes()).ok_or_else(|| {
            NifError::Runtime(format!("cannot allocate {} bytes", array.nbytes()))
        })?;
        array.copy_to(&ctx.stream, bin.as_mut_slice())?;
        Ok(bin.release(env).encode(env))
    })
}

/// `eval(array)`: evaluates the array on its worker; replies `:ok`.
#[rustler::nif]
fn eval(env: Env, a: ResourceArc<ArrayRes>) -> Term {
    if a.is_evaluated() {
        return (atoms::ok(), atoms::ok()).encode(env);
    }
    let worker = a.worker().clone();
    submit(env, &worker, move |env, ctx| {
        eval_here(&a, ctx.worker_id)?;
        Ok(atoms::ok().encode(env))
    })
}

/// `array_info(array)`: `%{worker_id, evaluated_on, state, device}`: where the array lives and
/// which worker thread evaluated it (0 when none has yet).
#[rustler::nif]
fn array_info(env: Env, a: ResourceArc<ArrayRes>) -> Term {
    let map = rustler::types::map::map_new(env);
    let pairs: [(Term, Term); 4] = [
        (atoms::worker_id().encode(env), a.worker().id().encode(env)),
        (
            atoms::evaluated_on().encode(env),
            a.evaluated_on().encode(env),
        ),
        (
            atoms::state().encode(env),
            convert::encode_atom(env, a.state_name()),
        ),
        (
            atoms::device().encode(env),
            convert::encode_atom(env, a.device().name()),
        ),
    ];
    pairs
        .into_iter()
        .fold(map, |m, (k, v)| m.map_put(k, v).unwrap_or(m))
}
