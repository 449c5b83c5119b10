//! The threading contract the NIF relies on: lazy ops may be *built* on any thread naming a
//! stream, but only evaluated on the thread that created the stream; asynchronous evaluation
//! returns before the work is done and reports failures when waited on.

use std::sync::mpsc;
use std::thread;

use mlx_bind::*;

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_ne_bytes(c.try_into().unwrap()))
        .collect()
}

type Reply = mpsc::Sender<Result<Vec<u8>>>;

/// A thread that owns a CPU stream and evaluates what it is sent.
fn owner() -> (Stream, mpsc::Sender<(Array, Reply)>) {
    let (stx, srx) = mpsc::channel();
    let (jtx, jrx) = mpsc::channel::<(Array, Reply)>();
    thread::spawn(move || {
        let s = Stream::new(DeviceKind::Cpu).unwrap();
        stx.send(s).unwrap();
        for (a, reply) in jrx {
            let _ = reply.send(a.to_bytes(&s));
        }
    });
    (srx.recv().unwrap(), jtx)
}

#[test]
fn ops_built_elsewhere_evaluate_on_the_owning_thread() {
    let (s, jobs) = owner();
    // Built on this thread (and on a second one), naming the owner's stream.
    let a = full(&[4], 1.5, Dtype::F32, &s).unwrap();
    let b = thread::spawn(move || {
        let mut x = a;
        for _ in 0..100 {
            let one = full(&[4], 1.0, Dtype::F32, &s).unwrap();
            x = binary(BinaryOp::Add, &x, &one, &s).unwrap();
        }
        x
    })
    .join()
    .unwrap();
    let (tx, rx) = mpsc::channel();
    jobs.send((b, tx)).unwrap();
    assert_eq!(f32s(&rx.recv().unwrap().unwrap()), vec![101.5; 4]);
}

#[test]
fn evaluating_on_a_foreign_thread_is_an_error_not_a_crash() {
    let (s, _jobs) = owner();
    let a = full(&[2], 1.0, Dtype::F32, &s).unwrap();
    let b = binary(BinaryOp::Add, &a, &a, &s).unwrap();
    let err = b.eval().unwrap_err();
    assert!(err.message.contains("Stream"), "{}", err.message);
}

#[test]
fn async_eval_runs_in_the_background_and_wait_sees_it_finish() {
    let s = Stream::new(DeviceKind::Cpu).unwrap();
    let a = random_uniform(&[512, 512], Dtype::F32, 3, &s).unwrap();
    let mut x = a.clone();
    for _ in 0..40 {
        x = matmul(&x, &a, &s).unwrap();
    }
    let t0 = std::time::Instant::now();
    async_eval_all(&[&x]).unwrap();
    let queued = t0.elapsed();
    wait_all(&[&x]).unwrap();
    let done = t0.elapsed();
    // 40 matmuls of 512^2 take milliseconds; queuing them takes far less.
    assert!(queued * 4 < done, "queued in {queued:?}, done in {done:?}");
}

#[test]
fn a_failing_task_surfaces_when_waited_on_and_the_stream_recovers() {
    let s = Stream::new(DeviceKind::Cpu).unwrap();
    // A singular matrix: LAPACK reports it while the task runs on MLX's stream thread.
    let z = full(&[3, 3], 0.0, Dtype::F32, &s).unwrap();
    let i = inv(&z, &s).unwrap();
    // MLX reports the failure from async_eval itself when the task has already failed by
    // the time it returns, else from the wait: either is the failure surfacing.
    let err = async_eval_all(&[&i])
        .and_then(|_| wait_all(&[&i]))
        .unwrap_err();
    assert!(err.message.contains("Inverse"), "{}", err.message);
    let c = full(&[2], 2.0, Dtype::F32, &s).unwrap();
    assert_eq!(f32s(&c.to_bytes(&s).unwrap()), vec![2.0, 2.0]);
}

#[test]
fn wait_all_spin_waits_for_every_array_and_reports_failures() {
    let s = Stream::new(DeviceKind::Cpu).unwrap();
    let a = random_uniform(&[256, 256], Dtype::F32, 5, &s).unwrap();
    let x = matmul(&a, &a, &s).unwrap();
    let y = binary(BinaryOp::Add, &x, &a, &s).unwrap();
    async_eval_all(&[&x, &y]).unwrap();
    // A budget too short for the work: the rest is waited for, not skipped.
    wait_all_spin(&[&x, &y], 1).unwrap();
    let mut out = vec![0u8; y.nbytes()];
    assert!(
        y.try_copy_to(&mut out).unwrap(),
        "y is computed once waited for"
    );
    let z = full(&[3, 3], 0.0, Dtype::F32, &s).unwrap();
    let i = inv(&z, &s).unwrap();
    let err = async_eval_all(&[&i])
        .and_then(|_| wait_all_spin(&[&i], 1000))
        .unwrap_err();
    assert!(err.message.contains("Inverse"), "{}", err.message);
}

#[test]
fn memory_counters_move() {
    let s = Stream::new(DeviceKind::Cpu).unwrap();
    memory::reset_peak();
    let a = full(&[1 << 20], 1.0, Dtype::F32, &s).unwrap();
    a.eval().unwrap();
    assert!(memory::active() >= 4 << 20);
    assert!(memory::peak() >= 4 << 20);
    let old = memory::set_cache_limit(0).unwrap();
    drop(a);
    memory::clear_cache().unwrap();
    assert_eq!(memory::cache(), 0);
    memory::set_cache_limit(old).unwrap();
}

#[test]
fn scanning_a_graph_lists_what_evaluation_would_compute() {
    let s = Stream::new(DeviceKind::Cpu).unwrap();
    let a = full(&[2], 1.0, Dtype::F32, &s).unwrap();
    a.eval().unwrap();
    let b = binary(BinaryOp::Add, &a, &a, &s).unwrap();
    let c = binary(BinaryOp::Multiply, &b, &a, &s).unwrap();
    let scan = scan_graph(&[&c]);
    let mut pending = scan.pending.clone();
    pending.sort();
    let mut expected = vec![b.id(), c.id()];
    expected.sort();
    assert_eq!(pending, expected);
    assert_eq!(scan.boundary, vec![a.id()]);
    c.eval().unwrap();
    assert!(scan_graph(&[&c]).pending.is_empty());
}

#[test]
fn threaded_kernels_on_several_streams_at_once_give_the_serial_results() {
    // Four streams, each on its own thread, run threaded kernels (exp, softmax: large enough
    // to be split over the worker pool) at the same time, many times; every result equals
    // the one computed alone first.
    let n = 1usize << 18;
    let xs: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 4001) as f32 / 400.0 - 5.0)
        .collect();
    let bytes: Vec<u8> = xs.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let compute = |s: &Stream| -> (Vec<u8>, Vec<u8>) {
        let a = Array::from_bytes(&bytes, &[512, (n / 512) as i64], Dtype::F32).unwrap();
        let e = unary(UnaryOp::Exp, &a, s).unwrap();
        let p = softmax(&a, &[1], false, s).unwrap();
        (e.to_bytes(s).unwrap(), p.to_bytes(s).unwrap())
    };
    let want = compute(&Stream::new(DeviceKind::Cpu).unwrap());
    thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    let s = Stream::new(DeviceKind::Cpu).unwrap();
                    for _ in 0..25 {
                        assert!(compute(&s) == want);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
}
