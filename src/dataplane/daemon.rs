//! `fabric dataplane`: the per-host daemon.
//!
//! Threads:
//! - **encap** (one thread): epoll over every vnic's TAP. Reads `virtio_net_hdr` + frame
//!   (64 KB TSO super-frames when the container's stack uses the offloads), segments it in
//!   userspace with room for the VXLAN header before each segment, runs the core on each
//!   segment (which writes the VXLAN header in place) and sends the segments of one
//!   super-frame as one `UDP_SEGMENT` (GSO) transmit when they share a destination. Owns the
//!   core with the VL2/VL3 caches and the held-frame queues.
//! - **decap** (one thread): `recvmmsg` batches (with `UDP_GRO`), runs its own core instance
//!   (which only needs the vnic table) on every datagram, coalesces consecutive same-flow TCP
//!   segments into one TAP write with a `virtio_net_hdr`.
//! - **tokio runtime**: the control socket, the resolver (one task per lookup on the Portolan
//!   SVP client) and the shootdown poller.
//!
//! The two hot threads never share a lock: each owns a [`Core`]; vnic changes, lookup answers
//! and shootdowns reach them as messages (`std::sync::mpsc` plus an eventfd to wake the encap
//! thread's epoll; the decap thread checks its queue between receive batches, at least every
//! 100 ms). Counters are per thread and merged when asked for.

use super::control::{self, Request, ResolverStats, Stats, VnicAddSpec, VnicInfo};
use crate::core::{
    proxy, Config, Core, Counters, FrameBuf, LookupAnswer, LookupError, LookupKey, Output, Verdict,
    Vl3Mapping, VnicConfig, VnicError, VnicId,
};
use crate::io::netlink::{self, Netns, VnicSpec};
use crate::io::offload::{self, TcpCoalescer, VirtioNetHdr, VIRTIO_NET_HDR_LEN};
use crate::io::poll::{Events, Interest, Poller, Waker};
use crate::io::tap::Tap;
use crate::io::underlay::{RecvMeta, Transmit, Underlay, UnderlayConfig};
use crate::io::IfName;
use crate::wire::{vxlan, Mac, Vni};
use anyhow::{anyhow, bail, Context as _};
use rustc_hash::FxHashSet;
use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
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
    /// This host's compute-node UUID (its identity in Portolan).
    #[arg(long, value_name = "UUID")]
    pub cn_uuid: String,
    /// Path of the local control socket (JSON lines) used by `fabric vnic` and `fabric stats`.
    #[arg(
        long,
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
    /// Timeout of one Portolan query, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub lookup_timeout_ms: u64,
}

const WAKE_TOKEN: u64 = u64::MAX;
const TAP_READ_BUDGET: usize = 64;
const RECV_BATCH: usize = 16;
const RECV_SLOT: usize = 65_536;
const TICK: Duration = Duration::from_millis(100);
const ZERO_VNET_HDR: [u8; VIRTIO_NET_HDR_LEN] = [0; VIRTIO_NET_HDR_LEN];

/// Counters the threads keep besides the core's.
#[derive(Debug, Default, Clone)]
struct IoCounters {
    tap_malformed: u64,
    underlay_send_errors: u64,
    tap_write_errors: u64,
    garps: u64,
}

#[derive(Debug, Default)]
struct ThreadStats {
    global: Counters,
    vnics: Vec<(VnicId, Counters)>,
    io: IoCounters,
}

enum Cmd {
    AddVnic {
        cfg: VnicConfig,
        tap: Arc<Tap>,
        reply: oneshot::Sender<Result<VnicId, VnicError>>,
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
        reply: oneshot::Sender<ThreadStats>,
    },
    Shutdown,
}

/// A handle to one hot thread.
#[derive(Clone)]
struct ThreadHandle {
    tx: mpsc::Sender<Cmd>,
    waker: Option<Arc<Waker>>,
}

