//! The witness client against a real etcd 3.4 (Debian's `etcd-server`), over plain TCP on
//! loopback: the sans-IO codec of `hypervisor::witness` is driven by std sockets here, by the
//! hypervisor's smoltcp socket on a host.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hypervisor::witness::etcd::{ClaimOutcome, EtcdClient, WitnessError};
use hypervisor::witness::http::{Response, ResponseReader};

/// A single-node etcd on two free loopback ports, killed and removed on drop.
struct Etcd {
    child: Child,
    dir: PathBuf,
    client: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Etcd {
    fn start() -> Self {
        let (client_port, peer_port) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!("colo-witness-etcd-{}-{client_port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let client = format!("127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let child = Command::new("etcd")
            .args(["--name", "w", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &format!("http://{client}")])
            .args(["--advertise-client-urls", &format!("http://{client}")])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("w={peer}"), "--unsafe-no-fsync"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("etcd.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd ({e}): install `etcd-server` with `cargo xtask deps`"));
        let etcd = Self { child, dir, client };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect(&etcd.client) {
                let _ = write!(s, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                if out.contains("\"health\":\"true\"") {
                    return etcd;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("etcd did not become healthy; log:\n{}", std::fs::read_to_string(etcd.dir.join("etcd.log")).unwrap());
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One request on a kept-alive connection, the reply read with the project's reader.
fn call(conn: &mut TcpStream, request: &[u8]) -> Response {
    conn.write_all(request).unwrap();
    let mut reader = ResponseReader::new();
    let mut buf = [0u8; 512];
    loop {
        let n = conn.read(&mut buf).unwrap();
        if n == 0 {
            return reader.finish().unwrap();
        }
        if let Some(response) = reader.push(&buf[..n]).unwrap() {
            return response;
        }
    }
}

fn connect(etcd: &Etcd) -> TcpStream {
    let conn = TcpStream::connect(&etcd.client).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    conn
}

#[test]
fn each_generation_is_granted_to_one_host_for_good() {
    let etcd = Etcd::start();
    let a = EtcdClient::new(&etcd.client, "sim", "host-a").unwrap();
    let b = EtcdClient::new(&etcd.client, "sim", "host-b").unwrap();
    let (mut ca, mut cb) = (connect(&etcd), connect(&etcd));

    assert_eq!(a.parse_claim(&call(&mut ca, &a.claim_request(1))), Ok(ClaimOutcome::Granted));
    assert_eq!(
        b.parse_claim(&call(&mut cb, &b.claim_request(1))),
        Ok(ClaimOutcome::Denied { holder: "host-a".into() })
    );
    // A claim retried after its reply was lost gets the same answer.
    assert_eq!(a.parse_claim(&call(&mut ca, &a.claim_request(1))), Ok(ClaimOutcome::Granted));
    assert_eq!(b.parse_claim(&call(&mut cb, &b.claim_request(2))), Ok(ClaimOutcome::Granted));
    assert_eq!(
        a.parse_claim(&call(&mut ca, &a.claim_request(2))),
        Ok(ClaimOutcome::Denied { holder: "host-b".into() })
    );
    // Another cluster's generations are its own.
    let other = EtcdClient::new(&etcd.client, "other", "host-b").unwrap();
    assert_eq!(other.parse_claim(&call(&mut cb, &other.claim_request(1))), Ok(ClaimOutcome::Granted));
}

#[test]
fn holder_key_lives_under_a_lease() {
    let etcd = Etcd::start();
    let a = EtcdClient::new(&etcd.client, "sim", "host-a").unwrap();
    let mut conn = connect(&etcd);
    let lease = a.parse_lease_grant(&call(&mut conn, &a.lease_grant_request(5))).unwrap();
    assert_eq!(lease.ttl_s, 5);
    a.parse_put(&call(&mut conn, &a.holder_request(3, lease.id))).unwrap();
    // The keep-alive endpoint streams (chunked); one renewal is one complete reply.
    let ttl = a.parse_keepalive(&call(&mut conn, &a.keepalive_request(lease.id))).unwrap();
    assert!((1..=5).contains(&ttl), "ttl {ttl}");
    // An unknown lease renews to nothing, and a put under it is refused by name.
    assert_eq!(a.parse_keepalive(&call(&mut conn, &a.keepalive_request(12345))), Ok(0));
    let refused = a.parse_put(&call(&mut conn, &a.holder_request(3, 12345)));
    assert!(matches!(refused, Err(WitnessError::Server { status: 404, code: 5, .. })), "{refused:?}");
}

/// One admin request (as etcd's root, before authentication is on): the HTTP status.
fn admin(conn: &mut TcpStream, etcd: &Etcd, path: &str, body: &str) -> u16 {
    let response = call(conn, &hypervisor::witness::http::post_json(&etcd.client, path, None, body));
    assert!(
        (200..300).contains(&response.status),
        "{path}: {} {}",
        response.status,
        String::from_utf8_lossy(&response.body)
    );
    response.status
}

/// etcd with authentication on: a host that logs in with its user and password claims
/// generations; without logging in, or with a wrong password, it gets a named error, never a
/// grant.
#[test]
fn with_etcd_authentication_only_a_logged_in_host_claims() {
    let etcd = Etcd::start();
    let mut conn = connect(&etcd);
    // root (required before `auth enable`), and user `colo` with read-write on `colo/`.
    admin(&mut conn, &etcd, "/v3/auth/user/add", r#"{"name":"root","password":"root-pw"}"#);
    admin(&mut conn, &etcd, "/v3/auth/role/add", r#"{"name":"root"}"#);
    admin(&mut conn, &etcd, "/v3/auth/user/grant", r#"{"user":"root","role":"root"}"#);
    admin(&mut conn, &etcd, "/v3/auth/user/add", r#"{"name":"colo","password":"s3cret-pw"}"#);
    admin(&mut conn, &etcd, "/v3/auth/role/add", r#"{"name":"colo"}"#);
    // key "colo/" .. range_end "colo0", base64.
    let perm = r#"{"name":"colo","perm":{"permType":"READWRITE","key":"Y29sby8=","range_end":"Y29sbzA="}}"#;
    admin(&mut conn, &etcd, "/v3/auth/role/grant", perm);
    admin(&mut conn, &etcd, "/v3/auth/user/grant", r#"{"user":"colo","role":"colo"}"#);
    admin(&mut conn, &etcd, "/v3/auth/enable", "{}");

    let mut a = EtcdClient::new(&etcd.client, "sim", "host-a").unwrap();
    let mut conn = connect(&etcd);
    // Not logged in: refused by etcd, never a grant.
    let refused = a.parse_claim(&call(&mut conn, &a.claim_request(1)));
    match refused {
        Err(WitnessError::Server { message, .. }) => assert!(message.contains("user name is empty"), "{message}"),
        other => panic!("a claim without logging in was not refused: {other:?}"),
    }
    // A wrong password: no token.
    let wrong = a.accept_token(&call(&mut conn, &a.authenticate_request("colo", "guess")));
    match wrong {
        Err(WitnessError::Server { message, .. }) => assert!(message.contains("authentication failed"), "{message}"),
        other => panic!("a wrong password was accepted: {other:?}"),
    }
    assert!(a.parse_claim(&call(&mut conn, &a.claim_request(1))).is_err());
    // The right one: the client carries the token from then on.
    let reply = call(&mut conn, &a.authenticate_request("colo", "s3cret-pw"));
    a.accept_token(&reply).unwrap();
    let token = String::from_utf8_lossy(&reply.body)
        .split("\"token\":\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    let shown = format!("{a:?}");
    assert!(!shown.contains(&token) && shown.contains("<not shown>"), "{shown}");
    assert_eq!(a.parse_claim(&call(&mut conn, &a.claim_request(1))), Ok(ClaimOutcome::Granted));
    let lease = a.parse_lease_grant(&call(&mut conn, &a.lease_grant_request(5))).unwrap();
    a.parse_put(&call(&mut conn, &a.holder_request(1, lease.id))).unwrap();
    // Another host logged in as the same user is still denied the same generation.
    let mut b = EtcdClient::new(&etcd.client, "sim", "host-b").unwrap();
    b.accept_token(&call(&mut conn, &b.authenticate_request("colo", "s3cret-pw"))).unwrap();
    assert_eq!(
        b.parse_claim(&call(&mut conn, &b.claim_request(1))),
        Ok(ClaimOutcome::Denied { holder: "host-a".into() })
    );
}
