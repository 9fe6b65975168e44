//! `ledger-stress DIR COUNT`: appends the synthetic report stream of backend "b" to the ledger in
//! DIR, from the seq after the last one recorded up to COUNT, and prints `acked SEQ` after each
//! committed append (`done COUNT` at the end). On start it replays the last recorded report and
//! checks the ledger calls it a duplicate. The crash-safety test SIGKILLs it at random points.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use vgpu_ledger::stress::synthetic_report;
use vgpu_ledger::{Appended, Ledger};

const BACKEND: &str = "b";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (dir, count) = match args.as_slice() {
        [dir, count] => match count.parse::<u64>() {
            Ok(count) => (PathBuf::from(dir), count),
            Err(e) => return fail(&format!("COUNT {count:?} is not a number: {e}")),
        },
        _ => return fail("Usage: ledger-stress DIR COUNT"),
    };
    match run(&dir, count) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("{msg}");
    ExitCode::FAILURE
}

fn run(dir: &std::path::Path, count: u64) -> Result<(), String> {
    let ledger = Ledger::open(dir).map_err(|e| e.to_string())?;
    let mut out = std::io::stdout().lock();
    let mut say = |line: String| -> Result<(), String> {
        writeln!(out, "{line}")
            .and_then(|()| out.flush())
            .map_err(|e| format!("Could not write to stdout: {e}"))
    };
    let last = ledger.last_seq(BACKEND).map_err(|e| e.to_string())?;
    if let Some(last) = last {
        // What a reconnecting backend does with the interval that was in flight.
        match ledger.append(&synthetic_report(BACKEND, last)) {
            Ok(Appended::Duplicate) => say(format!("replayed {last}"))?,
            other => return Err(format!("Replaying report {last} gave {other:?}")),
        }
    }
    let mut seq = last.unwrap_or(0) + 1;
    while seq <= count {
        if seq % 4 == 0 {
            // A batch of up to three new reports, led by a replay of the previous one.
            let end = (seq + 2).min(count);
            let mut batch = vec![synthetic_report(BACKEND, seq - 1)];
            batch.extend((seq..=end).map(|s| synthetic_report(BACKEND, s)));
            let outcomes = ledger.append_batch(&batch).map_err(|e| e.to_string())?;
            if outcomes.first() != Some(&Appended::Duplicate) {
                return Err(format!(
                    "The replay in batch {seq} was recorded: {outcomes:?}"
                ));
            }
            for s in seq..=end {
                say(format!("acked {s}"))?;
            }
            seq = end + 1;
        } else {
            match ledger.append(&synthetic_report(BACKEND, seq)) {
                Ok(Appended::New(_)) => say(format!("acked {seq}"))?,
                other => return Err(format!("Appending report {seq} gave {other:?}")),
            }
            seq += 1;
        }
    }
    say(format!("done {count}"))
}
