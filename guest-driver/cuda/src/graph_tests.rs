//! Tests of graph replay: what a launch submits, in which order, with
//! which flags, and that it flushes once.

use std::cell::RefCell;

use super::*;
use vgpu_spec::wire::op;

/// One thing the sink was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Submit {
        ctx: u64,
        flags: u32,
        opcode: u32,
        body: Vec<u8>,
    },
    HtoD {
        stream: u64,
        dst: u64,
        bytes: Vec<u8>,
    },
    DtoH {
        stream: u64,
        src: u64,
        len: usize,
    },
    Flush,
}

#[derive(Default)]
struct Recorder {
    calls: RefCell<Vec<Call>>,
    fail_at: Option<usize>,
}

impl Recorder {
    fn push(&self, call: Call) -> CuResult<()> {
        let mut calls = self.calls.borrow_mut();
        if self.fail_at == Some(calls.len()) {
            return Err(Status::ILLEGAL_ADDRESS);
        }
        calls.push(call);
        Ok(())
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }
}

impl Sink for Recorder {
    fn submit(&self, ctx: u64, flags: u32, req: &Request<'_>) -> CuResult<()> {
        let mut body = Vec::new();
        req.encode_body(&mut body);
        self.push(Call::Submit {
            ctx,
            flags,
            opcode: req.opcode(),
            body,
        })
    }

    unsafe fn htod(
        &self,
        _ctx: u64,
        stream: u64,
        dst: u64,
        src: *const u8,
        len: usize,
    ) -> CuResult<()> {
        // SAFETY: the caller's contract.
        let bytes = unsafe { std::slice::from_raw_parts(src, len) }.to_vec();
        self.push(Call::HtoD { stream, dst, bytes })
    }

    unsafe fn dtoh(
        &self,
        _ctx: u64,
        stream: u64,
        dst: *mut u8,
        src: u64,
        len: usize,
    ) -> CuResult<()> {
        // SAFETY: the caller's contract; the test "device" writes 0xee.
        unsafe { std::ptr::write_bytes(dst, 0xee, len) };
        self.push(Call::DtoH { stream, src, len })
    }

    fn flush(&self) -> CuResult<()> {
        self.push(Call::Flush)
    }
}

fn launch_op(function: u64, params: Vec<u8>) -> Op {
    Op::Launch {
        function,
        grid: [4, 1, 1],
        block: [128, 1, 1],
        shared_mem: 16,
        params,
    }
}

fn work(op: Op) -> Work {
    Work { ctx: 7, op }
}

fn decode(call: &Call) -> Request<'_> {
    let Call::Submit { opcode, body, .. } = call else {
        panic!("not a submit: {call:?}");
    };
    Request::decode_body(*opcode, body).unwrap()
}

#[test]
fn replay_submits_every_node_in_order_on_the_launch_stream_then_flushes_once() {
    let rec = Recorder::default();
    let list = vec![
        work(Op::Memset {
            dst: 0x1000,
            value: 0xab,
            elem_size: 1,
            count: 64,
        }),
        work(launch_op(11, vec![1, 2, 3, 4])),
        work(launch_op(12, vec![5, 6, 7, 8])),
        work(Op::DtoD {
            dst: 0x2000,
            src: 0x1000,
            len: 64,
        }),
        work(Op::WaitEvent { event: 9, flags: 1 }),
    ];
    // SAFETY: no host copies.
    unsafe { replay(&rec, 42, &list) }.unwrap();
    let calls = rec.calls();
    assert_eq!(calls.len(), 6);
    assert_eq!(calls[5], Call::Flush);
    assert_eq!(
        calls.iter().filter(|c| **c == Call::Flush).count(),
        1,
        "one flush per launch"
    );
    match decode(&calls[0]) {
        Request::Memset(m) => {
            assert_eq!(m.dst.get(), 0x1000);
            assert_eq!(m.value.get(), 0xab);
            assert_eq!(m.count.get(), 64);
            assert_eq!(m.stream.get(), 42);
        }
        other => panic!("expected a memset, got {other:?}"),
    }
    for (call, (function, params)) in calls[1..3]
        .iter()
        .zip([(11, [1, 2, 3, 4]), (12, [5, 6, 7, 8])])
    {
        match decode(call) {
            Request::Launch(l, p) => {
                assert_eq!(l.function.get(), function);
                assert_eq!(l.stream.get(), 42);
                assert_eq!(l.grid.map(|g| g.get()), [4, 1, 1]);
                assert_eq!(l.block.map(|g| g.get()), [128, 1, 1]);
                assert_eq!(l.shared_mem.get(), 16);
                assert_eq!(p, &params[..]);
            }
            other => panic!("expected a launch, got {other:?}"),
        }
    }
    match decode(&calls[3]) {
        Request::MemcpyDtoD(d) => {
            assert_eq!(
                (d.dst.get(), d.src.get(), d.size.get()),
                (0x2000, 0x1000, 64)
            );
            assert_eq!(d.stream.get(), 42);
        }
        other => panic!("expected a DtoD, got {other:?}"),
    }
    match decode(&calls[4]) {
        Request::StreamWaitEvent(w) => {
            assert_eq!((w.stream.get(), w.event.get(), w.flags.get()), (42, 9, 1));
        }
        other => panic!("expected a wait, got {other:?}"),
    }
    for call in &calls[..5] {
        let Call::Submit { ctx, flags, .. } = call else {
            unreachable!()
        };
        assert_eq!(*ctx, 7, "the node's context goes in the header");
        let Call::Submit { opcode, .. } = call else {
            unreachable!()
        };
        let queued_without_async_flag = [op::LAUNCH_KERNEL, op::STREAM_WAIT_EVENT];
        let expected = if queued_without_async_flag.contains(opcode) {
            0
        } else {
            FLAG_ASYNC
        };
        assert_eq!(*flags, expected, "{call:?}");
    }
}

