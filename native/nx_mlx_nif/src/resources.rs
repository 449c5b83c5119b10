//! BEAM resources: an MLX array (with the worker whose stream it lives on) and a worker handle.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use mlx_bind::{Array, DeviceKind};
use rustler::{Resource, ResourceArc};

use crate::error::{NifError, NifResult};
use crate::worker::Worker;

/// Computed CPU arrays up to this size are freed in place when garbage collected.
const INLINE_FREE_BYTES: usize = 64 * 1024;

const LAZY: u8 = 0;
const EVALUATED: u8 = 1;
const FAILED: u8 = 2;

pub struct ArrayRes {
    // Always `Some` until dropped; an `Option` so that `Drop` can move the array out.
    array: Option<Array>,
    worker: Arc<Worker>,
    state: AtomicU8,
    failure: OnceLock<String>,
    /// The worker thread that evaluated the array (0: not evaluated by us yet).
    evaluated_on: AtomicU64,
    /// Length of the longest chain of unevaluated ops ending here.
    pub depth: u32,
    /// The worker's failure epoch when the array was created.
    pub born: u64,
}

#[rustler::resource_impl]
impl Resource for ArrayRes {}

impl ArrayRes {
    /// A lazy array built on `worker`'s stream.
    pub fn lazy(array: Array, worker: Arc<Worker>, depth: u32) -> ResourceArc<ArrayRes> {
        let born = worker.epoch();
        ResourceArc::new(ArrayRes {
            born,
            array: Some(array),
            worker,
            state: AtomicU8::new(LAZY),
            failure: OnceLock::new(),
            evaluated_on: AtomicU64::new(0),
            depth,
        })
    }

    /// An array whose data is already there (e.g. copied from a binary).
    pub fn ready(array: Array, worker: Arc<Worker>) -> ResourceArc<ArrayRes> {
        let r = ArrayRes::lazy(array, worker, 0);
        r.state.store(EVALUATED, Ordering::Release);
        r
    }

    pub fn array(&self) -> &Array {
        self.array.as_ref().expect("array present until drop")
    }

    pub fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }

    pub fn device(&self) -> DeviceKind {
        self.worker.device()
    }

    /// Whether the array's data is known to be computed (by an evaluation that returned).
    pub fn is_evaluated(&self) -> bool {
        self.state.load(Ordering::Acquire) == EVALUATED
    }

    /// The error of a failed evaluation of this array (or of a graph it belongs to), if any.
    pub fn check(&self) -> NifResult<()> {
        match self.state.load(Ordering::Acquire) {
            EVALUATED => return Ok(()),
            LAZY if self.worker.is_failed(self.array(), self.born) => {
                self.mark_failed("it belongs to a graph whose evaluation failed")
            }
            LAZY => return Ok(()),
            _ => {}
        }
        let msg = self.failure.get().map(String::as_str).unwrap_or("unknown");
        Err(NifError::Runtime(format!(
            "the array's evaluation failed earlier: {msg}"
        )))
    }

    /// Records a successful evaluation on the worker thread `worker_id`.
    pub fn mark_evaluated(&self, worker_id: u64) {
        self.evaluated_on.store(worker_id, Ordering::Relaxed);
        let _ = self
            .state
            .compare_exchange(LAZY, EVALUATED, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Records a failed evaluation of a lazy array; it must never be read afterwards. An
    /// array already computed stays readable.
    pub fn mark_failed(&self, message: &str) {
        if self.state.load(Ordering::Acquire) == LAZY {
            let _ = self.failure.set(message.to_string());
            let _ = self
                .state
                .compare_exchange(LAZY, FAILED, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// Whether the array is still lazy and was created before the latest failure on its
    /// worker: it must be evaluated (and so checked) before new ops are built on it.
    pub fn predates_failure(&self) -> bool {
        self.state.load(Ordering::Acquire) == LAZY && self.worker.epoch() > self.born
    }

    pub fn evaluated_on(&self) -> u64 {
        self.evaluated_on.load(Ordering::Relaxed)
    }

    pub fn state_name(&self) -> &'static str {
        match self.state.load(Ordering::Acquire) {
            EVALUATED => "evaluated",
            FAILED => "failed",
            _ => "lazy",
        }
    }
}

impl Drop for ArrayRes {
    fn drop(&mut self) {
        if let Some(a) = self.array.take() {
            if self.is_evaluated()
                && self.device() == DeviceKind::Cpu
                && a.nbytes() <= INLINE_FREE_BYTES
            {
                // A small host buffer, no graph: a plain free.
                drop(a);
            } else {
                // A graph, a large buffer (unmapping it takes milliseconds) or device memory:
                // freed on the worker.
                self.worker.release(a);
            }
        }
    }
}

pub struct WorkerRes(pub Arc<Worker>);

#[rustler::resource_impl]
impl Resource for WorkerRes {}
