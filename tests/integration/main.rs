//! The integration tests: one binary (one link on a fresh clone), a module per concern.

mod common;

mod autotraits;
mod balance;
mod errors;
mod exactness;
mod examples;
mod fuzz_regressions;
mod gradcheck;
mod merge;
mod online;
mod persistence;
mod properties;
mod queries;
mod resume;
mod robustness;
mod segment_ridge;
mod sketch;
mod update_check;
