//! Array operations. Each NIF builds the lazy MLX node on the calling thread, naming the given
//! worker's stream (see `build`), and returns `{:ok, array}`. Evaluation happens on the worker
//! when the array is read back or explicitly evaluated.

use rustler::{Encoder, Env, ResourceArc, Term};

use crate::build::{build, build_on_worker, build_outputs_on_worker};
use crate::convert;
use crate::error::NifError;
use crate::resources::{ArrayRes, WorkerRes};

macro_rules! parse_or_return {
    ($env:expr, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return e.encode($env),
        }
    };
}

#[rustler::nif]
fn full<'a>(
    env: Env<'a>,
    worker: ResourceArc<WorkerRes>,
    shape: Vec<i64>,
    value: f64,
    dtype: Term<'a>,
) -> Term<'a> {
    let dtype = parse_or_return!(env, convert::dtype(dtype));
    build(env, &worker, &[], |s| {
        mlx_bind::full(&shape, value, dtype, s)
    })
}

#[rustler::nif]
fn unary<'a>(
    env: Env<'a>,
    worker: ResourceArc<WorkerRes>,
    op: Term<'a>,
    a: ResourceArc<ArrayRes>,
) -> Term<'a> {
    let op = parse_or_return!(env, convert::unary_op(op));
    build(env, &worker, &[&a], |s| mlx_bind::unary(op, a.array(), s))
}

#[rustler::nif]
fn binary<'a>(
    env: Env<'a>,
    worker: ResourceArc<WorkerRes>,
    op: Term<'a>,
    a: ResourceArc<ArrayRes>,
    b: ResourceArc<ArrayRes>,
) -> Term<'a> {
    let op = parse_or_return!(env, convert::binary_op(op));
    build(env, &worker, &[&a, &b], |s| {
        mlx_bind::binary(op, a.array(), b.array(), s)
    })
}

#[rustler::nif]
fn reduce<'a>(
    env: Env<'a>,
    worker: ResourceArc<WorkerRes>,
    op: Term<'a>,
    a: ResourceArc<ArrayRes>,
    axes: Vec<i64>,
    keep_dims: bool,
) -> Term<'a> {
    let op = parse_or_return!(env, convert::reduce_op(op));
    build(env, &worker, &[&a], |s| {
        mlx_bind::reduce(op, a.array(), &axes, keep_dims, s)
    })
}

#[rustler::nif]
fn astype<'a>(
    env: Env<'a>,
    worker: ResourceArc<WorkerRes>,
    a: ResourceArc<ArrayRes>,
    dtype: Term<'a>,
) -> Term<'a> {
    let dtype = parse_or_return!(env, convert::dtype(dtype));
    build(env, &worker, &[&a], |s| {
        mlx_bind::astype(a.array(), dtype, s)
    })
}

#[rustler::nif]
fn reshape(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    a: ResourceArc<ArrayRes>,
    shape: Vec<i64>,
) -> Term {
    build(env, &worker, &[&a], |s| {
        mlx_bind::reshape(a.array(), &shape, s)
    })
}

#[rustler::nif]
fn transpose(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    a: ResourceArc<ArrayRes>,
    axes: Vec<i64>,
) -> Term {
    build(env, &worker, &[&a], |s| {
        mlx_bind::transpose(a.array(), &axes, s)
    })
}

#[rustler::nif]
fn broadcast_to(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    a: ResourceArc<ArrayRes>,
    shape: Vec<i64>,
) -> Term {
    build(env, &worker, &[&a], |s| {
        mlx_bind::broadcast_to(a.array(), &shape, s)
    })
}

#[rustler::nif]
fn matmul(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    a: ResourceArc<ArrayRes>,
    b: ResourceArc<ArrayRes>,
) -> Term {
    build(env, &worker, &[&a, &b], |s| {
        mlx_bind::matmul(a.array(), b.array(), s)
    })
}

/// `select(worker, cond, a, b)`: element-wise `cond ? a : b`.
#[rustler::nif]
fn select(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    cond: ResourceArc<ArrayRes>,
    a: ResourceArc<ArrayRes>,
    b: ResourceArc<ArrayRes>,
) -> Term {
    build(env, &worker, &[&cond, &a, &b], |s| {
        mlx_bind::where_(cond.array(), a.array(), b.array(), s)
    })
}

