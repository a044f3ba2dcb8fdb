//! The allocator.
//!
//! Weights get mappings of their own: a block of at least 1 MiB allocated
//! while a thread loads a model ([`loading`]) is an anonymous
//! mapping, asked to be backed by transparent huge pages and unmapped as soon
//! as it is freed. Decode reads every weight at every token, and on 2 MiB
//! pages it runs about 15% faster than on 4 KiB ones (`llnode run --stats` on
//! the bench model, 28.5–29.9 tok/s against 24.5–25.5 here).
//!
//! Everything else is mimalloc's (glibc's kept the weights freed while a
//! segment loads, tract packing a copy of each, resident), on small pages
//! ([`init`]). A 2-node mesh on the bench model, each node's resident
//! anonymous memory above the weights it holds:
//! - all in mimalloc, which advises its whole arena huge: 35–60 MiB (small
//!   blocks and the weights freed after packing sat on partly used 2 MiB
//!   pages);
//! - weights in their own mappings: 27–43 MiB;
//! - and mimalloc's arena on small pages: 17–35 MiB;
//! - and its purge delay cut to 100 ms: 17–29 MiB (the most on the node that
//!   asked the prompt: it also holds the tokenizer).
//!
//! musl (the phone build) keeps its own allocator, which already returns big
//! blocks to the system.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: split::Split = split::Split;

/// Runs `load` with big blocks (weights) in their own huge-page mappings.
pub fn loading<T>(load: impl FnOnce() -> T) -> T {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    let _loading = split::Loading::start();
    load()
}

/// Set-up at the start of `main`, before any other thread starts.
pub fn init() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    split::init();
}

