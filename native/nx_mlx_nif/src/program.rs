//! Programs: a whole `defn` graph, lowered by Elixir into a flat list of instructions over
//! numbered registers, decoded and validated once (`program_new`) and replayed per call
//! (`program_run`) on the worker in one job: the MLX graph is built without a BEAM round trip
//! per op, loops and branches run natively, and the outputs come back dispatched. A small
//! straight-line program is replayed on the calling thread instead (see `caller_replay`).
//!
//! Instructions (terms):
//!
//! - `{:op, outs, name, args, label}`: an op of the table in `op.rs`; its array operands in
//!   `args` are register numbers; it writes `outs` (one register per output);
//! - `{:const, out, array}`: a captured array (evaluated; see `program_new`);
//! - `{:while, init, state, cond, pred, body, next}`: copies `init` into `state`, then runs
//!   `cond` and stops when register `pred` is 0, else runs `body` and copies `next` into
//!   `state`; the results are left in `state`;
//! - `{:cond, clauses, last, last_results, outs}`: each clause is `{pred_code, pred, code,
//!   results}`; the first clause whose `pred` is non-zero runs its `code` (else `last`), and
//!   its results are copied into `outs`. Only the taken branch runs.
//!
//! - `{:hook, id, regs}`: evaluates `regs` and sends `{:nx_mlx_hook, tag, id, [array, ...]}`
//!   to the calling process (`tag` is `program_run`'s), then goes on: the callback runs in
//!   the caller's process while the program continues (hooks inside loops run per iteration).
//!
//! Registers `0..n_inputs` hold the inputs. A register is dropped after its last read in the
//! block that wrote it, so MLX may free (or reuse in place) what is no longer needed.

use mlx_bind::{Array, Stream};
use rustler::{Encoder, Env, ResourceArc, Term};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::build::{check_inputs, check_size, dispatch_outputs, ready_arrays};
use crate::error::{NifError, NifResult};
use crate::op::{decode, Op, Placement};
use crate::resources::{ArrayRes, WorkerRes};
use crate::submit::submit;

