//! The raw-MLX reference of `bench/run.exs`: the same computations written directly against
//! `mlx-bind`, timed in one Rust process with no BEAM in the loop, and OpenBLAS `cblas_sgemm`
//! for the CPU matmul. Prints `key: value` lines with the keys `bench/run.exs` prints for
//! NxMlx (the OpenBLAS ones prefixed `openblas.`); `bench/README.md` defines every case.
//! The matmul, elementwise, transformer and mlp cases also run as one function under
//! `mx::compile` (its inputs the same arrays, weights included), prefixed `compiled.`:
//! the reference of NxMlx's fusion lane.
//!
//!     mlx_raw_bench [--device cpu|gpu] [--quick] [--serve] [dispatch|matmul|elementwise|transformer|mlp|stages|hop|blas]...
//!
//! `blas` times MLX's f32 matmul on the shapes models use (square, a BERT-base layer's
//! projections at 128 and 4096 tokens, one decode token, batched attention heads) through
//! whatever BLAS the process resolved (`openblas.blas_library`): run it under `LD_PRELOAD`
//! of another BLAS to compare libraries (bench/README.md, "Comparing BLAS libraries").
//!
//! Method (as in `bench/run.exs`): warm-up runs, then timed runs (at least 5, at most 20, or
//! until 3 s have passed), each building the graph and evaluating it; median and the 10th and
//! 90th percentiles in milliseconds.
//!
//! `--serve` sets up the transformer and mlp cases named by the suites instead of timing
//! them, prints `ready`, then for each line read from stdin naming a case's key (as printed,
//! without `_ms`: `transformer_1x128x768_f32`, `compiled.mlp4_b128_f32`) runs it once and
//! prints its time in milliseconds (`error: ...` for an unknown key), until stdin closes:
//! `bench/run.exs` times NxMlx and this process in alternation, so that both see the same
//! machine (paired samples, for the `_paired` ratios).

use std::ffi::{c_char, c_void, CString};
use std::time::Instant;

use mlx_bind::{
    binary, full, matmul, random_uniform, reduce, reshape, transpose, unary, Array, BinaryOp,
    Compiled, DeviceKind, Dtype, ReduceOp, Result, Stream, UnaryOp,
};

/// A case set up for `--serve`: its key and one run.
type Served = (String, Box<dyn FnMut() -> Result<()>>);

struct Settings {
    warmup: usize,
    min_reps: usize,
    max_reps: usize,
    budget_s: f64,
    /// Set with `--serve`: the cases are collected here instead of timed.
    serve: Option<std::cell::RefCell<Vec<Served>>>,
}

/// Times the case `prefix`+`key` and prints its keys, or keeps it for `--serve`.
fn case(
    set: &Settings,
    prefix: &str,
    key: &str,
    mut f: impl FnMut() -> Result<()> + 'static,
) -> Result<()> {
    match &set.serve {
        Some(cases) => {
            cases
                .borrow_mut()
                .push((format!("{prefix}{key}"), Box::new(f)));
            Ok(())
        }
        None => {
            let t = measure(set, &mut f)?;
            emit(prefix, key, &t);
            Ok(())
        }
    }
}

/// `f` under `mx::compile` on `inputs`, its first output evaluated per run, as a case (see
/// [`measure_compiled`]).
fn case_compiled(
    set: &Settings,
    key: &str,
    inputs: Vec<Array>,
    f: impl Fn(&[Array]) -> Result<Vec<Array>> + Send + Sync + 'static,
) -> Result<()> {
    let compiled = Compiled::new(f);
    case(set, "compiled.", key, move || {
        let refs: Vec<&Array> = inputs.iter().collect();
        compiled.call(&refs)?[0].eval()
    })
}

/// The `--serve` loop (see the module doc).
fn serve(cases: Vec<Served>) {
    use std::io::{BufRead, Write};
    let mut cases: std::collections::HashMap<String, Box<dyn FnMut() -> Result<()>>> =
        cases.into_iter().collect();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ready");
    let _ = out.flush();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let reply = match cases.get_mut(line.trim()) {
            Some(f) => {
                let t0 = Instant::now();
                match f() {
                    Ok(()) => format!("{:.4}", t0.elapsed().as_secs_f64() * 1e3),
                    Err(e) => format!("error: {}", e.message),
                }
            }
            None => format!("error: unknown case {:?}", line.trim()),
        };
        let _ = writeln!(out, "{reply}");
        let _ = out.flush();
    }
}

struct Timing {
    median: f64,
    p10: f64,
    p90: f64,
}

fn measure(set: &Settings, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    for _ in 0..set.warmup {
        f()?;
    }
    let start = Instant::now();
    let mut ms = Vec::with_capacity(set.max_reps);
    while ms.len() < set.min_reps
        || (ms.len() < set.max_reps && start.elapsed().as_secs_f64() < set.budget_s)
    {
        let t0 = Instant::now();
        f()?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    Ok(Timing {
        median: at(0.5),
        p10: at(0.1),
        p90: at(0.9),
    })
}

fn emit(prefix: &str, key: &str, t: &Timing) {
    println!("{prefix}{key}_ms: {:.4}", t.median);
    println!("{prefix}{key}_ms_p10: {:.4}", t.p10);
    println!("{prefix}{key}_ms_p90: {:.4}", t.p90);
}

/// `amount` (FLOPs or bytes) per run, as G per second at the median.
fn emit_rate(prefix: &str, key: &str, unit: &str, amount: f64, t: &Timing) {
    println!(
        "{prefix}{key}_{unit}: {:.2}",
        amount / (t.median / 1e3) / 1e9
    );
}

/// `f` under `mx::compile`, called on `inputs` and its first output evaluated, per run; the
/// first (warm-up) call traces and, where MLX fuses, builds the kernels.
fn measure_compiled(
    set: &Settings,
    inputs: &[&Array],
    f: impl Fn(&[Array]) -> Result<Vec<Array>> + Send + Sync + 'static,
) -> Result<Timing> {
    let compiled = Compiled::new(f);
    measure(set, || compiled.call(inputs)?[0].eval())
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "f32",
        Dtype::F16 => "f16",
        Dtype::BF16 => "bf16",
        _ => "other",
    }
}

