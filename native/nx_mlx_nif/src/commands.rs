//! Asynchronous commands, the NIF side: `submit` returns a command at once, `poll` reads its
//! state without blocking, `wait` replies by message once it is done (see `command`).

use std::sync::Arc;

use mlx_bind::Array;
use rustler::env::OwnedEnv;
use rustler::{Encoder, Env, Resource, ResourceArc, Term};

use crate::command::{self, Command, Status, Target};
use crate::error::NifError;
use crate::resources::ArrayRes;
use crate::submit::{pending, reply};
use crate::worker::Worker;

mod atoms {
    rustler::atoms! { ok, pending, running, completed, failed, status, duration_ns, first_report }
}

#[derive(Clone)]
pub struct ArrayTarget(ResourceArc<ArrayRes>);

impl Target for ArrayTarget {
    fn array(&self) -> &Array {
        self.0.array()
    }
    fn worker(&self) -> &Arc<Worker> {
        self.0.worker()
    }
    fn born(&self) -> u64 {
        self.0.born
    }
    fn done(&self, worker_id: u64, result: Result<(), &str>) {
        match result {
            Ok(()) => self.0.mark_evaluated(worker_id),
            Err(m) => self.0.mark_failed(m),
        }
    }
}

pub struct CommandRes(Arc<Command<ArrayTarget>>);

#[rustler::resource_impl]
impl Resource for CommandRes {}

fn status_atom(s: Status) -> rustler::Atom {
    match s {
        Status::Pending => atoms::pending(),
        Status::Running => atoms::running(),
        Status::Completed => atoms::completed(),
        Status::Failed => atoms::failed(),
    }
}

fn outcome<'a>(env: Env<'a>, r: Result<(), String>) -> Term<'a> {
    match r {
        Ok(()) => (atoms::ok(), atoms::ok()).encode(env),
        Err(m) => NifError::Runtime(m).encode(env),
    }
}

/// `submit(arrays)`: starts evaluating `arrays` (grouped by worker, one job per worker) and
/// returns `{:ok, command}` at once.
#[rustler::nif]
fn submit(env: Env, arrays: Vec<ResourceArc<ArrayRes>>) -> Term {
    for a in &arrays {
        if let Err(e) = a.check() {
            return e.encode(env);
        }
    }
    let cmd = Command::submit(arrays.into_iter().map(ArrayTarget).collect());
    reply(env, Ok(ResourceArc::new(CommandRes(cmd)).encode(env)))
}

/// `poll(command)`: `:pending | :running | :completed | :failed`; never blocks.
#[rustler::nif]
fn poll(command: ResourceArc<CommandRes>) -> rustler::Atom {
    status_atom(command.0.status())
}

/// `wait(command)`: `{:ok, :ok}` or `{:error, {:runtime, message}}` when the command is done;
/// otherwise `{:async, ref}` and the same reply arrives as `{ref, reply}` once it is.
#[rustler::nif]
fn wait(env: Env, command: ResourceArc<CommandRes>) -> Term {
    let mut owned = OwnedEnv::new();
    let r = env.make_ref();
    let saved = owned.save(r);
    let pid = env.pid();
    let waiter = Box::new(move |result: Result<(), String>| {
        let _ = owned.send_and_clear(&pid, |env| {
            let r = saved.load(env);
            (r, outcome(env, result)).encode(env)
        });
    });
    match command.0.wait_or_register(waiter) {
        Some(result) => outcome(env, result),
        None => pending(env, r.encode(env)),
    }
}

/// `command_info(command)`: `%{status, duration_ns, first_report}`; `duration_ns` (submission
/// to completion) is 0 until done; `first_report` is true exactly once, the first time a
/// finished status is read this way (for a single telemetry event per command).
#[rustler::nif]
fn command_info(env: Env, command: ResourceArc<CommandRes>) -> Term {
    let cmd = &command.0;
    let status = status_atom(cmd.status());
    let first = cmd.take_first_report();
    let map = rustler::types::map::map_new(env);
    let pairs: [(Term, Term); 3] = [
        (atoms::status().encode(env), status.encode(env)),
        (
            atoms::duration_ns().encode(env),
            cmd.duration_ns().encode(env),
        ),
        (atoms::first_report().encode(env), first.encode(env)),
    ];
    pairs
        .into_iter()
        .fold(map, |m, (k, v)| m.map_put(k, v).unwrap_or(m))
}

/// `live_commands()`: command records alive (for tests of their release).
#[rustler::nif(name = "live_commands")]
fn live_commands_nif() -> usize {
    command::live_commands()
}
