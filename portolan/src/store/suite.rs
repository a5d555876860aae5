//! The one test suite both backends must pass. Each case is a function over `&dyn Store`; the
//! macro at the bottom instantiates every case once per backend.

use std::net::IpAddr;
use std::sync::Arc;

use super::*;
use crate::svp::Mac;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}
fn mac(s: &str) -> Mac {
    s.parse().unwrap()
}
fn cn(n: u8) -> CnUuid {
    let mut b = [0u8; 16];
    b[15] = n;
    b[6] = 0x40;
    CnUuid(b)
}
fn underlay(n: u8) -> UnderlayMapping {
    UnderlayMapping {
        cn_uuid: cn(n),
        ip: ip(&format!("192.168.1.{n}")),
        port: 4789,
    }
}
fn overlay(vnet_id: u32, addr: &str, m: &str, host: u8) -> OverlayMapping {
    OverlayMapping {
        vnet_id,
        ip: ip(addr),
        mac: mac(m),
        cn_uuid: cn(host),
        vlan: 7,
    }
}

fn put_underlays(s: &dyn Store, hosts: &[u8]) {
    with_txn(s, |tx| {
        for &h in hosts {
            tx.put_underlay(&underlay(h))?;
        }
        Ok::<_, StoreError>(())
    })
    .unwrap();
}

fn create(s: &dyn Store, m: &OverlayMapping) -> Vec<LogId> {
    with_txn(s, |tx| tx.create_mapping(m)).unwrap()
}

fn log_of(s: &dyn Store, host: u8) -> Vec<LogEntry> {
    s.read_log(underlay(host).ip, 1000).unwrap()
}

fn drain(s: &dyn Store, hosts: &[u8]) {
    for &h in hosts {
        let ids: Vec<LogId> = log_of(s, h).iter().map(|e| e.id).collect();
        s.remove_log(&ids).unwrap();
    }
}

pub(super) fn lookups_found_and_not_found(s: &dyn Store) {
    put_underlays(s, &[1]);
    let m = overlay(12340, "10.0.0.1", "00:0a:95:9d:68:16", 1);
    create(s, &m);
    let want = Found {
        mac: m.mac,
        ip: ip("192.168.1.1"),
        port: 4789,
    };
    assert_eq!(s.vl3(12340, m.ip).unwrap(), Some(want));
    assert_eq!(s.vl2(12340, m.mac).unwrap(), Some(want));
    // Unknown MAC, known MAC on another VNI, unknown IP, known IP on another VNI.
    assert_eq!(s.vl2(12340, mac("00:0a:95:9d:68:17")).unwrap(), None);
    assert_eq!(s.vl2(12341, m.mac).unwrap(), None);
    assert_eq!(s.vl3(12340, ip("10.0.0.2")).unwrap(), None);
    assert_eq!(s.vl3(12341, m.ip).unwrap(), None);
    // Overlay present, underlay missing.
    let orphan = overlay(12340, "10.0.0.9", "00:0a:95:9d:68:99", 9);
    create(s, &orphan);
    assert_eq!(s.vl3(12340, orphan.ip).unwrap(), None);
    assert_eq!(s.vl2(12340, orphan.mac).unwrap(), None);
    // Tombstoned.
    let gone = with_txn(s, |tx| tx.delete_mapping(12340, m.ip)).unwrap();
    assert_eq!(gone, Some(m));
    assert_eq!(s.vl3(12340, m.ip).unwrap(), None);
    assert_eq!(s.vl2(12340, m.mac).unwrap(), None);
    // Batch: one answer per lookup, in order.
    create(s, &m);
    let got = s
        .lookup(&[
            Lookup::Vl3 {
                vnet_id: 12340,
                ip: ip("10.0.0.2"),
            },
            Lookup::Vl3 {
                vnet_id: 12340,
                ip: m.ip,
            },
            Lookup::Vl2 {
                vnet_id: 12340,
                mac: m.mac,
            },
            Lookup::Vl2 {
                vnet_id: 1,
                mac: m.mac,
            },
        ])
        .unwrap();
    assert_eq!(got, vec![None, Some(want), Some(want), None]);
}

