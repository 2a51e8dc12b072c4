//! Tests of the job queue and its workers against real sled files in temporary folders.

use super::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio_util::sync::CancellationToken;

/// Opens the queue in `dir`.
fn open(dir: &tempfile::TempDir, limits: JobsConfig) -> JobStore {
    JobStore::open(&crate::testing::open_store(dir.path()), limits).unwrap()
}

fn new_job(app: &str) -> NewJob {
    NewJob {
        app: app.to_string(),
        method: "POST".to_string(),
        path: "/run?x=1".to_string(),
        headers: vec![("content-type".to_string(), "text/plain".to_string())],
        body: Bytes::from_static(b"request"),
        max_attempts: 3,
        callback: None,
        idempotency_key: None,
        client: None,
    }
}

fn answer(status: u16) -> JobResult {
    JobResult {
        status,
        headers: vec![],
        body_bytes: 0,
        body_truncated: false,
    }
}

/// Far enough ahead that every backoff has passed.
const LATER: u64 = 10 * 60 * 1000;

#[tokio::test]
async fn enqueue_claim_complete_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = open(&dir, JobsConfig::default());
    let enqueued = jobs.enqueue(new_job("app")).await.unwrap();
    assert!(!enqueued.existing);
    assert_eq!(enqueued.id.len(), 32);
    assert!(enqueued
        .id
        .chars()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    assert_eq!(jobs.app_stats("app").queued, 1);

    let (job, body) = jobs.claim(now_ms()).await.unwrap().unwrap();
    assert_eq!(job.id, enqueued.id);
    assert_eq!((job.state, job.attempts), (JobState::Running, 1));
    assert_eq!(body, Bytes::from_static(b"request"));
    assert_eq!(job.path, "/run?x=1");
    assert!(jobs.claim(now_ms()).await.unwrap().is_none());
    assert_eq!(jobs.app_stats("app").running, 1);

    let mut result = answer(200);
    result.headers = vec![("x".to_string(), "y".to_string())];
    assert!(jobs
        .complete(&job.id, result, Bytes::from_static(b"answer"))
        .await
        .unwrap());
    let done = jobs.get(&job.id).unwrap().unwrap();
    assert_eq!(done.state, JobState::Completed);
    let result = done.result.unwrap();
    assert_eq!(
        (result.status, result.body_bytes, result.body_truncated),
        (200, 6, false)
    );
    assert_eq!(
        jobs.result_body(&job.id).unwrap().unwrap(),
        Bytes::from_static(b"answer")
    );
    // A completed job never runs again: its request body is gone.
    assert_eq!(jobs.request_body(&job.id).unwrap(), None);
    assert_eq!(
        jobs.stats(),
        JobStats {
            completed: 1,
            ..JobStats::default()
        }
    );
    assert!(jobs.next_due_ms().unwrap().is_none());
}

#[tokio::test]
async fn jobs_survive_reopening_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let jobs = open(&dir, JobsConfig::default());
        jobs.enqueue(new_job("app")).await.unwrap().id
    };
    let jobs = open(&dir, JobsConfig::default());
    assert_eq!(jobs.get(&id).unwrap().unwrap().state, JobState::Queued);
    assert_eq!(jobs.stats().queued, 1);
    let (job, body) = jobs.claim(now_ms()).await.unwrap().unwrap();
    assert_eq!((job.id, body), (id, Bytes::from_static(b"request")));
}

#[tokio::test]
async fn a_running_job_is_requeued_on_reopening_with_its_attempts_kept() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let jobs = open(&dir, JobsConfig::default());
        jobs.enqueue(new_job("app")).await.unwrap();
        jobs.claim(now_ms()).await.unwrap().unwrap().0.id
    };
    let jobs = open(&dir, JobsConfig::default());
    let job = jobs.get(&id).unwrap().unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Queued, 1));
    assert!(job.next_attempt_ms.is_some());
    assert_eq!(
        jobs.stats(),
        JobStats {
            queued: 1,
            running: 0,
            dead: 0,
            completed: 0
        }
    );
    let (job, _) = jobs.claim(now_ms()).await.unwrap().unwrap();
    assert_eq!(job.attempts, 2);
}

