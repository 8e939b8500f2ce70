//! WatchScan: the scan as it changes and its results as they land, driven
//! by database notifications from whichever controller took the results,
//! with a periodic re-read so a missed notification only delays.
//!
//! The [`WatchHub`] keeps the database cost per watched scan, not per
//! watcher. The first watcher of a scan starts its feed: one reader task
//! on this controller that follows the scan's shards by their commit
//! counters (`shard_batch`, see migrations/0002) and re-reads the scan on a
//! notification or every 500 ms, publishing each step on a bounded
//! broadcast; the last watcher to leave stops it. A step that carries
//! results lists, per shard, the range of batches `(after, upto]` it holds,
//! and moves the feed's cursors to the ends of those ranges. Every step is
//! a message to every watcher, so a feed makes few: at most four passes a
//! second (results that land meanwhile join the next pass, from all shards
//! in one message), and progress alone (counts) shown once a second.
//!
//! A watcher subscribes and copies the feed's cursors and snapshot in one
//! step under the feed's lock, which publishing also takes: everything up
//! to the copy is in the database, everything after comes on the
//! broadcast. It sends the snapshot, reads each shard's past in pages of
//! its own, then forwards live steps, keeping cursors of its own. A step
//! it already has is skipped; one that does not start at its cursors (it
//! fell behind and the broadcast dropped steps) is read from the database
//! instead, so every result arrives exactly once and none is lost.
//!
//! Each watcher forwards a live step at its own random offset into a
//! 200 ms window after it was published: a step for hundreds of watchers
//! is milliseconds of CPU (encoding, the kernel, their clients), and
//! spread out it never makes other calls wait behind all of it. Results
//! reach watchers within about half a second of their commit.
//!
//! Memory stays bounded: a feed's broadcast keeps at most its backlog of
//! steps (`ApiConfig::watch_backlog`, 32; a step holds at most 10,000
//! results) and only while some watcher has not taken them; each watcher
//! queues at most four messages, shared with the other watchers. A slow
//! watcher costs database reads, not buffers.
//!
//! Watches are capped per API token and per controller (`--max-watches*`),
//! and every database read of the hub - feeds, catch-ups, gaps - takes a
//! permit first: at most half of the API pool at once, so the other calls
//! keep connections. The agent protocol has a pool of its own (lib.rs).

use std::{
    collections::{HashMap, hash_map::Entry},
    convert::Infallible,
    future::Future,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use futures::{Stream, StreamExt};
use portfleet_proto::v1::{self as pb, watch_scan_response::Event};
use tokio::sync::{
    Semaphore,
    broadcast::{self, error::RecvError},
    mpsc,
};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::Status;
use tracing::Instrument;
use uuid::Uuid;

use super::status::store_status;
use crate::{
    auth::Caller,
    config::ApiConfig,
    notify::{Notice, Notifier},
    store::{ResultHead, ResultRecord, ScanRecord, Store, StoreError},
};

/// Batches read per query: at most a few thousand rows in memory.
const BATCHES_PER_READ: i32 = 2;
/// Most results in one step of a feed (one read brings at most two
/// batches of 5,000).
const STEP_RESULTS: usize = 10_000;
/// How often a feed re-reads its scan without a notification.
const REREAD: Duration = Duration::from_millis(500);
/// The least time between two passes of a feed: notifications that come
/// sooner wait, and the results they announce join one pass. Every pass
/// with news is a message to every watcher, so this bounds the fan-out.
const MIN_PASS: Duration = Duration::from_millis(250);
/// Progress alone (counts) is shown at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Each watcher forwards a live step at its own offset into this window
/// after the step was published: a step for hundreds of watchers is a few
/// milliseconds of CPU (encoding, the kernel, their clients), spread out
/// so that other calls never wait behind all of it at once.
const SPREAD: Duration = Duration::from_millis(200);
/// Messages queued per watcher for its HTTP/2 stream.
const WATCHER_QUEUE: usize = 4;
/// How long a shutting-down watcher waits to hand its client UNAVAILABLE.
const FAREWELL: Duration = Duration::from_secs(1);

type Item = Result<Arc<pb::WatchScanResponse>, Status>;

/// How `b` differs from `a`, for watchers.
#[derive(PartialEq, Eq)]
enum Change {
    None,
    /// Counts only: shown at most once per [`PROGRESS_EVERY`].
    Progress,
    /// State, waiting reason or error: shown at once.
    State,
}

fn change(a: &ScanRecord, b: &ScanRecord) -> Change {
    if (&a.state, &a.waiting_reason, &a.error) != (&b.state, &b.waiting_reason, &b.error) {
        Change::State
    } else if (a.probes_done, a.open_ports) != (b.probes_done, b.open_ports) {
        Change::Progress
    } else {
        Change::None
    }
}

fn terminal(s: &ScanRecord) -> bool {
    s.state.is_terminal()
}

fn scan_event(scan: ScanRecord) -> Arc<pb::WatchScanResponse> {
    Arc::new(pb::WatchScanResponse { event: Some(Event::Scan(scan.into())) })
}

fn results_event(rows: Vec<ResultRecord>) -> Option<Arc<pb::WatchScanResponse>> {
    if rows.is_empty() {
        return None;
    }
    let results = rows.into_iter().map(Into::into).collect();
    Some(Arc::new(pb::WatchScanResponse { event: Some(Event::Results(pb::ResultsFound { results })) }))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// This controller's watches: their caps and one feed per watched scan.
#[derive(Clone)]
pub struct WatchHub {
    hub: Arc<Hub>,
}

impl std::fmt::Debug for WatchHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = lock(&self.hub.state);
        f.debug_struct("WatchHub").field("open", &state.open).field("feeds", &state.feeds.len()).finish()
    }
}

