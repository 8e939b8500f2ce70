//! A TCP proxy whose path can be cut and restored: a real network outage
//! between a component and its database or broker, without touching the
//! shared server.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct TcpProxy {
    addr: SocketAddr,
    /// Cancelled on cut: ends every connection of the current generation.
    generation: Arc<Mutex<Option<CancellationToken>>>,
    stop: CancellationToken,
}

impl TcpProxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let generation = Arc::new(Mutex::new(Some(CancellationToken::new())));
        let stop = CancellationToken::new();
        let (gen2, stop2) = (generation.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = stop2.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let token = gen2.lock().expect("proxy lock").clone();
                // While cut, new connections hang unanswered, as across a
                // network partition, until the proxy is dropped.
                let Some(token) = token else {
                    let stop = stop2.clone();
                    tokio::spawn(async move {
                        stop.cancelled().await;
                        drop(client);
                    });
                    continue;
                };
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
                    let mut client = client;
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        Self { addr, generation, stop }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every proxied connection; new ones hang unanswered.
    pub fn cut(&self) {
        if let Some(token) = self.generation.lock().expect("proxy lock").take() {
            token.cancel();
        }
    }

    pub fn restore(&self) {
        let mut generation = self.generation.lock().expect("proxy lock");
        if generation.is_none() {
            *generation = Some(CancellationToken::new());
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.stop.cancel();
    }
}
