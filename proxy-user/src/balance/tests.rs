//! Unit tests of machine choice: bands, limits, the queue, retries and health.

use super::*;

fn pool(n: usize, soft: Option<u32>, hard: Option<u32>, limit: usize, wait_ms: u64) -> Arc<Pool> {
    let machines = (0..n)
        .map(|i| {
            (
                format!("m{i}"),
                SocketAddr::from(([10, 0, 0, i as u8 + 1], 80)),
            )
        })
        .collect();
    Arc::new(Pool::new(
        "services[0]".to_owned(),
        machines,
        soft,
        hard,
        QueuePolicy {
            limit,
            max_wait: Duration::from_millis(wait_ms),
        },
    ))
}

fn active(p: &Pool) -> Vec<u64> {
    p.machines
        .iter()
        .map(|m| m.active.load(Ordering::Relaxed))
        .collect()
}

#[tokio::test]
async fn least_loaded_within_bands() {
    let p = pool(3, Some(2), Some(4), 8, 50);
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(p.acquire().await.expect("a slot"));
    }
    assert_eq!(active(&p), vec![2, 2, 2], "soft limits fill evenly");
    held.push(p.acquire().await.expect("a slot above soft"));
    assert_eq!(active(&p).iter().sum::<u64>(), 7);
    // Freeing a slot on m0 makes it the only machine under its soft limit.
    held.retain(|l| l.index() != 0);
    let l = p.acquire().await.expect("a slot");
    assert_eq!(
        l.index(),
        0,
        "the machine under its soft limit is preferred"
    );
}

#[tokio::test]
async fn ties_are_broken_at_random() {
    let p = pool(3, None, None, 8, 50);
    let mut seen = [0u32; 3];
    for _ in 0..300 {
        let l = p.acquire().await.expect("a slot");
        seen[l.index()] += 1;
    }
    assert!(
        seen.iter().all(|&n| n > 50),
        "uneven choice among idle machines: {seen:?}"
    );
}

