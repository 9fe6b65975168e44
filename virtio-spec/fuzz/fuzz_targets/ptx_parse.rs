//! The backend's PTX parser on arbitrary bytes (module images come from the
//! guest): never panics, and every layout it returns is self-consistent.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vgpu_backend::gpu::ptx;

fuzz_target!(|data: &[u8]| {
    let _ = ptx::image_kind(data);
    let _ = ptx::binary_fits(data);
    if let Ok(module) = ptx::parse(data) {
        for entry in &module.entries {
            let mut end = 0u64;
            for p in &entry.params {
                let p_end = u64::from(p.offset) + u64::from(p.size);
                assert!(
                    u64::from(p.offset) >= end,
                    "parameters overlap in {}",
                    entry.name
                );
                end = p_end;
            }
            assert_eq!(u64::from(entry.param_bytes()), end);
        }
    }
});
