//! Binding-level tests: real MLX calls on the CPU device, results read back and compared with
//! values computed here in Rust.

use mlx_bind::*;

fn cpu() -> Stream {
    Stream::new(DeviceKind::Cpu).expect("cpu stream")
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

fn read_f32(a: &Array, s: &Stream) -> Vec<f32> {
    a.to_bytes(s)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_ne_bytes(c.try_into().unwrap()))
        .collect()
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
