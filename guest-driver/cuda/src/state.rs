//! The process-wide driver state: the transport, the session, the device
//! information fetched at `cuInit`, and the tables of what the application
//! created. It lives in a `OnceLock` that only a successful `cuInit` fills,
//! so every other call made before that returns `CUDA_ERROR_NOT_INITIALIZED`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use thiserror::Error;
use vgpu_spec::request::header;
use vgpu_spec::wire::{DeviceInfoResp, SessionOpenReq, SessionOpenResp};
use vgpu_spec::{Request, Response, Status, VgpuConfig, CONTROL_QUEUE, SUBMISSION_QUEUE};
use vgpu_transport::{Device, Options, Staging, TransportError};
use zerocopy::little_endian::I32;
use zerocopy::{FromBytes, Immutable, KnownLayout};

use crate::ctx::ContextTable;
use crate::ctx_errors::ContextErrors;
use crate::errors::CuResult;
use crate::handles::HandleTable;
use crate::logging;
use crate::module::ModuleTable;

/// Why `cuInit` failed.
#[derive(Debug, Error)]
pub(crate) enum InitError {
    /// The backend socket could not be connected (the message names the
    /// socket and `VGPU_SOCKET`).
    #[error("{0}")]
    Unreachable(TransportError),
    /// The backend was reached but the handshake failed.
    #[error(
        "The vGPU backend at {socket} failed the handshake: {source}. Set VGPU_SOCKET to the \
         socket of a vgpu-backend of this version"
    )]
    Handshake {
        /// The socket path.
        socket: String,
        /// What went wrong.
        source: TransportError,
    },
    /// The device's config space is not one this library understands.
    #[error(
        "The device at {socket} is not a vGPU of protocol version {ours} (magic {magic:#x}, \
         version {version})"
    )]
    BadConfig {
        /// The socket path.
        socket: String,
        /// Our protocol version.
        ours: u32,
        /// The magic found.
        magic: u32,
        /// The version found.
        version: u32,
    },
    /// A control request failed in the transport.
    #[error("The vGPU backend at {socket} failed during {what}: {source}")]
    Transport {
        /// The socket path.
        socket: String,
        /// The request.
        what: &'static str,
        /// What went wrong.
        source: TransportError,
    },
    /// The backend refused a control request.
    #[error("The vGPU backend at {socket} refused {what}: {status}")]
    Refused {
        /// The socket path.
        socket: String,
        /// The request.
        what: &'static str,
        /// Its answer.
        status: Status,
    },
    /// The backend answered with a body this library cannot parse.
    #[error("The vGPU backend at {socket} sent a malformed answer to {what}")]
    Malformed {
        /// The socket path.
        socket: String,
        /// The request.
        what: &'static str,
    },
}

impl InitError {
    /// The `CUresult` `cuInit` returns for this failure.
    pub(crate) fn status(&self) -> Status {
        match self {
            InitError::Unreachable(_) | InitError::BadConfig { .. } => Status::NO_DEVICE,
            InitError::Handshake { source, .. } | InitError::Transport { source, .. } => {
                source.status()
            }
            InitError::Refused { status, .. } => *status,
            InitError::Malformed { .. } => Status::UNKNOWN,
        }
    }
}

/// What `GET_DEVICE_INFO` and the config space say about the device.
#[derive(Debug, Clone)]
pub(crate) struct DeviceInfo {
    /// Total memory the guest sees.
    pub total_mem: u64,
    /// The driver version to report.
    pub driver_version: i32,
    /// `CUdevice_attribute` values by attribute id.
    pub attributes: Vec<i32>,
    /// The config space.
    pub config: VgpuConfig,
}