#[tokio::test]
async fn hard_limit_queues_in_arrival_order() {
    let p = pool(1, None, Some(1), 8, 5_000);
    let first = p.acquire().await.expect("a slot");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..3 {
        let pool = Arc::clone(&p);
        let tx = tx.clone();
        tokio::spawn(async move {
            let lease = pool.acquire().await.expect("a slot after waiting");
            tx.send(i).expect("test listens");
            tokio::time::sleep(Duration::from_millis(5)).await;
            drop(lease);
        });
        // Let each waiter queue before the next.
        while p.stats.queued.load(Ordering::Relaxed) < i + 1 {
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(active(&p), vec![1]);
    drop(first);
    let order: Vec<u64> = vec![
        rx.recv().await.expect("first"),
        rx.recv().await.expect("second"),
        rx.recv().await.expect("third"),
    ];
    assert_eq!(order, vec![0, 1, 2]);
    while active(&p) != vec![0] {
        tokio::task::yield_now().await;
    }
    assert_eq!(p.stats.dequeued.load(Ordering::Relaxed), 3);
}

#[tokio::test]
async fn queue_full_and_timeouts_are_refused_and_counted() {
    let p = pool(1, None, Some(1), 1, 30);
    let held = p.acquire().await.expect("a slot");
    let waiting = {
        let p = Arc::clone(&p);
        tokio::spawn(async move { p.acquire().await.map(|_| ()) })
    };
    while p.stats.queued.load(Ordering::Relaxed) < 1 {
        tokio::task::yield_now().await;
    }
    assert_eq!(p.acquire().await.err(), Some(Refusal::QueueFull));
    assert_eq!(
        waiting.await.expect("waiter task"),
        Err(Refusal::QueueTimeout)
    );
    assert_eq!(p.stats.queue_full.load(Ordering::Relaxed), 1);
    assert_eq!(p.stats.queue_timeouts.load(Ordering::Relaxed), 1);
    drop(held);
    assert_eq!(active(&p), vec![0], "no slot leaked");
    assert!(p.acquire().await.is_ok());
}

#[tokio::test]
async fn retry_skips_tried_machines() {
    let p = pool(2, None, None, 8, 50);
    let l = p.acquire().await.expect("a slot");
    let tried = [l.index()];
    drop(l);
    let next = p.retry(&tried).expect("the other machine");
    assert_ne!(next.index(), tried[0]);
    let tried = [0, 1];
    assert!(p.retry(&tried).is_none());
    assert_eq!(p.stats.retried.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn failing_machines_leave_rotation_unless_all_fail() {
    let p = pool(2, None, Some(1), 8, 5_000);
    p.check_changed(0, (0, "tcp_checks[0]"), false, "refused");
    for _ in 0..3 {
        let l = p.acquire().await.expect("a slot");
        assert_eq!(l.index(), 1, "the failing machine is out of rotation");
    }
    // m1 full, m0 out: a newcomer waits, and gets m0 the moment it passes again.
    let held = p.acquire().await.expect("a slot");
    let waiting = {
        let p = Arc::clone(&p);
        tokio::spawn(async move { p.acquire().await.map(|l| l.index()) })
    };
    while p.stats.queued.load(Ordering::Relaxed) < 1 {
        tokio::task::yield_now().await;
    }
    p.check_changed(0, (0, "tcp_checks[0]"), true, "");
    assert_eq!(waiting.await.expect("waiter task"), Ok(0));
    drop(held);
    // Both failing: both used, and counted.
    p.check_changed(0, (0, "tcp_checks[0]"), false, "refused");
    p.check_changed(1, (0, "tcp_checks[0]"), false, "refused");
    let a = p.acquire().await.expect("a slot while all fail");
    let b = p.acquire().await.expect("a slot while all fail");
    assert_ne!(a.index(), b.index());
    assert_eq!(p.stats.routed_all_failing.load(Ordering::Relaxed), 2);
    // Two checks failing on one machine: it returns only when both pass.
    p.check_changed(1, (0, "tcp_checks[0]"), true, "");
    p.check_changed(0, (1, "http_checks[0]"), false, "status 500");
    p.check_changed(0, (0, "tcp_checks[0]"), true, "");
    assert!(!p.machines[0].healthy.load(Ordering::Relaxed));
    p.check_changed(0, (1, "http_checks[0]"), true, "");
    assert!(p.machines[0].healthy.load(Ordering::Relaxed));
}

#[tokio::test]
async fn no_machine_is_refused() {
    let p = pool(0, None, None, 8, 50);
    assert_eq!(p.acquire().await.err(), Some(Refusal::NoMachine));
}

#[tokio::test]
async fn a_pool_that_replaces_another_counts_its_live_connections() {
    let old = pool(2, None, Some(1), 0, 10);
    let on_old: Vec<Lease> = vec![
        old.acquire().await.expect("m0"),
        old.acquire().await.expect("m1"),
    ];
    // The machine set changes: m1 stays (same address), m0 goes, m2 comes.
    let machines = vec![
        ("m1".to_owned(), SocketAddr::from(([10, 0, 0, 2], 80))),
        ("m2".to_owned(), SocketAddr::from(([10, 0, 0, 3], 80))),
    ];
    let policy = QueuePolicy {
        limit: 0,
        max_wait: Duration::from_millis(10),
    };
    let new = Arc::new(
        Pool::new("services[0]".to_owned(), machines, None, Some(1), policy).carrying(&old, true),
    );
    assert_eq!(
        active(&new),
        vec![1, 0],
        "m1's connection on the old pool counts"
    );
    let l = new.acquire().await.expect("a slot on m2");
    assert_eq!(new.machines[l.index()].id, "m2");
    assert!(
        new.acquire().await.is_err(),
        "m1 is at its hard limit already"
    );
    drop(on_old);
    assert_eq!(active(&new), vec![0, 1]);
    let l = new
        .acquire()
        .await
        .expect("m1 is free once its old connection ends");
    assert_eq!(new.machines[l.index()].id, "m1");
}

#[tokio::test]
async fn a_pool_that_replaces_another_keeps_its_check_outcomes_while_the_checks_are_the_same() {
    let old = pool(2, None, None, 0, 10);
    old.check_changed(1, (1, "http_checks[0]"), false, "status 500");
    let again = |same_checks| {
        let machines = old
            .machines
            .iter()
            .map(|m| (m.id.clone(), m.addr))
            .collect();
        let policy = QueuePolicy {
            limit: 0,
            max_wait: Duration::from_millis(10),
        };
        Arc::new(
            Pool::new("services[0]".to_owned(), machines, None, None, policy)
                .carrying(&old, same_checks),
        )
    };
    let kept = again(true);
    assert!(!kept.machines[1].healthy.load(Ordering::Relaxed));
    assert!(kept.machines[1].check_failing(1) && !kept.machines[1].check_failing(0));
    for _ in 0..10 {
        let l = kept.acquire().await.expect("m0");
        assert_eq!(l.index(), 0, "m1 stays out of rotation");
    }
    kept.check_changed(1, (1, "http_checks[0]"), true, "");
    assert!(
        kept.machines[1].healthy.load(Ordering::Relaxed),
        "back once the check passes"
    );
    let fresh = again(false);
    assert!(
        fresh.machines[1].healthy.load(Ordering::Relaxed),
        "other checks start over"
    );
}

#[tokio::test]
async fn a_slot_freed_on_a_replaced_pool_serves_the_new_pools_waiters() {
    let first = pool(1, None, Some(1), 4, 5_000);
    let on_first = first.acquire().await.expect("m0");
    let policy = QueuePolicy {
        limit: 4,
        max_wait: Duration::from_secs(5),
    };
    let machines = vec![("m0".to_owned(), first.machines[0].addr)];
    let second = Arc::new(
        Pool::new(
            "services[0]".to_owned(),
            machines.clone(),
            None,
            Some(1),
            policy,
        )
        .carrying(&first, true),
    );
    first.replaced_by(&second);
    // A third reading replaces the second while the first's connection still runs.
    let third = Arc::new(
        Pool::new("services[0]".to_owned(), machines, None, Some(1), policy)
            .carrying(&second, true),
    );
    second.replaced_by(&third);
    drop(second);
    let waiting = {
        let third = Arc::clone(&third);
        tokio::spawn(async move { third.acquire().await.map(|l| l.index()) })
    };
    while third.stats.queued.load(Ordering::Relaxed) < 1 {
        tokio::task::yield_now().await;
    }
    let started = std::time::Instant::now();
    drop(on_first);
    assert_eq!(waiting.await.expect("waiter"), Ok(0));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "served at once, not at its timeout"
    );
}
