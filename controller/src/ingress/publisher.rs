//! Lifecycle events (`scan.created`, `scan.completed`, `scan.failed`,
//! `scan.cancelled`) to the events exchange, the reply to a request's
//! `reply_to`, and NaabuM8's completion message - all persistent, all with
//! publisher confirms, and a scan is marked published only after the
//! broker confirmed.

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::{Channel, Connection, options::BasicPublishOptions, types::ShortString};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::{Ingress, IngressError, consumer::json_properties};
use crate::{
    notify::Notice,
    store::{Origin, PendingEvent, ScanEvent, ScanRecord, StoreError},
};

const BATCH: i64 = 200;
/// How often an unavailable NaabuM8 database is logged.
const WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

fn ts(t: Option<DateTime<Utc>>) -> serde_json::Value {
    t.map_or(serde_json::Value::Null, |t| json!(t.to_rfc3339_opts(SecondsFormat::Millis, true)))
}

/// The event body: the scan's id, state, counts and times (as they are
/// when the event is published).
pub fn event_body(event: &str, s: &ScanRecord) -> serde_json::Value {
    json!({
        "event": event,
        "scan_id": s.id.to_string(),
        "state": s.state,
        "request_id": s.request_id,
        "origin": s.origin,
        "labels": s.labels.0,
        "probes_planned": s.probes_planned,
        "probes_done": s.probes_done,
        "open_ports": s.open_ports,
        "error": s.error,
        "created_at": ts(Some(s.created_at)),
        "started_at": ts(s.started_at),
        "finished_at": ts(s.finished_at),
    })
}

/// [`event_body`] with an event's own fields (a `scan.changes` page:
/// `counts`, `page`, `pages`, `changes`) added.
pub fn event_body_with(event: &str, s: &ScanRecord, payload: Option<&serde_json::Value>) -> serde_json::Value {
    let mut body = event_body(event, s);
    if let (Some(serde_json::Value::Object(extra)), Some(map)) = (payload, body.as_object_mut()) {
        map.extend(extra.clone());
    }
    body
}

/// NaabuM8's completion message, as its downstream services expect it:
/// `warning` (NaabuM8's word for a step that failed) when its tables could
/// not be written, else `complete` or `incomplete`.
pub fn naabum8_completion(
    routing_key: &str,
    s: &ScanRecord,
    event: ScanEvent,
    tables_failed: Option<&str>,
) -> serde_json::Value {
    let (status, message) = match (event, tables_failed) {
        (_, Some(why)) => ("warning", format!("scan {} {event}, but NaabuM8's tables were not written: {why}", s.id)),
        (ScanEvent::Completed, None) => ("complete", format!("scan {} completed: {} open ports", s.id, s.open_ports)),
        (other, None) => (
            "incomplete",
            format!("scan {} {other}{}", s.id, s.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()),
        ),
    };
    json!({
        "channel": routing_key,
        "payload": { "status": status, "message": message },
        "timestamp": Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
        "source": "naabum8",
    })
}

/// Publishes without waiting; the caller awaits every confirm at once.
async fn publish(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &serde_json::Value,
    id: String,
    correlation: Option<&str>,
) -> Result<lapin::PublisherConfirm, IngressError> {
    let mut props = json_properties(id);
    if let Some(c) = correlation {
        props = props.with_correlation_id(ShortString::from(c));
    }
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    Ok(ch.basic_publish(exchange.into(), key.into(), BasicPublishOptions::default(), &bytes, props).await?)
}

/// A NaabuM8 scan's rows, written to NaabuM8's tables before its
/// completion message goes out (`crate::naabum8`). `Ok(Some(why))` when
/// they cannot be written (the message says so); `Err` when NaabuM8's
/// database is unavailable: the event waits in the outbox and is tried
/// again.
async fn naabum8_tables(ingress: &Ingress, e: &PendingEvent, down: &mut bool) -> Result<Option<String>, StoreError> {
    let Some(db) = &ingress.naabum8_db else { return Ok(None) };
    if !e.event.is_final() || e.scan.origin != Origin::NaabuM8 {
        return Ok(None);
    }
    // Found unavailable earlier in this pass: the rest wait without
    // waiting for a connection each.
    if *down {
        return Err(StoreError::Cancelled);
    }
    let complete = e.event == ScanEvent::Completed;
    let t0 = std::time::Instant::now();
    match crate::naabum8::export(&ingress.store, db, e.scan.id, complete).await {
        Ok(w) => {
            tracing::info!(scan_id = %e.scan.id, services = w.services, endpoints = w.endpoints,
                hostnames = w.hostnames, complete, elapsed = ?t0.elapsed(), "NaabuM8 tables written");
            Ok(None)
        }
        Err(err) if err.is_transient() => {
            *down = true;
            Err(err)
        }
        Err(err) => {
            tracing::error!(scan_id = %e.scan.id, error = %err, "cannot write NaabuM8's tables");
            Ok(Some(err.to_string()))
        }
    }
}