#[tokio::test]
async fn a_job_that_kills_the_node_every_time_ends_dead() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = new_job("app");
    job.max_attempts = 2;
    let id = open(&dir, JobsConfig::default())
        .enqueue(job)
        .await
        .unwrap()
        .id;
    for attempt in 1..=2 {
        let jobs = open(&dir, JobsConfig::default());
        let (job, _) = jobs.claim(now_ms()).await.unwrap().unwrap();
        assert_eq!(job.attempts, attempt);
    }
    let jobs = open(&dir, JobsConfig::default());
    let job = jobs.get(&id).unwrap().unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Dead, 2));
    assert_eq!(job.last_error.as_deref(), Some(NODE_STOPPED));
    assert_eq!(jobs.list_dead("app", 10).unwrap().len(), 1);
    assert_eq!(jobs.stats().dead, 1);
    assert!(jobs.claim(now_ms() + LATER).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_take_each_job_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = open(&dir, JobsConfig::default());
    let mut ids = Vec::new();
    for _ in 0..200 {
        ids.push(jobs.enqueue(new_job("app")).await.unwrap().id);
    }
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let jobs = jobs.clone();
            tokio::spawn(async move {
                let mut claimed = Vec::new();
                while let Some((job, _)) = jobs.claim(now_ms()).await.unwrap() {
                    claimed.push(job.id);
                    tokio::task::yield_now().await;
                }
                claimed
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for task in tasks {
        claimed.extend(task.await.unwrap());
    }
    claimed.sort();
    ids.sort();
    assert_eq!(claimed, ids);
    assert_eq!(
        jobs.stats(),
        JobStats {
            queued: 0,
            running: 200,
            dead: 0,
            completed: 0
        }
    );
}

#[tokio::test]
async fn failures_back_off_until_the_job_is_dead_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = open(&dir, JobsConfig::default());
    let id = jobs.enqueue(new_job("app")).await.unwrap().id;
    let mut now = now_ms();
    for attempt in 1..=3u32 {
        let (job, _) = jobs.claim(now).await.unwrap().unwrap();
        assert_eq!(job.attempts, attempt);
        let job = jobs
            .retry_or_dead(&id, format!("failure {attempt}"), now)
            .await
            .unwrap()
            .unwrap();
        if attempt < 3 {
            assert_eq!(job.state, JobState::Queued);
            let due = job.next_attempt_ms.unwrap();
            let cap = 1000 << (attempt - 1);
            assert!((now + cap / 2..=now + cap).contains(&due), "{due} - {now}");
            assert_eq!(jobs.next_due_ms().unwrap(), Some(due));
            assert!(
                jobs.claim(due - 1).await.unwrap().is_none(),
                "claimed before due"
            );
            now = due;
        } else {
            assert_eq!(job.state, JobState::Dead);
            assert_eq!(job.last_error.as_deref(), Some("failure 3"));
        }
    }
    assert!(jobs.claim(now + LATER).await.unwrap().is_none());
    let dead = jobs.list_dead("app", 10).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, id);
    assert!(jobs.list_dead("other", 10).unwrap().is_empty());
    assert_eq!(jobs.stats().dead, 1);
    // Already dead: nothing changes.
    assert!(jobs
        .retry_or_dead(&id, "again".into(), now)
        .await
        .unwrap()
        .is_none());
    assert!(!jobs.complete(&id, answer(200), Bytes::new()).await.unwrap());
}

