//! The floating-point types the crate works in.

use ndarray::NdFloat;
use serde::{Serialize, de::DeserializeOwned};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// `f32` or `f64`: the element type of networks, factors and queries.
///
/// Accounts that accumulate over a run are always kept in `f64`, whatever `F` is,
/// so the ledger balances over long runs.
pub trait Float:
    NdFloat
    + num_traits::Float
    + Default
    + Serialize
    + DeserializeOwned
    + bytemuck::Pod
    + sealed::Sealed
{
    /// Widens to `f64` (exact for both types).
    fn widen(self) -> f64;
    /// Narrows from `f64` (rounds to nearest for `f32`).
    fn narrow(x: f64) -> Self;
    /// The safetensors dtype name (`"F32"`, `"F64"`).
    const DTYPE: &'static str;
    /// Appends the little-endian bytes.
    fn write_le(self, out: &mut Vec<u8>);
    /// Reads from `size_of::<Self>()` little-endian bytes.
    fn read_le(bytes: &[u8]) -> Self;
}

impl Float for f32 {
    const DTYPE: &'static str = "F32";
    fn write_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn read_le(bytes: &[u8]) -> Self {
        f32::from_le_bytes(bytes.try_into().expect("invariant: 4 bytes"))
    }
    fn widen(self) -> f64 {
        f64::from(self)
    }
    fn narrow(x: f64) -> Self {
        x as f32
    }
}

impl Float for f64 {
    const DTYPE: &'static str = "F64";
    fn write_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn read_le(bytes: &[u8]) -> Self {
        f64::from_le_bytes(bytes.try_into().expect("invariant: 8 bytes"))
    }
    fn widen(self) -> f64 {
        self
    }
    fn narrow(x: f64) -> Self {
        x
    }
}
