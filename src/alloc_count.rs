//! A global allocator that can count live heap bytes, for memory figures
//! such as `lab bench locks`' bytes per lock. Counting is off unless a
//! [`Counting`] guard is alive: otherwise each allocation pays one relaxed
//! load of a flag that is never written on the hot path.

use mimalloc::MiMalloc;
use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

/// mimalloc plus an optional live-bytes counter. mimalloc rather than
/// glibc malloc: the nodes, the writer and the SQL engine allocate and free
/// many small buffers per record, and glibc spent about 8% of the CPU of a
/// one-row-commit load on it (`lab bench replica-lag`: 8,736-9,041 commits/s
/// with glibc, 9,341-9,714 with mimalloc, in the same hour).
#[derive(Debug)]
pub struct CountingAllocator;

static ENABLED: AtomicBool = AtomicBool::new(false);
static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

fn count(delta: i64) {
    if ENABLED.load(Ordering::Relaxed) {
        LIVE_BYTES.fetch_add(delta, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to `MiMalloc`; the counter only
// observes sizes.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let pointer = unsafe { MiMalloc.alloc(layout) };
        if !pointer.is_null() {
            count(layout.size() as i64);
        }
        pointer
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let pointer = unsafe { MiMalloc.alloc_zeroed(layout) };
        if !pointer.is_null() {
            count(layout.size() as i64);
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: the caller guarantees `pointer` came from this allocator with `layout`.
        unsafe { MiMalloc.dealloc(pointer, layout) };
        count(-(layout.size() as i64));
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's arguments.
        let moved = unsafe { MiMalloc.realloc(pointer, layout, new_size) };
        if !moved.is_null() {
            count(new_size as i64 - layout.size() as i64);
        }
        moved
    }
}

/// Counts heap bytes allocated (minus freed) while it lives. Only one
/// measurement at a time is meaningful: the counter is process-wide.
#[derive(Debug)]
pub struct Counting {
    start: i64,
}

impl Counting {
    pub fn start() -> Counting {
        ENABLED.store(true, Ordering::SeqCst);
        Counting { start: LIVE_BYTES.load(Ordering::SeqCst) }
    }

    /// Live bytes allocated since `start` (by any thread).
    pub fn bytes(&self) -> i64 {
        LIVE_BYTES.load(Ordering::SeqCst) - self.start
    }
}

impl Drop for Counting {
    fn drop(&mut self) {
        ENABLED.store(false, Ordering::SeqCst);
    }
}
