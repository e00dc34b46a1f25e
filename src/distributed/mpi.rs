//! The MPI backend (rsmpi over the system's MPI): non-blocking collectives polled against a
//! deadline. A collective still open at the deadline asks every other rank whether it is alive
//! (a point-to-point ping that ranks answer while they wait in a collective), prints which
//! ranks did not answer, and aborts the job, so a stopped or hung rank ends the run with its
//! name instead of a hang.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use mpi::collective::SystemOperation;
use mpi::request::{Request, Scope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::Collective;

/// Tag of the liveness question a timed-out rank sends.
const PING: i32 = 0x7a01;
/// Tag of the answer.
const PONG: i32 = 0x7a02;

/// The world communicator of an `mpirun` launch.
pub struct Mpi {
    world: SimpleCommunicator,
    timeout: Duration,
    // Dropped last: finalizes MPI.
    _universe: mpi::environment::Universe,
}

impl Mpi {
    /// Initialize MPI (once per process); collectives wait at most `timeout`.
    pub fn init(timeout: Duration) -> Result<Self> {
        let Some((universe, _)) = mpi::initialize_with_threading(mpi::Threading::Funneled) else {
            bail!("MPI was already initialized in this process");
        };
        Ok(Self { world: universe.world(), timeout, _universe: universe })
    }

    /// Poll `request` until it completes; past the deadline, report and abort.
    fn wait<'a, D: ?Sized, S: Scope<'a>>(&self, request: Request<'a, D, S>, what: &str) {
        let start = Instant::now();
        let mut pending = Some(request);
        let done = || match pending.take().map(Request::test) {
            Some(Err(still)) => {
                pending = Some(still);
                Ok(false)
            }
            _ => Ok(true),
        };
        let chores = || {
            self.answer_pings();
            if start.elapsed() > self.timeout {
                self.timed_out(what); // aborts: the pending request is never dropped
            }
        };
        // Neither closure fails.
        let _ = super::poll_until(done, chores);
    }

    /// Answer every liveness question that has arrived.
    fn answer_pings(&self) {
        while let Some((message, status)) = self.world.any_process().immediate_matched_probe_with_tag(PING) {
            let mut asker = 0i32;
            message.matched_receive_into(&mut asker);
            let me = self.world.rank();
            self.world.process_at_rank(status.source_rank()).send_with_tag(&me, PONG);
        }
    }

    /// The collective `what` missed its deadline: find out which ranks still answer, say so,
    /// and end the job.
    fn timed_out(&self, what: &str) -> ! {
        let me = self.world.rank();
        let size = self.world.size();
        for peer in (0..size).filter(|&p| p != me) {
            self.world.process_at_rank(peer).send_with_tag(&me, PING);
        }
        let mut answered: BTreeSet<i32> = BTreeSet::from([me]);
        let grace = self.timeout.min(Duration::from_secs(10));
        let start = Instant::now();
        while start.elapsed() < grace && answered.len() < size as usize {
            while let Some((message, status)) = self.world.any_process().immediate_matched_probe_with_tag(PONG) {
                let mut peer = 0i32;
                message.matched_receive_into(&mut peer);
                answered.insert(status.source_rank());
            }
            self.answer_pings();
            std::thread::sleep(Duration::from_millis(1));
        }
        let silent: Vec<i32> = (0..size).filter(|r| !answered.contains(r)).collect();
        let who = match silent.as_slice() {
            [] => "every rank answers, but not all of them reached this call".to_string(),
            [one] => format!("rank {one} did not answer (stopped, hung or still busy)"),
            many => format!("ranks {many:?} did not answer (stopped, hung or still busy)"),
        };
        eprintln!(
            "error: rank {me}: {what} did not complete within {} s: {who}; stopping every rank",
            self.timeout.as_secs_f64()
        );
        self.world.abort(3)
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn world_size(&self) -> usize {
        self.world.size() as usize
    }

    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce_sum(&self, buf: &mut [f32], what: &str) -> Result<()> {
        let send = buf.to_vec();
        mpi::request::scope(|scope| {
            let request = self.world.immediate_all_reduce_into(scope, &send[..], &mut buf[..], SystemOperation::sum());
            self.wait(request, what);
        });
        Ok(())
    }

    fn broadcast(&self, buf: &mut [u8], root: usize, what: &str) -> Result<()> {
        let root = self.world.process_at_rank(root as i32);
        mpi::request::scope(|scope| {
            let request = root.immediate_broadcast_into(scope, buf);
            self.wait(request, what);
        });
        Ok(())
    }

    fn barrier(&self, what: &str) -> Result<()> {
        self.wait(self.world.immediate_barrier(), what);
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
