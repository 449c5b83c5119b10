//! The eager op NIF: `op(worker, name, args)` decodes the op through the table in `op.rs`,
//! builds the lazy MLX node (on the calling thread where it may, naming the worker's stream;
//! see `build`) and returns `{:ok, array}` (or the worker's reply for ops built there).
//! Evaluation happens on the worker when the array is read back or explicitly evaluated.

use rustler::{Encoder, Env, ResourceArc, Term};

use crate::build::{build, build_on_worker, build_outputs_on_worker};
use crate::error::NifError;
use crate::op::{decode, Placement};
use crate::resources::{ArrayRes, WorkerRes};

#[rustler::nif]
fn op<'a>(
    env: Env<'a>,
    worker: ResourceArc<WorkerRes>,
    name: Term<'a>,
    args: Vec<Term<'a>>,
) -> Term<'a> {
    let name = match name.atom_to_string() {
        Ok(name) => name,
        Err(_) => {
            return NifError::Argument(format!("op: expected an atom, got {name:?}")).encode(env)
        }
    };
    let decoded = match decode(&name, &args) {
        Ok(d) => d,
        Err(e) => return e.encode(env),
    };
    let mut inputs: Vec<ResourceArc<ArrayRes>> = Vec::with_capacity(decoded.operands.len());
    for (i, term) in decoded.operands.iter().enumerate() {
        match term.decode::<ResourceArc<ArrayRes>>() {
            Ok(a) => inputs.push(a),
            Err(_) => {
                return NifError::Argument(format!(
                    "{name}: array operand {} is not an array: {term:?}",
                    i + 1
                ))
                .encode(env)
            }
        }
    }
    let refs: Vec<&ResourceArc<ArrayRes>> = inputs.iter().collect();
    let op = decoded.op;
    match op.placement() {
        Placement::Caller => build(env, &worker, &refs, |s| {
            let arrays: Vec<&mlx_bind::Array> = inputs.iter().map(|a| a.array()).collect();
            op.apply(&arrays, s).map(|mut out| out.swap_remove(0))
        }),
        Placement::Worker => {
            let held = inputs.clone();
            build_on_worker(env, &worker, &refs, move |s| {
                let arrays: Vec<&mlx_bind::Array> = held.iter().map(|a| a.array()).collect();
                op.apply(&arrays, s).map(|mut out| out.swap_remove(0))
            })
        }
        Placement::WorkerOutputs => {
            let held = inputs.clone();
            build_outputs_on_worker(env, &worker, &refs, move |s| {
                let arrays: Vec<&mlx_bind::Array> = held.iter().map(|a| a.array()).collect();
                op.apply(&arrays, s)
            })
        }
    }
}
