//! A safe Rust binding over MLX's C++ API (`mlx::core`), through the `cxx` crate.
//!
//! Why not mlx-rs / mlx-sys: every mlx-sys release links `framework=Foundation`
//! unconditionally (rejected off Apple) and builds MLX from a GitHub checkout, so it cannot be
//! used on Linux. This crate instead compiles a small C++ shim against the headers of a
//! provisioned libmlx (`MLX_DIR`) and links that library.
//!
//! Shape of the API (mirrors `mlx/ops.h`): one function per op, the [`Stream`] as the last
//! argument, every fallible call returning [`Result`]. C++ exceptions thrown by MLX become
//! [`Error`]s; nothing here panics on bad input.
//!
//! Threading: since MLX 0.32 a stream may only be *evaluated* on the thread that created it.
//! Callers must create a [`Stream`] and evaluate arrays built on it from the same thread. Array
//! handles themselves may be moved and dropped on any thread, except the outputs of a
//! multi-output op ([`decompose`]) while their node is being evaluated: dropping one reads the
//! sibling list that evaluation clears. Once evaluated they have no siblings left.
//!
//! This crate knows nothing of the BEAM.

mod compile;
mod ffi;

pub use compile::{compile_enabled, Compiled};
pub use ffi::bridge::{BinaryOp, DeviceKind, Dtype, ReduceOp, ScanOp, UnaryOp};

use cxx::UniquePtr;
use ffi::bridge;

/// An error raised by MLX (a C++ exception) or by argument checks in this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub message: String,
}

impl From<cxx::Exception> for Error {
    fn from(e: cxx::Exception) -> Self {
        Error {
            message: e.what().to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// The MLX version string of the loaded libmlx, e.g. `"0.32.4"`.
pub fn version() -> String {
    bridge::version()
}

/// Whether MLX in this process can run on `device`.
pub fn is_available(device: DeviceKind) -> bool {
    bridge::is_available(device)
}

/// The path of the loaded libmlx shared library.
pub fn library_path() -> String {
    bridge::library_path()
}

/// The path of the shared library that provides `cblas_sgemm` to libmlx (empty when none is
/// visible, e.g. on macOS where Accelerate is linked inside libmlx).
pub fn blas_library_path() -> String {
    bridge::blas_library_path()
}

/// OpenBLAS's description of its build (`openblas_get_config`: version, options, target);
/// empty when the BLAS is not OpenBLAS.
pub fn blas_config() -> String {
    bridge::blas_config()
}

/// The kernel set OpenBLAS chose for this CPU (`openblas_get_corename`, e.g. `"Haswell"`,
/// `"SkylakeX"`, or `"Prescott"` for its generic x86-64 kernels); empty for other BLAS.
pub fn blas_core() -> String {
    bridge::blas_core()
}

/// Limits how long OpenBLAS's idle worker threads busy-wait after a threaded call to
/// `2^exponent` TSC cycles (4..=30; OpenBLAS's default is 2^28, about 0.1 s, which takes a
/// core from the work between two matmuls on small machines), unless the user set
/// `OPENBLAS_THREAD_TIMEOUT`. Call it before work is submitted: it restarts OpenBLAS's thread
/// server. Returns the exponent in effect (0: OpenBLAS's default), or -1 when the BLAS is
/// not OpenBLAS.
pub fn blas_limit_idle_spin(exponent: i32) -> i32 {
    bridge::blas_limit_idle_spin(exponent)
}

/// The exponent of OpenBLAS's idle busy-wait in effect (`2^n` TSC cycles; 0: its default,
/// 2^28), or -1 when the BLAS is not OpenBLAS.
pub fn blas_idle_spin() -> i32 {
    bridge::blas_idle_spin()
}

/// The BLAS the crate was linked for: `"openblas"`, `"reference"` or `"system"`.
pub const LINKED_BLAS: &str = env!("MLX_BIND_BLAS");

/// The folder of the libmlx the crate was linked against.
pub const LINKED_LIB_DIR: &str = env!("MLX_BIND_LIB_DIR");

impl DeviceKind {
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Gpu => "gpu",
            _ => "cpu",
        }
    }
}

impl Dtype {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 => 1,
            Dtype::U16 | Dtype::I16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::U32 | Dtype::I32 | Dtype::F32 => 4,
            _ => 8,
        }
    }
}

/// An MLX stream: a queue of work on one device. Evaluate only on the creating thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stream(bridge::StreamRef);

impl Stream {
    /// A new stream on `device`. Fails (instead of terminating the process, as MLX would) when
    /// the device is not available.
    pub fn new(device: DeviceKind) -> Result<Stream> {
        Ok(Stream(bridge::new_stream(device)?))
    }

