//! Workers: one OS thread owning one MLX stream on one device.
//!
//! MLX evaluates a stream only on the thread that created it, so every evaluation of arrays
//! built on a worker's stream happens on that worker. Building lazy ops does not: callers build
//! them on their own thread, naming the worker's [`Stream`], and post only evaluations here.
//!
//! Callers post jobs on a bounded channel and return at once (a full channel is reported as
//! `Busy`: back-pressure, not unbounded memory); the worker runs them in order. When the last
//! handle to a worker is dropped the channel closes, the worker finishes the jobs already
//! queued, frees the arrays handed to it, and exits; a reaper thread joins it, so no scheduler
//! and no destructor ever waits for a thread. This module knows nothing of the BEAM: a job is a
//! plain closure.

use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender, TryRecvError, TrySendError};
use mlx_bind::{Array, DeviceKind, Stream};
use once_cell::sync::Lazy;

use crate::error::{NifError, NifResult};

/// Jobs a worker's channel holds before `post` reports `Busy` (back-pressure).
pub const QUEUE_CAPACITY: usize = 4096;

/// Arrays handed back for release before the worker is woken to free them.
const GARBAGE_WAKE: usize = 1024;

/// Larger arrays wake the worker at once when released (their memory should come back now).
const RELEASE_INLINE_BYTES: usize = 64 * 1024;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static LIVE_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Every running worker, so that process exit can stop them (weak: a worker still stops
/// when its last handle is dropped).
static RUNNING: Lazy<Mutex<HashMap<u64, Weak<Worker>>>> = Lazy::new(|| Mutex::new(HashMap::new()));

/// Set when the process exits: workers stop instead of taking the next job.
static HALTING: AtomicBool = AtomicBool::new(false);

/// How long process exit waits for workers to finish their current job.
const HALT_WAIT: Duration = Duration::from_secs(2);

thread_local! {
    static CURRENT_WORKER: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// What a job sees: the worker's id and stream, and state that stays on the worker thread.
pub struct Ctx {
    pub worker_id: u64,
    pub stream: Stream,
    /// An output of the latest program run dispatched here without waiting (see
    /// `program_run`): the next run waits for it before dispatching, so that at most one run
    /// computes while the next is built; an idle worker waits for it and lets it go.
    pub in_flight: std::cell::RefCell<Option<Array>>,
}

pub type JobFn = Box<dyn FnOnce(&Ctx) + Send + 'static>;

enum Job {
    Run(JobFn),
    /// Wake-up to free the arrays in the garbage channel.
    Collect,
    /// The process is exiting: stop after the jobs before this one (see [`quiesce_at_exit`]).
    Halt,
}

/// Called once, on the worker thread, when the worker is ready (or failed to start).
pub type OnReady = Box<dyn FnOnce(NifResult<Arc<Worker>>) + Send + 'static>;

/// Called on the worker thread just before it exits, with the worker's id and device.
pub type OnExit = fn(u64, DeviceKind);

static ON_EXIT: Lazy<Mutex<Option<OnExit>>> = Lazy::new(|| Mutex::new(None));

/// Sets the function every worker calls when it stops (e.g. to emit a lifecycle event).
pub fn set_on_exit(f: OnExit) {
    if let Ok(mut g) = ON_EXIT.lock() {
        *g = Some(f);
    }
}

pub struct Worker {
    id: u64,
    device: DeviceKind,
    stream: Stream,
    sender: Sender<Job>,
    garbage: Sender<Array>,
    garbage_len: Arc<AtomicUsize>,
    collect_pending: Arc<AtomicBool>,
    failed: Mutex<Failed>,
    /// Failures so far (the current failure epoch).
    failures: AtomicU64,
}

/// Nodes of graphs whose evaluation failed, by MLX node id, with the failure's epoch. MLX
/// marks every node of a graph computed before its tasks run, and a failed task leaves its
/// output (and everything computed from it) unwritten; so these nodes, and whatever reads
/// them, must never be read.
///
/// Ids are unique only among live nodes, and no handle is kept, so an id only counts for
/// arrays that already existed at that failure (created at an earlier epoch): a node alive
/// then still has that id; a node created later may merely reuse the address.
#[derive(Default)]
struct Failed {
    ids: HashMap<u64, u64>,
}

/// Failed nodes remembered per worker before they are forgotten.
const FAILED_CAP: usize = 1 << 20;

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Worker({}, {})", self.id, self.device.name())
    }
}

