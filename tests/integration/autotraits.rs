//! The main types can cross threads.

use refinement_ledger::optim::{Adam, Sgd};
use refinement_ledger::{Error, Explanation, Ledger, OptimizerHook, Query};

fn send_sync<T: Send + Sync>() {}
fn send<T: Send>() {}

#[test]
fn main_types_are_send_and_sync() {
    send_sync::<Ledger<f32>>();
    send_sync::<Ledger<f64>>();
    send_sync::<Query<f32>>();
    send_sync::<Explanation<'static>>();
    send_sync::<Error>();
    send_sync::<OptimizerHook<Sgd<f32>, f32>>();
    send_sync::<OptimizerHook<Adam<f64>, f64>>();
    send::<refinement_ledger::nn::Sequential<f32>>();
}
