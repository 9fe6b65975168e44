use super::*;
use crate::dma::HUGE_PAGE;
use crate::testutil::{request, FakeLink};
use vgpu_spec::wire::{CtxCreateReq, LinkReq, LinkResp, SessionOpenReq};
use vgpu_spec::Response;

const PLAIN_GPA: u64 = 0x4000_0000;
const HUGE_GPA: u64 = 0x10_0000_0000;

/// Client memory: 1 MiB of plain memory and 4 MiB the classifier calls
/// huge pages (identity "physical" addresses make the fake reach both).
fn client_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(PLAIN_GPA), 1 << 20),
        (GuestAddress(HUGE_GPA), 2 * HUGE_PAGE),
    ])
    .unwrap()
}

/// The "huge" region gets 4 KiB pages: its anonymous mapping is only
/// page-aligned (the real classifier checks alignment to the page size).
fn classify() -> Arc<Classifier> {
    Arc::new(|r: &GuestRegionMmap<()>| (r.start_addr().0 >= HUGE_GPA).then_some(4096))
}

fn client(link: &Arc<FakeLink>, stats: &Arc<Stats>) -> Client<FakeLink> {
    Client::new(1, Arc::clone(link), Arc::clone(stats), classify())
}

fn status_of(out: &[u8]) -> Status {
    Response::decode(out).unwrap().status()
}

/// Opens a session through `c`; returns its id.
fn open<L: DeviceLink + ?Sized>(c: &Client<L>, mem: &GuestMemoryMmap) -> u64 {
    let req = request(
        &Request::SessionOpen(SessionOpenReq {
            pid: 1.into(),
            version: 1.into(),
        }),
        0,
        0,
        1,
    );
    let mut out = Vec::new();
    c.handle(0, &req, 256, mem, &mut out);
    assert_eq!(status_of(&out), Status::SUCCESS);
    SessionOpenResp::read_from_prefix(&out[16..])
        .unwrap()
        .0
        .session
        .get()
}

fn sg_entries(segs: &[(u64, u64)]) -> Vec<SgEntry> {
    segs.iter()
        .map(|&(gpa, len)| SgEntry {
            gpa: gpa.into(),
            len: len.into(),
        })
        .collect()
}

fn copy_req(htod: bool, dptr: u64, segs: &[(u64, u64)], session: u64, flags: u32) -> Vec<u8> {
    let entries = sg_entries(segs);
    let body = MemcpyHostReq {
        device_ptr: dptr.into(),
        stream: 0.into(),
        total_len: segs.iter().map(|s| s.1).sum::<u64>().into(),
        nsegs: (entries.len() as u32).into(),
        _pad: 0.into(),
    };
    let req = if htod {
        Request::MemcpyHtoD(body, &entries)
    } else {
        Request::MemcpyDtoH(body, &entries)
    };
    request(&req, session, flags, 9)
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + 3) as u8).collect()
}

fn device_bytes(link: &FakeLink, dptr: u64, n: usize) -> Vec<u8> {
    let s = link.state.lock().unwrap();
    (0..n as u64)
        .map(|i| s.memory.get(&(dptr + i)).copied().unwrap_or(0))
        .collect()
}

#[test]
fn htod_from_huge_page_memory_passes_physical_addresses_without_bouncing() {
    let (link, stats, mem) = (
        FakeLink::new(64, 8192),
        Arc::new(Stats::default()),
        client_mem(),
    );
    let c = client(&link, &stats);
    let s = open(&c, &mem);
    let data = pattern(10_000);
    let gpa = HUGE_GPA + 100;
    mem.write_slice(&data, GuestAddress(gpa)).unwrap();
    let mut out = Vec::new();
    c.handle(
        1,
        &copy_req(true, 0x5000, &[(gpa, 10_000)], s, FLAG_ASYNC),
        16,
        &mem,
        &mut out,
    );
    assert_eq!(status_of(&out), Status::SUCCESS);
    assert_eq!(device_bytes(&link, 0x5000, 10_000), data);
    let seen = link.state.lock().unwrap().copies.clone();
    assert_eq!(seen.len(), 1, "one request, no chunking");
    let host = mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
    assert_eq!(seen[0].entries, [(host, 10_000)]);
    // Zero-copy async HtoD keeps its flags: the device may read it later.
    assert_eq!(seen[0].flags, FLAG_ASYNC);
    let snap = stats.snapshot();
    assert_eq!((snap.zero_copy_bytes, snap.bounced_bytes), (10_000, 0));
    assert_eq!(
        link.heap_used(),
        0,
        "every DMA buffer went back to the heap"
    );
}

