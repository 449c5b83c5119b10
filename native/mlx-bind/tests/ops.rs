//! Binding-level tests: real MLX calls on the CPU device, results read back and compared with
//! values computed here in Rust.

mod common;

use common::{f32s, read_f32};
use mlx_bind::*;

fn cpu() -> Stream {
    Stream::new(DeviceKind::Cpu).expect("cpu stream")
}

#[test]
fn version_is_the_pinned_one() {
    assert!(version().starts_with("0.32."), "got {}", version());
}

#[test]
fn cpu_is_available_and_library_is_found() {
    assert!(is_available(DeviceKind::Cpu));
    assert!(library_path().contains("libmlx"), "{}", library_path());
}

#[test]
fn blas_provider_matches_the_link_choice() {
    let path = blas_library_path();
    match LINKED_BLAS {
        "openblas" => assert!(path.contains("openblas"), "cblas_sgemm from {path}"),
        "reference" => assert!(!path.contains("openblas"), "cblas_sgemm from {path}"),
        _ => {}
    }
}

#[test]
fn from_bytes_round_trips() {
    let s = cpu();
    let a = Array::from_bytes(&f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), &[2, 3], Dtype::F32).unwrap();
    assert_eq!(a.shape(), vec![2, 3]);
    assert_eq!(a.dtype(), Dtype::F32);
    assert_eq!(a.nbytes(), 24);
    assert_eq!(read_f32(&a, &s), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
}

#[test]
fn from_bytes_rejects_a_size_mismatch() {
    let err = Array::from_bytes(&[0u8; 7], &[2], Dtype::F32).unwrap_err();
    assert!(err.message.contains("does not match"), "{}", err.message);
    let err = Array::from_bytes(&[], &[-1], Dtype::F32).unwrap_err();
    assert!(
        err.message.contains("out of MLX's range"),
        "{}",
        err.message
    );
}

#[test]
fn dot_add_sum_pipeline() {
    let s = cpu();
    let t = Array::from_bytes(&f32s(&[1.0, 2.0, 3.0, 4.0]), &[2, 2], Dtype::F32).unwrap();
    let d = tensordot(&t, &t, &[1], &[0], &s).unwrap();
    assert_eq!(read_f32(&d, &s), vec![7.0, 10.0, 15.0, 22.0]);
    let one = full(&[], 1.0, Dtype::F32, &s).unwrap();
    let p = binary(BinaryOp::Add, &d, &one, &s).unwrap();
    let total = reduce(ReduceOp::Sum, &p, &[0, 1], false, &s).unwrap();
    assert_eq!(total.shape(), Vec::<i64>::new());
    assert_eq!(read_f32(&total, &s), vec![58.0]);
}

