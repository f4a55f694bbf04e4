//! tmp
#![deny(missing_docs)]
#![deny(unsafe_code)]
#![doc(test(attr(deny(warnings))))]

mod error;
mod float;
mod hook;
pub mod ledger;
pub mod nn;
pub mod optim;
pub mod query;
mod trace;

pub use error::{Error, Result};
pub use float::Float;
pub use optim::{LinearRule, Optimizer};
pub use trace::{ExampleId, LayerId, ParamId, ParamMut, SourceId, Traceable, TracedShape};
pub use hook::{Batch, Credit, HookConfig, OptimizerHook};
pub use ledger::{Ledger, load_params};
pub use query::{ClassAttribution, Explanation, Influence, Influences, LayerSel, Lens, Query, Ranking};
