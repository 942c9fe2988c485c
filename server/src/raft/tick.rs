//! The storage core's raft clock, kept off its reactor.
//!
//! A small thread marks a tick due every heartbeat and wakes the core's loop, which polls
//! [`Ticks`] beside its commands. A glommio timer would do the same, but glommio arms an
//! io_uring timeout each time the executor sleeps with a timer pending and cancels it when it
//! wakes: two submissions and two `io_uring_enter` calls per sleep, which under load is
//! thousands a second for a tick ten times a second (bench/RESULTS.md, 2026-11-27).
//!
//! Ticks do not queue up: a loop that falls behind sees one due tick, as with a timer, and the
//! loop never waits on anything but its own events (a slow fdatasync cannot hold a tick back).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;

struct Inner {
    due: AtomicBool,
    stop: AtomicBool,
    waker: AtomicWaker,
}

/// The tick source of one loop; the thread ends when this is dropped.
pub struct Ticks {
    inner: Arc<Inner>,
    thread: std::thread::Thread,
}

impl Ticks {
    /// Starts the clock thread: the first tick is due one `period` from now. Started before the
    /// storage core pins its thread, so the clock is not pinned to the core's CPU.
    pub fn start(period: Duration) -> std::io::Result<Ticks> {
        let inner = Arc::new(Inner {
            due: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        let clock = inner.clone();
        let handle = std::thread::Builder::new()
            .name("keel-tick".into())
            .stack_size(64 << 10)
            .spawn(move || {
                let mut next = Instant::now() + period;
                while !clock.stop.load(Ordering::Acquire) {
                    let now = Instant::now();
                    if now < next {
                        // Woken early only by the drop of `Ticks` (or spuriously).
                        std::thread::park_timeout(next - now);
                        continue;
                    }
                    // Fixed deadlines, not sleeps: the period does not drift. After a stall
                    // (a stopped VM, say), the next tick is one period from now.
                    next = (next + period).max(now);
                    clock.due.store(true, Ordering::Release);
                    clock.waker.wake();
                }
            })?;
        Ok(Ticks {
            inner,
            thread: handle.thread().clone(),
        })
    }

    /// Ready once per due tick.
    pub fn poll_tick(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.inner.waker.register(cx.waker());
        if self.inner.due.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Ticks {
    fn drop(&mut self) {
        // The loop's waker is dropped here, on the loop's thread, not later on the clock's.
        drop(self.inner.waker.take());
        self.inner.stop.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_come_and_the_thread_ends_with_its_handle() {
        let ticks = Ticks::start(Duration::from_millis(1)).unwrap();
        let mut seen = 0;
        futures::executor::block_on(std::future::poll_fn(|cx| {
            if ticks.poll_tick(cx).is_ready() {
                seen += 1;
            }
            if seen == 3 {
                Poll::Ready(())
            } else {
                // Re-polled by the waker the clock thread wakes.
                Poll::Pending
            }
        }));
        assert_eq!(seen, 3);
        // The thread ends with its handle: then only this test holds the shared state.
        let inner = ticks.inner.clone();
        drop(ticks);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&inner) > 1 {
            assert!(Instant::now() < deadline, "the clock thread did not end");
            std::thread::sleep(Duration::from_millis(1));
        }
        // A due tick is taken once.
        inner.due.store(true, Ordering::Release);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let t = Ticks {
            inner,
            thread: std::thread::current(),
        };
        assert!(t.poll_tick(&mut cx).is_ready());
        assert!(t.poll_tick(&mut cx).is_pending());
    }
}
