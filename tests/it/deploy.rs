//! The Kubernetes manifests of `deploy/`: every file parses and is listed
//! in the kustomization; each Deployment's settings (its ConfigMap, its
//! literal variables, its Secret's keys with placeholder values) load as
//! `serve` would load them; probes reach `/healthz` and `/readyz` on the port
//! the process listens on; the Service, the disruption budgets and KEDA's
//! ScaledObject point at what exists, the latter at the queue [`Names`]
//! gives the worker's service.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use switchboard::amqp::Names;
use switchboard::settings::Settings;
use yaml_rust2::{Yaml, YamlLoader};

/// One parsed document and the file it came from.
struct Doc {
    file: String,
    yaml: Yaml,
}

impl Doc {
    fn kind(&self) -> &str {
        self.yaml["kind"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.yaml["metadata"]["name"].as_str().unwrap_or("")
    }
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Every document of every `*.yaml` in `dir`, each with `apiVersion`, `kind`
/// and `metadata.name` (the kustomization's name is optional).
fn load(dir: &Path) -> (Vec<Doc>, Vec<String>) {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .expect("deploy/ exists")
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let parsed = YamlLoader::load_from_str(&text)
            .unwrap_or_else(|e| panic!("deploy/{file} is not YAML: {e}"));
        for yaml in parsed {
            let doc = Doc {
                file: file.clone(),
                yaml,
            };
            assert!(
                doc.yaml["apiVersion"].as_str().is_some() && !doc.kind().is_empty(),
                "deploy/{file}: a document without apiVersion or kind"
            );
            assert!(
                doc.kind() == "Kustomization" || !doc.name().is_empty(),
                "deploy/{file}: a {} without metadata.name",
                doc.kind()
            );
            docs.push(doc);
        }
    }
    (docs, files)
}

fn find<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Doc {
    docs.iter()
        .find(|d| d.kind() == kind && d.name() == name)
        .unwrap_or_else(|| panic!("no {kind} {name:?} in deploy/"))
}

/// A scalar as the string Kubernetes would see (env values must be strings;
/// a number or a boolean is refused by the API server).
fn string(y: &Yaml, what: &str) -> String {
    match y {
        Yaml::String(s) => s.clone(),
        other => panic!("{what}: write it as a quoted string, not {other:?}"),
    }
}

/// What stands for a value kept in a Secret, by the setting it fills: valid
/// for its setting, so that the load fails only on a wrong name.
fn placeholder(var: &str) -> String {
    match var {
        "SWITCHBOARD__AMQP__URL" => {
            "amqp://switchboard:placeholder@rabbitmq-server-0.rabbitmq-nodes:5672/%2f".into()
        }
        "SWITCHBOARD__GATEWAY__STORE_URL" => {
            "postgres://switchboard:placeholder@postgres:5432/switchboard".into()
        }
        "SWITCHBOARD__CALLBACKS__SECRET" => "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        v if v.starts_with("SWITCHBOARD__GATEWAY__TOKENS__") && v.ends_with("__TOKEN") => {
            "placeholder-token-0123456789abcdef".into()
        }
        other => panic!("{other} comes from a Secret: give it a placeholder in tests/it/deploy.rs"),
    }
}

/// The settings of one container: its ConfigMaps (`envFrom`), then its own
/// `env` (values, Secret keys as placeholders, the pod's name), loaded as
/// `serve` loads them. Also returns the variables, by name.
fn container_settings(
    docs: &[Doc],
    deployment: &str,
    c: &Yaml,
) -> (Settings, BTreeMap<String, Yaml>) {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut raw: BTreeMap<String, Yaml> = BTreeMap::new();
    for from in c["envFrom"].as_vec().map(Vec::as_slice).unwrap_or_default() {
        let name = from["configMapRef"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("{deployment}: envFrom other than a ConfigMap"));
        let data = find(docs, "ConfigMap", name).yaml["data"]
            .as_hash()
            .unwrap_or_else(|| panic!("ConfigMap {name} has no data"));
        for (k, v) in data {
            let k = k.as_str().unwrap().to_owned();
            env.insert(k.clone(), string(v, &format!("ConfigMap {name}: {k}")));
            raw.insert(k, v.clone());
        }
    }
    for var in c["env"].as_vec().expect("env is a list") {
        let name = var["name"].as_str().expect("env name").to_owned();
        let value = if !var["value"].is_badvalue() {
            string(&var["value"], &format!("{deployment}: {name}"))
        } else if let Some(r) = var["valueFrom"]["secretKeyRef"].as_hash() {
            let r = Yaml::Hash(r.clone());
            let secret = find(docs, "Secret", r["name"].as_str().unwrap());
            let key = r["key"].as_str().unwrap();
            assert!(
                !secret.yaml["stringData"][key].is_badvalue(),
                "{deployment}: {name} reads key {key:?}, which Secret {} lacks",
                secret.name()
            );
            placeholder(&name)
        } else if let Some(path) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            assert_eq!(path, "metadata.name", "{deployment}: {name}");
            // A pod name as a Deployment makes them.
            format!("{deployment}-7c9d5b8f6d-x4k2p")
        } else {
            panic!("{deployment}: {name} has neither a value nor a known valueFrom")
        };
        raw.insert(name.clone(), var.clone());
        env.insert(name, value);
    }
    for k in env.keys() {
        assert!(
            k.starts_with("SWITCHBOARD__"),
            "{deployment}: {k} is not a switchboard setting"
        );
    }
    let settings = Settings::load_from(None, None, env)
        .unwrap_or_else(|e| panic!("{deployment}: its settings do not load: {e}"));
    (settings, raw)
}

