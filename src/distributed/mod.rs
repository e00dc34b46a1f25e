//! Data parallelism over an existing distributed engine, behind one small interface: the
//! [`Collective`] calls (all-reduce sum of a flat f32 buffer, broadcast, barrier; rank and world
//! size) with MPI behind `--features mpi`, NCCL behind `--features nccl` (a CUDA device) and a
//! single process otherwise, and what the trainer
//! builds on them ([`Dist`]): bucketed gradient all-reduce, gathering serializable values,
//! agreeing on success, and the parameter checksum that catches ranks drifting apart.
//!
//! Every rank calls the same collectives in the same order. Each call names itself (`what`),
//! so a collective that a rank never reaches fails with the call's name and the silent ranks
//! instead of hanging.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle::{DType, Tensor, Var};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;

/// Gradients are all-reduced in buckets of this many bytes (PyTorch DDP's default, 25 MiB),
/// not one call per tensor.
pub const BUCKET_BYTES: usize = 25 << 20;

/// The collectives data parallelism needs. Every rank calls them in the same order; `what`
/// names the call in errors.
pub trait Collective {
    /// This process's rank, from 0.
    fn rank(&self) -> usize;
    /// How many ranks the run has.
    fn world_size(&self) -> usize;
    /// The engine's name (`mpi`, `nccl`, `single`).
    fn backend(&self) -> &'static str;
    /// Sum `buf` over every rank, in place; every rank ends with the same sums.
    fn all_reduce_sum(&self, buf: &mut [f32], what: &str) -> Result<()>;
    /// Overwrite every rank's `buf` with `root`'s (all ranks pass the same length).
    fn broadcast(&self, buf: &mut [u8], root: usize, what: &str) -> Result<()>;
    /// Return once every rank has called it.
    fn barrier(&self, what: &str) -> Result<()>;
    /// End every rank's process now, after an error on this one (an MPI abort).
    fn abort(&self, code: i32) -> !;
}

/// One process: the collectives are no-ops.
struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum(&self, _: &mut [f32], _: &str) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _: &mut [u8], _: usize, _: &str) -> Result<()> {
        Ok(())
    }
    fn barrier(&self, _: &str) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// A run's handle on its ranks (cheap to clone); a single process by default.
#[derive(Clone)]
pub struct Dist(Arc<dyn Collective>);

impl Default for Dist {
    fn default() -> Self {
        Self(Arc::new(Single))
    }
}

impl std::fmt::Debug for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dist({} rank {} of {})", self.backend(), self.rank(), self.world_size())
    }
}

impl Dist {
    /// A handle on `collective`.
    pub fn new(collective: impl Collective + 'static) -> Self {
        Self(Arc::new(collective))
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.0.rank()
    }

    /// How many ranks the run has.
    pub fn world_size(&self) -> usize {
        self.0.world_size()
    }

