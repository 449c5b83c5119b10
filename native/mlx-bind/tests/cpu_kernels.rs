//! Our CPU kernels (cxx/kernels.cc over cxx/simd.cc) through the binding, against values
//! computed here in f64: exp, sigmoid, tanh, log, erf and GELU within 1 ulp of f32 over
//! sampled bit patterns of every exponent, sums against f64 sums, max/min with NaN and
//! infinities at every position around the vector widths and the split over cores,
//! single-row and single-column f32 matmuls (through sgemv) against f64 products in every
//! operand layout, layer norm against f64 rows.

mod common;

use common::{f32s, read_f32};
use mlx_bind::*;

fn cpu() -> Stream {
    Stream::new(DeviceKind::Cpu).expect("cpu stream")
}

fn array(v: &[f32], shape: &[i64]) -> Array {
    Array::from_bytes(&f32s(v), shape, Dtype::F32).unwrap()
}

/// Distance in f32 steps between two non-NaN floats (the same sign's ordering on the bits).
fn ulps(a: f32, b: f32) -> i64 {
    let key = |x: f32| {
        let bits = x.to_bits() as i32 as i64;
        if bits < 0 {
            i32::MIN as i64 - bits
        } else {
            bits
        }
    };
    (key(a) - key(b)).abs()
}

/// Every 97th f32 bit pattern (both signs, all exponents, NaN and the infinities) and the
/// boundaries of exp's range.
fn sampled_floats() -> Vec<f32> {
    let mut v: Vec<f32> = (0..=u32::MAX).step_by(97).map(f32::from_bits).collect();
    v.extend([
        0.0,
        -0.0,
        88.72283,
        88.72284,
        -87.33654,
        -103.97208,
        -103.9721,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ]);
    v
}

fn check_unary(op: UnaryOp, name: &str, reference: impl Fn(f64) -> f64) {
    let s = cpu();
    let xs = sampled_floats();
    let out = read_f32(&unary(op, &array(&xs, &[xs.len() as i64]), &s).unwrap(), &s);
    let mut worst = (0, 0.0f32);
    for (&x, &got) in xs.iter().zip(&out) {
        let want = reference(x as f64) as f32;
        if want.is_nan() || got.is_nan() {
            assert!(
                want.is_nan() && got.is_nan(),
                "{name}({x:e}) = {got:e}, want {want:e}"
            );
            continue;
        }
        let d = ulps(got, want);
        if d > worst.0 {
            worst = (d, x);
        }
    }
    // The reference is rounded once from f64; within 1 ulp of it is within 1.5 of exact.
    assert!(worst.0 <= 1, "{name}: {} ulp at {:e}", worst.0, worst.1);
}

#[test]
fn exp_is_within_one_ulp() {
    check_unary(UnaryOp::Exp, "exp", f64::exp);
}

#[test]
fn sigmoid_is_within_one_ulp() {
    check_unary(UnaryOp::Sigmoid, "sigmoid", |x| 1.0 / (1.0 + (-x).exp()));
}

#[test]
fn tanh_is_within_one_ulp() {
    check_unary(UnaryOp::Tanh, "tanh", f64::tanh);
    let s = cpu();
    let xs = [-0.0f32, 0.0, f32::INFINITY, f32::NEG_INFINITY];
    let out = read_f32(&unary(UnaryOp::Tanh, &array(&xs, &[4]), &s).unwrap(), &s);
    assert!(out[0] == 0.0 && out[0].is_sign_negative() && out[1].is_sign_positive());
    assert_eq!(&out[2..], &[1.0, -1.0]);
}

#[test]
fn log_is_within_one_ulp() {
    check_unary(UnaryOp::Log, "log", f64::ln);
    let s = cpu();
    let xs = [
        0.0f32,
        -0.0,
        1.0,
        f32::MIN_POSITIVE / 8.0,
        f32::INFINITY,
        -1.0,
    ];
    let out = read_f32(&unary(UnaryOp::Log, &array(&xs, &[6]), &s).unwrap(), &s);
    assert_eq!(&out[..3], &[f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0]);
    assert_eq!(out[3], ((f32::MIN_POSITIVE / 8.0) as f64).ln() as f32);
    assert!(out[4] == f32::INFINITY && out[5].is_nan());
}

