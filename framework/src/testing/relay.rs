//! A TCP relay to the suite's broker that the tests point a service at instead of the
//! broker itself, to give it the network faults no broker command makes: a network that
//! stops answering, a node gone with its host.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::amqp_url;

/// What the network between the service and the broker does.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Network {
    /// Relays both ways.
    Up,
    /// Relays nothing more and closes nothing: frames neither delivered nor refused.
    Frozen,
    /// The connections numbered below this (relayed before it) frozen, later ones relayed:
    /// a path that went silent while a new one, to the same place, works.
    FrozenBelow(usize),
    /// The host is gone: every relayed connection cut, later ones accepted and never
    /// answered (a host gone mid-route, whose SYNs something still answers).
    HostLost,
    /// The node is down on a host that is up: every connection cut, later ones closed at
    /// once (refused).
    Refusing,
    /// The connections numbered below this cut, later ones relayed: a connection lost
    /// (a network blip, a broker closing it) to a node that takes the next one.
    CutBelow(usize),
}

/// A relay to the suite's broker (see the module's doc). Dropped, it closes every
/// connection.
pub struct Relay {
    /// The server's URL with the relay's port: what the service is given.
    pub url: String,
    connections: Arc<AtomicUsize>,
    /// When each connection came (relayed or not).
    attempts: Arc<std::sync::Mutex<Vec<std::time::Instant>>>,
    network: watch::Sender<Network>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Listens on a free port and relays every connection to the suite's broker.
    pub async fn start() -> Relay {
        Relay::start_to(&amqp_url(), 5672).await
    }

    /// Listens on a free port and relays every connection to the server of `server_url`
    /// (`default_port` where it names none); [`Relay::url`] is `server_url` with the
    /// relay's port.
    pub async fn start_to(server_url: &str, default_port: u16) -> Relay {
        let server = url::Url::parse(server_url).expect("server URL");
        let upstream = format!(
            "{}:{}",
            server.host_str().unwrap_or("127.0.0.1"),
            server.port().unwrap_or(default_port)
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut url = server.clone();
        let _ = url.set_port(Some(listener.local_addr().expect("addr").port()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (network, rx) = watch::channel(Network::Up);
        let counted = connections.clone();
        let attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let arrived = attempts.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            let mut unanswered = Vec::new();
            while let Ok((client, _)) = listener.accept().await {
                arrived
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(std::time::Instant::now());
                match *rx.borrow() {
                    Network::HostLost => {
                        unanswered.push(client);
                        continue;
                    }
                    Network::Refusing => continue,
                    Network::Up
                    | Network::Frozen
                    | Network::FrozenBelow(_)
                    | Network::CutBelow(_) => {}
                }
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let number = counted.fetch_add(1, Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                conns.spawn(pump(number, cr, sw, rx.clone()));
                conns.spawn(pump(number, sr, cw, rx.clone()));
            }
        });
        Relay {
            url: url.to_string(),
            connections,
            attempts,
            network,
            task,
        }
    }

    /// Connections relayed to the broker so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Stops relaying, for good, closing nothing.
    pub fn freeze(&self) {
        let _ = self.network.send(Network::Frozen);
    }

    /// Stops relaying on the connections made so far, for good, closing nothing; later
    /// connections are relayed.
    pub fn freeze_existing(&self) {
        let _ = self.network.send(Network::FrozenBelow(self.connections()));
    }

    /// Cuts every connection relayed so far; later ones are relayed.
    pub fn cut_existing(&self) {
        let _ = self.network.send(Network::CutBelow(self.connections()));
    }

    /// Cuts every relayed connection; later ones are accepted and never answered.
    pub fn lose_host(&self) {
        let _ = self.network.send(Network::HostLost);
    }

    /// Cuts every relayed connection; later ones are closed at once.
    pub fn refuse(&self) {
        let _ = self.network.send(Network::Refusing);
    }

    /// When each connection to the relay came, relayed or not.
    pub fn attempts(&self) -> Vec<std::time::Instant> {
        self.attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether connection `number` relays on `network`: `Some(false)` frozen, `None` cut.
fn relays(network: Network, number: usize) -> Option<bool> {
    match network {
        Network::Up => Some(true),
        Network::Frozen => Some(false),
        Network::FrozenBelow(n) => Some(number >= n),
        Network::CutBelow(n) => (number >= n).then_some(true),
        Network::HostLost | Network::Refusing => None,
    }
}

/// Copies `from` to `to` (connection `number`) until either ends or the host is lost;
/// once frozen, nothing more.
async fn pump(
    number: usize,
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut network: watch::Receiver<Network>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let state = *network.borrow_and_update();
        match relays(state, number) {
            Some(true) => {}
            Some(false) => return std::future::pending().await,
            None => return,
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = network.changed() => continue,
        };
        // Read before the fault, relayed after it: not on a network that failed meanwhile.
        if relays(*network.borrow(), number) != Some(true) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