#[tokio::test]
async fn dead_letters_are_retried_and_purged() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = open(&dir, JobsConfig::default());
    let mut ids = Vec::new();
    for n in 0..3 {
        let mut job = new_job("app");
        job.idempotency_key = Some(format!("key-{n}"));
        let id = jobs.enqueue(job).await.unwrap().id;
        jobs.claim(now_ms()).await.unwrap().unwrap();
        jobs.bury(&id, "fatal".into(), now_ms())
            .await
            .unwrap()
            .unwrap();
        ids.push(id);
    }
    assert_eq!(jobs.stats().dead, 3);
    assert!(!jobs.retry_dead("other", &ids[0]).await.unwrap());
    assert!(jobs.retry_dead("app", &ids[0]).await.unwrap());
    assert!(!jobs.retry_dead("app", &ids[0]).await.unwrap());
    let job = jobs.get(&ids[0]).unwrap().unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Queued, 0));
    assert_eq!(
        jobs.stats(),
        JobStats {
            queued: 1,
            running: 0,
            dead: 2,
            completed: 0
        }
    );
    assert_eq!(jobs.claim(now_ms()).await.unwrap().unwrap().0.id, ids[0]);

    assert_eq!(jobs.purge_dead("app").await.unwrap(), 2);
    assert!(jobs.list_dead("app", 10).unwrap().is_empty());
    for id in &ids[1..] {
        assert!(jobs.get(id).unwrap().is_none());
        assert!(jobs.request_body(id).unwrap().is_none());
    }
    assert_eq!(
        jobs.stats(),
        JobStats {
            queued: 0,
            running: 1,
            dead: 0,
            completed: 0
        }
    );
    // The purged jobs' idempotency keys are free again.
    let mut job = new_job("app");
    job.idempotency_key = Some("key-1".to_string());
    assert!(!jobs.enqueue(job).await.unwrap().existing);
}

#[tokio::test]
async fn the_oldest_dead_letter_goes_when_an_app_has_too_many() {
    let dir = tempfile::tempdir().unwrap();
    let limits = JobsConfig {
        max_dead_per_app: 2,
        ..JobsConfig::default()
    };
    let jobs = open(&dir, limits);
    let mut ids = Vec::new();
    for n in 0..3u64 {
        let id = jobs.enqueue(new_job("app")).await.unwrap().id;
        jobs.claim(now_ms()).await.unwrap().unwrap();
        jobs.bury(&id, "fatal".into(), 1000 + n)
            .await
            .unwrap()
            .unwrap();
        ids.push(id);
    }
    let dead: Vec<String> = jobs
        .list_dead("app", 10)
        .unwrap()
        .into_iter()
        .map(|job| job.id)
        .collect();
    assert_eq!(dead, vec![ids[2].clone(), ids[1].clone()]);
    assert!(jobs.get(&ids[0]).unwrap().is_none());
    assert_eq!(jobs.stats().dead, 2);
}

#[tokio::test]
async fn an_idempotency_key_returns_the_same_job() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = open(&dir, JobsConfig::default());
    let mut job = new_job("app");
    job.idempotency_key = Some("order-17".to_string());
    let first = jobs.enqueue(job.clone()).await.unwrap();
    let again = jobs.enqueue(job.clone()).await.unwrap();
    assert_eq!(
        again,
        Enqueued {
            id: first.id.clone(),
            existing: true
        }
    );
    job.app = "other".to_string();
    assert!(
        !jobs.enqueue(job).await.unwrap().existing,
        "keys are per app"
    );
    assert_eq!(jobs.stats().queued, 2);
}

#[tokio::test]
async fn an_app_keeps_a_bounded_number_of_results_and_no_request_body_of_a_completed_job() {
    let dir = tempfile::tempdir().unwrap();
    let limits = JobsConfig {
        max_completed_per_app: 2,
        ..JobsConfig::default()
    };
    let jobs = open(&dir, limits);
    for _ in 0..2 {
        let id = jobs.enqueue(new_job("app")).await.unwrap().id;
        let (job, body) = jobs.claim(now_ms()).await.unwrap().unwrap();
        assert_eq!((job.id.as_str(), &body[..]), (id.as_str(), &b"request"[..]));
        jobs.complete(&id, answer(200), Bytes::from_static(b"done"))
            .await
            .unwrap();
        assert_eq!(jobs.request_body(&id).unwrap(), None);
        assert_eq!(jobs.result_body(&id).unwrap().unwrap(), &b"done"[..]);
    }
    assert_eq!(jobs.app_stats("app").completed, 2);
    match jobs.enqueue(new_job("app")).await {
        Err(JobError::ResultsFull { app, limit }) => {
            assert_eq!((app.as_str(), limit), ("app", 2))
        }
        other => panic!("{other:?}"),
    }
    jobs.enqueue(new_job("other")).await.unwrap();
    // Expired results make room again, and the counts survive a restart.
    drop(jobs);
    let jobs = open(
        &dir,
        JobsConfig {
            max_completed_per_app: 2,
            ..JobsConfig::default()
        },
    );
    assert_eq!(jobs.app_stats("app").completed, 2);
    assert_eq!(jobs.expire(now_ms() + 86_400_001).await.unwrap(), 2);
    jobs.enqueue(new_job("app")).await.unwrap();
}