impl Worker {
    /// Starts a worker thread for `device`; `on_ready` gets the worker once its stream exists.
    /// Fails at once, without touching MLX's stream machinery, when the device is not
    /// available (MLX would terminate the process).
    pub fn spawn(device: DeviceKind, on_ready: OnReady) -> NifResult<()> {
        if !mlx_bind::is_available(device) {
            return Err(NifError::Argument(format!(
                "device {} is not available (this libmlx build has no such device)",
                device.name()
            )));
        }
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = bounded::<Job>(QUEUE_CAPACITY);
        LIVE_THREADS.fetch_add(1, Ordering::SeqCst);
        let spawned = thread::Builder::new()
            .name(format!("nx_mlx-{}-{}", device.name(), id))
            .spawn(move || {
                run(id, device, sender, receiver, on_ready);
                reaper_send(Reap::Exited(id));
            });
        match spawned {
            Ok(handle) => {
                reaper_send(Reap::Spawned(id, handle));
                Ok(())
            }
            Err(e) => {
                LIVE_THREADS.fetch_sub(1, Ordering::SeqCst);
                Err(NifError::Runtime(format!(
                    "could not start worker thread: {e}"
                )))
            }
        }
    }

    /// [`Worker::spawn`], waiting for the worker to be ready. For tests and process start-up,
    /// never for a scheduler thread.
    pub fn spawn_blocking(device: DeviceKind) -> NifResult<Arc<Worker>> {
        let (tx, rx) = bounded(1);
        Worker::spawn(
            device,
            Box::new(move |w| {
                let _ = tx.send(w);
            }),
        )?;
        rx.recv()
            .map_err(|_| NifError::Runtime("worker thread ended before it was ready".into()))?
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn device(&self) -> DeviceKind {
        self.device
    }

    /// The worker's stream: lazy ops may be built on any thread naming it; only the worker
    /// evaluates them.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Queues `job`; never blocks. `Busy` when the queue is full.
    pub fn post(&self, job: JobFn) -> NifResult<()> {
        match self.sender.try_send(Job::Run(job)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(NifError::Busy),
            Err(TrySendError::Disconnected(_)) => {
                Err(NifError::Runtime("worker has stopped".to_string()))
            }
        }
    }

    /// Hands `array` to the worker to be freed there: freeing a lazy graph, a large buffer or
    /// device memory may take longer than a scheduler should spend. Never blocks; wakes the
    /// worker for a large array or once enough arrays have piled up.
    pub fn release(&self, array: Array) {
        let large = array.nbytes() > RELEASE_INLINE_BYTES;
        let n = self.garbage_len.fetch_add(1, Ordering::Relaxed) + 1;
        if let Err(e) = self.garbage.send(array) {
            // Only when the worker is gone: nothing can evaluate the array any more.
            self.garbage_len.fetch_sub(1, Ordering::Relaxed);
            drop(e.into_inner());
            return;
        }
        if (large || n >= GARBAGE_WAKE)
            && !self.collect_pending.swap(true, Ordering::AcqRel)
            && self.sender.try_send(Job::Collect).is_err()
        {
            // Full queue: the worker frees garbage after every job anyway.
            self.collect_pending.store(false, Ordering::Release);
        }
    }

    /// The failure epoch: how many evaluations failed on this worker so far. Arrays record it
    /// when created.
    pub fn epoch(&self) -> u64 {
        self.failures.load(Ordering::Acquire)
    }

    /// Whether `array`, created at epoch `born`, belongs to a graph whose evaluation failed on
    /// this worker since.
    pub fn is_failed(&self, array: &Array, born: u64) -> bool {
        if self.epoch() <= born {
            return false;
        }
        match self.failed.lock() {
            Ok(f) => f.ids.get(&array.id()).is_some_and(|&e| e > born),
            Err(_) => true,
        }
    }

    /// Evaluates `arrays` as one graph and waits for them. Call it on this worker's thread.
    /// `born`: the earliest epoch at which one of `arrays` was created. A graph that reads a
    /// node of a graph that failed since fails without running; a failing graph has all its
    /// nodes remembered as failed. `spin_us`: see `mlx_bind::Array::eval_spin`.
    ///
    /// Arrays created before the latest failure must not be used to build new ops without
    /// being evaluated first (see `build`): that keeps this check sound, since every node of
    /// such a graph was alive at the failure.
    pub fn evaluate(&self, arrays: &[&Array], born: u64, spin_us: u32) -> Result<(), String> {
        let spin_us = if self.device == DeviceKind::Gpu && spin_us > 0 {
            GPU_EVAL_SPIN_US
        } else {
            spin_us
        };
        let scan = self.check_graph(arrays, born)?;
        let result = match arrays {
            [one] => one.eval_spin(spin_us),
            _ => mlx_bind::async_eval_all(arrays).and_then(|_| {
                if self.device == DeviceKind::Gpu {
                    mlx_bind::wait_all_spin(arrays, spin_us)
                } else {
                    mlx_bind::wait_all(arrays)
                }
            }),
        };
        result.map_err(|e| {
            self.remember_failed(&scan.pending);
            e.message
        })
    }

    /// Starts evaluating `arrays` as one graph without waiting for them, with the checks of
    /// [`evaluate`](Worker::evaluate); a failure MLX reports only when the work completes
    /// comes from the evaluation that waits for them. Call it on this worker's thread.
    pub fn dispatch(&self, arrays: &[&Array], born: u64) -> Result<(), String> {
        let scan = self.check_graph(arrays, born)?;
        mlx_bind::async_eval_all(arrays).map_err(|e| {
            self.remember_failed(&scan.pending);
            e.message
        })
    }

    /// The graph of `arrays`, refused when it reads a node of a graph that failed since
    /// `born` (its pending nodes are then remembered as failed too).
    fn check_graph(&self, arrays: &[&Array], born: u64) -> Result<mlx_bind::GraphScan, String> {
        let scan = mlx_bind::scan_graph(arrays);
        if self.epoch() > born {
            let poisoned = match self.failed.lock() {
                Ok(f) => scan
                    .boundary
                    .iter()
                    .chain(scan.pending.iter())
                    .any(|id| f.ids.get(id).is_some_and(|&e| e > born)),
                Err(_) => true,
            };
            if poisoned {
                self.remember_failed(&scan.pending);
                return Err("it reads an array whose evaluation failed earlier".to_string());
            }
        }
        Ok(scan)
    }

    fn remember_failed(&self, ids: &[u64]) {
        if let Ok(mut f) = self.failed.lock() {
            if f.ids.len() > FAILED_CAP {
                f.ids.clear();
            }
            let epoch = self.failures.load(Ordering::Acquire) + 1;
            f.ids.extend(ids.iter().map(|&id| (id, epoch)));
            self.failures.store(epoch, Ordering::Release);
        }
    }
}

fn run(
    id: u64,
    device: DeviceKind,
    sender: Sender<Job>,
    receiver: Receiver<Job>,
    on_ready: OnReady,
) {
    CURRENT_WORKER.with(|c| c.set(id));
    if device == DeviceKind::Cpu {
        // Only CPU workers compete with the schedulers for cores. A GPU worker mostly waits,
        // and threads the GPU runtime starts from it must answer quickly: measured on an H200,
        // a niced GPU worker read a 16-element result back in 160-190 us instead of 40-45.
        // Set before the stream exists, so that the thread MLX runs the stream's kernels on
        // inherits both. SCHED_BATCH keeps a thread this one wakes from preempting it: the
        // worker hands its stream thread one op at a time, and with the stream thread at a
        // higher priority (or just a sleeper's credit) each op cost two context switches.
        // Measured on 2 vCPUs, for a 12-op program: about 70 context switches per call with
        // the stream thread at nice 0 under a nice-19 worker, 6-33 with both at nice 19,
        // 4-5 with both at nice 19 and SCHED_BATCH; a 16-element read-back 33, 19-27 and
        // 13-17 us; the normal-priority ping of the 200-process load test p99 5.2, 0.5-0.6
        // and 0.2-0.45 ms.
        batch_policy();
        lower_thread_priority(NICE.load(Ordering::Relaxed));
    }
    let stream = match Stream::new(device).and_then(|s| s.make_default().map(|_| s)) {
        Ok(s) => s,
        Err(e) => {
            on_ready(Err(NifError::Runtime(e.message)));
            return;
        }
    };
    install_exit_hook(&stream);
    let (garbage, garbage_rx) = unbounded::<Array>();
    let garbage_len = Arc::new(AtomicUsize::new(0));
    let collect_pending = Arc::new(AtomicBool::new(false));
    let worker = Arc::new(Worker {
        id,
        device,
        stream,
        sender,
        garbage,
        garbage_len: garbage_len.clone(),
        collect_pending: collect_pending.clone(),
        failed: Mutex::new(Failed::default()),
        failures: AtomicU64::new(0),
    });
    if let Ok(mut running) = RUNNING.lock() {
        running.insert(id, Arc::downgrade(&worker));
    }
    // From here on the worker lives as long as handles to it (and the jobs they queued) do.
    on_ready(Ok(worker));

    let ctx = Ctx {
        worker_id: id,
        stream,
        in_flight: std::cell::RefCell::new(None),
    };
    let collect = || {
        collect_pending.store(false, Ordering::Release);
        for a in garbage_rx.try_iter() {
            garbage_len.fetch_sub(1, Ordering::Relaxed);
            drop(a);
        }
    };
    let idle_spin = if device == DeviceKind::Gpu {
        GPU_IDLE_SPIN
    } else {
        IDLE_SPIN
    };
    loop {
        let Some(job) = next_job(&receiver, idle_spin, &ctx) else {
            break;
        };
        // Arrays released while the worker was idle are freed before the job runs, so that a
        // job that reads memory figures or clears MLX's cache sees them gone.
        collect();
        match job {
            // A panicking job must not take the worker (or the VM) down; the job's own reply
            // path reports the failure.
            Job::Run(f) => {
                let _ = catch_unwind(AssertUnwindSafe(|| f(&ctx)));
            }
            Job::Collect => {}
            Job::Halt => break,
        }
        collect();
        if HALTING.load(Ordering::Acquire) {
            break;
        }
    }
    // Every handle is gone (or the process exits); free what is left, then let MLX finish
    // the stream's work.
    collect();
    let _ = stream.synchronize();
    if let Ok(mut running) = RUNNING.lock() {
        running.remove(&id);
    }
    if HALTING.load(Ordering::Acquire) {
        return;
    }
    if let Ok(g) = ON_EXIT.lock() {
        if let Some(f) = *g {
            f(id, device);
        }
    }
}

/// Registers [`quiesce_at_exit`] with the C library's `atexit`, once, after MLX's global
/// state (its scheduler, allocator and device) exists: exit handlers and C++ static
/// destructors run in reverse order of registration, so this one runs before MLX tears its
/// globals down.
fn install_exit_hook(stream: &Stream) {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // One allocation and evaluation creates the allocator and the stream's machinery.
        if let Ok(a) = mlx_bind::full(&[1], 0.0, mlx_bind::Dtype::F32, stream) {
            let _ = a.eval();
        }
        let _ = mlx_bind::memory::active();
        extern "C" {
            fn atexit(f: extern "C" fn()) -> i32;
        }
        // SAFETY: registers a plain `extern "C"` function with no arguments; it only touches
        // this module's statics.
        unsafe {
            atexit(quiesce_at_exit);
        }
    });
}

