//! What an application that depends on switchboard gets (README, "As a
//! library"): the vendored, patched AMQP parser, not crates.io's. Cargo
//! applies `[patch]` only at the top of a dependency graph, so this is
//! checked from a dependent's side: a throwaway crate depending on
//! switchboard by path, resolved by `cargo tree --offline` (no build, and no download: `cargo
//! metadata` would want every platform's crates in the local cache).

use std::path::Path;
use std::process::Command;

/// The vendored chain, from switchboard's dependency down to the patched
/// crate (vendor/README.md).
const CHAIN: &[&str] = &[
    "deadpool-lapin",
    "lapin",
    "amq-protocol",
    "amq-protocol-tcp",
    "amq-protocol-uri",
    "amq-protocol-types",
];

#[test]
fn a_dependent_of_switchboard_resolves_the_vendored_parser() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let manifest = format!(
        r#"[package]
name = "a-dependent"
version = "0.0.0"
edition = "2024"
publish = false

[dependencies]
switchboard = {{ path = {root:?} }}

[workspace]
"#,
        root = root.display().to_string()
    );
    std::fs::write(dir.path().join("Cargo.toml"), manifest).unwrap();
    std::fs::create_dir(dir.path().join("src")).unwrap();
    std::fs::write(dir.path().join("src/lib.rs"), "").unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "--offline", "-e", "normal", "--prefix", "none"])
        .args(["--format", "{p}"])
        .arg("--manifest-path")
        .arg(dir.path().join("Cargo.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One line per package: `name vX.Y.Z` from a registry, `name vX.Y.Z
    // (/its/path)` from a path, with ` (*)` where it was listed before.
    let tree = String::from_utf8(out.stdout).unwrap();
    for name in CHAIN {
        let mut found: Vec<&str> = tree
            .lines()
            .map(|l| l.trim_end_matches(" (*)"))
            .filter(|l| l.split(' ').next() == Some(name))
            .collect();
        found.sort_unstable();
        found.dedup();
        // One copy: a second one, from crates.io, would be unpatched (and
        // its types would not be switchboard's).
        assert_eq!(found.len(), 1, "{name} resolved as {found:?}");
        let expected = root.join("vendor").join(name);
        assert!(
            found[0].ends_with(&format!("({})", expected.display())),
            "{name} is not the vendored copy: {}",
            found[0]
        );
    }
}
