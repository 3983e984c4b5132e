//! The fly.toml subset that the data plane needs: `[[services]]` with `internal_port`,
//! `protocol` and public ports (`port = N` or `[[services.ports]]`). Raw, span-carrying
//! `File*` types are deserialized first, then checked into [`Config`]; every error names the
//! file, line, column and field path. Sections spliced does not act on are ignored.

use std::{fmt, ops::Range, path::Path};

use serde::{Deserialize, Serialize};
use toml::Spanned;

/// Ports given to the first service that declares no public port, as fly does.
const DEFAULT_PUBLIC_PORTS: [u16; 2] = [80, 443];

/// A checked configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Config {
    pub services: Vec<Service>,
}

/// One `[[services]]` block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    /// Position in the file, from 0: `services[index]`.
    pub index: usize,
    /// Port of the backend on 127.0.0.1. Default 8080.
    pub internal_port: u16,
    /// Public ports this service listens on; empty for an internal-only service.
    pub ports: Vec<PublicPort>,
}

/// A public port of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PublicPort {
    pub port: u16,
    /// Handler names as written (`tls`, `http`, ...). Empty means raw TCP.
    pub handlers: Vec<String>,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{file}:{line}:{column}: {field}: {message}")]
    Invalid {
        file: String,
        line: usize,
        column: usize,
        field: String,
        message: String,
    },
}

#[derive(Deserialize)]
struct FileConfig {
    #[serde(default)]
    services: Vec<FileService>,
}

#[derive(Deserialize)]
struct FileService {
    internal_port: Option<Spanned<PortValue>>,
    protocol: Option<Spanned<String>>,
    port: Option<Spanned<PortValue>>,
    #[serde(default)]
    ports: Vec<FilePort>,
}

#[derive(Deserialize)]
struct FilePort {
    port: Option<Spanned<PortValue>>,
    start_port: Option<Spanned<PortValue>>,
    end_port: Option<Spanned<PortValue>>,
    #[serde(default)]
    handlers: Vec<Spanned<String>>,
}

/// Real files write ports both as numbers and as strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum PortValue {
    Number(i64),
    Text(String),
}

impl fmt::Display for PortValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Text(s) => write!(f, "{s:?}"),
        }
    }
}

/// Maps byte offsets of one file to line and column, and builds errors for it.
struct Source<'a> {
    file: &'a str,
    text: &'a str,
}

impl Source<'_> {
    fn position(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before
            .rfind('\n')
            .map_or(before.len(), |nl| before.len() - nl - 1)
            + 1;
        (line, column)
    }

    fn invalid(&self, span: Range<usize>, field: String, message: String) -> ConfigError {
        let (line, column) = self.position(span.start);
        ConfigError::Invalid {
            file: self.file.to_owned(),
            line,
            column,
            field,
            message,
        }
    }

    fn port(&self, value: &Spanned<PortValue>, field: String) -> Result<u16, ConfigError> {
        let parsed = match value.get_ref() {
            PortValue::Number(n) => Some(*n),
            PortValue::Text(s) => s.trim().parse::<i64>().ok(),
        };
        match parsed
            .and_then(|n| u16::try_from(n).ok())
            .filter(|p| *p != 0)
        {
            Some(port) => Ok(port),
            None => Err(self.invalid(
                value.span(),
                field,
                format!("{} is not a port (1-65535)", value.get_ref()),
            )),
        }
    }
}