#[test]
fn erf_is_within_one_ulp() {
    check_unary(UnaryOp::Erf, "erf", libm::erf);
    // Around the branch points (1 and 4) and where f32's erf reaches 1.
    let s = cpu();
    let xs: Vec<f32> = [0.999f32, 1.0, 3.9, 3.92, 4.0]
        .iter()
        .flat_map(|&c| {
            (-2000..=2000).flat_map(move |i| {
                let x = f32::from_bits((c.to_bits() as i32 + i) as u32);
                [x, -x]
            })
        })
        .collect();
    let out = read_f32(
        &unary(UnaryOp::Erf, &array(&xs, &[xs.len() as i64]), &s).unwrap(),
        &s,
    );
    for (&x, &got) in xs.iter().zip(&out) {
        let want = libm::erf(x as f64) as f32;
        assert!(ulps(got, want) <= 1, "erf({x:e}) = {got:e}, want {want:e}");
    }
    let signed = read_f32(
        &unary(UnaryOp::Erf, &array(&[-0.0, 0.0], &[2]), &s).unwrap(),
        &s,
    );
    assert!(signed[0] == 0.0 && signed[0].is_sign_negative() && signed[1].is_sign_positive());
}

#[test]
fn gelu_is_within_one_ulp() {
    // x / 2 * erfc(-x / sqrt 2): the exact GELU, without 1 + erf's cancellation.
    let exact = |x: f64| 0.5 * x * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2);
    check_unary(UnaryOp::Gelu, "gelu", exact);
    // Dense around the branch points (|x / sqrt 2| = 1 and 4) and the far tail's start.
    let s = cpu();
    let xs: Vec<f32> = (-12_000..=12_000).map(|i| i as f32 * 1.0e-3).collect();
    let out = read_f32(
        &unary(UnaryOp::Gelu, &array(&xs, &[xs.len() as i64]), &s).unwrap(),
        &s,
    );
    for (&x, &got) in xs.iter().zip(&out) {
        let want = exact(x as f64) as f32;
        assert!(ulps(got, want) <= 1, "gelu({x:e}) = {got:e}, want {want:e}");
    }
}

#[test]
fn sums_match_f64_sums() {
    let s = cpu();
    for n in [1usize, 15, 16, 17, 1000, 70_001, 1 << 20] {
        let xs: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1013) as f32 / 7.0 - 60.0)
            .collect();
        let want: f64 = xs.iter().map(|&x| x as f64).sum();
        let got = read_f32(
            &reduce(ReduceOp::Sum, &array(&xs, &[n as i64]), &[0], false, &s).unwrap(),
            &s,
        )[0];
        assert!(ulps(got, want as f32) <= 1, "sum of {n}: {got} vs {want}");
    }
}