impl ThreadHandle {
    fn send(&self, c: Cmd) {
        if self.tx.send(c).is_ok() {
            if let Some(w) = &self.waker {
                let _ = w.wake();
            }
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

// ----- encap thread ------------------------------------------------------------------------

struct Encap {
    core: Core,
    taps: Vec<Option<Arc<Tap>>>,
    underlay: Arc<Underlay>,
    poller: Poller,
    waker: Arc<Waker>,
    rx: mpsc::Receiver<Cmd>,
    lookups: tokio::sync::mpsc::UnboundedSender<LookupKey>,
    garp_pending: FxHashSet<(Vni, IpAddr)>,
    io: IoCounters,
    rd: Vec<u8>,
    seg: Vec<u8>,
    verdicts: Vec<(Verdict, usize, usize)>,
}

impl Encap {
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
                if token == WAKE_TOKEN {
                    self.waker.reset();
                } else {
                    self.drain_tap(VnicId(token as u32), now);
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
            Cmd::AddVnic { cfg, tap, reply } => {
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
                    self.taps[slot] = Some(tap);
                }
                let _ = reply.send(r);
            }
            Cmd::RemoveVnic { id, reply } => {
                if let Some(tap) = self.taps.get_mut(id.0 as usize).and_then(Option::take) {
                    let _ = self.poller.delete(tap.as_fd());
                }
                let _ = self.core.remove_vnic(id);
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
                let _ = reply.send(ThreadStats {
                    global: self.core.counters().clone(),
                    vnics: self
                        .core
                        .vnics()
                        .map(|(id, _)| {
                            (id, self.core.vnic_counters(id).cloned().unwrap_or_default())
                        })
                        .collect(),
                    io: self.io.clone(),
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

    fn drain_tap(&mut self, id: VnicId, now: Instant) {
        let Some(tap) = self.taps.get(id.0 as usize).cloned().flatten() else {
            return;
        };
        for _ in 0..TAP_READ_BUDGET {
            let n = match tap.read(&mut self.rd) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(_) => {
                    self.io.tap_malformed += 1;
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
        let segs = if hdr.gso_type & !offload::GSO_ECN == offload::GSO_NONE
            && hdr.flags & offload::F_NEEDS_CSUM == 0
        {
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

// ----- decap thread ------------------------------------------------------------------------

struct Decap {
    core: Core,
    taps: Vec<Option<Arc<Tap>>>,
    underlay: Arc<Underlay>,
    rx: mpsc::Receiver<Cmd>,
    peer_port: u16,
    io: IoCounters,
}

impl Decap {
    fn run(mut self) {
        let mut big = vec![0u8; RECV_BATCH * RECV_SLOT];
        let mut sup = vec![0u8; VIRTIO_NET_HDR_LEN + 70_000];
        let mut meta = [RecvMeta::default(); RECV_BATCH];
        loop {
            while let Ok(cmd) = self.rx.try_recv() {
                match cmd {
                    Cmd::AddVnic { cfg, tap, reply } => {
                        let r = self.core.add_vnic(cfg);
                        if let Ok(id) = r {
                            let slot = id.0 as usize;
                            if self.taps.len() <= slot {
                                self.taps.resize(slot + 1, None);
                            }
                            self.taps[slot] = Some(tap);
                        }
                        let _ = reply.send(r);
                    }
                    Cmd::RemoveVnic { id, reply } => {
                        if let Some(t) = self.taps.get_mut(id.0 as usize) {
                            *t = None;
                        }
                        let _ = self.core.remove_vnic(id);
                        let _ = reply.send(());
                    }
                    Cmd::Stats { reply } => {
                        let _ = reply.send(ThreadStats {
                            global: self.core.counters().clone(),
                            vnics: self
                                .core
                                .vnics()
                                .map(|(id, _)| {
                                    (id, self.core.vnic_counters(id).cloned().unwrap_or_default())
                                })
                                .collect(),
                            io: self.io.clone(),
                        });
                    }
                    Cmd::Shutdown => return,
                    Cmd::Answer(_) | Cmd::InvalidateVl2 { .. } | Cmd::Vl3Changed { .. } => {}
                }
            }
            let got = {
                let mut chunks = big.chunks_mut(RECV_SLOT);
                let mut bufs: [IoSliceMut<'_>; RECV_BATCH] = std::array::from_fn(|_| {
                    IoSliceMut::new(chunks.next().expect("RECV_BATCH slots"))
                });
                match self.underlay.recv(&mut bufs, &mut meta) {
                    Ok(n) => n,
                    Err(_) => continue,
                }
            };
            let now = Instant::now();
            let mut co = TcpCoalescer::new(&mut sup);
            let mut pending_for: Option<VnicId> = None;
            for (s, m) in meta[..got].iter().enumerate() {
                if m.truncated || m.len == 0 {
                    continue;
                }
                let slot = &mut big[s * RECV_SLOT..s * RECV_SLOT + m.len];
                let stride = if m.stride == 0 { m.len } else { m.stride };
                // The peer's VXLAN port, for ARP answers (its source port is arbitrary).
                let src = SocketAddr::new(m.src.ip(), self.peer_port);
                let mut off = 0;
                while off < m.len {
                    let len = stride.min(m.len - off);
                    let Some(mut buf) = FrameBuf::new(slot, off, len) else {
                        break;
                    };
                    let v = self.core.from_underlay(src, &mut buf, now);
                    let (start, flen) = (buf.start(), buf.len());
                    match v {
                        Verdict::ToVnic(to) => {
                            let inner = &slot[start..start + flen];
                            if pending_for != Some(to) {
                                if let (Some(prev), Some(f)) = (pending_for, co.finish()) {
                                    if let Some(Some(tap)) = self.taps.get(prev.0 as usize) {
                                        write_raw(tap, f, &mut self.io);
                                    }
                                }
                                pending_for = Some(to);
                            }
                            let tap = self.taps.get(to.0 as usize).and_then(Option::as_ref);
                            loop {
                                match co.push(inner) {
                                    offload::Push::Started | offload::Push::Merged => break,
                                    offload::Push::Flush => {
                                        if let (Some(f), Some(tap)) = (co.finish(), tap) {
                                            write_raw(tap, f, &mut self.io);
                                        }
                                    }
                                    offload::Push::Bypass => {
                                        if let Some(tap) = tap {
                                            if let Some(f) = co.finish() {
                                                write_raw(tap, f, &mut self.io);
                                            }
                                            write_tap(tap, inner, &mut self.io);
                                        }
                                        break;
                                    }
                                }
                            }
                        }
                        Verdict::ToUnderlay { dst, flow_hash } => send_one(
                            &self.underlay,
                            dst,
                            flow_hash,
                            &slot[start..start + flen],
                            &mut self.io,
                        ),
                        _ => {}
                    }
                    off += stride;
                }
            }
            if let (Some(prev), Some(f)) = (pending_for, co.finish()) {
                if let Some(Some(tap)) = self.taps.get(prev.0 as usize) {
                    write_raw(tap, f, &mut self.io);
                }
            }
        }
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
    encap: ThreadHandle,
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
                        encap.send(Cmd::InvalidateVl2 {
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
                        encap.send(Cmd::Vl3Changed {
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
    encap_id: VnicId,
    decap_id: VnicId,
    offloads: String,
    _tap: Arc<Tap>,
}

struct Daemon {
    encap: ThreadHandle,
    decap: ThreadHandle,
    vnics: tokio::sync::Mutex<BTreeMap<(String, String), VnicEntry>>,
    resolver: Arc<ResolverCounters>,
    cn_uuid: String,
    underlay: Arc<Underlay>,
}

fn parse_cidr(s: &str) -> anyhow::Result<(IpAddr, u8)> {
    let (a, l) = s
        .split_once('/')
        .ok_or_else(|| anyhow!("address {s:?} needs a prefix length, e.g. 10.0.0.2/24"))?;
    let ip: IpAddr = a
        .parse()
        .map_err(|_| anyhow!("{a:?} is not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len: u8 = l
        .parse()
        .ok()
        .filter(|n| *n <= max)
        .ok_or_else(|| anyhow!("prefix length {l:?} is not in 0..={max}"))?;
    Ok((ip, len))
}

impl Daemon {
    async fn handle(&self, req: Request) -> anyhow::Result<serde_json::Value> {
        match req {
            Request::VnicAdd(spec) => Ok(serde_json::to_value(self.vnic_add(spec).await?)?),
            Request::VnicRm { netns, name } => {
                let e = self
                    .vnics
                    .lock()
                    .await
                    .remove(&(netns.clone(), name.clone()))
                    .ok_or_else(|| anyhow!("no vnic {name} in netns {netns}"))?;
                for (h, id) in [(&self.encap, e.encap_id), (&self.decap, e.decap_id)] {
                    let (tx, rx) = oneshot::channel();
                    h.send(Cmd::RemoveVnic { id, reply: tx });
                    rx.await.context("dataplane thread gone")?;
                }
                Ok(serde_json::json!({"removed": {"netns": netns, "name": name}}))
            }
            Request::VnicLs {} => Ok(serde_json::to_value(self.stats().await?.vnics)?),
            Request::Stats {} => Ok(serde_json::to_value(self.stats().await?)?),
        }
    }

    async fn vnic_add(&self, spec: VnicAddSpec) -> anyhow::Result<VnicInfo> {
        let vni = Vni::new(spec.vni)
            .ok_or_else(|| anyhow!("vni {} does not fit in 24 bits", spec.vni))?;
        let mac: Mac = spec.mac.parse()?;
        let (ip, prefix_len) = parse_cidr(&spec.ip)?;
        if !(576..=9000).contains(&spec.mtu) {
            bail!("mtu {} is out of range: expected 576..=9000", spec.mtu);
        }
        let key = (spec.netns.clone(), spec.name.clone());
        let mut vnics = self.vnics.lock().await;
        if vnics.contains_key(&key) {
            bail!("vnic {} already exists in netns {}", spec.name, spec.netns);
        }
        let (ns_name, if_name, mtu) = (spec.netns.clone(), spec.name.clone(), spec.mtu);
        let tap = tokio::task::spawn_blocking(move || -> anyhow::Result<Tap> {
            let ns =
                Netns::open(&ns_name).with_context(|| format!("network namespace {ns_name:?}"))?;
            let tap = netlink::setup_vnic(
                &ns,
                &VnicSpec {
                    name: IfName::new(&if_name)?,
                    mac: mac.0,
                    addr: ip,
                    prefix_len,
                    mtu,
                    gateway: None,
                    txqueuelen: 5000,
                },
            )?;
            Ok(tap)
        })
        .await??;
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
            mtu: mtu as u16,
        };
        let add = |h: &ThreadHandle| {
            let (tx, rx) = oneshot::channel();
            h.send(Cmd::AddVnic {
                cfg: cfg.clone(),
                tap: tap.clone(),
                reply: tx,
            });
            rx
        };
        let encap_id = add(&self.encap).await.context("encap thread gone")??;
        let decap_id = match add(&self.decap).await.context("decap thread gone")? {
            Ok(id) => id,
            Err(e) => {
                let (tx, rx) = oneshot::channel();
                self.encap.send(Cmd::RemoveVnic {
                    id: encap_id,
                    reply: tx,
                });
                let _ = rx.await;
                return Err(e.into());
            }
        };
        vnics.insert(
            key,
            VnicEntry {
                spec: spec.clone(),
                encap_id,
                decap_id,
                offloads: offloads.clone(),
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
            counters: Counters::default().snapshot(),
        })
    }

    async fn stats(&self) -> anyhow::Result<Stats> {
        let ask = |h: &ThreadHandle| {
            let (tx, rx) = oneshot::channel();
            h.send(Cmd::Stats { reply: tx });
            rx
        };
        let e = ask(&self.encap).await.context("encap thread gone")?;
        let d = ask(&self.decap).await.context("decap thread gone")?;
        let mut global = e.global.clone();
        global.merge(&d.global);
        let vnics = self.vnics.lock().await;
        let find = |s: &ThreadStats, id: VnicId| {
            s.vnics
                .iter()
                .find(|(i, _)| *i == id)
                .map(|(_, c)| c.clone())
        };
        let list = vnics
            .values()
            .map(|v| {
                let mut c = find(&e, v.encap_id).unwrap_or_default();
                if let Some(dc) = find(&d, v.decap_id) {
                    c.merge(&dc);
                }
                VnicInfo {
                    netns: v.spec.netns.clone(),
                    name: v.spec.name.clone(),
                    vni: v.spec.vni,
                    mac: v.spec.mac.clone(),
                    ip: v.spec.ip.clone(),
                    mtu: v.spec.mtu,
                    offloads: v.offloads.clone(),
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
            global: global.snapshot(),
            vnics: list,
            tap_malformed: e.io.tap_malformed + d.io.tap_malformed,
            underlay_send_errors: e.io.underlay_send_errors + d.io.underlay_send_errors,
            tap_write_errors: e.io.tap_write_errors + d.io.tap_write_errors,
            resolver: ResolverStats {
                lookups: r.lookups.load(Ordering::Relaxed),
                not_found: r.not_found.load(Ordering::Relaxed),
                failed: r.failed.load(Ordering::Relaxed),
                log_polls: r.log_polls.load(Ordering::Relaxed),
                log_errors: r.log_errors.load(Ordering::Relaxed),
                vl2_shootdowns: r.vl2_shootdowns.load(Ordering::Relaxed),
                vl3_shootdowns: r.vl3_shootdowns.load(Ordering::Relaxed),
                garps: e.io.garps,
            },
        })
    }
}

async fn serve_conn(d: Arc<Daemon>, s: tokio::net::UnixStream) {
    let (r, mut w) = s.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(req) => match d.handle(req).await {
                Ok(v) => serde_json::json!({"ok": true, "result": v}),
                Err(e) => serde_json::json!({"ok": false, "error": format!("{e:#}")}),
            },
            Err(e) => serde_json::json!({"ok": false, "error": format!("bad request: {e}")}),
        };
        let mut out = reply.to_string();
        out.push('\n');
        if w.write_all(out.as_bytes()).await.is_err() {
            return;
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
        .map_err(|e| anyhow!("--cn-uuid {:?}: {e}", args.cn_uuid))?;
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
    let (etx, erx) = mpsc::channel();
    let (dtx, drx) = mpsc::channel();
    let encap = ThreadHandle {
        tx: etx,
        waker: Some(waker.clone()),
    };
    let decap = ThreadHandle {
        tx: dtx,
        waker: None,
    };
    let core_cfg = Config::default();
    let e = Encap {
        core: Core::new(core_cfg.clone()),
        taps: Vec::new(),
        underlay: underlay.clone(),
        poller,
        waker,
        rx: erx,
        lookups: lookup_tx,
        garp_pending: FxHashSet::default(),
        io: IoCounters::default(),
        rd: vec![0u8; VIRTIO_NET_HDR_LEN + 65_550],
        seg: vec![0u8; 128 * 1024 + 64 * 64],
        verdicts: Vec::with_capacity(64),
    };
    let dd = Decap {
        core: Core::new(core_cfg),
        taps: Vec::new(),
        underlay: underlay.clone(),
        rx: drx,
        peer_port: args.peer_port,
        io: IoCounters::default(),
    };
    let encap_thread = std::thread::Builder::new()
        .name("fabric-encap".into())
        .spawn(move || e.run())?;
    let decap_thread = std::thread::Builder::new()
        .name("fabric-decap".into())
        .spawn(move || dd.run())?;
    let resolver = Arc::new(ResolverCounters::default());
    let daemon = Arc::new(Daemon {
        encap: encap.clone(),
        decap: decap.clone(),
        vnics: tokio::sync::Mutex::new(BTreeMap::new()),
        resolver: resolver.clone(),
        cn_uuid: args.cn_uuid.clone(),
        underlay: underlay.clone(),
    });
    let control_path = args.control.clone();
    let result = rt.block_on(async {
        let mut cc = portolan::client::ClientConfig::new(portolan);
        cc.timeout = Duration::from_millis(args.lookup_timeout_ms);
        cc.connect_timeout = Duration::from_millis(args.lookup_timeout_ms);
        let client = portolan::client::Client::new(cc);
        {
            let (client, encap, rc) = (client.clone(), encap.clone(), resolver.clone());
            tokio::spawn(async move {
                while let Some(key) = lookup_rx.recv().await {
                    let (client, encap, rc) = (client.clone(), encap.clone(), rc.clone());
                    tokio::spawn(async move {
                        let ans = lookup(&client, key, &rc).await;
                        encap.send(Cmd::Answer(ans));
                    });
                }
            });
        }
        tokio::spawn(shootdowns(
            client.clone(),
            underlay_addr.ip(),
            Duration::from_millis(args.poll_interval_ms),
            encap.clone(),
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
        loop {
            tokio::select! {
                a = listener.accept() => {
                    if let Ok((s, _)) = a {
                        tokio::spawn(serve_conn(daemon.clone(), s));
                    }
                }
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        Ok(())
    });
    // Drain: stop the hot threads, then drop every TAP (which removes the devices).
    encap.send(Cmd::Shutdown);
    decap.send(Cmd::Shutdown);
    let _ = encap_thread.join();
    let _ = decap_thread.join();
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
