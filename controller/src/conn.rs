//! Connection limits: how much of the controller's sockets one client, or
//! all of them together, can hold.
//!
//! Without them a connection that completes TCP (and TLS) and then says
//! nothing stays open for ever, and a few thousand such connections exhaust
//! the process's file descriptors: health checks and reconnecting agents
//! then fail. This module owns every accepted connection from accept to
//! close:
//!
//! - [`Incoming`] accepts, and refuses (closes at once) a connection over
//!   `--max-connections` in total or `--max-connections-per-ip` from one
//!   client address (an IPv6 client's /64), with a rate-limited warning.
//! - [`ConnIo`] wraps the accepted `TcpStream`. Its reads and writes fail
//!   with `TimedOut` - so hyper closes the connection - once the connection
//!   has opened no gRPC call within `--handshake-timeout` of being accepted
//!   (which also bounds a stalled TLS handshake), or has had no call open
//!   for `--idle-timeout`. A call that stays open (an agent session, a
//!   WatchScan) keeps its connection alive however long it lasts; there is
//!   no maximum connection age.
//! - [`StreamTracking`], a tower layer on the gRPC server, counts each
//!   connection's open calls: from the request until the response body is
//!   dropped. It finds the connection's state by the `TcpConnectInfo` tonic
//!   puts in every request (also under TLS), keyed by local and remote
//!   address, so `ConnIo` keeps tonic's own `TcpConnectInfo` and mTLS
//!   identity (`Request::peer_certs`) works as before.

use std::{
    collections::{HashMap, hash_map::Entry},
    future::Future,
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError, Weak},
    task::{Context, Poll, ready},
    time::Duration,
};

use futures::future::BoxFuture;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::{Instant, Sleep},
};
use tokio_stream::Stream;
use tonic::{
    codegen::{Bytes, http},
    transport::server::{Connected, TcpConnectInfo},
};

/// Limits on connections; `serve --max-connections`, `--max-connections-per-ip`,
/// `--handshake-timeout`, `--idle-timeout`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once, in total.
    pub max_connections: u32,
    /// Connections open at once from one client address (IPv6: one /64).
    pub max_connections_per_ip: u32,
    /// A connection must open its first call (after TCP, TLS and the
    /// HTTP/2 preface) within this long of being accepted.
    pub handshake_timeout: Duration,
    /// A connection with no call open for this long is closed.
    pub idle_timeout: Duration,
}

impl ConnectionLimits {
    pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
    /// An agent holds one connection and a client a few (tonic multiplexes
    /// every call on one HTTP/2 connection): 64 leaves room for dozens of
    /// agents, CLIs and probes behind one address, while one leaking or
    /// hostile client holds at most 0.64% of the default total.
    pub const DEFAULT_MAX_CONNECTIONS_PER_IP: u32 = 64;
    pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

    /// The message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        if self.max_connections_per_ip == 0 {
            return Err("--max-connections-per-ip must be at least 1".into());
        }
        if self.handshake_timeout.is_zero() {
            return Err("--handshake-timeout must be above zero".into());
        }
        if self.idle_timeout.is_zero() {
            return Err("--idle-timeout must be above zero".into());
        }
        Ok(())
    }
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: Self::DEFAULT_MAX_CONNECTIONS_PER_IP,
            handshake_timeout: Self::DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: Self::DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// File descriptors the controller needs besides client connections: the
/// database pools, RabbitMQ, the listener, the runtime, logs.
const FD_RESERVE: u64 = 256;

/// Raises the soft limit on open files (RLIMIT_NOFILE) to the hard limit,
/// which an unprivileged process may do: distributions start services with
/// a soft limit of 1024, far below `--max-connections`. Warns when even the
/// hard limit cannot hold `max_connections` plus what else the controller
/// needs, since connections would then fail with EMFILE before the limit
/// refuses them.
pub fn raise_open_files_limit(limits: &ConnectionLimits) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let before = getrlimit(Resource::Nofile);
    let mut soft = before.current;
    // An unlimited hard limit cannot be the soft limit of NOFILE (the kernel
    // caps it at fs.nr_open): leave that case alone.
    if let (Some(current), Some(maximum)) = (before.current, before.maximum)
        && current < maximum
    {
        match setrlimit(Resource::Nofile, Rlimit { current: Some(maximum), maximum: Some(maximum) }) {
            Ok(()) => {
                tracing::info!(
                    from = current,
                    to = maximum,
                    "raised the open-file limit (RLIMIT_NOFILE) to its maximum"
                );
                soft = Some(maximum);
            }
            Err(e) => tracing::warn!(error = %e, current, maximum, "cannot raise the open-file limit"),
        }
    }
    let needed = u64::from(limits.max_connections) + FD_RESERVE;
    if let Some(soft) = soft
        && soft < needed
    {
        tracing::warn!(
            open_file_limit = soft,
            max_connections = limits.max_connections,
            "the open-file limit is below --max-connections plus {FD_RESERVE}: connections may fail \
             before the limit refuses them; raise the limit (e.g. systemd LimitNOFILE=) or lower --max-connections"
        );
    }
}