    pub fn device(&self) -> DeviceKind {
        self.0.device
    }

    pub fn index(&self) -> i32 {
        self.0.index
    }

    /// Makes this stream the calling thread's default for its device: ops that MLX builds
    /// internally without naming a stream then land on it.
    pub fn make_default(&self) -> Result<()> {
        Ok(bridge::set_default_stream(self.0)?)
    }

    /// Blocks until every operation queued on this stream has finished.
    pub fn synchronize(&self) -> Result<()> {
        Ok(bridge::synchronize(self.0)?)
    }
}

/// An MLX array handle (lazy until evaluated).
pub struct Array(UniquePtr<bridge::Array>);

impl Clone for Array {
    fn clone(&self) -> Self {
        Array(bridge::clone_array(self.inner()))
    }
}

impl std::fmt::Debug for Array {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Array({:?}, {:?})", self.dtype(), self.shape())
    }
}

fn wrap(r: std::result::Result<UniquePtr<bridge::Array>, cxx::Exception>) -> Result<Array> {
    match r {
        Ok(p) if !p.is_null() => Ok(Array(p)),
        Ok(_) => Err(Error {
            message: "MLX returned no array".to_string(),
        }),
        Err(e) => Err(e.into()),
    }
}

fn check_shape(shape: &[i64]) -> Result<Vec<i32>> {
    let elements = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d.max(0) as u64));
    if !matches!(elements, Some(n) if n <= (1u64 << 48)) {
        return Err(Error {
            message: format!("shape {shape:?} has too many elements"),
        });
    }
    shape
        .iter()
        .map(|&d| {
            i32::try_from(d)
                .ok()
                .filter(|d| *d >= 0)
                .ok_or_else(|| Error {
                    message: format!("dimension {d} is out of MLX's range (0..2^31)"),
                })
        })
        .collect()
}

fn check_axes(axes: &[i64]) -> Result<Vec<i32>> {
    axes.iter()
        .map(|&a| {
            i32::try_from(a).map_err(|_| Error {
                message: format!("axis {a} is out of range"),
            })
        })
        .collect()
}

impl Array {
    fn inner(&self) -> &bridge::Array {
        // A `UniquePtr` built by `wrap` is never null.
        self.0.as_ref().expect("non-null array")
    }

    /// An array holding a copy of `data`, laid out row-major with `shape` and `dtype`.
    pub fn from_bytes(data: &[u8], shape: &[i64], dtype: Dtype) -> Result<Array> {
        let shape = check_shape(shape)?;
        wrap(bridge::from_bytes(data, &shape, dtype))
    }

    pub fn shape(&self) -> Vec<i64> {
        bridge::shape(self.inner())
            .into_iter()
            .map(i64::from)
            .collect()
    }

    pub fn dtype(&self) -> Dtype {
        bridge::dtype(self.inner())
    }

    pub fn nbytes(&self) -> usize {
        bridge::nbytes(self.inner())
    }

    /// MLX's identity of the array's node (shared by every handle to it).
    pub fn id(&self) -> u64 {
        bridge::array_id(self.inner())
    }

    /// Evaluates the array (and its lazy inputs) and waits for the result.
    pub fn eval(&self) -> Result<()> {
        Ok(bridge::eval(self.inner())?)
    }

    /// Evaluates the array, polling for completion (yielding the CPU) for up to `spin_us`
    /// microseconds before sleeping until MLX signals it: cheaper than a thread wake-up for
    /// small graphs.
    pub fn eval_spin(&self, spin_us: u32) -> Result<()> {
        Ok(bridge::eval_spin(self.inner(), spin_us)?)
    }

    /// Starts evaluating the array without waiting.
    pub fn async_eval(&self) -> Result<()> {
        Ok(bridge::async_eval(self.inner())?)
    }

    /// Evaluates the array and copies its elements, row-major, into `out` (which must hold
    /// exactly [`Array::nbytes`] bytes). A non-contiguous result is made contiguous on `stream`.
    pub fn copy_to(&self, stream: &Stream, out: &mut [u8]) -> Result<()> {
        Ok(bridge::copy_to(self.inner(), stream.0, out)?)
    }

    /// Copies the elements into `out` only if the array is already computed and row-contiguous
    /// (`Ok(false)` otherwise). Evaluates nothing, so it may be called on any thread.
    pub fn try_copy_to(&self, out: &mut [u8]) -> Result<bool> {
        Ok(bridge::try_copy_to(self.inner(), out)?)
    }