#[tokio::test]
async fn a_full_queue_refuses_and_invalid_jobs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let limits = JobsConfig {
        max_queued_per_app: 2,
        ..JobsConfig::default()
    };
    let jobs = open(&dir, limits);
    jobs.enqueue(new_job("app")).await.unwrap();
    jobs.enqueue(new_job("app")).await.unwrap();
    match jobs.enqueue(new_job("app")).await {
        Err(JobError::QueueFull { app, limit }) => assert_eq!((app.as_str(), limit), ("app", 2)),
        other => panic!("{other:?}"),
    }
    // Running jobs count too; completed ones free a place. (Only this app's jobs are queued
    // here, so the claim takes one of them whatever order same-millisecond jobs sort in.)
    let (job, _) = jobs.claim(now_ms()).await.unwrap().unwrap();
    assert_eq!(job.app, "app");
    assert!(matches!(
        jobs.enqueue(new_job(&job.app)).await,
        Err(JobError::QueueFull { .. })
    ));
    jobs.complete(&job.id, answer(204), Bytes::new())
        .await
        .unwrap();
    jobs.enqueue(new_job(&job.app)).await.unwrap();
    // The limit is per app: another app still has room.
    jobs.enqueue(new_job("other")).await.unwrap();

    for invalid in [
        NewJob {
            max_attempts: 0,
            ..new_job("app")
        },
        NewJob {
            max_attempts: 11,
            ..new_job("app")
        },
        NewJob {
            path: "run".into(),
            ..new_job("app")
        },
        NewJob {
            app: "a/b".into(),
            ..new_job("app")
        },
        NewJob {
            idempotency_key: Some(String::new()),
            ..new_job("app")
        },
    ] {
        assert!(matches!(
            jobs.enqueue(invalid).await,
            Err(JobError::Invalid(_))
        ));
    }
}

#[tokio::test]
async fn completing_twice_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = open(
        &dir,
        JobsConfig {
            max_result_bytes: 4,
            ..JobsConfig::default()
        },
    );
    let id = jobs.enqueue(new_job("app")).await.unwrap().id;
    jobs.claim(now_ms()).await.unwrap().unwrap();
    assert!(jobs
        .complete(&id, answer(200), Bytes::from_static(b"first answer"))
        .await
        .unwrap());
    let first = jobs.get(&id).unwrap().unwrap();
    let result = first.result.clone().unwrap();
    assert_eq!((result.body_bytes, result.body_truncated), (12, true));
    assert_eq!(
        jobs.result_body(&id).unwrap().unwrap(),
        Bytes::from_static(b"firs")
    );

    assert!(!jobs
        .complete(&id, answer(500), Bytes::from_static(b"second"))
        .await
        .unwrap());
    assert_eq!(jobs.get(&id).unwrap().unwrap(), first);
    assert_eq!(
        jobs.result_body(&id).unwrap().unwrap(),
        Bytes::from_static(b"firs")
    );
    assert!(matches!(
        jobs.complete("0123", answer(200), Bytes::new()).await,
        Err(JobError::NotFound)
    ));
}

