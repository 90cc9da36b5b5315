//! A minimal OVSDB client (RFC 7047 JSON-RPC) on the database's unix socket,
//! so that reading the bridge and changing tags costs one round trip on a
//! socket instead of forking `ovs-vsctl` (each fork costs tens of
//! milliseconds here, seconds on a loaded machine).
//!
//! One connection per call: a `transact` is a single request and answer, and
//! a short-lived connection never has to answer the server's `echo` probes.
//! Every call is bounded by [`CALL_TIMEOUT`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::ovs::{DriverError, Result};

/// Where `ovsdb-server` listens on these machines (`ovs-ctl start`).
pub const DEFAULT_SOCKET: &str = "/var/run/openvswitch/db.sock";
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// An answer larger than this is refused (a bridge with thousands of ports
/// answers in well under a megabyte).
const MAX_ANSWER: usize = 64 << 20;

#[derive(Debug, Clone)]
pub struct Ovsdb {
    pub socket: PathBuf,
}

impl Default for Ovsdb {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
        }
    }
}

fn err(detail: impl Into<String>) -> DriverError {
    DriverError::Command {
        cmd: "ovsdb transact".into(),
        detail: detail.into(),
    }
}

impl Ovsdb {
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Self {
            socket: socket.as_ref().to_path_buf(),
        }
    }

    /// Runs `ops` in one transaction on `Open_vSwitch`; the result per op.
    /// Any op's error fails the whole call (OVSDB then commits nothing).
    pub async fn transact(&self, ops: Vec<Value>) -> Result<Vec<Value>> {
        let n = ops.len();
        let mut params = vec![json!("Open_vSwitch")];
        params.extend(ops);
        let request = json!({"method": "transact", "params": params, "id": 1});
        let answer = tokio::time::timeout(CALL_TIMEOUT, self.call(&request))
            .await
            .map_err(|_| err(format!("no answer within {CALL_TIMEOUT:?}")))??;
        if let Some(e) = answer.get("error").filter(|e| !e.is_null()) {
            return Err(err(e.to_string()));
        }
        let results = answer
            .get("result")
            .and_then(Value::as_array)
            .cloned()
            .ok_or_else(|| err(format!("answer without result: {answer}")))?;
        // An op's error is in its result; a failed commit adds one more result.
        for r in &results {
            if let Some(e) = r.get("error").filter(|e| !e.is_null()) {
                let details = r.get("details").map(Value::to_string).unwrap_or_default();
                return Err(err(format!("{e} {details}")));
            }
        }
        if results.len() < n {
            return Err(err(format!("{} results for {n} ops", results.len())));
        }
        Ok(results)
    }

    async fn call(&self, request: &Value) -> Result<Value> {
        let mut s = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| err(format!("connect {}: {e}", self.socket.display())))?;
        let body = serde_json::to_vec(request).map_err(|e| err(e.to_string()))?;
        s.write_all(&body)
            .await
            .map_err(|e| err(format!("write: {e}")))?;
        let mut buf = Vec::with_capacity(8192);
        let mut chunk = [0u8; 65536];
        loop {
            let n = s
                .read(&mut chunk)
                .await
                .map_err(|e| err(format!("read: {e}")))?;
            if n == 0 {
                return Err(err("connection closed before a whole answer"));
            }
            buf.extend_from_slice(&chunk[..n]);
            // The stream carries bare JSON values; parse once one is whole.
            let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
            match it.next() {
                Some(Ok(v)) => {
                    if v.get("method").and_then(Value::as_str) == Some("echo") {
                        // Never expected on a fresh connection; answer and go on.
                        let off = it.byte_offset();
                        let reply =
                            json!({"result": v.get("params"), "error": null, "id": v.get("id")});
                        let r = serde_json::to_vec(&reply).map_err(|e| err(e.to_string()))?;
                        s.write_all(&r)
                            .await
                            .map_err(|e| err(format!("write: {e}")))?;
                        buf.drain(..off);
                        continue;
                    }
                    return Ok(v);
                }
                Some(Err(e)) if e.is_eof() => {}
                Some(Err(e)) => return Err(err(format!("bad answer: {e}"))),
                None => {}
            }
            if buf.len() > MAX_ANSWER {
                return Err(err("answer too large"));
            }
        }
    }
}

/// `["set", [...]]` or a bare atom, as OVSDB encodes a set column, as a list.
pub fn set_items(v: &Value) -> Vec<Value> {
    match v.as_array() {
        Some(a) if a.first().and_then(Value::as_str) == Some("set") => a
            .get(1)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        _ => vec![v.clone()],
    }
}

/// The uuid string of `["uuid", "…"]`.
pub fn uuid_of(v: &Value) -> Option<&str> {
    let a = v.as_array()?;
    (a.first()?.as_str()? == "uuid").then(|| a.get(1)?.as_str())?
}

/// An integer column that may be empty (`["set", []]`).
pub fn opt_int(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| set_items(v).first().and_then(Value::as_i64))
}

/// A string-to-string map column, `["map", [[k, v], …]]`.
pub fn map_of(v: &Value) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    if let Some(pairs) = v.get(1).and_then(Value::as_array) {
        for p in pairs {
            if let (Some(k), Some(v)) = (
                p.get(0).and_then(Value::as_str),
                p.get(1).and_then(Value::as_str),
            ) {
                out.insert(k.to_string(), v.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn decodes_ovsdb_values() {
        assert_eq!(opt_int(&json!(5)), Some(5));
        assert_eq!(opt_int(&json!(["set", []])), None);
        assert_eq!(uuid_of(&json!(["uuid", "abc"])), Some("abc"));
        assert_eq!(uuid_of(&json!(["named-uuid", "abc"])), None);
        assert_eq!(
            set_items(&json!(["set", [["uuid", "a"], ["uuid", "b"]]])).len(),
            2
        );
        assert_eq!(set_items(&json!(["uuid", "a"])).len(), 1);
        let m = map_of(&json!(["map", [["iface-id", "p1"], ["x", "y"]]]));
        assert_eq!(m.get("iface-id").map(String::as_str), Some("p1"));
    }
}
