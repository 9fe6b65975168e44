//! Helpers shared by the unit tests: an emulated device, a connection and
//! guest memory, and request/response shorthands.

use std::sync::Arc;

use vgpu_spec::request::header;
use vgpu_spec::wire::*;
use vgpu_spec::{Request, Response, Status, CONTROL_QUEUE, PROTOCOL_VERSION, SUBMISSION_QUEUE};
use vm_memory::GuestAddress;

use crate::config::SliceUuid;
use crate::connection::Connection;
use crate::gpu::emulated::EmulatedGpu;
use crate::guest::GuestMemoryMmap;
use crate::shared::DeviceShared;
use crate::slice::SliceMemory;

/// A PTX module with one kernel (24 parameter bytes) and one global.
pub const PTX: &str = "\
.version 8.0
.target sm_90
.address_size 64

.global .align 4 .b8 gdata[64];

.visible .entry saxpy(
    .param .u64 saxpy_param_0,
    .param .u64 saxpy_param_1,
    .param .f32 saxpy_param_2,
    .param .u32 saxpy_param_3
)
{
    ret;
}
";

/// Guest memory for tests: 1 MiB at 0 and 64 KiB at 16 MiB.
pub const GUEST_RAM: u64 = 1 << 20;
/// Start of the second guest region.
pub const GUEST_HIGH: u64 = 16 << 20;

/// Shared device state over an emulated GPU with `device_mem` bytes and a
/// slice limit of `limit` bytes.
pub fn shared(device_mem: u64, limit: u64) -> Arc<DeviceShared> {
    let gpu = Arc::new(EmulatedGpu::new(device_mem));
    Arc::new(DeviceShared::new(
        gpu,
        Arc::new(SliceMemory::new(limit)),
        "test-slice",
        SliceUuid([7; 16]),
        64,
        vgpu_spec::MAX_QUEUE_SIZE,
    ))
}

/// Guest memory with two regions.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), GUEST_RAM as usize),
        (GuestAddress(GUEST_HIGH), 64 << 10),
    ])
    .unwrap()
}

/// Encodes a request.
pub fn encode(req: &Request<'_>, session: u64, context: u64, flags: u32, id: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    req.encode(header(session, context, id, flags), &mut buf);
    buf
}

/// A connection driven directly, without a queue.
pub struct Harness {
    pub conn: Connection,
    pub shared: Arc<DeviceShared>,
    pub mem: GuestMemoryMmap,
    next_id: u64,
}

impl Harness {
    pub fn new(limit: u64) -> Harness {
        Harness::with_shared(shared(1 << 30, limit))
    }

    /// A harness over the given shared state.
    pub fn with_shared(shared: Arc<DeviceShared>) -> Harness {
        Harness {
            conn: Connection::new(shared.clone()),
            shared,
            mem: guest_memory(),
            next_id: 1,
        }
    }

    pub fn slice(&self) -> &SliceMemory {
        &self.shared.slice
    }

    /// Sends raw request bytes on a queue; returns the response bytes.
    pub fn raw(&mut self, queue: u16, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.conn.handle(queue, bytes, &self.mem, &mut out);
        out
    }

    /// Sends a request; returns status and body. Checks the id is echoed.
    pub fn call_flags(
        &mut self,
        session: u64,
        context: u64,
        flags: u32,
        req: Request<'_>,
    ) -> (Status, Vec<u8>) {
        let queue = if op::is_control(req.opcode()) {
            CONTROL_QUEUE
        } else {
            SUBMISSION_QUEUE
        };
        let id = self.next_id;
        self.next_id += 1;
        let out = self.raw(queue, &encode(&req, session, context, flags, id));
        let resp = Response::decode(&out).unwrap();
        assert_eq!(resp.header.request_id.get(), id);
        (resp.status(), resp.body.to_vec())
    }

    pub fn call(&mut self, session: u64, context: u64, req: Request<'_>) -> (Status, Vec<u8>) {
        self.call_flags(session, context, 0, req)
    }

    pub fn status(&mut self, session: u64, context: u64, req: Request<'_>) -> Status {
        self.call(session, context, req).0
    }

    /// Sends a request that returns a handle; panics on failure.
    pub fn handle(&mut self, session: u64, context: u64, req: Request<'_>) -> u64 {
        let (status, body) = self.call(session, context, req);
        assert_eq!(status, Status::SUCCESS);
        u64::from_le_bytes(body[..8].try_into().unwrap())
    }

    pub fn open(&mut self) -> u64 {
        self.handle(
            0,
            0,
            Request::SessionOpen(SessionOpenReq {
                pid: 1.into(),
                version: PROTOCOL_VERSION.into(),
            }),
        )
    }

    pub fn context(&mut self, session: u64) -> u64 {
        self.handle(session, 0, Request::CtxCreate(CtxCreateReq::default()))
    }

    pub fn alloc(&mut self, session: u64, context: u64, size: u64) -> u64 {
        self.handle(
            session,
            context,
            Request::MemAlloc(MemAllocReq { size: size.into() }),
        )
    }
}

/// A handle request body.
pub fn h(v: u64) -> HandleReq {
    HandleReq { handle: v.into() }
}

/// One scatter-gather entry.
pub fn sg(gpa: u64, len: u64) -> SgEntry {
    SgEntry {
        gpa: gpa.into(),
        len: len.into(),
    }
}

/// A host copy body for `segs`.
pub fn copy(device_ptr: u64, stream: u64, segs: &[SgEntry]) -> MemcpyHostReq {
    MemcpyHostReq {
        device_ptr: device_ptr.into(),
        stream: stream.into(),
        total_len: segs.iter().map(|s| s.len.get()).sum::<u64>().into(),
        nsegs: (segs.len() as u32).into(),
        _pad: 0.into(),
    }
}

/// A [`crate::gpu::HostBuf`] over `v`.
pub fn host(v: &mut [u8]) -> crate::gpu::HostBuf {
    // SAFETY: every caller keeps `v` alive and untouched while the buffer is used.
    unsafe { crate::gpu::HostBuf::new(v.as_mut_ptr(), v.len()) }
}

/// `len` bytes of device memory at `src`, copied out synchronously.
pub fn read(ctx: &mut Box<dyn crate::gpu::GpuContext>, src: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    ctx.memcpy_dtoh(&[host(&mut out)], src, None, false)
        .unwrap();
    out
}
