//! Who may do what. For now one principal: the node's operator, holding the admin token that
//! the node generates on first start and keeps in its data dir (mode 0600). Tenants and API
//! keys come later and plug in here.

use rand::RngCore;
use sha2::{Digest, Sha256};
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

/// Checks an `Authorization` header value against the admin token in constant time.
pub fn is_admin(authorization: Option<&str>, admin_token: &str) -> bool {
    let Some(presented) = authorization.and_then(|v| v.strip_prefix("Bearer ")) else {
        return false;
    };
    // Comparing digests keeps the comparison's time independent of where the strings differ.
    let a = Sha256::digest(presented.trim().as_bytes());
    let b = Sha256::digest(admin_token.as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
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

    #[test]
    fn only_the_exact_bearer_token_is_admin() {
        assert!(is_admin(Some("Bearer abc"), "abc"));
        assert!(!is_admin(Some("Bearer abd"), "abc"));
        assert!(!is_admin(Some("abc"), "abc"));
        assert!(!is_admin(None, "abc"));
    }
}
