//! Typed settings: `config/default.toml` (embedded), then an optional file,
//! then `SWITCHBOARD__SECTION__KEY` environment variables.
//!
//! Every key is documented in `config/default.toml`, where its default is
//! defined. Loading fails with a [`SettingsError`] that names the offending
//! key, so a typo stops start-up instead of being silently ignored.
//!
//! # Layout
//! - this file: [`Settings`] and how it is loaded, [`SettingsError`].
//! - `amqp`, `gateway`, `services`, `ops`: the sections' types (re-exported
//!   here).
//! - `validate`: what types alone cannot check ([`Settings::validate`]).
//! - `redact`: how secrets are shown (never).
//!
//! Secrets (tokens, the callback secret, the management password, passwords
//! in URLs) never leave this module in clear through `Debug` or an error:
//! the settings types show them through [`redact_url`] and [`REDACTED`],
//! and validation messages name a setting, never its secret value.

use std::collections::BTreeMap;
use std::path::Path;

use config::{Config, Environment, File, FileFormat, Source};
use serde::Deserialize;

mod amqp;
mod gateway;
mod ops;
mod redact;
mod services;
mod validate;

pub use amqp::{AmqpSettings, ReplyMode, RpcSettings};
pub use gateway::{
    CallbackSettings, CallerLimits, CallerLimitsOverride, GatewaySettings, TokenSettings,
};
pub use ops::{
    LogFormat, LogSettings, ManagementSettings, MetricsSettings, OtelProtocol, OtelSettings,
    ShutdownSettings,
};
pub use redact::{REDACTED, redact_url};
pub use services::{BuiltinHandler, QueueType, ServiceSettings, is_name};

/// The defaults, compiled in so the binary runs without any file beside it.
pub const DEFAULTS: &str = include_str!("../../config/default.toml");

/// Why the settings could not be loaded; the message names the setting.
#[derive(Debug, thiserror::Error)]
#[error("invalid settings: {0}")]
pub struct SettingsError(pub String);

/// Where the services in effect come from (see [`Settings::load_from`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServicesSource {
    /// No file and no environment variable names a service of its own: the
    /// demo services of `config/default.toml` (`echo`, `slow`).
    Defaults,
    /// The settings file's `[services]` table, exactly.
    File,
    /// The environment alone: the services its variables name.
    Environment,
}

impl ServicesSource {
    /// Decides from the user's files (`user`), the embedded `defaults` and
    /// the names of the `SWITCHBOARD__*` variables.
    fn of<'a>(
        user: &Config,
        defaults: &config::Map<String, config::Value>,
        vars: impl Iterator<Item = &'a str>,
    ) -> Result<Self, SettingsError> {
        let user = user.collect().map_err(|e| SettingsError(e.to_string()))?;
        if user.contains_key("services") {
            return Ok(Self::File);
        }
        let demos: Vec<String> = defaults
            .get("services")
            .and_then(|v| v.clone().into_table().ok())
            .map(|t| t.into_keys().collect())
            .unwrap_or_default();
        // `SWITCHBOARD__SERVICES__<NAME>__<KEY>`, the name lower-cased as
        // the loader reads it.
        let named_by_env = vars.filter_map(|k| {
            let rest = k.strip_prefix("SWITCHBOARD__SERVICES__")?;
            let (name, _) = rest.split_once("__")?;
            Some(name.to_lowercase())
        });
        let mut adds = false;
        for name in named_by_env {
            adds |= !demos.contains(&name);
        }
        Ok(if adds {
            Self::Environment
        } else {
            Self::Defaults
        })
    }
}

/// An already-read table as a settings source (the defaults, less what the
/// user replaces).
#[derive(Debug, Clone)]
struct Layer(config::Map<String, config::Value>);

impl config::Source for Layer {
    fn clone_into_box(&self) -> Box<dyn config::Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<config::Map<String, config::Value>, config::ConfigError> {
        Ok(self.0.clone())
    }
}