#[tokio::test]
async fn expire_deletes_old_completed_jobs_only() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = open(
        &dir,
        JobsConfig {
            result_ttl_secs: 60,
            ..JobsConfig::default()
        },
    );
    let mut job = new_job("app");
    job.idempotency_key = Some("k".to_string());
    let completed = jobs.enqueue(job.clone()).await.unwrap().id;
    jobs.claim(now_ms()).await.unwrap().unwrap();
    jobs.complete(&completed, answer(200), Bytes::from_static(b"ok"))
        .await
        .unwrap();
    let dead = jobs.enqueue(new_job("app")).await.unwrap().id;
    jobs.claim(now_ms()).await.unwrap().unwrap();
    jobs.bury(&dead, "fatal".into(), now_ms()).await.unwrap();
    let queued = jobs.enqueue(new_job("app")).await.unwrap().id;

    assert_eq!(jobs.expire(now_ms()).await.unwrap(), 0);
    assert_eq!(jobs.expire(now_ms() + 61_000).await.unwrap(), 1);
    assert!(jobs.get(&completed).unwrap().is_none());
    assert!(jobs.result_body(&completed).unwrap().is_none());
    assert!(jobs.request_body(&completed).unwrap().is_none());
    assert!(jobs.get(&dead).unwrap().is_some());
    assert!(jobs.get(&queued).unwrap().is_some());
    assert!(
        !jobs.enqueue(job).await.unwrap().existing,
        "the key went with the job"
    );
}

#[tokio::test]
async fn removing_an_app_deletes_its_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = open(&dir, JobsConfig::default());
    jobs.enqueue(new_job("gone")).await.unwrap();
    jobs.enqueue(new_job("gone")).await.unwrap();
    // Claimed before the other app's job is queued: jobs queued in the same millisecond are
    // claimed in no set order.
    let (running, _) = jobs.claim(now_ms()).await.unwrap().unwrap();
    let kept = jobs.enqueue(new_job("kept")).await.unwrap().id;
    assert_eq!(jobs.remove_app("gone").await.unwrap(), 2);
    assert!(jobs.stats_by_app().keys().eq(["kept"]));
    assert!(matches!(
        jobs.complete(&running.id, answer(200), Bytes::new()).await,
        Err(JobError::NotFound)
    ));
    assert_eq!(jobs.claim(now_ms()).await.unwrap().unwrap().0.id, kept);
}

#[test]
fn backoff_doubles_within_equal_jitter_bounds_up_to_five_minutes() {
    let mut rng = StdRng::seed_from_u64(7);
    for attempt in 0..40u32 {
        let cap = (1000u64 << attempt.saturating_sub(1).min(31)).min(300_000);
        for _ in 0..100 {
            let wait = backoff(attempt, &mut rng).as_millis() as u64;
            assert!((cap / 2..=cap).contains(&wait), "attempt {attempt}: {wait}");
        }
    }
    assert_eq!(
        backoff(1, &mut StdRng::seed_from_u64(1)).as_millis() / 500,
        1
    );
}

/// Stands in for the runtime: answers 503 to a first attempt and 200 to the next ones, or
/// never answers at all.
struct ScriptedExecutor {
    hang: bool,
    executions: AtomicUsize,
    notified: AtomicUsize,
}

impl ScriptedExecutor {
    fn new(hang: bool) -> Arc<Self> {
        Arc::new(Self {
            hang,
            executions: AtomicUsize::new(0),
            notified: AtomicUsize::new(0),
        })
    }
}

