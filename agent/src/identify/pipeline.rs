//! The ordered queue between the engine and whoever reports its results:
//! findings go in as the engine sends them, each starts identifying at
//! once in a task of its own, and items come out in the order they went
//! in - so a checkpoint leaves only after every finding before it is
//! identified and out. Bounded: once it holds its capacity the engine's
//! probing is held (`EngineControl::set_backlog`) until it drains, while
//! the caller keeps taking the engine's events - the replies to probes
//! already sent, at most the engine's window - so no reply waits in the
//! kernel's ring meanwhile.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::Arc,
};

use portfleet_core::Service;
use tokio::task::JoinHandle;

use super::{Gate, Identified, Identifier};
use crate::engine::{Counts, Finding};

/// What leaves the pipeline, in the order it came in.
#[derive(Debug)]
pub enum Item {
    Found(Box<Identified>),
    /// Every position below is final and its findings left before this.
    Checkpoint {
        position: u64,
        counts: Counts,
    },
}

enum Slot {
    Ready(Item),
    Identifying { finding: Finding, task: JoinHandle<Service> },
}

/// Identification for one shard or standalone scan.
struct Stage {
    identifier: Arc<Identifier>,
    gate: Arc<Gate>,
    names: Arc<HashMap<IpAddr, Vec<String>>>,
    /// Open ports per address so far; above the threshold an address
    /// answers everything.
    threshold: u32,
    opens: HashMap<IpAddr, u32>,
}

pub struct Pipeline {
    stage: Option<Stage>,
    slots: VecDeque<Slot>,
    capacity: usize,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("queued", &self.slots.len())
            .field("identifying", &self.stage.is_some())
            .finish()
    }
}

impl Pipeline {
    /// Findings pass straight through, unidentified.
    pub fn plain() -> Self {
        Self { stage: None, slots: VecDeque::new(), capacity: usize::MAX }
    }

    /// Identifies every finding; `names` are the hostnames per address
    /// (SNI, HTTP Host); `threshold` 0 means no limit.
    pub fn identifying(
        identifier: Arc<Identifier>,
        gate: Arc<Gate>,
        names: Arc<HashMap<IpAddr, Vec<String>>>,
        threshold: u32,
    ) -> Self {
        let capacity = identifier.options().queue.max(1);
        Self {
            stage: Some(Stage { identifier, gate, names, threshold, opens: HashMap::new() }),
            slots: VecDeque::new(),
            capacity,
        }
    }

    /// Whether findings are identified (else they pass straight through).
    pub fn identifies(&self) -> bool {
        self.stage.is_some()
    }