    /// The engine's name.
    pub fn backend(&self) -> &'static str {
        self.0.backend()
    }

    /// Whether this rank writes the run's files (rank 0).
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// This rank's contiguous share of `n` items, in rank order (the first `n % world` ranks
    /// take one more).
    pub fn share(&self, n: usize) -> Range<usize> {
        share_of(n, self.rank(), self.world_size())
    }

    /// This rank's share of `items` cut into batches of `batch` (whole batches, so each is the
    /// batch one process makes).
    pub fn share_of_batches<'a, T>(&self, items: &'a [T], batch: usize) -> &'a [T] {
        let batch = batch.max(1);
        let mine = self.share(items.len().div_ceil(batch));
        &items[(mine.start * batch).min(items.len())..(mine.end * batch).min(items.len())]
    }

    /// Wait for every rank.
    pub fn barrier(&self, what: &str) -> Result<()> {
        self.0.barrier(what)
    }

    /// End every rank now (after this rank failed).
    pub fn abort(&self, code: i32) -> ! {
        self.0.abort(code)
    }

    /// Sum `buf` over every rank, in place.
    pub fn all_reduce_sum(&self, buf: &mut [f32], what: &str) -> Result<()> {
        self.0.all_reduce_sum(buf, what)
    }

    /// Every rank's `mine`, in rank order.
    pub fn all_gather_bytes(&self, mine: &[u8], what: &str) -> Result<Vec<Vec<u8>>> {
        if self.world_size() == 1 {
            return Ok(vec![mine.to_vec()]);
        }
        let mut out = Vec::with_capacity(self.world_size());
        for root in 0..self.world_size() {
            let mut len = (mine.len() as u64).to_le_bytes();
            self.0.broadcast(&mut len, root, what)?;
            let mut buf = if root == self.rank() { mine.to_vec() } else { vec![0u8; u64::from_le_bytes(len) as usize] };
            self.0.broadcast(&mut buf, root, what)?;
            out.push(buf);
        }
        Ok(out)
    }

    /// Every rank's `mine` (as JSON, so f64s travel exactly), in rank order.
    pub fn all_gather<T: Serialize + DeserializeOwned>(&self, mine: &T, what: &str) -> Result<Vec<T>> {
        let bytes = serde_json::to_vec(mine)?;
        self.all_gather_bytes(&bytes, what)?
            .iter()
            .map(|b| serde_json::from_slice(b).with_context(|| format!("{what}: a rank sent an unreadable value")))
            .collect()
    }

    /// `result` on every rank once all have finished the same work: the first rank's error
    /// (naming the rank) when any failed, so no rank goes on alone into a collective the failed
    /// one will never reach.
    pub fn agree<T>(&self, result: Result<T>, what: &str) -> Result<T> {
        if self.world_size() == 1 {
            return result;
        }
        let mine = match &result {
            Ok(_) => String::new(),
            Err(e) => format!("{e:#}"),
        };
        let all = self.all_gather(&mine, what)?;
        match all.iter().enumerate().find(|(_, e)| !e.is_empty()) {
            None => result,
            Some(_) if result.is_err() => result.with_context(|| format!("rank {}", self.rank())),
            Some((rank, e)) => bail!("rank {rank} failed ({what}): {e}"),
        }
    }

    /// Sum every gradient over the ranks, in buckets of [`BUCKET_BYTES`] (f32 on the wire,
    /// back in each gradient's own dtype). A gradient no rank has stays `None`; one some ranks
    /// lack counts as zeros there.
    pub fn all_reduce_grads(&self, grads: &mut [Option<Tensor>], shapes: &[Tensor], what: &str) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        let mut present: Vec<f32> = grads.iter().map(|g| if g.is_some() { 1.0 } else { 0.0 }).collect();
        self.all_reduce_sum(&mut present, what)?;
        let wanted: Vec<usize> = (0..grads.len()).filter(|&i| present[i] > 0.0).collect();
        for bucket in buckets(&wanted, shapes, BUCKET_BYTES) {
            let mut flat: Vec<f32> = Vec::new();
            for &i in &bucket {
                match &grads[i] {
                    Some(g) => flat.extend(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
                    None => flat.resize(flat.len() + shapes[i].elem_count(), 0.0),
                }
            }
            self.all_reduce_sum(&mut flat, what)?;
            let mut at = 0;
            for &i in &bucket {
                let like = &shapes[i];
                let n = like.elem_count();
                let summed = Tensor::from_slice(&flat[at..at + n], like.shape(), like.device())?;
                grads[i] = Some(summed.to_dtype(like.dtype())?);
                at += n;
            }
        }
        Ok(())
    }

    /// Stop with an error when the ranks' parameters differ: every rank's checksum (the sum
    /// and the sum of squares of every variable, in f64) must be bit for bit the same.
    pub fn check_in_sync<'a>(&self, vars: impl Iterator<Item = &'a Var>, step: u64) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        let mut sums = [0f64; 2];
        for v in vars {
            let t = v.as_tensor().to_dtype(DType::F64)?;
            sums[0] += t.sum_all()?.to_scalar::<f64>()?;
            sums[1] += t.sqr()?.sum_all()?.to_scalar::<f64>()?;
        }
        let all = self.all_gather(&sums.map(f64::to_bits), &format!("the parameter check of step {step}"))?;
        if let Some((rank, other)) = all.iter().enumerate().find(|(_, s)| **s != all[0]) {
            bail!(
                "the ranks' parameters diverged at step {step}: rank 0's checksum is {:?}, rank {rank}'s {:?}; stopping (resume from the last checkpoint)",
                all[0].map(f64::from_bits),
                other.map(f64::from_bits)
            );
        }
        Ok(())
    }
}