    /// Evaluates the array and returns its elements as bytes, row-major.
    pub fn to_bytes(&self, stream: &Stream) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.nbytes()];
        self.copy_to(stream, &mut out)?;
        Ok(out)
    }
}

/// The arrays of a list (new handles).
pub(crate) fn unlist(list: &bridge::ArrayList) -> Result<Vec<Array>> {
    (0..bridge::array_list_len(list))
        .map(|i| wrap(bridge::array_list_get(list, i)))
        .collect()
}

pub(crate) fn list_of(arrays: &[&Array]) -> UniquePtr<bridge::ArrayList> {
    let mut list = bridge::new_array_list();
    for a in arrays {
        bridge::array_list_push(list.pin_mut(), a.inner());
    }
    list
}

/// Starts evaluating `arrays` as one graph and returns once the work is queued on the
/// streams (on the CPU, MLX runs it on the stream's own thread). [`wait_all`] waits for it.
pub fn async_eval_all(arrays: &[&Array]) -> Result<()> {
    Ok(bridge::async_eval_list(&list_of(arrays))?)
}

/// What evaluating some arrays would involve: the ids of the nodes it would compute (still
/// unscheduled, with their siblings) and of the computed arrays it would read. Ids are
/// unique only among live arrays.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GraphScan {
    pub pending: Vec<u64>,
    pub boundary: Vec<u64>,
}

/// Scans the graph behind `arrays` without changing it or keeping any handle. Call it on the
/// thread that evaluates them, before evaluating.
pub fn scan_graph(arrays: &[&Array]) -> GraphScan {
    let outputs = list_of(arrays);
    let mut scan = GraphScan::default();
    bridge::scan_graph(&outputs, &mut scan.pending, &mut scan.boundary);
    scan
}

/// Waits until `arrays` (scheduled by [`async_eval_all`]) are computed, through MLX's
/// completion events; the error of a failed task, if any. Unscheduled arrays are evaluated.
pub fn wait_all(arrays: &[&Array]) -> Result<()> {
    Ok(bridge::wait_list(&list_of(arrays))?)
}

