//! The change feed's live side: the notifier a long-poll waits on, `GET /changes` itself, and
//! the background tasks that keep the notifier fresh and apply the retention.
//!
//! A long-poll never holds a database connection while it waits: it reads a page in a short
//! read transaction on the blocking pool, and when the page is empty it awaits [`Feed`]'s
//! `watch` (the newest sequence number known committed) until its deadline, then reads again.
//! The notifier is bumped
//! - by `http::run_write` after every commit that flushed changes (this process's writes wake
//!   waiters at once);
//! - by a 1 s re-check of the newest sequence number (writes of another process on the same
//!   store: another `fabric control` on PostgreSQL, or on the same SQLite file);
//! - on PostgreSQL, by a `LISTEN fabric_changes` connection of its own, which [`super::flush`]
//!   `NOTIFY`s in every write transaction, so other instances' writes wake waiters at once too.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portolan::store;
use serde_json::Value;
use tokio::sync::watch;

use super::super::db::Db;
use super::super::error::{ApiError, OpError};
use super::super::http::App;
use super::super::params::Params;
use super::{FeedQuery, Page, Retention, MAX_PAGE};

/// Default wait of a long-poll (seconds).
pub const DEFAULT_TIMEOUT_SECS: i64 = 20;
/// Longest wait of a long-poll (seconds).
pub const MAX_TIMEOUT_SECS: i64 = 60;
/// How often the newest sequence number is re-read (covers other processes' writes).
pub const RECHECK: Duration = Duration::from_secs(1);

/// The store's URL, kept for the feed's `LISTEN` connection; `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreUrl(pub String);

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.0.find("://"), self.0.rfind('@')) {
            (Some(s), Some(at)) if at > s => {
                write!(f, "{}://…@{}", &self.0[..s], &self.0[at + 1..])
            }
            _ => f.write_str(&self.0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    /// Newest sequence number known committed.
    seq: i64,
    /// The service is shutting down: waiters answer at once.
    closed: bool,
}

/// The in-process notifier and the feed's counters (one per service, in [`App`]).
pub struct Feed {
    tx: watch::Sender<State>,
    waiting: AtomicU64,
    polls: AtomicU64,
    gone: AtomicU64,
    pruned: AtomicU64,
    prune_errors: AtomicU64,
    recheck_errors: AtomicU64,
    listen_errors: AtomicU64,
    listening: AtomicBool,
    retention: Retention,
}

impl Default for Feed {
    fn default() -> Self {
        Feed::new(Retention::default())
    }
}

impl Feed {
    /// A notifier at sequence 0 with the given retention.
    pub fn new(retention: Retention) -> Feed {
        Feed {
            tx: watch::Sender::new(State {
                seq: 0,
                closed: false,
            }),
            waiting: AtomicU64::new(0),
            polls: AtomicU64::new(0),
            gone: AtomicU64::new(0),
            pruned: AtomicU64::new(0),
            prune_errors: AtomicU64::new(0),
            recheck_errors: AtomicU64::new(0),
            listen_errors: AtomicU64::new(0),
            listening: AtomicBool::new(false),
            retention,
        }
    }

    /// Changes up to `seq` are committed: wakes the waiters if that is news.
    pub fn committed(&self, seq: i64) {
        self.tx.send_if_modified(|s| {
            if seq > s.seq {
                s.seq = seq;
                true
            } else {
                false
            }
        });
    }

    /// Waits until a commit newer than `seen` is known, the service closes, or `deadline`
    /// passes; returns the newest sequence number known committed. For waiters that re-read
    /// one object after each change (Docker's `stop`), holding no database connection.
    pub async fn wait_past(&self, seen: i64, deadline: tokio::time::Instant) -> i64 {
        let mut rx = self.tx.subscribe();
        loop {
            let s = *rx.borrow_and_update();
            if s.seq > seen || s.closed {
                return s.seq;
            }
            let _w = Waiting::new(&self.waiting);
            tokio::select! {
                r = rx.changed() => {
                    if r.is_err() {
                        return self.last_seq();
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return self.last_seq(),
            }
        }
    }

    /// The newest sequence number known committed.
    pub fn last_seq(&self) -> i64 {
        self.tx.borrow().seq
    }

    /// Long-polls waiting now.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Ends every wait (the service is stopping) and stops the background work.
    pub fn close(&self) {
        self.tx.send_modify(|s| s.closed = true);
    }

    /// Whether [`Feed::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.tx.borrow().closed
    }

    /// Prometheus text of the feed's gauges and counters.
    pub fn render(&self, out: &mut String) {
        let mut one = |name: &str, kind: &str, help: &str, v: i64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {v}");
        };
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed) as i64;
        one(
            "fabric_control_changes_last_seq",
            "gauge",
            "Newest change-feed sequence number this instance knows committed.",
            self.last_seq(),
        );
        one(
            "fabric_control_changes_waiting",
            "gauge",
            "Long-polls on GET /changes waiting now.",
            n(&self.waiting),
        );
        one(
            "fabric_control_changes_polls_total",
            "counter",
            "GET /changes requests answered.",
            n(&self.polls),
        );
        one(
            "fabric_control_changes_gone_total",
            "counter",
            "GET /changes refused 410 Gone (since older than kept, or beyond the feed).",
            n(&self.gone),
        );
        one(
            "fabric_control_changes_pruned_total",
            "counter",
            "Changes deleted by the retention.",
            n(&self.pruned),
        );
        one(
            "fabric_control_changes_prune_errors_total",
            "counter",
            "Retention runs that failed.",
            n(&self.prune_errors),
        );
        one(
            "fabric_control_changes_recheck_errors_total",
            "counter",
            "Periodic re-reads of the newest sequence number that failed.",
            n(&self.recheck_errors),
        );
        one(
            "fabric_control_changes_listen_errors_total",
            "counter",
            "PostgreSQL LISTEN connections that failed or broke.",
            n(&self.listen_errors),
        );
        one(
            "fabric_control_changes_listening",
            "gauge",
            "1 while this instance LISTENs for other instances' changes on PostgreSQL.",
            i64::from(self.listening.load(Ordering::Relaxed)),
        );
    }
}

