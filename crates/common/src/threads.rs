//! Where a process's work runs: on a worker of a rayon pool rather than the main thread.

/// Runs `job` on a worker of a new rayon pool (one thread per core, as rayon's global pool),
/// so that the parallel loops it starts (burn-flex's operations, gemm, this crate's kernels)
/// are shared between the calling worker and the others by work stealing. Started from a
/// thread outside the pool instead, each of the thousands of parallel loops of a training step
/// puts that thread to sleep on a lock and wakes it again: on 2 cores, whole-process pairs of
/// `pipeline bench` took 0.88 of the time on the DiT step and 0.94-0.97 on the others, with
/// the same results to the bit (docs/PERFORMANCE.md). The stack is 64 MiB (the main thread's
/// is 8, rayon's default 2). Where no pool can be made, `job` runs on the calling thread.
pub fn on_worker_thread<T: Send>(job: impl FnOnce() -> T + Send) -> T {
    match rayon::ThreadPoolBuilder::new().stack_size(64 << 20).build() {
        Ok(pool) => pool.install(job),
        Err(_) => job(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_runs_on_a_pool_worker_and_its_loops_use_that_pool() {
        assert_eq!(rayon::current_thread_index(), None);
        let (index, threads, sum) = on_worker_thread(|| {
            use rayon::prelude::*;
            let sum: u64 = (0..1000u64).into_par_iter().sum();
            (
                rayon::current_thread_index(),
                rayon::current_num_threads(),
                sum,
            )
        });
        assert!(index.is_some(), "the job ran outside the pool");
        // as many threads as rayon's global pool (RAYON_NUM_THREADS, else one per core)
        assert_eq!(threads, rayon::current_num_threads());
        assert_eq!(sum, 499_500);
    }
}
