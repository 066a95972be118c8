//! etcd 3.4 as the witness: requests to its v3 JSON gateway and what their replies mean.
//!
//! A claim for generation g is one `POST /v3/kv/txn`: compare "key `colo/<cluster>/gen/<g>` does
//! not exist" (`create_revision` 0); success puts this host's id; failure reads the key. The host
//! that already holds g is granted it again, so a retried claim whose first reply was lost gets
//! the same answer. Generation keys carry no lease and are never deleted: a generation can never
//! change hands later. A separate holder key under a lease shows operators who serves.
//!
//! Keys and values are standard base64 in the gateway's JSON; int64 fields are JSON strings;
//! false and zero fields are left out of replies (a failed compare has no `succeeded`).

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::{json, Value};

use super::http::{post_json, Response};

/// The longest cluster name or host id.
pub const MAX_NAME_LEN: usize = 64;

/// What etcd said to a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// This host holds the generation (newly, or it already did).
    Granted,
    /// Another host holds it.
    Denied {
        /// That host's id.
        holder: String,
    },
}

/// A lease etcd granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Its id.
    pub id: i64,
    /// Seconds it lives without a keep-alive.
    pub ttl_s: i64,
}

/// Why a reply is not an answer. None of these is ever a grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WitnessError {
    /// A cluster name or host id that is empty, too long or has characters other than
    /// `A-Z a-z 0-9 . _ -`.
    BadName(String),
    /// etcd answered with an error (HTTP status, gRPC code, message).
    Server {
        /// The HTTP status.
        status: u16,
        /// etcd's gRPC code, if the body had one.
        code: i64,
        /// etcd's message.
        message: String,
    },
    /// The body is not JSON.
    BadJson(String),
    /// A field the reply must have is missing or of the wrong type.
    MissingField(&'static str),
    /// A field that must be base64 is not.
    BadBase64(&'static str),
    /// An int64 field that is not a decimal string.
    BadNumber(&'static str),
}

impl fmt::Display for WitnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadName(n) => {
                write!(f, "bad name `{n}`; expected 1..={MAX_NAME_LEN} characters from A-Z a-z 0-9 . _ -")
            }
            Self::Server { status, code, message } => write!(f, "etcd error (HTTP {status}, code {code}): {message}"),
            Self::BadJson(e) => write!(f, "reply is not JSON: {e}"),
            Self::MissingField(field) => write!(f, "reply lacks `{field}` (or it has the wrong type)"),
            Self::BadBase64(field) => write!(f, "reply field `{field}` is not base64"),
            Self::BadNumber(field) => write!(f, "reply field `{field}` is not a decimal int64 string"),
        }
    }
}

/// Checks a cluster name or host id.
pub fn check_name(name: &str) -> Result<(), WitnessError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(WitnessError::BadName(name.chars().take(MAX_NAME_LEN + 1).collect()))
    }
}

/// One host's etcd client: its identity and the witness's address (for the `Host` header).
/// `Debug` never shows the etcd auth token.
#[derive(Clone)]
pub struct EtcdClient {
    authority: String,
    cluster: String,
    host_id: String,
    token: Option<String>,
}

impl fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdClient")
            .field("authority", &self.authority)
            .field("cluster", &self.cluster)
            .field("host_id", &self.host_id)
            .field("token", &self.token.as_ref().map(|_| "<not shown>"))
            .finish()
    }
}

impl EtcdClient {
    /// A client for `host_id` in `cluster`, talking to the etcd at `authority` (`IP:PORT`).
    pub fn new(authority: &str, cluster: &str, host_id: &str) -> Result<Self, WitnessError> {
        check_name(cluster)?;
        check_name(host_id)?;
        Ok(Self { authority: authority.into(), cluster: cluster.into(), host_id: host_id.into(), token: None })
    }

    /// This host's id.
    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// The permanent key of generation `g`.
    pub fn generation_key(&self, generation: u64) -> String {
        format!("colo/{}/gen/{generation}", self.cluster)
    }

    /// The key, under a lease, that names the host serving now.
    pub fn holder_key(&self) -> String {
        format!("colo/{}/holder", self.cluster)
    }

    fn post(&self, path: &str, body: &Value) -> Vec<u8> {
        post_json(&self.authority, path, self.token.as_deref(), &body.to_string())
    }