    /// Holds the engine's probing while the queue is at capacity.
    fn update_backlog(&self) {
        if let Some(stage) = &self.stage {
            stage.gate.control.set_backlog(self.slots.len() >= self.capacity);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn push_open(&mut self, finding: Finding) {
        self.enqueue(finding);
        self.update_backlog();
    }

    fn enqueue(&mut self, finding: Finding) {
        let Some(stage) = &mut self.stage else {
            return self.slots.push_back(Slot::Ready(Item::Found(Box::new(Identified::plain(finding)))));
        };
        let opens = stage.opens.entry(finding.ip).or_default();
        *opens = opens.saturating_add(1);
        if stage.threshold > 0 && *opens > stage.threshold {
            let item = Identified { finding, service: None, answers_everything: true };
            return self.slots.push_back(Slot::Ready(Item::Found(Box::new(item))));
        }
        if !stage.gate.allows(finding.ip) {
            // Never connect outside the agent's scope; the engine does not
            // probe there either, so this is a belt to its braces.
            return self.slots.push_back(Slot::Ready(Item::Found(Box::new(Identified::plain(finding)))));
        }
        let (identifier, gate) = (stage.identifier.clone(), stage.gate.clone());
        let names = stage.names.get(&finding.ip).cloned().unwrap_or_default();
        let (ip, port) = (finding.ip, finding.port);
        let task = tokio::spawn(async move { identifier.identify(ip, port, &names, &gate).await });
        self.slots.push_back(Slot::Identifying { finding, task });
    }

    pub fn push_checkpoint(&mut self, position: u64, counts: Counts) {
        self.slots.push_back(Slot::Ready(Item::Checkpoint { position, counts }));
    }

    /// The next item in order, waiting for its identification; `None`
    /// when empty.
    pub async fn next(&mut self) -> Option<Item> {
        let item = self.next_in_order().await;
        self.update_backlog();
        item
    }

    async fn next_in_order(&mut self) -> Option<Item> {
        let slot = self.slots.front_mut()?;
        let item = match slot {
            Slot::Ready(_) => None,
            Slot::Identifying { finding, task } => {
                let service = task.await.ok();
                let found = Identified { finding: finding.clone(), service, answers_everything: false };
                Some(Item::Found(Box::new(found)))
            }
        };
        match (self.slots.pop_front()?, item) {
            (_, Some(item)) | (Slot::Ready(item), None) => Some(item),
            (Slot::Identifying { .. }, None) => None,
        }
    }

    /// The items that are ready now, in order, up to the first still being
    /// identified.
    pub fn ready(&mut self) -> Vec<Item> {
        let mut out = Vec::new();
        while let Some(slot) = self.slots.front() {
            match slot {
                Slot::Ready(_) => {}
                Slot::Identifying { task, .. } if task.is_finished() => {}
                Slot::Identifying { .. } => break,
            }
            match self.slots.pop_front() {
                Some(Slot::Ready(item)) => out.push(item),
                Some(Slot::Identifying { finding, task }) => {
                    // Finished: this does not wait (and, unconstrained,
                    // is never refused by the task budget).
                    let service =
                        futures::FutureExt::now_or_never(tokio::task::unconstrained(task)).and_then(Result::ok);
                    out.push(Item::Found(Box::new(Identified { finding, service, answers_everything: false })));
                }
                None => break,
            }
        }
        self.update_backlog();
        out
    }
}

impl Drop for Pipeline {
    /// Identifications nobody will report stop with the pipeline.
    fn drop(&mut self) {
        if let Some(stage) = &self.stage {
            stage.gate.control.set_backlog(false);
        }
        for slot in &self.slots {
            if let Slot::Identifying { task, .. } = slot {
                task.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use portfleet_core::AddressSet;
    use tokio::{io::AsyncWriteExt, net::TcpListener};

    use super::*;
    use crate::{engine::EngineControl, identify::Options};

    /// A server on 127.0.0.1 that greets every connection as OpenSSH does.
    async fn ssh_server() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n").await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                });
            }
        });
        port
    }

    fn stage(queue: usize) -> (Pipeline, Arc<EngineControl>) {
        let options = Options {
            banner_wait: Duration::from_millis(500),
            read_timeout: Duration::from_millis(500),
            queue,
            per_host: 1024,
            ..Options::default()
        };
        let control = Arc::new(EngineControl::new(1_000_000));
        let gate = Arc::new(Gate::new(Arc::new(AddressSet::default()), control.clone()));
        let identifier = Arc::new(Identifier::new(options).unwrap());
        (Pipeline::identifying(identifier, gate, Arc::default(), 0), control)
    }

    fn finding(port: u16, position: u64) -> Finding {
        Finding { ip: "127.0.0.1".parse().unwrap(), port, position, observed_at: SystemTime::now() }
    }

    /// Many findings, a checkpoint after each tenth: everything leaves in
    /// the order it came, each finding identified, even when hundreds are
    /// ready at once (more than a task's cooperative budget).
    #[tokio::test]
    async fn items_leave_in_order_each_identified() {
        let port = ssh_server().await;
        let (mut pipeline, _) = stage(4096);
        for i in 0..300u64 {
            pipeline.push_open(finding(port, i));
            if i % 10 == 9 {
                pipeline.push_checkpoint(i + 1, Counts::default());
            }
        }
        // Let every identification finish, then take them all at once.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let items = pipeline.ready();
        assert_eq!(items.len(), 330);
        assert!(pipeline.is_empty());
        let mut next = 0;
        for item in items {
            match item {
                Item::Found(f) => {
                    assert_eq!(f.finding.position, next);
                    let s = f.service.as_ref().expect("identified");
                    assert_eq!((s.name.as_str(), s.product.as_str(), s.version.as_str()), ("ssh", "OpenSSH", "9.2p1"));
                    assert!(s.verified);
                    next += 1;
                }
                Item::Checkpoint { position, .. } => assert_eq!(position, next),
            }
        }
    }

    /// A full queue holds the engine's probing (not identification) until
    /// it drains; the pipeline's end releases it.
    #[tokio::test]
    async fn a_full_queue_holds_probing_until_it_drains() {
        let port = ssh_server().await;
        let (mut pipeline, control) = stage(3);
        pipeline.push_open(finding(port, 0));
        pipeline.push_open(finding(port, 1));
        assert!(!control.probing_held());
        pipeline.push_open(finding(port, 2));
        pipeline.push_open(finding(port, 3));
        assert!(control.probing_held() && !control.is_paused());
        let first = pipeline.next().await;
        assert!(matches!(first, Some(Item::Found(f)) if f.finding.position == 0));
        assert!(control.probing_held(), "3 still queued");
        pipeline.next().await;
        assert!(!control.probing_held());
        pipeline.push_open(finding(port, 4));
        pipeline.push_open(finding(port, 5));
        assert!(control.probing_held());
        drop(pipeline);
        assert!(!control.probing_held());
    }
}