impl Executor for ScriptedExecutor {
    fn execute(&self, job: JobRecord, _body: Bytes) -> BoxFuture<'_, Outcome> {
        self.executions.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            if self.hang {
                std::future::pending::<()>().await;
            }
            let status = if job.attempts == 1 { 503 } else { 200 };
            let body = Bytes::from(format!("attempt {}", job.attempts));
            Outcome::Answered {
                status,
                headers: vec![],
                body_bytes: body.len() as u64,
                body,
            }
        })
    }

    fn notify<'a>(&'a self, job: &'a JobRecord) -> BoxFuture<'a, ()> {
        assert!(matches!(job.state, JobState::Completed | JobState::Dead));
        self.notified.fetch_add(1, Ordering::SeqCst);
        Box::pin(std::future::ready(()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_retry_a_503_then_complete_every_job() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = open(&dir, JobsConfig::default());
    let executor = ScriptedExecutor::new(false);
    let shutdown = CancellationToken::new();
    let handles = spawn_workers(jobs.clone(), executor.clone(), 4, shutdown.clone());
    let mut ids = Vec::new();
    for n in 0..20 {
        let mut job = new_job("app");
        job.callback = (n % 2 == 0).then(|| "https://example.test/done".to_string());
        ids.push(jobs.enqueue(job).await.unwrap().id);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let records: Vec<JobRecord> = ids
            .iter()
            .map(|id| jobs.get(id).unwrap().unwrap())
            .collect();
        if records.iter().all(|job| job.state == JobState::Completed) {
            for job in &records {
                assert_eq!(job.attempts, 2);
                assert_eq!(job.result.as_ref().unwrap().status, 200);
                assert_eq!(job.last_error.as_deref(), Some("the app answered 503"));
                assert_eq!(
                    jobs.result_body(&job.id).unwrap().unwrap(),
                    Bytes::from("attempt 2")
                );
            }
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "jobs not completed in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(executor.executions.load(Ordering::SeqCst), 40);
    // Notified once for each job with a callback, after it completed.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(executor.notified.load(Ordering::SeqCst), 10);
    assert_eq!(
        jobs.stats(),
        JobStats {
            completed: 20,
            ..JobStats::default()
        }
    );
    shutdown.cancel();
    for handle in handles {
        handle.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_retryable_failure_is_dead_at_once() {
    struct Broken;
    impl Executor for Broken {
        fn execute(&self, _job: JobRecord, _body: Bytes) -> BoxFuture<'_, Outcome> {
            Box::pin(std::future::ready(Outcome::Failed {
                error: "the component does not instantiate".into(),
                retryable: false,
            }))
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let jobs = open(&dir, JobsConfig::default());
    let shutdown = CancellationToken::new();
    let handles = spawn_workers(jobs.clone(), Arc::new(Broken), 1, shutdown.clone());
    let id = jobs.enqueue(new_job("app")).await.unwrap().id;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while jobs.get(&id).unwrap().unwrap().state != JobState::Dead {
        assert!(
            tokio::time::Instant::now() < deadline,
            "job not dead in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(jobs.get(&id).unwrap().unwrap().attempts, 1);
    shutdown.cancel();
    for handle in handles {
        handle.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_workers_promptly_and_leaves_the_job_to_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let jobs = open(&dir, JobsConfig::default());
        let executor = ScriptedExecutor::new(true);
        let shutdown = CancellationToken::new();
        let handles = spawn_workers(jobs.clone(), executor.clone(), 3, shutdown.clone());
        let id = jobs.enqueue(new_job("app")).await.unwrap().id;
        while executor.executions.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stopping = tokio::time::Instant::now();
        shutdown.cancel();
        for handle in handles {
            handle.await.unwrap();
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(2),
            "{:?}",
            stopping.elapsed()
        );
        assert_eq!(jobs.get(&id).unwrap().unwrap().state, JobState::Running);
        id
    };
    let jobs = open(&dir, JobsConfig::default());
    let job = jobs.get(&id).unwrap().unwrap();
    assert_eq!((job.state, job.attempts), (JobState::Queued, 1));
}

#[tokio::test]
async fn a_corrupt_job_is_reported_and_taken_off_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = open(&dir, JobsConfig::default());
    let broken = jobs.enqueue(new_job("app")).await.unwrap().id;
    jobs.inner
        .jobs
        .insert(broken.as_bytes(), &b"{not json"[..])
        .unwrap();
    // Due later than the broken one, so that the broken one is first in the queue.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let fine = jobs.enqueue(new_job("app")).await.unwrap().id;
    assert!(matches!(
        jobs.claim(now_ms()).await,
        Err(JobError::Store(StoreError::Corrupt { .. }))
    ));
    assert!(matches!(
        jobs.get(&broken),
        Err(JobError::Store(StoreError::Corrupt { .. }))
    ));
    assert_eq!(jobs.claim(now_ms()).await.unwrap().unwrap().0.id, fine);
    drop(jobs);
    // Reopening skips the unreadable record instead of refusing to start.
    let jobs = open(&dir, JobsConfig::default());
    assert_eq!(jobs.stats().running, 0);
    assert_eq!(jobs.stats().queued, 1);
}
