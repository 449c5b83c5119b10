//! Creating arrays from BEAM data and reading them back.

use mlx_bind::Array;
use rustler::{Binary, Encoder, Env, OwnedBinary, ResourceArc, Term};

use crate::convert;
use crate::error::NifError;
use crate::resources::{ArrayRes, WorkerRes};
use crate::submit::{reply, submit, Submission};

/// `from_binary(worker, binary, shape, dtype)`: an array holding a copy of `binary`. The copy
/// happens on the worker (the binary is kept alive by reference meanwhile).
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
    let (submission, r) = Submission::new(env);
    let saved = submission.save(data.to_term(env));
    let w = worker.0.clone();
    let posted = submission.post(&worker.0, move |env, _ctx| {
        let bin: Binary = saved
            .load(env)
            .decode()
            .map_err(|_| NifError::Runtime("lost the input binary".into()))?;
        let a = Array::from_bytes(bin.as_slice(), &shape, dtype)?;
        Ok(ArrayRes::new(a, w).encode(env))
    });
    reply(env, posted.map(|_| r))
}

/// `to_binary(worker, array)`: evaluates the array and replies with its bytes, row-major.
#[rustler::nif]
fn to_binary<'a>(
    env: Env<'a>,
    worker: ResourceArc<WorkerRes>,
    a: ResourceArc<ArrayRes>,
) -> Term<'a> {
    submit(env, &worker.0, move |env, ctx| {
        let s = ctx.stream()?;
        let array = a.array();
        let mut bin = OwnedBinary::new(array.nbytes()).ok_or_else(|| {
            NifError::Runtime(format!("cannot allocate {} bytes", array.nbytes()))
        })?;
        array.copy_to(s, bin.as_mut_slice())?;
        Ok(bin.release(env).encode(env))
    })
}