#[test]
fn max_and_min_over_trailing_axes_propagate_nan() {
    let s = cpu();
    // Lengths around the vector widths (8, 16, 32, 64 floats) and past the split over cores.
    for k in [1usize, 7, 8, 31, 63, 64, 65, 129, 70_001] {
        let rows = 3usize;
        let base: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 104_729) % 2003) as f32 - 1000.0)
            .collect();
        let mut positions = vec![0, k / 2, k - 1];
        positions.dedup();
        for special in [
            None,
            Some(f32::NAN),
            Some(f32::INFINITY),
            Some(f32::NEG_INFINITY),
        ] {
            for &p in &positions {
                let mut xs = base.clone();
                if let Some(v) = special {
                    xs[k + p] = v; // row 1 only
                }
                let a = array(&xs, &[rows as i64, k as i64]);
                let max = read_f32(&reduce(ReduceOp::Max, &a, &[1], false, &s).unwrap(), &s);
                let min = read_f32(&reduce(ReduceOp::Min, &a, &[-1], false, &s).unwrap(), &s);
                for r in 0..rows {
                    let row = &xs[r * k..(r + 1) * k];
                    let nan = row.iter().any(|x| x.is_nan());
                    let want_max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let want_min = row.iter().cloned().fold(f32::INFINITY, f32::min);
                    if nan {
                        assert!(max[r].is_nan() && min[r].is_nan(), "k={k} p={p}: {max:?}");
                    } else {
                        assert_eq!(
                            max[r], want_max,
                            "max, k={k} row {r} special {special:?}@{p}"
                        );
                        assert_eq!(
                            min[r], want_min,
                            "min, k={k} row {r} special {special:?}@{p}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn max_over_all_axes_and_other_axes_agree() {
    let s = cpu();
    let xs: Vec<f32> = (0..4 * 5 * 6).map(|i| ((i * 37) % 101) as f32).collect();
    let a = array(&xs, &[4, 5, 6]);
    let all = read_f32(
        &reduce(ReduceOp::Max, &a, &[0, 1, 2], false, &s).unwrap(),
        &s,
    );
    assert_eq!(all, vec![100.0]);
    // Trailing two axes, kept: shape [4, 1, 1].
    let kept = reduce(ReduceOp::Max, &a, &[2, 1], true, &s).unwrap();
    assert_eq!(kept.shape(), vec![4, 1, 1]);
    let want: Vec<f32> = (0..4)
        .map(|i| {
            xs[i * 30..(i + 1) * 30]
                .iter()
                .cloned()
                .fold(f32::MIN, f32::max)
        })
        .collect();
    assert_eq!(read_f32(&kept, &s), want);
    // A leading axis goes to MLX's own reduction: same answer.
    let lead = read_f32(&reduce(ReduceOp::Min, &a, &[0], false, &s).unwrap(), &s);
    for j in 0..30 {
        let want = (0..4).map(|i| xs[i * 30 + j]).fold(f32::MAX, f32::min);
        assert_eq!(lead[j], want);
    }
}

/// `a` [m, k] times `b` [k, n], both row-major, in f64.
fn matmul_f64(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k)
                .map(|c| a[i * k + c] as f64 * b[c * n + j] as f64)
                .sum();
        }
    }
    out
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

#[test]
fn single_row_and_single_column_matmuls_match_f64() {
    let s = cpu();
    let (k, n) = (77usize, 45usize);
    let x: Vec<f32> = (0..k).map(|i| ((i * 37) % 19) as f32 / 9.0 - 1.0).collect();
    let w: Vec<f32> = (0..k * n)
        .map(|i| ((i * 7919) % 1013) as f32 / 500.0 - 1.0)
        .collect();
    let want = matmul_f64(&x, &w, 1, k, n);
    let xa = array(&x, &[1, k as i64]);
    let wa = array(&w, &[k as i64, n as i64]);
    // [1, k] x [k, n], and with leading size-1 axes.
    let got = read_f32(&matmul(&xa, &wa, &s).unwrap(), &s);
    assert_close(&got, &want, "row x matrix");
    let x3 = array(&x, &[1, 1, k as i64]);
    let r3 = matmul(&x3, &wa, &s).unwrap();
    assert_eq!(r3.shape(), vec![1, 1, n as i64]);
    assert_close(&read_f32(&r3, &s), &want, "row x matrix, 3-d");
    // The weights as the transpose of a row-major [n, k] (Nx.dot contracting w's last axis).
    let wt: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
    let wt_view = transpose(&array(&wt, &[n as i64, k as i64]), &[1, 0], &s).unwrap();
    assert_close(
        &read_f32(&matmul(&xa, &wt_view, &s).unwrap(), &s),
        &want,
        "row x transposed matrix",
    );
    // Every other column of a wider matrix (strides neither layout handles in place).
    let wide: Vec<f32> = (0..k * 2 * n)
        .map(|i| w[(i / (2 * n)) * n + (i % (2 * n)) / 2])
        .collect();
    let strided = slice(
        &array(&wide, &[k as i64, 2 * n as i64]),
        &[0, 0],
        &[k as i64, 2 * n as i64],
        &[1, 2],
        &s,
    )
    .unwrap();
    assert_close(
        &read_f32(&matmul(&xa, &strided, &s).unwrap(), &s),
        &want,
        "row x strided matrix",
    );
    // [m, k] x [k, 1].
    let col = array(&x, &[k as i64, 1]);
    let wk = array(&w[..n * k], &[n as i64, k as i64]);
    let r = matmul(&wk, &col, &s).unwrap();
    assert_eq!(r.shape(), vec![n as i64, 1]);
    assert_close(
        &read_f32(&r, &s),
        &matmul_f64(&w[..n * k], &x, n, k, 1),
        "matrix x column",
    );
    // NaN and infinities propagate as through sgemm.
    let mut xn = x.clone();
    xn[3] = f32::NAN;
    let got = read_f32(&matmul(&array(&xn, &[1, k as i64]), &wa, &s).unwrap(), &s);
    assert!(got.iter().all(|v| v.is_nan()));
}

/// The f64 product of the row-major arrays a [items, m, k] and b [items, k, n].
fn batched_f64(a: &[f32], b: &[f32], items: usize, m: usize, k: usize, n: usize) -> Vec<f64> {
    (0..items)
        .flat_map(|i| {
            matmul_f64(
                &a[i * m * k..(i + 1) * m * k],
                &b[i * k * n..(i + 1) * k * n],
                m,
                k,
                n,
            )
        })
        .collect()
}

#[test]
fn batched_matmuls_match_f64_in_every_layout() {
    let s = cpu();
    // 128x64x128 items: batched (small items, at most 100^3 multiply-adds, stay on MLX's
    // loop; the last two cases check those).
    let (heads, seq, hd) = (3usize, 128usize, 64usize);
    let hidden = heads * hd;
    // x [seq, heads * hd], as attention's projections: head h of row r at column h * hd.
    let x: Vec<f32> = (0..seq * hidden)
        .map(|i| ((i * 37) % 23) as f32 / 11.0 - 1.0)
        .collect();
    let y: Vec<f32> = (0..seq * hidden)
        .map(|i| ((i * 91) % 29) as f32 / 14.0 - 1.0)
        .collect();
    // The heads as row-major [heads, seq, hd] arrays.
    let split = |v: &[f32]| -> Vec<f32> {
        (0..heads * seq * hd)
            .map(|i| {
                let (h, r, c) = (i / (seq * hd), (i / hd) % seq, i % hd);
                v[r * hidden + h * hd + c]
            })
            .collect()
    };
    let (xh, yh) = (split(&x), split(&y));
    // q k^T per head: [heads, seq, hd] x [heads, hd, seq].
    let yt: Vec<f32> = (0..heads * hd * seq)
        .map(|i| {
            let (h, c, r) = (i / (hd * seq), (i / seq) % hd, i % seq);
            yh[h * seq * hd + r * hd + c]
        })
        .collect();
    let want = batched_f64(&xh, &yt, heads, seq, hd, seq);
    let view = |v: &[f32]| {
        let a = reshape(
            &array(v, &[1, seq as i64, hidden as i64]),
            &[1, seq as i64, heads as i64, hd as i64],
            &s,
        )
        .unwrap();
        transpose(&a, &[0, 2, 1, 3], &s).unwrap()
    };
    // Both operands strided views of the projections (read in place, b transposed).
    let q = view(&x);
    let kt = transpose(&view(&y), &[0, 1, 3, 2], &s).unwrap();
    let got = matmul(&q, &kt, &s).unwrap();
    assert_eq!(got.shape(), vec![1, heads as i64, seq as i64, seq as i64]);
    assert_close(&read_f32(&got, &s), &want, "heads x transposed heads");
    // Contiguous operands.
    let got = matmul(
        &array(&xh, &[heads as i64, seq as i64, hd as i64]),
        &array(&yt, &[heads as i64, hd as i64, seq as i64]),
        &s,
    )
    .unwrap();
    assert_close(&read_f32(&got, &s), &want, "contiguous");
    // probabilities [heads, seq, seq] x v heads (a strided view, not transposed).
    let p: Vec<f32> = (0..heads * seq * seq)
        .map(|i| ((i * 13) % 17) as f32 / 17.0)
        .collect();
    let got = matmul(
        &array(&p, &[1, heads as i64, seq as i64, seq as i64]),
        &view(&y),
        &s,
    )
    .unwrap();
    assert_close(
        &read_f32(&got, &s),
        &batched_f64(&p, &yh, heads, seq, seq, hd),
        "probabilities x heads",
    );
    // Every other column of a wider array: neither layout, packed first.
    let wide: Vec<f32> = (0..heads * seq * 2 * hd).map(|i| xh[i / 2]).collect();
    let strided = slice(
        &array(&wide, &[heads as i64, seq as i64, 2 * hd as i64]),
        &[0, 0, 0],
        &[heads as i64, seq as i64, 2 * hd as i64],
        &[1, 1, 2],
        &s,
    )
    .unwrap();
    let got = matmul(
        &strided,
        &array(&yt, &[heads as i64, hd as i64, seq as i64]),
        &s,
    )
    .unwrap();
    assert_close(&read_f32(&got, &s), &want, "strided columns");
    // A broadcast operand (stride 0 over the batch) and two batch axes.
    let w: Vec<f32> = (0..hd * 3).map(|i| i as f32 / 10.0 - 1.0).collect();
    let wb = broadcast_to(
        &array(&w, &[1, 1, hd as i64, 3]),
        &[2, heads as i64, hd as i64, 3],
        &s,
    )
    .unwrap();
    let xb: Vec<f32> = xh.iter().chain(yh.iter()).cloned().collect();
    let got = matmul(
        &array(&xb, &[2, heads as i64, seq as i64, hd as i64]),
        &wb,
        &s,
    )
    .unwrap();
    let wrep: Vec<f32> = (0..2 * heads).flat_map(|_| w.iter().cloned()).collect();
    assert_close(
        &read_f32(&got, &s),
        &batched_f64(&xb, &wrep, 2 * heads, seq, hd, 3),
        "broadcast weights",
    );
    // Single rows and columns per item.
    let got = matmul(
        &array(&x[..heads * hd], &[heads as i64, 1, hd as i64]),
        &array(&yt, &[heads as i64, hd as i64, seq as i64]),
        &s,
    )
    .unwrap();
    assert_close(
        &read_f32(&got, &s),
        &batched_f64(&x[..heads * hd], &yt, heads, 1, hd, seq),
        "one row per item",
    );
}

#[test]
fn layer_norm_matches_f64_rows() {
    let s = cpu();
    for (rows, k) in [(1usize, 1usize), (3, 7), (128, 768), (2, 40_000)] {
        let x: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 7919) % 1013) as f32 / 50.0 - 10.0)
            .collect();
        let g: Vec<f32> = (0..k).map(|i| 0.5 + (i % 7) as f32 / 4.0).collect();
        let b: Vec<f32> = (0..k).map(|i| (i % 5) as f32 - 2.0).collect();
        let eps = 1.0e-5;
        let got = read_f32(
            &layer_norm(
                &array(&x, &[rows as i64, k as i64]),
                &array(&g, &[k as i64]),
                &array(&b, &[k as i64]),
                eps,
                &s,
            )
            .unwrap(),
            &s,
        );
        for r in 0..rows {
            let row = &x[r * k..(r + 1) * k];
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / k as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / k as f64;
            for j in 0..k {
                let want = ((row[j] as f64 - mean) / (var + eps).sqrt() * g[j] as f64 + b[j] as f64)
                    as f32;
                let d = ulps(got[r * k + j], want);
                assert!(
                    d <= 1,
                    "[{rows}, {k}] row {r} col {j}: {} vs {want}",
                    got[r * k + j]
                );
            }
        }
    }
    // A row with NaN or an infinity is NaN; shapes that do not fit are errors.
    let x = array(&[1.0, f32::NAN, 3.0, 1.0, 2.0, f32::INFINITY], &[2, 3]);
    let ones = array(&[1.0; 3], &[3]);
    let zeros = array(&[0.0; 3], &[3]);
    let out = read_f32(&layer_norm(&x, &ones, &zeros, 1.0e-5, &s).unwrap(), &s);
    assert!(out.iter().all(|v| v.is_nan()));
    assert!(layer_norm(&x, &array(&[1.0; 2], &[2]), &zeros, 1.0e-5, &s).is_err());
    assert!(layer_norm(&x, &ones, &zeros, -1.0, &s).is_err());
}

