//! The cxx bridge: the only place that names C++ items. Everything here is re-exported in a
//! safe shape by the rest of the crate; callers never touch `ffi` directly.

use crate::compile::{trace_fn_call, TraceFn};

// The bridge's generated code for a `Box` argument uses an API newer than the crate's MSRV
// as the lint reads it (cxx itself supports 1.80).
#[allow(clippy::incompatible_msrv)]
#[cxx::bridge(namespace = "nxmlx")]
pub(crate) mod bridge {
    /// Mirrors `mlx::core::Dtype::Val`, in the same order.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    #[repr(i32)]
    enum Dtype {
        Bool,
        U8,
        U16,
        U32,
        U64,
        I8,
        I16,
        I32,
        I64,
        F16,
        F32,
        F64,
        BF16,
        C64,
    }

    /// Mirrors `mlx::core::Device::DeviceType`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    #[repr(i32)]
    enum DeviceKind {
        Cpu,
        Gpu,
    }

    /// A plain copy of `mlx::core::Stream` (an index and a device).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    struct StreamRef {
        index: i32,
        device: DeviceKind,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    #[repr(i32)]
    enum UnaryOp {
        Abs,
        Ceil,
        Floor,
        Round,
        Negative,
        Sign,
        Exp,
        Expm1,
        Log,
        Log1p,
        Sqrt,
        Rsqrt,
        Sin,
        Cos,
        Tan,
        Asin,
        Acos,
        Atan,
        Sinh,
        Cosh,
        Tanh,
        Asinh,
        Acosh,
        Atanh,
        Sigmoid,
        Erf,
        ErfInv,
        LogicalNot,
        BitwiseNot,
        IsNan,
        IsInf,
        Real,
        Imag,
        Conjugate,
        /// erfc and cbrt: CPU streams only (MLX has neither; the binding's own kernels).
        Erfc,
        Cbrt,
        /// The exact GELU, x / 2 * (1 + erf(x / sqrt 2)), of a real float array: one kernel
        /// on CPU streams (1 + erf through erfc in the negative tail), MLX's composed ops
        /// elsewhere.
        Gelu,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    #[repr(i32)]
    enum BinaryOp {
        Add,
        Subtract,
        Multiply,
        Divide,
        FloorDivide,
        Remainder,
        Power,
        Maximum,
        Minimum,
        Atan2,
        Equal,
        NotEqual,
        Less,
        LessEqual,
        Greater,
        GreaterEqual,
        LogicalAnd,
        LogicalOr,
        BitwiseAnd,
        BitwiseOr,
        BitwiseXor,
        LeftShift,
        RightShift,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    #[repr(i32)]
    enum ScanOp {
        Sum,
        Prod,
        Max,
        Min,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    #[repr(i32)]
    enum ReduceOp {
        Sum,
        Prod,
        Max,
        Min,
        All,
        Any,
        Mean,
    }

    extern "Rust" {
        /// A function of arrays to arrays, traced by `mx::compile` (see `compile.rs`).
        type TraceFn;
        fn trace_fn_call(f: &TraceFn, inputs: &ArrayList) -> Result<UniquePtr<ArrayList>>;
    }

