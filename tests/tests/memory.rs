//! Elastic memory end to end on the emulated device: the scheduler reclaims a slice's device
//! memory (its backend workers freeze it, swap its chunks out to host memory and unmap them)
//! and restores it (mapped back at the same addresses), many times, while its guests' patterns
//! must survive byte for byte; a reclaimed guest is held, not failed; a guest that disconnects
//! while swapped out frees everything.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use vgpu_tests::{build_c_program, client_command, poll_until, Client, SchedulerProcess};

const WAIT: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

fn config() -> String {
    let slice = |name: &str, class: &str, guarantee: &str| {
        format!(
            "[[slice]]\nname = \"{name}\"\ntenant = \"t-{name}\"\nclass = \"{class}\"\n\
             compute_guarantee_pct = 30\nmemory_guarantee = \"{guarantee}\"\n\
             memory_limit = \"256MiB\"\nattach = true\n\n"
        )
    };
    format!(
        "device = \"emulated\"\n\n[[gpu]]\nindex = 0\nmemory = \"1GiB\"\n\n{}{}",
        slice("be", "best-effort", "0MiB"),
        slice("lc", "latency-critical", "256MiB")
    )
}

fn tenant(socket: &Path) -> Client {
    let mut c = Client::spawn(client_command(&build_c_program("memory_client"), socket));
    c.wait_for_line("READY", WAIT);
    c
}

/// Sends `cmd` and returns the first number on its answer line.
fn ask(client: &mut Client, cmd: &str, answer: &str) -> u64 {
    client.send_line(cmd);
    let line = client.wait_for_line(answer, WAIT);
    line[answer.len()..]
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .parse()
        .unwrap_or_else(|e| panic!("Bad line {line:?}: {e}"))
}

/// The `/v1/memory` entry of a slice.
fn memory(sched: &SchedulerProcess, name: &str) -> Value {
    let (status, body) = sched
        .request("GET", "/v1/memory", None)
        .unwrap_or_else(|| panic!("The scheduler's API does not answer\n{}", sched.log()));
    assert_eq!(status, 200, "{body}");
    let all: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("Bad JSON {body}: {e}"));
    all.as_array()
        .and_then(|a| a.iter().find(|m| m["name"] == name).cloned())
        .unwrap_or_else(|| panic!("No slice {name} in {body}"))
}

/// `tenant`'s billed memory, (resident, swapped) byte-ns, summed from `GET /v1/usage`.
fn billed_memory(sched: &SchedulerProcess, tenant: &str) -> (u128, u128) {
    let (status, body) = sched
        .request(
            "GET",
            &format!("/v1/usage?tenant={tenant}&format=csv"),
            None,
        )
        .unwrap_or_else(|| panic!("The scheduler's API does not answer\n{}", sched.log()));
    assert_eq!(status, 200, "{body}");
    let mut lines = body.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("No column {name} in {header:?}"))
    };
    let (resident, swapped) = (col("mem_resident_byte_ns"), col("mem_swapped_byte_ns"));
    lines
        .filter(|l| !l.is_empty())
        .fold((0, 0), |(r, s), line| {
            let f: Vec<&str> = line.split(',').collect();
            (
                r + f[resident].parse::<u128>().expect("resident byte-ns"),
                s + f[swapped].parse::<u128>().expect("swapped byte-ns"),
            )
        })
}

fn post(sched: &SchedulerProcess, path: &str) -> Value {
    let (status, body) = sched
        .request("POST", path, None)
        .unwrap_or_else(|| panic!("The scheduler's API does not answer\n{}", sched.log()));
    assert_eq!(status, 200, "POST {path}: {body}\n{}", sched.log());
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("Bad JSON {body}: {e}"))
}

