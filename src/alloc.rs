//! A global allocator that keeps large freed blocks for reuse.
//!
//! Every run hands its outputs to the caller in fresh memory, and a
//! decoder's outputs are large: GPT-2 small's presents at 960 past
//! positions are 70 MB a step, and its inputs as many again. glibc's malloc
//! serves blocks that large with `mmap` and returns them with `munmap`, so
//! each step faulted in (and the kernel zeroed) every page of 140 MB: twice
//! the time of the step's kernels (`BENCHMARKS.md`). `Recycling` keeps
//! freed blocks of 1 MiB or more (up to 64 of them, 256 MiB in all, the
//! oldest given back first when it must make room) while models run, not
//! while they compile (`Model::run` turns keeping on, `compile` off, and
//! gives back what was kept, `release_kept`: a compile's freed blocks would
//! only raise its peak) and hands them out
//! again for requests of the same size class, as onnxruntime's arena does
//! for its own tensors. Smaller blocks go straight to the system allocator.
//!
//! The `egret` binary and the Python package install it (`#[global_allocator]`);
//! a Rust program that links Egret may too:
//!
//! ```
//! #[global_allocator]
//! static ALLOC: egret::alloc::Recycling = egret::alloc::Recycling;
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Blocks this large or larger are recycled.
const MIN: usize = 1 << 20;
/// Recycled blocks have malloc's own alignment: what vectors of numbers
/// ask for. A request for more goes to the system allocator.
const ALIGN: usize = 16;
/// Blocks kept at most, and their bytes in all.
const SLOTS: usize = 64;
const MAX_KEPT: usize = 256 << 20;

/// The allocator: the system's, with large freed blocks kept for reuse.
pub struct Recycling;

/// Whether freed blocks are kept (`keep`).
static KEEPING: AtomicBool = AtomicBool::new(false);

/// Turns keeping freed blocks on (runs) or off (compiles).
pub fn keep(on: bool) {
    if KEEPING.load(Ordering::Relaxed) != on {
        KEEPING.store(on, Ordering::Relaxed);
    }
}