/// At process exit (`exit()`, the BEAM's `halt`), stops every worker after its current job
/// and waits (at most [`HALT_WAIT`]) until their threads are joined: a worker still freeing
/// arrays or running a job while exit destroys MLX's globals corrupts the heap.
extern "C" fn quiesce_at_exit() {
    HALTING.store(true, Ordering::Release);
    let workers: Vec<Arc<Worker>> = match RUNNING.lock() {
        Ok(running) => running.values().filter_map(Weak::upgrade).collect(),
        Err(_) => Vec::new(),
    };
    for w in &workers {
        // A full queue: the worker sees HALTING after its current job.
        let _ = w.sender.try_send(Job::Halt);
    }
    drop(workers);
    let deadline = Instant::now() + HALT_WAIT;
    while LIVE_THREADS.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(1));
    }
}

/// How long an idle worker polls its queue (yielding the CPU) before it sleeps. Waking a
/// sleeping thread costs tens of microseconds on small virtual machines, more than a small
/// op takes; callers that read back op after op find the worker still awake.
const IDLE_SPIN: Duration = Duration::from_micros(20);

/// How long an evaluation polls MLX for completion before sleeping on MLX's event.
pub const EVAL_SPIN_US: u32 = 100;

/// The same two for GPU workers, which wait on the device, not on CPU work of their own: a
/// GPU kernel launch and its completion event take tens to hundreds of microseconds, and
/// waking a sleeping thread costs as much again (H200 host: a 16-element GPU read-back took
/// 62-819 us, median 121, with the CPU figures).
const GPU_IDLE_SPIN: Duration = Duration::from_micros(200);
const GPU_EVAL_SPIN_US: u32 = 1000;