/// [`wait_all`], polling for completion (yielding the CPU) for up to `spin_us` microseconds
/// in all before sleeping until MLX signals it (see [`Array::eval_spin`]); with 0, exactly
/// [`wait_all`].
pub fn wait_all_spin(arrays: &[&Array], spin_us: u32) -> Result<()> {
    if spin_us == 0 {
        return wait_all(arrays);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_micros(spin_us.into());
    for a in arrays {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        a.eval_spin(left.as_micros() as u32)?;
    }
    wait_all(arrays)
}

/// MLX's allocator: active, peak and cached bytes, and its limits. Process-wide.
pub mod memory {
    use super::bridge;

    pub fn active() -> usize {
        bridge::get_active_memory()
    }

    pub fn peak() -> usize {
        bridge::get_peak_memory()
    }

    pub fn reset_peak() {
        bridge::reset_peak_memory()
    }

    pub fn cache() -> usize {
        bridge::get_cache_memory()
    }

    pub fn limit() -> usize {
        bridge::get_memory_limit()
    }

    /// The largest memory limit worth allowing: the machine's physical memory, or MLX's own
    /// default limit when that is larger (a GPU with more memory than the host). An
    /// allocation MLX lets through but the system cannot serve is written through a null
    /// pointer.
    pub fn max_limit() -> usize {
        static DEFAULT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let default = *DEFAULT.get_or_init(bridge::get_memory_limit);
        default.max(bridge::physical_memory())
    }

    /// Sets the cache limit (0 disables the cache); returns the previous one. Waits for the
    /// CPU streams.
    pub fn set_cache_limit(bytes: usize) -> crate::Result<usize> {
        Ok(bridge::set_cache_limit(bytes)?)
    }

    /// Returns cached buffers to the system. Waits for the CPU streams.
    pub fn clear_cache() -> crate::Result<()> {
        Ok(bridge::clear_cache()?)
    }
}

/// An array of `shape` filled with `value` converted to `dtype`.
pub fn full(shape: &[i64], value: f64, dtype: Dtype, s: &Stream) -> Result<Array> {
    let shape = check_shape(shape)?;
    wrap(bridge::full_scalar(&shape, value, dtype, s.0))
}

/// `[start, stop)` by `step`, as `dtype`.
pub fn arange(start: f64, stop: f64, step: f64, dtype: Dtype, s: &Stream) -> Result<Array> {
    wrap(bridge::arange(start, stop, step, dtype, s.0))
}

/// Uniform samples in `[0, 1)` from MLX's counter-based generator keyed by `seed`.
pub fn random_uniform(shape: &[i64], dtype: Dtype, seed: u64, s: &Stream) -> Result<Array> {
    let shape = check_shape(shape)?;
    wrap(bridge::random_uniform(&shape, dtype, seed, s.0))
}

pub fn unary(op: UnaryOp, a: &Array, s: &Stream) -> Result<Array> {
    wrap(bridge::unary(op, a.inner(), s.0))
}

pub fn binary(op: BinaryOp, a: &Array, b: &Array, s: &Stream) -> Result<Array> {
    wrap(bridge::binary(op, a.inner(), b.inner(), s.0))
}

/// Reduces `a` over `axes` (all of them: pass every axis; an empty list reduces nothing).
pub fn reduce(op: ReduceOp, a: &Array, axes: &[i64], keep_dims: bool, s: &Stream) -> Result<Array> {
    let axes = check_axes(axes)?;
    wrap(bridge::reduce(op, a.inner(), &axes, keep_dims, s.0))
}

/// exp(a - max) / sum(exp(a - max)) over `axes` as one MLX op (a fused kernel for the last
/// axis); `precise` accumulates f16/bf16 in f32.
pub fn softmax(a: &Array, axes: &[i64], precise: bool, s: &Stream) -> Result<Array> {
    let axes = check_axes(axes)?;
    wrap(bridge::softmax(a.inner(), &axes, precise, s.0))
}

pub fn astype(a: &Array, dtype: Dtype, s: &Stream) -> Result<Array> {
    wrap(bridge::astype(a.inner(), dtype, s.0))
}

pub fn reshape(a: &Array, shape: &[i64], s: &Stream) -> Result<Array> {
    let shape = check_shape(shape)?;
    wrap(bridge::reshape(a.inner(), &shape, s.0))
}

pub fn transpose(a: &Array, axes: &[i64], s: &Stream) -> Result<Array> {
    let axes = check_axes(axes)?;
    wrap(bridge::transpose(a.inner(), &axes, s.0))
}

/// `a` with `axis` reversed: a view with a negative stride (no copy, no gather).
pub fn reverse(a: &Array, axis: i64, s: &Stream) -> Result<Array> {
    let axis = check_axes(&[axis])?[0];
    wrap(bridge::reverse(a.inner(), axis, s.0))
}

/// Layer norm over the last axis of `x`: `(x - mean) / sqrt(var + eps) * g + b`, with `g` and
/// `b` of the last axis's size.
pub fn layer_norm(x: &Array, g: &Array, b: &Array, eps: f64, s: &Stream) -> Result<Array> {
    wrap(bridge::layer_norm(
        x.inner(),
        g.inner(),
        b.inner(),
        eps,
        s.0,
    ))
}

/// RMS norm over the last axis of `x`: `x / sqrt(mean(x^2) + eps) * w` (MLX's fused kernel
/// where the device has one), `w` of the last axis's size.
pub fn rms_norm(x: &Array, w: &Array, eps: f64, s: &Stream) -> Result<Array> {
    wrap(bridge::rms_norm(x.inner(), w.inner(), eps, s.0))
}

/// Rotary embeddings (MLX's `fast::rope`) of the first `dims` features of `x`'s last axis,
/// positions along the second-to-last: `inputs` is `[x, offset]` (an integer scalar or one
/// per batch entry) with frequencies `base^(-2i / dims)`, or `[x, offset, freqs]` with
/// angles `position / freqs[i]`. Positions are multiplied by `scale`.
pub fn rope(
    inputs: &[&Array],
    dims: i64,
    traditional: bool,
    base: f64,
    scale: f64,
    s: &Stream,
) -> Result<Array> {
    let dims = check_axes(&[dims])?[0];
    wrap(bridge::rope(
        &list_of(inputs),
        dims,
        traditional,
        base,
        scale,
        s.0,
    ))
}

/// How `attention` masks its scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionMask {
    None = 0,
    /// Query row `i` sees keys up to `i + kv_len - q_len`.
    Causal = 1,
    /// An array after k and v in the inputs: boolean (true keeps) or additive.
    Array = 2,
}

/// Scaled dot-product attention (MLX's `fast::scaled_dot_product_attention`): `inputs` is
/// `[q, k, v]`, then the mask array for [`AttentionMask::Array`], then the sinks (one logit
/// per query head) when `sinks`.
pub fn attention(
    inputs: &[&Array],
    scale: f64,
    mask: AttentionMask,
    sinks: bool,
    s: &Stream,
) -> Result<Array> {
    wrap(bridge::attention(
        &list_of(inputs),
        scale,
        mask as u8,
        sinks,
        s.0,
    ))
}