/// The driver state of the process.
pub(crate) struct Driver {
    dev: Device,
    session: u64,
    socket: PathBuf,
    dead: AtomicBool,
    /// Errors of asynchronous work, per context.
    errors: Mutex<ContextErrors>,
    /// Device identity and attributes.
    pub info: DeviceInfo,
    /// Live contexts and the primary context.
    pub contexts: Mutex<ContextTable>,
    /// Loaded modules and their functions.
    pub modules: Mutex<ModuleTable>,
    /// Streams: guest ids to backend handles.
    pub streams: HandleTable,
    /// Events: guest ids to backend handles.
    pub events: HandleTable,
}

static DRIVER: OnceLock<Driver> = OnceLock::new();

/// Locks a mutex, ignoring poisoning (a panic elsewhere is already reported).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// `cuInit`: connects once; later calls return at once. A failure leaves
/// the state empty so that a later `cuInit` may try again.
pub(crate) fn init() -> CuResult<()> {
    static INIT: Mutex<()> = Mutex::new(());
    if DRIVER.get().is_some() {
        return Ok(());
    }
    let _serial = lock(&INIT);
    if DRIVER.get().is_some() {
        return Ok(());
    }
    logging::install();
    match Driver::connect() {
        Ok(driver) => {
            tracing::info!(
                session = driver.session,
                socket = %driver.socket.display(),
                "connected to the vGPU backend"
            );
            // Cannot fail: only this function sets it, under `INIT`.
            let _ = DRIVER.set(driver);
            Ok(())
        }
        Err(err) => {
            logging::report_once(&err.to_string());
            Err(err.status())
        }
    }
}

/// The driver state, if `cuInit` succeeded and the backend is alive.
pub(crate) fn driver() -> CuResult<&'static Driver> {
    let driver = DRIVER.get().ok_or(Status::NOT_INITIALIZED)?;
    if driver.dead.load(Ordering::Relaxed) {
        return Err(Status::DEVICE_UNAVAILABLE);
    }
    Ok(driver)
}

/// The driver state if `cuInit` succeeded, dead backend or not.
pub(crate) fn initialized() -> Option<&'static Driver> {
    DRIVER.get()
}

/// Parses the fixed struct at the front of a response body.
pub(crate) fn parse<'a, T: FromBytes + KnownLayout + Immutable + Copy>(
    body: &'a [u8],
    what: &str,
) -> CuResult<(T, &'a [u8])> {
    T::read_from_prefix(body).map_err(|_| {
        logging::report_once(&format!(
            "The vGPU backend sent a malformed answer to {what}"
        ));
        Status::UNKNOWN
    })
}

impl Driver {
    fn connect() -> Result<Driver, InitError> {
        let opts = Options::from_env();
        let socket = opts.socket.display().to_string();
        let dev = Device::connect(&opts).map_err(|source| match source {
            TransportError::Connect { .. } => InitError::Unreachable(source),
            source => InitError::Handshake {
                socket: socket.clone(),
                source,
            },
        })?;
        let config = *dev.config();
        if !config.is_valid() {
            return Err(InitError::BadConfig {
                socket,
                ours: vgpu_spec::PROTOCOL_VERSION,
                magic: config.magic.get(),
                version: config.version.get(),
            });
        }
        let control = |what: &'static str, req: &Request<'_>, body: &mut Vec<u8>| {
            let status = dev
                .call(CONTROL_QUEUE, header(0, 0, 0, 0), req, body)
                .map_err(|source| InitError::Transport {
                    socket: socket.clone(),
                    what,
                    source,
                })?;
            status.into_result().map_err(|status| InitError::Refused {
                socket: socket.clone(),
                what,
                status,
            })
        };
        let malformed = |what| InitError::Malformed {
            socket: socket.clone(),
            what,
        };

        let mut body = Vec::new();
        control("GET_DEVICE_INFO", &Request::GetDeviceInfo, &mut body)?;
        let (resp, rest) =
            DeviceInfoResp::read_from_prefix(&body).map_err(|_| malformed("GET_DEVICE_INFO"))?;
        let count = resp.attr_count.get() as usize;
        let attributes = Response::array::<I32>(rest, count)
            .map_err(|_| malformed("GET_DEVICE_INFO"))?
            .into_iter()
            .map(|v| v.get())
            .collect();
        let info = DeviceInfo {
            total_mem: resp.total_mem.get(),
            driver_version: i32::try_from(resp.driver_version.get()).unwrap_or(i32::MAX),
            attributes,
            config,
        };

        let open = SessionOpenReq {
            pid: std::process::id().into(),
            version: vgpu_spec::PROTOCOL_VERSION.into(),
        };
        control("SESSION_OPEN", &Request::SessionOpen(open), &mut body)?;
        let (opened, _) =
            SessionOpenResp::read_from_prefix(&body).map_err(|_| malformed("SESSION_OPEN"))?;

        Ok(Driver {
            dev,
            session: opened.session.get(),
            socket: opts.socket,
            dead: AtomicBool::new(false),
            errors: Mutex::new(ContextErrors::default()),
            info,
            contexts: Mutex::new(ContextTable::default()),
            modules: Mutex::new(ModuleTable::default()),
            streams: HandleTable::default(),
            events: HandleTable::default(),
        })
    }

