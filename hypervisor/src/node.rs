//! The two-host driver: one host's loop when it runs as `role=primary` or `role=secondary`
//! (the kernel hands over here; `role=standalone` keeps the runner).
//!
//! It owns the replication link ([`crate::net::repl`]) and the guest, and carries bytes between
//! them and the protocol: on every new connection it sends `Hello`, then heartbeats every
//! `heartbeat_ms`; it decodes the peer's stream with `colo::link::LinkDecoder` and closes the
//! connection (counted by the codec's error name) on the first bad byte. Nothing below this
//! module imports it.
//!
//! What it does not do yet: run the COLO engine (`colo::node`) — mirrored input, compared
//! output, checkpoints. Until then the primary runs its guest unreplicated and the secondary
//! does not start one.

use alloc::vec::Vec;

use crate::colo::link::{LinkDecoder, LinkRole, Repr};
use crate::config::{Config, Role};
use crate::host::{shutdown, time};
use crate::kernel::BootInfo;
use crate::memory::FrameAllocator;
use crate::net::repl::nic::ReplPort;
use crate::net::repl::{CloseReason, ReplLink};

/// Most bytes of link messages waiting for the socket; beyond it heartbeats are skipped (they
/// carry no state) rather than queued.
const MAX_PENDING: usize = 64 << 10;
/// Bytes read from the link per step.
const READ_CHUNK: usize = 16 << 10;

/// The link's protocol session for one connection: greeting, heartbeats, decoding.
struct Session {
    role: LinkRole,
    host_id: u64,
    guest_id: u64,
    heartbeat_ms: u64,
    /// The connection this session belongs to.
    conn: Option<u32>,
    decoder: LinkDecoder,
    pending: Vec<u8>,
    next_heartbeat_ms: u64,
    last_rx_ms: u64,
    peer_hello: bool,
    heartbeats_in: u64,
    heartbeats_out: u64,
    scratch: Vec<u8>,
}

impl Session {
    fn new(config: &Config, guest_id: u64) -> Self {
        let role = if config.role == Role::Primary { LinkRole::Primary } else { LinkRole::Secondary };
        let host_id = config.repl_addr.map_or(0, |a| u64::from(u32::from(a.addr)));
        Self {
            role,
            host_id,
            guest_id,
            heartbeat_ms: config.heartbeat_ms.into(),
            conn: None,
            decoder: LinkDecoder::new(),
            pending: Vec::new(),
            next_heartbeat_ms: 0,
            last_rx_ms: 0,
            peer_hello: false,
            heartbeats_in: 0,
            heartbeats_out: 0,
            scratch: alloc::vec![0; READ_CHUNK],
        }
    }

    /// How long the peer may stay silent before the connection is given up.
    fn silence_limit_ms(&self) -> u64 {
        (self.heartbeat_ms * 10).max(2_000)
    }

    fn queue(&mut self, repr: &Repr<'_>) -> bool {
        if self.pending.len() >= MAX_PENDING {
            return false;
        }
        repr.emit_to_vec(&mut self.pending).is_some()
    }

    /// One round: follow the connection, send what is due, read and decode what arrived.
    fn service(&mut self, link: &mut ReplLink, now_ms: u64) {
        let current = link.connection();
        if current.map(|c| c.id) != self.conn {
            // A stream the peer ended (FIN or reset) inside a message is bad bytes too.
            let local_close = matches!(link.last_close(), Some(CloseReason::Protocol(_) | CloseReason::Local(_)));
            if let (Err(e), false) = (self.decoder.end_of_stream(), local_close) {
                log::warn!("node: link error `{}`: {e}", e.name());
                link.count_error(e.name());
            }
            if self.conn.is_some() {
                log::info!(
                    "node: link down (heartbeats in {} out {}); {}",
                    self.heartbeats_in,
                    self.heartbeats_out,
                    link.counters()
                );
            }
            self.conn = current.map(|c| c.id);
            self.decoder = LinkDecoder::new();
            self.pending.clear();
            self.peer_hello = false;
            self.heartbeats_in = 0;
            self.heartbeats_out = 0;
            self.last_rx_ms = now_ms;
            self.next_heartbeat_ms = now_ms + self.heartbeat_ms;
            if current.is_some() {
                let hello = Repr::Hello {
                    role: self.role,
                    host_id: self.host_id,
                    generation: 0,
                    guest_id: self.guest_id,
                    epoch: 0,
                };
                self.queue(&hello);
            }
        }
        if self.conn.is_none() {
            return;
        }
        if now_ms >= self.next_heartbeat_ms {
            self.next_heartbeat_ms = now_ms + self.heartbeat_ms;
            if self.queue(&Repr::Heartbeat { generation: 0, now: now_ms }) {
                self.heartbeats_out += 1;
            }
        }
        if !self.pending.is_empty() {
            let sent = link.send(&self.pending);
            self.pending.drain(..sent);
        }
        loop {
            let n = link.recv(&mut self.scratch);
            if n == 0 {
                break;
            }
            self.last_rx_ms = now_ms;
            let mut input = &self.scratch[..n];
            loop {
                match self.decoder.decode(&mut input) {
                    Ok(Some(repr)) => {
                        let (role, peer_hello, heartbeats_in) =
                            (self.role, &mut self.peer_hello, &mut self.heartbeats_in);
                        if let Err(reason) = on_message(role, &repr, peer_hello, heartbeats_in) {
                            log::warn!("node: link message refused: {reason}; closing the connection");
                            link.close(CloseReason::Protocol(reason), now_ms);
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        log::warn!("node: link error `{}`: {e}; closing the connection", e.name());
                        link.close(CloseReason::Protocol(e.name()), now_ms);
                        return;
                    }
                }
            }
        }
        if now_ms > self.last_rx_ms + self.silence_limit_ms() {
            log::warn!("node: peer silent for {} ms; closing the connection", now_ms - self.last_rx_ms);
            link.close(CloseReason::Local("silent"), now_ms);
        }
    }
}

/// One decoded message; `Err(name)` when it is not acceptable here.
fn on_message(
    role: LinkRole,
    repr: &Repr<'_>,
    peer_hello: &mut bool,
    heartbeats_in: &mut u64,
) -> Result<(), &'static str> {
    match repr {
        Repr::Hello { role: peer, host_id, guest_id, .. } => {
            if *peer == role {
                return Err("same_role");
            }
            if *peer_hello {
                return Err("repeated_hello");
            }
            *peer_hello = true;
            log::info!("node: link up: hello from the {peer:?} host {host_id:#x} (guest {guest_id:#x})");
            Ok(())
        }
        _ if !*peer_hello => Err("no_hello"),
        Repr::Heartbeat { .. } => {
            *heartbeats_in += 1;
            if *heartbeats_in == 1 {
                log::info!("node: first heartbeat from the peer");
            }
            Ok(())
        }
        // The COLO engine is not driven yet: anything else is unexpected on this link.
        _ => Err("unexpected_message"),
    }
}

