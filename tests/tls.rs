//! TLS to the broker (`amqps://`), against RabbitMQ nodes that this test
//! starts beside the shared one on 5672, with certificates it generates:
//! a node whose only listener is TLS, and a node that also requires a client
//! certificate (mutual TLS). What a user observes: a call round-trips over
//! TLS (the publishing pool and the consumers' dedicated connections); a
//! broker that the settings do not trust, `amqps://` against a plain port,
//! a missing CA file, or a client without the certificate a broker asks for
//! are errors that say so and name the URL with its password hidden, never a
//! plain-text connection and never a hang.
//!
//! A test binary of its own (`cargo test --test tls`): each test starts and
//! stops a RabbitMQ node (about 15 s each, the two in parallel), which none
//! of the tests in `it` should wait for. Needs `rabbitmq-server` and, when
//! run as root, the `rabbitmq` user (the nodes run as it, with its Erlang
//! cookie); docs/CONFIGURATION.md, "TLS".

#[path = "it/common.rs"]
mod common;
mod nodes;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use switchboard::Error;
use switchboard::amqp::{Broker, TlsError};
use switchboard::rpc::{Call, RpcClient, RpcOptions};
use switchboard::settings::{QueueType, ServiceSettings, Settings};
use switchboard::worker::{self, Worker};

use nodes::RabbitNode;

