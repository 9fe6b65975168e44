//! Tests of the capture rules on a [`Captures`] of their own (no driver).

use std::thread::ThreadId;

use super::*;

const S1: Key = Key(0x1000);
const S2: Key = Key(0x1010);
const S3: Key = Key(0x1020);
const GRAPH: usize = 0x9990;

fn me() -> ThreadId {
    std::thread::current().id()
}

fn other_thread() -> ThreadId {
    std::thread::spawn(|| std::thread::current().id())
        .join()
        .unwrap()
}

fn memset(value: u32) -> Work {
    Work {
        ctx: 1,
        op: Op::Memset {
            dst: 0x100,
            value,
            elem_size: 4,
            count: 1,
        },
    }
}

fn rec(c: &mut Captures, key: Key, value: u32) -> CuResult<bool> {
    c.record(Some(key), || vec![memset(value)])
}

fn began(key: Key, mode: Mode) -> Captures {
    let mut c = Captures::default();
    c.begin(key, false, mode, me(), GRAPH).unwrap();
    c
}

fn values(nodes: &[Node]) -> Vec<u32> {
    nodes
        .iter()
        .map(|n| match n.work.op {
            Op::Memset { value, .. } => value,
            _ => panic!("not a memset"),
        })
        .collect()
}

#[test]
fn work_on_a_capturing_stream_is_recorded_as_a_chain() {
    let mut c = began(S1, Mode::Global);
    for v in 0..50 {
        assert_eq!(rec(&mut c, S1, v), Ok(true));
    }
    assert_eq!(rec(&mut c, S2, 99), Ok(false), "other streams submit");
    let (graph, nodes) = c.end(S1, me()).unwrap();
    assert_eq!(graph, GRAPH);
    assert_eq!(values(&nodes), (0..50).collect::<Vec<_>>());
    assert!(nodes[0].deps.is_empty());
    for pair in nodes.windows(2) {
        assert_eq!(pair[1].deps, vec![pair[0].id], "each node follows the last");
    }
    assert!(c.captures.is_empty() && c.streams.is_empty());
    assert_eq!(rec(&mut c, S1, 1), Ok(false), "capture over");
}

#[test]
fn begin_twice_is_illegal_state_and_end_without_begin_too() {
    let mut c = began(S1, Mode::Global);
    assert_eq!(
        c.begin(S1, false, Mode::Global, me(), GRAPH),
        Err(ILLEGAL_STATE)
    );
    assert_eq!(c.end(S2, me()).map(|_| ()), Err(ILLEGAL_STATE));
}

#[test]
fn fork_and_join_through_events_records_both_streams() {
    let mut c = began(S1, Mode::Global);
    rec(&mut c, S1, 1).unwrap();
    assert_eq!(c.record_event(0xe1, Some(S1)), Ok(true));
    assert_eq!(
        c.wait_event(Some(S2), false, 0xe1, 0, || memset(0)),
        Ok(true),
        "S2 joins the capture"
    );
    assert_eq!(rec(&mut c, S2, 2), Ok(true));
    assert_eq!(rec(&mut c, S1, 3), Ok(true));
    assert_eq!(c.record_event(0xe2, Some(S2)), Ok(true));
    assert_eq!(
        c.wait_event(Some(S1), false, 0xe2, 0, || memset(0)),
        Ok(true)
    );
    assert_eq!(rec(&mut c, S1, 4), Ok(true));
    let (_, nodes) = c.end(S1, me()).unwrap();
    assert_eq!(values(&nodes), vec![1, 2, 3, 4]);
    assert_eq!(
        nodes[1].deps,
        vec![nodes[0].id],
        "S2's work follows the fork"
    );
    let mut last = nodes[3].deps.clone();
    last.sort_unstable();
    let mut want = vec![nodes[1].id, nodes[2].id];
    want.sort_unstable();
    assert_eq!(last, want, "the join depends on both branches");
    assert!(c.streams.is_empty(), "every member stream leaves");
    assert!(c.events.is_empty());
}

#[test]
fn unjoined_fork_fails_end_with_unjoined() {
    let mut c = began(S1, Mode::Global);
    c.record_event(0xe1, Some(S1)).unwrap();
    c.wait_event(Some(S2), false, 0xe1, 0, || memset(0))
        .unwrap();
    rec(&mut c, S2, 2).unwrap();
    assert_eq!(c.end(S1, me()).map(|_| ()), Err(CAPTURE_UNJOINED));
    assert!(c.captures.is_empty(), "the capture is over");
}

#[test]
fn ending_on_a_forked_stream_is_unmatched_and_invalidates() {
    let mut c = began(S1, Mode::Global);
    c.record_event(0xe1, Some(S1)).unwrap();
    c.wait_event(Some(S2), false, 0xe1, 0, || memset(0))
        .unwrap();
    assert_eq!(c.end(S2, me()).map(|_| ()), Err(CAPTURE_UNMATCHED));
    assert_eq!(rec(&mut c, S1, 1), Err(CAPTURE_INVALIDATED));
    assert_eq!(c.end(S1, me()).map(|_| ()), Err(CAPTURE_INVALIDATED));
    assert!(c.captures.is_empty());
}

