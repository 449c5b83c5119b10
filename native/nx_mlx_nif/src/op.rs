//! The op table of the NIF: one decoder from `(name, args)` terms to an [`Op`] (an MLX
//! primitive with its static attributes) and one [`Op::apply`] that builds it. The eager NIF
//! (`op/3`, in `ops.rs`) and program replay (`program.rs`) both go through here, so each op is
//! spelled once on the Rust side.
//!
//! Array operands sit at fixed places in `args` (a list of arrays where an op takes many);
//! the decoder hands them back in order, as terms, for the caller to resolve: the eager NIF
//! reads array resources, a program reads register numbers.

use mlx_bind::{
    Array, AttentionMask, BinaryOp, ConvOpts, Decomposition, Dtype, FftKind, Quant, ReduceOp,
    ScanOp, Stream, UnaryOp,
};
use rustler::Term;

use crate::convert;
use crate::error::{NifError, NifResult};

/// An MLX primitive with its attributes, decoded once.
#[derive(Debug, Clone)]
pub enum Op {
    Full {
        shape: Vec<i64>,
        value: f64,
        dtype: Dtype,
    },
    Arange {
        start: f64,
        stop: f64,
        step: f64,
        dtype: Dtype,
    },
    Unary(UnaryOp),
    Binary(BinaryOp),
    Reduce {
        op: ReduceOp,
        axes: Vec<i64>,
        keep_dims: bool,
    },
    Astype(Dtype),
    Reshape(Vec<i64>),
    Transpose(Vec<i64>),
    Reverse(i64),
    LayerNorm(f64),
    RmsNorm(f64),
    Rope {
        dims: i64,
        traditional: bool,
        base: f64,
        scale: f64,
    },
    Attention {
        scale: f64,
        mask: AttentionMask,
        sinks: bool,
    },
    BroadcastTo(Vec<i64>),
    Matmul,
    Inv,
    Select,
    Concatenate(i64),
    Slice {
        start: Vec<i64>,
        stop: Vec<i64>,
        strides: Vec<i64>,
    },
    SliceDynamic {
        axes: Vec<i64>,
        sizes: Vec<i64>,
    },
    SliceUpdate {
        start: Vec<i64>,
        stop: Vec<i64>,
    },
    SliceUpdateDynamic(Vec<i64>),
    Pad {
        low: Vec<i64>,
        high: Vec<i64>,
    },
    Take(i64),
    TakeAlongAxis(i64),
    PutAlongAxis(i64),
    Topk {
        k: i64,
        axis: i64,
    },
    Softmax {
        axes: Vec<i64>,
        precise: bool,
    },
    ArgReduce {
        max: bool,
        axis: i64,
        keep_dims: bool,
    },
    Sort {
        indices: bool,
        axis: i64,
    },
    Gather {
        axes: Vec<i64>,
        slice_sizes: Vec<i64>,
    },
    Scatter {
        add: bool,
        axes: Vec<i64>,
    },
    AsStrided {
        shape: Vec<i64>,
        strides: Vec<i64>,
        offset: usize,
    },
    View(Dtype),
    Scan {
        op: ScanOp,
        axis: i64,
        reverse: bool,
    },
    Conv(ConvOpts),
    Fft {
        inverse: bool,
        n: i64,
        axis: i64,
    },
    Fftn {
        kind: FftKind,
        lengths: Vec<i64>,
        axes: Vec<i64>,
    },
    Linalg {
        op: LinalgOp,
        upper: bool,
    },
    Decompose(Decomposition),
    Tensordot {
        axes_a: Vec<i64>,
        axes_b: Vec<i64>,
    },
    Quantize(Quant),
    Dequantize(Quant, Dtype),
    QuantizedMatmul {
        quant: Quant,
        transpose: bool,
    },
    GatherQmm {
        quant: Quant,
        transpose: bool,
        lhs: bool,
        rhs: bool,
    },
}

#[derive(Debug, Clone, Copy)]
pub enum LinalgOp {
    Solve,
    SolveTriangular,
    Cholesky,
    Det,
}

