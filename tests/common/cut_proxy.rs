//! A TCP proxy between the daemon and its broker that a test can cut and heal, and that records
//! what it handed to the daemon: an outage a test controls exactly, with no timing to guess.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub struct CutProxy {
    pub port: u16,
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    up: AtomicBool,
    /// Every byte written to the daemon's side, in order (a test's traffic is small).
    to_client: (Mutex<Vec<u8>>, Condvar),
    /// (daemon side, broker side) of every live connection, to cut them.
    open: Mutex<Vec<(TcpStream, TcpStream)>>,
}

impl CutProxy {
    /// Listens on a free loopback port and forwards each connection to `upstream`.
    pub fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        state.up.store(true, Ordering::SeqCst);
        let st = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !st.up.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection close at once
                }
                let Ok(broker) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                {
                    let mut open = st.open.lock().unwrap();
                    open.push((client.try_clone().unwrap(), broker.try_clone().unwrap()));
                }
                let (c2, b2) = (client.try_clone().unwrap(), broker.try_clone().unwrap());
                let st1 = st.clone();
                std::thread::spawn(move || pump(c2, b2, st1, false));
                let st2 = st.clone();
                std::thread::spawn(move || pump(broker, client, st2, true));
            }
        });
        Self { port, state }
    }

    /// The broker loses the connection; the daemon does not notice yet: what it writes is read
    /// and dropped. New connections are refused until `heal`.
    pub fn sever_broker(&self) {
        self.state.up.store(false, Ordering::SeqCst);
        for (_, broker) in self.state.open.lock().unwrap().iter() {
            let _ = broker.shutdown(Shutdown::Both);
        }
    }

    /// Ends every connection and refuses new ones until `heal`. The daemon's side only gets
    /// the end of the stream, never a reset: it reads all it was sent before the end.
    pub fn cut(&self) {
        self.state.up.store(false, Ordering::SeqCst);
        for (client, broker) in self.state.open.lock().unwrap().drain(..) {
            let _ = client.shutdown(Shutdown::Write);
            let _ = broker.shutdown(Shutdown::Both);
        }
    }

    pub fn heal(&self) {
        self.state.up.store(true, Ordering::SeqCst);
    }

    /// Waits until `needle` has been written to the daemon's side of a connection.
    pub fn wait_sent_to_client(&self, needle: &[u8], within: Duration) {
        let deadline = Instant::now() + within;
        let (sent, changed) = &self.state.to_client;
        let mut sent = sent.lock().unwrap();
        while !sent.windows(needle.len()).any(|w| w == needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the proxy did not hand {:?} to the daemon within {within:?}",
                String::from_utf8_lossy(needle)
            );
            sent = changed.wait_timeout(sent, left).unwrap().0;
        }
    }
}

/// Copies `from` into `to` until `from` ends, then ends `to` unless the proxy is cut (`cut`
/// decides what the daemon sees). Once `to` is gone what `from` sends is read and dropped, so
/// that `from` never sees a reset before it has read everything. `record`: `to` is the daemon.
fn pump(mut from: TcpStream, mut to: TcpStream, st: Arc<State>, record: bool) {
    let mut buf = [0u8; 16 << 10];
    let mut to_open = true;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !to_open {
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            to_open = false;
            continue;
        }
        if record {
            st.to_client.0.lock().unwrap().extend_from_slice(&buf[..n]);
            st.to_client.1.notify_all();
        }
    }
    if st.up.load(Ordering::SeqCst) {
        let _ = to.shutdown(Shutdown::Write);
    }
}