/// Workers polling (idle or waiting on MLX) at any one time: polling burns a core, and on a
/// small machine the BEAM's schedulers need them.
static SPINNERS: AtomicUsize = AtomicUsize::new(0);

static MAX_SPINNERS: Lazy<usize> = Lazy::new(|| {
    thread::available_parallelism()
        .map(|n| (n.get() / 4).max(1))
        .unwrap_or(1)
});

/// A permission to poll instead of sleeping; `None` when enough workers already poll.
pub struct SpinToken(());

impl SpinToken {
    pub fn acquire() -> Option<SpinToken> {
        if SPINNERS.fetch_add(1, Ordering::AcqRel) < *MAX_SPINNERS {
            Some(SpinToken(()))
        } else {
            SPINNERS.fetch_sub(1, Ordering::AcqRel);
            None
        }
    }
}

impl Drop for SpinToken {
    fn drop(&mut self) {
        SPINNERS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The microseconds a worker may poll MLX for completion of work it waits for without a
/// caller's read-back behind it (a command's evaluation, a loop's predicate, a hook's
/// values), and the token that allows it (hold it while polling): `GPU_EVAL_SPIN_US` on a
/// GPU worker that gets a token, else 0 (sleep on MLX's event at once; on the CPU device the
/// stream thread needs the cores). Sleeping costs a wake-up per wait: a submitted and waited
/// 4-layer bf16 MLP (batch 128) took 0.19-0.25 ms sleeping and 0.12-0.16 ms polling (two
/// runs, on two H200 hosts).
pub fn completion_spin(device: DeviceKind) -> (u32, Option<SpinToken>) {
    if device != DeviceKind::Gpu {
        return (0, None);
    }
    match SpinToken::acquire() {
        Some(token) => (GPU_EVAL_SPIN_US, Some(token)),
        None => (0, None),
    }
}

/// Microseconds an evaluation may poll MLX for completion: `EVAL_SPIN_US` with a token.
pub fn eval_spin_budget(token: &Option<SpinToken>) -> u32 {
    if token.is_some() {
        EVAL_SPIN_US
    } else {
        0
    }
}

fn next_job(receiver: &Receiver<Job>, idle_spin: Duration, ctx: &Ctx) -> Option<Job> {
    match receiver.try_recv() {
        Ok(job) => return Some(job),
        Err(TryRecvError::Disconnected) => return None,
        Err(TryRecvError::Empty) => {}
    }
    let token = SpinToken::acquire();
    let start = Instant::now();
    while token.is_some() && start.elapsed() < idle_spin {
        thread::yield_now();
        match receiver.try_recv() {
            Ok(job) => return Some(job),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) => {}
        }
    }
    drop(token);
    // Going to sleep: the latest program run dispatched here is waited for and let go, so
    // that it holds no output's memory past the output's last reference.
    let previous = ctx.in_flight.borrow_mut().take();
    if let Some(previous) = previous {
        let _ = mlx_bind::wait_all(&[&previous]);
        drop(previous);
        match receiver.try_recv() {
            Ok(job) => return Some(job),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) => {}
        }
    }
    receiver.recv().ok()
}

