//! One local client's requests, relayed onto the device.
//!
//! Requests are decoded first (an undecodable one is answered here, as the
//! device would). A client may only name sessions it opened itself. Copies
//! between host and device get their sg lists rewritten: client memory on
//! huge pages goes to the device by physical address, anything else is
//! bounced through the DMA heap (an asynchronous device-to-host copy that
//! bounces is made synchronous, so the data is in place before the client
//! hears back). A link's output buffer is always bounced ([`link_relay`]).
//! Every other request is copied to DMA memory unchanged.

use std::collections::BTreeSet;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use vgpu_spec::wire::{
    op, MemcpyHostReq, ReqHeader, RespHeader, SessionOpenResp, SgEntry, FLAG_ASYNC,
    FLAG_TRANSIENT_SOURCE,
};
use vgpu_spec::{response, Request, Status, CONTROL_QUEUE};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};
use zerocopy::{FromBytes, IntoBytes};

use crate::device_queue::{DeviceError, DeviceLink};
use crate::dma::DmaError;
use crate::heap::{DmaBuf, HeapError, BLOCK};
use crate::sg::{self, Backing, Chunk, Piece};
use crate::stats::Stats;

#[path = "link_relay.rs"]
mod link_relay;

/// The client memory type (what vhost-user-backend maps).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

const RESP_HEADER: usize = std::mem::size_of::<RespHeader>();
/// Largest response relayed (the largest the protocol has is 32 800 bytes).
const MAX_RESPONSE: usize = 64 << 10;
/// Most pieces one rewritten copy request carries.
const MAX_PIECES: usize = 1024;
/// `statfs` magic of hugetlbfs.
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Says whether a client region is on huge pages, and their size.
pub type Classifier = dyn Fn(&GuestRegionMmap<()>) -> Option<usize> + Send + Sync;

/// The huge page size of a region mapped from a hugetlbfs file (a
/// `MFD_HUGETLB` memfd), if it is one and the mapping is page-aligned.
pub fn hugetlb_page_size(region: &GuestRegionMmap<()>) -> Option<usize> {
    let mmap = region.get_mmap();
    let file = mmap.file_offset()?.file();
    // SAFETY: statfs is plain data; fstatfs fills it from a valid fd.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open (the region holds the file) and `st` is writable.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    if st.f_type as i64 != HUGETLBFS_MAGIC {
        return None;
    }
    let page = usize::try_from(st.f_bsize)
        .ok()
        .filter(|p| p.is_power_of_two())?;
    (mmap.as_ptr() as usize)
        .is_multiple_of(page)
        .then_some(page)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The request id of raw request bytes (0 if too short to hold one).
pub fn request_id_of(bytes: &[u8]) -> u64 {
    bytes
        .get(16..24)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

/// A copy being relayed.
struct CopyJob<'a> {
    queue: u16,
    header: ReqHeader,
    body: MemcpyHostReq,
    htod: bool,
    mem: &'a GuestMemoryMmap,
}

/// One connected client.
pub struct Client<L: ?Sized> {
    id: u64,
    link: Arc<L>,
    stats: Arc<Stats>,
    classify: Arc<Classifier>,
    sessions: Mutex<BTreeSet<u64>>,
}

impl<L: DeviceLink + ?Sized> Client<L> {
    /// A client with no sessions; `classify` tells huge-page regions.
    pub fn new(id: u64, link: Arc<L>, stats: Arc<Stats>, classify: Arc<Classifier>) -> Self {
        Client {
            id,
            link,
            stats,
            classify,
            sessions: Mutex::new(BTreeSet::new()),
        }
    }

    /// The sessions the client holds.
    pub fn sessions(&self) -> Vec<u64> {
        lock(&self.sessions).iter().copied().collect()
    }

    fn owns(&self, session: u64) -> bool {
        lock(&self.sessions).contains(&session)
    }

    /// Handles one request (the chain's readable bytes) that arrived on
    /// client queue `queue`, writing the response into `out`. `resp_cap` is
    /// the writable space the client provided.
    pub fn handle(
        &self,
        queue: u16,
        request: &[u8],
        resp_cap: usize,
        mem: &GuestMemoryMmap,
        out: &mut Vec<u8>,
    ) {
        out.clear();
        self.stats.request();
        if let Err(status) = self.dispatch(queue, request, resp_cap, mem, out) {
            response::encode_status(status, request_id_of(request), out);
        }
    }