struct Hub {
    store: Store,
    notifier: Notifier,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    max_watches: usize,
    max_per_token: usize,
    /// Steps a feed's broadcast holds for watchers that are behind; one
    /// that falls further behind reads the gap from the database.
    backlog: usize,
    /// Database reads of feeds and watchers at once.
    reads: Semaphore,
    state: Mutex<HubState>,
}

#[derive(Default)]
struct HubState {
    open: usize,
    per_token: HashMap<Uuid, usize>,
    feeds: HashMap<Uuid, Slot>,
}

struct Slot {
    feed: Arc<Feed>,
    watchers: usize,
}

impl WatchHub {
    /// `store` is the API pool's; `shutdown` ends every watch with
    /// UNAVAILABLE; feeds and watchers run on `tracker`.
    pub fn new(
        store: Store,
        notifier: Notifier,
        shutdown: CancellationToken,
        tracker: TaskTracker,
        config: &ApiConfig,
    ) -> Self {
        let reads = (config.db_pool_size as usize / 2).max(1);
        Self {
            hub: Arc::new(Hub {
                store,
                notifier,
                shutdown,
                tracker,
                max_watches: config.max_watches as usize,
                max_per_token: config.max_watches_per_token as usize,
                backlog: config.watch_backlog.max(1),
                reads: Semaphore::new(reads),
                state: Mutex::default(),
            }),
        }
    }

    /// Takes one of the caller's watch slots, or says which cap is full:
    /// the token's first, then the controller's.
    pub fn admit(&self, caller: &Caller) -> Result<Admission, Status> {
        let mut state = lock(&self.hub.state);
        let held = state.per_token.get(&caller.token_id).copied().unwrap_or(0);
        if held >= self.hub.max_per_token {
            tracing::warn!(token_id = %caller.token_id, held, "watch refused: the token's cap is full");
            return Err(Status::resource_exhausted(format!(
                "token {} already holds {held} WatchScan streams on this controller, the most \
                 --max-watches-per-token allows; close one first",
                caller.token_id
            )));
        }
        if state.open >= self.hub.max_watches {
            tracing::warn!(token_id = %caller.token_id, open = state.open, "watch refused: the controller's cap is full");
            return Err(Status::resource_exhausted(format!(
                "this controller already serves {} WatchScan streams, the most --max-watches allows; \
                 try again later or another controller",
                state.open
            )));
        }
        state.open += 1;
        *state.per_token.entry(caller.token_id).or_insert(0) += 1;
        Ok(Admission { hub: self.hub.clone(), token_id: caller.token_id })
    }