/// Where an op may be built (see `build.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// On any thread, naming the worker's stream.
    Caller,
    /// On the worker: MLX builds internal nodes on the thread's default stream.
    Worker,
    /// On the worker, evaluated there: a multi-output node.
    WorkerOutputs,
}

/// A decoded op and its array operands (terms, in order).
pub struct Decoded<'a> {
    pub op: Op,
    pub operands: Vec<Term<'a>>,
}

struct Args<'a, 'b> {
    name: &'b str,
    args: &'b [Term<'a>],
}

impl<'a> Args<'a, '_> {
    fn get<T: rustler::Decoder<'a>>(&self, i: usize, what: &str) -> NifResult<T> {
        let term = self.args.get(i).ok_or_else(|| self.arity())?;
        term.decode().map_err(|_| {
            NifError::Argument(format!(
                "{}: argument {} ({what}) is invalid: {term:?}",
                self.name,
                i + 1
            ))
        })
    }

    fn term(&self, i: usize) -> NifResult<Term<'a>> {
        self.args.get(i).copied().ok_or_else(|| self.arity())
    }

    fn list(&self, i: usize) -> NifResult<Vec<Term<'a>>> {
        self.get(i, "a list of arrays")
    }

    fn arity(&self) -> NifError {
        NifError::Argument(format!(
            "{}: wrong number of arguments ({})",
            self.name,
            self.args.len()
        ))
    }

    /// A quantization layout at `i` (mode), `i + 1` (group size) and `i + 2` (bits).
    fn quant(&self, i: usize) -> NifResult<Quant> {
        Ok(Quant {
            mode: convert::quant_mode(self.term(i)?)?,
            group_size: self.get(i + 1, "group size")?,
            bits: self.get(i + 2, "bits")?,
        })
    }

    fn expect(&self, n: usize) -> NifResult<()> {
        if self.args.len() == n {
            Ok(())
        } else {
            Err(self.arity())
        }
    }
}

