//! Crash safety: a real process appending to the ledger is SIGKILLed at pseudo-random points,
//! restarted, and in the end the ledger holds every report exactly once, and nothing the process
//! acknowledged before it was killed is ever lost.

// Test helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};

use vgpu_ledger::stress::synthetic_report;
use vgpu_ledger::{Ledger, Totals};

const STRESS: &str = env!("CARGO_BIN_EXE_ledger-stress");
const COUNT: u64 = 400;
const KILL_ROUNDS: usize = 10;
const SIGKILL: i32 = 9;

/// splitmix64: a fixed-seed pseudo-random sequence, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// What one run of `ledger-stress` printed.
#[derive(Default)]
struct Run {
    acked: Vec<u64>,
    replayed: Option<u64>,
    done: bool,
}

/// Runs `ledger-stress`, SIGKILLing it once it has acknowledged `kill_after` reports (`None`: let
/// it finish). Every line it printed before it died is read, so `acked` holds everything it
/// acknowledged.
fn run_stress(dir: &Path, kill_after: Option<usize>) -> Run {
    let mut child = Command::new(STRESS)
        .arg(dir)
        .arg(COUNT.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut killed = false;
    if kill_after == Some(0) {
        // Killed while it opens the ledger (possibly while it creates the schema).
        child.kill().unwrap();
        killed = true;
    }
    let mut run = Run::default();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let (word, n) = line.split_once(' ').unwrap();
        let n: u64 = n.parse().unwrap();
        match word {
            "acked" => run.acked.push(n),
            "replayed" => run.replayed = Some(n),
            "done" => run.done = true,
            other => panic!("unexpected output {other:?}"),
        }
        if !killed && kill_after == Some(run.acked.len()) {
            child.kill().unwrap();
            killed = true;
        }
    }
    let status = child.wait().unwrap();
    if killed && !run.done {
        assert_eq!(status.signal(), Some(SIGKILL), "{status:?}");
    } else {
        assert!(status.success(), "ledger-stress failed: {status:?}");
    }
    run
}

/// The seqs recorded for backend "b", in seq order.
fn recorded_seqs(ledger: &Ledger) -> Vec<u64> {
    let mut seqs: Vec<u64> = ledger
        .usage(None, 0, u64::MAX)
        .unwrap()
        .into_iter()
        .filter(|r| r.report.backend == "b")
        .map(|r| r.report.seq)
        .collect();
    seqs.sort_unstable();
    seqs
}

#[test]
fn sigkilled_appender_loses_nothing_acknowledged_and_counts_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x5eed_1ed9_e700_0007);
    let mut acked_so_far = 0u64;
    let mut kills = 0;
    for round in 0..KILL_ROUNDS {
        // Mostly mid-stream; round 0 kills before anything is acknowledged.
        let kill_after = if round == 0 {
            0
        } else {
            (rng.next() % 30) as usize
        };
        let run = run_stress(dir.path(), Some(kill_after));
        if run.done {
            break;
        }
        kills += 1;
        // A restart replays the last recorded report (ignored as a duplicate), then acknowledges
        // the reports after it: no gaps, no repeats.
        let recorded_before = acked_so_far;
        if recorded_before > 0 && !run.acked.is_empty() {
            assert_eq!(run.replayed, Some(recorded_before), "round {round}");
        }
        let expected: Vec<u64> = (recorded_before + 1..).take(run.acked.len()).collect();
        assert_eq!(run.acked, expected, "round {round}");
        acked_so_far = run.acked.last().copied().unwrap_or(recorded_before);

        let ledger = Ledger::open(dir.path()).unwrap();
        let seqs = recorded_seqs(&ledger);
        let last = ledger.last_seq("b").unwrap().unwrap_or(0);
        assert!(
            last >= acked_so_far,
            "round {round}: acknowledged {acked_so_far} but the ledger ends at {last}"
        );
        assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "round {round}");
        eprintln!(
            "round {round}: killed after {kill_after} acks; acknowledged {:?}, ledger ends at {last}",
            (run.acked.first(), run.acked.last())
        );
        // The killed process may have committed one more append than it printed.
        acked_so_far = last;
    }
    assert!(kills >= KILL_ROUNDS / 2, "only {kills} runs were killed");

    let run = run_stress(dir.path(), None);
    assert!(run.done);
    assert_eq!(run.acked.last().copied().unwrap_or(acked_so_far), COUNT);

    let ledger = Ledger::open(dir.path()).unwrap();
    assert_eq!(recorded_seqs(&ledger), (1..=COUNT).collect::<Vec<_>>());
    let mut expected = Totals::default();
    for seq in 1..=COUNT {
        expected.add(&synthetic_report("b", seq));
    }
    assert_eq!(ledger.totals(None, 0, u64::MAX).unwrap(), expected);

    // The export walks the same records, each once, each exactly as generated.
    let mut cursor = 0;
    let mut exported = Vec::new();
    loop {
        let (page, next) = ledger.export_since(cursor, 37).unwrap();
        if page.is_empty() {
            break;
        }
        exported.extend(page.into_iter().map(|r| r.report));
        cursor = next;
    }
    let generated: Vec<_> = (1..=COUNT).map(|s| synthetic_report("b", s)).collect();
    assert_eq!(exported, generated);
}