/// The nice value worker threads give themselves (Linux), see [`set_nice`].
static NICE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Sets the nice value (0..=19) that CPU workers started from now on give their thread, and,
/// by inheritance, the stream thread MLX starts from it (both also run under SCHED_BATCH).
/// A positive value lets the BEAM's schedulers win the CPU when a small machine is
/// oversubscribed; MLX still uses every idle core.
pub fn set_nice(nice: i32) {
    NICE.store(nice.clamp(0, 19), Ordering::Relaxed);
}

#[cfg(target_os = "linux")]
fn lower_thread_priority(nice: i32) {
    if nice <= 0 {
        return;
    }
    extern "C" {
        fn setpriority(which: i32, who: u32, prio: i32) -> i32;
    }
    const PRIO_PROCESS: i32 = 0;
    // SAFETY: plain syscall wrapper; on Linux `who = 0` names the calling thread only.
    // Failure leaves the default priority, which is harmless.
    unsafe {
        setpriority(PRIO_PROCESS, 0, nice);
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_thread_priority(_nice: i32) {}

/// Puts the calling thread under SCHED_BATCH (Linux): the threads it wakes, and itself when
/// woken, do not preempt the running thread; CPU shares follow the nice value as before.
#[cfg(target_os = "linux")]
fn batch_policy() {
    #[repr(C)]
    struct SchedParam {
        priority: i32,
    }
    extern "C" {
        fn sched_setscheduler(pid: i32, policy: i32, param: *const SchedParam) -> i32;
    }
    const SCHED_BATCH: i32 = 3;
    let param = SchedParam { priority: 0 };
    // SAFETY: plain syscall wrapper with a valid pointer; on Linux `pid = 0` names the
    // calling thread only. Failure leaves the default policy, which is harmless.
    unsafe {
        sched_setscheduler(0, SCHED_BATCH, &param);
    }
}

#[cfg(not(target_os = "linux"))]
fn batch_policy() {}

/// The id of the worker running the current thread (0 off worker threads).
pub fn current_worker_id() -> u64 {
    CURRENT_WORKER.with(|c| c.get())
}

/// Worker threads started and not yet joined.
pub fn live_threads() -> usize {
    LIVE_THREADS.load(Ordering::SeqCst)
}

// The reaper joins worker threads as they exit, off the schedulers and off the GC path.

enum Reap {
    Spawned(u64, JoinHandle<()>),
    Exited(u64),
}

static REAPER: Lazy<Mutex<Sender<Reap>>> = Lazy::new(|| {
    let (tx, rx) = unbounded::<Reap>();
    let _ = thread::Builder::new()
        .name("nx_mlx-reaper".into())
        .spawn(move || {
            let mut handles: HashMap<u64, JoinHandle<()>> = HashMap::new();
            let mut exited: HashSet<u64> = HashSet::new();
            for msg in rx {
                let id = match msg {
                    Reap::Spawned(id, h) => {
                        handles.insert(id, h);
                        id
                    }
                    Reap::Exited(id) => {
                        exited.insert(id);
                        id
                    }
                };
                if exited.contains(&id) {
                    if let Some(h) = handles.remove(&id) {
                        exited.remove(&id);
                        let _ = h.join();
                        LIVE_THREADS.fetch_sub(1, Ordering::SeqCst);
                        #[cfg(test)]
                        JOINED.lock().unwrap().insert(id);
                    }
                }
            }
        });
    Mutex::new(tx)
});

#[cfg(test)]
static JOINED: Lazy<Mutex<HashSet<u64>>> = Lazy::new(|| Mutex::new(HashSet::new()));

fn reaper_send(msg: Reap) {
    if let Ok(tx) = REAPER.lock() {
        let _ = tx.send(msg);
    }
}

type Registry = HashMap<DeviceKind, Result<Arc<Worker>, String>>;

static DEFAULTS: Lazy<Mutex<Registry>> = Lazy::new(|| Mutex::new(HashMap::new()));

/// Starts the default worker of every available device (at load time, not on a hot path).
pub fn start_defaults() {
    // The GPU worker first: the GPU runtime then starts its helper threads from a thread at
    // the default priority, not from a CPU worker that lowered its own (see `set_nice`).
    for device in [DeviceKind::Gpu, DeviceKind::Cpu] {
        if mlx_bind::is_available(device) {
            let _ = default_worker(device);
        }
    }
}

/// The process-wide default worker of `device`, started on first use and kept for the life
/// of the process.
pub fn default_worker(device: DeviceKind) -> NifResult<Arc<Worker>> {
    let mut map = DEFAULTS
        .lock()
        .map_err(|_| NifError::Runtime("default worker registry poisoned".to_string()))?;
    if let Some(w) = map.get(&device) {
        return w.clone().map_err(NifError::Runtime);
    }
    match Worker::spawn_blocking(device) {
        Ok(w) => {
            map.insert(device, Ok(w.clone()));
            Ok(w)
        }
        Err(NifError::Argument(m)) => Err(NifError::Argument(m)),
        Err(e) => {
            map.insert(device, Err(e.to_string()));
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::bounded as chan;

    #[test]
    fn completion_spin_is_for_gpu_workers_only_and_comes_with_a_token() {
        // (Other tests' workers hold tokens meanwhile, so the counter itself is not checked.)
        assert!(matches!(completion_spin(DeviceKind::Cpu), (0, None)));
        let (spin, token) = completion_spin(DeviceKind::Gpu);
        assert_eq!(spin > 0, token.is_some());
        if token.is_some() {
            assert_eq!(spin, GPU_EVAL_SPIN_US);
        }
    }

    fn wait_until(mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            thread::sleep(Duration::from_millis(2));
        }
        false
    }

    #[test]
    fn jobs_run_in_order_on_the_worker_thread() {
        let w = Worker::spawn_blocking(DeviceKind::Cpu).unwrap();
        let (tx, rx) = chan(16);
        for i in 0..10 {
            let tx = tx.clone();
            w.post(Box::new(move |ctx| {
                tx.send((i, ctx.worker_id, current_worker_id())).unwrap();
            }))
            .unwrap();
        }
        for i in 0..10 {
            let (j, ctx_id, thread_id) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!(j, i);
            assert_eq!(ctx_id, w.id());
            assert_eq!(thread_id, w.id());
        }
        assert_eq!(current_worker_id(), 0);
    }

    #[test]
    fn ops_built_on_another_thread_evaluate_on_the_worker() {
        let w = Worker::spawn_blocking(DeviceKind::Cpu).unwrap();
        let s = *w.stream();
        let a = mlx_bind::full(&[3], 2.0, mlx_bind::Dtype::F32, &s).unwrap();
        let b = mlx_bind::binary(mlx_bind::BinaryOp::Multiply, &a, &a, &s).unwrap();
        let (tx, rx) = chan(1);
        w.post(Box::new(move |ctx| {
            tx.send(b.to_bytes(&ctx.stream).unwrap()).unwrap();
        }))
        .unwrap();
        let bytes = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(
            bytes,
            [4f32, 4.0, 4.0]
                .iter()
                .flat_map(|x| x.to_ne_bytes())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_panicking_job_leaves_the_worker_alive() {
        let w = Worker::spawn_blocking(DeviceKind::Cpu).unwrap();
        w.post(Box::new(|_| panic!("boom"))).unwrap();
        let (tx, rx) = chan(1);
        w.post(Box::new(move |_| tx.send(42).unwrap())).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 42);
    }

    #[test]
    fn unavailable_device_is_an_error() {
        if !mlx_bind::is_available(DeviceKind::Gpu) {
            let err = Worker::spawn_blocking(DeviceKind::Gpu).unwrap_err();
            assert!(err.to_string().contains("not available"));
            let err = default_worker(DeviceKind::Gpu).unwrap_err();
            assert!(err.to_string().contains("not available"));
        }
    }

    #[test]
    fn dropping_the_last_handle_finishes_queued_jobs_and_joins_the_thread() {
        let w = Worker::spawn_blocking(DeviceKind::Cpu).unwrap();
        assert!(live_threads() >= 1);
        let (tx, rx) = chan(100);
        for i in 0..50 {
            let tx = tx.clone();
            w.post(Box::new(move |_| {
                thread::sleep(Duration::from_micros(200));
                tx.send(i).unwrap();
            }))
            .unwrap();
        }
        let id = w.id();
        drop(w);
        // Pending jobs still run, in order, after the last handle is gone.
        for i in 0..50 {
            assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), i);
        }
        assert!(
            wait_until(|| JOINED.lock().unwrap().contains(&id)),
            "worker {id} not joined"
        );
    }

    #[test]
    fn a_failed_graph_poisons_its_nodes_and_their_readers() {
        let w = Worker::spawn_blocking(DeviceKind::Cpu).unwrap();
        let s = *w.stream();
        let z = mlx_bind::full(&[3, 3], 0.0, mlx_bind::Dtype::F32, &s).unwrap();
        let inv = mlx_bind::inv(&z, &s).unwrap();
        let sum = mlx_bind::binary(mlx_bind::BinaryOp::Add, &inv, &inv, &s).unwrap();
        // Built before the failure is known, not part of the failing graph.
        let later = mlx_bind::binary(mlx_bind::BinaryOp::Multiply, &inv, &inv, &s).unwrap();
        let ok = mlx_bind::full(&[2], 1.0, mlx_bind::Dtype::F32, &s).unwrap();
        let w2 = w.clone();
        let (tx, rx) = chan(1);
        w.post(Box::new(move |_| {
            let born = w2.epoch();
            let first = w2.evaluate(&[&sum], born, 0);
            let failed = (
                w2.is_failed(&sum, born),
                w2.is_failed(&inv, born),
                w2.is_failed(&ok, born),
                // An array created after the failure is never taken for a failed one.
                w2.is_failed(&sum, w2.epoch()),
            );
            let reread = w2.evaluate(&[&inv], born, 0);
            let reader = w2.evaluate(&[&later], born, 0);
            let fine = w2.evaluate(&[&ok], born, 0);
            tx.send((first, failed, reread, reader, fine)).unwrap();
        }))
        .unwrap();
        let (first, failed, reread, reader, fine) =
            rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(first.unwrap_err().contains("Inverse"));
        assert_eq!(failed, (true, true, false, false));
        assert!(reread.unwrap_err().contains("failed earlier"));
        assert!(reader.unwrap_err().contains("failed earlier"));
        assert_eq!(fine, Ok(()));
    }

    #[test]
    fn unevaluated_arrays_are_freed_on_the_worker() {
        let w = Worker::spawn_blocking(DeviceKind::Cpu).unwrap();
        let s = *w.stream();
        for _ in 0..(GARBAGE_WAKE + 10) {
            let a = mlx_bind::full(&[4], 1.0, mlx_bind::Dtype::F32, &s).unwrap();
            w.release(a);
        }
        // The worker was woken once the pile reached GARBAGE_WAKE and freed it.
        assert!(wait_until(
            || w.garbage_len.load(Ordering::Relaxed) < GARBAGE_WAKE
        ));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn workers_take_the_configured_nice_value() {
        extern "C" {
            fn getpriority(which: i32, who: u32) -> i32;
        }
        set_nice(7);
        let w = Worker::spawn_blocking(DeviceKind::Cpu).unwrap();
        set_nice(0);
        let (tx, rx) = chan(1);
        let s = *w.stream();
        w.post(Box::new(move |_| {
            // An evaluation on the worker's stream, so that MLX's thread for it has run.
            let a = mlx_bind::full(&[4], 1.0, mlx_bind::Dtype::F32, &s).unwrap();
            a.eval().unwrap();
            // SAFETY: plain syscall wrapper; `who = 0` is the calling thread on Linux.
            tx.send(unsafe { getpriority(0, 0) }).unwrap();
        }))
        .unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 7);
        // MLX's thread for the worker's stream inherits the value and the batch policy: the
        // worker and at least that thread run at nice 7 under SCHED_BATCH (3); no other test
        // uses 7.
        let at_nice_7 = || {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("stat")).ok())
                .filter(|stat| {
                    // Fields 19 (nice) and 41 (policy) of stat, counted after the `)` of the
                    // name, which is field 2.
                    let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
                    rest[16] == "7" && rest[38] == "3"
                })
                .count()
        };
        assert!(
            wait_until(|| at_nice_7() >= 2),
            "{} threads at nice 7 under SCHED_BATCH",
            at_nice_7()
        );
    }

    #[test]
    fn full_queue_reports_busy() {
        let w = Worker::spawn_blocking(DeviceKind::Cpu).unwrap();
        let (gate_tx, gate_rx) = chan::<()>(0);
        w.post(Box::new(move |_| {
            let _ = gate_rx.recv_timeout(Duration::from_secs(10));
        }))
        .unwrap();
        let mut busy = false;
        for _ in 0..(QUEUE_CAPACITY + 10) {
            if let Err(NifError::Busy) = w.post(Box::new(|_| {})) {
                busy = true;
                break;
            }
        }
        gate_tx.send(()).unwrap();
        assert!(busy);
    }
}