/// `arange(worker, start, stop, step, dtype)`: `[start, stop)` by `step`.
#[rustler::nif]
fn arange<'a>(
    env: Env<'a>,
    worker: ResourceArc<WorkerRes>,
    start: f64,
    stop: f64,
    step: f64,
    dtype: Term<'a>,
) -> Term<'a> {
    let dtype = parse_or_return!(env, convert::dtype(dtype));
    build(env, &worker, &[], |s| {
        mlx_bind::arange(start, stop, step, dtype, s)
    })
}

/// `concatenate(worker, arrays, axis)`.
#[rustler::nif]
fn concatenate(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    arrays: Vec<ResourceArc<ArrayRes>>,
    axis: i64,
) -> Term {
    let inputs: Vec<&ResourceArc<ArrayRes>> = arrays.iter().collect();
    build(env, &worker, &inputs, |s| {
        let refs: Vec<&mlx_bind::Array> = arrays.iter().map(|a| a.array()).collect();
        mlx_bind::concatenate(&refs, axis, s)
    })
}

/// `slice(worker, a, start, stop, strides)`.
#[rustler::nif]
fn slice(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    a: ResourceArc<ArrayRes>,
    start: Vec<i64>,
    stop: Vec<i64>,
    strides: Vec<i64>,
) -> Term {
    build(env, &worker, &[&a], |s| {
        mlx_bind::slice(a.array(), &start, &stop, &strides, s)
    })
}

/// `slice_update(worker, src, update, start, stop)`.
#[rustler::nif]
fn slice_update(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    src: ResourceArc<ArrayRes>,
    update: ResourceArc<ArrayRes>,
    start: Vec<i64>,
    stop: Vec<i64>,
) -> Term {
    build(env, &worker, &[&src, &update], |s| {
        mlx_bind::slice_update(src.array(), update.array(), &start, &stop, s)
    })
}

/// `pad(worker, a, low, high, value)`: constant padding (non-negative amounts).
#[rustler::nif]
fn pad(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    a: ResourceArc<ArrayRes>,
    low: Vec<i64>,
    high: Vec<i64>,
    value: ResourceArc<ArrayRes>,
) -> Term {
    build(env, &worker, &[&a, &value], |s| {
        mlx_bind::pad(a.array(), &low, &high, value.array(), s)
    })
}

/// `take(worker, a, indices, axis)`.
#[rustler::nif]
fn take(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    a: ResourceArc<ArrayRes>,
    indices: ResourceArc<ArrayRes>,
    axis: i64,
) -> Term {
    build(env, &worker, &[&a, &indices], |s| {
        mlx_bind::take(a.array(), indices.array(), axis, s)
    })
}

/// `take_along_axis(worker, a, indices, axis)`.
#[rustler::nif]
fn take_along_axis(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    a: ResourceArc<ArrayRes>,
    indices: ResourceArc<ArrayRes>,
    axis: i64,
) -> Term {
    build(env, &worker, &[&a, &indices], |s| {
        mlx_bind::take_along_axis(a.array(), indices.array(), axis, s)
    })
}

/// `put_along_axis(worker, a, indices, values, axis)`.
#[rustler::nif]
fn put_along_axis(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    a: ResourceArc<ArrayRes>,
    indices: ResourceArc<ArrayRes>,
    values: ResourceArc<ArrayRes>,
    axis: i64,
) -> Term {
    build(env, &worker, &[&a, &indices, &values], |s| {
        mlx_bind::put_along_axis(a.array(), indices.array(), values.array(), axis, s)
    })
}

/// `topk(worker, a, k, axis)`: the `k` largest entries along `axis`, unordered.
#[rustler::nif]
fn topk(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    a: ResourceArc<ArrayRes>,
    k: i64,
    axis: i64,
) -> Term {
    build(env, &worker, &[&a], |s| {
        mlx_bind::topk(a.array(), k, axis, s)
    })
}

/// `arg_reduce(worker, max, a, axis, keep_dims)`: argmax (`max`) or argmin along `axis`.
#[rustler::nif]
fn arg_reduce(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    max: bool,
    a: ResourceArc<ArrayRes>,
    axis: i64,
    keep_dims: bool,
) -> Term {
    build(env, &worker, &[&a], |s| {
        mlx_bind::arg_reduce(max, a.array(), axis, keep_dims, s)
    })
}