/// A connection must have read something this recently to get one grace
/// period past its deadline: the bytes may be a call that hyper has taken
/// but not yet handed to [`StreamTracking`] (that happens in the call's own
/// task).
const READ_GRACE: Duration = Duration::from_millis(500);

/// At most one warning per this long about refused connections.
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(10);

/// Pause accepting this long when the process is out of file descriptors,
/// instead of spinning on EMFILE.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Refusals handled in one poll before yielding to other tasks.
const REFUSALS_PER_POLL: u32 = 64;

/// The connections of one server: counts per client and in total, and each
/// connection's state by its addresses.
#[derive(Clone, Debug)]
pub struct Connections {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    limits: ConnectionLimits,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    total: u32,
    per_client: HashMap<IpAddr, u32>,
    /// (local, remote) -> the connection's state, for [`StreamTracking`].
    by_addr: HashMap<(SocketAddr, SocketAddr), Weak<ConnState>>,
}

/// Why a connection was refused at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    Total,
    PerClient,
    /// The socket has no local address: it is already gone.
    Gone,
}

impl Connections {
    pub fn new(limits: ConnectionLimits) -> Self {
        Self { shared: Arc::new(Shared { limits, table: Mutex::default() }) }
    }

    pub fn limits(&self) -> &ConnectionLimits {
        &self.shared.limits
    }

    /// The server's stream of admitted connections from `listener`.
    pub fn incoming(&self, listener: TcpListener) -> Incoming {
        Incoming { listener, connections: self.clone(), refusals: RefusalLog::default(), pause: None }
    }

    /// The layer that counts each connection's open calls.
    pub fn stream_layer(&self) -> StreamTracking {
        StreamTracking { connections: self.clone() }
    }

    /// Connections open now.
    pub fn open(&self) -> u32 {
        self.table().total
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // The table is consistent after every statement: a panic elsewhere
        // cannot leave it half-updated.
        self.shared.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn admit(&self, stream: TcpStream, remote: SocketAddr) -> Result<ConnIo, Refusal> {
        let local = stream.local_addr().map_err(|_| Refusal::Gone)?;
        let client = client_key(remote.ip());
        let state = Arc::new(ConnState::default());
        {
            let limits = &self.shared.limits;
            let mut table = self.table();
            if table.total >= limits.max_connections {
                return Err(Refusal::Total);
            }
            let from_client = table.per_client.get(&client).copied().unwrap_or(0);
            if from_client >= limits.max_connections_per_ip {
                return Err(Refusal::PerClient);
            }
            table.total += 1;
            table.per_client.insert(client, from_client + 1);
            table.by_addr.insert((local, remote), Arc::downgrade(&state));
        }
        let now = Instant::now();
        Ok(ConnIo {
            stream,
            info: TcpConnectInfo { local_addr: Some(local), remote_addr: Some(remote) },
            client,
            state,
            connections: self.clone(),
            accepted: now,
            timer: Box::pin(tokio::time::sleep_until(now + self.shared.limits.handshake_timeout)),
            last_read: None,
            extended_for: None,
            expired: false,
        })
    }

    fn release(&self, key: (SocketAddr, SocketAddr), client: IpAddr, state: &Arc<ConnState>) {
        let mut table = self.table();
        table.total = table.total.saturating_sub(1);
        if let Entry::Occupied(mut e) = table.per_client.entry(client) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
        if table.by_addr.get(&key).is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(state))) {
            table.by_addr.remove(&key);
        }
    }

    fn find(&self, info: &TcpConnectInfo) -> Option<Arc<ConnState>> {
        let key = (info.local_addr?, info.remote_addr?);
        self.table().by_addr.get(&key)?.upgrade()
    }
}