#[test]
fn host_copies_read_and_write_host_memory_when_the_graph_runs() {
    let rec = Recorder::default();
    let mut src = [1u8, 2, 3, 4];
    let src_ptr = src.as_mut_ptr();
    let mut dst = [0u8; 3];
    let list = vec![
        work(Op::HtoD {
            dst: 0x5000,
            src: src_ptr.expose_provenance(),
            len: 4,
        }),
        work(Op::DtoH {
            dst: dst.as_mut_ptr().expose_provenance(),
            src: 0x5000,
            len: 3,
        }),
    ];
    // The application changes its buffer after capture, before launch.
    // SAFETY: `src_ptr` points at the first byte of the live array.
    unsafe { src_ptr.write(9) };
    // SAFETY: the host ranges are live arrays of the recorded lengths.
    unsafe { replay(&rec, 3, &list) }.unwrap();
    let calls = rec.calls();
    assert_eq!(
        calls[0],
        Call::HtoD {
            stream: 3,
            dst: 0x5000,
            bytes: vec![9, 2, 3, 4]
        },
        "the source is read at launch, not at capture"
    );
    assert_eq!(
        calls[1],
        Call::DtoH {
            stream: 3,
            src: 0x5000,
            len: 3
        }
    );
    assert_eq!(dst, [0xee; 3]);
    assert_eq!(calls[2], Call::Flush);
}

#[test]
fn replay_stops_at_the_first_failure() {
    let rec = Recorder {
        fail_at: Some(1),
        ..Recorder::default()
    };
    let list = vec![
        work(launch_op(1, vec![])),
        work(launch_op(2, vec![])),
        work(launch_op(3, vec![])),
    ];
    // SAFETY: no host copies.
    let rc = unsafe { replay(&rec, 0, &list) };
    assert_eq!(rc, Err(Status::ILLEGAL_ADDRESS));
    assert_eq!(rec.calls().len(), 1);
}

#[test]
fn empty_graph_replays_as_just_a_flush() {
    let rec = Recorder::default();
    // SAFETY: nothing to copy.
    unsafe { replay(&rec, 0, &[]) }.unwrap();
    assert_eq!(rec.calls(), vec![Call::Flush]);
}

#[test]
fn executable_keeps_the_nodes_work_in_order() {
    let nodes = vec![
        Node {
            id: 1,
            deps: vec![],
            work: work(launch_op(1, vec![1])),
        },
        Node {
            id: 2,
            deps: vec![1],
            work: work(launch_op(2, vec![2])),
        },
    ];
    let exec = executable(&nodes);
    assert_eq!(exec.len(), 2);
    assert_eq!(exec[0], nodes[0].work);
    assert_eq!(exec[1], nodes[1].work);
}

#[test]
fn instantiate_flags_are_checked() {
    assert_eq!(check_instantiate_flags(0), Ok(()));
    assert_eq!(check_instantiate_flags(1 | 2 | 8), Ok(()));
    assert_eq!(check_instantiate_flags(4), Err(Status::NOT_SUPPORTED));
    assert_eq!(check_instantiate_flags(0x100), Err(Status::INVALID_VALUE));
}

#[test]
fn ids_are_distinct_and_pointer_like() {
    let a = new_id();
    let b = new_id();
    assert_ne!(a, b);
    assert_eq!(a % 0x10, 0);
    assert!(a >= FIRST_ID);
}

#[test]
fn graph_calls_before_init_are_not_initialized() {
    let mut g: CUgraph = std::ptr::null_mut();
    // SAFETY: a valid out-pointer.
    let rc = unsafe { cuGraphCreate(&mut g, 0) };
    assert_eq!(rc, Status::NOT_INITIALIZED.0);
    // SAFETY: ids are looked up, never dereferenced.
    let rc = unsafe { cuGraphLaunch(std::ptr::without_provenance_mut(0x10), std::ptr::null_mut()) };
    assert_eq!(rc, Status::NOT_INITIALIZED.0);
}
