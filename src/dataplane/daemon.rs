//! `fabric dataplane`: the per-host daemon.
//!
//! Threads:
//! - **worker** (one hot thread): epoll over every vnic's TAP and the underlay socket. From a
//!   TAP it reads `virtio_net_hdr` + frame (64 KB TSO super-frames when the container's stack
//!   uses the offloads), segments it in userspace with room for the VXLAN header before each
//!   segment, runs the core on each segment (which writes the VXLAN header in place) and sends
//!   the segments of one super-frame as one `UDP_SEGMENT` (GSO) transmit when they share a
//!   destination. From the underlay it receives `recvmmsg` batches (with `UDP_GRO`), runs the
//!   core on every datagram and coalesces consecutive same-flow TCP segments into one TAP
//!   write with a `virtio_net_hdr`. It owns the core: vnic table, VL2/VL3 caches, held frames,
//!   firewall rule sets and the connection-tracking table.
//! - **tokio runtime**: the control socket, the resolver (one task per lookup on the Portolan
//!   SVP client), the shootdown poller, and firewall compilation.
//!
//! Why one hot thread and not one per direction: the stateful firewall must see both
//! directions of a flow (a reply must meet the state its request created), so a flow's two
//! directions belong to one thread. Scaling out means more workers, each owning a group of
//! vnics with both their directions (multi-queue TAP, the underlay receiver handing frames to
//! the owning worker); that is not built yet.
//!
//! The hot thread takes no lock: vnic changes, firewall rule sets, lookup answers and
//! shootdowns reach it as messages (`std::sync::mpsc` plus an eventfd to wake its epoll).
//! Rule sets are immutable `Arc`s swapped between two packets; connection tracking re-checks a
//! flow against the new set on its next packet.

use super::control::{
    self, ConntrackInfo, ControlStats, FwApplied, FwListing, FwRuleLine, FwVnicSummary, Request,
    RequestError, ResolverStats, Stats, VnicAddSpec, VnicInfo, VnicState,
};
use crate::core::{
    proxy, Config, Core, Counters, DropReason, FrameBuf, LookupAnswer, LookupError, LookupKey,
    Output, Verdict, Vl3Mapping, VnicConfig, VnicError, VnicId,
};
use crate::firewall::compile::{Direction, Firewall, FirewallState, VnicRuleSet};
use crate::firewall::conntrack::ConntrackStats;
use crate::io::fdpass;
use crate::io::netlink::Netns;
use crate::io::offload::{self, TcpCoalescer, VirtioNetHdr, VIRTIO_NET_HDR_LEN};
use crate::io::poll::{Events, Interest, Poller, Waker};
use crate::io::tap::{Offloads, Tap};
use crate::io::underlay::{RecvMeta, Transmit, Underlay, UnderlayConfig};
use crate::wire::{vxlan, Mac, Vni};
use anyhow::{anyhow, bail, Context as _};
use rustc_hash::FxHashSet;
use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

/// Arguments of `fabric dataplane`.
#[derive(Debug, Clone, clap::Args)]
pub struct DataplaneArgs {
    /// Underlay address to receive VXLAN on, `IP` or `IP:PORT` (port 4789 by default). Portolan
    /// must map this host's cn_uuid to the same IP and port.
    #[arg(long, value_name = "IP[:PORT]")]
    pub underlay: String,
    /// Portolan (SVP) server, `HOST:PORT`.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:1296")]
    pub portolan: String,
    /// This host's server (compute-node) UUID, its identity in Portolan.
    #[arg(long = "server-uuid", visible_alias = "cn-uuid", value_name = "UUID")]
    pub cn_uuid: String,
    /// Path of the local control socket (JSON lines) used by the agent, `fabric vnic` and
    /// `fabric stats`.
    #[arg(
        long = "dataplane",
        visible_alias = "control",
        value_name = "PATH",
        default_value = "/run/fabric/dataplane.sock"
    )]
    pub control: PathBuf,
    /// How often to poll Portolan's event log for shootdowns, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    pub poll_interval_ms: u64,
    /// UDP port of VXLAN peers that are not fabric hosts (Linux vxlan), for ARP answers sent back
    /// to them.
    #[arg(long, value_name = "PORT", default_value_t = vxlan::PORT)]
    pub peer_port: u16,
    /// A member of the underlay: VXLAN is accepted only from the `--peer` addresses (other
    /// sources are dropped, counted as `not_member`); repeatable; none given accepts every
    /// source. Their ARP requests over VXLAN are answered on every VNI (foreign peers such as
    /// Linux vxlan hosts); other sources only once a mapping on that VNI lives at their
    /// address. Answers are rate-limited per source either way. The `members` control request
    /// (sent by the agent) replaces the set.
    #[arg(long = "peer", value_name = "IP")]
    pub peers: Vec<std::net::IpAddr>,
    /// Speak SVP over TLS to Portolan with this host's certificate: DIR/ca.pem (the cluster
    /// CA), DIR/cert.pem and DIR/key.pem, re-read at every reconnect (renewals).
    #[arg(long, value_name = "DIR")]
    pub portolan_tls: Option<PathBuf>,
    /// Timeout of one Portolan query, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub lookup_timeout_ms: u64,
    /// Keep the firewall state (the last document `fabric fw apply` sent, with its generation)
    /// in this file: written atomically before an apply is acknowledged, loaded at start, so
    /// vnics attached after a restart are filtered from their first frame instead of running
    /// open until the state is sent again. A file that does not validate stops the start.
    #[arg(long, value_name = "PATH")]
    pub firewall_state: Option<PathBuf>,
    /// Longest control request line, in bytes; a longer one is refused with an error and its
    /// connection closed (the largest request is `fw apply` with the whole firewall document).
    #[arg(long, value_name = "BYTES", default_value_t = control::MAX_REQUEST_BYTES)]
    pub control_max_request_bytes: usize,
    /// Time a control client has to send a whole request line once it started, in
    /// milliseconds (also the time a reply may take to be written).
    #[arg(long, value_name = "MS", default_value_t = control::REQUEST_READ_TIMEOUT.as_millis() as u64)]
    pub control_read_timeout_ms: u64,
    /// Most control connections served at once; further ones get an error and are closed.
    #[arg(long, value_name = "N", default_value_t = control::MAX_CONNECTIONS)]
    pub control_max_conns: usize,
}

/// What `--firewall-state` holds.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedFirewall {
    generation: u64,
    state: FirewallState,
}

/// Loads a saved firewall state (`None` if the file does not exist).
fn load_firewall(path: &std::path::Path) -> anyhow::Result<Option<FwState>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let saved: SavedFirewall = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a saved firewall state", path.display()))?;
    let fw = Firewall::new(&saved.state)
        .map_err(|e| anyhow!("{}: firewall state rejected: {e}", path.display()))?;
    Ok(Some(FwState {
        state: saved.state,
        fw: Some(fw),
        generation: saved.generation,
    }))
}