    /// Streams the scan's snapshot (`first` when this watcher starts its
    /// feed, else the feed's latest), every result so far and everything
    /// after, until the scan has ended and its results are delivered, the
    /// client goes away, or the controller shuts down.
    pub fn watch(
        &self,
        admission: Admission,
        first: ScanRecord,
    ) -> impl Stream<Item = Result<pb::WatchScanResponse, Status>> + Send + 'static {
        let (tx, rx) = mpsc::channel(WATCHER_QUEUE);
        let member = self.hub.join(first);
        let span = tracing::debug_span!("watch", scan_id = %member.feed.id, token_id = %admission.token_id);
        let hub = self.hub.clone();
        self.hub.tracker.spawn(
            async move {
                let _slot = admission;
                Watcher::new(hub, member, tx).run().await;
            }
            .instrument(span),
        );
        // Messages are shared with the feed's other watchers until tonic
        // encodes them.
        ReceiverStream::new(rx).map(|item| item.map(Arc::unwrap_or_clone))
    }
}

/// One watch slot, given back on drop.
pub struct Admission {
    hub: Arc<Hub>,
    token_id: Uuid,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut state = lock(&self.hub.state);
        state.open = state.open.saturating_sub(1);
        if let Entry::Occupied(mut e) = state.per_token.entry(self.token_id) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

impl Hub {
    /// The scan's feed, started when this is its first watcher.
    fn join(self: &Arc<Self>, first: ScanRecord) -> Membership {
        let mut state = lock(&self.state);
        let slot = state.feeds.entry(first.id).or_insert_with(|| {
            let feed = Arc::new(Feed::new(&first, self.backlog, self.shutdown.child_token()));
            let span = tracing::debug_span!("watch_feed", scan_id = %first.id);
            self.tracker.spawn(read_feed(self.clone(), feed.clone(), first).instrument(span));
            Slot { feed, watchers: 0 }
        });
        slot.watchers += 1;
        Membership { hub: self.clone(), feed: slot.feed.clone() }
    }

    /// Forgets `feed` (it failed): the next watcher starts a new one.
    fn forget(&self, feed: &Arc<Feed>) {
        let mut state = lock(&self.state);
        if state.feeds.get(&feed.id).is_some_and(|s| Arc::ptr_eq(&s.feed, feed)) {
            state.feeds.remove(&feed.id);
        }
    }

    /// Runs one database read under the hub's read permits.
    async fn reading<T>(&self, read: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        let _permit = self.reads.acquire().await.map_err(|_| StoreError::Cancelled)?;
        read.await
    }
}

/// A watcher's place in a feed; the last one to leave stops the feed.
struct Membership {
    hub: Arc<Hub>,
    feed: Arc<Feed>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        let mut state = lock(&self.hub.state);
        let Entry::Occupied(mut slot) = state.feeds.entry(self.feed.id) else { return };
        if !Arc::ptr_eq(&slot.get().feed, &self.feed) {
            return;
        }
        slot.get_mut().watchers -= 1;
        if slot.get().watchers == 0 {
            slot.remove();
            self.feed.stop.cancel();
        }
    }
}

/// How a feed ended.
#[derive(Clone, Debug)]
enum End {
    /// The scan is terminal and every result was published.
    Finished,
    /// Deleted, or the database failed: every watcher ends with this.
    Failed(Status),
}

/// A step and when it was published.
#[derive(Clone, Debug)]
struct Stamped {
    at: Instant,
    step: Published,
}

/// One step of a feed, as its broadcast carries it.
#[derive(Clone, Debug)]
enum Published {
    /// The scan changed; `version` counts the feed's snapshots.
    Scan {
        version: u64,
        event: Arc<pb::WatchScanResponse>,
    },
    /// The results of every range in `ranges`; `event` is `None` when they
    /// wrote nothing new (the cursors still move).
    Results {
        ranges: Arc<[Range]>,
        event: Option<Arc<pb::WatchScanResponse>>,
    },
    End(End),
}

/// A shard's batches `(after, upto]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    shard: i64,
    after: i32,
    upto: i32,
}

/// A step of results being gathered: ranges (one per shard) and their rows.
#[derive(Default)]
struct Step {
    ranges: Vec<Range>,
    rows: Vec<ResultRecord>,
}

impl Step {
    fn add(&mut self, range: Range, rows: Vec<ResultRecord>) {
        match self.ranges.last_mut() {
            Some(last) if last.shard == range.shard && last.upto == range.after => last.upto = range.upto,
            _ => self.ranges.push(range),
        }
        self.rows.extend(rows);
    }
}

/// A watched scan, followed by one reader task.
struct Feed {
    id: Uuid,
    tx: broadcast::Sender<Stamped>,
    state: Mutex<FeedState>,
    /// Cancelled when the last watcher leaves, or on shutdown.
    stop: CancellationToken,
}

