//! Fuzzes the ledger and sketch loaders: any byte string must load or return an
//! error, never panic. Seed corpus: `fuzz/corpus/ledger_load` (a valid ledger
//! and a valid sketch).
//! Run on stable: `cargo fuzz run -s none ledger_load`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use refinement_ledger::Ledger;
use refinement_ledger::query::LedgerSketch;

fuzz_target!(|data: &[u8]| {
    if let Ok(ledger) = Ledger::<f32>::from_bytes(data) {
        // A file that loads must be a consistent ledger: these must not panic.
        let _ = ledger.parameter_balance();
        let _ = ledger.bytes_per_layer();
        let _ = ledger.to_bytes();
    }
    let _ = Ledger::<f64>::from_bytes(data);
    if let Ok(sketch) = LedgerSketch::from_bytes(data) {
        let _ = sketch.balance_error();
        let _ = sketch.bytes_per_layer();
        let _ = sketch.ridge(0.1);
    }
});
