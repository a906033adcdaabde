//! What an application that depends on switchboard gets (README, "As a
//! library"): the vendored, patched AMQP parser, not crates.io's. Cargo
//! applies `[patch]` only at the top of a dependency graph, so this is
//! checked from a dependent's side: a throwaway crate depending on
//! switchboard by path, resolved by `cargo metadata --offline` (no build).

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
        .args(["metadata", "--format-version", "1", "--offline"])
        .arg("--manifest-path")
        .arg(dir.path().join("Cargo.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    for name in CHAIN {
        let found: Vec<&serde_json::Value> =
            packages.iter().filter(|p| p["name"] == *name).collect();
        // One copy: a second one, from crates.io, would be unpatched (and
        // its types would not be switchboard's).
        assert_eq!(found.len(), 1, "{name} resolved {} times", found.len());
        let p = found[0];
        assert!(p["source"].is_null(), "{name} comes from {}", p["source"]);
        let expected = root.join("vendor").join(name).join("Cargo.toml");
        assert_eq!(
            Path::new(p["manifest_path"].as_str().unwrap()),
            expected,
            "{name} is not the vendored copy"
        );
    }
}