#[test]
fn transposed_views_read_back_row_major() {
    let s = cpu();
    let a = arange(0.0, 6.0, 1.0, Dtype::F32, &s).unwrap();
    let a = reshape(&a, &[2, 3], &s).unwrap();
    let t = transpose(&a, &[1, 0], &s).unwrap();
    assert_eq!(t.shape(), vec![3, 2]);
    assert_eq!(read_f32(&t, &s), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
}

#[test]
fn reversed_views_read_back_and_compute_in_order() {
    let s = cpu();
    let a = reshape(&arange(0.0, 6.0, 1.0, Dtype::F32, &s).unwrap(), &[2, 3], &s).unwrap();
    let r1 = reverse(&a, 1, &s).unwrap();
    assert_eq!(read_f32(&r1, &s), vec![2.0, 1.0, 0.0, 5.0, 4.0, 3.0]);
    let r0 = reverse(&a, -2, &s).unwrap();
    assert_eq!(read_f32(&r0, &s), vec![3.0, 4.0, 5.0, 0.0, 1.0, 2.0]);
    // Ops read the view in place, twice reversed is the original, and the view can be
    // reversed along another axis and reduced.
    let neg = unary(UnaryOp::Negative, &r1, &s).unwrap();
    assert_eq!(read_f32(&neg, &s), vec![-2.0, -1.0, -0.0, -5.0, -4.0, -3.0]);
    let back = reverse(&r1, 1, &s).unwrap();
    assert_eq!(read_f32(&back, &s), read_f32(&a, &s));
    let both = reverse(&r1, 0, &s).unwrap();
    assert_eq!(read_f32(&both, &s), vec![5.0, 4.0, 3.0, 2.0, 1.0, 0.0]);
    let first = reduce(ReduceOp::Sum, &reverse(&a, 1, &s).unwrap(), &[1], false, &s).unwrap();
    assert_eq!(read_f32(&first, &s), vec![3.0, 12.0]);
    // Axes of size 1 and 0 are returned as they are; an axis out of range is an error.
    let one = full(&[1, 4], 2.0, Dtype::F32, &s).unwrap();
    assert_eq!(read_f32(&reverse(&one, 0, &s).unwrap(), &s), vec![2.0; 4]);
    let empty = full(&[0, 4], 2.0, Dtype::F32, &s).unwrap();
    assert_eq!(reverse(&empty, 0, &s).unwrap().shape(), vec![0, 4]);
    assert!(reverse(&a, 2, &s).is_err());
    assert!(reverse(&a, -3, &s).is_err());
}

#[test]
fn shape_mismatch_is_an_error_not_a_crash() {
    let s = cpu();
    let a = full(&[2, 3], 1.0, Dtype::F32, &s).unwrap();
    let b = full(&[4], 1.0, Dtype::F32, &s).unwrap();
    let err = binary(BinaryOp::Add, &a, &b, &s).unwrap_err();
    assert!(
        err.message.to_lowercase().contains("broadcast"),
        "{}",
        err.message
    );
    let err = matmul(&a, &a, &s).unwrap_err();
    assert!(!err.message.is_empty());
}

#[test]
fn matmul_matches_a_naive_product() {
    let s = cpu();
    let n = 64usize;
    let av: Vec<f32> = (0..n * n).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
    let bv: Vec<f32> = (0..n * n).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
    let a = Array::from_bytes(&f32s(&av), &[n as i64, n as i64], Dtype::F32).unwrap();
    let b = Array::from_bytes(&f32s(&bv), &[n as i64, n as i64], Dtype::F32).unwrap();
    let c = read_f32(&matmul(&a, &b, &s).unwrap(), &s);
    for i in 0..n {
        for j in 0..n {
            let want: f32 = (0..n).map(|k| av[i * n + k] * bv[k * n + j]).sum();
            assert_eq!(c[i * n + j], want, "at ({i}, {j})");
        }
    }
}

#[test]
fn astype_and_unary() {
    let s = cpu();
    let a = Array::from_bytes(&f32s(&[-1.5, 0.0, 2.25]), &[3], Dtype::F32).unwrap();
    let abs = unary(UnaryOp::Abs, &a, &s).unwrap();
    assert_eq!(read_f32(&abs, &s), vec![1.5, 0.0, 2.25]);
    let i = astype(&a, Dtype::I32, &s).unwrap();
    assert_eq!(i.dtype(), Dtype::I32);
    let bytes = i.to_bytes(&s).unwrap();
    let ints: Vec<i32> = bytes
        .chunks_exact(4)
        .map(|c| i32::from_ne_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(ints, vec![-1, 0, 2]);
}

#[test]
fn stream_synchronize_and_async_eval() {
    let s = cpu();
    let a = random_uniform(&[256, 256], Dtype::F32, 7, &s).unwrap();
    let b = matmul(&a, &a, &s).unwrap();
    b.async_eval().unwrap();
    s.synchronize().unwrap();
    let v = read_f32(&b, &s);
    assert_eq!(v.len(), 256 * 256);
    assert!(v.iter().all(|x| x.is_finite() && *x >= 0.0));
}

#[test]
fn gpu_stream_on_a_cpu_build_is_an_error() {
    if is_available(DeviceKind::Gpu) {
        assert!(Stream::new(DeviceKind::Gpu).is_ok());
    } else {
        let err = Stream::new(DeviceKind::Gpu).unwrap_err();
        assert!(err.message.contains("not available"), "{}", err.message);
    }
}

#[test]
fn strided_views_must_stay_inside_the_array() {
    let s = cpu();
    let a = arange(0.0, 12.0, 1.0, Dtype::F32, &s).unwrap();
    // Sliding windows of 3 with step 2: rows [0,1,2], [2,3,4], ...
    let v = as_strided(&a, &[5, 3], &[2, 1], 0, &s).unwrap();
    assert_eq!(read_f32(&v, &s)[..6], [0.0, 1.0, 2.0, 2.0, 3.0, 4.0]);
    // One more row would read position 12 of 12.
    let err = as_strided(&a, &[6, 3], &[2, 1], 0, &s).unwrap_err();
    assert!(err.message.contains("as_strided"), "{}", err.message);
}

fn close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs().max(1.0),
            "{got:?} vs {want:?}"
        );
    }
}

