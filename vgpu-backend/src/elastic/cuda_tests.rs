//! Tests of `cuda.rs`. The GPU ones run only where a real GPU is present:
//! `cargo test -p vgpu-backend elastic -- --ignored --nocapture`.

use std::time::Instant;

use super::*;
use crate::gpu::cuda::CudaGpu;
use crate::gpu::{Gpu, LaunchConfig};
use crate::testutil::{host, read};

fn slot(i: usize) -> *mut u8 {
    (0x1000_0000usize + i * CHUNK as usize) as *mut u8
}

#[test]
fn copies_merge_chunks_contiguous_on_both_sides_up_to_the_longest_copy() {
    let none = |_| false;
    // An extent of 6 chunks with host slots 0,1,2,3 then 5,7: copies of 4, 1 and 1.
    let slots = [slot(0), slot(1), slot(2), slot(3), slot(5), slot(7)];
    let pairs = pairs_of(8 * CHUNK, &slots);
    assert_eq!(pairs[4], (12 * CHUNK, slot(5)));
    assert_eq!(
        CudaChunks::copies(&pairs, none),
        vec![(0, 4), (4, 1), (5, 1)]
    );
    assert!(CudaChunks::copies(&[], none).is_empty());
    let slots: Vec<*mut u8> = (0..40).map(slot).collect();
    assert_eq!(
        CudaChunks::copies(&pairs_of(0, &slots), none),
        vec![(0, 16), (16, 16), (32, 8)],
        "copies stop at MAX_COPY so every stream gets work"
    );
    assert_eq!(MAX_COPY, 32 << 20);
}

#[test]
fn copies_never_run_from_one_pinned_slab_into_the_next() {
    // Host slots 0..8 are contiguous, but a second slab starts at slot 3.
    let slots: Vec<*mut u8> = (0..8).map(slot).collect();
    let copies = CudaChunks::copies(&pairs_of(0, &slots), |p| p == slot(3));
    assert_eq!(copies, vec![(0, 3), (3, 5)]);
}

#[test]
fn every_symbol_is_listed_once() {
    let mut names = SYMBOLS.to_vec();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), SYMBOLS.len());
}

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

fn open() -> CudaGpu {
    assert!(
        enabled_by_env(),
        "unset VGPU_ELASTIC to test elastic memory"
    );
    CudaGpu::open(0).expect("open device 0")
}

/// Bytes of allocations from 1 byte to several chunks survive swap cycles interleaved with
/// frees and new allocations, pointers never move, and a kernel works on restored memory.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn real_gpu_elastic_memory_keeps_every_byte_across_swap_cycles() {
    let gpu = open().with_heap_capacity(1 << 30);
    let mut ctx = gpu.create_context(0).unwrap();
    let sizes = [1usize, 100, 4096, 1 << 20, (2 << 20) + 12345, 7 << 20];
    let mut live: Vec<(u64, usize, u32)> = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let d = ctx.mem_alloc(size as u64).unwrap();
        assert_eq!(d % 512, 0);
        if size >= CHUNK as usize {
            assert_eq!(d % CHUNK, 0, "large allocations start on a chunk");
        }
        let mut data = pattern(i as u32, size);
        ctx.memcpy_htod(d, &[host(&mut data)], None, false, false)
            .unwrap();
        live.push((d, size, i as u32));
    }
    let usage = ctx.memory_usage();
    assert!(
        // 1 + 100 + 4096 + 1 MiB share chunk 0; 2 MiB + 12345 has an extent of chunks 1-2
        // and 7 MiB one of chunks 3-6 (its tail chunk not shared).
        usage.resident == 7 * CHUNK && usage.swapped == 0,
        "{usage:?}"
    );
    for cycle in 0..8u32 {
        let moved = ctx.swap_out().unwrap();
        let usage = ctx.memory_usage();
        assert_eq!((usage.resident, usage.swapped), (0, moved));
        if cycle % 2 == 1 {
            let (d, _, _) = live.remove(0);
            ctx.mem_free(d).unwrap(); // freed while swapped out
        }
        assert_eq!(ctx.swap_in().unwrap(), ctx.memory_usage().resident);
        let seed = 100 + cycle;
        let size = 3 << 20;
        let d = ctx.mem_alloc(size as u64).unwrap();
        let mut data = pattern(seed, size);
        ctx.memcpy_htod(d, &[host(&mut data)], None, false, false)
            .unwrap();
        live.push((d, size, seed));
        for &(d, size, seed) in &live {
            assert!(
                read(&mut ctx, d, size) == pattern(seed, size),
                "lost {d:#x}"
            );
        }
    }
    // A kernel reads and writes restored memory.
    let (d, size, seed) = live[live.len() - 1];
    ctx.swap_out().unwrap();
    ctx.swap_in().unwrap();
    // `add_one(p, n)` adds 1 to `n` u32s at `p`: kernels read and write restored chunks.
    let m = ctx
        .module_load(crate::gpu::cuda::tests::PTX.as_bytes())
        .unwrap();
    let (f, layout) = ctx.get_function(m, "add_one").unwrap();
    let n = (size / 4) as u32;
    let mut params = d.to_le_bytes().to_vec();
    params.extend_from_slice(&n.to_le_bytes());
    let config = LaunchConfig {
        grid: [n.div_ceil(256), 1, 1],
        block: [256, 1, 1],
        shared_mem: 0,
    };
    ctx.launch(f, config, None, &params, &layout).unwrap();
    ctx.synchronize().unwrap();
    let expected: Vec<u8> = pattern(seed, size)
        .chunks_exact(4)
        .flat_map(|w| {
            let v = u32::from_le_bytes(w.try_into().unwrap());
            v.wrapping_add(1).to_le_bytes()
        })
        .collect();
    assert!(read(&mut ctx, d, size) == expected);
    for (d, _, _) in live {
        ctx.mem_free(d).unwrap();
    }
    assert_eq!(ctx.memory_usage().resident, 0);
}