pub(super) fn ipv4_is_stored_mapped(s: &dyn Store) {
    put_underlays(s, &[1]);
    let m = overlay(5, "10.1.2.3", "02:00:00:00:00:01", 1);
    create(s, &m);
    // The IPv4-mapped IPv6 form is the same key.
    assert!(s.vl3(5, ip("::ffff:10.1.2.3")).unwrap().is_some());
    let stored = with_txn(s, |tx| tx.mapping(5, ip("::ffff:10.1.2.3"))).unwrap();
    assert_eq!(stored.unwrap().mapping.ip, ip("10.1.2.3"));
    // Underlay IPv4 comes back as IPv4; an IPv6 underlay as IPv6.
    assert_eq!(s.vl3(5, m.ip).unwrap().unwrap().ip, ip("192.168.1.1"));
    with_txn(s, |tx| {
        tx.put_underlay(&UnderlayMapping {
            cn_uuid: cn(1),
            ip: ip("fd00::1"),
            port: 4790,
        })
    })
    .unwrap();
    let f = s.vl3(5, m.ip).unwrap().unwrap();
    assert_eq!((f.ip, f.port), (ip("fd00::1"), 4790));
    // An IPv6 overlay IP.
    let v6 = overlay(5, "fd12::5", "02:00:00:00:00:02", 1);
    create(s, &v6);
    assert_eq!(s.vl3(5, ip("fd12::5")).unwrap().unwrap().mac, v6.mac);
}

pub(super) fn create_notifies_every_host_on_the_vni(s: &dyn Store) {
    put_underlays(s, &[1, 2, 3]);
    create(s, &overlay(100, "10.0.0.1", "02:00:00:00:01:01", 1));
    create(s, &overlay(100, "10.0.0.2", "02:00:00:00:01:02", 2));
    create(s, &overlay(200, "10.0.0.1", "02:00:00:00:02:01", 3));
    drain(s, &[1, 2, 3]);
    let m = overlay(100, "10.0.0.3", "02:00:00:00:01:03", 1);
    let ids = create(s, &m);
    assert_eq!(ids.len(), 2, "hosts 1 and 2 are on vnet 100");
    let want = Event::Vl3 {
        ip: m.ip,
        mac: m.mac,
        vlan: 7,
        vnet_id: 100,
    };
    for h in [1, 2] {
        let log = log_of(s, h);
        assert_eq!(log.len(), 1, "host {h}");
        assert_eq!(log[0].event, want);
        assert_eq!(log[0].cn_uuid, cn(h));
        assert!(ids.contains(&log[0].id));
        assert_eq!(
            log[0].to_record(),
            crate::svp::LogRecord::Vl3 {
                id: log[0].id,
                ip: crate::svp::to_wire_ip(m.ip),
                vlan: 7,
                vnet_id: 100
            }
        );
    }
    assert!(log_of(s, 3).is_empty(), "host 3 has nothing on vnet 100");
}

pub(super) fn move_writes_vl2_and_vl3_events(s: &dyn Store) {
    put_underlays(s, &[1, 2, 3]);
    let old = overlay(100, "10.0.0.1", "02:00:00:00:01:01", 1);
    create(s, &old);
    create(s, &overlay(100, "10.0.0.2", "02:00:00:00:01:02", 2));
    drain(s, &[1, 2, 3]);
    // The NIC moves from host 1 to host 3 and gets a new IP.
    let new = overlay(100, "10.0.0.5", "02:00:00:00:01:01", 3);
    with_txn(s, |tx| tx.move_mapping(100, old.ip, &new)).unwrap();
    assert_eq!(s.vl3(100, old.ip).unwrap(), None);
    assert_eq!(s.vl3(100, new.ip).unwrap().unwrap().ip, ip("192.168.1.3"));
    assert_eq!(s.vl2(100, new.mac).unwrap().unwrap().ip, ip("192.168.1.3"));
    let stored = with_txn(s, |tx| tx.mapping(100, old.ip)).unwrap().unwrap();
    assert!(stored.deleted);
    assert_eq!(stored.version, 2);
    // Every host involved (1 left, 2 stays, 3 arrived) gets VL2 for the old, VL3 for the new.
    for h in [1, 2, 3] {
        let events: Vec<Event> = log_of(s, h).iter().map(|e| e.event).collect();
        assert_eq!(
            events,
            vec![
                Event::Vl2 {
                    mac: old.mac,
                    vnet_id: 100
                },
                Event::Vl3 {
                    ip: new.ip,
                    mac: new.mac,
                    vlan: 7,
                    vnet_id: 100
                }
            ],
            "host {h}"
        );
    }
    // Moving a mapping that is not live is an error and changes nothing.
    let err = with_txn(s, |tx| tx.move_mapping(100, old.ip, &new)).unwrap_err();
    assert!(
        matches!(err, StoreError::NoSuchMapping { vnet_id: 100, .. }),
        "{err}"
    );
    assert_eq!(log_of(s, 2).len(), 2);
    // Same key, another host: no tombstone, version bumps.
    let back = overlay(100, "10.0.0.5", "02:00:00:00:01:01", 2);
    with_txn(s, |tx| tx.move_mapping(100, new.ip, &back)).unwrap();
    let stored = with_txn(s, |tx| tx.mapping(100, new.ip)).unwrap().unwrap();
    assert!(!stored.deleted);
    assert_eq!(stored.version, 2);
    assert_eq!(s.vl3(100, new.ip).unwrap().unwrap().ip, ip("192.168.1.2"));
}