#[test]
fn triangular_solve_cholesky_det_and_solve() {
    let s = cpu();
    // Lower triangular a with junk above the diagonal, which must not be read.
    let a = Array::from_bytes(&f32s(&[2.0, 9.0, 1.0, 4.0]), &[2, 2], Dtype::F32).unwrap();
    let b = Array::from_bytes(&f32s(&[4.0, 6.0]), &[2], Dtype::F32).unwrap();
    let x = solve_triangular(&a, &b, false, &s).unwrap();
    close(&read_f32(&x, &s), &[2.0, 1.0]);
    let x = solve_triangular(&a, &b, true, &s).unwrap();
    // [[2, 9], [0, 4]] x = [4, 6] -> x1 = 1.5, x0 = (4 - 13.5) / 2
    close(&read_f32(&x, &s), &[-4.75, 1.5]);

    let spd = Array::from_bytes(&f32s(&[4.0, 2.0, 2.0, 5.0]), &[2, 2], Dtype::F32).unwrap();
    close(
        &read_f32(&cholesky(&spd, false, &s).unwrap(), &s),
        &[2.0, 0.0, 1.0, 2.0],
    );
    close(&read_f32(&det(&spd, &s).unwrap(), &s), &[16.0]);
    close(&read_f32(&solve(&spd, &b, &s).unwrap(), &s), &[0.5, 1.0]);

    let singular = Array::from_bytes(&f32s(&[0.0, 0.0, 1.0, 1.0]), &[2, 2], Dtype::F32).unwrap();
    let x = solve_triangular(&singular, &b, false, &s).unwrap();
    assert!(
        x.to_bytes(&s).is_err(),
        "a zero diagonal fails at evaluation"
    );
}

#[test]
fn decompositions_reconstruct_their_input() {
    let s = cpu();
    let m = [4.0f32, 1.0, 2.0, 1.0, 3.0, 0.0, 2.0, 0.0, 5.0];
    let a = Array::from_bytes(&f32s(&m), &[3, 3], Dtype::F32).unwrap();
    let prod = |x: &Array, y: &Array| read_f32(&matmul(x, y, &s).unwrap(), &s);

    let qr = decompose(Decomposition::Qr, &a, &s).unwrap();
    assert_eq!(qr.len(), 2);
    close(&prod(&qr[0], &qr[1]), &m);

    let eigh = decompose(Decomposition::Eigh, &a, &s).unwrap();
    let w = read_f32(&eigh[0], &s);
    assert!(w[0] <= w[1] && w[1] <= w[2], "ascending: {w:?}");
    let v = read_f32(&eigh[1], &s);
    // a v_j = w_j v_j for each column j
    let av = prod(&a, &eigh[1]);
    for j in 0..3 {
        let got: Vec<f32> = (0..3).map(|i| av[i * 3 + j]).collect();
        let want: Vec<f32> = (0..3).map(|i| w[j] * v[i * 3 + j]).collect();
        close(&got, &want);
    }

    let svd = decompose(Decomposition::Svd, &a, &s).unwrap();
    assert_eq!(svd.len(), 3);
    let sv = read_f32(&svd[1], &s);
    let mut sw = w.clone();
    sw.sort_by(|x, y| y.partial_cmp(x).unwrap());
    close(&sv, &sw); // symmetric positive definite: singular values are the eigenvalues

    // Partial pivoting permutes these rows in a 3-cycle, which tells p from its inverse.
    let c = [1.0f32, 2.0, 0.0, 0.0, 1.0, 5.0, 4.0, 0.0, 1.0];
    let ca = Array::from_bytes(&f32s(&c), &[3, 3], Dtype::F32).unwrap();
    let lu = decompose(Decomposition::Lu, &ca, &s).unwrap();
    assert_eq!(lu.len(), 3);
    let pivots: Vec<u32> = lu[0]
        .to_bytes(&s)
        .unwrap()
        .chunks_exact(4)
        .map(|c| u32::from_ne_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(pivots, vec![1, 2, 0]);
    let l_u = prod(&lu[1], &lu[2]);
    for (i, &p) in pivots.iter().enumerate() {
        let p = p as usize;
        close(&l_u[p * 3..p * 3 + 3], &c[i * 3..i * 3 + 3]);
    }
}

#[test]
fn n_dimensional_and_real_ffts_round_trip() {
    let s = cpu();
    let v = [1.0f32, 2.0, 3.0, 4.0, 0.5, -1.0];
    let a = Array::from_bytes(&f32s(&v), &[2, 3], Dtype::F32).unwrap();
    let r = fftn(FftKind::Real, &a, &[2, 3], &[0, 1], &s).unwrap();
    assert_eq!(r.shape(), vec![2, 2]);
    let back = fftn(FftKind::InverseReal, &r, &[2, 3], &[0, 1], &s).unwrap();
    close(&read_f32(&back, &s), &v);
    let c = fftn(FftKind::Forward, &a, &[2, 3], &[0, 1], &s).unwrap();
    assert_eq!(c.dtype(), Dtype::C64);
    let sum = read_f32(&c, &s);
    close(&sum[0..2], &[9.5, 0.0]); // the zero frequency is the sum
    let back = fftn(FftKind::Inverse, &c, &[2, 3], &[0, 1], &s).unwrap();
    let re: Vec<f32> = read_f32(&back, &s).chunks(2).map(|z| z[0]).collect();
    close(&re, &v);
}

#[test]
fn take_along_axis_picks_per_row_and_checks_ranks() {
    let s = cpu();
    let a = Array::from_bytes(&f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), &[2, 3], Dtype::F32).unwrap();
    let idx: Vec<u8> = [2i32, 0, 0, 1, 1, 2, 0, 0]
        .iter()
        .flat_map(|x| x.to_ne_bytes())
        .collect();
    let idx = Array::from_bytes(&idx, &[2, 4], Dtype::I32).unwrap();
    let r = take_along_axis(&a, &idx, 1, &s).unwrap();
    assert_eq!(r.shape(), vec![2, 4]);
    assert_eq!(
        read_f32(&r, &s),
        vec![3.0, 1.0, 1.0, 2.0, 5.0, 6.0, 4.0, 4.0]
    );
    let flat = reshape(&idx, &[8], &s).unwrap();
    let err = take_along_axis(&a, &flat, 1, &s).unwrap_err();
    assert!(err.message.contains("dimension"), "{}", err.message);
}