/// Hands the memory freed so far back to the system now. mimalloc returns
/// freed pages only when some thread next allocates, once its purge delay
/// has passed: a node that has measured itself, loaded its units, dropped a
/// plan's or served its last session and then waits keeps them resident
/// (measuring the bench model left 88 MiB of a 114 MiB node that way).
#[allow(unsafe_code)]
pub fn hand_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mi_collect` takes no pointers; it walks the allocator's own state.
    unsafe {
        libmimalloc_sys::mi_collect(true)
    };
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod split {
    use std::alloc::{GlobalAlloc, Layout};
    use std::cell::Cell;

    use mimalloc::MiMalloc;

    /// The smallest block that gets its own mapping while loading: the bench
    /// model's smallest packed weight is 2.25 MiB.
    const MAPPED_MIN: usize = 1 << 20;
    const PAGE: usize = 4096;
    /// A transparent huge page: mappings start on one, so that all of a
    /// block but its tail can be backed by them.
    const HUGE: usize = 2 << 20;

    thread_local! {
        static LOADING: Cell<bool> = const { Cell::new(false) };
    }

    /// While alive, this thread's big blocks are mapped.
    pub struct Loading(bool);

    impl Loading {
        pub fn start() -> Loading {
            Loading(LOADING.replace(true))
        }
    }

    impl Drop for Loading {
        fn drop(&mut self) {
            LOADING.set(self.0);
        }
    }

    /// mimalloc's option numbers (`mi_option_e` in its v3 `mimalloc.h`;
    /// the crate's constants are v2's): `options_are_mimallocs_v3` checks them.
    const MI_OPTION_PURGE_DELAY: i32 = 15;
    const MI_OPTION_ALLOW_THP: i32 = 43;

    pub fn init() {
        // SAFETY: setting options takes no pointers.
        unsafe {
            // No huge pages for arenas reserved from now on…
            libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0);
            // …and freed pages go back a tenth of a second after they are
            // freed, not a second: the node that asked held 8 MiB less that way, and
            // decode, which frees and reuses its steps' blocks within a token,
            // kept its pace (with no delay at all, it lost 4–5% at 480 tokens).
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 100);
        }
        no_huge_arena();
    }

    /// Advises the arena mimalloc reserved before `main` (advised huge then,
    /// as the option was still on) back to small pages: the mapping that
    /// holds one of its blocks, as /proc/self/maps lists it.
    fn no_huge_arena() {
        let probe = Box::new(0u64);
        let at = &*probe as *const u64 as usize;
        let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else { return };
        let range = maps.lines().find_map(|line| {
            let (start, end) = line.split_whitespace().next()?.split_once('-')?;
            let (start, end) = (usize::from_str_radix(start, 16).ok()?, usize::from_str_radix(end, 16).ok()?);
            (start <= at && at < end).then_some((start, end))
        });
        if let Some((start, end)) = range {
            // SAFETY: advice on mimalloc's own mapping; it changes no contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_NOHUGEPAGE) };
        }
    }

    /// An anonymous mapping of `size` bytes starting on a huge page, advised
    /// to be backed by huge pages; `None` if the system refuses.
    fn map(size: usize) -> Option<*mut u8> {
        let len = size.next_multiple_of(PAGE);
        // Over-map by a huge page, then trim both ends so the block starts on one.
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        unsafe {
            let raw = libc::mmap(
                std::ptr::null_mut(),
                len + HUGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if raw == libc::MAP_FAILED {
                return None;
            }
            let raw = raw as usize;
            let start = raw.next_multiple_of(HUGE);
            if start > raw {
                libc::munmap(raw as *mut libc::c_void, start - raw);
            }
            // The tail is never empty: `start` is less than a huge page past `raw`.
            libc::munmap((start + len) as *mut libc::c_void, raw + HUGE - start);
            libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
            Some(start as *mut u8)
        }
    }

    /// Whether `ptr`, of `layout`, is a mapping of its own (not mimalloc's).
    fn mapped(ptr: *mut u8, layout: &Layout) -> bool {
        // SAFETY: the call only looks `ptr` up in mimalloc's page map.
        layout.size() >= MAPPED_MIN && !unsafe { libmimalloc_sys::mi_is_in_heap_region(ptr.cast()) }
    }

    fn wants_mapping(layout: &Layout) -> bool {
        layout.size() >= MAPPED_MIN && layout.align() <= PAGE && LOADING.try_with(Cell::get).unwrap_or(false)
    }

    /// A mapping for `layout` if it wants one and the system gives one.
    fn try_map(layout: &Layout) -> Option<*mut u8> {
        wants_mapping(layout).then(|| map(layout.size())).flatten()
    }

    pub struct Split;

    // SAFETY: every block comes from exactly one of mmap and mimalloc, and
    // goes back to the one it came from: a mapping is never in mimalloc's
    // page map, and each mapping is unmapped whole (its length is the
    // layout's size rounded to pages, as it was mapped).
    unsafe impl GlobalAlloc for Split {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: the caller's contract, passed on.
            try_map(&layout).unwrap_or_else(|| unsafe { MiMalloc.alloc(layout) })
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            // A fresh anonymous mapping is zeroed.
            // SAFETY: the caller's contract, passed on.
            try_map(&layout).unwrap_or_else(|| unsafe { MiMalloc.alloc_zeroed(layout) })
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if mapped(ptr, &layout) {
                // SAFETY: `ptr` starts a mapping of this length made by `map`.
                unsafe { libc::munmap(ptr.cast(), layout.size().next_multiple_of(PAGE)) };
            } else {
                // SAFETY: mimalloc's block, as the caller's contract says.
                unsafe { MiMalloc.dealloc(ptr, layout) }
            }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: the caller's contract: `layout` is `ptr`'s, and `new_size` is valid for its alignment.
            let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
            if !mapped(ptr, &layout) && !wants_mapping(&new) {
                // SAFETY: mimalloc's block, staying with mimalloc.
                return unsafe { MiMalloc.realloc(ptr, layout, new_size) };
            }
            // SAFETY: a block moving between a mapping and mimalloc: a new one, a copy, the old one freed.
            unsafe {
                let moved = self.alloc(new);
                if !moved.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                moved
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn in_mimalloc(ptr: *const u8) -> bool {
            // SAFETY: the call only looks `ptr` up in mimalloc's page map.
            unsafe { libmimalloc_sys::mi_is_in_heap_region(ptr.cast()) }
        }

        #[test]
        fn options_are_mimallocs_v3() {
            // SAFETY: reading options takes no pointers.
            let (thp, purge) = unsafe {
                (
                    libmimalloc_sys::mi_option_get(MI_OPTION_ALLOW_THP),
                    libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY),
                )
            };
            // v3's defaults (tests do not run `init`): huge pages allowed, purges after 1000 ms.
            assert_eq!((thp, purge), (1, 1000), "mimalloc's option numbers moved: see mi_option_e in its mimalloc.h");
        }

        #[test]
        fn big_blocks_made_while_loading_are_mappings_of_their_own() {
            let layout = Layout::from_size_align(MAPPED_MIN + 12345, 64).unwrap();
            let weights = super::super::loading(|| vec![7u8; layout.size()]);
            assert!(mapped(weights.as_ptr().cast_mut(), &layout));
            assert_eq!(weights.as_ptr() as usize % HUGE, 0);
            assert!(weights.iter().all(|&b| b == 7));
            let other = vec![7u8; layout.size()];
            assert!(in_mimalloc(other.as_ptr()), "outside loading, mimalloc's");
            // Growing and shrinking moves it between the two and keeps the bytes.
            let mut grown = super::super::loading(|| {
                let mut v = Vec::with_capacity(1000);
                v.extend_from_slice(&[1u8; 1000]);
                v.reserve_exact(MAPPED_MIN * 2);
                v
            });
            assert!(mapped(grown.as_mut_ptr(), &Layout::from_size_align(grown.capacity(), 1).unwrap()));
            assert_eq!(grown.len(), 1000);
            assert!(grown.iter().all(|&b| b == 1));
            grown.shrink_to_fit();
            assert!(in_mimalloc(grown.as_ptr()));
            assert!(grown.iter().all(|&b| b == 1));
            let small = super::super::loading(|| vec![0u8; 4096]);
            assert!(in_mimalloc(small.as_ptr()), "small blocks stay mimalloc's while loading");
        }
    }
}