/// How weights are quantized (MLX's quantization modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantMode {
    /// Per group of `group_size` values: `w ≈ scale * q + bias`, `q` of `bits` bits.
    Affine = 0,
    /// OCP microscaling: 4-bit floats (e2m1) with a shared 8-bit power-of-two scale per 32.
    Mxfp4 = 1,
    /// OCP microscaling: 8-bit floats (e4m3) with a shared power-of-two scale per 32.
    Mxfp8 = 2,
    /// NVIDIA's 4-bit floats with an e4m3 scale per 16.
    Nvfp4 = 3,
}

/// A quantization layout: the mode, the group size along the last axis and the bits per value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quant {
    pub mode: QuantMode,
    pub group_size: i64,
    pub bits: i64,
}

impl Quant {
    fn parts(&self) -> Result<(i32, i32, u8)> {
        let g = check_axes(&[self.group_size])?[0];
        let b = check_axes(&[self.bits])?[0];
        Ok((g, b, self.mode as u8))
    }

    /// How many arrays a quantized weight is made of: packed values and scales, and biases in
    /// affine mode.
    pub fn parts_count(&self) -> usize {
        if self.mode == QuantMode::Affine {
            3
        } else {
            2
        }
    }
}

/// Quantizes `w` along its last axis: `[packed (u32), scales]`, then the biases in affine mode.
pub fn quantize(w: &Array, q: Quant, s: &Stream) -> Result<Vec<Array>> {
    let (g, b, m) = q.parts()?;
    let list = bridge::quantize(w.inner(), g, b, m, s.0)?;
    unlist(&list)
}

/// The values of a quantized weight (`parts`: packed, scales, biases in affine mode) as `dtype`.
pub fn dequantize(parts: &[&Array], q: Quant, dtype: Dtype, s: &Stream) -> Result<Array> {
    let (g, b, m) = q.parts()?;
    wrap(bridge::dequantize(&list_of(parts), g, b, m, dtype, s.0))
}

/// `x · wᵀ` (`transpose`) or `x · w` with `w` quantized: `inputs` is `[x, packed, scales]`, then
/// the biases in affine mode.
pub fn quantized_matmul(inputs: &[&Array], transpose: bool, q: Quant, s: &Stream) -> Result<Array> {
    let (g, b, m) = q.parts()?;
    wrap(bridge::quantized_matmul(
        &list_of(inputs),
        transpose,
        g,
        b,
        m,
        s.0,
    ))
}

/// Quantized matmuls whose matrices are picked per batch entry (MLX's `gather_qmm`, for
/// mixtures of experts): `inputs` is `[x, packed, scales]`, the biases in affine mode, then
/// the lhs indices (into x's leading axes) and the rhs indices (into w's) when asked for.
pub fn gather_qmm(
    inputs: &[&Array],
    has_lhs: bool,
    has_rhs: bool,
    transpose: bool,
    q: Quant,
    s: &Stream,
) -> Result<Array> {
    let (g, b, m) = q.parts()?;
    wrap(bridge::gather_qmm(
        &list_of(inputs),
        has_lhs,
        has_rhs,
        transpose,
        g,
        b,
        m,
        s.0,
    ))
}

pub fn broadcast_to(a: &Array, shape: &[i64], s: &Stream) -> Result<Array> {
    let shape = check_shape(shape)?;
    wrap(bridge::broadcast_to(a.inner(), &shape, s.0))
}

pub fn matmul(a: &Array, b: &Array, s: &Stream) -> Result<Array> {
    wrap(bridge::matmul(a.inner(), b.inner(), s.0))
}

/// `arrays` joined along `axis`.
pub fn concatenate(arrays: &[&Array], axis: i64, s: &Stream) -> Result<Array> {
    let axis = check_axes(&[axis])?[0];
    wrap(bridge::concatenate(&list_of(arrays), axis, s.0))
}

/// The strided slice `[start, stop)` by `strides` on every axis.
pub fn slice(a: &Array, start: &[i64], stop: &[i64], strides: &[i64], s: &Stream) -> Result<Array> {
    let (start, stop, strides) = (check_axes(start)?, check_axes(stop)?, check_axes(strides)?);
    wrap(bridge::slice(a.inner(), &start, &stop, &strides, s.0))
}

/// `src` with the block `[start, stop)` replaced by `update`.
pub fn slice_update(
    src: &Array,
    update: &Array,
    start: &[i64],
    stop: &[i64],
    s: &Stream,
) -> Result<Array> {
    let (start, stop) = (check_axes(start)?, check_axes(stop)?);
    wrap(bridge::slice_update(
        src.inner(),
        update.inner(),
        &start,
        &stop,
        s.0,
    ))
}

