//! The Backend.AI 26.9 event wire format, byte for byte what the Python storage proxy writes
//! (read from `backend.ai-common` 26.9.6, `message_queue/payload.py`):
//!
//! * anycast: a stream entry `XADD events MAXLEN ~ 128 * name <n> source storage payload <body>
//!   metadata <meta>`;
//! * broadcast: a JSON message on `events_all` whose `payload` and `metadata` are JSON
//!   *strings* holding JSON (26.9 drops a message whose `payload` is an object), cached first
//!   under `bgtask.<dashed task id>` for 300 s when it is a background-task event, so a client
//!   that subscribes after a fast task ended still gets its end.
//!
//! `source` is the constant `"storage"`, as the Python proxy sends it.

use crate::events::Event;

pub const EVENT_STREAM: &str = "events";
pub const BROADCAST_CHANNEL: &str = "events_all";
/// The Python producer trims the stream with `MAXLEN ~ 128`; so do we.
pub const EVENT_STREAM_MAXLEN: usize = 128;
pub const SOURCE: &str = "storage";
/// How long a cached broadcast event lives (`EX 300`).
pub const CACHE_SECS: u64 = 300;

/// `MessageMetadata` with nothing known, as the Python producer attaches it.
pub const METADATA: &str =
    r#"{"request_id":null,"user":null,"triggered_user":null,"traceparent":null}"#;

/// `XADD events MAXLEN ~ 128 * name .. source storage payload .. metadata ..`.
pub fn anycast(event: &Event) -> redis::Cmd {
    let mut c = redis::cmd("XADD");
    c.arg(EVENT_STREAM)
        .arg("MAXLEN")
        .arg("~")
        .arg(EVENT_STREAM_MAXLEN)
        .arg("*")
        .arg("name")
        .arg(event.name())
        .arg("source")
        .arg(SOURCE)
        .arg("payload")
        .arg(event.body())
        .arg("metadata")
        .arg(METADATA);
    c
}

/// The broadcast message: `{"name","source","payload":"<JSON>","metadata":"<JSON>"}`.
pub fn broadcast_envelope(event: &Event) -> String {
    serde_json::json!({
        "name": event.name(),
        "source": SOURCE,
        "payload": event.body(),
        "metadata": METADATA,
    })
    .to_string()
}

/// `SET <cache key> <envelope> EX 300` then `PUBLISH events_all <envelope>`, in one batch (as
/// the Python client sends them: not atomic, but the SET always goes first).
pub fn cached_broadcast(event: &Event, cache_key: &str) -> redis::Pipeline {
    let envelope = broadcast_envelope(event);
    let mut p = redis::pipe();
    p.cmd("SET")
        .arg(cache_key)
        .arg(&envelope)
        .arg("EX")
        .arg(CACHE_SECS)
        .ignore()
        .cmd("PUBLISH")
        .arg(BROADCAST_CHANNEL)
        .arg(&envelope)
        .ignore();
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_payload_is_a_json_string() {
        let id = uuid::Uuid::parse_str("11111111-2222-3333-4444-555555555555").unwrap();
        let e = Event::BgTaskDone {
            task_id: id,
            message: "Task completed successfully".into(),
        };
        // The bytes the 26.9.6 serializers produce (backendai-dropin.md §1.2).
        assert_eq!(
            broadcast_envelope(&e),
            r#"{"name":"bgtask_done","source":"storage","payload":"{\"task_id\":\"11111111-2222-3333-4444-555555555555\",\"message\":\"Task completed successfully\"}","metadata":"{\"request_id\":null,\"user\":null,\"triggered_user\":null,\"traceparent\":null}"}"#
        );
    }
}
