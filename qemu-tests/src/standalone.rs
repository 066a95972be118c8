//! One standalone hypervisor host on a test network: the set-up the `net`, `mgmt` and `security`
//! suites share. The host boots under QEMU TCG with `mgmt_addr=10.77.SUBNET.2/24`, a fresh
//! management token (module `mgmt-token`, as `cargo xtask image` makes), optional guests and a
//! zeroed disk, with its e1000 on the tap of a [`TestNet`] whose client is 10.77.SUBNET.1.
//! Guests get 10.77.SUBNET.3 and MAC 52:54:00:c0:SUBNET:03 (`{ip}` and `{mac}` in their module
//! arguments are replaced).

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use crate::netns::{self, TestNet};
use crate::{built_kernel, make_image, BootMedium, Emulator, ImageModule, Machine, MachineConfig, ScratchDir};

/// What to boot.
#[derive(Clone, Copy, Debug)]
pub struct HostOptions<'a> {
    /// Short name for scratch directories and interfaces.
    pub tag: &'a str,
    /// The /24 inside 10.77.0.0/16 (unique per test).
    pub subnet: u8,
    /// Guest modules: binary name and module arguments.
    pub guests: &'a [(&'a str, &'a str)],
    /// A zeroed disk module `disk-data` of this many KiB.
    pub disk_kib: Option<usize>,
    /// More kernel command-line words.
    pub extra_cmdline: &'a str,
    /// The serial line that says the host is ready.
    pub wait_for: &'a str,
    /// How long to wait for it.
    pub timeout: Duration,
}

impl<'a> HostOptions<'a> {
    /// A host with no guest, ready when it serves the management plane.
    pub fn new(tag: &'a str, subnet: u8) -> Self {
        Self {
            tag,
            subnet,
            guests: &[],
            disk_kib: None,
            extra_cmdline: "",
            wait_for: "serving the management plane",
            timeout: Duration::from_secs(120),
        }
    }
}

/// A booted host and its client network. Field order matters: the machine is dropped (and its
/// tap released) before the network is removed.
#[derive(Debug)]
pub struct StandaloneHost {
    machine: Option<Machine>,
    /// The client network.
    pub net: TestNet,
    /// The management address (10.77.SUBNET.2).
    pub mgmt_ip: String,
    /// The host NIC's MAC.
    pub nic_mac: String,
    /// The guest's address (10.77.SUBNET.3).
    pub guest_ip: String,
    /// The management token.
    pub token: String,
    /// Its file (`ctl --token-file`).
    pub token_file: PathBuf,
    scratch: ScratchDir,
}

impl StandaloneHost {
    /// Boots the host and waits for `wait_for`; panics with the reason (tests).
    pub fn boot(o: &HostOptions<'_>) -> Self {
        assert!(netns::available(), "this suite needs root and iproute2 (`cargo xtask deps`)");
        let kernel = built_kernel().unwrap_or_else(|e| panic!("{e}"));
        let scratch = ScratchDir::new(o.tag).expect("scratch dir");
        let image = scratch.path().join("colo.img");
        let s = o.subnet;
        let (mgmt_ip, guest_ip) = (format!("10.77.{s}.2"), format!("10.77.{s}.3"));
        let (nic_mac, guest_mac) = (format!("52:54:00:77:{s:02x}:02"), format!("52:54:00:c0:{s:02x}:03"));
        let token_file = scratch.path().join("mgmt-token");
        let token = crate::write_mgmt_token(&token_file).unwrap_or_else(|e| panic!("{e}"));
        let mut modules: Vec<ImageModule> = o
            .guests
            .iter()
            .map(|(name, args)| {
                let path = crate::guests::guest_path(name);
                assert!(path.is_file(), "{} missing: run `cargo xtask build`", path.display());
                let args = args.replace("{ip}", &format!("{guest_ip}/24")).replace("{mac}", &guest_mac);
                ImageModule { path, name: name.to_string(), args }
            })
            .collect();
        if let Some(kib) = o.disk_kib {
            let disk = scratch.path().join("disk.img");
            std::fs::write(&disk, vec![0u8; kib * 1024]).expect("writing the disk image");
            modules.push(ImageModule { path: disk, name: "disk-data".into(), args: String::new() });
        }
        modules.push(crate::mgmt_token_module(&token_file));
        let cmdline = format!("role=standalone mgmt_addr={mgmt_ip}/24 {}", o.extra_cmdline);
        make_image(&kernel, cmdline.trim_end(), &modules, &image).unwrap_or_else(|e| panic!("{e}"));
        let net = TestNet::new(o.tag, &format!("10.77.{s}.1/24")).unwrap_or_else(|e| panic!("test network: {e}"));
        let mut config = MachineConfig::new(Emulator::Qemu, BootMedium::Cdrom, &image);
        config.extra = net.qemu_nic_args("n0", &nic_mac);
        let mut machine = Machine::start(config, o.tag).unwrap_or_else(|e| panic!("{e}"));
        let line = machine.wait_for(o.wait_for, o.timeout).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("[timing] {}: QEMU TCG: `{}` after {:.2} s", o.tag, o.wait_for, line.at.as_secs_f64());
        Self { machine: Some(machine), net, mgmt_ip, nic_mac, guest_ip, token, token_file, scratch }
    }

    /// The running machine.
    pub fn machine(&mut self) -> &mut Machine {
        self.machine.as_mut().expect("machine running")
    }

    /// Takes the machine (to wait for its exit); later calls to [`Self::machine`] panic.
    pub fn take_machine(&mut self) -> Machine {
        self.machine.take().expect("machine running")
    }

    /// The serial console so far (empty once the machine was taken).
    pub fn serial(&self) -> String {
        self.machine.as_ref().map(Machine::serial).unwrap_or_default()
    }

    /// Runs `program args` in the client namespace under a timeout.
    pub fn run(&self, program: &str, args: &[&str], timeout_s: u32) -> Output {
        self.net.run(program, args, timeout_s)
    }

    /// Runs a Python script in the client namespace under `timeout_s`; its stdout. The test
    /// fails, with the serial console, when the script fails.
    pub fn python(&self, script: &str, args: &[&str], timeout_s: u32) -> String {
        let mut all = vec!["-c", script];
        all.extend_from_slice(args);
        let out = self.net.run("python3", &all, timeout_s);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "client script failed ({}):\n{stdout}{}\nserial:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.serial()
        );
        stdout
    }

    /// The host's scratch directory (image, token, disk).
    pub fn scratch(&self) -> &std::path::Path {
        self.scratch.path()
    }
}

/// Fails the test unless `promtool check metrics` accepts `body` (a metrics page).
pub fn assert_promtool_accepts(body: &str) {
    use std::process::{Command, Stdio};
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`; `cargo xtask deps`)");
    std::io::Write::write_all(promtool.stdin.as_mut().expect("promtool stdin"), body.as_bytes())
        .expect("writing to promtool");
    let result = promtool.wait_with_output().expect("promtool output");
    assert!(
        result.status.success(),
        "promtool check metrics failed:\n{}{}\npage:\n{body}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
}
