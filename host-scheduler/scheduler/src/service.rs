//! The scheduler's operations, as the REST API calls them: create, change, delete, attach and
//! detach slices, list them and their utilization. Ties the registry, the grant board and the
//! backend supervisor together.
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vgpu_board::{Board, BoardError, SlotSnapshot};

use crate::arbiter::{Roster, RosterEntry, UtilTable};
use crate::config::DeviceKind;
use crate::registry::{Registry, RegistryError};
use crate::slice::{Slice, SliceClass, SliceRequest, SliceSpec, SliceUpdate, Util};
use crate::supervisor::{Backend, LaunchSpec, SupervisorError};

/// Errors of an operation.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// From the registry (admission, not found, saving).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The backend could not be started.
    #[error(transparent)]
    Start(#[from] SupervisorError),
    /// The board refused a slot.
    #[error(transparent)]
    Board(#[from] BoardError),
}

/// How backends are started.
#[derive(Debug, Clone)]
pub struct Launcher {
    /// The `vgpu-backend` binary.
    pub program: PathBuf,
    /// Real or emulated GPUs.
    pub device: DeviceKind,
    /// The scheduler's state directory.
    pub state_dir: PathBuf,
    /// Each GPU's memory (index, bytes): emulated backends share it as one budget.
    pub gpu_memory: Vec<(u32, u64)>,
}

impl Launcher {
    /// The command line of slice `spec`'s backend on board slot `slot`. The backend reports
    /// its usage to this scheduler's API socket, billed to the slice's tenant.
    pub fn launch_spec(&self, spec: &SliceSpec, slot: usize, socket: PathBuf) -> LaunchSpec {
        let mut args: Vec<OsString> = vec!["--socket".into(), socket.clone().into()];
        args.push("--device".into());
        args.push(match self.device {
            DeviceKind::Cuda => format!("cuda:{}", spec.gpu).into(),
            DeviceKind::Emulated => "emulated".into(),
        });
        args.extend([
            "--slice".into(),
            spec.name.clone().into(),
            "--memory-limit".into(),
            spec.memory_limit.to_string().into(),
            "--board".into(),
            self.state_dir.join("board").into(),
            "--board-slot".into(),
            slot.to_string().into(),
            "--scheduler-socket".into(),
            self.state_dir.join("api.sock").into(),
            "--tenant".into(),
            spec.tenant.clone().into(),
        ]);
        if self.device == DeviceKind::Cuda && spec.memory_guarantee < spec.memory_limit {
            // Its memory above the guarantee may be reclaimed: pin the swap space ahead.
            args.push("--swap-reserve".into());
        }
        if self.device == DeviceKind::Emulated {
            args.push("--emulated-gpu-lock".into());
            args.push(
                self.state_dir
                    .join(format!("emulated-gpu-{}.lock", spec.gpu))
                    .into(),
            );
            if let Some((_, bytes)) = self.gpu_memory.iter().find(|(i, _)| *i == spec.gpu) {
                args.push("--emulated-gpu-memory".into());
                args.push(bytes.to_string().into());
            }
        }
        LaunchSpec {
            slice: spec.name.clone(),
            program: self.program.clone(),
            args,
            socket,
        }
    }
}

/// The scheduler's state and operations.
#[derive(Debug)]
pub struct Core {
    registry: Mutex<Registry>,
    board: Arc<Board>,
    launcher: Launcher,
    roster: Arc<Roster>,
    util: Arc<UtilTable>,
}

impl Core {
    /// Ties the parts together and publishes the roster.
    pub fn new(
        registry: Registry,
        board: Arc<Board>,
        launcher: Launcher,
        roster: Arc<Roster>,
        util: Arc<UtilTable>,
    ) -> Core {
        let core = Core {
            registry: Mutex::new(registry),
            board,
            launcher,
            roster,
            util,
        };
        core.publish(&core.lock());
        core
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells the arbiter which slices hold board slots.
    fn publish(&self, reg: &Registry) {
        let entries = reg
            .entries()
            .filter_map(|e| {
                Some(RosterEntry {
                    slot: e.slot?,
                    gpu: e.spec.gpu,
                    class: e.spec.class,
                    guarantee_pct: e.spec.compute_guarantee_pct,
                    max_pct: e.spec.compute_max_pct,
                    weight: e.spec.weight,
                    evict: e.evicted,
                })
            })
            .collect();
        self.roster.publish(entries);
    }

    /// Every slice.
    pub fn list(&self) -> Vec<Slice> {
        self.lock().views()
    }

    /// One slice.
    pub fn get(&self, name: &str) -> Result<Slice, ServiceError> {
        Ok(self.lock().view(name)?)
    }

    /// Admits and adds a slice; attaches it if asked.
    pub fn create(&self, req: SliceRequest) -> Result<Slice, ServiceError> {
        let mut reg = self.lock();
        let memory = reg
            .gpus()
            .iter()
            .find(|g| g.index == req.gpu)
            .map_or(0, |g| g.memory);
        let spec = req.resolve(memory);
        let name = spec.name.clone();
        let attach = spec.attach;
        reg.create(spec)?;
        tracing::info!(slice = %name, "slice created");
        if attach {
            self.attach_locked(&mut reg, &name)?;
        }
        Ok(reg.view(&name)?)
    }

    /// Changes a slice's guarantees, maximum or weight (re-admitted).
    pub fn update(&self, name: &str, update: &SliceUpdate) -> Result<Slice, ServiceError> {
        let mut reg = self.lock();
        let spec = update.apply(&reg.get(name)?.spec);
        let limit = spec.memory_limit;
        reg.update(spec)?;
        // An attached slice's backend follows the new limit from the board.
        if let Some(slot) = reg.get(name)?.slot {
            self.board.slot(slot)?.set_memory_limit(limit);
        }
        self.publish(&reg);
        tracing::info!(slice = %name, memory_limit = limit, "slice changed");
        Ok(reg.view(name)?)
    }

    /// Deletes a slice, stopping its backend and freeing its board slot.
    pub async fn delete(&self, name: &str) -> Result<(), ServiceError> {
        let entry = {
            let mut reg = self.lock();
            let e = reg.remove(name)?;
            self.publish(&reg);
            e
        };
        self.release(entry.slot, entry.backend).await;
        tracing::info!(slice = %name, "slice deleted");
        Ok(())
    }

    /// Starts a slice's backend (nothing to do if it runs already).
    pub fn attach(&self, name: &str) -> Result<Slice, ServiceError> {
        let mut reg = self.lock();
        self.attach_locked(&mut reg, name)?;
        Ok(reg.view(name)?)
    }

    fn attach_locked(&self, reg: &mut Registry, name: &str) -> Result<(), ServiceError> {
        let entry = reg.get(name)?;
        if entry.backend.is_some() {
            return Ok(());
        }
        let spec = entry.spec.clone();
        let slot = reg.take_slot(name)?;
        let board_slot = match self.board.slot(slot) {
            Ok(s) => s,
            Err(e) => {
                reg.free_slot(slot);
                return Err(e.into());
            }
        };
        board_slot.assign(spec.gpu, spec.class.board());
        let launch = self
            .launcher
            .launch_spec(&spec, slot, reg.socket_path(name));
        let board = Arc::clone(&self.board);
        let on_exit = Arc::new(move || {
            if let Ok(s) = board.slot(slot) {
                s.clear_busy();
            }
        });
        let backend = match Backend::start(launch, on_exit) {
            Ok(b) => b,
            Err(e) => {
                board_slot.release();
                reg.free_slot(slot);
                return Err(e.into());
            }
        };
        let entry = reg.get_mut(name)?;
        entry.slot = Some(slot);
        entry.backend = Some(backend);
        self.publish(reg);
        tracing::info!(slice = %name, slot, "slice attached");
        Ok(reg.set_attached(name, true)?)
    }

    /// Stops a slice's backend and frees its board slot.
    pub async fn detach(&self, name: &str) -> Result<Slice, ServiceError> {
        let (slot, backend) = {
            let mut reg = self.lock();
            let e = reg.get_mut(name)?;
            let taken = (e.slot.take(), e.backend.take());
            if let Some(b) = &taken.1 {
                e.restarts_before += b.restarts();
            }
            reg.set_attached(name, false)?;
            self.publish(&reg);
            taken
        };
        self.release(slot, backend).await;
        tracing::info!(slice = %name, "slice detached");
        Ok(self.lock().view(name)?)
    }

    async fn release(&self, slot: Option<usize>, backend: Option<Backend>) {
        if let Some(b) = backend {
            b.stop().await;
        }
        if let Some(slot) = slot {
            if let Ok(s) = self.board.slot(slot) {
                s.release();
            }
            self.lock().free_slot(slot);
        }
    }

    /// Starts the backends of every slice marked attached (at start-up). Failures are logged;
    /// the slice stays marked attached, so a later attach or restart tries again.
    pub fn attach_marked(&self) {
        let mut reg = self.lock();
        let names: Vec<String> = reg
            .entries()
            .filter(|e| e.attached && e.backend.is_none())
            .map(|e| e.spec.name.clone())
            .collect();
        for name in names {
            if let Err(e) = self.attach_locked(&mut reg, &name) {
                tracing::error!(slice = %name, "cannot attach: {e}");
            }
        }
    }

    /// Stops every backend (at shutdown); slices stay marked attached, so they come back with
    /// the next start.
    pub async fn stop_all(&self) {
        let taken: Vec<(Option<usize>, Option<Backend>)> = {
            let mut reg = self.lock();
            let taken = reg
                .entries_mut()
                .map(|e| (e.slot.take(), e.backend.take()))
                .collect();
            self.publish(&reg);
            taken
        };
        let mut stops = Vec::new();
        for (slot, backend) in taken {
            let board = Arc::clone(&self.board);
            stops.push(tokio::spawn(async move {
                if let Some(b) = backend {
                    b.stop().await;
                }
                if let Some(s) = slot.and_then(|s| board.slot(s).ok()) {
                    s.release();
                }
            }));
        }
        for s in stops {
            if let Err(e) = s.await {
                tracing::error!("stopping a backend failed: {e}");
            }
        }
    }

    /// Marks a slice's memory reclaimed (or not) and tells the arbiter, which sets (or clears)
    /// `evict` in its grant at the next tick.
    pub fn set_evicted(
        &self,
        name: &str,
        evicted: bool,
        claimed: Option<crate::memory::Claimed>,
    ) -> Result<(), ServiceError> {
        let mut reg = self.lock();
        let entry = reg.get_mut(name)?;
        entry.claimed = claimed.filter(|_| evicted);
        if entry.evicted != evicted {
            entry.evicted = evicted;
            self.publish(&reg);
        }
        Ok(())
    }

    /// The memory of every slice holding a board slot.
    pub fn memory(&self) -> Vec<crate::memory::SliceMemory> {
        let reg = self.lock();
        reg.entries()
            .filter_map(|e| {
                let slot = self.board.slot(e.slot?).ok()?;
                let snap = slot.snapshot();
                let u = self.util.get(e.slot?, snap.generation).unwrap_or_default();
                Some(crate::memory::SliceMemory {
                    name: e.spec.name.clone(),
                    gpu: e.spec.gpu,
                    class: e.spec.class,
                    guarantee: e.spec.memory_guarantee,
                    limit: e.spec.memory_limit,
                    resident: snap.mem_resident,
                    swapped: snap.mem_swapped,
                    reclaims: snap.reclaims,
                    evicted: e.evicted,
                    claimed: e.claimed.clone(),
                    busy: snap.busy,
                    busy_pct: u.busy_pct,
                })
            })
            .collect()
    }

    /// Live utilization of every slice holding a board slot.
    pub fn util(&self) -> Vec<Util> {
        let reg = self.lock();
        reg.entries()
            .filter_map(|e| {
                let slot = self.board.slot(e.slot?).ok()?;
                let snap = slot.snapshot();
                let u = self.util.get(e.slot?, snap.generation).unwrap_or_default();
                Some(Util {
                    name: e.spec.name.clone(),
                    tenant: e.spec.tenant.clone(),
                    gpu: e.spec.gpu,
                    class: e.spec.class,
                    busy_pct: u.busy_pct,
                    throttled_pct: u.throttled_pct,
                    busy: snap.busy,
                    running: slot.may_dispatch(),
                    gpu_seconds: snap.busy_ns as f64 / 1e9,
                    launches: snap.launches,
                    htod_bytes: snap.htod_bytes,
                    dtoh_bytes: snap.dtoh_bytes,
                    restarts: e.restarts_before + e.backend.as_ref().map_or(0, Backend::restarts),
                    preempt_last_us: ns_to_us(snap.preempt_last_ns),
                    preempt_max_us: ns_to_us(snap.preempt_max_ns),
                    preempt_p50_us: ns_to_us(u.preempt.p50_ns),
                    preempt_p99_us: ns_to_us(u.preempt.p99_ns),
                    preemptions: u.preempt.count,
                })
            })
            .collect()
    }
}

fn ns_to_us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

/// What `/metrics` reports of one slice, from the registry, the board and the supervisor.
#[derive(Debug, Clone)]
pub struct SliceMeter {
    /// The slice.
    pub name: String,
    /// Its tenant.
    pub tenant: String,
    /// Its GPU.
    pub gpu: u32,
    /// Its class.
    pub class: SliceClass,
    /// Its board slot's counters, while it holds one.
    pub board: Option<SlotSnapshot>,
    /// GPU busy time over wall time in the last second, 0 to 1.
    pub busy_ratio: f64,
    /// Backend restarts, all backends of the slice together.
    pub restarts: u64,
    /// Preemptions seen since its backend was attached (sampled every tick).
    pub preemptions: u64,
}

impl Core {
    /// Every slice, with its live figures.
    pub fn meters(&self) -> Vec<SliceMeter> {
        let reg = self.lock();
        reg.entries()
            .map(|e| {
                let snap = e
                    .slot
                    .and_then(|s| self.board.slot(s).ok())
                    .map(|s| s.snapshot())
                    .filter(|s| s.generation != 0);
                let util = match (e.slot, &snap) {
                    (Some(slot), Some(s)) => self.util.get(slot, s.generation),
                    _ => None,
                }
                .unwrap_or_default();
                SliceMeter {
                    name: e.spec.name.clone(),
                    tenant: e.spec.tenant.clone(),
                    gpu: e.spec.gpu,
                    class: e.spec.class,
                    board: snap,
                    busy_ratio: util.busy_pct / 100.0,
                    restarts: e.restarts_before + e.backend.as_ref().map_or(0, Backend::restarts),
                    preemptions: util.preempt.count,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, gpu: u32) -> SliceSpec {
        SliceSpec {
            name: name.into(),
            tenant: "t".into(),
            gpu,
            class: SliceClass::LatencyCritical,
            compute_guarantee_pct: 10,
            compute_max_pct: 100,
            memory_guarantee: 0,
            memory_limit: 1 << 30,
            weight: 1,
            attach: false,
        }
    }

    fn args(l: &LaunchSpec) -> Vec<String> {
        l.args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn cuda_backend_gets_the_documented_flags() {
        let l = Launcher {
            program: "/usr/bin/vgpu-backend".into(),
            device: DeviceKind::Cuda,
            state_dir: "/var/lib/vgpu".into(),
            gpu_memory: vec![(1, 80 << 30)],
        };
        let s = l.launch_spec(&spec("lc", 1), 3, "/var/lib/vgpu/slices/lc.sock".into());
        assert_eq!(
            args(&s).join(" "),
            "--socket /var/lib/vgpu/slices/lc.sock --device cuda:1 --slice lc \
             --memory-limit 1073741824 --board /var/lib/vgpu/board --board-slot 3 \
             --scheduler-socket /var/lib/vgpu/api.sock --tenant t --swap-reserve"
        );
        // Memory that cannot be reclaimed needs no swap space pinned ahead.
        let mut fixed = spec("lc", 1);
        fixed.memory_guarantee = fixed.memory_limit;
        let s = l.launch_spec(&fixed, 3, "/var/lib/vgpu/slices/lc.sock".into());
        assert!(!args(&s).contains(&"--swap-reserve".to_string()));
    }

    #[test]
    fn emulated_backend_gets_the_gpu_lock() {
        let l = Launcher {
            program: "vgpu-backend".into(),
            device: DeviceKind::Emulated,
            state_dir: "/s".into(),
            gpu_memory: vec![(2, 8 << 30)],
        };
        let a = args(&l.launch_spec(&spec("be", 2), 0, "/s/slices/be.sock".into()));
        assert_eq!(a[2..4], ["--device", "emulated"]);
        assert_eq!(
            a[a.len() - 4..],
            [
                "--emulated-gpu-lock",
                "/s/emulated-gpu-2.lock",
                "--emulated-gpu-memory",
                "8589934592"
            ]
        );
    }
}