struct FeedState {
    scan: Arc<pb::WatchScanResponse>,
    version: u64,
    /// The last batch published per shard.
    cursors: HashMap<i64, i32>,
    end: Option<End>,
}

/// Where a watcher starts: everything up to `cursors` is in the database,
/// everything after arrives on `rx`.
struct Subscription {
    rx: broadcast::Receiver<Stamped>,
    scan: Arc<pb::WatchScanResponse>,
    version: u64,
    cursors: HashMap<i64, i32>,
    end: Option<End>,
}

impl Feed {
    fn new(first: &ScanRecord, backlog: usize, stop: CancellationToken) -> Self {
        let (tx, _) = broadcast::channel(backlog);
        let state = FeedState { scan: scan_event(first.clone()), version: 1, cursors: HashMap::new(), end: None };
        Self { id: first.id, tx, state: Mutex::new(state), stop }
    }

    /// Subscribes and copies the feed's position in one step: no publish
    /// falls between the two.
    fn subscribe(&self) -> Subscription {
        let state = lock(&self.state);
        Subscription {
            rx: self.tx.subscribe(),
            scan: state.scan.clone(),
            version: state.version,
            cursors: state.cursors.clone(),
            end: state.end.clone(),
        }
    }

    /// The feed's cursors and snapshot now.
    fn position(&self) -> (HashMap<i64, i32>, Arc<pb::WatchScanResponse>, u64) {
        let state = lock(&self.state);
        (state.cursors.clone(), state.scan.clone(), state.version)
    }

    fn end(&self) -> Option<End> {
        lock(&self.state).end.clone()
    }

    // Every publish updates the position and sends under the lock, so a
    // subscriber sees each step either in its copy or on its receiver.
    fn publish_scan(&self, scan: ScanRecord) {
        let event = scan_event(scan);
        let mut state = lock(&self.state);
        state.version += 1;
        state.scan = event.clone();
        let _ = self.tx.send(Stamped { at: Instant::now(), step: Published::Scan { version: state.version, event } });
    }

    fn publish_results(&self, step: Step) {
        if step.ranges.is_empty() {
            return;
        }
        let event = results_event(step.rows);
        let ranges: Arc<[Range]> = step.ranges.into();
        let mut state = lock(&self.state);
        for r in ranges.iter() {
            state.cursors.insert(r.shard, r.upto);
        }
        let _ = self.tx.send(Stamped { at: Instant::now(), step: Published::Results { ranges, event } });
    }

    fn finish(&self, end: End) {
        let mut state = lock(&self.state);
        state.end = Some(end.clone());
        let _ = self.tx.send(Stamped { at: Instant::now(), step: Published::End(end) });
    }
}

/// The feed's reader: until the scan has ended and every result is out,
/// the database fails, or the feed stops.
async fn read_feed(hub: Arc<Hub>, feed: Arc<Feed>, first: ScanRecord) {
    let Some(end) = follow(&hub, &feed, first).await else { return };
    let failed = matches!(end, End::Failed(_));
    feed.finish(end);
    if failed {
        hub.forget(&feed);
    }
}