/// `sort(worker, indices, a, axis)`: ascending sort (or argsort) along `axis`.
#[rustler::nif]
fn sort(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    indices: bool,
    a: ResourceArc<ArrayRes>,
    axis: i64,
) -> Term {
    build(env, &worker, &[&a], |s| {
        mlx_bind::sort(indices, a.array(), axis, s)
    })
}

/// `scatter(worker, add, a, indices, updates, axes)`: the caller keeps indices in bounds.
#[rustler::nif]
fn scatter(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    add: bool,
    a: ResourceArc<ArrayRes>,
    indices: Vec<ResourceArc<ArrayRes>>,
    updates: ResourceArc<ArrayRes>,
    axes: Vec<i64>,
) -> Term {
    let mut inputs: Vec<&ResourceArc<ArrayRes>> = vec![&a, &updates];
    inputs.extend(indices.iter());
    build(env, &worker, &inputs, |s| {
        let refs: Vec<&mlx_bind::Array> = indices.iter().map(|i| i.array()).collect();
        mlx_bind::scatter(add, a.array(), &refs, updates.array(), &axes, s)
    })
}

/// `as_strided(worker, a, shape, strides, offset)`: a checked strided view.
#[rustler::nif]
fn as_strided(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    a: ResourceArc<ArrayRes>,
    shape: Vec<i64>,
    strides: Vec<i64>,
    offset: usize,
) -> Term {
    build(env, &worker, &[&a], |s| {
        mlx_bind::as_strided(a.array(), &shape, &strides, offset, s)
    })
}

/// `view(worker, a, dtype)`: the same bits as another type of the same size.
#[rustler::nif]
fn view<'a>(
    env: Env<'a>,
    worker: ResourceArc<WorkerRes>,
    a: ResourceArc<ArrayRes>,
    dtype: Term<'a>,
) -> Term<'a> {
    let dtype = parse_or_return!(env, convert::dtype(dtype));
    build(env, &worker, &[&a], |s| mlx_bind::view(a.array(), dtype, s))
}

/// `scan(worker, op, a, axis, reverse)`: an inclusive cumulative `op` along `axis`.
#[rustler::nif]
fn scan<'a>(
    env: Env<'a>,
    worker: ResourceArc<WorkerRes>,
    op: Term<'a>,
    a: ResourceArc<ArrayRes>,
    axis: i64,
    reverse: bool,
) -> Term<'a> {
    let op = parse_or_return!(env, convert::scan_op(op));
    build(env, &worker, &[&a], |s| {
        mlx_bind::scan(op, a.array(), axis, reverse, s)
    })
}

/// `conv(worker, input, weight, strides, padding_lo, padding_hi, kernel_dilation,
/// input_dilation, groups)`: channels-last convolution (see `mlx_bind::conv`).
#[allow(clippy::too_many_arguments)]
#[rustler::nif]
fn conv(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    input: ResourceArc<ArrayRes>,
    weight: ResourceArc<ArrayRes>,
    strides: Vec<i64>,
    padding_lo: Vec<i64>,
    padding_hi: Vec<i64>,
    kernel_dilation: Vec<i64>,
    input_dilation: Vec<i64>,
    groups: i64,
) -> Term {
    let opts = mlx_bind::ConvOpts {
        strides,
        padding_lo,
        padding_hi,
        kernel_dilation,
        input_dilation,
        groups,
    };
    build(env, &worker, &[&input, &weight], |s| {
        mlx_bind::conv(input.array(), weight.array(), &opts, s)
    })
}

/// `fft(worker, inverse, a, n, axis)`.
#[rustler::nif]
fn fft(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    inverse: bool,
    a: ResourceArc<ArrayRes>,
    n: i64,
    axis: i64,
) -> Term {
    // MLX's fft builds internal nodes on the default stream: build it on the worker.
    let input = a.clone();
    build_on_worker(env, &worker, &[&a], move |s| {
        mlx_bind::fft(inverse, input.array(), n, axis, s)
    })
}

