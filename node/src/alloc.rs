//! The allocator. glibc's keeps the weights freed while a segment loads
//! (tract packs a copy of each) resident; mimalloc hands them back. musl
//! (the phone build) already returns big blocks, so it keeps its own.

#[cfg(target_env = "gnu")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Hands the memory freed so far back to the system now. mimalloc returns
/// freed pages a second after they are freed, and only when some thread next
/// allocates: a node that has measured itself, loaded its units or dropped a
/// plan's and then waits keeps them resident (measuring the bench model left
/// 88 MiB of a 114 MiB node that way).
#[allow(unsafe_code)]
pub fn hand_back() {
    #[cfg(target_env = "gnu")]
    // SAFETY: `mi_collect` takes no pointers; it walks the allocator's own state.
    unsafe {
        libmimalloc_sys::mi_collect(true)
    };
}
