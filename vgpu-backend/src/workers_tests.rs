use super::*;
use crate::config::DeviceSpec;
use std::sync::mpsc;

/// A pool whose "workers" are shell scripts (`$1` is the worker index).
fn pool(dir: &tempfile::TempDir, script: &'static str) -> WorkerPool {
    let config =
        BackendConfig::new(dir.path().join("s.sock"), DeviceSpec::Emulated).memory_limit(1 << 20);
    WorkerPool::new(
        &config,
        1,
        Box::new(move |index| {
            let mut c = Command::new("/bin/sh");
            c.args(["-c", script, "worker", &index.to_string()]);
            c
        }),
    )
    .unwrap()
}

fn run_in_thread(pool: WorkerPool) -> (PoolStopHandle, mpsc::Receiver<Result<(), Error>>) {
    let stop = pool.stop_handle();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(pool.run()).unwrap());
    (stop, rx)
}

#[test]
fn a_first_worker_that_cannot_start_fails_the_backend_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (_stop, rx) = run_in_thread(pool(&dir, "exit 3"));
    let result = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the pool gave up");
    assert!(matches!(result, Err(Error::Workers(_))), "{result:?}");
}

#[test]
fn workers_get_the_socket_the_counters_and_the_pipe_and_are_stopped_with_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let marks = dir.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    // The worker checks its descriptors, says READY (0x40 | index), and waits to be stopped;
    // on SIGTERM it leaves a mark.
    let script: &'static str = Box::leak(
        format!(
            "readlink /proc/$$/fd/3 | grep -q socket || exit 7; \
             readlink /proc/$$/fd/4 | grep -q memfd || exit 8; \
             trap 'touch {}/stopped-$1; exit 0' TERM; \
             printf '\\100' >&5; while :; do sleep 0.01; done",
            marks.display()
        )
        .into_boxed_str(),
    );
    let (stop, rx) = run_in_thread(pool(&dir, script));
    // Exactly one warm worker, ready, not failing.
    assert!(
        rx.recv_timeout(Duration::from_millis(600)).is_err(),
        "the pool must keep running"
    );
    stop.stop();
    let result = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the pool stopped");
    assert!(result.is_ok(), "{result:?}");
    let stopped: Vec<_> = std::fs::read_dir(&marks).unwrap().collect();
    assert_eq!(stopped.len(), 1, "one warm worker, stopped with SIGTERM");
    assert!(!dir.path().join("s.sock").exists(), "the socket is removed");
}

#[test]
fn a_worker_that_took_a_connection_is_replaced_by_a_new_warm_one() {
    let dir = tempfile::tempdir().unwrap();
    let marks = dir.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    // Worker 0 says READY then ACCEPTED (0x80) and ends; the next one records its index.
    let script: &'static str = Box::leak(
        format!(
            "touch {}/started-$1; \
             if [ \"$1\" = 0 ]; then printf '\\100\\200' >&5; exit 0; fi; \
             printf '\\101' >&5; trap 'exit 0' TERM; while :; do sleep 0.01; done",
            marks.display()
        )
        .into_boxed_str(),
    );
    let (stop, rx) = run_in_thread(pool(&dir, script));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !marks.join("started-1").exists() {
        assert!(Instant::now() < deadline, "no replacement worker started");
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.stop();
    assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap().is_ok());
    assert!(
        !marks.join("started-2").exists(),
        "worker 0 ended normally, so index 0 was reused or 1 taken: never a third"
    );
}

#[test]
fn notifications_name_their_worker() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = pool(&dir, "exit 0");
    p.workers.insert(
        9,
        Worker {
            child: Command::new("/bin/true").spawn().unwrap(),
            ready: false,
            accepted: false,
        },
    );
    p.note(READY | 9);
    assert!(p.workers[&9].ready && !p.workers[&9].accepted);
    p.note(ACCEPTED | 9);
    assert!(p.workers[&9].accepted);
    p.note(ACCEPTED | 10); // an unknown worker is ignored
    assert!(p.ever_ready);
    let _ = p.workers.get_mut(&9).unwrap().child.wait();
}