pub(super) fn delete_tombstones_and_is_idempotent(s: &dyn Store) {
    put_underlays(s, &[1, 2]);
    let m = overlay(100, "10.0.0.1", "02:00:00:00:01:01", 1);
    create(s, &m);
    create(s, &overlay(100, "10.0.0.2", "02:00:00:00:01:02", 2));
    drain(s, &[1, 2]);
    assert_eq!(
        with_txn(s, |tx| tx.delete_mapping(100, m.ip)).unwrap(),
        Some(m)
    );
    for h in [1, 2] {
        let events: Vec<Event> = log_of(s, h).iter().map(|e| e.event).collect();
        assert_eq!(
            events,
            vec![Event::Vl2 {
                mac: m.mac,
                vnet_id: 100
            }],
            "host {h}"
        );
    }
    let stored = with_txn(s, |tx| tx.mapping(100, m.ip)).unwrap().unwrap();
    assert!(stored.deleted);
    assert_eq!(stored.mapping, m);
    // Again: nothing live, nothing written.
    assert_eq!(
        with_txn(s, |tx| tx.delete_mapping(100, m.ip)).unwrap(),
        None
    );
    assert_eq!(log_of(s, 2).len(), 1);
    // Re-creating revives the key with a higher version.
    create(s, &m);
    let stored = with_txn(s, |tx| tx.mapping(100, m.ip)).unwrap().unwrap();
    assert_eq!((stored.deleted, stored.version), (false, 3));
}

pub(super) fn log_is_oldest_first_and_removal_idempotent(s: &dyn Store) {
    put_underlays(s, &[1]);
    create(s, &overlay(1, "10.0.0.1", "02:00:00:00:00:01", 1));
    drain(s, &[1]);
    let mut appended = Vec::new();
    with_txn(s, |tx| {
        for i in 0..20u32 {
            appended.push(tx.append_event(
                cn(1),
                &Event::Vl2 {
                    mac: Mac([2, 0, 0, 0, 0, i as u8]),
                    vnet_id: i,
                },
            )?);
        }
        Ok::<_, StoreError>(())
    })
    .unwrap();
    let log = log_of(s, 1);
    assert_eq!(log.iter().map(|e| e.id).collect::<Vec<_>>(), appended);
    let first5 = s.read_log(underlay(1).ip, 5).unwrap();
    assert_eq!(
        first5.iter().map(|e| e.id).collect::<Vec<_>>(),
        appended[..5]
    );
    assert_eq!(s.read_log(underlay(1).ip, 0).unwrap(), vec![]);
    // Remove some, including an unknown id and a repeat.
    let unknown = LogId([0xee; 16]);
    let n = s
        .remove_log(&[appended[0], appended[2], unknown, appended[0]])
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(s.remove_log(&[appended[0], unknown]).unwrap(), 0);
    assert_eq!(s.remove_log(&[]).unwrap(), 0);
    let left: Vec<LogId> = log_of(s, 1).iter().map(|e| e.id).collect();
    let mut want = appended.clone();
    want.retain(|id| *id != appended[0] && *id != appended[2]);
    assert_eq!(left, want);
}

