//! The storage core's executor with the vendored glommio's preemption-timer change
//! (third_party/glommio/KEEL-PATCH.md): a timer still armed is kept across turns of the executor's
//! loop instead of being cancelled and armed again. These check what that must not break: a busy
//! task queue is still preempted, again after every preemption and after turns that kept the timer,
//! and a parked executor still wakes for its own timers and for wakes from other threads.

use std::time::{Duration, Instant};

fn executor() -> glommio::LocalExecutor {
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .preempt_timer(Duration::from_millis(2))
        .make()
        .unwrap()
}

/// Spins until the executor asks the running task to yield.
fn spin_until_preempted() {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !glommio::executor().need_preempt() {
        assert!(
            Instant::now() < deadline,
            "the preemption timer never fired"
        );
        std::hint::spin_loop();
    }
}

#[test]
fn a_busy_task_queue_is_preempted_after_every_turn() {
    executor().run(async {
        for round in 0..20 {
            // Turns of the loop that find the timer armed and keep it.
            for _ in 0..round {
                glommio::executor().yield_now().await;
            }
            spin_until_preempted();
            glommio::executor().yield_if_needed().await;
        }
    });
}

#[test]
fn a_parked_executor_wakes_for_its_timers_and_for_other_threads() {
    executor().run(async {
        for _ in 0..5 {
            // Parks with a user timer armed in place of the preemption timer.
            glommio::timer::sleep(Duration::from_millis(3)).await;
            // Busy again: a preemption timer is armed anew and fires.
            spin_until_preempted();
            glommio::executor().yield_if_needed().await;
            // Parks with no timer: only the other thread's wake brings it back.
            let (tx, rx) = futures::channel::oneshot::channel();
            let thread = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(5));
                tx.send(()).unwrap();
            });
            rx.await.unwrap();
            thread.join().unwrap();
        }
    });
}
