//! In-process hosts: several [`Core`]s, each with a real UDP underlay socket on a loopback
//! address (127.0.0.x), and containers that are smoltcp interfaces (real IPv4 TCP/ICMP/UDP
//! stacks) attached as vnics. No privileges needed; used by the tests and by `fabric demo`.
//!
//! One thread drives everything: [`World::poll`] moves datagrams from each host's socket into
//! its core, frames from each container's stack into its host's core, lookups to the shared
//! [`StaticResolver`] (standing in for Portolan) and answers back. Every underlay datagram is
//! also inspected so tests can assert what did (and did not) cross the underlay.

use crate::core::{Config, Core, FrameBuf, Output, Verdict, VnicConfig, VnicId, HEADROOM};
use crate::resolver::StaticResolver;
use crate::wire::{self, vxlan, EtherType, Mac, Vni};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::{icmp, tcp, udp};
use smoltcp::wire::{
    EthernetAddress, HardwareAddress, Icmpv4Packet, Icmpv4Repr, IpAddress, IpCidr,
};
use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// Index of a host in a [`World`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostId(pub usize);

/// Index of a container in a [`World`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerId(pub usize);

/// What crossed the underlay, as seen by the receiving sockets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnderlayStats {
    /// Datagrams received by any host.
    pub datagrams: u64,
    /// Bytes in them.
    pub bytes: u64,
    /// Of those, datagrams whose inner frame is ARP.
    pub arp_frames: u64,
    /// Of those, datagrams whose inner frame is broadcast or multicast.
    pub flood_frames: u64,
}

/// One host: a core and its underlay socket.
#[derive(Debug)]
pub struct Host {
    /// Name for reports.
    pub name: String,
    /// The forwarding core.
    pub core: Core,
    sock: UdpSocket,
    addr: SocketAddr,
    scratch: Vec<u8>,
}

impl Host {
    /// The underlay address (IP and UDP port) of this host.
    pub fn underlay_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A container: a smoltcp interface attached as a vnic.
pub struct Container {
    /// Name for reports.
    pub name: String,
    /// Host it runs on.
    pub host: HostId,
    /// Its vnic on that host.
    pub vnic: VnicId,
    /// Its segment.
    pub vni: Vni,
    /// Its MAC.
    pub mac: Mac,
    /// Its IPv4 address.
    pub ip: Ipv4Addr,
    iface: Interface,
    dev: QueueDevice,
    sockets: SocketSet<'static>,
}

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Container")
            .field("name", &self.name)
            .field("vni", &self.vni)
            .field("mac", &self.mac)
            .field("ip", &self.ip)
            .finish()
    }
}

/// Frames in and out of a container's stack.
#[derive(Debug, Default)]
struct QueueDevice {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    mtu: usize,
}

struct RxTok(Vec<u8>);
struct TxTok<'a>(&'a mut VecDeque<Vec<u8>>);

impl smoltcp::phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut v = vec![0u8; len];
        let r = f(&mut v);
        self.0.push_back(v);
        r
    }
}

impl Device for QueueDevice {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _t: smoltcp::time::Instant) -> Option<(RxTok, TxTok<'_>)> {
        let f = self.rx.pop_front()?;
        Some((RxTok(f), TxTok(&mut self.tx)))
    }

    fn transmit(&mut self, _t: smoltcp::time::Instant) -> Option<TxTok<'_>> {
        Some(TxTok(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = self.mtu + wire::ethernet::HEADER_LEN;
        c
    }
}

/// Result of a TCP transfer between two containers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// Bytes the server received.
    pub bytes: usize,
    /// Time from connect to the last byte.
    pub elapsed: Duration,
    /// Whether the received bytes equal the sent bytes.
    pub content_ok: bool,
}