pub(super) fn scoped_removal_touches_only_the_hosts_own_log(s: &dyn Store) {
    put_underlays(s, &[1, 2]);
    create(s, &overlay(7, "10.0.0.1", "02:00:00:00:00:01", 1));
    create(s, &overlay(7, "10.0.0.2", "02:00:00:00:00:02", 2));
    let own: Vec<LogId> = log_of(s, 1).iter().map(|e| e.id).collect();
    let other: Vec<LogId> = log_of(s, 2).iter().map(|e| e.id).collect();
    assert!(!own.is_empty() && !other.is_empty());
    // Host 1 names host 2's ids (and one of its own): only its own goes.
    let mut ids = other.clone();
    ids.push(own[0]);
    assert_eq!(s.remove_log_of(underlay(1).ip, &ids).unwrap(), 1);
    assert_eq!(log_of(s, 2).iter().map(|e| e.id).collect::<Vec<_>>(), other);
    assert_eq!(log_of(s, 1).len(), own.len() - 1);
    // Unknown asker: an error, nothing removed.
    let err = s.remove_log_of(ip("192.168.9.9"), &other).unwrap_err();
    assert!(matches!(err, StoreError::UnknownUnderlayIp(_)), "{err}");
    assert_eq!(log_of(s, 2).len(), other.len());
    // The owner removes its own; a repeat removes nothing.
    assert_eq!(
        s.remove_log_of(underlay(2).ip, &other).unwrap(),
        other.len() as u64
    );
    assert_eq!(s.remove_log_of(underlay(2).ip, &other).unwrap(), 0);
    assert_eq!(s.remove_log_of(underlay(2).ip, &[]).unwrap(), 0);
}

pub(super) fn log_of_unknown_or_shared_underlay_ip_is_an_error(s: &dyn Store) {
    put_underlays(s, &[1]);
    let err = s.read_log(ip("192.168.9.9"), 10).unwrap_err();
    assert!(matches!(err, StoreError::UnknownUnderlayIp(_)), "{err}");
    with_txn(s, |tx| {
        tx.put_underlay(&UnderlayMapping {
            cn_uuid: cn(2),
            ip: underlay(1).ip,
            port: 4789,
        })
    })
    .unwrap();
    let err = s.read_log(underlay(1).ip, 10).unwrap_err();
    assert!(
        matches!(err, StoreError::AmbiguousUnderlayIp { count: 2, .. }),
        "{err}"
    );
    assert!(with_txn(s, |tx| tx.remove_underlay(cn(2))).unwrap());
    assert!(!with_txn(s, |tx| tx.remove_underlay(cn(2))).unwrap());
    assert_eq!(log_of(s, 1), vec![]);
    assert_eq!(
        with_txn(s, |tx| tx.underlay(cn(1))).unwrap(),
        Some(underlay(1))
    );
    assert_eq!(with_txn(s, |tx| tx.underlay(cn(2))).unwrap(), None);
}

#[derive(Debug)]
struct Abort;
impl From<StoreError> for Abort {
    fn from(e: StoreError) -> Abort {
        panic!("unexpected store error {e}")
    }
}

/// The caller's own SQL, in the dialect of the backend.
fn raw_exec(tx: &mut dyn Txn, sql: &str) {
    match tx.raw() {
        RawTxn::Sqlite(c) => {
            c.execute_batch(sql).unwrap();
        }
        RawTxn::Postgres(c) => {
            c.batch_execute(sql).unwrap();
        }
    }
}

fn raw_count(tx: &mut dyn Txn, sql: &str) -> i64 {
    match tx.raw() {
        RawTxn::Sqlite(c) => c.query_row(sql, [], |r| r.get(0)).unwrap(),
        RawTxn::Postgres(c) => c.query_one(sql, &[]).unwrap().get(0),
    }
}