    /// Records a transport failure; a lost backend makes every later call
    /// fail with `CUDA_ERROR_DEVICE_UNAVAILABLE`.
    fn transport_failed(&self, err: TransportError) -> Status {
        let status = err.status();
        if status == Status::DEVICE_UNAVAILABLE {
            self.dead.store(true, Ordering::Relaxed);
            logging::report_once(&format!(
                "Lost the vGPU backend at {} ({err}); every CUDA call now fails with \
                 CUDA_ERROR_DEVICE_UNAVAILABLE",
                self.socket.display()
            ));
        } else {
            tracing::warn!(%err, ?status, "transport error");
        }
        status
    }

    /// The error table of the contexts, with the asynchronous failures of
    /// `ctx` the transport received so far moved in.
    fn errors_of(&self, ctx: u64) -> MutexGuard<'_, ContextErrors> {
        let mut errors = lock(&self.errors);
        if let Some(status) = self.dev.take_async_error_of(ctx) {
            tracing::debug!(ctx, ?status, "asynchronous work failed");
            errors.record(ctx, status);
        }
        errors
    }

    /// Fails with the sticky error of `ctx` if a fault poisoned it.
    pub(crate) fn check_sticky(&self, ctx: u64) -> CuResult<()> {
        match self.errors_of(ctx).sticky(ctx) {
            Some(status) => Err(status),
            None => Ok(()),
        }
    }

    /// What a synchronizing call in `ctx` returns for earlier asynchronous
    /// work: the context's sticky error, or its pending one-time error
    /// (cleared). Other contexts' errors stay where they are.
    pub(crate) fn settle(&self, ctx: u64) -> CuResult<()> {
        match self.errors_of(ctx).take(ctx) {
            Some(status) => Err(status),
            None => Ok(()),
        }
    }

    /// Sends a request in `ctx` and waits for it. A context poisoned by a
    /// sticky error fails at once, without sending; a pending one-time
    /// error stays for the next synchronizing call.
    pub(crate) fn call(
        &self,
        ctx: u64,
        flags: u32,
        req: &Request<'_>,
        body: &mut Vec<u8>,
    ) -> CuResult<()> {
        self.check_sticky(ctx)?;
        self.call_unchecked(ctx, flags, req, body)
    }

    /// Sends a request and waits for it, whatever the context's pending
    /// errors. A sticky answer poisons the context.
    pub(crate) fn call_unchecked(
        &self,
        ctx: u64,
        flags: u32,
        req: &Request<'_>,
        body: &mut Vec<u8>,
    ) -> CuResult<()> {
        self.send(ctx, flags, req, body)?.into_result()
    }

    /// Sends a request and waits for it. `Ok` holds the backend's answer
    /// (a sticky one poisons the context); `Err` a transport failure, after
    /// which the backend may not have seen the request.
    pub(crate) fn send(
        &self,
        ctx: u64,
        flags: u32,
        req: &Request<'_>,
        body: &mut Vec<u8>,
    ) -> CuResult<Status> {
        let hdr = header(self.session, ctx, 0, flags);
        let status = self
            .dev
            .call(SUBMISSION_QUEUE, hdr, req, body)
            .map_err(|err| self.transport_failed(err))?;
        tracing::trace!(opcode = req.opcode(), ?status, "call");
        if status.is_sticky() && ctx != 0 {
            lock(&self.errors).record(ctx, status);
        }
        Ok(status)
    }

    /// A synchronizing request: returns the pending error of `ctx` first,
    /// without sending; then sends and waits; then returns any asynchronous
    /// error of `ctx` that arrived meanwhile (synchronize, blocking copies).
    pub(crate) fn call_settled(
        &self,
        ctx: u64,
        flags: u32,
        req: &Request<'_>,
        body: &mut Vec<u8>,
    ) -> CuResult<()> {
        self.settle(ctx)?;
        self.call_unchecked(ctx, flags, req, body)?;
        self.settle(ctx)
    }

    /// A destroy-style request (`cuStreamDestroy`, `cuMemFree`, ...): always
    /// sent, so that the backend frees what it names even in a poisoned
    /// context; the answer (possibly the sticky error) is returned as is.
    pub(crate) fn call_release(
        &self,
        ctx: u64,
        req: &Request<'_>,
        body: &mut Vec<u8>,
    ) -> CuResult<()> {
        self.call_unchecked(ctx, 0, req, body)
    }

    /// Drops the asynchronous errors of a destroyed context.
    pub(crate) fn forget_errors(&self, ctx: u64) {
        let mut errors = lock(&self.errors);
        let _ = self.dev.take_async_error_of(ctx);
        errors.forget(ctx);
    }

    /// Queues a request without waiting; its failure surfaces later. A
    /// context poisoned by a sticky error fails at once, as natively.
    pub(crate) fn submit(
        &self,
        ctx: u64,
        flags: u32,
        req: &Request<'_>,
        staging: Option<Staging>,
    ) -> CuResult<()> {
        self.check_sticky(ctx)?;
        let hdr = header(self.session, ctx, 0, flags);
        tracing::trace!(opcode = req.opcode(), "submit");
        self.dev
            .submit(SUBMISSION_QUEUE, hdr, req, staging)
            .map_err(|err| self.transport_failed(err))
    }

    /// Makes everything submitted visible to the device (kicks if needed).
    pub(crate) fn flush(&self) -> CuResult<()> {
        self.dev.flush().map_err(|err| self.transport_failed(err))
    }

    /// A bounce buffer of `len` bytes in guest memory.
    pub(crate) fn staging(&self, len: usize) -> CuResult<Staging> {
        self.dev
            .staging(len)
            .map_err(|err| self.transport_failed(err))
    }

    /// The largest bounce buffer possible.
    pub(crate) fn staging_capacity(&self) -> usize {
        self.dev.staging_capacity()
    }

    /// The guest-physical address of a host range inside pinned memory.
    pub(crate) fn translate(&self, ptr: *const u8, len: usize) -> Option<u64> {
        self.dev.translate(ptr, len)
    }

    /// Allocates pinned host memory shared with the device.
    pub(crate) fn alloc_pinned(&self, len: usize) -> CuResult<*mut u8> {
        self.dev
            .alloc_pinned(len)
            .map_err(|err| self.transport_failed(err))
    }

    /// Frees pinned host memory.
    pub(crate) fn free_pinned(&self, ptr: *mut u8) -> CuResult<()> {
        self.dev
            .free_pinned(ptr)
            .map_err(|err| self.transport_failed(err))
    }
}
