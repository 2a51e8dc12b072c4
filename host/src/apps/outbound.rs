//! Outgoing HTTP an app may make (`[outbound] allowed_hosts`): calls to other apps of the node
//! at `http://<app>.internal/…`, which never touch the network, and calls to outside hosts the
//! manifest names. Everything else is denied.

/// The reserved domain under which apps of the node call each other.
pub const INTERNAL_DOMAIN: &str = ".internal";

/// Where an outgoing request goes, if anywhere.
#[derive(Debug, PartialEq, Eq)]
pub enum Destination {
    /// Another app on this node.
    App(String),
    /// An outside host the app may reach.
    Network,
    Denied,
}

/// Checks one `allowed_hosts` entry: `[http://|https://]host[:port]`, `<app>.internal` or
/// `*.internal`.
pub fn validate_allowed_host(entry: &str) -> Result<(), String> {
    let (_, host) = split_scheme(entry);
    let valid = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'*'))
        && (!host.contains('*') || host == "*.internal");
    if valid {
        Ok(())
    } else {
        Err(format!(
            "outbound.allowed_hosts: {entry:?} is not [http://|https://]host[:port], <app>.internal or *.internal"
        ))
    }
}

fn split_scheme(entry: &str) -> (Option<&str>, &str) {
    for scheme in ["http", "https"] {
        if let Some(rest) = entry
            .strip_prefix(scheme)
            .and_then(|r| r.strip_prefix("://"))
        {
            return (Some(scheme), rest);
        }
    }
    (None, entry)
}

/// Where a request to `scheme://authority` goes under `allowed` (the revision's
/// `allowed_hosts`).
pub fn destination(allowed: &[String], scheme: &str, authority: &str) -> Destination {
    let authority = authority.to_ascii_lowercase();
    let host = authority.split(':').next().unwrap_or_default();
    if let Some(app) = host.strip_suffix(INTERNAL_DOMAIN) {
        let permitted = allowed.iter().any(|entry| {
            let (_, entry) = split_scheme(entry);
            entry == "*.internal" || entry.eq_ignore_ascii_case(host)
        });
        return if permitted && super::valid_name(app) && scheme == "http" {
            Destination::App(app.to_string())
        } else {
            Destination::Denied
        };
    }
    let permitted = allowed.iter().any(|entry| {
        let (entry_scheme, entry_host) = split_scheme(entry);
        entry_scheme.is_none_or(|s| s == scheme)
            && (entry_host.eq_ignore_ascii_case(&authority)
                || (!entry_host.contains(':') && entry_host.eq_ignore_ascii_case(host)))
    });
    if permitted {
        Destination::Network
    } else {
        Destination::Denied
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(entries: &[&str]) -> Vec<String> {
        entries.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn internal_calls_need_the_app_or_the_wildcard() {
        let only_embed = allowed(&["openai.internal"]);
        assert_eq!(
            destination(&only_embed, "http", "openai.internal"),
            Destination::App("openai".into())
        );
        assert_eq!(
            destination(&only_embed, "http", "hello.internal"),
            Destination::Denied
        );
        let every_app = allowed(&["*.internal"]);
        assert_eq!(
            destination(&every_app, "http", "Hello.internal"),
            Destination::App("hello".into())
        );
        assert_eq!(
            destination(&[], "http", "hello.internal"),
            Destination::Denied
        );
        assert_eq!(
            destination(&every_app, "http", "bad_name.internal"),
            Destination::Denied
        );
    }

    #[test]
    fn outside_hosts_need_an_entry_that_matches_scheme_host_and_port() {
        let list = allowed(&["https://api.example.com", "127.0.0.1:9000"]);
        assert_eq!(
            destination(&list, "https", "api.example.com"),
            Destination::Network
        );
        assert_eq!(
            destination(&list, "http", "api.example.com"),
            Destination::Denied
        );
        assert_eq!(
            destination(&list, "http", "127.0.0.1:9000"),
            Destination::Network
        );
        assert_eq!(
            destination(&list, "http", "127.0.0.1:9001"),
            Destination::Denied
        );
        assert_eq!(destination(&list, "https", "evil.com"), Destination::Denied);
        assert_eq!(
            destination(&list, "https", "*.internal"),
            Destination::Denied
        );
    }

    #[test]
    fn entries_are_checked() {
        assert!(validate_allowed_host("api.example.com:443").is_ok());
        assert!(validate_allowed_host("https://api.example.com").is_ok());
        assert!(validate_allowed_host("*.internal").is_ok());
        assert!(validate_allowed_host("*.example.com").is_err());
        assert!(validate_allowed_host("ftp://x").is_err());
        assert!(validate_allowed_host("").is_err());
    }
}