    fn dispatch(
        &self,
        queue: u16,
        request: &[u8],
        resp_cap: usize,
        mem: &GuestMemoryMmap,
        out: &mut Vec<u8>,
    ) -> Result<(), Status> {
        let (header, req) = Request::decode(request).map_err(|e| e.status())?;
        let opcode = header.opcode.get();
        let session = header.session.get();
        if !matches!(opcode, op::GET_DEVICE_INFO | op::SESSION_OPEN) && !self.owns(session) {
            tracing::debug!(
                client = self.id,
                session,
                opcode,
                "Request names a session the client does not hold"
            );
            return Err(Status::INVALID_HANDLE);
        }
        match req {
            Request::MemcpyHtoD(body, segs) | Request::MemcpyDtoH(body, segs) => {
                let job = CopyJob {
                    queue,
                    header,
                    body,
                    htod: opcode == op::MEMCPY_HTOD,
                    mem,
                };
                self.copy(&job, segs, out)
            }
            Request::ModuleLink(body, parts) => {
                let job = link_relay::LinkJob {
                    queue,
                    header,
                    resp_cap,
                    mem,
                };
                self.link(&job, &body, &parts, out)
            }
            _ => {
                self.forward(queue, request, resp_cap, out)?;
                let status = response::Response::decode(out).map(|r| r.status()).ok();
                match (opcode, status) {
                    (op::SESSION_OPEN, Some(Status::SUCCESS)) => {
                        if let Some(resp) = out
                            .get(RESP_HEADER..)
                            .and_then(|b| SessionOpenResp::read_from_prefix(b).ok())
                        {
                            let id = resp.0.session.get();
                            lock(&self.sessions).insert(id);
                            tracing::info!(client = self.id, session = id, "Session opened");
                        }
                    }
                    (op::SESSION_CLOSE, Some(Status::SUCCESS | Status::INVALID_HANDLE)) => {
                        lock(&self.sessions).remove(&session);
                    }
                    _ => {}
                }
                Ok(())
            }
        }
    }

    fn device_failed(&self, e: DeviceError) -> Status {
        tracing::error!(client = self.id, error = %e, "Device request failed");
        match e {
            DeviceError::Heap(HeapError::TooLarge { .. })
            | DeviceError::Dma(DmaError::Map { .. }) => Status::OUT_OF_MEMORY,
            _ => Status::DEVICE_UNAVAILABLE,
        }
    }

    /// Sends `bytes` unchanged and puts the device's response in `out`.
    fn forward(
        &self,
        queue: u16,
        bytes: &[u8],
        resp_cap: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), Status> {
        let resp_len = resp_cap.clamp(RESP_HEADER, MAX_RESPONSE);
        let resp_at = bytes.len().next_multiple_of(64);
        let mut buf = self
            .link
            .alloc(resp_at + resp_len)
            .map_err(|e| self.device_failed(e))?;
        buf.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
        self.exchange(queue, &buf, (0, bytes.len()), (resp_at, resp_len), out)
    }

    /// Sends the request at `req` (offset, length) of `buf` with the
    /// response area at `resp`, and puts the device's answer in `out`.
    fn exchange(
        &self,
        queue: u16,
        buf: &DmaBuf,
        req: (usize, usize),
        resp: (usize, usize),
        out: &mut Vec<u8>,
    ) -> Result<(), Status> {
        let used = self
            .link
            .transact(queue, buf, req, resp)
            .map_err(|e| self.device_failed(e))?;
        let used = (used as usize).min(resp.1);
        out.clear();
        out.extend_from_slice(&buf.as_slice()[resp.0..resp.0 + used]);
        Ok(())
    }

