//! `fabric agent`: the per-host reconciler.
//!
//! It reads its server's desired state from the control plane (`GET /servers/:own/desired`,
//! one read transaction: VMs, NICs, firewall), makes the host match it, and follows the change
//! feed (`GET /changes?since=seq&server_uuid=own`, long-polled) to know when to read it again:
//! the snapshot is the truth, the feed only the wake-up. On `410 Gone` it reads the snapshot
//! again. Every `--resync-secs` it also re-checks the host against the last snapshot (a
//! restarted dataplane has lost its vnics; someone deleted a namespace by hand), and every
//! [`FULL_REREAD`] it reads the snapshot again even when the feed is quiet.
//!
//! The agent never listens. While the control plane is unreachable it retries with backoff
//! (0.2 s doubling to 5 s) and changes nothing locally. SIGTERM/SIGINT end it without tearing
//! anything down: containers keep running while the agent is away, and the next agent picks up
//! from its state file (`--state-dir`, the namespaces it created).
//!
//! - [`plan`]: desired + actual → ordered actions (pure).
//! - [`host`]: executes them (namespaces, vnics, dataplane socket) and owns the state file.
//! - [`api`]: the control-plane client.
//! - [`runtime`]: Docker containers on this host (runc under `fabric shim`), after their
//!   namespace and vnics are in place: prepared once, each generation started at most once,
//!   stopped, signalled, removed with their VM; a shim's exit wakes a reconcile at once.

pub mod api;
pub mod host;
pub mod plan;
pub mod renew;
pub mod runtime;
pub mod tunnel;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{watch, Mutex, Notify};

use self::api::{Api, ApiError, Snapshot, VmState};
use self::host::{Host, LinuxHost};
use crate::firewall::compile::FirewallState;

/// `fabric agent` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// The control plane, `http://HOST:PORT` or `https://HOST:PORT` (one HTTP/2 connection).
    #[arg(long, value_name = "URL")]
    pub control: String,
    /// With an `https://` control URL: this host's `ca.pem`, `cert.pem` and `key.pem` (read
    /// again at every reconnect, so a renewed certificate is used).
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// This host's server UUID (as registered with `PUT /servers/:uuid`).
    #[arg(long, alias = "cn-uuid", value_name = "UUID")]
    pub server_uuid: String,
    /// The dataplane's control socket.
    #[arg(long, value_name = "PATH")]
    pub dataplane: PathBuf,
    /// Where the agent remembers which namespaces it created (`owned.json`).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/fabric/agent")]
    pub state_dir: PathBuf,
    /// Seconds between heartbeats (the control plane marks a server silent for 11 s unknown).
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub heartbeat_secs: u64,
    /// Seconds between re-checks of the host against the last snapshot.
    #[arg(long, value_name = "SECS", default_value_t = 2)]
    pub resync_secs: u64,
    /// How long one change-feed long-poll waits (seconds, 1-60).
    #[arg(long, value_name = "SECS", default_value_t = 20, hide = true)]
    pub poll_secs: u64,
    /// Containers: layers (`images/sha256/`), each container's bundle, log and shim files
    /// (`containers/<vm>/`), runc's state (`runc/`). `fabric up` passes its data directory.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/fabric/data")]
    pub data: PathBuf,
}

/// First retry delay while the control plane is unreachable.
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// How often the snapshot is read again even when the feed is quiet.
pub const FULL_REREAD: Duration = Duration::from_secs(60);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Exponential backoff, 0.2 s doubling to 5 s.
#[derive(Debug, Clone, Copy)]
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(BACKOFF_MIN)
    }
}

impl Backoff {
    /// The delay to wait now; the next one doubles (up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        d
    }
    /// Back to the first delay.
    pub fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }
}

/// Counters, logged with each reconcile that did something and at exit.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// Reconciles run.
    pub reconciles: u64,
    /// Actions that succeeded.
    pub actions: u64,
    /// Actions that failed.
    pub failures: u64,
    /// VM states reported (accepted by the control plane).
    pub reports: u64,
    /// Snapshots read.
    pub snapshots: u64,
    /// Failed control-plane calls.
    pub control_errors: u64,
    /// Reconciles skipped because the dataplane was down.
    pub dataplane_down: u64,
}

