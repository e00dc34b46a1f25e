//! The NCCL backend (NVIDIA's collectives, through cudarc's bindings, one GPU per rank): each
//! collective copies the host buffer to this rank's GPU, runs there on a stream of its own, and
//! copies the result back. Ranks find each other the way `torchrun` starts them: rank, world
//! size and GPU from `RANK`, `WORLD_SIZE`, `LOCAL_RANK` (or Open MPI's `OMPI_COMM_WORLD_*`),
//! and rank 0 hands NCCL's unique id to the others over TCP at `MASTER_ADDR:MASTER_PORT`.
//!
//! A collective still running on the GPU at the deadline aborts the communicator, says which
//! call timed out, and ends this rank with exit code 3; a host-side NCCL call that blocks past
//! the deadline (initialization, or the connection set-up of a first collective) ends the rank
//! the same way from a watchdog thread. NCCL cannot tell which peer is missing, so unlike the
//! MPI backend the message names the call only.

use std::cell::RefCell;
use std::ffi::c_char;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use candle::cuda_backend::cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DeviceRepr};
use candle::cuda_backend::cudarc::nccl::result::{NcclError, NcclStatus};
use candle::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};

use super::Collective;

/// Bytes of an `ncclUniqueId`.
const ID_BYTES: usize = 128;
/// Opens both bootstrap messages, so a stray connection to the port is not taken for a rank.
const MAGIC: [u8; 8] = *b"candorNI";

/// This rank's NCCL communicator, on the GPU `LOCAL_RANK` names.
pub struct Nccl {
    /// `None` once aborted (cudarc aborts a communicator when it is dropped).
    comm: RefCell<Option<Comm>>,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    timeout: Duration,
}

impl Nccl {
    /// Join the ranks of a `torchrun` (or `mpirun`) launch: read the rank, world size and GPU
    /// from the environment, get NCCL's unique id from rank 0 over TCP, and create the
    /// communicator. Every step, and later every collective, waits at most `timeout`.
    pub fn init(timeout: Duration) -> Result<Self> {
        let rank = env_number(&[("RANK", "torchrun"), ("OMPI_COMM_WORLD_RANK", "mpirun")], "this process's rank")?;
        let world =
            env_number(&[("WORLD_SIZE", "torchrun"), ("OMPI_COMM_WORLD_SIZE", "mpirun")], "the number of ranks")?;
        let gpu = env_number(
            &[("LOCAL_RANK", "torchrun"), ("OMPI_COMM_WORLD_LOCAL_RANK", "mpirun")],
            "this process's GPU (its rank on this node)",
        )?;
        if world == 0 || rank >= world {
            bail!("rank {rank} is not below the world size {world}");
        }

        let devices = CudaContext::device_count().context("counting the CUDA devices")?;
        if gpu >= usize::try_from(devices).unwrap_or(0) {
            let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into());
            bail!(
                "rank {rank}: its local rank {gpu} names GPU {gpu}, but this process sees {devices} (CUDA_VISIBLE_DEVICES {visible}); start at most {devices} ranks on this node"
            );
        }
        let ctx = CudaContext::new(gpu).with_context(|| format!("rank {rank}: opening GPU {gpu}"))?;
        let stream = ctx.new_stream().with_context(|| format!("rank {rank}: creating a CUDA stream on GPU {gpu}"))?;

        let id = if world == 1 {
            Id::new().map_err(|e| nccl_error(e, "creating NCCL's unique id"))?
        } else if rank == 0 {
            let id = Id::new().map_err(|e| nccl_error(e, "creating NCCL's unique id"))?;
            let bytes: [u8; ID_BYTES] = (*id.internal()).map(|c| c as u8);
            serve_id(bootstrap_port()?, &bytes, world, timeout)?;
            id
        } else {
            let addr = env_string("MASTER_ADDR", "the address of rank 0's host")?;
            let bytes = fetch_id(&addr, bootstrap_port()?, rank, world, timeout)?;
            Id::uninit(bytes.map(|b| b as c_char))
        };