    unsafe extern "C++" {
        include!("mlx-bind/cxx/shim.h");

        #[namespace = "mlx::core"]
        #[cxx_name = "array"]
        type Array;

        type ArrayList;

        fn version() -> String;
        fn is_available(device: DeviceKind) -> bool;
        fn new_stream(device: DeviceKind) -> Result<StreamRef>;
        fn synchronize(stream: StreamRef) -> Result<()>;
        fn set_default_stream(stream: StreamRef) -> Result<()>;
        fn library_path() -> String;
        fn blas_library_path() -> String;
        fn blas_config() -> String;
        fn blas_core() -> String;
        fn blas_limit_idle_spin(exponent: i32) -> i32;
        fn blas_idle_spin() -> i32;

        fn from_bytes(data: &[u8], shape: &[i32], dtype: Dtype) -> Result<UniquePtr<Array>>;
        fn clone_array(a: &Array) -> UniquePtr<Array>;
        fn shape(a: &Array) -> Vec<i32>;
        fn dtype(a: &Array) -> Dtype;
        fn nbytes(a: &Array) -> usize;
        fn eval(a: &Array) -> Result<()>;
        fn async_eval(a: &Array) -> Result<()>;
        fn eval_spin(a: &Array, spin_us: u32) -> Result<()>;
        fn copy_to(a: &Array, stream: StreamRef, out: &mut [u8]) -> Result<()>;
        fn try_copy_to(a: &Array, out: &mut [u8]) -> Result<bool>;

        type CompiledFn;
        fn compile_fn(f: Box<TraceFn>) -> UniquePtr<CompiledFn>;
        fn compiled_call(f: &CompiledFn, inputs: &ArrayList) -> Result<UniquePtr<ArrayList>>;
        fn compile_enabled(device: DeviceKind) -> bool;

        fn new_array_list() -> UniquePtr<ArrayList>;
        fn array_list_push(list: Pin<&mut ArrayList>, a: &Array);
        fn async_eval_list(list: &ArrayList) -> Result<()>;
        fn wait_list(list: &ArrayList) -> Result<()>;
        fn scan_graph(outputs: &ArrayList, pending: &mut Vec<u64>, boundary: &mut Vec<u64>);
        fn array_id(a: &Array) -> u64;

        fn get_active_memory() -> usize;
        fn get_peak_memory() -> usize;
        fn reset_peak_memory();
        fn get_cache_memory() -> usize;
        fn get_memory_limit() -> usize;
        fn physical_memory() -> usize;
        fn set_cache_limit(limit: usize) -> Result<usize>;
        fn clear_cache() -> Result<()>;

        fn full_scalar(
            shape: &[i32],
            value: f64,
            dtype: Dtype,
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn arange(
            start: f64,
            stop: f64,
            step: f64,
            dtype: Dtype,
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn random_uniform(
            shape: &[i32],
            dtype: Dtype,
            seed: u64,
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;

        fn unary(op: UnaryOp, a: &Array, s: StreamRef) -> Result<UniquePtr<Array>>;
        fn binary(op: BinaryOp, a: &Array, b: &Array, s: StreamRef) -> Result<UniquePtr<Array>>;
        fn reduce(
            op: ReduceOp,
            a: &Array,
            axes: &[i32],
            keep_dims: bool,
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn astype(a: &Array, dtype: Dtype, s: StreamRef) -> Result<UniquePtr<Array>>;
        fn reshape(a: &Array, shape: &[i32], s: StreamRef) -> Result<UniquePtr<Array>>;
        fn transpose(a: &Array, axes: &[i32], s: StreamRef) -> Result<UniquePtr<Array>>;
        fn reverse(a: &Array, axis: i32, s: StreamRef) -> Result<UniquePtr<Array>>;
        fn layer_norm(
            x: &Array,
            g: &Array,
            b: &Array,
            eps: f64,
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn rms_norm(x: &Array, w: &Array, eps: f64, s: StreamRef) -> Result<UniquePtr<Array>>;
        fn rope(
            inputs: &ArrayList,
            dims: i32,
            traditional: bool,
            base: f64,
            scale: f64,
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn attention(
            inputs: &ArrayList,
            scale: f64,
            mask: u8,
            sinks: bool,
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn quantize(
            w: &Array,
            group_size: i32,
            bits: i32,
            mode: u8,
            s: StreamRef,
        ) -> Result<UniquePtr<ArrayList>>;
        fn dequantize(
            inputs: &ArrayList,
            group_size: i32,
            bits: i32,
            mode: u8,
            dtype: Dtype,
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn quantized_matmul(
            inputs: &ArrayList,
            transpose: bool,
            group_size: i32,
            bits: i32,
            mode: u8,
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        #[allow(clippy::too_many_arguments)]
        fn gather_qmm(
            inputs: &ArrayList,
            has_lhs: bool,
            has_rhs: bool,
            transpose: bool,
            group_size: i32,
            bits: i32,
            mode: u8,
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn broadcast_to(a: &Array, shape: &[i32], s: StreamRef) -> Result<UniquePtr<Array>>;
        fn matmul(a: &Array, b: &Array, s: StreamRef) -> Result<UniquePtr<Array>>;
        fn linalg_inv(a: &Array, s: StreamRef) -> Result<UniquePtr<Array>>;
        fn linalg_solve(a: &Array, b: &Array, s: StreamRef) -> Result<UniquePtr<Array>>;
        fn linalg_solve_triangular(
            a: &Array,
            b: &Array,
            upper: bool,
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn linalg_cholesky(a: &Array, upper: bool, s: StreamRef) -> Result<UniquePtr<Array>>;
        fn linalg_det(a: &Array, s: StreamRef) -> Result<UniquePtr<Array>>;
        fn linalg_multi(op: u8, a: &Array, s: StreamRef) -> Result<UniquePtr<ArrayList>>;
        fn array_list_len(list: &ArrayList) -> usize;
        fn array_list_get(list: &ArrayList, i: usize) -> Result<UniquePtr<Array>>;
        fn concatenate(list: &ArrayList, axis: i32, s: StreamRef) -> Result<UniquePtr<Array>>;
        fn slice(
            a: &Array,
            start: &[i32],
            stop: &[i32],
            strides: &[i32],
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn slice_update(
            src: &Array,
            update: &Array,
            start: &[i32],
            stop: &[i32],
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn slice_dynamic(
            a: &Array,
            start: &Array,
            axes: &[i32],
            sizes: &[i32],
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn slice_update_dynamic(
            src: &Array,
            update: &Array,
            start: &Array,
            axes: &[i32],
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn pad(
            a: &Array,
            low: &[i32],
            high: &[i32],
            value: &Array,
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn take(a: &Array, indices: &Array, axis: i32, s: StreamRef) -> Result<UniquePtr<Array>>;
        fn take_along_axis(
            a: &Array,
            indices: &Array,
            axis: i32,
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn put_along_axis(
            a: &Array,
            indices: &Array,
            values: &Array,
            axis: i32,
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn topk(a: &Array, k: i32, axis: i32, s: StreamRef) -> Result<UniquePtr<Array>>;
        fn scatter(
            add: bool,
            a: &Array,
            indices: &ArrayList,
            updates: &Array,
            axes: &[i32],
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn as_strided(
            a: &Array,
            shape: &[i32],
            strides: &[i64],
            offset: usize,
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn view(a: &Array, dtype: Dtype, s: StreamRef) -> Result<UniquePtr<Array>>;
        fn scan(
            op: ScanOp,
            a: &Array,
            axis: i32,
            reverse: bool,
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        #[allow(clippy::too_many_arguments)]
        fn conv_general(
            input: &Array,
            weight: &Array,
            strides: &[i32],
            padding_lo: &[i32],
            padding_hi: &[i32],
            kernel_dilation: &[i32],
            input_dilation: &[i32],
            groups: i32,
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn fftn(
            kind: u8,
            a: &Array,
            lengths: &[i32],
            axes: &[i32],
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn fft(
            inverse: bool,
            a: &Array,
            n: i32,
            axis: i32,
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn gather(
            a: &Array,
            indices: &ArrayList,
            axes: &[i32],
            slice_sizes: &[i32],
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn softmax(
            a: &Array,
            axes: &[i32],
            precise: bool,
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn arg_reduce(
            max: bool,
            a: &Array,
            axis: i32,
            keep_dims: bool,
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
        fn sort_axis(indices: bool, a: &Array, axis: i32, s: StreamRef)
            -> Result<UniquePtr<Array>>;
        fn where_(cond: &Array, a: &Array, b: &Array, s: StreamRef) -> Result<UniquePtr<Array>>;
        fn tensordot(
            a: &Array,
            b: &Array,
            axes_a: &[i32],
            axes_b: &[i32],
            s: StreamRef,
        ) -> Result<UniquePtr<Array>>;
    }
}

// SAFETY: an `mlx::core::array` is a handle around a `shared_ptr` to its descriptor; copying and
// dropping handles is thread safe. Evaluation, which mutates descriptors, is confined by the
// callers of this crate to the thread that owns the array's stream (see the crate docs).
unsafe impl Send for bridge::Array {}
unsafe impl Sync for bridge::Array {}

// SAFETY: a plain `std::vector` of array handles; moved between threads, never shared while
// mutated (mutation needs `Pin<&mut>`).
unsafe impl Send for bridge::ArrayList {}

// SAFETY: a `std::function` returned by `mx::compile`, called only on the thread that made it
// (see `Compiled`); its destructor erases its entry from that thread's compile cache under
// MLX's lock, which is safe on any thread.
unsafe impl Send for bridge::CompiledFn {}
unsafe impl Sync for bridge::CompiledFn {}