mod atoms {
    rustler::atoms! { op, r#const = "const", r#while = "while", cond, hook, nx_mlx_hook }
}

enum Instr {
    Op {
        op: Op,
        ins: Vec<usize>,
        outs: Vec<usize>,
        label: String,
    },
    Const {
        array: Array,
        out: usize,
    },
    While {
        init: Vec<usize>,
        state: Vec<usize>,
        cond: Arc<Block>,
        pred: usize,
        body: Arc<Block>,
        next: Vec<usize>,
        /// The registers of `next` the body writes, dropped once read each iteration (the
        /// others, a constant or a value from outside the loop, stay for the next one).
        next_own: Vec<usize>,
    },
    Cond {
        clauses: Vec<Clause>,
        last: Arc<Block>,
        last_results: Vec<usize>,
        outs: Vec<usize>,
    },
    Hook {
        id: u64,
        regs: Vec<usize>,
    },
}

/// A `cond` clause: the predicate's code, its register, the branch and its results.
type Clause = (Arc<Block>, usize, Arc<Block>, Vec<usize>);

#[derive(Default)]
struct Block {
    code: Vec<Instr>,
    /// Registers to drop after each instruction.
    free: Vec<Vec<usize>>,
    /// Set when the block is straight-line code (ops and constants only) that the fusion
    /// lane may run as one `mx::compile`d function.
    unit: Option<Unit>,
}

/// A straight-line block as a function: it reads `ins` (registers set before it) and writes
/// `outs` (the registers it hands on); `drop` are the registers its `free` lists drop.
struct Unit {
    ins: Vec<usize>,
    outs: Vec<usize>,
    drop: Vec<usize>,
}

/// The fused form of a block on one worker (`None`: tracing it failed, replay instead).
type Fused = Option<Arc<mlx_bind::Compiled>>;

pub struct ProgramRes {
    n_inputs: usize,
    n_regs: usize,
    outputs: Vec<usize>,
    main: Arc<Block>,
    ops: usize,
    /// Run straight-line blocks through `mx::compile` (the fusion lane).
    fuse: bool,
    /// Compiled blocks, per worker (MLX's compile cache is per thread) and block address.
    fused: Mutex<HashMap<(u64, usize), Fused>>,
    /// The first reason a fused run fell back to replay, until `program_fusion` reads it.
    fallback: Mutex<Option<String>>,
    /// Set after a fused evaluation failed: the program replays unfused from then on.
    unfused: AtomicBool,
    /// Replayed on the calling thread (see `caller_replay`).
    caller: bool,
}

/// The most ops a program replayed on the calling thread may have: building a node costs
/// about a microsecond, and a normal scheduler should not be held much longer than that.
const CALLER_REPLAY_OPS: usize = 64;

/// Whether a program is replayed on the calling thread, as an eager op is built, instead of
/// in a job on the worker: a small straight-line program of ops that may be built anywhere
/// (see `build.rs`), with no loop, branch or hook, and not one the fusion lane could fuse
/// (a single op has nothing to fuse). Its outputs' evaluation is still started on the
/// worker, without a reply, so a call costs no round trip and a read-back one, as an eager
/// op does.
fn caller_replay(main: &Block, ops: usize, fuse: bool) -> bool {
    ops <= CALLER_REPLAY_OPS
        && !(fuse && ops > 1)
        && main.code.iter().all(|instr| match instr {
            Instr::Op { op, .. } => op.placement() == Placement::Caller,
            Instr::Const { .. } => true,
            _ => false,
        })
}

#[rustler::resource_impl]
impl rustler::Resource for ProgramRes {}

struct Decoder {
    n_regs: usize,
    ops: usize,
}

impl Decoder {
    fn reg(&self, term: Term) -> NifResult<usize> {
        let r: usize = term.decode().map_err(|_| {
            NifError::Argument(format!("program: expected a register, got {term:?}"))
        })?;
        if r < self.n_regs {
            Ok(r)
        } else {
            Err(NifError::Argument(format!(
                "program: register {r} is out of range ({} registers)",
                self.n_regs
            )))
        }
    }

    fn regs(&self, term: Term) -> NifResult<Vec<usize>> {
        let list: Vec<Term> = term.decode().map_err(|_| {
            NifError::Argument(format!("program: expected registers, got {term:?}"))
        })?;
        list.into_iter().map(|t| self.reg(t)).collect()
    }

    fn block(&mut self, term: Term, live_out: &[usize]) -> NifResult<Arc<Block>> {
        let list: Vec<Term> = term.decode().map_err(|_| {
            NifError::Argument(format!(
                "program: expected a list of instructions, got {term:?}"
            ))
        })?;
        let code = list
            .into_iter()
            .map(|t| self.instr(t))
            .collect::<NifResult<Vec<_>>>()?;
        Ok(Arc::new(with_frees(code, live_out, &[])))
    }

