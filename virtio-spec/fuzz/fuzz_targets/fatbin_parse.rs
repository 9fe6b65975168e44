//! The fatbin parser and its decompressors on arbitrary bytes (fatbins come
//! from the guest): never panics, entries lie inside the input, and
//! decompression stays within its limit.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vgpu_spec::fatbin;

const LIMIT: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let _ = fatbin::Wrapper::parse(data);
    if let Ok(all) = fatbin::parse_all(data) {
        let total: usize = all.iter().map(|f| f.len).sum();
        assert!(total <= data.len());
        for f in &all {
            for entry in &f.entries {
                if let Ok(contents) = entry.contents(LIMIT) {
                    assert!(contents.len() <= LIMIT);
                }
            }
        }
    }
    let _ = fatbin::extract_ptx(data);
});