#[test]
fn htod_from_plain_memory_is_bounced_in_chunks_within_the_limit() {
    let (link, stats, mem) = (
        FakeLink::new(64, 8192),
        Arc::new(Stats::default()),
        client_mem(),
    );
    let c = client(&link, &stats);
    let s = open(&c, &mem);
    let data = pattern(20_000);
    mem.write_slice(&data, GuestAddress(PLAIN_GPA + 8)).unwrap();
    let mut out = Vec::new();
    let req = copy_req(true, 0x9000, &[(PLAIN_GPA + 8, 20_000)], s, FLAG_ASYNC);
    c.handle(1, &req, 16, &mem, &mut out);
    assert_eq!(status_of(&out), Status::SUCCESS);
    assert_eq!(device_bytes(&link, 0x9000, 20_000), data);
    let seen = link.state.lock().unwrap().copies.clone();
    assert_eq!(
        seen.iter().map(|c| c.device_ptr).collect::<Vec<_>>(),
        [0x9000, 0x9000 + 8192, 0x9000 + 16384]
    );
    for copy in &seen {
        // The bounce buffer is reused as soon as the device answers.
        assert_eq!(copy.flags, FLAG_ASYNC | FLAG_TRANSIENT_SOURCE);
        // Entries point into the DMA heap, not at the client's memory.
        let plain = mem.get_host_address(GuestAddress(PLAIN_GPA)).unwrap() as u64;
        assert!(copy
            .entries
            .iter()
            .all(|(p, _)| !(plain..plain + (1 << 20)).contains(p)));
    }
    let snap = stats.snapshot();
    assert_eq!((snap.zero_copy_bytes, snap.bounced_bytes), (0, 20_000));
}

#[test]
fn mixed_copy_passes_huge_pieces_directly_and_bounces_the_rest() {
    let (link, stats, mem) = (
        FakeLink::new(64, 1 << 20),
        Arc::new(Stats::default()),
        client_mem(),
    );
    let c = client(&link, &stats);
    let s = open(&c, &mem);
    let (a, b) = (pattern(3000), pattern(5000));
    mem.write_slice(&a, GuestAddress(PLAIN_GPA)).unwrap();
    mem.write_slice(&b, GuestAddress(HUGE_GPA + HUGE_PAGE as u64 - 1000))
        .unwrap();
    let mut out = Vec::new();
    let segs = [
        (PLAIN_GPA, 3000),
        (HUGE_GPA + HUGE_PAGE as u64 - 1000, 5000),
    ];
    c.handle(1, &copy_req(true, 0, &segs, s, 0), 16, &mem, &mut out);
    assert_eq!(status_of(&out), Status::SUCCESS);
    assert_eq!(device_bytes(&link, 0, 3000), a);
    assert_eq!(device_bytes(&link, 3000, 5000), b);
    let snap = stats.snapshot();
    assert_eq!((snap.zero_copy_bytes, snap.bounced_bytes), (5000, 3000));
    // A synchronous copy stays synchronous and gets no extra flag.
    assert_eq!(link.state.lock().unwrap().copies[0].flags, 0);
}