/// FNV-1a over the guest modules' lines and bytes: both hosts must run the same guest.
fn guest_id(boot: &BootInfo<'_>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    for module in boot.modules.iter().filter(|m| m.cmdline.starts_with(crate::runner::GUEST_PREFIX)) {
        module.cmdline.bytes().for_each(&mut eat);
        // SAFETY: the boot loader placed the module at this range, reserved from the allocator
        // and identity-mapped; nothing writes guest images.
        let bytes =
            unsafe { core::slice::from_raw_parts(module.range.start as *const u8, module.range.len() as usize) };
        bytes.iter().copied().for_each(&mut eat);
    }
    h
}

/// Runs this host as `config.role` until a `shutdown` request. Never returns.
pub fn run(frames: &mut FrameAllocator, boot: &BootInfo<'_>, config: &Config) -> ! {
    let mut port = match ReplPort::bring_up(config) {
        Ok(port) => port,
        Err(e) => {
            log::error!("node: replication link: {e}");
            shutdown::exit(shutdown::ExitStatus::Failure)
        }
    };
    let mut session = Session::new(config, guest_id(boot));
    let mut guest = match config.role {
        Role::Primary => start_guest(frames, boot, config),
        _ => {
            log::info!("node: secondary: the SVM starts with the COLO engine (not driven yet)");
            None
        }
    };
    log::info!("node: {:?} host running", config.role);
    loop {
        match guest.as_mut() {
            Some((_, g)) => {
                if let Some(end) = g.step() {
                    g.report(&end);
                    if let Some((_, g)) = guest.take() {
                        g.destroy(frames);
                    }
                }
            }
            None => {
                if crate::net::poll() == crate::net::PollOutcome::Shutdown {
                    log::info!("shutdown requested over the management API");
                    shutdown::exit(shutdown::ExitStatus::Success);
                }
            }
        }
        port.poll();
        session.service(&mut port.link, time::now_ms());
        port.poll();
    }
}

/// Starts the first guest module (with its disk) on the detected backend.
fn start_guest(
    frames: &mut FrameAllocator,
    boot: &BootInfo<'_>,
    config: &Config,
) -> Option<(crate::backend::Backend, crate::runner::Guest)> {
    let module = boot.modules.iter().find(|m| m.cmdline.starts_with(crate::runner::GUEST_PREFIX))?;
    let mut backend = match crate::backend::Backend::detect(frames) {
        Ok(backend) => backend,
        Err(e) => {
            log::error!("node: no guest can run: {e}");
            return None;
        }
    };
    log::info!("backend: {}: {}", backend.name(), backend.describe());
    match crate::runner::Guest::create(&mut backend, frames, module, config.guest_mem_bytes) {
        Ok(mut guest) => {
            if let Some(disk) = crate::devices::host::find_disk(&boot.modules, module.cmdline) {
                // SAFETY: one guest runs on this host and the slice is dropped with it.
                guest.attach_disk(unsafe { crate::devices::host::disk_bytes(disk) });
            }
            log::info!("node: guest `{}` running (unreplicated: the COLO engine is not driven yet)", guest.name);
            Some((backend, guest))
        }
        Err(e) => {
            log::error!("node: guest not started: {e}");
            None
        }
    }
}