/// Gives every kept block back to the system, and asks glibc's malloc to
/// return the free memory of its heaps (`malloc_trim`: a compile's worker
/// threads free in heaps of their own, which it never shrinks otherwise).
/// `egret::compile` calls it when it is done, so what the compile freed
/// (the graph's weights once packed) leaves the process.
pub fn release_kept() {
    {
        let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
        for slot in kept.slots.iter_mut().filter(|s| s.0 != 0) {
            unsafe { System.dealloc(slot.1 as *mut u8, Layout::from_size_align_unchecked(slot.0, ALIGN)) };
            *slot = (0, 0, 0);
        }
        kept.bytes = 0;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Freed blocks: `(class, address, when kept)`, class 0 for an empty slot.
struct Kept {
    slots: [(usize, usize, u64); SLOTS],
    bytes: usize,
    clock: u64,
}

static KEPT: Mutex<Kept> = Mutex::new(Kept { slots: [(0, 0, 0); SLOTS], bytes: 0, clock: 0 });

/// The size actually allocated for a request of `size` (at least `MIN`):
/// rounded up to a sixteenth of the power of two at or above it, so
/// requests that grow a little at a time (a cache one position longer each
/// step) share a class, and at most 1/16 is wasted.
fn class_of(size: usize) -> usize {
    let step = (size.next_power_of_two() / 16).max(1 << 16);
    size.div_ceil(step) * step
}

/// A kept block of `class`, if there is one.
fn take(class: usize) -> Option<*mut u8> {
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    let slot = kept.slots.iter_mut().find(|s| s.0 == class)?;
    let at = slot.1;
    *slot = (0, 0, 0);
    kept.bytes -= class;
    Some(at as *mut u8)
}

fn recycled(layout: Layout) -> bool {
    layout.size() >= MIN && layout.align() <= ALIGN
}

/// Blocks at least this large are asked to be backed by huge pages.
const HUGE_MIN: usize = 8 << 20;

/// Asks the kernel to back the 2 MiB-aligned inside of a fresh block of
/// `size` bytes at `at` with transparent huge pages: a model's weights are
/// gigabytes of fresh memory written once, and faulting them in 4 KiB at a
/// time was a quarter of a large model's compile. Only advice: where the
/// system says no (or has no such pages), nothing changes.
fn huge(at: *mut u8, size: usize) -> *mut u8 {
    #[cfg(target_os = "linux")]
    if !at.is_null() && size >= HUGE_MIN {
        const PAGE: usize = 2 << 20;
        let start = (at as usize).div_ceil(PAGE) * PAGE;
        let end = (at as usize + size) / PAGE * PAGE;
        if end > start {
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    at
}

unsafe impl GlobalAlloc for Recycling {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !recycled(layout) {
            return unsafe { System.alloc(layout) };
        }
        let class = class_of(layout.size());
        if let Some(at) = take(class) {
            return at;
        }
        huge(unsafe { System.alloc(Layout::from_size_align_unchecked(class, ALIGN)) }, class)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !recycled(layout) {
            return unsafe { System.dealloc(ptr, layout) };
        }
        let class = class_of(layout.size());
        if class > MAX_KEPT || !KEEPING.load(Ordering::Relaxed) {
            return unsafe { System.dealloc(ptr, Layout::from_size_align_unchecked(class, ALIGN)) };
        }
        let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
        // Room made by giving back the oldest blocks (a compile's, say),
        // so the blocks a run frees now are the ones kept.
        loop {
            let full = kept.slots.iter().all(|s| s.0 != 0);
            if !full && kept.bytes + class <= MAX_KEPT {
                break;
            }
            let oldest = (0..SLOTS).filter(|&i| kept.slots[i].0 != 0).min_by_key(|&i| kept.slots[i].2);
            let Some(i) = oldest else { break };
            let (old_class, at, _) = kept.slots[i];
            kept.slots[i] = (0, 0, 0);
            kept.bytes -= old_class;
            unsafe { System.dealloc(at as *mut u8, Layout::from_size_align_unchecked(old_class, ALIGN)) };
        }
        kept.clock += 1;
        let now = kept.clock;
        let slot = kept.slots.iter_mut().find(|s| s.0 == 0).expect("a slot was made free");
        *slot = (class, ptr as usize, now);
        kept.bytes += class;
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !recycled(layout) {
            return unsafe { System.alloc_zeroed(layout) };
        }
        let class = class_of(layout.size());
        if let Some(at) = take(class) {
            unsafe { std::ptr::write_bytes(at, 0, layout.size()) };
            return at;
        }
        // Fresh memory from the system is zero already (calloc).
        huge(unsafe { System.alloc_zeroed(Layout::from_size_align_unchecked(class, ALIGN)) }, class)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (recycled(layout), recycled(new)) {
            (false, false) => unsafe { System.realloc(ptr, layout, new_size) },
            // Growing within its class: the block already has the room.
            (true, true) if class_of(new_size) == class_of(layout.size()) => ptr,
            // Across classes, as the system does it (glibc remaps a large
            // block rather than copying it, so a growing vector never needs
            // its old and new sizes at once).
            (true, true) => unsafe {
                let old = Layout::from_size_align_unchecked(class_of(layout.size()), ALIGN);
                System.realloc(ptr, old, class_of(new_size))
            },
            _ => {
                let to = unsafe { self.alloc(new) };
                if !to.is_null() {
                    unsafe { std::ptr::copy_nonoverlapping(ptr, to, layout.size().min(new_size)) };
                    unsafe { self.dealloc(ptr, layout) };
                }
                to
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_their_requests_and_group_growing_ones() {
        for size in [MIN, MIN + 1, 3 << 20, (70 << 20) + 12345, 1 << 30] {
            let c = class_of(size);
            assert!(c >= size && c - size <= size / 16 + (1 << 16), "{size} -> {c}");
        }
        // A cache that grows by 3 KiB a step stays in one class for many steps.
        let base = 2_949_120;
        assert_eq!(class_of(base), class_of(base + 3 * 1024 * 10));
    }

    #[test]
    fn blocks_come_back_with_their_contents_room_and_alignment() {
        keep(true);
        let a = Recycling;
        unsafe {
            for size in [MIN, 5 << 20, (5 << 20) + 100] {
                let layout = Layout::from_size_align(size, 16).unwrap();
                let p = a.alloc(layout);
                assert!(!p.is_null() && p as usize % 16 == 0);
                std::ptr::write_bytes(p, 7, size);
                // Grown past its class: moved, contents kept.
                let q = a.realloc(p, layout, size * 2);
                assert!(*q.add(size - 1) == 7);
                a.dealloc(q, Layout::from_size_align(size * 2, 16).unwrap());
                // Zeroed, even when recycled.
                let z = a.alloc_zeroed(Layout::from_size_align(size * 2, 16).unwrap());
                assert!(*z == 0 && *z.add(size * 2 - 1) == 0);
                a.dealloc(z, Layout::from_size_align(size * 2, 16).unwrap());
                // More alignment than malloc's: the system's.
                let big = Layout::from_size_align(size, 4096).unwrap();
                let b = a.alloc(big);
                assert!(b as usize % 4096 == 0);
                a.dealloc(b, big);
            }
            // Small blocks are the system's.
            let small = Layout::from_size_align(100, 8).unwrap();
            let s = a.alloc(small);
            let s = a.realloc(s, small, 200);
            a.dealloc(s, Layout::from_size_align(200, 8).unwrap());
        }
    }
}