/// Why a container operation did not complete.
#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    /// The operation did not finish in time.
    #[error("{what} did not complete within {timeout:?}")]
    Timeout {
        /// What was attempted.
        what: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// A socket of the underlay failed.
    #[error("underlay socket: {0}")]
    Io(#[from] io::Error),
    /// Adding the vnic failed.
    #[error("vnic: {0}")]
    Vnic(#[from] crate::core::VnicError),
    /// The container stack refused an operation.
    #[error("container stack: {0}")]
    Stack(String),
}

/// Hosts, containers and the shared mapping table.
#[derive(Debug)]
pub struct World {
    /// The hosts.
    pub hosts: Vec<Host>,
    /// The containers.
    pub containers: Vec<Container>,
    /// The mapping table standing in for Portolan.
    pub resolver: StaticResolver<HostId>,
    /// What crossed the underlay.
    pub underlay: UnderlayStats,
    epoch: Instant,
    core_cfg: Config,
}

impl World {
    /// An empty world whose resolver answers after `lookup_delay`.
    pub fn new(lookup_delay: Duration) -> World {
        World::with_config(lookup_delay, Config::default())
    }

    /// An empty world whose cores use `core_cfg`.
    pub fn with_config(lookup_delay: Duration, core_cfg: Config) -> World {
        World {
            hosts: Vec::new(),
            containers: Vec::new(),
            resolver: StaticResolver::new(lookup_delay),
            underlay: UnderlayStats::default(),
            epoch: Instant::now(),
            core_cfg,
        }
    }

    /// Add a host whose underlay socket binds `ip` (a loopback address) on an ephemeral port.
    pub fn add_host(&mut self, name: &str, ip: Ipv4Addr) -> Result<HostId, WorldError> {
        let sock = UdpSocket::bind(SocketAddr::from((ip, 0)))?;
        sock.set_nonblocking(true)?;
        let addr = sock.local_addr()?;
        self.hosts.push(Host {
            name: name.to_string(),
            core: Core::new(self.core_cfg.clone()),
            sock,
            addr,
            scratch: vec![0u8; HEADROOM + 65_536],
        });
        Ok(HostId(self.hosts.len() - 1))
    }

    /// Start a container on `host` in segment `vni` with `mac` and `ip/prefix`, and publish its
    /// mapping to the resolver.
    pub fn add_container(
        &mut self,
        name: &str,
        host: HostId,
        vni: Vni,
        mac: Mac,
        ip: Ipv4Addr,
        prefix: u8,
    ) -> Result<ContainerId, WorldError> {
        let mtu = 1500;
        let vnic = self.hosts[host.0].core.add_vnic(VnicConfig {
            vni,
            mac,
            ipv4: vec![ip],
            ipv6: vec![],
            mtu,
        })?;
        let mut dev = QueueDevice {
            mtu: usize::from(mtu),
            ..Default::default()
        };
        let mut cfg = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(mac.0)));
        cfg.random_seed = u64::from(u32::from(ip)) ^ (self.containers.len() as u64) << 32;
        let mut iface = Interface::new(cfg, &mut dev, self.now_smol(Instant::now()));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(ip), prefix));
        });
        let underlay = self.hosts[host.0].addr;
        self.resolver.insert(vni, mac, &[IpAddr::V4(ip)], underlay);
        self.containers.push(Container {
            name: name.to_string(),
            host,
            vnic,
            vni,
            mac,
            ip,
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
        });
        Ok(ContainerId(self.containers.len() - 1))
    }

    fn now_smol(&self, now: Instant) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(
            now.saturating_duration_since(self.epoch).as_micros() as i64
        )
    }

    /// One pass: underlay receive, container stacks, lookups, released frames, timers.
    pub fn poll(&mut self, now: Instant) -> Result<(), WorldError> {
        let snow = self.now_smol(now);
        // Underlay → cores → containers.
        for h in 0..self.hosts.len() {
            loop {
                let host = &mut self.hosts[h];
                let (n, src) = match host.sock.recv_from(&mut host.scratch[HEADROOM..]) {
                    Ok(x) => x,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e.into()),
                };
                observe(&mut self.underlay, &host.scratch[HEADROOM..HEADROOM + n]);
                let mut buf = FrameBuf::new(&mut host.scratch, HEADROOM, n).expect("fits");
                match host.core.from_underlay(src, &mut buf, now) {
                    Verdict::ToVnic(v) => {
                        let frame = buf.bytes().to_vec();
                        self.deliver(HostId(h), v, frame);
                    }
                    Verdict::ToUnderlay { dst, .. } => {
                        host.sock.send_to(buf.bytes(), dst)?;
                    }
                    _ => {}
                }
            }
        }
        // Containers → cores.
        for c in 0..self.containers.len() {
            let ct = &mut self.containers[c];
            ct.iface.poll(snow, &mut ct.dev, &mut ct.sockets);
            while let Some(frame) = self.containers[c].dev.tx.pop_front() {
                let (h, vnic) = (self.containers[c].host, self.containers[c].vnic);
                let host = &mut self.hosts[h.0];
                let Some(mut buf) = FrameBuf::new(&mut host.scratch, HEADROOM, frame.len()) else {
                    continue;
                };
                buf.bytes_mut().copy_from_slice(&frame);
                match host.core.from_vnic(vnic, &mut buf, now) {
                    Verdict::ToUnderlay { dst, .. } => {
                        host.sock.send_to(buf.bytes(), dst)?;
                    }
                    Verdict::ToVnic(v) | Verdict::Reply(v) => {
                        let f = buf.bytes().to_vec();
                        self.deliver(h, v, f);
                    }
                    Verdict::Held | Verdict::Drop(_) => {}
                }
            }
        }
        // Lookups, answers, released frames, timers.
        for h in 0..self.hosts.len() {
            while let Some(key) = self.hosts[h].core.poll_lookup() {
                self.resolver.submit(HostId(h), key, now);
            }
        }
        while let Some((h, ans)) = self.resolver.poll_answer(now) {
            self.hosts[h.0].core.handle_answer(ans, now);
        }
        for h in 0..self.hosts.len() {
            while let Some(out) = self.hosts[h].core.poll_output() {
                match out {
                    Output::Underlay { dst, datagram, .. } => {
                        self.hosts[h].sock.send_to(&datagram, dst)?;
                    }
                    Output::Vnic { vnic, frame } => self.deliver(HostId(h), vnic, frame),
                }
            }
            self.hosts[h].core.handle_timeout(now);
        }
        Ok(())
    }

    fn deliver(&mut self, host: HostId, vnic: VnicId, frame: Vec<u8>) {
        if let Some(c) = self
            .containers
            .iter_mut()
            .find(|c| c.host == host && c.vnic == vnic)
        {
            c.dev.rx.push_back(frame);
        }
    }

    /// Poll until `done` says so or `timeout` passes.
    pub fn run_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&mut World) -> bool,
    ) -> Result<(), WorldError> {
        let deadline = Instant::now() + timeout;
        let mut idle = 0u32;
        loop {
            let before = self.underlay.datagrams;
            self.poll(Instant::now())?;
            if done(self) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(WorldError::Timeout {
                    what: what.to_string(),
                    timeout,
                });
            }
            // Spin while traffic flows; back off a little when idle.
            if self.underlay.datagrams == before {
                idle += 1;
                if idle > 50 {
                    std::thread::sleep(Duration::from_micros(200));
                }
            } else {
                idle = 0;
            }
        }
    }

    /// The container.
    pub fn container(&self, c: ContainerId) -> &Container {
        &self.containers[c.0]
    }

    /// The host.
    pub fn host(&self, h: HostId) -> &Host {
        &self.hosts[h.0]
    }

    /// Mutable host (for injecting faults in tests).
    pub fn host_mut(&mut self, h: HostId) -> &mut Host {
        &mut self.hosts[h.0]
    }

    /// Send a raw datagram to `host`'s underlay socket from a fresh socket on `from_ip`.
    pub fn inject_underlay(
        &mut self,
        from_ip: Ipv4Addr,
        host: HostId,
        datagram: &[u8],
    ) -> Result<(), WorldError> {
        let s = UdpSocket::bind(SocketAddr::from((from_ip, 0)))?;
        s.send_to(datagram, self.hosts[host.0].addr)?;
        Ok(())
    }

    /// Hand a raw frame to `c`'s host as if the container had sent it.
    pub fn inject_from_container(&mut self, c: ContainerId, frame: Vec<u8>) {
        self.containers[c.0].dev.tx.push_back(frame);
    }

    /// Ping `to` from `from`: an echo request every 200 ms (as `ping` does) until a reply
    /// comes or `timeout` passes. Returns the round-trip time of the first reply.
    ///
    /// smoltcp drops a reply it cannot send yet because it has no neighbour entry (Linux would
    /// queue it), so the first request after a cold start may go unanswered; the retry covers
    /// that exactly as a real `ping` does.
    pub fn ping(
        &mut self,
        from: ContainerId,
        to: Ipv4Addr,
        ident: u16,
        timeout: Duration,
    ) -> Result<Option<Duration>, WorldError> {
        let rx = icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 8], vec![0; 2048]);
        let tx = icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 8], vec![0; 2048]);
        let mut sock = icmp::Socket::new(rx, tx);
        sock.bind(icmp::Endpoint::Ident(ident))
            .map_err(|e| WorldError::Stack(format!("bind icmp: {e}")))?;
        let handle = self.containers[from.0].sockets.add(sock);
        let payload = b"fabric ping payload";
        let caps = smoltcp::phy::ChecksumCapabilities::default();
        let mut sent_at: Vec<Instant> = Vec::new();
        let mut got = None;
        let mut err = None;
        let r = self.run_until("ping", timeout, |w| {
            let s = w.containers[from.0].sockets.get_mut::<icmp::Socket>(handle);
            if sent_at
                .last()
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(200))
            {
                let repr = Icmpv4Repr::EchoRequest {
                    ident,
                    seq_no: sent_at.len() as u16,
                    data: payload,
                };
                let mut bytes = vec![0u8; repr.buffer_len()];
                repr.emit(&mut Icmpv4Packet::new_unchecked(&mut bytes), &caps);
                if let Err(e) = s.send_slice(&bytes, IpAddress::Ipv4(to)) {
                    err = Some(WorldError::Stack(format!("send echo: {e}")));
                    return true;
                }
                sent_at.push(Instant::now());
            }
            let mut buf = [0u8; 2048];
            while let Ok((n, addr)) = s.recv_slice(&mut buf) {
                if addr != IpAddress::Ipv4(to) {
                    continue;
                }
                let Ok(p) = Icmpv4Packet::new_checked(&buf[..n]) else {
                    continue;
                };
                if let Ok(Icmpv4Repr::EchoReply {
                    ident: i,
                    seq_no,
                    data,
                }) = Icmpv4Repr::parse(&p, &caps)
                {
                    if let Some(t) = sent_at.get(usize::from(seq_no)) {
                        if i == ident && data == payload {
                            got = Some(t.elapsed());
                            return true;
                        }
                    }
                }
            }
            false
        });
        self.containers[from.0].sockets.remove(handle);
        if let Some(e) = err {
            return Err(e);
        }
        match r {
            Ok(()) => Ok(got),
            Err(WorldError::Timeout { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Send `len` bytes (a deterministic pattern) over TCP from `client` to `server` on
    /// `port`, and check what the server received.
    pub fn tcp_transfer(
        &mut self,
        client: ContainerId,
        server: ContainerId,
        port: u16,
        len: usize,
        timeout: Duration,
    ) -> Result<Transfer, WorldError> {
        let mk = || {
            tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; 65_535]),
                tcp::SocketBuffer::new(vec![0; 65_535]),
            )
        };
        let mut srv = mk();
        srv.listen(port)
            .map_err(|e| WorldError::Stack(format!("listen: {e}")))?;
        let sh: SocketHandle = self.containers[server.0].sockets.add(srv);
        let server_ip = self.containers[server.0].ip;
        let ch = {
            let c = &mut self.containers[client.0];
            let mut s = mk();
            s.connect(
                c.iface.context(),
                (IpAddress::Ipv4(server_ip), port),
                49_152 + port % 1000,
            )
            .map_err(|e| WorldError::Stack(format!("connect: {e}")))?;
            c.sockets.add(s)
        };
        let pattern = |i: usize| (i.wrapping_mul(31) ^ (i >> 8)) as u8;
        let (mut sent, mut received, mut ok) = (0usize, 0usize, true);
        let start = Instant::now();
        let mut chunk = vec![0u8; 16 * 1024];
        let r = self.run_until("tcp transfer", timeout, |w| {
            let cs = w.containers[client.0].sockets.get_mut::<tcp::Socket>(ch);
            while sent < len && cs.can_send() {
                let n = (len - sent).min(chunk.len());
                for (k, b) in chunk[..n].iter_mut().enumerate() {
                    *b = pattern(sent + k);
                }
                match cs.send_slice(&chunk[..n]) {
                    Ok(0) | Err(_) => break,
                    Ok(m) => sent += m,
                }
            }
            if sent == len && cs.may_send() {
                cs.close();
            }
            let ss = w.containers[server.0].sockets.get_mut::<tcp::Socket>(sh);
            while ss.can_recv() {
                match ss.recv_slice(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        for (k, b) in chunk[..n].iter().enumerate() {
                            ok &= *b == pattern(received + k);
                        }
                        received += n;
                    }
                }
            }
            received >= len
        });
        let elapsed = start.elapsed();
        self.containers[client.0].sockets.remove(ch);
        self.containers[server.0].sockets.remove(sh);
        r?;
        Ok(Transfer {
            bytes: received,
            elapsed,
            content_ok: ok && received == len,
        })
    }

    /// Send one UDP datagram from `from` to `to:port` and wait until `to` receives it.
    /// Returns whether it arrived intact within `timeout`.
    pub fn udp_once(
        &mut self,
        from: ContainerId,
        to: ContainerId,
        port: u16,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<bool, WorldError> {
        let mk = || {
            udp::Socket::new(
                udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 9000]),
                udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 9000]),
            )
        };
        let mut rs = mk();
        rs.bind(port)
            .map_err(|e| WorldError::Stack(format!("bind: {e}")))?;
        let rh = self.containers[to.0].sockets.add(rs);
        let mut ss = mk();
        ss.bind(port + 1)
            .map_err(|e| WorldError::Stack(format!("bind: {e}")))?;
        let to_ip = self.containers[to.0].ip;
        ss.send_slice(payload, (IpAddress::Ipv4(to_ip), port))
            .map_err(|e| WorldError::Stack(format!("send: {e}")))?;
        let sh = self.containers[from.0].sockets.add(ss);
        let mut got = false;
        let r = self.run_until("udp datagram", timeout, |w| {
            let s = w.containers[to.0].sockets.get_mut::<udp::Socket>(rh);
            let mut b = [0u8; 9000];
            if let Ok((n, _)) = s.recv_slice(&mut b) {
                got = &b[..n] == payload;
                return true;
            }
            false
        });
        self.containers[to.0].sockets.remove(rh);
        self.containers[from.0].sockets.remove(sh);
        match r {
            Ok(()) => Ok(got),
            Err(WorldError::Timeout { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Count what an underlay datagram carries.
fn observe(s: &mut UnderlayStats, d: &[u8]) {
    s.datagrams += 1;
    s.bytes += d.len() as u64;
    if let Ok(p) = vxlan::Packet::new_checked(d) {
        if let Ok(f) = wire::EthernetFrame::new_checked(p.payload()) {
            if f.ethertype() == EtherType::ARP {
                s.arp_frames += 1;
            }
            if f.dst().is_multicast() {
                s.flood_frames += 1;
            }
        }
    }
}