/// Publishes one event (and the reply or NaabuM8 message it implies); the
/// confirms go to `confirms`.
async fn publish_event(
    ch: &Channel,
    ingress: &Ingress,
    e: &PendingEvent,
    tables_failed: Option<&str>,
    confirms: &mut Vec<lapin::PublisherConfirm>,
) -> Result<(), IngressError> {
    let s = &e.scan;
    let name = e.event.wire_name();
    let body = event_body_with(&name, s, e.payload.as_ref().map(|p| &p.0));
    let events = &ingress.config.events_exchange;
    // A scan's changes come in pages: each page its own message id.
    let message_id = match body.get("page") {
        Some(page) => format!("{}:{name}:{page}", s.id),
        None => format!("{}:{name}", s.id),
    };
    confirms.push(publish(ch, events, &name, &body, message_id, None).await?);
    if matches!(e.event, ScanEvent::Changes | ScanEvent::ScheduleFired) {
        return Ok(());
    }
    if e.event == ScanEvent::Created
        && let Some(reply_to) = &s.reply_to
    {
        // The default exchange routes by queue name.
        confirms.push(publish(ch, "", reply_to, &body, format!("{}:reply", s.id), s.correlation_id.as_deref()).await?);
    }
    if e.event != ScanEvent::Created
        && s.origin == Origin::NaabuM8
        && let Some(n) = &ingress.config.naabum8
    {
        let body = naabum8_completion(&n.completion_key, s, e.event, tables_failed);
        confirms.push(publish(ch, &n.exchange, &n.completion_key, &body, format!("{}:naabum8", s.id), None).await?);
    }
    Ok(())
}

/// Publishes until `cancel`, woken by scan notifications and a timer.
pub async fn run(conn: &Connection, ingress: Arc<Ingress>, cancel: CancellationToken) -> Result<(), IngressError> {
    let ch = conn.create_channel().await?;
    let result = publish_events(&ch, &ingress, &cancel).await;
    // Closed here rather than on drop: lapin's close on drop races the
    // connection's close and is then logged as a connection ERROR.
    let _ = ch.close(200, ShortString::from("publisher stopping")).await;
    result
}

async fn publish_events(ch: &Channel, ingress: &Ingress, cancel: &CancellationToken) -> Result<(), IngressError> {
    ch.confirm_select(Default::default()).await?;
    let mut notices = ingress.notifier.subscribe();
    let mut warned: Option<std::time::Instant> = None;
    loop {
        // A database outage pauses publishing; it does not end the session.
        let pending = match ingress.store.pending_events(BATCH).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read events to publish; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                }
            }
        };
        let claimed = pending.events.len() as i64;
        let mut confirms = Vec::new();
        let mut failure = None;
        // Events that wait for NaabuM8's database: left in the outbox.
        let mut waiting = Vec::new();
        let mut naabum8_down = false;
        for e in &pending.events {
            let tables_failed = match naabum8_tables(ingress, e, &mut naabum8_down).await {
                Ok(failed) => failed,
                Err(err) => {
                    // Once a minute, not once a pass.
                    if !matches!(err, StoreError::Cancelled) && warned.is_none_or(|t| t.elapsed() > WARN_EVERY) {
                        warned = Some(std::time::Instant::now());
                        tracing::warn!(scan_id = %e.scan.id, error = %err,
                            "NaabuM8's database unavailable; completions of NaabuM8 scans wait for it");
                    }
                    waiting.push(e.event_id);
                    continue;
                }
            };
            if let Err(err) = publish_event(ch, ingress, e, tables_failed.as_deref(), &mut confirms).await {
                failure = Some(err);
                break;
            }
        }
        // Deleted from the outbox only once the broker confirmed all of it.
        for confirm in confirms {
            match confirm.await {
                Ok(c) if c.is_ack() => {}
                Ok(_) => failure = Some(IngressError::Nacked("an event".into())),
                Err(err) => failure = Some(err.into()),
            }
        }
        let published: Vec<i64> = if failure.is_some() {
            Vec::new()
        } else {
            pending.events.iter().map(|e| e.event_id).filter(|id| !waiting.contains(id)).collect()
        };
        if let Err(e) = pending.finish(&published).await {
            // Published but still in the outbox: it goes out again.
            tracing::warn!(error = %e, "cannot record published events; they will be published again");
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if claimed == BATCH && waiting.is_empty() {
            continue;
        }
        let relevant = async {
            loop {
                match notices.recv().await {
                    Ok(Notice::ScanCreated(_) | Notice::ScanChanged(_) | Notice::Resync)
                    | Err(RecvError::Lagged(_)) => {
                        return;
                    }
                    Ok(_) => {}
                    Err(RecvError::Closed) => std::future::pending::<()>().await,
                }
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            () = relevant => {}
        }
    }
}
