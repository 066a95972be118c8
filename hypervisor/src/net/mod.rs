//! Host networking: the e1000 driver, the hypervisor's own smoltcp endpoint on the management
//! address, the JSON management API and the Prometheus metrics page.
//!
//! Pure, host-tested submodules: [`classify`] (what each received frame is), [`auth`] (the
//! management token, rate limiter and access check), [`mgmt`] (request parsing and replies) and [`metrics`] (the
//! exposition format and the HTTP request head). Bare-metal submodules: [`e1000`] (the NIC) and
//! [`iface`] (smoltcp `Device`, `Interface`, the TCP servers, and the guest forwarding hook).
//!
//! # Entry points for the kernel and the guest runner (bare metal)
//! - [`bring_up`]: once, after heap and clock; no-op without `mgmt_addr=`.
//! - [`is_up`], [`poll`]: one round of NIC and socket work; call it from any loop that runs for
//!   long (the guest runner's exit loop); it returns [`PollOutcome::Shutdown`] once a `shutdown`
//!   request has been answered.
//! - [`serve_until_shutdown`]: the idle loop when nothing else runs.
//! - [`set_guest_hook`]: install the one place frames for guest MACs go ([`GuestForward`]);
//!   [`send_from_guest`] sends a guest's frame out of the NIC with the `client` role.

pub mod auth;
pub mod classify;
pub mod metrics;
pub mod mgmt;
pub mod repl;
pub mod server;

#[cfg(feature = "bare-metal")]
pub mod e1000;
#[cfg(feature = "bare-metal")]
pub mod iface;

#[cfg(feature = "bare-metal")]
pub use iface::{
    bring_up, clear_guest_hook, fence_mac, is_up, poll, send_from_guest, serve_until_shutdown, set_guest_hook,
    take_repl_nic, witness_abort, witness_connect, witness_recv, witness_send, witness_state, GuestForward, NetError,
    PollOutcome, WitnessSocket,
};
