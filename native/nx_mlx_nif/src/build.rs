//! Building lazy arrays on the calling thread.
//!
//! An op NIF builds the MLX node right away on the caller's (scheduler) thread, naming the
//! worker's stream, and returns `{:ok, array}`: building a node is metadata work (shape and
//! type inference, one allocation), far cheaper than a round trip to the worker. Evaluation
//! still happens only on the worker. Two things keep that safe:
//!
//! - an input that lives on another worker and is not evaluated yet would make this worker
//!   evaluate another thread's stream (an MLX error): such inputs are returned as
//!   `{:error, {:foreign, inputs}}`, for the caller to evaluate them on their own worker first
//!   (so are lazy inputs created before an evaluation failed on their worker, see
//!   `Worker::evaluate`);
//! - chains of unevaluated ops are cut every `AUTO_EVAL_DEPTH` nodes by queueing an evaluation
//!   on the worker, so that a long eager loop never builds an unbounded graph.
//!
//! Only single-output ops may be built here. Building reads only the inputs' shape and type,
//! which never change; but destroying a handle to a node with siblings (a multi-output op such
//! as split, divmod, qr or svd) reads the sibling list, which the worker clears while it
//! evaluates the node. Multi-output ops must be built on the worker.

use mlx_bind::Array;
use rustler::{Encoder, Env, ResourceArc, Term};

use crate::error::{NifError, NifResult};
use crate::resources::{ArrayRes, WorkerRes};
use crate::submit::{reply, submit};
use crate::worker::{eval_spin_budget, SpinToken};

/// Unevaluated ops in a chain before the worker is asked to evaluate it.
pub const AUTO_EVAL_DEPTH: u32 = 10_000;

mod atoms {
    rustler::atoms! { error, foreign }
}

/// The depth of the longest unevaluated chain among `inputs`; or the reply to give instead:
/// an input's earlier failure, or `{:error, {:foreign, inputs}}` for the inputs that must be
/// evaluated on their own worker first (lazy on another worker, or created before a failure
/// on this one: see `Worker::evaluate`).
pub fn check_inputs<'a>(
    env: Env<'a>,
    worker: &std::sync::Arc<crate::worker::Worker>,
    inputs: &[&ResourceArc<ArrayRes>],
) -> Result<u32, Term<'a>> {
    let mut foreign = Vec::new();
    let mut depth = 0;
    for input in inputs {
        input.check().map_err(|e| e.encode(env))?;
        if input.is_evaluated() {
            continue;
        }
        if !std::sync::Arc::ptr_eq(input.worker(), worker) || input.predates_failure() {
            foreign.push((*input).clone());
        }
        depth = depth.max(input.depth);
    }
    if foreign.is_empty() {
        Ok(depth)
    } else {
        Err((atoms::error(), (atoms::foreign(), foreign)).encode(env))
    }
}

/// Builds an op with `f` on `worker`'s stream from `inputs`, replying `{:ok, array}`.
pub fn build<'a, F>(
    env: Env<'a>,
    worker: &ResourceArc<WorkerRes>,
    inputs: &[&ResourceArc<ArrayRes>],
    f: F,
) -> Term<'a>
where
    F: FnOnce(&mlx_bind::Stream) -> NifResult<Array>,
{
    let w = &worker.0;
    let depth = match check_inputs(env, w, inputs) {
        Ok(depth) => depth,
        Err(reply) => return reply,
    };
    let result = f(w.stream())
        .and_then(|a| check_size(&a).map(|_| a))
        .map(|a| {
            let depth = depth + 1;
            if depth >= AUTO_EVAL_DEPTH {
                let r = ArrayRes::lazy(a, w.clone(), 0);
                schedule_eval(&r);
                r
            } else {
                ArrayRes::lazy(a, w.clone(), depth)
            }
        })
        .map(|r| r.encode(env));
    reply(env, result)
}

/// Builds an op on the worker thread instead, replying `{:async, ref}` then `{ref, {:ok,
/// array}}`: for MLX ops that build internal nodes without naming the stream (they land on
/// the building thread's default stream, which on a worker is the worker's own) and for
/// multi-output ops (see the module doc).
pub fn build_on_worker<'a, F>(
    env: Env<'a>,
    worker: &ResourceArc<WorkerRes>,
    inputs: &[&ResourceArc<ArrayRes>],
    f: F,
) -> Term<'a>
where
    F: FnOnce(&mlx_bind::Stream) -> NifResult<Array> + Send + 'static,
{
    let w = worker.0.clone();
    if let Err(reply) = check_inputs(env, &w, inputs) {
        return reply;
    }
    let job_worker = w.clone();
    submit(env, &w, move |env, ctx| {
        let a = f(&ctx.stream)?;
        check_size(&a)?;
        Ok(ArrayRes::lazy(a, job_worker, 1).encode(env))
    })
}

