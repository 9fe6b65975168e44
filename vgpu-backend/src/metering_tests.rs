//! Sessions' usage, counted through the request path of a connection over
//! the emulated executor.

use std::sync::Arc;

use vgpu_spec::wire::*;
use vgpu_spec::{Request, Response, Status};
use vm_memory::{Bytes, GuestAddress};

use super::{Figures, MeterRegistry};
use crate::gpu::timed::{TIMED_SPIN_ENTRY, TIMED_SPIN_PTX};
use crate::testutil::*;

const MIB: u64 = 1 << 20;

fn metered_harness() -> Harness {
    let mut shared = shared(1 << 30, 64 * MIB);
    Arc::get_mut(&mut shared).unwrap().meters = Arc::new(MeterRegistry::new(true));
    Harness::with_shared(shared)
}

fn meter_id(t: &Harness, session: u64) -> u64 {
    t.conn.session(session).unwrap().meter().id()
}

/// Loads the timed kernel in `(s, c)`; returns its function handle.
fn timed_spin(t: &mut Harness, s: u64, c: u64) -> u64 {
    let image = TIMED_SPIN_PTX.as_bytes();
    let load = ModuleLoadReq {
        image_len: (image.len() as u64).into(),
        kind: image::PTX.into(),
        _pad: 0.into(),
    };
    let m = t.handle(s, c, Request::ModuleLoad(load, image));
    let name = TIMED_SPIN_ENTRY.as_bytes();
    let sym = ModuleSymbolReq {
        module: m.into(),
        name_len: (name.len() as u32).into(),
        _pad: 0.into(),
    };
    let (status, body) = t.call(s, c, Request::GetFunction(sym, name));
    assert_eq!(status, Status::SUCCESS);
    let resp = Response {
        header: RespHeader::default(),
        body: &body,
    };
    resp.fixed::<FunctionResp>().unwrap().0.function.get()
}

fn spin(t: &mut Harness, s: u64, c: u64, function: u64, ns: u64) {
    let req = LaunchReq {
        function: function.into(),
        stream: 0.into(),
        grid: [1.into(), 1.into(), 1.into()],
        block: [1.into(), 1.into(), 1.into()],
        shared_mem: 0.into(),
        param_bytes: 8.into(),
    };
    let params = ns.to_le_bytes();
    assert_eq!(
        t.status(s, c, Request::Launch(req, &params)),
        Status::SUCCESS
    );
}

fn figures(all: &[(u64, Figures)], id: u64) -> Figures {
    all.iter()
        .find(|(m, _)| *m == id)
        .map(|(_, f)| *f)
        .unwrap_or_default()
}

#[test]
fn each_session_is_charged_its_own_kernels_copies_and_memory() {
    let mut t = metered_harness();
    let (a, b) = (t.open(), t.open());
    let (ca, cb) = (t.context(a), t.context(b));
    let (ma, mb) = (meter_id(&t, a), meter_id(&t, b));
    assert_ne!(ma, mb);

    let f = timed_spin(&mut t, a, ca);
    for _ in 0..3 {
        spin(&mut t, a, ca, f, 2_000_000);
    }
    let p = t.alloc(b, cb, 4096);
    t.mem.write_slice(&[1u8; 32], GuestAddress(0x1000)).unwrap();
    let src = [sg(0x1000, 32)];
    assert_eq!(
        t.status(b, cb, Request::MemcpyHtoD(copy(p, 0, &src), &src)),
        Status::SUCCESS
    );
    let dst = [sg(0x2000, 48)];
    assert_eq!(
        t.status(b, cb, Request::MemcpyDtoH(copy(p, 0, &dst), &dst)),
        Status::SUCCESS
    );

    let all = t.shared.meters.collect(vgpu_board::monotonic_ns());
    let fa = figures(&all, ma);
    assert_eq!(fa.kernels, 3);
    assert!(
        (6_000_000..6_500_000).contains(&fa.gpu_ns),
        "3 spins of 2 ms charged {} ns",
        fa.gpu_ns
    );
    assert_eq!(
        (fa.htod_bytes, fa.dtoh_bytes, fa.mem_resident_byte_ns),
        (0, 0, 0)
    );
    let fb = figures(&all, mb);
    assert_eq!((fb.kernels, fb.gpu_ns), (0, 0));
    assert_eq!((fb.htod_bytes, fb.dtoh_bytes), (32, 48));
    assert!(fb.mem_resident_byte_ns > 0);
}

#[test]
fn a_closed_session_reports_its_last_figures_once() {
    let mut t = metered_harness();
    let s = t.open();
    let c = t.context(s);
    let id = meter_id(&t, s);
    let f = timed_spin(&mut t, s, c);
    spin(&mut t, s, c, f, 1_000_000);
    t.alloc(s, c, MIB);
    assert_eq!(t.status(s, 0, Request::SessionClose), Status::SUCCESS);
    let all = t.shared.meters.collect(vgpu_board::monotonic_ns());
    let last = figures(&all, id);
    assert_eq!(last.kernels, 1);
    assert!(last.gpu_ns >= 1_000_000);
    assert!(last.mem_resident_byte_ns > 0);
    assert!(t.shared.meters.is_empty());
    assert!(t
        .shared
        .meters
        .collect(vgpu_board::monotonic_ns())
        .is_empty());
}

#[test]
fn freeing_memory_stops_its_integral() {
    let mut t = metered_harness();
    let s = t.open();
    let c = t.context(s);
    let id = meter_id(&t, s);
    let p = t.alloc(s, c, MIB);
    assert_eq!(t.status(s, c, Request::MemFree(h(p))), Status::SUCCESS);
    t.shared.meters.collect(vgpu_board::monotonic_ns());
    std::thread::sleep(std::time::Duration::from_millis(5));
    let all = t.shared.meters.collect(vgpu_board::monotonic_ns());
    assert_eq!(figures(&all, id), Figures::default());
    // A context's allocations leave with it.
    t.alloc(s, c, MIB);
    assert_eq!(t.conn.session(s).unwrap().meter().resident_bytes(), MIB);
    assert_eq!(t.status(s, 0, Request::CtxDestroy(h(c))), Status::SUCCESS);
    assert_eq!(t.conn.session(s).unwrap().meter().resident_bytes(), 0);
}
