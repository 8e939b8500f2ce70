//! RabbitMQ for tests: the real broker on 127.0.0.1:5672, with exchange and
//! queue names unique to each test so tests running at once never see each
//! other's messages. Everything a test declared is deleted on drop.

use std::time::Duration;

use futures::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};
use portfleet_controller::ingress::{IngressConfig, NaabuM8Config};

/// The broker the tests use; `PORTFLEET_TEST_AMQP_URL` overrides it.
pub fn url() -> String {
    std::env::var("PORTFLEET_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub struct TestBroker {
    pub prefix: String,
    pub config: IngressConfig,
    pub conn: Connection,
    pub channel: Channel,
}

pub async fn connect() -> Connection {
    let url = url();
    match Connection::connect(&url, ConnectionProperties::default()).await {
        Ok(c) => c,
        Err(e) => panic!(
            "RabbitMQ is not reachable at {url}: {e}. The tests need a real broker; run them with \
             scripts/test.sh, which starts it when it is installed but stopped."
        ),
    }
}

impl TestBroker {
    /// Unique names for everything; NaabuM8 compatibility with its own
    /// unique exchange and queue too.
    pub async fn new() -> Self {
        let prefix = format!("pft-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let mut config = IngressConfig::new(url());
        config.exchange = format!("{prefix}.x");
        config.queue = format!("{prefix}.requests");
        config.dead_letter_exchange = format!("{prefix}.dlx");
        config.events_exchange = format!("{prefix}.events");
        config.naabum8 = Some(NaabuM8Config {
            exchange: format!("{prefix}.cptm8"),
            queue: format!("{prefix}.qnaabum8"),
            ..NaabuM8Config::default()
        });
        let conn = connect().await;
        let channel = conn.create_channel().await.expect("channel");
        channel.confirm_select(Default::default()).await.expect("confirms");
        Self { prefix, config, conn, channel }
    }

    /// The `serve` flags that point a controller at this broker's names.
    pub fn controller_args(&self) -> Vec<String> {
        let c = &self.config;
        [
            ("--amqp-url", &c.url),
            ("--amqp-exchange", &c.exchange),
            ("--amqp-queue", &c.queue),
            ("--amqp-dead-letter-exchange", &c.dead_letter_exchange),
            ("--amqp-events-exchange", &c.events_exchange),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_string(), value.clone()])
        .collect()
    }

    /// [`TestBroker::controller_args`] plus NaabuM8 compatibility on its
    /// exchange and queue.
    pub fn naabum8_controller_args(&self) -> Vec<String> {
        let mut args = self.controller_args();
        if let Some(n) = &self.config.naabum8 {
            args.extend(
                ["--naabum8", "--naabum8-exchange", &n.exchange, "--naabum8-queue", &n.queue].map(String::from),
            );
        }
        args
    }

    /// Publishes with a confirm; `message_id` as given.
    pub async fn publish(&self, exchange: &str, routing_key: &str, body: &[u8], props: BasicProperties) {
        let confirm = self
            .channel
            .basic_publish(exchange.into(), routing_key.into(), BasicPublishOptions::default(), body, props)
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "broker refused a test message");
    }

    /// Publishes many without waiting for each confirm, then for all.
    pub async fn publish_many(&self, messages: impl IntoIterator<Item = (String, Vec<u8>, BasicProperties)>) {
        let exchange = self.config.exchange.clone();
        for (key, body, props) in messages {
            // Confirms are awaited all at once below.
            let confirm = self
                .channel
                .basic_publish(
                    exchange.as_str().into(),
                    key.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    props,
                )
                .await
                .expect("publish");
            drop(confirm);
        }
        self.channel.wait_for_confirms().await.expect("confirms");
    }

    /// Waits until the controller consumes every request queue (its
    /// topology is then declared and bound).
    pub async fn wait_ready(&self) {
        let mut queues = vec![self.config.queue.clone()];
        if let Some(n) = &self.config.naabum8 {
            queues.push(n.queue.clone());
        }
        for q in queues {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let ch = self.conn.create_channel().await.expect("channel");
                let passive = QueueDeclareOptions { passive: true, ..Default::default() };
                let consumers = ch
                    .queue_declare(q.as_str().into(), passive, FieldTable::default())
                    .await
                    .map(|q| q.consumer_count());
                let _ = ch.close(200, "".into()).await;
                if consumers.is_ok_and(|n| n > 0) {
                    break;
                }
                assert!(tokio::time::Instant::now() < deadline, "the controller never consumed {q}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Messages ready in a queue (0 if it does not exist yet).
    pub async fn depth(&self, queue: &str) -> u32 {
        let ch = self.conn.create_channel().await.expect("channel");
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let n = ch
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .map(|q| q.message_count())
            .unwrap_or(0);
        let _ = ch.close(200, "".into()).await;
        n
    }

    /// Takes every message of a queue (basic.get, acked).
    pub async fn drain(&self, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
        let mut out = Vec::new();
        while let Ok(Some(m)) = self.channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await {
            out.push(m);
        }
        out
    }

    /// A queue bound to `exchange` by `key`, consumed into a channel.
    pub async fn listen(
        &self,
        exchange: &str,
        key: &str,
    ) -> tokio::sync::mpsc::Receiver<(String, Vec<u8>, BasicProperties)> {
        let ch = self.conn.create_channel().await.expect("channel");
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        let _ = ch.exchange_declare(exchange.into(), ExchangeKind::Topic, durable, FieldTable::default()).await;
        let q = format!("{}.listen.{}", self.prefix, uuid::Uuid::new_v4().simple());
        let opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        ch.queue_declare(q.as_str().into(), opts, FieldTable::default()).await.expect("declare");
        ch.queue_bind(
            q.as_str().into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
        let mut consumer = ch
            .basic_consume(
                q.as_str().into(),
                "".into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(async move {
            let _keep = ch;
            while let Some(Ok(d)) = consumer.next().await {
                if tx.send((d.routing_key.to_string(), d.data, d.properties)).await.is_err() {
                    return;
                }
            }
        });
        rx
    }

    /// Declares a queue the way NaabuM8 did (x-max-length 1, reject-publish).
    pub async fn declare_legacy_naabum8_queue(&self) {
        let n = self.config.naabum8.as_ref().expect("naabum8");
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongInt(1));
        args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
        let opts = QueueDeclareOptions { durable: true, ..Default::default() };
        self.channel.queue_declare(n.queue.as_str().into(), opts, args).await.expect("legacy queue");
    }

    /// Closes the controller connections named `name` (rabbitmqctl).
    pub fn close_connections_named(&self, name: &str) -> usize {
        let out = std::process::Command::new("rabbitmqctl")
            .args(["list_connections", "-q", "--no-table-headers", "pid", "client_properties"])
            .output()
            .expect("rabbitmqctl");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut closed = 0;
        for line in text.lines().filter(|l| l.contains(name)) {
            let pid = line.split_whitespace().next().unwrap_or("");
            let status = std::process::Command::new("rabbitmqctl")
                .args(["close_connection", pid, "test: dropping the controller's connection"])
                .status()
                .expect("rabbitmqctl");
            if status.success() {
                closed += 1;
            }
        }
        closed
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let cfg = self.config.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                let Ok(conn) = Connection::connect(&url(), ConnectionProperties::default()).await else { return };
                let Ok(ch) = conn.create_channel().await else { return };
                let mut queues = vec![cfg.queue.clone(), format!("{}.dlq", cfg.queue)];
                if let Some(n) = &cfg.naabum8 {
                    queues.push(n.queue.clone());
                    queues.push(format!("{}.dlq", n.queue));
                }
                for q in queues {
                    let _ = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
                }
                let mut exchanges =
                    vec![cfg.exchange.clone(), cfg.dead_letter_exchange.clone(), cfg.events_exchange.clone()];
                if let Some(n) = &cfg.naabum8 {
                    exchanges.push(n.exchange.clone());
                }
                for x in exchanges {
                    let _ = ch.exchange_delete(x.as_str().into(), Default::default()).await;
                }
                let _ = conn.close(200, "".into()).await;
            });
        })
        .join();
    }
}

/// Waits (up to `timeout`) for `f` to hold.
pub async fn until(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The reason portfleet put on a dead-lettered message.
pub fn dead_letter_reason(m: &lapin::message::BasicGetMessage) -> String {
    let headers = m.delivery.properties.headers().clone().unwrap_or_default();
    match headers.inner().get("x-portfleet-error") {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("no reason header: {other:?}"),
    }
}
