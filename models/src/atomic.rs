//! Directories written all or nothing: files go to a hidden staging
//! directory beside the target, which is renamed into place on commit and
//! removed if the writer fails or is dropped before committing.

use std::io;
use std::path::{Path, PathBuf};

pub struct AtomicDir {
    staging: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl AtomicDir {
    /// Starts writing `target`, which must not exist yet (or be an empty directory).
    pub fn create(target: &Path) -> io::Result<AtomicDir> {
        if target.exists() && std::fs::read_dir(target)?.next().is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} already exists and is not empty; remove it or choose another directory", target.display()),
            ));
        }
        let name = target.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a directory name", target.display()))
        })?;
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)?;
        let staging = parent.join(format!(".{}.partial-{}", name.to_string_lossy(), std::process::id()));
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        std::fs::create_dir(&staging)?;
        Ok(AtomicDir { staging, target: target.to_path_buf(), committed: false })
    }

    /// Where to write the files.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// Moves the finished directory into place.
    pub fn commit(mut self) -> io::Result<PathBuf> {
        if self.target.exists() {
            std::fs::remove_dir(&self.target)?; // empty, checked in `create`
        }
        std::fs::rename(&self.staging, &self.target)?;
        self.committed = true;
        Ok(self.target.clone())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

/// Writes a file through a temporary sibling and a rename.
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_writer_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        {
            let dir = AtomicDir::create(&target).unwrap();
            std::fs::write(dir.path().join("a"), b"x").unwrap();
        }
        assert!(!target.exists());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }

    #[test]
    fn committed_dir_is_in_place_and_refuses_overwrite() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        let dir = AtomicDir::create(&target).unwrap();
        std::fs::write(dir.path().join("a"), b"x").unwrap();
        dir.commit().unwrap();
        assert_eq!(std::fs::read(target.join("a")).unwrap(), b"x");
        let err = AtomicDir::create(&target).err().unwrap();
        assert!(err.to_string().contains("already exists"), "{err}");
    }
}
