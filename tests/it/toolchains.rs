//! Folders with what the tests of foreign clients run on: an npm project
//! installed from a committed package.json + package-lock.json (`npm ci`),
//! or a Python virtual environment from a committed requirements.txt. Each
//! is made once under the target directory, in a folder named by a hash of
//! what it is made from, so a second run (or a second test) reuses it, and
//! a changed lock file makes a new one. Nothing is installed in the source
//! tree.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// One install at a time in this process (two tests may want the same).
static INSTALLING: Mutex<()> = Mutex::new(());

/// Where the folders live: cargo's per-target scratch directory.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("foreign")
}

/// `name-<hash of the files>`.
fn folder(name: &str, files: &[&Path]) -> PathBuf {
    let mut h = Sha256::new();
    for f in files {
        h.update(f.file_name().unwrap().as_encoded_bytes());
        h.update(std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display())));
    }
    let hash = format!("{:x}", h.finalize());
    root().join(format!("{name}-{}", &hash[..16]))
}

/// Runs `cmd`, failing the test with its output if it fails.
fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({cmd:?}):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes `dir` with `make` (into a fresh folder beside it, renamed into
/// place once complete), unless it is there already.
fn once(dir: &Path, make: impl FnOnce(&Path)) -> PathBuf {
    let _one = INSTALLING.lock().unwrap_or_else(|p| p.into_inner());
    if dir.join(".complete").exists() {
        return dir.to_owned();
    }
    std::fs::create_dir_all(root()).unwrap();
    let building = dir.with_extension(format!("part-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&building);
    std::fs::create_dir_all(&building).unwrap();
    make(&building);
    std::fs::write(building.join(".complete"), b"").unwrap();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&building, dir).unwrap();
    dir.to_owned()
}

/// The npm project in `src` (package.json, package-lock.json and `extra`
/// files beside them) copied and installed with `npm ci`: returns its folder.
pub fn npm_project(name: &str, src: &Path, extra: &[&str]) -> PathBuf {
    let mut files = vec![src.join("package.json"), src.join("package-lock.json")];
    files.extend(extra.iter().map(|f| src.join(f)));
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let dir = folder(name, &refs);
    once(&dir, |into| {
        for f in &files {
            std::fs::copy(f, into.join(f.file_name().unwrap())).unwrap();
        }
        // Exactly the lock file's versions; no install scripts (none is
        // needed, and a test runs no code it did not ask for).
        run(
            Command::new("npm")
                .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"])
                .current_dir(into),
            "npm ci (needs Node.js 20 and npm, and the npm registry)",
        );
    })
}

/// A virtual environment with `requirements` installed: returns its
/// Python interpreter.
pub fn python_venv(name: &str, requirements: &Path) -> PathBuf {
    let dir = folder(name, &[requirements]);
    let dir = once(&dir, |into| {
        run(
            Command::new("python3").args(["-m", "venv"]).arg(into),
            "python3 -m venv (needs python3 with venv)",
        );
        run(
            Command::new(into.join("bin/python"))
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "-r",
                ])
                .arg(requirements),
            "pip install (needs PyPI)",
        );
    });
    dir.join("bin/python")
}

/// The repository's root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}
