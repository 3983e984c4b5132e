//! A port's `http_options`, read once at start: `h2_backend`, `idle_timeout` (seconds),
//! `response.headers` (a string or a list sets a header, `false` removes it) and `compress`,
//! which is accepted and not acted on.

use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde_json::Value;

/// An `http_options` value spliced cannot use, named by its key.
#[derive(Debug, thiserror::Error)]
#[error("http_options.{key}: {message}")]
pub struct OptionsError {
    pub key: String,
    pub message: String,
}

/// What `http_options.response.headers` does to every response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderEdit {
    Remove(HeaderName),
    /// Replaces every value the machine sent with these.
    Set(HeaderName, Vec<HeaderValue>),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpOptions {
    /// Speak HTTP/2 (prior knowledge) to the machines.
    pub h2_backend: bool,
    /// How long a client connection may wait for its next request.
    pub idle_timeout: Option<Duration>,
    pub response_headers: Vec<HeaderEdit>,
    /// `compress`: responses are passed on as the machine sent them.
    pub compress: bool,
}

impl HttpOptions {
    /// Reads `http_options` as the config kept it (`None`: not given).
    pub fn read(value: Option<&Value>) -> Result<Self, OptionsError> {
        let mut out = Self::default();
        let Some(value) = value else {
            return Ok(out);
        };
        let bad = |key: &str, message: String| OptionsError {
            key: key.to_owned(),
            message,
        };
        let Value::Object(table) = value else {
            return Err(bad("", "is not a table".to_owned()));
        };
        for (key, v) in table {
            match key.as_str() {
                "h2_backend" => {
                    out.h2_backend = v
                        .as_bool()
                        .ok_or_else(|| bad(key, format!("{v} is not true or false")))?;
                }
                "compress" => {
                    out.compress = v
                        .as_bool()
                        .ok_or_else(|| bad(key, format!("{v} is not true or false")))?;
                }
                "idle_timeout" => {
                    let secs = v
                        .as_u64()
                        .ok_or_else(|| bad(key, format!("{v} is not a number of seconds")))?;
                    out.idle_timeout = Some(Duration::from_secs(secs));
                }
                "response" => {
                    out.response_headers = read_response(v).map_err(|(k, m)| bad(&k, m))?;
                }
                // The config reader warns about keys it does not know.
                _ => {}
            }
        }
        Ok(out)
    }
}

/// `response.headers`, in file order.
fn read_response(v: &Value) -> Result<Vec<HeaderEdit>, (String, String)> {
    let Some(headers) = v.get("headers") else {
        return Ok(Vec::new());
    };
    let Value::Object(headers) = headers else {
        return Err(("response.headers".to_owned(), "is not a table".to_owned()));
    };
    let mut edits = Vec::new();
    for (name, value) in headers {
        let key = format!("response.headers.{name}");
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| (key.clone(), format!("{name:?} is not a header name")))?;
        let text = |v: &Value| -> Result<HeaderValue, (String, String)> {
            let s = v
                .as_str()
                .ok_or_else(|| (key.clone(), format!("{v} is not a string")))?;
            HeaderValue::from_str(s)
                .map_err(|_| (key.clone(), format!("{s:?} is not a header value")))
        };
        edits.push(match value {
            Value::Bool(false) => HeaderEdit::Remove(header),
            Value::Array(list) => {
                HeaderEdit::Set(header, list.iter().map(text).collect::<Result<_, _>>()?)
            }
            other => HeaderEdit::Set(header, vec![text(other)?]),
        });
    }
    Ok(edits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_reference_options() {
        let v = serde_json::json!({
            "compress": true,
            "idle_timeout": 600,
            "h2_backend": true,
            "response": {"headers": {
                "fly-request-id": false,
                "fly-wasnt-here": "yes, it was",
                "multi-valued": ["value1", "value2"]
            }}
        });
        let o = HttpOptions::read(Some(&v)).expect("valid");
        assert!(o.compress && o.h2_backend);
        assert_eq!(o.idle_timeout, Some(Duration::from_secs(600)));
        assert_eq!(
            o.response_headers,
            vec![
                HeaderEdit::Remove(HeaderName::from_static("fly-request-id")),
                HeaderEdit::Set(
                    HeaderName::from_static("fly-wasnt-here"),
                    vec![HeaderValue::from_static("yes, it was")]
                ),
                HeaderEdit::Set(
                    HeaderName::from_static("multi-valued"),
                    vec![
                        HeaderValue::from_static("value1"),
                        HeaderValue::from_static("value2")
                    ]
                ),
            ]
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = HttpOptions::read(Some(
            &serde_json::json!({"response": {"headers": {"bad name": "x"}}}),
        ))
        .expect_err("refused");
        assert_eq!(e.key, "response.headers.bad name");
        let e = HttpOptions::read(Some(&serde_json::json!({"idle_timeout": "soon"})))
            .expect_err("refused");
        assert_eq!(
            e.to_string(),
            "http_options.idle_timeout: \"soon\" is not a number of seconds"
        );
    }
}