#[test]
fn topk_and_put_along_axis() {
    let s = cpu();
    let a = Array::from_bytes(&f32s(&[5.0, 1.0, 4.0, 2.0, 3.0, 0.0]), &[2, 3], Dtype::F32).unwrap();
    let top = topk(&a, 2, 1, &s).unwrap();
    assert_eq!(top.shape(), vec![2, 2]);
    let mut rows: Vec<Vec<f32>> = read_f32(&top, &s).chunks(2).map(|r| r.to_vec()).collect();
    rows.iter_mut().for_each(|r| r.sort_by(f32::total_cmp));
    assert_eq!(rows, vec![vec![4.0, 5.0], vec![2.0, 3.0]]);
    assert!(topk(&a, 4, 1, &s).is_err());

    let idx: Vec<u8> = [2i32, 0, 1, 1]
        .iter()
        .flat_map(|x| x.to_ne_bytes())
        .collect();
    let idx = Array::from_bytes(&idx, &[2, 2], Dtype::I32).unwrap();
    let values = Array::from_bytes(&f32s(&[7.0, 8.0, 9.0, 9.0]), &[2, 2], Dtype::F32).unwrap();
    let r = put_along_axis(&a, &idx, &values, 1, &s).unwrap();
    assert_eq!(read_f32(&r, &s), vec![8.0, 1.0, 7.0, 2.0, 9.0, 0.0]);
}