/// What the per-address limit counts: an IPv4 address, or an IPv6 /64 (one
/// host's usual allocation: counting single IPv6 addresses would let one
/// host open 2^64 times the limit). IPv4-mapped IPv6 addresses count as
/// IPv4.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}

/// The calls open on one connection.
#[derive(Debug)]
struct ConnState {
    calls: Mutex<Calls>,
}

#[derive(Debug)]
struct Calls {
    open: u32,
    /// When the last call closed; `None` until a call has been opened.
    idle_since: Option<Instant>,
}

impl Default for ConnState {
    fn default() -> Self {
        Self { calls: Mutex::new(Calls { open: 0, idle_since: None }) }
    }
}

impl ConnState {
    fn calls(&self) -> MutexGuard<'_, Calls> {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn call_opened(&self) {
        self.calls().open += 1;
    }

    fn call_closed(&self) {
        let mut calls = self.calls();
        calls.open = calls.open.saturating_sub(1);
        if calls.open == 0 {
            calls.idle_since = Some(Instant::now());
        }
    }
}

/// The phase a connection is closed in, for the log.
#[derive(Clone, Copy, Debug)]
enum Phase {
    Handshake,
    Idle,
}

/// The server's accepted connections, each admitted or refused.
#[derive(Debug)]
pub struct Incoming {
    listener: TcpListener,
    connections: Connections,
    refusals: RefusalLog,
    pause: Option<Pin<Box<Sleep>>>,
}

impl Stream for Incoming {
    type Item = io::Result<ConnIo>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let mut refused = 0;
        loop {
            if let Some(pause) = &mut this.pause {
                ready!(pause.as_mut().poll(cx));
                this.pause = None;
            }
            match ready!(this.listener.poll_accept(cx)) {
                Ok((stream, remote)) => {
                    // Small frames (Welcome, Ack) must not wait for Nagle and
                    // a delayed ACK: 40 ms per handshake otherwise.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, %remote, "cannot set TCP_NODELAY");
                    }
                    match this.connections.admit(stream, remote) {
                        Ok(io) => return Poll::Ready(Some(Ok(io))),
                        Err(refusal) => {
                            this.refusals.note(refusal, remote, &this.connections.shared.limits);
                            refused += 1;
                            if refused >= REFUSALS_PER_POLL {
                                cx.waker().wake_by_ref();
                                return Poll::Pending;
                            }
                        }
                    }
                }
                Err(e) if is_out_of_resources(&e) => {
                    this.refusals.out_of_resources(&e);
                    this.pause = Some(Box::pin(tokio::time::sleep(ACCEPT_PAUSE)));
                }
                // The connection went away before it was accepted.
                Err(e) => tracing::debug!(error = %e, "accept failed"),
            }
        }
    }
}

fn is_out_of_resources(e: &io::Error) -> bool {
    use rustix::io::Errno;
    matches!(Errno::from_io_error(e), Some(Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM))
}

/// Warns about refusals at most once per [`REFUSAL_WARN_EVERY`], with the
/// number refused since the last warning.
#[derive(Debug, Default)]
struct RefusalLog {
    last_warned: Option<Instant>,
    unreported: u64,
}

impl RefusalLog {
    fn due(&mut self) -> bool {
        self.unreported += 1;
        let now = Instant::now();
        if self.last_warned.is_some_and(|t| now.duration_since(t) < REFUSAL_WARN_EVERY) {
            return false;
        }
        self.last_warned = Some(now);
        true
    }

    fn note(&mut self, refusal: Refusal, remote: SocketAddr, limits: &ConnectionLimits) {
        if refusal == Refusal::Gone || !self.due() {
            return;
        }
        let refused = std::mem::take(&mut self.unreported);
        match refusal {
            Refusal::PerClient => tracing::warn!(
                %remote, refused, limit = limits.max_connections_per_ip,
                "refusing connections: too many from one address (--max-connections-per-ip; raise it when many \
                 agents or clients share an address, e.g. behind NAT)"
            ),
            Refusal::Total => tracing::warn!(
                %remote, refused, limit = limits.max_connections,
                "refusing connections: the controller holds --max-connections connections"
            ),
            Refusal::Gone => {}
        }
    }

    fn out_of_resources(&mut self, e: &io::Error) {
        if self.due() {
            let failures = std::mem::take(&mut self.unreported);
            tracing::warn!(error = %e, failures, pause = ?ACCEPT_PAUSE, "cannot accept connections: out of file descriptors or memory");
        }
    }
}