/// Decodes `name(args)`. `args` excludes the worker.
pub fn decode<'a>(name: &str, args: &[Term<'a>]) -> NifResult<Decoded<'a>> {
    let a = Args { name, args };
    let one = |n: usize| -> NifResult<Vec<Term<'a>>> { Ok(vec![a.term(n)?]) };
    let (op, operands, arity) = match name {
        "full" => (
            Op::Full {
                shape: a.get(0, "shape")?,
                value: a.get(1, "value")?,
                dtype: convert::dtype(a.term(2)?)?,
            },
            vec![],
            3,
        ),
        "arange" => (
            Op::Arange {
                start: a.get(0, "start")?,
                stop: a.get(1, "stop")?,
                step: a.get(2, "step")?,
                dtype: convert::dtype(a.term(3)?)?,
            },
            vec![],
            4,
        ),
        "unary" => (Op::Unary(convert::unary_op(a.term(0)?)?), one(1)?, 2),
        "binary" => (
            Op::Binary(convert::binary_op(a.term(0)?)?),
            vec![a.term(1)?, a.term(2)?],
            3,
        ),
        "reduce" => (
            Op::Reduce {
                op: convert::reduce_op(a.term(0)?)?,
                axes: a.get(2, "axes")?,
                keep_dims: a.get(3, "keep_dims")?,
            },
            one(1)?,
            4,
        ),
        "astype" => (Op::Astype(convert::dtype(a.term(1)?)?), one(0)?, 2),
        "reshape" => (Op::Reshape(a.get(1, "shape")?), one(0)?, 2),
        "transpose" => (Op::Transpose(a.get(1, "axes")?), one(0)?, 2),
        "reverse" => (Op::Reverse(a.get(1, "axis")?), one(0)?, 2),
        "layer_norm" => (
            Op::LayerNorm(a.get(3, "eps")?),
            vec![a.term(0)?, a.term(1)?, a.term(2)?],
            4,
        ),
        "rms_norm" => (
            Op::RmsNorm(a.get(2, "eps")?),
            vec![a.term(0)?, a.term(1)?],
            3,
        ),
        // [x, offset] or [x, offset, freqs].
        "rope" => (
            Op::Rope {
                dims: a.get(1, "dims")?,
                traditional: a.get(2, "traditional")?,
                base: a.get(3, "base")?,
                scale: a.get(4, "scale")?,
            },
            a.list(0)?,
            5,
        ),
        // [q, k, v], then the mask (mask 2), then the sinks.
        "attention" => (
            Op::Attention {
                scale: a.get(1, "scale")?,
                mask: match a.get::<u8>(2, "mask mode")? {
                    0 => AttentionMask::None,
                    1 => AttentionMask::Causal,
                    2 => AttentionMask::Array,
                    m => {
                        return Err(NifError::Argument(format!(
                            "attention: the mask mode is 0, 1 or 2, got {m}"
                        )))
                    }
                },
                sinks: a.get(3, "sinks")?,
            },
            a.list(0)?,
            4,
        ),
        "broadcast_to" => (Op::BroadcastTo(a.get(1, "shape")?), one(0)?, 2),
        "matmul" => (Op::Matmul, vec![a.term(0)?, a.term(1)?], 2),
        "inv" => (Op::Inv, one(0)?, 1),
        "select" => (Op::Select, vec![a.term(0)?, a.term(1)?, a.term(2)?], 3),
        "concatenate" => (Op::Concatenate(a.get(1, "axis")?), a.list(0)?, 2),
        "slice" => (
            Op::Slice {
                start: a.get(1, "start")?,
                stop: a.get(2, "stop")?,
                strides: a.get(3, "strides")?,
            },
            one(0)?,
            4,
        ),
        "slice_dynamic" => (
            Op::SliceDynamic {
                axes: a.get(2, "axes")?,
                sizes: a.get(3, "sizes")?,
            },
            vec![a.term(0)?, a.term(1)?],
            4,
        ),
        "slice_update" => (
            Op::SliceUpdate {
                start: a.get(2, "start")?,
                stop: a.get(3, "stop")?,
            },
            vec![a.term(0)?, a.term(1)?],
            4,
        ),
        "slice_update_dynamic" => (
            Op::SliceUpdateDynamic(a.get(3, "axes")?),
            vec![a.term(0)?, a.term(1)?, a.term(2)?],
            4,
        ),
        "pad" => (
            Op::Pad {
                low: a.get(1, "low")?,
                high: a.get(2, "high")?,
            },
            vec![a.term(0)?, a.term(3)?],
            4,
        ),
        "take" => (Op::Take(a.get(2, "axis")?), vec![a.term(0)?, a.term(1)?], 3),
        "take_along_axis" => (
            Op::TakeAlongAxis(a.get(2, "axis")?),
            vec![a.term(0)?, a.term(1)?],
            3,
        ),
        "put_along_axis" => (
            Op::PutAlongAxis(a.get(3, "axis")?),
            vec![a.term(0)?, a.term(1)?, a.term(2)?],
            4,
        ),
        "topk" => (
            Op::Topk {
                k: a.get(1, "k")?,
                axis: a.get(2, "axis")?,
            },
            one(0)?,
            3,
        ),
        "softmax" => (
            Op::Softmax {
                axes: a.get(1, "axes")?,
                precise: a.get(2, "precise")?,
            },
            one(0)?,
            3,
        ),
        "arg_reduce" => (
            Op::ArgReduce {
                max: a.get(0, "max")?,
                axis: a.get(2, "axis")?,
                keep_dims: a.get(3, "keep_dims")?,
            },
            one(1)?,
            4,
        ),
        "sort" => (
            Op::Sort {
                indices: a.get(0, "indices")?,
                axis: a.get(2, "axis")?,
            },
            one(1)?,
            3,
        ),
        "gather" => {
            let mut operands = vec![a.term(0)?];
            operands.extend(a.list(1)?);
            (
                Op::Gather {
                    axes: a.get(2, "axes")?,
                    slice_sizes: a.get(3, "slice_sizes")?,
                },
                operands,
                4,
            )
        }
        "scatter" => {
            let mut operands = vec![a.term(1)?, a.term(3)?];
            operands.extend(a.list(2)?);
            (
                Op::Scatter {
                    add: a.get(0, "add")?,
                    axes: a.get(4, "axes")?,
                },
                operands,
                5,
            )
        }
        "as_strided" => (
            Op::AsStrided {
                shape: a.get(1, "shape")?,
                strides: a.get(2, "strides")?,
                offset: a.get(3, "offset")?,
            },
            one(0)?,
            4,
        ),
        "view" => (Op::View(convert::dtype(a.term(1)?)?), one(0)?, 2),
        "scan" => (
            Op::Scan {
                op: convert::scan_op(a.term(0)?)?,
                axis: a.get(2, "axis")?,
                reverse: a.get(3, "reverse")?,
            },
            one(1)?,
            4,
        ),
        "conv" => (
            Op::Conv(ConvOpts {
                strides: a.get(2, "strides")?,
                padding_lo: a.get(3, "padding_lo")?,
                padding_hi: a.get(4, "padding_hi")?,
                kernel_dilation: a.get(5, "kernel_dilation")?,
                input_dilation: a.get(6, "input_dilation")?,
                groups: a.get(7, "groups")?,
            }),
            vec![a.term(0)?, a.term(1)?],
            8,
        ),
        "fft" => (
            Op::Fft {
                inverse: a.get(0, "inverse")?,
                n: a.get(2, "n")?,
                axis: a.get(3, "axis")?,
            },
            one(1)?,
            4,
        ),
        "fftn" => {
            let kind = match a.term(0)?.atom_to_string().as_deref() {
                Ok("fft") => FftKind::Forward,
                Ok("ifft") => FftKind::Inverse,
                Ok("rfft") => FftKind::Real,
                Ok("irfft") => FftKind::InverseReal,
                _ => return Err(NifError::Argument("unknown fft kind".into())),
            };
            (
                Op::Fftn {
                    kind,
                    lengths: a.get(2, "lengths")?,
                    axes: a.get(3, "axes")?,
                },
                one(1)?,
                4,
            )
        }
        "linalg" => {
            let op = match a.term(0)?.atom_to_string().as_deref() {
                Ok("solve") => LinalgOp::Solve,
                Ok("solve_triangular") => LinalgOp::SolveTriangular,
                Ok("cholesky") => LinalgOp::Cholesky,
                Ok("det") => LinalgOp::Det,
                _ => return Err(NifError::Argument("unknown linalg op".into())),
            };
            (
                Op::Linalg {
                    op,
                    upper: a.get(3, "upper")?,
                },
                vec![a.term(1)?, a.term(2)?],
                4,
            )
        }
        "decompose" => {
            let op = match a.term(0)?.atom_to_string().as_deref() {
                Ok("qr") => Decomposition::Qr,
                Ok("svd") => Decomposition::Svd,
                Ok("eigh") => Decomposition::Eigh,
                Ok("lu") => Decomposition::Lu,
                _ => return Err(NifError::Argument("unknown decomposition".into())),
            };
            (Op::Decompose(op), one(1)?, 2)
        }
        "tensordot" => (
            Op::Tensordot {
                axes_a: a.get(2, "axes_a")?,
                axes_b: a.get(3, "axes_b")?,
            },
            vec![a.term(0)?, a.term(1)?],
            4,
        ),
        // [w], then the layout.
        "quantize" => (Op::Quantize(a.quant(1)?), one(0)?, 4),
        // [packed, scales, biases in affine mode], the layout, the result's dtype.
        "dequantize" => (
            Op::Dequantize(a.quant(1)?, convert::dtype(a.term(4)?)?),
            a.list(0)?,
            5,
        ),
        // [x, packed, scales, biases in affine mode], the layout, transpose.
        "quantized_matmul" => (
            Op::QuantizedMatmul {
                quant: a.quant(1)?,
                transpose: a.get(4, "transpose")?,
            },
            a.list(0)?,
            5,
        ),
        // [x, packed, scales, biases in affine mode, lhs indices?, rhs indices?], the layout,
        // transpose, whether lhs and rhs indices are given.
        "gather_qmm" => (
            Op::GatherQmm {
                quant: a.quant(1)?,
                transpose: a.get(4, "transpose")?,
                lhs: a.get(5, "lhs indices")?,
                rhs: a.get(6, "rhs indices")?,
            },
            a.list(0)?,
            7,
        ),
        other => return Err(NifError::Argument(format!("unknown op {other}"))),
    };
    a.expect(arity)?;
    Ok(Decoded { op, operands })
}