/// Call `done` until it says the operation finished: tightly at first (yielding the core), then
/// every 50 µs; every 1024 calls `chores` runs (answering peers, checking the deadline).
#[cfg(any(feature = "mpi", feature = "nccl"))]
fn poll_until(mut done: impl FnMut() -> Result<bool>, mut chores: impl FnMut()) -> Result<()> {
    let mut polls = 0u64;
    while !done()? {
        polls += 1;
        if polls.is_multiple_of(1024) {
            chores();
        }
        if polls > 10_000 {
            std::thread::sleep(Duration::from_micros(50));
        } else {
            std::thread::yield_now();
        }
    }
    Ok(())
}

/// Rank `rank`'s contiguous share of `n` items among `world` ranks.
pub fn share_of(n: usize, rank: usize, world: usize) -> Range<usize> {
    let (base, extra) = (n / world, n % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// `indices` cut into consecutive runs of at most `limit` bytes of f32 (a tensor larger than
/// the limit goes alone).
fn buckets(indices: &[usize], shapes: &[Tensor], limit: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut bytes = 0;
    for &i in indices {
        let b = shapes[i].elem_count() * 4;
        match out.last_mut() {
            Some(bucket) if bytes + b <= limit => bucket.push(i),
            _ => {
                out.push(vec![i]);
                bytes = 0;
            }
        }
        bytes += b;
    }
    out
}

/// How the process was launched: its rank, the world size and the launcher's name, read from
/// the variables `mpirun` (Open MPI, MPICH, Intel MPI) and `torchrun` set; `None` outside a
/// launcher.
pub fn launched_rank() -> Option<(usize, usize, &'static str)> {
    let read = |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse::<usize>().ok());
    let launchers = [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun"),
        ("PMI_RANK", "PMI_SIZE", "an MPI launcher (PMI)"),
        ("PMIX_RANK", "PMIX_SIZE", "an MPI launcher (PMIx)"),
        ("RANK", "WORLD_SIZE", "torchrun"),
    ];
    launchers.iter().find_map(|&(rank, size, who)| Some((read(rank)?, read(size)?, who)))
}

/// The ranks of this launch, when started by a launcher with more than one process: NCCL when
/// the model is on a CUDA device (`on_gpu`) and candor was built with `--features nccl`, else
/// MPI (`--features mpi`); a single process otherwise. Each collective waits at most `timeout`
/// for the other ranks.
pub fn from_environment(timeout: Duration, on_gpu: bool) -> Result<Dist> {
    let Some((rank, world, launcher)) = launched_rank().filter(|&(_, world, _)| world > 1) else {
        return Ok(Dist::default());
    };
    #[cfg(feature = "nccl")]
    if on_gpu {
        return Ok(Dist::new(nccl::Nccl::init(timeout)?));
    }
    let _ = on_gpu;
    connect_mpi(rank, world, launcher, timeout)
}

#[cfg(feature = "mpi")]
fn connect_mpi(_rank: usize, _world: usize, _launcher: &str, timeout: Duration) -> Result<Dist> {
    Ok(Dist::new(mpi::Mpi::init(timeout)?))
}

#[cfg(not(feature = "mpi"))]
fn connect_mpi(rank: usize, world: usize, launcher: &str, _timeout: Duration) -> Result<Dist> {
    bail!(
        "this process is rank {rank} of {world} (started by {launcher}), but this candor was built without data parallelism: rebuild with `cargo build --release --features mpi` (or `--features nccl` for CUDA devices), or run it without the launcher"
    )
}

/// This process's rank among the ranks on its machine (`OMPI_COMM_WORLD_LOCAL_RANK`,
/// `LOCAL_RANK`), 0 where no launcher says.
pub fn local_rank() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "LOCAL_RANK"]
        .iter()
        .find_map(|name| std::env::var(name).ok()?.parse().ok())
        .unwrap_or(0)
}

