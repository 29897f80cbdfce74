//! Where the built binaries are: beside the running executable (target/<profile>/), or in
//! `WEFT_BIN_DIR`.

use std::path::PathBuf;

/// Overrides the directory of the Weft binaries.
pub const BIN_DIR_ENV: &str = "WEFT_BIN_DIR";

/// The directory holding `weft-proxy`, `weft-redirector`, `weft-sample-app`, ….
pub fn dir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os(BIN_DIR_ENV) {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("executable has no parent directory"))?
        .to_path_buf();
    // Test executables live in target/<profile>/deps.
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// The path of one binary; a clear error when it has not been built.
pub fn path(name: &str) -> anyhow::Result<PathBuf> {
    let p = dir()?.join(name);
    anyhow::ensure!(
        p.is_file(),
        "{} is missing: build the workspace binaries first (`cargo build --workspace --bins`; `cargo xtask test` does it)",
        p.display()
    );
    Ok(p)
}
