//! The `candor` binary: parse, run, print the error chain, exit code (0 ok, 2 error).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // candle asks for the thread count before every matmul and, unless this is set, reads
    // /proc/cpuinfo each time; fix it once (still overridable by the user).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let mut n = std::thread::available_parallelism().map_or(1, |n| n.get());
        if candor::distributed::launched_rank().is_some_and(|(_, world, _)| world > 1) {
            // Ranks on one machine share its cores.
            n = candor::distributed::threads_per_rank(n);
        }
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    // With MKL, its OpenMP workers spin for 200 ms after every sgemm by default while candor's
    // rayon kernels want the same cores in between: make them yield at once (overridable).
    if cfg!(feature = "mkl") && std::env::var_os("KMP_BLOCKTIME").is_none() {
        std::env::set_var("KMP_BLOCKTIME", "0");
    }
    tune_allocator();
    let cli = candor::cli::Cli::parse();
    let default_level = match cli.global.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_level.into()))
        .with_writer(std::io::stderr)
        .init();
    match candor::commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  Caused by: {cause}");
            }
            ExitCode::from(2)
        }
    }
}

/// Keep freed memory in the process instead of returning it to the kernel: tensors of the
/// same sizes are allocated every step, and with glibc's defaults each one larger than 128 KiB
/// is a fresh `mmap` whose pages the kernel zeroes again (a tenth of decoding time).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread starts.
    unsafe {
        // glibc refuses an mmap threshold above 32 MiB, so large blocks would still be
        // mmapped; no mmap at all puts every block on the heap, which is never trimmed.
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
