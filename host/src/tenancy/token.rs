//! The node's admin token: generated on first start and kept in the data dir (mode 0600). It
//! is the first admin key of the operator's tenant (see [`super::keys`]); replacing the file
//! and restarting the node rotates it.

use rand::RngCore;
use std::path::{Path, PathBuf};

/// File name of the admin token inside the data dir.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// The admin token's location in `data_dir`.
pub fn admin_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join(ADMIN_TOKEN_FILE)
}

/// Reads the admin token, generating and saving a new random one if there is none.
pub fn load_or_create_admin_token(data_dir: &Path) -> std::io::Result<String> {
    let path = admin_token_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => {
            crate::store::files::check_secret_mode(&path)?;
            return Ok(token.trim().to_string());
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    let token = format!("tlt_{}", hex::encode(bytes));
    crate::store::files::write_durably(&path, token.as_bytes(), 0o600)?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_created_once_and_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_admin_token(dir.path()).unwrap();
        let second = load_or_create_admin_token(dir.path()).unwrap();
        assert_eq!(first, second);
        assert!(first.len() > 40);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(admin_token_path(dir.path()))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
