//! Array operations. Each NIF queues the op on the given worker (building it on the worker's
//! stream) and replies with a new array resource. Ops are lazy: evaluation happens when the
//! array is read back or explicitly evaluated.

use mlx_bind::Array;
use rustler::{Encoder, Env, ResourceArc, Term};

use crate::convert;
use crate::error::NifResult;
use crate::resources::{ArrayRes, WorkerRes};
use crate::submit::submit;
use crate::worker::Ctx;

/// Queues `build` on `worker` and replies with the array it returns.
fn array_op<'a, F>(env: Env<'a>, worker: &ResourceArc<WorkerRes>, build: F) -> Term<'a>
where
    F: FnOnce(&Ctx) -> NifResult<Array> + Send + 'static,
{
    let w = worker.0.clone();
    submit(env, &worker.0, move |env, ctx| {
        let a = build(ctx)?;
        Ok(ArrayRes::new(a, w).encode(env))
    })
}

macro_rules! parse_or_return {
    ($env:expr, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return e.encode($env),
        }
    };
}

#[rustler::nif]
fn full<'a>(
    env: Env<'a>,
    worker: ResourceArc<WorkerRes>,
    shape: Vec<i64>,
    value: f64,
    dtype: Term<'a>,
) -> Term<'a> {
    let dtype = parse_or_return!(env, convert::dtype(dtype));
    array_op(env, &worker, move |ctx| {
        Ok(mlx_bind::full(&shape, value, dtype, ctx.stream()?)?)
    })
}

#[rustler::nif]
fn unary<'a>(
    env: Env<'a>,
    worker: ResourceArc<WorkerRes>,
    op: Term<'a>,
    a: ResourceArc<ArrayRes>,
) -> Term<'a> {
    let op = parse_or_return!(env, convert::unary_op(op));
    array_op(env, &worker, move |ctx| {
        Ok(mlx_bind::unary(op, a.array(), ctx.stream()?)?)
    })
}

#[rustler::nif]
fn binary<'a>(
    env: Env<'a>,
    worker: ResourceArc<WorkerRes>,
    op: Term<'a>,
    a: ResourceArc<ArrayRes>,
    b: ResourceArc<ArrayRes>,
) -> Term<'a> {
    let op = parse_or_return!(env, convert::binary_op(op));
    array_op(env, &worker, move |ctx| {
        Ok(mlx_bind::binary(op, a.array(), b.array(), ctx.stream()?)?)
    })
}

#[rustler::nif]
fn reduce<'a>(
    env: Env<'a>,
    worker: ResourceArc<WorkerRes>,
    op: Term<'a>,
    a: ResourceArc<ArrayRes>,
    axes: Vec<i64>,
    keep_dims: bool,
) -> Term<'a> {
    let op = parse_or_return!(env, convert::reduce_op(op));
    array_op(env, &worker, move |ctx| {
        Ok(mlx_bind::reduce(
            op,
            a.array(),
            &axes,
            keep_dims,
            ctx.stream()?,
        )?)
    })
}

#[rustler::nif]
fn astype<'a>(
    env: Env<'a>,
    worker: ResourceArc<WorkerRes>,
    a: ResourceArc<ArrayRes>,
    dtype: Term<'a>,
) -> Term<'a> {
    let dtype = parse_or_return!(env, convert::dtype(dtype));
    array_op(env, &worker, move |ctx| {
        Ok(mlx_bind::astype(a.array(), dtype, ctx.stream()?)?)
    })
}

#[rustler::nif]
fn reshape(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    a: ResourceArc<ArrayRes>,
    shape: Vec<i64>,
) -> Term {
    array_op(env, &worker, move |ctx| {
        Ok(mlx_bind::reshape(a.array(), &shape, ctx.stream()?)?)
    })
}

#[rustler::nif]
fn transpose(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    a: ResourceArc<ArrayRes>,
    axes: Vec<i64>,
) -> Term {
    array_op(env, &worker, move |ctx| {
        Ok(mlx_bind::transpose(a.array(), &axes, ctx.stream()?)?)
    })
}

#[rustler::nif]
fn broadcast_to(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    a: ResourceArc<ArrayRes>,
    shape: Vec<i64>,
) -> Term {
    array_op(env, &worker, move |ctx| {
        Ok(mlx_bind::broadcast_to(a.array(), &shape, ctx.stream()?)?)
    })
}

#[rustler::nif]
fn matmul(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    a: ResourceArc<ArrayRes>,
    b: ResourceArc<ArrayRes>,
) -> Term {
    array_op(env, &worker, move |ctx| {
        Ok(mlx_bind::matmul(a.array(), b.array(), ctx.stream()?)?)
    })
}

#[rustler::nif]
fn tensordot(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    a: ResourceArc<ArrayRes>,
    b: ResourceArc<ArrayRes>,
    axes_a: Vec<i64>,
    axes_b: Vec<i64>,
) -> Term {
    array_op(env, &worker, move |ctx| {
        Ok(mlx_bind::tensordot(
            a.array(),
            b.array(),
            &axes_a,
            &axes_b,
            ctx.stream()?,
        )?)
    })
}
