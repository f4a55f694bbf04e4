//! Files on disk: atomic, concurrent-safe writes and read-only maps that
//! notice when their file changes underneath.

use std::path::Path;

use crate::error::{Error, Result};

/// Writes a file to `path` atomically: `write` fills a temporary file in the
/// same folder (a name unique to this process and call, so concurrent saves
/// never share one), which is synced and renamed over `path`. A symbolic link
/// is followed (the file it points to is replaced, the link kept); a target
/// that exists but is not a regular file is an error; on any failure the
/// temporary file is removed. A new file gets the permissions of the file it
/// replaces, else the process's defaults for a new file.
///
/// # Errors
/// [`Error::Io`] naming the path.
pub(crate) fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let io = |e: std::io::Error, p: &Path| Error::Io {
        path: p.display().to_string(),
        source: e,
    };
    let target = resolve_target(path)?;
    let dir = target
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = target.file_name().ok_or_else(|| Error::Io {
        path: path.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
    })?;
    let serial = SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{serial}",
        name.to_string_lossy(),
        std::process::id()
    ));
    // Created here (never reused: `create_new`) to learn the permissions a new
    // file gets by default; writers may replace it (safetensors writes its own
    // temporary file and renames it, with owner-only permissions).
    let written = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|f| f.metadata())
        .map_err(|e| io(e, &tmp))
        .and_then(|created| {
            write(&tmp)?;
            let file = std::fs::File::options()
                .write(true)
                .open(&tmp)
                .map_err(|e| io(e, &tmp))?;
            let permissions = std::fs::metadata(&target)
                .map_or_else(|_| created.permissions(), |old| old.permissions());
            file.set_permissions(permissions).map_err(|e| io(e, &tmp))?;
            file.sync_all().map_err(|e| io(e, &tmp))
        })
        .and_then(|()| std::fs::rename(&tmp, &target).map_err(|e| io(e, path)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The file a save to `path` replaces: `path` itself, or what a symbolic link
/// at `path` points to. Anything there must be a regular file.
fn resolve_target(path: &Path) -> Result<std::path::PathBuf> {
    let not_regular = |p: &Path, kind: &str| Error::Io {
        path: p.display().to_string(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("expected a regular file to save to, found {kind}; choose a file path"),
        ),
    };
    let mut target = path.to_path_buf();
    // Follow a bounded chain of links (a loop is an error, not a hang).
    for _ in 0..40 {
        match std::fs::symlink_metadata(&target) {
            Err(_) => return Ok(target), // a new file
            Ok(m) if m.file_type().is_symlink() => {
                let link = std::fs::read_link(&target).map_err(|e| Error::Io {
                    path: target.display().to_string(),
                    source: e,
                })?;
                target = match target.parent() {
                    Some(dir) if link.is_relative() => dir.join(link),
                    _ => link,
                };
            }
            Ok(m) if m.is_file() => return Ok(target),
            Ok(m) if m.is_dir() => return Err(not_regular(path, "a folder")),
            Ok(_) => return Err(not_regular(path, "a device, socket or pipe")),
        }
    }
    Err(not_regular(path, "a loop of symbolic links"))
}

/// A file mapped read-only, with what it looked like when mapped (size and
/// modification time), so readers can notice that it changed underneath.
#[derive(Debug)]
pub(crate) struct MappedFile {
    map: memmap2::Mmap,
    file: std::fs::File,
    path: std::path::PathBuf,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl std::ops::Deref for MappedFile {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl MappedFile {
    /// Checks that the file still has the size and modification time it had
    /// when mapped: reading a mapped file that shrank would kill the process
    /// (SIGBUS), and one rewritten in place would give other numbers.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file when it changed (or cannot be examined).
    pub(crate) fn check_unchanged(&self) -> Result<()> {
        let meta = self.file.metadata().map_err(|e| Error::Io {
            path: self.path.display().to_string(),
            source: e,
        })?;
        if meta.len() != self.len || meta.modified().ok() != self.modified {
            return Err(Error::Io {
                path: self.path.display().to_string(),
                source: std::io::Error::other(format!(
                    "the mapped ledger file changed on disk since it was loaded ({} bytes then, {} now); load it again",
                    self.len,
                    meta.len()
                )),
            });
        }
        Ok(())
    }
}

/// Maps `path` read-only.
pub(crate) fn map_file(path: &Path) -> Result<std::sync::Arc<MappedFile>> {
    let io = |e: std::io::Error| Error::Io {
        path: path.display().to_string(),
        source: e,
    };
    // Only a regular file: opening a pipe would wait for a writer.
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "expected a regular file to load, found a folder, device, socket or pipe",
        )));
    }
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    // SAFETY: the map is read-only and every value is checked when loaded
    // (checksum, shapes, finiteness, balance). A mapped file must not shrink
    // or be rewritten in place while it is read; readers check its size and
    // modification time first (`MappedFile::check_unchanged`), and `save`
    // never does either (it renames a new file over the old one).
    #[allow(unsafe_code)]
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    Ok(std::sync::Arc::new(MappedFile {
        map,
        file,
        path: path.to_path_buf(),
        len: meta.len(),
        modified: meta.modified().ok(),
    }))
}

/// Maps `path` read-only and hands the bytes to `f`.
pub(crate) fn with_mapped<T>(path: &Path, f: impl FnOnce(&[u8]) -> Result<T>) -> Result<T> {
    let map = map_file(path)?;
    f(&map)
}
