//! The built-in tiny model, generated once per test binary.
//!
//! A static is never dropped, so its directory outlives the run: it goes under
//! cargo's own scratch directory (`cargo clean` removes it), not into /tmp.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use llnode_models::progress::Silent;
use llnode_models::synth::{self, SynthConfig};

pub fn tiny_export() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = DIR.get_or_init(|| {
        let scratch = env!("CARGO_TARGET_TMPDIR");
        std::fs::create_dir_all(scratch).expect("cargo's scratch directory");
        let root = tempfile::tempdir_in(scratch).expect("temp dir");
        let path = root.path().join("tiny");
        synth::write_export(&SynthConfig::tiny(), &path, &Silent).expect("built-in model");
        (root, path)
    });
    path
}