async fn follow(hub: &Hub, feed: &Feed, mut last: ScanRecord) -> Option<End> {
    // What watchers were last shown (`last` is what was last read).
    let mut shown = (last.clone(), Instant::now());
    let id = feed.id;
    // Subscribed before the first read, so nothing falls in between.
    let mut notices = hub.notifier.subscribe();
    // The last batch read per shard (see migrations/0002).
    let mut cursors: HashMap<i64, i32> = HashMap::new();
    let mut pass_started = Instant::now();
    loop {
        let heads = match hub.reading(hub.store.result_heads(id)).await {
            Ok(h) => h,
            Err(e) => return Some(End::Failed(store_status(e))),
        };
        let mut step = Step::default();
        for ResultHead { shard_id: shard, batches: head } in heads {
            let cursor = cursors.entry(shard).or_insert(0);
            while *cursor < head {
                let upto = head.min(*cursor + BATCHES_PER_READ);
                let rows = match hub.reading(hub.store.shard_results(shard, *cursor, upto)).await {
                    Ok(rows) => rows,
                    Err(e) => return Some(End::Failed(store_status(e))),
                };
                if !step.rows.is_empty() && step.rows.len() + rows.len() > STEP_RESULTS {
                    feed.publish_results(std::mem::take(&mut step));
                }
                step.add(Range { shard, after: *cursor, upto }, rows);
                *cursor = upto;
            }
        }
        feed.publish_results(step);
        if terminal(&last) {
            return Some(End::Finished);
        }
        tokio::select! {
            _ = feed.stop.cancelled() => return None,
            _ = tokio::time::sleep(REREAD) => {}
            _ = async {
                loop {
                    match notices.recv().await {
                        Ok(Notice::Results(s) | Notice::ScanChanged(s)) if s == id => return,
                        Ok(Notice::Resync) | Err(RecvError::Lagged(_)) => return,
                        Err(RecvError::Closed) => std::future::pending::<()>().await,
                        Ok(_) => {}
                    }
                }
            } => {}
        }
        tokio::select! {
            _ = feed.stop.cancelled() => return None,
            _ = tokio::time::sleep_until(pass_started + MIN_PASS) => {}
        }
        pass_started = Instant::now();
        // Whatever else is queued is covered by the reads that follow.
        while let Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) = notices.try_recv() {}
        match hub.reading(hub.store.get_scan(id)).await {
            Ok(Some(scan)) => {
                let show = match change(&shown.0, &scan) {
                    Change::None => false,
                    Change::Progress => shown.1.elapsed() >= PROGRESS_EVERY,
                    Change::State => true,
                };
                if show {
                    feed.publish_scan(scan.clone());
                    shown = (scan.clone(), Instant::now());
                }
                last = scan;
            }
            Ok(None) => return Some(End::Failed(Status::not_found(format!("scan {id} was deleted")))),
            Err(e) => return Some(End::Failed(store_status(e))),
        }
    }
}

/// Why a watcher stopped.
enum Stop {
    /// The client went away (or the controller is stopping and it does not
    /// read): nothing more to send.
    Gone,
    Finished,
    Failed(Status),
    Shutdown,
}

impl From<End> for Stop {
    fn from(end: End) -> Self {
        match end {
            End::Finished => Stop::Finished,
            End::Failed(s) => Stop::Failed(s),
        }
    }
}

/// One WatchScan stream.
struct Watcher {
    hub: Arc<Hub>,
    member: Membership,
    tx: mpsc::Sender<Item>,
    /// The last batch sent (or known empty) per shard.
    cursors: HashMap<i64, i32>,
    /// The last snapshot version sent.
    version: u64,
    /// Where in [`SPREAD`] this watcher forwards live steps.
    offset: Duration,
}

impl Watcher {
    fn new(hub: Arc<Hub>, member: Membership, tx: mpsc::Sender<Item>) -> Self {
        let offset = SPREAD.mul_f64(rand::random::<f64>());
        Self { hub, member, tx, cursors: HashMap::new(), version: 0, offset }
    }

    async fn run(mut self) {
        let Err(stop) = self.follow().await;
        let last = match stop {
            Stop::Gone | Stop::Finished => return,
            Stop::Failed(status) => status,
            Stop::Shutdown => Status::unavailable("controller shutting down"),
        };
        let _ = tokio::time::timeout(FAREWELL, self.tx.send(Err(last))).await;
    }

