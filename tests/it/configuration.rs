//! docs/CONFIGURATION.md and config/default.toml cannot drift: every
//! setting of one is in the other, with the same default and the right
//! environment variable; and docker/compose.yml passes valid settings.

use std::collections::BTreeMap;

use switchboard::settings::Settings;

const DOC: &str = include_str!("../../docs/CONFIGURATION.md");
const COMPOSE: &str = include_str!("../../docker/compose.yml");
const DOCKERFILE: &str = include_str!("../../docker/Dockerfile");

/// One row of a settings table in the reference.
#[derive(Debug)]
struct Row {
    default: String,
    env: String,
}

/// The documented settings: table rows `| `key` | default | `ENV` | ... |`.
fn documented() -> BTreeMap<String, Row> {
    let mut rows = BTreeMap::new();
    for line in DOC.lines() {
        let cells: Vec<&str> = line.split(" | ").map(str::trim).collect();
        let [key, default, env, ..] = cells.as_slice() else {
            continue;
        };
        let Some(key) = key.strip_prefix("| `").and_then(|k| k.strip_suffix('`')) else {
            continue;
        };
        let previous = rows.insert(
            key.to_owned(),
            Row {
                default: default.trim_matches('`').to_owned(),
                env: env.trim_matches('`').to_owned(),
            },
        );
        assert!(previous.is_none(), "{key} is documented twice");
    }
    assert!(rows.len() > 30, "the reference's tables were not read");
    rows
}

/// The settings of config/default.toml, `services.<name>.*` for the keys
/// of its example services, with their values as TOML.
fn defaults() -> BTreeMap<String, String> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, String>) {
        for (k, v) in table {
            let key = match prefix {
                // Each service's keys are one setting per key.
                "services" => "services.<name>".to_owned(),
                "" => k.clone(),
                p => format!("{p}.{k}"),
            };
            match v {
                toml::Value::Table(t) => walk(&key, t, out),
                other => {
                    out.insert(key, other.to_string());
                }
            }
        }
    }
    let table: toml::Table = switchboard::settings::DEFAULTS
        .parse()
        .expect("config/default.toml is TOML");
    let mut out = BTreeMap::new();
    walk("", &table, &mut out);
    out
}

fn env_name(key: &str) -> String {
    format!("SWITCHBOARD__{}", key.to_uppercase().replace('.', "__"))
}

#[test]
fn every_default_setting_is_documented_with_its_default_and_variable() {
    let doc = documented();
    for (key, value) in defaults() {
        let row = doc.get(&key).unwrap_or_else(|| {
            panic!("{key} is in config/default.toml but not in docs/CONFIGURATION.md")
        });
        assert_eq!(row.env, env_name(&key), "environment variable of {key}");
        // The example services' values are examples; the reference gives
        // what a service gets when it leaves the key out.
        if !key.starts_with("services.") {
            assert_eq!(row.default, value, "default of {key}");
        }
    }
}

#[test]
fn every_documented_setting_exists() {
    let defaults = defaults();
    for (key, row) in documented() {
        assert_eq!(row.env, env_name(&key), "environment variable of {key}");
        if defaults.contains_key(&key) {
            continue;
        }
        // A key of a map entry (`gateway.tokens.<caller>.token`): the loader,
        // which refuses unknown keys, must take it in an entry of its own.
        let (table, field) = key
            .rsplit_once('.')
            .filter(|(t, _)| t.contains('<'))
            .unwrap_or_else(|| {
                panic!("{key} is in docs/CONFIGURATION.md but not in config/default.toml")
            });
        // A placeholder key (`gateway.tokens.<caller>.limits.<key>`): each
        // key of the table it mirrors, with its default, in an entry.
        if field == "<key>" {
            let mirrors = [("gateway.tokens.<caller>.limits", "gateway.limits")];
            let (_, mirrored) = mirrors
                .iter()
                .find(|(t, _)| *t == table)
                .unwrap_or_else(|| panic!("{key}: which table's keys does it take?"));
            let lines: Vec<String> = defaults
                .iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix(&format!("{mirrored}."))
                        .map(|f| format!("{f} = {v}"))
                })
                .collect();
            assert!(!lines.is_empty(), "{mirrored} has keys");
            let entry = table.replace("<caller>", "doc");
            let owner = entry.rsplit_once('.').map(|(o, _)| o).unwrap_or_default();
            let text = format!(
                "[{owner}]\ntoken = \"0123456789abcdef-doc\"\nservices = \"*\"\n[{entry}]\n{}\n",
                lines.join("\n")
            );
            Settings::load_from(None, Some(&text), Vec::new()).unwrap_or_else(|e| {
                panic!("the keys of {mirrored} are not accepted in {table}: {e}\n{text}")
            });
            continue;
        }
        // Each sibling with a value it accepts. Of settings that exclude
        // each other (a token or its digest): the one documented here, or
        // the first.
        let alternatives: &[&[&str]] = &[&["token", "token_sha256"]];
        let keep = |f: &str| match alternatives.iter().find(|g| g.contains(&f)) {
            None => true,
            Some(g) if g.contains(&field) => f == field,
            Some(g) => f == g[0],
        };
        let siblings: Vec<String> = documented()
            .into_keys()
            .filter_map(|k| k.strip_prefix(&format!("{table}.")).map(str::to_owned))
            // Keys of a table inside the entry are checked on their own.
            .filter(|f| !f.contains('.'))
            .filter(|f| keep(f))
            .map(|f| match f.as_str() {
                "token_sha256" => format!("{f} = \"{}\"", "0f".repeat(32)),
                _ => format!("{f} = \"0123456789abcdef-doc\""),
            })
            .collect();
        let entry = table.replace("<caller>", "doc").replace("<name>", "doc");
        let text = format!("[{entry}]\n{}\n", siblings.join("\n"));
        Settings::load_from(None, Some(&text), Vec::new()).unwrap_or_else(|e| {
            panic!("{field} of {table} is documented but not accepted: {e}\n{text}")
        });
    }
}

