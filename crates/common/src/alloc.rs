//! Allocator settings for the processes that train: `pipeline` and the measurement examples.

/// Makes glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.
///
/// A training step allocates and frees tensors of a few hundred KiB to tens of MiB. glibc
/// serves large requests with fresh `mmap`s (below a threshold it moves with the sizes seen),
/// and trims its heaps as soon as 128 KiB at the top are free, so the next step's tensors can
/// come back as new, zeroed pages: half a million page faults in 23 DiT training steps of
/// `pipeline bench` on burn-flex. Serving requests up to 32 MiB from the heap
/// (`M_MMAP_THRESHOLD`, glibc's maximum) and not trimming it (`M_TRIM_THRESHOLD`) brings that
/// to about 40 thousand and the benchmark's DiT step a fifth faster; `train-ldm` itself
/// faulted far less and gained about 3% (docs/PERFORMANCE.md, "Where a step's time goes").
/// libtorch's CPU tensors are allocated by the same malloc. The heap then stays at its peak
/// size (the process's peak memory does not change). Call it first thing in `main`, before any
/// thread exists; elsewhere than Linux with glibc it does nothing.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn keep_freed_memory() {
    // SAFETY: mallopt only sets allocator parameters; the caller runs it before any thread
    // exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// See the glibc version: nothing to set on this platform.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn keep_freed_memory() {}
