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

/// Checks one `allowed_hosts` entry: `[http://|https://]host[:port]` (an IPv6 address in
/// brackets), `<app>.internal` or `*.internal`.
pub fn validate_allowed_host(entry: &str) -> Result<(), String> {
    let (_, rest) = split_scheme(entry);
    if rest == "*.internal" || parse_entry(entry).is_some() {
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

/// An allowed host: its scheme if it names one, its host (lower case, no trailing dot) and
/// its port if it names one.
fn parse_entry(entry: &str) -> Option<(Option<&str>, String, Option<u16>)> {
    let (scheme, rest) = split_scheme(entry);
    let (host, port) = parse_authority(rest)?;
    Some((scheme, host, port))
}

/// The host (lower case, without one trailing dot) and port of an authority; `None` for
/// anything but `host[:port]` (user info, a path, a wildcard).
fn parse_authority(authority: &str) -> Option<(String, Option<u16>)> {
    if authority.is_empty() || authority.contains(['@', '/', '*', '?', '#']) {
        return None;
    }
    let parsed: http::uri::Authority = authority.parse().ok()?;
    let host = parsed.host().to_ascii_lowercase();
    let host = host.strip_suffix('.').unwrap_or(&host).to_string();
    (!host.is_empty()).then_some((host, parsed.port_u16()))
}

fn default_port(scheme: &str) -> u16 {
    if scheme == "https" {
        443
    } else {
        80
    }
}

/// Where a request to `scheme://authority` goes under `allowed` (the revision's
/// `allowed_hosts`).
pub fn destination(allowed: &[String], scheme: &str, authority: &str) -> Destination {
    if scheme != "http" && scheme != "https" {
        return Destination::Denied;
    }
    let Some((host, port)) = parse_authority(authority) else {
        return Destination::Denied;
    };
    let port = port.unwrap_or(default_port(scheme));
    if let Some(app) = host.strip_suffix(INTERNAL_DOMAIN) {
        let permitted = allowed.iter().any(|entry| {
            let (_, entry) = split_scheme(entry);
            entry == "*.internal"
                || parse_authority(entry).is_some_and(|(entry_host, _)| entry_host == host)
        });
        return if permitted && super::valid_name(app) && scheme == "http" && port == 80 {
            Destination::App(app.to_string())
        } else {
            Destination::Denied
        };
    }
    let permitted = allowed.iter().filter_map(|entry| parse_entry(entry)).any(
        |(entry_scheme, entry_host, entry_port)| {
            entry_scheme.is_none_or(|s| s == scheme)
                && entry_host == host
                && entry_port.unwrap_or(default_port(entry_scheme.unwrap_or(scheme))) == port
        },
    );
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
        // User info cannot smuggle another host past the list.
        assert_eq!(
            destination(&list, "https", "api.example.com:1@evil.com"),
            Destination::Denied
        );
        assert_eq!(
            destination(&list, "https", "API.Example.com."),
            Destination::Network
        );
        // No port in the entry: the scheme's own port only.
        assert_eq!(
            destination(&list, "https", "api.example.com:8443"),
            Destination::Denied
        );
        assert_eq!(
            destination(&list, "ftp", "api.example.com"),
            Destination::Denied
        );
        let v6 = allowed(&["[::1]:9000"]);
        assert_eq!(destination(&v6, "http", "[::1]:9000"), Destination::Network);
        assert_eq!(destination(&v6, "http", "[::2]:9000"), Destination::Denied);
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
        assert!(validate_allowed_host("user@host").is_err());
        assert!(validate_allowed_host("[::1]:80").is_ok());
        assert!(validate_allowed_host("").is_err());
    }
}
