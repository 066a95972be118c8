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
