//! A TCP proxy for one directed link between two nodes, which a test can cut and heal.
//!
//! Node A reaches node B only through the proxy of link A→B, so cutting it is a network
//! failure between them as A sees it: `cut` resets every connection and refuses new ones,
//! `blackhole` keeps connections open but silently drops everything (a partition that only
//! timeouts and keepalives can detect), `heal` lets traffic through again. `throttle` limits
//! the bytes per second the link carries in each direction (a slow link).

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const OPEN: u8 = 0;
const RESET: u8 = 1;
const BLACKHOLE: u8 = 2;

struct Shared {
    mode: AtomicU8,
    stop: AtomicBool,
    /// Every open connection end by id, so a cut can close them at once.
    streams: Mutex<HashMap<u64, TcpStream>>,
    next_id: AtomicU64,
    /// Bytes forwarded, to let tests see traffic flow.
    forwarded: AtomicU64,
    /// Bytes per second each direction of each connection may carry; 0 is unlimited.
    rate: AtomicU64,
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    /// The port the proxy listens on (127.0.0.1).
    pub port: u16,
    /// The port it forwards to.
    pub target_port: u16,
    shared: Arc<Shared>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl Proxy {
    /// Starts a proxy on a free port forwarding to `127.0.0.1:target_port`.
    pub fn start(target_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy can bind a port");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let port = listener.local_addr().expect("bound address").port();
        let shared = Arc::new(Shared {
            mode: AtomicU8::new(OPEN),
            stop: AtomicBool::new(false),
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            rate: AtomicU64::new(0),
        });
        let s = shared.clone();
        let acceptor = thread::spawn(move || accept_loop(listener, target_port, s));
        Proxy { port, target_port, shared, acceptor: Some(acceptor) }
    }

    /// Resets every connection through the link and refuses new ones until `heal`.
    pub fn cut(&self) {
        self.shared.mode.store(RESET, Ordering::SeqCst);
        self.close_all();
    }

    /// Drops all traffic on the link without closing anything, until `heal`.
    pub fn blackhole(&self) {
        self.shared.mode.store(BLACKHOLE, Ordering::SeqCst);
    }

    /// Lets traffic through again. Connections that lived through a blackhole are closed, as a
    /// real peer would have given up on them.
    pub fn heal(&self) {
        let was = self.shared.mode.swap(OPEN, Ordering::SeqCst);
        if was == BLACKHOLE {
            self.close_all();
        }
    }

    /// Limits each direction of each connection through the link to `bytes_per_second`
    /// (0: unlimited again). Applies to connections already open too.
    pub fn throttle(&self, bytes_per_second: u64) {
        self.shared.rate.store(bytes_per_second, Ordering::SeqCst);
    }

    /// True while the link is cut or blackholed.
    pub fn is_down(&self) -> bool {
        self.shared.mode.load(Ordering::SeqCst) != OPEN
    }

    /// Bytes forwarded so far in both directions.
    pub fn bytes_forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::Relaxed)
    }

    fn close_all(&self) {
        let mut streams = self.shared.streams.lock().unwrap_or_else(|e| e.into_inner());
        for (_, s) in streams.drain() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.close_all();
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, target_port: u16, shared: Arc<Shared>) {
    let target: SocketAddr = ([127, 0, 0, 1], target_port).into();
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                let _ = client.set_nonblocking(false);
                match shared.mode.load(Ordering::SeqCst) {
                    RESET => {
                        let _ = client.shutdown(Shutdown::Both);
                    }
                    BLACKHOLE => hold_silently(client, shared.clone()),
                    _ => connect_through(client, target, shared.clone()),
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Remembers a connection end so a cut can close it; returns the id to forget it by.
fn register(shared: &Shared, stream: &TcpStream) -> u64 {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    if let Ok(clone) = stream.try_clone() {
        shared.streams.lock().unwrap_or_else(|e| e.into_inner()).insert(id, clone);
    }
    id
}

fn forget(shared: &Shared, ids: &[u64]) {
    let mut streams = shared.streams.lock().unwrap_or_else(|e| e.into_inner());
    for id in ids {
        streams.remove(id);
    }
}

fn hold_silently(client: TcpStream, shared: Arc<Shared>) {
    let id = register(&shared, &client);
    thread::spawn(move || {
        let ids = [id];
        let mut client = client;
        let _ = client.set_read_timeout(Some(Duration::from_millis(50)));
        let mut buf = [0u8; 8192];
        loop {
            if shared.stop.load(Ordering::SeqCst) || shared.mode.load(Ordering::SeqCst) == OPEN {
                break;
            }
            match client.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
        let _ = client.shutdown(Shutdown::Both);
        forget(&shared, &ids);
    });
}

fn connect_through(client: TcpStream, target: SocketAddr, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let ids = [register(&shared, &client), register(&shared, &server)];
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        forget(&shared, &ids);
        return;
    };
    let sh = shared.clone();
    thread::spawn(move || pump(client, server, sh, ids));
    thread::spawn(move || pump(s2, c2, shared, ids));
}

/// Copies `from` to `to` while the link is open, drops data while it is blackholed, and
/// closes both on a cut, end of stream or error.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: Arc<Shared>, ids: [u64; 2]) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = [0u8; 32 * 1024];
    // Throttling: bytes sent since `since`, paced so they never run ahead of the rate.
    let mut since = Instant::now();
    let mut sent = 0u64;
    loop {
        if shared.stop.load(Ordering::SeqCst) || shared.mode.load(Ordering::SeqCst) == RESET {
            break;
        }
        let rate = shared.rate.load(Ordering::SeqCst);
        let want = if rate == 0 {
            since = Instant::now();
            sent = 0;
            buf.len()
        } else {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            let elapsed = since.elapsed();
            if elapsed < due {
                thread::sleep((due - elapsed).min(Duration::from_millis(50)));
                continue;
            }
            if elapsed > due + Duration::from_secs(1) {
                // Idle for a while: no burst to make up for it.
                since = Instant::now();
                sent = 0;
            }
            (rate / 20).clamp(1, buf.len() as u64) as usize
        };
        match from.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => {
                if shared.mode.load(Ordering::SeqCst) == BLACKHOLE {
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                sent += n as u64;
                shared.forwarded.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
    forget(&shared, &ids);
}