#[test]
fn async_dtoh_into_plain_memory_becomes_synchronous_and_is_copied_out() {
    let (link, stats, mem) = (
        FakeLink::new(64, 8192),
        Arc::new(Stats::default()),
        client_mem(),
    );
    let c = client(&link, &stats);
    let s = open(&c, &mem);
    let data = pattern(12_000);
    {
        let mut st = link.state.lock().unwrap();
        for (i, b) in data.iter().enumerate() {
            st.memory.insert(0x700 + i as u64, *b);
        }
    }
    let mut out = Vec::new();
    let req = copy_req(false, 0x700, &[(PLAIN_GPA + 4096, 12_000)], s, FLAG_ASYNC);
    c.handle(1, &req, 16, &mem, &mut out);
    assert_eq!(status_of(&out), Status::SUCCESS);
    let mut back = vec![0u8; 12_000];
    mem.read_slice(&mut back, GuestAddress(PLAIN_GPA + 4096))
        .unwrap();
    assert_eq!(back, data);
    let seen = link.state.lock().unwrap().copies.clone();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|c| c.flags & FLAG_ASYNC == 0));
    assert_eq!(stats.snapshot().bounced_bytes, 12_000);
}

#[test]
fn async_dtoh_into_huge_page_memory_stays_asynchronous() {
    let (link, stats, mem) = (
        FakeLink::new(64, 8192),
        Arc::new(Stats::default()),
        client_mem(),
    );
    let c = client(&link, &stats);
    let s = open(&c, &mem);
    link.state.lock().unwrap().memory.insert(0x10, 0xab);
    let mut out = Vec::new();
    c.handle(
        1,
        &copy_req(false, 0x10, &[(HUGE_GPA, 1)], s, FLAG_ASYNC),
        16,
        &mem,
        &mut out,
    );
    assert_eq!(status_of(&out), Status::SUCCESS);
    assert_eq!(link.state.lock().unwrap().copies[0].flags, FLAG_ASYNC);
    let mut b = [0u8];
    mem.read_slice(&mut b, GuestAddress(HUGE_GPA)).unwrap();
    assert_eq!(b[0], 0xab);
    assert_eq!(stats.snapshot().zero_copy_bytes, 1);
}

#[test]
fn failing_chunk_stops_the_copy_and_its_status_is_answered() {
    let (link, stats, mem) = (
        FakeLink::new(64, 4096),
        Arc::new(Stats::default()),
        client_mem(),
    );
    let c = client(&link, &stats);
    let s = open(&c, &mem);
    link.state.lock().unwrap().fail_at = Some(0x1000 + 4096);
    let mut out = Vec::new();
    c.handle(
        1,
        &copy_req(true, 0x1000, &[(PLAIN_GPA, 3 * 4096)], s, 0),
        16,
        &mem,
        &mut out,
    );
    assert_eq!(status_of(&out), Status::INVALID_VALUE);
    assert_eq!(Response::decode(&out).unwrap().header.request_id.get(), 9);
    assert_eq!(
        link.state.lock().unwrap().copies.len(),
        2,
        "the third chunk is not sent"
    );
}

#[test]
fn range_outside_client_memory_is_refused_without_reaching_the_device() {
    let (link, stats, mem) = (
        FakeLink::new(64, 4096),
        Arc::new(Stats::default()),
        client_mem(),
    );
    let c = client(&link, &stats);
    let s = open(&c, &mem);
    let mut out = Vec::new();
    // Runs past the end of the plain region.
    let req = copy_req(true, 0, &[(PLAIN_GPA + (1 << 20) - 10, 20)], s, 0);
    c.handle(1, &req, 16, &mem, &mut out);
    assert_eq!(status_of(&out), Status::INVALID_VALUE);
    assert!(link.state.lock().unwrap().copies.is_empty());
}

#[test]
fn request_naming_another_clients_session_is_rejected() {
    let (link, stats, mem) = (
        FakeLink::new(64, 4096),
        Arc::new(Stats::default()),
        client_mem(),
    );
    let a = client(&link, &stats);
    let b = Client::new(2, Arc::clone(&link), Arc::clone(&stats), classify());
    let session = open(&a, &mem);
    let ctx = Request::CtxCreate(CtxCreateReq {
        flags: 0.into(),
        _pad: 0.into(),
    });
    let mut out = Vec::new();
    b.handle(1, &request(&ctx, session, 0, 5), 64, &mem, &mut out);
    assert_eq!(status_of(&out), Status::INVALID_HANDLE);
    b.handle(
        0,
        &request(&Request::SessionClose, session, 0, 6),
        64,
        &mem,
        &mut out,
    );
    assert_eq!(status_of(&out), Status::INVALID_HANDLE);
    assert_eq!(
        link.state.lock().unwrap().opcodes,
        [op::SESSION_OPEN],
        "nothing of b's reached the device"
    );
    a.handle(1, &request(&ctx, session, 0, 7), 64, &mem, &mut out);
    assert_eq!(status_of(&out), Status::SUCCESS);
}