/// `fftn(worker, kind, a, lengths, axes)`: kind is `:fft`, `:ifft`, `:rfft` or `:irfft`.
#[rustler::nif]
fn fftn<'a>(
    env: Env<'a>,
    worker: ResourceArc<WorkerRes>,
    kind: Term<'a>,
    a: ResourceArc<ArrayRes>,
    lengths: Vec<i64>,
    axes: Vec<i64>,
) -> Term<'a> {
    let kind = match kind.atom_to_string().as_deref() {
        Ok("fft") => mlx_bind::FftKind::Forward,
        Ok("ifft") => mlx_bind::FftKind::Inverse,
        Ok("rfft") => mlx_bind::FftKind::Real,
        Ok("irfft") => mlx_bind::FftKind::InverseReal,
        _ => return NifError::Argument("unknown fft kind".into()).encode(env),
    };
    let input = a.clone();
    build_on_worker(env, &worker, &[&a], move |s| {
        mlx_bind::fftn(kind, input.array(), &lengths, &axes, s)
    })
}

/// `linalg(worker, op, a, b, upper)`: `:solve` (a x = b), `:solve_triangular`, `:cholesky`
/// or `:det` (`b` is ignored by the last two). MLX runs these on CPU streams only; they are
/// built on the worker because they create multi-output nodes internally.
#[rustler::nif]
fn linalg<'a>(
    env: Env<'a>,
    worker: ResourceArc<WorkerRes>,
    op: Term<'a>,
    a: ResourceArc<ArrayRes>,
    b: ResourceArc<ArrayRes>,
    upper: bool,
) -> Term<'a> {
    let op = match op.atom_to_string() {
        Ok(name) if ["solve", "solve_triangular", "cholesky", "det"].contains(&name.as_str()) => {
            name
        }
        _ => return NifError::Argument("unknown linalg op".into()).encode(env),
    };
    let (ja, jb) = (a.clone(), b.clone());
    build_on_worker(env, &worker, &[&a, &b], move |s| match op.as_str() {
        "solve" => mlx_bind::solve(ja.array(), jb.array(), s),
        "solve_triangular" => mlx_bind::solve_triangular(ja.array(), jb.array(), upper, s),
        "cholesky" => mlx_bind::cholesky(ja.array(), upper, s),
        _ => mlx_bind::det(ja.array(), s),
    })
}

/// `decompose(worker, op, a)`: `:qr`, `:svd`, `:eigh` or `:lu` (see
/// `mlx_bind::Decomposition`), replying with the evaluated outputs.
#[rustler::nif]
fn decompose<'a>(
    env: Env<'a>,
    worker: ResourceArc<WorkerRes>,
    op: Term<'a>,
    a: ResourceArc<ArrayRes>,
) -> Term<'a> {
    use mlx_bind::Decomposition;
    let op = match op.atom_to_string().as_deref() {
        Ok("qr") => Decomposition::Qr,
        Ok("svd") => Decomposition::Svd,
        Ok("eigh") => Decomposition::Eigh,
        Ok("lu") => Decomposition::Lu,
        _ => return NifError::Argument("unknown decomposition".into()).encode(env),
    };
    let input = a.clone();
    build_outputs_on_worker(env, &worker, &[&a], move |s| {
        mlx_bind::decompose(op, input.array(), s)
    })
}

/// `gather(worker, a, indices, axes, slice_sizes)`: the caller keeps indices in bounds.
#[rustler::nif]
fn gather(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    a: ResourceArc<ArrayRes>,
    indices: Vec<ResourceArc<ArrayRes>>,
    axes: Vec<i64>,
    slice_sizes: Vec<i64>,
) -> Term {
    let mut inputs: Vec<&ResourceArc<ArrayRes>> = vec![&a];
    inputs.extend(indices.iter());
    build(env, &worker, &inputs, |s| {
        let refs: Vec<&mlx_bind::Array> = indices.iter().map(|i| i.array()).collect();
        mlx_bind::gather(a.array(), &refs, &axes, &slice_sizes, s)
    })
}

/// `inv(worker, a)`: the inverse of the square matrices in the last two axes. A singular
/// matrix is reported when the array is evaluated.
#[rustler::nif]
fn inv(env: Env, worker: ResourceArc<WorkerRes>, a: ResourceArc<ArrayRes>) -> Term {
    build(env, &worker, &[&a], |s| mlx_bind::inv(a.array(), s))
}

#[rustler::nif]
fn tensordot(
    env: Env,
    worker: ResourceArc<WorkerRes>,
    a: ResourceArc<ArrayRes>,
    b: ResourceArc<ArrayRes>,
    axes_a: Vec<i64>,
    axes_b: Vec<i64>,
) -> Term {
    build(env, &worker, &[&a, &b], |s| {
        mlx_bind::tensordot(a.array(), b.array(), &axes_a, &axes_b, s)
    })
}
