//! A tiny fork-join pool for the decode hot path.
//!
//! Token-by-token decoding calls a matrix-vector product about 120 times per token, ~100 µs
//! apart. Handing half of each to a rayon worker costs a futex wake-up, because rayon's idle
//! workers go to sleep within microseconds; that hand-off was a fifth of decode time. These
//! workers instead spin for a while after each job (the next one is usually already coming),
//! then park on a condition variable, so a long pause costs no CPU.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_micros(300);

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped once per published job.
    epoch: AtomicU64,
    /// Workers that finished the current job.
    done: AtomicUsize,
    /// Workers parked on `wake`.
    sleepers: AtomicUsize,
    /// The current job; written only by the caller of [`run`] while no worker reads it.
    job: UnsafeCell<Option<Job>>,
    lock: Mutex<()>,
    wake: Condvar,
    /// Serialises callers (two threads must not publish jobs at once).
    caller: Mutex<()>,
}

// SAFETY: `job` is written only while holding `caller`, before `epoch` is bumped (SeqCst), and
// read by workers only after they observe the new epoch and before they bump `done`; the
// writer waits for every `done` before it returns or writes again.
unsafe impl Sync for Shared {}

struct Pool {
    shared: &'static Shared,
    workers: usize,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            epoch: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            caller: Mutex::new(()),
        }));
        let workers = rayon::current_num_threads().saturating_sub(1);
        for index in 1..=workers {
            std::thread::Builder::new()
                .name(format!("candor-decode-{index}"))
                .spawn(move || worker(shared, index))
                .expect("spawn decode worker");
        }
        Pool { shared, workers }
    })
}

fn worker(s: &'static Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        let start = Instant::now();
        while s.epoch.load(SeqCst) == seen {
            if start.elapsed() > SPIN {
                let mut guard = s.lock.lock().expect("pool lock");
                s.sleepers.fetch_add(1, SeqCst);
                while s.epoch.load(SeqCst) == seen {
                    guard = s.wake.wait(guard).expect("pool lock");
                }
                s.sleepers.fetch_sub(1, SeqCst);
                break;
            }
            std::hint::spin_loop();
        }
        seen = s.epoch.load(SeqCst);
        // SAFETY: see `unsafe impl Sync for Shared`; the job outlives this call.
        let job = unsafe { (*s.job.get()).expect("a published job") };
        unsafe { (*job)(index) };
        s.done.fetch_add(1, SeqCst);
    }
}

/// Number of parts [`run`] splits work into (the caller's thread included).
pub fn parts() -> usize {
    pool().workers + 1
}

/// Run `f(0..parts())` with part 0 on the calling thread, and return when all are done.
pub fn run(f: &(dyn Fn(usize) + Sync)) {
    let p = pool();
    if p.workers == 0 {
        return f(0);
    }
    let s = p.shared;
    let _one_caller = s.caller.lock().expect("pool caller lock");
    // SAFETY: no worker reads `job` until the epoch below changes; we wait for all of them
    // to finish before `f` goes out of scope. The lifetime is erased only for this window.
    unsafe { *s.job.get() = Some(std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f)) };
    s.done.store(0, SeqCst);
    s.epoch.fetch_add(1, SeqCst);
    if s.sleepers.load(SeqCst) > 0 {
        let _guard = s.lock.lock().expect("pool lock");
        s.wake.notify_all();
    }
    f(0);
    while s.done.load(SeqCst) < p.workers {
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_exactly_once_per_call() {
        for _ in 0..1000 {
            let hits: Vec<AtomicUsize> = (0..parts()).map(|_| AtomicUsize::new(0)).collect();
            run(&|i| {
                hits[i].fetch_add(1, SeqCst);
            });
            assert!(hits.iter().all(|h| h.load(SeqCst) == 1));
        }
        std::thread::sleep(Duration::from_millis(2)); // let workers park, then wake them
        let total = AtomicUsize::new(0);
        run(&|_| {
            total.fetch_add(1, SeqCst);
        });
        assert_eq!(total.load(SeqCst), parts());
    }
}
