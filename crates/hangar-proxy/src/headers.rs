//! Header rules of the proxy: host/subdomain matching against a route's cluster, the `x-verified-*`
//! and `x-forwarded-*` headers sent to backends, and the general headers (server, CORS, backend id)
//! put on every response, and the header values a route prepares once for all its requests
//! ([`PreparedRoute`]). Pure functions over `HeaderMap`s; no IO.

use hangar_types::protocol::RouteInfo;
use hangar_types::BackendId;
use http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    CONNECTION, SERVER, UPGRADE,
};
use http::{HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;

pub(crate) const VERIFIED_PREFIX: &str = "x-verified-";
pub(crate) const X_VERIFIED_USERNAME: HeaderName = HeaderName::from_static("x-verified-username");
pub(crate) const X_VERIFIED_USER_DATA: HeaderName = HeaderName::from_static("x-verified-user-data");
pub(crate) const X_VERIFIED_PATH: HeaderName = HeaderName::from_static("x-verified-path");
pub(crate) const X_VERIFIED_BACKEND: HeaderName = HeaderName::from_static("x-verified-backend");
pub(crate) const X_VERIFIED_SECRET: HeaderName = HeaderName::from_static("x-verified-secret");
pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// Plane's name, kept so Plane's client code keeps working.
pub const X_PLANE_BACKEND_ID: HeaderName = HeaderName::from_static("x-plane-backend-id");
pub const X_HANGAR_BACKEND_ID: HeaderName = HeaderName::from_static("x-hangar-backend-id");

/// Value of the `server` header on every response: `Hangar/<version>`.
pub fn server_header_value() -> HeaderValue {
    // The version comes from Cargo.toml and is plain ASCII; fall back rather than panic.
    HeaderValue::from_str(&format!("Hangar/{}", hangar_types::VERSION))
        .unwrap_or(HeaderValue::from_static("Hangar"))
}

/// Whether the request asks for a protocol upgrade: its `Connection` header contains the token
/// `upgrade` (Firefox sends `keep-alive, Upgrade`).
pub(crate) fn is_upgrade_request(headers: &HeaderMap) -> bool {
    lists_token(headers, CONNECTION, "upgrade")
}

/// Whether a `101` response switched to WebSocket: its `Upgrade` header names `websocket`.
pub(crate) fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    lists_token(headers, UPGRADE, "websocket")
}

/// Whether header `name` (possibly repeated, each value a comma-separated list) contains `token`,
/// compared case-insensitively.
fn lists_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|listed| listed.trim().eq_ignore_ascii_case(token))
}

/// Why a request's host does not fit its route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HostMismatch {
    #[error("the host does not belong to the backend's cluster")]
    NotInCluster,
    #[error("the host's subdomain does not match the backend's subdomain")]
    WrongSubdomain,
}

/// The subdomain of `host` below `cluster` (`None` when the host is the cluster itself). A trailing
/// `:443` is ignored on both sides, since clients sometimes send it for HTTPS. Comparison is
/// case-insensitive; the returned subdomain is lowercase. (The tests' view of [`subdomain_in`].)
#[cfg(test)]
pub(crate) fn subdomain_of(host: &str, cluster: &str) -> Result<Option<String>, HostMismatch> {
    subdomain_in(host, cluster).map(|sub| sub.map(str::to_ascii_lowercase))
}

/// [`subdomain_of`] without allocating: the subdomain as `host` spells it.
fn subdomain_in<'h>(host: &'h str, cluster: &str) -> Result<Option<&'h str>, HostMismatch> {
    let host = host.strip_suffix(":443").unwrap_or(host);
    let cluster = cluster.strip_suffix(":443").unwrap_or(cluster);
    let split = host
        .len()
        .checked_sub(cluster.len())
        .ok_or(HostMismatch::NotInCluster)?;
    let (Some(prefix), Some(tail)) = (host.get(..split), host.get(split..)) else {
        return Err(HostMismatch::NotInCluster);
    };
    if !tail.eq_ignore_ascii_case(cluster) {
        return Err(HostMismatch::NotInCluster);
    }
    if prefix.is_empty() {
        return Ok(None);
    }
    match prefix.strip_suffix('.') {
        Some(sub) if !sub.is_empty() => Ok(Some(sub)),
        _ => Err(HostMismatch::NotInCluster),
    }
}

