//! `webhooks`: the URLs the controller POSTs events to (an admin token),
//! and each one's delivery log. The event names are the controller's
//! (scan.created, scan.completed, scan.failed, scan.cancelled,
//! scan.changes); it refuses an unknown one, naming it.

use std::io::{self, Write};

use clap::Subcommand;
use portfleet_proto::{auth::ApiClient, v1 as pb};

use crate::{
    PAGE,
    args::Limit,
    show::{self, Table},
    status,
};

#[derive(Subcommand, Debug)]
pub enum WebhooksCommand {
    /// Add a webhook and print its id and signing secret (shown once).
    ///
    /// Each delivery is signed: X-Portfleet-Signature: sha256=<hex of
    /// HMAC-SHA256(secret, body)>.
    Add {
        /// http:// or https://.
        url: String,
        /// Only these events (comma-separated): scan.created,
        /// scan.completed, scan.failed, scan.cancelled, scan.changes.
        /// Default: all of them.
        #[arg(long, value_delimiter = ',')]
        events: Vec<String>,
    },
    /// List webhooks.
    List,
    /// Delete a webhook (see `webhooks list`).
    Delete { id: String },
    /// A webhook's deliveries, newest first.
    Deliveries {
        /// The webhook's id.
        id: String,
        /// At most this many deliveries (0: all of them).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

pub async fn run(c: &mut ApiClient, command: WebhooksCommand, headers: bool) -> Result<i32, String> {
    match command {
        WebhooksCommand::Add { url, events } => add(c, url, events).await,
        WebhooksCommand::List => list(c, headers).await,
        WebhooksCommand::Delete { id } => delete(c, id).await,
        WebhooksCommand::Deliveries { id, limit } => deliveries(c, id, Limit::new(limit), headers).await,
    }
}

fn events(events: &[String]) -> String {
    if events.is_empty() { "all".into() } else { show::clean(&events.join(",")) }
}

/// `webhooks add`: the id and secret on stdout (for scripts), the warning
/// that the secret is not shown again on stderr.
async fn add(c: &mut ApiClient, url: String, events: Vec<String>) -> Result<i32, String> {
    let w = c.create_webhook(pb::CreateWebhookRequest { url, events }).await.map_err(status)?.into_inner();
    let _ = show::fields(
        &mut io::stdout().lock(),
        &[
            ("id", w.id.clone()),
            ("url", show::clean(&w.url)),
            ("events", self::events(&w.events)),
            ("secret", show::clean(&w.secret)),
        ],
    );
    eprintln!("the secret is shown once, now: store it to check each delivery's X-Portfleet-Signature");
    Ok(0)
}

const WEBHOOK_COLUMNS: &[&str] = &["ID", "URL", "EVENTS", "CREATED"];

/// `webhooks list`: every webhook, page by page.
async fn list(c: &mut ApiClient, headers: bool) -> Result<i32, String> {
    let mut out = io::stdout().lock();
    let mut table = Table::new(WEBHOOK_COLUMNS, headers);
    let mut token = String::new();
    loop {
        let page = c
            .list_webhooks(pb::ListWebhooksRequest { page_size: PAGE, page_token: token })
            .await
            .map_err(status)?
            .into_inner();
        let rows: Vec<Vec<String>> = page
            .webhooks
            .iter()
            .map(|w| vec![w.id.clone(), show::clean(&w.url), events(&w.events), show::time(w.create_time.as_ref())])
            .collect();
        if table.page(&mut out, &rows).is_err() || page.next_page_token.is_empty() || rows.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    if table.rows() == 0 {
        eprintln!("no webhooks");
    }
    Ok(0)
}

async fn delete(c: &mut ApiClient, id: String) -> Result<i32, String> {
    c.delete_webhook(pb::DeleteWebhookRequest { id: id.clone() })
        .await
        .map_err(|e| format!("webhook {}: {}", portfleet_core::text::echo(&id), status(e)))?;
    let _ = writeln!(io::stdout().lock(), "deleted {id}");
    Ok(0)
}

const DELIVERY_COLUMNS: &[&str] =
    &["ID", "EVENT", "SCAN", "STATE", "ATTEMPTS", "STATUS", "CREATED", "LAST ATTEMPT", "NEXT ATTEMPT", "ERROR"];

fn delivery_row(d: &pb::WebhookDelivery) -> Vec<String> {
    let state = match pb::DeliveryState::try_from(d.state) {
        Ok(pb::DeliveryState::Pending) => "pending",
        Ok(pb::DeliveryState::Delivered) => "delivered",
        Ok(pb::DeliveryState::Failed) => "failed",
        _ => "unknown",
    };
    vec![
        d.id.clone(),
        show::or_dash(&d.event),
        show::or_dash(&d.scan_id),
        state.into(),
        d.attempts.to_string(),
        if d.last_status == 0 { "-".into() } else { d.last_status.to_string() },
        show::time(d.create_time.as_ref()),
        show::time(d.last_attempt_time.as_ref()),
        show::time(d.next_attempt_time.as_ref()),
        show::or_dash(&d.last_error),
    ]
}

/// `webhooks deliveries`: newest first, page by page, up to `--limit`.
async fn deliveries(c: &mut ApiClient, id: String, mut limit: Limit, headers: bool) -> Result<i32, String> {
    let mut out = io::stdout().lock();
    let mut table = Table::new(DELIVERY_COLUMNS, headers);
    let mut token = String::new();
    loop {
        let request = pb::ListWebhookDeliveriesRequest {
            webhook_id: id.clone(),
            page_size: limit.page_size(PAGE),
            page_token: token,
        };
        let page = c.list_webhook_deliveries(request).await.map_err(status)?.into_inner();
        let rows: Vec<Vec<String>> = limit.take(page.deliveries).iter().map(delivery_row).collect();
        if table.page(&mut out, &rows).is_err() || rows.is_empty() || page.next_page_token.is_empty() {
            break;
        }
        if limit.reached() {
            eprintln!("stopped at --limit {} deliveries; there may be more (--limit 0 lists them all)", table.rows());
            break;
        }
        token = page.next_page_token;
    }
    if table.rows() == 0 {
        eprintln!("no deliveries");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::{Cli, Command};

    #[test]
    fn add_takes_comma_separated_events() {
        let cli = Cli::try_parse_from([
            "portfleet",
            "webhooks",
            "add",
            "https://hooks.example/x",
            "--events",
            "scan.changes,scan.completed",
        ])
        .unwrap();
        let Command::Webhooks(WebhooksCommand::Add { url, events }) = cli.command else { panic!("webhooks add") };
        assert_eq!(url, "https://hooks.example/x");
        assert_eq!(events, ["scan.changes", "scan.completed"]);
        assert_eq!(self::events(&[]), "all");
    }

    #[test]
    fn a_delivery_row_shows_dashes_for_what_did_not_happen() {
        let d = pb::WebhookDelivery {
            id: "d1".into(),
            event: "scan.completed".into(),
            state: pb::DeliveryState::Pending as i32,
            ..Default::default()
        };
        assert_eq!(delivery_row(&d), ["d1", "scan.completed", "-", "pending", "0", "-", "-", "-", "-", "-"]);
    }
}