fn scalar(v: f64, d: Dtype, s: &Stream) -> Result<Array> {
    full(&[], v, d, s)
}

/// Uniform in [-scale, scale), evaluated.
fn uniform(shape: &[i64], d: Dtype, seed: u64, scale: f64, s: &Stream) -> Result<Array> {
    let u = random_uniform(shape, Dtype::F32, seed, s)?;
    let centered = binary(BinaryOp::Subtract, &u, &scalar(0.5, Dtype::F32, s)?, s)?;
    let a = binary(
        BinaryOp::Multiply,
        &centered,
        &scalar(2.0 * scale, Dtype::F32, s)?,
        s,
    )?;
    let a = mlx_bind::astype(&a, d, s)?;
    a.eval()?;
    Ok(a)
}

fn dispatch(s: &Stream) -> Result<()> {
    let a = full(&[16], 1.0, Dtype::F32, s)?;
    a.eval()?;
    let mut out = vec![0u8; 64];
    let (mut build, mut readback) = (Vec::new(), Vec::new());
    for i in 0..5_200 {
        let t0 = Instant::now();
        let b = binary(BinaryOp::Add, &a, &a, s)?;
        let t1 = Instant::now();
        b.eval()?;
        b.copy_to(s, &mut out)?;
        let t2 = Instant::now();
        if i >= 200 {
            build.push((t1 - t0).as_secs_f64() * 1e6);
            readback.push((t2 - t1).as_secs_f64() * 1e6);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!("dispatch_us: {:.3}", median(build));
    println!("readback_us: {:.3}", median(readback));
    println!("replay_op_us: {:.3}", chain_per_op(s)?);
    println!("while_iter_us: {:.3}", while_loop(s)?);
    Ok(())
}

/// What an op of a long graph costs MLX itself: a chain of 200 adds of a 16-element f32
/// vector, built, evaluated and read back, against one add, per extra add (microseconds, of
/// medians over 250 runs each). The reference of NxMlx's `replay_op_us`.
fn chain_per_op(s: &Stream) -> Result<f64> {
    let a = full(&[16], 0.0, Dtype::F32, s)?;
    let b = full(&[16], 1.0, Dtype::F32, s)?;
    a.eval()?;
    b.eval()?;
    let mut out = vec![0u8; 64];
    let mut time = |n: usize| -> Result<f64> {
        let mut t = Vec::new();
        for i in 0..300 {
            let t0 = Instant::now();
            let mut x = binary(BinaryOp::Add, &a, &b, s)?;
            for _ in 1..n {
                x = binary(BinaryOp::Add, &x, &b, s)?;
            }
            x.eval()?;
            x.copy_to(s, &mut out)?;
            if i >= 50 {
                t.push(t0.elapsed().as_secs_f64() * 1e6);
            }
        }
        t.sort_by(|a, b| a.total_cmp(b));
        Ok(t[t.len() / 2])
    };
    let (long, one) = (time(200)?, time(1)?);
    Ok((long - one) / 199.0)
}

/// The loop `while i < 1000: (i, x) = (i + 1, x * 1.0001 + 1)` on a 16-element f32 `x`, as a
/// compiler must run it: each iteration builds the body, then evaluates the condition with
/// the state and reads it back. Microseconds per iteration, median of 5 loops.
fn while_loop(s: &Stream) -> Result<f64> {
    let n = 1000;
    let (one, factor, limit) = (
        scalar(1.0, Dtype::F32, s)?,
        scalar(1.0001, Dtype::F32, s)?,
        scalar(n as f64, Dtype::I32, s)?,
    );
    let step = scalar(1.0, Dtype::I32, s)?;
    let mut times = Vec::new();
    for _ in 0..6 {
        let mut x = full(&[16], 1.0, Dtype::F32, s)?;
        let mut i = full(&[], 0.0, Dtype::I32, s)?;
        x.eval()?;
        let t0 = Instant::now();
        loop {
            let pred = binary(BinaryOp::Less, &i, &limit, s)?;
            mlx_bind::async_eval_all(&[&pred, &i, &x])?;
            if pred.to_bytes(s)?.iter().all(|&b| b == 0) {
                break;
            }
            let y = binary(BinaryOp::Multiply, &x, &factor, s)?;
            x = binary(BinaryOp::Add, &y, &one, s)?;
            i = binary(BinaryOp::Add, &i, &step, s)?;
        }
        x.eval()?;
        times.push(t0.elapsed().as_secs_f64() * 1e6 / n as f64);
    }
    times.remove(0);
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

fn matmul_suite(set: &Settings, device: DeviceKind, s: &Stream) -> Result<()> {
    let cases: Vec<(Dtype, Vec<i64>)> = match device {
        DeviceKind::Cpu => vec![(Dtype::F32, vec![256, 512, 1024, 2048])],
        _ => [Dtype::BF16, Dtype::F16, Dtype::F32]
            .into_iter()
            .map(|d| (d, vec![1024, 2048, 4096, 8192]))
            .collect(),
    };
    for (d, sizes) in cases {
        for n in sizes {
            let a = uniform(&[n, n], d, 1, 1.0, s)?;
            let b = uniform(&[n, n], d, 2, 1.0, s)?;
            let t = measure(set, || matmul(&a, &b, s)?.eval())?;
            let key = format!("matmul_{}_{n}", dtype_name(d));
            emit("", &key, &t);
            emit_rate("", &key, "gflops", 2.0 * (n * n * n) as f64, &t);
            let s1 = *s;
            let t = measure_compiled(set, &[&a, &b], move |x| {
                Ok(vec![matmul(&x[0], &x[1], &s1)?])
            })?;
            emit("compiled.", &key, &t);
            if device == DeviceKind::Cpu {
                openblas_sgemm(set, n as usize)?;
            }
        }
    }
    Ok(())
}

type Sgemm = unsafe extern "C" fn(
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    f32,
    *const f32,
    i32,
    *const f32,
    i32,
    f32,
    *mut f32,
    i32,
);

extern "C" {
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}

/// `cblas_sgemm` as the process resolves it (OpenBLAS when the build linked it ahead of
/// libmlx's bundled BLAS; `openblas.blas_library` says which library it came from).
fn openblas_sgemm(set: &Settings, n: usize) -> Result<()> {
    let name = CString::new("cblas_sgemm").expect("no NUL");
    // RTLD_DEFAULT is the null handle on Linux.
    let sym = unsafe { dlsym(std::ptr::null_mut(), name.as_ptr()) };
    if sym.is_null() {
        println!("openblas.missing: cblas_sgemm not found");
        return Ok(());
    }
    let sgemm: Sgemm = unsafe { std::mem::transmute::<*mut c_void, Sgemm>(sym) };
    let a: Vec<f32> = (0..n * n)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let b: Vec<f32> = (0..n * n)
        .map(|i| ((i * 104729) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let mut c = vec![0f32; n * n];
    let n32 = n as i32;
    let t = measure(set, || {
        // Row-major (101), no transposes (111).
        unsafe {
            sgemm(
                101,
                111,
                111,
                n32,
                n32,
                n32,
                1.0,
                a.as_ptr(),
                n32,
                b.as_ptr(),
                n32,
                0.0,
                c.as_mut_ptr(),
                n32,
            )
        };
        Ok(())
    })?;
    let key = format!("matmul_f32_{n}");
    emit("openblas.", &key, &t);
    emit_rate("openblas.", &key, "gflops", 2.0 * (n * n * n) as f64, &t);
    Ok(())
}

/// MLX's f32 matmul, [batch, m, k] x [batch, k, n], on model shapes: `blas.<name>_ms` and
/// `blas.<name>_gflops`.
fn blas_suite(set: &Settings, s: &Stream) -> Result<()> {
    let cases: [(&str, i64, i64, i64, i64); 9] = [
        ("square_1024", 1, 1024, 1024, 1024),
        ("square_2048", 1, 2048, 2048, 2048),
        ("qkv_128x768x2304", 1, 128, 768, 2304),
        ("ffn_up_128x768x3072", 1, 128, 768, 3072),
        ("ffn_down_128x3072x768", 1, 128, 3072, 768),
        ("ffn_up_4096x768x3072", 1, 4096, 768, 3072),
        ("decode_1x768x3072", 1, 1, 768, 3072),
        ("decode_8x768x3072", 1, 8, 768, 3072),
        ("heads_12x128x64x128", 12, 128, 64, 128),
    ];
    for (name, batch, m, k, n) in cases {
        let (a_shape, b_shape) = if batch == 1 {
            (vec![m, k], vec![k, n])
        } else {
            (vec![batch, m, k], vec![batch, k, n])
        };
        let a = uniform(&a_shape, Dtype::F32, 1, 1.0, s)?;
        let b = uniform(&b_shape, Dtype::F32, 2, 1.0, s)?;
        a.eval()?;
        b.eval()?;
        let t = measure(set, || matmul(&a, &b, s)?.eval())?;
        emit("blas.", name, &t);
        emit_rate(
            "blas.",
            name,
            "gflops",
            2.0 * (batch * m * k * n) as f64,
            &t,
        );
    }
    Ok(())
}

fn elementwise_suite(set: &Settings, device: DeviceKind, s: &Stream) -> Result<()> {
    let (n, label): (i64, &str) = match device {
        DeviceKind::Cpu => (16 << 20, "16m"),
        _ => (64 << 20, "64m"),
    };
    let d = Dtype::F32;
    let a = uniform(&[n], d, 3, 1.0, s)?;
    let b = uniform(&[n], d, 4, 1.0, s)?;
    let bytes = |k: i64| (k * n * 4) as f64;

    let rows = reshape(&a, &[n / 4096, 4096], s)?;
    // (name, bytes read and written per run in units of the tensor's size, inputs, function)
    type Op = fn(&[Array], &Stream) -> Result<Array>;
    let cases: [(&str, i64, Vec<&Array>, Op); 5] = [
        ("add", 3, vec![&a, &b], |x, s| {
            binary(BinaryOp::Add, &x[0], &x[1], s)
        }),
        ("exp", 2, vec![&a], |x, s| unary(UnaryOp::Exp, &x[0], s)),
        ("sum", 1, vec![&a], |x, s| {
            reduce(ReduceOp::Sum, &x[0], &[0], false, s)
        }),
        ("softmax", 2, vec![&rows], |x, s| softmax(&x[0], s)),
        ("gelu", 2, vec![&a], |x, s| gelu(&x[0], s)),
    ];
    for (name, k, inputs, op) in cases {
        let owned: Vec<Array> = inputs.iter().map(|x| (*x).clone()).collect();
        let t = measure(set, || op(&owned, s)?.eval())?;
        let key = format!("{name}_f32_{label}");
        emit("", &key, &t);
        emit_rate("", &key, "gbps", bytes(k), &t);
        let s1 = *s;
        let t = measure_compiled(set, &inputs, move |x| Ok(vec![op(x, &s1)?]))?;
        emit("compiled.", &key, &t);
    }
    Ok(())
}

/// Exact GELU, as NxMlx's bench writes it: x * 0.5 * (1 + erf(x / sqrt(2))), element-wise
/// in the tensor's type (the chain the fusion lane fuses into one kernel).
fn gelu(x: &Array, s: &Stream) -> Result<Array> {
    let d = x.dtype();
    let half = binary(BinaryOp::Multiply, x, &scalar(0.5, d, s)?, s)?;
    let scaled = binary(
        BinaryOp::Multiply,
        x,
        &scalar(std::f64::consts::FRAC_1_SQRT_2, d, s)?,
        s,
    )?;
    let one_plus = binary(
        BinaryOp::Add,
        &unary(UnaryOp::Erf, &scaled, s)?,
        &scalar(1.0, d, s)?,
        s,
    )?;
    binary(BinaryOp::Multiply, &half, &one_plus, s)
}

/// Softmax over the last axis, as NxMlx computes it: exp(x - max) / sum.
fn softmax(x: &Array, s: &Stream) -> Result<Array> {
    let last = x.shape().len() as i64 - 1;
    let m = reduce(ReduceOp::Max, x, &[last], true, s)?;
    let e = unary(UnaryOp::Exp, &binary(BinaryOp::Subtract, x, &m, s)?, s)?;
    let sum = reduce(ReduceOp::Sum, &e, &[last], true, s)?;
    binary(BinaryOp::Divide, &e, &sum, s)
}

struct Block {
    d: Dtype,
    wq: Array,
    bq: Array,
    wk: Array,
    bk: Array,
    wv: Array,
    bv: Array,
    wo: Array,
    bo: Array,
    w1: Array,
    b1: Array,
    w2: Array,
    b2: Array,
    g1: Array,
    beta1: Array,
    g2: Array,
    beta2: Array,
}

const HIDDEN: i64 = 768;
const HEADS: i64 = 12;
const FF: i64 = 3072;

impl Block {
    fn new(d: Dtype, s: &Stream) -> Result<Block> {
        let w = |shape: &[i64], seed| uniform(shape, d, seed, 0.02, s);
        Ok(Block {
            d,
            wq: w(&[HIDDEN, HIDDEN], 10)?,
            bq: w(&[HIDDEN], 11)?,
            wk: w(&[HIDDEN, HIDDEN], 12)?,
            bk: w(&[HIDDEN], 13)?,
            wv: w(&[HIDDEN, HIDDEN], 14)?,
            bv: w(&[HIDDEN], 15)?,
            wo: w(&[HIDDEN, HIDDEN], 16)?,
            bo: w(&[HIDDEN], 17)?,
            w1: w(&[HIDDEN, FF], 18)?,
            b1: w(&[FF], 19)?,
            w2: w(&[FF, HIDDEN], 20)?,
            b2: w(&[HIDDEN], 21)?,
            g1: w(&[HIDDEN], 22)?,
            beta1: w(&[HIDDEN], 23)?,
            g2: w(&[HIDDEN], 24)?,
            beta2: w(&[HIDDEN], 25)?,
        })
    }

    /// The weights in a fixed order: the inputs of the compiled block.
    fn params(&self) -> Vec<&Array> {
        vec![
            &self.wq,
            &self.bq,
            &self.wk,
            &self.bk,
            &self.wv,
            &self.bv,
            &self.wo,
            &self.bo,
            &self.w1,
            &self.b1,
            &self.w2,
            &self.b2,
            &self.g1,
            &self.beta1,
            &self.g2,
            &self.beta2,
        ]
    }

    /// The block over weights given in [`params`](Block::params) order.
    fn from_params(d: Dtype, p: &[Array]) -> Block {
        let w = |i: usize| p[i].clone();
        Block {
            d,
            wq: w(0),
            bq: w(1),
            wk: w(2),
            bk: w(3),
            wv: w(4),
            bv: w(5),
            wo: w(6),
            bo: w(7),
            w1: w(8),
            b1: w(9),
            w2: w(10),
            b2: w(11),
            g1: w(12),
            beta1: w(13),
            g2: w(14),
            beta2: w(15),
        }
    }

    fn layer_norm(&self, x: &Array, g: &Array, b: &Array, s: &Stream) -> Result<Array> {
        let mean = reduce(ReduceOp::Mean, x, &[2], true, s)?;
        let xc = binary(BinaryOp::Subtract, x, &mean, s)?;
        let var = reduce(
            ReduceOp::Mean,
            &binary(BinaryOp::Multiply, &xc, &xc, s)?,
            &[2],
            true,
            s,
        )?;
        let eps = scalar(1e-5, self.d, s)?;
        let inv = unary(UnaryOp::Rsqrt, &binary(BinaryOp::Add, &var, &eps, s)?, s)?;
        let y = binary(
            BinaryOp::Multiply,
            &binary(BinaryOp::Multiply, &xc, &inv, s)?,
            g,
            s,
        )?;
        binary(BinaryOp::Add, &y, b, s)
    }

    fn linear(&self, x: &Array, w: &Array, b: &Array, s: &Stream) -> Result<Array> {
        binary(BinaryOp::Add, &matmul(x, w, s)?, b, s)
    }

    /// Pre-LN block: x + attn(ln1(x)), then + mlp(ln2(.)) with exact GELU.
    fn forward(&self, x: &Array, s: &Stream) -> Result<Array> {
        self.forward_with(x, s, false)
    }

    /// [`forward`](Block::forward), with MLX's softmax op when `mx_softmax`.
    fn forward_with(&self, x: &Array, s: &Stream, mx_softmax: bool) -> Result<Array> {
        let shape = x.shape();
        let (bsz, seq) = (shape[0], shape[1]);
        let hd = HIDDEN / HEADS;
        let h = self.layer_norm(x, &self.g1, &self.beta1, s)?;
        let heads = |a: Array| -> Result<Array> {
            transpose(&reshape(&a, &[bsz, seq, HEADS, hd], s)?, &[0, 2, 1, 3], s)
        };
        let q = heads(self.linear(&h, &self.wq, &self.bq, s)?)?;
        let k = heads(self.linear(&h, &self.wk, &self.bk, s)?)?;
        let v = heads(self.linear(&h, &self.wv, &self.bv, s)?)?;
        let kt = transpose(&k, &[0, 1, 3, 2], s)?;
        let scale = scalar(1.0 / (hd as f64).sqrt(), self.d, s)?;
        let scores = binary(BinaryOp::Multiply, &matmul(&q, &kt, s)?, &scale, s)?;
        let probs = if mx_softmax {
            mlx_bind::softmax(&scores, &[3], true, s)?
        } else {
            softmax(&scores, s)?
        };
        let ctx = matmul(&probs, &v, s)?;
        let ctx = reshape(&transpose(&ctx, &[0, 2, 1, 3], s)?, &[bsz, seq, HIDDEN], s)?;
        let x1 = binary(
            BinaryOp::Add,
            x,
            &self.linear(&ctx, &self.wo, &self.bo, s)?,
            s,
        )?;
        let h2 = self.layer_norm(&x1, &self.g2, &self.beta2, s)?;
        let f = self.linear(&h2, &self.w1, &self.b1, s)?;
        let erf = unary(
            UnaryOp::Erf,
            &binary(
                BinaryOp::Multiply,
                &f,
                &scalar(std::f64::consts::FRAC_1_SQRT_2, self.d, s)?,
                s,
            )?,
            s,
        )?;
        let one_plus = binary(BinaryOp::Add, &erf, &scalar(1.0, self.d, s)?, s)?;
        let half_f = binary(BinaryOp::Multiply, &f, &scalar(0.5, self.d, s)?, s)?;
        let gelu = binary(BinaryOp::Multiply, &half_f, &one_plus, s)?;
        binary(
            BinaryOp::Add,
            &x1,
            &self.linear(&gelu, &self.w2, &self.b2, s)?,
            s,
        )
    }
}

fn transformer_suite(set: &Settings, device: DeviceKind, s: &Stream) -> Result<()> {
    let cases: Vec<(Dtype, i64, i64)> = match device {
        DeviceKind::Cpu => vec![(Dtype::F32, 1, 128)],
        _ => vec![
            (Dtype::F32, 1, 128),
            (Dtype::BF16, 1, 128),
            (Dtype::F32, 8, 512),
            (Dtype::BF16, 8, 512),
        ],
    };
    for (d, bsz, seq) in cases {
        let block = Block::new(d, s)?;
        let x = uniform(&[bsz, seq, HIDDEN], d, 30, 1.0, s)?;
        let key = format!("transformer_{bsz}x{seq}x{HIDDEN}_{}", dtype_name(d));
        let mut inputs = vec![x.clone()];
        inputs.extend(block.params().into_iter().cloned());
        let s1 = *s;
        case(set, "", &key, move || block.forward(&x, &s1)?.eval())?;
        case_compiled(set, &key, inputs, move |a| {
            Ok(vec![Block::from_params(d, &a[1..]).forward(&a[0], &s1)?])
        })?;
    }
    Ok(())
}

/// The transformer block's parts, each timed alone from evaluated inputs (`stages.<case>.<part>`),
/// to show where a block's time goes; and the block with MLX's softmax op in place of the
/// composed one (`mx_softmax.<case>`, plain and under `mx::compile`). Only when named.
fn stages_suite(set: &Settings, device: DeviceKind, s: &Stream) -> Result<()> {
    let cases: Vec<(Dtype, i64, i64)> = match device {
        DeviceKind::Cpu => vec![(Dtype::F32, 1, 128)],
        _ => vec![(Dtype::BF16, 1, 128), (Dtype::BF16, 8, 512)],
    };
    for (d, bsz, seq) in cases {
        let b = Block::new(d, s)?;
        let x = uniform(&[bsz, seq, HIDDEN], d, 30, 1.0, s)?;
        let key = format!("transformer_{bsz}x{seq}x{HIDDEN}_{}", dtype_name(d));
        let hd = HIDDEN / HEADS;
        let ev = |a: Array| -> Result<Array> {
            a.eval()?;
            Ok(a)
        };
        let heads = move |a: &Array, s: &Stream| -> Result<Array> {
            transpose(&reshape(a, &[bsz, seq, HEADS, hd], s)?, &[0, 2, 1, 3], s)
        };
        let h = ev(b.layer_norm(&x, &b.g1, &b.beta1, s)?)?;
        let q = ev(heads(&b.linear(&h, &b.wq, &b.bq, s)?, s)?)?;
        let k = ev(heads(&b.linear(&h, &b.wk, &b.bk, s)?, s)?)?;
        let v = ev(heads(&b.linear(&h, &b.wv, &b.bv, s)?, s)?)?;
        let scale = scalar(1.0 / (hd as f64).sqrt(), d, s)?;
        let scores = |q: &Array, k: &Array, s: &Stream| -> Result<Array> {
            let kt = transpose(k, &[0, 1, 3, 2], s)?;
            binary(BinaryOp::Multiply, &matmul(q, &kt, s)?, &scale, s)
        };
        let sc = ev(scores(&q, &k, s)?)?;
        let p = ev(softmax(&sc, s)?)?;
        let ctx = ev(reshape(
            &transpose(&matmul(&p, &v, s)?, &[0, 2, 1, 3], s)?,
            &[bsz, seq, HIDDEN],
            s,
        )?)?;
        let f = ev(b.linear(&h, &b.w1, &b.b1, s)?)?;
        let prefix = format!("stages.{key}.");
        let st = *s;
        let one = |name: &str, f: &mut dyn FnMut() -> Result<Array>| -> Result<()> {
            let t = measure(set, || f()?.eval())?;
            emit(&prefix, name, &t);
            Ok(())
        };
        one("layer_norm", &mut || b.layer_norm(&x, &b.g1, &b.beta1, &st))?;
        one("qkv", &mut || {
            let q = b.linear(&h, &b.wq, &b.bq, &st)?;
            let k = b.linear(&h, &b.wk, &b.bk, &st)?;
            let v = b.linear(&h, &b.wv, &b.bv, &st)?;
            mlx_bind::concatenate(&[&q, &k, &v], 2, &st)
        })?;
        one("scores", &mut || scores(&q, &k, &st))?;
        one("softmax_composed", &mut || softmax(&sc, &st))?;
        one("softmax_mx", &mut || {
            mlx_bind::softmax(&sc, &[3], true, &st)
        })?;
        one("context", &mut || {
            reshape(
                &transpose(&matmul(&p, &v, &st)?, &[0, 2, 1, 3], &st)?,
                &[bsz, seq, HIDDEN],
                &st,
            )
        })?;
        one("out_proj", &mut || b.linear(&ctx, &b.wo, &b.bo, &st))?;
        one("ffn_up", &mut || b.linear(&h, &b.w1, &b.b1, &st))?;
        one("gelu", &mut || gelu(&f, &st))?;
        one("ffn_down", &mut || b.linear(&f, &b.w2, &b.b2, &st))?;
        let mut inputs = vec![x.clone()];
        inputs.extend(b.params().into_iter().cloned());
        let t = measure(set, || b.forward_with(&x, &st, true)?.eval())?;
        emit("mx_softmax.", &key, &t);
        let compiled = Compiled::new(move |a: &[Array]| {
            Ok(vec![
                Block::from_params(d, &a[1..]).forward_with(&a[0], &st, true)?
            ])
        });
        let refs: Vec<&Array> = inputs.iter().collect();
        let t = measure(set, || compiled.call(&refs)?[0].eval())?;
        emit("mx_softmax.compiled.", &key, &t);
    }
    Ok(())
}

/// 4 linear layers with ReLU between them.
fn mlp_suite(set: &Settings, device: DeviceKind, s: &Stream) -> Result<()> {
    let mut cases: Vec<(String, Dtype, i64, Vec<i64>)> = vec![
        (
            "mlp4_b8_small".into(),
            Dtype::F32,
            8,
            vec![64, 128, 128, 128, 10],
        ),
        (
            "mlp4_b128".into(),
            Dtype::F32,
            128,
            vec![784, 2048, 2048, 2048, 10],
        ),
    ];
    if device != DeviceKind::Cpu {
        cases.push((
            "mlp4_b128".into(),
            Dtype::BF16,
            128,
            vec![784, 2048, 2048, 2048, 10],
        ));
    }
    for (name, d, batch, widths) in cases {
        let mut layers = Vec::new();
        for (i, pair) in widths.windows(2).enumerate() {
            let w = uniform(&[pair[0], pair[1]], d, 40 + i as u64, 0.05, s)?;
            let b = uniform(&[pair[1]], d, 50 + i as u64, 0.05, s)?;
            layers.push((w, b));
        }
        let x = uniform(&[batch, widths[0]], d, 60, 1.0, s)?;
        // forward(x, w0, b0, w1, b1, ...)
        let forward = move |a: &[Array], s: &Stream| -> Result<Array> {
            let zero = scalar(0.0, d, s)?;
            let n = (a.len() - 1) / 2;
            let mut h = a[0].clone();
            for i in 0..n {
                h = binary(
                    BinaryOp::Add,
                    &matmul(&h, &a[1 + 2 * i], s)?,
                    &a[2 + 2 * i],
                    s,
                )?;
                if i + 1 < n {
                    h = binary(BinaryOp::Maximum, &h, &zero, s)?;
                }
            }
            Ok(h)
        };
        let mut inputs = vec![x.clone()];
        for (w, b) in &layers {
            inputs.extend([w.clone(), b.clone()]);
        }
        let key = format!("{name}_{}", dtype_name(d));
        let s1 = *s;
        let plain = inputs.clone();
        case(set, "", &key, move || forward(&plain, &s1)?.eval())?;
        case_compiled(set, &key, inputs, move |a| Ok(vec![forward(a, &s1)?]))?;
    }
    Ok(())
}

fn main() {
    // As the NIF does when it loads (NxMlx.Blas): OpenBLAS's idle threads spin 2^16 cycles,
    // not 2^28, so both sides of a comparison run the same BLAS settings.
    mlx_bind::blas_limit_idle_spin(16);
    let mut device = DeviceKind::Cpu;
    let mut quick = false;
    let mut serve_mode = false;
    let mut suites = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--device" => match args.next().as_deref() {
                Some("gpu") => device = DeviceKind::Gpu,
                Some("cpu") => device = DeviceKind::Cpu,
                other => fail(&format!("--device takes cpu or gpu, got {other:?}")),
            },
            "--quick" => quick = true,
            "--serve" => serve_mode = true,
            "dispatch" | "matmul" | "elementwise" | "transformer" | "mlp" | "stages" | "hop"
            | "blas" => suites.push(arg),
            other => fail(&format!("unknown argument {other:?}")),
        }
    }
    if suites.is_empty() {
        suites = ["dispatch", "matmul", "elementwise", "transformer", "mlp"]
            .map(String::from)
            .to_vec();
    }
    let set = if quick {
        Settings {
            warmup: 1,
            min_reps: 3,
            max_reps: 5,
            budget_s: 0.5,
            serve: None,
        }
    } else {
        Settings {
            warmup: 3,
            min_reps: 5,
            max_reps: 20,
            budget_s: 3.0,
            serve: None,
        }
    };
    let set = Settings {
        serve: serve_mode.then(Default::default),
        ..set
    };
    if !mlx_bind::is_available(device) {
        fail("the requested device is not available in this libmlx");
    }
    let s = Stream::new(device).unwrap_or_else(|e| fail(&e.message));
    s.make_default().unwrap_or_else(|e| fail(&e.message));
    if set.serve.is_some() {
        for suite in &suites {
            let r = match suite.as_str() {
                "transformer" => transformer_suite(&set, device, &s),
                "mlp" => mlp_suite(&set, device, &s),
                _ => Ok(()),
            };
            if let Err(e) = r {
                fail(&format!("{suite}: {}", e.message));
            }
        }
        serve(set.serve.map(|c| c.into_inner()).unwrap_or_default());
        return;
    }
    println!("impl: raw_mlx");
    println!("mlx_version: {}", mlx_bind::version());
    println!(
        "mlx_enable_tf32: {}",
        std::env::var("MLX_ENABLE_TF32").unwrap_or_else(|_| "unset (MLX default: on)".into())
    );
    println!("mlx_library: {}", mlx_bind::library_path());
    println!("openblas.blas_library: {}", mlx_bind::blas_library_path());
    println!(
        "compiled.fusion_enabled: {}",
        mlx_bind::compile_enabled(device)
    );
    for suite in suites {
        let r = match suite.as_str() {
            "dispatch" => dispatch(&s),
            "matmul" => matmul_suite(&set, device, &s),
            "elementwise" => elementwise_suite(&set, device, &s),
            "transformer" => transformer_suite(&set, device, &s),
            "stages" => stages_suite(&set, device, &s),
            "blas" => blas_suite(&set, &s),
            "hop" => hop_suite(&set, device),
            _ => mlp_suite(&set, device, &s),
        };
        if let Err(e) = r {
            fail(&format!("{suite}: {}", e.message));
        }
    }
}

fn fail(message: &str) -> ! {
    eprintln!("mlx_raw_bench: {message}");
    std::process::exit(2)
}

/// A job for the `hop` suite's worker thread, given the worker's stream.
type Job = Box<dyn FnOnce(&Stream) + Send>;

/// `hop` (only when named): the MLP cases with the thread structure varied, to see what a
/// hand-off between threads costs MLX, with no BEAM involved. `hop.<case>_` keys:
/// `v0_eval` the plain graph evaluated where it was built (the `mlp` suite's case); `v1_eval`
/// with `tensordot` for the matmuls; `v2_eval` ReLU against an evaluated int32 zero (MLX casts
/// it per call); `v3_eval` against an evaluated zero of the case's type; `async_wait`
/// `async_eval` then a wait on the same thread; `v0_caller_build` / `v2_caller_build` built
/// here on a worker thread's stream, evaluation started by the worker, waited for here;
/// `worker_wait` built here, started and waited for on the worker, told through a channel;
/// `kept64` as `v0_eval` with the last 64 outputs kept alive; `worker_eval` built and
/// evaluated on the worker, told through a channel.
fn hop_suite(set: &Settings, device: DeviceKind) -> Result<()> {
    use std::sync::mpsc;
    // A worker thread owning its own stream, as the NIF's worker does.
    let (jtx, jrx) = mpsc::channel::<Job>();
    let (stx, srx) = mpsc::channel::<Stream>();
    std::thread::spawn(move || {
        let ws = Stream::new(device).unwrap();
        stx.send(ws).unwrap();
        while let Ok(job) = jrx.recv() {
            job(&ws);
        }
    });
    let ws = srx.recv().unwrap();
    let main_s = Stream::new(device)?;
    main_s.make_default()?;
    let cases: Vec<(&str, Dtype, i64, Vec<i64>)> = vec![
        ("mlp4_b8_small", Dtype::F32, 8, vec![64, 128, 128, 128, 10]),
        (
            "mlp4_b128",
            Dtype::F32,
            128,
            vec![784, 2048, 2048, 2048, 10],
        ),
        (
            "mlp4_b128",
            Dtype::BF16,
            128,
            vec![784, 2048, 2048, 2048, 10],
        ),
    ];
    for (name, d, batch, widths) in cases {
        let mut inputs = vec![uniform(&[batch, widths[0]], d, 60, 1.0, &main_s)?];
        for (i, pair) in widths.windows(2).enumerate() {
            inputs.push(uniform(
                &[pair[0], pair[1]],
                d,
                40 + i as u64,
                0.05,
                &main_s,
            )?);
            inputs.push(uniform(&[pair[1]], d, 50 + i as u64, 0.05, &main_s)?);
        }
        let izero = full(&[], 0.0, Dtype::I32, &main_s)?;
        izero.eval()?;
        let fzero = full(&[], 0.0, d, &main_s)?;
        fzero.eval()?;
        // variant: 0 plain, 1 tensordot, 2 int zero const, 3 evaluated float zero const
        let fwd = move |a: &[Array], s: &Stream, v: u8, iz: &Array, fz: &Array| -> Result<Array> {
            let zero = match v {
                2 => iz.clone(),
                3 => fz.clone(),
                _ => scalar(0.0, d, s)?,
            };
            let n = (a.len() - 1) / 2;
            let mut h = a[0].clone();
            for i in 0..n {
                let m = if v == 1 {
                    mlx_bind::tensordot(&h, &a[1 + 2 * i], &[1], &[0], s)?
                } else {
                    matmul(&h, &a[1 + 2 * i], s)?
                };
                h = binary(BinaryOp::Add, &m, &a[2 + 2 * i], s)?;
                if i + 1 < n {
                    h = binary(BinaryOp::Maximum, &h, &zero, s)?;
                }
            }
            Ok(h)
        };
        let key = format!("hop.{name}_{}", dtype_name(d));
        for v in 0..4u8 {
            let t = measure(set, || fwd(&inputs, &main_s, v, &izero, &fzero)?.eval())?;
            emit("", &format!("{key}_v{v}_eval"), &t);
        }
        let t = measure(set, || {
            let o = fwd(&inputs, &main_s, 0, &izero, &fzero)?;
            mlx_bind::async_eval_all(&[&o])?;
            mlx_bind::wait_all(&[&o])
        })?;
        emit("", &format!("{key}_async_wait"), &t);
        for v in [0u8, 2] {
            // Built here on the worker's stream, evaluation started on the worker, waited here.
            let t = measure(set, || {
                let o = fwd(&inputs, &ws, v, &izero, &fzero)?;
                let o2 = o.clone();
                let (tx, rx) = mpsc::channel();
                jtx.send(Box::new(move |_s: &Stream| {
                    let _ = tx.send(mlx_bind::async_eval_all(&[&o2]));
                }))
                .unwrap();
                rx.recv().unwrap()?;
                mlx_bind::wait_all(&[&o])
            })?;
            emit("", &format!("{key}_v{v}_caller_build"), &t);
        }
        // Built here, dispatched then waited for on the worker, told through a channel.
        let t = measure(set, || {
            let o = fwd(&inputs, &ws, 0, &izero, &fzero)?;
            let o2 = o.clone();
            jtx.send(Box::new(move |_s: &Stream| {
                let _ = mlx_bind::async_eval_all(&[&o2]);
            }))
            .unwrap();
            let (tx, rx) = mpsc::channel();
            jtx.send(Box::new(move |_s: &Stream| {
                let _ = tx.send(o.eval());
            }))
            .unwrap();
            rx.recv().unwrap()
        })?;
        emit("", &format!("{key}_worker_wait"), &t);
        // As plain eval, keeping the last 64 outputs alive (as a garbage-collected caller does).
        let mut kept = std::collections::VecDeque::new();
        let t = measure(set, || {
            let o = fwd(&inputs, &main_s, 0, &izero, &fzero)?;
            o.eval()?;
            kept.push_back(o);
            if kept.len() > 64 {
                kept.pop_front();
            }
            Ok(())
        })?;
        drop(kept);
        emit("", &format!("{key}_kept64"), &t);
        // Built and evaluated on the worker, replied through a channel.
        let ins = inputs.clone();
        let iz = izero.clone();
        let fz = fzero.clone();
        let shared = std::sync::Arc::new((ins, iz, fz));
        let t = measure(set, || {
            let (tx, rx) = mpsc::channel();
            let sh = shared.clone();
            jtx.send(Box::new(move |s: &Stream| {
                let r = fwd(&sh.0, s, 0, &sh.1, &sh.2).and_then(|o| o.eval());
                let _ = tx.send(r);
            }))
            .unwrap();
            rx.recv().unwrap()
        })?;
        emit("", &format!("{key}_worker_eval"), &t);
    }
    Ok(())
}