#[test]
fn end_from_another_thread_is_wrong_thread_unless_relaxed() {
    let mut c = began(S1, Mode::ThreadLocal);
    assert_eq!(
        c.end(S1, other_thread()).map(|_| ()),
        Err(CAPTURE_WRONG_THREAD)
    );
    assert!(c.end(S1, me()).is_ok());
    let mut c = began(S1, Mode::Relaxed);
    assert!(c.end(S1, other_thread()).is_ok());
}

#[test]
fn synchronizing_a_capturing_stream_invalidates_the_capture() {
    let mut c = began(S1, Mode::Relaxed);
    assert_eq!(
        c.stream_sync(Some(S1), me(), Mode::Relaxed),
        Err(CAPTURE_UNSUPPORTED)
    );
    assert_eq!(c.info(S1).map(|i| i.status), Some(STATUS_INVALIDATED));
    assert_eq!(rec(&mut c, S1, 1), Err(CAPTURE_INVALIDATED));
    assert_eq!(c.end(S1, me()).map(|_| ()), Err(CAPTURE_INVALIDATED));
}

#[test]
fn unsafe_calls_follow_the_capture_modes() {
    // Global capture on this thread: forbidden unless this thread is relaxed.
    let c = began(S1, Mode::Global);
    assert!(!c.prohibiting(me(), Mode::Global).is_empty());
    assert!(!c.prohibiting(me(), Mode::ThreadLocal).is_empty());
    assert!(c.prohibiting(me(), Mode::Relaxed).is_empty());
    // ... and for other threads in global mode, but not thread-local.
    let other = other_thread();
    assert!(!c.prohibiting(other, Mode::Global).is_empty());
    assert!(c.prohibiting(other, Mode::ThreadLocal).is_empty());
    // A thread-local capture only binds its own thread.
    let c = began(S1, Mode::ThreadLocal);
    assert!(!c.prohibiting(me(), Mode::Global).is_empty());
    assert!(c.prohibiting(other, Mode::Global).is_empty());
    // A relaxed capture binds nobody.
    let c = began(S1, Mode::Relaxed);
    assert!(c.prohibiting(me(), Mode::Global).is_empty());
    assert!(c.prohibiting(other, Mode::Global).is_empty());
}

#[test]
fn refused_unsafe_call_invalidates_the_capture() {
    let mut c = began(S1, Mode::Global);
    assert_eq!(c.unsafe_call(me(), Mode::Global), Err(CAPTURE_UNSUPPORTED));
    assert_eq!(c.info(S1).map(|i| i.status), Some(STATUS_INVALIDATED));
    let mut c = began(S1, Mode::Global);
    assert_eq!(c.unsafe_call(me(), Mode::Relaxed), Ok(()));
    assert_eq!(c.info(S1).map(|i| i.status), Some(STATUS_ACTIVE));
}

#[test]
fn legacy_stream_use_with_a_blocking_capture_is_implicit() {
    let mut c = Captures::default();
    c.begin(S1, true, Mode::Relaxed, me(), GRAPH).unwrap();
    assert!(c.legacy_blocked());
    assert_eq!(c.record(None, || vec![memset(1)]), Err(CAPTURE_IMPLICIT));
    assert_eq!(c.end(S1, me()).map(|_| ()), Err(CAPTURE_INVALIDATED));
    // A non-blocking capture leaves the legacy stream alone.
    let mut c = began(S1, Mode::Relaxed);
    assert!(!c.legacy_blocked());
    assert_eq!(c.record(None, || vec![memset(1)]), Ok(false));
    assert!(c.end(S1, me()).is_ok());
}

#[test]
fn captured_events_cannot_be_synchronized() {
    let mut c = began(S1, Mode::Relaxed);
    c.record_event(0xe1, Some(S1)).unwrap();
    assert_eq!(c.event_sync(0xe1, me(), Mode::Relaxed), Err(CAPTURED_EVENT));
    assert_eq!(c.event_sync(0xe2, me(), Mode::Relaxed), Ok(()));
    assert_eq!(c.end(S1, me()).map(|_| ()), Err(CAPTURE_INVALIDATED));
}

#[test]
fn event_rerecorded_outside_capture_is_no_longer_captured() {
    let mut c = began(S1, Mode::Relaxed);
    c.record_event(0xe1, Some(S1)).unwrap();
    assert_eq!(c.record_event(0xe1, Some(S3)), Ok(false));
    assert_eq!(c.event_sync(0xe1, me(), Mode::Relaxed), Ok(()));
}