    fn instr(&mut self, term: Term) -> NifResult<Instr> {
        let bad = || NifError::Argument(format!("program: invalid instruction {term:?}"));
        let parts = rustler::types::tuple::get_tuple(term).map_err(|_| bad())?;
        let tag = parts.first().ok_or_else(bad)?;
        if *tag == atoms::op().encode(term.get_env()) && parts.len() == 5 {
            let outs = self.regs(parts[1])?;
            let name = parts[2].atom_to_string().map_err(|_| bad())?;
            let args: Vec<Term> = parts[3].decode().map_err(|_| bad())?;
            let label: String = parts[4].decode().map_err(|_| bad())?;
            let decoded = decode(&name, &args)?;
            let ins = decoded
                .operands
                .iter()
                .map(|t| self.reg(*t))
                .collect::<NifResult<Vec<_>>>()?;
            if outs.len() != decoded.op.outputs() {
                return Err(NifError::Argument(format!(
                    "program: {name} writes {} registers, not {}",
                    decoded.op.outputs(),
                    outs.len()
                )));
            }
            self.ops += 1;
            Ok(Instr::Op {
                op: decoded.op,
                ins,
                outs,
                label,
            })
        } else if *tag == atoms::r#const().encode(term.get_env()) && parts.len() == 3 {
            let out = self.reg(parts[1])?;
            let a: ResourceArc<ArrayRes> = parts[2].decode().map_err(|_| bad())?;
            a.check()?;
            if !a.is_evaluated() {
                return Err(NifError::Argument(
                    "program: a captured array must be evaluated first".into(),
                ));
            }
            Ok(Instr::Const {
                array: a.array().clone(),
                out,
            })
        } else if *tag == atoms::r#while().encode(term.get_env()) && parts.len() == 7 {
            let init = self.regs(parts[1])?;
            let state = self.regs(parts[2])?;
            let pred = self.reg(parts[4])?;
            let next = self.regs(parts[6])?;
            if init.len() != state.len() || next.len() != state.len() {
                return Err(bad());
            }
            let cond = self.block(parts[3], &[pred])?;
            let body = self.block(parts[5], &next)?;
            let mut written = Vec::new();
            for i in &body.code {
                writes(i, &mut written);
            }
            let mut next_own: Vec<usize> = next
                .iter()
                .copied()
                .filter(|r| written.contains(r))
                .collect();
            next_own.sort_unstable();
            next_own.dedup();
            Ok(Instr::While {
                init,
                state,
                cond,
                pred,
                body,
                next,
                next_own,
            })
        } else if *tag == atoms::cond().encode(term.get_env()) && parts.len() == 5 {
            let clause_terms: Vec<Term> = parts[1].decode().map_err(|_| bad())?;
            let outs = self.regs(parts[4])?;
            let mut clauses = Vec::with_capacity(clause_terms.len());
            for c in clause_terms {
                let c = rustler::types::tuple::get_tuple(c).map_err(|_| bad())?;
                if c.len() != 4 {
                    return Err(bad());
                }
                let pred = self.reg(c[1])?;
                let results = self.regs(c[3])?;
                if results.len() != outs.len() {
                    return Err(bad());
                }
                let pred_code = self.block(c[0], &[pred])?;
                let code = self.block(c[2], &results)?;
                clauses.push((pred_code, pred, code, results));
            }
            let last_results = self.regs(parts[3])?;
            if last_results.len() != outs.len() {
                return Err(bad());
            }
            let last = self.block(parts[2], &last_results)?;
            Ok(Instr::Cond {
                clauses,
                last,
                last_results,
                outs,
            })
        } else if *tag == atoms::hook().encode(term.get_env()) && parts.len() == 3 {
            let id: u64 = parts[1].decode().map_err(|_| bad())?;
            let regs = self.regs(parts[2])?;
            Ok(Instr::Hook { id, regs })
        } else {
            Err(bad())
        }
    }
}

/// Registers an instruction reads (for nested blocks: those it reads from outside them).
fn reads(instr: &Instr, out: &mut Vec<usize>) {
    match instr {
        Instr::Op { ins, .. } => out.extend(ins),
        Instr::Const { .. } => {}
        Instr::While {
            init,
            cond,
            body,
            next,
            ..
        } => {
            out.extend(init);
            block_reads(cond, out);
            block_reads(body, out);
            // A register the body hands on without writing it is read from outside.
            out.extend(next);
        }
        Instr::Cond {
            clauses,
            last,
            last_results,
            ..
        } => {
            for (p, pred, c, results) in clauses {
                block_reads(p, out);
                block_reads(c, out);
                out.push(*pred);
                out.extend(results);
            }
            block_reads(last, out);
            out.extend(last_results);
        }
        Instr::Hook { regs, .. } => out.extend(regs),
    }
}