#[test]
fn undecodable_requests_are_answered_as_the_device_would() {
    let (link, stats, mem) = (
        FakeLink::new(8, 4096),
        Arc::new(Stats::default()),
        client_mem(),
    );
    let c = client(&link, &stats);
    let mut out = Vec::new();
    c.handle(1, &[1, 2, 3], 64, &mem, &mut out);
    assert_eq!(status_of(&out), Status::INVALID_VALUE);
    let mut unknown = request(&Request::CtxSynchronize, 0, 0, 3);
    unknown[..4].copy_from_slice(&0x7777u32.to_le_bytes());
    c.handle(1, &unknown, 64, &mem, &mut out);
    assert_eq!(status_of(&out), Status::NOT_SUPPORTED);
    assert_eq!(Response::decode(&out).unwrap().header.request_id.get(), 3);
    assert!(link.state.lock().unwrap().opcodes.is_empty());
}

#[test]
fn closing_a_departed_client_closes_the_sessions_it_still_held() {
    let (link, stats, mem) = (
        FakeLink::new(8, 4096),
        Arc::new(Stats::default()),
        client_mem(),
    );
    let c = client(&link, &stats);
    let (s1, s2, s3) = (open(&c, &mem), open(&c, &mem), open(&c, &mem));
    let mut out = Vec::new();
    c.handle(
        0,
        &request(&Request::SessionClose, s2, 0, 4),
        64,
        &mem,
        &mut out,
    );
    assert_eq!(status_of(&out), Status::SUCCESS);
    assert_eq!(c.sessions(), [s1, s3]);
    assert_eq!(c.close(), 2);
    assert!(c.sessions().is_empty());
    let st = link.state.lock().unwrap();
    assert_eq!(st.closed, [s2, s1, s3]);
    assert!(st.open.is_empty());
}

#[test]
fn hugetlb_memfd_regions_are_recognised_and_plain_ones_are_not() {
    use std::os::fd::FromRawFd;
    use vm_memory::{FileOffset, MmapRegion};
    let region = |flags: libc::c_uint| -> Option<GuestRegionMmap<()>> {
        // SAFETY: a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"vgpu-test".as_ptr(), flags) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd owned here.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(HUGE_PAGE as u64).unwrap();
        let mmap = MmapRegion::from_file(FileOffset::new(file, 0), HUGE_PAGE).ok()?;
        GuestRegionMmap::new(mmap, GuestAddress(0))
    };
    let plain = region(libc::MFD_CLOEXEC).unwrap();
    assert_eq!(hugetlb_page_size(&plain), None);
    // Hosts without free huge pages cannot map the hugetlb one.
    if let Some(huge) = region(libc::MFD_CLOEXEC | libc::MFD_HUGETLB) {
        assert_eq!(hugetlb_page_size(&huge), Some(HUGE_PAGE));
    }
    let anon = client_mem();
    assert_eq!(hugetlb_page_size(anon.iter().next().unwrap()), None);
}

/// What the fake linker writes and answers.
struct LinkScript {
    status: Status,
    info: &'static [u8],
    error: &'static [u8],
    image: Vec<u8>,
}

/// What the fake saw of one link request.
#[derive(Debug, Clone)]
struct SeenLink {
    flags: u32,
    out_len: u64,
    entries: Vec<(u64, u64)>,
}

