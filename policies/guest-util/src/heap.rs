//! A heap for one call. The host gives every call a fresh instance, so nothing allocated
//! outlives the call: a bump allocator over an arena in the module's own memory is exact, and
//! a call that stays within it never grows its memory. Growing costs the host two `mprotect`s
//! per call (making the pages usable, then taking them back when the slot is reset), each a
//! TLB shootdown on every core the appliance runs on, the model's included. Past the arena,
//! allocations go to the system allocator, as without it.
//!
//! A guest installs it for WebAssembly only (native unit tests run threaded):
//!
//! ```ignore
//! #[cfg(target_arch = "wasm32")]
//! #[global_allocator]
//! static HEAP: guest_util::heap::CallHeap = guest_util::heap::CallHeap::new();
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, UnsafeCell};

/// The arena: enough for a shipped policy's call (its config parsed, the request's strings and
/// vectors) many times over; it is part of the module's initial memory, which the host zeroes
/// after every call, so it is kept small.
pub const ARENA_BYTES: usize = 64 << 10;

pub struct CallHeap {
    arena: UnsafeCell<[u8; ARENA_BYTES]>,
    /// Bytes of the arena handed out (the next allocation starts here, aligned).
    used: Cell<usize>,
}

// SAFETY: a policy component is single-threaded (the WebAssembly it runs in has no threads);
// the allocator is installed for `wasm32` only.
unsafe impl Sync for CallHeap {}

impl CallHeap {
    pub const fn new() -> CallHeap {
        CallHeap { arena: UnsafeCell::new([0; ARENA_BYTES]), used: Cell::new(0) }
    }

    fn base(&self) -> usize {
        self.arena.get() as usize
    }

    fn owns(&self, ptr: *mut u8) -> bool {
        (self.base()..self.base() + ARENA_BYTES).contains(&(ptr as usize))
    }

    /// Whether `ptr..ptr + size` is the arena's last allocation (it may grow or be freed in
    /// place).
    fn is_last(&self, ptr: *mut u8, size: usize) -> bool {
        ptr as usize + size == self.base() + self.used.get()
    }
}

impl Default for CallHeap {
    fn default() -> CallHeap {
        CallHeap::new()
    }
}

// SAFETY: every pointer handed out lies in the arena (never twice: `used` only moves back
// over the last allocation when it is freed) or comes from `System`, and is returned to where
// it came from.
unsafe impl GlobalAlloc for CallHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let start = (self.base() + self.used.get()).checked_next_multiple_of(layout.align());
        match start.and_then(|start| Some((start, start.checked_add(layout.size())?))) {
            Some((start, end)) if end <= self.base() + ARENA_BYTES => {
                self.used.set(end - self.base());
                start as *mut u8
            }
            // SAFETY: the caller's layout, as `GlobalAlloc::alloc` requires.
            _ => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !self.owns(ptr) {
            // SAFETY: `ptr` came from `System` with this layout.
            return unsafe { System.dealloc(ptr, layout) };
        }
        if self.is_last(ptr, layout.size()) {
            self.used.set(ptr as usize - self.base());
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if self.owns(ptr) && self.is_last(ptr, layout.size()) && ptr as usize + new_size <= self.base() + ARENA_BYTES {
            self.used.set(ptr as usize + new_size - self.base());
            return ptr;
        }
        if !self.owns(ptr) {
            // SAFETY: `ptr` came from `System` with this layout.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: `new_size` with the old alignment is a valid layout (the caller guarantees
        // it does not overflow when rounded up to the alignment).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: a valid layout; the old block is live and `new` is a distinct new block.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_come_from_the_arena_until_it_is_spent_then_from_the_system() {
        let heap = CallHeap::new();
        let small = Layout::from_size_align(100, 8).unwrap();
        // SAFETY: valid layouts; every block is freed with its own layout.
        unsafe {
            let a = heap.alloc(small);
            assert!(heap.owns(a));
            assert_eq!(a as usize % 8, 0);
            // The last allocation grows in place, and its memory is kept.
            a.write(7);
            let grown = heap.realloc(a, small, 1000);
            assert_eq!(grown, a);
            assert_eq!(grown.read(), 7);
            let b = heap.alloc(small);
            assert!(heap.owns(b) && b as usize >= a as usize + 1000);
            // Not the last one any more: growing it moves it.
            let moved = heap.realloc(a, Layout::from_size_align(1000, 8).unwrap(), 2000);
            assert_ne!(moved, a);
            assert_eq!(moved.read(), 7);
            let big = Layout::from_size_align(ARENA_BYTES, 8).unwrap();
            let c = heap.alloc(big);
            assert!(!c.is_null() && !heap.owns(c));
            heap.dealloc(c, big);
            heap.dealloc(moved, Layout::from_size_align(2000, 8).unwrap());
            // Freeing the last allocation gives its room back.
            let used = heap.used.get();
            let d = heap.alloc(small);
            heap.dealloc(d, small);
            assert_eq!(heap.used.get(), used);
            heap.dealloc(b, small);
        }
    }
}
