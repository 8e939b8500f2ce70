//! Consuming scan requests: manual acks on the delivery's own channel, and
//! an ack only after the scan row is committed.
//!
//! - A message that can never become a scan (not JSON, wrong schema,
//!   invalid targets or ports, too large) is published to the dead-letter
//!   queue with the reason in the `x-portfleet-error` header - confirmed by
//!   the broker - and then acked: logged once, never redelivered.
//! - While the database is unavailable the requests in hand are held and
//!   retried, unsettled, until it is back: an outage is not a message's
//!   fault and counts no delivery. Any other failure is nacked with
//!   requeue after a backoff, until the delivery limit; then it is
//!   dead-lettered the same way, with the last error.
//! - Requests that wait on DNS are stored apart (the lookup lane), so a
//!   slow name never holds up a batch.
//! - Prefetch bounds how many messages are in hand at once; bodies over the
//!   size limit are refused unparsed.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions,
        BasicQosOptions,
    },
    types::{AMQPValue, FieldTable, ShortString},
};
use portfleet_core::backoff::Backoff;
use portfleet_telemetry::{otel, otel::TraceParent, trace_span};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{
    Ingress, IngressConfig, IngressError,
    messages::{self, BadMessage, Properties},
    topology::{QueueKind, RequestQueue},
};
use crate::{
    scans::{RequestTrace, ScanError, ScanRequestInput},
    store::StoreError,
};

/// Publishes rejected messages to the dead-letter exchange, with confirms.
pub struct DeadLetters {
    channel: Channel,
    exchange: String,
}

impl DeadLetters {
    pub async fn open(conn: &Connection, cfg: &IngressConfig) -> Result<Self, IngressError> {
        let channel = conn.create_channel().await?;
        channel.confirm_select(Default::default()).await?;
        Ok(Self { channel, exchange: cfg.dead_letter_exchange.clone() })
    }

    /// Closes the channel (before the connection closes: lapin's close on
    /// drop would race it and log an ERROR).
    pub async fn close(&self) {
        let _ = self.channel.close(200, ShortString::from("ingress stopping")).await;
    }

    /// Copies the delivery to `<queue>.dlq` with the reason; returns once
    /// the broker has confirmed it.
    async fn publish(&self, queue: &str, d: &Delivery, reason: &str, attempts: u32) -> Result<(), IngressError> {
        let mut headers = d.properties.headers().clone().unwrap_or_default();
        let text = |s: &str| AMQPValue::LongString(s.into());
        headers.insert("x-portfleet-error".into(), text(reason));
        headers.insert("x-portfleet-queue".into(), text(queue));
        headers.insert("x-portfleet-exchange".into(), text(d.exchange.as_str()));
        headers.insert("x-portfleet-routing-key".into(), text(d.routing_key.as_str()));
        headers.insert("x-portfleet-attempts".into(), AMQPValue::LongUInt(attempts));
        let props = d.properties.clone().with_headers(headers).with_delivery_mode(2);
        let confirm = self
            .channel
            .basic_publish(self.exchange.as_str().into(), queue.into(), BasicPublishOptions::default(), &d.data, props)
            .await?
            .await?;
        if confirm.is_nack() {
            return Err(IngressError::Nacked(format!("dead-lettering to {queue}.dlq")));
        }
        Ok(())
    }
}

/// Deliveries seen per message, for queues whose broker does not count
/// them (classic queues). Bounded: cleared when large.
#[derive(Default)]
pub struct Attempts {
    seen: Mutex<HashMap<String, u32>>,
}

impl Attempts {
    fn bump(&self, key: &str) -> u32 {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() > 100_000 {
            seen.clear();
        }
        let n = seen.entry(key.to_string()).or_insert(0);
        *n += 1;
        *n
    }

    fn forget(&self, key: &str) {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

/// The attempt this delivery is: the broker's count (quorum queues) or
/// our own.
fn attempt(d: &Delivery, key: &str, attempts: &Attempts) -> u32 {
    let broker = d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count").cloned())
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => u32::try_from(n).ok(),
            AMQPValue::LongInt(n) => u32::try_from(n).ok(),
            AMQPValue::ShortInt(n) => u32::try_from(n).ok(),
            AMQPValue::LongUInt(n) => Some(n),
            _ => None,
        })
        .map(|prior| prior + 1);
    let ours = attempts.bump(key);
    broker.unwrap_or(0).max(ours)
}

fn text(v: &Option<ShortString>) -> Option<&str> {
    v.as_ref().map(ShortString::as_str)
}

/// Deliveries are taken in batches: whatever is ready, up to this many,
/// waiting at most [`BATCH_WINDOW`] after the first. One batch is one
/// database statement, one commit and (usually) one multiple-ack. Batches
/// of a queue run one after another; requests that wait on DNS are stored
/// apart (the lookup lane), so a slow name never holds up a batch.
const MAX_BATCH: usize = 500;
const BATCH_WINDOW: Duration = Duration::from_millis(5);