/// A freed large extent's physical memory comes back zeroed in the next allocation, whole:
/// the zeroing memset covers every chunk of the extent.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn real_gpu_new_extents_read_as_zeros_after_a_freed_one_held_data() {
    let gpu = open().with_heap_capacity(1 << 30);
    let mut ctx = gpu.create_context(0).unwrap();
    let size = (64usize << 20) + 4096;
    for round in 0..3u32 {
        let d = ctx.mem_alloc(size as u64).unwrap();
        assert_eq!(d % CHUNK, 0);
        assert_eq!(ctx.memory_usage().resident, 33 * CHUNK);
        assert!(
            read(&mut ctx, d, size).iter().all(|&b| b == 0),
            "round {round}: a new extent is not zeroed"
        );
        ctx.memset(d, 0xab, 1, size as u64, None, false).unwrap();
        ctx.mem_free(d).unwrap();
        assert_eq!(ctx.memory_usage().resident, 0);
    }
}

/// With the swap reserve, host memory is pinned while the context holds device memory, so a
/// swap-out pins nothing; freed memory's reserve is given back.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn real_gpu_swap_reserve_pins_ahead_and_gives_back() {
    let gpu = open()
        .with_heap_capacity(1 << 30)
        .with_swap_reserve()
        .unwrap();
    let mut ctx = gpu.create_context(0).unwrap();
    let size = 256usize << 20;
    let d = ctx.mem_alloc(size as u64).unwrap();
    let mut data = pattern(7, size);
    ctx.memcpy_htod(d, &[host(&mut data)], None, false, false)
        .unwrap();
    let start = Instant::now();
    while gpu.swap_reserve_bytes() < size as u64 {
        assert!(start.elapsed().as_secs() < 30, "the reserve never filled");
        std::thread::yield_now();
    }
    let ready = start.elapsed();
    let before = gpu.swap_reserve_bytes();
    let t = Instant::now();
    let moved = ctx.swap_out().unwrap();
    let out = t.elapsed();
    assert_eq!(
        gpu.swap_reserve_bytes(),
        before,
        "a swap-out with a full reserve pins nothing"
    );
    ctx.swap_in().unwrap();
    assert!(read(&mut ctx, d, size) == data);
    println!(
        "reserve of {before} bytes ready in {ready:?}; swap-out of {moved} bytes {:.1} GB/s",
        moved as f64 / out.as_secs_f64() / 1e9
    );
    ctx.mem_free(d).unwrap();
    let start = Instant::now();
    while gpu.swap_reserve_bytes() > 2 * SLAB_CHUNKS as u64 * CHUNK {
        assert!(
            start.elapsed().as_secs() < 30,
            "the reserve was never given back"
        );
        std::thread::yield_now();
    }
}

