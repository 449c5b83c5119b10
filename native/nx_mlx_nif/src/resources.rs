//! BEAM resources: an MLX array (with the worker whose stream it lives on) and a worker handle.

use std::sync::Arc;

use mlx_bind::Array;
use rustler::{Resource, ResourceArc};

use crate::worker::Worker;

pub struct ArrayRes {
    // Always `Some` until dropped; an `Option` so that `Drop` can move the array out.
    array: Option<Array>,
    worker: Arc<Worker>,
}

#[rustler::resource_impl]
impl Resource for ArrayRes {}

impl ArrayRes {
    pub fn new(array: Array, worker: Arc<Worker>) -> ResourceArc<ArrayRes> {
        ResourceArc::new(ArrayRes {
            array: Some(array),
            worker,
        })
    }

    pub fn array(&self) -> &Array {
        self.array.as_ref().expect("array present until drop")
    }
}

impl Drop for ArrayRes {
    fn drop(&mut self) {
        if let Some(a) = self.array.take() {
            self.worker.release(a);
        }
    }
}

pub struct WorkerRes(pub Arc<Worker>);

#[rustler::resource_impl]
impl Resource for WorkerRes {}
