//! Asynchronous replies: a NIF call posts a job to a worker and returns `{:async, ref}` at
//! once; the worker runs the job and sends `{ref, {:ok, value} | {:error, {kind, message}}}` to
//! the calling process, which waits for it in `receive`. Calls that finish on the spot return
//! `{:ok, value}` instead.

use std::panic::{catch_unwind, AssertUnwindSafe};

use rustler::env::{OwnedEnv, SavedTerm};
use rustler::{Encoder, Env, LocalPid, Term};

use crate::error::{NifError, NifResult};
use crate::worker::{Ctx, Worker};

mod atoms {
    rustler::atoms! { ok, r#async = "async" }
}

pub struct Submission {
    owned: OwnedEnv,
    reply_ref: SavedTerm,
    pid: LocalPid,
}

impl Submission {
    pub fn new(env: Env) -> (Submission, Term) {
        let owned = OwnedEnv::new();
        let r = env.make_ref();
        let reply_ref = owned.save(r);
        (
            Submission {
                owned,
                reply_ref,
                pid: env.pid(),
            },
            r.encode(env),
        )
    }

    /// Copies `term` (e.g. an input binary, by reference) into the submission's environment,
    /// for the job to load.
    pub fn save(&self, term: Term) -> SavedTerm {
        self.owned.save(term)
    }

    /// Posts `job` to `worker`. The job builds its reply value in the message environment.
    pub fn post<F>(self, worker: &Worker, job: F) -> NifResult<()>
    where
        F: for<'b> FnOnce(Env<'b>, &Ctx) -> NifResult<Term<'b>> + Send + 'static,
    {
        let Submission {
            mut owned,
            reply_ref,
            pid,
        } = self;
        worker.post(Box::new(move |ctx| {
            let _ = owned.send_and_clear(&pid, |env| {
                let r = reply_ref.load(env);
                let result =
                    catch_unwind(AssertUnwindSafe(|| job(env, ctx))).unwrap_or_else(|_| {
                        Err(NifError::Runtime("internal panic in nx_mlx worker".into()))
                    });
                match result {
                    Ok(value) => (r, (atoms::ok(), value)).encode(env),
                    Err(e) => (r, e).encode(env),
                }
            });
        }))
    }
}

/// Runs `job` on `worker` and returns `{:async, ref}`, or `{:error, reason}` when it could not
/// be queued.
pub fn submit<'a, F>(env: Env<'a>, worker: &Worker, job: F) -> Term<'a>
where
    F: for<'b> FnOnce(Env<'b>, &Ctx) -> NifResult<Term<'b>> + Send + 'static,
{
    let (submission, r) = Submission::new(env);
    match submission.post(worker, job) {
        Ok(()) => (atoms::r#async(), r).encode(env),
        Err(e) => e.encode(env),
    }
}

/// `{:async, ref}` for a reply that will come as a message tagged `ref`.
pub fn pending<'a>(env: Env<'a>, r: Term<'a>) -> Term<'a> {
    (atoms::r#async(), r).encode(env)
}

pub fn reply<'a>(env: Env<'a>, result: NifResult<Term<'a>>) -> Term<'a> {
    match result {
        Ok(t) => (atoms::ok(), t).encode(env),
        Err(e) => e.encode(env),
    }
}