#[test]
fn a_reclaimed_slice_keeps_every_byte_through_many_swap_cycles_and_its_neighbour_runs_on() {
    let sched = SchedulerProcess::spawn(&config());
    let be = sched.wait_for_slice("be");
    let lc = sched.wait_for_slice("lc");
    // Two guest processes on the victim slice (two workers), one on the other slice.
    let mut a = tenant(&be);
    let mut b = tenant(&be);
    let mut other = tenant(&lc);
    assert!(ask(&mut a, "alloc 3 4", "ALLOCATED") >= 12 * MIB);
    assert!(ask(&mut b, "alloc 5 2", "ALLOCATED") >= 10 * MIB);
    assert!(ask(&mut other, "alloc 2 3", "ALLOCATED") >= 6 * MIB);
    poll_until(WAIT, "both slices' memory to be published", || {
        (memory(&sched, "be")["resident"].as_u64()? >= 22 * MIB
            && memory(&sched, "lc")["resident"].as_u64()? >= 6 * MIB)
            .then_some(())
    });

    for round in 1..=5u64 {
        let done = post(&sched, "/v1/slices/be/reclaim");
        assert!(done["bytes"].as_u64().unwrap() >= 22 * MIB, "{done}");
        let m = memory(&sched, "be");
        assert_eq!(m["resident"], 0, "{m}");
        assert!(m["swapped"].as_u64().unwrap() >= 22 * MIB, "{m}");
        assert!(m["reclaims"].as_u64().unwrap() >= round, "{m}");
        assert!(memory(&sched, "lc")["resident"].as_u64().unwrap() >= 6 * MIB);

        // The victim is frozen: its guest waits (no error), its neighbour slice runs.
        a.send_line("sample");
        assert_eq!(
            a.try_line("SAMPLED", Duration::from_millis(300)),
            None,
            "a frozen guest must wait"
        );
        assert!(ask(&mut other, "verify", "VERIFIED ") > 0);

        post(&sched, "/v1/slices/be/restore");
        assert!(a.wait_for_line("SAMPLED", WAIT)["SAMPLED ".len()..].trim() != "0");
        for c in [&mut a, &mut b] {
            assert!(ask(c, "verify", "VERIFIED ") > 0, "round {round}");
            ask(c, &format!("fill {round}"), "FILLED ");
        }
        let m = memory(&sched, "be");
        assert_eq!(m["swapped"], 0, "{m}");
    }
    for c in [a, b, other] {
        let mut c = c;
        c.send_line("stop");
        c.wait(WAIT).assert_passed();
    }
}

#[test]
fn a_guest_that_disconnects_while_swapped_out_frees_everything() {
    let sched = SchedulerProcess::spawn(&config());
    let be = sched.wait_for_slice("be");
    let mut a = tenant(&be);
    ask(&mut a, "alloc 4 8", "ALLOCATED");
    poll_until(WAIT, "the memory to be published", || {
        (memory(&sched, "be")["resident"].as_u64()? >= 32 * MIB).then_some(())
    });
    let reclaim_started = std::time::Instant::now();
    post(&sched, "/v1/slices/be/reclaim");
    assert!(memory(&sched, "be")["swapped"].as_u64().unwrap() >= 32 * MIB);
    // While swapped out the session is billed swapped GiB·s, not resident ones: from one
    // report to the next, the swapped integral grows and the resident one does not.
    let (resident_1, swapped_1) = poll_until(WAIT, "the ledger to bill swapped memory", || {
        let (resident, swapped) = billed_memory(&sched, "t-be");
        (swapped > 0).then_some((resident, swapped))
    });
    let (resident_2, swapped_2) = poll_until(WAIT, "the next report", || {
        let (resident, swapped) = billed_memory(&sched, "t-be");
        (swapped > swapped_1).then_some((resident, swapped))
    });
    let bound = u128::from(34 * MIB) * reclaim_started.elapsed().as_nanos();
    assert!(
        swapped_2 <= bound,
        "{swapped_2} byte-ns swapped is more than was held: {bound}"
    );
    assert_eq!(
        resident_2, resident_1,
        "a swapped-out session is still billed resident memory"
    );
    a.kill();
    poll_until(WAIT, "the dead guest's swapped memory to be freed", || {
        let m = memory(&sched, "be");
        (m["swapped"] == 0 && m["resident"] == 0).then_some(())
    });
    post(&sched, "/v1/slices/be/restore");
    // The whole limit is free again for a new guest.
    let mut fresh = tenant(&be);
    fresh.send_line("meminfo");
    let line = fresh.wait_for_line("MEMINFO", WAIT);
    let nums: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(
        nums[0], nums[1],
        "free == total after the swapped guest left: {line}"
    );
    assert!(ask(&mut fresh, "alloc 64 3", "ALLOCATED") >= 192 * MIB);
    assert!(ask(&mut fresh, "verify", "VERIFIED ") > 0);
    fresh.send_line("stop");
    fresh.wait(WAIT).assert_passed();
}