/// The block of `sizes` of `a` (on `axes`) starting at the integer array `start` (one entry
/// per axis), read on the device: the graph needs no host value. MLX clamps nothing; the
/// caller keeps `start` in range.
pub fn slice_dynamic(
    a: &Array,
    start: &Array,
    axes: &[i64],
    sizes: &[i64],
    s: &Stream,
) -> Result<Array> {
    let (axes, sizes) = (check_axes(axes)?, check_shape(sizes)?);
    if axes.len() != sizes.len() || start.shape() != [axes.len() as i64] {
        return Err(Error {
            message: format!(
                "slice_dynamic: {} axes, {} sizes and a start of shape {:?} do not match",
                axes.len(),
                sizes.len(),
                start.shape()
            ),
        });
    }
    wrap(bridge::slice_dynamic(
        a.inner(),
        start.inner(),
        &axes,
        &sizes,
        s.0,
    ))
}

/// `src` with the block at the integer array `start` (on `axes`) replaced by `update`.
pub fn slice_update_dynamic(
    src: &Array,
    update: &Array,
    start: &Array,
    axes: &[i64],
    s: &Stream,
) -> Result<Array> {
    let axes = check_axes(axes)?;
    if start.shape() != [axes.len() as i64] {
        return Err(Error {
            message: format!(
                "slice_update_dynamic: {} axes and a start of shape {:?} do not match",
                axes.len(),
                start.shape()
            ),
        });
    }
    wrap(bridge::slice_update_dynamic(
        src.inner(),
        update.inner(),
        start.inner(),
        &axes,
        s.0,
    ))
}

/// `a` padded on every axis with `low`/`high` copies of the scalar `value` (non-negative).
pub fn pad(a: &Array, low: &[i64], high: &[i64], value: &Array, s: &Stream) -> Result<Array> {
    let (low, high) = (check_shape(low)?, check_shape(high)?);
    wrap(bridge::pad(a.inner(), &low, &high, value.inner(), s.0))
}

/// The entries of `a` at `indices` along `axis`.
pub fn take(a: &Array, indices: &Array, axis: i64, s: &Stream) -> Result<Array> {
    let axis = check_axes(&[axis])?[0];
    wrap(bridge::take(a.inner(), indices.inner(), axis, s.0))
}

/// The entries of `a` at `indices` along `axis`, `indices` having `a`'s rank (its other axes
/// broadcast against `a`'s): `out[.., i, ..] = a[.., indices[.., i, ..], ..]`.
pub fn take_along_axis(a: &Array, indices: &Array, axis: i64, s: &Stream) -> Result<Array> {
    let axis = check_axes(&[axis])?[0];
    wrap(bridge::take_along_axis(
        a.inner(),
        indices.inner(),
        axis,
        s.0,
    ))
}

/// `a` with `values` written along `axis` at `indices` (both of `a`'s rank, `indices` the
/// shape of `values`): `out[.., indices[.., i, ..], ..] = values[.., i, ..]`. Which of several
/// values sent to one position lands there is unspecified.
pub fn put_along_axis(
    a: &Array,
    indices: &Array,
    values: &Array,
    axis: i64,
    s: &Stream,
) -> Result<Array> {
    let axis = check_axes(&[axis])?[0];
    let (a, indices, values) = (a.inner(), indices.inner(), values.inner());
    wrap(bridge::put_along_axis(a, indices, values, axis, s.0))
}

/// The `k` largest entries of `a` along `axis`, in no particular order (MLX partitions on the
/// CPU and sorts on the GPU).
pub fn topk(a: &Array, k: i64, axis: i64, s: &Stream) -> Result<Array> {
    let k = i32::try_from(k).map_err(|_| Error {
        message: format!("k {k} is out of range"),
    })?;
    let axis = check_axes(&[axis])?[0];
    wrap(bridge::topk(a.inner(), k, axis, s.0))
}

/// The index of the maximum (`max`) or minimum along `axis` (uint32).
pub fn arg_reduce(max: bool, a: &Array, axis: i64, keep_dims: bool, s: &Stream) -> Result<Array> {
    let axis = check_axes(&[axis])?[0];
    wrap(bridge::arg_reduce(max, a.inner(), axis, keep_dims, s.0))
}