/// A device that links: `MODULE_LINK` is answered here, writing the
/// script's logs and image where the request's entries point ("physical"
/// addresses are pointers, as for [`FakeLink`]); everything else goes to
/// the [`FakeLink`].
struct LinkingDevice {
    inner: Arc<FakeLink>,
    script: LinkScript,
    seen: Mutex<Vec<SeenLink>>,
    /// Every DMA buffer handed out: (address, length).
    bufs: Mutex<Vec<(u64, u64)>>,
}

impl LinkScript {
    /// A link that succeeds with no logs and an empty image.
    fn quiet() -> LinkScript {
        LinkScript {
            status: Status::SUCCESS,
            info: b"",
            error: b"",
            image: Vec::new(),
        }
    }
}

/// A linking device with a heap of `heap_blocks` blocks, a client of it
/// with the usual client memory, and a session the client opened.
fn linking(
    heap_blocks: usize,
    script: LinkScript,
) -> (
    Arc<LinkingDevice>,
    Client<LinkingDevice>,
    GuestMemoryMmap,
    u64,
) {
    let dev = Arc::new(LinkingDevice {
        inner: FakeLink::new(heap_blocks, 8192),
        script,
        seen: Mutex::new(Vec::new()),
        bufs: Mutex::new(Vec::new()),
    });
    let mem = client_mem();
    let c = Client::new(1, Arc::clone(&dev), Arc::new(Stats::default()), classify());
    let s = open(&c, &mem);
    (dev, c, mem, s)
}

impl LinkingDevice {
    /// Writes `bytes` at `offset` of the buffer the entries make up.
    fn write_out(entries: &[SgEntry], mut offset: u64, bytes: &[u8]) {
        let mut bytes = bytes;
        for e in entries {
            let len = e.len.get();
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = bytes.len().min((len - offset) as usize);
            let p = (e.gpa.get() + offset) as usize as *mut u8;
            // SAFETY: "physical" addresses are pointers into this process
            // (the identity-mapped DMA heap), and the entry covers `n` bytes
            // from `offset`.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, n) };
            bytes = &bytes[n..];
            offset = 0;
            if bytes.is_empty() {
                return;
            }
        }
        assert!(bytes.is_empty(), "write past the output buffer");
    }

    fn link(&self, header: &ReqHeader, req: &LinkReq, segs: &[SgEntry], out: &mut Vec<u8>) {
        self.seen.lock().unwrap().push(SeenLink {
            flags: header.flags.get(),
            out_len: req.out_len.get(),
            entries: segs.iter().map(|e| (e.gpa.get(), e.len.get())).collect(),
        });
        let sc = &self.script;
        let (info_area, error_area) = (req.info_log_len.get(), req.error_log_len.get());
        for (at, area, text) in [(0, info_area, sc.info), (info_area, error_area, sc.error)] {
            if area > 0 {
                let mut log = vgpu_spec::link::fit_log(text, area as usize).to_vec();
                log.push(0);
                Self::write_out(segs, at.into(), &log);
            }
        }
        let id = header.request_id.get();
        if sc.status != Status::SUCCESS {
            return response::encode_status(sc.status, id, out);
        }
        let image_len = sc.image.len() as u64;
        if image_len <= vgpu_spec::link::image_capacity(req) {
            Self::write_out(segs, vgpu_spec::link::image_offset(req), &sc.image);
        }
        let resp = LinkResp {
            image_len: image_len.into(),
            ..LinkResp::default()
        };
        response::encode(Status::SUCCESS, id, &resp, &[], out);
    }

    /// Whether `[p, p + len)` lies inside a DMA buffer the relay was given.
    fn in_dma(&self, p: u64, len: u64) -> bool {
        self.bufs
            .lock()
            .unwrap()
            .iter()
            .any(|&(start, n)| p >= start && p + len <= start + n)
    }
}

impl DeviceLink for LinkingDevice {
    fn config(&self) -> vgpu_spec::VgpuConfig {
        self.inner.config()
    }

    fn alloc(&self, len: usize) -> Result<DmaBuf, DeviceError> {
        let buf = self.inner.alloc(len)?;
        self.bufs
            .lock()
            .unwrap()
            .push((buf.raw_ptr() as u64, buf.len() as u64));
        Ok(buf)
    }