#[test]
fn waiting_on_an_outside_event_needs_the_external_flag() {
    let mut c = began(S1, Mode::Relaxed);
    let external = || Work {
        ctx: 1,
        op: Op::WaitEvent {
            event: 77,
            flags: EVENT_WAIT_EXTERNAL,
        },
    };
    assert_eq!(
        c.wait_event(Some(S1), false, 0xe9, EVENT_WAIT_EXTERNAL, external),
        Ok(true)
    );
    let (_, nodes) = c.end(S1, me()).unwrap();
    assert!(matches!(nodes[0].work.op, Op::WaitEvent { event: 77, .. }));

    let mut c = began(S1, Mode::Relaxed);
    assert_eq!(
        c.wait_event(Some(S1), false, 0xe9, 0, external),
        Err(CAPTURE_ISOLATION)
    );
    assert_eq!(c.end(S1, me()).map(|_| ()), Err(CAPTURE_INVALIDATED));
}

#[test]
fn waiting_across_two_captures_is_a_merge_error() {
    let mut c = began(S1, Mode::Relaxed);
    c.begin(S2, false, Mode::Relaxed, me(), GRAPH + 0x10)
        .unwrap();
    c.record_event(0xe1, Some(S1)).unwrap();
    assert_eq!(
        c.wait_event(Some(S2), false, 0xe1, 0, || memset(0)),
        Err(CAPTURE_MERGE)
    );
}

#[test]
fn context_synchronize_during_capture_is_unsupported() {
    let mut c = Captures::default();
    assert_eq!(c.ctx_sync(), Ok(()));
    let mut c = began(S1, Mode::Relaxed);
    assert_eq!(c.ctx_sync(), Err(CAPTURE_UNSUPPORTED));
    assert_eq!(c.end(S1, me()).map(|_| ()), Err(CAPTURE_INVALIDATED));
}

#[test]
fn capture_info_reports_id_graph_and_dependencies() {
    let mut c = began(S1, Mode::Global);
    let info = c.info(S1).unwrap();
    assert_eq!(info.status, STATUS_ACTIVE);
    assert_eq!(info.graph, GRAPH);
    assert_eq!(info.count, 0);
    let id = info.id;
    assert_ne!(id, 0);
    rec(&mut c, S1, 1).unwrap();
    let info = c.info(S1).unwrap();
    assert_eq!(info.id, id);
    assert_eq!(info.count, 1);
    let node = c.nodes_of_graph(GRAPH).unwrap()[0];
    // SAFETY: `deps` points at `count` node handles kept in `c`.
    let deps = unsafe { std::slice::from_raw_parts(info.deps, info.count) };
    assert_eq!(deps[0].addr(), node);
    assert!(c.info(S2).is_none());
}

#[test]
fn destroying_the_origin_stream_drops_the_capture() {
    let mut c = began(S1, Mode::Global);
    c.record_event(0xe1, Some(S1)).unwrap();
    c.wait_event(Some(S2), false, 0xe1, 0, || memset(0))
        .unwrap();
    c.forget_stream(S2);
    assert_eq!(rec(&mut c, S1, 1), Err(CAPTURE_INVALIDATED));
    c.forget_stream(S1);
    assert!(c.captures.is_empty() && c.streams.is_empty() && c.events.is_empty());
}

#[test]
fn capture_modes_exchange_per_thread() {
    let old = exchange_mode(Mode::Relaxed);
    assert_eq!(old, Mode::Global, "threads start in global mode");
    assert_eq!(thread_mode(), Mode::Relaxed);
    let other = std::thread::spawn(thread_mode).join().unwrap();
    assert_eq!(other, Mode::Global);
    assert_eq!(exchange_mode(old), Mode::Relaxed);
    assert_eq!(Mode::from_raw(3), Err(Status::INVALID_VALUE));
    for mode in [Mode::Global, Mode::ThreadLocal, Mode::Relaxed] {
        assert_eq!(Mode::from_raw(mode.raw()), Ok(mode));
    }
}

#[test]
fn stream_keys_distinguish_legacy_per_thread_and_created_streams() {
    assert_eq!(key_of(std::ptr::null_mut()), None);
    assert_eq!(key_of(std::ptr::without_provenance_mut(1)), None);
    let pt = key_of(std::ptr::without_provenance_mut(2)).unwrap();
    assert_eq!(key_of(std::ptr::without_provenance_mut(2)), Some(pt));
    let other = std::thread::spawn(|| key_of(std::ptr::without_provenance_mut(2)))
        .join()
        .unwrap();
    assert_ne!(other, Some(pt), "each thread has its own default stream");
    assert_eq!(
        key_of(std::ptr::without_provenance_mut(0x1000)),
        Some(Key(0x1000))
    );
    assert_eq!(per_thread(std::ptr::null_mut()).addr(), 2);
    assert_eq!(
        per_thread(std::ptr::without_provenance_mut(0x40)).addr(),
        0x40
    );
}

#[test]
fn hooks_do_nothing_while_no_capture_exists() {
    // No test in this binary begins a capture through the global registry.
    assert_eq!(
        record(
            std::ptr::without_provenance_mut(0x1000),
            1,
            || unreachable!()
        ),
        Ok(false)
    );
    assert_eq!(on_unsafe_call(), Ok(()));
    assert_eq!(on_ctx_sync(), Ok(()));
    assert_eq!(on_legacy_sync(), Ok(()));
}