/// Builds a multi-output op on the worker and evaluates it there, replying `{:async, ref}`
/// then `{ref, {:ok, [array, ...]}}` with evaluated arrays: evaluation leaves the outputs with
/// no sibling links, so their handles may then be dropped on any thread (see the module doc).
/// This is a sync point on the worker, meant for decompositions.
pub fn build_outputs_on_worker<'a, F>(
    env: Env<'a>,
    worker: &ResourceArc<WorkerRes>,
    inputs: &[&ResourceArc<ArrayRes>],
    f: F,
) -> Term<'a>
where
    F: FnOnce(&mlx_bind::Stream) -> NifResult<Vec<Array>> + Send + 'static,
{
    let w = worker.0.clone();
    if let Err(reply) = check_inputs(env, &w, inputs) {
        return reply;
    }
    let born = w.epoch();
    let job_worker = w.clone();
    submit(env, &w, move |env, ctx| {
        let outputs = f(&ctx.stream)?;
        Ok(evaluate_outputs(&job_worker, outputs, born, ctx.worker_id)?.encode(env))
    })
}

/// Checks, evaluates (as one graph, on the calling worker thread) and hands out `outputs`:
/// evaluated, they have no sibling links left, so their handles may be dropped anywhere.
pub fn evaluate_outputs(
    worker: &std::sync::Arc<crate::worker::Worker>,
    outputs: Vec<Array>,
    born: u64,
    worker_id: u64,
) -> NifResult<Vec<ResourceArc<ArrayRes>>> {
    outputs.iter().try_for_each(check_size)?;
    let refs: Vec<&Array> = outputs.iter().collect();
    let token = SpinToken::acquire();
    let result = worker.evaluate(&refs, born, eval_spin_budget(&token));
    drop(token);
    result.map_err(NifError::Runtime)?;
    Ok(ready_arrays(worker, outputs, worker_id))
}

/// Starts evaluating `outputs` on `worker` (its thread) and returns them as lazy resources
/// whose graph is already dispatched: reading one waits for the work (and reports a failure
/// MLX only sees at completion).
pub fn dispatch_outputs(
    worker: &std::sync::Arc<crate::worker::Worker>,
    outputs: Vec<Array>,
    born: u64,
) -> NifResult<Vec<ResourceArc<ArrayRes>>> {
    outputs.iter().try_for_each(check_size)?;
    let refs: Vec<&Array> = outputs.iter().collect();
    worker.dispatch(&refs, born).map_err(NifError::Runtime)?;
    Ok(outputs
        .into_iter()
        .map(|a| ArrayRes::lazy(a, worker.clone(), 0))
        .collect())
}

/// Resources for arrays already computed on `worker` (thread `worker_id`).
pub fn ready_arrays(
    worker: &std::sync::Arc<crate::worker::Worker>,
    arrays: Vec<Array>,
    worker_id: u64,
) -> Vec<ResourceArc<ArrayRes>> {
    arrays
        .into_iter()
        .map(|a| {
            let r = ArrayRes::ready(a, worker.clone());
            r.mark_evaluated(worker_id);
            r
        })
        .collect()
}

/// Refuses arrays larger than the memory limit (`memory::limit`): MLX's CPU allocator does not
/// check for a failed allocation, so an impossible size would crash the process at evaluation
/// time.
pub fn check_size(a: &Array) -> NifResult<()> {
    let bytes = a.nbytes();
    let limit = crate::memory::limit();
    if limit > 0 && bytes > limit {
        return Err(NifError::Argument(format!(
            "the result needs {bytes} bytes, more than MLX's memory limit of {limit} bytes \
             (the limit can be raised)"
        )));
    }
    Ok(())
}

/// Queues an evaluation of `r` on its worker, without waiting (best effort: skipped when the
/// queue is full; the array is then evaluated when read).
pub fn schedule_eval(r: &ResourceArc<ArrayRes>) {
    let job_r = r.clone();
    let _ = r.worker().post(Box::new(move |ctx| {
        let _ = eval_here(&job_r, ctx.worker_id);
    }));
}

/// Evaluates `r` on its worker (the calling thread must be that worker).
pub fn eval_here(r: &ArrayRes, worker_id: u64) -> NifResult<()> {
    r.check()?;
    if r.is_evaluated() {
        return Ok(());
    }
    let token = SpinToken::acquire();
    let result = r
        .worker()
        .evaluate(&[r.array()], r.born, eval_spin_budget(&token));
    drop(token);
    match result {
        Ok(()) => {
            r.mark_evaluated(worker_id);
            Ok(())
        }
        Err(message) => {
            r.mark_failed(&message);
            Err(NifError::Runtime(message))
        }
    }
}
