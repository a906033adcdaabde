//! `switchboard bench ...` runs the `switchboard-bench` binary found next to
//! `switchboard`, with every argument after `bench` untouched: seen here
//! with a stand-in for that binary beside a link to the real `switchboard`
//! (the bench itself is tested in `bench/tests`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A directory of the test's own holding a link to the `switchboard` binary
/// under test (it looks for `switchboard-bench` next to its own path).
fn lone_switchboard(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{name}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join(format!("switchboard{}", std::env::consts::EXE_SUFFIX));
    let real = env!("CARGO_BIN_EXE_switchboard");
    // A hard link keeps its own path (a symbolic link would resolve to the
    // real binary's directory); a copy where links are not possible.
    if std::fs::hard_link(real, &exe).is_err() {
        std::fs::copy(real, &exe).unwrap();
    }
    exe
}

#[cfg(unix)]
#[test]
fn bench_runs_the_bench_binary_with_every_argument_and_its_exit_status() {
    use std::os::unix::fs::PermissionsExt;

    let exe = lone_switchboard("bench-dispatch");
    let dir = exe.parent().unwrap().to_owned();
    // Prints what it was given, one argument a line, then the settings file
    // it was told about; exits 7.
    let stand_in = dir.join("switchboard-bench");
    std::fs::write(
        &stand_in,
        "#!/bin/sh\nfor a in \"$@\"; do echo \"arg:$a\"; done\necho \"config:$SWITCHBOARD_CONFIG\"\nexit 7\n",
    )
    .unwrap();
    std::fs::set_permissions(&stand_in, std::fs::Permissions::from_mode(0o755)).unwrap();

    let out = Command::new(&exe)
        .args(["--config", "my.toml", "bench", "compare", "--calls", "5"])
        .args(["--concurrency", "1,32", "--help"])
        .env_remove("SWITCHBOARD_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(7), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "arg:compare",
            "arg:--calls",
            "arg:5",
            "arg:--concurrency",
            "arg:1,32",
            "arg:--help",
            "config:my.toml",
        ]
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bench_without_the_bench_binary_says_how_to_build_it() {
    let exe = lone_switchboard("bench-missing");
    let out = Command::new(&exe)
        .args(["bench", "rpc", "--calls", "5"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty());
    let expected = exe.with_file_name(format!("switchboard-bench{}", std::env::consts::EXE_SUFFIX));
    assert!(stderr.contains(&expected.display().to_string()), "{stderr}");
    assert!(stderr.contains("cargo build --release"), "{stderr}");
    std::fs::remove_dir_all(exe.parent().unwrap()).unwrap();
}
