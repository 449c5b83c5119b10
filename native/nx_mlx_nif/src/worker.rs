//! Workers: one OS thread owning one MLX stream on one device.
//!
//! Callers post jobs on a bounded channel and return at once; the worker runs them in order on
//! its stream. MLX requires a stream to be evaluated on the thread that created it, so every
//! evaluation of arrays built on a worker's stream happens here. This module knows nothing of
//! the BEAM: a job is a plain closure (the NIF layer builds closures that reply by message).

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use mlx_bind::{Array, DeviceKind, Stream};
use once_cell::sync::Lazy;

use crate::error::{NifError, NifResult};

/// Jobs a worker's channel holds before `post` reports `Busy` (back-pressure).
pub const QUEUE_CAPACITY: usize = 4096;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static LIVE_THREADS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static CURRENT_WORKER: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// What a job sees: the worker's stream (or why it could not be created).
pub struct Ctx {
    stream: Result<Stream, String>,
    pub worker_id: u64,
}

impl Ctx {
    pub fn stream(&self) -> NifResult<&Stream> {
        self.stream
            .as_ref()
            .map_err(|e| NifError::Runtime(e.clone()))
    }
}

pub type JobFn = Box<dyn FnOnce(&Ctx) + Send + 'static>;

enum Job {
    Run(JobFn),
    /// Arrays are released on the worker so that freeing a lazy graph never races with an
    /// evaluation that mutates it.
    Release(Array),
}

pub struct Worker {
    id: u64,
    device: DeviceKind,
    sender: Sender<Job>,
    #[cfg_attr(not(test), allow(dead_code))]
    exited: Arc<AtomicBool>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Worker({}, {})", self.id, self.device.name())
    }
}

impl Worker {
    /// Starts a worker thread for `device`. Fails, without touching MLX's stream machinery,
    /// when the device is not available (MLX would terminate the process).
    pub fn spawn(device: DeviceKind) -> NifResult<Arc<Worker>> {
        if !mlx_bind::is_available(device) {
            return Err(NifError::Argument(format!(
                "device {} is not available (this libmlx build has no such device)",
                device.name()
            )));
        }
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = bounded::<Job>(QUEUE_CAPACITY);
        let exited = Arc::new(AtomicBool::new(false));
        let thread_exited = exited.clone();
        LIVE_THREADS.fetch_add(1, Ordering::SeqCst);
        let spawned = thread::Builder::new()
            .name(format!("nx_mlx-{}-{}", device.name(), id))
            .spawn(move || {
                run(id, device, receiver);
                thread_exited.store(true, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            LIVE_THREADS.fetch_sub(1, Ordering::SeqCst);
            return Err(NifError::Runtime(format!(
                "could not start worker thread: {e}"
            )));
        }
        // The thread is detached: it ends by itself once every sender is gone and the queue
        // is drained, so nothing ever joins it on a scheduler or in a destructor.
        Ok(Arc::new(Worker {
            id,
            device,
            sender,
            exited,
        }))
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn device(&self) -> DeviceKind {
        self.device
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

    /// Hands `array` to the worker to be dropped there (dropped in place if the queue is full
    /// or the worker is gone: a plain free, safe when nothing evaluates it concurrently).
    pub fn release(&self, array: Array) {
        if let Err(e) = self.sender.try_send(Job::Release(array)) {
            drop(e.into_inner());
        }
    }
}

fn run(id: u64, device: DeviceKind, receiver: Receiver<Job>) {
    CURRENT_WORKER.with(|c| c.set(id));
    let stream = Stream::new(device).map_err(|e| e.message);
    let ctx = Ctx {
        stream,
        worker_id: id,
    };
    for job in receiver.iter() {
        match job {
            // A panicking job must not take the worker (or the VM) down; the job's own reply
            // path reports the failure.
            Job::Run(f) => {
                let _ = catch_unwind(AssertUnwindSafe(|| f(&ctx)));
            }
            Job::Release(a) => drop(a),
        }
    }
    LIVE_THREADS.fetch_sub(1, Ordering::SeqCst);
}

/// The id of the worker running the current thread (0 off worker threads).
pub fn current_worker_id() -> u64 {
    CURRENT_WORKER.with(|c| c.get())
}

/// Worker threads currently running.
pub fn live_threads() -> usize {
    LIVE_THREADS.load(Ordering::SeqCst)
}

static DEFAULTS: Lazy<Mutex<HashMap<DeviceKind, Arc<Worker>>>> =
    Lazy::new(|| Mutex::new(HashMap::new()));

/// The process-wide default worker of `device`, started on first use.
pub fn default_worker(device: DeviceKind) -> NifResult<Arc<Worker>> {
    let mut map = DEFAULTS
        .lock()
        .map_err(|_| NifError::Runtime("default worker registry poisoned".to_string()))?;
    if let Some(w) = map.get(&device) {
        return Ok(w.clone());
    }
    let w = Worker::spawn(device)?;
    map.insert(device, w.clone());
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::bounded as chan;
    use std::time::Duration;

    #[test]
    fn jobs_run_in_order_on_the_worker_thread() {
        let w = Worker::spawn(DeviceKind::Cpu).unwrap();
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
    fn a_job_evaluates_on_its_own_stream() {
        let w = Worker::spawn(DeviceKind::Cpu).unwrap();
        let (tx, rx) = chan(1);
        w.post(Box::new(move |ctx| {
            let s = ctx.stream().unwrap();
            let a = mlx_bind::full(&[3], 2.0, mlx_bind::Dtype::F32, s).unwrap();
            let b = mlx_bind::binary(mlx_bind::BinaryOp::Multiply, &a, &a, s).unwrap();
            tx.send(b.to_bytes(s).unwrap()).unwrap();
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
        let w = Worker::spawn(DeviceKind::Cpu).unwrap();
        w.post(Box::new(|_| panic!("boom"))).unwrap();
        let (tx, rx) = chan(1);
        w.post(Box::new(move |_| tx.send(42).unwrap())).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 42);
    }

    #[test]
    fn unavailable_device_is_an_error() {
        if !mlx_bind::is_available(DeviceKind::Gpu) {
            let err = Worker::spawn(DeviceKind::Gpu).unwrap_err();
            assert!(err.to_string().contains("not available"));
        }
    }

    #[test]
    fn dropping_the_last_handle_ends_the_thread() {
        let w = Worker::spawn(DeviceKind::Cpu).unwrap();
        let exited = w.exited.clone();
        let (tx, rx) = chan(1);
        w.post(Box::new(move |_| tx.send(()).unwrap())).unwrap();
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(!exited.load(Ordering::SeqCst));
        drop(w);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !exited.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(2));
        }
        assert!(exited.load(Ordering::SeqCst), "worker thread still running");
    }

    #[test]
    fn full_queue_reports_busy() {
        let w = Worker::spawn(DeviceKind::Cpu).unwrap();
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
