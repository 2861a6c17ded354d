//! The scheduler: a pool of threads that one run at a time executes in,
//! and the split of one kernel's parallel dimension across it. The JIT's
//! executor and ahead-of-time artifacts both run their kernels through
//! here, so they make the same choices at run time too.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// A compiled kernel: operand base addresses, and the range of its
/// parallel dimension to run; returns 0 or an error status.
pub type KernelFn = unsafe extern "C" fn(args: *const *mut u8, begin: i64, end: i64) -> i32;

/// Whether a kernel may be split across threads, as the compiler decided
/// from its size (`egret_backends::cpu::split_of`).
#[repr(i64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Too little work: one thread runs it.
    Never = 0,
    /// Split its parallel dimension across the pool.
    Always = 1,
    /// A product: split across its batches when it has at least as many as
    /// the pool has threads; otherwise the GEMM parallelises inside.
    Batches = 2,
}

impl Split {
    pub fn from_code(code: i64) -> Split {
        match code {
            1 => Split::Always,
            2 => Split::Batches,
            _ => Split::Never,
        }
    }
}

/// Threads for runs. With one thread there is no pool: everything runs on
/// the caller's thread.
pub struct Pool {
    pool: Option<rayon::ThreadPool>,
    threads: usize,
}

/// How long a worker kept awake for a run waits for work before sleeping.
const STAY_AWAKE: std::time::Duration = std::time::Duration::from_millis(1);

impl Pool {
    /// A pool of `threads` threads; 0 means one per core. A pool that cannot
    /// be built (the process may start no more threads) runs on one.
    pub fn new(threads: usize) -> Pool {
        let threads = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
        let pool = if threads > 1 { rayon::ThreadPoolBuilder::new().num_threads(threads).build().ok() } else { None };
        let threads = if pool.is_some() { threads } else { 1 };
        Pool { pool, threads }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` (one whole run) on a worker of the pool, if there is one, so
    /// that split kernels and the GEMMs' own parallelism share its threads
    /// instead of oversubscribing the cores.
    ///
    /// For the length of the run the pool's other workers stay awake,
    /// looking for split kernels to help with: a rayon worker that finds
    /// nothing falls asleep within microseconds, and waking it again costs
    /// tens of microseconds on every split kernel, since the single-threaded
    /// kernels in between (norms, small maps) are longer than that.
    /// Keeping them awake took 4-10% off gpt2_small4 and deit_tiny at two
    /// threads, at both levels; a worker that has found no work for
    /// `STAY_AWAKE` goes back to sleep, so a long single-threaded stretch
    /// does not burn a core.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let Some(pool) = &self.pool else { return f() };
        pool.install(|| {
            let done = AtomicBool::new(false);
            let runner = rayon::current_thread_index();
            rayon::scope(|s| {
                for _ in 1..self.threads {
                    let done = &done;
                    s.spawn(move |_| stay_awake(done, runner));
                }
                let result = f();
                done.store(true, Ordering::Relaxed);
                result
            })
        })
    }
}

/// Runs the pool's pending jobs as they appear until `done` is set, or until
/// none has appeared for `STAY_AWAKE`. The worker running the plan
/// (`runner`) may pick this job up itself when it waits on a split kernel;
/// it returns at once there, or it would spin inside its own run.
fn stay_awake(done: &AtomicBool, runner: Option<usize>) {
    if rayon::current_thread_index() == runner {
        return;
    }
    let mut last_work = std::time::Instant::now();
    while !done.load(Ordering::Relaxed) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => last_work = std::time::Instant::now(),
            _ if last_work.elapsed() > STAY_AWAKE => return,
            // Yielding to the OS rather than spinning: a core shared with
            // other busy threads (tests, other models) gets them scheduled.
            _ => std::thread::yield_now(),
        }
    }
}

/// Operand addresses shared by the threads running one kernel. Each thread
/// writes a disjoint slice of the output, as the plan's split guarantees.
struct SharedArgs(*const *mut u8);
unsafe impl Send for SharedArgs {}
unsafe impl Sync for SharedArgs {}

/// Runs `f` over `0..extent`, split across the threads of the pool it is
/// called in (see `Pool::install`) when `split` allows; returns the first
/// non-zero status.
///
/// # Safety
/// `f` was generated for exactly these operands and this extent.
pub unsafe fn launch(f: KernelFn, args: *const *mut u8, extent: i64, split: Split) -> i32 {
    let threads = crate::threads() as i64;
    let parts = threads.min(extent);
    let split = match split {
        Split::Never => false,
        Split::Always => parts > 1,
        Split::Batches => parts > 1 && extent >= threads,
    };
    if !split {
        return unsafe { f(args, 0, extent) };
    }
    let shared = SharedArgs(args);
    let status = AtomicI32::new(0);
    rayon::scope(|s| {
        for p in 0..parts {
            let (begin, end) = (extent * p / parts, extent * (p + 1) / parts);
            let (shared, status) = (&shared, &status);
            s.spawn(move |_| {
                let r = unsafe { f(shared.0, begin, end) };
                if r != 0 {
                    status.store(r, Ordering::Relaxed);
                }
            });
        }
    });
    status.into_inner()
}