/// Work in a swapped-out context (a copy, a memset) swaps it in first.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn real_gpu_work_in_a_swapped_out_context_brings_its_memory_back() {
    let gpu = open().with_heap_capacity(256 << 20);
    let mut ctx = gpu.create_context(0).unwrap();
    let d = ctx.mem_alloc(1 << 20).unwrap();
    ctx.memset(d, 0x5a, 1, 1 << 20, None, false).unwrap();
    ctx.swap_out().unwrap();
    assert_eq!(ctx.memory_usage().resident, 0);
    assert_eq!(read(&mut ctx, d, 16), vec![0x5a; 16]);
    assert_eq!(ctx.memory_usage().resident, CHUNK);
    ctx.swap_out().unwrap();
    ctx.memset(d, 0x11, 1, 8, None, false).unwrap();
    assert_eq!(read(&mut ctx, d, 9), [vec![0x11; 8], vec![0x5a]].concat());
}

/// Fills the device from another context so a swapped-out one cannot come back: it stays
/// swapped out with its bytes, and comes back once the memory is free.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn real_gpu_swap_in_without_memory_stays_swapped_and_recovers() {
    let gpu = open();
    let mut ctx = gpu.create_context(0).unwrap();
    let size = 256usize << 20;
    let d = ctx.mem_alloc(size as u64).unwrap();
    let mut data = pattern(9, size);
    ctx.memcpy_htod(d, &[host(&mut data)], None, false, false)
        .unwrap();
    assert_eq!(ctx.swap_out().unwrap(), size as u64);

    let mut hog = gpu.create_context(0).unwrap();
    let mut held = 0u64;
    for step in [1u64 << 30, 64 << 20, CHUNK] {
        while hog.mem_alloc(step).is_ok() {
            held += step;
        }
    }
    eprintln!("filled the device with {} MiB", held >> 20);
    assert_eq!(ctx.swap_in(), Err(Status::OUT_OF_MEMORY));
    let usage = ctx.memory_usage();
    assert_eq!((usage.resident, usage.swapped), (0, size as u64));
    drop(hog);
    assert_eq!(ctx.swap_in().unwrap(), size as u64);
    assert!(read(&mut ctx, d, size) == data);
}

/// Swap throughput: `VGPU_SWAP_BENCH_MIB` (default 4096) MiB out and in, five times (the first
/// swap-out also pins its host memory: no swap reserve here). Goal: at least 40 GB/s each way
/// with a warm pool, the median of the four warm cycles (one cycle's swap-in measured 37.6
/// between two of 50: the driver's map calls vary).
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn real_gpu_swap_moves_at_least_40_gb_per_second_when_warm() {
    let mib: u64 = std::env::var("VGPU_SWAP_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4096);
    let gpu = open().with_heap_capacity(mib << 20);
    let mut ctx = gpu.create_context(0).unwrap();
    let mut allocs = Vec::new();
    for i in 0..mib.div_ceil(256) {
        let size = (256u64 << 20).min((mib << 20) - i * (256 << 20));
        let d = ctx.mem_alloc(size).unwrap();
        ctx.memset(d, i as u32 + 1, 4, size / 4, None, false)
            .unwrap();
        allocs.push((d, size, i as u32 + 1));
    }
    let gbps = |bytes: u64, t: Instant| bytes as f64 / t.elapsed().as_secs_f64() / 1e9;
    let (mut warm_out, mut warm_in) = (Vec::new(), Vec::new());
    for cycle in 0..5 {
        let t = Instant::now();
        let out = ctx.swap_out().unwrap();
        let out_rate = gbps(out, t);
        let t = Instant::now();
        let back = ctx.swap_in().unwrap();
        let in_rate = gbps(back, t);
        assert_eq!(out, back);
        eprintln!(
            "cycle {cycle}: {} MiB out {out_rate:.1} GB/s, in {in_rate:.1} GB/s",
            out >> 20
        );
        if cycle > 0 {
            warm_out.push(out_rate);
            warm_in.push(in_rate);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    let warm = (median(&mut warm_out), median(&mut warm_in));
    for &(d, size, value) in &allocs {
        let bytes = read(&mut ctx, d, size as usize);
        let ok = bytes
            .chunks_exact(4)
            .all(|w| u32::from_le_bytes(w.try_into().unwrap()) == value);
        assert!(ok, "allocation {d:#x} lost its bytes");
    }
    assert!(
        warm.0 >= 40.0 && warm.1 >= 40.0,
        "warm swap out {:.1} GB/s, in {:.1} GB/s (medians): below 40",
        warm.0,
        warm.1
    );
}
