//! Ctrl-C, and SIGTERM and SIGHUP (a scheduler's or `timeout`'s stop): while a job that can stop
//! cleanly runs (a training loop, `serve`; see [`Graceful`]), the first asks it to save its
//! state and stop, and a second quits at once; anywhere else the process quits at once, with
//! exit code 130 and the built-in configs' temporary files removed.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// How many [`Graceful`] guards are alive.
static GRACEFUL: AtomicUsize = AtomicUsize::new(0);

/// Installs the handler (once, from `main`). It runs on a thread of its own (the `ctrlc`
/// crate's), not inside the signal.
pub fn install() {
    let _ = ctrlc::set_handler(|| {
        if GRACEFUL.load(Ordering::SeqCst) > 0 && !INTERRUPTED.swap(true, Ordering::SeqCst) {
            eprintln!("\ninterrupt: stopping cleanly (again to quit at once)");
            return;
        }
        crate::builtin::remove_temporary_files();
        eprintln!("\ninterrupted");
        std::process::exit(130);
    });
}

/// Whether a stop was asked for while a [`Graceful`] job ran.
pub fn requested() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// While a guard lives, an interrupt is a request to stop cleanly, which the job polls with
/// [`requested`], instead of an immediate exit.
pub struct Graceful(());

impl Graceful {
    pub fn begin() -> Self {
        GRACEFUL.fetch_add(1, Ordering::SeqCst);
        Self(())
    }
}

impl Drop for Graceful {
    fn drop(&mut self) {
        GRACEFUL.fetch_sub(1, Ordering::SeqCst);
    }
}