#[test]
fn rms_norm_matches_f64_rows() {
    let s = cpu();
    for (rows, k) in [(1usize, 1usize), (3, 7), (128, 768), (2, 40_000)] {
        let x: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 7919) % 1013) as f32 / 50.0 - 10.0)
            .collect();
        let g: Vec<f32> = (0..k).map(|i| 0.5 + (i % 7) as f32 / 4.0).collect();
        let eps = 1.0e-6;
        // As [rows, k] and as [1, rows, k] (the kernel sees rows either way).
        for shape in [vec![rows as i64, k as i64], vec![1, rows as i64, k as i64]] {
            let got = read_f32(
                &rms_norm(&array(&x, &shape), &array(&g, &[k as i64]), eps, &s).unwrap(),
                &s,
            );
            for r in 0..rows {
                let row = &x[r * k..(r + 1) * k];
                let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / k as f64;
                for j in 0..k {
                    let want = (row[j] as f64 / (ms + eps).sqrt() * g[j] as f64) as f32;
                    let d = ulps(got[r * k + j], want);
                    assert!(
                        d <= 1,
                        "[{rows}, {k}] row {r} col {j}: {} vs {want}",
                        got[r * k + j]
                    );
                }
            }
        }
    }
    let x = array(&[1.0, f32::NAN, 3.0, 1.0, 2.0, f32::INFINITY], &[2, 3]);
    let out = read_f32(
        &rms_norm(&x, &array(&[1.0; 3], &[3]), 1.0e-5, &s).unwrap(),
        &s,
    );
    // A NaN makes its row NaN; an infinity makes the mean square infinite, so the finite
    // values scale to 0 and the infinity to NaN (inf * 0), as x * rsqrt(mean(x^2) + eps).
    assert!(out[..3].iter().all(|v| v.is_nan()));
    assert_eq!(&out[3..5], &[0.0, 0.0]);
    assert!(out[5].is_nan());
    assert!(rms_norm(&x, &array(&[1.0; 2], &[2]), 1.0e-5, &s).is_err());
    assert!(rms_norm(&x, &array(&[1.0; 3], &[3]), -1.0, &s).is_err());
}