impl Op {
    pub fn placement(&self) -> Placement {
        match self {
            Op::Fft { .. } | Op::Fftn { .. } | Op::Linalg { .. } => Placement::Worker,
            Op::Decompose(_) | Op::Quantize(_) => Placement::WorkerOutputs,
            _ => Placement::Caller,
        }
    }

    /// How many arrays the op returns.
    pub fn outputs(&self) -> usize {
        match self {
            Op::Decompose(Decomposition::Qr | Decomposition::Eigh) => 2,
            Op::Decompose(Decomposition::Svd | Decomposition::Lu) => 3,
            Op::Quantize(q) => q.parts_count(),
            _ => 1,
        }
    }

    /// How many array operands the op takes (`None`: any number, at least one).
    fn operand_count(&self) -> Option<usize> {
        Some(match self {
            Op::Full { .. } | Op::Arange { .. } => 0,
            Op::Dequantize(q, _) => q.parts_count(),
            Op::QuantizedMatmul { quant, .. } => 1 + quant.parts_count(),
            Op::GatherQmm {
                quant, lhs, rhs, ..
            } => 1 + quant.parts_count() + usize::from(*lhs) + usize::from(*rhs),
            Op::Concatenate(_)
            | Op::Gather { .. }
            | Op::Scatter { .. }
            | Op::Rope { .. }
            | Op::Attention { .. } => return None,
            Op::Binary(_)
            | Op::Matmul
            | Op::SliceDynamic { .. }
            | Op::SliceUpdate { .. }
            | Op::Pad { .. }
            | Op::Take(_)
            | Op::TakeAlongAxis(_)
            | Op::Conv(_)
            | Op::Linalg { .. }
            | Op::Tensordot { .. }
            | Op::RmsNorm(_) => 2,
            Op::Select | Op::SliceUpdateDynamic(_) | Op::PutAlongAxis(_) | Op::LayerNorm(_) => 3,
            _ => 1,
        })
    }

