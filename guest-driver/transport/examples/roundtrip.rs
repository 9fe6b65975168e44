//! Smoke test against a running backend:
//! `vgpu-backend --socket /tmp/x.sock --device emulated` then
//! `VGPU_SOCKET=/tmp/x.sock cargo run -p vgpu-transport --example roundtrip`.
//!
//! Runs GET_DEVICE_INFO, SESSION_OPEN, CTX_CREATE, MEM_ALLOC, a pageable
//! HtoD/DtoH through staging, a pinned HtoD/DtoH, an async HtoD burst,
//! MEM_FREE and SESSION_CLOSE, checking every answer; prints the stats.

use std::process::ExitCode;
use std::time::Instant;

use vgpu_spec::request::header;
use vgpu_spec::wire::*;
use vgpu_spec::{Request, Status, CONTROL_QUEUE, SUBMISSION_QUEUE};
use vgpu_transport::{Device, Options, TransportError};
use zerocopy::FromBytes;

enum Failure {
    Transport(TransportError),
    Status(&'static str, Status),
    Check(String),
}

impl From<TransportError> for Failure {
    fn from(e: TransportError) -> Self {
        Failure::Transport(e)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Transport(e) => write!(f, "{e} ({:?})", e.status()),
            Failure::Status(what, s) => write!(f, "{what} answered {s}"),
            Failure::Check(what) => f.write_str(what),
        }
    }
}

fn ok(what: &'static str, s: Status) -> Result<(), Failure> {
    if s.is_success() {
        Ok(())
    } else {
        Err(Failure::Status(what, s))
    }
}

fn handle(body: &[u8]) -> Result<u64, Failure> {
    HandleResp::read_from_prefix(body)
        .map(|(h, _)| h.handle.get())
        .map_err(|_| Failure::Check(format!("Handle response of {} bytes", body.len())))
}

fn copy(
    dptr: u64,
    gpa: u64,
    len: usize,
    flags: u32,
    session: u64,
    ctx: u64,
) -> (ReqHeader, MemcpyHostReq, [SgEntry; 1]) {
    let seg = SgEntry {
        gpa: gpa.into(),
        len: (len as u64).into(),
    };
    let r = MemcpyHostReq {
        device_ptr: dptr.into(),
        stream: 0.into(),
        total_len: (len as u64).into(),
        nsegs: 1.into(),
        _pad: 0.into(),
    };
    (header(session, ctx, 0, flags), r, [seg])
}