/// Requests of this queue being resolved and stored on their own, by
/// delivery tag: a multiple-ack must never cover one of them.
#[derive(Default)]
struct Lane {
    tasks: JoinSet<Result<u64, IngressError>>,
    tags: BTreeSet<u64>,
}

/// Consumes one queue until `cancel` or a connection error.
pub async fn run(
    conn: &Connection,
    queue: RequestQueue,
    ingress: Arc<Ingress>,
    dead: Arc<DeadLetters>,
    cancel: CancellationToken,
) -> Result<(), IngressError> {
    let channel = conn.create_channel().await?;
    channel.basic_qos(ingress.config.prefetch, BasicQosOptions::default()).await?;
    let tag = format!("portfleet-{}", uuid::Uuid::new_v4().simple());
    let mut consumer = channel
        .basic_consume(
            queue.name.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(queue = %queue.name, managed = queue.managed, "consuming scan requests");
    let queue = Arc::new(queue);
    let mut lane = Lane::default();
    let result = loop {
        // Wait for the first delivery, then take what follows within the
        // window; settle lookup-lane requests as they finish meanwhile.
        let first = tokio::select! {
            _ = cancel.cancelled() => break Ok(()),
            Some(done) = lane.tasks.join_next(), if !lane.tasks.is_empty() => {
                match done {
                    Ok(Ok(tag)) => { lane.tags.remove(&tag); continue }
                    Ok(Err(e)) => break Err(e),
                    Err(e) => break Err(IngressError::ConsumerEnded(format!("a lookup task failed: {e}"))),
                }
            }
            next = consumer.next() => next,
        };
        let mut batch = match first {
            Some(Ok(d)) => vec![d],
            Some(Err(e)) => break Err(e.into()),
            None => break Err(IngressError::ConsumerEnded(queue.name.clone())),
        };
        let deadline = tokio::time::Instant::now() + BATCH_WINDOW;
        let mut failed = None;
        // No more than prefetch can arrive before this batch is acked.
        let most = MAX_BATCH.min(usize::from(ingress.config.prefetch));
        while batch.len() < most {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                next = consumer.next() => match next {
                    Some(Ok(d)) => batch.push(d),
                    Some(Err(e)) => { failed = Some(e.into()); break }
                    None => { failed = Some(IngressError::ConsumerEnded(queue.name.clone())); break }
                },
            }
        }
        // Even when the stream failed, settle what is in hand (or it goes
        // back unacked with the channel).
        let (n, t0) = (batch.len(), std::time::Instant::now());
        let span = tracing::debug_span!("ingress.batch", queue = %queue.name, requests = n);
        let handled = handle(&ingress, &dead, &queue, &channel, batch, &mut lane, &cancel).instrument(span).await;
        tracing::debug!(requests = n, elapsed = ?t0.elapsed(), "batch settled");
        if let Err(e) = handled {
            break Err(e);
        }
        if let Some(e) = failed {
            break Err(e);
        }
    };
    // Unsettled lookup-lane requests go back to the queue with the channel.
    lane.tasks.shutdown().await;
    let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
    let _ = channel.close(200, ShortString::from("consumer stopping")).await;
    result
}

fn parse(ingress: &Ingress, queue: &RequestQueue, d: &Delivery) -> Result<crate::scans::ScanRequestInput, BadMessage> {
    let max = ingress.config.max_message_bytes;
    if d.data.len() > max {
        return Err(BadMessage(format!("the message body is {} bytes, over the maximum of {max}", d.data.len())));
    }
    let props = Properties {
        message_id: text(d.properties.message_id()),
        correlation_id: text(d.properties.correlation_id()),
        reply_to: text(d.properties.reply_to()),
    };
    let max_targets = ingress.scans.limits().max_targets as usize;
    match queue.kind {
        QueueKind::Native => messages::parse_native(d.routing_key.as_str(), &d.data, &props, max_targets),
        QueueKind::NaabuM8 => {
            let defaults = ingress.config.naabum8.as_ref().map(|n| n.defaults.clone()).unwrap_or_else(|| {
                messages::NaabuDefaults { ports: "top-100".into(), rate: 1000, hostname_table: false }
            });
            messages::parse_naabum8(d.routing_key.as_str(), &d.data, &props, &defaults, max_targets)
        }
    }
}

/// What became of one request.
enum Outcome {
    /// The scan is committed (or existed): ack.
    Stored,
    /// It can never become a scan: dead-letter.
    Refused(String),
    /// Try again later: nack with requeue, up to the delivery limit.
    Transient(String),
}