    /// `POST /v3/kv/txn`: claim generation `g` for this host.
    pub fn claim_request(&self, generation: u64) -> Vec<u8> {
        let key = BASE64.encode(self.generation_key(generation));
        let body = json!({
            "compare": [{"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
            "success": [{"request_put": {"key": key, "value": BASE64.encode(&self.host_id)}}],
            "failure": [{"request_range": {"key": key}}],
        });
        self.post("/v3/kv/txn", &body)
    }

    /// What a claim's reply means.
    pub fn parse_claim(&self, response: &Response) -> Result<ClaimOutcome, WitnessError> {
        let reply = ok_json(response)?;
        if reply.get("succeeded").and_then(Value::as_bool) == Some(true) {
            return Ok(ClaimOutcome::Granted);
        }
        let kv = reply
            .get("responses")
            .and_then(|r| r.get(0))
            .and_then(|r| r.get("response_range"))
            .and_then(|r| r.get("kvs"))
            .and_then(|k| k.get(0))
            .ok_or(WitnessError::MissingField("responses[0].response_range.kvs[0]"))?;
        let value = kv.get("value").and_then(Value::as_str).ok_or(WitnessError::MissingField("kvs[0].value"))?;
        let holder = BASE64.decode(value).map_err(|_| WitnessError::BadBase64("kvs[0].value"))?;
        let holder = String::from_utf8(holder).map_err(|_| WitnessError::BadBase64("kvs[0].value"))?;
        if holder == self.host_id {
            Ok(ClaimOutcome::Granted)
        } else {
            Ok(ClaimOutcome::Denied { holder })
        }
    }

    /// `POST /v3/lease/grant`.
    pub fn lease_grant_request(&self, ttl_s: i64) -> Vec<u8> {
        self.post("/v3/lease/grant", &json!({ "TTL": ttl_s.to_string() }))
    }

    /// The lease a grant's reply carries.
    pub fn parse_lease_grant(&self, response: &Response) -> Result<Lease, WitnessError> {
        let reply = ok_json(response)?;
        Ok(Lease { id: int64(&reply, "ID")?, ttl_s: int64(&reply, "TTL")? })
    }

    /// `POST /v3/lease/keepalive` for one renewal.
    pub fn keepalive_request(&self, lease: i64) -> Vec<u8> {
        self.post("/v3/lease/keepalive", &json!({ "ID": lease.to_string() }))
    }

    /// The lease's remaining TTL after a keep-alive; 0 means it had already expired. The
    /// gateway streams: each renewal is one JSON object `{"result": {...}}`.
    pub fn parse_keepalive(&self, response: &Response) -> Result<i64, WitnessError> {
        let reply = ok_json(response)?;
        let result = reply.get("result").ok_or(WitnessError::MissingField("result"))?;
        // etcd leaves zero fields out: an expired lease comes back without TTL.
        match result.get("TTL") {
            None => Ok(0),
            Some(_) => int64(result, "TTL"),
        }
    }

    /// `POST /v3/kv/put` of the holder key (this host, generation `g`) under `lease`.
    pub fn holder_request(&self, generation: u64, lease: i64) -> Vec<u8> {
        let value = format!("{} generation {generation}", self.host_id);
        let body = json!({
            "key": BASE64.encode(self.holder_key()),
            "value": BASE64.encode(value),
            "lease": lease.to_string(),
        });
        self.post("/v3/kv/put", &body)
    }

    /// Whether a put succeeded.
    pub fn parse_put(&self, response: &Response) -> Result<(), WitnessError> {
        ok_json(response).map(|_| ())
    }

    /// `POST /v3/auth/authenticate` (etcd's user/password auth, where the operator enabled it).
    pub fn authenticate_request(&self, user: &str, password: &str) -> Vec<u8> {
        self.post("/v3/auth/authenticate", &json!({ "name": user, "password": password }))
    }

    /// Takes the token from an authenticate reply; later requests carry it.
    pub fn accept_token(&mut self, response: &Response) -> Result<(), WitnessError> {
        let reply = ok_json(response)?;
        let token = reply.get("token").and_then(Value::as_str).ok_or(WitnessError::MissingField("token"))?;
        self.token = Some(token.into());
        Ok(())
    }
}

/// The reply's JSON, or the error it carries (a non-2xx status, or an `error` object inside a
/// 200 stream).
fn ok_json(response: &Response) -> Result<Value, WitnessError> {
    let reply: Value = serde_json::from_slice(&response.body).map_err(|e| {
        if (200..300).contains(&response.status) {
            WitnessError::BadJson(e.to_string())
        } else {
            WitnessError::Server {
                status: response.status,
                code: 0,
                message: String::from_utf8_lossy(&response.body[..response.body.len().min(200)]).into_owned(),
            }
        }
    })?;
    let error = reply.get("error").or_else(|| reply.get("result").and_then(|r| r.get("error")));
    if !(200..300).contains(&response.status) || error.is_some() {
        let error = error.unwrap_or(&reply);
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .or_else(|| error.as_str())
            .or_else(|| reply.get("message").and_then(Value::as_str))
            .unwrap_or("")
            .to_string();
        let code = error.get("code").or_else(|| reply.get("code")).and_then(Value::as_i64).unwrap_or(0);
        return Err(WitnessError::Server { status: response.status, code, message });
    }
    Ok(reply)
}

fn int64(object: &Value, field: &'static str) -> Result<i64, WitnessError> {
    match object.get(field) {
        Some(Value::String(s)) => s.parse().map_err(|_| WitnessError::BadNumber(field)),
        Some(Value::Number(n)) => n.as_i64().ok_or(WitnessError::BadNumber(field)),
        _ => Err(WitnessError::MissingField(field)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: u16, body: &str) -> Response {
        Response { status, body: body.as_bytes().to_vec() }
    }

    fn client() -> EtcdClient {
        EtcdClient::new("10.9.0.2:2379", "demo", "host-a").unwrap()
    }

    #[test]
    fn claim_request_compares_create_revision_zero() {
        let req = String::from_utf8(client().claim_request(7)).unwrap();
        let body: Value = serde_json::from_str(req.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        let key = BASE64.encode("colo/demo/gen/7");
        assert_eq!(body["compare"][0]["key"], key);
        assert_eq!(body["compare"][0]["target"], "CREATE");
        assert_eq!(body["compare"][0]["create_revision"], "0");
        assert_eq!(body["success"][0]["request_put"]["value"], BASE64.encode("host-a"));
        assert_eq!(body["failure"][0]["request_range"]["key"], key);
        assert!(req.starts_with("POST /v3/kv/txn HTTP/1.1\r\nHost: 10.9.0.2:2379\r\n"));
    }

    #[test]
    fn claim_replies() {
        let c = client();
        assert_eq!(c.parse_claim(&reply(200, r#"{"header":{},"succeeded":true}"#)), Ok(ClaimOutcome::Granted));
        let held = |who: &str| {
            format!(
                r#"{{"header":{{}},"responses":[{{"response_range":{{"kvs":[{{"key":"x","value":"{}"}}],"count":"1"}}}}]}}"#,
                BASE64.encode(who)
            )
        };
        assert_eq!(c.parse_claim(&reply(200, &held("host-b"))), Ok(ClaimOutcome::Denied { holder: "host-b".into() }));
        assert_eq!(c.parse_claim(&reply(200, &held("host-a"))), Ok(ClaimOutcome::Granted));
        assert_eq!(
            c.parse_claim(&reply(200, r#"{"header":{}}"#)),
            Err(WitnessError::MissingField("responses[0].response_range.kvs[0]"))
        );
        assert!(matches!(c.parse_claim(&reply(200, "{nope")), Err(WitnessError::BadJson(_))));
        assert_eq!(
            c.parse_claim(&reply(200, r#"{"responses":[{"response_range":{"kvs":[{"value":"!!notbase64"}]}}]}"#)),
            Err(WitnessError::BadBase64("kvs[0].value"))
        );
        assert_eq!(
            c.parse_claim(&reply(404, r#"{"error":"etcdserver: requested lease not found","code":5}"#)),
            Err(WitnessError::Server { status: 404, code: 5, message: "etcdserver: requested lease not found".into() })
        );
        assert!(matches!(
            c.parse_claim(&reply(503, "Service Unavailable")),
            Err(WitnessError::Server { status: 503, .. })
        ));
    }

    #[test]
    fn lease_replies() {
        let c = client();
        assert_eq!(
            c.parse_lease_grant(&reply(200, r#"{"header":{},"ID":"7587870000000000001","TTL":"5"}"#)),
            Ok(Lease { id: 7_587_870_000_000_000_001, ttl_s: 5 })
        );
        assert_eq!(c.parse_lease_grant(&reply(200, r#"{"ID":"x","TTL":"5"}"#)), Err(WitnessError::BadNumber("ID")));
        assert_eq!(c.parse_keepalive(&reply(200, r#"{"result":{"ID":"1","TTL":"4"}}"#)), Ok(4));
        assert_eq!(c.parse_keepalive(&reply(200, r#"{"result":{"ID":"1"}}"#)), Ok(0));
        assert!(matches!(
            c.parse_keepalive(&reply(200, r#"{"error":{"grpc_code":5,"http_code":404,"message":"lease not found"}}"#)),
            Err(WitnessError::Server { .. })
        ));
    }

    #[test]
    fn names_are_checked() {
        assert!(EtcdClient::new("a:1", "demo", "host a").is_err());
        assert!(EtcdClient::new("a:1", "", "h").is_err());
        assert!(EtcdClient::new("a:1", "c/x", "h").is_err());
        assert!(EtcdClient::new("a:1", &"x".repeat(65), "h").is_err());
        assert!(EtcdClient::new("a:1", "c-1.x_y", "H0").is_ok());
    }
}