        // ncclCommInitRank blocks until every rank has called it and uses the thread's current
        // device: bind this GPU's context, and let a watchdog end the rank if a peer never comes.
        ctx.bind_to_thread().with_context(|| format!("rank {rank}: binding GPU {gpu} to this thread"))?;
        let comm = {
            let _watchdog = Watchdog::start(rank, "NCCL initialization (ncclCommInitRank)", timeout)?;
            Comm::from_rank(stream.clone(), rank, world, id)
                .map_err(|e| nccl_error(e, &format!("rank {rank}: creating the NCCL communicator on GPU {gpu}")))?
        };
        Ok(Self { comm: RefCell::new(Some(comm)), stream, rank, world, timeout })
    }

    /// Enqueue the collective `call` on the stream, then wait for it on the GPU; past the
    /// deadline (`timeout` after `start`), report and end this rank.
    fn run(
        &self,
        what: &str,
        start: Instant,
        call: impl FnOnce(&Comm) -> std::result::Result<NcclStatus, NcclError>,
    ) -> Result<()> {
        {
            let comm = self.comm.borrow();
            let comm = comm.as_ref().with_context(|| format!("{what}: the NCCL communicator was aborted"))?;
            // Enqueueing returns at once, except that a communicator's first collective on a
            // peer connects to it first, on this thread; the watchdog bounds that wait.
            let _watchdog = Watchdog::start(self.rank, what, self.timeout.saturating_sub(start.elapsed()))?;
            call(comm).map_err(|e| nccl_error(e, what))?;
        }
        let done = self.stream.record_event(None).with_context(|| format!("{what}: recording a CUDA event"))?;
        self.wait(&done, what, start)
    }

    /// Poll `done` until the GPU has finished the work before it; past the deadline, report,
    /// abort the communicator and end this rank.
    fn wait(&self, done: &CudaEvent, what: &str, start: Instant) -> Result<()> {
        let finished = || done.try_is_complete().with_context(|| format!("{what}: the GPU reported an error"));
        let deadline = || {
            if start.elapsed() > self.timeout {
                self.timed_out(what);
            }
        };
        super::poll_until(finished, deadline)
    }

    /// Copy the device buffer `dev` back into `buf` and check that the copy (and everything
    /// before it on the stream) finished cleanly.
    fn copy_back<T: DeviceRepr>(&self, dev: &CudaSlice<T>, buf: &mut [T], what: &str) -> Result<()> {
        // `memcpy_dtoh` into pageable memory is asynchronous in cudarc's API; synchronize
        // before the host reads `buf`. The collective has already completed (`wait`).
        self.stream.memcpy_dtoh(dev, buf).with_context(|| format!("{what}: copying the result from the GPU"))?;
        self.stream.synchronize().with_context(|| format!("{what}: waiting for the copy from the GPU"))?;
        self.stream.context().check_err().with_context(|| format!("{what}: an earlier CUDA call failed"))?;
        Ok(())
    }

    /// The collective `what` missed its deadline: say so, abort the communicator (which stops
    /// NCCL's kernels on this GPU), and end this rank.
    fn timed_out(&self, what: &str) -> ! {
        eprintln!(
            "error: rank {}: {what} did not complete within {} s: another rank stopped, hung or never reached this call; aborting NCCL and stopping this rank",
            self.rank,
            self.timeout.as_secs_f64()
        );
        self.abort_comm();
        std::process::exit(3)
    }

    /// Abort the communicator (ncclCommAbort), once. cudarc 0.19 exposes no abort method and no
    /// raw handle on its `Comm`; its `Drop` calls ncclCommAbort, so dropping it aborts.
    fn abort_comm(&self) {
        let Ok(mut slot) = self.comm.try_borrow_mut() else {
            return;
        };
        if let Some(comm) = slot.take() {
            // `Comm`'s `Drop` panics when ncclCommAbort fails; the process is ending anyway.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(comm)));
        }
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce_sum(&self, buf: &mut [f32], what: &str) -> Result<()> {
        // Every rank passes the same length, so every rank skips an empty call alike.
        if buf.is_empty() {
            return Ok(());
        }
        let start = Instant::now();
        let mut dev = self
            .stream
            .clone_htod(&*buf)
            .with_context(|| format!("{what}: copying {} values to the GPU", buf.len()))?;
        self.run(what, start, |comm| comm.all_reduce_in_place(&mut dev, &ReduceOp::Sum))?;
        self.copy_back(&dev, buf, what)
    }

    fn broadcast(&self, buf: &mut [u8], root: usize, what: &str) -> Result<()> {
        if root >= self.world {
            bail!("{what}: broadcast from rank {root}, but there are {} ranks", self.world);
        }
        if buf.is_empty() {
            return Ok(());
        }
        let start = Instant::now();
        let root_i32 = i32::try_from(root).with_context(|| format!("{what}: rank {root} does not fit NCCL's int"))?;
        // Only the root's bytes matter; the others receive into zeros.
        let dev = if root == self.rank { self.stream.clone_htod(&*buf) } else { self.stream.alloc_zeros(buf.len()) };
        let mut dev = dev.with_context(|| format!("{what}: placing {} bytes on the GPU", buf.len()))?;
        self.run(what, start, |comm| comm.broadcast_in_place(&mut dev, root_i32))?;
        self.copy_back(&dev, buf, what)
    }

    fn barrier(&self, what: &str) -> Result<()> {
        self.all_reduce_sum(&mut [0f32], what)
    }

    fn abort(&self, code: i32) -> ! {
        self.abort_comm();
        std::process::exit(code)
    }
}

