//! Small filesystem helpers shared by the download, report and plot writers.

use std::path::Path;

use anyhow::{Context, Result};

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory, flushed and synced, then renamed over `path`. A reader never
/// sees a half-written file, and a crash leaves the old file (or nothing).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    qgrad_csr::write_bytes_atomically(path, bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// Like [`write_atomic`], for a writer that produces the file itself (the plot
/// backends write to a path): it writes to a temporary path in the same
/// directory with the same extension, then renames.
pub fn write_atomic_with(path: &Path, produce: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    // The backends choose the image format by extension, so keep it last.
    // An output, not a private file: what `File::create` would give.
    let tmp = qgrad_csr::output_temp_builder()
        .prefix(".tmp-")
        .suffix(&ext)
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let tmp_path = tmp.into_temp_path();
    produce(&tmp_path)?;
    tmp_path
        .persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("renaming the temporary file to {}", path.display()))?;
    Ok(())
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}