/// Registers an instruction writes in its own block.
fn writes(instr: &Instr, out: &mut Vec<usize>) {
    match instr {
        Instr::Op { outs, .. } => out.extend(outs),
        Instr::Const { out: o, .. } => out.push(*o),
        Instr::While { state, .. } => out.extend(state),
        Instr::Cond { outs, .. } => out.extend(outs),
        Instr::Hook { .. } => {}
    }
}

fn block_reads(block: &Block, out: &mut Vec<usize>) {
    for i in &block.code {
        reads(i, out);
    }
}

/// Each register written in this block is dropped after its last read here, unless the
/// block hands it on (`live_out`). Registers of enclosing blocks are never dropped here.
fn with_frees(code: Vec<Instr>, live_out: &[usize], also_own: &[usize]) -> Block {
    let keep: HashSet<usize> = live_out.iter().copied().collect();
    let mut own: HashSet<usize> = also_own.iter().copied().collect();
    let mut last_read = std::collections::HashMap::new();
    let mut buf = Vec::new();
    for (i, instr) in code.iter().enumerate() {
        buf.clear();
        reads(instr, &mut buf);
        for &r in &buf {
            last_read.insert(r, i);
        }
        buf.clear();
        writes(instr, &mut buf);
        own.extend(buf.iter().copied());
    }
    let mut free = vec![Vec::new(); code.len()];
    for (&r, &i) in &last_read {
        if own.contains(&r) && !keep.contains(&r) {
            free[i].push(r);
        }
    }
    let unit = unit_of(&code, &free, live_out);
    Block { code, free, unit }
}

/// The block as a function for the fusion lane, when it is straight-line code of at least
/// two ops built on the caller's stream (ops that evaluate or build on the worker's default
/// stream, and control flow and hooks, are left to replay) that hands something on.
fn unit_of(code: &[Instr], free: &[Vec<usize>], live_out: &[usize]) -> Option<Unit> {
    let mut ops = 0;
    for instr in code {
        match instr {
            Instr::Op { op, .. } if op.placement() == crate::op::Placement::Caller => ops += 1,
            Instr::Const { .. } => {}
            _ => return None,
        }
    }
    if ops < 2 {
        return None;
    }
    let mut written = HashSet::new();
    let mut seen = HashSet::new();
    let mut ins = Vec::new();
    let mut buf = Vec::new();
    for instr in code {
        buf.clear();
        reads(instr, &mut buf);
        for &r in &buf {
            if !written.contains(&r) && seen.insert(r) {
                ins.push(r);
            }
        }
        buf.clear();
        writes(instr, &mut buf);
        written.extend(buf.iter().copied());
    }
    let mut outs: Vec<usize> = Vec::new();
    for &r in live_out {
        if written.contains(&r) && !outs.contains(&r) {
            outs.push(r);
        }
    }
    if outs.is_empty() {
        return None;
    }
    let drop = free.iter().flatten().copied().collect();
    Some(Unit { ins, outs, drop })
}

/// `program_new(code, n_inputs, n_regs, outputs)`: decodes and validates a program (it may
/// run on any worker).
#[rustler::nif]
fn program_new<'a>(
    env: Env<'a>,
    code: Term<'a>,
    n_inputs: usize,
    n_regs: usize,
    outputs: Term<'a>,
    fuse: bool,
) -> Term<'a> {
    let result = (|| {
        if n_inputs > n_regs || n_regs > (1 << 24) {
            return Err(NifError::Argument(format!(
                "program: {n_inputs} inputs and {n_regs} registers"
            )));
        }
        let mut d = Decoder { n_regs, ops: 0 };
        let outputs = d.regs(outputs)?;
        let list: Vec<Term> = code
            .decode()
            .map_err(|_| NifError::Argument("program: expected a list of instructions".into()))?;
        let code = list
            .into_iter()
            .map(|t| d.instr(t))
            .collect::<NifResult<Vec<_>>>()?;
        // Inputs belong to the main block: they are dropped after their last read too.
        let inputs: Vec<usize> = (0..n_inputs).collect();
        let main = Arc::new(with_frees(code, &outputs, &inputs));
        let caller = caller_replay(&main, d.ops, fuse);
        Ok(ResourceArc::new(ProgramRes {
            n_inputs,
            n_regs,
            outputs,
            main,
            ops: d.ops,
            fuse,
            fused: Mutex::new(HashMap::new()),
            fallback: Mutex::new(None),
            unfused: AtomicBool::new(false),
            caller,
        }))
    })();
    crate::submit::reply(env, result.map(|p| p.encode(env)))
}

