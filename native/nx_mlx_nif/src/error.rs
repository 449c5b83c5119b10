//! The one error type of the NIF. It reaches Elixir as `{:error, {kind, message}}`, where
//! `kind` is `:argument` (bad input, MLX rejected the call), `:runtime` (device or evaluation
//! failure) or `:busy` (the worker's queue is full, try again).

use rustler::{Encoder, Env, Term};

#[derive(Debug, thiserror::Error)]
pub enum NifError {
    #[error("{0}")]
    Argument(String),
    #[error("{0}")]
    Runtime(String),
    #[error("command queue is full")]
    Busy,
}

impl From<mlx_bind::Error> for NifError {
    fn from(e: mlx_bind::Error) -> Self {
        NifError::Argument(e.message)
    }
}

mod atoms {
    rustler::atoms! { error, argument, runtime, busy }
}

impl NifError {
    pub fn kind(&self) -> rustler::Atom {
        match self {
            NifError::Argument(_) => atoms::argument(),
            NifError::Runtime(_) => atoms::runtime(),
            NifError::Busy => atoms::busy(),
        }
    }
}

impl Encoder for NifError {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        (atoms::error(), (self.kind(), self.to_string())).encode(env)
    }
}

pub type NifResult<T> = Result<T, NifError>;