/// `a` sorted ascending along `axis`, or (`indices`) the permutation that sorts it (uint32).
pub fn sort(indices: bool, a: &Array, axis: i64, s: &Stream) -> Result<Array> {
    let axis = check_axes(&[axis])?[0];
    wrap(bridge::sort_axis(indices, a.inner(), axis, s.0))
}

/// `a` with `updates` written (or, with `add`, added) at the positions given, for each of
/// `axes`, by the matching array of `indices`. `updates` has the indices' shape followed by
/// one slice of `a`'s rank. Indices must be in bounds: MLX does not check.
pub fn scatter(
    add: bool,
    a: &Array,
    indices: &[&Array],
    updates: &Array,
    axes: &[i64],
    s: &Stream,
) -> Result<Array> {
    let axes = check_axes(axes)?;
    wrap(bridge::scatter(
        add,
        a.inner(),
        &list_of(indices),
        updates.inner(),
        &axes,
        s.0,
    ))
}

/// A strided view of `a` (made contiguous first): element `i` of the result reads flat
/// position `offset + sum(i_k * strides[k])`. Fails unless every position is inside `a`.
pub fn as_strided(
    a: &Array,
    shape: &[i64],
    strides: &[i64],
    offset: usize,
    s: &Stream,
) -> Result<Array> {
    let shape32 = check_shape(shape)?;
    if shape.len() != strides.len() {
        return Err(Error {
            message: "as_strided: shape and strides differ in length".to_string(),
        });
    }
    let size: i64 = a.shape().iter().product();
    let empty = shape.contains(&0);
    let (mut low, mut high) = (offset as i64, offset as i64);
    for (&d, &st) in shape.iter().zip(strides) {
        let reach = (d - 1).max(0) * st;
        if reach < 0 {
            low += reach;
        } else {
            high += reach;
        }
    }
    if !empty && (low < 0 || high >= size) {
        return Err(Error {
            message: format!(
                "as_strided: the view reads positions {low}..={high} of an array of {size}"
            ),
        });
    }
    wrap(bridge::as_strided(
        a.inner(),
        &shape32,
        strides,
        offset,
        s.0,
    ))
}

/// The bits of `a` reinterpreted as `dtype` (same element size).
pub fn view(a: &Array, dtype: Dtype, s: &Stream) -> Result<Array> {
    wrap(bridge::view(a.inner(), dtype, s.0))
}

/// The inclusive scan (cumulative sum, product, max or min) of `a` along `axis`, from the
/// end when `reverse`.
pub fn scan(op: ScanOp, a: &Array, axis: i64, reverse: bool, s: &Stream) -> Result<Array> {
    let axis = check_axes(&[axis])?[0];
    wrap(bridge::scan(op, a.inner(), axis, reverse, s.0))
}

/// Options of [`conv`]: one entry per spatial axis.
#[derive(Debug, Clone, Default)]
pub struct ConvOpts {
    pub strides: Vec<i64>,
    pub padding_lo: Vec<i64>,
    pub padding_hi: Vec<i64>,
    pub kernel_dilation: Vec<i64>,
    pub input_dilation: Vec<i64>,
    pub groups: i64,
}

/// Convolution, channels last: `input` is `[N, spatial..., C]`, `weight` is
/// `[O, spatial..., C / groups]`; the result is `[N, spatial..., O]`. Not flipped
/// (cross-correlation).
pub fn conv(input: &Array, weight: &Array, o: &ConvOpts, s: &Stream) -> Result<Array> {
    let groups = i32::try_from(o.groups).map_err(|_| Error {
        message: format!("conv: {} groups", o.groups),
    })?;
    wrap(bridge::conv_general(
        input.inner(),
        weight.inner(),
        &check_shape(&o.strides)?,
        &check_shape(&o.padding_lo)?,
        &check_shape(&o.padding_hi)?,
        &check_shape(&o.kernel_dilation)?,
        &check_shape(&o.input_dilation)?,
        groups,
        s.0,
    ))
}

/// The discrete Fourier transform (or its inverse, scaled by 1/n) of length `n` along
/// `axis`, padding with zeros or truncating.
pub fn fft(inverse: bool, a: &Array, n: i64, axis: i64, s: &Stream) -> Result<Array> {
    let n = check_shape(&[n])?[0];
    let axis = check_axes(&[axis])?[0];
    wrap(bridge::fft(inverse, a.inner(), n, axis, s.0))
}

/// The kinds of n-dimensional Fourier transform [`fftn`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FftKind {
    /// Complex to complex, unnormalized.
    Forward = 0,
    /// Complex to complex, scaled by 1/n.
    Inverse = 1,
    /// Real to complex: the last axis keeps `n / 2 + 1` frequencies.
    Real = 2,
    /// The inverse of `Real`, to a real result of the given lengths.
    InverseReal = 3,
}