/// The container port a probe or a Service names (by name or by number).
fn container_port(c: &Yaml, port: &Yaml) -> i64 {
    let ports = c["ports"].as_vec().expect("the container lists its ports");
    let found = match port {
        Yaml::String(name) => ports
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_i64()),
        Yaml::Integer(n) => ports
            .iter()
            .find(|p| p["containerPort"].as_i64() == Some(*n))
            .map(|_| *n),
        _ => None,
    };
    found.unwrap_or_else(|| panic!("port {port:?} is not one the container exposes"))
}

/// The port of an `IP:port` listen address that is not loopback (the kubelet
/// and the Service reach the pod on its own address).
fn listen_port(bind: &str, setting: &str) -> i64 {
    let addr: std::net::SocketAddr = bind.parse().unwrap();
    assert!(
        !addr.ip().is_loopback(),
        "{setting} = {bind}: loopback, unreachable from outside the pod"
    );
    i64::from(addr.port())
}

/// The labels of a Deployment's pods.
fn pod_labels(d: &Doc) -> &yaml_rust2::yaml::Hash {
    d.yaml["spec"]["template"]["metadata"]["labels"]
        .as_hash()
        .expect("pod labels")
}

/// Whether `selector` (a map of labels) selects pods labelled `labels`.
fn selects(selector: &Yaml, labels: &yaml_rust2::yaml::Hash) -> bool {
    let selector = selector.as_hash().expect("a selector");
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Checks one Deployment: its only container's settings, probes and
/// resources; returns the settings.
fn check_deployment(docs: &[Doc], d: &Doc) -> Settings {
    let name = d.name();
    assert!(
        selects(&d.yaml["spec"]["selector"]["matchLabels"], pod_labels(d)),
        "{name}: its selector does not select its own pods"
    );
    let containers = d.yaml["spec"]["template"]["spec"]["containers"]
        .as_vec()
        .expect("containers");
    assert_eq!(containers.len(), 1, "{name}: one container");
    let c = &containers[0];
    assert_eq!(c["args"][0].as_str(), Some("serve"), "{name} runs serve");
    let (settings, vars) = container_settings(docs, name, c);
    // Every replica a name of its own (its reply queue's): the pod's.
    assert_eq!(
        vars["SWITCHBOARD__AMQP__INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("metadata.name"),
        "{name}: amqp.instance_id from the pod's name"
    );
    assert!(
        vars["SWITCHBOARD__AMQP__URL"]["valueFrom"]["secretKeyRef"]
            .as_hash()
            .is_some(),
        "{name}: amqp.url (with its password) from the Secret"
    );
    // Where the process answers /healthz and /readyz: the gateway's address
    // with the gateway, metrics.bind without it.
    let serving = if settings.gateway.enabled {
        listen_port(&settings.gateway.bind, "gateway.bind")
    } else {
        listen_port(&settings.metrics.bind, "metrics.bind")
    };
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{name}: {probe}'s path");
        assert_eq!(
            container_port(c, &get["port"]),
            serving,
            "{name}: {probe} is not on the port the process serves it on"
        );
    }
    let requests = &c["resources"]["requests"];
    assert!(
        requests["cpu"].as_str().is_some() && requests["memory"].as_str().is_some(),
        "{name}: resource requests for cpu and memory"
    );
    assert!(
        !c["resources"]["limits"]["memory"].is_badvalue(),
        "{name}: a memory limit"
    );
    let grace = d.yaml["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_i64()
        .unwrap_or(30);
    assert!(
        grace * 1000 > settings.shutdown.grace_ms as i64,
        "{name}: the pod's grace period must outlast shutdown.grace_ms"
    );
    settings
}

#[test]
fn the_kubernetes_manifests_parse_and_their_settings_load() {
    let (docs, files) = load(&deploy_dir());

    // The kustomization lists every other file, and only files that exist.
    let k = docs
        .iter()
        .find(|d| d.kind() == "Kustomization")
        .expect("deploy/kustomization.yaml");
    assert_eq!(k.file, "kustomization.yaml");
    let listed: BTreeSet<&str> = k.yaml["resources"]
        .as_vec()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let present: BTreeSet<&str> = files
        .iter()
        .map(String::as_str)
        .filter(|f| *f != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "kustomization.yaml's resources");

    // The gateway: several replicas on one PostgreSQL store, tokens required.
    let gw_doc = find(&docs, "Deployment", "switchboard-gateway");
    let gw = check_deployment(&docs, gw_doc);
    assert!(gw.gateway.enabled);
    assert!(
        gw_doc.yaml["spec"]["replicas"].as_i64().unwrap_or(1) >= 2,
        "several gateway replicas"
    );
    assert!(
        gw.gateway.store_url.starts_with("postgres"),
        "gateway replicas share a PostgreSQL store, not an SQLite file each"
    );
    assert!(
        !gw.gateway.tokens.is_empty(),
        "a gateway facing a network has tokens"
    );
    assert!(
        gw.services.values().all(|s| s.handler.is_none()),
        "the gateways serve no service themselves"
    );

    // The worker: no gateway, one service it serves.
    let wk_doc = find(&docs, "Deployment", "switchboard-worker");
    let wk = check_deployment(&docs, wk_doc);
    assert!(!wk.gateway.enabled, "the worker runs no gateway");
    let served: Vec<&String> = wk
        .services
        .iter()
        .filter(|(_, s)| s.handler.is_some())
        .map(|(n, _)| n)
        .collect();
    assert_eq!(served.len(), 1, "the worker serves one service");
    let service = served[0];
    assert_eq!(gw.amqp.prefix, wk.amqp.prefix, "one prefix");
    let (g, w) = (&gw.services[service], &wk.services[service]);
    assert!(
        g.queue_type == w.queue_type && g.delivery_limit == w.delivery_limit,
        "gateway and worker declare {service}'s queue with the same arguments"
    );

    // The Service reaches the gateway pods on the gateway's port.
    let svc = find(&docs, "Service", "switchboard-gateway");
    assert!(selects(&svc.yaml["spec"]["selector"], pod_labels(gw_doc)));
    let gw_container = &gw_doc.yaml["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container_port(gw_container, &svc.yaml["spec"]["ports"][0]["targetPort"]),
        listen_port(&gw.gateway.bind, "gateway.bind")
    );

    // A disruption budget for each Deployment.
    for d in [gw_doc, wk_doc] {
        assert!(
            docs.iter().any(|p| p.kind() == "PodDisruptionBudget"
                && selects(&p.yaml["spec"]["selector"]["matchLabels"], pod_labels(d))),
            "no PodDisruptionBudget selects {}'s pods",
            d.name()
        );
    }

    // KEDA scales the worker on its service queue's depth.
    let scaled: Vec<&Doc> = docs.iter().filter(|d| d.kind() == "ScaledObject").collect();
    assert_eq!(scaled.len(), 1);
    let so = &scaled[0].yaml;
    assert_eq!(so["apiVersion"].as_str(), Some("keda.sh/v1alpha1"));
    assert_eq!(
        so["spec"]["scaleTargetRef"]["name"].as_str(),
        Some(wk_doc.name())
    );
    assert!(so["spec"]["minReplicaCount"].as_i64().unwrap_or(0) >= 1);
    let trigger = &so["spec"]["triggers"][0];
    assert_eq!(trigger["type"].as_str(), Some("rabbitmq"));
    assert_eq!(trigger["metadata"]["mode"].as_str(), Some("QueueLength"));
    assert_eq!(
        trigger["metadata"]["queueName"].as_str(),
        Some(
            Names::new(wk.amqp.prefix.clone())
                .service_queue(service)
                .as_str()
        ),
        "the ScaledObject watches the worker's service queue"
    );
    let auth = find(
        &docs,
        "TriggerAuthentication",
        trigger["authenticationRef"]["name"]
            .as_str()
            .expect("authenticationRef"),
    );
    for target in auth.yaml["spec"]["secretTargetRef"]
        .as_vec()
        .expect("secretTargetRef")
    {
        let secret = find(&docs, "Secret", target["name"].as_str().unwrap());
        let key = target["key"].as_str().unwrap();
        assert!(
            !secret.yaml["stringData"][key].is_badvalue(),
            "KEDA reads key {key:?}, which Secret {} lacks",
            secret.name()
        );
    }
}