impl Config {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&file, &text)
    }

    /// Checks `text`, naming `file` in errors.
    #[expect(
        clippy::too_many_lines,
        reason = "one pass over the services; replaced by the full config model"
    )]
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let src = Source { file, text };
        let raw: FileConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |s| src.position(s.start));
            ConfigError::Syntax {
                file: file.to_owned(),
                line,
                column,
                message: e.message().to_owned(),
            }
        })?;

        let mut services = Vec::with_capacity(raw.services.len());
        // public port -> (service index, where it was claimed)
        let mut claimed = std::collections::BTreeMap::<u16, usize>::default();
        for (index, s) in raw.services.iter().enumerate() {
            let at = format!("services[{index}]");
            if let Some(protocol) = &s.protocol
                && protocol.get_ref() != "tcp"
            {
                let message = if protocol.get_ref() == "udp" {
                    "udp services are not supported yet; spliced forwards tcp".to_owned()
                } else {
                    format!("{:?} is not a protocol (tcp or udp)", protocol.get_ref())
                };
                return Err(src.invalid(protocol.span(), format!("{at}.protocol"), message));
            }
            let internal_port = match &s.internal_port {
                Some(v) => src.port(v, format!("{at}.internal_port"))?,
                None => 8080,
            };
            let mut ports = Vec::new();
            let mut spans = Vec::new();
            if let Some(v) = &s.port {
                ports.push(PublicPort {
                    port: src.port(v, format!("{at}.port"))?,
                    handlers: Vec::new(),
                });
                spans.push(v.span());
            }
            for (i, p) in s.ports.iter().enumerate() {
                let at = format!("{at}.ports[{i}]");
                let handlers: Vec<String> =
                    p.handlers.iter().map(|h| h.get_ref().clone()).collect();
                match (&p.port, &p.start_port, &p.end_port) {
                    (Some(v), None, None) => {
                        ports.push(PublicPort {
                            port: src.port(v, format!("{at}.port"))?,
                            handlers,
                        });
                        spans.push(v.span());
                    }
                    (None, Some(start), Some(end)) => {
                        let first = src.port(start, format!("{at}.start_port"))?;
                        let last = src.port(end, format!("{at}.end_port"))?;
                        if last < first {
                            return Err(src.invalid(
                                end.span(),
                                format!("{at}.end_port"),
                                format!("{last} is below start_port {first}"),
                            ));
                        }
                        for port in first..=last {
                            ports.push(PublicPort {
                                port,
                                handlers: handlers.clone(),
                            });
                            spans.push(start.span());
                        }
                    }
                    (Some(v), _, _) => {
                        return Err(src.invalid(
                            v.span(),
                            format!("{at}.port"),
                            "give either port or start_port and end_port, not both".to_owned(),
                        ));
                    }
                    (None, Some(v), None) | (None, None, Some(v)) => {
                        return Err(src.invalid(
                            v.span(),
                            at,
                            "a port range needs both start_port and end_port".to_owned(),
                        ));
                    }
                    (None, None, None) => {
                        // A ports entry with only handlers: fly treats it as incomplete.
                        let span = p.handlers.first().map_or(0..0, Spanned::span);
                        return Err(src.invalid(
                            span,
                            at,
                            "needs port, or start_port and end_port".to_owned(),
                        ));
                    }
                }
            }
            for (p, span) in ports.iter().zip(&spans) {
                if let Some(other) = claimed.insert(p.port, index) {
                    return Err(src.invalid(
                        span.clone(),
                        format!("{at}.ports"),
                        format!(
                            "public port {} is already claimed by services[{other}]",
                            p.port
                        ),
                    ));
                }
            }
            services.push(Service {
                index,
                internal_port,
                ports,
            });
        }

        // The first service without a public port receives 80 and 443 unless another service
        // claims them; any later such service is internal-only.
        if let Some(first) = services.iter_mut().find(|s| s.ports.is_empty()) {
            first.ports = DEFAULT_PUBLIC_PORTS
                .iter()
                .filter(|p| !claimed.contains_key(p))
                .map(|&port| PublicPort {
                    port,
                    handlers: Vec::new(),
                })
                .collect();
        }
        Ok(Self { services })
    }

    /// Every (service, public port) pair, in file order.
    pub fn public_ports(&self) -> impl Iterator<Item = (&Service, &PublicPort)> {
        self.services
            .iter()
            .flat_map(|s| s.ports.iter().map(move |p| (s, p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse("fly.toml", text)
    }

    #[test]
    fn short_and_long_port_forms() {
        let c = parse(
            "app = \"x\"\n[env]\nA = \"1\"\n\n[[services]]\ninternal_port = \"9000\"\nprotocol = \"tcp\"\nport = 10001\n\n[[services]]\ninternal_port = 9001\n[[services.ports]]\nport = \"10002\"\n[[services.ports]]\nstart_port = 10003\nend_port = 10004\n",
        )
        .expect("valid config");
        let ports: Vec<(u16, u16)> = c
            .public_ports()
            .map(|(s, p)| (p.port, s.internal_port))
            .collect();
        assert_eq!(
            ports,
            vec![(10001, 9000), (10002, 9001), (10003, 9001), (10004, 9001)]
        );
    }

    #[test]
    fn first_portless_service_gets_80_and_443() {
        let c = parse("[[services]]\ninternal_port = 8080\n[[services]]\ninternal_port = 9\n")
            .expect("valid config");
        let ports: Vec<u16> = c.services[0].ports.iter().map(|p| p.port).collect();
        assert_eq!(ports, vec![80, 443]);
        assert!(c.services[1].ports.is_empty(), "second is internal-only");
    }

    #[test]
    fn bad_port_names_line_column_and_field() {
        let err =
            parse("[[services]]\ninternal_port = 8080\n  [[services.ports]]\n  port = 70000\n")
                .expect_err("70000 is not a port")
                .to_string();
        assert_eq!(
            err,
            "fly.toml:4:10: services[0].ports[0].port: 70000 is not a port (1-65535)"
        );
    }

    #[test]
    fn duplicate_public_port_names_both_blocks() {
        let err = parse("[[services]]\nport = 80\n[[services]]\nport = 80\n")
            .expect_err("duplicate")
            .to_string();
        assert_eq!(
            err,
            "fly.toml:4:8: services[1].ports: public port 80 is already claimed by services[0]"
        );
    }

    #[test]
    fn syntax_error_has_position() {
        let err = parse("[[services]\n").expect_err("bad toml").to_string();
        assert!(err.starts_with("fly.toml:1:"), "{err}");
    }

    #[test]
    fn udp_is_refused_clearly() {
        let err = parse("[[services]]\nprotocol = \"udp\"\nport = 53\n")
            .expect_err("udp")
            .to_string();
        assert_eq!(
            err,
            "fly.toml:2:12: services[0].protocol: udp services are not supported yet; spliced forwards tcp"
        );
    }
}