/// Two slices on one emulated GPU of 400 MiB (a budget every backend on it shares, as the
/// memory of a real GPU).
fn claim_config() -> String {
    "device = \"emulated\"\n\n[[gpu]]\nindex = 0\nmemory = \"400MiB\"\n\n\
     [[slice]]\nname = \"be\"\ntenant = \"t-be\"\nclass = \"best-effort\"\n\
     compute_guarantee_pct = 30\nmemory_guarantee = \"0MiB\"\nmemory_limit = \"300MiB\"\n\
     attach = true\n\n\
     [[slice]]\nname = \"lc\"\ntenant = \"t-lc\"\nclass = \"latency-critical\"\n\
     compute_guarantee_pct = 30\nmemory_guarantee = \"256MiB\"\nmemory_limit = \"256MiB\"\n\
     attach = true\n"
        .to_string()
}

#[test]
fn a_full_gpu_reclaims_a_best_effort_slice_for_a_claim_within_a_guarantee_and_gives_it_back() {
    let sched = SchedulerProcess::spawn(&claim_config());
    let be = sched.wait_for_slice("be");
    let lc = sched.wait_for_slice("lc");
    let mut burst = tenant(&be);
    let mut guaranteed = tenant(&lc);
    assert!(ask(&mut burst, "alloc 64 4", "ALLOCATED") >= 256 * MIB);
    assert!(ask(&mut guaranteed, "alloc 64 1", "ALLOCATED") >= 64 * MIB);

    // 128 MiB more for lc do not fit on the GPU next to be's 256 MiB; lc is within its
    // guarantee, be above its own (0): be is reclaimed and lc's allocations succeed.
    let got = ask(&mut guaranteed, "alloc 64 2", "ALLOCATED");
    assert!(got >= 128 * MIB, "lc got {got}\n{}", sched.log());
    let m = memory(&sched, "be");
    assert_eq!(m["evicted"], true, "{m}");
    assert_eq!(m["resident"], 0, "{m}");
    assert!(m["swapped"].as_u64().unwrap() >= 256 * MIB, "{m}");
    assert!(ask(&mut guaranteed, "verify", "VERIFIED ") > 0);

    // be is frozen meanwhile, with no error.
    burst.send_line("sample");
    assert_eq!(burst.try_line("SAMPLED", Duration::from_millis(300)), None);

    // Once lc frees its memory, be fits again and comes back by itself, every byte intact.
    guaranteed.send_line("free");
    guaranteed.wait_for_line("FREED", WAIT);
    assert!(burst.wait_for_line("SAMPLED", WAIT)["SAMPLED ".len()..].trim() != "0");
    assert!(ask(&mut burst, "verify", "VERIFIED ") > 0);
    let m = memory(&sched, "be");
    assert_eq!(
        (m["evicted"].as_bool(), m["swapped"].as_u64()),
        (Some(false), Some(0)),
        "{m}"
    );
    for mut c in [burst, guaranteed] {
        c.send_line("stop");
        c.wait(WAIT).assert_passed();
    }
}

fn patch_limit(sched: &SchedulerProcess, name: &str, limit: &str) {
    let body = format!("{{\"memory_limit\":\"{limit}\"}}");
    let (status, answer) = sched
        .request("PATCH", &format!("/v1/slices/{name}"), Some(&body))
        .unwrap_or_else(|| panic!("The scheduler's API does not answer\n{}", sched.log()));
    assert_eq!(
        status,
        200,
        "PATCH {name} {body}: {answer}\n{}",
        sched.log()
    );
}

/// The guest's (free, total) from `cuMemGetInfo`.
fn meminfo(client: &mut Client) -> (u64, u64) {
    client.send_line("meminfo");
    let line = client.wait_for_line("MEMINFO", WAIT);
    let nums: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|n| n.parse().expect("a MEMINFO number"))
        .collect();
    (nums[0], nums[1])
}