/// Threads for this rank's kernels when none are set: its cores, or, when the launcher did not
/// bind ranks to cores, the machine's cores divided among the ranks on this node.
pub fn threads_per_rank(available: usize) -> usize {
    let read = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok());
    let local = read("OMPI_COMM_WORLD_LOCAL_SIZE").or_else(|| read("LOCAL_WORLD_SIZE")).unwrap_or(1).max(1);
    // `available_parallelism` counts the cores this process may run on; the machine's are
    // the `processor` lines of /proc/cpuinfo.
    let online = std::fs::read_to_string("/proc/cpuinfo")
        .map_or(available, |info| info.lines().filter(|l| l.starts_with("processor")).count());
    let bound = available < online;
    if bound {
        available
    } else {
        (available / local).max(1)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::VecDeque;

    use super::*;

    #[test]
    fn shares_cover_every_item_once_in_rank_order() {
        for (n, world) in [(10, 3), (2, 4), (0, 2), (7, 1)] {
            let all: Vec<usize> = (0..world).flat_map(|r| share_of(n, r, world)).collect();
            assert_eq!(all, (0..n).collect::<Vec<_>>(), "n {n} world {world}");
        }
        assert_eq!(share_of(10, 0, 3), 0..4);
        assert_eq!(share_of(10, 2, 3), 7..10);
    }

    #[test]
    fn buckets_keep_order_and_respect_the_limit() {
        let dev = candle::Device::Cpu;
        let shapes: Vec<Tensor> =
            [3, 2, 5, 1, 1].iter().map(|&n| Tensor::zeros(n, DType::F32, &dev).unwrap()).collect();
        // 16 bytes a bucket: [0] (12 B), [1] (8 B), [2] alone (20 B), [3, 4] (8 B).
        assert_eq!(buckets(&[0, 1, 2, 3, 4], &shapes, 16), vec![vec![0], vec![1], vec![2], vec![3, 4]]);
        assert_eq!(buckets(&[1, 3, 4], &shapes, 16), vec![vec![1, 3, 4]]);
    }

    /// Rank 0 of two, with rank 1's side scripted: what it adds to each all-reduce and what
    /// it broadcasts.
    struct Scripted {
        adds: RefCell<VecDeque<Vec<f32>>>,
        sends: RefCell<VecDeque<Vec<u8>>>,
    }

    impl Scripted {
        /// Rank 1 adds `adds` in turn and gathers `values` (as JSON) in turn.
        fn dist(adds: Vec<Vec<f32>>, values: &[serde_json::Value]) -> Dist {
            let mut sends = VecDeque::new();
            for v in values {
                let bytes = serde_json::to_vec(v).unwrap();
                sends.push_back((bytes.len() as u64).to_le_bytes().to_vec());
                sends.push_back(bytes);
            }
            Dist::new(Self { adds: RefCell::new(adds.into()), sends: RefCell::new(sends) })
        }
    }

    impl Collective for Scripted {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn backend(&self) -> &'static str {
            "scripted"
        }
        fn all_reduce_sum(&self, buf: &mut [f32], _: &str) -> Result<()> {
            let add = self.adds.borrow_mut().pop_front().context("no more all-reduces scripted")?;
            assert_eq!(add.len(), buf.len());
            buf.iter_mut().zip(add).for_each(|(b, a)| *b += a);
            Ok(())
        }
        fn broadcast(&self, buf: &mut [u8], root: usize, _: &str) -> Result<()> {
            if root == 1 {
                buf.copy_from_slice(&self.sends.borrow_mut().pop_front().context("no more broadcasts scripted")?);
            }
            Ok(())
        }
        fn barrier(&self, _: &str) -> Result<()> {
            Ok(())
        }
        fn abort(&self, _: i32) -> ! {
            panic!("aborted")
        }
    }

    #[test]
    fn gradients_missing_on_one_rank_count_as_zeros_and_missing_everywhere_stay_none() {
        let dev = candle::Device::Cpu;
        let mine = Tensor::new(&[1f32, 2.0], &dev).unwrap();
        let shapes = [mine.clone(), Tensor::zeros(3, DType::F32, &dev).unwrap(), mine.clone()];
        // Presence: rank 1 has the second gradient only; then one bucket of 5 values.
        let dist = Scripted::dist(vec![vec![0.0, 1.0, 0.0], vec![0.5, 0.25, 7.0, 8.0, 9.0]], &[]);
        let mut grads = vec![Some(mine), None, None];
        dist.all_reduce_grads(&mut grads, &shapes, "test").unwrap();
        assert_eq!(grads[0].as_ref().unwrap().to_vec1::<f32>().unwrap(), vec![1.5, 2.25]);
        assert_eq!(grads[1].as_ref().unwrap().to_vec1::<f32>().unwrap(), vec![7.0, 8.0, 9.0]);
        assert!(grads[2].is_none());
    }

    #[test]
    fn a_failure_on_another_rank_fails_this_one_with_its_rank_and_message() {
        let dist = Scripted::dist(vec![], &[serde_json::json!("disk full")]);
        let err = dist.agree(Ok(()), "writing final/").unwrap_err().to_string();
        assert_eq!(err, "rank 1 failed (writing final/): disk full");
        let dist = Scripted::dist(vec![], &[serde_json::json!("")]);
        assert!(dist.agree(Ok(5), "writing final/").is_ok_and(|v| v == 5));
    }

    #[test]
    fn parameters_that_differ_by_one_bit_stop_the_run() {
        let var = Var::new(&[1f32, 2.0], &candle::Device::Cpu).unwrap();
        let same = serde_json::json!([3f64.to_bits(), 5f64.to_bits()]);
        assert!(Scripted::dist(vec![], &[same]).check_in_sync([&var].into_iter(), 4).is_ok());
        let off = serde_json::json!([3f64.to_bits() + 1, 5f64.to_bits()]);
        let err = Scripted::dist(vec![], &[off]).check_in_sync([&var].into_iter(), 4).unwrap_err().to_string();
        assert!(err.contains("diverged at step 4") && err.contains("rank 1"), "{err}");
    }

    #[test]
    fn a_single_process_gathers_itself_and_keeps_its_gradients() {
        let dist = Dist::default();
        assert_eq!((dist.rank(), dist.world_size(), dist.share(5)), (0, 1, 0..5));
        assert_eq!(dist.all_gather(&vec![1.5f64, -2.0], "test").unwrap(), vec![vec![1.5, -2.0]]);
        let g = Tensor::new(&[1f32, 2.0], &candle::Device::Cpu).unwrap();
        let mut grads = vec![Some(g.clone()), None];
        dist.all_reduce_grads(&mut grads, &[g.clone(), g], "test").unwrap();
        assert_eq!(grads[0].as_ref().unwrap().to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
        assert!(grads[1].is_none());
        let failed: Result<()> = Err(anyhow::anyhow!("boom"));
        assert_eq!(dist.agree(failed, "test").unwrap_err().to_string(), "boom");
    }
}