/// The n-dimensional transform of `kind` over `axes`, with `lengths[i]` points along
/// `axes[i]` (zero-padding or truncating the input).
pub fn fftn(kind: FftKind, a: &Array, lengths: &[i64], axes: &[i64], s: &Stream) -> Result<Array> {
    let lengths = check_shape(lengths)?;
    let axes = check_axes(axes)?;
    wrap(bridge::fftn(kind as u8, a.inner(), &lengths, &axes, s.0))
}

/// Slices of `slice_sizes` of `a` starting at the positions given, for each of `axes`, by
/// the matching array of `indices` (indices must be in bounds: MLX does not check).
pub fn gather(
    a: &Array,
    indices: &[&Array],
    axes: &[i64],
    slice_sizes: &[i64],
    s: &Stream,
) -> Result<Array> {
    let (axes, sizes) = (check_axes(axes)?, check_shape(slice_sizes)?);
    wrap(bridge::gather(
        a.inner(),
        &list_of(indices),
        &axes,
        &sizes,
        s.0,
    ))
}

/// Element-wise `cond ? a : b` (`cond` converted to bool; NumPy broadcasting).
pub fn where_(cond: &Array, a: &Array, b: &Array, s: &Stream) -> Result<Array> {
    wrap(bridge::where_(cond.inner(), a.inner(), b.inner(), s.0))
}

/// The inverse of each square matrix in the last two axes of `a` (MLX runs it on the CPU
/// only). A singular matrix fails at evaluation time, not here.
pub fn inv(a: &Array, s: &Stream) -> Result<Array> {
    wrap(bridge::linalg_inv(a.inner(), s.0))
}

/// Solves `a x = b` for the square matrices in the last two axes of `a` (LU with partial
/// pivoting; MLX runs it on the CPU only). `b` is a matrix, or a vector when `a` is one matrix.
pub fn solve(a: &Array, b: &Array, s: &Stream) -> Result<Array> {
    wrap(bridge::linalg_solve(a.inner(), b.inner(), s.0))
}

/// Solves `a x = b` with `a` triangular: only its lower (or, with `upper`, upper) triangle is
/// read. A zero on the diagonal fails at evaluation time. CPU only.
pub fn solve_triangular(a: &Array, b: &Array, upper: bool, s: &Stream) -> Result<Array> {
    wrap(bridge::linalg_solve_triangular(
        a.inner(),
        b.inner(),
        upper,
        s.0,
    ))
}

/// The Cholesky factor (lower, or with `upper` upper) of each symmetric positive-definite
/// matrix in the last two axes. CPU only.
pub fn cholesky(a: &Array, upper: bool, s: &Stream) -> Result<Array> {
    wrap(bridge::linalg_cholesky(a.inner(), upper, s.0))
}

/// The determinant of each square matrix in the last two axes. CPU only.
pub fn det(a: &Array, s: &Stream) -> Result<Array> {
    wrap(bridge::linalg_det(a.inner(), s.0))
}

/// The multi-output decompositions of [`decompose`]. CPU only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decomposition {
    /// `[q, r]`, reduced: `q` is m×k and `r` k×n with k = min(m, n).
    Qr = 0,
    /// `[u, s, vt]` with full `u` (m×m) and `vt` (n×n).
    Svd = 1,
    /// `[eigenvalues, eigenvectors]` of a symmetric matrix (lower triangle read), ascending.
    Eigh = 2,
    /// `[row_pivots, l, u]`: row `i` of `a` is row `row_pivots[i]` of `l u`.
    Lu = 3,
}

/// The outputs of decomposing each matrix in the last two axes of `a`. The outputs are
/// siblings of one node: see the threading notes in the crate docs before dropping them on
/// another thread while they are being evaluated.
pub fn decompose(op: Decomposition, a: &Array, s: &Stream) -> Result<Vec<Array>> {
    let list = bridge::linalg_multi(op as u8, a.inner(), s.0)?;
    unlist(&list)
}

/// Contracts `axes_a` of `a` with `axes_b` of `b`; the result has `a`'s free axes, then `b`'s.
pub fn tensordot(
    a: &Array,
    b: &Array,
    axes_a: &[i64],
    axes_b: &[i64],
    s: &Stream,
) -> Result<Array> {
    let axes_a = check_axes(axes_a)?;
    let axes_b = check_axes(axes_b)?;
    wrap(bridge::tensordot(
        a.inner(),
        b.inner(),
        &axes_a,
        &axes_b,
        s.0,
    ))
}