pub(super) fn caller_txn_commits_or_rolls_back_everything(s: &dyn Store) {
    put_underlays(s, &[1, 2]);
    create(s, &overlay(100, "10.0.0.2", "02:00:00:00:01:02", 2));
    drain(s, &[1, 2]);
    with_txn(s, |tx| {
        raw_exec(tx, "CREATE TABLE test_nics (mac BIGINT NOT NULL)");
        Ok::<_, StoreError>(())
    })
    .unwrap();
    // Rolled back: the caller's row, the mapping and its events all vanish.
    let m = overlay(100, "10.0.0.1", "02:00:00:00:01:01", 1);
    let r: Result<(), Abort> = with_txn(s, |tx| {
        raw_exec(tx, "INSERT INTO test_nics (mac) VALUES (1)");
        tx.create_mapping(&m)?;
        assert_eq!(raw_count(tx, "SELECT count(*) FROM test_nics"), 1);
        Err(Abort)
    });
    assert!(r.is_err());
    assert_eq!(s.vl3(100, m.ip).unwrap(), None);
    assert_eq!(log_of(s, 2), vec![]);
    let n = with_txn(s, |tx| {
        Ok::<_, StoreError>(raw_count(tx, "SELECT count(*) FROM test_nics"))
    })
    .unwrap();
    assert_eq!(n, 0);
    // Committed: all of it.
    with_txn(s, |tx| {
        raw_exec(tx, "INSERT INTO test_nics (mac) VALUES (1)");
        tx.create_mapping(&m)?;
        Ok::<_, StoreError>(())
    })
    .unwrap();
    assert!(s.vl3(100, m.ip).unwrap().is_some());
    assert_eq!(log_of(s, 2).len(), 1);
    let n = with_txn(s, |tx| {
        Ok::<_, StoreError>(raw_count(tx, "SELECT count(*) FROM test_nics"))
    })
    .unwrap();
    assert_eq!(n, 1);
    // The caller's own reads in a read-only transaction.
    let n = with_read(s, |raw| {
        Ok::<_, StoreError>(match raw {
            RawTxn::Sqlite(c) => c.query_row("SELECT count(*) FROM test_nics", [], |r| r.get(0))?,
            RawTxn::Postgres(c) => c
                .query_one("SELECT count(*) FROM test_nics", &[])?
                .get::<_, i64>(0),
        })
    })
    .unwrap();
    assert_eq!(n, 1);
    // A failing read reports its error and leaves the connection usable.
    let r: Result<i64, StoreError> = with_read(s, |raw| {
        Ok(match raw {
            RawTxn::Sqlite(c) => {
                c.query_row("SELECT count(*) FROM no_such_table", [], |r| r.get(0))?
            }
            RawTxn::Postgres(c) => c
                .query_one("SELECT count(*) FROM no_such_table", &[])?
                .get(0),
        })
    });
    assert!(r.is_err());
    for _ in 0..20 {
        assert!(s.vl3(100, m.ip).unwrap().is_some());
    }
    // A panic inside the closure rolls back too, and the store stays usable.
    let store_ref = std::panic::AssertUnwindSafe(s);
    let r = std::panic::catch_unwind(move || {
        let _ = with_txn(*store_ref, |tx| {
            tx.delete_mapping(100, ip("10.0.0.1"))?;
            if tx.mapping(100, ip("10.0.0.1"))?.is_some() {
                panic!("boom");
            }
            Ok::<_, StoreError>(())
        });
    });
    assert!(r.is_err());
    for _ in 0..20 {
        // Every pooled connection must be usable and see the mapping live.
        assert!(s.vl3(100, m.ip).unwrap().is_some());
    }
    assert!(with_txn(s, |tx| tx.delete_mapping(100, m.ip))
        .unwrap()
        .is_some());
}

pub(super) fn two_handles_share_data(s: &dyn Store, other: &dyn Store) {
    put_underlays(s, &[1]);
    let m = overlay(9, "10.9.9.9", "02:00:00:00:09:09", 1);
    create(s, &m);
    assert_eq!(other.vl3(9, m.ip).unwrap().unwrap().mac, m.mac);
    assert_eq!(log_of(other, 1).len(), 1);
    let ids: Vec<LogId> = log_of(other, 1).iter().map(|e| e.id).collect();
    assert_eq!(other.remove_log(&ids).unwrap(), 1);
    assert_eq!(log_of(s, 1), vec![]);
    // Concurrent writers through both handles.
    std::thread::scope(|sc| {
        for (k, st) in [(0u8, s), (1u8, other)] {
            sc.spawn(move || {
                for i in 0..20u8 {
                    let m = overlay(
                        9,
                        &format!("10.{k}.0.{i}"),
                        &format!("02:00:00:00:{k:02x}:{i:02x}"),
                        1,
                    );
                    with_txn(st, |tx| tx.create_mapping(&m)).unwrap();
                }
            });
        }
    });
    for k in 0..2u8 {
        for i in 0..20u8 {
            assert!(s.vl3(9, ip(&format!("10.{k}.0.{i}"))).unwrap().is_some());
        }
    }
    assert_eq!(log_of(s, 1).len(), 40);
}