    fn transact(
        &self,
        queue: u16,
        buf: &DmaBuf,
        req: (usize, usize),
        resp: (usize, usize),
    ) -> Result<u32, DeviceError> {
        let bytes = &buf.as_slice()[req.0..req.0 + req.1];
        let Ok((header, Request::ModuleLink(body, parts))) = Request::decode(bytes) else {
            return self.inner.transact(queue, buf, req, resp);
        };
        let mut out = Vec::new();
        self.link(&header, &body, parts.segs, &mut out);
        let n = out.len().min(resp.1);
        assert!(resp.0 + n <= buf.len());
        // SAFETY: the response area lies inside the buffer (checked), which
        // the relay does not look at until this returns (the device's DMA).
        unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), buf.raw_ptr().add(resp.0), n) };
        Ok(n as u32)
    }

    fn phys(&self, vaddr: usize) -> Result<u64, DmaError> {
        self.inner.phys(vaddr)
    }

    fn bounce_limit(&self) -> usize {
        self.inner.bounce_limit()
    }
}

/// A link of one PTX input whose output buffer is `segs`, with log areas
/// of `info` and `error` bytes.
fn link_req(segs: &[(u64, u64)], info: u32, error: u32, session: u64, flags: u32) -> Vec<u8> {
    const PTX: &[u8] = b".version 7.0\n.target sm_75\n.address_size 64\n\0";
    let entries = sg_entries(segs);
    let inputs = [vgpu_spec::wire::LinkInput {
        kind: vgpu_spec::wire::jit_input::PTX.into(),
        name_len: 0.into(),
        data_len: (PTX.len() as u64).into(),
    }];
    let req = LinkReq {
        input_count: 1.into(),
        option_count: 0.into(),
        data_len: (PTX.len() as u64).into(),
        out_len: segs.iter().map(|s| s.1).sum::<u64>().into(),
        info_log_len: info.into(),
        error_log_len: error.into(),
        nsegs: (entries.len() as u32).into(),
        _pad: 0.into(),
    };
    let parts = vgpu_spec::link::LinkParts {
        options: &[],
        inputs: &inputs,
        segs: &entries,
        data: PTX,
    };
    request(&Request::ModuleLink(req, parts), session, flags, 11)
}

/// The client's output buffer: `segs` read back, concatenated.
fn client_bytes(mem: &GuestMemoryMmap, segs: &[(u64, u64)]) -> Vec<u8> {
    let mut all = Vec::new();
    for &(gpa, len) in segs {
        let mut part = vec![0u8; len as usize];
        mem.read_slice(&mut part, GuestAddress(gpa)).unwrap();
        all.extend_from_slice(&part);
    }
    all
}

/// Fills the client's output buffer with a marker byte.
fn fill_client(mem: &GuestMemoryMmap, segs: &[(u64, u64)], byte: u8) {
    for &(gpa, len) in segs {
        mem.write_slice(&vec![byte; len as usize], GuestAddress(gpa))
            .unwrap();
    }
}

/// Output buffer in two pieces of plain client memory: 300 bytes, then
/// 5000 (the logs and the image cross from one to the other).
const LINK_SEGS: [(u64, u64); 2] = [(PLAIN_GPA + 0x1000, 300), (PLAIN_GPA + 0x8000, 5000)];