/// Ends this rank with exit code 3 unless dropped within its timeout: bounds the NCCL calls
/// that block on the host (no cudarc call can be interrupted).
struct Watchdog {
    // Dropping the sender wakes the thread, which then ends quietly.
    _disarm: mpsc::Sender<()>,
}

impl Watchdog {
    /// Watch the call `what` of rank `rank` for `timeout`.
    fn start(rank: usize, what: &str, timeout: Duration) -> Result<Self> {
        let (disarm, disarmed) = mpsc::channel::<()>();
        let what = what.to_string();
        std::thread::Builder::new()
            .name("nccl-watchdog".into())
            .spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = disarmed.recv_timeout(timeout) {
                    eprintln!(
                        "error: rank {rank}: {what} did not complete within {} s: another rank stopped, hung or never reached this call; stopping this rank",
                        timeout.as_secs_f64()
                    );
                    std::process::exit(3);
                }
            })
            .context("starting the NCCL watchdog thread")?;
        Ok(Self { _disarm: disarm })
    }
}

/// An NCCL status as an error naming `what` failed.
fn nccl_error(e: NcclError, what: &str) -> anyhow::Error {
    anyhow!("{what}: NCCL failed with {:?} (NCCL_DEBUG=WARN says more)", e.0)
}

/// The first of `names` (variable, launcher that sets it) that is set, as a number.
fn env_number(names: &[(&str, &str)], meaning: &str) -> Result<usize> {
    for (name, _) in names {
        if let Ok(value) = std::env::var(name) {
            return value
                .trim()
                .parse::<usize>()
                .with_context(|| format!("{name}={value:?} is not a number ({meaning})"));
        }
    }
    let listed: Vec<String> = names.iter().map(|(name, launcher)| format!("{name} ({launcher})")).collect();
    bail!("the NCCL backend needs {meaning}, but none of {} is set", listed.join(", "))
}

/// The variable `name`, which must be set (`meaning` says what it is).
fn env_string(name: &str, meaning: &str) -> Result<String> {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => Ok(value.trim().to_string()),
        _ => bail!("the NCCL backend needs {meaning}: {name} is not set"),
    }
}

/// The port rank 0 hands out NCCL's id on: `MASTER_PORT`, or the port after it under `torchrun`,
/// whose agent already serves its own store on `MASTER_PORT` (it sets
/// `TORCHELASTIC_USE_AGENT_STORE`).
fn bootstrap_port() -> Result<u16> {
    let port = env_string("MASTER_PORT", "the port rank 0 listens on")?;
    let port = port.parse::<u16>().with_context(|| format!("MASTER_PORT={port:?} is not a port number"))?;
    let agent_store = std::env::var("TORCHELASTIC_USE_AGENT_STORE").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    if agent_store {
        return port.checked_add(1).with_context(|| format!("MASTER_PORT {port} leaves no port after it"));
    }
    Ok(port)
}

/// Time left before `deadline` (at least a millisecond: a zero socket timeout is an error).
fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}