/// Counts a waiting long-poll while alive.
struct Waiting<'a>(&'a AtomicU64);

impl<'a> Waiting<'a> {
    fn new(a: &'a AtomicU64) -> Waiting<'a> {
        a.fetch_add(1, Ordering::Relaxed);
        Waiting(a)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A validated `GET /changes` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollRequest {
    /// What to read.
    pub query: FeedQuery,
    /// How long to wait for a change when there is none.
    pub timeout: Duration,
}

/// Validates `since`, `server_uuid`, `limit`, `timeout`.
pub fn validate(p: &mut Params) -> Result<PollRequest, ApiError> {
    p.allow_only(&["since", "server_uuid", "limit", "timeout"]);
    let since = p
        .int_in(
            "since",
            0,
            i64::MAX,
            "since must be an integer greater than or equal to 0",
        )
        .unwrap_or(0);
    let server_uuid = p.uuid("server_uuid");
    let limit = p
        .int_in(
            "limit",
            1,
            MAX_PAGE as i64,
            "invalid limit, must be an integer greater than 0 or less than or equal to 1000",
        )
        .map_or(MAX_PAGE, |n| n as u64);
    let timeout = p
        .int_in(
            "timeout",
            0,
            MAX_TIMEOUT_SECS,
            "timeout must be a whole number of seconds from 0 to 60",
        )
        .unwrap_or(DEFAULT_TIMEOUT_SECS);
    p.finish()?;
    Ok(PollRequest {
        query: FeedQuery {
            since,
            server_uuid,
            limit,
        },
        timeout: Duration::from_secs(timeout as u64),
    })
}

/// Reads one page on the blocking pool in a short read transaction.
async fn read_page(app: &Arc<App>, q: &FeedQuery) -> Result<Page, ApiError> {
    let a = app.clone();
    let q = q.clone();
    let r = tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        let r = store::with_read(&*a.store, |raw| super::read(&mut Db::from(raw), &q));
        a.metrics.store("read", t0.elapsed());
        r
    })
    .await;
    match r {
        Ok(r) => r.map_err(OpError::into_api),
        Err(e) => {
            tracing::error!(error = %e, "change feed read panicked");
            Err(ApiError::internal())
        }
    }
}

/// `GET /changes`: a page of changes after `since`; when there is none, waits (without a
/// database connection) up to `timeout` for a commit, then answers (possibly empty).
pub async fn poll(app: &Arc<App>, mut p: Params) -> Result<Value, ApiError> {
    let req = validate(&mut p)?;
    let feed = &app.feed;
    feed.polls.fetch_add(1, Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + req.timeout;
    let mut rx = feed.tx.subscribe();
    loop {
        // Mark what is known now as seen BEFORE reading: a commit after this point changes
        // the watch, so it cannot slip between the read and the wait.
        let closed = rx.borrow_and_update().closed;
        let page = match read_page(app, &req.query).await {
            Ok(p) => p,
            Err(e) => {
                if e.status == 410 {
                    feed.gone.fetch_add(1, Ordering::Relaxed);
                }
                return Err(e);
            }
        };
        feed.committed(page.last);
        if !page.changes.is_empty() || closed || tokio::time::Instant::now() >= deadline {
            return Ok(page.to_json());
        }
        let _w = Waiting::new(&feed.waiting);
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() {
                    return Ok(page.to_json());
                }
            }
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// Stops the background tasks (and ends every long-poll) when dropped.
pub struct Background {
    feed: Arc<Feed>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Background {
    fn drop(&mut self) {
        self.feed.close();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// How often the retention runs: every minute, or twice per retention period if shorter.
pub fn prune_interval(r: &Retention) -> Duration {
    (r.max_age / 2).clamp(Duration::from_millis(100), Duration::from_secs(60))
}

/// Starts the background work of `app`'s feed: the 1 s re-check, the retention, and (with a
/// PostgreSQL `store_url`) the `LISTEN` thread. Must be called inside a tokio runtime.
pub fn start(app: &Arc<App>) -> Background {
    let feed = app.feed.clone();
    let mut tasks = Vec::new();
    // The re-check: other processes' commits within RECHECK (and the first value at start).
    let a = app.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(RECHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if a.feed.is_closed() {
                return;
            }
            let b = a.clone();
            let r = tokio::task::spawn_blocking(move || {
                store::with_read(&*b.store, |raw| super::last_seq(&mut Db::from(raw)))
            })
            .await;
            match r {
                Ok(Ok(seq)) => a.feed.committed(seq),
                Ok(Err(e)) => {
                    // Once per failure streak would hide a flapping store; count every one.
                    let n = a.feed.recheck_errors.fetch_add(1, Ordering::Relaxed);
                    if n.is_power_of_two() || n == 0 {
                        tracing::warn!(error = %e, failures = n + 1, "change feed: cannot read the newest sequence number");
                    }
                }
                Err(_) => return,
            }
        }
    }));
    // The retention.
    let a = app.clone();
    tasks.push(tokio::spawn(async move {
        let every = prune_interval(&a.feed.retention);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if a.feed.is_closed() {
                return;
            }
            let b = a.clone();
            let r = tokio::task::spawn_blocking(move || prune_now(&b)).await;
            if r.is_err() {
                return;
            }
        }
    }));
    if let Some(url) = app.cfg.store_url.as_ref().filter(|u| is_pg(&u.0)) {
        let url = url.0.clone();
        let f = feed.clone();
        let spawned = std::thread::Builder::new()
            .name("fabric-feed-listen".into())
            .spawn(move || listen(&url, &f));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "change feed: cannot start the LISTEN thread; other instances' changes are seen within 1 s");
        }
    }
    Background { feed, tasks }
}

