//! The built-in tiny model, generated once per test binary.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use llnode_models::progress::Silent;
use llnode_models::synth::{self, SynthConfig};

pub fn tiny_export() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = DIR.get_or_init(|| {
        let root = tempfile::tempdir().expect("temp dir");
        let path = root.path().join("tiny");
        synth::write_export(&SynthConfig::tiny(), &path, &Silent).expect("built-in model");
        (root, path)
    });
    path
}
