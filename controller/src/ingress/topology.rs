//! Exchanges and queues, declared idempotently at every (re)connect.
//!
//! Each request queue `Q` is a durable quorum queue bound to its topic
//! exchange, with a delivery limit and dead-lettering into `Q.dlq` through
//! the dead-letter exchange. A queue that already exists with other
//! arguments (NaabuM8's `qnaabum8`: `x-max-length: 1`, `x-overflow:
//! reject-publish`) cannot be redeclared - the broker answers
//! PRECONDITION_FAILED and closes the channel - so it is consumed as it
//! is, with the consumer enforcing the delivery limit and dead-lettering
//! by itself.

use lapin::{
    Channel, Connection, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::{AMQPValue, FieldTable, ShortString},
};

use super::{IngressConfig, IngressError};

/// How a request queue is consumed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueKind {
    Native,
    NaabuM8,
}

#[derive(Clone, Debug)]
pub struct RequestQueue {
    pub name: String,
    pub kind: QueueKind,
    /// Declared by us with dead-lettering and a delivery limit; `false`
    /// for a pre-existing queue with other arguments.
    pub managed: bool,
}

fn is_precondition_failed(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if *p.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED))
}

fn durable() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions { durable: true, ..Default::default() }
}

async fn exchange(conn: &Connection, ch: &mut Channel, name: &str, kind: ExchangeKind) -> Result<(), IngressError> {
    match ch.exchange_declare(name.into(), kind, durable(), FieldTable::default()).await {
        Ok(()) => Ok(()),
        Err(e) if is_precondition_failed(&e) => {
            // It exists, declared differently: use it as it is.
            tracing::warn!(exchange = name, error = %e, "exchange exists with other settings; using it as it is");
            *ch = conn.create_channel().await?;
            let passive = ExchangeDeclareOptions { passive: true, ..Default::default() };
            ch.exchange_declare(name.into(), ExchangeKind::Topic, passive, FieldTable::default()).await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Declares a request queue `name` bound to `exchange` by `binding`, with
/// its dead-letter queue.
async fn request_queue(
    conn: &Connection,
    ch: &mut Channel,
    cfg: &IngressConfig,
    name: &str,
    exchange: &str,
    binding: &str,
    kind: QueueKind,
) -> Result<RequestQueue, IngressError> {
    let dlq = format!("{name}.dlq");
    let opts = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare(dlq.as_str().into(), opts, FieldTable::default()).await?;
    ch.queue_bind(
        dlq.as_str().into(),
        cfg.dead_letter_exchange.as_str().into(),
        name.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(cfg.dead_letter_exchange.as_str().into()));
    args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(name.into()));
    // The consumer gives up first (and says why); the broker's limit is
    // the backstop if it cannot.
    args.insert("x-delivery-limit".into(), AMQPValue::LongInt(cfg.delivery_limit as i32 + 1));
    let managed = match ch.queue_declare(name.into(), opts, args).await {
        Ok(_) => true,
        Err(e) if is_precondition_failed(&e) => {
            tracing::warn!(
                queue = name,
                broker_says = %e,
                "queue {name} already exists with other arguments (NaabuM8 declared qnaabum8 with x-max-length: 1 \
                 and x-overflow: reject-publish); consuming it as it is, with the delivery limit and dead-lettering \
                 done by portfleet. To migrate: stop the publishers, let the queue drain, delete it \
                 (rabbitmqctl delete_queue {name}) and restart the controller, which declares it anew (docs/amqp.md)"
            );
            *ch = conn.create_channel().await?;
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            ch.queue_declare(name.into(), passive, FieldTable::default()).await?;
            false
        }
        Err(e) => return Err(e.into()),
    };
    ch.queue_bind(name.into(), exchange.into(), binding.into(), QueueBindOptions::default(), FieldTable::default())
        .await?;
    Ok(RequestQueue { name: name.to_string(), kind, managed })
}

/// Declares everything; returns the queues to consume.
pub async fn declare(conn: &Connection, cfg: &IngressConfig) -> Result<Vec<RequestQueue>, IngressError> {
    let mut ch = conn.create_channel().await?;
    exchange(conn, &mut ch, &cfg.exchange, ExchangeKind::Topic).await?;
    exchange(conn, &mut ch, &cfg.dead_letter_exchange, ExchangeKind::Direct).await?;
    exchange(conn, &mut ch, &cfg.events_exchange, ExchangeKind::Topic).await?;
    let mut queues =
        vec![request_queue(conn, &mut ch, cfg, &cfg.queue, &cfg.exchange, &cfg.routing_key, QueueKind::Native).await?];
    if let Some(n) = &cfg.naabum8 {
        exchange(conn, &mut ch, &n.exchange, ExchangeKind::Topic).await?;
        queues.push(request_queue(conn, &mut ch, cfg, &n.queue, &n.exchange, &n.binding, QueueKind::NaabuM8).await?);
    }
    let _ = ch.close(200, ShortString::from("topology declared")).await;
    Ok(queues)
}
