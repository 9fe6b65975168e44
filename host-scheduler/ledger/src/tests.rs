//! Tests of the ledger database: appends, replays, queries and the export cursor.

use std::sync::Arc;

use crate::*;

fn report(backend: &str, seq: u64, tenant: &str, start: u64, end: u64) -> UsageReport {
    UsageReport {
        backend: backend.into(),
        seq,
        tenant: tenant.into(),
        slice: format!("{tenant}-slice"),
        session: 1,
        start_unix_ns: start,
        end_unix_ns: end,
        gpu_ns: seq * 10,
        mem_resident_byte_ns: u128::from(seq) << 70,
        mem_swapped_byte_ns: u128::from(seq),
        htod_bytes: seq * 100,
        dtoh_bytes: seq * 1000,
        kernels: seq,
    }
}

fn open() -> (tempfile::TempDir, Ledger) {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path()).unwrap();
    (dir, ledger)
}

fn seqs(records: &[Record]) -> Vec<u64> {
    records.iter().map(|r| r.report.seq).collect()
}

#[test]
fn open_creates_the_state_dir_and_a_wal_ledger_with_full_sync() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let ledger = Ledger::open(&state).unwrap();
    assert_eq!(ledger.path(), state.join(LEDGER_FILE));
    assert!(ledger.path().exists());
    let conn = ledger.lock();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let sync: i64 = conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    assert_eq!(sync, 2, "synchronous=FULL");
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
}

#[test]
fn reopening_the_ledger_keeps_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let r = report("b", 1, "acme", 0, 10);
    Ledger::open(dir.path()).unwrap().append(&r).unwrap();
    let ledger = Ledger::open(dir.path()).unwrap();
    let records = ledger.usage(None, 0, u64::MAX).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].report, r);
    assert_eq!(ledger.append(&r).unwrap(), Appended::Duplicate);
}

#[test]
fn open_refuses_a_ledger_with_a_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    {
        let ledger = Ledger::open(dir.path()).unwrap();
        ledger
            .lock()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
    }
    let err = Ledger::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, LedgerError::UnsupportedSchema { found, .. } if found == SCHEMA_VERSION + 1)
    );
    assert!(err.to_string().starts_with("The ledger at "), "{err}");
}

#[test]
fn append_records_new_reports_with_growing_row_ids_and_recorded_time() {
    let (_dir, ledger) = open();
    let a = ledger.append(&report("b", 1, "acme", 0, 10)).unwrap();
    let b = ledger.append(&report("b", 2, "acme", 10, 20)).unwrap();
    match (a, b) {
        (Appended::New(x), Appended::New(y)) => assert!(y > x && x > 0),
        other => panic!("expected two new rows, got {other:?}"),
    }
    let records = ledger.usage(None, 0, 100).unwrap();
    assert!(records
        .iter()
        .all(|r| r.recorded_unix_ns > 1_600_000_000_000_000_000));
}

#[test]
fn replayed_report_is_ignored_and_counted_once() {
    let (_dir, ledger) = open();
    let r = report("b", 1, "acme", 0, 10);
    assert!(matches!(ledger.append(&r).unwrap(), Appended::New(_)));
    assert_eq!(ledger.append(&r).unwrap(), Appended::Duplicate);
    assert_eq!(ledger.append(&r).unwrap(), Appended::Duplicate);
    let totals = ledger.totals(Some("acme"), 0, 100).unwrap();
    assert_eq!(totals.records, 1);
    assert_eq!(totals.gpu_ns, 10);
    assert_eq!(ledger.export_since(0, 100).unwrap().0.len(), 1);
}

#[test]
fn same_key_with_different_figures_is_a_conflict_and_the_first_report_stays() {
    let (_dir, ledger) = open();
    let first = report("b", 1, "acme", 0, 10);
    ledger.append(&first).unwrap();
    let changed = UsageReport {
        gpu_ns: 999,
        ..first.clone()
    };
    let err = ledger.append(&changed).unwrap_err();
    assert!(matches!(err, LedgerError::Conflict { ref backend, seq: 1 } if backend == "b"));
    assert_eq!(
        err.to_string(),
        "Backend \"b\" sent report 1 again with different figures; the ledger keeps the first one"
    );
    let records = ledger.usage(None, 0, 100).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].report, first);
}

#[test]
fn same_seq_from_different_backends_are_different_reports() {
    let (_dir, ledger) = open();
    ledger.append(&report("b1", 1, "acme", 0, 10)).unwrap();
    assert!(matches!(
        ledger.append(&report("b2", 1, "acme", 0, 10)).unwrap(),
        Appended::New(_)
    ));
    assert_eq!(ledger.totals(None, 0, 100).unwrap().records, 2);
}