    /// Builds the op on `s` from its operands.
    pub fn apply(&self, x: &[&Array], s: &Stream) -> NifResult<Vec<Array>> {
        let count_ok = match self.operand_count() {
            Some(n) => x.len() == n,
            None => match self {
                Op::Scatter { .. } => x.len() >= 2,
                _ => !x.is_empty(),
            },
        };
        if !count_ok {
            return Err(NifError::Argument(format!(
                "{self:?}: wrong number of array operands ({})",
                x.len()
            )));
        }
        use mlx_bind as m;
        let one = match self {
            Op::Full {
                shape,
                value,
                dtype,
            } => m::full(shape, *value, *dtype, s),
            Op::Arange {
                start,
                stop,
                step,
                dtype,
            } => m::arange(*start, *stop, *step, *dtype, s),
            Op::Unary(op) => m::unary(*op, x[0], s),
            Op::Binary(op) => m::binary(*op, x[0], x[1], s),
            Op::Reduce {
                op,
                axes,
                keep_dims,
            } => m::reduce(*op, x[0], axes, *keep_dims, s),
            Op::Astype(dtype) => m::astype(x[0], *dtype, s),
            Op::Reshape(shape) => m::reshape(x[0], shape, s),
            Op::Transpose(axes) => m::transpose(x[0], axes, s),
            Op::Reverse(axis) => m::reverse(x[0], *axis, s),
            Op::LayerNorm(eps) => m::layer_norm(x[0], x[1], x[2], *eps, s),
            Op::RmsNorm(eps) => m::rms_norm(x[0], x[1], *eps, s),
            Op::Rope {
                dims,
                traditional,
                base,
                scale,
            } => m::rope(x, *dims, *traditional, *base, *scale, s),
            Op::Attention { scale, mask, sinks } => m::attention(x, *scale, *mask, *sinks, s),
            Op::BroadcastTo(shape) => m::broadcast_to(x[0], shape, s),
            Op::Matmul => m::matmul(x[0], x[1], s),
            Op::Inv => m::inv(x[0], s),
            Op::Select => m::where_(x[0], x[1], x[2], s),
            Op::Concatenate(axis) => m::concatenate(x, *axis, s),
            Op::Slice {
                start,
                stop,
                strides,
            } => m::slice(x[0], start, stop, strides, s),
            Op::SliceDynamic { axes, sizes } => m::slice_dynamic(x[0], x[1], axes, sizes, s),
            Op::SliceUpdate { start, stop } => m::slice_update(x[0], x[1], start, stop, s),
            Op::SliceUpdateDynamic(axes) => m::slice_update_dynamic(x[0], x[1], x[2], axes, s),
            Op::Pad { low, high } => m::pad(x[0], low, high, x[1], s),
            Op::Take(axis) => m::take(x[0], x[1], *axis, s),
            Op::TakeAlongAxis(axis) => m::take_along_axis(x[0], x[1], *axis, s),
            Op::PutAlongAxis(axis) => m::put_along_axis(x[0], x[1], x[2], *axis, s),
            Op::Topk { k, axis } => m::topk(x[0], *k, *axis, s),
            Op::Softmax { axes, precise } => m::softmax(x[0], axes, *precise, s),
            Op::ArgReduce {
                max,
                axis,
                keep_dims,
            } => m::arg_reduce(*max, x[0], *axis, *keep_dims, s),
            Op::Sort { indices, axis } => m::sort(*indices, x[0], *axis, s),
            Op::Gather { axes, slice_sizes } => m::gather(x[0], &x[1..], axes, slice_sizes, s),
            Op::Scatter { add, axes } => m::scatter(*add, x[0], &x[2..], x[1], axes, s),
            Op::AsStrided {
                shape,
                strides,
                offset,
            } => m::as_strided(x[0], shape, strides, *offset, s),
            Op::View(dtype) => m::view(x[0], *dtype, s),
            Op::Scan { op, axis, reverse } => m::scan(*op, x[0], *axis, *reverse, s),
            Op::Conv(opts) => m::conv(x[0], x[1], opts, s),
            Op::Fft { inverse, n, axis } => m::fft(*inverse, x[0], *n, *axis, s),
            Op::Fftn {
                kind,
                lengths,
                axes,
            } => m::fftn(*kind, x[0], lengths, axes, s),
            Op::Linalg { op, upper } => match op {
                LinalgOp::Solve => m::solve(x[0], x[1], s),
                LinalgOp::SolveTriangular => m::solve_triangular(x[0], x[1], *upper, s),
                LinalgOp::Cholesky => m::cholesky(x[0], *upper, s),
                LinalgOp::Det => m::det(x[0], s),
            },
            Op::Decompose(op) => return Ok(m::decompose(*op, x[0], s)?),
            Op::Tensordot { axes_a, axes_b } => m::tensordot(x[0], x[1], axes_a, axes_b, s),
            Op::Quantize(q) => return Ok(m::quantize(x[0], *q, s)?),
            Op::Dequantize(q, dtype) => m::dequantize(x, *q, *dtype, s),
            Op::QuantizedMatmul { quant, transpose } => {
                m::quantized_matmul(x, *transpose, *quant, s)
            }
            Op::GatherQmm {
                quant,
                transpose,
                lhs,
                rhs,
            } => m::gather_qmm(x, *lhs, *rhs, *transpose, *quant, s),
        };
        Ok(vec![one?])
    }
}
