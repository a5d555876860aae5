//! Userspace segmentation of a 64 KB TSO super-frame (the per-read cost on the TAP → underlay
//! path) and TCP coalescing of the segments back (the underlay → TAP path).
//! Run: `cargo bench --bench offload`; throughput is reported per segment (elements).

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use fabric::io::offload::{
    checksum, segment, segmented_len, TcpCoalescer, VirtioNetHdr, F_NEEDS_CSUM, GSO_TCPV4,
};

const MSS: usize = 1398; // 1450-byte inner MTU minus IPv4 + TCP with timestamps
const HEADROOM: usize = 8; // VXLAN header

/// A TCP/IPv4 super-frame as the kernel hands it over: Ethernet + IPv4 + TCP (12 bytes of
/// options) + `payload_len` bytes.
fn super_frame(payload_len: usize) -> (VirtioNetHdr, Vec<u8>) {
    let mut f = vec![0u8; 14 + 20 + 32 + payload_len];
    f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + 32 + payload_len).min(65_535) as u16).to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let tcp = &mut f[34..66];
    tcp[..4].copy_from_slice(&[0x9c, 0x40, 0x00, 0x50]);
    tcp[4..8].copy_from_slice(&12345u32.to_be_bytes());
    tcp[12] = 8 << 4;
    tcp[13] = 0x18;
    tcp[14..16].copy_from_slice(&501u16.to_be_bytes());
    tcp[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
    for (i, b) in f[66..].iter_mut().enumerate() {
        *b = (i * 7) as u8;
    }
    let hdr = VirtioNetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 66,
        gso_size: MSS as u16,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    (hdr, f)
}

fn bench(c: &mut Criterion) {
    let payload = 65_535 - 20 - 32;
    let (hdr, frame) = super_frame(payload);
    let mut out = vec![0u8; segmented_len(&hdr, &frame, HEADROOM).unwrap()];
    let nseg = segment(&hdr, &frame, HEADROOM, &mut out).unwrap().count;

    let mut g = c.benchmark_group("offload");
    g.throughput(Throughput::Elements(nseg as u64));
    g.bench_function(format!("segment_64k_tso_{nseg}x{MSS}"), |b| {
        b.iter(|| segment(black_box(&hdr), black_box(&frame), HEADROOM, &mut out).unwrap())
    });

    let segs = segment(&hdr, &frame, HEADROOM, &mut out).unwrap();
    let mut sup = vec![0u8; 70_000];
    g.bench_function(format!("coalesce_{nseg}_segments"), |b| {
        b.iter(|| {
            let mut co = TcpCoalescer::new(&mut sup);
            for i in 0..segs.count {
                black_box(co.push(&out[segs.frame_range(i)]));
            }
            black_box(co.finish().map(|f| f.len()))
        })
    });
    g.finish();

    // The two per-segment costs inside segment(): one checksum pass and one copy of 1.4 KB.
    let mut g = c.benchmark_group("offload_parts");
    g.throughput(Throughput::Bytes(1448));
    let data = &frame[..1448];
    g.bench_function("checksum_1448", |b| b.iter(|| checksum(black_box(data), 0)));
    let mut dst = vec![0u8; 1448];
    g.bench_function("copy_1448", |b| {
        b.iter(|| dst.copy_from_slice(black_box(data)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