#[test]
fn invalid_report_is_refused_with_a_sentence_and_not_recorded() {
    let (_dir, ledger) = open();
    let err = ledger.append(&report("b", 1, "acme", 10, 5)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "The report's interval ends at 5 ns, before it starts at 10 ns (report 1 from backend \"b\")"
    );
    let err = ledger.append(&report("", 1, "acme", 0, 5)).unwrap_err();
    assert!(matches!(
        err,
        LedgerError::InvalidReport {
            source: ReportError::EmptyName { field: "backend" },
            ..
        }
    ));
    assert_eq!(ledger.last_seq("b").unwrap(), None);
    assert!(ledger.export_since(0, 10).unwrap().0.is_empty());
}

#[test]
fn last_seq_is_none_for_an_unknown_backend_and_the_highest_seq_otherwise() {
    let (_dir, ledger) = open();
    assert_eq!(ledger.last_seq("b").unwrap(), None);
    for seq in [1, 2, 3] {
        ledger.append(&report("b", seq, "acme", 0, 1)).unwrap();
    }
    ledger.append(&report("other", 9, "acme", 0, 1)).unwrap();
    assert_eq!(ledger.last_seq("b").unwrap(), Some(3));
    assert_eq!(ledger.last_seq("other").unwrap(), Some(9));
}

#[test]
fn append_batch_records_every_report_and_reports_replays() {
    let (_dir, ledger) = open();
    ledger.append(&report("b", 1, "acme", 0, 1)).unwrap();
    let batch: Vec<_> = (1..=4).map(|s| report("b", s, "acme", 0, 1)).collect();
    let outcomes = ledger.append_batch(&batch).unwrap();
    assert_eq!(outcomes.len(), 4);
    assert_eq!(outcomes[0], Appended::Duplicate);
    assert!(outcomes[1..].iter().all(|o| matches!(o, Appended::New(_))));
    assert_eq!(ledger.last_seq("b").unwrap(), Some(4));
}

#[test]
fn append_batch_counts_a_report_repeated_inside_it_once() {
    let (_dir, ledger) = open();
    let r = report("b", 1, "acme", 0, 1);
    let outcomes = ledger.append_batch(&[r.clone(), r]).unwrap();
    assert!(matches!(outcomes[0], Appended::New(_)));
    assert_eq!(outcomes[1], Appended::Duplicate);
    assert_eq!(ledger.totals(None, 0, 10).unwrap().records, 1);
}

#[test]
fn append_batch_with_a_conflict_or_invalid_report_records_nothing() {
    let (_dir, ledger) = open();
    ledger.append(&report("b", 1, "acme", 0, 1)).unwrap();
    let conflicting = UsageReport {
        kernels: 12345,
        ..report("b", 1, "acme", 0, 1)
    };
    let batch = [report("b", 2, "acme", 0, 1), conflicting];
    assert!(matches!(
        ledger.append_batch(&batch),
        Err(LedgerError::Conflict { seq: 1, .. })
    ));
    let batch = [report("b", 2, "acme", 0, 1), report("b", 3, "acme", 5, 1)];
    assert!(matches!(
        ledger.append_batch(&batch),
        Err(LedgerError::InvalidReport { seq: 3, .. })
    ));
    assert_eq!(ledger.last_seq("b").unwrap(), Some(1));
    assert_eq!(ledger.totals(None, 0, 10).unwrap().records, 1);
}

#[test]
fn usage_returns_records_overlapping_the_window_ordered_by_time() {
    let (_dir, ledger) = open();
    // Appended out of time order.
    ledger.append(&report("b", 1, "acme", 300, 400)).unwrap(); // after the window
    ledger.append(&report("b", 2, "acme", 150, 250)).unwrap(); // straddles the end
    ledger.append(&report("b", 3, "acme", 50, 150)).unwrap(); // straddles the start
    ledger.append(&report("b", 4, "acme", 0, 100)).unwrap(); // ends at the start: no overlap
    ledger.append(&report("b", 5, "acme", 120, 130)).unwrap(); // inside
    ledger.append(&report("b", 6, "acme", 200, 200)).unwrap(); // zero length at the end: out
    ledger.append(&report("b", 7, "acme", 100, 100)).unwrap(); // zero length at the start: in
    ledger.append(&report("b", 8, "acme", 0, 1000)).unwrap(); // covers the window
    let records = ledger.usage(None, 100, 200).unwrap();
    assert_eq!(seqs(&records), vec![8, 3, 7, 5, 2]);
}

#[test]
fn usage_filters_by_tenant() {
    let (_dir, ledger) = open();
    ledger.append(&report("b", 1, "acme", 0, 10)).unwrap();
    ledger.append(&report("b", 2, "beta", 0, 10)).unwrap();
    ledger.append(&report("b", 3, "acme", 10, 20)).unwrap();
    assert_eq!(seqs(&ledger.usage(Some("acme"), 0, 100).unwrap()), [1, 3]);
    assert_eq!(seqs(&ledger.usage(Some("beta"), 0, 100).unwrap()), [2]);
    assert!(ledger.usage(Some("nobody"), 0, 100).unwrap().is_empty());
    assert_eq!(ledger.usage(None, 0, 100).unwrap().len(), 3);
}

