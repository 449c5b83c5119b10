//! Asynchronous commands, the BEAM-free core: a command evaluates groups of arrays, one job per
//! worker, and settles once every group is done.
//!
//! States are MLX's own: `Pending` while the job waits in the worker's queue, `Running` once
//! `async_eval` has handed the graph to MLX (on the CPU, MLX runs it on the stream's thread),
//! `Completed` or `Failed` when MLX's completion events for the arrays have fired (a failed
//! task's error travels with its event). The command keeps its arrays only until then.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mlx_bind::Array;

use crate::worker::Worker;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pending,
    Running,
    Completed,
    Failed,
}

const PENDING: u8 = 0;
const RUNNING: u8 = 1;
const COMPLETED: u8 = 2;
const FAILED: u8 = 3;

static LIVE_COMMANDS: AtomicUsize = AtomicUsize::new(0);

/// Command records alive.
pub fn live_commands() -> usize {
    LIVE_COMMANDS.load(Ordering::SeqCst)
}

/// What a command evaluates: an array, told the outcome on the worker thread.
pub trait Target: Send + Sync + 'static {
    fn array(&self) -> &Array;
    fn worker(&self) -> &Arc<Worker>;
    /// The worker's failure epoch when the array was created (see `Worker::evaluate`).
    fn born(&self) -> u64;
    fn done(&self, worker_id: u64, result: Result<(), &str>);
}

/// Told the outcome once the command settles (on the thread that settles it).
pub type Waiter = Box<dyn FnOnce(Result<(), String>) + Send>;

struct Inner<T> {
    waiters: Vec<Waiter>,
    targets: Vec<T>,
    error: Option<String>,
    parts_left: usize,
}

pub struct Command<T> {
    state: AtomicU8,
    inner: Mutex<Inner<T>>,
    submitted: Instant,
    duration_ns: AtomicU64,
    reported: AtomicBool,
}