/// All of switchboard's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The broker and the names used on it.
    pub amqp: AmqpSettings,
    /// The RPC client: reply mode, bounds, default deadline.
    pub rpc: RpcSettings,
    /// The HTTP gateway.
    pub gateway: GatewaySettings,
    /// Callback delivery.
    pub callbacks: CallbackSettings,
    /// Graceful shutdown.
    pub shutdown: ShutdownSettings,
    /// The metrics endpoint of `serve` without the gateway.
    pub metrics: MetricsSettings,
    /// RabbitMQ's management API, for `switchboard status`.
    pub management: ManagementSettings,
    /// Log filter and format.
    pub log: LogSettings,
    /// OpenTelemetry export of spans.
    pub otel: OtelSettings,
    /// Services by name.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceSettings>,
}

impl Settings {
    /// Loads defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        Self::load_from(file, None, std::env::vars())
    }

    /// Loads defaults, then `file`, then `extra` (TOML text), then the
    /// `SWITCHBOARD__*` variables among `env`. Tests pass their own `env`.
    ///
    /// The services in effect are named in one place: when `file` or
    /// `extra` has a `[services]` table, or the environment names a service
    /// the defaults do not have, the default (demo) services are dropped and
    /// only the named ones are in effect. Environment
    /// variables then adjust those services, and add any they name.
    pub fn load_from(
        file: Option<&Path>,
        extra: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let invalid = |e: config::ConfigError| SettingsError(e.to_string());
        let mut user = Config::builder();
        if let Some(path) = file {
            if !path.exists() {
                return Err(SettingsError(format!(
                    "settings file {} does not exist",
                    path.display()
                )));
            }
            user = user.add_source(File::from(path).required(true));
        }
        if let Some(text) = extra {
            user = user.add_source(File::from_str(text, FileFormat::Toml));
        }
        let user = user.build().map_err(invalid)?;
        let vars: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("SWITCHBOARD__"))
            .collect();
        let mut defaults = File::from_str(DEFAULTS, FileFormat::Toml)
            .collect()
            .map_err(invalid)?;
        let source = ServicesSource::of(&user, &defaults, vars.keys().map(String::as_str))?;
        if source != ServicesSource::Defaults {
            defaults.remove("services");
        }
        let settings: Settings = Config::builder()
            .add_source(Layer(defaults))
            .add_source(user)
            .add_source(
                Environment::with_prefix("SWITCHBOARD")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(vars)),
            )
            .build()
            .and_then(Config::try_deserialize)
            .map_err(invalid)?;
        settings.validate()?;
        Ok(settings)
    }
}

impl Settings {
    /// The instance id in force: the setting, or the host name.
    pub fn instance_id(&self) -> String {
        self.amqp.resolved_instance_id()
    }
}

#[cfg(test)]
mod tests {
    use super::gateway::{check_origin, decode_sha256_hex};
    use super::*;