/// What the reconciler keeps between runs.
struct State<H: Host> {
    host: H,
    /// The firewall state last applied (forgotten when the dataplane looks restarted).
    firewall: Option<FirewallState>,
    /// The member set last pushed (forgotten with the firewall).
    members: Option<Vec<std::net::IpAddr>>,
    /// The state last reported per VM.
    reported: BTreeMap<String, (VmState, Option<String>)>,
    /// The container report last accepted per container VM.
    containers_reported: BTreeMap<String, api::StateReport>,
    /// How many vnics of owned namespaces the dataplane had after the last reconcile.
    attached: usize,
    counters: Counters,
}

/// Runs `fabric agent` until SIGTERM/SIGINT.
pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    let conn = api::Conn::new(api::parse_control_url(&args.control)?, args.tls_dir.clone())?;
    if uuid_ok(&args.server_uuid).is_none() {
        anyhow::bail!(
            "--server-uuid {:?} is not a lower-case UUID (expected e.g. 0f6c3e1e-...)",
            args.server_uuid
        );
    }
    if !(1..=60).contains(&args.poll_secs) {
        anyhow::bail!("--poll-secs {}: expected 1..=60", args.poll_secs);
    }
    let host = LinuxHost::open(&args.dataplane, &args.state_dir)
        .with_context(|| format!("state directory {}", args.state_dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(agent_loop(args, conn, host))
}

fn uuid_ok(s: &str) -> Option<()> {
    let b = s.as_bytes();
    (b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        }))
    .then_some(())
}

