//! Progress reporting for long operations (generation, import, loading).
//! The library only counts; the binary draws bars.

pub trait Progress: Sync {
    /// A new phase of `total` units (bytes, tensors…) begins.
    fn phase(&self, name: &str, total: u64);
    /// `n` more units of the current phase are done.
    fn advance(&self, n: u64);
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {
    fn phase(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
}