fn run() -> Result<(), Failure> {
    let opts = Options::from_env();
    let dev = Device::connect(&opts)?;
    println!(
        "connected: {} ({} MiB limit)",
        dev.config().device_name(),
        dev.config().memory_limit.get() >> 20
    );
    let mut body = Vec::new();
    ok(
        "GET_DEVICE_INFO",
        dev.call(
            CONTROL_QUEUE,
            header(0, 0, 0, 0),
            &Request::GetDeviceInfo,
            &mut body,
        )?,
    )?;
    let (info, attrs) = DeviceInfoResp::read_from_prefix(&body)
        .map_err(|_| Failure::Check("device info truncated".into()))?;
    println!(
        "device info: total {} MiB, driver {}, {} attributes ({} bytes)",
        info.total_mem.get() >> 20,
        info.driver_version.get(),
        info.attr_count.get(),
        attrs.len()
    );
    let open = SessionOpenReq {
        pid: std::process::id().into(),
        version: vgpu_spec::PROTOCOL_VERSION.into(),
    };
    ok(
        "SESSION_OPEN",
        dev.call(
            CONTROL_QUEUE,
            header(0, 0, 0, 0),
            &Request::SessionOpen(open),
            &mut body,
        )?,
    )?;
    let session = handle(&body)?;
    ok(
        "CTX_CREATE",
        dev.call(
            SUBMISSION_QUEUE,
            header(session, 0, 0, 0),
            &Request::CtxCreate(CtxCreateReq::default()),
            &mut body,
        )?,
    )?;
    let ctx = handle(&body)?;
    let n = 1 << 20;
    ok(
        "MEM_ALLOC",
        dev.call(
            SUBMISSION_QUEUE,
            header(session, ctx, 0, 0),
            &Request::MemAlloc(MemAllocReq {
                size: (n as u64).into(),
            }),
            &mut body,
        )?,
    )?;
    let dptr = handle(&body)?;
    println!("session {session} context {ctx} dptr {dptr:#x}");

    // Pageable HtoD / DtoH through staging.
    let mut src = dev.staging(n)?;
    for (i, b) in src.as_mut_slice().iter_mut().enumerate() {
        *b = (i % 253) as u8;
    }
    let (h, r, s) = copy(dptr, src.gpa(), n, FLAG_TRANSIENT_SOURCE, session, ctx);
    ok(
        "MEMCPY_HTOD",
        dev.call(SUBMISSION_QUEUE, h, &Request::MemcpyHtoD(r, &s), &mut body)?,
    )?;
    drop(src);
    let dst = dev.staging(n)?;
    let (h, r, s) = copy(dptr, dst.gpa(), n, 0, session, ctx);
    ok(
        "MEMCPY_DTOH",
        dev.call(SUBMISSION_QUEUE, h, &Request::MemcpyDtoH(r, &s), &mut body)?,
    )?;
    if !dst
        .as_slice()
        .iter()
        .enumerate()
        .all(|(i, b)| *b == (i % 253) as u8)
    {
        return Err(Failure::Check(
            "staging DtoH returned different bytes".into(),
        ));
    }
    drop(dst);
    println!("staging HtoD/DtoH of {n} bytes: ok");

    // Pinned (zero-copy) HtoD / DtoH.
    let p = dev.alloc_pinned(n)?;
    // SAFETY: `p` is a fresh pinned mapping of `n` bytes.
    let host = unsafe { std::slice::from_raw_parts_mut(p, n) };
    host.fill(0x3c);
    let gpa = dev
        .translate(p, n)
        .ok_or_else(|| Failure::Check("pinned memory does not translate".into()))?;
    let (h, r, s) = copy(dptr, gpa, n, 0, session, ctx);
    ok(
        "MEMCPY_HTOD pinned",
        dev.call(SUBMISSION_QUEUE, h, &Request::MemcpyHtoD(r, &s), &mut body)?,
    )?;
    host.fill(0);
    let (h, r, s) = copy(dptr, gpa, n, 0, session, ctx);
    ok(
        "MEMCPY_DTOH pinned",
        dev.call(SUBMISSION_QUEUE, h, &Request::MemcpyDtoH(r, &s), &mut body)?,
    )?;
    if !host.iter().all(|b| *b == 0x3c) {
        return Err(Failure::Check(
            "pinned DtoH returned different bytes".into(),
        ));
    }
    dev.free_pinned(p)?;
    println!("pinned HtoD/DtoH of {n} bytes at gpa {gpa:#x}: ok");

    // An async burst of small transient copies, then a sync point.
    let start = Instant::now();
    let burst = 2000;
    for i in 0..burst {
        let mut st = dev.staging(256)?;
        st.as_mut_slice().fill(i as u8);
        let (h, r, s) = copy(
            dptr,
            st.gpa(),
            256,
            FLAG_ASYNC | FLAG_TRANSIENT_SOURCE,
            session,
            ctx,
        );
        dev.submit(SUBMISSION_QUEUE, h, &Request::MemcpyHtoD(r, &s), Some(st))?;
    }
    dev.flush()?;
    ok(
        "CTX_SYNCHRONIZE",
        dev.call(
            SUBMISSION_QUEUE,
            header(session, ctx, 0, 0),
            &Request::CtxSynchronize,
            &mut body,
        )?,
    )?;
    if let Some(s) = dev.take_async_error() {
        return Err(Failure::Status("async HtoD", s));
    }
    println!("{burst} async HtoD + sync in {:?}", start.elapsed());

    let start = Instant::now();
    let calls = 2000;
    for _ in 0..calls {
        ok(
            "MEM_GET_INFO",
            dev.call(
                SUBMISSION_QUEUE,
                header(session, ctx, 0, 0),
                &Request::MemGetInfo,
                &mut body,
            )?,
        )?;
    }
    println!("sync MEM_GET_INFO: {:?} per call", start.elapsed() / calls);

    ok(
        "MEM_FREE",
        dev.call(
            SUBMISSION_QUEUE,
            header(session, ctx, 0, 0),
            &Request::MemFree(HandleReq {
                handle: dptr.into(),
            }),
            &mut body,
        )?,
    )?;
    ok(
        "SESSION_CLOSE",
        dev.call(
            CONTROL_QUEUE,
            header(session, 0, 0, 0),
            &Request::SessionClose,
            &mut body,
        )?,
    )?;
    println!("stats: {:?}", dev.stats());
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("roundtrip: ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("roundtrip failed: {e}");
            ExitCode::FAILURE
        }
    }
}
