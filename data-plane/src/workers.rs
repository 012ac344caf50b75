//! The proxy's connection threads (`--worker-threads`): one single-threaded tokio runtime per
//! thread, each serving whole connections.
//!
//! On a shared multi-threaded runtime a request hops between threads: the caller's connection is
//! polled on one worker, the upstream connection's task on another, and every hand-off is a
//! futex wake-up and a context switch, several per request, which on a virtual machine cost more
//! than the proxy's own work. Here a connection is handed to one thread once, when it is
//! accepted, and everything its requests do stays there: the caller's connection, the upstream
//! connections (each thread has its own pool: [`current`] keys it in the upstream client), the
//! race's tasks, the answer's body. Nothing a request does waits for another thread except what
//! is shared on purpose (the usage sink's queue, the limiter, the snapshot), none of which wakes
//! a thread per request.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The connection thread this code runs on, from 1; 0 off them (the main runtime).
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// Running connection threads; dropping this stops them (and drops what still runs on them).
pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Dropped with `self`: each thread's runtime returns from `block_on` and shuts down.
    _stop: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// Starts `n` (at least 1) threads named `{name}-{i}`.
    pub fn start(n: usize, name: &str) -> std::io::Result<Self> {
        let n = n.max(1);
        let mut handles = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        for i in 1..=n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            stops.push(stop);
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(i));
                    // Ends when `Workers` is dropped (the sender with it).
                    let _ = rt.block_on(stopped);
                })?;
        }
        Ok(Self {
            handles,
            next: AtomicUsize::new(0),
            _stop: stops,
        })
    }

    /// How many threads there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Serves `stream` with `serve` on the next thread (round robin). The stream moves to that
    /// thread's runtime; a stream that cannot (it was closed meanwhile) is dropped.
    pub fn spawn<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        let Ok(std) = stream.into_std() else {
            return;
        };
        self.handles[i].spawn(async move {
            match TcpStream::from_std(std) {
                Ok(stream) => serve(stream).await,
                Err(e) => tracing::debug!(error = %e, "a connection could not move to its thread"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_are_served_on_the_workers_in_turn() {
        let workers = Workers::start(2, "test-worker").unwrap();
        assert_eq!(workers.len(), 2);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..4 {
            let _client = TcpStream::connect(addr).await.unwrap();
            let (stream, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            workers.spawn(stream, move |s| async move {
                let name = std::thread::current().name().map(str::to_string);
                let _ = tx.send((current(), name, s.peer_addr().is_ok()));
            });
        }
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(rx.recv().await.unwrap());
        }
        seen.sort();
        let ids: Vec<usize> = seen.iter().map(|s| s.0).collect();
        assert_eq!(ids, vec![1, 1, 2, 2]);
        assert!(
            seen.iter().all(|s| s.2),
            "the stream is usable on its worker"
        );
        assert!(seen.iter().all(|s| s
            .1
            .as_deref()
            .is_some_and(|n| n.starts_with("test-worker-"))));
        assert_eq!(current(), 0, "the test's own thread is no worker");
    }
}