/// Writes the firewall state atomically (temp file, fsync, rename).
fn save_firewall(
    path: &std::path::Path,
    generation: u64,
    state: &FirewallState,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let body = serde_json::to_vec(&serde_json::json!({"generation": generation, "state": state}))?;
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(&body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

const WAKE_TOKEN: u64 = u64::MAX;
const UNDERLAY_TOKEN: u64 = u64::MAX - 1;
/// Receive batches taken per wake-up before the TAPs get their turn.
const UNDERLAY_BATCH_BUDGET: usize = 8;
const TAP_READ_BUDGET: usize = 64;
const RECV_BATCH: usize = 16;
const RECV_SLOT: usize = 65_536;
const TICK: Duration = Duration::from_millis(100);
const ZERO_VNET_HDR: [u8; VIRTIO_NET_HDR_LEN] = [0; VIRTIO_NET_HDR_LEN];

/// Counters the threads keep besides the core's.
#[derive(Debug, Default, Clone)]
struct IoCounters {
    tap_malformed: u64,
    tap_read_errors: u64,
    underlay_send_errors: u64,
    tap_write_errors: u64,
    garps: u64,
    /// Zero-length datagrams on the underlay.
    underlay_empty: u64,
    /// Datagrams the kernel cut to the receive slot (`MSG_TRUNC`).
    underlay_truncated: u64,
}

/// A TAP the worker stopped polling after a read error, and why.
#[derive(Debug, Clone)]
struct TapFailure {
    id: VnicId,
    since_unix_ms: u64,
    error: String,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, Default)]
struct WorkerStats {
    global: Counters,
    vnics: Vec<(VnicId, Counters)>,
    io: IoCounters,
    conntrack: Option<(ConntrackStats, usize)>,
    tap_failures: Vec<TapFailure>,
}

enum Cmd {
    AddVnic {
        cfg: VnicConfig,
        tap: Arc<Tap>,
        /// The vnic's filter (`None`: unfiltered).
        rules: Option<Arc<VnicRuleSet>>,
        reply: oneshot::Sender<Result<VnicId, VnicError>>,
    },
    /// Replace the member set (between two batches) and the ARP-answered peers with it.
    SetMembers {
        members: Option<Vec<IpAddr>>,
        reply: oneshot::Sender<Option<usize>>,
    },
    /// Swap the filters of these vnics (all at once, between two frames).
    SetFirewall {
        sets: Vec<(VnicId, Option<Arc<VnicRuleSet>>)>,
        reply: oneshot::Sender<()>,
    },
    RemoveVnic {
        id: VnicId,
        reply: oneshot::Sender<()>,
    },
    Answer(LookupAnswer),
    InvalidateVl2 {
        vni: Vni,
        mac: Mac,
    },
    Vl3Changed {
        vni: Vni,
        ip: IpAddr,
    },
    Stats {
        reply: oneshot::Sender<WorkerStats>,
    },
    Shutdown,
}

/// A handle to the worker thread: a command queue plus the eventfd that wakes its epoll.
#[derive(Clone)]
struct WorkerHandle {
    tx: mpsc::Sender<Cmd>,
    waker: Arc<Waker>,
}

impl WorkerHandle {
    fn send(&self, c: Cmd) {
        if self.tx.send(c).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

fn write_tap(tap: &Tap, frame: &[u8], io: &mut IoCounters) {
    match tap.write_vectored(&[IoSlice::new(&ZERO_VNET_HDR), IoSlice::new(frame)]) {
        Ok(Some(_)) => {}
        Ok(None) | Err(_) => io.tap_write_errors += 1,
    }
}

fn send_one(u: &Underlay, dst: SocketAddr, flow_hash: u32, d: &[u8], io: &mut IoCounters) {
    let t = Transmit {
        dst,
        segment_size: None,
        contents: d,
        flow_hash,
    };
    if u.send(&[t]).is_err() {
        io.underlay_send_errors += 1;
    }
}

// ----- the worker thread -------------------------------------------------------------------

/// The hot thread: owns the core (vnic table, caches, held frames, firewall and connection
/// tracking), every TAP and the underlay receive socket. Both directions of every flow pass
/// through it, which the stateful firewall needs (a reply must meet the state its request
/// created).
struct Worker {
    core: Core,
    taps: Vec<Option<Arc<Tap>>>,
    underlay: Arc<Underlay>,
    poller: Poller,
    waker: Arc<Waker>,
    rx: mpsc::Receiver<Cmd>,
    lookups: tokio::sync::mpsc::UnboundedSender<LookupKey>,
    garp_pending: FxHashSet<(Vni, IpAddr)>,
    io: IoCounters,
    /// TAPs no longer polled after a read error (until `vnic rm`).
    tap_failures: Vec<TapFailure>,
    peer_port: u16,
    /// TAP read buffer (virtio_net_hdr + up to a 64 KB super-frame).
    rd: Vec<u8>,
    /// Segments of one super-frame, each behind VXLAN headroom.
    seg: Vec<u8>,
    verdicts: Vec<(Verdict, usize, usize)>,
    /// Underlay receive slots (`RECV_BATCH` × 64 KB, GRO super-datagrams).
    big: Vec<u8>,
    /// Coalesced TCP super-frame for one TAP write.
    sup: Vec<u8>,
    meta: [RecvMeta; RECV_BATCH],
}

impl Worker {
    fn run(mut self) {
        let mut events = Events::with_capacity(64);
        let mut last_tick = Instant::now();
        loop {
            let _ = self.poller.wait(&mut events, Some(TICK));
            let now = Instant::now();
            // Copy the ready tokens out (no allocation) so `self` is free while handling them.
            let mut ready = [0u64; 64];
            let mut nready = 0;
            for e in events.iter().filter(|e| e.readable).take(ready.len()) {
                ready[nready] = e.token;
                nready += 1;
            }
            for &token in &ready[..nready] {
                match token {
                    WAKE_TOKEN => self.waker.reset(),
                    UNDERLAY_TOKEN => self.drain_underlay(now),
                    t => self.drain_tap(VnicId(t as u32), now),
                }
            }
            while let Ok(cmd) = self.rx.try_recv() {
                if !self.command(cmd, now) {
                    return;
                }
            }
            while let Some(key) = self.core.poll_lookup() {
                if self.lookups.send(key).is_err() {
                    // The resolver is gone (shutting down): fail the lookup at once.
                    self.core.handle_answer(failed_answer(key), now);
                }
            }
            self.flush_outputs();
            if now.duration_since(last_tick) >= TICK {
                last_tick = now;
                self.core.handle_timeout(now);
            }
        }
    }

    fn command(&mut self, cmd: Cmd, now: Instant) -> bool {
        match cmd {
            Cmd::AddVnic {
                cfg,
                tap,
                rules,
                reply,
            } => {
                let r = self.core.add_vnic(cfg);
                if let Ok(id) = r {
                    let slot = id.0 as usize;
                    if self.taps.len() <= slot {
                        self.taps.resize(slot + 1, None);
                    }
                    if self
                        .poller
                        .add(tap.as_fd(), u64::from(id.0), Interest::Read)
                        .is_err()
                    {
                        let _ = self.core.remove_vnic(id);
                        let _ = reply.send(Err(VnicError::NoSuchVnic(id)));
                        return true;
                    }
                    // Before the first frame can be read: no unfiltered window.
                    let _ = self.core.set_firewall(id, rules);
                    self.taps[slot] = Some(tap);
                }
                let _ = reply.send(r);
            }
            Cmd::RemoveVnic { id, reply } => {
                if let Some(tap) = self.taps.get_mut(id.0 as usize).and_then(Option::take) {
                    let _ = self.poller.delete(tap.as_fd());
                }
                self.tap_failures.retain(|f| f.id != id);
                let _ = self.core.remove_vnic(id);
                let _ = reply.send(());
            }
            Cmd::SetMembers { members, reply } => {
                if let Some(m) = &members {
                    self.core.set_underlay_peers(m.iter().copied());
                }
                self.core.set_members(members);
                let _ = reply.send(self.core.member_count());
            }
            Cmd::SetFirewall { sets, reply } => {
                for (id, rules) in sets {
                    let _ = self.core.set_firewall(id, rules);
                }
                let _ = reply.send(());
            }
            Cmd::Answer(ans) => {
                let garp = match &ans {
                    LookupAnswer::Vl3 {
                        vni,
                        ip,
                        result: Ok(Some(m)),
                    } if self.garp_pending.remove(&(*vni, *ip)) => Some((*vni, *ip, m.mac)),
                    LookupAnswer::Vl3 { vni, ip, .. } => {
                        self.garp_pending.remove(&(*vni, *ip));
                        None
                    }
                    _ => None,
                };
                self.core.handle_answer(ans, now);
                if let Some((vni, IpAddr::V4(ip), mac)) = garp {
                    let frame = proxy::gratuitous_arp(mac, ip);
                    let targets: Vec<VnicId> = self
                        .core
                        .vnics()
                        .filter(|(_, c)| c.vni == vni && c.mac != mac)
                        .map(|(id, _)| id)
                        .collect();
                    for id in targets {
                        if let Some(Some(tap)) = self.taps.get(id.0 as usize) {
                            write_tap(tap, &frame, &mut self.io);
                            self.io.garps += 1;
                        }
                    }
                }
            }
            Cmd::InvalidateVl2 { vni, mac } => {
                self.core.invalidate_vl2(vni, mac);
            }
            Cmd::Vl3Changed { vni, ip } => {
                self.core.invalidate_vl3(vni, ip);
                // Re-resolve only if some local vnic is on that segment (someone may care).
                if self.core.vnics().any(|(_, c)| c.vni == vni) {
                    self.garp_pending.insert((vni, ip));
                    self.core.resolve(LookupKey::Vl3 { vni, ip }, now);
                }
            }
            Cmd::Stats { reply } => {
                let _ = reply.send(WorkerStats {
                    global: self.core.counters().clone(),
                    vnics: self
                        .core
                        .vnics()
                        .map(|(id, _)| {
                            (id, self.core.vnic_counters(id).cloned().unwrap_or_default())
                        })
                        .collect(),
                    io: self.io.clone(),
                    conntrack: self.core.conntrack_stats(),
                    tap_failures: self.tap_failures.clone(),
                });
            }
            Cmd::Shutdown => return false,
        }
        true
    }

    fn flush_outputs(&mut self) {
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::Underlay {
                    dst,
                    flow_hash,
                    datagram,
                } => send_one(&self.underlay, dst, flow_hash, &datagram, &mut self.io),
                Output::Vnic { vnic, frame } => {
                    if let Some(Some(tap)) = self.taps.get(vnic.0 as usize) {
                        write_tap(tap, &frame, &mut self.io);
                    }
                }
            }
        }
    }

    // ----- vnic → underlay -------------------------------------------------------------------

    fn drain_tap(&mut self, id: VnicId, now: Instant) {
        let Some(tap) = self.taps.get(id.0 as usize).cloned().flatten() else {
            return;
        };
        for _ in 0..TAP_READ_BUDGET {
            let n = match tap.read(&mut self.rd) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    // The device is gone or broken (e.g. its namespace was deleted without
                    // `vnic rm`): stop polling it, or level-triggered epoll would spin on the
                    // error. The vnic stays attached (listed as gone) until `vnic rm`.
                    self.io.tap_read_errors += 1;
                    let _ = self.poller.delete(tap.as_fd());
                    if !self.tap_failures.iter().any(|f| f.id == id) {
                        self.tap_failures.push(TapFailure {
                            id,
                            since_unix_ms: unix_ms(SystemTime::now()),
                            error: e.to_string(),
                        });
                    }
                    tracing::warn!(vnic = id.0, error = %e, "TAP read failed; vnic no longer polled");
                    break;
                }
            };
            self.process_tap_frame(id, n, now);
        }
    }

    fn process_tap_frame(&mut self, id: VnicId, n: usize, now: Instant) {
        let Some(hdr) = VirtioNetHdr::decode(&self.rd[..n]) else {
            self.io.tap_malformed += 1;
            return;
        };
        let frame = &self.rd[VIRTIO_NET_HDR_LEN..n];
        let segs = if hdr.is_plain() {
            // A plain frame with complete checksums: nothing to interpret, whatever its
            // protocol (the core judges it). Copy it behind the VXLAN headroom.
            let h = vxlan::HEADER_LEN;
            self.seg[h..h + frame.len()].copy_from_slice(frame);
            offload::Segments {
                count: 1,
                stride: h + frame.len(),
                headroom: h,
                seg_len: frame.len(),
                last_len: frame.len(),
            }
        } else {
            match offload::segment(&hdr, frame, vxlan::HEADER_LEN, &mut self.seg) {
                Ok(s) => s,
                Err(_) => {
                    self.io.tap_malformed += 1;
                    return;
                }
            }
        };
        self.verdicts.clear();
        let mut common: Option<(SocketAddr, u32)> = None;
        let mut uniform = true;
        for i in 0..segs.count {
            let r = segs.frame_range(i);
            let Some(mut buf) = FrameBuf::new(&mut self.seg, r.start, r.len()) else {
                uniform = false;
                continue;
            };
            let v = self.core.from_vnic(id, &mut buf, now);
            self.verdicts.push((v, buf.start(), buf.len()));
            match v {
                Verdict::ToUnderlay { dst, flow_hash } if i == 0 => common = Some((dst, flow_hash)),
                Verdict::ToUnderlay { dst, .. } if common.map(|c| c.0) == Some(dst) => {}
                _ => uniform = false,
            }
        }
        if let (true, Some((dst, flow_hash))) = (uniform, common) {
            // Every segment was encapsulated in place, in its own headroom: the buffer is one
            // GSO super-datagram of `stride`-byte VXLAN datagrams.
            let t = Transmit {
                dst,
                segment_size: (segs.count > 1).then_some(segs.stride),
                contents: &self.seg[..segs.total_len()],
                flow_hash,
            };
            if self.underlay.send(&[t]).is_err() {
                self.io.underlay_send_errors += 1;
            }
            return;
        }
        for &(v, start, len) in &self.verdicts {
            let bytes = &self.seg[start..start + len];
            match v {
                Verdict::ToUnderlay { dst, flow_hash } => {
                    send_one(&self.underlay, dst, flow_hash, bytes, &mut self.io)
                }
                Verdict::ToVnic(to) | Verdict::Reply(to) => {
                    if let Some(Some(tap)) = self.taps.get(to.0 as usize) {
                        write_tap(tap, bytes, &mut self.io);
                    }
                }
                Verdict::Held | Verdict::Drop(_) => {}
            }
        }
    }

    // ----- underlay → vnic -------------------------------------------------------------------

    /// Receives what the underlay socket has queued (a bounded number of batches, so TAPs get
    /// their turn) and delivers it.
    fn drain_underlay(&mut self, now: Instant) {
        for _ in 0..UNDERLAY_BATCH_BUDGET {
            let got = {
                let mut chunks = self.big.chunks_mut(RECV_SLOT);
                let mut bufs: [IoSliceMut<'_>; RECV_BATCH] = std::array::from_fn(|_| {
                    IoSliceMut::new(chunks.next().expect("RECV_BATCH slots"))
                });
                // An error (e.g. ICMP-reported unreachable peer) loses nothing queued: go on.
                self.underlay
                    .try_recv(&mut bufs, &mut self.meta)
                    .unwrap_or_default()
            };
            if got == 0 {
                return;
            }
            self.deliver_batch(got, now);
            if got < RECV_BATCH {
                return;
            }
        }
    }

    fn deliver_batch(&mut self, got: usize, now: Instant) {
        let Worker {
            core,
            taps,
            underlay,
            io,
            big,
            sup,
            meta,
            peer_port,
            ..
        } = self;
        let mut co = TcpCoalescer::new(&mut sup[..]);
        let mut pending_for: Option<VnicId> = None;
        for (s, m) in meta[..got].iter().enumerate() {
            // Neither can hold a VXLAN frame; count them so a flood of them is visible.
            if m.truncated {
                io.underlay_truncated += 1;
                continue;
            }
            if m.len == 0 {
                io.underlay_empty += 1;
                continue;
            }
            let slot = &mut big[s * RECV_SLOT..s * RECV_SLOT + m.len];
            let stride = if m.stride == 0 { m.len } else { m.stride };
            // The peer's VXLAN port, for ARP answers (its source port is arbitrary).
            let src = SocketAddr::new(m.src.ip(), *peer_port);
            let mut off = 0;
            while off < m.len {
                let len = stride.min(m.len - off);
                let Some(mut buf) = FrameBuf::new(slot, off, len) else {
                    break;
                };
                let v = core.from_underlay(src, &mut buf, now);
                let (start, flen) = (buf.start(), buf.len());
                match v {
                    Verdict::ToVnic(to) => {
                        let inner = &slot[start..start + flen];
                        if pending_for != Some(to) {
                            if let (Some(prev), Some(f)) = (pending_for, co.finish()) {
                                if let Some(Some(tap)) = taps.get(prev.0 as usize) {
                                    write_raw(tap, f, io);
                                }
                            }
                            pending_for = Some(to);
                        }
                        let tap = taps.get(to.0 as usize).and_then(Option::as_ref);
                        loop {
                            match co.push(inner) {
                                offload::Push::Started | offload::Push::Merged => break,
                                offload::Push::Flush => {
                                    if let (Some(f), Some(tap)) = (co.finish(), tap) {
                                        write_raw(tap, f, io);
                                    }
                                }
                                offload::Push::Bypass => {
                                    if let Some(tap) = tap {
                                        if let Some(f) = co.finish() {
                                            write_raw(tap, f, io);
                                        }
                                        write_tap(tap, inner, io);
                                    }
                                    break;
                                }
                            }
                        }
                    }
                    Verdict::ToUnderlay { dst, flow_hash } => {
                        send_one(underlay, dst, flow_hash, &slot[start..start + flen], io)
                    }
                    _ => {}
                }
                off += stride;
            }
        }
        if let (Some(prev), Some(f)) = (pending_for, co.finish()) {
            if let Some(Some(tap)) = taps.get(prev.0 as usize) {
                write_raw(tap, f, io);
            }
        }
    }
}