async fn agent_loop(args: AgentArgs, conn: api::Conn, host: LinuxHost) -> anyhow::Result<()> {
    let server = args.server_uuid.clone();
    tracing::info!(
        control = %args.control, server = %server, dataplane = %args.dataplane.display(),
        state_dir = %args.state_dir.display(), owned = host.owned().len(),
        "fabric agent starting"
    );
    // Every call is a stream of the one HTTP/2 connection: heartbeats never wait behind a
    // snapshot read or a report.
    let calls = Api::new(conn.clone(), &server);
    let state = Arc::new(Mutex::new(State {
        host,
        firewall: None,
        members: None,
        reported: BTreeMap::new(),
        containers_reported: BTreeMap::new(),
        attached: 0,
        counters: Counters::default(),
    }));

    let shim_exe = std::env::current_exe().context("finding this executable (for fabric shim)")?;
    let rt = Arc::new(runtime::Runtime::new(&args.data, &shim_exe));
    let containers = Containers::new(
        rt.clone(),
        Arc::new(runtime::prepare::ImgPreparer::new(
            Api::new(conn.clone(), &server),
            &rt.images_dir(),
        )),
    );
    // Shims that outlived an earlier agent: their exits wake a reconcile too.
    for vm in rt.list() {
        if matches!(rt.phase(&vm), runtime::Phase::Running { .. }) {
            tracing::info!(vm = %vm, "container running under a shim of an earlier agent");
            rt.adopt(&vm);
        }
    }
    let shim_exits = rt.exits();
    // The tunnel: attach, logs, exec and resize of this host's containers, on the one
    // connection to the control plane.
    let tunnel = tokio::spawn(tunnel::run(
        Api::new(conn.clone(), &server),
        Arc::new(runtime::streams::Streams::new(rt.clone())),
    ));

    // Whether the control plane answered the last call made to it (any of the three loops).
    let reachable = Arc::new(AtomicBool::new(false));

    // Heartbeats (every call shares the one HTTP/2 connection).
    let hb = {
        let calls = calls.clone();
        let reachable = reachable.clone();
        let every = Duration::from_secs(args.heartbeat_secs.max(1));
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                let r = calls.heartbeat().await;
                note(&reachable, &r);
                match r {
                    Ok(()) if failing => {
                        tracing::info!("heartbeat accepted again");
                        failing = false;
                    }
                    Ok(()) => {}
                    Err(e) if !failing => {
                        tracing::warn!(error = %e, "heartbeat failed");
                        failing = true;
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(every).await;
            }
        })
    };

    // Renewal of the host certificate (https only).
    let renewal = args.tls_dir.clone().map(|dir| {
        tokio::spawn(renew::run(
            Api::new(conn.clone(), &server),
            dir,
            server.clone(),
        ))
    });

    // The feed follower: a stream of the same connection beside the calls; wakes the main loop on any change.
    let wake = Arc::new(Notify::new());
    let (since_tx, since_rx) = watch::channel::<Option<u64>>(None);
    let feed = {
        let api = Api::new(conn, &server);
        let wait = Duration::from_secs(args.poll_secs);
        tokio::spawn(follow_feed(
            api,
            wait,
            since_rx,
            wake.clone(),
            reachable.clone(),
        ))
    };

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let resync = Duration::from_secs(args.resync_secs.max(1));
    let mut snapshot: Option<Snapshot> = None;
    let mut need_snapshot = true;
    let mut backoff = Backoff::default();
    let mut snapshot_failures = 0u64;
    let mut last_snapshot = Instant::now();
    let mut next_resync = Instant::now() + resync;
    loop {
        if need_snapshot {
            let r = calls.snapshot().await;
            note(&reachable, &r);
            match r {
                Ok(mut s) => {
                    if snapshot_failures > 0 {
                        tracing::info!(
                            failures = snapshot_failures,
                            "desired state readable again"
                        );
                        snapshot_failures = 0;
                    }
                    backoff.reset();
                    need_snapshot = false;
                    let seq = s.seq;
                    state.lock().await.counters.snapshots += 1;
                    reconcile(&state, &calls, &containers, &mut s).await;
                    snapshot = Some(s);
                    // The feed continues from the snapshot's position (never backwards).
                    since_tx.send_if_modified(|cur| {
                        if cur.is_none_or(|c| c < seq) {
                            *cur = Some(seq);
                            true
                        } else {
                            false
                        }
                    });
                    next_resync = Instant::now() + resync;
                    last_snapshot = Instant::now();
                }
                Err(e) => {
                    state.lock().await.counters.control_errors += 1;
                    let d = backoff.next_delay();
                    snapshot_failures += 1;
                    log_api_error(&e, "reading the desired state", d, snapshot_failures);
                    tokio::select! {
                        _ = tokio::time::sleep(d) => continue,
                        _ = sigterm.recv() => break,
                        _ = tokio::signal::ctrl_c() => break,
                    }
                }
            }
        }
        tokio::select! {
            _ = wake.notified() => need_snapshot = true,
            _ = tokio::time::sleep_until(next_resync.into()) => {
                // Local re-check against the last snapshot (the feed says when it is stale),
                // only while the control plane answers: while it does not, nothing changes.
                next_resync = Instant::now() + resync;
                if last_snapshot.elapsed() >= FULL_REREAD {
                    // Belt and braces: the feed is trusted, but a periodic full read bounds
                    // how long anything it missed could stay wrong.
                    need_snapshot = true;
                } else if reachable.load(Ordering::Relaxed) {
                    if let Some(s) = &mut snapshot {
                        reconcile(&state, &calls, &containers, s).await;
                    }
                }
            }
            _ = shim_exits.notified() => {
                // A container's process ended: report it now (`docker run --rm` waits on it).
                if let Some(s) = &mut snapshot {
                    reconcile(&state, &calls, &containers, s).await;
                }
            }
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    hb.abort();
    feed.abort();
    tunnel.abort();
    if let Some(r) = renewal {
        r.abort();
    }
    let c = state.lock().await.counters.clone();
    tracing::info!(
        reconciles = c.reconciles,
        actions = c.actions,
        failures = c.failures,
        reports = c.reports,
        snapshots = c.snapshots,
        control_errors = c.control_errors,
        dataplane_down = c.dataplane_down,
        "fabric agent stopping; namespaces and vnics are left as they are"
    );
    Ok(())
}

/// Records whether the control plane answered (any answer, error statuses included).
fn note<T>(reachable: &AtomicBool, r: &Result<T, ApiError>) {
    reachable.store(
        !matches!(r, Err(e) if e.is_unreachable()),
        Ordering::Relaxed,
    );
}

/// Logs a failed call: the first of a run of failures and every tenth after it at `warn`, the
/// others at `debug` (the backoff already spaces them to 5 s).
fn log_api_error(e: &ApiError, what: &str, retry_in: Duration, run: u64) {
    if run % 10 != 1 {
        tracing::debug!(error = %e, ?retry_in, failures = run, "{what} failed");
    } else if e.is_unreachable() {
        tracing::warn!(error = %e, ?retry_in, "{what}: control plane unreachable; changing nothing");
    } else {
        tracing::warn!(error = %e, ?retry_in, "{what} failed");
    }
}

/// Follows the change feed from the position `since` says (set by the main loop after each
/// snapshot) and wakes the main loop whenever there is a change for this server, or the
/// position is gone (410).
async fn follow_feed(
    api: Api,
    wait: Duration,
    mut since: watch::Receiver<Option<u64>>,
    wake: Arc<Notify>,
    reachable: Arc<AtomicBool>,
) {
    let mut backoff = Backoff::default();
    let mut failures = 0u64;
    loop {
        let Some(pos) = *since.borrow_and_update() else {
            if since.changed().await.is_err() {
                return;
            }
            continue;
        };
        let mut pos = pos;
        loop {
            if since.has_changed().unwrap_or(false) {
                // A newer snapshot moved the position forward.
                let n = *since.borrow_and_update();
                if let Some(n) = n.filter(|n| *n > pos) {
                    pos = n;
                }
            }
            let r = api.changes(pos, wait).await;
            note(&reachable, &r);
            match r {
                Ok(c) => {
                    if failures > 0 {
                        tracing::info!(failures, "change feed readable again");
                        failures = 0;
                    }
                    backoff.reset();
                    if !c.changes.is_empty() {
                        tracing::debug!(since = pos, next = c.next, n = c.changes.len(), "changes");
                        wake.notify_one();
                    }
                    pos = c.next.max(pos);
                }
                Err(ApiError::Gone(m)) => {
                    tracing::info!(since = pos, detail = %m, "feed position gone; reading the snapshot again");
                    wake.notify_one();
                    // Wait for the new snapshot's position.
                    if since.changed().await.is_err() {
                        return;
                    }
                    break;
                }
                Err(e) => {
                    let d = backoff.next_delay();
                    failures += 1;
                    log_api_error(&e, "following the change feed", d, failures);
                    tokio::time::sleep(d).await;
                }
            }
        }
    }
}

/// One reconcile against `snap`: observe, plan, execute (on a blocking thread), report.
/// Reports the control plane accepted are written into `snap` too, so that a re-check against
/// the same snapshot does not report them again.
async fn reconcile(
    state: &Arc<Mutex<State<LinuxHost>>>,
    calls: &Api,
    containers: &Containers,
    snap: &mut Snapshot,
) {
    let vms = snap.vms.clone();
    let fw = snap.firewall.clone();
    let members = snap.members.clone();
    let st = state.clone();
    let reports = tokio::task::spawn_blocking(move || {
        let mut guard = st.blocking_lock();
        reconcile_host(&mut guard, &vms, &fw, members.as_deref())
    })
    .await
    .unwrap_or_else(|e| {
        tracing::error!(error = %e, "reconcile panicked");
        Vec::new()
    });
    let mut reports = reports;
    let last = state.lock().await.containers_reported.clone();
    let (creports, cfail) = containers.reconcile(&snap.vms, &last).await;
    if cfail > 0 {
        state.lock().await.counters.failures += cfail;
    }
    reports.extend(creports);
    if reports.is_empty() {
        return;
    }
    let r = calls.report(&reports).await;
    let mut st = state.lock().await;
    match r {
        Ok(ans) => {
            for rep in &reports {
                tracing::info!(vm = %rep.uuid, state = rep.state.as_str(), reason = rep.reason.as_deref().unwrap_or(""), "reported");
                st.reported
                    .insert(rep.uuid.clone(), (rep.state, rep.reason.clone()));
                if snap
                    .vms
                    .iter()
                    .any(|v| v.uuid == rep.uuid && v.container.is_some())
                {
                    st.containers_reported.insert(rep.uuid.clone(), rep.clone());
                }
                if let Some(vm) = snap.vms.iter_mut().find(|v| v.uuid == rep.uuid) {
                    vm.state = rep.state.as_str().to_owned();
                }
            }
            st.counters.reports += reports.len() as u64;
            if !ans.ignored.is_empty() {
                tracing::info!(ignored = ?ans.ignored, "control plane ignored reports (VMs no longer on this server)");
            }
        }
        Err(e) => {
            st.counters.control_errors += 1;
            tracing::warn!(error = %e, n = reports.len(), "state report failed; will report again");
        }
    }
}

/// The synchronous part of a reconcile. Returns the reports to send.
fn reconcile_host<H: Host>(
    st: &mut State<H>,
    vms: &[api::Vm],
    fw: &FirewallState,
    members: Option<&[std::net::IpAddr]>,
) -> Vec<api::StateReport> {
    st.counters.reconciles += 1;
    let mut actual = match st.host.observe() {
        Ok(a) => a,
        Err(e) => {
            st.counters.dataplane_down += 1;
            if e.is_dataplane_down() {
                // A restarted dataplane has forgotten the firewall (and members) too.
                st.firewall = None;
                st.members = None;
            }
            tracing::warn!(error = %e, "cannot observe the host; reconcile skipped");
            return Vec::new();
        }
    };
    let ours = actual
        .dataplane
        .iter()
        .filter(|v| actual.owned.contains(&v.netns))
        .count();
    if ours < st.attached {
        // Vnics vanished from the dataplane: it restarted (or someone removed them). Its
        // firewall state may be older than ours: apply again.
        tracing::info!(
            had = st.attached,
            now = ours,
            "dataplane lost vnics; re-attaching and re-applying the firewall"
        );
        st.firewall = None;
        st.members = None;
    }
    if let Err(e) = host::sync_members(&mut st.host, &mut st.members, members) {
        st.counters.failures += 1;
        tracing::warn!(error = %e, "pushing the member set failed; will retry");
    }
    actual.firewall = st.firewall.clone();
    actual.reported = st.reported.clone();
    let actions = plan::plan(vms, fw, &actual);
    if actions.is_empty() {
        st.attached = ours;
        return Vec::new();
    }
    let out = host::execute(&mut st.host, &actions, fw, &st.reported);
    if out.firewall_applied {
        st.firewall = Some(fw.clone());
    }
    st.counters.actions += out.done as u64;
    st.counters.failures += out.failed as u64;
    st.attached = st
        .host
        .observe()
        .map(|a| {
            a.dataplane
                .iter()
                .filter(|v| a.owned.contains(&v.netns))
                .count()
        })
        .unwrap_or(0);
    let c = &st.counters;
    if out.done + out.failed > 0 {
        tracing::info!(
            done = out.done,
            failed = out.failed,
            skipped = out.skipped,
            total_actions = c.actions,
            total_failures = c.failures,
            total_reports = c.reports,
            "reconciled"
        );
    }
    out.reports
}

/// The container part of a reconcile: the runtime and how bundles are made.
pub struct Containers {
    rt: Arc<runtime::Runtime>,
    prep: Arc<dyn runtime::Preparer>,
}

impl Containers {
    /// The container step over runtime `rt`, making bundles with `prep`.
    pub fn new(rt: Arc<runtime::Runtime>, prep: Arc<dyn runtime::Preparer>) -> Containers {
        Containers { rt, prep }
    }

    /// Brings each container VM of `vms` whose namespace is in place to what it asks, removes
    /// containers of VMs no longer here, and returns the reports that differ from `last` (or
    /// from what the control plane shows), with the number of failed steps.
    pub async fn reconcile(
        &self,
        vms: &[api::Vm],
        last: &BTreeMap<String, api::StateReport>,
    ) -> (Vec<api::StateReport>, u64) {
        let rt = &self.rt;
        let mut failed = 0u64;
        let wanted: std::collections::BTreeSet<&str> = vms
            .iter()
            .filter(|v| v.container.is_some())
            .map(|v| v.uuid.as_str())
            .collect();
        for gone in rt
            .list()
            .into_iter()
            .filter(|v| !wanted.contains(v.as_str()))
        {
            let rt2 = rt.clone();
            let vm = gone.clone();
            match tokio::task::spawn_blocking(move || rt2.remove(&vm)).await {
                Ok(Ok(())) => tracing::info!(vm = %gone, "container removed"),
                Ok(Err(e)) => {
                    failed += 1;
                    tracing::warn!(vm = %gone, error = %e, "removing the container failed")
                }
                Err(e) => tracing::error!(error = %e, "container removal panicked"),
            }
        }
        let mut out = Vec::new();
        for vm in vms.iter().filter(|v| v.container.is_some()) {
            if !std::path::Path::new("/run/netns").join(&vm.uuid).exists() {
                // Its network is not in place (or failed, and was reported so).
                continue;
            }
            let failure = match self.step(vm).await {
                Ok(()) => None,
                Err(e) => {
                    failed += 1;
                    tracing::warn!(vm = %vm.uuid, error = %e, "container step failed");
                    Some(e)
                }
            };
            let rep = report_of(vm, &rt.phase(&vm.uuid), failure);
            let shown = vm.state == rep.state.as_str()
                && (rep.generation.is_none() || vm.run_generation == rep.generation);
            if last.get(&vm.uuid) != Some(&rep) || !shown {
                out.push(rep);
            }
        }
        (out, failed)
    }

    async fn step(&self, vm: &api::Vm) -> Result<(), String> {
        let rt = &self.rt;
        let Some(spec) = &vm.container else {
            return Ok(());
        };
        let phase = rt.phase(&vm.uuid);
        let view = plan::ContainerView {
            prepared: !matches!(phase, runtime::Phase::Absent),
            running: matches!(phase, runtime::Phase::Running { .. }),
            started: phase.generation(),
            signal_done: rt.signal_done(&vm.uuid),
        };
        let actions = plan::container_actions(vm, &view)?;
        for a in actions {
            tracing::info!(vm = %vm.uuid, action = ?a, "container");
            match a {
                plan::ContainerAction::Prepare => {
                    let dir = rt.create_dir(&vm.uuid).map_err(|e| e.to_string())?;
                    self.prep.prepare(vm, &dir.join("bundle")).await?;
                    // Kills from before the container existed are not for it.
                    let id = vm.signal.as_ref().map_or(0, |s| s.id);
                    rt.set_signal_done(&vm.uuid, id)
                        .map_err(|e| e.to_string())?;
                    rt.mark_prepared(&vm.uuid).map_err(|e| e.to_string())?;
                }
                plan::ContainerAction::Start { generation } => {
                    // The last run's shim may still be finishing (runc delete, its clients):
                    // a restart waits for it rather than failing.
                    let dir = rt.dir(&vm.uuid);
                    let t = std::time::Instant::now();
                    while runtime::shim_alive(&dir) && t.elapsed() < Duration::from_secs(5) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    rt.start(&vm.uuid, spec, generation)
                        .map_err(|e| e.to_string())?
                }
                plan::ContainerAction::Stop { timeout } => rt
                    .stop(&vm.uuid, timeout)
                    .await
                    .map_err(|e| e.to_string())?,
                plan::ContainerAction::Signal { id, signal } => {
                    // Remembered first: a signal is delivered at most once.
                    rt.set_signal_done(&vm.uuid, id)
                        .map_err(|e| e.to_string())?;
                    rt.signal(&vm.uuid, &signal)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                plan::ContainerAction::SkipSignal { id } => rt
                    .set_signal_done(&vm.uuid, id)
                    .map_err(|e| e.to_string())?,
            }
        }
        Ok(())
    }
}

/// The contract's report of a container VM from where its process is.
fn report_of(vm: &api::Vm, phase: &runtime::Phase, failure: Option<String>) -> api::StateReport {
    let mut r = api::StateReport::vm(vm.uuid.clone(), VmState::Stopped, None);
    if let Some(e) = failure {
        r.state = VmState::Failed;
        r.reason = Some(e);
        return r;
    }
    match phase {
        runtime::Phase::Running { state } => {
            r.state = VmState::Running;
            r.started_at = state.started_ms;
            r.generation = Some(state.generation);
        }
        runtime::Phase::Exited { state } => {
            r.exit_status = state.exit_status;
            r.started_at = state.started_ms;
            r.finished_at = state.finished_ms;
            r.generation = Some(state.generation);
        }
        runtime::Phase::Lost { state } => {
            r.reason =
                Some("the container's shim ended without recording how its process ended".into());
            r.started_at = state.started_ms;
            r.generation = Some(state.generation);
        }
        runtime::Phase::Prepared | runtime::Phase::Absent => {}
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_five_seconds_and_resets() {
        let mut b = Backoff::default();
        let seq: Vec<u64> = (0..7).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(seq, vec![200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.next_delay(), BACKOFF_MIN);
    }

    #[test]
    fn server_uuid_must_be_lower_case() {
        assert!(uuid_ok("0f6c3e1e-1111-4222-8333-444455556666").is_some());
        assert!(uuid_ok("0F6C3E1E-1111-4222-8333-444455556666").is_none());
        assert!(uuid_ok("0f6c3e1e11114222833344445555666600").is_none());
        assert!(uuid_ok("").is_none());
    }
}