#[test]
fn resizing_an_attached_slice_changes_its_limit_live_and_keeps_every_byte() {
    let sched = SchedulerProcess::spawn(&config());
    let be = sched.wait_for_slice("be");
    let mut a = tenant(&be);
    let mut b = tenant(&be);
    assert!(ask(&mut a, "alloc 64 3", "ALLOCATED") >= 192 * MIB);
    assert!(ask(&mut b, "alloc 8 2", "ALLOCATED") >= 16 * MIB);
    // 208 MiB and more of 256 MiB are taken: 96 MiB more is refused.
    assert_eq!(ask(&mut a, "tryalloc 96", "TRIED "), 2, "OUT_OF_MEMORY");

    // Grown while attached: both guests see the new limit, and the allocation fits.
    patch_limit(&sched, "be", "512MiB");
    for c in [&mut a, &mut b] {
        poll_until(WAIT, "the guest to see the new limit", || {
            (meminfo(c).1 == 512 * MIB).then_some(())
        });
    }
    assert_eq!(ask(&mut a, "tryalloc 96", "TRIED "), 0);
    assert_eq!(memory(&sched, "be")["limit"], 512 * MIB);

    // Reclaimed and restored at the new size: every byte survives.
    post(&sched, "/v1/slices/be/reclaim");
    assert!(memory(&sched, "be")["swapped"].as_u64().unwrap() >= 300 * MIB);
    post(&sched, "/v1/slices/be/restore");
    for c in [&mut a, &mut b] {
        assert!(ask(c, "verify", "VERIFIED ") > 0);
    }

    // Shrunk below what the slice holds: nothing is lost, new allocations are refused until
    // the slice fits again.
    patch_limit(&sched, "be", "128MiB");
    poll_until(WAIT, "the guest to see the smaller limit", || {
        (meminfo(&mut a) == (0, 128 * MIB)).then_some(())
    });
    assert_eq!(ask(&mut b, "tryalloc 1", "TRIED "), 2, "OUT_OF_MEMORY");
    for c in [&mut a, &mut b] {
        assert!(ask(c, "verify", "VERIFIED ") > 0);
    }
    a.send_line("free");
    a.wait_for_line("FREED", WAIT);
    assert_eq!(ask(&mut b, "tryalloc 64", "TRIED "), 0);
    assert!(ask(&mut b, "verify", "VERIFIED ") > 0);
    for c in [a, b] {
        let mut c = c;
        c.send_line("stop");
        c.wait(WAIT).assert_passed();
    }
}

#[test]
fn a_guest_busy_with_requests_when_reclaimed_stays_swapped_out_until_restored() {
    // Backends poll their queues for 200 ms after each batch, as a fast host's do for 50 µs
    // between a guest's back-to-back calls: the reclaim comes while a queue is being polled.
    let sched = SchedulerProcess::spawn_with_env(&config(), &[("VGPU_POLL_US", "200000")]);
    let be = sched.wait_for_slice("be");
    let mut a = tenant(&be);
    assert!(ask(&mut a, "alloc 8 2", "ALLOCATED") >= 16 * MIB);
    poll_until(WAIT, "the memory to be published", || {
        (memory(&sched, "be")["resident"].as_u64()? >= 16 * MIB).then_some(())
    });
    // The guest sends request after request: its queue is being polled between batches when
    // the reclaim comes, and must stop there, not swap its memory back in.
    a.send_line("hammer 3000");
    a.wait_for_line("TICK", WAIT);
    post(&sched, "/v1/slices/be/reclaim");
    // Ticks printed before the freeze may still be in the pipe; then none may come.
    let mut stalled = false;
    for _ in 0..100 {
        if a.try_line("TICK", Duration::from_millis(100)).is_none() {
            stalled = true;
            break;
        }
    }
    assert!(stalled, "a reclaimed guest kept running");
    for _ in 0..6 {
        assert_eq!(
            a.try_line("TICK", Duration::from_millis(50)),
            None,
            "a frozen guest ran"
        );
        let m = memory(&sched, "be");
        assert_eq!(m["resident"], 0, "a frozen slice's memory came back: {m}");
        assert!(m["swapped"].as_u64().unwrap() >= 16 * MIB, "{m}");
    }
    post(&sched, "/v1/slices/be/restore");
    assert!(memory(&sched, "be")["resident"].as_u64().unwrap() >= 16 * MIB);
    assert!(a.wait_for_line("HAMMERED", WAIT)["HAMMERED ".len()..].trim() != "0");
    assert!(ask(&mut a, "verify", "VERIFIED ") > 0);
    a.send_line("stop");
    a.wait(WAIT).assert_passed();
}