/// An admitted connection: the TCP stream, closed by a timed-out read or
/// write once the connection has been without a call for too long.
#[derive(Debug)]
pub struct ConnIo {
    stream: TcpStream,
    info: TcpConnectInfo,
    client: IpAddr,
    state: Arc<ConnState>,
    connections: Connections,
    accepted: Instant,
    /// Fires at or before the connection's deadline, which is then
    /// re-evaluated: it moves while calls open and close.
    timer: Pin<Box<Sleep>>,
    last_read: Option<Instant>,
    /// The deadline a grace period was given for (one per deadline).
    extended_for: Option<Instant>,
    expired: bool,
}

impl ConnIo {
    /// The deadline now, `None` while a call is open.
    fn deadline(&self) -> Option<(Instant, Phase)> {
        let limits = &self.connections.shared.limits;
        let calls = self.state.calls();
        if calls.open > 0 {
            return None;
        }
        Some(match calls.idle_since {
            None => (self.accepted + limits.handshake_timeout, Phase::Handshake),
            Some(since) => (since + limits.idle_timeout, Phase::Idle),
        })
    }

    /// Re-arms the timer for the current deadline, or marks the connection
    /// expired when it has passed.
    fn evaluate(&mut self, now: Instant) {
        let limits = &self.connections.shared.limits;
        match self.deadline() {
            // A call is open: look again in a while (cheap; the deadline
            // only starts when the last call closes).
            None => self.timer.as_mut().reset(now + limits.idle_timeout),
            Some((deadline, _)) if now < deadline => self.timer.as_mut().reset(deadline),
            Some((deadline, _))
                if self.last_read.is_some_and(|t| now.saturating_duration_since(t) < READ_GRACE)
                    && self.extended_for != Some(deadline) =>
            {
                self.extended_for = Some(deadline);
                self.timer.as_mut().reset(now + READ_GRACE);
            }
            Some((_, phase)) => {
                self.expired = true;
                match phase {
                    Phase::Handshake => {
                        tracing::debug!(remote = self.info.remote_addr.map(tracing::field::display),
                            timeout = ?limits.handshake_timeout,
                        "closing a connection that opened no call in time (--handshake-timeout)")
                    }
                    Phase::Idle => tracing::debug!(remote = self.info.remote_addr.map(tracing::field::display),
                        timeout = ?limits.idle_timeout,
                        "closing an idle connection (--idle-timeout)"),
                }
            }
        }
    }

    /// Ready with the error to return once the connection has expired;
    /// otherwise pending, woken by the timer.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            if self.expired {
                return Poll::Ready(timed_out());
            }
            ready!(self.timer.as_mut().poll(cx));
            self.evaluate(Instant::now());
        }
    }

    /// After a read that returned data: a peer that never stops sending
    /// still meets its deadline.
    fn note_read(&mut self) {
        let now = Instant::now();
        self.last_read = Some(now);
        if now >= self.timer.deadline() {
            self.evaluate(now);
        }
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connection closed: no call within the handshake or idle timeout")
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        if let (Some(local), Some(remote)) = (self.info.local_addr, self.info.remote_addr) {
            self.connections.release((local, remote), self.client, &self.state);
        }
    }
}

impl Connected for ConnIo {
    /// tonic's own type, so `Request::remote_addr` and (under TLS, inside
    /// `TlsConnectInfo`) `Request::peer_certs` work unchanged.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(Err(timed_out()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.note_read();
                }
                Poll::Ready(result)
            }
            Poll::Pending => this.poll_expired(cx).map(Err),
        }
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(Err(timed_out()));
        }
        match Pin::new(&mut this.stream).poll_write(cx, buf) {
            Poll::Pending => this.poll_expired(cx).map(Err),
            ready => ready,
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(Err(timed_out()));
        }
        match Pin::new(&mut this.stream).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.poll_expired(cx).map(Err),
            ready => ready,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(Err(timed_out()));
        }
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Counts the calls open on each connection (see the module docs).
#[derive(Clone, Debug)]
pub struct StreamTracking {
    connections: Connections,
}

impl<S> tower::Layer<S> for StreamTracking {
    type Service = TrackStreams<S>;