fn is_pg(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Applies the retention once (on the calling, blocking thread); returns rows deleted.
pub fn prune_now(app: &App) -> Result<u64, OpError> {
    let r = app.feed.retention;
    let now_ms = super::super::now_us() / 1000;
    // Writers of this process queue on SQLite rather than in its busy handler.
    let _turn = app
        .sqlite_writers
        .as_ref()
        .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()));
    let res = store::with_txn(&*app.store, |tx| {
        super::prune(&mut Db::from(tx.raw()), &r, now_ms)
    });
    match &res {
        Ok(n) => {
            app.feed.pruned.fetch_add(*n, Ordering::Relaxed);
            if *n > 0 {
                tracing::info!(deleted = n, "change feed: retention applied");
            }
        }
        Err(e) => {
            app.feed.prune_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "change feed: retention failed");
        }
    }
    res
}

/// The LISTEN loop (a plain thread: the synchronous client blocks): reconnects with backoff
/// (0.2 s doubling to 5 s) until the feed is closed.
fn listen(url: &str, feed: &Feed) {
    use postgres::fallible_iterator::FallibleIterator;
    let mut backoff = Duration::from_millis(200);
    while !feed.is_closed() {
        let conn = postgres::Client::connect(url, postgres::NoTls).and_then(|mut c| {
            c.batch_execute(&format!("LISTEN {}", super::CHANNEL))?;
            Ok(c)
        });
        let mut c = match conn {
            Ok(c) => c,
            Err(e) => {
                feed.listen_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, retry_in = ?backoff, "change feed: cannot LISTEN on PostgreSQL; re-checking every second meanwhile");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        feed.listening.store(true, Ordering::Relaxed);
        tracing::debug!("change feed: listening for other instances' changes");
        while !feed.is_closed() {
            let next = c
                .notifications()
                .timeout_iter(Duration::from_millis(500))
                .next();
            match next {
                Ok(Some(note)) => match note.payload().parse::<i64>() {
                    Ok(seq) => feed.committed(seq),
                    Err(_) => tracing::debug!(
                        payload = note.payload(),
                        "change feed: unexpected NOTIFY payload"
                    ),
                },
                Ok(None) => {
                    if c.is_closed() {
                        break;
                    }
                }
                Err(e) => {
                    feed.listen_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "change feed: LISTEN connection broke; reconnecting");
                    break;
                }
            }
        }
        feed.listening.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_debug_hides_the_password() {
        let u = StoreUrl("postgres://u:secret@db:5432/x".into());
        let d = format!("{u:?}");
        assert!(!d.contains("secret"), "{d}");
        assert!(d.contains("db:5432/x"), "{d}");
    }

    #[test]
    fn committed_only_moves_forward() {
        let f = Feed::default();
        let mut rx = f.tx.subscribe();
        f.committed(5);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        f.committed(3);
        assert!(!rx.has_changed().unwrap());
        assert_eq!(f.last_seq(), 5);
        f.close();
        assert!(rx.has_changed().unwrap());
        assert!(f.is_closed());
    }

    #[test]
    fn validate_params() {
        let mut p = Params::parse(
            Some("since=7&server_uuid=ABCDEF01-0000-4000-8000-000000000001&limit=5&timeout=0"),
            None,
            b"",
        )
        .unwrap();
        let r = validate(&mut p).unwrap();
        assert_eq!(r.query.since, 7);
        assert_eq!(
            r.query.server_uuid.as_deref(),
            Some("abcdef01-0000-4000-8000-000000000001")
        );
        assert_eq!(r.query.limit, 5);
        assert_eq!(r.timeout, Duration::ZERO);
        let mut p = Params::parse(None, None, b"").unwrap();
        let r = validate(&mut p).unwrap();
        assert_eq!((r.query.since, r.query.limit), (0, MAX_PAGE));
        assert_eq!(r.timeout, Duration::from_secs(20));
        for bad in [
            "since=-1",
            "limit=1001",
            "limit=0",
            "timeout=61",
            "server_uuid=x",
            "foo=1",
        ] {
            let mut p = Params::parse(Some(bad), None, b"").unwrap();
            let e = validate(&mut p).unwrap_err();
            assert_eq!(e.status, 422, "{bad}: {e}");
        }
    }

    #[test]
    fn prune_every() {
        let r = |s| Retention {
            max_age: Duration::from_secs(s),
            keep: 1,
        };
        assert_eq!(prune_interval(&r(86_400)), Duration::from_secs(60));
        assert_eq!(prune_interval(&r(1)), Duration::from_millis(500));
        assert_eq!(prune_interval(&r(0)), Duration::from_millis(100));
    }
}