#[test]
fn totals_are_the_sums_over_the_records_usage_returns() {
    let (_dir, ledger) = open();
    for seq in 1..=5 {
        let tenant = if seq % 2 == 0 { "beta" } else { "acme" };
        ledger
            .append(&report("b", seq, tenant, seq * 10, seq * 10 + 10))
            .unwrap();
    }
    let totals = ledger.totals(Some("acme"), 0, 45).unwrap();
    let mut expected = Totals::default();
    for r in ledger.usage(Some("acme"), 0, 45).unwrap() {
        expected.add(&r.report);
    }
    assert_eq!(totals, expected);
    assert_eq!(totals.records, 2); // seq 1 and 3; seq 5 starts at 50
    assert_eq!(totals.gpu_ns, 40);
    assert_eq!(totals.mem_resident_byte_ns, 4u128 << 70);
    assert_eq!(totals.kernels, 4);
}

#[test]
fn a_window_that_ends_before_it_starts_is_refused() {
    let (_dir, ledger) = open();
    let err = ledger.usage(None, 10, 5).unwrap_err();
    assert_eq!(
        err.to_string(),
        "The query window ends at 5 ns, before it starts at 10 ns"
    );
    assert!(ledger.totals(None, 10, 5).is_err());
}

#[test]
fn export_since_pages_through_every_record_exactly_once_in_append_order() {
    let (_dir, ledger) = open();
    for seq in 1..=10 {
        // Time order opposite to append order: the export follows the append order.
        ledger
            .append(&report("b", seq, "acme", 1000 - seq, 1000))
            .unwrap();
    }
    let mut cursor = 0;
    let mut seen = Vec::new();
    loop {
        let (page, next) = ledger.export_since(cursor, 3).unwrap();
        assert!(page.len() <= 3);
        if page.is_empty() {
            assert_eq!(next, cursor);
            break;
        }
        assert!(next > cursor);
        assert_eq!(next, page.last().unwrap().rowid);
        seen.extend(seqs(&page));
        cursor = next;
    }
    assert_eq!(seen, (1..=10).collect::<Vec<_>>());
}

#[test]
fn export_since_picks_up_records_appended_after_the_last_page() {
    let (_dir, ledger) = open();
    ledger.append(&report("b", 1, "acme", 0, 1)).unwrap();
    let (page, cursor) = ledger.export_since(0, 100).unwrap();
    assert_eq!(seqs(&page), [1]);
    // A replay adds nothing to the export.
    ledger.append(&report("b", 1, "acme", 0, 1)).unwrap();
    assert!(ledger.export_since(cursor, 100).unwrap().0.is_empty());
    ledger.append(&report("b", 2, "acme", 0, 1)).unwrap();
    let (page, next) = ledger.export_since(cursor, 100).unwrap();
    assert_eq!(seqs(&page), [2]);
    assert!(next > cursor);
}

#[test]
fn export_since_with_limit_zero_or_a_cursor_past_the_end_returns_nothing() {
    let (_dir, ledger) = open();
    ledger.append(&report("b", 1, "acme", 0, 1)).unwrap();
    assert_eq!(ledger.export_since(0, 0).unwrap(), (vec![], 0));
    assert_eq!(
        ledger.export_since(u64::MAX, 10).unwrap(),
        (vec![], u64::MAX)
    );
}

#[test]
fn export_after_a_failed_batch_neither_skips_nor_repeats() {
    let (_dir, ledger) = open();
    let Appended::New(first) = ledger.append(&report("b", 1, "acme", 0, 1)).unwrap() else {
        panic!("expected a new row");
    };
    let (_, cursor) = ledger.export_since(0, 10).unwrap();
    assert_eq!(cursor, first);
    let bad = [report("b", 2, "acme", 0, 1), report("b", 1, "other", 0, 1)];
    assert!(ledger.append_batch(&bad).is_err());
    let Appended::New(next) = ledger.append(&report("b", 2, "acme", 0, 1)).unwrap() else {
        panic!("expected a new row");
    };
    assert!(next > cursor);
    assert_eq!(seqs(&ledger.export_since(cursor, 10).unwrap().0), [2]);
}

#[test]
fn concurrent_appends_from_threads_and_a_second_connection_are_all_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(Ledger::open(dir.path()).unwrap());
    let second = Arc::new(Ledger::open(dir.path()).unwrap());
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let ledger = if t % 2 == 0 { &ledger } else { &second };
            let ledger = Arc::clone(ledger);
            std::thread::spawn(move || {
                for seq in 1..=25 {
                    let r = report(&format!("b{t}"), seq, "acme", 0, 1);
                    assert!(matches!(ledger.append(&r).unwrap(), Appended::New(_)));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(ledger.totals(None, 0, 10).unwrap().records, 100);
    for t in 0..4 {
        assert_eq!(second.last_seq(&format!("b{t}")).unwrap(), Some(25));
    }
    let (page, _) = ledger.export_since(0, 1000).unwrap();
    let ids: Vec<u64> = page.iter().map(|r| r.rowid).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
}