impl<T> Drop for Command<T> {
    fn drop(&mut self) {
        LIVE_COMMANDS.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<T: Target + Clone> Command<T> {
    /// Queues the evaluation of `targets`, one job per worker, and returns at once. A group
    /// that cannot be queued (full queue, stopped worker) fails the command.
    pub fn submit(targets: Vec<T>) -> Arc<Command<T>> {
        let mut groups: Vec<Vec<T>> = Vec::new();
        for t in &targets {
            match groups
                .iter_mut()
                .find(|g| Arc::ptr_eq(g[0].worker(), t.worker()))
            {
                Some(g) => g.push(t.clone()),
                None => groups.push(vec![t.clone()]),
            }
        }
        LIVE_COMMANDS.fetch_add(1, Ordering::SeqCst);
        let command = Arc::new(Command {
            state: AtomicU8::new(PENDING),
            inner: Mutex::new(Inner {
                waiters: Vec::new(),
                targets,
                error: None,
                parts_left: groups.len().max(1),
            }),
            submitted: Instant::now(),
            duration_ns: AtomicU64::new(0),
            reported: AtomicBool::new(false),
        });
        if groups.is_empty() {
            command.part_done(None);
        }
        for group in groups {
            let worker = group[0].worker().clone();
            let cmd = command.clone();
            let posted = worker.post(Box::new(move |ctx| {
                cmd.start();
                // Whatever happens, the command settles: a waiter must never wait forever.
                let outcome = catch_unwind(AssertUnwindSafe(|| {
                    let arrays: Vec<&Array> = group.iter().map(|t| t.array()).collect();
                    let born = group.iter().map(|t| t.born()).min().unwrap_or(0);
                    // Polls for completion for a while (with a token) instead of sleeping
                    // at once: a waiting thread's wake-up costs more than small graphs.
                    let (spin, token) = crate::worker::completion_spin(group[0].worker().device());
                    let error = group[0].worker().evaluate(&arrays, born, spin).err();
                    drop(token);
                    for t in &group {
                        t.done(ctx.worker_id, error.as_deref().map_or(Ok(()), Err));
                    }
                    error
                }));
                let error =
                    outcome.unwrap_or_else(|_| Some("internal panic while evaluating".to_string()));
                cmd.part_done(error);
            }));
            if let Err(e) = posted {
                command.part_done(Some(format!("could not queue the evaluation: {e}")));
            }
        }
        command
    }
}

impl<T> Command<T> {
    fn start(&self) {
        let _ = self
            .state
            .compare_exchange(PENDING, RUNNING, Ordering::AcqRel, Ordering::Acquire);
    }

    /// One group is done; the last one settles the command, drops its arrays and tells the
    /// waiters.
    fn part_done(&self, error: Option<String>) {
        let (waiters, targets, outcome) = {
            let Ok(mut inner) = self.inner.lock() else {
                return;
            };
            if inner.error.is_none() {
                inner.error = error;
            }
            inner.parts_left = inner.parts_left.saturating_sub(1);
            if inner.parts_left > 0 {
                return;
            }
            self.duration_ns.store(
                self.submitted.elapsed().as_nanos() as u64,
                Ordering::Relaxed,
            );
            let state = if inner.error.is_some() {
                FAILED
            } else {
                COMPLETED
            };
            self.state.store(state, Ordering::Release);
            (
                std::mem::take(&mut inner.waiters),
                std::mem::take(&mut inner.targets),
                inner.error.clone(),
            )
        };
        drop(targets);
        for w in waiters {
            w(outcome.clone().map_or(Ok(()), Err));
        }
    }

    pub fn status(&self) -> Status {
        match self.state.load(Ordering::Acquire) {
            RUNNING => Status::Running,
            COMPLETED => Status::Completed,
            FAILED => Status::Failed,
            _ => Status::Pending,
        }
    }

    /// The outcome if settled; otherwise `waiter` is kept and called once it settles.
    pub fn wait_or_register(&self, waiter: Waiter) -> Option<Result<(), String>> {
        let Ok(mut inner) = self.inner.lock() else {
            return Some(Err("command state poisoned".to_string()));
        };
        match self.state.load(Ordering::Acquire) {
            COMPLETED => Some(Ok(())),
            FAILED => Some(Err(inner.error.clone().unwrap_or_default())),
            _ => {
                inner.waiters.push(waiter);
                None
            }
        }
    }

    /// Nanoseconds from submission to completion (0 until settled).
    pub fn duration_ns(&self) -> u64 {
        self.duration_ns.load(Ordering::Relaxed)
    }

    /// True exactly once, the first time it is asked after the command settled.
    pub fn take_first_report(&self) -> bool {
        matches!(self.status(), Status::Completed | Status::Failed)
            && !self.reported.swap(true, Ordering::AcqRel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::bounded;
    use mlx_bind::{BinaryOp, DeviceKind, Dtype};
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    /// The tests of this module count live commands, a process-wide figure: they run one at a
    /// time so that one test's commands do not show in another's count.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    struct Inner {
        array: Array,
        worker: Arc<Worker>,
        done_on: AtomicU64,
        error: Mutex<Option<String>>,
    }

    #[derive(Clone)]
    struct T(Arc<Inner>);

    impl Target for T {
        fn array(&self) -> &Array {
            &self.0.array
        }
        fn worker(&self) -> &Arc<Worker> {
            &self.0.worker
        }
        fn born(&self) -> u64 {
            0
        }
        fn done(&self, worker_id: u64, result: Result<(), &str>) {
            self.0.done_on.store(worker_id, Ordering::SeqCst);
            *self.0.error.lock().unwrap() = result.err().map(str::to_string);
        }
    }

    fn target(a: Array, w: &Arc<Worker>) -> T {
        T(Arc::new(Inner {
            array: a,
            worker: w.clone(),
            done_on: AtomicU64::new(0),
            error: Mutex::new(None),
        }))
    }

    fn wait(cmd: &Command<T>) -> Result<(), String> {
        let (tx, rx) = bounded(1);
        match cmd.wait_or_register(Box::new(move |r| tx.send(r).unwrap())) {
            Some(r) => r,
            None => rx.recv_timeout(Duration::from_secs(30)).unwrap(),
        }
    }

    #[test]
    fn a_long_evaluation_is_running_then_completed() {
        let _serial = serial();
        let w = Worker::spawn_blocking(DeviceKind::Cpu).unwrap();
        let s = *w.stream();
        let a = mlx_bind::random_uniform(&[512, 512], Dtype::F32, 1, &s).unwrap();
        let mut x = a.clone();
        for _ in 0..60 {
            x = mlx_bind::matmul(&x, &a, &s).unwrap();
        }
        let t = target(x, &w);
        let cmd = Command::submit(vec![t.clone()]);
        let mut seen = vec![cmd.status()];
        while !matches!(cmd.status(), Status::Completed | Status::Failed) {
            let st = cmd.status();
            if seen.last() != Some(&st) {
                seen.push(st);
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        assert!(seen.contains(&Status::Running), "{seen:?}");
        assert_eq!(wait(&cmd), Ok(()));
        assert_eq!(cmd.status(), Status::Completed);
        assert!(cmd.duration_ns() > 0);
        assert_eq!(t.0.done_on.load(Ordering::SeqCst), w.id());
        assert!(cmd.take_first_report());
        assert!(!cmd.take_first_report());
    }

    #[test]
    fn a_failing_evaluation_fails_with_the_reason() {
        let _serial = serial();
        let w = Worker::spawn_blocking(DeviceKind::Cpu).unwrap();
        let s = *w.stream();
        let z = mlx_bind::full(&[4, 4], 0.0, Dtype::F32, &s).unwrap();
        let i = mlx_bind::inv(&z, &s).unwrap();
        let t = target(i, &w);
        let cmd = Command::submit(vec![t.clone()]);
        let err = wait(&cmd).unwrap_err();
        assert!(err.contains("Inverse"), "{err}");
        assert_eq!(cmd.status(), Status::Failed);
        assert!(t.0.error.lock().unwrap().is_some());
    }

    #[test]
    fn groups_on_two_workers_settle_together_and_records_are_freed() {
        let _serial = serial();
        let w1 = Worker::spawn_blocking(DeviceKind::Cpu).unwrap();
        let w2 = Worker::spawn_blocking(DeviceKind::Cpu).unwrap();
        let mk = |w: &Arc<Worker>| {
            let s = *w.stream();
            let a = mlx_bind::full(&[8], 1.0, Dtype::F32, &s).unwrap();
            target(mlx_bind::binary(BinaryOp::Add, &a, &a, &s).unwrap(), w)
        };
        let (t1, t2) = (mk(&w1), mk(&w2));
        let before = live_commands();
        let cmd = Command::submit(vec![t1.clone(), t2.clone()]);
        assert!(live_commands() >= 1);
        assert_eq!(wait(&cmd), Ok(()));
        assert_eq!(t1.0.done_on.load(Ordering::SeqCst), w1.id());
        assert_eq!(t2.0.done_on.load(Ordering::SeqCst), w2.id());
        // The settled command no longer holds its arrays (the workers drop their handles
        // just after reporting, so give them a moment).
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while Arc::strong_count(&t1.0) > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(Arc::strong_count(&t1.0), 1);
        drop(cmd);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while live_commands() > before && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(live_commands() <= before);
    }
}