/// Checks `host` against the route (§7.5): the host must be the route's cluster or a subdomain of it;
/// a route with a subdomain accepts only exactly that subdomain.
pub(crate) fn check_host(host: &str, route: &RouteInfo) -> Result<(), HostMismatch> {
    let sub = subdomain_in(host, route.cluster.as_str())?;
    match (&route.subdomain, sub) {
        (None, _) => Ok(()),
        (Some(want), Some(got)) if want.eq_ignore_ascii_case(got) => Ok(()),
        (Some(_), _) => Err(HostMismatch::WrongSubdomain),
    }
}

/// The route holds a user name that cannot be sent as a header value (control characters).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the token's user name cannot be sent as a header value")]
pub(crate) struct InvalidUserHeader;

/// A route with the header values it puts on every request to its backend and every response from
/// it, made once when the route arrives rather than on each request (the user data is a JSON
/// serialization; the others are copies). Reads as the [`RouteInfo`] it was made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PreparedRoute {
    info: RouteInfo,
    user: Result<VerifiedUser, InvalidUserHeader>,
    backend_id_header: HeaderValue,
    secret_header: HeaderValue,
}

/// `x-verified-username` and `x-verified-user-data`, when the token has them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VerifiedUser {
    username: Option<HeaderValue>,
    user_data: Option<HeaderValue>,
}

impl VerifiedUser {
    fn of(info: &RouteInfo) -> Result<VerifiedUser, InvalidUserHeader> {
        let username = match &info.user {
            Some(user) => {
                Some(HeaderValue::from_bytes(user.as_bytes()).map_err(|_| InvalidUserHeader)?)
            }
            None => None,
        };
        let user_data = match &info.user_data {
            Some(data) => {
                // Compact JSON escapes control characters, so this is always a valid header value.
                let json = serde_json::Value::Object(data.clone()).to_string();
                Some(HeaderValue::from_bytes(json.as_bytes()).map_err(|_| InvalidUserHeader)?)
            }
            None => None,
        };
        Ok(VerifiedUser {
            username,
            user_data,
        })
    }
}

impl PreparedRoute {
    pub(crate) fn new(info: RouteInfo) -> PreparedRoute {
        PreparedRoute {
            user: VerifiedUser::of(&info),
            backend_id_header: backend_id_value(&info.backend_id),
            secret_header: HeaderValue::from_str(info.secret_token.as_str())
                .unwrap_or(HeaderValue::from_static("")),
            info,
        }
    }

    /// The value of the backend-id headers on responses.
    pub(crate) fn backend_id_value(&self) -> &HeaderValue {
        &self.backend_id_header
    }
}

impl std::ops::Deref for PreparedRoute {
    type Target = RouteInfo;

    fn deref(&self) -> &RouteInfo {
        &self.info
    }
}

/// Rewrites request headers for the backend: removes every incoming `x-verified-*` header, then sets
/// the verified headers from the route and the `x-forwarded-*` headers (overwriting incoming values;
/// `forwarded_for` is the client's address as a header value). Every other header passes through
/// unchanged.
pub(crate) fn set_backend_request_headers(
    headers: &mut HeaderMap,
    route: &PreparedRoute,
    original_path: &str,
    forwarded_for: &HeaderValue,
    https: bool,
) -> Result<(), InvalidUserHeader> {
    let user = route.user.as_ref().map_err(Clone::clone)?;
    let spoofed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with(VERIFIED_PREFIX))
        .cloned()
        .collect();
    for name in spoofed {
        headers.remove(name);
    }
    if let Some(username) = &user.username {
        headers.insert(X_VERIFIED_USERNAME, username.clone());
    }
    if let Some(user_data) = &user.user_data {
        headers.insert(X_VERIFIED_USER_DATA, user_data.clone());
    }
    // The path comes from a parsed URI, so it only holds valid header characters; be safe anyway.
    if let Ok(value) = HeaderValue::from_str(original_path) {
        headers.insert(X_VERIFIED_PATH, value);
    }
    headers.insert(X_VERIFIED_BACKEND, route.backend_id_header.clone());
    headers.insert(X_VERIFIED_SECRET, route.secret_header.clone());
    headers.insert(X_FORWARDED_FOR, forwarded_for.clone());
    let proto = if https { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    Ok(())
}

/// `x-forwarded-for`'s value for a client at `ip`.
pub(crate) fn forwarded_for_value(ip: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"))
}

pub(crate) fn backend_id_value(backend: &BackendId) -> HeaderValue {
    // Backend ids are validated to `[a-z0-9-]`.
    HeaderValue::from_str(backend.as_str()).unwrap_or(HeaderValue::from_static("invalid"))
}

