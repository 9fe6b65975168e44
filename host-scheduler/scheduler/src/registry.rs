//! The slices of this host: their specs, which are attached and in which board slot, and their
//! persistence in `$STATE_DIR/slices.json`.
//!
//! Slices declared in the configuration are re-read at every start, so editing the file takes
//! effect. Slices created through the API, and configured slices changed, attached or detached
//! through it, are saved in `slices.json` (written to a temporary file, then renamed) and win
//! over the configuration on the next start. Deleting a configured slice through the API
//! records its name there too, so it stays deleted.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::admission::{self, AdmissionError};
use crate::config::{Config, GpuConfig};
use crate::slice::{Slice, SliceSpec};
use crate::supervisor::Backend;

const STATE_VERSION: u32 = 1;

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Admission refused the slice.
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    /// No slice has the name.
    #[error("Slice {0} does not exist.")]
    NotFound(String),
    /// Every board slot is taken.
    #[error(
        "All {} board slots are in use; detach a slice first.",
        vgpu_board::MAX_SLOTS
    )]
    NoFreeSlot,
    /// The state file could not be written.
    #[error("Cannot save the slices to {}: {source}", path.display())]
    Save {
        /// The state file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state file could not be read.
    #[error("Cannot load the slices from {}: {message}", path.display())]
    Load {
        /// The state file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedSlice {
    #[serde(flatten)]
    spec: SliceSpec,
    attached: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedState {
    version: u32,
    slices: Vec<SavedSlice>,
    #[serde(default)]
    removed: Vec<String>,
}

/// One slice and its live state.
#[derive(Debug)]
pub struct Entry {
    /// Its shape.
    pub spec: SliceSpec,
    /// It should have a backend (persisted; re-attached at start).
    pub attached: bool,
    /// Its board slot, while it has one.
    pub slot: Option<usize>,
    /// Its supervised backend, while one runs.
    pub backend: Option<Backend>,
    /// Restarts of earlier backends of this slice.
    pub restarts_before: u64,
    /// Its memory is reclaimed (runtime state, not saved).
    pub evicted: bool,
    /// Reclaimed for another slice's claim (given back by itself, see
    /// [`crate::memory::Claimed`]); `None` for an operator's reclaim, which waits for an
    /// operator's restore.
    pub claimed: Option<crate::memory::Claimed>,
    /// Declared in the configuration.
    from_config: bool,
    /// Saved in the state file (created or changed through the API).
    saved: bool,
}

impl Entry {
    fn new(spec: SliceSpec, attached: bool, from_config: bool, saved: bool) -> Entry {
        Entry {
            spec,
            attached,
            slot: None,
            backend: None,
            restarts_before: 0,
            evicted: false,
            claimed: None,
            from_config,
            saved,
        }
    }
}

/// The slices, board slot allocation and the state file.
#[derive(Debug)]
pub struct Registry {
    gpus: Vec<GpuConfig>,
    slices: BTreeMap<String, Entry>,
    removed: BTreeSet<String>,
    /// Slot i is reserved by the named slice (until its backend is gone).
    slots: Vec<Option<String>>,
    path: PathBuf,
    sockets: PathBuf,
}

impl Registry {
    /// Loads `state_dir/slices.json` (if any) over the configured slices and saves the result.
    pub fn open(state_dir: &Path, config: &Config) -> Result<Registry, RegistryError> {
        let path = state_dir.join("slices.json");
        let load_err = |message: String| RegistryError::Load {
            path: path.clone(),
            message,
        };
        let saved: SavedState = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| load_err(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SavedState {
                version: STATE_VERSION,
                ..SavedState::default()
            },
            Err(e) => return Err(load_err(e.to_string())),
        };
        if saved.version != STATE_VERSION {
            return Err(load_err(format!(
                "it is version {}; this scheduler reads version {STATE_VERSION}.",
                saved.version
            )));
        }
        let mut reg = Registry {
            gpus: config.gpus.clone(),
            slices: BTreeMap::new(),
            removed: saved.removed.into_iter().collect(),
            slots: vec![None; vgpu_board::MAX_SLOTS],
            path: path.clone(),
            sockets: state_dir.join("slices"),
        };
        let configured: BTreeSet<&str> = config.slices.iter().map(|s| s.name.as_str()).collect();
        for s in saved.slices {
            let from_config = configured.contains(s.spec.name.as_str());
            reg.admit(&s.spec, None)
                .map_err(|e| load_err(format!("slice {} no longer fits: {e}", s.spec.name)))?;
            reg.slices.insert(
                s.spec.name.clone(),
                Entry::new(s.spec, s.attached, from_config, true),
            );
        }
        for spec in &config.slices {
            if reg.slices.contains_key(&spec.name) || reg.removed.contains(&spec.name) {
                continue;
            }
            reg.admit(spec, None).map_err(|e| {
                load_err(format!(
                    "configured slice {} does not fit next to the saved ones: {e}",
                    spec.name
                ))
            })?;
            reg.slices.insert(
                spec.name.clone(),
                Entry::new(spec.clone(), spec.attach, true, false),
            );
        }
        reg.save()?;
        Ok(reg)
    }

    /// The configured GPUs.
    pub fn gpus(&self) -> &[GpuConfig] {
        &self.gpus
    }

    /// Admission of `spec` against every slice but `replacing`.
    fn admit(&self, spec: &SliceSpec, replacing: Option<&str>) -> Result<(), AdmissionError> {
        let others = self
            .slices
            .values()
            .map(|e| &e.spec)
            .filter(|s| Some(s.name.as_str()) != replacing);
        admission::check(spec, &self.gpus, others)
    }

    /// The vhost-user socket of slice `name`.
    pub fn socket_path(&self, name: &str) -> PathBuf {
        self.sockets.join(format!("{name}.sock"))
    }

    /// A slice.
    pub fn get(&self, name: &str) -> Result<&Entry, RegistryError> {
        self.slices
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(name.to_string()))
    }

    /// A slice, to change.
    pub fn get_mut(&mut self, name: &str) -> Result<&mut Entry, RegistryError> {
        self.slices
            .get_mut(name)
            .ok_or_else(|| RegistryError::NotFound(name.to_string()))
    }

    /// Every slice, by name.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.slices.values()
    }

    /// Every slice, by name, to change.
    pub fn entries_mut(&mut self) -> impl Iterator<Item = &mut Entry> {
        self.slices.values_mut()
    }

    /// The API view of slice `name`.
    pub fn view(&self, name: &str) -> Result<Slice, RegistryError> {
        let e = self.get(name)?;
        Ok(Slice {
            spec: e.spec.clone(),
            attached: e.attached,
            socket: e
                .attached
                .then(|| self.socket_path(name).display().to_string()),
            board_slot: e.slot,
            backend_pid: e.backend.as_ref().and_then(Backend::pid),
            restarts: e.restarts_before + e.backend.as_ref().map_or(0, Backend::restarts),
        })
    }

    /// The API view of every slice.
    pub fn views(&self) -> Vec<Slice> {
        self.slices
            .keys()
            .filter_map(|n| self.view(n).ok())
            .collect()
    }

    /// Admits and adds a new slice (not attached yet) and saves.
    pub fn create(&mut self, spec: SliceSpec) -> Result<(), RegistryError> {
        if self.slices.contains_key(&spec.name) {
            return Err(AdmissionError::NameTaken(spec.name).into());
        }
        self.admit(&spec, None)?;
        let name = spec.name.clone();
        self.removed.remove(&name);
        self.slices
            .insert(name, Entry::new(spec, false, false, true));
        self.save()
    }

    /// Admits a changed spec for an existing slice and saves. An attached slice's new memory
    /// limit is the caller's to hand to its backend (the board's slot).
    pub fn update(&mut self, spec: SliceSpec) -> Result<(), RegistryError> {
        self.get(&spec.name)?;
        self.admit(&spec, Some(&spec.name))?;
        let e = self.get_mut(&spec.name)?;
        e.spec = spec;
        e.saved = true;
        self.save()
    }

    /// Removes a slice and saves; returns it (its backend and slot are the caller's to free).
    pub fn remove(&mut self, name: &str) -> Result<Entry, RegistryError> {
        let e = self
            .slices
            .remove(name)
            .ok_or_else(|| RegistryError::NotFound(name.to_string()))?;
        if e.from_config {
            self.removed.insert(name.to_string());
        }
        self.save()?;
        Ok(e)
    }

    /// Records whether a slice should be attached, and saves.
    pub fn set_attached(&mut self, name: &str, attached: bool) -> Result<(), RegistryError> {
        let e = self.get_mut(name)?;
        if e.attached == attached {
            return Ok(());
        }
        e.attached = attached;
        e.saved = true;
        self.save()
    }

    /// Reserves a free board slot for slice `name`.
    pub fn take_slot(&mut self, name: &str) -> Result<usize, RegistryError> {
        let i = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(RegistryError::NoFreeSlot)?;
        self.slots[i] = Some(name.to_string());
        Ok(i)
    }

    /// Frees a board slot (once no backend uses it).
    pub fn free_slot(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            *s = None;
        }
    }

    /// Writes the state file: a temporary file, then a rename over the old one.
    fn save(&self) -> Result<(), RegistryError> {
        let state = SavedState {
            version: STATE_VERSION,
            slices: self
                .slices
                .values()
                .filter(|e| e.saved || !e.from_config)
                .map(|e| SavedSlice {
                    spec: e.spec.clone(),
                    attached: e.attached,
                })
                .collect(),
            removed: self.removed.iter().cloned().collect(),
        };
        let save_err = |source| RegistryError::Save {
            path: self.path.clone(),
            source,
        };
        let mut bytes =
            serde_json::to_vec_pretty(&state).map_err(|e| save_err(std::io::Error::other(e)))?;
        bytes.push(b'\n');
        let tmp = self.path.with_extension("json.tmp");
        write_synced(&tmp, &bytes).map_err(save_err)?;
        std::fs::rename(&tmp, &self.path).map_err(save_err)
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slice::SliceClass;

    fn spec(name: &str, pct: u32) -> SliceSpec {
        SliceSpec {
            name: name.into(),
            tenant: "acme".into(),
            gpu: 0,
            class: SliceClass::BestEffort,
            compute_guarantee_pct: pct,
            compute_max_pct: 100,
            memory_guarantee: 0,
            memory_limit: 1 << 30,
            weight: 1,
            attach: false,
        }
    }

    fn config_without_slices() -> Config {
        Config {
            slices: vec![],
            ..Config::default()
        }
    }

    #[test]
    fn created_slices_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config_without_slices();
        let mut r = Registry::open(dir.path(), &cfg).unwrap();
        r.create(spec("a", 40)).unwrap();
        r.set_attached("a", true).unwrap();
        drop(r);
        let r = Registry::open(dir.path(), &cfg).unwrap();
        let a = r.view("a").unwrap();
        assert_eq!(a.spec, spec("a", 40));
        assert!(a.attached);
        assert!(!dir.path().join("slices.json.tmp").exists());
    }

    #[test]
    fn default_slice_comes_from_the_config_and_stays_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::default();
        let mut r = Registry::open(dir.path(), &cfg).unwrap();
        assert!(r.view("default").unwrap().attached);
        let e = r.create(spec("a", 10)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "GPU 0 has 0% of compute left to guarantee; slice a asks 10%."
        );
        r.remove("default").unwrap();
        r.create(spec("a", 10)).unwrap();
        drop(r);
        let r = Registry::open(dir.path(), &cfg).unwrap();
        assert!(matches!(r.get("default"), Err(RegistryError::NotFound(_))));
        assert!(r.get("a").is_ok());
    }

    #[test]
    fn resized_configured_slice_keeps_its_new_size_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::default();
        let mut r = Registry::open(dir.path(), &cfg).unwrap();
        let mut d = r.get("default").unwrap().spec.clone();
        d.compute_guarantee_pct = 70;
        r.update(d).unwrap();
        r.create(spec("a", 30)).unwrap();
        drop(r);
        let r = Registry::open(dir.path(), &cfg).unwrap();
        assert_eq!(r.get("default").unwrap().spec.compute_guarantee_pct, 70);
    }

    #[test]
    fn name_taken_and_unknown_slices_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(dir.path(), &config_without_slices()).unwrap();
        r.create(spec("a", 10)).unwrap();
        let e = r.create(spec("a", 10)).unwrap_err();
        assert_eq!(e.to_string(), "Slice a already exists.");
        assert_eq!(
            r.update(spec("b", 10)).unwrap_err().to_string(),
            "Slice b does not exist."
        );
    }

    #[test]
    fn update_is_admitted_without_counting_the_old_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(dir.path(), &config_without_slices()).unwrap();
        r.create(spec("a", 60)).unwrap();
        r.create(spec("b", 40)).unwrap();
        r.update(spec("a", 50)).unwrap();
        let e = r.update(spec("a", 70)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "GPU 0 has 60% of compute left to guarantee; slice a asks 70%."
        );
    }

    #[test]
    fn memory_limit_of_an_attached_slice_changes_and_is_saved() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(dir.path(), &config_without_slices()).unwrap();
        r.create(spec("a", 10)).unwrap();
        r.set_attached("a", true).unwrap();
        let mut s = spec("a", 10);
        s.memory_limit = 2 << 30;
        r.update(s).unwrap();
        assert_eq!(r.get("a").unwrap().spec.memory_limit, 2 << 30);
        let reopened = Registry::open(dir.path(), &config_without_slices()).unwrap();
        assert_eq!(reopened.get("a").unwrap().spec.memory_limit, 2 << 30);
    }

    #[test]
    fn board_slots_are_handed_out_until_none_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(dir.path(), &config_without_slices()).unwrap();
        for i in 0..vgpu_board::MAX_SLOTS {
            assert_eq!(r.take_slot("x").unwrap(), i);
        }
        assert!(matches!(r.take_slot("x"), Err(RegistryError::NoFreeSlot)));
        r.free_slot(5);
        assert_eq!(r.take_slot("y").unwrap(), 5);
    }

    #[test]
    fn corrupt_state_file_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("slices.json"), "{not json").unwrap();
        let e = Registry::open(dir.path(), &Config::default())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(&format!(
            "Cannot load the slices from {}: ",
            dir.path().join("slices.json").display()
        )));
    }
}
