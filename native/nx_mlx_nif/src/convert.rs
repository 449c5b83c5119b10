//! Term <-> binding-type conversions: dtype, device and op names as atoms.

use mlx_bind::{BinaryOp, DeviceKind, Dtype, QuantMode, ReduceOp, ScanOp, UnaryOp};
use rustler::{Atom, Encoder, Env, Term};

use crate::error::{NifError, NifResult};

fn atom_name(term: Term) -> NifResult<String> {
    term.atom_to_string()
        .map_err(|_| NifError::Argument(format!("expected an atom, got {term:?}")))
}

macro_rules! atom_table {
    ($parse:ident, $ty:ty, $what:literal, { $($atom:literal => $variant:expr),* $(,)? }) => {
        pub fn $parse(term: Term) -> NifResult<$ty> {
            let name = atom_name(term)?;
            match name.as_str() {
                $($atom => Ok($variant),)*
                other => Err(NifError::Argument(format!(concat!("unknown ", $what, " {}"), other))),
            }
        }
    };
}

atom_table!(dtype, Dtype, "dtype", {
    "bool" => Dtype::Bool, "u8" => Dtype::U8, "u16" => Dtype::U16, "u32" => Dtype::U32,
    "u64" => Dtype::U64, "s8" => Dtype::I8, "s16" => Dtype::I16, "s32" => Dtype::I32,
    "s64" => Dtype::I64, "f16" => Dtype::F16, "f32" => Dtype::F32, "f64" => Dtype::F64,
    "bf16" => Dtype::BF16, "c64" => Dtype::C64,
});

atom_table!(quant_mode, QuantMode, "quantization mode", {
    "affine" => QuantMode::Affine, "mxfp4" => QuantMode::Mxfp4, "mxfp8" => QuantMode::Mxfp8,
    "nvfp4" => QuantMode::Nvfp4,
});

atom_table!(device, DeviceKind, "device", {
    "cpu" => DeviceKind::Cpu, "gpu" => DeviceKind::Gpu,
});

atom_table!(unary_op, UnaryOp, "unary op", {
    "abs" => UnaryOp::Abs, "ceil" => UnaryOp::Ceil, "floor" => UnaryOp::Floor,
    "round" => UnaryOp::Round, "negative" => UnaryOp::Negative, "sign" => UnaryOp::Sign,
    "exp" => UnaryOp::Exp, "expm1" => UnaryOp::Expm1, "log" => UnaryOp::Log,
    "log1p" => UnaryOp::Log1p, "sqrt" => UnaryOp::Sqrt, "rsqrt" => UnaryOp::Rsqrt,
    "sin" => UnaryOp::Sin, "cos" => UnaryOp::Cos, "tan" => UnaryOp::Tan,
    "arcsin" => UnaryOp::Asin, "arccos" => UnaryOp::Acos, "arctan" => UnaryOp::Atan,
    "sinh" => UnaryOp::Sinh, "cosh" => UnaryOp::Cosh, "tanh" => UnaryOp::Tanh,
    "arcsinh" => UnaryOp::Asinh, "arccosh" => UnaryOp::Acosh, "arctanh" => UnaryOp::Atanh,
    "sigmoid" => UnaryOp::Sigmoid, "erf" => UnaryOp::Erf, "erfinv" => UnaryOp::ErfInv,
    "logical_not" => UnaryOp::LogicalNot, "bitwise_invert" => UnaryOp::BitwiseNot,
    "isnan" => UnaryOp::IsNan, "isinf" => UnaryOp::IsInf, "real" => UnaryOp::Real,
    "imag" => UnaryOp::Imag, "conjugate" => UnaryOp::Conjugate,
    "erfc" => UnaryOp::Erfc, "cbrt" => UnaryOp::Cbrt, "gelu" => UnaryOp::Gelu,
});

atom_table!(binary_op, BinaryOp, "binary op", {
    "add" => BinaryOp::Add, "subtract" => BinaryOp::Subtract, "multiply" => BinaryOp::Multiply,
    "divide" => BinaryOp::Divide, "floor_divide" => BinaryOp::FloorDivide,
    "remainder" => BinaryOp::Remainder, "power" => BinaryOp::Power,
    "maximum" => BinaryOp::Maximum, "minimum" => BinaryOp::Minimum,
    "arctan2" => BinaryOp::Atan2, "equal" => BinaryOp::Equal, "not_equal" => BinaryOp::NotEqual,
    "less" => BinaryOp::Less, "less_equal" => BinaryOp::LessEqual, "greater" => BinaryOp::Greater,
    "greater_equal" => BinaryOp::GreaterEqual, "logical_and" => BinaryOp::LogicalAnd,
    "logical_or" => BinaryOp::LogicalOr, "bitwise_and" => BinaryOp::BitwiseAnd,
    "bitwise_or" => BinaryOp::BitwiseOr, "bitwise_xor" => BinaryOp::BitwiseXor,
    "left_shift" => BinaryOp::LeftShift, "right_shift" => BinaryOp::RightShift,
});

atom_table!(scan_op, ScanOp, "scan", {
    "sum" => ScanOp::Sum, "prod" => ScanOp::Prod, "max" => ScanOp::Max, "min" => ScanOp::Min,
});

atom_table!(reduce_op, ReduceOp, "reduction", {
    "sum" => ReduceOp::Sum, "prod" => ReduceOp::Prod, "max" => ReduceOp::Max,
    "min" => ReduceOp::Min, "all" => ReduceOp::All, "any" => ReduceOp::Any, "mean" => ReduceOp::Mean,
});

pub fn encode_atom<'a>(env: Env<'a>, name: &str) -> Term<'a> {
    Atom::from_str(env, name)
        .map(|a| a.encode(env))
        .unwrap_or_else(|_| name.encode(env))
}
