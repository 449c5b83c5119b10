//! `mx::compile` through `Compiled`: a traced function is called once per input shapes, its
//! replay computes what the plain function does, errors come back as `Err`, and dropping it
//! frees what the trace captured.

mod common;

use common::{f32s, read_f32};
use mlx_bind::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn arr(v: &[f32]) -> Array {
    Array::from_bytes(&f32s(v), &[v.len() as i64], Dtype::F32).unwrap()
}

// exp(x * c) + y, with c a captured constant.
fn chain(s: &Stream, traces: Arc<AtomicUsize>) -> Compiled {
    let c = arr(&[2.0, 2.0, 2.0]);
    c.eval().unwrap();
    let s = *s;
    Compiled::new(move |x: &[Array]| {
        traces.fetch_add(1, Ordering::SeqCst);
        let m = binary(BinaryOp::Multiply, &x[0], &c, &s)?;
        let e = unary(UnaryOp::Exp, &m, &s)?;
        Ok(vec![binary(BinaryOp::Add, &e, &x[1], &s)?, m])
    })
}

#[test]
fn traces_once_per_shape_and_replays_the_same_values() {
    let s = Stream::new(DeviceKind::Cpu).unwrap();
    let traces = Arc::new(AtomicUsize::new(0));
    let f = chain(&s, traces.clone());
    for (x, y) in [
        ([0.0f32, 0.5, -1.0], [1.0f32, 2.0, 3.0]),
        ([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]),
    ] {
        let out = f.call(&[&arr(&x), &arr(&y)]).unwrap();
        let got = read_f32(&out[0], &s);
        let doubled = read_f32(&out[1], &s);
        for i in 0..3 {
            let want = (x[i] * 2.0).exp() + y[i];
            assert!((got[i] - want).abs() <= 1e-5 * want.abs(), "{got:?} at {i}");
            assert_eq!(doubled[i], x[i] * 2.0);
        }
    }
    assert_eq!(
        traces.load(Ordering::SeqCst),
        1,
        "one trace for one input shape"
    );
    let wider = Array::from_bytes(&f32s(&[1.0; 6]), &[2, 3], Dtype::F32).unwrap();
    let out = f.call(&[&wider, &arr(&[0.0, 0.0, 0.0])]).unwrap();
    assert_eq!(out[0].shape(), vec![2, 3]);
    assert_eq!(traces.load(Ordering::SeqCst), 2, "a new shape traces again");
}

#[test]
fn an_error_in_the_traced_function_is_an_err_and_the_next_call_traces_again() {
    let s = Stream::new(DeviceKind::Cpu).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let n = calls.clone();
    let s2 = s;
    let f = Compiled::new(move |x: &[Array]| {
        if n.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(Error {
                message: "first trace refused".into(),
            });
        }
        Ok(vec![unary(UnaryOp::Negative, &x[0], &s2)?])
    });
    let x = arr(&[1.0, -2.0, 3.0]);
    let err = f.call(&[&x]).unwrap_err();
    assert!(err.message.contains("first trace refused"), "{err:?}");
    let out = f.call(&[&x]).unwrap();
    assert_eq!(read_f32(&out[0], &s), vec![-1.0, 2.0, -3.0]);
    // Shapes that do not broadcast fail inside the trace, as an Err.
    let g =
        { Compiled::new(move |x: &[Array]| Ok(vec![binary(BinaryOp::Add, &x[0], &x[1], &s)?])) };
    assert!(g
        .call(&[&arr(&[1.0, 2.0]), &arr(&[1.0, 2.0, 3.0])])
        .is_err());
}

#[test]
fn dropping_a_compiled_function_frees_its_captured_constants() {
    let s = Stream::new(DeviceKind::Cpu).unwrap();
    let big = {
        let a = full(&[1 << 22], 1.0, Dtype::F32, &s).unwrap();
        a.eval().unwrap();
        a
    };
    let before = memory::active();
    let f = {
        Compiled::new(move |x: &[Array]| {
            let r = reduce(ReduceOp::Sum, &big, &[0], false, &s)?;
            Ok(vec![binary(BinaryOp::Add, &x[0], &r, &s)?])
        })
    };
    let out = f.call(&[&arr(&[1.0])]).unwrap();
    assert_eq!(read_f32(&out[0], &s), vec![(1 << 22) as f32 + 1.0]);
    drop(out);
    // Drop on another thread, as a BEAM resource destructor would.
    std::thread::spawn(move || drop(f)).join().unwrap();
    let after = memory::active();
    assert!(
        after + (1 << 24) <= before + (1 << 20),
        "16 MB constant still held: active {before} -> {after}"
    );
}
