//! Giving freed heap back to the OS after a version drains.
//!
//! glibc's allocator keeps freed memory in its arenas for reuse and returns it only from the top
//! of the heap, so the buffers of a busy moment (hundreds of requests in flight on a version that
//! is then swapped out) stay resident after they are freed: about 10 MiB after 200 concurrent
//! requests. `malloc_trim` releases every free page; it walks the heap, so it runs on a blocking
//! thread, once for any number of versions dropped within [`SETTLE`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Versions dropped together (a reload replaces several) share one trim.
const SETTLE: Duration = Duration::from_millis(100);

static PENDING: AtomicBool = AtomicBool::new(false);

/// Schedules one trim of the heap, unless one is already scheduled.
pub fn release_soon() {
    if PENDING.swap(true, Ordering::AcqRel) {
        return;
    }
    let trim = || {
        std::thread::sleep(SETTLE);
        PENDING.store(false, Ordering::Release);
        trim_now();
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(trim)),
        Err(_) => drop(std::thread::spawn(trim)),
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(
    unsafe_code,
    reason = "malloc_trim is a C call with no arguments to get wrong; it only releases free pages of glibc's own arenas, under their locks"
)]
fn trim_now() {
    // SAFETY: see the `expect` reason above.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators (musl, macOS) return memory on their own terms.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_now() {}
