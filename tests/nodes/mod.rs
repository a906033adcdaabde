//! RabbitMQ nodes that a test starts beside the shared broker on 5672, from
//! the local `rabbitmq-server`: each with its own node name, ports, config
//! file and data in a temporary folder (owned by the `rabbitmq` user when
//! run as root, so that the nodes share that user's Erlang cookie and can
//! form a cluster). Used by `tests/tls.rs` and `tests/cluster.rs`.

#![allow(dead_code)] // each test binary uses its part

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{eventually, free_port};

/// How long a node may take to boot (about 15 s here; CI machines vary).
pub const BOOT_LIMIT: Duration = Duration::from_secs(90);

/// A node of this test. Stopped, through its node name, when dropped: on
/// every exit path, a failed assertion included.
pub struct RabbitNode {
    /// `<tag>-<pid>@localhost`.
    pub name: String,
    /// Its AMQP listener (plain or TLS, as its config says).
    pub port: u16,
    pid_file: PathBuf,
    /// Stopped already: nothing left to stop when dropped.
    stopped: std::sync::atomic::AtomicBool,
    /// Removed after the node has stopped (fields drop after `drop`).
    dir: tempfile::TempDir,
}

/// Whether this process runs as root (the owner of its /proc entry).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `program` with `args`, run as the `rabbitmq` user when this process is
/// root (the nodes use its Erlang cookie), else as this user.
fn as_rabbitmq(program: &str, args: &[String]) -> Command {
    let mut c = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "rabbitmq", "--", program]);
        c
    } else {
        Command::new(program)
    };
    c.args(args);
    c
}

impl RabbitNode {
    /// Starts node `<tag>-<pid>@localhost`; `config` writes what its folder
    /// needs (certificates) and returns its `rabbitmq.conf`, given the folder
    /// and the AMQP port. Returns once that port accepts connections.
    pub async fn start(tag: &str, config: impl FnOnce(&Path, u16) -> String) -> RabbitNode {
        let dir = tempfile::Builder::new()
            .prefix(&format!("switchboard-{tag}-"))
            .tempdir()
            .unwrap();
        let d = dir.path();
        let name = format!("{tag}-{}@localhost", std::process::id());
        let port = free_port();
        let conf = d.join("rabbitmq.conf");
        std::fs::write(&conf, config(d, port)).unwrap();
        let plugins = d.join("enabled_plugins");
        std::fs::write(&plugins, "[].\n").unwrap();
        let pid_file = d.join("node.pid");
        if is_root() {
            let chown = Command::new("chown")
                .args(["-R", "rabbitmq:rabbitmq"])
                .arg(d)
                .status()
                .unwrap();
            assert!(chown.success(), "chown to the rabbitmq user failed");
        }
        let env = [
            ("RABBITMQ_NODENAME", name.clone()),
            ("RABBITMQ_CONFIG_FILE", conf.display().to_string()),
            ("RABBITMQ_NODE_PORT", port.to_string()),
            ("RABBITMQ_DIST_PORT", free_port().to_string()),
            (
                "RABBITMQ_MNESIA_BASE",
                d.join("mnesia").display().to_string(),
            ),
            ("RABBITMQ_LOG_BASE", d.join("log").display().to_string()),
            ("RABBITMQ_PID_FILE", pid_file.display().to_string()),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                plugins.display().to_string(),
            ),
        ];
        let mut args: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        args.extend(["rabbitmq-server".into(), "-detached".into()]);
        // Built before the node starts: dropped, it stops the node.
        let node = RabbitNode {
            name,
            port,
            pid_file,
            stopped: Default::default(),
            dir,
        };
        let started = as_rabbitmq("env", &args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("rabbitmq-server runs (is RabbitMQ installed?)");
        assert!(started.success(), "rabbitmq-server -detached failed");
        node.wait_until_listening().await;
        node
    }

    /// Polls the AMQP port until it accepts a connection.
    pub async fn wait_until_listening(&self) {
        let what = format!("node {} listening on {}", self.name, self.port);
        let listening = eventually(BOOT_LIMIT, &what, || async {
            tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
        });
        // The node's log says why it did not come up.
        if let Err(panic) =
            futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(listening)).await
        {
            eprintln!("node {} log:\n{}", self.name, self.log_tail());
            std::panic::resume_unwind(panic);
        }
    }

    /// The last lines of the node's log.
    pub fn log_tail(&self) -> String {
        let log = self
            .dir
            .path()
            .join("log")
            .join(format!("{}.log", self.name));
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Runs `rabbitmqctl -n <this node> args` (blocking: a test's setup and
    /// its fault), and fails with its output if it fails.
    pub fn ctl(&self, args: &[&str]) {
        let (ok, printed) = self.run_ctl(args);
        assert!(
            ok,
            "rabbitmqctl {args:?} on {} failed: {printed}",
            self.name
        );
    }

    /// What `rabbitmqctl -n <this node> args` prints (its errors too): a
    /// failed test's view of the cluster.
    #[allow(dead_code)] // used by the cluster test only
    pub fn ctl_output(&self, args: &[&str]) -> String {
        self.run_ctl(args).1
    }

    /// Whether `rabbitmqctl -n <this node> args` succeeded, and what it
    /// printed (stdout, then stderr).
    fn run_ctl(&self, args: &[&str]) -> (bool, String) {
        let mut all = vec!["-n".to_string(), self.name.clone()];
        all.extend(args.iter().map(|a| a.to_string()));
        match as_rabbitmq("rabbitmqctl", &all).output() {
            Ok(out) => (
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ),
            Err(e) => (false, format!("rabbitmqctl did not run: {e}")),
        }
    }

    /// Stops the node and waits until its process is gone (once: on a
    /// stopped node, `rabbitmqctl stop` would wait for it to answer).
    pub fn stop(&self) {
        if self.stopped.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let args = [
            "-n".to_string(),
            self.name.clone(),
            "stop".into(),
            self.pid_file.display().to_string(),
        ];
        let _ = as_rabbitmq("rabbitmqctl", &args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        // `stop` with the pid file waits until the node's process is gone,
        // so that its folder can go next. A stopped node: nothing to do.
        self.stop();
    }
}