macro_rules! store_suite {
    ($name:ident, $open:path) => {
        mod $name {
            use super::*;
            #[test]
            fn lookups_found_and_not_found() {
                let Some((s, _g)) = $open() else { return };
                super::lookups_found_and_not_found(&*s);
            }
            #[test]
            fn ipv4_is_stored_mapped() {
                let Some((s, _g)) = $open() else { return };
                super::ipv4_is_stored_mapped(&*s);
            }
            #[test]
            fn create_notifies_every_host_on_the_vni() {
                let Some((s, _g)) = $open() else { return };
                super::create_notifies_every_host_on_the_vni(&*s);
            }
            #[test]
            fn move_writes_vl2_and_vl3_events() {
                let Some((s, _g)) = $open() else { return };
                super::move_writes_vl2_and_vl3_events(&*s);
            }
            #[test]
            fn delete_tombstones_and_is_idempotent() {
                let Some((s, _g)) = $open() else { return };
                super::delete_tombstones_and_is_idempotent(&*s);
            }
            #[test]
            fn log_is_oldest_first_and_removal_idempotent() {
                let Some((s, _g)) = $open() else { return };
                super::log_is_oldest_first_and_removal_idempotent(&*s);
            }
            #[test]
            fn scoped_removal_touches_only_the_hosts_own_log() {
                let Some((s, _g)) = $open() else { return };
                super::scoped_removal_touches_only_the_hosts_own_log(&*s);
            }
            #[test]
            fn log_of_unknown_or_shared_underlay_ip_is_an_error() {
                let Some((s, _g)) = $open() else { return };
                super::log_of_unknown_or_shared_underlay_ip_is_an_error(&*s);
            }
            #[test]
            fn caller_txn_commits_or_rolls_back_everything() {
                let Some((s, _g)) = $open() else { return };
                super::caller_txn_commits_or_rolls_back_everything(&*s);
            }
            #[test]
            fn two_handles_share_data() {
                let Some((s, g)) = $open() else { return };
                let other = open(&g.url()).unwrap();
                super::two_handles_share_data(&*s, &*other);
            }
        }
    };
}

/// Keeps a backend's database alive for a test and knows its URL.
pub(super) trait Guard {
    fn url(&self) -> String;
}

/// A temporary SQLite file, removed (with its WAL files) on drop.
pub(crate) struct TempSqlite(pub std::path::PathBuf);

impl TempSqlite {
    pub(crate) fn new() -> TempSqlite {
        let mut rnd = [0u8; 8];
        getrandom::getrandom(&mut rnd).unwrap();
        let name: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
        TempSqlite(std::env::temp_dir().join(format!("portolan-test-{name}.db")))
    }
}

impl Drop for TempSqlite {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = self.0.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Guard for TempSqlite {
    fn url(&self) -> String {
        format!("sqlite:{}", self.0.display())
    }
}

impl Guard for postgres::TestDatabase {
    fn url(&self) -> String {
        self.url.clone()
    }
}

fn open_sqlite() -> Option<(Arc<dyn Store>, TempSqlite)> {
    let t = TempSqlite::new();
    let s = open(&t.url()).unwrap();
    Some((s, t))
}

fn open_postgres() -> Option<(Arc<dyn Store>, postgres::TestDatabase)> {
    let admin = postgres::test_admin_url()?;
    let db = postgres::TestDatabase::create(&admin).unwrap();
    let s = open(&db.url).unwrap();
    Some((s, db))
}

store_suite!(sqlite_backend, open_sqlite);
store_suite!(postgres_backend, open_postgres);

#[test]
fn bad_urls_are_rejected() {
    for u in ["", "sqlite:", "mysql://x", "/tmp/x.db"] {
        let Err(e) = open(u) else {
            panic!("{u} opened")
        };
        assert!(matches!(e, StoreError::BadUrl(_)), "{e}");
        assert!(e.to_string().contains("expected sqlite:PATH"));
    }
}