/// A CA, and a server and a client certificate it signed, as PEM files in
/// `dir`.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Pki {
    /// The server certificate names `server_names` (DNS names or IPs).
    fn new(dir: &Path, server_names: &[&str]) -> Self {
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "switchboard test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let mut p = CertificateParams::new(names.clone()).unwrap();
            p.distinguished_name.push(
                DnType::CommonName,
                names.first().cloned().unwrap_or_else(|| "client".into()),
            );
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![usage];
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let names = server_names.iter().map(|n| n.to_string()).collect();
        let (server_cert, server_key) = leaf(names, ExtendedKeyUsagePurpose::ServerAuth);
        let (client_cert, client_key) = leaf(Vec::new(), ExtendedKeyUsagePurpose::ClientAuth);
        let write = |name: &str, pem: &str| {
            let path = dir.join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        Self {
            ca: write("ca.pem", &ca_cert.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client.key", &client_key),
        }
    }
}

/// A node whose only listener is TLS, and its certificates.
struct Node {
    node: RabbitNode,
    pki: Pki,
}

impl Node {
    /// Starts a node whose only listener is TLS, with a server certificate
    /// for `server_names`; `mutual`: it requires a client certificate
    /// signed by its CA. Returns once the listener accepts connections.
    async fn start(tag: &str, server_names: &[&str], mutual: bool) -> Node {
        let (verify, fail_if_no_peer_cert) = if mutual {
            ("verify_peer", "true")
        } else {
            ("verify_none", "false")
        };
        let mut pki = None;
        let node = RabbitNode::start(&format!("sbtls-{tag}"), |dir, port| {
            let p = Pki::new(dir, server_names);
            let conf = format!(
                "listeners.tcp = none\n\
                 listeners.ssl.default = 127.0.0.1:{port}\n\
                 ssl_options.cacertfile = {ca}\n\
                 ssl_options.certfile = {cert}\n\
                 ssl_options.keyfile = {key}\n\
                 ssl_options.verify = {verify}\n\
                 ssl_options.fail_if_no_peer_cert = {fail_if_no_peer_cert}\n",
                ca = p.ca.display(),
                cert = p.server_cert.display(),
                key = p.server_key.display(),
            );
            pki = Some(p);
            conf
        })
        .await;
        Node {
            node,
            pki: pki.expect("written with the config"),
        }
    }

    /// The node's `amqps://` URL, guest's password in it.
    fn url(&self) -> String {
        format!("amqps://guest:guest@127.0.0.1:{}/%2f", self.node.port)
    }
}

/// Settings for `url`, as a user sets them (environment variables); `tls`
/// adds `SWITCHBOARD__AMQP__TLS_*` ones.
fn settings(url: &str, tls: &[(&str, &Path)], server_name: Option<&str>) -> Settings {
    let prefix = format!("t-tls-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut env = vec![
        ("SWITCHBOARD__AMQP__URL".to_string(), url.to_string()),
        ("SWITCHBOARD__AMQP__PREFIX".to_string(), prefix.clone()),
        (
            "SWITCHBOARD__AMQP__INSTANCE_ID".to_string(),
            format!("{prefix}-i"),
        ),
        (
            "SWITCHBOARD__AMQP__CONNECT_TIMEOUT_MS".to_string(),
            "3000".into(),
        ),
    ];
    for (key, path) in tls {
        env.push((
            format!("SWITCHBOARD__AMQP__{}", key.to_uppercase()),
            path.display().to_string(),
        ));
    }
    if let Some(name) = server_name {
        env.push(("SWITCHBOARD__AMQP__TLS_SERVER_NAME".into(), name.into()));
    }
    Settings::load_from(None, None, env).expect("valid settings")
}

/// A worker of `echo` and an RPC client on `broker`: a call and its reply
/// travel over the publishing pool and two dedicated connections.
async fn round_trip(broker: &Broker, s: &Settings) {
    let svc = ServiceSettings {
        // A throwaway node: a classic queue is enough.
        queue_type: QueueType::Classic,
        ..ServiceSettings::default()
    };
    let w = Worker::start(broker, "echo", &svc, worker::echo(Duration::ZERO))
        .await
        .expect("the worker starts over TLS");
    let client = RpcClient::start(broker, RpcOptions::from(&s.rpc))
        .await
        .expect("the RPC client starts over TLS");
    let reply = client
        .call(Call::new("echo", &br#"{"over":"tls"}"#[..]).timeout(Duration::from_secs(10)))
        .await
        .expect("the call round-trips");
    assert_eq!(reply.status, 200);
    assert_eq!(&reply.body[..], br#"{"over":"tls"}"#);
    client.close().await;
    w.drain(Duration::ZERO).await;
    broker.close().await;
}

/// The error of `Broker::connect`, with its message, which must name the
/// URL with the password hidden.
async fn refused(s: &Settings) -> (Error, String) {
    let err = Broker::connect(&s.amqp)
        .await
        .expect_err("connected where it must not");
    let msg = err.to_string();
    assert!(msg.contains("guest:***@127.0.0.1"), "no URL: {msg}");
    assert!(!msg.contains("guest:guest"), "the password shows: {msg}");
    (err, msg)
}

/// What went wrong with TLS, for an [`Error::Tls`] (anything else fails).
fn tls(err: &Error) -> &TlsError {
    match err {
        Error::Tls { source, .. } => source,
        other => panic!("not a TLS error: {other:?}"),
    }
}

#[actix_rt::test]
async fn amqps_verifies_the_broker_and_never_falls_back_to_plain_text() {
    let node = Node::start("tls", &["localhost", "127.0.0.1"], false).await;
    let ca = node.pki.ca.clone();

    // The test CA in amqp.tls_ca_file: a call round-trips. The node has no
    // plain listener (listeners.tcp = none), so this is TLS or nothing.
    let s = settings(&node.url(), &[("tls_ca_file", &ca)], None);
    let broker = Broker::connect(&s.amqp).await.expect("connects over TLS");
    round_trip(&broker, &s).await;

    // Without it, the system's roots do not know the test CA.
    let (err, msg) = refused(&settings(&node.url(), &[], None)).await;
    assert!(matches!(tls(&err), TlsError::Handshake { .. }), "{err:?}");
    assert!(msg.contains("does not verify"), "{msg}");

    // amqps:// against the shared broker's plain port: an error at once
    // (the broker answers the TLS hello with its AMQP header), not a hang
    // until the connect timeout.
    let plain = "amqps://guest:guest@127.0.0.1:5672/%2f";
    let started = Instant::now();
    let (err, msg) = refused(&settings(plain, &[("tls_ca_file", &ca)], None)).await;
    assert!(
        started.elapsed() < Duration::from_millis(3000),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(tls(&err), TlsError::Handshake { .. }), "{err:?}");
    assert!(msg.contains("TLS listener"), "{msg}");

    // A CA file that is not there: the setting and the file are named.
    let missing = node.pki.ca.with_file_name("no-such-ca.pem");
    let (err, msg) = refused(&settings(&node.url(), &[("tls_ca_file", &missing)], None)).await;
    assert!(
        matches!(
            tls(&err),
            TlsError::Unreadable {
                setting: "amqp.tls_ca_file",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(msg.contains("no-such-ca.pem"), "{msg}");

    // A file that holds no certificate (the key, by mistake).
    let key = node.pki.server_key.clone();
    let (_, msg) = refused(&settings(&node.url(), &[("tls_ca_file", &key)], None)).await;
    assert!(msg.contains("amqp.tls_ca_file"), "{msg}");
}

#[actix_rt::test]
async fn mutual_tls_needs_a_client_certificate_the_broker_trusts() {
    // The server certificate names only sbtls.test: the URL's 127.0.0.1
    // verifies through amqp.tls_server_name.
    let node = Node::start("mtls", &["sbtls.test"], true).await;
    let pki = &node.pki;
    let ca = ("tls_ca_file", pki.ca.as_path());
    let cert = ("tls_cert_file", pki.client_cert.as_path());
    let key = ("tls_key_file", pki.client_key.as_path());

    // With the client certificate: a call round-trips.
    let s = settings(&node.url(), &[ca, cert, key], Some("sbtls.test"));
    let broker = Broker::connect(&s.amqp)
        .await
        .expect("connects with a client certificate");
    round_trip(&broker, &s).await;

    // Without it, the broker refuses, and the error says what to set.
    // Read as the broker's alert, or as the reset that can overtake it (TLS
    // 1.3: the refusal comes after the client's side of the handshake).
    let (err, msg) = refused(&settings(&node.url(), &[ca], Some("sbtls.test"))).await;
    assert!(
        matches!(
            tls(&err),
            TlsError::Handshake { .. } | TlsError::Closed { .. }
        ),
        "{err:?}"
    );
    assert!(msg.contains("amqp.tls_cert_file"), "{msg}");

    // The broker's certificate must name the server: 127.0.0.1 is not
    // sbtls.test.
    let (_, msg) = refused(&settings(&node.url(), &[ca, cert, key], None)).await;
    assert!(msg.contains("does not verify"), "{msg}");
}

#[test]
fn tls_settings_that_cannot_work_are_refused_at_load() {
    let load = |url: &str, extra: &[(&str, &str)]| {
        let mut env = vec![("SWITCHBOARD__AMQP__URL".to_string(), url.to_string())];
        for (k, v) in extra {
            env.push((
                format!("SWITCHBOARD__AMQP__{}", k.to_uppercase()),
                v.to_string(),
            ));
        }
        Settings::load_from(None, None, env)
    };
    let refused = |url: &str, extra: &[(&str, &str)], key: &str| {
        let err = load(url, extra).expect_err("accepted");
        assert!(err.to_string().contains(key), "{err}");
    };
    let plain = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let tls = "amqps://guest:guest@127.0.0.1:5671/%2f";
    // TLS settings with a plain URL would be plain text.
    refused(plain, &[("tls_ca_file", "/etc/ca.pem")], "amqp.tls_ca_file");
    refused(
        plain,
        &[("tls_server_name", "rabbit")],
        "amqp.tls_server_name",
    );
    // A certificate without its key, or a key without its certificate.
    refused(tls, &[("tls_cert_file", "/c.pem")], "amqp.tls_key_file");
    refused(tls, &[("tls_key_file", "/k.pem")], "amqp.tls_cert_file");
    // A server name that is neither a DNS name nor an IP address.
    refused(
        tls,
        &[("tls_server_name", "not a name")],
        "amqp.tls_server_name",
    );
    // What works: amqps:// alone (system roots), or with every setting.
    load(tls, &[]).expect("amqps:// alone");
    let all = [
        ("tls_ca_file", "/ca.pem"),
        ("tls_cert_file", "/c.pem"),
        ("tls_key_file", "/k.pem"),
        ("tls_server_name", "rabbit.internal"),
    ];
    load(tls, &all).expect("every TLS setting");
}
