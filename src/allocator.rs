//! glibc's allocator: what it holds, and giving back to the kernel what it keeps free.
//!
//! glibc keeps freed memory in its arenas (one per thread that allocated, up to eight per core)
//! and returns it only from the top of each heap. A daemon whose blocking-pool threads come and
//! go under bursty load ends up with free pages scattered through many arenas: the heap in use
//! stays flat while RSS creeps (the hour's soak measured +1.2 MiB/min on a 15-minute lifetime).
//! `malloc_trim(0)` hands every whole free page of every arena back with `MADV_DONTNEED`.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the free pages go back. Trimming locks each arena while it walks its free lists,
/// a millisecond or so for a heap of this size; twice a minute keeps RSS within a few MiB of the
/// heap in use at no measurable cost.
const TRIM_EVERY: Duration = Duration::from_secs(30);

/// Bytes the allocator holds: in use by the program, and free but kept in its arenas.
pub struct Heap {
    pub in_use: usize,
    pub free: usize,
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn heap() -> Option<Heap> {
    // SAFETY: mallinfo2 only reads the allocator's counters (taking its arena locks).
    let mi = unsafe { libc::mallinfo2() };
    Some(Heap {
        in_use: mi.uordblks + mi.hblkhd,
        free: mi.fordblks,
    })
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn heap() -> Option<Heap> {
    None
}

/// Gives every whole free page of every arena back to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_free() {
    // SAFETY: malloc_trim takes each arena's lock itself; it frees nothing still in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free() {}

/// Trims on a timer until shutdown, off the async workers (it holds arena locks).
pub fn spawn_trimmer(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TRIM_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    let _ = tokio::task::spawn_blocking(release_free).await;
                }
            }
        }
    });
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    fn rss() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        let pages: usize = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        pages * 4096
    }

    #[test]
    fn free_pages_between_live_blocks_go_back_to_the_kernel() {
        const MIB: usize = 1 << 20;
        // 64 MiB in 4 KiB blocks, one in sixteen kept: the free runs between them are whole
        // pages that free() itself never returns (they are not at the top of the heap).
        let kept = std::thread::spawn(|| {
            let blocks: Vec<Vec<u8>> = (0..16 * 1024).map(|i| vec![i as u8; 4096]).collect();
            blocks.into_iter().step_by(16).collect::<Vec<_>>()
        })
        .join()
        .unwrap_or_default();
        let before = rss();
        super::release_free();
        let after = rss();
        assert!(
            after + 32 * MIB < before,
            "RSS {} MiB before the trim, {} MiB after",
            before / MIB,
            after / MIB
        );
        assert!(kept.iter().all(|b| b.len() == 4096 && b[1] == b[0]));
    }
}