/// Rank 0: accept one connection from each of the other `world - 1` ranks on `port` and send
/// each the id. Hello: MAGIC, rank (u32 LE), world size (u32 LE); answer: MAGIC, the id.
fn serve_id(port: u16, id: &[u8; ID_BYTES], world: usize, timeout: Duration) -> Result<()> {
    // Every interface (IPv6 and, through it, IPv4; IPv4 alone where IPv6 is off).
    let listener = TcpListener::bind(("::", port))
        .or_else(|_| TcpListener::bind(("0.0.0.0", port)))
        .with_context(|| format!("rank 0: listening on port {port} to hand NCCL's id to the other ranks"))?;
    listener.set_nonblocking(true).context("rank 0: making the bootstrap socket non-blocking")?;
    let deadline = Instant::now() + timeout;
    let mut joined = vec![false; world];
    joined[0] = true;
    while joined.iter().any(|j| !j) {
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Some(rank) = hand_id(stream, peer, id, world, deadline)? {
                    if std::mem::replace(&mut joined[rank], true) {
                        bail!("rank 0: two processes claim rank {rank} (the second from {peer})");
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (0..world).filter(|&r| !joined[r]).collect();
                    bail!(
                        "rank 0: ranks {missing:?} did not connect to port {port} within {} s to fetch NCCL's id",
                        timeout.as_secs_f64()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("rank 0: accepting a connection on port {port}")),
        }
    }
    Ok(())
}

/// Read one rank's hello on `stream` and answer with the id; `None` for a connection that is
/// not a candor rank (ignored).
fn hand_id(
    mut stream: TcpStream,
    peer: SocketAddr,
    id: &[u8; ID_BYTES],
    world: usize,
    deadline: Instant,
) -> Result<Option<usize>> {
    stream.set_nonblocking(false).context("rank 0: configuring a bootstrap connection")?;
    stream.set_read_timeout(Some(left(deadline))).context("rank 0: configuring a bootstrap connection")?;
    stream.set_write_timeout(Some(left(deadline))).context("rank 0: configuring a bootstrap connection")?;
    let mut hello = [0u8; 16];
    if stream.read_exact(&mut hello).is_err() || hello[..8] != MAGIC {
        return Ok(None);
    }
    let field = |at: usize| u32::from_le_bytes([hello[at], hello[at + 1], hello[at + 2], hello[at + 3]]) as usize;
    let (rank, their_world) = (field(8), field(12));
    if their_world != world {
        bail!("rank 0: rank {rank} (from {peer}) was started with world size {their_world}, rank 0 with {world}");
    }
    if rank == 0 || rank >= world {
        bail!("rank 0: a process at {peer} claims rank {rank} of {world}");
    }
    let mut answer = [0u8; 8 + ID_BYTES];
    answer[..8].copy_from_slice(&MAGIC);
    answer[8..].copy_from_slice(id);
    stream.write_all(&answer).with_context(|| format!("rank 0: sending NCCL's id to rank {rank} at {peer}"))?;
    Ok(Some(rank))
}

/// Any rank but 0: connect to rank 0 at `addr:port` (retrying until `timeout`, as rank 0 may
/// not listen yet) and read NCCL's id.
fn fetch_id(addr: &str, port: u16, rank: usize, world: usize, timeout: Duration) -> Result<[u8; ID_BYTES]> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no attempt");
    loop {
        match (addr, port).to_socket_addrs() {
            Ok(targets) => {
                for target in targets {
                    match TcpStream::connect_timeout(&target, left(deadline).min(Duration::from_secs(5))) {
                        Ok(stream) => return ask_id(stream, rank, world, deadline, addr, port),
                        Err(e) => last = format!("{target}: {e}"),
                    }
                }
            }
            Err(e) => last = format!("resolving {addr}: {e}"),
        }
        if Instant::now() >= deadline {
            bail!(
                "rank {rank}: could not reach rank 0 at {addr}:{port} (MASTER_ADDR:MASTER_PORT) within {} s to fetch NCCL's id (last error: {last})",
                timeout.as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Send this rank's hello on `stream` and read the id rank 0 answers with.
fn ask_id(
    mut stream: TcpStream,
    rank: usize,
    world: usize,
    deadline: Instant,
    addr: &str,
    port: u16,
) -> Result<[u8; ID_BYTES]> {
    let context = || format!("rank {rank}: fetching NCCL's id from rank 0 at {addr}:{port}");
    stream.set_read_timeout(Some(left(deadline))).with_context(context)?;
    stream.set_write_timeout(Some(left(deadline))).with_context(context)?;
    let mut hello = [0u8; 16];
    hello[..8].copy_from_slice(&MAGIC);
    hello[8..12].copy_from_slice(&u32::try_from(rank).context("rank too large")?.to_le_bytes());
    hello[12..].copy_from_slice(&u32::try_from(world).context("world size too large")?.to_le_bytes());
    stream.write_all(&hello).with_context(context)?;
    let mut answer = [0u8; 8 + ID_BYTES];
    stream.read_exact(&mut answer).with_context(context)?;
    if answer[..8] != MAGIC {
        bail!("rank {rank}: {addr}:{port} answered, but not as candor's rank 0 (is MASTER_PORT in use by something else?)");
    }
    let mut id = [0u8; ID_BYTES];
    id.copy_from_slice(&answer[8..]);
    Ok(id)
}