/// Stores requests, each to an [`Outcome`]. While the database is
/// unavailable the requests are held and retried with backoff: an outage
/// is not the messages' fault, so it never counts toward their delivery
/// limit (and nothing more is consumed meanwhile). `None` when cancelled
/// while holding: the requests stay unsettled and go back to the queue.
async fn store(ingress: &Ingress, inputs: Vec<ScanRequestInput>, cancel: &CancellationToken) -> Option<Vec<Outcome>> {
    let mut outcomes: Vec<Option<Outcome>> = inputs.iter().map(|_| None).collect();
    let mut pending: Vec<usize> = (0..inputs.len()).collect();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut held_since = None;
    loop {
        let batch = pending.iter().map(|&i| inputs[i].clone()).collect();
        let mut unavailable = None;
        match ingress.scans.create_many(batch).await {
            Ok(results) => {
                let mut still = Vec::new();
                for (i, result) in pending.iter().copied().zip(results) {
                    match result {
                        Ok(_) => outcomes[i] = Some(Outcome::Stored),
                        Err(ScanError::Store(e)) if e.is_transient() => {
                            unavailable = Some(e.to_string());
                            still.push(i);
                        }
                        Err(ScanError::Store(e @ StoreError::Rejected(_))) => {
                            outcomes[i] = Some(Outcome::Refused(e.to_string()))
                        }
                        Err(ScanError::Store(e)) => outcomes[i] = Some(Outcome::Transient(e.to_string())),
                        Err(e) => outcomes[i] = Some(Outcome::Refused(e.to_string())),
                    }
                }
                pending = still;
            }
            Err(e) if e.is_transient() => unavailable = Some(e.to_string()),
            Err(e) => {
                tracing::error!(error = %e, requests = pending.len(), "storing scans failed; the requests go back");
                for &i in &pending {
                    outcomes[i] = Some(Outcome::Transient(e.to_string()));
                }
                pending.clear();
            }
        }
        if pending.is_empty() {
            if let Some(since) = held_since {
                let since: tokio::time::Instant = since;
                tracing::info!(held = ?since.elapsed(), requests = inputs.len(), "database back; held requests stored");
            }
            return outcomes.into_iter().collect();
        }
        if held_since.is_none() {
            held_since = Some(tokio::time::Instant::now());
            tracing::warn!(
                error = unavailable.as_deref().unwrap_or(""),
                requests = pending.len(),
                "database unavailable; holding the requests until it is back (not counted as delivery attempts)"
            );
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// Handles a batch to the end: every delivery acked, dead-lettered,
/// nacked, or handed to the lookup lane.
async fn handle(
    ingress: &Arc<Ingress>,
    dead: &Arc<DeadLetters>,
    queue: &Arc<RequestQueue>,
    channel: &Channel,
    batch: Vec<Delivery>,
    lane: &mut Lane,
    cancel: &CancellationToken,
) -> Result<(), IngressError> {
    let mut valid = Vec::with_capacity(batch.len());
    for d in batch {
        metrics::counter!("portfleet_amqp_deliveries_total").increment(1);
        if d.redelivered {
            metrics::counter!("portfleet_amqp_redelivered_total").increment(1);
        }
        let trace = delivery_trace(queue, &d);
        let parsed = parse(ingress, queue, &d).map(|input| ScanRequestInput { trace: trace.clone(), ..input });
        match parsed {
            Ok(input) if input.needs_lookup() => {
                lane.tags.insert(d.delivery_tag);
                let (ingress, dead, queue, cancel) = (ingress.clone(), dead.clone(), queue.clone(), cancel.clone());
                let span = tracing::debug_span!("ingress.lookup", queue = %queue.name, request_id = %input.request_id);
                lane.tasks.spawn(
                    async move {
                        let tag = d.delivery_tag;
                        if let Some(mut outcome) = store(&ingress, vec![input.clone()], &cancel).await {
                            let outcome = outcome.pop().unwrap_or(Outcome::Transient("no outcome".into()));
                            settle(&ingress, &dead, &queue, d, &input.request_id, outcome, &cancel).await?;
                        }
                        Ok(tag)
                    }
                    .instrument(span),
                );
            }
            Ok(input) => valid.push((d, input)),
            Err(BadMessage(reason)) => {
                reject(dead, queue, &d, &reason, 1, "invalid").instrument(trace.span).await?;
            }
        }
    }
    if valid.is_empty() {
        return Ok(());
    }
    let inputs = valid.iter().map(|(_, i)| i.clone()).collect();
    let t0 = std::time::Instant::now();
    let Some(outcomes) = store(ingress, inputs, cancel).await else { return Ok(()) };
    tracing::debug!(requests = valid.len(), store = ?t0.elapsed(), "batch stored");
    let mut stored = Vec::new();
    for ((d, input), outcome) in valid.into_iter().zip(outcomes) {
        match outcome {
            Outcome::Stored => {
                ingress.attempts.forget(&input.request_id);
                committed(&d);
                stored.push(d);
            }
            other => settle(ingress, dead, queue, d, &input.request_id, other, cancel).await?,
        }
    }
    // Everything else of this batch is settled, and earlier batches were:
    // one ack with `multiple` covers exactly the stored deliveries, unless
    // a lookup-lane request below them is still open.
    let Some(last) = stored.iter().map(|d| d.delivery_tag).max() else { return Ok(()) };
    if lane.tags.range(..last).next().is_none() {
        channel.basic_ack(last, BasicAckOptions { multiple: true }).await?;
    } else {
        for d in stored {
            d.acker.ack(BasicAckOptions::default()).await?;
        }
    }
    Ok(())
}

/// The trace a delivery belongs to: its `amqp.consume` span, continuing
/// the publisher's W3C `traceparent` and `tracestate` headers (a trace of
/// its own without them), and the `traceparent` as it came.
fn delivery_trace(queue: &RequestQueue, d: &Delivery) -> RequestTrace {
    let headers = d.properties.headers().as_ref();
    let header = |name: &str| match headers.and_then(|h| h.inner().get(name)) {
        Some(AMQPValue::LongString(s)) => std::str::from_utf8(s.as_bytes()).ok(),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str()),
        _ => None,
    };
    let (traceparent, tracestate) = (header("traceparent"), header("tracestate"));
    let span = trace_span!("amqp.consume", otel.kind = "consumer", messaging.system = "rabbitmq",
        messaging.operation.type = "process", messaging.destination.name = %queue.name,
        messaging.message.id = text(d.properties.message_id()).unwrap_or_default(),
        messaging.rabbitmq.destination.routing_key = %d.routing_key);
    otel::continue_remote(&span, traceparent, tracestate);
    RequestTrace { span, parent: traceparent.and_then(TraceParent::parse) }
}

/// Settles one delivery by its outcome: ack, dead-letter, or nack with
/// requeue after a backoff until the delivery limit.
async fn settle(
    ingress: &Ingress,
    dead: &DeadLetters,
    queue: &RequestQueue,
    d: Delivery,
    key: &str,
    outcome: Outcome,
    cancel: &CancellationToken,
) -> Result<(), IngressError> {
    match outcome {
        Outcome::Stored => {
            ingress.attempts.forget(key);
            committed(&d);
            d.acker.ack(BasicAckOptions::default()).await?;
        }
        Outcome::Refused(reason) => {
            ingress.attempts.forget(key);
            reject(dead, queue, &d, &reason, 1, "refused").await?;
        }
        Outcome::Transient(e) => {
            let n = attempt(&d, key, &ingress.attempts);
            if n >= ingress.config.delivery_limit {
                ingress.attempts.forget(key);
                reject(dead, queue, &d, &format!("gave up after {n} attempts: {e}"), n, "delivery_limit").await?;
            } else {
                // Back off before handing it back, so a failing request is
                // not a hot loop.
                let backoff = Duration::from_millis(200 * u64::from(n)).min(Duration::from_secs(5));
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = tokio::time::sleep(backoff) => {}
                }
                d.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await?;
            }
        }
    }
    Ok(())
}

/// A delivery's request is committed (it is acked next): counted, and
/// timed from its publisher's `timestamp` property when it has one (whole
/// seconds, as AMQP timestamps are).
fn committed(d: &Delivery) {
    metrics::counter!("portfleet_amqp_acks_total").increment(1);
    if let Some(sent) = d.properties.timestamp() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let waited = now.as_secs_f64() - *sent as f64;
        metrics::histogram!("portfleet_amqp_publish_to_commit_seconds").record(waited.max(0.0));
    }
}

/// Dead-letters a delivery; `kind` is the bounded label of why
/// (`invalid`, `refused`, `delivery_limit`), `reason` the text it carries.
async fn reject(
    dead: &DeadLetters,
    queue: &RequestQueue,
    d: &Delivery,
    reason: &str,
    attempts: u32,
    kind: &'static str,
) -> Result<(), IngressError> {
    let id = text(d.properties.message_id()).unwrap_or("(no message id)");
    tracing::warn!(queue = %queue.name, message_id = id, %reason, "request dead-lettered");
    if let Err(e) = dead.publish(&queue.name, d, reason, attempts).await {
        // Not safely dead-lettered: leave it to be redelivered.
        d.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await?;
        return Err(e);
    }
    d.acker.ack(BasicAckOptions::default()).await?;
    metrics::counter!("portfleet_amqp_dead_lettered_total", "reason" => kind).increment(1);
    Ok(())
}

/// A reply or event publication's properties: JSON, persistent.
pub fn json_properties(message_id: String) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(message_id.into())
}
