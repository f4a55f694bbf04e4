//! tmp
#![deny(missing_docs)]
#![deny(unsafe_code)]
#![doc(test(attr(deny(warnings))))]

mod error;
mod float;
pub mod nn;
mod trace;

pub use error::{Error, Result};
pub use float::Float;
pub use trace::{ExampleId, LayerId, ParamId, ParamMut, SourceId, Traceable, TracedShape};