/// `program_info(program)`: `{n_inputs, n_regs, ops}`.
#[rustler::nif]
fn program_info(program: ResourceArc<ProgramRes>) -> (usize, usize, usize) {
    (program.n_inputs, program.n_regs, program.ops)
}

/// `program_fusion(program)`: `{fused_blocks, reason}`: how many blocks run fused on some
/// worker, and the first reason a block fell back to replay since the last call (`nil`
/// when none); the reason is cleared by reading it.
#[rustler::nif]
fn program_fusion(program: ResourceArc<ProgramRes>) -> (usize, Option<String>) {
    let fused = lock(&program.fused)
        .values()
        .filter(|f| f.is_some())
        .count();
    (fused, lock(&program.fallback).take())
}

/// `fusion_available(device)`: `{:ok, bool}`, whether `mx::compile` fuses on `device` in this
/// process now (see `mlx_bind::compile_enabled`).
#[rustler::nif]
fn fusion_available<'a>(env: Env<'a>, device: Term<'a>) -> Term<'a> {
    let result = crate::convert::device(device)
        .map(|d| (mlx_bind::is_available(d) && mlx_bind::compile_enabled(d)).encode(env));
    crate::submit::reply(env, result)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ProgramRes {
    fn note_fallback(&self, reason: String) {
        let mut f = lock(&self.fallback);
        if f.is_none() {
            *f = Some(reason);
        }
    }
}

/// `program_run(worker, program, inputs, tag)`: replays the program on `worker` with `inputs`,
/// replying `{:async, ref}` then `{ref, {:ok, [array, ...]}}` with the outputs, their
/// evaluation dispatched (hook messages, tagged `tag`, come before the reply). A program
/// replayed on the calling thread (see `caller_replay`) replies `{:ok, [array, ...]}` at once.
#[rustler::nif]
fn program_run<'a>(
    env: Env<'a>,
    worker: ResourceArc<WorkerRes>,
    program: ResourceArc<ProgramRes>,
    inputs: Vec<ResourceArc<ArrayRes>>,
    tag: u64,
) -> Term<'a> {
    if inputs.len() != program.n_inputs {
        return NifError::Argument(format!(
            "program: {} inputs given, {} expected",
            inputs.len(),
            program.n_inputs
        ))
        .encode(env);
    }
    let w = worker.0.clone();
    let refs: Vec<&ResourceArc<ArrayRes>> = inputs.iter().collect();
    if let Err(reply) = check_inputs(env, &w, &refs) {
        return reply;
    }
    let born = w.epoch();
    let pid = env.pid();
    if program.caller {
        let result = run_on_caller(&w, &program, &inputs, pid, tag, born);
        return crate::submit::reply(env, result.map(|arrays| arrays.encode(env)));
    }
    let w_job = w.clone();
    submit(env, &w, move |env, ctx| {
        let fuse = program.fuse && !program.unfused.load(Ordering::Relaxed);
        let arrays: Vec<Array> = inputs.iter().map(|a| a.array().clone()).collect();
        drop(inputs);
        // A fused run keeps its inputs until its outputs are evaluated: if MLX cannot build
        // the fused kernels (a CPU compiler failing at run time), the program runs again
        // unfused.
        let retry = fuse.then(|| arrays.clone());
        let mut run = Run {
            pid,
            tag,
            worker: &w_job,
            worker_id: ctx.worker_id,
            program: &program,
            fuse,
            fused_any: std::cell::Cell::new(false),
        };
        // The outputs come back dispatched, not waited for: the caller's read-back (or next
        // call) waits. The previous run dispatched here finishes before this one starts, so
        // one run computes while the next is built, and no more.
        let dispatch = |outputs: Vec<Array>| {
            wait_in_flight(ctx);
            let first = outputs.first().cloned();
            let arrays = dispatch_outputs(&w_job, outputs, born)?;
            *ctx.in_flight.borrow_mut() = first;
            Ok::<_, NifError>(arrays)
        };
        let result = replay(&program, arrays, &ctx.stream, &run).and_then(dispatch);
        let arrays = match (result, retry) {
            (Err(e), Some(inputs)) if run.fused_any.get() => {
                run.fuse = false;
                let outputs = replay(&program, inputs, &ctx.stream, &run)?;
                let arrays = dispatch(outputs)?;
                // Only a failure that replay does not share turns fusion off.
                program.unfused.store(true, Ordering::Relaxed);
                program.note_fallback(format!("a fused evaluation failed: {e}"));
                arrays
            }
            (result, _) => result?,
        };
        Ok(arrays.encode(env))
    })
}