fn failed_answer(key: LookupKey) -> LookupAnswer {
    let err = Err(LookupError::Unreachable("resolver stopped".into()));
    match key {
        LookupKey::Vl2 { vni, mac } => LookupAnswer::Vl2 {
            vni,
            mac,
            result: err,
        },
        LookupKey::Vl3 { vni, ip } => LookupAnswer::Vl3 {
            vni,
            ip,
            result: Err(LookupError::Unreachable("resolver stopped".into())),
        },
    }
}

fn write_raw(tap: &Tap, with_hdr: &[u8], io: &mut IoCounters) {
    match tap.write(with_hdr) {
        Ok(Some(_)) => {}
        Ok(None) | Err(_) => io.tap_write_errors += 1,
    }
}

// ----- resolver ----------------------------------------------------------------------------

#[derive(Debug, Default)]
struct ResolverCounters {
    lookups: AtomicU64,
    not_found: AtomicU64,
    failed: AtomicU64,
    log_polls: AtomicU64,
    log_errors: AtomicU64,
    vl2_shootdowns: AtomicU64,
    vl3_shootdowns: AtomicU64,
}

fn mapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

async fn lookup(
    client: &portolan::client::Client,
    key: LookupKey,
    rc: &ResolverCounters,
) -> LookupAnswer {
    rc.lookups.fetch_add(1, Ordering::Relaxed);
    let err = |e: portolan::client::ClientError| match e {
        portolan::client::ClientError::Timeout { .. } => LookupError::Timeout,
        portolan::client::ClientError::Unavailable { .. } => {
            LookupError::Unreachable(e.to_string())
        }
        e => LookupError::Failed(e.to_string()),
    };
    let ans = match key {
        LookupKey::Vl2 { vni, mac } => LookupAnswer::Vl2 {
            vni,
            mac,
            result: client
                .vl2(portolan::svp::Mac(mac.0), vni.get())
                .await
                .map(|o| o.map(|r| SocketAddr::new(mapped(r.underlay_ip), r.underlay_port)))
                .map_err(err),
        },
        LookupKey::Vl3 { vni, ip } => LookupAnswer::Vl3 {
            vni,
            ip,
            result: client
                .vl3(ip, vni.get())
                .await
                .map(|o| {
                    o.map(|r| Vl3Mapping {
                        mac: Mac(r.mac.0),
                        underlay: SocketAddr::new(mapped(r.underlay_ip), r.underlay_port),
                    })
                })
                .map_err(err),
        },
    };
    let failed = matches!(
        &ans,
        LookupAnswer::Vl2 { result: Err(_), .. } | LookupAnswer::Vl3 { result: Err(_), .. }
    );
    let nf = matches!(
        &ans,
        LookupAnswer::Vl2 {
            result: Ok(None),
            ..
        } | LookupAnswer::Vl3 {
            result: Ok(None),
            ..
        }
    );
    if failed {
        rc.failed.fetch_add(1, Ordering::Relaxed);
    } else if nf {
        rc.not_found.fetch_add(1, Ordering::Relaxed);
    }
    ans
}

