//! A SQLite file in the temp dir with a random name, removed (with its WAL files) on drop.

#![allow(dead_code)]

use std::path::PathBuf;

/// A temporary SQLite store.
pub struct TempDb(pub PathBuf);

impl TempDb {
    /// A fresh path `fabric-PREFIX-<random>.db` in the temp dir (the file is not created).
    pub fn new(prefix: &str) -> TempDb {
        let mut b = [0u8; 8];
        getrandom::getrandom(&mut b).unwrap();
        let n: String = b.iter().map(|x| format!("{x:02x}")).collect();
        TempDb(std::env::temp_dir().join(format!("fabric-{prefix}-{n}.db")))
    }

    /// The store URL.
    pub fn url(&self) -> String {
        format!("sqlite:{}", self.0.display())
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for s in ["", "-wal", "-shm"] {
            let mut p = self.0.clone().into_os_string();
            p.push(s);
            let _ = std::fs::remove_file(p);
        }
    }
}
