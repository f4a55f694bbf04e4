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
    NdFloat + num_traits::Float + Default + Serialize + DeserializeOwned + sealed::Sealed
{
    /// Widens to `f64` (exact for both types).
    fn widen(self) -> f64;
    /// Narrows from `f64` (rounds to nearest for `f32`).
    fn narrow(x: f64) -> Self;
}

impl Float for f32 {
    fn widen(self) -> f64 {
        f64::from(self)
    }
    fn narrow(x: f64) -> Self {
        x as f32
    }
}

impl Float for f64 {
    fn widen(self) -> f64 {
        self
    }
    fn narrow(x: f64) -> Self {
        x
    }
}
