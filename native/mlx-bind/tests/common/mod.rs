//! Helpers shared by the binding's test files.

use mlx_bind::{Array, Stream};

pub fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

pub fn read_f32(a: &Array, s: &Stream) -> Vec<f32> {
    a.to_bytes(s)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_ne_bytes(c.try_into().unwrap()))
        .collect()
}