    fn resolve(&self, mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Result<Backing, Status> {
        let region = mem
            .find_region(GuestAddress(gpa))
            .ok_or(Status::INVALID_VALUE)?;
        let offset = gpa - region.start_addr().0;
        if offset.checked_add(len).is_none_or(|end| end > region.len()) {
            return Err(Status::INVALID_VALUE);
        }
        let Some(page_size) = (self.classify)(region) else {
            return Ok(Backing::Plain);
        };
        let host = region
            .get_host_address(MemoryRegionAddress(offset))
            .map_err(|_| Status::INVALID_VALUE)?;
        Ok(Backing::Huge {
            host: host as usize,
            page_size,
        })
    }

    /// A host-to-device or device-to-host copy, rewritten and relayed in
    /// as many requests as bouncing needs.
    fn copy(&self, job: &CopyJob<'_>, segs: &[SgEntry], out: &mut Vec<u8>) -> Result<(), Status> {
        let mem = job.mem;
        let mut pieces = Vec::new();
        let link = &self.link;
        sg::pieces(
            segs,
            &mut |gpa, len| self.resolve(mem, gpa, len),
            &mut |page| {
                // Fault the page in (it is shared, so a read maps the
                // client's page) before asking where it is.
                // SAFETY: `page` is the start of a page inside a mapped
                // client region (resolve checked the range); reading one
                // byte of it is harmless.
                unsafe { std::ptr::read_volatile(page as *const u8) };
                link.phys(page)
            },
            &mut pieces,
        )?;
        let limit = link.bounce_limit() as u64;
        let mut device_ptr = job.body.device_ptr.get();
        let mut status = Status::SUCCESS;
        for chunk in sg::chunks(&pieces, limit, MAX_PIECES) {
            status = self.copy_chunk(job, device_ptr, &chunk)?;
            if status != Status::SUCCESS {
                break;
            }
            device_ptr = device_ptr.wrapping_add(chunk.total());
        }
        response::encode_status(status, job.header.request_id.get(), out);
        Ok(())
    }

    /// One request of a copy, for the part at `device_ptr`; returns the
    /// device's status.
    fn copy_chunk(
        &self,
        job: &CopyJob<'_>,
        device_ptr: u64,
        chunk: &Chunk,
    ) -> Result<Status, Status> {
        let (htod, mem) = (job.htod, job.mem);
        let mut header = job.header;
        let mut flags = header.flags.get();
        if chunk.bounce > 0 {
            if htod {
                // The bounce buffer is reused once the device answers.
                if flags & FLAG_ASYNC != 0 {
                    flags |= FLAG_TRANSIENT_SOURCE;
                }
            } else {
                // The data must be copied out before the client hears back.
                flags &= !FLAG_ASYNC;
            }
        }
        header.flags = flags.into();
        // Buffer layout: bounce bytes, then the request, then the response.
        let bounce_len = chunk.bounce as usize;
        let max_entries: usize = chunk
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Direct { .. } => 1,
                Piece::Bounce { len, .. } => (*len as usize).div_ceil(BLOCK) + 1,
            })
            .sum();
        let req_at = bounce_len.next_multiple_of(64);
        let req_max = std::mem::size_of::<ReqHeader>()
            + std::mem::size_of::<MemcpyHostReq>()
            + max_entries * std::mem::size_of::<SgEntry>();
        let resp_at = (req_at + req_max).next_multiple_of(64);
        let mut buf = self
            .link
            .alloc(resp_at + RESP_HEADER)
            .map_err(|e| self.device_failed(e))?;
        let mut entries: Vec<SgEntry> = Vec::with_capacity(max_entries);
        let mut at = 0usize;
        for piece in &chunk.pieces {
            match *piece {
                Piece::Direct { phys, len } => entries.push(SgEntry {
                    gpa: phys.into(),
                    len: len.into(),
                }),
                Piece::Bounce { len, .. } => {
                    let n = len as usize;
                    dma_entries(&buf, at..at + n, &mut entries)
                        .map_err(|e| self.device_failed(e.into()))?;
                    at += n;
                }
            }
        }
        if htod {
            bounce_in(
                mem,
                &chunk.pieces,
                0..chunk.bounce,
                &mut buf.as_mut_slice()[..bounce_len],
            )?;
        }
        let req_body = MemcpyHostReq {
            device_ptr: device_ptr.into(),
            stream: job.body.stream,
            total_len: chunk.total().into(),
            nsegs: (entries.len() as u32).into(),
            _pad: 0.into(),
        };
        let mut bytes = Vec::with_capacity(req_max);
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(req_body.as_bytes());
        bytes.extend_from_slice(entries.as_bytes());
        buf.as_mut_slice()[req_at..req_at + bytes.len()].copy_from_slice(&bytes);
        let used = self
            .link
            .transact(
                job.queue,
                &buf,
                (req_at, bytes.len()),
                (resp_at, RESP_HEADER),
            )
            .map_err(|e| self.device_failed(e))?;
        let status = if (used as usize) < RESP_HEADER {
            tracing::error!(
                client = self.id,
                used,
                "Device answered a copy without a header"
            );
            Status::UNKNOWN
        } else {
            RespHeader::read_from_bytes(&buf.as_slice()[resp_at..resp_at + RESP_HEADER])
                .map(|h| Status(h.status.get()))
                .unwrap_or(Status::UNKNOWN)
        };
        self.stats.copied(chunk.direct, chunk.bounce);
        if status == Status::SUCCESS && !htod {
            bounce_out(
                mem,
                &chunk.pieces,
                0..chunk.bounce,
                &buf.as_slice()[..bounce_len],
            )?;
        }
        Ok(status)
    }

    /// Closes every session the client still holds (it disconnected).
    /// Returns how many were closed.
    pub fn close(&self) -> usize {
        let sessions = std::mem::take(&mut *lock(&self.sessions));
        let mut closed = 0;
        let mut out = Vec::new();
        for session in sessions {
            let header = ReqHeader {
                opcode: op::SESSION_CLOSE.into(),
                flags: 0.into(),
                session: session.into(),
                request_id: 0.into(),
                context: 0.into(),
            };
            let mut bytes = Vec::new();
            Request::SessionClose.encode(header, &mut bytes);
            let status = self
                .forward(CONTROL_QUEUE, &bytes, RESP_HEADER, &mut out)
                .map(|()| {
                    response::Response::decode(&out)
                        .map(|r| r.status())
                        .unwrap_or(Status::UNKNOWN)
                });
            match status {
                Ok(Status::SUCCESS) => {
                    closed += 1;
                    tracing::info!(
                        client = self.id,
                        session,
                        "Closed the session of a departed client"
                    );
                }
                Ok(s) => {
                    tracing::warn!(client = self.id, session, status = %s, "Device refused to close a session")
                }
                Err(s) => {
                    tracing::warn!(client = self.id, session, status = %s, "Cannot close a session")
                }
            }
        }
        closed
    }
}

