//! A future that is only polled again once it asked to be.
//!
//! The session loop re-polls every branch of its `select!` on every turn —
//! twice per query. Waits that almost never end (shutdown, a group change)
//! register with a channel all sessions share each time they are polled;
//! behind a gate they cost two atomic operations instead.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Wraps a future; polls it only when its own waker has fired since the
/// last poll (and on the first poll).
pub struct Gated<F> {
    fut: Pin<Box<F>>,
    signal: Arc<Signal>,
    waker: Waker,
    /// The outer waker last registered (a session's task keeps one waker,
    /// so registering again is skipped until a wake consumes it).
    registered: Option<Waker>,
}

struct Signal {
    woken: AtomicBool,
    outer: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.outer.wake();
    }
}

impl<F: Future> Gated<F> {
    pub fn new(fut: F) -> Self {
        let signal = Arc::new(Signal {
            woken: AtomicBool::new(true),
            outer: AtomicWaker::new(),
        });
        Gated {
            fut: Box::pin(fut),
            waker: Waker::from(signal.clone()),
            signal,
            registered: None,
        }
    }

    /// Replaces the future (polled on the next poll).
    pub fn set(&mut self, fut: F) {
        self.fut.set(fut);
        self.signal.woken.store(true, Ordering::Release);
    }
}

impl<F: Future> Future for Gated<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        // Registered before the flag is read: a wake in between is not lost.
        // A wake takes the registered waker and sets the flag, so while the
        // flag is clear the same waker is still registered.
        if !this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            this.signal.outer.register(cx.waker());
            this.registered = Some(cx.waker().clone());
        }
        if !this.signal.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        // Woken: the waker was taken; register it for the next wake.
        this.signal.outer.register(cx.waker());
        let mut inner = Context::from_waker(&this.waker);
        this.fut.as_mut().poll(&mut inner)
    }
}

impl<F> Unpin for Gated<F> {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready once `ready` is set and it was woken.
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.ready.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn the_inner_future_is_polled_once_until_it_wakes_and_then_completes() {
        let polls = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let waker = Arc::new(std::sync::Mutex::new(None::<Waker>));
        let mut gated = Gated::new(Probe {
            polls: polls.clone(),
            ready: ready.clone(),
            waker: waker.clone(),
        });
        for _ in 0..10 {
            assert!(futures_util::poll!(&mut gated).is_pending());
        }
        assert_eq!(
            polls.load(Ordering::SeqCst),
            1,
            "polled only before any wake"
        );

        // Waking from another task wakes the outer task and lets one poll through.
        ready.store(true, Ordering::SeqCst);
        let w = waker.lock().unwrap().take().expect("registered");
        tokio::spawn(async move { w.wake() }).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), &mut gated)
            .await
            .expect("woken and ready");
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    /// Counts the wakes of the outer task.
    struct Outer(AtomicUsize);
    impl Wake for Outer {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn every_wake_reaches_the_outer_task() {
        let polls = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let inner = Arc::new(std::sync::Mutex::new(None::<Waker>));
        let mut gated = Gated::new(Probe {
            polls: polls.clone(),
            ready,
            waker: inner.clone(),
        });
        let outer = Arc::new(Outer(AtomicUsize::new(0)));
        let waker = Waker::from(outer.clone());
        let mut cx = Context::from_waker(&waker);
        for round in 1..=3 {
            assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
            assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
            assert_eq!(
                polls.load(Ordering::SeqCst),
                round,
                "one inner poll per wake"
            );
            inner.lock().unwrap().take().expect("registered").wake();
            assert_eq!(
                outer.0.load(Ordering::SeqCst),
                round,
                "wake {round} reached the task"
            );
        }
    }

    #[tokio::test]
    async fn a_replaced_future_is_polled() {
        let polls = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let waker = Arc::new(std::sync::Mutex::new(None::<Waker>));
        let probe = || Probe {
            polls: polls.clone(),
            ready: ready.clone(),
            waker: waker.clone(),
        };
        let mut gated = Gated::new(probe());
        assert!(futures_util::poll!(&mut gated).is_pending());
        gated.set(probe());
        ready.store(true, Ordering::SeqCst);
        assert!(futures_util::poll!(&mut gated).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }
}