/// Marks a response as coming from (or on behalf of) the backend whose id `value` holds.
pub(crate) fn set_backend_id(headers: &mut HeaderMap, value: &HeaderValue) {
    headers.insert(X_PLANE_BACKEND_ID, value.clone());
    headers.insert(X_HANGAR_BACKEND_ID, value.clone());
}

/// Headers on every response the proxy returns: `server` (overwriting the backend's) and permissive
/// CORS defaults unless the backend set any of the three CORS headers itself.
pub(crate) fn apply_general_headers(headers: &mut HeaderMap, server: &HeaderValue) {
    headers.insert(SERVER, server.clone());
    let backend_set_cors = [
        ACCESS_CONTROL_ALLOW_ORIGIN,
        ACCESS_CONTROL_ALLOW_METHODS,
        ACCESS_CONTROL_ALLOW_HEADERS,
    ]
    .iter()
    .any(|name| headers.contains_key(name));
    if !backend_set_cors {
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        headers.insert(ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("*"));
        headers.insert(
            ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("*, Authorization"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_types::token::SecretToken;

    fn route(subdomain: Option<&str>) -> RouteInfo {
        RouteInfo {
            backend_id: "b1".parse().unwrap(),
            address: "127.0.0.1:1".parse().unwrap(),
            secret_token: SecretToken::new("sek".into()),
            cluster: "myhost:8080".parse().unwrap(),
            user: Some("alice".into()),
            user_data: Some(serde_json::from_str(r#"{"access":"readonly"}"#).unwrap()),
            subdomain: subdomain.map(String::from),
            lease_remaining_ms: None,
        }
    }

    #[test]
    fn subdomain_examples_from_plane() {
        assert_eq!(
            subdomain_of("foobar.myhost:8080", "myhost:8080"),
            Ok(Some("foobar".into()))
        );
        assert_eq!(
            subdomain_of("foobar.myhost", "myhost:8080"),
            Err(HostMismatch::NotInCluster)
        );
        assert_eq!(
            subdomain_of("foobar.myhost:8080", "myhost"),
            Err(HostMismatch::NotInCluster)
        );
        assert_eq!(
            subdomain_of("foobar.myhost:443", "myhost"),
            Ok(Some("foobar".into()))
        );
    }

    #[test]
    fn subdomain_edge_cases() {
        assert_eq!(subdomain_of("myhost:8080", "myhost:8080"), Ok(None));
        assert_eq!(subdomain_of("MyHost:8080", "myhost:8080"), Ok(None));
        assert_eq!(subdomain_of("myhost:443", "myhost"), Ok(None));
        assert_eq!(subdomain_of("myhost", "myhost:443"), Ok(None));
        assert_eq!(
            subdomain_of("a.b.example.com", "example.com"),
            Ok(Some("a.b".into()))
        );
        assert_eq!(
            subdomain_of("foobarexample.com", "example.com"),
            Err(HostMismatch::NotInCluster)
        );
        assert_eq!(
            subdomain_of(".example.com", "example.com"),
            Err(HostMismatch::NotInCluster)
        );
        assert_eq!(
            subdomain_of("example.org", "example.com"),
            Err(HostMismatch::NotInCluster)
        );
    }

    #[test]
    fn host_checks_against_route() {
        assert_eq!(check_host("myhost:8080", &route(None)), Ok(()));
        assert_eq!(check_host("any.myhost:8080", &route(None)), Ok(()));
        assert_eq!(check_host("sub.myhost:8080", &route(Some("sub"))), Ok(()));
        assert_eq!(
            check_host("other.myhost:8080", &route(Some("sub"))),
            Err(HostMismatch::WrongSubdomain)
        );
        assert_eq!(
            check_host("myhost:8080", &route(Some("sub"))),
            Err(HostMismatch::WrongSubdomain)
        );
        assert_eq!(
            check_host("elsewhere:8080", &route(None)),
            Err(HostMismatch::NotInCluster)
        );
    }

    #[test]
    fn upgrade_detection() {
        type Detect = fn(&HeaderMap) -> bool;
        let cases: [(Detect, HeaderName, &[&str], bool); 10] = [
            (is_upgrade_request, CONNECTION, &[], false),
            (is_upgrade_request, CONNECTION, &["keep-alive"], false),
            (
                is_upgrade_request,
                CONNECTION,
                &["keep-alive, Upgrade"],
                true,
            ),
            (is_upgrade_request, CONNECTION, &["UPGRADE"], true),
            (is_upgrade_request, CONNECTION, &["upgrade-insecure"], false),
            (
                is_upgrade_request,
                CONNECTION,
                &["upgrade-insecure", "upgrade"],
                true,
            ),
            (is_websocket_upgrade, UPGRADE, &[], false),
            (is_websocket_upgrade, UPGRADE, &["WebSocket"], true),
            (is_websocket_upgrade, UPGRADE, &["h2c"], false),
            (is_websocket_upgrade, UPGRADE, &["foo, websocket"], true),
        ];
        for (detect, name, values, expected) in cases {
            let mut h = HeaderMap::new();
            for &value in values {
                h.append(name.clone(), HeaderValue::from_static(value));
            }
            assert_eq!(detect(&h), expected, "{name}: {values:?}");
        }
    }

    #[test]
    fn backend_request_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-verified-blah", HeaderValue::from_static("spoofed"));
        h.insert("x-verified-username", HeaderValue::from_static("mallory"));
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert("cookie", HeaderValue::from_static("a=b"));
        set_backend_request_headers(
            &mut h,
            &PreparedRoute::new(route(None)),
            "/tok/x",
            &forwarded_for_value("10.1.2.3".parse().unwrap()),
            false,
        )
        .unwrap();
        assert!(h.get("x-verified-blah").is_none());
        assert_eq!(h["x-verified-username"], "alice");
        assert_eq!(h["x-verified-user-data"], r#"{"access":"readonly"}"#);
        assert_eq!(h["x-verified-path"], "/tok/x");
        assert_eq!(h["x-verified-backend"], "b1");
        assert_eq!(h["x-verified-secret"], "sek");
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["cookie"], "a=b");
        assert_eq!(h.get_all("x-verified-username").iter().count(), 1);

        let v6 = forwarded_for_value("::1".parse().unwrap());
        let mut r = route(None);
        r.user = Some("bad\nname".into());
        let before = h.clone();
        assert_eq!(
            set_backend_request_headers(&mut h, &PreparedRoute::new(r), "/", &v6, true),
            Err(InvalidUserHeader)
        );
        assert_eq!(h, before, "a refused route leaves the headers alone");
        let mut r = route(None);
        r.user = None;
        r.user_data = None;
        let mut h = HeaderMap::new();
        set_backend_request_headers(&mut h, &PreparedRoute::new(r), "/", &v6, true).unwrap();
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert!(h.get("x-verified-username").is_none());
        assert!(h.get("x-verified-user-data").is_none());
    }

    #[test]
    fn every_request_of_a_route_shares_the_values_prepared_for_it() {
        let route = PreparedRoute::new(route(None));
        let client = forwarded_for_value("10.1.2.3".parse().unwrap());
        let (mut first, mut second) = (HeaderMap::new(), HeaderMap::new());
        set_backend_request_headers(&mut first, &route, "/a", &client, false).unwrap();
        set_backend_request_headers(&mut second, &route, "/b", &client, false).unwrap();
        // The same bytes, not equal copies: nothing was serialized or copied for the second request.
        for name in [
            X_VERIFIED_USERNAME,
            X_VERIFIED_USER_DATA,
            X_VERIFIED_BACKEND,
            X_VERIFIED_SECRET,
            X_FORWARDED_FOR,
        ] {
            assert_eq!(
                first[&name].as_bytes().as_ptr(),
                second[&name].as_bytes().as_ptr(),
                "{name}"
            );
        }
        assert_eq!(second["x-verified-path"], "/b");
    }

    #[test]
    fn general_headers() {
        let server = server_header_value();
        let mut h = HeaderMap::new();
        h.insert(SERVER, HeaderValue::from_static("nginx"));
        apply_general_headers(&mut h, &server);
        assert!(h[SERVER].to_str().unwrap().starts_with("Hangar/"));
        assert_eq!(h[ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert_eq!(h[ACCESS_CONTROL_ALLOW_METHODS], "*");
        assert_eq!(h[ACCESS_CONTROL_ALLOW_HEADERS], "*, Authorization");

        let mut h = HeaderMap::new();
        h.insert(
            ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET"),
        );
        apply_general_headers(&mut h, &server);
        assert_eq!(h[ACCESS_CONTROL_ALLOW_METHODS], "GET");
        assert!(h.get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
        assert!(h.get(ACCESS_CONTROL_ALLOW_HEADERS).is_none());
    }
}