/// Replays a program on the calling thread (see `caller_replay`) and queues the start of its
/// outputs' evaluation on the worker, as `program_run`'s job does it (after the previous
/// run dispatched there), without a reply: reading an output waits for it, and reports a
/// failure of the dispatch.
fn run_on_caller(
    w: &Arc<crate::worker::Worker>,
    program: &ProgramRes,
    inputs: &[ResourceArc<ArrayRes>],
    pid: rustler::LocalPid,
    tag: u64,
    born: u64,
) -> NifResult<Vec<ResourceArc<ArrayRes>>> {
    let arrays: Vec<Array> = inputs.iter().map(|a| a.array().clone()).collect();
    let run = Run {
        pid,
        tag,
        worker: w,
        worker_id: 0,
        program,
        fuse: false,
        fused_any: std::cell::Cell::new(false),
    };
    let outputs = replay(program, arrays, w.stream(), &run)?;
    outputs.iter().try_for_each(check_size)?;
    let results: Vec<ResourceArc<ArrayRes>> = outputs
        .iter()
        .map(|a| ArrayRes::lazy(a.clone(), w.clone(), 0))
        .collect();
    let held = results.clone();
    let job_worker = w.clone();
    // A full queue skips the dispatch: the outputs are then evaluated when read.
    let _ = w.post(Box::new(move |ctx| {
        wait_in_flight(ctx);
        let refs: Vec<&Array> = outputs.iter().collect();
        match job_worker.dispatch(&refs, born) {
            Ok(()) => *ctx.in_flight.borrow_mut() = outputs.first().cloned(),
            Err(message) => held.iter().for_each(|r| r.mark_failed(&message)),
        }
    }));
    Ok(results)
}

/// Waits for the run last dispatched on this worker (see `Ctx::in_flight`); its failure, if
/// any, is its reader's to report.
fn wait_in_flight(ctx: &crate::worker::Ctx) {
    if let Some(previous) = ctx.in_flight.borrow_mut().take() {
        let _ = mlx_bind::wait_all(&[&previous]);
    }
}

/// Runs the program's main block on `inputs`: its (lazy) outputs.
fn replay(
    program: &ProgramRes,
    inputs: Vec<Array>,
    s: &Stream,
    run: &Run,
) -> NifResult<Vec<Array>> {
    let mut regs: Vec<Option<Array>> = vec![None; program.n_regs];
    for (i, a) in inputs.into_iter().enumerate() {
        regs[i] = Some(a);
    }
    run_block(&program.main, &mut regs, s, run)?;
    values(&regs, &program.outputs)
}

/// Handles to the arrays in registers `rs`.
fn values(regs: &[Option<Array>], rs: &[usize]) -> NifResult<Vec<Array>> {
    rs.iter().map(|&r| get(regs, r).cloned()).collect()
}

