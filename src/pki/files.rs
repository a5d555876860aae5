//! Key and certificate files: written atomically (a temporary file renamed over the old one),
//! private keys mode 0600, read back with the path in every error.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::PkiError;

/// Reads a PEM (or any text) file.
pub fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|e| PkiError::io(path, e))
}

/// Writes `text` to `path` atomically with `mode` (0600 for keys, 0644 for certificates).
pub fn write(path: &Path, text: &str, mode: u32) -> Result<(), PkiError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| PkiError::io(dir, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp: PathBuf = dir.join(format!(".{}.tmp", name.unwrap_or_default()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| PkiError::io(&tmp, e))?;
    // The mode given to open(2) is filtered by the umask; a key must end up 0600 whatever it is.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| PkiError::io(&tmp, e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| PkiError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| PkiError::io(path, e))
}

/// Writes a private key (0600).
pub fn write_key(path: &Path, pem: &str) -> Result<(), PkiError> {
    write(path, pem, 0o600)
}

/// Writes a certificate (0644).
pub fn write_cert(path: &Path, pem: &str) -> Result<(), PkiError> {
    write(path, pem, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_private_whatever_the_umask() {
        let d = std::env::temp_dir().join(format!("fabric-pki-files-{}", std::process::id()));
        let p = d.join("sub/key.pem");
        write_key(&p, "secret").unwrap();
        let m = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(m, 0o600);
        assert_eq!(read(&p).unwrap(), "secret");
        write_cert(&p, "public").unwrap();
        assert_eq!(read(&p).unwrap(), "public");
        let e = read(&d.join("missing.pem")).unwrap_err().to_string();
        assert!(e.contains("missing.pem"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