/// The shootdown loop: LOG_REQ with our underlay IP, apply the records, LOG_RM them.
async fn shootdowns(
    client: portolan::client::Client,
    underlay_ip: IpAddr,
    interval: Duration,
    worker: WorkerHandle,
    rc: Arc<ResolverCounters>,
) {
    loop {
        rc.log_polls.fetch_add(1, Ordering::Relaxed);
        let records = match client.log(underlay_ip, 1024).await {
            Ok(r) => r,
            Err(_) => {
                rc.log_errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(interval).await;
                continue;
            }
        };
        if records.is_empty() {
            tokio::time::sleep(interval).await;
            continue;
        }
        let mut ids = Vec::with_capacity(records.len());
        for r in &records {
            match *r {
                portolan::svp::LogRecord::Vl2 { id, mac, vnet_id } => {
                    if let Some(vni) = Vni::new(vnet_id) {
                        worker.send(Cmd::InvalidateVl2 {
                            vni,
                            mac: Mac(mac.0),
                        });
                    }
                    rc.vl2_shootdowns.fetch_add(1, Ordering::Relaxed);
                    ids.push(id);
                }
                portolan::svp::LogRecord::Vl3 {
                    id, ip, vnet_id, ..
                } => {
                    if let Some(vni) = Vni::new(vnet_id) {
                        worker.send(Cmd::Vl3Changed {
                            vni,
                            ip: mapped(IpAddr::V6(ip)),
                        });
                    }
                    rc.vl3_shootdowns.fetch_add(1, Ordering::Relaxed);
                    ids.push(id);
                }
            }
        }
        // At most 63 ids fit one LOG_RM in the illumos client's buffer; keep to that.
        for chunk in ids.chunks(63) {
            if client.log_rm(chunk).await.is_err() {
                rc.log_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        // More may be queued: ask again at once.
    }
}

// ----- control -----------------------------------------------------------------------------

struct VnicEntry {
    spec: VnicAddSpec,
    id: VnicId,
    vni: Vni,
    ip: IpAddr,
    offloads: String,
    /// The compiled rule set (also when unfiltered, for `fw ls`); its hit counters are shared
    /// with the worker's copy.
    rules: Option<Arc<VnicRuleSet>>,
    /// Identity (st_dev, st_ino) of the namespace the TAP was moved into, to notice when the
    /// name is deleted or reused for another namespace.
    ns_id: (u64, u64),
    /// Not up: the state, why, and since when (Unix ms); `None`: up.
    gone: Option<(VnicState, String, u64)>,
    _tap: Arc<Tap>,
}

/// Why attaching the received fds failed.
#[derive(Debug, thiserror::Error)]
enum AttachError {
    /// A received fd is not a TAP the vnic can use.
    #[error("{0}")]
    BadFd(String),
    /// The namespace the request names is not visible to the daemon.
    #[error(
        "network namespace {name:?}: {source} (the dataplane must see the same /run/netns as \
         its client, to notice when the namespace goes)"
    )]
    Netns {
        /// The name.
        name: String,
        /// Why it could not be opened.
        source: std::io::Error,
    },
}

/// Rebuilds the TAP from the queue fds of a `vnic_attach` (checking each is an
/// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` TAP named `name`) and reads the identity of netns
/// `ns` for the orphan watcher. The one worker polls the first queue; further queues are
/// closed, which detaches them from the device (the kernel then steers every flow to the
/// first).
fn adopt_taps(fds: Vec<OwnedFd>, name: &str, ns: &str) -> Result<(Tap, (u64, u64)), AttachError> {
    let n = fds.len();
    let mut first = None;
    for (i, fd) in fds.into_iter().enumerate() {
        let tap = Tap::from_fd(fd, Offloads::ALL).map_err(|e| {
            AttachError::BadFd(format!(
                "vnic_attach fd {} of {n} is not a usable TAP queue: {e}",
                i + 1
            ))
        })?;
        if tap.name().as_str() != name {
            return Err(AttachError::BadFd(format!(
                "vnic_attach fd {} of {n} is the TAP {}, but the request names {name}",
                i + 1,
                tap.name()
            )));
        }
        if first.is_none() {
            first = Some(tap);
        }
    }
    let tap = first.ok_or_else(|| AttachError::BadFd("vnic_attach: no fd".into()))?;
    let ns_id = netns_identity(ns).map_err(|source| AttachError::Netns {
        name: ns.to_owned(),
        source,
    })?;
    Ok((tap, ns_id))
}

/// `(st_dev, st_ino)` of `/run/netns/NAME` (opened read-only, nothing entered).
fn netns_identity(name: &str) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let ns = Netns::open(name).map_err(std::io::Error::other)?;
    let m = std::fs::File::from(ns.as_fd().try_clone_to_owned()?).metadata()?;
    Ok((m.dev(), m.ino()))
}

/// The identity of the namespace `/run/netns/NAME` names now (`None`: no such namespace).
fn netns_id(name: &str) -> Option<(u64, u64)> {
    netns_identity(name).ok()
}

/// How often the daemon checks that each vnic's namespace still exists.
const NETNS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The firewall input as last accepted, compiled.
#[derive(Default)]
struct FwState {
    state: FirewallState,
    fw: Option<Firewall>,
    generation: u64,
}

impl FwState {
    /// The rule set of the vnic with address `ip` on `vni`: the VM that has that address in
    /// the directory decides (`None`: no VM claims the address, the vnic is unfiltered).
    fn compile_for(&self, vni: Vni, ip: IpAddr) -> Option<Arc<VnicRuleSet>> {
        let fw = self.fw.as_ref()?;
        let vm = self
            .state
            .vms
            .iter()
            .find(|vm| vm.ips.iter().any(|a| a.vni == vni.get() && a.ip == ip))?;
        Some(Arc::new(fw.compile_vnic(
            &vm.uuid,
            vni.get(),
            self.generation,
        )))
    }
}

/// What the worker gets: only sets that filter (an unfiltered vnic costs nothing per packet).
fn for_worker(rules: &Option<Arc<VnicRuleSet>>) -> Option<Arc<VnicRuleSet>> {
    rules.as_ref().filter(|r| r.is_filtered()).cloned()
}

struct Daemon {
    worker: WorkerHandle,
    /// Lock order: `vnics` before `fw`.
    vnics: tokio::sync::Mutex<BTreeMap<(String, String), VnicEntry>>,
    fw: tokio::sync::Mutex<FwState>,
    resolver: Arc<ResolverCounters>,
    cn_uuid: String,
    underlay: Arc<Underlay>,
    /// `--firewall-state`.
    fw_path: Option<PathBuf>,
    control: ControlCounters,
}

/// Counters of the control socket (see [`ControlStats`]).
#[derive(Debug, Default)]
struct ControlCounters {
    connections: AtomicU64,
    refused_connections: AtomicU64,
    requests: AtomicU64,
    bad_requests: AtomicU64,
    oversized_requests: AtomicU64,
    read_timeouts: AtomicU64,
    write_timeouts: AtomicU64,
    attach_without_fds: AtomicU64,
    attach_bad_fds: AtomicU64,
    unexpected_fds: AtomicU64,
    fd_overflows: AtomicU64,
}

impl ControlCounters {
    fn snapshot(&self) -> ControlStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ControlStats {
            connections: g(&self.connections),
            refused_connections: g(&self.refused_connections),
            requests: g(&self.requests),
            bad_requests: g(&self.bad_requests),
            oversized_requests: g(&self.oversized_requests),
            read_timeouts: g(&self.read_timeouts),
            write_timeouts: g(&self.write_timeouts),
            attach_without_fds: g(&self.attach_without_fds),
            attach_bad_fds: g(&self.attach_bad_fds),
            unexpected_fds: g(&self.unexpected_fds),
            fd_overflows: g(&self.fd_overflows),
        }
    }
}