/// Appends the device-visible entries of `range` of `buf`.
fn dma_entries(
    buf: &DmaBuf,
    range: Range<usize>,
    entries: &mut Vec<SgEntry>,
) -> Result<(), DmaError> {
    let mut phys = Vec::new();
    buf.segments(range.start, range.len(), &mut phys)?;
    entries.extend(phys.iter().map(|&(p, l)| SgEntry {
        gpa: p.into(),
        len: l.into(),
    }));
    Ok(())
}

/// Fills `range` of a bounce buffer (`area`, where the bounced pieces lie
/// end to end) from the client's memory.
fn bounce_in(
    mem: &GuestMemoryMmap,
    pieces: &[Piece],
    range: Range<u64>,
    area: &mut [u8],
) -> Result<(), Status> {
    for (gpa, at, len) in sg::bounced_parts(pieces, range) {
        let dst = area
            .get_mut(at as usize..(at + len) as usize)
            .ok_or(Status::INVALID_VALUE)?;
        mem.read_slice(dst, GuestAddress(gpa))
            .map_err(|_| Status::INVALID_VALUE)?;
    }
    Ok(())
}

/// Copies `range` of a bounce buffer (`area`, where the bounced pieces lie
/// end to end) back into the client's memory.
fn bounce_out(
    mem: &GuestMemoryMmap,
    pieces: &[Piece],
    range: Range<u64>,
    area: &[u8],
) -> Result<(), Status> {
    for (gpa, at, len) in sg::bounced_parts(pieces, range) {
        let src = area
            .get(at as usize..(at + len) as usize)
            .ok_or(Status::INVALID_VALUE)?;
        mem.write_slice(src, GuestAddress(gpa))
            .map_err(|_| Status::INVALID_VALUE)?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "forward_tests.rs"]
mod tests;