#[test]
fn tensordot_contracts_any_axes_as_a_naive_sum() {
    let s = cpu();
    // a [2, 3, 4], b [4, 5, 3]: contract a's axes (1, 2) with b's (2, 0); out [2, 5].
    let av: Vec<f32> = (0..24).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
    let bv: Vec<f32> = (0..60).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
    let a = Array::from_bytes(&f32s(&av), &[2, 3, 4], Dtype::F32).unwrap();
    let b = Array::from_bytes(&f32s(&bv), &[4, 5, 3], Dtype::F32).unwrap();
    let want = |i: usize, j: usize| -> f32 {
        let mut acc = 0.0;
        for x in 0..3 {
            for y in 0..4 {
                acc += av[i * 12 + x * 4 + y] * bv[y * 15 + j * 3 + x];
            }
        }
        acc
    };
    for (axes_a, axes_b) in [([1i64, 2], [2i64, 0]), ([-2, -1], [-1, 0])] {
        let c = tensordot(&a, &b, &axes_a, &axes_b, &s).unwrap();
        assert_eq!(c.shape(), vec![2, 5]);
        let got = read_f32(&c, &s);
        for i in 0..2 {
            for j in 0..5 {
                assert_eq!(got[i * 5 + j], want(i, j), "({i}, {j}) with {axes_a:?}");
            }
        }
    }
    // No contracted axis: the outer product.
    let v = Array::from_bytes(&f32s(&[1.0, 2.0]), &[2], Dtype::F32).unwrap();
    let w = Array::from_bytes(&f32s(&[3.0, 4.0, 5.0]), &[3], Dtype::F32).unwrap();
    let outer = tensordot(&v, &w, &[], &[], &s).unwrap();
    assert_eq!(outer.shape(), vec![2, 3]);
    assert_eq!(read_f32(&outer, &s), vec![3.0, 4.0, 5.0, 6.0, 8.0, 10.0]);
    // Half precision goes through f32 and rounds once: the f32 product, rounded.
    let ah = astype(&a, Dtype::BF16, &s).unwrap();
    let bh = astype(&b, Dtype::BF16, &s).unwrap();
    let ch = tensordot(&ah, &bh, &[1, 2], &[2, 0], &s).unwrap();
    let f32_then_round = astype(
        &tensordot(
            &astype(&ah, Dtype::F32, &s).unwrap(),
            &astype(&bh, Dtype::F32, &s).unwrap(),
            &[1, 2],
            &[2, 0],
            &s,
        )
        .unwrap(),
        Dtype::BF16,
        &s,
    )
    .unwrap();
    assert_eq!(
        ch.to_bytes(&s).unwrap(),
        f32_then_round.to_bytes(&s).unwrap()
    );
    // Mismatched lists, sizes, repeated or out-of-range axes are errors.
    assert!(tensordot(&a, &b, &[1], &[2, 0], &s).is_err());
    assert!(tensordot(&a, &b, &[1, 2], &[0, 2], &s).is_err());
    assert!(tensordot(&a, &b, &[1, 1], &[2, 2], &s).is_err());
    assert!(tensordot(&a, &b, &[3], &[0], &s).is_err());
    assert!(tensordot(&a, &b, &[-4], &[0], &s).is_err());
}

#[test]
fn quantized_matmul_equals_the_product_of_the_dequantized_weight() {
    let s = cpu();
    let (n, k) = (8usize, 64usize);
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.13).sin()).collect();
    let wa = Array::from_bytes(&f32s(&w), &[n as i64, k as i64], Dtype::F32).unwrap();
    let xa = Array::from_bytes(&f32s(&x), &[1, k as i64], Dtype::F32).unwrap();
    let q = Quant {
        mode: QuantMode::Affine,
        group_size: 32,
        bits: 4,
    };
    let parts = quantize(&wa, q, &s).unwrap();
    assert_eq!(parts.len(), 3);
    assert_eq!(parts[0].dtype(), Dtype::U32);
    assert_eq!(parts[0].shape(), vec![n as i64, (k / 8) as i64]);
    assert_eq!(parts[1].shape(), vec![n as i64, (k / 32) as i64]);
    let refs: Vec<&Array> = parts.iter().collect();
    let dq = read_f32(&dequantize(&refs, q, Dtype::F32, &s).unwrap(), &s);
    // Within one 4-bit step of each group's range.
    for (g, chunk) in w.chunks(32).enumerate() {
        let (lo, hi) = chunk
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        let step = (hi - lo) / 15.0;
        for (j, &v) in chunk.iter().enumerate() {
            assert!((dq[g * 32 + j] - v).abs() <= step + 1e-6);
        }
    }
    let mut inputs = vec![&xa];
    inputs.extend(refs.iter().copied());
    let y = read_f32(&quantized_matmul(&inputs, true, q, &s).unwrap(), &s);
    for (row, &got) in y.iter().enumerate() {
        let want: f32 = (0..k).map(|j| x[j] * dq[row * k + j]).sum();
        assert!(
            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
            "{got} vs {want}"
        );
    }
    // Layouts MLX does not run, and operand lists that do not fit, are errors.
    let bad = Quant { bits: 7, ..q };
    assert!(quantize(&wa, bad, &s).is_err());
    assert!(quantized_matmul(&inputs[..3], true, q, &s).is_err());
    assert!(quantized_matmul(&[&xa, &wa, refs[1], refs[2]], true, q, &s).is_err());
}
