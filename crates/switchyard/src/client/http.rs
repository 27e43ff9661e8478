//! The reqwest wrapper: builds `/v1` URLs, authenticates, and turns every
//! failure into an [`ExitCodeError`] with the code scripts rely on.

use std::error::Error as StdError;
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{Connection, ExitCodeError, exit};

/// Plain calls should answer quickly; lifecycle calls that wait for a broker
/// set their own, longer timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to one hub replica.
#[derive(Debug)]
pub(crate) struct HubClient {
    http: reqwest::Client,
    base: Url,
    token: String,
}

/// One request to the hub, described before it is sent so error messages can
/// name the resource the user asked about.
#[derive(Debug)]
pub(crate) struct Call {
    method: Method,
    segments: Vec<String>,
    query: Vec<(&'static str, String)>,
    body: Option<Value>,
    idempotency_key: Option<String>,
    subject: Option<String>,
    timeout: Duration,
}

impl Call {
    fn new(method: Method, segments: &[&str]) -> Self {
        Self {
            method,
            segments: segments.iter().map(|s| (*s).to_owned()).collect(),
            query: Vec::new(),
            body: None,
            idempotency_key: None,
            subject: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// `GET /v1/<segments...>`; each segment is percent-encoded, so names
    /// with spaces or slashes address the right resource.
    pub(crate) fn get(segments: &[&str]) -> Self {
        Self::new(Method::GET, segments)
    }

    pub(crate) fn post(segments: &[&str], body: Value) -> Self {
        let mut call = Self::new(Method::POST, segments);
        call.body = Some(body);
        call
    }

    pub(crate) fn delete(segments: &[&str]) -> Self {
        Self::new(Method::DELETE, segments)
    }

    pub(crate) fn query(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.query.push((key, value.into()));
        self
    }

    /// Names the resource addressed by the path (`agent "x"`), used for
    /// "not found" messages.
    pub(crate) fn about(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    pub(crate) fn idempotency_key(mut self, key: Option<String>) -> Self {
        self.idempotency_key = key;
        self
    }

    pub(crate) fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// A successful answer's JSON body, absent for 204.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) body: Option<Value>,
}

impl Reply {
    /// The body, or JSON `null` for an empty answer.
    pub(crate) fn json(&self) -> Value {
        self.body.clone().unwrap_or(Value::Null)
    }

    /// Decodes the body into the type the command expects.
    pub(crate) fn decode<T: DeserializeOwned>(&self) -> Result<T, ExitCodeError> {
        decode(&self.json())
    }
}

/// Decodes a JSON value; a shape the client does not understand is a hub/client
/// version mismatch, reported as a generic failure.
pub(crate) fn decode<T: DeserializeOwned>(value: &Value) -> Result<T, ExitCodeError> {
    T::deserialize(value).map_err(|err| {
        ExitCodeError::new(
            exit::OTHER,
            format!("unexpected response from the hub: {err}"),
        )
    })
}

impl HubClient {
    pub(crate) fn new(conn: &Connection) -> Result<Self, ExitCodeError> {
        let base = parse_hub_url(&conn.hub)?;
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("switchyard-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|err| {
                ExitCodeError::new(exit::OTHER, format!("cannot set up HTTP client: {err}"))
            })?;
        Ok(Self {
            http,
            base,
            token: conn.token.clone(),
        })
    }

    pub(crate) async fn call(&self, call: Call) -> Result<Reply, ExitCodeError> {
        let url = build_url(&self.base, &call.segments, &call.query);
        let mut request = self
            .http
            .request(call.method.clone(), url)
            .bearer_auth(&self.token)
            .timeout(call.timeout);
        if let Some(body) = &call.body {
            request = request.json(body);
        }
        if let Some(key) = &call.idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request
            .send()
            .await
            .map_err(|err| self.transport_error(&err, call.timeout))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|err| self.transport_error(&err, call.timeout))?;
        if !status.is_success() {
            return Err(classify(status, &text, call.subject.as_deref()));
        }
        let body = if text.trim().is_empty() {
            None
        } else {
            Some(serde_json::from_str(&text).map_err(|err| {
                ExitCodeError::new(
                    exit::OTHER,
                    format!("the hub answered {status} with invalid JSON: {err}"),
                )
            })?)
        };
        Ok(Reply { body })
    }

    fn transport_error(&self, err: &reqwest::Error, timeout: Duration) -> ExitCodeError {
        let hub = self.base.as_str().trim_end_matches('/');
        let message = if err.is_timeout() {
            format!(
                "no answer from the hub at {hub} within {}s",
                timeout.as_secs()
            )
        } else if err.is_connect() {
            format!("cannot reach the hub at {hub}: {}", root_cause(err))
        } else {
            format!("request to the hub at {hub} failed: {}", root_cause(err))
        };
        ExitCodeError::new(exit::HUB_UNAVAILABLE, message)
    }
}

/// Validates `--hub` up front so a typo is a usage error, not "unreachable".
fn parse_hub_url(raw: &str) -> Result<Url, ExitCodeError> {
    let url = Url::parse(raw).map_err(|err| {
        ExitCodeError::new(exit::USAGE, format!("invalid --hub URL {raw:?}: {err}"))
    })?;
    match url.scheme() {
        "http" => Ok(url),
        // The workspace builds reqwest without a TLS backend; say so instead
        // of failing with a confusing transport error.
        "https" => Err(ExitCodeError::new(
            exit::USAGE,
            format!("invalid --hub URL {raw:?}: this build supports http:// hubs only"),
        )),
        other => Err(ExitCodeError::new(
            exit::USAGE,
            format!("invalid --hub URL {raw:?}: unsupported scheme {other:?}"),
        )),
    }
}

/// `<base>/v1/<segments>?<query>`, keeping any path prefix of the base URL
/// (for hubs behind a reverse proxy under a sub-path).
fn build_url(base: &Url, segments: &[String], query: &[(&'static str, String)]) -> Url {
    let mut url = base.clone();
    url.set_query(None);
    url.set_fragment(None);
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().push("v1").extend(segments);
    }
    if !query.is_empty() {
        url.query_pairs_mut()
            .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
    }
    url
}

/// The innermost error message, which is the informative one for transport
/// failures ("Connection refused" rather than "error sending request").
fn root_cause(err: &(dyn StdError + 'static)) -> String {
    let mut current = err;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ApiError,
}

#[derive(Debug, Deserialize)]
struct ApiError {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    dispatch_id: Option<String>,
}

/// Maps a non-2xx answer to the exit code and one-line message promised in
/// `docs/cli.md`. 502/504 only mean "broker failed"/"timed out" when the hub
/// itself says so (a JSON error body); the same statuses from a proxy in
/// front of the hub mean the hub is unavailable.
pub(crate) fn classify(status: StatusCode, body: &str, subject: Option<&str>) -> ExitCodeError {
    let api = serde_json::from_str::<ErrorBody>(body)
        .ok()
        .map(|b| b.error);
    let detail = match &api {
        Some(api) if !api.message.is_empty() => api.message.clone(),
        Some(api) if !api.code.is_empty() => api.code.clone(),
        _ => fallback_detail(status, body),
    };
    let dispatch = api.as_ref().and_then(|a| a.dispatch_id.clone());
    match status.as_u16() {
        404 => ExitCodeError::new(
            exit::NOT_FOUND,
            // A 404 that names a dispatch is the broker's (an unknown
            // operation, a missing file), not a missing subject.
            match (subject, &dispatch) {
                (_, Some(id)) => format!("{detail} (dispatch {id})"),
                (Some(subject), None) => format!("{subject} not found"),
                (None, None) => detail,
            },
        ),
        401 => ExitCodeError::new(
            exit::UNAUTHORIZED,
            format!("the hub rejected the token (401 unauthorized): {detail}"),
        ),
        403 => ExitCodeError::new(
            exit::UNAUTHORIZED,
            format!("the token is not allowed to do this (403 forbidden): {detail}"),
        ),
        409 => ExitCodeError::new(exit::CONFLICT, detail),
        504 if api.is_some() => {
            let message = match dispatch {
                Some(id) => format!(
                    "timed out waiting for the broker: {detail} \
                     (dispatch {id}; follow it with `switchyard dispatches show {id}`)"
                ),
                None => format!("timed out waiting for the broker: {detail}"),
            };
            ExitCodeError::new(exit::TIMED_OUT, message)
        }
        502 if api.is_some() => {
            let message = match dispatch {
                Some(id) => format!("broker reported failure: {detail} (dispatch {id})"),
                None => format!("broker reported failure: {detail}"),
            };
            ExitCodeError::new(exit::BROKER_FAILED, message)
        }
        500..=599 => ExitCodeError::new(
            exit::HUB_UNAVAILABLE,
            format!("hub error ({status}): {detail}"),
        ),
        _ => ExitCodeError::new(exit::OTHER, format!("{detail} ({status})")),
    }
}

/// A short, single-line description of a non-JSON error body.
fn fallback_detail(status: StatusCode, body: &str) -> String {
    let first_line = body.lines().map(str::trim).find(|l| !l.is_empty());
    match first_line {
        Some(line) => {
            let mut line: String = line.chars().take(200).collect();
            if line.len() < body.trim().len() {
                line.push_str("...");
            }
            line
        }
        None => status
            .canonical_reason()
            .unwrap_or("no details")
            .to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(status: u16, body: &str, subject: Option<&str>) -> ExitCodeError {
        classify(
            StatusCode::from_u16(status).expect("valid status"),
            body,
            subject,
        )
    }

    fn api(code: &str, message: &str) -> String {
        serde_json::json!({"error": {"code": code, "message": message}}).to_string()
    }

    #[test]
    fn not_found_names_the_subject() {
        let e = err(404, &api("not_found", "no such agent"), Some("agent \"x\""));
        assert_eq!(e.code(), exit::NOT_FOUND);
        assert_eq!(e.to_string(), "agent \"x\" not found");

        let e = err(404, &api("not_found", "broker \"b\" not found"), None);
        assert_eq!(e.to_string(), "broker \"b\" not found");
    }

    #[test]
    fn auth_failures_exit_4() {
        assert_eq!(err(401, &api("unauthorized", "bad token"), None).code(), 4);
        assert_eq!(err(403, "", None).code(), 4);
    }

    #[test]
    fn conflicts_exit_5_with_the_hub_message() {
        let e = err(409, &api("invalid_phase", "agent is running"), None);
        assert_eq!(e.code(), exit::CONFLICT);
        assert_eq!(e.to_string(), "agent is running");
    }

    #[test]
    fn hub_timeout_mentions_the_dispatch() {
        let body = serde_json::json!({"error": {
            "code": "timeout", "message": "no outcome within 30s", "dispatch_id": "d-1"
        }})
        .to_string();
        let e = err(504, &body, Some("agent \"x\""));
        assert_eq!(e.code(), exit::TIMED_OUT);
        assert_eq!(
            e.to_string(),
            "timed out waiting for the broker: no outcome within 30s \
             (dispatch d-1; follow it with `switchyard dispatches show d-1`)"
        );
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn broker_failure_exits_7() {
        let body = serde_json::json!({"error": {
            "code": "broker_failed", "message": "spawn failed", "dispatch_id": "d-2"
        }})
        .to_string();
        let e = err(502, &body, None);
        assert_eq!(e.code(), exit::BROKER_FAILED);
        assert_eq!(
            e.to_string(),
            "broker reported failure: spawn failed (dispatch d-2)"
        );
    }

    #[test]
    fn proxy_gateway_errors_mean_hub_unavailable() {
        let e = err(502, "<html>\n<h1>Bad Gateway</h1>\n</html>", None);
        assert_eq!(e.code(), exit::HUB_UNAVAILABLE);
        assert!(!e.to_string().contains('\n'));
        assert_eq!(err(504, "", None).code(), exit::HUB_UNAVAILABLE);
        assert_eq!(err(500, &api("internal", "boom"), None).code(), 8);
        assert_eq!(err(503, "", None).code(), 8);
    }

    #[test]
    fn other_client_errors_exit_1() {
        let e = err(400, &api("invalid_request", "name is empty"), None);
        assert_eq!(e.code(), exit::OTHER);
        assert_eq!(e.to_string(), "name is empty (400 Bad Request)");
    }

    #[test]
    fn urls_are_encoded_and_keep_the_base_path() {
        let base = Url::parse("http://hub:7700").expect("url");
        let url = build_url(
            &base,
            &["agents".into(), "my agent/1".into(), "start".into()],
            &[("wait", "false".into())],
        );
        assert_eq!(
            url.as_str(),
            "http://hub:7700/v1/agents/my%20agent%2F1/start?wait=false"
        );

        let base = Url::parse("http://proxy/switchyard/").expect("url");
        let url = build_url(&base, &["cluster".into()], &[]);
        assert_eq!(url.as_str(), "http://proxy/switchyard/v1/cluster");
    }

    #[test]
    fn bad_hub_urls_are_usage_errors() {
        assert_eq!(
            parse_hub_url("hub:7700").map_err(|e| e.code()).err(),
            Some(exit::USAGE)
        );
        assert_eq!(
            parse_hub_url("not a url").map_err(|e| e.code()).err(),
            Some(exit::USAGE)
        );
        assert!(parse_hub_url("http://127.0.0.1:7700").is_ok());
    }
}
