//! Counters of the control plane, rendered in Prometheus text format on `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds (seconds) of the store latency histogram.
const BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// The service's counters.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    store: Mutex<BTreeMap<&'static str, Histogram>>,
    /// Connection counters of the HTTP serving layer.
    pub http: Arc<crate::http::Stats>,
    txn_retries: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Counters stay consistent whatever panicked while holding the lock.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    /// Counts one request.
    pub fn request(&self, route: &str, method: &str, status: u16) {
        *lock(&self.requests)
            .entry((route.to_string(), method.to_string(), status))
            .or_default() += 1;
    }

    /// Records one store transaction's duration (`kind`: read or write).
    pub fn store(&self, kind: &'static str, d: Duration) {
        let s = d.as_secs_f64();
        let mut m = lock(&self.store);
        let h = m.entry(kind).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += s;
    }

    /// Counts one write transaction run again after a deadlock or serialization failure.
    pub fn txn_retry(&self) {
        self.txn_retries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Prometheus text; `gauges` are (name, help, value) read from the store at scrape time.
    pub fn render(&self, gauges: &[(&str, &str, u64)]) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP fabric_control_requests_total HTTP requests by route, method and status.\n",
        );
        out.push_str("# TYPE fabric_control_requests_total counter\n");
        for ((route, method, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "fabric_control_requests_total{{route=\"{}\",method=\"{}\",status=\"{}\"}} {}",
                escape(route),
                escape(method),
                status,
                n
            );
        }
        out.push_str("# HELP fabric_control_store_seconds Duration of store transactions.\n");
        out.push_str("# TYPE fabric_control_store_seconds histogram\n");
        for (kind, h) in lock(&self.store).iter() {
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "fabric_control_store_seconds_bucket{{kind=\"{kind}\",le=\"{b}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "fabric_control_store_seconds_bucket{{kind=\"{kind}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "fabric_control_store_seconds_sum{{kind=\"{kind}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "fabric_control_store_seconds_count{{kind=\"{kind}\"}} {}",
                h.count
            );
        }
        self.http.render("fabric_control_http", &mut out);
        out.push_str(
            "# HELP fabric_control_txn_retries_total Write transactions run again after a \
             deadlock or serialization failure.\n",
        );
        out.push_str("# TYPE fabric_control_txn_retries_total counter\n");
        let _ = writeln!(
            out,
            "fabric_control_txn_retries_total {}",
            self.txn_retries.load(std::sync::atomic::Ordering::Relaxed)
        );
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {v}");
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render() {
        let m = Metrics::default();
        m.request("/nics/{mac}", "GET", 200);
        m.request("/nics/{mac}", "GET", 200);
        m.store("write", Duration::from_millis(3));
        let t = m.render(&[("fabric_control_nics", "NICs.", 7)]);
        assert!(t.contains(
            "fabric_control_requests_total{route=\"/nics/{mac}\",method=\"GET\",status=\"200\"} 2"
        ));
        assert!(t.contains("fabric_control_store_seconds_bucket{kind=\"write\",le=\"0.005\"} 1"));
        assert!(t.contains("fabric_control_store_seconds_bucket{kind=\"write\",le=\"0.001\"} 0"));
        assert!(t.contains("fabric_control_nics 7"));
        assert!(
            t.contains("fabric_control_http_connections_closed_total{reason=\"header_timeout\"} 0")
        );
    }
}
