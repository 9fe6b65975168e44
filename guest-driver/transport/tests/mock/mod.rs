//! A minimal in-process virtio-vgpu backend on vhost-user-backend, enough to
//! drive the transport end to end: device info, sessions, a toy allocator
//! with host-memory "device memory", copies, module loads, function lookup,
//! launches (function 0xbad fails), and CTX_SYNCHRONIZE, which it never
//! answers (to test a backend dying mid-call).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vgpu_spec::response::{encode, encode_status};
use vgpu_spec::wire::*;
use vgpu_spec::{Request, Status, VgpuConfig};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use zerocopy::IntoBytes;

type Gm = GuestMemoryAtomic<GuestMemoryMmap>;

/// Function handle whose launches fail with LAUNCH_FAILED.
pub const BAD_FUNCTION: u64 = 0xbad;

#[derive(Default)]
pub struct State {
    allocs: BTreeMap<u64, Vec<u8>>,
    next: u64,
}

pub struct Inner {
    mem: Mutex<Option<Gm>>,
    state: Mutex<State>,
    config: VgpuConfig,
    /// Set when a CTX_SYNCHRONIZE arrived (and was left unanswered).
    pub hung: AtomicBool,
    pub acked_features: AtomicU64,
    pub requests: AtomicU64,
    /// Microseconds each launch keeps the device busy (0: none).
    pub launch_busy_us: AtomicU64,
}

#[derive(Clone)]
pub struct Mock(pub Arc<Inner>);

impl Mock {
    pub fn new() -> Mock {
        let mut config = VgpuConfig::new();
        config.set_device_name("Mock GPU");
        config.memory_limit = (1u64 << 30).into();
        Mock(Arc::new(Inner {
            mem: Mutex::new(None),
            state: Mutex::new(State {
                next: 0x7f00_0000_0000,
                ..Default::default()
            }),
            config,
            hung: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            launch_busy_us: AtomicU64::new(0),
        }))
    }

    fn gather(m: &GuestMemoryMmap, segs: &[SgEntry]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        for s in segs {
            let mut buf = vec![0u8; s.len.get() as usize];
            m.read_slice(&mut buf, GuestAddress(s.gpa.get())).ok()?;
            out.extend_from_slice(&buf);
        }
        Some(out)
    }

    fn handle(&self, m: &GuestMemoryMmap, bytes: &[u8]) -> Option<Vec<u8>> {
        self.0.requests.fetch_add(1, Ordering::Relaxed);
        let busy = self.0.launch_busy_us.load(Ordering::Relaxed);
        if busy > 0 && matches!(Request::decode(bytes), Ok((_, Request::Launch(..)))) {
            let until = std::time::Instant::now() + std::time::Duration::from_micros(busy);
            while std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        let mut out = Vec::new();
        let (hdr, req) = match Request::decode(bytes) {
            Ok(x) => x,
            Err(e) => {
                let id = bytes
                    .get(16..24)
                    .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
                encode_status(e.status(), id, &mut out);
                return Some(out);
            }
        };
        let id = hdr.request_id.get();
        let mut st = self.0.state.lock().unwrap();
        let status = |s: Status, out: &mut Vec<u8>| encode_status(s, id, out);
        match req {
            Request::GetDeviceInfo => {
                let mut attrs = vec![0i32; DEVICE_INFO_ATTRS];
                attrs[1] = 1024;
                let info = DeviceInfoResp {
                    total_mem: (1u64 << 30).into(),
                    driver_version: 13000.into(),
                    attr_count: (DEVICE_INFO_ATTRS as u32).into(),
                };
                encode(Status::SUCCESS, id, &info, attrs.as_bytes(), &mut out);
            }
            Request::SessionOpen(_) => {
                let r = SessionOpenResp { session: 7.into() };
                encode(Status::SUCCESS, id, &r, &[], &mut out);
            }
            Request::MemAlloc(r) => {
                let ptr = st.next;
                st.next += r.size.get().next_multiple_of(4096).max(4096);
                st.allocs.insert(ptr, vec![0; r.size.get() as usize]);
                let h = HandleResp { handle: ptr.into() };
                encode(Status::SUCCESS, id, &h, &[], &mut out);
            }
            Request::MemcpyHtoD(r, segs) => {
                let data = Self::gather(m, segs);
                let dst = st.allocs.get_mut(&r.device_ptr.get());
                match (data, dst) {
                    (Some(data), Some(dst)) if data.len() <= dst.len() => {
                        dst[..data.len()].copy_from_slice(&data);
                        status(Status::SUCCESS, &mut out);
                    }
                    _ => status(Status::INVALID_VALUE, &mut out),
                }
            }
            Request::MemcpyDtoH(r, segs) => {
                let mut ok = false;
                if let Some(src) = st.allocs.get(&r.device_ptr.get()) {
                    let mut off = 0usize;
                    ok = true;
                    for s in segs {
                        let n = s.len.get() as usize;
                        let Some(chunk) = src.get(off..off + n) else {
                            ok = false;
                            break;
                        };
                        ok &= m.write_slice(chunk, GuestAddress(s.gpa.get())).is_ok();
                        off += n;
                    }
                }
                let s = if ok {
                    Status::SUCCESS
                } else {
                    Status::INVALID_VALUE
                };
                status(s, &mut out);
            }
            Request::ModuleLoad(_, image) => {
                let handle = (image.len() as u64) << 16
                    | u64::from(image[0]) << 8
                    | u64::from(image[image.len() - 1]);
                let h = HandleResp {
                    handle: handle.into(),
                };
                encode(Status::SUCCESS, id, &h, &[], &mut out);
            }
            Request::GetFunction(_, name) => {
                let params = [
                    ParamInfo {
                        offset: 0.into(),
                        size: 8.into(),
                    },
                    ParamInfo {
                        offset: 8.into(),
                        size: (name.len() as u32).into(),
                    },
                ];
                let f = FunctionResp {
                    function: 99.into(),
                    param_count: 2.into(),
                    param_bytes: 12.into(),
                };
                encode(Status::SUCCESS, id, &f, params.as_bytes(), &mut out);
            }
            Request::Launch(r, _) => {
                let s = if r.function.get() == BAD_FUNCTION {
                    Status::LAUNCH_FAILED
                } else {
                    Status::SUCCESS
                };
                status(s, &mut out);
            }
            Request::CtxSynchronize => {
                self.0.hung.store(true, Ordering::Release);
                return None;
            }
            _ => status(Status::NOT_SUPPORTED, &mut out),
        }
        Some(out)
    }
}

const DEVICE_INFO_ATTRS: usize = vgpu_spec::DEVICE_ATTRIBUTE_SLOTS as usize;

impl VhostUserBackend for Mock {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        vgpu_spec::NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        vgpu_spec::MAX_QUEUE_SIZE as usize
    }