impl Daemon {
    /// Handles one request; `fds` are the descriptors that came with its line.
    async fn handle(&self, req: Request, fds: Vec<OwnedFd>) -> anyhow::Result<serde_json::Value> {
        let req = match req {
            Request::VnicAttach(spec) => {
                return Ok(serde_json::to_value(self.vnic_attach(spec, fds).await?)?)
            }
            other => other,
        };
        if !fds.is_empty() {
            self.control
                .unexpected_fds
                .fetch_add(fds.len() as u64, Ordering::Relaxed);
            tracing::warn!(
                fds = fds.len(),
                "descriptors sent with a request other than vnic_attach: closed"
            );
            drop(fds);
        }
        match req {
            Request::VnicAttach(_) => unreachable!("handled above"),
            Request::VnicAdd(spec) => bail!(
                "vnic_add is no longer served: the dataplane does not create TAPs. Create the TAP \
                 {} in netns {} and send vnic_attach with its queue fds (SCM_RIGHTS); \
                 `fabric vnic add` does both",
                spec.name,
                spec.netns
            ),
            Request::VnicRm { netns, name } => {
                let e = self
                    .vnics
                    .lock()
                    .await
                    .remove(&(netns.clone(), name.clone()))
                    .ok_or_else(|| anyhow!("no vnic {name} in netns {netns}"))?;
                let (tx, rx) = oneshot::channel();
                self.worker.send(Cmd::RemoveVnic {
                    id: e.id,
                    reply: tx,
                });
                rx.await.context("dataplane worker thread gone")?;
                Ok(serde_json::json!({"removed": {"netns": netns, "name": name}}))
            }
            Request::VnicLs {} => Ok(serde_json::to_value(self.stats().await?.vnics)?),
            Request::Stats {} => Ok(serde_json::to_value(self.stats().await?)?),
            Request::FwApply { state } => Ok(serde_json::to_value(self.fw_apply(state).await?)?),
            Request::FwLs { netns, vnic } => {
                Ok(serde_json::to_value(self.fw_ls(netns, vnic).await?)?)
            }
            Request::Members { members } => {
                let (tx, rx) = oneshot::channel();
                self.worker.send(Cmd::SetMembers { members, reply: tx });
                let members = rx.await.context("dataplane worker thread gone")?;
                tracing::info!(?members, "member set replaced");
                Ok(serde_json::to_value(control::MembersSet { members })?)
            }
        }
    }

    /// Attaches the TAP whose queue fds came with the request as the vnic `spec`. Refused,
    /// with nothing changed, when the spec does not validate, no fd came, an fd is not a TAP
    /// with a vnet header named `spec.name`, or the vnic exists.
    async fn vnic_attach(&self, spec: VnicAddSpec, fds: Vec<OwnedFd>) -> anyhow::Result<VnicInfo> {
        let control::ValidVnic {
            vni,
            mac,
            ip,
            prefix_len: _,
            mtu,
        } = spec.validate()?;
        if fds.is_empty() {
            self.control
                .attach_without_fds
                .fetch_add(1, Ordering::Relaxed);
            bail!(
                "vnic_attach needs the TAP queue fds attached (SCM_RIGHTS); none came with the \
                 request for {} in netns {}",
                spec.name,
                spec.netns
            );
        }
        let key = (spec.netns.clone(), spec.name.clone());
        let mut vnics = self.vnics.lock().await;
        if vnics.contains_key(&key) {
            bail!(
                "vnic {} already exists in netns {} (vnic_rm it first)",
                spec.name,
                spec.netns
            );
        }
        let (ns_name, if_name) = (spec.netns.clone(), spec.name.clone());
        let adopted = tokio::task::spawn_blocking(move || adopt_taps(fds, &if_name, &ns_name))
            .await
            .context("adopting the TAP fds")?;
        let (tap, ns_id) = match adopted {
            Ok(t) => t,
            Err(e) => {
                if matches!(e, AttachError::BadFd(_)) {
                    self.control.attach_bad_fds.fetch_add(1, Ordering::Relaxed);
                }
                return Err(e.into());
            }
        };
        let offloads = format!("{:?}", tap.offloads());
        let tap = Arc::new(tap);
        let cfg = VnicConfig {
            vni,
            mac,
            ipv4: match ip {
                IpAddr::V4(a) => vec![a],
                IpAddr::V6(_) => vec![],
            },
            ipv6: match ip {
                IpAddr::V6(a) => vec![a],
                IpAddr::V4(_) => vec![],
            },
            mtu,
        };
        // Hold the firewall state across the add so a concurrent `fw apply` cannot miss it.
        let fw = self.fw.lock().await;
        let rules = fw.compile_for(vni, ip);
        let (tx, rx) = oneshot::channel();
        self.worker.send(Cmd::AddVnic {
            cfg,
            tap: tap.clone(),
            rules: for_worker(&rules),
            reply: tx,
        });
        let id = rx.await.context("dataplane worker thread gone")??;
        drop(fw);
        vnics.insert(
            key,
            VnicEntry {
                spec: spec.clone(),
                id,
                vni,
                ip,
                offloads: offloads.clone(),
                rules,
                ns_id,
                gone: None,
                _tap: tap,
            },
        );
        Ok(VnicInfo {
            netns: spec.netns,
            name: spec.name,
            vni: spec.vni,
            mac: mac.to_string(),
            ip: spec.ip,
            mtu: spec.mtu,
            offloads,
            state: VnicState::Up,
            state_reason: None,
            state_since_unix_ms: None,
            counters: Counters::default().snapshot(),
        })
    }

    /// Validates and compiles a whole firewall state, then swaps every local vnic's rule set
    /// at once. On any error nothing changes.
    async fn fw_apply(&self, state: FirewallState) -> anyhow::Result<FwApplied> {
        let fw = Firewall::new(&state).map_err(|e| anyhow!("firewall state rejected: {e}"))?;
        let mut vnics = self.vnics.lock().await;
        let mut cur = self.fw.lock().await;
        let next = FwState {
            generation: cur.generation + 1,
            fw: Some(fw),
            state,
        };
        // Saved before it takes effect: what the dataplane enforces is never newer than what a
        // restart would load.
        if let Some(path) = &self.fw_path {
            let (path, generation, state) = (path.clone(), next.generation, next.state.clone());
            tokio::task::spawn_blocking(move || save_firewall(&path, generation, &state))
                .await?
                .context("saving the firewall state (--firewall-state); nothing applied")?;
        }
        let mut sets = Vec::with_capacity(vnics.len());
        let mut report = Vec::with_capacity(vnics.len());
        for ((netns, name), e) in vnics.iter_mut() {
            let rules = next.compile_for(e.vni, e.ip);
            sets.push((e.id, for_worker(&rules)));
            report.push(FwVnicSummary {
                netns: netns.clone(),
                name: name.clone(),
                vm_uuid: rules.as_ref().map(|r| r.vm_uuid().to_string()),
                filtered: rules.as_ref().is_some_and(|r| r.is_filtered()),
                rules: rules.as_ref().map_or(0, |r| r.rules().len()),
            });
            e.rules = rules;
        }
        let (tx, rx) = oneshot::channel();
        self.worker.send(Cmd::SetFirewall { sets, reply: tx });
        rx.await.context("dataplane worker thread gone")?;
        let applied = FwApplied {
            generation: next.generation,
            vms: next.state.vms.len(),
            rules: next.state.rules.len(),
            enabled_rules: next.state.rules.iter().filter(|r| r.enabled).count(),
            vnics: report,
        };
        *cur = next;
        Ok(applied)
    }