    #[test]
    fn redact_url_hides_passwords_and_keeps_where_it_points() {
        for (url, shown) in [
            (
                "amqp://guest:secret@127.0.0.1:5672/%2f",
                "amqp://guest:***@127.0.0.1:5672/%2f",
            ),
            ("amqp://127.0.0.1:5672", "amqp://127.0.0.1:5672"),
            (
                "postgres://u:p@ss/w?rd@db:5432/x?sslmode=require",
                "postgres://u:***@db:5432/x?sslmode=require",
            ),
            (
                "postgres://db/x?user=u&password=pw&sslpassword=k",
                "postgres://db/x?user=u&password=***&sslpassword=***",
            ),
            ("sqlite://calls.db?mode=rwc", "sqlite://calls.db?mode=rwc"),
            ("http://user@host/", "http://user@host/"),
            ("not a url", "not a url"),
            // A parser's message that quotes the URL.
            (
                "Invalid URL: 'amqp://u:pw@h:x/'",
                "Invalid URL: 'amqp://u:***@h:x/'",
            ),
            // Several nodes, one password with a comma.
            (
                "amqp://u:p,w@h1:5672/%2f, amqps://v:pw2@h2/v",
                "amqp://u:***@h1:5672/%2f,amqps://v:***@h2/v",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn amqp_url_lists_its_nodes_and_a_comma_in_a_password_stays() {
        let env = |url: &str| [("SWITCHBOARD__AMQP__URL".to_owned(), url.to_owned())];
        let a = Settings::load_from(
            None,
            None,
            env("amqp://u:p,w@h1/%2f,amqp://h2:5673/%2f , amqp://h3/%2f,"),
        )
        .expect("a list in the environment loads")
        .amqp;
        assert_eq!(
            a.nodes(),
            ["amqp://u:p,w@h1/%2f", "amqp://h2:5673/%2f", "amqp://h3/%2f"]
        );
        assert_eq!(a.first_node(), "amqp://u:p,w@h1/%2f");
        let toml = "[amqp]\nurl = [\"amqp://h1/%2f\", \"amqp://h2:5673/%2f\"]\n";
        let a = Settings::load_from(None, Some(toml), std::iter::empty())
            .expect("a TOML list loads")
            .amqp;
        assert_eq!(a.nodes(), ["amqp://h1/%2f", "amqp://h2:5673/%2f"]);
        for (url, says) in [
            (
                "amqp://h1/%2f,amqps://h2/%2f",
                "node 2 of 2: mixes amqp:// and amqps://",
            ),
            (
                "amqp://h1/%2f,amqp://h2/other",
                "node 2 of 2: names vhost \"other\"",
            ),
            (
                "amqp://h1/%2f,amqp://u:secret@h2:x/%2f",
                "node 2 of 2: not an AMQP URI",
            ),
            (" , ", "names no broker"),
        ] {
            let e = Settings::load_from(None, None, env(url)).unwrap_err().0;
            assert!(e.starts_with("amqp.url: "), "{e}");
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[test]
    fn digests_are_64_hex_digits() {
        assert_eq!(decode_sha256_hex(&"0f".repeat(32)), Some([0x0f; 32]));
        assert_eq!(decode_sha256_hex(&"AB".repeat(32)), Some([0xab; 32]));
        for bad in [
            "",
            "0f",
            &"0f".repeat(33),
            &"zz".repeat(32),
            &"é".repeat(32),
        ] {
            assert_eq!(decode_sha256_hex(bad), None, "{bad}");
        }
    }

    #[test]
    fn origins_are_written_as_browsers_send_them() {
        for ok in [
            "https://app.example.com",
            "http://127.0.0.1:8080",
            "http://[::1]:3000",
        ] {
            assert_eq!(check_origin(ok), Ok(()), "{ok}");
        }
        for bad in [
            "*",
            "null",
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://APP.example.com",
            "https://app.example.com:443",
            "ftp://app.example.com",
            "https://user:pw@app.example.com",
        ] {
            assert!(check_origin(bad).is_err(), "{bad}");
        }
    }
}

/// Properties: whatever a password holds, [`redact_url`] does not show it.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn no_password_survives_redaction(
            scheme in "(amqp|amqps|postgres|http|https)",
            user in "[a-z]{1,8}",
            password in "[!-~]{6,30}",
            host in "[a-z0-9.-]{1,20}(:[0-9]{1,5})?",
            path in "(/[a-z0-9%]{0,10})?",
            query_password in prop::option::of("[A-Za-z0-9_-]{6,20}"),
        ) {
            let mut url = format!("{scheme}://{user}:{password}@{host}{path}");
            if let Some(q) = &query_password {
                url.push_str(&format!("?sslmode=require&password={q}"));
            }
            let shown = redact_url(&url);
            // The password (when it is no substring of what stays shown).
            let visible = format!("{scheme}://{user}:@{host}{path}?sslmode=require&password=");
            if !visible.contains(&password) {
                prop_assert!(!shown.contains(&password), "{} -> {}", url, shown);
            }
            if let Some(q) = &query_password
                && !visible.contains(q.as_str())
                && !password.contains(q.as_str())
            {
                prop_assert!(!shown.contains(q.as_str()), "{} -> {}", url, shown);
            }
            prop_assert!(shown.contains(&format!("{user}:***@")), "{}", shown);
        }
    }
}
