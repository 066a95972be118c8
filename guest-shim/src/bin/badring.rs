//! `guest-badring`: a hostile guest for the paravirtual devices. It attaches rings that lie
//! outside RAM or have a bad size, then puts out-of-range indices, descriptors outside guest
//! RAM, oversized and undersized frames into a valid TX ring, posts RX descriptors pointing
//! outside RAM and too-small RX buffers, and sends hostile block requests. Every refusal must
//! come back as an error code; it prints what it saw and exits 0 if each was refused.
//! The hypervisor's device counters (printed at guest end) must show each kind.
#![no_std]
#![no_main]

use guest_shim::abi::{
    Hypercall, HypercallError, PvBlockRequest, PvDesc, PvRingHeader, BLOCK_OP_READ, BLOCK_OP_WRITE, PV_RING_MAGIC,
};
use guest_shim::rt::{hypercall, Env};
use guest_shim::{guest_main, println};

guest_main!(main);

#[repr(C, align(4096))]
struct Ring {
    header: PvRingHeader,
    desc: [PvDesc; 8],
}

static mut RX: Ring = Ring {
    header: PvRingHeader { magic: 0, entries: 0, producer: 0, consumer: 0, reserved: 0 },
    desc: [PvDesc { addr: 0, len: 0, flags: 0, reserved: 0 }; 8],
};
static mut TX: Ring = Ring {
    header: PvRingHeader { magic: 0, entries: 0, producer: 0, consumer: 0, reserved: 0 },
    desc: [PvDesc { addr: 0, len: 0, flags: 0, reserved: 0 }; 8],
};
static mut FRAME: [u8; 64] = [0xFF; 64];

fn expect(what: &str, result: Result<u64, Option<HypercallError>>, want: Option<HypercallError>) -> bool {
    let ok = match want {
        Some(e) => result == Err(Some(e)),
        None => result.is_ok(),
    };
    println!("badring: {what}: {result:?} ({})", if ok { "as expected" } else { "UNEXPECTED" });
    ok
}

fn main(env: &Env) -> i32 {
    let ram = env.ram_size;
    let rx = core::ptr::addr_of_mut!(RX);
    let tx = core::ptr::addr_of_mut!(TX);
    let mut all = true;
    // SAFETY: the guest is single-threaded; the hypervisor reads these statics only during the
    // hypercalls below.
    unsafe {
        all &= expect(
            "attach outside RAM",
            hypercall(Hypercall::NetAttach, ram - 8, tx as u64, 0),
            Some(HypercallError::BadAddress),
        );
        (*rx).header = PvRingHeader { magic: PV_RING_MAGIC, entries: 3, ..Default::default() };
        (*tx).header = PvRingHeader { magic: PV_RING_MAGIC, entries: 8, ..Default::default() };
        all &= expect(
            "attach with 3 entries",
            hypercall(Hypercall::NetAttach, rx as u64, tx as u64, 0),
            Some(HypercallError::InvalidArgument),
        );
        (*rx).header.entries = 8;
        all &= expect("attach", hypercall(Hypercall::NetAttach, rx as u64, tx as u64, 0), None);
        // TX: out-of-range producer index.
        (*tx).header.producer = 5000;
        all &= expect(
            "tx producer 5000 ahead",
            hypercall(Hypercall::NetNotify, 0, 0, 0),
            Some(HypercallError::DeviceError),
        );
        // TX: a descriptor outside RAM, one wrapping the address space, an oversized and an
        // undersized frame: all consumed, none sent.
        let frame = core::ptr::addr_of!(FRAME) as u64;
        (*tx).desc[0] = PvDesc { addr: ram + 0x1000, len: 64, ..Default::default() };
        (*tx).desc[1] = PvDesc { addr: u64::MAX - 16, len: 64, ..Default::default() };
        (*tx).desc[2] = PvDesc { addr: frame, len: 9000, ..Default::default() };
        (*tx).desc[3] = PvDesc { addr: frame, len: 4, ..Default::default() };
        (*tx).header.producer = 4;
        all &= expect(
            "tx hostile descriptors",
            hypercall(Hypercall::NetNotify, 0, 0, 0),
            Some(0).map(|_| None).unwrap_or(None),
        );
        let consumer = core::ptr::read_volatile(core::ptr::addr_of!((*tx).header.consumer));
        println!("badring: tx consumer after hostile descriptors: {consumer}");
        all &= consumer == 4;
        // RX: descriptors outside RAM and too small, then an index far ahead.
        (*rx).desc[0] = PvDesc { addr: ram - 4, len: 2048, ..Default::default() };
        (*rx).desc[1] = PvDesc { addr: frame, len: 8, ..Default::default() };
        (*rx).header.producer = 2;
        all &= expect("rx hostile buffers posted", hypercall(Hypercall::NetNotify, 0, 0, 0), None);
        // Block device: bad op, bad length, beyond the disk, buffer outside RAM, request outside RAM.
        let buf = frame;
        let reqs = [
            ("block op 77", PvBlockRequest { op: 77, status: 0, sector: 0, len: 512, addr: buf }),
            ("block length 100", PvBlockRequest { op: BLOCK_OP_READ, status: 0, sector: 0, len: 100, addr: buf }),
            (
                "block beyond disk",
                PvBlockRequest { op: BLOCK_OP_WRITE, status: 0, sector: u64::MAX / 512, len: 512, addr: buf },
            ),
            (
                "block buffer outside RAM",
                PvBlockRequest { op: BLOCK_OP_READ, status: 0, sector: 0, len: 4096, addr: ram - 512 },
            ),
        ];
        let has_disk = hypercall(Hypercall::BlockInfo, 0, 0, 0).is_ok();
        for (what, req) in reqs {
            let want = if has_disk { HypercallError::DeviceError } else { HypercallError::NoDevice };
            all &= expect(what, hypercall(Hypercall::BlockRequest, &req as *const _ as u64, 0, 0), Some(want));
        }
        let want = if has_disk { HypercallError::BadAddress } else { HypercallError::NoDevice };
        all &= expect("block request outside RAM", hypercall(Hypercall::BlockRequest, ram + 8, 0, 0), Some(want));
        // Finally, the out-of-range RX index: only counted when a frame arrives for us.
        (*rx).header.producer = 100_000;
        let _ = hypercall(Hypercall::NetNotify, 0, 0, 0);
    }
    println!("badring: {}", if all { "every hostile request was refused" } else { "SOMETHING WAS ACCEPTED" });
    if all {
        0
    } else {
        1
    }
}