#[test]
fn link_output_in_plain_memory_is_bounced_and_logs_and_image_reach_the_client() {
    let image = pattern(1000);
    let (dev, c, mem, s) = linking(
        64,
        LinkScript {
            info: b"linked fine",
            image: image.clone(),
            ..LinkScript::quiet()
        },
    );
    fill_client(&mem, &LINK_SEGS, 0xee);
    let mut out = Vec::new();
    let req = link_req(&LINK_SEGS, 256, 128, s, FLAG_ASYNC);
    c.handle(1, &req, 64, &mem, &mut out);

    let resp = Response::decode(&out).unwrap();
    assert_eq!(resp.status(), Status::SUCCESS);
    assert_eq!(resp.header.request_id.get(), 11);
    assert_eq!(resp.fixed::<LinkResp>().unwrap().0.image_len.get(), 1000);
    let seen = dev.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].out_len, 5300);
    assert_eq!(seen[0].entries.iter().map(|e| e.1).sum::<u64>(), 5300);
    // The link is synchronous: the output is copied out before the answer.
    assert_eq!(seen[0].flags & FLAG_ASYNC, 0);
    let plain = mem.get_host_address(GuestAddress(PLAIN_GPA)).unwrap() as u64;
    for &(p, len) in &seen[0].entries {
        assert!(dev.in_dma(p, len), "entry {p:#x}+{len} is not DMA memory");
        assert!(!(plain..plain + (1 << 20)).contains(&p));
        assert!(!LINK_SEGS.iter().any(|&(gpa, _)| gpa == p));
    }

    let back = client_bytes(&mem, &LINK_SEGS);
    assert_eq!(&back[..12], b"linked fine\0");
    assert_eq!(back[256], 0, "empty error log is a lone NUL");
    assert_eq!(&back[384..1384], &image[..]);
    assert!(
        back[1384..].iter().all(|b| *b == 0xee),
        "bytes past the image are the client's own"
    );
    assert_eq!(dev.inner.heap_used(), 0, "the bounce buffer went back");
}

#[test]
fn link_failure_still_delivers_the_error_log_to_the_client() {
    let (dev, c, mem, s) = linking(
        64,
        LinkScript {
            status: Status::INVALID_PTX,
            error: b"ptxas fatal: syntax error at line 3",
            image: pattern(64),
            ..LinkScript::quiet()
        },
    );
    fill_client(&mem, &LINK_SEGS, 0xee);
    let mut out = Vec::new();
    // The error log area (200..500) starts in the first piece and ends in
    // the second.
    c.handle(1, &link_req(&LINK_SEGS, 200, 300, s, 0), 64, &mem, &mut out);

    assert_eq!(status_of(&out), Status::INVALID_PTX);
    let back = client_bytes(&mem, &LINK_SEGS);
    assert_eq!(back[0], 0);
    assert_eq!(
        vgpu_spec::link::read_log(&back[200..500]),
        b"ptxas fatal: syntax error at line 3"
    );
    assert!(
        back[500..].iter().all(|b| *b == 0xee),
        "no image is delivered with a failure"
    );
    assert_eq!(dev.seen.lock().unwrap().len(), 1);
    assert_eq!(dev.inner.heap_used(), 0);
}

#[test]
fn link_output_outside_client_memory_is_refused_without_reaching_the_device() {
    let (dev, c, mem, s) = linking(64, LinkScript::quiet());
    let mut out = Vec::new();
    // The second piece runs past the end of the plain region.
    let segs = [(PLAIN_GPA, 4096), (PLAIN_GPA + (1 << 20) - 100, 200)];
    c.handle(1, &link_req(&segs, 64, 64, s, 0), 64, &mem, &mut out);
    assert_eq!(status_of(&out), Status::INVALID_VALUE);
    // A client address that is no memory of the client at all.
    c.handle(
        1,
        &link_req(&[(0x9999_0000, 256)], 64, 64, s, 0),
        64,
        &mem,
        &mut out,
    );
    assert_eq!(status_of(&out), Status::INVALID_VALUE);
    assert!(dev.seen.lock().unwrap().is_empty());
    assert_eq!(dev.inner.state.lock().unwrap().opcodes, [op::SESSION_OPEN]);
    assert_eq!(dev.inner.heap_used(), 0);
}

#[test]
fn link_output_larger_than_the_dma_heap_is_answered_out_of_memory() {
    let (dev, c, mem, s) = linking(16, LinkScript::quiet());
    let mut out = Vec::new();
    // 128 KiB of output; the heap holds 64 KiB.
    c.handle(
        1,
        &link_req(&[(PLAIN_GPA, 128 << 10)], 64, 64, s, 0),
        64,
        &mem,
        &mut out,
    );
    assert_eq!(status_of(&out), Status::OUT_OF_MEMORY);
    assert!(dev.seen.lock().unwrap().is_empty());
}