    async fn fw_ls(&self, netns: Option<String>, vnic: String) -> anyhow::Result<FwListing> {
        let stats = self.stats().await?;
        let vnics = self.vnics.lock().await;
        let matches: Vec<_> = vnics
            .iter()
            .filter(|((ns, name), _)| *name == vnic && netns.as_ref().is_none_or(|n| n == ns))
            .collect();
        let ((ns, name), e) = match matches.as_slice() {
            [one] => *one,
            [] => bail!(
                "no vnic {vnic}{} (see `fabric vnic ls`)",
                netns.map(|n| format!(" in netns {n}")).unwrap_or_default()
            ),
            many => bail!(
                "vnic {vnic} exists in several namespaces ({}): pass --netns",
                many.iter()
                    .map(|((ns, _), _)| ns.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let generation = self.fw.lock().await.generation;
        let counters = stats
            .vnics
            .iter()
            .find(|v| v.netns == *ns && v.name == *name)
            .map(|v| v.counters.clone());
        let drop_count = |label: &str| {
            counters
                .as_ref()
                .and_then(|c| c.drops.get(label).copied())
                .unwrap_or(0)
        };
        let rules = e
            .rules
            .as_ref()
            .map(|r| {
                r.listing()
                    .into_iter()
                    .map(|(dir, m, hits)| FwRuleLine {
                        direction: match dir {
                            Direction::Ingress => "in".into(),
                            Direction::Egress => "out".into(),
                        },
                        uuid: m.uuid.clone(),
                        priority: m.priority,
                        action: format!("{:?}", m.action).to_lowercase(),
                        text: m.text.clone(),
                        hits,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(FwListing {
            netns: ns.clone(),
            name: name.clone(),
            vni: e.vni.get(),
            ip: e.ip.to_string(),
            vm_uuid: e.rules.as_ref().map(|r| r.vm_uuid().to_string()),
            filtered: e.rules.as_ref().is_some_and(|r| r.is_filtered()),
            generation,
            rules,
            denied_by_rule: drop_count(DropReason::FirewallRule.label()),
            denied_by_default: drop_count(DropReason::FirewallDefault.label()),
            conntrack: stats.conntrack,
        })
    }

    async fn stats(&self) -> anyhow::Result<Stats> {
        let (tx, rx) = oneshot::channel();
        self.worker.send(Cmd::Stats { reply: tx });
        let w = rx.await.context("dataplane worker thread gone")?;
        let mut vnics = self.vnics.lock().await;
        for v in vnics.values_mut() {
            if matches!(v.gone, Some((VnicState::Gone, ..))) {
                continue;
            }
            if let Some(f) = w.tap_failures.iter().find(|f| f.id == v.id) {
                v.gone = Some((
                    VnicState::Gone,
                    format!("TAP read failed ({}); no longer polled", f.error),
                    f.since_unix_ms,
                ));
            }
        }
        let list = vnics
            .values()
            .map(|v| {
                let c = w
                    .vnics
                    .iter()
                    .find(|(i, _)| *i == v.id)
                    .map(|(_, c)| c.clone())
                    .unwrap_or_default();
                VnicInfo {
                    netns: v.spec.netns.clone(),
                    name: v.spec.name.clone(),
                    vni: v.spec.vni,
                    mac: v.spec.mac.clone(),
                    ip: v.spec.ip.clone(),
                    mtu: v.spec.mtu,
                    offloads: v.offloads.clone(),
                    state: v.gone.as_ref().map_or(VnicState::Up, |g| g.0),
                    state_reason: v.gone.as_ref().map(|g| g.1.clone()),
                    state_since_unix_ms: v.gone.as_ref().map(|g| g.2),
                    counters: c.snapshot(),
                }
            })
            .collect();
        let r = &self.resolver;
        Ok(Stats {
            cn_uuid: self.cn_uuid.clone(),
            underlay: self.underlay.local_addr().to_string(),
            gso: self.underlay.gso_enabled(),
            gro: self.underlay.gro_enabled(),
            global: w.global.snapshot(),
            vnics: list,
            tap_malformed: w.io.tap_malformed,
            underlay_send_errors: w.io.underlay_send_errors,
            tap_write_errors: w.io.tap_write_errors,
            tap_read_errors: w.io.tap_read_errors,
            underlay_empty: w.io.underlay_empty,
            underlay_truncated: w.io.underlay_truncated,
            control: self.control.snapshot(),
            resolver: ResolverStats {
                lookups: r.lookups.load(Ordering::Relaxed),
                not_found: r.not_found.load(Ordering::Relaxed),
                failed: r.failed.load(Ordering::Relaxed),
                log_polls: r.log_polls.load(Ordering::Relaxed),
                log_errors: r.log_errors.load(Ordering::Relaxed),
                vl2_shootdowns: r.vl2_shootdowns.load(Ordering::Relaxed),
                vl3_shootdowns: r.vl3_shootdowns.load(Ordering::Relaxed),
                garps: w.io.garps,
            },
            conntrack: w.conntrack.map(|(s, flows)| ConntrackInfo {
                flows,
                counters: serde_json::to_value(s).unwrap_or_default(),
            }),
        })
    }
}

/// Limits of the control socket (from the command line).
#[derive(Debug, Clone, Copy)]
struct ControlLimits {
    max_request_bytes: usize,
    read_timeout: Duration,
    idle_timeout: Duration,
}

/// What [`ConnReader::read_line`] got.
#[derive(Debug, PartialEq, Eq)]
enum LineRead {
    /// A line (without its newline) is in the buffer; also a last line without a newline.
    Line,
    /// The client closed the connection between requests.
    Eof,
    /// The line exceeds the limit; the buffer holds at most the limit.
    TooLong,
    /// More descriptors came with one line than [`fdpass::MAX_FDS`] (the kernel may have
    /// dropped some, and the bytes they came with): the connection is unusable.
    FdOverflow,
}

/// Most bytes one `recvmsg` asks for.
const READ_CHUNK: usize = 64 * 1024;

/// Reads request lines from a control connection with `recvmsg`, keeping the descriptors
/// (`SCM_RIGHTS`) that arrive with the bytes of a line together with that line.
///
/// The kernel ends a `recvmsg` right after the data that carries descriptors, so the fds of a
/// read belong to its last byte; a client sends them with the first bytes of its line (see
/// [`control::attach`]), hence they belong to the line that read's last byte is part of.
/// Never holds more than the line limit plus one read's worth of a following line.
#[derive(Default)]
struct ConnReader {
    /// Bytes received and not yet consumed.
    buf: Vec<u8>,
    /// Descriptors received, each with the index in `buf` of the last byte of its read.
    fds: Vec<(usize, OwnedFd)>,
    eof: bool,
}

impl ConnReader {
    /// Waits until the socket is readable, then does one `recvmsg` of at most `want` bytes
    /// (at least 1). Returns the bytes received (0 at end of stream).
    async fn fill(&mut self, s: &tokio::net::UnixStream, want: usize) -> std::io::Result<usize> {
        if self.eof {
            return Ok(0);
        }
        let start = self.buf.len();
        self.buf.resize(start + want.clamp(1, READ_CHUNK), 0);
        let mut got = Vec::new();
        let r = loop {
            if let Err(e) = s.readable().await {
                break Err(e);
            }
            match s.try_io(tokio::io::Interest::READABLE, || {
                fdpass::recv_with_fds(s.as_fd(), &mut self.buf[start..], &mut got)
            }) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => break other,
            }
        };
        let n = *r.as_ref().unwrap_or(&0);
        self.buf.truncate(start + n);
        if n == 0 {
            self.eof = true;
        }
        let last = (start + n).saturating_sub(1);
        self.fds.extend(got.into_iter().map(|fd| (last, fd)));
        r
    }

    /// Reads one line into `line` (cleared first) and its descriptors into `fds`, never
    /// holding more than `max` bytes of a line.
    async fn read_line(
        &mut self,
        s: &tokio::net::UnixStream,
        line: &mut Vec<u8>,
        fds: &mut Vec<OwnedFd>,
        max: usize,
    ) -> std::io::Result<LineRead> {
        line.clear();
        fds.clear();
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                if i > max {
                    return Ok(LineRead::TooLong);
                }
                line.extend_from_slice(&self.buf[..i]);
                self.buf.drain(..=i);
                self.take_fds(i, fds);
                return Ok(if fds.len() > fdpass::MAX_FDS {
                    LineRead::FdOverflow
                } else {
                    LineRead::Line
                });
            }
            if self.buf.len() > max {
                return Ok(LineRead::TooLong);
            }
            if self.fds.len() > fdpass::MAX_FDS {
                return Ok(LineRead::FdOverflow);
            }
            let n = match self.fill(s, max + 1 - self.buf.len()).await {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    return Ok(LineRead::FdOverflow)
                }
                Err(e) => return Err(e),
            };
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(LineRead::Eof);
                }
                // A last line without its newline.
                line.append(&mut self.buf);
                let end = line.len();
                self.take_fds(end, fds);
                return Ok(LineRead::Line);
            }
        }
    }

    /// Moves the descriptors of the bytes up to index `end` (the line and its newline) into
    /// `fds` and shifts the rest to the consumed buffer.
    fn take_fds(&mut self, end: usize, fds: &mut Vec<OwnedFd>) {
        let mut rest = Vec::new();
        for (pos, fd) in self.fds.drain(..) {
            if pos <= end {
                fds.push(fd);
            } else {
                rest.push((pos - end - 1, fd));
            }
        }
        self.fds = rest;
    }
}

/// Serves one control connection: one request line, one reply line, until the client closes
/// or breaks a limit (see [`ControlLimits`]).
async fn serve_conn(d: Arc<Daemon>, mut s: tokio::net::UnixStream, limits: ControlLimits) {
    let c = &d.control;
    let mut r = ConnReader::default();
    let mut line = Vec::new();
    let mut fds = Vec::new();
    loop {
        // Idle between requests: wait for the first byte, then the whole line must follow in
        // `read_timeout` (a stalled partial line cannot hold a connection slot).
        if r.buf.is_empty() {
            let want = limits.max_request_bytes.saturating_add(1);
            match tokio::time::timeout(limits.idle_timeout, r.fill(&s, want)).await {
                Ok(Ok(0)) => return,
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                    c.fd_overflows.fetch_add(1, Ordering::Relaxed);
                    let e = format!("{e}; connection closed");
                    let _ = write_reply(c, &mut s, &error_reply(&e), limits.read_timeout).await;
                    return;
                }
                Ok(Err(_)) => return,
                Err(_) => {
                    c.read_timeouts.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        let got = tokio::time::timeout(
            limits.read_timeout,
            r.read_line(&s, &mut line, &mut fds, limits.max_request_bytes),
        )
        .await;
        let parsed = match got {
            Err(_) => {
                c.read_timeouts.fetch_add(1, Ordering::Relaxed);
                let e = format!(
                    "request not complete within {} ms (--control-read-timeout-ms); connection closed",
                    limits.read_timeout.as_millis()
                );
                let _ = write_reply(c, &mut s, &error_reply(&e), limits.read_timeout).await;
                return;
            }
            Ok(Err(_)) | Ok(Ok(LineRead::Eof)) => return,
            Ok(Ok(LineRead::FdOverflow)) => {
                c.fd_overflows.fetch_add(1, Ordering::Relaxed);
                let e = format!(
                    "more than {} descriptors came with one request line; connection closed",
                    fdpass::MAX_FDS
                );
                let _ = write_reply(c, &mut s, &error_reply(&e), limits.read_timeout).await;
                return;
            }
            Ok(Ok(LineRead::TooLong)) => Err(RequestError::TooLong {
                limit: limits.max_request_bytes,
            }),
            Ok(Ok(LineRead::Line)) => control::parse_request(&line, limits.max_request_bytes),
        };
        c.requests.fetch_add(1, Ordering::Relaxed);
        let (reply, close) = match parsed {
            Ok(req) => match d.handle(req, std::mem::take(&mut fds)).await {
                Ok(v) => (serde_json::json!({"ok": true, "result": v}), false),
                Err(e) => (error_reply(&format!("{e:#}")), false),
            },
            Err(e @ RequestError::TooLong { .. }) => {
                c.oversized_requests.fetch_add(1, Ordering::Relaxed);
                (error_reply(&e.to_string()), true)
            }
            Err(e @ RequestError::Invalid(_)) => {
                c.bad_requests.fetch_add(1, Ordering::Relaxed);
                (error_reply(&e.to_string()), false)
            }
        };
        if !fds.is_empty() {
            // Descriptors that came with a line that did not parse: closed.
            c.unexpected_fds
                .fetch_add(fds.len() as u64, Ordering::Relaxed);
            fds.clear();
        }
        // Do not keep a large request's buffer for the connection's lifetime.
        if line.capacity() > 64 * 1024 {
            line = Vec::new();
        }
        if r.buf.capacity() > 2 * READ_CHUNK && r.buf.len() < READ_CHUNK {
            r.buf.shrink_to(READ_CHUNK);
        }
        if !write_reply(c, &mut s, &reply, limits.read_timeout).await || close {
            return;
        }
    }
}

fn error_reply(e: &str) -> serde_json::Value {
    serde_json::json!({"ok": false, "error": e})
}

/// Writes one reply line; false when the connection is unusable (error or timeout).
async fn write_reply(
    c: &ControlCounters,
    w: &mut tokio::net::UnixStream,
    reply: &serde_json::Value,
    timeout: Duration,
) -> bool {
    let mut out = reply.to_string();
    out.push('\n');
    match tokio::time::timeout(timeout, w.write_all(out.as_bytes())).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => {
            c.write_timeouts.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// Refuses a connection over the cap: an error line if the socket takes it at once, then close.
fn refuse_conn(s: tokio::net::UnixStream, max: usize) {
    let mut out = error_reply(&format!(
        "too many control connections: {max} are open (--control-max-conns); try again"
    ))
    .to_string();
    out.push('\n');
    let _ = s.try_write(out.as_bytes());
}

/// Marks vnics whose namespace name was deleted (or now names another namespace) as orphaned;
/// if the namespace itself went away, the TAP fails too and the worker's report makes it gone.
async fn watch_namespaces(d: Arc<Daemon>) {
    let mut tick = tokio::time::interval(NETNS_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let names: Vec<((String, String), (u64, u64))> = {
            let vnics = d.vnics.lock().await;
            vnics
                .iter()
                .filter(|(_, v)| v.gone.is_none())
                .map(|(k, v)| (k.clone(), v.ns_id))
                .collect()
        };
        if names.is_empty() {
            continue;
        }
        let checked = tokio::task::spawn_blocking(move || {
            names
                .into_iter()
                .filter_map(|(k, id)| {
                    let why = match netns_id(&k.0) {
                        None => "was deleted",
                        Some(now) if now != id => "now names another namespace",
                        Some(_) => return None,
                    };
                    Some((k, why))
                })
                .collect::<Vec<_>>()
        })
        .await;
        let Ok(gone) = checked else { continue };
        if gone.is_empty() {
            continue;
        }
        let now = unix_ms(SystemTime::now());
        let mut vnics = d.vnics.lock().await;
        for (k, why) in gone {
            if let Some(v) = vnics.get_mut(&k).filter(|v| v.gone.is_none()) {
                tracing::warn!(netns = %k.0, vnic = %k.1, "vnic's network namespace {why}; listed as orphaned until `vnic rm`");
                v.gone = Some((
                    VnicState::Orphaned,
                    format!("network namespace {} {why}", k.0),
                    now,
                ));
            }
        }
    }
}

fn parse_underlay(s: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let ip: IpAddr = s.parse().map_err(|_| {
        anyhow!("--underlay {s:?}: expected IP or IP:PORT, e.g. 192.168.1.10 or 192.168.1.10:4789")
    })?;
    Ok(SocketAddr::new(ip, vxlan::PORT))
}

/// Run the daemon until SIGTERM or SIGINT.
pub fn run(args: DataplaneArgs) -> anyhow::Result<()> {
    let underlay_addr = parse_underlay(&args.underlay)?;
    let portolan: SocketAddr = args
        .portolan
        .to_socket_addrs()
        .with_context(|| format!("--portolan {:?}", args.portolan))?
        .next()
        .ok_or_else(|| anyhow!("--portolan {:?} resolves to no address", args.portolan))?;
    let _: portolan::store::CnUuid = args
        .cn_uuid
        .parse()
        .map_err(|e| anyhow!("--server-uuid {:?}: {e}", args.cn_uuid))?;
    let saved_fw = match &args.firewall_state {
        Some(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            load_firewall(path)?
        }
        None => None,
    };
    if let (Some(path), Some(fw)) = (&args.firewall_state, &saved_fw) {
        eprintln!(
            "fabric dataplane: firewall state generation {} loaded from {} ({} VMs, {} rules)",
            fw.generation,
            path.display(),
            fw.state.vms.len(),
            fw.state.rules.len()
        );
    }
    let underlay = Arc::new(
        Underlay::bind(&UnderlayConfig::new(underlay_addr))
            .context("binding the underlay socket")?,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (lookup_tx, mut lookup_rx) = tokio::sync::mpsc::unbounded_channel::<LookupKey>();
    let waker = Arc::new(Waker::new()?);
    let poller = Poller::new()?;
    poller.add(waker.as_fd(), WAKE_TOKEN, Interest::Read)?;
    poller.add(underlay.as_fd(), UNDERLAY_TOKEN, Interest::Read)?;
    let (wtx, wrx) = mpsc::channel();
    let worker = WorkerHandle {
        tx: wtx,
        waker: waker.clone(),
    };
    let w = Worker {
        core: {
            let mut core = Core::new(Config {
                underlay_peers: args.peers.clone(),
                ..Config::default()
            });
            // `--peer` given: only those sources; none: every source (counted as today).
            if !args.peers.is_empty() {
                core.set_members(Some(args.peers.iter().copied()));
            }
            core
        },
        taps: Vec::new(),
        underlay: underlay.clone(),
        poller,
        waker,
        rx: wrx,
        lookups: lookup_tx,
        garp_pending: FxHashSet::default(),
        io: IoCounters::default(),
        tap_failures: Vec::new(),
        peer_port: args.peer_port,
        rd: vec![0u8; VIRTIO_NET_HDR_LEN + 65_550],
        seg: vec![0u8; 128 * 1024 + 64 * 64],
        verdicts: Vec::with_capacity(64),
        big: vec![0u8; RECV_BATCH * RECV_SLOT],
        sup: vec![0u8; VIRTIO_NET_HDR_LEN + 70_000],
        meta: [RecvMeta::default(); RECV_BATCH],
    };
    let worker_thread = std::thread::Builder::new()
        .name("fabric-worker".into())
        .spawn(move || w.run())?;
    let resolver = Arc::new(ResolverCounters::default());
    let daemon = Arc::new(Daemon {
        worker: worker.clone(),
        vnics: tokio::sync::Mutex::new(BTreeMap::new()),
        fw: tokio::sync::Mutex::new(saved_fw.unwrap_or_default()),
        resolver: resolver.clone(),
        cn_uuid: args.cn_uuid.clone(),
        underlay: underlay.clone(),
        fw_path: args.firewall_state.clone(),
        control: ControlCounters::default(),
    });
    if args.control_max_request_bytes == 0 || args.control_max_conns == 0 {
        bail!("--control-max-request-bytes and --control-max-conns must be at least 1");
    }
    let limits = ControlLimits {
        max_request_bytes: args.control_max_request_bytes,
        read_timeout: Duration::from_millis(args.control_read_timeout_ms.max(1)),
        idle_timeout: control::IDLE_TIMEOUT,
    };
    let conns = Arc::new(tokio::sync::Semaphore::new(args.control_max_conns));
    let control_path = args.control.clone();
    let result = rt.block_on(async {
        let mut cc = portolan::client::ClientConfig::new(portolan);
        cc.timeout = Duration::from_millis(args.lookup_timeout_ms);
        cc.connect_timeout = Duration::from_millis(args.lookup_timeout_ms);
        if let Some(dir) = &args.portolan_tls {
            cc.connector = Some(Arc::new(crate::pki::svp::SvpTlsConnector::from_dir(
                dir.clone(),
            )));
        }
        let client = portolan::client::Client::new(cc);
        {
            let (client, worker, rc) = (client.clone(), worker.clone(), resolver.clone());
            tokio::spawn(async move {
                while let Some(key) = lookup_rx.recv().await {
                    let (client, worker, rc) = (client.clone(), worker.clone(), rc.clone());
                    tokio::spawn(async move {
                        let ans = lookup(&client, key, &rc).await;
                        worker.send(Cmd::Answer(ans));
                    });
                }
            });
        }
        tokio::spawn(shootdowns(
            client.clone(),
            underlay_addr.ip(),
            Duration::from_millis(args.poll_interval_ms),
            worker.clone(),
            resolver.clone(),
        ));
        if let Some(dir) = control_path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        if control_path.exists() {
            if std::os::unix::net::UnixStream::connect(&control_path).is_ok() {
                bail!("another dataplane is already listening on {}", control_path.display());
            }
            std::fs::remove_file(&control_path)?;
        }
        let listener = tokio::net::UnixListener::bind(&control_path)
            .with_context(|| format!("control socket {}", control_path.display()))?;
        tracing::info!(underlay = %underlay.local_addr(), portolan = %portolan, control = %control_path.display(), "fabric dataplane running");
        eprintln!(
            "fabric dataplane: underlay {} (gso {}, gro {}), portolan {}, control {}",
            underlay.local_addr(),
            underlay.gso_enabled(),
            underlay.gro_enabled(),
            portolan,
            control_path.display()
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::spawn(watch_namespaces(daemon.clone()));
        loop {
            tokio::select! {
                a = listener.accept() => {
                    if let Ok((s, _)) = a {
                        match conns.clone().try_acquire_owned() {
                            Ok(permit) => {
                                daemon.control.connections.fetch_add(1, Ordering::Relaxed);
                                let d = daemon.clone();
                                tokio::spawn(async move {
                                    serve_conn(d, s, limits).await;
                                    drop(permit);
                                });
                            }
                            Err(_) => {
                                daemon.control.refused_connections.fetch_add(1, Ordering::Relaxed);
                                refuse_conn(s, args.control_max_conns);
                            }
                        }
                    }
                }
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        Ok(())
    });
    // Drain: stop the hot thread, then drop every TAP (which removes the devices).
    worker.send(Cmd::Shutdown);
    let _ = worker_thread.join();
    drop(daemon);
    rt.shutdown_timeout(Duration::from_secs(1));
    let _ = std::fs::remove_file(&args.control);
    eprintln!("fabric dataplane: stopped");
    result
}

/// Print helpers for the CLI.
pub fn print_counters(name: &str, c: &crate::core::CountersSnapshot) -> String {
    let mut s = format!(
        "{name}: rx {} frames / {} bytes, to_underlay {}, to_vnic {}, arp_replied {}, ndp_replied {}, held {}, released {}",
        c.rx_frames, c.rx_bytes, c.to_underlay, c.to_vnic, c.arp_replied, c.ndp_replied, c.held, c.released
    );
    for (r, n) in &c.drops {
        s.push_str(&format!("\n    drop {r}: {n}"));
    }
    s
}

/// `control::call` re-exported for the CLI.
pub use control::call;

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a current-thread runtime.
    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn pair() -> (std::os::unix::net::UnixStream, tokio::net::UnixStream) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        (a, tokio::net::UnixStream::from_std(b).unwrap())
    }

    #[test]
    fn descriptors_stay_with_the_line_they_came_with() {
        block_on(async {
            let (a, b) = pair();
            let f = std::fs::File::open("/dev/null").unwrap();
            // Line 1 without fds, line 2 with one fd on its first bytes, its end later.
            fdpass::send_with_fds(a.as_fd(), b"one\n", &[]).unwrap();
            fdpass::send_with_fds(a.as_fd(), b"tw", &[f.as_fd()]).unwrap();
            fdpass::send_with_fds(a.as_fd(), b"o\nthree\n", &[]).unwrap();
            // A last line with two fds and no newline, then EOF.
            fdpass::send_with_fds(a.as_fd(), b"four", &[f.as_fd(), f.as_fd()]).unwrap();
            drop(a);
            let mut r = ConnReader::default();
            let (mut line, mut fds) = (Vec::new(), Vec::new());
            let mut got = Vec::new();
            loop {
                match r.read_line(&b, &mut line, &mut fds, 100).await.unwrap() {
                    LineRead::Eof => break,
                    LineRead::Line => {
                        got.push((String::from_utf8(line.clone()).unwrap(), fds.len()))
                    }
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(
                got,
                [
                    ("one".into(), 0),
                    ("two".into(), 1),
                    ("three".into(), 0),
                    ("four".into(), 2)
                ]
            );
        });
    }

    #[test]
    fn too_many_descriptors_or_bytes_end_the_connection() {
        block_on(async {
            let (a, b) = pair();
            let f = std::fs::File::open("/dev/null").unwrap();
            let many: Vec<_> = (0..fdpass::MAX_FDS).map(|_| f.as_fd()).collect();
            // Two messages of MAX_FDS each within one line: more than one line may carry.
            fdpass::send_with_fds(a.as_fd(), b"x", &many).unwrap();
            fdpass::send_with_fds(a.as_fd(), b"y", &many).unwrap();
            let mut r = ConnReader::default();
            let (mut line, mut fds) = (Vec::new(), Vec::new());
            let got = r.read_line(&b, &mut line, &mut fds, 100).await.unwrap();
            assert_eq!(got, LineRead::FdOverflow);

            let (a, b) = pair();
            fdpass::send_with_fds(a.as_fd(), &[b'z'; 64], &[]).unwrap();
            let mut r = ConnReader::default();
            let got = r.read_line(&b, &mut line, &mut fds, 10).await.unwrap();
            assert_eq!(got, LineRead::TooLong);
            assert!(
                r.buf.len() <= 11,
                "held {} bytes for a 10-byte limit",
                r.buf.len()
            );
        });
    }

    #[test]
    fn saved_firewall_state_round_trips_and_bad_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("fabric-fwstate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("firewall.json");
        assert!(load_firewall(&path).unwrap().is_none(), "no file: no state");
        let state: FirewallState = serde_json::from_value(serde_json::json!({
            "vms": [{"uuid": "00000000-0000-4000-8000-000000000001",
                     "owner_uuid": "aaaaaaaa-0000-4000-8000-000000000000",
                     "firewall_enabled": true, "ips": [{"vni": 7, "ip": "10.0.0.1"}]}],
            "rules": [{"uuid": "11111111-0000-4000-8000-000000000001", "global": true,
                       "enabled": true, "rule": "FROM any TO all vms ALLOW tcp PORT 22"}]
        }))
        .unwrap();
        save_firewall(&path, 41, &state).unwrap();
        let loaded = load_firewall(&path).unwrap().expect("saved state");
        assert_eq!(loaded.generation, 41);
        assert_eq!(loaded.state, state);
        assert!(loaded
            .compile_for(Vni::new(7).unwrap(), "10.0.0.1".parse().unwrap())
            .is_some_and(|r| r.is_filtered() && !r.rules().is_empty()));
        std::fs::write(&path, b"{not json").unwrap();
        let e = load_firewall(&path)
            .err()
            .expect("garbage refused")
            .to_string();
        assert!(e.contains("firewall.json"), "{e}");
        let mut bad = state.clone();
        bad.rules[0].rule = "FROM any TO all vms ALLOW tcp PORT 99999".into();
        save_firewall(&path, 42, &bad).unwrap();
        let e = format!(
            "{:#}",
            load_firewall(&path).err().expect("bad rule refused")
        );
        assert!(e.contains("11111111-0000-4000-8000-000000000001"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
