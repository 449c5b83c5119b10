//! `mx::compile` over Rust functions: [`Compiled`] traces a function of arrays once per input
//! shapes and dtypes, simplifies the graph and fuses element-wise chains into generated kernels
//! (on the CPU built with `g++` at run time, on CUDA with NVRTC); later calls replay the traced
//! graph on new inputs without calling the function again.

use crate::ffi::bridge;
use crate::{list_of, unlist, Array, DeviceKind, Error, Result};
use cxx::UniquePtr;

/// The function behind a [`Compiled`], called by MLX while tracing (on placeholder arrays
/// that must not be evaluated).
pub struct TraceFn(Box<ArrayFn>);

type ArrayFn = dyn Fn(&[Array]) -> Result<Vec<Array>> + Send + Sync;

pub(crate) fn trace_fn_call(
    f: &TraceFn,
    inputs: &bridge::ArrayList,
) -> std::result::Result<UniquePtr<bridge::ArrayList>, Error> {
    let arrays = unlist(inputs)?;
    let outputs = (f.0)(&arrays)?;
    let refs: Vec<&Array> = outputs.iter().collect();
    Ok(list_of(&refs))
}

/// A function compiled by `mx::compile`.
///
/// MLX keeps the traced graphs in a cache of the thread that creates the `Compiled`: create it
/// and call it on one thread (a later call from another thread traces again into that
/// thread's cache, which the drop does not clear). Dropping it, on any thread, erases its
/// cache entries and so frees the captured constants.
pub struct Compiled(UniquePtr<bridge::CompiledFn>);

impl Compiled {
    /// Compiles `f`. Nothing is traced until the first [`call`](Compiled::call). `f` must build
    /// its result from its inputs (and captured, evaluated arrays) without evaluating them.
    pub fn new(f: impl Fn(&[Array]) -> Result<Vec<Array>> + Send + Sync + 'static) -> Compiled {
        Compiled(bridge::compile_fn(Box::new(TraceFn(Box::new(f)))))
    }

    /// Runs the compiled function: traces `f` when these input shapes and dtypes are new on
    /// this thread, else replays the traced graph. The outputs are lazy.
    pub fn call(&self, inputs: &[&Array]) -> Result<Vec<Array>> {
        let f = self.0.as_ref().ok_or_else(|| Error {
            message: "compile: no function".to_string(),
        })?;
        let out = bridge::compiled_call(f, &list_of(inputs))?;
        unlist(&out)
    }
}

/// Whether `mx::compile` fuses kernels on `device` in this process now: not disabled by
/// `MLX_DISABLE_COMPILE`, and on the CPU a `g++` on `PATH` whose exit status the process can
/// wait for (SIGCHLD neither ignored nor auto-reaped; MLX builds CPU kernels with
/// popen/pclose). When it does not, a [`Compiled`] still runs, unfused.
pub fn compile_enabled(device: DeviceKind) -> bool {
    bridge::compile_enabled(device)
}