#[test]
fn token_services_can_come_from_the_environment() {
    let s = Settings::load_from(
        None,
        None,
        [
            (
                "SWITCHBOARD__GATEWAY__TOKENS__OPS__TOKEN",
                "a-long-enough-token-1",
            ),
            ("SWITCHBOARD__GATEWAY__TOKENS__OPS__SERVICES", "echo, slow"),
            (
                "SWITCHBOARD__GATEWAY__TOKENS__OPS__LIMITS__RATE_PER_S",
                "0.5",
            ),
            (
                "SWITCHBOARD__GATEWAY__TOKENS__OPS__LIMITS__MAX_STREAMS",
                "3",
            ),
            ("SWITCHBOARD__GATEWAY__LIMITS__MAX_PENDING", "7"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    )
    .unwrap();
    assert_eq!(s.gateway.tokens["ops"].services, ["echo", "slow"]);
    // A token's own limits over the defaults of every caller.
    let ops = s.gateway.tokens["ops"].limits.over(s.gateway.limits);
    assert_eq!(
        (ops.rate_per_s, ops.max_streams, ops.max_pending),
        (0.5, 3, 7)
    );
    let bad = Settings::load_from(
        None,
        None,
        [
            (
                "SWITCHBOARD__GATEWAY__TOKENS__OPS__TOKEN",
                "a-long-enough-token-1",
            ),
            ("SWITCHBOARD__GATEWAY__TOKENS__OPS__SERVICES", "*"),
            (
                "SWITCHBOARD__GATEWAY__TOKENS__OPS__LIMITS__RATE_PER_S",
                "-1",
            ),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    assert!(
        bad.unwrap_err()
            .to_string()
            .contains("gateway.tokens.ops.limits.rate_per_s")
    );
    let bad = Settings::load_from(
        None,
        None,
        [("SWITCHBOARD__METRICS__BIND", "nowhere")].map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    assert!(bad.unwrap_err().to_string().contains("metrics.bind"));
}

/// The compose file: RabbitMQ with its management UI and a health check,
/// switchboard built from the Dockerfile, waiting for a healthy broker, with
/// settings from the environment that the loader accepts.
#[test]
fn the_compose_file_is_valid_yaml_with_settings_switchboard_accepts() {
    let docs = yaml_rust2::YamlLoader::load_from_str(COMPOSE).expect("compose.yml is YAML");
    let compose = &docs[0];
    let services = &compose["services"];
    let rabbit = &services["rabbitmq"];
    assert!(
        rabbit["image"].as_str().unwrap().contains("management"),
        "the broker image has the management plugin"
    );
    assert!(!rabbit["healthcheck"]["test"].is_badvalue());
    let sb = &services["switchboard"];
    assert_eq!(
        sb["build"]["dockerfile"].as_str(),
        Some("docker/Dockerfile")
    );
    assert_eq!(
        sb["depends_on"]["rabbitmq"]["condition"].as_str(),
        Some("service_healthy")
    );
    let env: Vec<(String, String)> = sb["environment"]
        .as_hash()
        .expect("environment is a map")
        .iter()
        .map(|(k, v)| {
            let value = match v {
                yaml_rust2::Yaml::String(s) => s.clone(),
                yaml_rust2::Yaml::Integer(i) => i.to_string(),
                yaml_rust2::Yaml::Boolean(b) => b.to_string(),
                other => panic!("{k:?}: write values as strings, not {other:?}"),
            };
            (k.as_str().unwrap().to_owned(), value)
        })
        .collect();
    assert!(env.iter().all(|(k, _)| k.starts_with("SWITCHBOARD__")));
    let s = Settings::load_from(None, None, env).expect("the compose settings load");
    assert!(s.gateway.enabled && !s.gateway.tokens.is_empty());
    assert!(s.services["echo"].handler.is_some());
    let port = s.gateway.bind.rsplit(':').next().unwrap();
    let published = sb["ports"].as_vec().expect("ports");
    assert!(
        published
            .iter()
            .any(|p| p.as_str().unwrap().ends_with(&format!(":{port}"))),
        "the gateway's port is published"
    );
    // Its health check is the binary's own subcommand (no curl in the image).
    assert!(DOCKERFILE.contains("HEALTHCHECK"));
    assert!(DOCKERFILE.contains("\"switchboard\", \"health\""));
    assert!(DOCKERFILE.contains("USER "));
}