    async fn follow(&mut self) -> Result<Infallible, Stop> {
        let feed = self.member.feed.clone();
        let Subscription { mut rx, scan, version, cursors, end } = feed.subscribe();
        self.version = version;
        self.send(scan).await?;
        for (&shard, &upto) in &cursors {
            self.read(shard, 0, upto).await?;
        }
        self.cursors = cursors;
        if let Some(end) = end {
            return Err(end.into());
        }
        loop {
            let step = tokio::select! {
                _ = self.tx.closed() => return Err(Stop::Gone),
                _ = self.hub.shutdown.cancelled() => return Err(Stop::Shutdown),
                step = rx.recv() => step,
            };
            match step {
                Ok(Stamped { at, step: Published::Scan { version, event } }) => {
                    if version > self.version {
                        self.pace(at).await?;
                        self.version = version;
                        self.send(event).await?;
                    }
                }
                Ok(Stamped { at, step: Published::Results { ranges, event } }) => {
                    self.pace(at).await?;
                    self.results(&ranges, event).await?;
                }
                Ok(Stamped { step: Published::End(end), .. }) => return Err(end.into()),
                Err(RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "watcher fell behind its feed; reading the gap");
                    self.resync(&feed).await?;
                }
                // The feed outlives its watchers' references; defensive.
                Err(RecvError::Closed) => {
                    return Err(feed
                        .end()
                        .map_or(Stop::Failed(Status::unavailable("watch ended, try again")), Into::into));
                }
            }
        }
    }

    async fn send(&self, event: Arc<pb::WatchScanResponse>) -> Result<(), Stop> {
        tokio::select! {
            sent = self.tx.send(Ok(event)) => sent.map_err(|_| Stop::Gone),
            _ = self.hub.shutdown.cancelled() => Err(Stop::Shutdown),
        }
    }

    /// Waits for this watcher's turn at a step published at `at`.
    async fn pace(&self, at: Instant) -> Result<(), Stop> {
        tokio::select! {
            _ = tokio::time::sleep_until(at + self.offset) => Ok(()),
            _ = self.tx.closed() => Err(Stop::Gone),
            _ = self.hub.shutdown.cancelled() => Err(Stop::Shutdown),
        }
    }

    fn cursor(&self, shard: i64) -> i32 {
        self.cursors.get(&shard).copied().unwrap_or(0)
    }

    /// A live step: sent when each of its ranges starts at this watcher's
    /// cursor, skipped when it has them all, else its ranges are read from
    /// the database from this watcher's cursors (a step is published
    /// whole, so after a resync it is one or the other).
    async fn results(&mut self, ranges: &[Range], event: Option<Arc<pb::WatchScanResponse>>) -> Result<(), Stop> {
        let fresh: Vec<Range> = ranges.iter().copied().filter(|r| r.upto > self.cursor(r.shard)).collect();
        if fresh.is_empty() {
            return Ok(());
        }
        if fresh.len() == ranges.len() && fresh.iter().all(|r| r.after == self.cursor(r.shard)) {
            if let Some(event) = event {
                self.send(event).await?;
            }
        } else {
            for r in &fresh {
                let own = self.cursor(r.shard);
                if r.upto > own {
                    self.read(r.shard, own, r.upto).await?;
                    self.cursors.insert(r.shard, r.upto);
                }
            }
        }
        for r in fresh {
            let cursor = self.cursors.entry(r.shard).or_insert(0);
            *cursor = (*cursor).max(r.upto);
        }
        Ok(())
    }

    /// After the broadcast dropped steps: reads up to the feed's cursors
    /// now, and sends its snapshot if it is newer.
    async fn resync(&mut self, feed: &Feed) -> Result<(), Stop> {
        let (cursors, scan, version) = feed.position();
        for (shard, upto) in cursors {
            let own = self.cursors.get(&shard).copied().unwrap_or(0);
            if upto > own {
                self.read(shard, own, upto).await?;
                self.cursors.insert(shard, upto);
            }
        }
        if version > self.version {
            self.version = version;
            self.send(scan).await?;
        }
        Ok(())
    }

    /// Sends the results of `shard`'s batches `(after, upto]` from the
    /// database, a page at a time.
    async fn read(&self, shard: i64, after: i32, upto: i32) -> Result<(), Stop> {
        let mut cursor = after;
        while cursor < upto {
            let next = upto.min(cursor + BATCHES_PER_READ);
            let rows = tokio::select! {
                rows = self.hub.reading(self.hub.store.shard_results(shard, cursor, next)) => rows,
                _ = self.tx.closed() => return Err(Stop::Gone),
            };
            let rows = rows.map_err(|e| Stop::Failed(store_status(e)))?;
            if let Some(event) = results_event(rows) {
                self.send(event).await?;
            }
            cursor = next;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_holds_one_range_per_shard_run() {
        let mut step = Step::default();
        step.add(Range { shard: 1, after: 0, upto: 2 }, Vec::new());
        step.add(Range { shard: 1, after: 2, upto: 4 }, Vec::new());
        step.add(Range { shard: 2, after: 5, upto: 6 }, Vec::new());
        // Not contiguous: kept apart, so a watcher reads it from its cursor.
        step.add(Range { shard: 2, after: 7, upto: 8 }, Vec::new());
        assert_eq!(
            step.ranges,
            [
                Range { shard: 1, after: 0, upto: 4 },
                Range { shard: 2, after: 5, upto: 6 },
                Range { shard: 2, after: 7, upto: 8 }
            ]
        );
    }
}
