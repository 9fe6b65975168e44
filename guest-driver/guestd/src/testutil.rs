//! A fake device for relay tests: it answers requests the way the real
//! device would for the opcodes tests use, keeps "device memory" in a map,
//! and treats every physical address as a pointer into this process (the
//! DMA heap is identity-mapped memory and `phys` is the identity).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Condvar, Mutex};

use vgpu_spec::wire::{op, ReqHeader, SessionOpenResp};
use vgpu_spec::{response, Request, Status, VgpuConfig};

use crate::device_queue::{DeviceError, DeviceLink};
use crate::dma::{DmaError, DmaMemory};
use crate::heap::{DmaBuf, Heap, BLOCK};

/// What the fake saw of one copy request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenCopy {
    pub opcode: u32,
    pub flags: u32,
    pub device_ptr: u64,
    pub entries: Vec<(u64, u64)>,
}

#[derive(Default)]
pub struct FakeState {
    pub next_session: u64,
    pub open: BTreeSet<u64>,
    pub closed: Vec<u64>,
    pub opcodes: Vec<u32>,
    pub copies: Vec<SeenCopy>,
    /// Device memory: address to byte.
    pub memory: HashMap<u64, u8>,
    /// Fail copies whose device pointer is this.
    pub fail_at: Option<u64>,
}

/// Holds copies to one device pointer until released, so a test can act
/// while the relay is in the middle of a request.
#[derive(Default)]
pub struct Gate {
    /// (device pointer to hold, whether a copy is being held).
    state: Mutex<(Option<u64>, bool)>,
    changed: Condvar,
}

impl Gate {
    /// Holds the next copies to `device_ptr`.
    pub fn hold(&self, device_ptr: u64) {
        *self.state.lock().unwrap() = (Some(device_ptr), false);
    }

    /// Whether a copy is being held now.
    pub fn holding(&self) -> bool {
        self.state.lock().unwrap().1
    }

    /// Lets held copies (and later ones) through.
    pub fn release(&self) {
        self.state.lock().unwrap().0 = None;
        self.changed.notify_all();
    }

    fn pass(&self, device_ptr: u64) {
        let mut st = self.state.lock().unwrap();
        if st.0 != Some(device_ptr) {
            return;
        }
        st.1 = true;
        while st.0 == Some(device_ptr) {
            st = self.changed.wait(st).unwrap();
        }
        st.1 = false;
    }
}

pub struct FakeLink {
    heap: Arc<Heap>,
    pub bounce_limit: usize,
    pub state: Mutex<FakeState>,
    pub gate: Gate,
}

impl FakeLink {
    pub fn new(heap_blocks: usize, bounce_limit: usize) -> Arc<FakeLink> {
        let mem = Arc::new(DmaMemory::identity(heap_blocks * BLOCK, BLOCK));
        Arc::new(FakeLink {
            heap: Heap::new(mem, 0, heap_blocks * BLOCK).unwrap(),
            bounce_limit,
            state: Mutex::new(FakeState {
                next_session: 100,
                ..FakeState::default()
            }),
            gate: Gate::default(),
        })
    }

    pub fn heap_used(&self) -> usize {
        self.heap.used()
    }

    fn execute(&self, bytes: &[u8], out: &mut Vec<u8>) {
        let (header, req): (ReqHeader, Request<'_>) = match Request::decode(bytes) {
            Ok(d) => d,
            Err(e) => return response::encode_status(e.status(), 0, out),
        };
        let id = header.request_id.get();
        if let Request::MemcpyHtoD(body, _) | Request::MemcpyDtoH(body, _) = &req {
            self.gate.pass(body.device_ptr.get());
        }
        let mut s = self.state.lock().unwrap();
        s.opcodes.push(header.opcode.get());
        match req {
            Request::SessionOpen(_) => {
                s.next_session += 1;
                let session = s.next_session;
                s.open.insert(session);
                let body = SessionOpenResp {
                    session: session.into(),
                };
                response::encode(Status::SUCCESS, id, &body, &[], out);
            }
            Request::SessionClose => {
                let session = header.session.get();
                let status = if s.open.remove(&session) {
                    s.closed.push(session);
                    Status::SUCCESS
                } else {
                    Status::INVALID_HANDLE
                };
                response::encode_status(status, id, out);
            }
            Request::MemcpyHtoD(body, segs) | Request::MemcpyDtoH(body, segs) => {
                let htod = header.opcode.get() == op::MEMCPY_HTOD;
                let dptr = body.device_ptr.get();
                s.copies.push(SeenCopy {
                    opcode: header.opcode.get(),
                    flags: header.flags.get(),
                    device_ptr: dptr,
                    entries: segs.iter().map(|e| (e.gpa.get(), e.len.get())).collect(),
                });
                if s.fail_at == Some(dptr) {
                    return response::encode_status(Status::INVALID_VALUE, id, out);
                }
                let mut at = dptr;
                for e in segs {
                    let p = e.gpa.get() as usize as *mut u8;
                    for i in 0..e.len.get() as usize {
                        if htod {
                            // SAFETY: "physical" addresses are pointers into
                            // this process (identity heap, client mappings).
                            let b = unsafe { p.add(i).read_volatile() };
                            s.memory.insert(at, b);
                        } else {
                            let b = s.memory.get(&at).copied().unwrap_or(0);
                            // SAFETY: as above.
                            unsafe { p.add(i).write_volatile(b) };
                        }
                        at += 1;
                    }
                }
                response::encode_status(Status::SUCCESS, id, out);
            }
            _ => response::encode_status(Status::SUCCESS, id, out),
        }
    }
}

impl DeviceLink for FakeLink {
    fn config(&self) -> VgpuConfig {
        let mut c = VgpuConfig::new();
        c.set_slice_name("fake-slice");
        c.memory_limit = (1u64 << 30).into();
        c
    }

    fn alloc(&self, len: usize) -> Result<DmaBuf, DeviceError> {
        Ok(self.heap.alloc(len)?)
    }

    fn transact(
        &self,
        _queue: u16,
        buf: &DmaBuf,
        req: (usize, usize),
        resp: (usize, usize),
    ) -> Result<u32, DeviceError> {
        let bytes = buf.as_slice()[req.0..req.0 + req.1].to_vec();
        let mut out = Vec::new();
        self.execute(&bytes, &mut out);
        let n = out.len().min(resp.1);
        assert!(resp.0 + n <= buf.len());
        // SAFETY: the response area lies inside the buffer (checked), which
        // the caller does not look at until this returns (the device's DMA).
        unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), buf.raw_ptr().add(resp.0), n) };
        Ok(n as u32)
    }

    fn phys(&self, vaddr: usize) -> Result<u64, DmaError> {
        Ok(vaddr as u64)
    }

    fn bounce_limit(&self) -> usize {
        self.bounce_limit
    }
}

/// A request's bytes.
pub fn request(opcode_req: &Request<'_>, session: u64, flags: u32, id: u64) -> Vec<u8> {
    let header = ReqHeader {
        opcode: 0.into(),
        flags: flags.into(),
        session: session.into(),
        request_id: id.into(),
        context: 7.into(),
    };
    let mut out = Vec::new();
    opcode_req.encode(header, &mut out);
    out
}