    fn features(&self) -> u64 {
        // Offer EVENT_IDX too: the transport must not take it.
        1 << 32 | 1 << 30 | 1 << 29
    }

    fn acked_features(&self, features: u64) {
        self.0.acked_features.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.0.config.read_window(offset, size)
    }

    fn update_memory(&self, mem: Gm) -> std::io::Result<()> {
        *self.0.mem.lock().unwrap() = Some(mem);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        let idx = usize::from(device_event);
        if idx >= 2 {
            return Ok(());
        }
        let atomic = self.0.mem.lock().unwrap().clone().unwrap();
        let vring = &vrings[idx];
        loop {
            vring.disable_notification().unwrap();
            loop {
                let m = atomic.memory();
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(m.clone());
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let mut req = Vec::new();
                let mut writable = Vec::new();
                for d in chain {
                    if d.is_write_only() {
                        writable.push((d.addr(), d.len() as usize));
                    } else {
                        let mut buf = vec![0u8; d.len() as usize];
                        m.read_slice(&mut buf, d.addr()).unwrap();
                        req.extend_from_slice(&buf);
                    }
                }
                let Some(resp) = self.handle(&m, &req) else {
                    continue;
                };
                let (addr, cap) = writable[0];
                assert!(resp.len() <= cap, "response {} > {cap}", resp.len());
                m.write_slice(&resp, addr).unwrap();
                vring.add_used(head, resp.len() as u32).unwrap();
            }
            vring.signal_used_queue().unwrap();
            if !vring.enable_notification().unwrap() {
                break;
            }
        }
        Ok(())
    }
}

/// A running mock daemon.
pub struct Running {
    pub mock: Mock,
    pub shutdown: std::sync::mpsc::Receiver<vhost_user_backend::ShutdownHandle>,
}

/// Binds `path` and serves one frontend on a background thread.
pub fn spawn(path: &Path) -> Running {
    let _ = std::fs::remove_file(path);
    let mut listener = Listener::new(path, true).unwrap();
    let mock = Mock::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let backend = mock.clone();
    std::thread::spawn(move || {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("mock-vgpu".into(), backend, mem).unwrap();
        daemon.start(&mut listener).unwrap();
        let _ = tx.send(daemon.shutdown_handle().unwrap());
        let _ = daemon.wait();
    });
    Running { mock, shutdown: rx }
}