    fn layer(&self, inner: S) -> TrackStreams<S> {
        TrackStreams { inner, connections: self.connections.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct TrackStreams<S> {
    inner: S,
    connections: Connections,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for TrackStreams<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<TrackedBody>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        // Counted from now, before the handler runs: the call holds the
        // connection open from its first byte to its last.
        let guard = match request.extensions().get::<TcpConnectInfo>() {
            Some(info) => self.connections.find(info).map(CallGuard::open),
            None => None,
        };
        if guard.is_none() {
            tracing::debug!("a call on a connection this server did not admit: not counted");
        }
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| TrackedBody { inner: tonic::body::Body::new(body), _guard: guard }))
        })
    }
}

/// Holds its call open on the connection until dropped.
#[derive(Debug)]
struct CallGuard(Arc<ConnState>);

impl CallGuard {
    fn open(state: Arc<ConnState>) -> Self {
        state.call_opened();
        Self(state)
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.call_closed();
    }
}

/// A response body that keeps its call counted until hyper drops it: after
/// the last frame of a unary call, when a stream ends, or when the client
/// resets it.
#[derive(Debug)]
pub struct TrackedBody {
    inner: tonic::body::Body,
    _guard: Option<CallGuard>,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_addresses_and_ipv6_slash_64s() {
        let key = |s: &str| client_key(s.parse().unwrap());
        assert_eq!(key("192.0.2.7"), key("::ffff:192.0.2.7"), "IPv4-mapped counts as IPv4");
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"), "one /64");
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }

    #[test]
    fn limits_are_validated_naming_the_flag() {
        assert!(ConnectionLimits::default().validate().is_ok());
        let bad = |f: fn(&mut ConnectionLimits)| {
            let mut l = ConnectionLimits::default();
            f(&mut l);
            l.validate().unwrap_err()
        };
        assert!(bad(|l| l.max_connections = 0).contains("--max-connections "));
        assert!(bad(|l| l.max_connections_per_ip = 0).contains("--max-connections-per-ip"));
        assert!(bad(|l| l.handshake_timeout = Duration::ZERO).contains("--handshake-timeout"));
        assert!(bad(|l| l.idle_timeout = Duration::ZERO).contains("--idle-timeout"));
    }

    async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream, SocketAddr) {
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, remote) = listener.accept().await.unwrap();
        (client, server, remote)
    }

    #[tokio::test]
    async fn admission_counts_per_client_and_in_total_and_releases_on_drop() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let limits = ConnectionLimits { max_connections: 3, max_connections_per_ip: 2, ..Default::default() };
        let conns = Connections::new(limits);
        let (_c1, s1, r1) = pair(&listener).await;
        let a = conns.admit(s1, r1).unwrap();
        let (_c2, s2, r2) = pair(&listener).await;
        let b = conns.admit(s2, r2).unwrap();
        let (_c3, s3, r3) = pair(&listener).await;
        assert_eq!(conns.admit(s3, r3).unwrap_err(), Refusal::PerClient);
        // Another client address counts against the total only.
        let other: SocketAddr = "127.0.0.2:40000".parse().unwrap();
        let (_c4, s4, _) = pair(&listener).await;
        let c = conns.admit(s4, other).unwrap();
        let (_c5, s5, _) = pair(&listener).await;
        assert_eq!(conns.admit(s5, "127.0.0.3:40000".parse().unwrap()).unwrap_err(), Refusal::Total);
        assert_eq!(conns.open(), 3);
        // The state is found by the addresses tonic reports.
        assert!(conns.find(&a.connect_info()).is_some_and(|s| Arc::ptr_eq(&s, &a.state)));
        drop(a);
        assert_eq!(conns.open(), 2);
        let (_c6, s6, r6) = pair(&listener).await;
        let d = conns.admit(s6, r6).unwrap();
        drop((b, c, d));
        assert_eq!(conns.open(), 0);
        assert!(conns.table().per_client.is_empty() && conns.table().by_addr.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_open_calls() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let limits = ConnectionLimits {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            ..Default::default()
        };
        let conns = Connections::new(limits);
        let (_client, server, remote) = pair(&listener).await;
        let io = conns.admit(server, remote).unwrap();
        let accepted = io.accepted;
        assert!(matches!(io.deadline(), Some((d, Phase::Handshake)) if d == accepted + Duration::from_secs(10)));
        let call = CallGuard::open(io.state.clone());
        assert!(io.deadline().is_none(), "no deadline while a call is open");
        tokio::time::advance(Duration::from_secs(3600)).await;
        drop(call);
        let closed = Instant::now();
        assert!(matches!(io.deadline(), Some((d, Phase::Idle)) if d == closed + Duration::from_secs(300)));
    }
}