/// Puts `arrays` in registers `rs`.
fn set(regs: &mut [Option<Array>], rs: &[usize], arrays: Vec<Array>) {
    for (&r, a) in rs.iter().zip(arrays) {
        regs[r] = Some(a);
    }
}

fn get(regs: &[Option<Array>], r: usize) -> NifResult<&Array> {
    regs[r].as_ref().ok_or_else(|| {
        NifError::Argument(format!("program: register {r} is read before it is set"))
    })
}

/// Where hook messages go.
struct Run<'w> {
    pid: rustler::LocalPid,
    tag: u64,
    worker: &'w std::sync::Arc<crate::worker::Worker>,
    worker_id: u64,
    program: &'w ProgramRes,
    /// Whether straight-line blocks run fused.
    fuse: bool,
    /// Set when a block ran fused.
    fused_any: std::cell::Cell<bool>,
}

/// Runs an op or a constant; false for other instructions.
fn step(instr: &Instr, regs: &mut [Option<Array>], s: &Stream) -> NifResult<bool> {
    match instr {
        Instr::Op {
            op,
            ins,
            outs,
            label,
        } => {
            let results = {
                let x = ins
                    .iter()
                    .map(|&r| get(regs, r))
                    .collect::<NifResult<Vec<&Array>>>()?;
                op.apply(&x, s).map_err(|e| label_error(e, label))?
            };
            // As an eager op is refused (see `check_size`): an intermediate larger than the
            // memory limit would crash MLX's CPU allocator at evaluation time.
            for a in &results {
                check_size(a).map_err(|e| label_error(e, label))?;
            }
            set(regs, outs, results);
            Ok(true)
        }
        Instr::Const { array, out } => {
            regs[*out] = Some(array.clone());
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// The block under `mx::compile`: MLX calls the closure once per input shapes (on tracer
/// arrays) and replays the traced, fused graph afterwards.
fn compile_block(block: Arc<Block>, n_regs: usize, s: Stream) -> mlx_bind::Compiled {
    mlx_bind::Compiled::new(move |tracers: &[Array]| {
        let to_mlx = |e: NifError| mlx_bind::Error {
            message: e.to_string(),
        };
        let unit = block.unit.as_ref().ok_or_else(|| mlx_bind::Error {
            message: "program: block is not straight-line".into(),
        })?;
        let mut regs: Vec<Option<Array>> = vec![None; n_regs];
        for (&r, a) in unit.ins.iter().zip(tracers) {
            regs[r] = Some(a.clone());
        }
        for instr in &block.code {
            if !step(instr, &mut regs, &s).map_err(to_mlx)? {
                return Err(mlx_bind::Error {
                    message: "program: control flow in a fused block".into(),
                });
            }
        }
        values(&regs, &unit.outs).map_err(to_mlx)
    })
}

/// Runs `block` fused when the fusion lane is on and it has a unit; false when it must be
/// replayed instead (nothing has been changed then).
fn run_fused(
    block: &Arc<Block>,
    regs: &mut [Option<Array>],
    s: &Stream,
    run: &Run,
) -> NifResult<bool> {
    let Some(unit) = (if run.fuse { block.unit.as_ref() } else { None }) else {
        return Ok(false);
    };
    let key = (run.worker_id, Arc::as_ptr(block) as usize);
    let compiled = {
        let mut map = lock(&run.program.fused);
        map.entry(key)
            .or_insert_with(|| {
                if mlx_bind::compile_enabled(s.device()) {
                    Some(Arc::new(compile_block(
                        block.clone(),
                        run.program.n_regs,
                        *s,
                    )))
                } else {
                    run.program.note_fallback(format!(
                        "mx::compile does not fuse on the {} here (MLX_DISABLE_COMPILE set, or \
                         no g++ on PATH, or SIGCHLD ignored)",
                        s.device().name()
                    ));
                    None
                }
            })
            .clone()
    };
    let Some(compiled) = compiled else {
        return Ok(false);
    };
    let outs = {
        let ins = unit
            .ins
            .iter()
            .map(|&r| get(regs, r))
            .collect::<NifResult<Vec<&Array>>>()?;
        compiled.call(&ins)
    };
    match outs {
        Ok(outs) => {
            for &r in &unit.drop {
                regs[r] = None;
            }
            set(regs, &unit.outs, outs);
            run.fused_any.set(true);
            Ok(true)
        }
        Err(e) => {
            lock(&run.program.fused).insert(key, None);
            run.program
                .note_fallback(format!("a block could not be traced: {}", e.message));
            Ok(false)
        }
    }
}

fn run_block(
    block: &Arc<Block>,
    regs: &mut [Option<Array>],
    s: &Stream,
    run: &Run,
) -> NifResult<()> {
    if run_fused(block, regs, s, run)? {
        return Ok(());
    }
    for (instr, free) in block.code.iter().zip(&block.free) {
        if step(instr, regs, s)? {
            for &r in free {
                regs[r] = None;
            }
            continue;
        }
        match instr {
            Instr::Op { .. } | Instr::Const { .. } => {}
            Instr::While {
                init,
                state,
                cond,
                pred,
                body,
                next,
                next_own,
            } => {
                let start = values(regs, init)?;
                set(regs, state, start);
                loop {
                    run_block(cond, regs, s, run)?;
                    let go = {
                        let mut eval: Vec<&Array> = vec![get(regs, *pred)?];
                        for &r in state {
                            eval.push(get(regs, r)?);
                        }
                        truth(&eval, s, run)?
                    };
                    if !go {
                        break;
                    }
                    run_block(body, regs, s, run)?;
                    let updated = values(regs, next)?;
                    for &r in next_own {
                        regs[r] = None;
                    }
                    set(regs, state, updated);
                }
            }
            Instr::Cond {
                clauses,
                last,
                last_results,
                outs,
            } => {
                let mut chosen = None;
                for (pred_code, pred, code, results) in clauses {
                    run_block(pred_code, regs, s, run)?;
                    let go = truth(&[get(regs, *pred)?], s, run)?;
                    if go {
                        chosen = Some((code, results));
                        break;
                    }
                }
                let (code, results) = chosen.unwrap_or((last, last_results));
                run_block(code, regs, s, run)?;
                let taken = values(regs, results)?;
                set(regs, outs, taken);
            }
            Instr::Hook { id, regs: hooked } => {
                let hooked = values(regs, hooked)?;
                let refs: Vec<&Array> = hooked.iter().collect();
                mlx_bind::async_eval_all(&refs)?;
                let (spin, _token) = crate::worker::completion_spin(run.worker.device());
                mlx_bind::wait_all_spin(&refs, spin)?;
                let arrays = ready_arrays(run.worker, hooked, run.worker_id);
                let mut owned = rustler::env::OwnedEnv::new();
                let _ = owned.send_and_clear(&run.pid, |env| {
                    (atoms::nx_mlx_hook(), run.tag, *id, arrays).encode(env)
                });
            }
        }
        for &r in free {
            regs[r] = None;
        }
    }
    Ok(())
}

/// Evaluates `arrays` together and tells whether the first (a scalar) is non-zero.
fn truth(arrays: &[&Array], s: &Stream, run: &Run) -> NifResult<bool> {
    mlx_bind::async_eval_all(arrays)?;
    let (spin, _token) = crate::worker::completion_spin(run.worker.device());
    if spin > 0 {
        mlx_bind::wait_all_spin(&arrays[..1], spin)?;
    }
    let bytes = arrays[0].to_bytes(s)?;
    Ok(bytes.iter().any(|&b| b != 0))
}

fn label_error(e: NifError, label: &str) -> NifError {
    match e {
        NifError::Argument(m) => NifError::Argument(format!("{label}: {m}")),
        NifError::Runtime(m) => NifError::Runtime(format!("{label}: {m}")),
        other => other,
    }
}
